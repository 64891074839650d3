"""LiSSA fails loudly and every solver refuses an indefinite Hessian.

- An unconverged LiSSA solve (a scale 1000× λ_max, depth 3) raises ConvergenceError carrying its
  residual; ``raise_on_nonconvergence=False`` warns (ConvergenceWarning) and returns it.
- Negative curvature raises NotPositiveDefiniteError with a suggested damping, as Exact and CG do:
  on a trained ReLU MLP (damping 0) through TorchInfluence, and on explicit operators for each of
  LiSSA's three checks (Lanczos in ``prepare``, diverging iterates, the returned solution).
- With default settings LiSSA still solves a well-conditioned convex problem accurately.

References are independent of pyinfluence: the Hessian of the training objective by
``torch.func.hessian``, its eigenvalues and solves by numpy, test gradients by ``torch.func.grad``.
"""

from __future__ import annotations

import inspect
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian

from pyinfluence.errors import ConvergenceError, ConvergenceWarning, NotPositiveDefiniteError
from pyinfluence.torch.influence import TorchInfluence
from pyinfluence.torch.solvers import CG, BlockCG, Exact, LiSSA, Solver

from helpers import cross_entropy as ce

DT = torch.float64
# torch's own forward-mode decompositions call the deprecated torch.jit.script on first use
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]


def suggested_damping(message: str) -> float:
    m = re.search(r"damping=([0-9.eE+-]+) \(damping=", message)
    assert m, message
    return float(m.group(1))


# ----------------------------------------------------------------------------------------------
# independent references: R(θ) = mean cross-entropy + (l2/2)‖θ‖² with torch.func
# ----------------------------------------------------------------------------------------------
def _flat_objective(model: nn.Module, X, y, l2: float):
    """θ (p,) → R(θ), with θ in model.parameters() order (TorchInfluence's order)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def unflatten(theta):
        return {n: t.reshape(s) for n, t, s in zip(names, theta.split(sizes), shapes)}

    def loss(theta, Xb, yb):
        return ce(functional_call(model, unflatten(theta), (Xb,)), yb).mean()

    def R(theta):
        return loss(theta, X, y) + 0.5 * l2 * (theta**2).sum()

    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return theta, R, loss


def _reference(model: nn.Module, X, y, Xt, yt, l2: float) -> SimpleNamespace:
    theta, R, loss = _flat_objective(model, X, y, l2)
    H = hessian(R)(theta).numpy()
    H = 0.5 * (H + H.T)
    # test-loss gradients ∇θ L(z_test), one column each
    G = torch.stack([grad(loss)(theta, Xt[i : i + 1], yt[i : i + 1]) for i in range(len(Xt))], 1)
    return SimpleNamespace(H=H, eig=np.linalg.eigvalsh(H), G=G)


def _fit(model: nn.Module, X, y, l2: float, iters: int) -> None:
    ps = list(model.parameters())
    opt = torch.optim.LBFGS(
        ps,
        lr=1,
        max_iter=iters,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        R = ce(model(X), y).mean() + 0.5 * l2 * sum((p**2).sum() for p in ps)
        R.backward()
        return R

    opt.step(closure)
    model.eval()


def _residual(H: np.ndarray, damping: float, x: torch.Tensor, V: torch.Tensor) -> np.ndarray:
    A = H + damping * np.eye(H.shape[0])
    xn, vn = x.detach().double().numpy(), V.detach().double().numpy()
    return np.linalg.norm(A @ xn - vn, axis=0) / np.linalg.norm(vn, axis=0)


@pytest.fixture(scope="module")
def convex():
    """3-class logistic regression on 4 Gaussian features (p = 15, n = 200), l2 = 0.05:
    H + 0·I is positive definite, eigenvalues in [0.05, 0.4]."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 4, generator=g, dtype=DT)
    W = torch.randn(4, 3, generator=g, dtype=DT)
    y = (X @ W + 0.5 * torch.randn(200, 3, generator=g, dtype=DT)).argmax(1)
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    _fit(model, X, y, 0.05, 100)
    ref = _reference(model, X, y, X[:5], y[:5], 0.05)
    assert ref.eig[0] > 0.04 and ref.eig[-1] < 1.0
    inf = TorchInfluence(model, ce, (X, y), l2=0.05, damping=0.0, solver="exact")
    return SimpleNamespace(model=model, X=X, y=y, ref=ref, op=inf.operator)


@pytest.fixture(scope="module")
def relu_mlp():
    """A 64-12-10 ReLU MLP trained by L-BFGS on 300 digits (p = 910), l2 = 1e-3: a trained
    non-convex model whose Hessian has small negative eigenvalues (≈ −8e-4 beside λ_max ≈ 1)."""
    sk = pytest.importorskip("sklearn.datasets")
    Xa, ya = sk.load_digits(return_X_y=True)
    idx = np.random.default_rng(0).permutation(len(Xa))[:300]
    X, y = torch.tensor(Xa[idx] / 16.0), torch.tensor(ya[idx])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10)).to(DT)
    _fit(model, X, y, 1e-3, 200)
    ref = _reference(model, X, y, X[:4], y[:4], 1e-3)
    return SimpleNamespace(model=model, X=X, y=y, ref=ref)


def _mlp_influence(m, solver, damping=0.0) -> TorchInfluence:
    return TorchInfluence(m.model, ce, (m.X, m.y), l2=1e-3, damping=damping, solver=solver, optimum_tol=None)


# ----------------------------------------------------------------------------------------------
# unconverged solves
# ----------------------------------------------------------------------------------------------
def test_lissa_scale_far_above_lambda_max_raises_and_reports_the_residual(convex):
    ref, op = convex.ref, convex.op
    scale = 1000.0 * ref.eig[-1]
    V = ref.G
    solver = LiSSA(scale=scale, depth=300, batch_size=None)
    with pytest.raises(ConvergenceError, match=r"did not converge .* \(tol=0.2\)") as exc:
        solver.prepare(op).solve(V)
    assert "scale=None" in str(exc.value)  # names the cause: scale ≫ λ_max slows the recursion
    partial = exc.value.result
    # (1 − λ_min/scale)^300 ≈ 0.96: hardly any progress, and the residual says so
    expected = _residual(ref.H, 0.0, partial.solution, V)
    np.testing.assert_allclose(partial.residual.numpy(), expected, rtol=1e-8)
    assert expected.min() > 0.5 and not bool(partial.info["converged"].any())

    lax = LiSSA(scale=scale, depth=300, batch_size=None, raise_on_nonconvergence=False)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        res = lax.prepare(op).solve(V)
    assert isinstance(res.residual, torch.Tensor) and res.residual.shape == (V.shape[1],)
    np.testing.assert_allclose(res.residual.numpy(), _residual(ref.H, 0.0, res.solution, V), rtol=1e-8)
    assert res.max_residual > 0.5 and not bool(res.info["converged"].any())


def test_lissa_depth_3_raises(convex):
    ref = convex.ref
    # generic right-hand sides: their components along λ_min ≈ 0.05 shrink like
    # (1 − λ_min/scale)^depth ≈ 0.9^depth
    V = torch.randn(15, 3, generator=torch.Generator().manual_seed(3), dtype=DT)
    with pytest.raises(ConvergenceError, match="Increase depth") as exc:
        LiSSA(depth=3).prepare(convex.op).solve(V)
    partial = exc.value.result
    assert partial.iterations == 3 and partial.spread is not None
    expected = _residual(ref.H, 0.0, partial.solution, V)
    np.testing.assert_allclose(partial.residual.numpy(), expected, rtol=1e-8)
    assert expected.max() > 0.2


def test_lissa_default_settings_solve_a_convex_problem_accurately(convex):
    ref = convex.ref
    inf = TorchInfluence(convex.model, ce, (convex.X, convex.y), l2=0.05, solver=LiSSA())
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        s = inf.s_test(convex.X[:5], convex.y[:5])
    exact = np.linalg.solve(ref.H, ref.G.numpy())
    err = np.linalg.norm(s.numpy() - exact, axis=0) / np.linalg.norm(exact, axis=0)
    assert err.max() <= 0.05, err
    res = inf.last_solve
    np.testing.assert_allclose(res.residual.numpy(), _residual(ref.H, 0.0, s, ref.G), rtol=1e-6)
    assert res.max_residual <= 0.05 and bool(res.info["converged"].all())
    # the Lanczos estimates bracket nothing they should not: θ_min ≥ λ_min, θ_max ≤ λ_max
    assert ref.eig[0] - 1e-12 <= res.info["lambda_min_estimate"]
    assert res.info["lambda_max_estimate"] <= ref.eig[-1] + 1e-12


# ----------------------------------------------------------------------------------------------
# negative curvature
# ----------------------------------------------------------------------------------------------
def test_lissa_trained_relu_mlp_not_positive_definite(relu_mlp):
    lam_min = relu_mlp.ref.eig[0]
    assert lam_min < -1e-4  # independently: the trained model's Hessian is indefinite
    inf = _mlp_influence(relu_mlp, LiSSA())  # default settings, damping 0
    with pytest.raises(NotPositiveDefiniteError, match="Lanczos") as exc:
        inf.s_test(relu_mlp.X[:4], relu_mlp.y[:4])
    damping = suggested_damping(str(exc.value))
    assert damping > -lam_min
    # the suggestion works: H + damping·I is positive definite and LiSSA accepts it
    assert relu_mlp.ref.eig[0] + damping > 0
    LiSSA().prepare(inf.operator, damping)


def _solver_classes() -> list[type]:
    """Every concrete Solver subclass (recursively), public ones: the README's "every solver"."""
    seen: list[type] = []
    stack = list(Solver.__subclasses__())
    while stack:
        cls = stack.pop(0)
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return [c for c in seen if not inspect.isabstract(c) and not c.__name__.startswith("_")]


def test_every_solver_class_is_covered():
    assert {Exact, CG, BlockCG, LiSSA} <= set(_solver_classes())


@pytest.mark.parametrize("cls", _solver_classes(), ids=lambda c: c.__name__)
def test_every_solver_refuses_the_indefinite_hessian_with_a_damping(relu_mlp, cls):
    lam_min = relu_mlp.ref.eig[0]
    assert lam_min < -1e-4
    inf = _mlp_influence(relu_mlp, cls())
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite") as exc:
        inf.s_test(relu_mlp.X[:4], relu_mlp.y[:4])
    assert isinstance(exc.value, ValueError)
    # every solver estimates λ_min itself (Exact: eigvalsh; LiSSA: Lanczos in prepare; CG / block CG: a
    # Lanczos process once a search direction shows negative curvature), so the suggestion suffices
    assert suggested_damping(str(exc.value)) > -lam_min


class DiagonalHessian:
    """H = diag(d), an exact operator (its "minibatch" HVP is the full one): λ known."""

    def __init__(self, d):
        self.d = torch.as_tensor(d, dtype=DT)
        self.n_params, self.dtype, self.device, self.n_train = len(d), DT, torch.device("cpu"), 10
        self.calls = 0

    def matvec(self, V):
        self.calls += 1
        return self.d[:, None] * V

    def sample_matvec(self, V, batch_size, generator):
        return self.matvec(V)

    def dense(self):
        return torch.diag(self.d)


def test_lissa_diverging_iterates_with_negative_curvature_raise_not_positive_definite():
    # One Lanczos step (θ = qᵀHq > 0) does not see λ_min = −0.25; the recursion then grows like
    # (1 + 0.25/scale)^j along e₀ and the diverging iterate's Rayleigh quotient is negative.
    op = DiagonalHessian([-0.25] + list(np.linspace(0.3, 1.0, 9)))
    V = torch.ones(10, 2, dtype=DT)
    V[:, 1] = torch.linspace(1, 2, 10, dtype=DT)
    with pytest.raises(NotPositiveDefiniteError, match="diverged") as exc:
        LiSSA(power_iters=1, batch_size=None, depth=500).prepare(op).solve(V)
    assert suggested_damping(str(exc.value)) > 0.25


def test_lissa_returned_solution_with_negative_curvature_raises_not_positive_definite():
    # λ_min = −0.01 grows only like 1.01^j: no divergence within 300 steps, but the solution is
    # dominated by e₀, so xᵀHx < 0 — seen with the residual's own HVP.
    op = DiagonalHessian([-0.01] + [1.0] * 9)
    V = torch.ones(10, 1, dtype=DT)
    with pytest.raises(NotPositiveDefiniteError, match="returned solution") as exc:
        LiSSA(power_iters=1, batch_size=None, depth=300).prepare(op).solve(V)
    assert suggested_damping(str(exc.value)) > 0.01


def test_lissa_too_small_scale_on_a_positive_definite_hessian_stays_a_convergence_error():
    op = DiagonalHessian(np.linspace(0.3, 1.0, 10))
    with pytest.raises(ConvergenceError, match="diverged"):
        LiSSA(scale=0.1, batch_size=None, depth=200).prepare(op).solve(torch.ones(10, 1, dtype=DT))
