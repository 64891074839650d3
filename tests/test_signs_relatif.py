"""The peers' sign convention (``helpfulness``) and normalised influence in ``top_k`` (issue 18, items 4 and 5).

Every expected value is computed here, independently of the library: closed-form numpy for the linear path
(sigmoid / squared-loss gradients, the Hessian of the mean loss + (l2/2)‖θ‖², solves with numpy.linalg) and
torch.func (per-example gradients by vmap(grad), the Hessian by torch.func.hessian) for a tiny torch MLP.

- ``helpfulness`` = −up_loss = g_testᵀ(H+λI)⁻¹g_train, positive = helpful, (k, m), on both paths;
- the conversions to each peer's scores stated in the README ("Signs and other libraries"), each peer's
  formula written here as that peer defines it (Captum: a sum Hessian, (test, train); pyDVL and kronfluence
  with exact curvature: (test, train); dattri: (train, test), mean or sum loss);
- ``top_k(normalize=...)``: RelatIF θ-relative (÷‖(H+λI)⁻¹g‖), ℓ-relative (÷√(gᵀ(H+λI)⁻¹g)) and the cosine
  in the (H+λI)⁻¹ metric, against their formulas (all n scores, k = n, and small k through several blocks);
  a zero gradient scores 0; with Dask training data; on the torch path (Exact and CG);
- a planted high-leverage, mislabelled row tops the raw harmful lists of most test points but far fewer
  normalised ones;
- a bad ``normalize`` raises ValueError (TypeError for a non-string) naming it.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

import pyinfluence
from pyinfluence import LinearInfluence, LogisticRegression, RidgeRegression
from pyinfluence.interface import Influence

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

L2, DAMP = 0.05, 0.01
NORMS = ("theta", "loss", "cosine")


# ------------------------------------------------------------------------------------------------
# closed-form references (numpy)
# ------------------------------------------------------------------------------------------------
def _logistic_data(seed: int = 3, n: int = 80, m: int = 12, planted: bool = False):
    rng = np.random.default_rng(seed)
    d = 3
    w = np.array([1.5, -1.0, 0.5])
    X = rng.standard_normal((n, d))
    y = (X @ w + 0.5 * rng.standard_normal(n) > 0).astype(np.int64)
    if planted:  # far out along w (high leverage) and on the wrong side (mislabelled)
        X[0] = 3.5 * w / np.linalg.norm(w) * 2.0
        y[0] = 0
    Xt = rng.standard_normal((m, d))
    yt = (Xt @ w > 0).astype(np.int64)
    return X, y, Xt, yt


def _logistic_reference(model, X, y, Xt, yt, damping: float):
    """(G (n, p), Gt (m, p), H_data (p, p), l2) for the binary logistic loss log(1+e^s) − y s with the intercept
    penalised (penalize_intercept=True): g = (σ(s) − y) x̃, H_data = (1/n) Σ σ(1−σ) x̃x̃ᵀ, x̃ = [x, 1]."""
    theta = model.theta_.ravel()

    def grads(A, b):
        At = np.hstack([A, np.ones((A.shape[0], 1))])
        p = 1.0 / (1.0 + np.exp(-(At @ theta)))
        return (p - b)[:, None] * At, At, p

    G, Xa, p = grads(X, y.astype(float))
    Gt, _, _ = grads(Xt, yt.astype(float))
    H_data = (Xa * (p * (1 - p))[:, None]).T @ Xa / X.shape[0]
    return G, Gt, H_data


def _normalised_reference(G, Gt, A, normalize):
    """The normalised scores (n, m) from closed-form pieces, A = (H+λI) (solved, never inverted)."""
    Z = np.linalg.solve(A, G.T)  # (p, n): (H+λI)⁻¹ g_i
    up = -(Gt @ Z).T  # (n, m): −g_tᵀ(H+λI)⁻¹g_i
    if normalize is None:
        return up
    if normalize == "theta":
        den = np.linalg.norm(Z, axis=0)
    else:
        den = np.sqrt(np.einsum("ip,pi->i", G, Z))
    out = np.where(den[:, None] > 0, up / np.where(den > 0, den, 1.0)[:, None], 0.0)
    if normalize == "cosine":
        tq = np.sqrt(np.einsum("jp,pj->j", Gt, np.linalg.solve(A, Gt.T)))
        out = out / tq[None, :]
    return out


def _check_ranking(top, ref, k):
    """``top`` (a TopK) against the reference scores ``ref`` (n, m): the k most negative / positive per test
    point, in order, with their values. Ties are impossible in these continuous data sets."""
    top = [np.asarray(a) for a in (top.helpful_idx, top.helpful_scores, top.harmful_idx, top.harmful_scores)]
    order = np.argsort(ref, axis=0, kind="stable")  # increasing, per test point
    h_idx, r_idx = order[:k].T, order[::-1][:k].T
    assert top[0].shape == top[2].shape == (ref.shape[1], k)
    np.testing.assert_array_equal(top[0], h_idx)
    np.testing.assert_array_equal(top[2], r_idx)
    np.testing.assert_allclose(top[1], np.take_along_axis(ref.T, h_idx, 1), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(top[3], np.take_along_axis(ref.T, r_idx, 1), rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def logistic():
    X, y, Xt, yt = _logistic_data()
    model = LogisticRegression(l2=L2, penalize_intercept=True, tol=1e-12).fit(X, y)
    inf = LinearInfluence(model, X, y, damping=DAMP)
    G, Gt, H_data = _logistic_reference(model, X, y, Xt, yt, DAMP)
    A = H_data + (L2 + DAMP) * np.eye(G.shape[1])
    return inf, X, y, Xt, yt, G, Gt, H_data, A


# ------------------------------------------------------------------------------------------------
# item 4: the peers' sign convention
# ------------------------------------------------------------------------------------------------
def test_helpfulness_is_minus_up_loss_positive_helpful_linear(logistic):
    inf, X, y, Xt, yt, G, Gt, _, A = logistic
    ref = G @ np.linalg.solve(A, Gt.T)  # g_iᵀ(H+λI)⁻¹g_t, (n, m): positive = helpful
    hf = inf.helpfulness(Xt, yt)
    assert hf.shape == (X.shape[0], Xt.shape[0])
    np.testing.assert_allclose(hf, ref, rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(hf, -inf.up_loss(Xt, yt))
    # train_idx and a single test point without the batch axis, as for up_loss
    np.testing.assert_allclose(
        inf.helpfulness(Xt[2], yt[2], train_idx=[5, 1]), ref[[5, 1]][:, [2]], rtol=1e-10
    )
    # positive = helpful: removing the most helpful point raises the test loss (loo_change > 0)
    j = int(np.argmax(ref[:, 0]))
    assert inf.retrain_loo(Xt[:1], yt[:1], train_idx=[j])[0, 0] > 0
    assert "positive = helpful" in (Influence.helpfulness.__doc__ or "")


def test_peer_conversions_stated_in_the_readme(logistic):
    """Each peer's score, from its own definition, converted by the factor the README states, is ours."""
    inf, X, y, Xt, yt, G, Gt, H_data, _ = logistic
    n, p = G.shape
    reg = L2 + DAMP  # the l2 term and our damping both go into the peer's regularisation
    ours = inf.helpfulness(Xt, yt)  # (n, m)
    up = inf.up_loss(Xt, yt)
    # Captum NaiveInfluenceFunction: g_tᵀ(Σ_i ∇²L_i + hessian_reg·I)⁻¹g_i, (m, n), hessian_reg = n·(l2 + λ)
    captum = Gt @ np.linalg.solve(n * H_data + n * reg * np.eye(p), G.T)
    np.testing.assert_allclose(ours, n * captum.T, rtol=1e-9)
    np.testing.assert_allclose(up, -n * captum.T, rtol=1e-9)
    # pyDVL DirectInfluence: ⟨(H_mean + regularization·I)⁻¹g_t, g_i⟩, (m, n); kronfluence with exact curvature
    # (for the logistic loss the Fisher is the Hessian) has the same form
    pydvl = Gt @ np.linalg.solve(H_data + reg * np.eye(p), G.T)
    np.testing.assert_allclose(ours, pydvl.T, rtol=1e-9)
    np.testing.assert_allclose(up, -pydvl.T, rtol=1e-9)
    # dattri IFAttributorExplicit: g_iᵀ(∇²(task loss) + regularization·I)⁻¹g_t, (n_train, n_test);
    # task loss a mean: as ours; a sum (regularization = n·(l2 + λ)): ours / n
    dattri_mean = G @ np.linalg.solve(H_data + reg * np.eye(p), Gt.T)
    dattri_sum = G @ np.linalg.solve(n * H_data + n * reg * np.eye(p), Gt.T)
    np.testing.assert_allclose(ours, dattri_mean, rtol=1e-9)
    np.testing.assert_allclose(ours, n * dattri_sum, rtol=1e-9)
    # loo_change is positive for helpful points too: ≈ helpfulness / n
    np.testing.assert_allclose(inf.loo_change(Xt, yt), ours / n, rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# item 5: normalised influence, linear path
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [None, *NORMS])
def test_normalised_top_k_matches_formula_linear(logistic, normalize):
    inf, X, y, Xt, yt, G, Gt, _, A = logistic
    ref = _normalised_reference(G, Gt, A, normalize)
    n = X.shape[0]
    _check_ranking(inf.top_k(Xt, yt, k=n, normalize=normalize), ref, n)
    _check_ranking(inf.top_k(Xt, yt, k=4, normalize=normalize), ref, 4)
    if normalize == "cosine":  # bounded; a training point identical to the test point is at −1
        assert np.all(np.abs(ref) <= 1 + 1e-12)
        top = inf.top_k(X[7], y[7], k=1, normalize="cosine")
        assert top.helpful_idx[0, 0] == 7 and top.helpful_scores[0, 0] == pytest.approx(-1.0, abs=1e-12)


@pytest.mark.parametrize("normalize", NORMS)
def test_normalised_top_k_merges_blocks_of_rows(logistic, normalize, monkeypatch):
    """Blocks of a few rows (the memory budget made tiny): the running top-k merge gives the same ranking."""
    from pyinfluence.linear import influence as linf

    inf, X, y, Xt, yt, G, Gt, _, A = logistic
    monkeypatch.setattr(linf, "_BLOCK_BYTES", 8 * G.shape[1] * 7)  # 7 rows per block
    ref = _normalised_reference(G, Gt, A, normalize)
    _check_ranking(inf.top_k(Xt, yt, k=9, normalize=normalize), ref, 9)
    _check_ranking(inf.top_k(Xt[:1], yt[:1], k=X.shape[0], normalize=normalize), ref[:, :1], X.shape[0])


def test_zero_gradient_scores_zero():
    """Ridge without intercept and a zero training row: g = (θᵀx − y)x = 0, so its up_loss is 0 and its
    normalised scores are 0 (not 0/0)."""
    rng = np.random.default_rng(5)
    n, d, m = 40, 3, 6
    X = rng.standard_normal((n, d))
    y = X @ np.array([1.0, -2.0, 0.5]) + 0.3 * rng.standard_normal(n)
    X[4] = 0.0
    Xt, yt = rng.standard_normal((m, d)), rng.standard_normal(m)
    model = RidgeRegression(l2=L2, fit_intercept=False, tol=1e-12).fit(X, y)
    inf = LinearInfluence(model, X, y)
    theta = model.theta_.ravel()
    G = (X @ theta - y)[:, None] * X
    Gt = (Xt @ theta - yt)[:, None] * Xt
    A = X.T @ X / n + L2 * np.eye(d)
    for normalize in NORMS:
        ref = _normalised_reference(G, Gt, A, normalize)
        assert np.all(ref[4] == 0) and np.all(np.isfinite(ref))
        top = inf.top_k(Xt, yt, k=n, normalize=normalize)
        _check_ranking(top, ref, n)
        pos = np.argmax(np.asarray(top.helpful_idx) == 4, axis=1)
        assert np.all(np.take_along_axis(top.helpful_scores, pos[:, None], 1) == 0)


def test_planted_high_leverage_row_dominates_raw_but_not_normalised_rankings():
    X, y, Xt, yt = _logistic_data(seed=3, n=80, m=40, planted=True)
    model = LogisticRegression(l2=0.02, tol=1e-12).fit(X, y)
    inf = LinearInfluence(model, X, y)
    m = Xt.shape[0]
    top_raw = int(np.sum(inf.top_k(Xt, yt, k=3).harmful_idx[:, 0] == 0))
    assert top_raw >= m // 2  # row 0 is the most harmful point for most test points
    for normalize in NORMS:
        top = int(np.sum(inf.top_k(Xt, yt, k=3, normalize=normalize).harmful_idx[:, 0] == 0))
        assert top < top_raw / 2, (normalize, top, top_raw)


def test_normalised_top_k_with_dask_training_data(logistic):
    da = pytest.importorskip("dask.array")
    import dask

    inf, X, y, Xt, yt, G, Gt, _, A = logistic
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore", pyinfluence.NotAtOptimumWarning)
        dinf = LinearInfluence(
            inf.model, da.from_array(X, chunks=(25, -1)), da.from_array(y, chunks=25), damping=DAMP
        )
        for normalize in NORMS:
            ref = _normalised_reference(G, Gt, A, normalize)
            _check_ranking(dinf.top_k(Xt, yt, k=6, normalize=normalize), ref, 6)
        lazy: Any = dinf.helpfulness(Xt, yt)  # a lazy dask array (n, m)
        np.testing.assert_allclose(np.asarray(lazy.compute()), G @ np.linalg.solve(A, Gt.T), rtol=1e-9)


@pytest.mark.parametrize("bad", ["relatif", "Theta", ""])
def test_bad_normalize_raises_naming_it_linear(logistic, bad):
    inf, X, y, Xt, yt = logistic[:5]
    with pytest.raises(ValueError, match="normalize"):
        inf.top_k(Xt, yt, k=2, normalize=bad)
    with pytest.raises(TypeError, match="normalize"):
        inf.top_k(Xt, yt, k=2, normalize=1)


# ------------------------------------------------------------------------------------------------
# the torch path: a tiny MLP, references from torch.func
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_torch():
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, hessian, vmap

    torch.manual_seed(0)
    rng = np.random.default_rng(11)
    n, m = 40, 5
    X = torch.as_tensor(rng.standard_normal((n, 3)))
    y = torch.as_tensor((rng.standard_normal(n) + X[:, 0].numpy() > 0).astype(np.int64))
    Xt = torch.as_tensor(rng.standard_normal((m, 3)))
    yt = torch.as_tensor((Xt[:, 0].numpy() > 0).astype(np.int64))
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    l2, damping = 0.05, 0.05
    names = [k for k, _ in net.named_parameters()]
    shapes = [p.shape for _, p in net.named_parameters()]
    sizes = [p.numel() for _, p in net.named_parameters()]

    def unflat(theta):
        return {k: t.view(s) for k, t, s in zip(names, torch.split(theta, sizes), shapes)}

    def loss_one(theta, x, t):
        return loss_fn(functional_call(net, unflat(theta), (x[None],)), t[None])[0]

    def objective(theta):
        out = functional_call(net, unflat(theta), (X,))
        return loss_fn(out, y).mean() + 0.5 * l2 * theta.dot(theta)

    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        val = objective(theta)
        val.backward()
        return val

    opt.step(closure)
    theta = theta.detach()
    with torch.no_grad():
        for (_, p), t in zip(net.named_parameters(), torch.split(theta, sizes)):
            p.copy_(t.view(p.shape))
    per_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    G, Gt = per_grad(theta, X, y).numpy(), per_grad(theta, Xt, yt).numpy()
    H = hessian(objective)(theta).numpy()  # mean loss + (l2/2)‖θ‖²
    A = H + damping * np.eye(H.shape[0])
    assert np.linalg.eigvalsh(A).min() > 0
    return net, loss_fn, (X, y), Xt, yt, l2, damping, G, Gt, A


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_torch_helpfulness_and_normalised_top_k(tiny_torch, solver):
    from pyinfluence.torch.influence import TorchInfluence
    from pyinfluence.torch.solvers import CG

    net, loss_fn, train, Xt, yt, l2, damping, G, Gt, A = tiny_torch
    ti = TorchInfluence(
        net, loss_fn, train, l2=l2, damping=damping, solver="exact" if solver == "exact" else CG(tol=1e-12)
    )
    n = G.shape[0]
    hf = ti.helpfulness(Xt, yt)
    np.testing.assert_allclose(hf.numpy(), G @ np.linalg.solve(A, Gt.T), rtol=1e-7, atol=1e-10)
    for normalize in [None, *NORMS]:
        ref = _normalised_reference(G, Gt, A, normalize)
        top = ti.top_k(Xt, yt, k=n, normalize=normalize)
        assert top.helpful_idx.dtype == __import__("torch").int64
        np.testing.assert_array_equal(top.helpful_idx.numpy(), np.argsort(ref, axis=0, kind="stable").T)
        np.testing.assert_allclose(top.helpful_scores.numpy(), np.sort(ref, axis=0).T, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(
            top.harmful_scores.numpy(), np.sort(ref, axis=0)[::-1].T, rtol=1e-7, atol=1e-10
        )


@pytest.mark.usefixtures("one_torch_thread")
def test_torch_bad_normalize_raises_naming_it(tiny_torch):
    from pyinfluence.torch.influence import TorchInfluence

    net, loss_fn, train, Xt, yt, l2, damping = tiny_torch[:7]
    ti = TorchInfluence(net, loss_fn, train, l2=l2, damping=damping)
    with pytest.raises(ValueError, match="normalize"):
        ti.top_k(Xt, yt, k=2, normalize="l")
    with pytest.raises(TypeError, match="normalize"):
        ti.top_k(Xt, yt, k=2, normalize=True)  # type: ignore[arg-type]


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("solver", ["exact", "cg"])
def test_torch_normalised_top_k_on_a_sharded_one_rank_group(tiny_torch, solver):
    """distributed=True on a one-rank gloo group takes the sharded paths (the norms' solves in lockstep blocks
    for CG, local ones for Exact; global indices in the per-block division) and still matches the formulas."""
    import socket

    import torch.distributed as dist

    from pyinfluence.torch.influence import TorchInfluence
    from pyinfluence.torch.solvers import CG

    if not (dist.is_available() and dist.is_gloo_available()) or dist.is_initialized():
        pytest.skip("needs torch.distributed with gloo and no process group in this process")
    net, loss_fn, train, Xt, yt, l2, damping, G, Gt, A = tiny_torch
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ti = TorchInfluence(
            net,
            loss_fn,
            train,
            l2=l2,
            damping=damping,
            batch_size=7,  # several blocks of training points
            distributed=True,
            solver="exact" if solver == "exact" else CG(tol=1e-12),
        )
        for normalize in NORMS:
            ref = _normalised_reference(G, Gt, A, normalize)
            top = ti.top_k(Xt, yt, k=5, normalize=normalize)
            np.testing.assert_array_equal(
                top.harmful_idx.numpy(), np.argsort(-ref, axis=0, kind="stable")[:5].T
            )
            np.testing.assert_allclose(
                top.harmful_scores.numpy(), np.sort(ref, axis=0)[::-1][:5].T, rtol=1e-7, atol=1e-10
            )
    finally:
        dist.destroy_process_group()
