"""K-FAC / EK-FAC as preconditioners of CG, BlockCG and LiSSA (``preconditioner=``) against independent
references computed here.

The references use only torch linear algebra on dense matrices: H from ``torch.func.hessian`` of the
training objective (no pyinfluence code), A = H + λI, and — where the algorithm's output depends on M
itself — the dense preconditioner M obtained by applying the prepared preconditioner to the identity (M is
an input of the algorithms under test; its own correctness is tested in tests/test_kfac.py). Checked:

- the converged solutions against ``torch.linalg.solve(A, V)``, and the reported residuals against
  ‖A x − v‖ / ‖v‖ with the dense A;
- the iterates after k iterations against the defining property of (block) preconditioned CG: x_k is the
  A-norm-optimal (Galerkin) solution over the Krylov space K_k(MA, M v) (CG: of each column; BlockCG: the
  block Krylov space of all columns), built here by explicit orthonormalisation and a small solve;
- preconditioned LiSSA with the full Hessian against the truncated preconditioned Neumann series
  Σ_i (I − MA/s)^i M v / s, and with minibatches against the dense solution;
- ``preconditioner=None`` against textbook CG written here, the Krylov-Galerkin solution, and the plain
  Neumann series (today's numbers);
- the HVP accounting against a counting wrapper of the operator, validation messages naming the field,
  and NotPositiveDefiniteError with a suggested damping checked against the dense spectrum.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pyinfluence import TorchInfluence
from pyinfluence.errors import ConvergenceWarning, NotPositiveDefiniteError
from pyinfluence.torch.solvers import CG, EKFAC, KFAC, BlockCG, Exact, LiSSA

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L2 = 1e-2
DAMPING = 1e-3
N = 60
DT = torch.float64
PRECONDITIONERS = ["ekfac", "kfac", EKFAC(fisher="empirical", lanczos_steps=0)]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def sse(out, t):
    return ((out - t) ** 2).sum(1)


def _mlp(out: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, out)).double()


def dense_hessian(model, X, y, loss, l2=L2):
    """∇²R(θ̂) of R(θ) = mean loss + (l2/2)‖θ‖² over all parameters (model order), by torch.func.hessian."""
    named = [(n, p.detach()) for n, p in model.named_parameters()]
    theta = torch.cat([p.reshape(-1) for _, p in named])

    def R(t):
        ps, o = {}, 0
        for n, p in named:
            ps[n] = t[o : o + p.numel()].reshape(p.shape)
            o += p.numel()
        return loss(functional_call(model, ps, (X,)), y).mean() + 0.5 * l2 * (t * t).sum()

    H = torch.func.hessian(R)(theta)
    return 0.5 * (H + H.T)


class Problem:
    """The trained 6-8-5-3 tanh MLP of tests/test_kfac.py (float64, 60 examples, L-BFGS to a tight optimum)
    with its operator, dense H + λI and a block of right-hand sides."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        X = torch.randn(N, 6, generator=g, dtype=DT)
        noise = 0.3 * torch.randn(N, generator=g, dtype=DT)
        y = (X[:, 0] + 0.5 * X[:, 1] ** 2 + noise > 0.4).long() + (X[:, 2] > 0.8).long()
        torch.manual_seed(0)
        model = _mlp()
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, history_size=50)

        def closure():
            opt.zero_grad()
            loss = ce(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
            loss.backward()
            return loss

        for _ in range(3):
            opt.step(closure)
        self.model, self.X, self.y = model, X, y
        self.inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver="cg", optimum_tol=None)
        self.op = self.inf.operator
        self.p = self.op.n_params
        self.H = dense_hessian(model, X, y, ce)
        self.A = self.H + DAMPING * torch.eye(self.p, dtype=DT)
        self.V = torch.randn(self.p, 3, generator=torch.Generator().manual_seed(1), dtype=DT)
        self.X_ref = torch.linalg.solve(self.A, self.V)


@pytest.fixture(scope="module")
def prob():
    return Problem()


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def dense_residual(A, X, V):
    return torch.linalg.vector_norm(A @ X - V, dim=0) / torch.linalg.vector_norm(V, dim=0)


def dense_preconditioner(prepared):
    """The (p, p) matrices M and M^{1/2} of a prepared solver's preconditioner (applied to the identity)."""
    pre = prepared._pre
    eye = torch.eye(prepared.n_params, dtype=DT)
    M, S = pre.apply(eye), pre.sqrt(eye)
    return 0.5 * (M + M.T), 0.5 * (S + S.T)


def krylov_galerkin(A, M, V, k, block):
    """The A-norm-optimal X over the Krylov space K_k(MA, MV): of each column separately (block=False,
    preconditioned CG) or of the span of all columns' spaces (block=True, preconditioned block CG).
    Orthonormal basis B by Gram-Schmidt (twice), then X = B (BᵀAB)⁻¹ BᵀV."""

    def basis(W):
        vecs: list[torch.Tensor] = []
        Z = M @ W
        for _ in range(k):
            for j in range(Z.shape[1]):
                z = Z[:, j].clone()
                for _ in range(2):
                    for b in vecs:
                        z -= (b @ z) * b
                vecs.append(z / torch.linalg.vector_norm(z))
            Z = M @ (A @ Z)
        return torch.stack(vecs, 1)

    if block:
        B = basis(V)
        return B @ torch.linalg.solve(B.T @ A @ B, B.T @ V)
    cols = []
    for j in range(V.shape[1]):
        B = basis(V[:, j : j + 1])
        cols.append(B @ torch.linalg.solve(B.T @ A @ B, B.T @ V[:, j]))
    return torch.stack(cols, 1)


class CountingOperator:
    """Wraps a HessianOperator's matvec (instance attribute) and counts the columns it multiplies."""

    def __init__(self, op) -> None:
        self.columns = 0
        inner = op.matvec

        def matvec(V):
            self.columns += V.shape[1]
            return inner(V)

        op.matvec = matvec
        self.op = op

    def restore(self) -> None:
        del self.op.matvec


def suggested_damping(message: str) -> float:
    m = re.search(r"damping=([0-9.eE+-]+)", message)
    assert m, message
    return float(m.group(1))


# ----------------------------------------------------------------------------------------------
# converged solutions: the dense solve
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pc", PRECONDITIONERS, ids=["ekfac", "kfac", "EKFAC-empirical"])
@pytest.mark.parametrize("cls", [CG, BlockCG])
def test_preconditioned_solution_matches_the_dense_solve(prob, cls, pc):
    prepared = cls(tol=1e-12, preconditioner=pc).prepare(prob.op, DAMPING)
    res = prepared.solve(prob.V)
    assert res.solution.shape == prob.V.shape and res.solution.dtype == DT
    assert rel_err(res.solution, prob.X_ref) < 1e-9
    # the reported residual is the true one of the returned solution
    true = dense_residual(prob.A, res.solution, prob.V)
    assert res.residual is not None
    assert torch.allclose(res.residual, true, rtol=1e-6, atol=1e-14)  # rounding: ≈ ε·cond(A)
    assert float(res.residual.max()) <= 1e-11
    assert bool(res.info["converged"].all())
    name = pc if isinstance(pc, str) else pc.name
    assert res.info["preconditioner"] == name == prepared.info["preconditioner"]
    assert prepared.info["preconditioner_data_passes"] == (1 if name == "kfac" else 2)
    assert prepared.info["preconditioner_prepare_time_s"] > 0
    assert prepared.prepare_time_s >= prepared.info["preconditioner_prepare_time_s"]
    # a 1-D right-hand side gives the same column
    one = prepared.solve(prob.V[:, 1])
    assert rel_err(one.solution, prob.X_ref[:, 1]) < 1e-9


@pytest.mark.parametrize("cls", [CG, BlockCG])
def test_float32_operator(prob, cls):
    """A float32 copy of the model: the preconditioner (float64 inside) returns float32; the solve reaches a
    float32 tolerance and agrees with the dense float64 solve."""
    damping = 0.1
    model32 = copy.deepcopy(prob.model).float()
    inf = TorchInfluence(
        model32, ce, (prob.X.float(), prob.y), l2=L2, damping=damping, solver="cg", optimum_tol=None
    )
    res = cls(tol=1e-5, preconditioner="ekfac").prepare(inf.operator, damping).solve(prob.V.float())
    assert res.solution.dtype == torch.float32
    ref = torch.linalg.solve(prob.H + damping * torch.eye(prob.p, dtype=DT), prob.V)
    assert rel_err(res.solution.double(), ref) < 1e-4


def test_up_loss_through_torch_influence(prob):
    """End to end: TorchInfluence with BlockCG(preconditioner="ekfac") gives up_loss = −∇L(z_test)ᵀ
    (H + λI)⁻¹ ∇L(z), with the per-example gradients from plain autograd, one example at a time."""
    model, X, y = prob.model, prob.X, prob.y
    params = [q for q in model.parameters()]

    def grads(Xs, ys):
        rows = []
        for i in range(Xs.shape[0]):
            g = torch.autograd.grad(ce(model(Xs[i : i + 1]), ys[i : i + 1]).sum(), params)
            rows.append(torch.cat([t.reshape(-1) for t in g]))
        return torch.stack(rows)

    Xt, yt = X[:3] + 0.1, y[:3]
    ref = -grads(X, y) @ torch.linalg.solve(prob.A, grads(Xt, yt).T)  # (n, m)
    solver = BlockCG(tol=1e-10, preconditioner="ekfac")
    inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMPING, solver=solver, optimum_tol=None)
    assert rel_err(inf.up_loss(Xt, yt), ref) < 1e-8


# ----------------------------------------------------------------------------------------------
# the iterates: Galerkin solutions over the preconditioned Krylov spaces
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block", [False, True], ids=["CG", "BlockCG"])
@pytest.mark.parametrize("pc", ["ekfac", None])
def test_iterates_are_the_krylov_galerkin_solutions(prob, block, pc):
    """After k iterations (every column still far from tol), x_k = argmin ‖x − x*‖_A over K_k(MA, Mv) —
    of the column (CG) or of all columns together (block CG); M = I without a preconditioner."""
    k = 4
    cls = BlockCG if block else CG
    prepared = cls(tol=1e-14, max_iter=k, raise_on_nonconvergence=False, preconditioner=pc).prepare(
        prob.op, DAMPING
    )
    with pytest.warns(ConvergenceWarning):
        res = prepared.solve(prob.V)
    assert res.iterations == k
    M = dense_preconditioner(prepared)[0] if pc else torch.eye(prob.p, dtype=DT)
    ref = krylov_galerkin(prob.A, M, prob.V, k, block)
    assert rel_err(res.solution, ref) < 1e-8
    if pc:  # the preconditioner changes the iterates: not those of the plain Krylov space
        plain = krylov_galerkin(prob.A, torch.eye(prob.p, dtype=DT), prob.V, k, block)
        assert rel_err(res.solution, plain) > 1e-3


def test_no_preconditioner_is_textbook_cg(prob):
    """preconditioner=None: today's CG — the iterates of Hestenes–Stiefel CG written here on the same
    operator (per column, to rounding) and the same iteration count to tol."""
    V = prob.V

    def textbook(tol, max_iter):
        out, its = [], []
        for j in range(V.shape[1]):
            v = V[:, j : j + 1]
            x = torch.zeros_like(v)
            r = v.clone()
            p = r.clone()
            rr = float((r * r).sum())
            k = 0
            while k < max_iter and rr > (tol * float(torch.linalg.vector_norm(v))) ** 2:
                Ap = prob.op.matvec(p) + DAMPING * p
                a = rr / float((p * Ap).sum())
                x += a * p
                r -= a * Ap
                rr_new = float((r * r).sum())
                p = r + (rr_new / rr) * p
                rr = rr_new
                k += 1
            out.append(x)
            its.append(k)
        return torch.cat(out, 1), its

    ref, its = textbook(1e-6, 1000)
    res = CG(tol=1e-6, preconditioner=None).prepare(prob.op, DAMPING).solve(V)
    assert res.info["iterations_per_column"].tolist() == its
    # after ~90 iterations on cond(A) ≈ 3e3 the two recursions' rounding differs (measured: 2e-8)
    assert rel_err(res.solution, ref) < 1e-6
    assert "preconditioner" not in res.info
    ref5, _ = textbook(1e-14, 5)
    with pytest.warns(ConvergenceWarning):
        res5 = CG(tol=1e-14, max_iter=5, raise_on_nonconvergence=False).prepare(prob.op, DAMPING).solve(V)
    assert rel_err(res5.solution, ref5) < 1e-12


# ----------------------------------------------------------------------------------------------
# cost
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CG, BlockCG])
def test_ekfac_preconditioning_does_not_increase_the_iterations(prob, cls):
    """On this model (damping 1e-3, where H + λI has condition number ≈ 1e3), EK-FAC needs fewer
    iterations (measured: CG 130 → 111, block CG 42 → 35 at tol 1e-10; the same on two other seeds)."""
    plain = cls(tol=1e-10).prepare(prob.op, DAMPING).solve(prob.V)
    pre = cls(tol=1e-10, preconditioner="ekfac").prepare(prob.op, DAMPING).solve(prob.V)
    assert bool(plain.info["converged"].all()) and bool(pre.info["converged"].all())
    assert pre.iterations <= plain.iterations
    assert pre.info["matvec_columns"] <= plain.info["matvec_columns"]


@pytest.mark.parametrize("cls", [CG, BlockCG])
def test_hvp_and_preconditioner_accounting(prob, cls):
    """matvec_columns counts exactly the HVP columns the solve asked of the operator (iterations and the
    final residual), none of the preconditioner's work; the preparation's HVPs (a configured EKFAC with
    a Lanczos check) are reported in prepared.info."""
    counter = CountingOperator(prob.op)
    try:
        prepared = cls(tol=1e-8, preconditioner=EKFAC(lanczos_steps=5)).prepare(prob.op, DAMPING)
        assert prepared.info["preconditioner_matvec_columns"] == counter.columns == 5
        counter.columns = 0
        res = prepared.solve(prob.V)
        assert res.info["matvec_columns"] == counter.columns
        assert res.info["preconditioner_columns"] > 0
        if cls is CG:  # one M application per active column and iteration, plus M r₀
            per_col = res.info["iterations_per_column"]
            assert res.info["preconditioner_columns"] == int(per_col.sum()) + prob.V.shape[1]
            assert res.info["matvec_columns"] == int(per_col.sum()) + prob.V.shape[1]
        counter.columns = 0
        prepared = cls(preconditioner="ekfac").prepare(prob.op, DAMPING)
        assert prepared.info["preconditioner_matvec_columns"] == counter.columns == 0
    finally:
        counter.restore()


# ----------------------------------------------------------------------------------------------
# LiSSA
# ----------------------------------------------------------------------------------------------
def test_preconditioned_lissa_full_batch_is_the_preconditioned_neumann_series(prob):
    """batch_size=None: deterministic preconditioned Richardson; h_depth / s equals
    Σ_{i=0}^{depth} (I − MA/s)^i M v / s computed densely, and the scale is safety × λ_max(M^{1/2}AM^{1/2})
    within the Lanczos accuracy."""
    depth = 40
    prepared = LiSSA(
        depth=depth, batch_size=None, preconditioner="ekfac", raise_on_nonconvergence=False
    ).prepare(prob.op, DAMPING)
    M, S = dense_preconditioner(prepared)
    eig = torch.linalg.eigvalsh(S @ prob.A @ S)
    info = prepared.info
    assert info["preconditioned_lambda_max_estimate"] <= float(eig[-1]) * (1 + 1e-10)
    assert info["preconditioned_lambda_max_estimate"] >= 0.95 * float(eig[-1])
    assert info["preconditioned_lambda_min_estimate"] >= float(eig[0]) * (1 - 1e-10)
    s = prepared.scale
    assert s == pytest.approx(1.1 * info["preconditioned_lambda_max_estimate"])
    # lambda_max_estimate: a curvature of A itself, a lower bound of λ_max(A)
    assert 0 < info["lambda_max_estimate"] <= float(torch.linalg.eigvalsh(prob.A)[-1]) * (1 + 1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = prepared.solve(prob.V)
    T = torch.eye(prob.p, dtype=DT) - M @ prob.A / s
    term = M @ prob.V
    total = term.clone()
    for _ in range(depth):
        term = T @ term
        total += term
    assert rel_err(res.solution, total / s) < 1e-10
    assert res.residual is not None
    assert torch.allclose(res.residual, dense_residual(prob.A, res.solution, prob.V), rtol=1e-8)
    assert res.info["preconditioner_columns"] == prob.V.shape[1] * (depth + 1)
    assert res.info["matvec_columns"] == prob.V.shape[1] * (depth + 1)


def test_preconditioned_lissa_converges_to_the_dense_solution(prob):
    """Minibatch preconditioned LiSSA (batches of 20 of the 60 examples, 2 repeats, default tol 0.2)
    passes its own residual check, and the check is right: residual and error measured densely. Damping
    0.1, where the preconditioned recursion converges within 150 steps (measured: residuals 0.07–0.09,
    error 0.06; plain LiSSA at the same depth: 0.14, 0.15)."""
    damping = 0.1
    A = prob.H + damping * torch.eye(prob.p, dtype=DT)
    solver = LiSSA(depth=150, repeats=2, batch_size=20, preconditioner="ekfac")
    res = solver.prepare(prob.op, damping).solve(prob.V)
    true = dense_residual(A, res.solution, prob.V)
    assert res.residual is not None
    assert torch.allclose(res.residual, true, rtol=1e-8)
    assert float(true.max()) <= 0.2 and bool(res.info["converged"].all())
    assert rel_err(res.solution, torch.linalg.solve(A, prob.V)) < 0.2
    assert res.spread is not None and float(res.spread.max()) > 0  # minibatch noise, measured


def test_lissa_without_preconditioner_is_the_neumann_series(prob):
    """preconditioner=None: today's LiSSA, the plain Neumann series Σ_{i=0}^{depth} (I − A/s)^i v / s."""
    depth = 30
    prepared = LiSSA(depth=depth, batch_size=None, raise_on_nonconvergence=False).prepare(prob.op, DAMPING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = prepared.solve(prob.V)
    s = prepared.scale
    T = torch.eye(prob.p, dtype=DT) - prob.A / s
    term, total = prob.V.clone(), prob.V.clone()
    for _ in range(depth):
        term = T @ term
        total += term
    assert rel_err(res.solution, total / s) < 1e-10
    assert "preconditioner" not in prepared.info and "preconditioner_columns" not in res.info


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [CG, BlockCG, LiSSA])
@pytest.mark.parametrize(
    "value, exc",
    [("shampoo", ValueError), ("", ValueError), (3, TypeError), (Exact(), TypeError), (KFAC, TypeError)],
)
def test_bad_preconditioner_values_raise_naming_the_field(cls, value, exc):
    with pytest.raises(exc, match="preconditioner"):
        cls(preconditioner=value)


@pytest.mark.parametrize("cls", [CG, BlockCG, LiSSA])
def test_preconditioner_names_are_normalised_and_fields_are_keyword_only(cls):
    assert cls(preconditioner=" EKFAC ").preconditioner == "ekfac"
    assert cls(preconditioner="KFac").preconditioner == "kfac"
    cfg = EKFAC(fisher="empirical")
    assert cls(preconditioner=cfg).preconditioner is cfg
    assert cls().preconditioner is None
    # positional arguments keep their meaning: BlockCG's 5th positional field is still rank_tol
    assert BlockCG(1e-6, None, True, None, 1e-8).rank_tol == 1e-8


class PlainOperator:
    """A Hessian operator without the model behind it (H = diag(d)): K-FAC cannot be built from it."""

    def __init__(self) -> None:
        self.d = torch.linspace(1.0, 2.0, 5, dtype=DT)
        self.n_params, self.dtype, self.device, self.n_train = 5, DT, torch.device("cpu"), 10

    def matvec(self, V):
        return self.d[:, None] * V

    def sample_matvec(self, V, batch_size, generator):
        return self.matvec(V)


@pytest.mark.parametrize("cls", [CG, BlockCG, LiSSA])
def test_an_operator_without_a_model_is_refused_naming_the_preconditioner(cls):
    with pytest.raises(TypeError, match=r"preconditioner='ekfac'.*HessianOperator"):
        cls(preconditioner="ekfac").prepare(PlainOperator(), 0.0)


def _indefinite():
    """An untrained tanh MLP with the summed squared error (as tests/test_kfac.py): H indefinite."""
    torch.manual_seed(3)
    model = _mlp(out=2)
    X = torch.randn(30, 6, dtype=DT)
    Y = torch.randn(30, 2, dtype=DT)
    inf = TorchInfluence(model, sse, (X, Y), l2=L2, damping=0.0, solver="cg", optimum_tol=None)
    eig = torch.linalg.eigvalsh(dense_hessian(model, X, Y, sse))
    return inf.operator, eig


@pytest.mark.parametrize(
    "solver",
    [CG(preconditioner="ekfac"), BlockCG(preconditioner="ekfac"), LiSSA(preconditioner="ekfac")],
    ids=["CG", "BlockCG", "LiSSA"],
)
def test_indefinite_hessian_raises_with_a_suggested_damping(solver):
    op, eig = _indefinite()
    assert float(eig[0]) < -0.1  # independently: H is indefinite (the PSD preconditioner would hide it)
    p = op.n_params
    V = torch.randn(p, 3, generator=torch.Generator().manual_seed(4), dtype=DT)
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite") as exc:
        solver.prepare(op, 0.0).solve(V)
    damping = suggested_damping(str(exc.value))
    assert exc.value.suggested_damping == pytest.approx(damping, rel=1e-6)
    assert float(eig[0]) + damping > 0  # the suggestion makes H + λI positive definite
