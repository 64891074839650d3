"""``CG`` and ``BlockCG``: conjugate gradients over Hessian-vector products for many right-hand sides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import (
    check_bool,
    check_damping,
    check_int,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _check_operator,
    _col_norms,
    _fmt,
    _matvec,
    _normalise_device,
    _npd_error,
    _relative,
    _set,
    _true_residual,
)
from pyinfluence.torch.solvers.lanczos import _sharpen_negative_curvature

# CG: on CUDA, convergence is checked every this many iterations (one host synchronisation).
_CG_CUDA_CHECK_EVERY = 10


# ==============================================================================================
# CG: block conjugate gradients
# ==============================================================================================
@dataclass(frozen=True)
class CG(Solver):
    """Block conjugate gradients on (H + λI) X = V, one batched HVP per iteration.

    Each column runs its own CG recursion (its own step sizes α and β) from x₀ = 0, but all
    columns that have not converged yet share one ``op.matvec`` call per iteration; converged
    columns are frozen and dropped from the batch. Stops a column when its (recursively updated)
    residual satisfies ‖r‖ ≤ tol·‖v‖. At the end one more batched HVP recomputes the true
    residuals ‖(H + λI)x − v‖/‖v‖ reported in the result (in float32 they stall near
    1e-7·cond(H + λI) even when the recursive residual goes lower). CG on Hessian-vector
    products follows Martens 2010 ("Deep learning via Hessian-free optimization").

    Parameters
    ----------
    tol : float, default 1e-8
        Relative residual tolerance, 0 < tol < 1.
    max_iter : int or None, default None
        Iterations (batched HVPs) at most. None: min(10·p, 1000) — in exact arithmetic CG ends in
        ≤ p iterations; in floating point, ill-conditioned systems need a few times more.
    raise_on_nonconvergence : bool, default True
        If some column has not reached ``tol`` after ``max_iter`` iterations, raise
        ConvergenceError (its ``result`` attribute holds the unconverged SolveResult); with
        False, warn (:class:`~pyinfluence.errors.ConvergenceWarning`, a RuntimeWarning) and return
        it, ``info["converged"]`` marking the columns.
    check_every : int or None, default None
        Check convergence (a host synchronisation) every this many iterations. None: every
        iteration on the CPU, every 10 on CUDA (so the GPU is never stalled by the host; columns
        that converge in between are frozen on the device, so the result is the same).

    Raises NotPositiveDefiniteError if a search direction has non-positive curvature
    pᵀ(H + λI)p ≤ 0: H + λI is not positive definite (the message suggests a damping).

    Cost per solve: iterations × one batched HVP (over the columns still active), plus one
    batched HVP of the nonzero columns for the reported residuals; memory about six (p, r)
    blocks besides the HVP's own. In float32, tolerances below about 1e-6 cost iterations
    without lowering the true residual further (``info["recursive_residual"]`` shows the
    recursion's own estimate).
    """

    tol: float = 1e-8
    max_iter: int | None = None
    raise_on_nonconvergence: bool = True
    check_every: int | None = None

    name: ClassVar[str] = "cg"

    def __post_init__(self) -> None:
        tol = check_positive_float("tol", self.tol)
        if tol >= 1:
            raise ValueError(f"tol must be < 1 (a relative residual), got {tol}")
        _set(self, "tol", tol)
        if self.max_iter is not None:
            _set(self, "max_iter", check_int("max_iter", self.max_iter, 1))
        _set(
            self,
            "raise_on_nonconvergence",
            check_bool("raise_on_nonconvergence", self.raise_on_nonconvergence),
        )
        if self.check_every is not None:
            _set(self, "check_every", check_int("check_every", self.check_every, 1))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedCG:
        _check_operator(op, ("matvec",))
        damping = check_damping(damping)
        p = op.n_params
        max_iter = self.max_iter if self.max_iter is not None else min(10 * p, 1000)
        dev = _normalise_device(op.device)
        check_every = self.check_every or (_CG_CUDA_CHECK_EVERY if dev.type == "cuda" else 1)
        info = {"max_iter": max_iter, "tol": self.tol}
        return _PreparedCG(self, op, damping, info, 0.0, max_iter, check_every)


class _PreparedCG(PreparedSolver):
    solver: CG

    def __init__(self, solver, op, damping, info, prepare_time_s, max_iter, check_every) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._max_iter = max_iter
        self._check_every = check_every

    def _solve(self, V: Tensor):
        op, lam, tol = self.op, self.damping, self.solver.tol
        r = V.shape[1]
        dev = V.device
        X = torch.zeros_like(V)
        bnorm = _col_norms(V)
        iters = torch.zeros(r, dtype=torch.long, device=dev)
        rr_all = bnorm.square()
        thresh_all = (tol * bnorm).square()
        act = torch.nonzero(bnorm > 0).flatten()  # zero columns: x = 0 exactly, never iterated
        R = V.index_select(1, act)
        P = R.clone()
        Xa = torch.zeros_like(R)
        rr = rr_all.index_select(0, act)
        th = thresh_all.index_select(0, act)
        it_a = torch.zeros_like(act)
        done = torch.zeros_like(act, dtype=torch.bool)
        bad = torch.zeros_like(done)  # columns that met non-positive curvature
        broken = torch.zeros_like(done)  # columns whose HVP was NaN/inf
        curv_min = torch.zeros_like(rr)  # its Rayleigh quotient pᵀAp/pᵀp
        rq_max = torch.zeros((), dtype=V.dtype, device=dev)  # λ_max(H+λI) lower estimate
        calls = columns = 0
        n_it = 0
        n_active = int(act.numel())
        while n_active and n_it < self._max_iter:
            AP = _matvec(op, P, lam)
            calls += 1
            columns += n_active
            pAp = (P * AP).sum(0)
            pp = (P * P).sum(0)
            live = ~done
            finite = torch.isfinite(pAp)
            broken |= live & ~finite
            neg = live & (pAp <= 0)
            ok = live & finite & (pAp > 0)
            rq = pAp / torch.where(pp > 0, pp, torch.ones_like(pp))
            curv_min = torch.where(neg & ~bad, rq, curv_min)
            bad |= neg
            rq_max = torch.maximum(rq_max, torch.where(finite, rq, 0.0).max())
            alpha = torch.where(ok, rr / torch.where(ok, pAp, torch.ones_like(pAp)), 0.0)
            Xa.add_(P * alpha)
            R.sub_(AP * alpha)
            rr_new = (R * R).sum(0)
            beta = torch.where(ok, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)), 0.0)
            P = torch.addcmul(R, P, beta)
            rr = torch.where(ok, rr_new, rr)
            it_a += ok
            done |= rr <= th
            n_it += 1
            if n_it % self._check_every == 0 or n_it == self._max_iter:
                if bool(bad.any()):
                    self._raise_npd(curv_min[bad], rq_max, n_it)
                if bool(broken.any()) or not bool(torch.isfinite(rr).all()):
                    raise ConvergenceError(
                        f"CG: the residuals became NaN or infinite at iteration {n_it}: the "
                        f"Hessian-vector products returned non-finite values (check the model "
                        f"and loss at these weights) or H + λI is extremely ill-conditioned "
                        f"(add damping; damping={lam:g} now)"
                    )
                if bool(done.any()):  # write back and drop the converged columns
                    idx = act[done]
                    X.index_copy_(1, idx, Xa[:, done])
                    rr_all.index_copy_(0, idx, rr[done])
                    iters.index_copy_(0, idx, it_a[done])
                    keep = ~done
                    act, Xa, R, P = act[keep], Xa[:, keep], R[:, keep], P[:, keep]
                    rr, th, it_a = rr[keep], th[keep], it_a[keep]
                    bad, curv_min, broken = bad[keep], curv_min[keep], broken[keep]
                    done = done[keep]
                    n_active = int(act.numel())
        if n_active:
            X.index_copy_(1, act, Xa)
            rr_all.index_copy_(0, act, rr)
            iters.index_copy_(0, act, it_a)
        converged = rr_all <= thresh_all
        res, k = _true_residual(op, X, V, lam)
        calls += int(k > 0)
        columns += k
        n_iter = int(iters.max()) if r else 0
        info = {
            "converged": converged,
            "iterations_per_column": iters,
            "recursive_residual": _relative(rr_all.sqrt(), bnorm),
            "lambda_max_estimate": float(rq_max),
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if n_active:
            self._report_not_converged("CG", X, n_iter, res, converged, info, float(rq_max))
        return X, n_iter, res, None, info

    def _report_not_converged(
        self, who: str, X: Tensor, n_iter: int, res: Tensor, converged: Tensor, info: dict, rq_max: float
    ) -> None:
        """ConvergenceError (or, with ``raise_on_nonconvergence=False``, a warning) after ``max_iter`` iterations,
        with the advice that fits CG: ``rq_max`` (the largest Rayleigh quotient seen) bounds λ_max(H + λI) below."""
        self._not_converged(
            who,
            X,
            n_iter,
            res,
            None,
            converged,
            info,
            f"in max_iter={self._max_iter} iterations",
            f"Increase max_iter, loosen tol, or add damping, which improves the conditioning "
            f"of H + λI (damping={self.damping:g} now; the largest eigenvalue of H + λI is at least "
            f"{_fmt(rq_max)})",
        )

    def _raise_npd(self, curv: Tensor, rq_max: Tensor, n_it: int) -> None:
        c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), "CG")
        raise _npd_error(
            "CG",
            f"a search direction p at iteration {n_it} has curvature pᵀ(H + λI)p / pᵀp = "
            f"{_fmt(float(curv.min()))}{note}; the smallest curvature",
            c,
            self.damping,
            float(rq_max),
        )


@dataclass(frozen=True)
class BlockCG(CG):
    """True block conjugate gradients: all right-hand sides share one Krylov space.

    :class:`CG` runs an independent recursion per column (batched into one HVP call). Block CG
    (O'Leary 1980) searches, at iteration k, the span of all columns' Krylov spaces: with r
    right-hand sides the search space grows by up to r dimensions per batched HVP, so on the
    clustered spectra of ML Hessians it needs far fewer iterations (each costs the same batched
    HVP of the unconverged columns' directions). Rank deficiency of the search block — the usual
    breakdown of block CG when columns become (nearly) linearly dependent — is handled as in Ji &
    Li 2017 ("A breakdown-free block conjugate gradient method"): the new block is orthonormalised
    by an SVD and directions with singular values below ``rank_tol`` × the largest are dropped.

    Iteration (P orthonormal, p×s; R the p×r residuals; A = H + λI)::

        Q = A P;  Pᵀ A P = Pᵀ Q (s×s, SPD iff A is on span P)
        α = (PᵀQ)⁻¹ Pᵀ R;  X += P α;  R −= Q α
        β = −(PᵀQ)⁻¹ Qᵀ R_active;  P = orth(R_active + P β)

    Parameters are those of :class:`CG` (``tol`` per column on the recursively updated residual,
    ``max_iter``, ``raise_on_nonconvergence``; ``check_every`` is ignored: every iteration
    synchronises to factorise PᵀQ), plus ``rank_tol`` (default 1e-10 in float64, 1e-5 in float32
    when None). The reported residuals are true ones, from one extra batched HVP, as for CG.
    Raises NotPositiveDefiniteError when PᵀAP is not positive definite (a Ritz value ≤ 0).
    Memory: a few (p, r) blocks, like CG.
    """

    rank_tol: float | None = None

    name: ClassVar[str] = "block_cg"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank_tol is not None:
            rt = check_positive_float("rank_tol", self.rank_tol)
            if rt >= 1:
                raise ValueError(f"rank_tol must be < 1 (relative to the largest singular value), got {rt}")
            _set(self, "rank_tol", rt)

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedBlockCG:
        base = super().prepare(op, damping)
        return _PreparedBlockCG(self, op, base.damping, dict(base.info), 0.0, base._max_iter, 1)


class _PreparedBlockCG(_PreparedCG):
    solver: BlockCG

    def _orth(self, Z: Tensor) -> Tensor:
        """Orthonormal basis of span Z, rank-revealing (drops directions below rank_tol·σ_max)."""
        U, sv, _ = torch.linalg.svd(Z, full_matrices=False)
        if sv.numel() == 0 or not bool(sv[0] > 0):
            return U[:, :0]
        rt = self.solver.rank_tol
        if rt is None:
            rt = 1e-10 if Z.dtype == torch.float64 else 1e-5
        return U[:, sv > rt * sv[0]]

    def _solve(self, V: Tensor):
        op, lam, tol = self.op, self.damping, self.solver.tol
        r = V.shape[1]
        X = torch.zeros_like(V)
        bnorm = _col_norms(V)
        thresh = tol * bnorm
        R = V.clone()
        active = bnorm > 0  # zero columns: x = 0 exactly
        calls = columns = 0
        n_it = 0
        iters = torch.zeros(r, dtype=torch.long, device=V.device)
        rq_max = 0.0
        rnorm = bnorm.clone()
        P = self._orth(R[:, active]) if bool(active.any()) else R[:, :0]
        while P.shape[1] and n_it < self._max_iter:
            Q = _matvec(op, P, lam)
            calls += 1
            columns += int(P.shape[1])
            PtQ = P.T @ Q
            PtQ = 0.5 * (PtQ + PtQ.T)
            if not bool(torch.isfinite(PtQ).all()):
                raise ConvergenceError(
                    f"block CG: the Hessian-vector products returned non-finite values at "
                    f"iteration {n_it + 1} (check the model and loss at these weights, or add "
                    f"damping; damping={lam:g} now)"
                )
            ritz = torch.linalg.eigvalsh(PtQ)  # Ritz values of H + λI on span P
            rq_max = max(rq_max, float(ritz[-1]))
            if not bool(ritz[0] > 0):
                self._raise_npd(ritz[:1], torch.tensor(rq_max), n_it + 1)
            L = torch.linalg.cholesky(PtQ)
            alpha = torch.cholesky_solve(P.T @ R, L)  # (s, r): all columns take the step
            X.addmm_(P, alpha)
            R.sub_(Q @ alpha)
            n_it += 1
            rnorm = _col_norms(R)
            iters += active.long()
            active = active & (rnorm > thresh)
            if not bool(active.any()):
                break
            Ra = R[:, active]
            beta = -torch.cholesky_solve(Q.T @ Ra, L)
            P = self._orth(Ra + P @ beta)
        converged = rnorm <= thresh
        res, k = _true_residual(op, X, V, lam)
        calls += int(k > 0)
        columns += k
        info = {
            "converged": converged,
            "iterations_per_column": iters,
            "recursive_residual": _relative(rnorm, bnorm),
            "lambda_max_estimate": rq_max,
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if not bool(converged.all()):
            self._report_not_converged("block CG", X, n_it, res, converged, info, float(rq_max))
        return X, n_it, res, None, info

    def _raise_npd(self, curv: Tensor, rq_max: Tensor, n_it: int) -> None:
        c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), "block CG")
        raise _npd_error(
            "block CG",
            f"the search block P at iteration {n_it} has a direction p with curvature "
            f"pᵀ(H + λI)p / pᵀp = {_fmt(float(curv.min()))} (the smallest Ritz value on span P)"
            f"{note}; the smallest curvature",
            c,
            self.damping,
            float(rq_max),
        )
