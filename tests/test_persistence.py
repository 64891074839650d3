"""Saving and loading a fitted TorchInfluence (pyinfluence.torch.persistence, PreparedSolver.state /
Solver.restore).

What is checked, and against what:

- For every solver (and the preconditioned CG / BlockCG / LiSSA): a loaded object returns the saved object's
  ``up_loss`` bit for bit (same dtype, CPU), and loading did no preparation work — counted by wrappers around
  the Hessian operator's ``matvec`` / ``sample_matvec`` / ``dense`` / ``gradient`` and the training data's
  ``blocks`` / ``batches`` (every pass over the data goes through them), with every solver's ``prepare``
  replaced by a function that fails. A control test shows the counters do see a preparation.
- Independent references written here: the loaded Exact (and CG, BlockCG) ``up_loss`` against the closed form
  −g_testᵀ(H + λI)⁻¹g_train with H from ``torch.func.hessian`` of R(θ) = mean loss + (l2/2)‖θ‖² and the
  gradients from ``torch.func.grad``; the Hessian stored on disk (read back with ``np.load(...,
  allow_pickle=False)``) against the same H; the manifest's θ̂ fingerprints against ``hashlib`` over the
  parameters' bytes.
- Errors that name their cause: another θ̂ (one weight perturbed), another fixed parameter, conflicting
  explicit options, another n_train, a missing / invalid / newer-version manifest, a missing, truncated,
  altered or pickled array file, foreign folders; and the solver-level checks of ``restore``.
"""

from __future__ import annotations

import collections
import copy
import datetime
import hashlib
import json
import shutil
import warnings
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import pyinfluence
from pyinfluence import TorchInfluence
from pyinfluence.errors import ConvergenceWarning, NotAtOptimumWarning
from pyinfluence.torch.batches import StreamingData
from pyinfluence.torch.data import TensorData
from pyinfluence.torch.hessian import HessianOperator
from pyinfluence.torch.solvers import (
    _SOLVERS,
    CG,
    EKFAC,
    KFAC,
    Arnoldi,
    BlockCG,
    Exact,
    LiSSA,
    solver_from_config,
)
from pyinfluence.torch.solvers import exact as exact_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L2 = 1e-2
DAMPING = 1e-2
F64 = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _fit(model, X, y, iters=300):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-12, history_size=30)

    def closure():
        opt.zero_grad()
        loss = ce(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


@pytest.fixture(scope="module")
def mlp():
    """A 4-5-3 tanh MLP (43 parameters, float64) fitted to 40 examples by L-BFGS; 6 test points."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=F64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    torch.manual_seed(0)
    model = _fit(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), X, y)
    Xt = torch.randn(6, 4, generator=g, dtype=F64)
    yt = torch.tensor([0, 1, 2, 1, 0, 2])
    return model, X, y, Xt, yt


# ----------------------------------------------------------------------------------------------
# counting the work: HVPs, dense builds, gradients and passes over the training data
# ----------------------------------------------------------------------------------------------
_COUNTED = [
    (HessianOperator, "matvec"),
    (HessianOperator, "sample_matvec"),
    (HessianOperator, "dense"),
    (HessianOperator, "gradient"),
    (TensorData, "blocks"),
    (TensorData, "batches"),
    (StreamingData, "blocks"),
    (StreamingData, "batches"),
]


def _count_work(monkeypatch, forbid_prepare: bool) -> collections.Counter:
    """Wrap every operator product and data pass with a counter; with ``forbid_prepare``, make every
    solver's ``prepare`` fail."""
    counts: collections.Counter = collections.Counter()
    for cls, meth in _COUNTED:
        orig = getattr(cls, meth)

        def wrapper(obj, *args, _orig=orig, _key=f"{cls.__name__}.{meth}", **kwargs):
            counts[_key] += 1
            return _orig(obj, *args, **kwargs)

        monkeypatch.setattr(cls, meth, wrapper)
    if forbid_prepare:

        def boom(self, op, damping=0.0):
            raise AssertionError(f"{type(self).__name__}.prepare was called on a loaded object")

        for cls in set(_SOLVERS.values()):
            monkeypatch.setattr(cls, "prepare", boom)
    return counts


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested info values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, z) for x, z in zip(a, b))
    return type(a) is type(b) and a == b


# ----------------------------------------------------------------------------------------------
# the independent reference
# ----------------------------------------------------------------------------------------------
def reference_up_loss(model, X, y, Xt, yt, l2, damping, names=None):
    """−∇L(z_test)ᵀ (H + λI)⁻¹ ∇L(z_i), (n, m): H = torch.func.hessian of R(θ) = mean loss + (l2/2)‖θ‖² over
    the flat selected parameters (all by default), gradients by torch.func.grad, one solve."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = names or list(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    theta = torch.cat([params[n].reshape(-1) for n in names])

    def unflat(t):
        out, at = dict(params), 0
        for n, s, k in zip(names, shapes, sizes):
            out[n] = t[at : at + k].reshape(s)
            at += k
        return out

    def one(t, x, yy):
        return ce(functional_call(model, unflat(t), (x.unsqueeze(0),)), yy.unsqueeze(0))[0]

    def risk(t):
        return ce(functional_call(model, unflat(t), (X,)), y).mean() + 0.5 * l2 * (t * t).sum()

    H = hessian(risk)(theta)
    G = vmap(grad(one), in_dims=(None, 0, 0))(theta, X, y)  # (n, p)
    Gt = vmap(grad(one), in_dims=(None, 0, 0))(theta, Xt, yt)  # (m, p)
    A = H + damping * torch.eye(len(theta), dtype=theta.dtype)
    return -(G @ torch.linalg.solve(A, Gt.T)), H


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
SOLVERS = {
    "exact": lambda: Exact(),
    "exact-f32": lambda: Exact(factor_dtype=None),
    "exact-torch-backend": lambda: Exact(),
    "cg": lambda: CG(tol=1e-10),
    "block_cg": lambda: BlockCG(tol=1e-10),
    "lissa": lambda: LiSSA(depth=60, repeats=2, batch_size=16, raise_on_nonconvergence=False),
    "kfac": lambda: KFAC(),
    "ekfac": lambda: EKFAC(fisher="empirical"),
    "arnoldi": lambda: Arnoldi(rank=12),
    "cg+ekfac": lambda: CG(tol=1e-10, preconditioner="ekfac"),
    "block_cg+kfac": lambda: BlockCG(tol=1e-10, preconditioner=KFAC(fisher="empirical")),
    "lissa+ekfac": lambda: LiSSA(
        depth=40, repeats=2, batch_size=16, preconditioner="ekfac", raise_on_nonconvergence=False
    ),
}


@pytest.mark.parametrize("name", list(SOLVERS))
def test_round_trip_is_bit_identical_and_does_no_preparation(mlp, name, tmp_path, monkeypatch):
    model, X, y, Xt, yt = mlp
    if name == "exact-f32":  # a float32 model: the dtype survives, and Exact factorises in float32
        model = copy.deepcopy(model).float()
        X, Xt = X.float(), Xt.float()
    if name == "exact-torch-backend":  # as on CUDA: torch factorises, and the factor L itself is saved
        monkeypatch.setattr(exact_module, "_factorise", exact_module._TorchFactor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # LiSSA's short recursions, deterministic anyway
        inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=SOLVERS[name]())
        expected = inf.up_loss(Xt, yt)
        path = inf.save(tmp_path / "saved")
        counts = _count_work(monkeypatch, forbid_prepare=True)
        loaded = TorchInfluence.load(path, model, ce, (X, y))
        assert sum(counts.values()) == 0, dict(counts)  # no HVP, no dense H, no gradient, no data pass
        got = loaded.up_loss(Xt, yt)
    if name.startswith("exact"):
        backend = "torch" if name == "exact-torch-backend" else inf._prep.info["backend"]
        assert loaded._prep.info["backend"] == backend
        assert ("L" in json.loads((path / "manifest.json").read_text())["arrays"]) == (backend == "torch")
    assert got.dtype == expected.dtype == inf.dtype == loaded.dtype
    assert torch.equal(got, expected)
    assert loaded.solver == inf.solver
    assert (loaded.l2, loaded.damping, loaded.param_names) == (inf.l2, inf.damping, inf.param_names)
    assert loaded.grad_norm_ == inf.grad_norm_
    assert _same(loaded._prep.info, inf._prep.info)  # info round-trips exactly (tuples, tensors, floats)
    assert counts["HessianOperator.dense"] == 0 and counts["HessianOperator.gradient"] == 0


def test_counters_see_a_preparation(mlp, monkeypatch):
    """The control: the same counters record the work that a load avoids."""
    model, X, y, _, _ = mlp
    counts = _count_work(monkeypatch, forbid_prepare=False)
    TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver="exact").prepare()
    assert counts["HessianOperator.gradient"] == 1 and counts["HessianOperator.dense"] == 1
    assert counts["TensorData.blocks"] >= 2
    counts.clear()
    TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=EKFAC()).prepare()
    assert counts["HessianOperator.matvec"] >= 10  # the Lanczos search
    assert counts["TensorData.blocks"] >= 3  # gradient + two EK-FAC passes


@pytest.mark.parametrize("name", ["exact", "cg", "block_cg"])
def test_loaded_solves_match_the_closed_form(mlp, name, tmp_path):
    model, X, y, Xt, yt = mlp
    TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=SOLVERS[name]()).save(tmp_path / "s")
    loaded = TorchInfluence.load(tmp_path / "s", model, ce, (X, y))
    ref, _ = reference_up_loss(model, X, y, Xt, yt, L2, DAMPING)
    tol = 1e-10 if name == "exact" else 1e-7
    torch.testing.assert_close(loaded.up_loss(Xt, yt), ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_saved_hessian_on_disk_is_the_hessian(mlp, tmp_path):
    """Exact's array "A" (read with numpy, no pickle) is H = ∇²R(θ̂) from torch.func.hessian."""
    model, X, y, Xt, yt = mlp
    path = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver="exact").save(tmp_path / "s")
    man = json.loads((path / "manifest.json").read_text())
    A = np.load(path / man["arrays"]["A"]["file"], allow_pickle=False)
    _, H = reference_up_loss(model, X, y, Xt, yt, L2, DAMPING)
    np.testing.assert_allclose(A, H.numpy(), rtol=1e-10, atol=1e-12)


def test_other_methods_and_streamed_data(mlp, tmp_path, monkeypatch):
    """A loaded object answers every method as the saved one, also over streamed training data (a
    DataLoader: sized, so nothing is read while loading; an unsized stream is counted in one pass, as the
    constructor does)."""
    model, X, y, Xt, yt = mlp
    batches = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    inf = TorchInfluence(model, ce, batches, l2=L2, damping=DAMPING, solver=EKFAC())
    assert isinstance(inf._data, StreamingData)
    expected = (
        inf.up_loss(Xt, yt),
        inf.self_influence([0, 5, 39]),
        inf.up_params([3, 7]),
        inf.top_k(Xt, yt, k=3),
    )
    inf.save(tmp_path / "s")
    counts = _count_work(monkeypatch, forbid_prepare=True)
    loaded = TorchInfluence.load(tmp_path / "s", model, ce, batches)
    assert sum(counts.values()) == 0, dict(counts)
    got = (
        loaded.up_loss(Xt, yt),
        loaded.self_influence([0, 5, 39]),
        loaded.up_params([3, 7]),
        loaded.top_k(Xt, yt, 3),
    )
    for a, b in zip(expected[:3], got[:3]):
        assert torch.equal(a, b)
    for f in ("helpful_idx", "helpful_scores", "harmful_idx", "harmful_scores"):
        assert torch.equal(getattr(expected[3], f), getattr(got[3], f))


def test_optimum_check_on_load(mlp, tmp_path):
    model, X, y, _, _ = mlp
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING)
    inf.save(tmp_path / "s")
    assert TorchInfluence.load(tmp_path / "s", model, ce, (X, y)).grad_norm_ == inf.grad_norm_
    with pytest.warns(NotAtOptimumWarning):  # optimum_tol given: checked again (‖∇R‖ > 0 = 0 · RMS)
        TorchInfluence.load(tmp_path / "s", model, ce, (X, y), optimum_tol=0.0)


# ----------------------------------------------------------------------------------------------
# a CNN with a diagonal-fallback layer
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cnn():
    """Conv2d(2→4, k3, padding 1) – tanh – Conv2d(4→4, k1, groups=2) (not Kronecker-factored: the diagonal
    fallback) – tanh – Linear(36→3), on 2×3×3 inputs: 251 parameters, fitted to 30 examples."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(30, 2, 3, 3, generator=g, dtype=F64)
    y = (X[:, 0].mean((1, 2)) > 0).long() + (X[:, 1, 1, 1] > 0.5).long()
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 4, 1, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(36, 3),
    ).double()
    return _fit(model, X, y, iters=100), X, y, X[:4] * 0.5, y[:4]


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_cnn_kfac_with_diagonal_fallback_round_trips(cnn, cls, tmp_path, monkeypatch):
    model, X, y, Xt, yt = cnn
    solver = cls(unsupported="diagonal", lanczos_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=0.1, solver=solver)
    expected = inf.up_loss(Xt, yt)
    assert inf._prep.info["coverage"]["diagonal"] > 0 and inf._prep.info["coverage"]["conv2d"] > 0
    path = inf.save(tmp_path / "s")
    man = json.loads((path / "manifest.json").read_text())
    state = man["solver_state"]["state"]
    assert [ly["kind"] for ly in state["layers"]] == ["conv2d", "linear"]
    assert state["diagonal"] == ["2.weight", "2.bias"]
    counts = _count_work(monkeypatch, forbid_prepare=True)
    loaded = TorchInfluence.load(path, model, ce, (X, y))
    assert sum(counts.values()) == 0, dict(counts)
    assert torch.equal(loaded.up_loss(Xt, yt), expected)
    assert _same(loaded._prep.info, inf._prep.info)


# ----------------------------------------------------------------------------------------------
# the manifest
# ----------------------------------------------------------------------------------------------
def _sha256(items):
    """SHA-256 over "name|shape|dtype\\n" and the raw bytes of each tensor (the documented fingerprint)."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|{tuple(t.shape)}|{str(t.dtype).replace('torch.', '')}\n".encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_manifest_holds_the_listed_fields(mlp, tmp_path):
    model, X, y, _, _ = mlp
    solver = BlockCG(tol=1e-9, preconditioner=EKFAC(fisher="empirical"))
    path = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=solver, params=["2"]).save(
        tmp_path / "s"
    )
    man = json.loads((path / "manifest.json").read_text())
    assert man["format"] == "pyinfluence-torch-influence" and man["format_version"] == 1
    assert man["library_version"] == pyinfluence.__version__
    assert man["solver"]["name"] == "block_cg"
    assert man["solver"]["config"]["tol"] == 1e-9
    assert man["solver"]["config"]["preconditioner"] == {
        "solver": "ekfac",
        "config": {
            "fisher": "empirical",
            "tol": None,
            "raise_on_nonconvergence": True,
            "lanczos_steps": 40,
            "seed": 0,
            "unsupported": "error",
        },
    }
    assert solver_from_config(man["solver"]["name"], man["solver"]["config"]) == solver
    assert (man["l2"], man["damping"], man["dtype"]) == (L2, DAMPING, "float64")
    assert man["param_names"] == ["2.weight", "2.bias"] and man["param_shapes"] == [[3, 5], [3]]
    assert (man["n_params"], man["n_train"]) == (18, 40)
    params = dict(model.named_parameters())
    assert man["theta_sha256"] == _sha256([(n, params[n]) for n in ("2.weight", "2.bias")])
    assert man["fixed_sha256"] == _sha256([(n, params[n]) for n in ("0.bias", "0.weight")])  # sorted by name
    assert man["param_sha256"]["2.weight"] == _sha256([("2.weight", params["2.weight"])])
    created = datetime.datetime.fromisoformat(man["created"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - created).total_seconds()) < 600
    # every array listed, on disk, readable without pickle, as described
    on_disk = {p.name for p in path.iterdir()}
    assert on_disk == {"manifest.json"} | {e["file"] for e in man["arrays"].values()}
    assert any(k.startswith("preconditioner.layers.0.") for k in man["arrays"])
    for e in man["arrays"].values():
        arr = np.load(path / e["file"], allow_pickle=False)
        assert list(arr.shape) == e["shape"] and arr.dtype.name == e["dtype"]
        assert hashlib.sha256(arr.tobytes()).hexdigest() == e["sha256"]


# ----------------------------------------------------------------------------------------------
# errors naming their cause
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(mlp, tmp_path_factory):
    model, X, y, _, _ = mlp
    path = tmp_path_factory.mktemp("saved") / "exact"
    TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver="exact").save(path)
    return path


def _copy(saved, tmp_path):
    return shutil.copytree(saved, tmp_path / "copy")


def test_a_different_model_is_refused(mlp, saved):
    model, X, y, _, _ = mlp
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].weight[1, 3] += 1e-6
    with pytest.raises(ValueError, match=r"θ̂ differ.*'2\.weight' changed") as e:
        TorchInfluence.load(saved, other, ce, (X, y))
    assert "0.weight" not in str(e.value)
    bigger = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"'0\.weight' has shape \(6, 4\)"):
        TorchInfluence.load(saved, bigger, ce, (X, y))
    with pytest.raises(ValueError, match=r"no parameter\(s\) '0\.weight'"):
        TorchInfluence.load(saved, nn.Sequential(nn.Identity(), nn.Linear(4, 3)).double(), ce, (X, y))


def test_a_changed_fixed_parameter_is_refused(mlp, tmp_path):
    model, X, y, _, _ = mlp
    TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, params=["2"]).save(tmp_path / "s")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].bias[0] += 1e-6
    with pytest.raises(ValueError, match=r"other parameters and buffers differ.*'0\.bias' changed"):
        TorchInfluence.load(tmp_path / "s", other, ce, (X, y))


def test_conflicting_options_are_refused(mlp, saved):
    model, X, y, _, _ = mlp
    for opt, value in [("l2", 2 * L2), ("damping", 0.0), ("solver", "cg"), ("solver", Exact(factor_dtype=None)),
                       ("dtype", torch.float32), ("params", ["2"])]:  # fmt: skip
        with pytest.raises(ValueError, match=rf"{opt}=.* conflicts with the saved {opt}"):
            TorchInfluence.load(saved, model, ce, (X, y), **{opt: value})
    with pytest.raises(TypeError, match="unexpected option.*'lr'"):
        TorchInfluence.load(saved, model, ce, (X, y), lr=1)
    # the saved values given explicitly are fine
    same = TorchInfluence.load(
        saved, model, ce, (X, y), l2=L2, damping=DAMPING, solver="exact", dtype="float64"
    )
    assert same.damping == DAMPING
    with pytest.raises(ValueError, match=r"train_data has 39 examples.*n_train=40"):
        TorchInfluence.load(saved, model, ce, (X[:-1], y[:-1]))


def _array_file(path, key="A"):
    return path / json.loads((path / "manifest.json").read_text())["arrays"][key]["file"]


def test_damaged_folders_are_refused_naming_the_file(mlp, saved, tmp_path):
    model, X, y, _, _ = mlp

    def load(p):
        return TorchInfluence.load(p, model, ce, (X, y))

    with pytest.raises(FileNotFoundError, match="not a folder"):
        load(tmp_path / "nowhere")
    p = _copy(saved, tmp_path)
    f = _array_file(p)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"{f.name} could not be read.*truncated or damaged"):
        load(p)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped in the data
    with pytest.raises(ValueError, match=rf"{f.name} does not match its SHA-256"):
        load(p)
    np.save(f, np.array([{"x": 1}], dtype=object), allow_pickle=True)  # a pickled object is never loaded
    with pytest.raises(ValueError, match=rf"{f.name} could not be read.*allow_pickle"):
        load(p)
    f.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{f.name} \(array 'A'\) is missing"):
        load(p)
    m = p / "manifest.json"
    man = json.loads(json.dumps(json.loads((saved / "manifest.json").read_text())))
    man["format_version"] = 2
    m.write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"manifest\.json has format version 2, newer"):
        load(p)
    m.write_text('{"format": "pyinfluence-torch-influence", ')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        load(p)
    m.write_text(json.dumps({"format": "pyinfluence-gradient-store", "format_version": 1}))
    with pytest.raises(ValueError, match=r"manifest\.json is not the manifest of a saved TorchInfluence"):
        load(p)
    del man["theta_sha256"]
    man["format_version"] = 1
    m.write_text(json.dumps(man))
    with pytest.raises(ValueError, match=r"manifest\.json lacks the entry 'theta_sha256'"):
        load(p)
    m.unlink()
    with pytest.raises(FileNotFoundError, match=r"manifest\.json is missing"):
        load(p)


def test_save_never_writes_into_foreign_folders_and_overwrites_cleanly(mlp, saved, tmp_path):
    model, X, y, Xt, yt = mlp
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=Arnoldi(rank=8))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        inf.save(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    p = _copy(saved, tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        inf.save(p)
    inf.save(p, overwrite=True)  # an Exact save replaced by an Arnoldi one: no stale file remains
    man = json.loads((p / "manifest.json").read_text())
    assert {q.name for q in p.iterdir()} == {"manifest.json"} | {e["file"] for e in man["arrays"].values()}
    assert set(man["arrays"]) == {"U", "sigma", "info.ritz_values", "info.ritz_residuals"}
    assert torch.equal(TorchInfluence.load(p, model, ce, (X, y)).up_loss(Xt, yt), inf.up_loss(Xt, yt))


def test_exact_without_residual_on_the_core_cannot_be_saved(mlp, tmp_path):
    if not hasattr(pyinfluence._core, "CholeskyFactor"):
        pytest.skip("this build factorises with torch on the CPU")
    model, X, y, _, _ = mlp
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=Exact(compute_residual=False))
    with pytest.raises(ValueError, match="compute_residual=True"):
        inf.save(tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------------------------------------
# the solver-level API: PreparedSolver.state / Solver.restore
# ----------------------------------------------------------------------------------------------
def test_restore_checks_that_the_state_fits(mlp):
    model, X, y, Xt, yt = mlp
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=EKFAC()).prepare()
    tensors, meta = inf._prep.state()
    meta = json.loads(json.dumps(meta, allow_nan=False))  # JSON-able as promised
    op = inf.operator
    V = inf.test_gradients(Xt, yt).T
    again = EKFAC().restore(op, DAMPING, tensors, meta)
    assert torch.equal(again.solve(V).solution, inf._prep.solve(V).solution)
    with pytest.raises(ValueError, match="'ekfac' solver, not of 'kfac'"):
        KFAC().restore(op, DAMPING, tensors, meta)
    with pytest.raises(ValueError, match=r"another configuration: fisher \(saved 'true', here 'empirical'\)"):
        EKFAC(fisher="empirical").restore(op, DAMPING, tensors, meta)
    with pytest.raises(ValueError, match=r"damping=0\.01, restore got damping=0\.02"):
        EKFAC().restore(op, 2 * DAMPING, tensors, meta)
    with pytest.raises(ValueError, match=r"lacks the array 'layers\.1\.QG'"):
        EKFAC().restore(op, DAMPING, {k: v for k, v in tensors.items() if k != "layers.1.QG"}, meta)
    bad = dict(tensors, **{"layers.0.eigenvalues": tensors["layers.0.eigenvalues"][:, :2]})
    with pytest.raises(ValueError, match=r"'layers\.0\.eigenvalues' has shape \(5, 2\), expected \(5, 5\)"):
        EKFAC().restore(op, DAMPING, bad, meta)
    other_l2 = TorchInfluence(model, ce, (X, y), l2=2 * L2, damping=DAMPING, optimum_tol=None).operator
    with pytest.raises(ValueError, match=r"l2=0\.01, but the operator has l2=0\.02"):
        EKFAC().restore(other_l2, DAMPING, tensors, meta)
    top = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, params=["2"], optimum_tol=None).operator
    with pytest.raises(ValueError, match=r"n_params=43, but the operator has n_params=18"):
        EKFAC().restore(top, DAMPING, tensors, meta)
    renamed = copy.deepcopy(meta)
    renamed["layout"]["names"][0] = "x.weight"
    with pytest.raises(
        ValueError,
        match=r"selected parameter 0 was 'x\.weight' of shape \(5, 4\), the operator's is '0\.weight'",
    ):
        EKFAC().restore(op, DAMPING, tensors, renamed)
    newer = dict(meta, state_version=99)
    with pytest.raises(ValueError, match="version 99, newer"):
        EKFAC().restore(op, DAMPING, tensors, newer)


# ----------------------------------------------------------------------------------------------
# across devices: a CPU-saved folder loaded onto a GPU, a GPU-saved one onto the CPU
# ----------------------------------------------------------------------------------------------
CROSS_DEVICE = ["exact", "ekfac", "arnoldi", "cg+ekfac"]


def _close(got, expected, name):
    tol = 1e-7 if name.startswith("cg") else 1e-9  # CG stops at tol 1e-10 on either device
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("name", CROSS_DEVICE)
def test_cpu_save_loads_on_cuda(mlp, name, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, X, y, Xt, yt = mlp
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=SOLVERS[name]())
    expected = inf.up_loss(Xt, yt)
    inf.save(tmp_path / "s")
    loaded = TorchInfluence.load(tmp_path / "s", model, ce, (X, y), device="cuda")
    got = loaded.up_loss(Xt, yt)
    assert loaded.device.type == "cuda" and got.device.type == "cuda"
    if name == "exact":
        assert loaded._prep.info["backend"] == "torch"  # A factorised again, on the device
    _close(got.cpu(), expected, name)


@pytest.mark.cuda
@pytest.mark.parametrize("name", CROSS_DEVICE)
def test_cuda_save_loads_on_cpu(mlp, name, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, X, y, Xt, yt = mlp
    gpu_model = copy.deepcopy(model).cuda()  # the same weights: the same fingerprints
    inf = TorchInfluence(gpu_model, ce, (X.cuda(), y.cuda()), l2=L2, damping=DAMPING, solver=SOLVERS[name]())
    expected = inf.up_loss(Xt.cuda(), yt.cuda()).cpu()
    path = inf.save(tmp_path / "s")
    assert json.loads((path / "manifest.json").read_text())["device"].startswith("cuda")
    loaded = TorchInfluence.load(path, model, ce, (X, y))  # the CPU model: its device
    assert loaded.device.type == "cpu"
    if name == "exact":
        assert loaded._prep.info["backend"] == "torch"  # the GPU's factor L, solved on the CPU
    _close(loaded.up_loss(Xt, yt), expected, name)
