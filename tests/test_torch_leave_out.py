"""Leave-out Newton steps and retraining on the torch path for a non-convex model
(pyinfluence.torch.leave_out, through TorchInfluence.loo_change(method="newton"), retrain_loo and refit).

References are written here from torch.func.hessian / grad of the explicit leave-out objective
R₋S(θ) = mean over the kept points of the loss + (l2/2)‖θ‖², never from the library's operators:
- the Newton step Δ = −(∇²R₋S(θ̂) + λI)⁻¹ ∇R₋S(θ̂) by a dense solve, the test loss at θ̂ + Δ;
- retraining by full Newton iterations with the exact Hessian at each iterate, to rounding level.
The linear-model agreement with the C++ core is in tests/test_interface.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.func import functional_call, grad, hessian  # noqa: E402

from pyinfluence.errors import ConvergenceError, NotPositiveDefiniteError  # noqa: E402
from pyinfluence.torch.influence import TorchInfluence  # noqa: E402
from pyinfluence.torch.training import cross_entropy, lbfgs_fit  # noqa: E402

L2 = 5e-2


def _problem(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, C = 5, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    Xt = torch.randn(4, d, generator=g, dtype=torch.float64)
    yt = torch.randint(0, C, (4,), generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, C)).double()
    lbfgs_fit(model, X, y, 3000, l2=L2, tol=1e-13)
    return model, X, y, Xt, yt


class _Explicit:
    """The leave-out objective written out with torch.func (the test's independent reference)."""

    def __init__(self, model, X, y, Xt, yt):
        self.model, self.X, self.y, self.Xt, self.yt = model, X, y, Xt, yt
        self.names = [k for k, _ in model.named_parameters()]
        self.shapes = [p.shape for p in model.parameters()]
        self.theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def _params(self, t):
        out, o = {}, 0
        for nm, sh in zip(self.names, self.shapes):
            k = int(np.prod(sh))
            out[nm] = t[o : o + k].view(sh)
            o += k
        return out

    def R(self, t, keep):
        out = functional_call(self.model, self._params(t), (self.X[keep],))
        return cross_entropy(out, self.y[keep]).mean() + 0.5 * L2 * t.square().sum()

    def test_loss(self, t):
        return cross_entropy(functional_call(self.model, self._params(t), (self.Xt,)), self.yt)

    def keep(self, removed):
        k = torch.ones(self.X.shape[0], dtype=torch.bool)
        k[list(removed)] = False
        return k

    def newton_change(self, removed, damping=0.0):
        keep = self.keep(removed)
        A = hessian(self.R)(self.theta, keep) + damping * torch.eye(self.theta.numel(), dtype=torch.float64)
        step = -torch.linalg.solve(A, grad(self.R)(self.theta, keep))
        return (self.test_loss(self.theta + step) - self.test_loss(self.theta)).detach()

    def retrained_change(self, removed):
        keep, th = self.keep(removed), self.theta.clone()
        for _ in range(40):  # full Newton: quadratic convergence to rounding level
            th = th - torch.linalg.solve(hessian(self.R)(th, keep), grad(self.R)(th, keep))
        assert float(grad(self.R)(th, keep).norm()) < 1e-12
        return (self.test_loss(th) - self.test_loss(self.theta)).detach()


@pytest.fixture(scope="module")
def mlp():
    model, X, y, Xt, yt = _problem(300)
    return model, X, y, Xt, yt, _Explicit(model, X, y, Xt, yt)


@pytest.mark.parametrize("solver", ["exact", "block_cg", "ekfac", "cg"])
@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_newton_step_matches_the_explicit_leave_out_hessian(mlp, solver, damping):
    """Every solver gives the same (exact) Newton step: the solver only changes the preconditioner."""
    model, X, y, Xt, yt, ref = mlp
    loss = nn.CrossEntropyLoss(reduction="none")
    inf = TorchInfluence(model, loss, (X, y), l2=L2, damping=damping, solver=solver)
    idx = [0, 17, 42]
    got = inf.loo_change(Xt, yt, idx, method="newton")
    want = torch.stack([ref.newton_change([i], damping) for i in idx])
    assert got.shape == (3, 4)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-11)
    grp = inf.loo_change(Xt, yt, idx, method="newton", group=True)
    torch.testing.assert_close(grp, ref.newton_change(idx, damping), rtol=1e-7, atol=1e-11)
    # the first-order estimate is not the Newton step (the removed point's curvature matters here)
    first = inf.loo_change(Xt, yt, idx)
    assert float((first - want).abs().max()) > 1e-6 * float(want.abs().max())


def test_retraining_reaches_the_leave_out_optimum(mlp):
    model, X, y, Xt, yt, ref = mlp
    inf = TorchInfluence(model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2, solver="exact")
    idx = [0, 17, 42]
    got = inf.retrain_loo(Xt, yt, idx, tol=1e-11)
    want = torch.stack([ref.retrained_change([i]) for i in idx])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    rep = inf.last_retrain
    assert rep is not None and rep.grad_norm.shape == (3,) and (rep.grad_norm <= 1e-11).all()
    assert (rep.start_grad_norm > 1e-6).all()  # removing a point moved the optimum: work was needed
    grp = inf.retrain_loo(Xt, yt, idx, group=True, tol=1e-11)
    torch.testing.assert_close(grp, ref.retrained_change(idx), rtol=1e-6, atol=1e-10)
    # the model itself is untouched
    torch.testing.assert_close(inf.params, ref.theta)
    with pytest.raises(ConvergenceError, match="max_iter=0"):
        inf.retrain_loo(Xt, yt, [42], tol=1e-14, max_iter=0)


def test_retraining_time_limit(mlp):
    """max_seconds: no limit changes nothing; a spent limit is a ConvergenceError naming the removal and the
    gradient norm reached (never a partial result); bad values name the argument."""
    model, X, y, Xt, yt, ref = mlp
    inf = TorchInfluence(model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2, solver="exact")
    want = torch.stack([ref.retrained_change([i]) for i in (0, 17)])
    got = inf.retrain_loo(Xt, yt, [0, 17], tol=1e-11, max_seconds=1e6)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    with pytest.raises(ConvergenceError, match=r"max_seconds.*training point (0|17), at ‖∇R₋‖") as info:
        inf.retrain_loo(Xt, yt, [0, 17], tol=1e-11, max_seconds=0.0)
    assert info.value.grad_norm > 1e-11
    for bad in (-1.0, float("nan"), "soon"):
        with pytest.raises((ValueError, TypeError), match="max_seconds"):
            inf.retrain_loo(Xt, yt, [0], max_seconds=bad)


def test_time_limit_holds_inside_a_conjugate_gradient_solve(mlp, monkeypatch):
    """max_seconds is checked before every CG iteration, not only between retraining steps: one solve (up to
    1500 Hessian-vector products) cannot overrun it. The clock is a count of loss evaluations (each block of an
    HVP or gradient pass evaluates the loss once), so the check is exact and no wall-clock time is involved."""
    import types

    import pyinfluence.torch.influence as influence_module
    import pyinfluence.torch.leave_out as leave_out_module

    model, X, y, Xt, yt, _ = mlp
    calls = [0]
    ce = nn.CrossEntropyLoss(reduction="none")

    def counting_loss(out, t):
        calls[0] += 1
        return ce(out, t)

    # CG without a preconditioner, barely damped: the Newton start's solve takes many iterations
    inf = TorchInfluence(model, counting_loss, (X, y), l2=L2, damping=1e-6, solver="cg", batch_size=100)
    clock = types.SimpleNamespace(perf_counter=lambda: float(calls[0]))
    monkeypatch.setattr(leave_out_module, "time", clock)
    monkeypatch.setattr(influence_module, "time", clock)

    calls[0] = 0
    inf.retrain_loo(Xt, yt, [0], tol=1e-9)  # no limit: the whole retraining
    total = calls[0]
    calls[0] = 0
    inf.loo_change(Xt, yt, [0], method="newton")  # the same first solve alone (+ one gradient pass)
    first_solve = calls[0]
    assert total > first_solve > 40  # the retraining's first solve is a long one

    limit = 20.0  # "seconds" = loss evaluations: the deadline passes inside the first solve
    calls[0] = 0
    with pytest.raises(ConvergenceError, match=r"max_seconds\) ran out during a conjugate-gradient solve for "
                       r"training point 0") as info:  # fmt: skip
        inf.retrain_loo(Xt, yt, [0], tol=1e-9, max_seconds=limit)
    per_iteration = (len(X) + 99) // 100 + 1  # one HVP over the training blocks, one over the removed point
    assert limit < calls[0] <= limit + per_iteration
    assert info.value.iterations > 0


def test_streamed_data_and_blocks_of_removals_give_the_same_answers(mlp):
    from torch.utils.data import DataLoader, TensorDataset

    model, X, y, Xt, yt, ref = mlp
    loss = nn.CrossEntropyLoss(reduction="none")
    lam = 1e-2  # some of these 75 leave-one-out Hessians are indefinite without damping
    mem = TorchInfluence(model, loss, (X, y), l2=L2, damping=lam, solver="block_cg")
    stream = TorchInfluence(
        model, loss, DataLoader(TensorDataset(X, y), batch_size=64), l2=L2, damping=lam, solver="block_cg",
        batch_size=50,
    )  # fmt: skip
    idx = list(range(0, 300, 4))  # 75 removals: two blocks of leave-out columns
    a = mem.loo_change(Xt, yt, idx, method="newton")
    b = stream.loo_change(Xt, yt, idx, method="newton")
    torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(
        a[[0, 10]], torch.stack([ref.newton_change([0], lam), ref.newton_change([40], lam)])
    )


def test_an_indefinite_leave_out_hessian_raises_with_a_damping_that_works():
    """Removing one point from a small tanh network can leave the leave-out Hessian indefinite while the
    full one is positive definite: the Newton step refuses, naming the point and a damping."""
    model, X, y, Xt, yt = _problem(60)
    ref = _Explicit(model, X, y, Xt, yt)
    # find the points whose leave-out Hessian is indefinite, by the explicit Hessian
    mins = []
    for i in range(60):
        mins.append(float(torch.linalg.eigvalsh(hessian(ref.R)(ref.theta, ref.keep([i])))[0]))
    assert min(mins) < 0 < float(torch.linalg.eigvalsh(hessian(ref.R)(ref.theta, ref.keep([])))[0])
    bad = int(np.argmin(mins))
    inf = TorchInfluence(model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2, solver="exact")
    with pytest.raises(NotPositiveDefiniteError, match=f"training point {bad}") as exc:
        inf.loo_change(Xt, yt, [bad], method="newton")
    assert exc.value.suggested_damping is not None and exc.value.suggested_damping > 0
    lam = max(2 * -min(mins), exc.value.suggested_damping)
    damped = TorchInfluence(model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2, damping=lam)
    torch.testing.assert_close(
        damped.loo_change(Xt, yt, [bad], method="newton")[0],
        ref.newton_change([bad], lam),
        rtol=1e-7,
        atol=1e-11,
    )


def test_refit_on_relabelled_data_reaches_the_new_optimum(mlp):
    model, X, y, Xt, yt, ref = mlp
    # damping: the relabelled objective's Hessian at θ̂ is indefinite here; damping only shapes the
    # quasi-Newton matrix of the refit, not the objective it minimises
    inf = TorchInfluence(
        model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2, damping=1e-2, solver="exact"
    )
    y2 = y.clone()
    y2[[5, 9]] = (y2[[5, 9]] + 1) % 3
    new = inf.refit(y_train=y2)
    # independent: Newton iterations on the relabelled objective
    other = _Explicit(model, X, y2, Xt, yt)
    th = other.theta.clone()
    keep = other.keep([])
    for _ in range(40):
        th = th - torch.linalg.solve(hessian(other.R)(th, keep), grad(other.R)(th, keep))
    torch.testing.assert_close(new.params, th, rtol=1e-7, atol=1e-9)
    assert new.n_train == 300 and new.damping == inf.damping and new.l2 == inf.l2
    torch.testing.assert_close(inf.params, ref.theta)  # the original is untouched
    with pytest.raises(ValueError, match="refit keeps the number of training points"):
        inf.refit(X_train=X[:10], y_train=y[:10])


def test_bad_arguments_are_refused_by_name(mlp):
    model, X, y, Xt, yt, _ = mlp
    inf = TorchInfluence(model, nn.CrossEntropyLoss(reduction="none"), (X, y), l2=L2)
    with pytest.raises(ValueError, match="train_idx is required"):
        inf.retrain_loo(Xt, yt)
    with pytest.raises(ValueError, match="tol must be > 0"):
        inf.retrain_loo(Xt, yt, [0], tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        inf.retrain_loo(Xt, yt, [0], max_iter=-1)
    with pytest.raises(IndexError, match="train_idx"):
        inf.loo_change(Xt, yt, [300], method="newton")
    with pytest.raises(ValueError, match="removes all"):
        inf.retrain_loo(Xt, yt, list(range(300)), group=True)


class _SaddleModel(nn.Module):
    """θ = (a, b); each example's 'output' carries θ and its flag x ∈ {0, 1} to the loss below."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x):
        return torch.cat([self.theta.expand(x.shape[0], 2), x], dim=1)


def _saddle_loss(out, y):
    """Flagged example: 2b²; the others: a²/2 − b²/2 + b⁴/4 (mean over the batch). With one flagged example among
    n = 3, R has a strict minimum at θ = 0 (Hessian diag(2/3, 2/3)); without it, R₋ = a²/2 − b²/2 + b⁴/4 has a
    saddle at 0 (Hessian diag(1, −1)) and its minima at b = ±1, where R₋ = −1/4 (Hessian diag(1, 2)). Per example
    (TorchInfluence takes the mean)."""
    a, b, flag = out[:, 0], out[:, 1], out[:, 2]
    return torch.where(flag > 0.5, 2 * b**2, 0.5 * a**2 - 0.5 * b**2 + 0.25 * b**4) + 0 * y


def test_retrain_escapes_a_saddle_point_of_the_leave_out_objective():
    """Removing the flagged point leaves θ̂ = 0 a stationary point of R₋ (gradient 0: the Newton step is 0) but a
    saddle: retraining must not stop there. The minimiser is b = ±1, a = 0, and the test loss (an unflagged
    example) falls from 0 to −1/4 — all known in closed form."""
    X = torch.tensor([[1.0], [0.0], [0.0]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.float64)
    Xt, yt = torch.tensor([[0.0]], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    model = _SaddleModel()
    inf = TorchInfluence(model, _saddle_loss, (X, y), l2=0.0, damping=0.0, solver="exact", optimum_tol=None)
    change = inf.retrain_loo(Xt, yt, [0])
    rep = inf.last_retrain
    assert rep is not None
    assert rep.info["saddle_escapes"][0] >= 1
    assert float(change[0, 0]) == pytest.approx(-0.25, abs=1e-12)
    # the reported lowest curvature is a Rayleigh quotient of the Hessian at the result, diag(1, 2): in [1, 2]
    assert 1.0 - 1e-9 <= rep.info["min_curvature"][0] <= 2.0 + 1e-9
    # keeping every point, θ̂ = 0 is the minimiser: nothing to escape
    change_none = inf.retrain_loo(Xt, yt, [1])  # removing an unflagged point: R₋ = (2b² + …)/2, minimum at 0
    assert float(change_none[0, 0]) == pytest.approx(0.0, abs=1e-12)
    assert inf.last_retrain is not None and inf.last_retrain.info["saddle_escapes"][0] == 0
