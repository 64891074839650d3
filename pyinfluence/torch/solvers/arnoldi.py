"""``Arnoldi``: (H + λI)⁻¹ V in the top-r eigenspace of H, found by a block Krylov method on HVPs only.

Schioppa, Zablotskaia, Vilar & Sokolov 2022 ("Scaling Up Influence Functions", AAAI): run
Arnoldi's method on H = ∇²R(θ̂) of R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖² (the L2 term included)
with Hessian-vector products only, keep the r Ritz pairs of largest |σ|, and invert H in their span.
H is symmetric, so Arnoldi's Hessenberg matrix is (block) tridiagonal and the method is (block)
Lanczos; here it is run with full reorthogonalisation in float64, which makes it Arnoldi's
recurrence literally (every new block is orthogonalised against all previous ones and the
coefficients form the block Hessenberg matrix T = QᵀHQ).

With H ≈ U diag(σ) Uᵀ (U (p, r) orthonormal Ritz vectors, σ the Ritz values, H including the l2
term), the solution is

    X = U diag(1/(σ + λ)) Uᵀ V + (complement term)

- ``complement="project"`` (Schioppa et al.'s choice: gradients projected onto the top-r
  eigenspace): no complement term.
- ``complement="damped"``: the directions outside span U get curvature l2 + λ, the floor that the
  l2 term guarantees: + (I − UUᵀ)V / (l2 + λ). This makes H ≈ U diag(σ)Uᵀ + l2(I − UUᵀ).

The default is ``"damped"``: on a digits MLP its up_loss agreed better with Exact's at every rank
tried; blocks of 8 columns per HVP were the fastest per converged eigenpair on CPU (the numbers
are in :class:`Arnoldi`'s docstring).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import check_damping, check_int
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _check_operator,
    _check_residual_columns,
    _check_seed,
    _check_stopping_fields,
    _fmt,
    _generator,
    _matvec,
    _normalise_device,
    _npd_error,
    _round_up,
    _sampled_residual_and_curvature,
    _set,
    _state_field,
    _state_tensor,
)
from pyinfluence.torch.solvers.lanczos import _sharpen_negative_curvature

_COMPLEMENTS = ("damped", "project")
_F64 = torch.float64
# Default Krylov basis dimension: this many times the rank (capped at p); see Arnoldi's docstring.
_KRYLOV_PER_RANK = 4
_KRYLOV_MIN_BLOCK_STEPS = 12
# A block column whose norm after orthogonalisation is below this fraction of the scale of H seen
# so far is a direction the Krylov space already holds (an invariant subspace, a repeated
# eigenvalue): it is replaced by a fresh random direction.
_DEFLATION_TOL = 1e-10
# Gaussian probes (at least; block_size when larger) of the trace estimate: one batched HVP in prepare.
_TRACE_PROBES = 8


@dataclass(frozen=True)
class Arnoldi(Solver):
    """Low-rank solve of (H + λI) X = V in the top-r eigenspace of H (Schioppa et al. 2022).

    ``prepare`` finds the r Ritz pairs of H of largest magnitude with a block Krylov method
    (block Lanczos with full reorthogonalisation in float64 — Arnoldi's recurrence on a symmetric
    matrix) driven by Hessian-vector products only; ``solve`` applies, with H ≈ U diag(σ) Uᵀ
    (U (p, r) orthonormal Ritz vectors, σ the Ritz values, H including the l2 term):

        X = U diag(1/(σ + λ)) Uᵀ V + (complement term)

    - ``complement="project"`` (Schioppa et al.'s choice: gradients projected onto the top-r
      eigenspace): no complement term.
    - ``complement="damped"`` (the directions outside span U get curvature l2 + λ, the floor that
      the l2 term guarantees): + (I − UUᵀ)V / (l2 + λ). This makes
      H ≈ U diag(σ)Uᵀ + l2(I − UUᵀ).

    With ``rank = p`` both are the exact solve (up to the Krylov process's rounding). Signs: X
    approximates (H + λI)⁻¹V, so ``up_loss = −g_testᵀ X`` as for every solver.

    Parameters
    ----------
    rank : int, default 50
        r, the number of Ritz pairs kept (those of largest |σ|, Schioppa et al.'s choice); capped
        at p.
    krylov_steps : int or None, default None
        m, the dimension of the Krylov basis: the number of HVP columns the Krylov process
        computes, in m / b operator calls (m is rounded up to a multiple of ``block_size`` and
        capped at p). Must be ≥ rank. None: max(4·rank, 12·block_size) — oversampling, since the
        Ritz pairs at the end of the kept range converge last, and at least 12 block steps, since
        the accuracy grows with the degree m/b of the Krylov polynomials. Measured on the digits
        MLP below (b = 8), the error of (H + λI)⁻¹-applied test gradients against a converged
        reference: rank 20: 7e-2, 3e-3, 3e-6 at m = 3r, 4r, 5r; rank 50: 1e-6, 2e-12 at 3r, 4r;
        rank 100: 4e-9 at 3r (single-vector Lanczos, b = 1: 1e-7 or less at 3r). The Pearson
        correlation with Exact's up_loss moved by less than 0.006 over all of these, so fewer
        steps are a fair trade where only rankings matter; ``info["ritz_residuals"]`` says how
        far the kept pairs are from convergence.
    block_size : int, default 8
        b, columns per HVP call: the Krylov space is span{Ω, HΩ, H²Ω, …} of a random (p, b)
        block Ω, built by block Lanczos (b = 1: plain Lanczos). Chosen by measurement on CPU, on
        a 64-32-10 tanh MLP fitted to 1000 load_digits images (p = 2410, l2 = 1e-3), rank 50,
        ``HessianOperator.matvec``: one call of b = 1 / 16 columns took 2.3 / 25 ms (float64, one
        thread; float32 2.1 / 8 ms; two threads 1.6 / 9.6 ms and 1.4 / 5.7 ms), but a block
        Krylov space needs more columns for the same accuracy (all 50 Ritz values within 1e-6
        of the eigenvalues: m = 95, 120, 136, 176, 256 for b = 1, 4, 8, 16, 32; the
        eigenvectors converge as the square root of that). Time per
        converged eigenpair, float64 / float32, one thread: b = 1: 7.5 / 5.0 ms, b = 4: 5.6 /
        2.9, b = 8: 5.4 / 3.4, b = 16: 6.3 / 3.7, b = 32: 12.1 / 6.4 ms; two threads (float32):
        4.0, 2.0, 1.7, 2.1, 3.1 ms. Larger blocks may pay on a GPU. Capped at m.
    complement : {"damped", "project"}, default "damped"
        The term for the directions outside span U, see above. ``"damped"`` needs the operator's
        ``l2`` (``HessianOperator.l2``) and l2 + λ > 0 unless rank = p. The default was chosen by
        the Pearson correlation of up_loss = −gᵀX with Exact's over 1000 training × 100 test
        points of the digits MLP (λ = 0; ranks 5, 10, 20, 50, 100, 200): l2 = 1e-3: damped
        0.38, 0.54, 0.58, 0.58, 0.69, 0.81, project 0.14, 0.21, 0.28, 0.47, 0.61, 0.72;
        l2 = 1e-2: damped 0.53, 0.82, 0.83, 0.87, 0.95, 0.98, project 0.34, 0.41, 0.43, 0.69,
        0.88, 0.92 — damped was better at every rank, in a second seed too.
    tol : float or None, default None
        None: never fail on the residual (a low-rank solve's residual is not small; it is
        reported in ``SolveResult.residual``). A float: raise ConvergenceError when some column's
        true relative residual ‖(H + λI)x − v‖/‖v‖ exceeds it (or warn, with
        ``raise_on_nonconvergence=False``).
    raise_on_nonconvergence : bool, default True
        As for :class:`CG`; only used when ``tol`` is set.
    seed : int or None, default 0
        Seed of the random start block Ω, of the refills of deflated directions and of the
        trace probes (None: fresh ones each time).
    residual_columns : int or None, default None
        None: the true residual ‖(H + λI)x − v‖/‖v‖ and the curvature xᵀ(H + λI)x of every solution
        column, from one batched HVP of all r columns. At scale that check is the dominant cost of a
        solve for many test points (each column costs about three passes over the training data; the
        approximation's own solve, none): an int k measures at most k columns, evenly spaced over the
        block (first and last included; all when r ≤ k); ``SolveResult.residual`` then holds those
        columns' residuals only and ``info["residual_columns"]`` their indices. Needs ``tol=None``.

    ``prepare``: m/b batched full-training-set HVPs of b columns for the Krylov space, plus one
    of max(b, 8) columns for the trace estimate (``info["matvec_calls"]``,
    ``info["matvec_columns"]``), about 6·p·m² flops of reorthogonalisation (classical
    Gram–Schmidt, twice, against the whole basis) and an m × m eigendecomposition, all in
    float64 (the HVPs in the operator's dtype). Memory: the basis, p·m float64, while preparing;
    U, p·r float64, afterwards. ``solve``: about 4·p·r·k flops for k right-hand sides, plus one
    batched HVP for the reported true residual (``SolveResult.info["matvec_calls"]``).

    Raises NotPositiveDefiniteError (with ``suggested_damping``) when a Ritz value σ of the whole
    Krylov space has σ + λ ≤ 0 (its Ritz vector u has uᵀ(H + λI)u ≤ 0: the true H + λI is not
    positive definite), when ``complement="damped"`` and l2 + λ ≤ 0 with rank < p, and when a
    solution column has curvature xᵀ(H + λI)x ≤ 0; NonFiniteError when an HVP or the solution is
    not finite; ConvergenceError (or ConvergenceWarning) past ``tol``.

    Diagnostics in ``prepared.info``: ``ritz_values`` (r,) σ (float64, CPU, by decreasing |σ|),
    ``ritz_range`` (min σ, max σ), ``ritz_residuals`` (r,) ‖Hu − σu‖ per kept pair (from the
    Krylov relation H Q = Q T + F E_lastᵀ, no extra HVP; every σ is within it of an eigenvalue of
    H), ``smallest_ritz_value`` over the whole basis (an upper bound of λ_min(H)),
    ``trace_estimate`` of tr(H) with ``trace_estimate_stderr``, and ``trace_fraction``
    Σσ / trace_estimate, the share of tr(H) in the kept eigenspace (on the digits MLP, rank 50:
    0.632 estimated, 0.634 exact). The trace is tr(QᵀHQ) (exact, from T) plus Hutchinson's
    estimate of tr((I − QQᵀ)H(I − QQᵀ)) from max(b, 8) Gaussian probes drawn independently of
    the basis Q and projected off it (Hutch++, Meyer, Musco, Musco & Woodruff 2021, with the
    Krylov basis as the deflation space): unbiased, and accurate because the top of the spectrum
    is deflated; it costs one batched HVP. ``matvec_calls``, ``matvec_columns``, ``rank``,
    ``krylov_steps`` (m), ``block_size``, ``deflations`` (directions refilled at random when the
    Krylov space became invariant). Each ``SolveResult.info`` repeats ``rank``, ``complement``,
    ``ritz_range`` and ``trace_fraction``.

    Threads: the configuration is immutable; a prepared solver is read-only after ``prepare``
    apart from the start time each solve records (as every solver's), so serialise solves as
    :class:`~pyinfluence.TorchInfluence` does.
    """

    rank: int = 50
    krylov_steps: int | None = None
    block_size: int = 8
    complement: str = "damped"
    tol: float | None = None
    raise_on_nonconvergence: bool = True
    seed: int | None = 0
    residual_columns: int | None = None

    name: ClassVar[str] = "arnoldi"
    _restore_needs: ClassVar[tuple[str, ...]] = ("matvec",)

    def __post_init__(self) -> None:
        _set(self, "rank", check_int("rank", self.rank, 1))
        if self.krylov_steps is not None:
            steps = check_int("krylov_steps", self.krylov_steps, 1)
            if steps < self.rank:
                raise ValueError(
                    f"krylov_steps must be >= rank={self.rank} (the Krylov basis holds the Ritz "
                    f"vectors), got {steps}; or pass krylov_steps=None for {_KRYLOV_PER_RANK}·rank"
                )
            _set(self, "krylov_steps", steps)
        _set(self, "block_size", check_int("block_size", self.block_size, 1))
        if not isinstance(self.complement, str) or self.complement.strip().lower() not in _COMPLEMENTS:
            raise ValueError(f"complement must be 'damped' or 'project', got {self.complement!r}")
        _set(self, "complement", self.complement.strip().lower())
        _check_stopping_fields(self, optional_tol=True)
        _set(self, "seed", _check_seed("seed", self.seed))
        _check_residual_columns(self)

    def config(self) -> dict[str, Any]:
        """As :meth:`Solver.config`, with ``residual_columns`` written only when set (a configuration
        written before the field existed is the same configuration)."""
        cfg = super().config()
        if self.residual_columns is None:
            cfg.pop("residual_columns", None)
        return cfg

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedArnoldi:
        who = type(self).__name__
        _check_operator(op, ("matvec",))
        damping = check_damping(damping)
        p = int(op.n_params)
        r = min(self.rank, p)
        b = self.block_size
        if self.krylov_steps is not None:
            m = self.krylov_steps
        else:  # see the docstring: enough columns per kept pair, and enough block steps
            m = max(_KRYLOV_PER_RANK * r, _KRYLOV_MIN_BLOCK_STEPS * b)
        m = min(m, p)
        b = min(b, m)
        m = min(-(-m // b) * b, p)  # whole blocks (the Krylov relation's remainder is the last block's)
        damped = self.complement == "damped" and r < p
        l2 = 0.0
        if damped:
            if not hasattr(op, "l2"):
                raise TypeError(
                    f"{who}(complement='damped') gives the directions outside the top-{r} eigenspace the "
                    f"curvature l2 + λ and needs the L2 coefficient included in H: op must have an 'l2' "
                    f"attribute (pyinfluence.torch.hessian.HessianOperator does), {type(op).__name__} "
                    f"lacks it; pass complement='project' or rank >= n_params={p}"
                )
            l2 = float(op.l2)
            if not math.isfinite(l2):
                raise ValueError(f"op.l2 must be finite, got {l2}")
        start = time.perf_counter()
        dev = _normalise_device(op.device)
        gen = _generator(dev, self.seed)
        kr = _block_krylov(op, m, b, gen, who)
        theta, Y = torch.linalg.eigh(kr.T)  # ascending Ritz values of H on the Krylov space
        theta_min, theta_max = float(theta[0]), float(theta[-1])
        if theta_min + damping <= 0.0:
            # uᵀ(H + λI)u = θ_min + λ ≤ 0 for its Ritz vector u: the true H + λI is indefinite
            c = theta_min + damping
            note = ""
            if m < 40:  # a short Krylov space sees little of λ_min: sharpen as CG does
                c, note = _sharpen_negative_curvature(op, damping, c, who)
            raise _npd_error(
                who,
                f"the Krylov space of dimension {m} (rank={r}) holds a Ritz vector u with "
                f"curvature uᵀ(H + λI)u / uᵀu = {_fmt(theta_min + damping)}{note}; the smallest curvature",
                c,
                damping,
                theta_max + damping,
            )
        if damped and l2 + damping <= 0.0:
            scale = max(abs(theta_min), abs(theta_max))
            suggest = _round_up(max(1e-4 * scale, 1e-12) - (l2 if l2 < 0 else 0.0))
            raise NotPositiveDefiniteError(
                f"{who}(complement='damped') gives the {p - r} directions outside the top-{r} eigenspace "
                f"the curvature l2 + λ = {_fmt(l2 + damping)} ≤ 0 (l2={l2:g}, damping={damping:g}): the "
                f"approximation of H + λI is singular there. Pass damping > {_fmt(max(-l2, 0.0))}, e.g. "
                f"damping={suggest:g}, or complement='project'",
                size=p,
                min_pivot=l2 + damping,
                suggested_damping=suggest,
            )
        keep = torch.argsort(theta.abs(), descending=True, stable=True)[:r]  # largest |σ| first
        sigma = theta[keep]
        Yr = Y[:, keep]
        U = kr.Q @ Yr.to(kr.Q.device)  # (p, r) float64 Ritz vectors, orthonormal
        # ‖Hu − σu‖ = ‖F Y_last u‖ from the block Krylov relation H Q = Q T + F E_lastᵀ
        ritz_res = torch.linalg.vector_norm(kr.F_coef @ Yr[-kr.F_coef.shape[1] :], dim=0)
        s64 = sigma.cpu()
        info: dict[str, Any] = {
            "rank": r,
            "krylov_steps": m,
            "block_size": b,
            "complement": self.complement,
            "matvec_calls": kr.calls,
            "matvec_columns": kr.columns,
            "ritz_values": s64,
            "ritz_range": (float(s64.min()), float(s64.max())),
            "ritz_residuals": ritz_res.cpu(),
            "smallest_ritz_value": theta_min,
            "deflations": kr.deflations,
        }
        if damped:
            info["l2"] = l2
        trace = kr.trace_estimate
        info["trace_estimate"] = trace
        info["trace_estimate_stderr"] = kr.trace_stderr
        info["trace_fraction"] = float(s64.sum()) / trace if trace else None
        return _PreparedArnoldi(
            self,
            op,
            damping,
            info,
            time.perf_counter() - start,
            U,
            sigma.to(U.device),
            l2 if damped else None,
        )

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedArnoldi:
        """The saved Ritz vectors U (p, r) and values σ (r,) (float64), and the complement's l2."""
        who = "Arnoldi.restore"
        p = int(op.n_params)
        dev = _normalise_device(op.device)
        sigma = _state_tensor(tensors, "sigma", who, None, _F64, dev)
        r = int(sigma.shape[0]) if sigma.ndim == 1 else -1
        if r < 1 or r != min(self.rank, p):
            raise ValueError(
                f"{who}: the array 'sigma' has shape {tuple(sigma.shape)}, expected ({min(self.rank, p)},)"
            )
        U = _state_tensor(tensors, "U", who, (p, r), _F64, dev)
        l2 = state.get("l2") if isinstance(state, Mapping) else None
        if l2 is not None:
            l2 = float(_state_field(state, "l2", who, (int, float)))
        if (l2 is not None) != (self.complement == "damped" and r < p):
            raise ValueError(
                f"{who}: the saved state's field 'l2' = {l2!r} does not fit complement={self.complement!r}"
            )
        if l2 is not None and hasattr(op, "l2") and float(op.l2) != l2:
            raise ValueError(
                f"{who}: the state was prepared for l2={l2:g}, the operator has l2={float(op.l2):g}"
            )
        return _PreparedArnoldi(self, op, damping, info, 0.0, U, sigma, l2)


@dataclass
class _Krylov:
    """What the block Krylov process returns (see :func:`_block_krylov`)."""

    Q: Tensor  # (p, m) float64 orthonormal basis
    T: Tensor  # (m, m) float64 symmetric QᵀHQ, on the CPU
    F_coef: Tensor  # (k, k_last) float64 CPU: ‖F y‖ = ‖F_coef y‖ for the remainder F of the last block
    calls: int
    columns: int
    deflations: int
    trace_estimate: float
    trace_stderr: float | None


def _orthogonalise(W: Tensor, basis: Tensor) -> Tensor:
    """W ← (I − QQᵀ)W twice ("twice is enough", Giraud et al. 2005); returns the coefficients QᵀW."""
    C = basis.mT @ W
    W -= basis @ C
    C2 = basis.mT @ W
    W -= basis @ C2
    return C + C2


def _random_block(p: int, k: int, gen: torch.Generator, basis: Tensor) -> Tensor:
    """k orthonormal columns orthogonal to ``basis``, from Gaussian vectors drawn with ``gen``."""
    Z = torch.randn(p, k, dtype=_F64, device=gen.device, generator=gen).to(basis.device)
    if basis.shape[1]:
        _orthogonalise(Z, basis)
    Z, _ = torch.linalg.qr(Z)
    if basis.shape[1]:
        _orthogonalise(Z, basis)
        Z, _ = torch.linalg.qr(Z)
    return Z


def _block_krylov(op: HessianOperatorLike, m: int, b: int, gen: torch.Generator, who: str) -> _Krylov:
    """Block Arnoldi (= block Lanczos with full reorthogonalisation) for H, m basis vectors, blocks of b.

    Q₁R₀ = Ω (Gaussian, p × b); for each block Q_j: W = H Q_j (one batched HVP in the operator's
    dtype, accumulated in float64), C = [Q₁ … Q_j]ᵀ W by two Gram–Schmidt passes (the block
    Hessenberg column T[:, j]), then W = Q_{j+1} R_j by an SVD: W = P S Zᵀ, Q_{j+1} = P and
    T[j+1, j] = S Zᵀ; directions with S ≤ ``_DEFLATION_TOL``·‖T‖ (the space is invariant there: a
    repeated eigenvalue or an exhausted Krylov space) are replaced by random ones orthogonal to the
    basis, so the basis always grows to m. The last block's remainder F = (I − QQᵀ)H Q_last is kept
    through its coefficients. T is symmetrised (H is) before the caller's eigendecomposition.
    """
    p = int(op.n_params)
    dev = _normalise_device(op.device)
    dtype = op.dtype
    Q = torch.empty(p, m, dtype=_F64, device=dev)
    T = torch.zeros(m, m, dtype=_F64, device=dev)
    Omega = torch.randn(p, b, dtype=_F64, device=gen.device, generator=gen).to(dev)
    Q0, _ = torch.linalg.qr(Omega)
    Q[:, :b] = Q0
    j, k = 0, b  # the current block is Q[:, j : j + k]
    calls = deflations = 0
    scale = 0.0
    F_coef = torch.zeros(0, 0, dtype=_F64)
    while True:
        blk = Q[:, j : j + k]
        W = _matvec(op, blk.to(dtype), 0.0).to(_F64)
        calls += 1
        if not bool(torch.isfinite(W).all()):
            raise NonFiniteError(
                f"{who}: the Hessian-vector product returned NaN or infinity (operator call {calls}); "
                f"check the model and loss at these weights, or use float64",
                what="a Hessian-vector product",
            )
        C = _orthogonalise(W, Q[:, : j + k])
        T[: j + k, j : j + k] = C
        scale = max(scale, float(C.abs().max()))
        filled = j + k
        if filled >= m:
            # remainder F = W (p, k); keep R with F = (orthonormal) R: ‖F y‖ = ‖R y‖
            F_coef = torch.linalg.qr(W, mode="r")[1] if p > filled else torch.zeros(0, k, dtype=_F64)
            F_coef = F_coef.cpu()
            break
        k_next = min(b, m - filled)
        P, sv, Zh = torch.linalg.svd(W, full_matrices=False)  # W = P diag(sv) Zh
        floor = _DEFLATION_TOL * max(scale, float(sv[0]))  # sv is sorted, k ≥ 1 values
        good = min(int((sv > floor).sum()), k_next)
        if good:
            Pk = P[:, :good].clone()
            _orthogonalise(Pk, Q[:, :filled])  # a third pass: P's columns of small sv lost some
            Pk, Rk = torch.linalg.qr(Pk)
            Q[:, filled : filled + good] = Pk
            T[filled : filled + good, j : j + k] = Rk @ (sv[:good, None] * Zh[:good])
        if good < k_next:  # the rest of the next block: random, orthogonal to the basis (coefficients 0)
            deflations += k_next - good
            Q[:, filled + good : filled + k_next] = _random_block(
                p, k_next - good, gen, Q[:, : filled + good]
            )
        j, k = filled, k_next
    T = 0.5 * (T + T.mT)  # the block Hessenberg matrix of a symmetric H is symmetric up to rounding
    # tr(H) = tr(QᵀHQ) + tr((I − QQᵀ)H(I − QQᵀ)): the first exactly, the second by Hutchinson's estimator
    # with Gaussian probes ω independent of Q (Hutch++, Meyer et al. 2021, with the Krylov basis as the
    # deflation space): one more batched HVP, none when the basis spans ℝ^p
    trace = float(T.diagonal().sum())
    trace_stderr: float | None = 0.0
    columns = m
    if m < p:
        probes = min(max(b, _TRACE_PROBES), p - m)
        Z = torch.randn(p, probes, dtype=_F64, device=gen.device, generator=gen).to(dev)
        _orthogonalise(Z, Q)
        HZ = _matvec(op, Z.to(dtype), 0.0).to(_F64)
        calls += 1
        columns += probes
        quad = (Z * HZ).sum(0).cpu()
        if not bool(torch.isfinite(quad).all()):
            raise NonFiniteError(
                f"{who}: the Hessian-vector product returned NaN or infinity (operator call {calls}); "
                f"check the model and loss at these weights, or use float64",
                what="a Hessian-vector product",
            )
        trace += float(quad.mean())
        trace_stderr = float(quad.std() / math.sqrt(probes)) if probes > 1 else None
    return _Krylov(Q, T.cpu(), F_coef, calls, columns, deflations, trace, trace_stderr)


class _PreparedArnoldi(PreparedSolver):
    solver: Arnoldi

    def __init__(
        self,
        solver: Arnoldi,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
        U: Tensor,
        sigma: Tensor,
        l2: float | None,
    ) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._U = U  # (p, r) float64
        self._sigma = sigma  # (r,) float64 Ritz values (kept for state())
        self._l2 = l2
        self._inv = 1.0 / (sigma + damping)  # (r,) 1/(σ + λ) > 0
        # complement: 1/(l2 + λ) on (I − UUᵀ) ("damped" with r < p), or None (no complement term)
        self._inv_rest = None if l2 is None else 1.0 / (l2 + damping)

    def _state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        tensors["U"] = self._U
        tensors["sigma"] = self._sigma
        return {"l2": self._l2}

    def _apply(self, V: Tensor) -> Tensor:
        """X = U diag(1/(σ + λ)) UᵀV [+ (V − UUᵀV)/(l2 + λ)], in float64."""
        V64 = V.to(_F64)
        C = self._U.mT @ V64  # (r, k) coordinates in the eigenbasis
        X = self._U @ (C * self._inv[:, None])
        if self._inv_rest is not None:
            X += (V64 - self._U @ C) * self._inv_rest
        return X.to(V.dtype)

    def _solve(self, V: Tensor):
        who = type(self.solver).__name__
        X = self._apply(V)
        if not bool(torch.isfinite(X).all()):  # denominators are > 0: only an overflow gets here
            raise NonFiniteError(
                f"{who}: the solution overflowed to inf or NaN (the right-hand sides are too large for "
                f"{V.dtype}, or a Ritz value + damping is tiny); scale the inputs or use float64",
                what=f"the {who} solution",
            )
        res, curv, k, measured = _sampled_residual_and_curvature(
            self.op, X, V, self.damping, self.solver.residual_columns
        )
        if bool((curv <= 0).any()):
            # xᵀ(H + λI)x ≤ 0 for a solution column: the true H + λI is not positive definite
            c, note = _sharpen_negative_curvature(self.op, self.damping, float(curv.min()), who)
            finite = curv[torch.isfinite(curv)]
            raise _npd_error(
                who,
                f"a solution column x has curvature xᵀ(H + λI)x / xᵀx = {_fmt(float(curv.min()))}{note}; "
                f"the smallest curvature",
                c,
                self.damping,
                float(finite.max()) if finite.numel() else 0.0,
            )
        pinfo = self.info
        info: dict[str, Any] = {
            "matvec_calls": int(k > 0),
            "matvec_columns": k,
            "rank": pinfo["rank"],
            "complement": pinfo["complement"],
            "ritz_range": pinfo["ritz_range"],
            "trace_fraction": pinfo["trace_fraction"],
        }
        if measured is not None:
            info["residual_columns"] = measured
        tol = self.solver.tol
        if tol is not None:
            converged = res <= tol
            info["converged"] = converged
            if not bool(converged.all()):
                self._not_converged(
                    who,
                    X,
                    0,
                    res,
                    None,
                    converged,
                    info,
                    f"(a rank-{pinfo['rank']} approximation of H with complement="
                    f"{pinfo['complement']!r}: its residual is that of the approximation, not of an "
                    f"iteration)",
                    "Raise rank (and krylov_steps), use complement='damped', use an exact or iterative "
                    "solver (solver='exact', 'cg', 'block_cg'), raise tol or set tol=None to accept the "
                    "approximation",
                )
        return X, None, res, None, info
