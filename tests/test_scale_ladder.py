"""The scale-ladder study (pyinfluence.bench.studies.scale_ladder) and its rungs (pyinfluence.bench.ladder).

Every number is checked against an independent computation written here: the agreement metrics against
numpy formulas (np.corrcoef, argsort ranks, np.linalg.lstsq, per-column top-k sets); the reference
up_loss against ``torch.autograd.functional.hessian`` + ``torch.linalg.solve`` + per-example
``torch.autograd.grad``; the GPT's causality and loss against direct recomputation. One tiny rung runs end
to end through the subprocess workers (quick sizes, two solvers, no peers).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyinfluence.bench import ladder
from pyinfluence.bench.studies import scale_ladder as sl

from helpers import flat_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# metrics against numpy formulas
# ------------------------------------------------------------------------------------------------
def _ranks(x: np.ndarray) -> np.ndarray:  # no ties in continuous random data
    r = np.empty(x.size)
    r[np.argsort(x)] = np.arange(1, x.size + 1)
    return r


def test_agreement_matches_numpy_formulas():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 5))
    est = 2.5 * ref + 0.7 * rng.standard_normal((40, 5))
    got = sl.agreement(est, ref, k=10)
    assert got["pearson"] == pytest.approx(np.corrcoef(est.ravel(), ref.ravel())[0, 1], rel=1e-12)
    assert got["spearman"] == pytest.approx(
        np.corrcoef(_ranks(est.ravel()), _ranks(ref.ravel()))[0, 1], rel=1e-12
    )
    b = np.linalg.lstsq(ref.reshape(-1, 1), est.ravel(), rcond=None)[0][0]
    assert got["slope"] == pytest.approx(b, rel=1e-12)
    per = []
    for j in range(5):
        h = len(set(np.argsort(est[:, j])[:10]) & set(np.argsort(ref[:, j])[:10]))
        r = len(set(np.argsort(-est[:, j])[:10]) & set(np.argsort(-ref[:, j])[:10]))
        per.append((h + r) / 20)
    np.testing.assert_allclose(got["top10_per_test"], per)
    assert got["top10"] == pytest.approx(np.mean(per))
    assert got["max_rel_err"] == pytest.approx(np.abs(est - ref).max() / np.abs(ref).max())
    # identical matrices: everything perfect; a sign flip: slope -1, Pearson -1, no top-k overlap
    same = sl.agreement(ref, ref)
    assert same["pearson"] == pytest.approx(1.0) and same["slope"] == pytest.approx(1.0)
    assert same["top10"] == 1.0
    flip = sl.agreement(-ref, ref)
    assert flip["slope"] == pytest.approx(-1.0) and flip["pearson"] == pytest.approx(-1.0)
    assert flip["top10"] == 0.0
    # k above n is capped at n: every point is in both sets
    assert sl.topk_overlap_per_test(est[:4], ref[:4], k=10) == [1.0] * 5


def test_agreement_bad_input():
    a = np.ones((4, 2))
    with pytest.raises(ValueError, match="same shape"):
        sl.slope_through_origin(a, np.ones((4, 3)))
    with pytest.raises(ValueError, match="same shape"):
        sl.topk_overlap_per_test(a, np.ones((3, 2)))
    with pytest.raises(ValueError, match="k must be"):
        sl.topk_overlap_per_test(a, a, k=0)
    assert math.isnan(sl.slope_through_origin(a, np.zeros((4, 2))))
    bad = a.copy()
    bad[0, 0] = np.nan
    assert math.isnan(sl.slope_through_origin(bad, a))
    assert all(math.isnan(v) for v in sl.topk_overlap_per_test(bad, a))


# ------------------------------------------------------------------------------------------------
# the method list follows the solver registry
# ------------------------------------------------------------------------------------------------
def test_methods_iterate_the_registry(monkeypatch):
    from dataclasses import dataclass, fields

    from pyinfluence.torch import solvers

    small = {m["label"]: m for m in sl.pyinfluence_methods(2_000)}
    big = {m["label"]: m for m in sl.pyinfluence_methods(2_000_000)}
    for key, cls in solvers._SOLVERS.items():
        assert small[key]["solver"] == key and small[key]["skip"] is None
        has = "raise_on_nonconvergence" in {f.name for f in fields(cls)}
        assert (small[key]["settings"].get("raise_on_nonconvergence") is False) == has
        cls(**small[key]["settings"])  # the settings construct the solver
    assert big["exact"]["skip"] and "10000" in big["exact"]["skip"]
    assert small["block_cg+ekfac"]["settings"]["preconditioner"] == "ekfac"
    assert solvers.BlockCG(**small["block_cg+ekfac"]["settings"]).preconditioner == "ekfac"
    assert solvers.BlockCG(**small["block_cg tol=1e-4"]["settings"]).tol == 1e-4  # pyDVL's block-CG rtol
    scale = solvers.solver_from_config("ekfac", small["ekfac (scale checks)"]["settings"])
    assert scale.lanczos_steps == 0 and scale.residual_columns == 8 and scale.tol is None
    lm = {m["label"]: m for m in sl.pyinfluence_methods(2_000, sampled_fisher=True)}
    assert lm["ekfac"]["settings"]["fisher"] == "sampled" and lm["kfac"]["settings"]["fisher"] == "sampled"
    pre = solvers.solver_from_config("block_cg", lm["block_cg+ekfac"]["settings"]).preconditioner
    assert isinstance(pre, solvers.EKFAC) and pre.fisher == "sampled" and pre.lanczos_steps == 0

    @dataclass(frozen=True)
    class Fake(solvers.CG):  # a solver registered later by someone else
        pass

    monkeypatch.setitem(solvers._SOLVERS, "fake", Fake)
    assert "fake" in {m["label"] for m in sl.pyinfluence_methods(100)}


# ------------------------------------------------------------------------------------------------
# the GPT and its text
# ------------------------------------------------------------------------------------------------
def test_grammar_text_is_deterministic_and_small_alphabet():
    a, b = ladder.grammar_text(50, seed=3), ladder.grammar_text(50, seed=3)
    assert a == b and a != ladder.grammar_text(50, seed=4)
    assert set(a) <= set("abcdefghijklmnopqrstuvwxyz .") and a.count(".") == 50
    with pytest.raises(ValueError, match="n_sentences"):
        ladder.grammar_text(0)


def test_tiny_gpt_is_causal_and_its_loss_is_the_mean_token_cross_entropy():
    torch.manual_seed(0)
    V, T, d, layers, heads = 7, 6, 8, 2, 2
    m = ladder.TinyGPT(V, block=T, d_model=d, n_layers=layers, n_heads=heads).double().eval()
    # parameter count in closed form: embeddings, per block 2 LN + 4 attn + 2 MLP linears, final LN, head
    per_block = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert sum(p.numel() for p in m.parameters()) == V * d + T * d + layers * per_block + 2 * d + d * V + V
    x = torch.randint(0, V, (3, T))
    out = m(x)
    assert out.shape == (3, T, V)
    x2 = x.clone()
    x2[:, 4:] = (x2[:, 4:] + 1) % V  # change the future
    out2 = m(x2)
    torch.testing.assert_close(out2[:, :4], out[:, :4], rtol=0, atol=1e-13)
    assert not torch.allclose(out2[:, 4:], out[:, 4:])
    assert torch.equal(m(input_ids=x), out)  # dict batches call model(input_ids=...)
    y = torch.randint(0, V, (3, T))
    logp = out - torch.logsumexp(out, dim=-1, keepdim=True)
    manual = -logp.gather(-1, y[..., None])[..., 0].mean(1)
    torch.testing.assert_close(ladder.sequence_cross_entropy(out, y), manual)


def test_gpt_training_lowers_the_loss():
    text = ladder.grammar_text(120, seed=0)
    vocab, ids = ladder._encode(text)
    X, Y = ladder._windows(ids, 24, 12, 0)
    torch.manual_seed(0)
    m = ladder.TinyGPT(len(vocab), block=12, d_model=16, n_layers=1, n_heads=2)
    with torch.no_grad():
        before = float(ladder.sequence_cross_entropy(m(X), Y).mean())
    ladder.train_gpt(m, X, Y, steps=40, batch_size=8, lr=1e-2)
    with torch.no_grad():
        after = float(ladder.sequence_cross_entropy(m(X), Y).mean())
    assert before == pytest.approx(math.log(len(vocab)), rel=0.05)  # near-uniform at initialisation
    assert after < before - 0.5, (before, after)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name must be one of"):
        ladder.make_rung("mlp-7")
    with pytest.raises(ValueError, match="sizes"):
        ladder.mlp([64])
    with pytest.raises(ValueError, match="activation"):
        ladder.mlp([3, 2], activation="swish")
    with pytest.raises(ValueError, match="unknown architecture"):
        ladder.build_model({"kind": "rnn"})
    with pytest.raises(ValueError, match="rungs must be"):
        sl.run_ladder(["nope"])
    with pytest.raises(ValueError, match="method must be"):
        ladder.reference_up_loss(_tiny_rung(), method="lu")
    with pytest.raises(ValueError, match="m_test must be"):
        ladder.make_rung("mlp-2k", quick=True, m_test=0)
    with pytest.raises(ValueError, match="reference must be one of"):
        sl.run_ladder(["mlp-2k"], reference="lu")
    with pytest.raises(ValueError, match="reference_tol must be"):
        sl.run_ladder(["mlp-2k"], reference_tol=0.0)


# ------------------------------------------------------------------------------------------------
# the reference against torch.autograd
# ------------------------------------------------------------------------------------------------
def _tiny_rung(l2=1e-2, damping=0.3, params=None) -> ladder.Rung:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    Xt = torch.randn(4, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (4,), generator=g)
    arch = {"kind": "mlp", "sizes": [4, 5, 3], "activation": "tanh"}
    torch.manual_seed(1)
    model = ladder.build_model(arch).eval()
    return ladder.Rung(
        "mlp-2k", "tiny", arch, model, ladder._loss_for(arch), X, y, Xt, yt, l2, damping, params, False, {}
    )


def _autograd_up_loss(r: ladder.Rung) -> np.ndarray:
    named = dict(r.model.named_parameters())
    theta0, unflat = flat_parameters(r.model, r.selected())

    def loss(t, X, Y):
        ps = {k: v.detach() for k, v in named.items()}
        ps.update(unflat(t))
        return F.cross_entropy(torch.func.functional_call(r.model, ps, (X,)), Y, reduction="none")

    H = torch.autograd.functional.hessian(lambda t: loss(t, r.X_train, r.y_train).mean(), theta0)
    H = H + (r.l2 + r.damping) * torch.eye(theta0.numel(), dtype=torch.float64)

    def grads(X, Y):
        rows = []
        for i in range(X.shape[0]):
            t = theta0.clone().requires_grad_(True)
            rows.append(torch.autograd.grad(loss(t, X[i : i + 1], Y[i : i + 1]).sum(), t)[0])
        return torch.stack(rows)

    G, Gt = grads(r.X_train, r.y_train), grads(r.X_test, r.y_test)
    return (-(G @ torch.linalg.solve(H, Gt.T))).numpy()


@pytest.mark.parametrize("params", [None, ["2.weight", "2.bias"]])
def test_reference_matches_autograd(params):
    r = _tiny_rung(params=params)
    want = _autograd_up_loss(r)
    for method in ("exact", "cg"):
        got, info = ladder.reference_up_loss(r, method=method, rows=7)
        assert got.shape == (30, 4) and info["method"] == method
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
        assert info["max_residual"] < 1e-8 and info["n_params"] == r.n_params
    assert ladder.reference_up_loss(r)[1]["method"] == "exact"  # auto: p ≤ 10⁴


def test_reference_refuses_an_indefinite_hessian():
    r = _tiny_rung(l2=0.0, damping=0.0)
    lo = ladder.smallest_curvature(r, steps=50)
    H = torch.autograd.functional.hessian(
        lambda t: F.cross_entropy(
            torch.func.functional_call(
                r.model,
                {n: t[i:j].reshape(s) for n, (i, j, s) in _offsets(r).items()},
                (r.X_train,),
            ),
            r.y_train,
        ),
        torch.cat([p.detach().reshape(-1) for p in r.model.parameters()]),
    )
    assert lo == pytest.approx(float(torch.linalg.eigvalsh(H)[0]), abs=1e-6)  # all 43 directions: exact
    assert lo < -1e-3  # this untrained network's Hessian is indefinite
    r.damping = -lo - 1e-3  # H + λI then has the eigenvalue -1e-3
    with pytest.raises(ValueError, match="not positive definite"):
        ladder.reference_up_loss(r, method="exact")
    with pytest.raises(ValueError, match="not positive definite"):
        ladder.reference_up_loss(r, method="cg")


def _offsets(r):
    out, i = {}, 0
    for n, p in r.model.named_parameters():
        out[n] = (i, i + p.numel(), p.shape)
        i += p.numel()
    return out


def test_rung_save_load_round_trip(tmp_path):
    r = _tiny_rung(params=["0.weight"])
    r.info["note"] = "x"
    r.save(str(tmp_path))
    back = ladder.load_rung(str(tmp_path))
    assert back.params == ["0.weight"] and back.l2 == r.l2 and back.info == r.info
    torch.testing.assert_close(back.model(r.X_test), r.model(r.X_test), rtol=0, atol=0)
    assert torch.equal(back.X_train, r.X_train) and torch.equal(back.y_test, r.y_test)
    assert back.n_params == 5 * 4
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "rung.json", "weights.npz"]


# ------------------------------------------------------------------------------------------------
# one tiny rung end to end (subprocess workers)
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_quick_rung_end_to_end(tmp_path):
    entry = sl.run_rung(
        "mlp-2k",
        quick=True,
        work_dir=str(tmp_path),
        timeout_s=240,
        methods=["exact", "cg"],
        peers=(),
        warm_up=False,
        progress=lambda s: None,
    )
    assert entry["n_params"] == 64 * 8 + 8 + 8 * 10 + 10 and entry["n_train"] == 150
    ref = entry["reference"]
    assert ref["error"] is None and ref["method"] == "exact" and ref["max_residual"] < 1e-10
    rows = {r["method"]: r for r in entry["rows"]}
    assert set(rows) == {"exact", "cg"}
    for key in ("exact", "cg"):
        r = rows[key]
        assert r["status"] == "ok", r["error"]
        assert r["pearson"] > 1 - 1e-9 and r["slope"] == pytest.approx(1.0, abs=1e-6) and r["top10"] == 1.0
        assert r["time_s"] > 0 and r["peak_mem_mb"] > r["delta_mem_mb"] >= 0
    doc = {"rungs": [entry]}
    text = sl.markdown(doc)
    assert "### mlp-2k" in text and "| pyinfluence | cg |" in text


@pytest.mark.slow
def test_timing_only_run_with_more_test_points(tmp_path):
    """``reference="none"``: no reference process, no agreement columns; ``test_points`` sets m."""
    entry = sl.run_rung(
        "mlp-2k",
        quick=True,
        work_dir=str(tmp_path),
        timeout_s=240,
        methods=["cg"],
        peers=(),
        warm_up=False,
        progress=lambda s: None,
        test_points=7,
        reference="none",
    )
    assert entry["m_test"] == 7 and entry["reference"]["method"] == "none"
    assert not os.path.exists(os.path.join(str(tmp_path), "mlp-2k", "reference"))
    (row,) = entry["rows"]
    assert row["status"] == "ok", row["error"]
    assert "pearson" not in row and row["time_s"] > 0
    assert "none (timing-only run)" in sl.markdown({"rungs": [entry]})
