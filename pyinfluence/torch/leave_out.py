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

import copy
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from pyinfluence.errors import ConvergenceError, NotPositiveDefiniteError
from pyinfluence.torch.batches import batch_len
from pyinfluence.torch.functional import FunctionalModel
from pyinfluence.torch.hessian import HessianOperator
from pyinfluence.torch.solvers.base import _generator, _npd_error
from pyinfluence.torch.solvers.exact import cholesky_solve
from pyinfluence.torch.solvers.lanczos import _lanczos

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
# Quasi-Newton steps on the fixed leave-out Hessian before a removal still above tol switches to Newton-CG with
# the Hessian at its current parameters.
_QUASI_NEWTON_STEPS = 20
# Relative residual of each Newton-CG solve.
_NEWTON_CG_TOL = 1e-8
# Levenberg–Marquardt damping of Newton-CG where the Hessian at the current θ is not positive definite: first
# value and ceiling, as multiples of max(λ, 1e-2).
_LM_START = 1e-4
_LM_MAX = 1e2
# Saddle-point check of every retrained removal: Lanczos steps for the lowest curvature, the curvature below
# which (relative to the largest Ritz value) the stationary point counts as a saddle, and the escapes allowed.
_LANCZOS_STEPS = 30
_SADDLE_REL = {torch.float64: 1e-7, torch.float32: 1e-4}
_MAX_ESCAPES = 3
# L-BFGS pairs kept per removal in the retraining (memory: 2 · _HISTORY · p · removals per block).
_HISTORY = 5
# Parameter vectors evaluated together (vmapped) in one pass over a block of examples.
_THETA_CHUNK = 32


@dataclass
class RetrainReport:
    """How the last ``retrain_loo`` (or ``refit``) went, one entry per removal (a group: one entry).

    ``grad_norm`` (k,): ‖∇R₋S(θ)‖₂ reached (≤ ``tol``); ``steps`` (k,): chord steps after the Newton start;
    ``solve_iterations``: CG iterations of every solve, summed; ``tol``; ``seconds``; ``start_grad_norm`` (k,):
    ‖∇R₋S‖ at θ̂ itself (before the Newton start; the size of the step retraining had to make). ``info``: per
    removal, ``newton_cg_steps`` (of ``steps``, those taken by Newton-CG with the Hessian at the current point),
    ``saddle_escapes`` (steps along a direction of negative curvature from a stationary point) and
    ``min_curvature`` (the Rayleigh quotient of ∇²R₋S at the result along the lowest Ritz vector of 30 Lanczos
    steps: an upper bound on its smallest eigenvalue, not the eigenvalue itself).
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
        # retrain's time limit (a time.perf_counter() value), checked before every CG iteration as well as
        # between steps, so that one solve (up to _CG_MAX_ITER HVPs) cannot overrun it; None: no limit
        self.deadline: Optional[float] = None

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
            if self.deadline is not None and time.perf_counter() > self.deadline:
                j = int(torch.nonzero(active)[0])
                raise ConvergenceError(
                    f"{what}: the time limit (max_seconds) ran out during a conjugate-gradient solve for "
                    f"{self.removal_label(j)} (after {self.cg_iterations} iterations); raise max_seconds",
                    iterations=self.cg_iterations,
                    tol=self.tol,
                )
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

    def objective_at(self, Theta: Tensor, cols: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
        """(∇R₋S(θ_j) (p, c), R₋S(θ_j) (c,)) at the columns θ_j of ``Theta`` (p, c), one pass over the
        training set (parameter vectors vmapped in chunks). ``cols`` (c,): which removals the columns belong to
        (default: all k, in order); only with one removal per column (``group=False``) do they differ."""
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
        removed = self.removed_data
        if removed is not None and cols is not None and not self.group and cols.numel() != self.k:
            removed = self.data.take(self.removed[cols.to(self.removed.device)])
        if removed is not None:
            for s, X, Y in removed.blocks(self.rows):
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

    def _objective_at_optimum(self) -> Tensor:
        """R₋S(θ̂) for every removal, (k,): one pass for Σ_j L(z_j, θ̂), minus the removed points' losses."""
        theta = self.fm.theta
        total = torch.zeros((), dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for _, X, Y in self.data.blocks(self.rows):
                total += self.fm.losses(self.fm.params, X, Y).sum()
            total = self.op.reduce_sum(total)
            out = total.expand(self.k).clone()
            if self.removed_data is not None:
                for s, X, Y in self.removed_data.blocks(self.rows):
                    losses = self.fm.losses(self.fm.params, X, Y)
                    if self.group:
                        out -= losses.sum()
                    else:
                        out[s : s + batch_len(X)] -= losses
        return out.div_(self.n - self.s).add_(0.5 * self.l2 * float(theta.square().sum()))

    def _line_search(
        self, Theta: Tensor, G: Tensor, F: Tensor, D: Tensor, todo: Tensor, tol: float, what: str
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Backtracking along −D for the columns ``todo`` (the others are returned as they are): accept t when
        R₋ decreases sufficiently (Armijo) or — near the optimum, where R₋ is flat to rounding — when ‖∇R₋‖
        decreases; halve t otherwise. Only the columns still searching are evaluated."""
        gnorm = G.norm(dim=0)
        slope = (G * D).sum(0)
        t = torch.ones(G.shape[1], dtype=self.dtype, device=self.device)
        accepted = ~todo
        newT, newG, newF = Theta.clone(), G.clone(), F.clone()
        for _h in range(_MAX_HALVINGS):
            act = torch.nonzero(~accepted).flatten()
            if act.numel() == 0:
                break
            trial = Theta[:, act] - D[:, act] * t[act]
            cols = act if self.k == G.shape[1] else None
            Gt, Ft = self.objective_at(trial, cols)
            ok = (Ft <= F[act] - _ARMIJO * t[act] * slope[act]) | (Gt.norm(dim=0) < gnorm[act])
            good = act[ok]
            newT[:, good], newG[:, good], newF[good] = trial[:, ok], Gt[:, ok], Ft[ok]
            accepted[good] = True
            t[act[~ok]] *= 0.5
        if not bool(accepted.all()):
            j = int(torch.nonzero(~accepted)[0])
            raise ConvergenceError(
                f"{what}: the line search found neither a decrease of the leave-out objective nor of its gradient "
                f"for {self.removal_label(j)} at ‖∇R₋‖ = {float(gnorm[j]):.3g} (tol={tol:g}): the objective is "
                f"flat to rounding there; raise tol",
                grad_norm=float(gnorm[j]),
                tol=tol,
            )
        return newT, newG, newF

    # -- the Newton step and the retraining ---------------------------------------------------------
    def newton_step(self) -> Tensor:
        """Δ_S = −A_S⁻¹ ∇R₋S(θ̂) for every removal, (p, k)."""
        return self.solve(self.gradient_at_optimum().neg_(), "loo_change(method='newton')")

    def retrain(
        self, tol: float, max_iter: int, deadline: Optional[float] = None
    ) -> tuple[Tensor, RetrainReport]:
        """The minimisers θ̂₋S, (p, k), to ‖∇R₋S‖₂ ≤ ``tol`` (ConvergenceError after ``max_iter`` steps, or at the
        first check past ``deadline``, a ``time.perf_counter()`` value; None: no time limit).

        From θ̂ + the Newton step: up to ``_QUASI_NEWTON_STEPS`` L-BFGS steps on top of the fixed A_S (cheap: one
        A_S solve and one gradient pass per step, all removals together); a removal still above ``tol`` then
        continues by Newton-CG with the Hessian of R₋S at its current θ (Hessian-vector products there,
        preconditioned like A_S; no damping unless that Hessian is not positive definite, then λ), which
        converges quadratically where A_S — damped, or far from the optimum's curvature — makes slow progress."""
        t0 = time.perf_counter()
        self.deadline = deadline  # the chords (copies) and the Newton-CG systems (_at) inherit it
        try:
            return self._retrain(tol, max_iter, deadline, t0)
        finally:
            self.deadline = None

    def _retrain(
        self, tol: float, max_iter: int, deadline: Optional[float], t0: float
    ) -> tuple[Tensor, RetrainReport]:
        theta0 = self.fm.theta[:, None].expand(-1, self.k)
        g0 = self.gradient_at_optimum()
        start_norm = g0.norm(dim=0)
        if deadline is not None:
            _check_deadline(deadline, self, int(torch.argmax(start_norm)), float(start_norm.max()), tol)
        # the least damped chord system whose solve of the Newton start succeeds
        for chord in self._chords():
            try:
                step = chord.solve(g0.neg(), "retrain_loo")
                break
            except NotPositiveDefiniteError:  # a leave-out Hessian needs more damping than H
                if chord is self:
                    raise
                self.cg_iterations += chord.cg_iterations
        Theta = theta0 + step
        G, F = self.objective_at(Theta)
        # the Newton start must not be worse than θ̂ itself (an R₋S increase means the quadratic model failed)
        worse = self._objective_at_optimum() < F
        if bool(worse.any()):
            Theta[:, worse] = theta0[:, worse]
            G, F = self.objective_at(Theta)
        steps = torch.zeros(self.k, dtype=torch.long)
        gnorm = G.norm(dim=0)
        # L-BFGS pairs (s, y) per column, on top of the chord matrix: the two-loop recursion with H₀⁻¹ = A_S⁻¹
        # (Nocedal & Wright, Algorithm 7.4) corrects the few directions where ∇²R₋ has moved away from A_S
        S_hist: list[Tensor] = []
        Y_hist: list[Tensor] = []
        rho_hist: list[Tensor] = []
        for _ in range(min(max_iter, _QUASI_NEWTON_STEPS)):
            todo = gnorm > tol
            if not bool(todo.any()):
                break
            if deadline is not None:
                _check_deadline(deadline, self, int(torch.argmax(gnorm)), float(gnorm.max()), tol)
            try:
                D = chord._direction(G * todo, S_hist, Y_hist, rho_hist)  # finished columns get zero
            except NotPositiveDefiniteError:
                if chord is self:
                    raise
                self.cg_iterations += chord.cg_iterations
                chord = self
                D = chord._direction(G * todo, S_hist, Y_hist, rho_hist)
            if bool(
                (todo & ~((G * D).sum(0) > 0)).any()
            ):  # not a descent direction: drop the pairs, chord step
                S_hist.clear()
                Y_hist.clear()
                rho_hist.clear()
                D = chord.solve(G * todo, "retrain_loo")
            newT, newG, newF = self._line_search(Theta, G, F, D, todo, tol, "retrain_loo")
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
        if chord is not self:
            self.cg_iterations += chord.cg_iterations
        newton_steps = torch.zeros(self.k, dtype=torch.long)
        escapes = torch.zeros(self.k, dtype=torch.long)
        curvature = torch.full((self.k,), math.nan, dtype=torch.float64)
        for j in range(self.k):
            th, g, f = Theta[:, j], G[:, j], F[j]
            while True:
                if float(g.norm()) > tol:
                    budget = max_iter - int(steps[j])
                    th, g, f, used = self._newton_cg(j, th, g, f, tol, budget, chord.precondition, deadline)
                    newton_steps[j] += used
                    steps[j] += used
                if float(g.norm()) > tol:
                    break  # ConvergenceError below
                # a stationary point; a minimiser only if ∇²R₋S has no negative curvature there
                rho, v, top = self._lowest_curvature(th, j)
                curvature[j] = rho
                if rho >= -_SADDLE_REL.get(self.dtype, 1e-4) * top:
                    break
                _check_deadline(deadline, self, j, float(g.norm()), tol)
                if int(escapes[j]) == _MAX_ESCAPES:
                    raise ConvergenceError(
                        f"retrain_loo: retraining without {self.removal_label(j)} ended at a saddle point of the "
                        f"leave-out objective (curvature {rho:.3g} along a direction of negative curvature) "
                        f"{_MAX_ESCAPES + 1} times; its Hessian there is indefinite",
                        grad_norm=float(g.norm()),
                        tol=tol,
                    )
                th, g, f = self._escape(j, th, g, f, rho, v, tol)
                escapes[j] += 1
            Theta[:, j], G[:, j], F[j] = th, g, f
        gnorm = G.norm(dim=0)
        if bool((gnorm > tol).any()):
            j = int(torch.argmax(gnorm))
            raise ConvergenceError(
                f"retrain_loo: retraining without {self.removal_label(j)} reached ‖∇R₋‖ = {float(gnorm[j]):.3g} "
                f"after max_iter={max_iter} steps, above tol={tol:g}; raise max_iter or tol",
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
            info={
                "newton_cg_steps": [int(v) for v in newton_steps],
                "saddle_escapes": [int(v) for v in escapes],
                "min_curvature": [float(v) for v in curvature],
            },
        )
        return Theta, report

    def _chords(self) -> Iterator[LeaveOut]:
        """The systems that may drive the retraining, least damped first: with the Exact solver's dense H, the
        leave-out Hessian with damping μ = 0, 1e-6·λ, 1e-4·λ, 1e-2·λ (those at which H + μI factors),
        preconditioned by that factor; then this system (damping λ). The damping λ of the influence estimates
        regularises the estimate, not the retraining, and A_S damped by λ converges slowly along the
        directions of curvature below λ; the caller takes the first whose solves succeed (A_S itself may need
        more damping than H)."""
        H = self.dense_H
        if H is not None and self.lam > 0:
            eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            for mu in (0.0, 1e-6 * self.lam, 1e-4 * self.lam, 1e-2 * self.lam):
                L, info = torch.linalg.cholesky_ex(H + mu * eye)
                if int(info) != 0 or not bool(torch.isfinite(L).all()):
                    continue
                chord = copy.copy(self)
                chord.lam = mu
                chord.cg_iterations = 0
                chord.precondition = functools.partial(_cholesky_solve, L)
                yield chord
        yield self

    def _lowest_curvature(self, theta: Tensor, j: int) -> tuple[float, Tensor, float]:
        """(ρ, v, |largest Ritz value|) of ∇²R₋S at θ for removal j: v (p,) the unit Ritz vector of the lowest
        Ritz value after ``_LANCZOS_STEPS`` Lanczos steps (the solvers' process, from a seeded start) and ρ its
        exact Rayleigh quotient vᵀ∇²R₋S v (one more HVP). ρ < 0 proves negative curvature (a saddle point); ρ ≥ 0
        does not prove positive definiteness, only that none was found."""
        system = self._at(theta, j, 0.0, None)
        spec = _lanczos(_AsOperator(system), 0.0, _LANCZOS_STEPS, _generator(self.device, 0), raise_npd=False)
        v = spec.bottom[:, 0]
        rho = float(v @ system.apply(v[:, None])[:, 0])
        self.cg_iterations += system.cg_iterations
        return rho, v, max(abs(spec.lam_max), abs(spec.lam_min))

    def _escape(
        self, j: int, theta: Tensor, g: Tensor, f: Tensor, rho: float, v: Tensor, tol: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """A step from the saddle point θ along the direction v of negative curvature ρ, signed downhill: the
        longest α of 1, ½, ¼, … with R₋S(θ + α v) ≤ R₋S(θ) + α gᵀv + ρα²/4 (half the decrease of the quadratic
        model, which small α attain)."""
        if float(g @ v) > 0:
            v = -v
        gv = float(g @ v)
        alpha = 1.0
        for _h in range(_MAX_HALVINGS):
            trial = theta + alpha * v
            Gt, Ft = self.objective_at(trial[:, None], torch.tensor([j], device=self.device))
            if float(Ft[0]) <= float(f) + alpha * gv + 0.25 * rho * alpha * alpha:
                return trial, Gt[:, 0], Ft[0]
            alpha *= 0.5
        raise ConvergenceError(
            f"retrain_loo: no step along the direction of negative curvature ({rho:.3g}) decreased the leave-out "
            f"objective of {self.removal_label(j)}",
            grad_norm=float(g.norm()),
            tol=tol,
        )

    def _at(
        self, theta: Tensor, j: int, damping: float, precondition: Optional[Callable[[Tensor], Tensor]]
    ) -> LeaveOut:
        """The leave-out system of removal j with its Hessian at θ (instead of θ̂), a single column,
        preconditioned by ``precondition``."""
        fm = self.fm.at(theta)
        op = HessianOperator(fm, self.data, self.l2, self.op.batch_size)
        removed = self.removed if self.group else self.removed[j : j + 1]
        out = LeaveOut(
            fm,
            op,
            self.prep,
            self.data,
            damping,
            removed,
            self.group,
            self.rows,
            _NEWTON_CG_TOL,
            dense_hessian=False,
        )
        out.precondition = precondition
        out.deadline = self.deadline
        return out

    def _newton_cg(
        self,
        j: int,
        theta: Tensor,
        g: Tensor,
        f: Tensor,
        tol: float,
        budget: int,
        precondition: Optional[Callable[[Tensor], Tensor]],
        deadline: Optional[float] = None,
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """Newton-CG for removal j from θ, ∇R₋ = g, R₋ = f: each step solves (∇²R₋(θ) + μI) d = g by
        preconditioned CG (relative residual 1e-8) and line-searches along −d. The damping μ follows
        Levenberg–Marquardt: 0 while ∇²R₋(θ) is positive definite; where it is not (or d is no descent
        direction), μ starts at ``_LM_START`` · max(λ, 1e-2) and grows ×10; after a full step it shrinks ÷10 (to 0
        below the start), so the iteration turns quadratic once the curvature at θ is positive again.
        Returns (θ, g, f, steps)."""
        start = _LM_START * max(self.lam, 1e-2)
        cap = _LM_MAX * max(self.lam, 1e-2)
        mu = 0.0
        used = 0
        one = torch.ones(1, dtype=torch.bool, device=self.device)
        while used < budget and float(g.norm()) > tol:
            _check_deadline(deadline, self, j, float(g.norm()), tol)
            system = self._at(theta, j, mu, precondition)
            failure: Optional[NotPositiveDefiniteError] = None
            try:
                d = system.solve(g[:, None], "retrain_loo (Newton-CG)")
            except NotPositiveDefiniteError as err:
                failure = err
            self.cg_iterations += system.cg_iterations
            if failure is not None or not float((g[:, None] * d).sum()) > 0:  # (or curvature CG missed)
                mu = start if mu == 0.0 else mu * 10.0
                if mu > cap:
                    raise failure or NotPositiveDefiniteError(
                        f"retrain_loo (Newton-CG, {self.removal_label(j)}): no descent direction up to damping "
                        f"{cap:g}; the leave-out objective is not locally convex there",
                        suggested_damping=cap,
                    )
                continue
            T, G, F = system._line_search(
                theta[:, None], g[:, None], f.reshape(1), d, one, tol, "retrain_loo"
            )
            full = bool(torch.allclose(theta - T[:, 0], d[:, 0]))
            theta, g, f = T[:, 0], G[:, 0], F[0]
            used += 1
            if full and mu > 0.0:
                mu = mu / 10.0 if mu / 10.0 >= start else 0.0
        return theta, g, f, used


def _check_deadline(
    deadline: Optional[float], system: LeaveOut, j: int, grad_norm: float, tol: float
) -> None:
    """ConvergenceError once ``time.perf_counter()`` has passed ``deadline`` (retrain_loo's ``max_seconds``)."""
    if deadline is not None and time.perf_counter() > deadline:
        raise ConvergenceError(
            f"retrain_loo: the time limit (max_seconds) ran out while retraining without {system.removal_label(j)}, "
            f"at ‖∇R₋‖ = {grad_norm:.3g} (tol={tol:g}); raise max_seconds, or check whether the removal leaves θ̂ a "
            f"saddle point of the leave-out objective (loo_change(method='newton') raises NotPositiveDefiniteError "
            f"for it): its retraining then follows the negative curvature to another, possibly distant, minimum",
            grad_norm=grad_norm,
            tol=tol,
        )


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


class _AsOperator:
    """A leave-out system seen as the Hessian operator the solvers' Lanczos process takes (``matvec`` = A_S)."""

    def __init__(self, system: LeaveOut) -> None:
        self.system = system
        self.n_params = system.fm.n_params
        self.dtype, self.device = system.dtype, system.device
        self.n_train = system.n - system.s

    def matvec(self, V: Tensor) -> Tensor:
        return self.system.apply(V)

    def sample_matvec(self, V: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError("the leave-out system has no minibatch Hessian-vector products")

    def dense(self) -> Tensor:
        raise NotImplementedError("the leave-out system is not materialised")


def _cholesky_solve(L: Tensor, R: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ R in L's dtype, returned in R's."""
    return cholesky_solve(L, R.to(L.dtype)).to(R.dtype)


def default_retrain_tol(dtype: torch.dtype) -> float:
    """The gradient-norm tolerance of ``retrain_loo(tol=None)`` for the computation dtype."""
    return float(RETRAIN_TOL.get(dtype, 1e-4))
