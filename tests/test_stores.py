"""Gradient stores (pyinfluence.torch.stores) against independent computations written here.

The references: the projection matrices are rebuilt from their documented seed semantics (SplitMix64 written
out below, ``torch.Generator`` per column block), per-example gradients come from ``torch.func``
(``vmap(grad(functional_call))``) or from plain ``torch.autograd`` one example at a time, LoGra's projection is
checked as (P_out ⊗ P_in) applied to the full per-example gradient, projected influence as the closed form
−φ_testᵀ (ΦᵀΦ/n + (l2 + λ)I)⁻¹ φ_i from the test's own Φ (numpy / torch.linalg.solve), and the streaming top-k as
a full argsort.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import pyinfluence
from pyinfluence import TorchInfluence
from pyinfluence.errors import DataError, NonFiniteError, NotPositiveDefiniteError
from pyinfluence.torch.stores import (
    GaussianProjection,
    GradientStore,
    Identity,
    LoGraProjection,
    ParamLayout,
    RademacherProjection,
    SparseJLProjection,
    derive_seed,
    projection_from_config,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 30
L2 = 1e-2
DAMPING = 1e-3
M64 = (1 << 64) - 1


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------
def splitmix64(x):
    """SplitMix64's output function (Steele, Lea & Flood 2014), written out."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def seed_of(seed, *keys):
    h = splitmix64(seed)
    for k in keys:
        h = splitmix64(h ^ k)
    return h & ((1 << 63) - 1)


def gen(s):
    return torch.Generator().manual_seed(s)


def dense_matrix(kind, dim, seed, block_cols, p):
    """P (dim × p) float64 from the documented seed semantics: block b of √k·Pᵀ drawn from seed_of(seed, 0, b)."""
    blocks = []
    for b in range(-(-p // block_cols)):
        g = gen(seed_of(seed, 0, b))
        if kind == "gaussian":
            blocks.append(torch.randn(block_cols, dim, generator=g, dtype=torch.float32))
        else:
            blocks.append((2 * torch.randint(0, 2, (block_cols, dim), generator=g) - 1).float())
    return torch.cat(blocks)[:p].double().t() / math.sqrt(dim)


def sparse_matrix(dim, s, seed, block_cols, p):
    """The Kane-Nelson block-construction matrix (dim × p), dense, from the documented seed semantics."""
    P = torch.zeros(dim, -(-p // block_cols) * block_cols, dtype=torch.float64)
    for b in range(-(-p // block_cols)):
        g = gen(seed_of(seed, 0, b))
        u = torch.rand(block_cols, s, generator=g, dtype=torch.float64)
        bits = torch.randint(0, 2, (block_cols, s), generator=g)
        for j in range(block_cols):
            for c in range(s):
                lo, hi = (c * dim) // s, ((c + 1) * dim) // s
                row = lo + int(math.floor(float(u[j, c]) * (hi - lo)))
                P[row, b * block_cols + j] += (2 * int(bits[j, c]) - 1) / math.sqrt(s)
    return P[:, :p]


def logra_factor(seed, path, which, k, n):
    """P_in (which=0) or P_out (which=1) of a LoGra layer: Gaussian from seed_of(seed, sha256(path)[:8], which)."""
    key = int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big")
    Z = torch.randn(k, n, generator=gen(seed_of(seed, key, which)), dtype=torch.float32)
    return Z.double() / math.sqrt(k)


def per_example_grads(model, names, X, y, loss=ce):
    """(B, p) by torch.func, in the order of ``names``, each flattened row-major."""
    named = dict(model.named_parameters())
    params = {n: named[n].detach() for n in names}
    rest = {n: p.detach() for n, p in named.items() if n not in params}

    def f(ps, x, t):
        return loss(functional_call(model, {**rest, **ps}, (x.unsqueeze(0),)), t.unsqueeze(0)).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0))(params, X, y)
    return torch.cat([g[n].reshape(X.shape[0], -1) for n in names], dim=1)


def autograd_grads(model, names, X, y, loss=ce):
    """{name: (B, *shape)} by plain autograd, one example at a time."""
    named = dict(model.named_parameters())
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(X.shape[0]):
        li = loss(model(X[i : i + 1]), y[i : i + 1]).sum()
        gs = torch.autograd.grad(li, [named[n] for n in names], allow_unused=True)
        for n, g in zip(names, gs):
            out[n].append(torch.zeros_like(named[n]) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


# ----------------------------------------------------------------------------------------------
# problems
# ----------------------------------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


@pytest.fixture(scope="module")
def data():
    g = gen(1)
    X = torch.randn(N, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N,), generator=g)
    return X, y


def influence(model, X, y, **kw):
    kw.setdefault("l2", L2)
    kw.setdefault("damping", DAMPING)
    return TorchInfluence(model, ce, (X, y), optimum_tol=None, **kw)


class SeqModel(nn.Module):
    """A Linear over (B, T, d) tokens applied twice (a shared module), a mean over T, and a head."""

    def __init__(self):
        super().__init__()
        self.sq = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x (B, T, 4)
        h = torch.tanh(self.sq(torch.tanh(self.sq(x))))
        return self.head(h.mean(dim=1))


# ==============================================================================================
# projections
# ==============================================================================================
def test_derive_seed_is_splitmix64():
    # the first output of SplitMix64 from state 0 (the reference value of Vigna's splitmix64.c)
    assert splitmix64(0) == 0xE220A8397B1DCDAF
    for seed, keys in [(0, ()), (7, (0, 3)), (2**40 + 5, (123456789, 1, 2))]:
        assert derive_seed(seed, *keys) == seed_of(seed, *keys)


@pytest.mark.parametrize("cls,kind", [(GaussianProjection, "gaussian"), (RademacherProjection, "rademacher")])
def test_dense_projection_equals_explicit_matrix(cls, kind):
    p, k, C = 11, 6, 4  # three column blocks, the last one partial
    proj = cls(dim=k, seed=5, block_cols=C)
    P = dense_matrix(kind, k, 5, C, p)
    G = torch.randn(7, p, generator=gen(2), dtype=torch.float64)
    torch.testing.assert_close(proj.project(G), G @ P.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj.project(G[0]), G[0] @ P.t(), rtol=1e-12, atol=1e-12)  # one vector
    # float32 inputs: the same matrix, rounded products
    torch.testing.assert_close(proj.project(G.float()), (G @ P.t()).float(), rtol=1e-5, atol=1e-5)
    # columns do not depend on p; uncached (cache_bytes=0) gives the same numbers; seeds differ
    torch.testing.assert_close(proj.project(G[:, :6]), G[:, :6] @ P[:, :6].t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cls(dim=k, seed=5, block_cols=C, cache_bytes=0).project(G), G @ P.t())
    assert not torch.allclose(cls(dim=k, seed=6, block_cols=C).project(G), G @ P.t())
    if kind == "rademacher":
        assert torch.all((P * math.sqrt(k)).abs() == 1)


def test_sparse_jl_equals_explicit_matrix_and_structure():
    p, k, s, C = 13, 7, 3, 5
    proj = SparseJLProjection(dim=k, nnz=s, seed=3, block_cols=C)
    P = sparse_matrix(k, s, 3, C, p)
    G = torch.randn(4, p, generator=gen(4), dtype=torch.float64)
    torch.testing.assert_close(proj.project(G), G @ P.t(), rtol=1e-12, atol=1e-12)
    # exactly s non-zeros ±1/√s per column, one in each block of rows; unit columns (diag PᵀP = 1 exactly)
    bounds = [(c * k) // s for c in range(s + 1)]
    for j in range(p):
        col = P[:, j]
        assert int((col != 0).sum()) == s
        assert torch.allclose(col[col != 0].abs(), torch.full((s,), 1 / math.sqrt(s), dtype=torch.float64))
        for c in range(s):
            assert int((col[bounds[c] : bounds[c + 1]] != 0).sum()) == 1
    torch.testing.assert_close(torch.diagonal(P.t() @ P), torch.ones(p, dtype=torch.float64))


def logra_layout():
    return ParamLayout(("fc.weight", "fc.bias", "out.weight"), ((3, 3), (3,), (2, 3)))


@pytest.mark.parametrize(
    "make",
    [
        lambda s: GaussianProjection(dim=6, seed=s, block_cols=5),
        lambda s: RademacherProjection(dim=6, seed=s, block_cols=5),
        lambda s: SparseJLProjection(dim=6, nnz=2, seed=s, block_cols=5),
        lambda s: LoGraProjection(dim_in=2, dim_out=2, seed=s),
    ],
    ids=["gaussian", "rademacher", "sparse_jl", "logra"],
)
def test_jl_scaling_unbiased(make):
    """E[PᵀP] = I: over 400 seeds (P read off by projecting the identity), every entry of the mean of PᵀP is
    within 5 standard errors of I's (entries that do not vary — the unit diagonal of Rademacher and sparse JL,
    the zero cross-layer blocks of LoGra — exactly)."""
    layout = logra_layout()
    p = layout.p
    eye = torch.eye(p, dtype=torch.float64)
    reps = 400
    prods = []
    for s in range(reps):
        P = make(s).project(eye, layout).t()  # (k, p)
        prods.append(P.t() @ P)
    stack = torch.stack(prods)
    mean, se = stack.mean(0), stack.std(0) / math.sqrt(reps)
    assert bool(((mean - eye).abs() <= 5 * se + 1e-12).all())
    assert float(se.max()) < 0.15  # the test has power
    # the average diagonal entry (the scale of P), with its own standard error
    diag = torch.diagonal(stack, dim1=1, dim2=2).mean(1)  # (reps,)
    assert abs(float(diag.mean()) - 1) <= 5 * float(diag.std()) / math.sqrt(reps) + 1e-12
    assert float(diag.std()) / math.sqrt(reps) < 0.05
    assert not torch.allclose(prods[0], prods[1])


def test_logra_factors_follow_seed_semantics():
    proj = LoGraProjection(dim_in=2, dim_out=2, seed=9)
    (path, Po, Pi), (path2, Po2, Pi2) = proj.factors(logra_layout())
    assert (path, path2) == ("fc", "out")
    torch.testing.assert_close(Pi, logra_factor(9, "fc", 0, 2, 4))  # in' = 3 + bias
    torch.testing.assert_close(Po, logra_factor(9, "fc", 1, 2, 3))
    torch.testing.assert_close(Pi2, logra_factor(9, "out", 0, 2, 3))  # weight only
    # a factor asked for at least the layer's size is the identity (exact)
    (_, Po3, Pi3), _ = LoGraProjection(dim_in=8, dim_out=3, seed=9).factors(logra_layout())
    torch.testing.assert_close(Pi3, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(Po3, torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("params", [None, ["sq.weight", "head.bias"]], ids=["all", "weight-and-bias-only"])
def test_logra_equals_kronecker_of_full_gradient(tmp_path, params):
    """φ_l = (P_out ⊗ P_in) vec([∇W ∇b]) for the full per-example gradient from plain autograd, on a Linear over
    (B, T, d) inputs applied twice per forward pass; through hooks (project_examples), through the store, and
    for flat vectors (project)."""
    torch.manual_seed(0)
    model = SeqModel().double()
    X = torch.randn(9, 3, 4, generator=gen(7), dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen(8))
    inf = TorchInfluence(model, ce, (X, y), params=params, optimum_tol=None)
    names = inf.param_names
    proj = LoGraProjection(dim_in=3, dim_out=2, seed=4)
    grads = autograd_grads(model, names, X, y)
    layout = ParamLayout(tuple(names), tuple(tuple(dict(model.named_parameters())[n].shape) for n in names))
    blocks = []
    for path, Po, Pi in proj.factors(layout):
        w, b = grads.get(path + ".weight"), grads.get(path + ".bias")
        parts = ([w] if w is not None else []) + ([b.unsqueeze(2)] if b is not None else [])
        Mi = torch.cat(parts, dim=2)  # (B, out, in')
        K = torch.kron(Po, Pi)  # (k_out·k_in, out·in'), row-major vec
        blocks.append(Mi.reshape(9, -1) @ K.t())
        if path == "sq":  # the factors follow the seed semantics too
            torch.testing.assert_close(Pi, logra_factor(4, "sq", 0, 3, Mi.shape[2]))
            torch.testing.assert_close(Po, logra_factor(4, "sq", 1, 2, 4))
    ref = torch.cat(blocks, dim=1)
    fm = inf.operator.fm
    torch.testing.assert_close(proj.project_examples(fm, X, y), ref, rtol=1e-10, atol=1e-12)
    flat = torch.cat([grads[n].reshape(9, -1) for n in names], dim=1)
    torch.testing.assert_close(proj.project(flat, layout), ref, rtol=1e-10, atol=1e-12)
    store = GradientStore.build(
        inf, tmp_path / "s", projection=proj, shard_size=4, batch_size=3, dtype=torch.float64
    )
    np.testing.assert_allclose(store.rows(), ref.numpy(), rtol=1e-10, atol=1e-12)


def test_projection_validation_and_config():
    for bad, field in [
        (lambda: GaussianProjection(dim=0), "GaussianProjection.dim"),
        (lambda: RademacherProjection(dim=4, seed=-1), "RademacherProjection.seed"),
        (lambda: SparseJLProjection(dim=3, nnz=4), "SparseJLProjection.nnz"),
        (lambda: GaussianProjection(dim=4, block_cols=0), "GaussianProjection.block_cols"),
        (lambda: LoGraProjection(dim_in=0), "LoGraProjection.dim_in"),
        (lambda: LoGraProjection(base="cauchy"), "LoGraProjection.base"),
    ]:
        with pytest.raises(ValueError, match=field):
            bad()
    with pytest.raises(TypeError, match="GaussianProjection.dim"):
        GaussianProjection(dim="8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="V must be"):
        GaussianProjection(dim=4).project(np.ones((2, 3)))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        GaussianProjection(dim=4).project(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="layout"):
        LoGraProjection().project(torch.ones(2, 3))
    with pytest.raises(ValueError, match="'emb.weight'"):
        LoGraProjection().layers(ParamLayout(("emb.weight", "fc.bias"), ((3, 4, 2), (3,))))
    for proj in [
        Identity(),
        GaussianProjection(dim=8, seed=3),
        RademacherProjection(dim=8, block_cols=16),
        SparseJLProjection(dim=8, nnz=2, seed=1),
        LoGraProjection(dim_in=4, dim_out=2, seed=2, base="rademacher"),
    ]:
        cfg = json.loads(json.dumps(proj.config()))
        assert projection_from_config(cfg) == proj
        assert copy.deepcopy(proj) == proj
    with pytest.raises(ValueError, match="unknown projection kind"):
        projection_from_config({"kind": "fourier", "dim": 3})
    with pytest.raises(ValueError, match="unknown fields"):
        projection_from_config({"kind": "gaussian", "dim": 3, "sigma": 2})


def test_logra_refuses_non_linear_parameters(tmp_path):
    model = nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(6, 3)).double()
    X = torch.randn(6, 1, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    inf = TorchInfluence(model, ce, (X, y), optimum_tol=None)
    with pytest.raises(ValueError, match="'0.weight'.*Conv1d"):
        GradientStore.build(inf, tmp_path / "s", projection=LoGraProjection())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_projections_same_on_cuda():
    G = torch.randn(5, 300, generator=gen(0), dtype=torch.float64)
    for proj in [GaussianProjection(dim=16, block_cols=64), SparseJLProjection(dim=16, nnz=4, block_cols=64)]:
        torch.testing.assert_close(proj.project(G.cuda()).cpu(), proj.project(G), rtol=1e-10, atol=1e-10)


# ==============================================================================================
# the store
# ==============================================================================================
def test_store_rows_equal_projected_per_example_gradients(tmp_path, data):
    X, y = data
    model = mlp()
    inf = influence(model, X, y)
    P = dense_matrix("gaussian", 6, 11, 16, inf.n_params)
    Phi = per_example_grads(model, inf.param_names, X, y) @ P.t()  # (n, k)
    proj = GaussianProjection(dim=6, seed=11, block_cols=16)
    store = GradientStore.build(
        inf, tmp_path / "f64", projection=proj, shard_size=7, batch_size=4, dtype=torch.float64
    )
    assert (len(store), store.dim, store.n_shards) == (N, 6, 5)
    assert [store.shard(i).shape[0] for i in range(5)] == [7, 7, 7, 7, 2]
    np.testing.assert_allclose(store.rows(), Phi.numpy(), rtol=1e-12, atol=1e-14)
    for i in range(5):  # row j of shard i is example 7i + j; read-only memory maps
        sh = store.shard(i)
        assert isinstance(sh, np.memmap) and not sh.flags.writeable
        np.testing.assert_allclose(sh, Phi[7 * i : 7 * i + sh.shape[0]].numpy(), rtol=1e-12, atol=1e-14)
    f32 = GradientStore.build(inf, tmp_path / "f32", projection=proj, shard_size=7)
    assert f32.dtype == np.float32
    np.testing.assert_allclose(f32.rows(), Phi.numpy(), rtol=1e-5, atol=1e-6)


def test_data_forms_give_the_same_store(tmp_path, data):
    X, y = data
    inf = influence(mlp(), X, y)
    proj = SparseJLProjection(dim=5, nnz=2)
    ref = GradientStore.build(inf, tmp_path / "default", projection=proj, shard_size=8).rows()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=6, shuffle=False)
    forms = {
        "pair": (X.numpy(), y.numpy()),
        "loader": loader,
        "dataset": torch.utils.data.TensorDataset(X, y),
        "generator": ((X[i : i + 5], y[i : i + 5]) for i in range(0, N, 5)),
    }
    for name, d in forms.items():
        rows = GradientStore.build(inf, tmp_path / name, d, projection=proj, shard_size=8).rows()
        np.testing.assert_array_equal(rows, ref)


class DictModel(nn.Module):
    """A model called as model(**inputs) (Hugging Face style)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask):
        return self.fc(x * mask)


def test_dict_input_batches(tmp_path):
    """Batches as dicts with the targets under "labels": rows equal P g_i from torch.func on model(**inputs)."""
    torch.manual_seed(0)
    model = DictModel().double()
    X = torch.randn(12, 4, generator=gen(3), dtype=torch.float64)
    mask = (torch.rand(12, 4, generator=gen(4)) > 0.3).double()
    y = torch.randint(0, 3, (12,), generator=gen(5))
    inf = TorchInfluence(model, ce, ({"x": X, "mask": mask}, y), optimum_tol=None)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(ps, x, mk, t):
        return ce(functional_call(model, ps, (), {"x": x[None], "mask": mk[None]}), t[None]).sum()

    g = vmap(grad(f), in_dims=(None, 0, 0, 0))(params, X, mask, y)
    G = torch.cat([g[n].reshape(12, -1) for n in inf.param_names], dim=1)
    P = dense_matrix("gaussian", 5, 0, 2048, inf.n_params)
    batches = [{"x": X[i : i + 5], "mask": mask[i : i + 5], "labels": y[i : i + 5]} for i in range(0, 12, 5)]
    store = GradientStore.build(
        inf, tmp_path / "s", batches, projection=GaussianProjection(dim=5), shard_size=4, dtype=torch.float64
    )
    np.testing.assert_allclose(store.rows(), (G @ P.t()).numpy(), rtol=1e-12, atol=1e-14)
    default = GradientStore.build(
        inf, tmp_path / "d", projection=GaussianProjection(dim=5), dtype=torch.float64
    )
    np.testing.assert_array_equal(default.rows(), store.rows())


def test_manifest_is_json_with_the_fields(tmp_path, data):
    X, y = data
    inf = influence(mlp(), X, y)
    proj = GaussianProjection(dim=4, seed=2)
    store = GradientStore.build(inf, tmp_path / "s", projection=proj, shard_size=12)
    with open(tmp_path / "s" / "manifest.json", encoding="utf-8") as f:
        man = json.load(f)
    assert man == store.manifest
    assert man["format"] == "pyinfluence-gradient-store" and man["format_version"] == 1
    assert man["library_version"] == pyinfluence._version.__version__
    assert man["model_class"] == "torch.nn.modules.container.Sequential"
    assert man["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert man["param_shapes"] == [[4, 5], [4], [3, 4], [3]]
    assert man["n_params"] == 39 and man["param_dtype"] == "float64"
    assert man["projection"] == {"kind": "gaussian", "dim": 4, "seed": 2, "block_cols": 2048}
    assert (man["dim"], man["dtype"], man["shard_size"], man["n"], man["complete"]) == (
        4,
        "float32",
        12,
        N,
        True,
    )
    assert [(s["file"], s["start"], s["rows"]) for s in man["shards"]] == [
        ("shard_00000.npy", 0, 12),
        ("shard_00001.npy", 12, 12),
        ("shard_00002.npy", 24, 6),
    ]
    assert (man["l2"], man["damping"]) == (L2, DAMPING)
    # the row digests are those of the files' data (an independent read with numpy)
    for s in man["shards"]:
        arr = np.load(tmp_path / "s" / s["file"], allow_pickle=False)
        assert hashlib.sha256(arr.tobytes()).hexdigest() == s["rows_sha256"]
    # θ̂'s fingerprint is a SHA-256 that changes with θ̂
    assert len(man["theta_sha256"]) == 64 and int(man["theta_sha256"], 16) >= 0
    import datetime

    assert datetime.datetime.fromisoformat(man["created"]).tzinfo is not None
    store.verify()


class Interrupted(Exception):
    pass


def batches(X, y, size, fail_after=None, seen=None):
    for j, i in enumerate(range(0, X.shape[0], size)):
        if fail_after is not None and j == fail_after:
            raise Interrupted("simulated interruption")
        if seen is not None:
            seen.append(j)
        yield X[i : i + size], y[i : i + size]


def test_resume_after_interruption(tmp_path, data):
    X, y = data
    X = torch.cat([X, X[:10] * 0.5])  # n = 40
    y = torch.cat([y, y[:10]])
    inf = influence(mlp(), X, y)
    proj = GaussianProjection(dim=5, seed=1)
    full = GradientStore.build(inf, tmp_path / "full", batches(X, y, 4), projection=proj, shard_size=10)
    path = tmp_path / "resumed"
    with pytest.raises(Interrupted):  # 4 batches of 4 = 16 rows: shard 0 complete, shard 1 in progress
        GradientStore.build(inf, path, batches(X, y, 4, fail_after=4), projection=proj, shard_size=10)
    assert sorted(os.listdir(path)) == ["manifest.json", "shard_00000.npy"]  # no temporary left
    with pytest.raises(ValueError, match="incomplete"):
        GradientStore.open(path)
    assert GradientStore.open(path, allow_incomplete=True).n == 10
    # resume: count the gradient computations (calls and rows)
    fm = inf.operator.fm
    calls = []
    original = fm.per_example_grads

    def counting(Xb, Yb):
        calls.append(int(Xb.shape[0]))
        return original(Xb, Yb)

    fm.per_example_grads = counting
    try:
        seen: list[int] = []
        store = GradientStore.build(
            inf, path, batches(X, y, 4, seen=seen), projection=proj
        )  # shard_size adopted
    finally:
        del fm.per_example_grads
    assert seen == list(range(10))  # the iterable was consumed from the start
    # rows 0–9 (batches 0, 1 and half of batch 2) were not recomputed: 30 rows, from batch 2 on (a batch
    # straddling a shard boundary is computed in two parts: rows 28–29 and 30–31)
    assert calls == [2, 4, 4, 4, 4, 2, 2, 4, 4]
    assert store.n == 40 and store.manifest["shards"] == full.manifest["shards"]
    for i in range(full.n_shards):
        a, b = (tmp_path / d / f"shard_{i:05d}.npy" for d in ("full", "resumed"))
        assert a.read_bytes() == b.read_bytes()
    # a complete store is returned as it is: the data is not read
    again = GradientStore.build(inf, path, batches(X, y, 4, fail_after=0), projection=proj)
    assert again.manifest == store.manifest


def test_resume_with_other_data_raises(tmp_path, data):
    X, y = data
    inf = influence(mlp(), X, y)
    proj = GaussianProjection(dim=5, seed=1)
    path = tmp_path / "s"
    with pytest.raises(Interrupted):
        GradientStore.build(inf, path, batches(X, y, 5, fail_after=3), projection=proj, shard_size=10)
    with pytest.raises(DataError, match="shard_00000.npy"):
        GradientStore.build(inf, path, batches(X.flip(0), y.flip(0), 5), projection=proj)
    with pytest.raises(DataError, match="already holds 10"):
        GradientStore.build(inf, path, batches(X[:6], y[:6], 5), projection=proj)
    # the completed shard survived both attempts; the right data finishes the build
    store = GradientStore.build(inf, path, batches(X, y, 5), projection=proj)
    assert store.n == N


def test_mismatched_configuration_or_model(tmp_path, data):
    X, y = data
    model = mlp()
    inf = influence(model, X, y)
    path = tmp_path / "s"
    GradientStore.build(inf, path, projection=GaussianProjection(dim=4), shard_size=8)
    with pytest.raises(ValueError, match="projection.*overwrite=True"):
        GradientStore.build(inf, path, projection=GaussianProjection(dim=5))
    with pytest.raises(ValueError, match="dtype"):
        GradientStore.build(inf, path, projection=GaussianProjection(dim=4), dtype=torch.float64)
    with torch.no_grad():
        model[0].weight[0, 0] += 1e-3
    changed = influence(model, X, y)
    with pytest.raises(ValueError, match="θ̂"):
        GradientStore.build(changed, path, projection=GaussianProjection(dim=4))
    with pytest.raises(ValueError, match="θ̂"):
        GradientStore.open(path, influence=changed)
    store = GradientStore.build(changed, path, projection=GaussianProjection(dim=4), overwrite=True)
    GradientStore.open(path, influence=changed)  # no error: the rebuilt store is the changed model's
    P = dense_matrix("gaussian", 4, 0, 2048, changed.n_params)
    ref = per_example_grads(model, changed.param_names, X, y) @ P.t()
    np.testing.assert_allclose(store.rows(), ref.numpy(), rtol=1e-5, atol=1e-6)
    # a buffer or an unselected parameter changes the stored gradients too
    only_last = influence(model, X, y, params=["2"])
    GradientStore.build(only_last, tmp_path / "last", projection=Identity())
    with torch.no_grad():
        model[0].bias[0] += 1.0
    with pytest.raises(ValueError, match="other parameters or buffers"):
        GradientStore.open(tmp_path / "last", influence=influence(model, X, y, params=["2"]))


def test_open_errors_name_the_file(tmp_path, data):
    X, y = data
    inf = influence(mlp(), X, y)
    path = tmp_path / "s"
    GradientStore.build(inf, path, projection=GaussianProjection(dim=4), shard_size=8)
    shard1 = path / "shard_00001.npy"
    good = shard1.read_bytes()
    shard1.write_bytes(good[:-5])  # truncated
    with pytest.raises(ValueError, match=r"shard_00001\.npy is truncated"):
        GradientStore.open(path)
    shard1.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard_00001\.npy is missing"):
        GradientStore.open(path)
    shard1.write_bytes(good)
    GradientStore.open(path)
    man_path = path / "manifest.json"
    man = json.loads(man_path.read_text())
    bad = json.loads(json.dumps(man))
    bad["dim"] = 5
    man_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"shard_00000\.npy.*do not match"):
        GradientStore.open(path)
    bad = json.loads(json.dumps(man))
    bad["shards"][1]["rows"] = 7
    man_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"shard_00001\.npy"):
        GradientStore.open(path)
    bad = json.loads(json.dumps(man))
    bad["shards"][0]["file"] = "../elsewhere.npy"
    man_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="invalid file"):
        GradientStore.open(path)
    del bad["shards"][0]["file"]
    bad.pop("theta_sha256")
    man_path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="theta_sha256"):
        GradientStore.open(path)
    man_path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        GradientStore.open(path)
    man_path.unlink()
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        GradientStore.open(path)
    with pytest.raises(ValueError, match="non-empty folder without a gradient store"):
        GradientStore.build(inf, path, projection=GaussianProjection(dim=4))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        GradientStore.open(tmp_path / "nothing")
    # a corrupted row is found by verify()
    man_path.write_text(json.dumps(man))
    arr = np.load(shard1, mmap_mode="r+")
    arr[0, 0] += 1.0
    arr.flush()
    del arr
    with pytest.raises(ValueError, match=r"shard_00001\.npy is corrupted"):
        GradientStore.open(path).verify()


def test_bad_arguments_are_named(tmp_path, data):
    X, y = data
    inf = influence(mlp(), X, y)
    g = GaussianProjection(dim=4)
    with pytest.raises(TypeError, match="influence must be a pyinfluence.TorchInfluence"):
        GradientStore.build("model", tmp_path / "a", projection=g)
    with pytest.raises(TypeError, match="path"):
        GradientStore.build(inf, 3, projection=g)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="projection"):
        GradientStore.build(inf, tmp_path / "a", projection="gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shard_size"):
        GradientStore.build(inf, tmp_path / "a", projection=g, shard_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        GradientStore.build(inf, tmp_path / "a", projection=g, batch_size=0)
    with pytest.raises(TypeError, match="dtype"):
        GradientStore.build(inf, tmp_path / "a", projection=g, dtype=torch.int32)
    with pytest.raises(TypeError, match="overwrite"):
        GradientStore.build(inf, tmp_path / "a", projection=g, overwrite=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data must be"):
        GradientStore.build(inf, tmp_path / "a", 123, projection=g)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        GradientStore.build(inf, tmp_path / "a", shuffled, projection=g)
    with pytest.raises(ValueError, match="empty"):
        GradientStore.build(inf, tmp_path / "a", [], projection=g)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        GradientStore.build(inf, tmp_path / "file", projection=g)
    with pytest.raises(ValueError, match="a batch of data failed in the model"):
        GradientStore.build(inf, tmp_path / "a", (X[:, :3], y), projection=g, overwrite=True)
    store = GradientStore.build(inf, tmp_path / "ok", projection=g)
    with pytest.raises(ValueError, match="X_test/y_test failed in the model"):
        store.project_test(inf, X[:2, :4], y[:2])
    Q = torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"queries has shape \(2, 3\)"):
        store.scores(torch.randn(2, 3))
    with pytest.raises(ValueError, match="queries contains NaN"):
        store.top_k(torch.full((1, 4), float("nan")), 3)
    with pytest.raises(TypeError, match="queries must be floating"):
        store.scores(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="k must be <= 30"):
        store.top_k(Q, 31)
    with pytest.raises(ValueError, match="k must be >= 1"):
        store.top_k(Q, 0)
    with pytest.raises(TypeError, match="out must be"):
        store.scores(Q, out=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_rows"):
        store.scores(Q, chunk_rows=0)
    with pytest.raises(ValueError, match=r"s_test\(...\)\.T"):
        store.project_vectors(torch.randn(inf.n_params, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="damping must be >= 0"):
        store.projected_influence(damping=-1.0)
    with pytest.raises(ValueError, match="phi_test"):
        store.projected_influence().up_loss(torch.randn(3))


def test_non_finite_gradients_raise(tmp_path, data):
    X, y = data
    inf = TorchInfluence(mlp(), lambda o, t: 1e7 * ce(o, t), (X, y), optimum_tol=None)
    with pytest.raises(NonFiniteError, match="overflow float16"):
        GradientStore.build(inf, tmp_path / "s", projection=RademacherProjection(dim=4), dtype=torch.float16)
    assert not any(f.name.endswith(".tmp") for f in (tmp_path / "s").iterdir())


# ==============================================================================================
# scoring
# ==============================================================================================
@pytest.fixture(scope="module")
def scored(tmp_path_factory, data):
    """A float64 Gaussian store of the MLP (shards of 7 rows) with the test's own Φ and test φ."""
    X, y = data
    model = mlp(3)
    inf = influence(model, X, y)
    proj = GaussianProjection(dim=6, seed=8, block_cols=16)
    path = tmp_path_factory.mktemp("scored") / "s"
    store = GradientStore.build(inf, path, projection=proj, shard_size=7, dtype=torch.float64)
    P = dense_matrix("gaussian", 6, 8, 16, inf.n_params)
    Phi = (per_example_grads(model, inf.param_names, X, y) @ P.t()).numpy()
    Xt = torch.randn(4, 5, generator=gen(9), dtype=torch.float64)
    yt = torch.randint(0, 3, (4,), generator=gen(10))
    phi_t = (per_example_grads(model, inf.param_names, Xt, yt) @ P.t()).numpy()
    return inf, store, Phi, (Xt, yt), phi_t


def test_scores_are_minus_phi_q(scored, tmp_path):
    _, store, Phi, _, _ = scored
    Q = np.random.default_rng(0).standard_normal((3, 6))
    ref = -Phi @ Q.T
    np.testing.assert_allclose(
        store.scores(torch.from_numpy(Q), chunk_rows=3).numpy(), ref, rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(store.scores(Q).numpy(), ref, rtol=1e-12, atol=1e-13)  # numpy queries
    np.testing.assert_allclose(
        store.scores(Q[1]).numpy(), ref[:, 1:2], rtol=1e-12, atol=1e-13
    )  # one (k,) query
    mm = store.scores(Q, out=tmp_path / "scores.npy", chunk_rows=4)
    np.testing.assert_allclose(np.asarray(mm), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(
        np.load(tmp_path / "scores.npy", allow_pickle=False), ref, rtol=1e-12, atol=1e-13
    )


def test_projected_influence_closed_form(scored):
    inf, store, Phi, (Xt, yt), phi_t = scored
    n, k = Phi.shape
    H = Phi.T @ Phi / n + (L2 + DAMPING) * np.eye(k)
    ref = -Phi @ np.linalg.solve(H, phi_t.T)  # (n, m): −φ_iᵀ H_P⁻¹ φ_test
    phi = store.project_test(inf, Xt, yt)
    np.testing.assert_allclose(phi.numpy(), phi_t, rtol=1e-10, atol=1e-12)
    pinf = store.projected_influence(chunk_rows=5)
    assert (pinf.l2, pinf.damping) == (L2, DAMPING)
    np.testing.assert_allclose(pinf.hessian().numpy(), H, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(pinf.up_loss(phi).numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(pinf.up_loss(torch.from_numpy(phi_t)).numpy(), ref, rtol=1e-9, atol=1e-12)
    self_ref = -np.einsum("ik,ik->i", Phi, np.linalg.solve(H, Phi.T).T)
    np.testing.assert_allclose(pinf.self_influence().numpy(), self_ref, rtol=1e-9, atol=1e-12)
    other = store.projected_influence(l2=0.5, damping=0.0)
    H2 = Phi.T @ Phi / n + 0.5 * np.eye(k)
    np.testing.assert_allclose(other.up_loss(phi).numpy(), -Phi @ np.linalg.solve(H2, phi_t.T), rtol=1e-9)


@pytest.mark.parametrize("kk", [1, 4, N])
def test_streaming_top_k_equals_full_argsort(scored, kk):
    inf, store, Phi, _, phi_t = scored
    n, k = Phi.shape
    H = Phi.T @ Phi / n + (L2 + DAMPING) * np.eye(k)
    S = (-Phi @ np.linalg.solve(H, phi_t.T)).T  # (m, n)
    order = np.argsort(S, axis=1, kind="stable")
    pinf = store.projected_influence(chunk_rows=4)  # chunks of 4 inside shards of 7: merges across both
    top = pinf.top_k(torch.from_numpy(phi_t), kk)
    assert top.helpful_idx.dtype == torch.int64 and top.helpful_idx.shape == (4, kk)
    np.testing.assert_array_equal(top.helpful_idx.numpy(), order[:, :kk])
    np.testing.assert_array_equal(top.harmful_idx.numpy(), order[:, ::-1][:, :kk])
    np.testing.assert_allclose(top.helpful_scores.numpy(), np.take_along_axis(S, order[:, :kk], 1), rtol=1e-9)
    np.testing.assert_allclose(
        top.harmful_scores.numpy(), np.take_along_axis(S, order[:, ::-1][:, :kk], 1), rtol=1e-9
    )
    Q = np.random.default_rng(1).standard_normal((2, k))
    S2 = (-Phi @ Q.T).T
    o2 = np.argsort(S2, axis=1)
    t2 = store.top_k(torch.from_numpy(Q), kk, chunk_rows=3)
    np.testing.assert_array_equal(t2.helpful_idx.numpy(), o2[:, :kk])
    np.testing.assert_array_equal(t2.harmful_idx.numpy(), o2[:, ::-1][:, :kk])


def test_identity_store_with_s_test_is_exact_up_loss(tmp_path, data):
    """Queries P s_test with P = I: the store's scores are exactly TorchInfluence.up_loss; with a Gaussian P
    they are −(P s)ᵀ(P g_i), the same from the test's own matrices."""
    X, y = data
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()  # convex: H + λI is positive definite anywhere
    inf = TorchInfluence(model, ce, (X, y), l2=0.1, optimum_tol=None)
    Xt, yt = X[:3] + 0.1, y[:3]
    s = inf.s_test(Xt, yt)  # (p, m)
    exact = GradientStore.build(inf, tmp_path / "id", shard_size=8, dtype=torch.float64)
    assert exact.dim == inf.n_params
    torch.testing.assert_close(
        exact.scores(exact.project_vectors(s.t())), inf.up_loss(Xt, yt), rtol=1e-10, atol=1e-12
    )
    top = exact.top_k(s.t(), 5)
    ref = inf.top_k(Xt, yt, 5)
    torch.testing.assert_close(top.helpful_idx, ref.helpful_idx)
    torch.testing.assert_close(top.harmful_scores, ref.harmful_scores, rtol=1e-10, atol=1e-12)
    jl = GradientStore.build(
        inf, tmp_path / "jl", projection=GaussianProjection(dim=8, seed=2), dtype=torch.float64
    )
    P = dense_matrix("gaussian", 8, 2, 2048, inf.n_params)
    G = per_example_grads(model, inf.param_names, X, y)
    torch.testing.assert_close(
        jl.scores(jl.project_vectors(s.t())), -(G @ P.t()) @ (P @ s), rtol=1e-10, atol=1e-12
    )


def test_singular_projected_hessian_suggests_damping(tmp_path, data):
    X, y = data
    inf = TorchInfluence(mlp(), ce, (X[:5], y[:5]), optimum_tol=None)  # l2 = damping = 0
    store = GradientStore.build(
        inf, tmp_path / "s", projection=GaussianProjection(dim=8), dtype=torch.float64
    )
    with pytest.raises(NotPositiveDefiniteError, match="damping=") as err:
        store.projected_influence().prepare()
    lam = err.value.suggested_damping
    assert lam is not None and lam > 0
    phi = store.project_test(inf, X[5:7], y[5:7])
    Phi = store.rows()
    H = Phi.T @ Phi / 5 + lam * np.eye(8)
    ref = -Phi @ np.linalg.solve(H, phi.numpy().T)
    np.testing.assert_allclose(
        store.projected_influence(damping=lam).up_loss(phi).numpy(), ref, rtol=1e-8, atol=1e-12
    )
