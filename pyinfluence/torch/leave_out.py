"""Leave-out Newton steps and warm-started retraining on the torch path (private machinery of
:class:`~pyinfluence.TorchInfluence`: ``loo_change(method="newton")``, ``retrain_loo`` and ``refit``).

Removing a set S of s training points (one point, or a group removed together) changes the objective to

    R₋S(θ) = (1/(n−s)) Σ_{j∉S} L(z_j, θ) + (l2/2)‖θ‖²,

whose gradient and Hessian at θ̂ follow from those of R (H = ∇²R(θ̂), l2 included) and the removed points'
own gradients g_S = Σ_{i∈S} ∇L(z_i, θ̂) and curvature H_S = Σ_{i∈S} ∇²L(z_i, θ̂):

    ∇R₋S(θ̂) = (n(∇R(θ̂) − l2 θ̂) − g_S)/(n−s) + l2 θ̂                                        (1)
    A_S     = ∇²R₋S(θ̂) + λI = (n(H − l2 I) − H_S)/(n−s) + (l2 + λ) I                        (2)

- **Newton step** (the linear path's ``loo_newton``): Δ_S = −A_S⁻¹ ∇R₋S(θ̂); the predicted change of a test
  loss is L(z_test, θ̂ + Δ_S) − L(z_test, θ̂), the loss evaluated exactly at the stepped parameters. At first
  order in 1/n and with ∇R(θ̂) = 0 this is Koh & Liang's −(1/n)·I_up,loss; the step adds the removed point's
  own curvature H_S (which makes it track retraining where a high-leverage point dominates a direction) and
  the loss's curvature along the step.
- **Retraining**: the minimiser of R₋S, from θ̂ + Δ_S by quasi-Newton steps: L-BFGS whose initial matrix is the
  fixed A_S (the chord — simplified Newton — method, corrected by secant pairs where ∇²R₋S has moved from A_S),
  each with a backtracking (Armijo) line search on R₋S, until ‖∇R₋S(θ)‖₂ ≤ tol. θ̂₋S lies O(1/n) from
  θ̂, so the chord steps converge linearly at a rate of that order: a few steps reach rounding level.

A_S X = B is solved for all columns at once by conjugate gradients, column by column (each column has its
own removed set, so its own operator), preconditioned by ((n−s)/n)·M with M ≈ (H + λI)⁻¹ the prepared
solver's inverse where it is cheap to apply (Exact: the Cholesky factor — then A_S is the identity plus
O(1/n) in the preconditioned metric and CG needs a few iterations; K-FAC/EK-FAC and Arnoldi with its
complement: their approximate inverse); unpreconditioned for the iterative solvers (CG, BlockCG, LiSSA).
H V is the Exact solver's dense H times V when it holds one, else Hessian-vector products over the
training set; H_S V are per-example HVPs of the removed points. Every solve checks its final TRUE relative
residual ‖B − A_S X‖/‖B‖ against the tolerance (ConvergenceError past it) and every search direction's
curvature (NotPositiveDefiniteError, with a suggested damping, when A_S is not positive definite).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from pyinfluence.errors import ConvergenceError
from pyinfluence.torch.batches import batch_len
from pyinfluence.torch.functional import FunctionalModel
from pyinfluence.torch.hessian import HessianOperator
from pyinfluence.torch.solvers.base import _npd_error

__all__ = ["LeaveOut", "RetrainReport"]

# Relative residual of the Newton solves, per computation dtype (the default of ``newton_tol``).
_SOLVE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Gradient-norm tolerance of the retraining, per computation dtype (the default of ``retrain_loo(tol=None)``).
RETRAIN_TOL = {torch.float64: 1e-9, torch.float32: 1e-4}
# CG iterations per solve at most, and restarts from the true residual when the recursive one drifted.
_CG_MAX_ITER = 500
_CG_RESTARTS = 3
# Backtracking line search: sufficient-decrease constant and the most halvings.
_ARMIJO = 1e-4
_MAX_HALVINGS = 30
# L-BFGS pairs kept per removal in the retraining (memory: 2 · _HISTORY · p · removals per block).
_HISTORY = 5
# Parameter vectors evaluated together (vmapped) in one pass over a block of examples.
_THETA_CHUNK = 32


@dataclass
class RetrainReport:
    """How the last ``retrain_loo`` (or ``refit``) went, one entry per removal (a group: one entry).

    ``grad_norm`` (k,): ‖∇R₋S(θ)‖₂ reached (≤ ``tol``); ``steps`` (k,): chord steps after the Newton start;
    ``solve_iterations``: CG iterations of every solve, summed; ``tol``; ``seconds``; ``start_grad_norm`` (k,):
    ‖∇R₋S‖ at θ̂ itself (before the Newton start; the size of the step retraining had to make).
    """

    grad_norm: np.ndarray
    steps: np.ndarray
    start_grad_norm: np.ndarray
    solve_iterations: int
    tol: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "grad_norm": [float(v) for v in self.grad_norm],
            "steps": [int(v) for v in self.steps],
            "start_grad_norm": [float(v) for v in self.start_grad_norm],
            "solve_iterations": int(self.solve_iterations),
            "tol": float(self.tol),
            "seconds": float(self.seconds),
            **self.info,
        }


class LeaveOut:
    """The leave-out system (1)–(2) of one TorchInfluence for a list of removals.

    ``removed``: an int64 tensor of training indices; ``group=False``: each index is its own removal (column
    j of every (p, k) block belongs to point ``removed[j]``); ``group=True``: all of them form one removal
    (one column). ``group=True`` with no index is the full objective R itself (used to polish θ̂).
    ``data`` is the training set (``take(idx)`` and ``blocks(rows)``), ``prep`` the prepared solver,
    ``rows`` the examples per block of per-example work.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        op: HessianOperator,
        prep: Any,
        data: Any,
        damping: float,
        removed: Tensor,
        group: bool,
        rows: int,
        solve_tol: Optional[float] = None,
        dense_hessian: bool = True,
    ) -> None:
        self.fm, self.op, self.prep, self.data = fm, op, prep, data
        self.n = int(op.n_train)
        self.l2 = float(op.l2)
        self.lam = float(damping)
        self.removed = removed
        self.group = bool(group)
        self.s = int(removed.numel()) if group else 1
        self.k = 1 if group else int(removed.numel())
        if self.n - self.s < 1:
            raise ValueError(f"the removal leaves no training point (n = {self.n}, removed {self.s})")
        self.rows = max(1, int(rows))
        self.dtype, self.device = fm.dtype, fm.device
        self.tol = float(solve_tol if solve_tol is not None else _SOLVE_TOL.get(self.dtype, 1e-5))
        self.removed_data = data.take(removed) if removed.numel() else None
        # Exact: its dense H (l2 included, no damping) for H V, unless the operator's data differ (refit)
        self.dense_H = getattr(prep, "_A", None) if dense_hessian else None
        self.precondition = _preconditioner(prep)
        self.cg_iterations = 0

    # -- the operator (2) and its preconditioner ------------------------------------------------------
    def _full_hvp(self, V: Tensor) -> Tensor:
        """H V (l2 included, no damping): the Exact solver's dense H, else HVPs over the training set."""
        if self.dense_H is not None:
            H = self.dense_H
            return (H @ V.to(H.dtype)).to(V.dtype)
        return self.op.matvec(V)

    def _removed_hvp(self, V: Tensor) -> Tensor:
        """H_S V, V (p, k): column j times the curvature of its own removed point (group: of the whole group)."""
        if self.removed_data is None:
            return torch.zeros_like(V)
        if self.group:
            out = torch.zeros_like(V.t())
            for _, X, Y in self.removed_data.blocks(self.rows):
                out.add_(self.fm.hvp_rows(V.t().contiguous(), X, Y))
            return out.t()
        out = torch.empty_like(V.t())
        Vt = V.t().contiguous()
        for s, X, Y in self.removed_data.blocks(self.rows):
            b = batch_len(X)
            out[s : s + b] = self.fm.paired_hvp(Vt[s : s + b], X, Y)
        return out.t()

    def apply(self, V: Tensor) -> Tensor:
        """A_S V for V (p, k), equation (2)."""
        n, s = self.n, self.s
        out = self._full_hvp(V).sub_(V, alpha=self.l2).mul_(n)
        out.sub_(self._removed_hvp(V)).div_(n - s)
        return out.add_(V, alpha=self.l2 + self.lam)

    def _precondition(self, R: Tensor) -> Tensor:
        if self.precondition is None:
            return R.clone()
        return self.precondition(R).mul_((self.n - self.s) / self.n)

    # -- conjugate gradients, one operator per column --------------------------------------------------
    def solve(self, B: Tensor, what: str) -> Tensor:
        """X = A_S⁻¹ B for B (p, k), preconditioned CG per column to the relative residual ``tol``, checked
        on the true residual at the end (restarted from it when the recursive residual drifted)."""
        X = torch.zeros_like(B)
        bnorm = B.norm(dim=0)
        live = bnorm > 0
        if not bool(live.any()):
            return X
        R = B.clone()
        largest = 0.0
        res = torch.zeros_like(bnorm)
        for _ in range(_CG_RESTARTS + 1):
            X, largest = self._cg(X, R, bnorm, live, largest, what)
            R = B - self.apply(X)  # the true residual
            res = torch.where(live, R.norm(dim=0) / torch.where(live, bnorm, 1.0), 0.0)
            if bool((res <= self.tol).all()):
                return X
        worst = float(res.max())
        raise ConvergenceError(
            f"{what}: conjugate gradients on the leave-out Hessian did not reach the relative residual "
            f"tol={self.tol:g} (reached {worst:.3g} after {self.cg_iterations} iterations); raise the damping "
            f"or use float64",
            iterations=self.cg_iterations,
            residual=worst,
            tol=self.tol,
        )

    def _cg(self, X: Tensor, R: Tensor, bnorm: Tensor, live: Tensor, largest: float, what: str):
        X = X.clone()
        R = R.clone()
        thresh = self.tol * bnorm
        active = live & (R.norm(dim=0) > thresh)
        Z = self._precondition(R)
        P = Z.clone()
        rz = (R * Z).sum(0)
        for _ in range(_CG_MAX_ITER):
            if not bool(active.any()):
                break
            self.cg_iterations += 1
            AP = self.apply(P)
            pAp = (P * AP).sum(0)
            pp = (P * P).sum(0)
            curv = pAp / torch.where(pp > 0, pp, 1.0)
            if bool(active.any()):
                largest = max(largest, float(curv[active].max()))
            bad = active & (pAp <= 0)
            if bool(bad.any()):
                j = int(torch.nonzero(bad)[0])
                err = _npd_error(
                    f"{what} (removal {self.removal_label(j)})",
                    "a search direction p of conjugate gradients on the leave-out Hessian ∇²R₋(θ̂) + λI has "
                    "curvature pᵀ(∇²R₋ + λI)p / pᵀp",
                    float(curv[j]),
                    self.lam,
                    largest,
                )
                if not self.group:
                    err.train_index = int(self.removed[j])
                raise err
            alpha = torch.where(active, rz / torch.where(active, pAp, 1.0), 0.0)
            X.add_(P * alpha)
            R.sub_(AP * alpha)
            active = active & (R.norm(dim=0) > thresh)
            if not bool(active.any()):
                break
            Z = self._precondition(R)
            rz_new = (R * Z).sum(0)
            beta = torch.where(active, rz_new / torch.where(rz != 0, rz, 1.0), 0.0)
            P = Z + P * beta
            rz = torch.where(active, rz_new, rz)
        return X, largest

    def _direction(self, G: Tensor, S: list[Tensor], Y: list[Tensor], rho: list[Tensor]) -> Tensor:
        """H_k G by the L-BFGS two-loop recursion per column with H₀ = A_S⁻¹ (pairs with sᵀy ≤ 0 have ρ = 0
        and drop out)."""
        q = G.clone()
        alphas = []
        for s_i, y_i, r_i in zip(reversed(S), reversed(Y), reversed(rho)):
            a = r_i * (s_i * q).sum(0)
            q.sub_(y_i * a)
            alphas.append(a)
        r = self.solve(q, "retrain_loo")
        for (s_i, y_i, r_i), a in zip(zip(S, Y, rho), reversed(alphas)):
            b = r_i * (y_i * r).sum(0)
            r.add_(s_i * (a - b))
        return r

    def removal_label(self, j: int) -> str:
        if self.group:
            return f"the group of {self.s} point(s)" if self.s else "nothing (the whole training set)"
        return f"training point {int(self.removed[j])}"

    # -- gradients of the leave-out objective ----------------------------------------------------------
    def gradient_at_optimum(self) -> Tensor:
        """∇R₋S(θ̂) for every removal, (p, k), equation (1)."""
        gR = self.op.gradient()  # ∇R(θ̂) (p,), one pass over the training set
        theta = self.fm.theta
        base = (gR - self.l2 * theta) * self.n  # Σ_j ∇L(z_j, θ̂)
        gS = torch.zeros((self.fm.n_params, self.k), dtype=self.dtype, device=self.device)
        if self.removed_data is not None:
            for s, X, Y in self.removed_data.blocks(self.rows):
                G = self.fm.per_example_grads(X, Y)  # (B, p)
                if self.group:
                    gS[:, 0].add_(G.sum(0))
                else:
                    gS[:, s : s + batch_len(X)] = G.t()
        out = (base[:, None] - gS) / (self.n - self.s)
        return out.add_(theta[:, None], alpha=self.l2)

    def objective_at(self, Theta: Tensor) -> tuple[Tensor, Tensor]:
        """(∇R₋S(θ_j) (p, k), R₋S(θ_j) (k,)) at the columns θ_j of ``Theta`` (p, k), one pass over the
        training set (k parameter vectors at a time, vmapped)."""
        p, k = Theta.shape
        Tt = Theta.t().contiguous()
        G = torch.zeros((k, p), dtype=self.dtype, device=self.device)
        F = torch.zeros((k,), dtype=self.dtype, device=self.device)
        chunk = max(1, min(_THETA_CHUNK, k))
        for _, X, Y in self.data.blocks(self.rows):
            for c in range(0, k, chunk):
                g, f = self.fm.grad_value_at(Tt[c : c + chunk], X, Y)
                G[c : c + chunk].add_(g)
                F[c : c + chunk].add_(f)
        G, F = self.op.reduce_sum(G), self.op.reduce_sum(F)
        if self.removed_data is not None:
            for s, X, Y in self.removed_data.blocks(self.rows):
                b = batch_len(X)
                if self.group:
                    g, f = self.fm.grad_value_at(Tt, X, Y)
                    G.sub_(g)
                    F.sub_(f)
                else:
                    g, f = self.fm.paired_grad_value_at(Tt[s : s + b], X, Y)
                    G[s : s + b].sub_(g)
                    F[s : s + b].sub_(f)
        G.div_(self.n - self.s).add_(Tt, alpha=self.l2)
        F.div_(self.n - self.s).add_(Tt.square().sum(1), alpha=0.5 * self.l2)
        return G.t(), F

    # -- the Newton step and the retraining ---------------------------------------------------------
    def newton_step(self) -> Tensor:
        """Δ_S = −A_S⁻¹ ∇R₋S(θ̂) for every removal, (p, k)."""
        return self.solve(self.gradient_at_optimum().neg_(), "loo_change(method='newton')")

    def retrain(
        self, tol: float, max_iter: int, start: Optional[Tensor] = None
    ) -> tuple[Tensor, RetrainReport]:
        """The minimisers θ̂₋S, (p, k), to ‖∇R₋S‖₂ ≤ ``tol`` (ConvergenceError after ``max_iter`` chord steps)."""
        t0 = time.perf_counter()
        theta0 = self.fm.theta[:, None].expand(-1, self.k)
        g0 = self.gradient_at_optimum()
        start_norm = g0.norm(dim=0)
        step = self.solve(g0.neg(), "retrain_loo") if start is None else start
        Theta = theta0 + step
        G, F = self.objective_at(Theta)
        # the Newton start must not be worse than θ̂ itself (an R₋S increase means the quadratic model failed)
        _, F0 = self.objective_at(theta0.contiguous())
        worse = F > F0
        if bool(worse.any()):
            Theta[:, worse] = theta0[:, worse]
            G[:, worse] = g0[:, worse]
            F[worse] = F0[worse]
        steps = torch.zeros(self.k, dtype=torch.long)
        gnorm = G.norm(dim=0)
        # L-BFGS pairs (s, y) per column, on top of the chord matrix: the two-loop recursion with H₀⁻¹ = A_S⁻¹
        # (Nocedal & Wright, Algorithm 7.4) corrects the few directions where ∇²R₋ has moved away from A_S
        S_hist: list[Tensor] = []
        Y_hist: list[Tensor] = []
        rho_hist: list[Tensor] = []
        for _ in range(max_iter):
            todo = gnorm > tol
            if not bool(todo.any()):
                break
            D = self._direction(G * todo, S_hist, Y_hist, rho_hist)  # finished columns get zero
            slope = (G * D).sum(0)
            if bool((todo & ~(slope > 0)).any()):  # not a descent direction: drop the pairs, chord step
                S_hist.clear()
                Y_hist.clear()
                rho_hist.clear()
                D = self.solve(G * todo, "retrain_loo")
                slope = (G * D).sum(0)
            t = torch.ones(self.k, dtype=self.dtype, device=self.device)
            accepted = ~todo
            newT, newG, newF = Theta.clone(), G.clone(), F.clone()
            for _h in range(_MAX_HALVINGS):
                trial = Theta - D * torch.where(accepted, 0.0, t)
                Gt, Ft = self.objective_at(trial)
                gt = Gt.norm(dim=0)
                # sufficient decrease (Armijo), or — near the optimum, where R₋ is flat to rounding — a smaller
                # gradient norm
                ok = (~accepted) & ((Ft <= F - _ARMIJO * t * slope) | (gt < gnorm))
                newT[:, ok], newG[:, ok], newF[ok] = trial[:, ok], Gt[:, ok], Ft[ok]
                accepted = accepted | ok
                if bool(accepted.all()):
                    break
                t = torch.where(accepted, t, t * 0.5)
            if not bool(accepted.all()):
                j = int(torch.nonzero(~accepted)[0])
                raise ConvergenceError(
                    f"retrain_loo: the line search found neither a decrease of the leave-out objective nor of its "
                    f"gradient for {self.removal_label(j)} at ‖∇R₋‖ = {float(gnorm[j]):.3g} (tol={tol:g}): the "
                    f"objective is flat to rounding there; raise tol",
                    iterations=int(steps[j]),
                    grad_norm=float(gnorm[j]),
                    tol=tol,
                )
            s_new, y_new = (newT - Theta) * todo, (newG - G) * todo
            sy = (s_new * y_new).sum(0)
            S_hist.append(s_new)
            Y_hist.append(y_new)
            rho_hist.append(torch.where(sy > 0, 1.0 / torch.where(sy > 0, sy, 1.0), 0.0))  # skip bad pairs
            if len(S_hist) > _HISTORY:
                del S_hist[0], Y_hist[0], rho_hist[0]
            steps += todo.cpu().long()
            Theta, G, F = newT, newG, newF
            gnorm = G.norm(dim=0)
        if bool((gnorm > tol).any()):
            j = int(torch.argmax(gnorm))
            raise ConvergenceError(
                f"retrain_loo: retraining without {self.removal_label(j)} reached ‖∇R₋‖ = {float(gnorm[j]):.3g} "
                f"after max_iter={max_iter} chord steps, above tol={tol:g}; raise max_iter or tol",
                iterations=max_iter,
                grad_norm=float(gnorm[j]),
                tol=tol,
            )
        report = RetrainReport(
            grad_norm=gnorm.detach().cpu().double().numpy(),
            steps=steps.numpy(),
            start_grad_norm=start_norm.detach().cpu().double().numpy(),
            solve_iterations=self.cg_iterations,
            tol=float(tol),
            seconds=time.perf_counter() - t0,
        )
        return Theta, report


def test_losses_at(fm: FunctionalModel, Theta: Tensor, test: Any, rows: int) -> Tensor:
    """L(z_test, θ_j) for the columns θ_j of ``Theta`` (p, k) and every test point: (k, m)."""
    Tt = Theta.t().contiguous()
    k, m = Tt.shape[0], len(test)
    out = torch.empty((k, m), dtype=fm.dtype, device=fm.device)
    chunk = max(1, min(_THETA_CHUNK, k))
    with torch.no_grad():
        for s, X, Y in test.blocks(rows):
            b = batch_len(X)
            for c in range(0, k, chunk):
                out[c : c + chunk, s : s + b] = fm.losses_at(Tt[c : c + chunk], X, Y)
    return out


def _preconditioner(prep: Any) -> Optional[Callable[[Tensor], Tensor]]:
    """M ≈ (H + λI)⁻¹ from a prepared solver where it is cheap to apply and positive definite, else None."""
    factor = getattr(prep, "_factor", None)
    if factor is not None and hasattr(factor, "solve"):  # Exact: the Cholesky factor of H + λI

        def exact(R: Tensor) -> Tensor:
            dt = getattr(prep, "_fdtype", R.dtype)
            return factor.solve(R.to(dt)).to(device=R.device, dtype=R.dtype)

        return exact
    if type(prep).__name__ == "_PreparedKFAC":  # K-FAC / EK-FAC: block-diagonal, positive definite
        return prep._apply
    if type(prep).__name__ == "_PreparedArnoldi" and getattr(prep, "_inv_rest", None) is not None:
        return prep._apply  # with its complement term: positive definite
    pre = getattr(prep, "_pre", None)  # CG / BlockCG / LiSSA with a K-FAC preconditioner
    if pre is not None and hasattr(pre, "apply"):
        return pre.apply
    return None


def default_retrain_tol(dtype: torch.dtype) -> float:
    """The gradient-norm tolerance of ``retrain_loo(tol=None)`` for the computation dtype."""
    return float(RETRAIN_TOL.get(dtype, 1e-4))
