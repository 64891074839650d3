"""Arnoldi (pyinfluence.torch.solvers.arnoldi) against an independent reference.

The reference is computed here: H = ∇²R(θ̂) of R(θ) = (1/n) Σ L(z_i, θ) + (l2/2)‖θ‖² by
``torch.func.hessian`` of the mean loss plus the l2 term (no pyinfluence code), eigendecomposed with
``torch.linalg.eigh``; the solver's low-rank solution U diag(1/(σ + λ))Uᵀ V (+ (I − UUᵀ)V/(l2 + λ)) is
rebuilt from the test's own top-r eigenvectors (solutions and projectors are compared, never eigenvector
signs), and per-example gradients for up_loss come from plain autograd.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import pyinfluence
from pyinfluence import TorchInfluence
from pyinfluence.errors import (
    ConvergenceError,
    ConvergenceWarning,
    NonFiniteError,
    NotPositiveDefiniteError,
)
from pyinfluence.torch.solvers import Arnoldi, resolve_solver

from helpers import flat_parameters

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),  # torch.func
]

L2 = 1e-2
DAMPING = 1e-3
N = 80
F64 = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(scope="module")
def problem():
    """An 8-24-4 tanh MLP (float64, p = 316) fitted to 80 examples by full-batch L-BFGS on the mean
    cross-entropy + (l2/2)‖θ‖²; its H (the test's own, ``torch.func.hessian``) and eigh of it.

    Spectrum (measured): λ_max = 1.53, λ_min = 5.9e-4 (positive definite); λ_10 = 0.400, λ_11 = 0.337;
    λ_50 = 0.0698, λ_51 = 0.0677; without the l2 term λ_min = −9.4e-3 (indefinite)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 8, generator=g, dtype=F64)
    noise = 0.3 * torch.randn(N, generator=g, dtype=F64)
    y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + noise > 0.4).long() + (X[:, 2] > 0.5).long() + (X[:, 3] > 1.0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, history_size=50)

    def closure():
        opt.zero_grad()
        loss = ce(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    H = dense_hessian(model, X, y, L2)
    evals, evecs = torch.linalg.eigh(H)
    return model, X, y, H, evals, evecs


# ----------------------------------------------------------------------------------------------
# the independent reference
# ----------------------------------------------------------------------------------------------
def _flat(model):
    return flat_parameters(model)


def dense_hessian(model, X, y, l2):
    """∇²[(1/n) Σ L(z_i, θ) + (l2/2)‖θ‖²] at the model's weights, by torch.func.hessian."""
    theta, unflat = _flat(model)

    def R(t):
        return ce(functional_call(model, unflat(t), (X,)), y).mean() + 0.5 * l2 * (t * t).sum()

    return torch.func.hessian(R)(theta)


def per_example_grads(model, X, y):
    """(k, p) ∇θ L(z_i, θ̂), one autograd call per example."""
    theta, unflat = _flat(model)
    rows = []
    for i in range(X.shape[0]):
        t = theta.clone().requires_grad_(True)
        loss = ce(functional_call(model, unflat(t), (X[i : i + 1],)), y[i : i + 1]).sum()
        rows.append(torch.autograd.grad(loss, t)[0])
    return torch.stack(rows)


def top_by_magnitude(evals, evecs, r):
    idx = torch.argsort(evals.abs(), descending=True)[:r]
    return evals[idx], evecs[:, idx]


def low_rank_inverse(evals, evecs, r, damping, complement, l2=L2):
    """U diag(1/(λ + damping)) Uᵀ (+ (I − UUᵀ)/(l2 + damping)) from the test's own eigenpairs."""
    lam, U = top_by_magnitude(evals, evecs, r)
    M = U @ torch.diag(1.0 / (lam + damping)) @ U.T
    if complement == "damped":
        M = M + (torch.eye(U.shape[0], dtype=F64) - U @ U.T) / (l2 + damping)
    return M


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _max_residual(res) -> float:
    assert res.max_residual is not None
    return res.max_residual


def _rhs(p, r=4, seed=1):
    return torch.randn(p, r, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _influence(model, X, y, solver, l2=L2, damping=DAMPING, **kw):
    return TorchInfluence(model, ce, (X, y), l2=l2, damping=damping, solver=solver, **kw)


class DenseOp:
    """A Hessian operator over an explicit symmetric matrix (the protocol's members only, plus l2)."""

    def __init__(self, A, l2=0.0, with_l2=True):
        self.A = A
        self.n_params = A.shape[0]
        self.dtype = A.dtype
        self.device = A.device
        self.n_train = 10
        if with_l2:
            self.l2 = l2
        self.calls = 0

    def matvec(self, V):
        self.calls += 1
        return self.A @ V

    def sample_matvec(self, V, batch_size, generator):
        raise AssertionError("Arnoldi uses full-training-set HVPs only")

    def dense(self):
        raise AssertionError("Arnoldi never materialises H")


def _spd(evals, seed=0):
    p = evals.numel()
    Q, _ = torch.linalg.qr(torch.randn(p, p, generator=torch.Generator().manual_seed(seed), dtype=F64))
    A = Q @ torch.diag(evals) @ Q.T
    return 0.5 * (A + A.T)


# ----------------------------------------------------------------------------------------------
# the eigenpairs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("rank", "block_size", "steps"), [(10, 8, None), (10, 1, 30), (20, 4, 80)])
def test_ritz_values_are_top_eigenvalues(problem, rank, block_size, steps):
    """The kept Ritz values are the top-r eigenvalues of H by magnitude.

    Exact statements, whatever the Krylov steps: Cauchy interlacing (the i-th largest Ritz value of a
    Rayleigh–Ritz projection is ≤ λ_i), and Kato–Temple with the residuals ρ_i = ‖Hu_i − σ_iu_i‖ computed
    here from the test's H: |σ_i − λ_i| ≤ ρ_i² / δ_i, δ_i the distance from σ_i to the other eigenvalues.
    The tolerance 1e-8·λ_max: the Kaniel–Paige–Saad bounds decay like T_s(1 + 2·gap ratio)⁻² in the
    number s of (block) steps, and the spaces here (96 columns in 12 blocks of 8, the default for r = 10;
    3r in single steps; 4r in blocks of 4) are past the point where that is below rounding; measured
    error ≤ 4e-10 relative. With fewer steps it is not: 2r columns leave errors of 1e-2 to 3e-1.
    """
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    solver = Arnoldi(rank=rank, krylov_steps=steps, block_size=block_size, complement="project")
    prep = solver.prepare(op, DAMPING)
    sigma = prep.info["ritz_values"]
    lam, _ = top_by_magnitude(evals, evecs, rank)  # decreasing (H is positive definite)
    assert sigma.shape == (rank,) and sigma.dtype == F64
    assert torch.all(sigma[:-1].abs() >= sigma[1:].abs())  # by decreasing magnitude
    assert bool((sigma <= lam + 1e-12 * lam[0]).all())  # interlacing
    assert float((sigma - lam).abs().max()) < 1e-8 * float(lam[0])
    assert prep.info["ritz_range"] == (float(sigma.min()), float(sigma.max()))
    # span U from the solver's output: with complement="project", V = I gives U diag(1/(σ+λ))Uᵀ, whose
    # top-r eigenvectors span U; Rayleigh–Ritz of the test's H on that span gives the Ritz pairs
    M = prep.solve(torch.eye(op.n_params, dtype=F64)).solution
    U = torch.linalg.eigh(0.5 * (M + M.T)).eigenvectors[:, -rank:]
    theta, Y = torch.linalg.eigh(U.T @ H @ U)
    theta, Y = theta.flip(0), Y.flip(1)
    Ur = U @ Y
    rho = torch.linalg.vector_norm(H @ Ur - Ur * theta, dim=0)  # ‖Hu − θu‖, the test's own
    assert float((theta - sigma).abs().max()) < 1e-10 * float(lam[0])
    # Kato–Temple: |θ_i − λ_i| ≤ ρ_i² / δ_i, δ_i the distance from θ_i to the eigenvalues other than λ_i
    delta = torch.stack([(evals - t).abs().sort().values[1] for t in theta])
    assert bool(((theta - lam).abs() <= rho**2 / delta + 1e-13).all())
    # the reported Ritz residuals (from the Krylov relation) are the true ones, down to rounding
    floor = 1e-10 * float(lam[0])
    reported = prep.info["ritz_residuals"]
    assert float(reported.max()) <= max(10 * float(rho.max()), floor)
    assert float(rho.max()) <= max(10 * float(reported.max()), floor)


def test_too_few_steps_show_in_ritz_residuals(problem):
    """Krylov space of 2r = 24 columns (3 blocks of 8) for r = 10: the top eigenvalues are not yet
    resolved, and the reported Ritz residuals ‖Hu − σu‖ (from the Krylov relation, no HVP) equal the
    test's own, computed with its H on the solver's subspace — and bound the eigenvalue errors."""
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    prep = Arnoldi(rank=10, krylov_steps=20, complement="project").prepare(op, DAMPING)
    assert prep.info["krylov_steps"] == 24  # rounded up to whole blocks
    sigma = prep.info["ritz_values"]
    lam, _ = top_by_magnitude(evals, evecs, 10)
    assert float((sigma - lam).abs().max()) > 1e-4 * float(lam[0])
    M = prep.solve(torch.eye(op.n_params, dtype=F64)).solution
    U = torch.linalg.eigh(0.5 * (M + M.T)).eigenvectors[:, -10:]
    theta, Y = torch.linalg.eigh(U.T @ H @ U)
    order = torch.argsort(theta.abs(), descending=True)
    theta, Ur = theta[order], U @ Y[:, order]
    rho = torch.linalg.vector_norm(H @ Ur - Ur * theta, dim=0)
    assert torch.allclose(theta, sigma, rtol=1e-9, atol=0)
    assert torch.allclose(prep.info["ritz_residuals"], rho, rtol=1e-6, atol=1e-12)
    # Bauer–Fike for symmetric H: every Ritz value is within its residual of an eigenvalue
    dist = torch.stack([(evals - t).abs().min() for t in theta])
    assert bool((dist <= rho * (1 + 1e-9)).all())


def test_rank_p_ritz_values_are_the_spectrum(problem):
    """krylov_steps = rank = p: the Krylov space is ℝ^p and the Ritz values are all eigenvalues of H."""
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    p = op.n_params
    prep = Arnoldi(rank=p + 5).prepare(op, DAMPING)  # rank capped at p
    assert prep.info["rank"] == p and prep.info["krylov_steps"] == p
    sigma = prep.info["ritz_values"].sort().values
    assert float((sigma - evals).abs().max()) < 1e-10 * float(evals[-1])
    assert prep.info["trace_estimate"] == pytest.approx(float(evals.sum()), rel=1e-10)
    assert prep.info["trace_estimate_stderr"] == 0.0 and prep.info["trace_fraction"] == pytest.approx(1.0)


def test_trace_fraction(problem):
    """trace_fraction ≈ Σ top-r eigenvalues / tr(H) from the test's eigh, within 4 standard errors."""
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    info = Arnoldi(rank=10).prepare(op, DAMPING).info
    tr = float(torch.trace(H))
    se = info["trace_estimate_stderr"]
    assert se is not None and 0 < se < 0.05 * tr
    assert abs(info["trace_estimate"] - tr) <= 4 * se
    lam, _ = top_by_magnitude(evals, evecs, 10)
    assert info["trace_fraction"] == pytest.approx(float(lam.sum()) / info["trace_estimate"], rel=1e-8)
    assert info["trace_fraction"] == pytest.approx(float(lam.sum()) / tr, rel=0.1)


# ----------------------------------------------------------------------------------------------
# the solution
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("complement", ["damped", "project"])
@pytest.mark.parametrize("rank", [10, 50])
def test_solution_is_the_low_rank_formula(problem, complement, rank):
    """X = U diag(1/(σ + λ)) Uᵀ V (+ (I − UUᵀ)V/(l2 + λ)) with U, σ the test's own top-r eigenpairs.

    The error is that of the Ritz subspace: ‖sin Θ‖ ≤ ‖HU − U UᵀHU‖ / gap (Davis–Kahan), the gap
    λ_r − λ_{r+1} being 0.063 (r = 10) and 0.0021 (r = 50); measured agreement ≤ 1e-9."""
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    V = _rhs(op.n_params)
    res = Arnoldi(rank=rank, complement=complement).prepare(op, DAMPING).solve(V)
    M = low_rank_inverse(evals, evecs, rank, DAMPING, complement)
    assert res.solver == "arnoldi" and res.iterations is None
    assert res.solution.shape == V.shape and res.solution.dtype == V.dtype
    assert rel_err(res.solution, M @ V) < 1e-7
    # the projector onto span U: complement="project" on V = I gives U diag(1/(σ+λ))Uᵀ, whose range is
    # span U; compare UUᵀ with the test's (basis- and sign-free)
    if complement == "project":
        S = (
            Arnoldi(rank=rank, complement="project")
            .prepare(op, DAMPING)
            .solve(torch.eye(op.n_params, dtype=F64))
        )
        _, Uref = top_by_magnitude(evals, evecs, rank)
        w, Z = torch.linalg.eigh(0.5 * (S.solution + S.solution.T))
        Us = Z[:, -rank:]
        assert float(torch.linalg.norm(Us @ Us.T - Uref @ Uref.T)) < 1e-7
    # a 1-D right-hand side gives the same column
    one = Arnoldi(rank=rank, complement=complement).prepare(op, DAMPING).solve(V[:, 0])
    assert one.solution.shape == (op.n_params,)
    assert rel_err(one.solution, M @ V[:, 0]) < 1e-7


@pytest.mark.parametrize("complement", ["damped", "project"])
def test_rank_p_is_the_exact_solve(problem, complement):
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    p = op.n_params
    V = _rhs(p)
    res = Arnoldi(rank=p, complement=complement).prepare(op, DAMPING).solve(V)
    ref = torch.linalg.solve(H + DAMPING * torch.eye(p, dtype=F64), V)
    assert rel_err(res.solution, ref) < 1e-8
    assert _max_residual(res) < 1e-8


def test_residual_is_true_residual(problem):
    model, X, y, H, evals, evecs = problem
    op = _influence(model, X, y, "exact").operator
    V = _rhs(op.n_params)
    V[:, 2] = 0  # a zero column: zero solution, residual 0
    prep = Arnoldi(rank=10).prepare(op, DAMPING)
    res = prep.solve(V)
    A = H + DAMPING * torch.eye(op.n_params, dtype=F64)
    R = A @ res.solution - V
    vn = torch.linalg.vector_norm(V, dim=0)
    expect = torch.where(vn > 0, torch.linalg.vector_norm(R, dim=0) / torch.where(vn > 0, vn, 1), 0)
    assert res.residual is not None
    assert torch.allclose(res.residual, expect, rtol=1e-9, atol=1e-14)
    assert float(res.residual[2]) == 0 and bool((res.solution[:, 2] == 0).all())
    assert _max_residual(res) > 1e-2  # a rank-10 approximation: reported, not small
    assert res.info["matvec_calls"] == 1 and res.info["matvec_columns"] == 3
    assert res.info["ritz_range"] == prep.info["ritz_range"] and res.info["rank"] == 10
    # prepare's cost: default m = max(4·10, 12·8) = 96 columns in 12 calls of 8, plus 8 trace probes
    assert prep.info["krylov_steps"] == 96
    assert prep.info["matvec_calls"] == 13 and prep.info["matvec_columns"] == 104


def test_repeated_eigenvalues_are_found():
    """A spectrum with a 12-fold eigenvalue (more than the block size): the Krylov space becomes invariant
    and is refilled with random directions, so every copy is found and rank = p solves exactly."""
    ev = torch.cat([torch.linspace(5.0, 1.0, 8, dtype=F64), torch.full((12,), 0.5, dtype=F64)])
    A = _spd(ev)
    op = DenseOp(A, l2=0.0)
    prep = Arnoldi(rank=20, block_size=4).prepare(op, 0.0)
    assert prep.info["deflations"] > 0
    assert op.calls == prep.info["matvec_calls"] == 5  # 20 = p columns in blocks of 4; no trace probes
    assert torch.allclose(prep.info["ritz_values"].sort().values, ev.sort().values, atol=1e-12)
    V = _rhs(20, r=3)
    assert rel_err(prep.solve(V).solution, torch.linalg.solve(A, V)) < 1e-11
    # rank 14: the top 8 and 6 of the 12 copies; U must span an invariant subspace with exact Ritz values,
    # so that for V = I, A X = A U diag(1/σ) Uᵀ = UUᵀ: a rank-14 orthogonal projector containing the top 8
    prep14 = Arnoldi(rank=14, block_size=4, complement="project").prepare(op, 0.0)
    assert torch.allclose(prep14.info["ritz_values"], ev[:14], atol=1e-12)
    P = A @ prep14.solve(torch.eye(20, dtype=F64)).solution
    assert torch.allclose(P, P.T, atol=1e-11) and torch.allclose(P @ P, P, atol=1e-11)
    assert float(torch.trace(P)) == pytest.approx(14.0, abs=1e-10)
    w, E = torch.linalg.eigh(A)
    E8 = E[:, -8:]
    assert torch.allclose(E8.T @ P @ E8, torch.eye(8, dtype=F64), atol=1e-10)


def test_float32_operator(problem):
    """A float32 model: the Krylov basis and the small eigenproblem are float64, the HVPs float32; the
    solution agrees with the float64 formula to float32 accuracy."""
    model, X, y, H, evals, evecs = problem
    inf32 = TorchInfluence(
        copy.deepcopy(model).float(),
        ce,
        (X.float(), y),
        l2=L2,
        damping=DAMPING,
        solver="exact",
        optimum_tol=None,
    )
    op = inf32.operator
    assert op.dtype == torch.float32
    V = _rhs(op.n_params).float()
    res = Arnoldi(rank=10).prepare(op, DAMPING).solve(V)
    assert res.solution.dtype == torch.float32
    M = low_rank_inverse(evals, evecs, 10, DAMPING, "damped")
    assert rel_err(res.solution.double(), M @ V.double()) < 1e-4


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "exc", "field"),
    [
        ({"rank": 0}, ValueError, "rank"),
        ({"rank": 2.5}, TypeError, "rank"),
        ({"rank": True}, TypeError, "rank"),
        ({"rank": 10, "krylov_steps": 5}, ValueError, "krylov_steps"),
        ({"krylov_steps": 0}, ValueError, "krylov_steps"),
        ({"block_size": 0}, ValueError, "block_size"),
        ({"complement": "none"}, ValueError, "complement"),
        ({"complement": 1}, ValueError, "complement"),
        ({"tol": 0}, ValueError, "tol"),
        ({"tol": float("nan")}, ValueError, "tol"),
        ({"raise_on_nonconvergence": "yes"}, TypeError, "raise_on_nonconvergence"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_parameters_named(kwargs, exc, field):
    with pytest.raises(exc, match=field):
        Arnoldi(**kwargs)


def test_options_normalised_and_names():
    a = Arnoldi(complement=" Project ", rank=3)
    assert a.complement == "project" and a.krylov_steps is None
    with pytest.raises(Exception):  # frozen
        a.rank = 4  # type: ignore[misc]
    assert isinstance(resolve_solver("arnoldi"), Arnoldi) and isinstance(resolve_solver("ARNOLDI"), Arnoldi)
    assert pyinfluence.Arnoldi is Arnoldi and "Arnoldi" in pyinfluence.__all__
    assert "Arnoldi" in pyinfluence.torch.solvers.__all__
    with pytest.raises(ValueError, match="'arnoldi'"):
        resolve_solver("arnold")


def test_indefinite_hessian_suggests_damping(problem):
    """Without the l2 term the loss Hessian at these weights is indefinite (λ_min = −9.4e-3, from the
    test's eigh): NotPositiveDefiniteError, a suggested damping above −λ_min, which then works."""
    model, X, y, H, evals, evecs = problem
    need = -float(torch.linalg.eigvalsh(H - L2 * torch.eye(H.shape[0], dtype=F64))[0])
    assert need > 0
    inf = _influence(model, X, y, "exact", l2=0.0, damping=0.0, optimum_tol=None)
    with pytest.raises(NotPositiveDefiniteError, match="damping=") as exc:
        Arnoldi(rank=10, complement="project").prepare(inf.operator, 0.0)
    suggested = exc.value.suggested_damping
    assert suggested is not None and suggested > need
    prep = Arnoldi(rank=10, complement="project").prepare(inf.operator, suggested)
    assert math.isfinite(_max_residual(prep.solve(_rhs(inf.n_params))))


def test_negative_curvature_of_a_solution_column():
    """A negative eigenvalue (−0.05) that a one-block Krylov space misses: every Ritz value is positive,
    but the solution of V = its eigenvector lies in the complement, where xᵀ(H + λI)x < 0 — the solve
    raises NotPositiveDefiniteError, and its suggested damping exceeds 0.05 (known: the test's matrix)."""
    ev = torch.cat([torch.linspace(10.0, 2.0, 19, dtype=F64), torch.tensor([-0.05], dtype=F64)])
    A = _spd(ev, seed=3)
    op = DenseOp(A, l2=0.1)  # an operator whose l2 floor is not honoured (a non-convex loss)
    prep = Arnoldi(rank=3, krylov_steps=4, block_size=4).prepare(op, 0.0)
    assert prep.info["smallest_ritz_value"] > 0  # the Krylov space did not see it
    v = torch.linalg.eigh(A).eigenvectors[:, :1]  # the eigenvector of −0.05
    with pytest.raises(NotPositiveDefiniteError, match="solution column") as exc:
        prep.solve(torch.cat([v, _rhs(20, r=1)], dim=1))
    s = exc.value.suggested_damping
    assert s is not None and s > 0.05
    assert float(torch.linalg.eigvalsh(A + s * torch.eye(20, dtype=F64))[0]) > 0


def test_damped_complement_needs_positive_floor():
    """complement="damped" with l2 + λ ≤ 0 and rank < p: the complement's curvature would be ≤ 0."""
    A = _spd(torch.linspace(3.0, 0.1, 20, dtype=F64))
    with pytest.raises(NotPositiveDefiniteError, match="complement='project'") as exc:
        Arnoldi(rank=5).prepare(DenseOp(A, l2=0.0), 0.0)
    s = exc.value.suggested_damping
    assert s is not None and s > 0
    Arnoldi(rank=5).prepare(DenseOp(A, l2=0.0), s)  # the suggestion works
    Arnoldi(rank=5, complement="project").prepare(DenseOp(A, l2=0.0), 0.0)  # no complement: fine
    Arnoldi(rank=20).prepare(DenseOp(A, l2=0.0), 0.0)  # rank = p: no complement either
    with pytest.raises(TypeError, match="l2"):  # an operator without l2
        Arnoldi(rank=5).prepare(DenseOp(A, with_l2=False), 0.1)
    Arnoldi(rank=5, complement="project").prepare(DenseOp(A, with_l2=False), 0.0)


def test_non_finite_hvp_raises():
    class NaNOp(DenseOp):
        def matvec(self, V):
            out = self.A @ V
            out[0] = float("nan")
            return out

    with pytest.raises(NonFiniteError, match="NaN or infinity"):
        Arnoldi(rank=3).prepare(NaNOp(torch.eye(10, dtype=F64), l2=0.1), 0.0)


def test_bad_operator_and_damping():
    with pytest.raises(TypeError, match="matvec"):
        Arnoldi().prepare(object(), 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="damping"):
        Arnoldi().prepare(DenseOp(torch.eye(4, dtype=F64), l2=1.0), -1.0)
    prep = Arnoldi(rank=2).prepare(DenseOp(torch.eye(4, dtype=F64), l2=1.0), 0.0)
    with pytest.raises(ValueError, match="V must have shape"):
        prep.solve(torch.ones(5, dtype=F64))


def test_tol_raises_or_warns(problem):
    model, X, y, *_ = problem
    op = _influence(model, X, y, "exact").operator
    V = _rhs(op.n_params, r=3)
    measured = Arnoldi(rank=10).prepare(op, DAMPING).solve(V)
    tol = 0.5 * _max_residual(measured)
    with pytest.raises(ConvergenceError, match="Arnoldi") as exc:
        Arnoldi(rank=10, tol=tol).prepare(op, DAMPING).solve(V)
    assert torch.equal(exc.value.result.solution, measured.solution)
    with pytest.warns(ConvergenceWarning):
        out = Arnoldi(rank=10, tol=tol, raise_on_nonconvergence=False).prepare(op, DAMPING).solve(V)
    assert not bool(out.info["converged"].all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = Arnoldi(rank=10, tol=2 * _max_residual(measured)).prepare(op, DAMPING).solve(V)
    assert bool(ok.info["converged"].all())


# ----------------------------------------------------------------------------------------------
# end to end
# ----------------------------------------------------------------------------------------------
def test_up_loss_end_to_end(problem):
    """TorchInfluence(..., solver="arnoldi") (defaults: rank 50, complement="damped"):
    up_loss = −G_train M G_testᵀ with M the low-rank inverse from the test's eigenpairs and the
    gradients from plain autograd."""
    model, X, y, H, evals, evecs = problem
    Xt, yt = X[:6] + 0.1, y[:6]
    inf = _influence(model, X, y, "arnoldi")
    assert isinstance(inf.solver, Arnoldi)
    got = inf.up_loss(Xt, yt)
    M = low_rank_inverse(evals, evecs, 50, DAMPING, "damped")
    ref = -per_example_grads(model, X, y) @ M @ per_example_grads(model, Xt, yt).T
    assert got.shape == (N, 6)
    assert rel_err(got, ref) < 1e-7


@pytest.mark.cuda
def test_cuda_matches_cpu(problem):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, X, y, H, evals, evecs = problem
    V = _rhs(H.shape[0])
    M = low_rank_inverse(evals, evecs, 10, DAMPING, "damped")
    for dtype, tol in ((F64, 1e-7), (torch.float32, 1e-4)):
        inf = TorchInfluence(
            copy.deepcopy(model).to(dtype),
            ce,
            (X.to(dtype), y),
            l2=L2,
            damping=DAMPING,
            solver="exact",
            device="cuda",
            optimum_tol=None,
        )
        res = Arnoldi(rank=10).prepare(inf.operator, DAMPING).solve(V.to("cuda", dtype))
        assert res.solution.device.type == "cuda" and res.solution.dtype == dtype
        assert rel_err(res.solution.double().cpu(), M @ V) < tol
