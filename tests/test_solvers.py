"""The solvers of pyinfluence.solvers (Exact, CG, BlockCG, LiSSA) on explicit matrices.

Every solution is checked against an independent float64 ``np.linalg.solve`` of the explicit
matrix H + λI built here in numpy — never against another solver of the package. The Hessian
operator is a small explicit one: H = (1/n) Σ_i w_i x_i x_iᵀ + l2·I, so ``sample_matvec`` is a
genuine unbiased minibatch estimate, as a model's Hessian operator would give.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
import torch

import pyinfluence
from pyinfluence.errors import ConvergenceError, ConvergenceWarning, NotPositiveDefiniteError
from pyinfluence.torch.solvers import (
    CG,
    BlockCG,
    Exact,
    HessianOperatorLike,
    LiSSA,
    PreparedSolver,
    Solver,
    SolveResult,
    resolve_solver,
)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------
# an explicit Hessian operator and its numpy reference
# ----------------------------------------------------------------------------------------------
class ExplicitHessian:
    """H = (1/n) Σ_i w_i x_i x_iᵀ + l2·I from explicit per-example terms (w_i > 0: each PSD).

    ``sample_matvec`` draws ``batch_size`` indices uniformly with replacement from ``generator``:
    (1/b) Σ_{i∈B} w_i x_i x_iᵀ V + l2·V is an unbiased estimate of H V. A negative l2 makes H
    indefinite. Counts its calls.
    """

    def __init__(self, X: np.ndarray, w: np.ndarray, l2: float, dtype=torch.float64, device="cpu"):
        self.X_np, self.w_np, self.l2 = X, w, float(l2)
        self.X = torch.as_tensor(X, dtype=dtype, device=device)
        self.w = torch.as_tensor(w, dtype=dtype, device=device)
        self.n_train, self.n_params = X.shape
        self.dtype = dtype
        self.device = torch.device(device)
        self.calls = {"matvec": 0, "sample_matvec": 0, "dense": 0}

    def matvec(self, V):
        self.calls["matvec"] += 1
        return self.X.T @ (self.w[:, None] * (self.X @ V)) / self.n_train + self.l2 * V

    def sample_matvec(self, V, batch_size, generator):
        self.calls["sample_matvec"] += 1
        idx = torch.randint(self.n_train, (batch_size,), generator=generator, device=self.device)
        Xb = self.X[idx]
        return Xb.T @ (self.w[idx, None] * (Xb @ V)) / batch_size + self.l2 * V

    def dense(self):
        self.calls["dense"] += 1
        H = self.X.T @ (self.w[:, None] * self.X) / self.n_train
        H = H + self.l2 * torch.eye(self.n_params, dtype=self.dtype, device=self.device)
        return (H + H.T) / 2

    def reference(self, damping: float = 0.0) -> np.ndarray:
        """H + λI in float64 numpy, computed independently of the torch code above."""
        X = self.X_np.astype(np.float64)
        H = (X * self.w_np[:, None]).T @ X / self.n_train
        return H + (self.l2 + damping) * np.eye(self.n_params)


def make_op(n=120, p=12, l2=0.1, seed=0, dtype=torch.float64, decay=0.0, device="cpu"):
    """Random problem; ``decay`` > 0 spreads the feature scales over 10^-decay (worse conditioning)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) * np.logspace(0, -decay, p)
    w = rng.uniform(0.1, 1.1, n)
    return ExplicitHessian(X, w, l2, dtype=dtype, device=device)


def rhs(p, r, seed=1, dtype=torch.float64, zero_cols=(), device="cpu"):
    V = torch.randn(p, r, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for j in zero_cols:
        V[:, j] = 0
    return V.to(dtype=dtype, device=device)


def ref_solve(op: ExplicitHessian, V: torch.Tensor, damping: float = 0.0) -> np.ndarray:
    return np.linalg.solve(op.reference(damping), V.detach().cpu().double().numpy())


def rel_err(x: torch.Tensor, ref: np.ndarray) -> float:
    x = x.detach().cpu().double().numpy()
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def true_residual(op: ExplicitHessian, x: torch.Tensor, V: torch.Tensor, damping=0.0) -> np.ndarray:
    A = op.reference(damping)
    xn, vn = x.detach().cpu().double().numpy(), V.detach().cpu().double().numpy()
    num = np.linalg.norm(A @ xn - vn, axis=0)
    den = np.linalg.norm(vn, axis=0)
    return np.where(den > 0, num / np.where(den > 0, den, 1), num)


def suggested_damping(message: str) -> float:
    m = re.search(r"damping=([0-9.eE+-]+)", message)
    assert m, message
    return float(m.group(1))


# ----------------------------------------------------------------------------------------------
# Exact and CG against np.linalg.solve
# ----------------------------------------------------------------------------------------------
DIRECT = [
    pytest.param(Exact(), id="exact"),
    pytest.param(CG(tol=1e-13), id="cg"),
    pytest.param(BlockCG(tol=1e-13), id="block_cg"),
]


def test_the_test_operator_is_a_hessian_operator():
    op = make_op()
    assert isinstance(op, HessianOperatorLike)
    np.testing.assert_allclose(op.dense().numpy(), op.reference(), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("solver", DIRECT)
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_float64_matches_numpy_solve(solver, damping):
    op = make_op(decay=1.0)  # condition number ~ 10²
    V = rhs(op.n_params, 5, zero_cols=(2,))
    res = solver.prepare(op, damping).solve(V)
    assert isinstance(res, SolveResult)
    assert res.solution.shape == V.shape and res.solution.dtype == torch.float64
    assert rel_err(res.solution, ref_solve(op, V, damping)) <= 1e-10
    assert torch.equal(res.solution[:, 2], torch.zeros(op.n_params, dtype=torch.float64))
    assert res.residual.shape == (5,) and res.residual[2] == 0
    np.testing.assert_allclose(
        res.residual.numpy(), true_residual(op, res.solution, V, damping), rtol=1e-3, atol=1e-14
    )
    assert res.max_residual <= 1e-11
    assert res.info["damping"] == damping
    assert res.spread is None
    assert math.isfinite(res.time_s) and res.time_s >= 0


@pytest.mark.parametrize(
    "solver",
    [Exact(), Exact(factor_dtype=None), CG(), BlockCG(tol=1e-6)],
    ids=["exact", "exact-f32-factor", "cg", "block_cg"],
)
def test_float32_matches_numpy_solve(solver):
    op = make_op(dtype=torch.float32, decay=1.0)
    V = rhs(op.n_params, 4, dtype=torch.float32, zero_cols=(0,))
    res = solver.prepare(op, 0.05).solve(V)
    assert res.solution.dtype == torch.float32 and res.residual.dtype == torch.float32
    assert rel_err(res.solution, ref_solve(op, V, 0.05)) <= 1e-4
    assert torch.all(res.solution[:, 0] == 0)
    assert res.max_residual <= 1e-4


def test_exact_factorises_once_and_solves_many_right_hand_sides():
    op = make_op()
    prepared = Exact().prepare(op, 0.1)
    assert op.calls["dense"] == 1
    for r in (1, 3, 7):
        V = rhs(op.n_params, r, seed=r)
        assert rel_err(prepared.solve(V).solution, ref_solve(op, V, 0.1)) <= 1e-12
    assert op.calls == {"matvec": 0, "sample_matvec": 0, "dense": 1}
    assert prepared.info["backend"] in ("core", "torch")
    assert prepared.info["factor_dtype"] == "float64"
    assert prepared.solve(rhs(op.n_params, 2)).iterations is None


def test_exact_without_residual():
    op = make_op()
    res = Exact(compute_residual=False).prepare(op).solve(rhs(op.n_params, 2))
    assert res.residual is None and res.max_residual is None
    assert "max_residual" not in repr(res)


def test_cg_reports_iterations_and_cost():
    op = make_op(p=10, decay=1.0)
    V = rhs(10, 3, zero_cols=(1,))
    res = CG(tol=1e-10).prepare(op).solve(V)
    per_col = res.info["iterations_per_column"]
    assert per_col[1] == 0 and 1 <= res.iterations == int(per_col.max()) <= 100
    assert bool(res.info["converged"].all())
    assert float(res.info["recursive_residual"].max()) <= 1e-10
    # one batched matvec per iteration, plus one for the true residual; the zero column never
    assert res.info["matvec_calls"] == res.iterations + 1 == op.calls["matvec"]
    # converged columns drop out of the batch; the zero column is never multiplied
    assert res.info["matvec_columns"] == int(per_col.sum()) + 2
    # λ_max lower estimate from the Rayleigh quotients of the search directions
    lam_max = np.linalg.eigvalsh(op.reference())[-1]
    assert 0.3 * lam_max <= res.info["lambda_max_estimate"] <= lam_max * (1 + 1e-12)


def test_cg_converged_columns_stop_being_multiplied():
    op = make_op(p=20, decay=1.5)
    easy = op.reference() @ np.eye(20)[:, :1]  # H e_0: the solution is e_0 after a few steps
    V = torch.cat([torch.as_tensor(easy), rhs(20, 1)], dim=1)
    res = CG(tol=1e-12).prepare(op).solve(V)
    it = res.info["iterations_per_column"]
    assert it[0] < it[1]
    assert res.info["matvec_columns"] == int(it.sum()) + 2
    assert rel_err(res.solution, ref_solve(op, V)) <= 1e-10


def test_cg_checking_every_few_iterations_gives_the_same_solution():
    """The CUDA code path (host checks every k iterations; columns frozen on the device)."""
    op = make_op(p=15, decay=1.0)
    V = rhs(15, 4, zero_cols=(3,))
    a = CG(tol=1e-12).prepare(op).solve(V)
    b = CG(tol=1e-12, check_every=7).prepare(op).solve(V)
    torch.testing.assert_close(a.solution, b.solution, rtol=1e-13, atol=1e-15)
    assert torch.equal(a.info["iterations_per_column"], b.info["iterations_per_column"])


@pytest.mark.parametrize(
    "solver", [Exact(), CG(), BlockCG(), LiSSA(depth=5)], ids=["exact", "cg", "block_cg", "lissa"]
)
def test_zero_and_empty_right_hand_sides(solver):
    op = make_op(p=6)
    prepared = solver.prepare(op, 0.1)
    zero = prepared.solve(torch.zeros(6, 3, dtype=torch.float64))
    assert torch.equal(zero.solution, torch.zeros(6, 3, dtype=torch.float64))
    assert torch.equal(zero.residual, torch.zeros(3, dtype=torch.float64))
    empty = prepared.solve(torch.zeros(6, 0, dtype=torch.float64))
    assert empty.solution.shape == (6, 0) and empty.residual.shape == (0,)
    assert empty.max_residual == 0.0


@pytest.mark.parametrize(
    "solver", [Exact(), CG(tol=1e-12), BlockCG(tol=1e-12)], ids=["exact", "cg", "block_cg"]
)
def test_one_dimensional_rhs_and_dtype_conversion(solver):
    op = make_op(p=8)
    v = rhs(8, 1).reshape(-1)
    res = solver.prepare(op).solve(v)
    assert res.solution.shape == (8,) and res.residual.shape == (1,)
    assert rel_err(res.solution, ref_solve(op, v[:, None])[:, 0]) <= 1e-10
    res32 = solver.prepare(op).solve(v.float())  # computed in the operator's float64
    assert res32.solution.dtype == torch.float32
    assert rel_err(res32.solution, ref_solve(op, v.float()[:, None])[:, 0]) <= 1e-6


def test_solver_solve_shortcut():
    op = make_op(p=5)
    V = rhs(5, 2)
    assert rel_err(CG(tol=1e-12).solve(op, V, damping=0.2).solution, ref_solve(op, V, 0.2)) <= 1e-10


# ----------------------------------------------------------------------------------------------
# positive definiteness, damping, convergence failures
# ----------------------------------------------------------------------------------------------
def indefinite_op(**kw):
    """Eigenvalues of H roughly in [−0.25, 0.6]: not positive definite."""
    return make_op(n=80, p=10, l2=-0.35, seed=4, **kw)


def test_exact_not_positive_definite_suggests_a_damping_that_works():
    op = indefinite_op()
    lam_min = np.linalg.eigvalsh(op.reference())[0]
    assert lam_min < -0.05
    with pytest.raises(NotPositiveDefiniteError, match="damping") as exc:
        Exact().prepare(op)
    assert isinstance(exc.value, ValueError)
    assert f"{lam_min:.3g}" in str(exc.value)  # names the smallest eigenvalue
    damping = suggested_damping(str(exc.value))
    assert damping > -lam_min
    V = rhs(10, 3)
    res = Exact().prepare(op, damping).solve(V)
    assert rel_err(res.solution, ref_solve(op, V, damping)) <= 1e-10
    with pytest.raises(NotPositiveDefiniteError):  # damping below −λ_min is still not enough
        Exact().prepare(op, 0.5 * -lam_min)


def test_cg_not_positive_definite():
    op = indefinite_op()
    with pytest.raises(NotPositiveDefiniteError, match="damping") as exc:
        CG().prepare(op).solve(rhs(10, 4))
    assert "curvature" in str(exc.value)
    lam_min = np.linalg.eigvalsh(op.reference())[0]
    res = CG(tol=1e-12).prepare(op, -lam_min + 0.1).solve(rhs(10, 4))
    assert rel_err(res.solution, ref_solve(op, rhs(10, 4), -lam_min + 0.1)) <= 1e-9


def test_block_cg_shares_the_krylov_space_fewer_hvps_than_cg():
    # Block CG searches all columns' Krylov spaces at once: on the same system and tolerance it needs
    # fewer batched HVPs (and HVP columns) than independent CG recursions. Both are checked against
    # np.linalg.solve.
    op = make_op(n=400, p=60, decay=2.0, l2=1e-3, seed=3)
    V = rhs(60, 12, seed=5)
    ref = ref_solve(op, V, 0.0)
    cg = CG(tol=1e-10).prepare(op).solve(V)
    bcg = BlockCG(tol=1e-10).prepare(op).solve(V)
    assert rel_err(cg.solution, ref) <= 1e-8 and rel_err(bcg.solution, ref) <= 1e-8
    assert bcg.max_residual <= 1e-9
    np.testing.assert_allclose(
        bcg.residual.numpy(), true_residual(op, bcg.solution, V), rtol=1e-3, atol=1e-14
    )
    assert bcg.iterations < cg.iterations
    assert bcg.info["matvec_columns"] < cg.info["matvec_columns"]
    assert bcg.info["converged"].all()


def test_block_cg_rank_deficient_right_hand_sides_do_not_break_down():
    # Duplicate and dependent columns make the search block rank deficient (the classic breakdown of
    # block CG); the SVD orthonormalisation drops the dependent directions.
    op = make_op(p=20, decay=1.0)
    V0 = rhs(20, 3)
    V = torch.cat([V0, V0[:, :1], 2.0 * V0[:, 1:2] - V0[:, 2:3], torch.zeros(20, 1, dtype=V0.dtype)], 1)
    res = BlockCG(tol=1e-12).prepare(op, 0.05).solve(V)
    assert torch.isfinite(res.solution).all()
    assert rel_err(res.solution, ref_solve(op, V, 0.05)) <= 1e-9
    assert torch.equal(res.solution[:, 5], torch.zeros(20, dtype=torch.float64))
    assert res.max_residual <= 1e-10


def test_block_cg_not_positive_definite_suggests_a_damping_that_works():
    op = indefinite_op()
    with pytest.raises(NotPositiveDefiniteError, match="damping") as exc:
        BlockCG().prepare(op).solve(rhs(10, 4))
    assert "block CG" in str(exc.value)
    damping = suggested_damping(str(exc.value))
    lam_min = np.linalg.eigvalsh(op.reference())[0]
    assert damping > 0
    ok = max(damping, -lam_min + 0.1)
    res = BlockCG(tol=1e-12).prepare(op, ok).solve(rhs(10, 4))
    assert rel_err(res.solution, ref_solve(op, rhs(10, 4), ok)) <= 1e-9


def test_block_cg_max_iter():
    op = make_op(p=30, decay=2.0, l2=1e-3)
    V = rhs(30, 2)
    with pytest.raises(ConvergenceError, match="residual reached") as exc:
        BlockCG(max_iter=1).prepare(op).solve(V)
    assert exc.value.result.residual.shape == (2,)
    with pytest.warns(RuntimeWarning, match="did not converge"):
        res = BlockCG(max_iter=1, raise_on_nonconvergence=False).prepare(op).solve(V)
    assert not res.info["converged"].all()


def test_cg_max_iter_raises_convergence_error_with_the_residual():
    op = make_op(p=30, decay=2.0, l2=1e-3)
    V = rhs(30, 2)
    with pytest.raises(ConvergenceError, match="residual reached") as exc:
        CG(max_iter=3).prepare(op).solve(V)
    assert isinstance(exc.value, RuntimeError)
    assert "max_iter=3" in str(exc.value)
    partial = exc.value.result
    assert partial.iterations == 3 and not bool(partial.info["converged"].any())
    assert torch.isfinite(partial.solution).all()
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = CG(max_iter=3, raise_on_nonconvergence=False).prepare(op).solve(V)
    assert issubclass(ConvergenceWarning, RuntimeWarning)
    np.testing.assert_allclose(res.residual.numpy(), true_residual(op, res.solution, V), rtol=1e-6)
    assert float(res.residual.min()) > 1e-8


class _PoisonedHessian(ExplicitHessian):
    """Returns NaN from the k-th call on."""

    def __init__(self, *a, after=3, **kw):
        super().__init__(*a, **kw)
        self.after = after

    def matvec(self, V):
        out = super().matvec(V)
        return out * float("nan") if self.calls["matvec"] > self.after else out

    def sample_matvec(self, V, batch_size, generator):
        out = super().sample_matvec(V, batch_size, generator)
        return out * float("nan") if self.calls["sample_matvec"] > self.after else out


def _poisoned(**kw):
    base = make_op(p=10, decay=2.0, l2=1e-3)
    return _PoisonedHessian(base.X_np, base.w_np, base.l2, **kw)


def test_cg_nan_hessian_vector_products_raise():
    with pytest.raises(ConvergenceError, match="NaN"):
        CG().prepare(_poisoned()).solve(rhs(10, 2))


def test_lissa_nan_hessian_vector_products_raise():
    op = _poisoned(after=25)
    with pytest.raises(ConvergenceError, match="NaN"):
        LiSSA(scale=2.0, depth=50).prepare(op).solve(rhs(10, 2))


def test_exact_refuses_too_many_parameters_without_materialising():
    op = make_op(p=12)
    with pytest.raises(ValueError, match="max_params=10") as exc:
        Exact(max_params=10).prepare(op)
    for hint in ("cg", "lissa", "params="):
        assert hint in str(exc.value)
    assert op.calls["dense"] == 0


# ----------------------------------------------------------------------------------------------
# the C++ core's CholeskyFactor (when the extension has it) and a stand-in with its interface
# ----------------------------------------------------------------------------------------------
class _FakeCholeskyFactor:
    """The interface of pyinfluence._core.CholeskyFactor (as pyinfluence.torch.solvers uses it), in numpy."""

    made = 0

    def __init__(self, A, damping):
        assert isinstance(A, np.ndarray) and A.flags.c_contiguous and A.ndim == 2
        assert A.dtype in (np.float32, np.float64) and A.shape[0] == A.shape[1]
        M = np.tril(A) + np.tril(A, -1).T + damping * np.eye(A.shape[0], dtype=A.dtype)
        try:
            self._L = np.linalg.cholesky(M)
        except np.linalg.LinAlgError:
            raise NotPositiveDefiniteError("matrix not positive definite at pivot 3") from None
        self.size = A.shape[0]
        _FakeCholeskyFactor.made += 1

    def solve(self, B):
        assert isinstance(B, np.ndarray) and B.dtype == self._L.dtype and B.shape[0] == self.size
        y = np.linalg.solve(self._L, B)
        return np.linalg.solve(self._L.T, y)


def test_exact_uses_the_core_factorisation_when_present(monkeypatch):
    monkeypatch.setattr(pyinfluence._core, "CholeskyFactor", _FakeCholeskyFactor, raising=False)
    made = _FakeCholeskyFactor.made
    op = make_op(p=9)
    prepared = Exact().prepare(op, 0.2)
    assert prepared.info["backend"] == "core" and _FakeCholeskyFactor.made == made + 1
    V = rhs(9, 3)
    assert rel_err(prepared.solve(V).solution, ref_solve(op, V, 0.2)) <= 1e-12
    with pytest.raises(NotPositiveDefiniteError, match="pivot 3.*damping="):
        Exact().prepare(indefinite_op())


def test_exact_torch_factorisation_without_the_core(monkeypatch):
    """The path CUDA tensors take, and CPU ones with an extension that lacks CholeskyFactor."""
    monkeypatch.delattr(pyinfluence._core, "CholeskyFactor", raising=False)
    op = make_op(p=9)
    for fdtype in (torch.float64, None):
        prepared = Exact(factor_dtype=fdtype).prepare(op, 0.2)
        assert prepared.info["backend"] == "torch"
        V = rhs(9, 3)
        assert rel_err(prepared.solve(V).solution, ref_solve(op, V, 0.2)) <= 1e-12
    with pytest.raises(NotPositiveDefiniteError, match="pivot.*damping=") as exc:
        Exact().prepare(indefinite_op())
    assert suggested_damping(str(exc.value)) > -np.linalg.eigvalsh(indefinite_op().reference())[0]


@pytest.mark.skipif(
    not hasattr(pyinfluence._core, "CholeskyFactor"), reason="extension without CholeskyFactor"
)
def test_exact_real_core_factorisation():
    op = make_op(p=9)
    prepared = Exact().prepare(op, 0.2)
    assert prepared.info["backend"] == "core"
    V = rhs(9, 3)
    assert rel_err(prepared.solve(V).solution, ref_solve(op, V, 0.2)) <= 1e-12
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        Exact().prepare(indefinite_op())


# ----------------------------------------------------------------------------------------------
# LiSSA
# ----------------------------------------------------------------------------------------------
def lissa_op():
    """Well conditioned (eigenvalues ≈ 0.3 … 1), n = 200 so that minibatches are noisy."""
    return make_op(n=200, p=12, l2=0.1, seed=2)


def test_lissa_automatic_scale_matches_the_exact_solution():
    op = lissa_op()
    V = rhs(12, 4, zero_cols=(3,))
    ref = ref_solve(op, V, 0.05)
    prepared = LiSSA(depth=400, batch_size=16).prepare(op, 0.05)
    info = prepared.info
    eig = np.linalg.eigvalsh(op.reference(0.05))
    assert info["scale_source"] == "auto"
    assert abs(info["lambda_max_estimate"] - eig[-1]) <= 0.05 * eig[-1]
    # Lanczos over all p = 12 dimensions: the smallest Ritz value is the smallest eigenvalue
    assert info["lambda_min_estimate"] == pytest.approx(eig[0], rel=1e-8)
    # minibatch Hessians are larger than H; the scale covers them, with the safety factor
    assert info["minibatch_lambda_max_estimate"] > info["lambda_max_estimate"]
    assert info["scale"] == pytest.approx(1.1 * info["minibatch_lambda_max_estimate"])
    res = prepared.solve(V)
    x = res.solution.numpy()
    assert np.corrcoef(x[:, :3].ravel(), ref[:, :3].ravel())[0, 1] >= 0.99
    assert rel_err(res.solution, ref) <= 0.1
    assert torch.all(res.solution[:, 3] == 0)
    assert res.iterations == 400 and res.info["repeats"] == 4
    assert res.spread.shape == (4,) and res.spread[3] == 0 and float(res.spread.max()) < 0.3
    np.testing.assert_allclose(
        res.residual.numpy(), true_residual(op, res.solution, V, 0.05), rtol=1e-6, atol=1e-15
    )
    assert res.max_residual <= 0.1 and bool(res.info["converged"].all())
    assert res.info["matvec_calls"] == 4 * 400 + 1 and op.calls["sample_matvec"] >= 1600
    assert "scale=" in repr(res) and "spread" in res.summary()


def test_lissa_full_batch_is_the_deterministic_neumann_series():
    op = lissa_op()
    V = rhs(12, 3)
    scale = float(np.linalg.eigvalsh(op.reference())[-1]) * 1.05
    res = LiSSA(depth=150, batch_size=None, scale=scale, repeats=3).prepare(op).solve(V)
    # (I − H/scale)^(depth+1) bounds the truncation error: λ_min/scale ≈ 0.3 → ~1e-22
    assert rel_err(res.solution, ref_solve(op, V)) <= 1e-12
    assert res.info["repeats"] == 1 and res.spread is None
    assert op.calls["sample_matvec"] == 0
    # batch_size ≥ n_train also uses the full Hessian
    assert LiSSA(batch_size=500, scale=scale).prepare(op).info["full_batch"]


NOISY = {"depth": 60, "batch_size": 4, "repeats": 2, "tol": 0.99}


def test_lissa_is_reproducible_and_columns_are_independent():
    op = lissa_op()
    V = rhs(12, 3)
    # tiny minibatches make the randomness visible; they also miss the default tol (residual
    # ≈ 0.26 here), which this test is not about
    solver = LiSSA(**NOISY, seed=7)
    a = solver.prepare(op).solve(V)
    b = solver.prepare(op).solve(V)
    prepared = solver.prepare(op)
    c1, c2 = prepared.solve(V), prepared.solve(V)
    assert torch.equal(a.solution, b.solution) and torch.equal(c1.solution, c2.solution)
    # each solve restarts the minibatch stream: a column's estimate does not depend on the others
    alone = prepared.solve(V[:, 1:2]).solution[:, 0]
    torch.testing.assert_close(alone, a.solution[:, 1], rtol=1e-10, atol=1e-12)
    other = LiSSA(**NOISY, seed=8).prepare(op).solve(V)
    assert not torch.allclose(other.solution, a.solution)
    unseeded = LiSSA(**NOISY, seed=None).prepare(op)
    assert not torch.equal(unseeded.solve(V).solution, unseeded.solve(V).solution)


def test_lissa_tail_averaging_reduces_the_noise():
    op = lissa_op()
    V = rhs(12, 4)
    ref = ref_solve(op, V)
    # batch 4 is very noisy: the classic estimate misses the default tol (tested elsewhere)
    classic = LiSSA(depth=300, batch_size=4, average_tail=0, repeats=2, tol=0.9)
    classic = classic.prepare(op).solve(V)
    averaged = LiSSA(depth=300, batch_size=4, repeats=2, tol=0.9).prepare(op).solve(V)
    assert rel_err(averaged.solution, ref) < 0.5 * rel_err(classic.solution, ref)
    assert float(averaged.spread.max()) < float(classic.spread.max())


def test_lissa_too_small_scale_raises_instead_of_returning_nan():
    op = lissa_op()
    lam_max = float(np.linalg.eigvalsh(op.reference())[-1])
    with pytest.raises(ConvergenceError, match="scale") as exc:
        LiSSA(scale=lam_max / 10, depth=1000, batch_size=8).prepare(op).solve(rhs(12, 3))
    assert "diverged" in str(exc.value) and "larger" in str(exc.value)
    assert op.calls["sample_matvec"] < 100  # caught early, long before overflowing
    # just above λ_max/2 every step still contracts (eigenvalues of I − H/scale in (−1, 1))
    res = LiSSA(scale=0.6 * lam_max, depth=200, batch_size=None).prepare(op).solve(rhs(12, 3))
    assert res.max_residual < 1e-6


def test_lissa_indefinite_hessian_raises_with_damping_advice():
    op = indefinite_op()
    lam_min = float(np.linalg.eigvalsh(op.reference())[0])
    # the Lanczos process in prepare finds the negative curvature (p = 10 ≤ power_iters: exactly)
    with pytest.raises(NotPositiveDefiniteError, match="Lanczos") as exc:
        LiSSA(depth=500, batch_size=8).prepare(op)
    damping = suggested_damping(str(exc.value))
    assert damping > -lam_min
    # negative definite
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        LiSSA().prepare(make_op(p=6, l2=-5.0))
    # damped as suggested, it works
    res = LiSSA(depth=300, batch_size=None).prepare(op, damping).solve(rhs(10, 2))
    assert rel_err(res.solution, ref_solve(op, rhs(10, 2), damping)) <= 1e-6


def test_lissa_float32():
    op = make_op(n=200, p=12, l2=0.1, seed=2, dtype=torch.float32)
    V = rhs(12, 2, dtype=torch.float32)
    res = LiSSA(depth=200, batch_size=None).prepare(op).solve(V)
    assert res.solution.dtype == torch.float32
    assert rel_err(res.solution, ref_solve(op, V)) <= 1e-4


def test_lissa_suggest_depth():
    for scale, lam, rtol in [(10.0, 0.1, 1e-2), (2.0, 1.0, 1e-3), (25.0, 1e-3, 0.1)]:
        d = LiSSA.suggest_depth(scale, lam, rtol)
        q = 1 - lam / scale
        assert q**d <= rtol < q ** (d - 1)
    assert LiSSA.suggest_depth(1.0, 2.0) == 1
    with pytest.raises(ValueError, match="lambda_min"):
        LiSSA.suggest_depth(1.0, 0.0)


# ----------------------------------------------------------------------------------------------
# configuration, selection by name, input checks, printing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls, kwargs, field, exc",
    [
        (CG, {"tol": 0}, "tol", ValueError),
        (CG, {"tol": 1.5}, "tol", ValueError),
        (CG, {"tol": "small"}, "tol", TypeError),
        (CG, {"max_iter": 0}, "max_iter", ValueError),
        (CG, {"max_iter": 2.5}, "max_iter", TypeError),
        (CG, {"raise_on_nonconvergence": 1}, "raise_on_nonconvergence", TypeError),
        (CG, {"check_every": 0}, "check_every", ValueError),
        (BlockCG, {"tol": 0.0}, "tol", ValueError),
        (BlockCG, {"rank_tol": 1.5}, "rank_tol", ValueError),
        (BlockCG, {"rank_tol": -1e-3}, "rank_tol", ValueError),
        (Exact, {"max_params": -1}, "max_params", ValueError),
        (Exact, {"factor_dtype": torch.int64}, "factor_dtype", ValueError),
        (Exact, {"compute_residual": "yes"}, "compute_residual", TypeError),
        (LiSSA, {"depth": 0}, "depth", ValueError),
        (LiSSA, {"scale": -1.0}, "scale", ValueError),
        (LiSSA, {"scale": float("nan")}, "scale", ValueError),
        (LiSSA, {"repeats": 0}, "repeats", ValueError),
        (LiSSA, {"batch_size": 0}, "batch_size", ValueError),
        (LiSSA, {"seed": -1}, "seed", ValueError),
        (LiSSA, {"seed": 1.5}, "seed", TypeError),
        (LiSSA, {"average_tail": 1.5}, "average_tail", ValueError),
        (LiSSA, {"safety": 0.4}, "safety", ValueError),
        (LiSSA, {"power_iters": 0}, "power_iters", ValueError),
        (LiSSA, {"probe_batches": -1}, "probe_batches", ValueError),
        (LiSSA, {"divergence_factor": 0.5}, "divergence_factor", ValueError),
        (LiSSA, {"tol": 0.0}, "tol", ValueError),
        (LiSSA, {"tol": 1.0}, "tol", ValueError),
        (LiSSA, {"raise_on_nonconvergence": "no"}, "raise_on_nonconvergence", TypeError),
    ],
)
def test_configuration_is_validated_naming_the_field(cls, kwargs, field, exc):
    with pytest.raises(exc, match=field):
        cls(**kwargs)


def test_configurations_are_immutable_values():
    cg = CG(tol=1e-6, max_iter=np.int64(50))
    assert cg.max_iter == 50 and type(cg.max_iter) is int
    assert cg == CG(tol=1e-6, max_iter=50) and hash(cg) == hash(CG(tol=1e-6, max_iter=50))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cg.tol = 1.0
    assert Exact(factor_dtype="float32").factor_dtype is torch.float32
    assert LiSSA(average_tail=0).average_tail == 0.0


def test_resolve_solver():
    assert isinstance(resolve_solver("exact"), Exact)
    assert isinstance(resolve_solver(" CG "), CG)
    assert isinstance(resolve_solver("LiSSA"), LiSSA)
    assert isinstance(resolve_solver("block_cg"), BlockCG)
    cg = CG(tol=1e-4)
    assert resolve_solver(cg) is cg
    assert resolve_solver(LiSSA) == LiSSA()
    with pytest.raises(ValueError, match="'exact', 'cg', 'block_cg', 'lissa'.*'newton'"):
        resolve_solver("newton")
    with pytest.raises(TypeError, match="solver must be"):
        resolve_solver(3)
    with pytest.raises(TypeError, match="solver must be"):
        resolve_solver(Solver)  # abstract
    assert all(isinstance(s, Solver) for s in (Exact(), CG(), LiSSA()))


@pytest.mark.parametrize("solver", [Exact(), CG(), LiSSA(depth=3)], ids=["exact", "cg", "lissa"])
def test_bad_inputs_name_the_argument(solver):
    op = make_op(p=4)
    with pytest.raises(ValueError, match="damping"):
        solver.prepare(op, -1.0)
    with pytest.raises(TypeError, match="op must be a Hessian operator"):
        solver.prepare(object())
    prepared = solver.prepare(op)
    assert isinstance(prepared, PreparedSolver) and "n_params=4" in repr(prepared)
    with pytest.raises(TypeError, match="V must be a torch.Tensor"):
        prepared.solve(np.ones((4, 1)))
    with pytest.raises(ValueError, match=r"V must have shape \(p, r\) = \(4, r\)"):
        prepared.solve(torch.ones(5, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"V must have shape"):
        prepared.solve(torch.ones(4, 2, 1, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating-point"):
        prepared.solve(torch.ones(4, 2, dtype=torch.int64))
    bad = torch.ones(4, 3, dtype=torch.float64)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"V contains NaN or infinity \(in column\(s\) \[1\]\)"):
        prepared.solve(bad)


def test_result_printing():
    op = make_op(p=6)
    res = CG(tol=1e-10).prepare(op, 0.1).solve(rhs(6, 3))
    text = repr(res)
    assert text.startswith("SolveResult(solver='cg', solution=(6, 3) float64 cpu, iterations=")
    assert "max_residual=" in text and "time_s=" in text
    summary = res.summary()
    assert "residual" in summary and "damping: 0.1" in summary and "converged" in summary


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU)
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@CUDA
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize(
    "solver",
    [Exact(), CG(tol=1e-12), LiSSA(depth=200, batch_size=None)],
    ids=["exact", "cg", "lissa"],
)
def test_cuda(solver, dtype, tol):
    op = make_op(n=200, p=12, l2=0.1, seed=2, dtype=dtype, device="cuda")
    V = rhs(12, 3, dtype=dtype, zero_cols=(1,), device="cuda")
    res = solver.prepare(op, 0.05).solve(V)
    assert res.solution.device.type == "cuda" and res.solution.dtype == dtype
    assert res.residual.device.type == "cuda"
    assert rel_err(res.solution, ref_solve(op, V, 0.05)) <= tol
    assert torch.all(res.solution[:, 1] == 0)
    with pytest.raises(ValueError, match="device"):
        solver.prepare(op).solve(V.cpu())


@pytest.mark.cuda
@CUDA
def test_cuda_lissa_minibatches_and_non_pd():
    op = make_op(n=200, p=12, l2=0.1, seed=2, device="cuda")
    V = rhs(12, 3, device="cuda")
    res = LiSSA(depth=300, batch_size=16).prepare(op).solve(V)
    assert rel_err(res.solution, ref_solve(op, V)) <= 0.1
    with pytest.raises(NotPositiveDefiniteError):
        Exact().prepare(make_op(n=80, p=10, l2=-0.35, seed=4, device="cuda"))
    with pytest.raises(NotPositiveDefiniteError):
        CG().prepare(make_op(n=80, p=10, l2=-0.35, seed=4, device="cuda")).solve(rhs(10, 2, device="cuda"))


def test_cholesky_solve_by_triangular_solves_matches_numpy():
    """The two-triangular-solve replacement of torch.cholesky_solve against numpy's dense solve of A x = b
    (A = L Lᵀ rebuilt independently), for one vector, a (p,) vector and several columns, float64 and float32."""
    from pyinfluence.torch.solvers.exact import cholesky_solve

    rng = np.random.default_rng(3)
    p = 40
    B = rng.standard_normal((p, p))
    A = B @ B.T + 0.5 * np.eye(p)
    L = torch.from_numpy(np.linalg.cholesky(A))
    for rhs in (rng.standard_normal(p), rng.standard_normal((p, 1)), rng.standard_normal((p, 7))):
        want = np.linalg.solve(A, rhs)
        got = cholesky_solve(L, torch.from_numpy(rhs))
        assert got.shape == rhs.shape
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
        got32 = cholesky_solve(L.float(), torch.from_numpy(rhs).float())
        np.testing.assert_allclose(got32.numpy(), want, rtol=2e-3, atol=2e-3)
