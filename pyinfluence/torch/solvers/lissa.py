"""``LiSSA``: the stochastic Neumann-series estimator (Agarwal, Bullins & Hazan 2016) of Koh & Liang §3."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import (
    check_damping,
    check_int,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError, NotPositiveDefiniteError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _as_fraction,
    _check_operator,
    _check_seed,
    _check_stopping_fields,
    _col_norms,
    _fmt,
    _generator,
    _matvec,
    _normalise_device,
    _npd_error,
    _relative,
    _residual_and_curvature,
    _sample_matvec,
    _set,
    _state_field,
)
from pyinfluence.torch.solvers.lanczos import _lanczos, _sharpen_negative_curvature
from pyinfluence.torch.solvers.preconditioners import (
    PreconditionerLike,
    _Preconditioner,
    _preconditioner_state,
    _prepare_preconditioner,
    _restore_preconditioner,
    _SplitOperator,
    check_preconditioner,
)

# LiSSA: power iterations per probed minibatch when choosing the scale automatically.
_PROBE_ITERS = 10
# LiSSA: default largest final relative residual ‖(H + λI)x − v‖/‖v‖ (see LiSSA.tol).
_LISSA_TOL = 0.2
# LiSSA: iterates are checked for divergence every this many steps (one host synchronisation).
_LISSA_CHECK_EVERY = 10


# ==============================================================================================
# LiSSA: stochastic Neumann series
# ==============================================================================================
@dataclass(frozen=True)
class LiSSA(Solver):
    """LiSSA: the stochastic Neumann-series estimate of (H + λI)⁻¹ V (Agarwal et al. 2016).

    As in Koh & Liang §3, for each repeat and each column v::

        h₀ = v,   h_j = v + (I − (H_Bj + λI) / scale) h_{j−1},   j = 1 … depth
        estimate = h_depth / scale                          (average_tail = 0: the paper's)
        estimate = mean(h_j, last ⌈average_tail·depth⌉ steps) / scale       (the default)

    with H_Bj the Hessian of a fresh uniform minibatch B_j of ``batch_size`` training points
    (one minibatch per step, shared by all r columns; one batched ``op.sample_matvec`` call).
    The result is the mean over ``repeats`` independent runs. Averaging the tail of the
    recursion (Polyak–Ruppert averaging) does not change the expectation once the recursion has
    converged, but divides the minibatch noise of one repeat by about sqrt(steps averaged /
    (scale/λ_min)) — on well-conditioned problems a tenfold smaller error for the same HVPs —
    at the price of slightly more truncation bias when depth is too small. In expectation
    h_depth / scale = Σ_{i=0}^{depth} (I − A/scale)^i v / scale → A⁻¹ v, A = H + λI, which
    converges if and only if 0 < eig(A) < 2·scale; the error along an eigenvalue μ of A decays like
    (1 − μ/scale)^depth, so depth must be large beside scale/λ_min(A): directions of small
    curvature converge last (and with λ_min(A) = 0 never). :meth:`suggest_depth` computes it.

    **Every solve is checked.** LiSSA is approximate, and an unconverged recursion returns a
    finite, plausible vector; so each solve measures what it returns with one batched
    full-Hessian HVP: the relative residual ‖(H + λI)x − v‖/‖v‖ of every column (``residual``, as
    for CG; the minibatch noise shows as ``spread``). A column above ``tol`` raises
    ConvergenceError, carrying the result as ``.result`` — a depth too small for scale/λ_min(A),
    a hand-picked scale far above λ_max (which slows the recursion by the same factor) or too
    much minibatch noise. ``raise_on_nonconvergence=False`` warns (ConvergenceWarning) and returns
    the result instead, ``info["converged"]`` marking the columns within ``tol``.

    **Negative curvature.** Along an eigenvalue μ < 0 of A the recursion grows like
    (1 + |μ|/scale)^j — slowly when |μ| ≪ scale, as for the small negative eigenvalues of a trained
    non-convex model — so it can return a wrong answer without ever diverging. LiSSA raises
    NotPositiveDefiniteError, with a suggested damping (the message CG uses), as soon as it
    observes a vector u with uᵀAu ≤ 0, which proves that A is not positive definite:

    - in ``prepare``, a Lanczos process on A (Lanczos 1950; Golub & Van Loan §10.1; fully
      reorthogonalised) of ``power_iters`` steps from a random vector. Its Ritz values are the
      extreme values of uᵀAu/uᵀu over the Krylov space span{u₀, A u₀, …}: the largest sets the
      scale (a better estimate of λ_max than the power iteration, whose iterate lies in the same
      space), the smallest, θ_min ≥ λ_min(A), reveals negative curvature when ≤ 0. This runs for a
      hand-picked scale too. (Measured on a trained digits 64-32-10 ReLU MLP, λ_min(H) = −1.0e-3,
      λ_max = 1.3: θ_min < 0 after 21–22 steps from every start tried, −9e-4 after 40; 300 steps of
      power iteration on μ̂I − H, the alternative, never gave a negative Rayleigh quotient.)
    - in the recursion, when the iterates diverge: the Rayleigh quotient of the diverging
      iterates h (one full HVP), which the growing negative-curvature direction dominates.
    - in the result: xᵀAx of every returned column (free with the residual's HVP).

    None of these proves that A *is* positive definite: negative curvature that the Lanczos
    process does not reach shows (at most) as a residual above ``tol``.

    **Preconditioning** (``preconditioner``). With a symmetric positive definite M ≈ A⁻¹ (K-FAC /
    EK-FAC, see :mod:`pyinfluence.torch.solvers.preconditioners`) the recursion becomes the
    preconditioned stochastic Richardson iteration x_j = x_{j−1} + (1/scale) M (v − (H_Bj + λI) x_{j−1}),
    x₀ = 0; in LiSSA's variables h = scale·x::

        h₀ = M v,   h_j = h_{j−1} + M (v − (H_Bj + λI) h_{j−1} / scale)
                        = M v + (I − M (H_Bj + λI) / scale) h_{j−1},   j = 1 … depth
        estimate = h_depth / scale   (or the tail average / scale, as above)

    In expectation h_depth / scale = Σ_{i=0}^{depth} (I − M A/scale)^i M v / scale → (M A)⁻¹ M v = A⁻¹ v:
    the same answer, with the iteration matrix I − M A/scale in place of I − A/scale. M A is similar to
    Â = M^{1/2} A M^{1/2} (symmetric), so its eigenvalues are real, and positive iff A is positive
    definite; the recursion converges iff they lie in (0, 2·scale), and the error along an eigenvalue
    μ of M A decays like (1 − μ/scale)^depth — so the depth needed is about scale/λ_min(M A) instead of
    scale/λ_min(A) (:meth:`suggest_depth` with the ``preconditioned_lambda_*`` estimates). Everything
    above carries over with Â in place of A: the automatic scale is ``safety`` × the largest
    eigenvalue estimated for Â (Lanczos on Â, ``power_iters`` steps, each one full HVP and two
    applications of M^{1/2}) and for M^{1/2}(H_B + λI)M^{1/2} of the probed minibatches; a Ritz value
    of Â ≤ 0 proves that A is not positive definite (NotPositiveDefiniteError; the suggested damping
    comes from a short Lanczos process on A itself); the divergence test bounds the iterates in the
    norm of the preconditioned variables, ‖h‖_{M⁻¹} = (hᵀM⁻¹h)^{1/2} ≤ divergence_factor·(j+1)·
    (vᵀMv)^{1/2} (M⁻¹h is tracked by the recursion w_j = w_{j−1} + (v − (H_Bj + λI)h_{j−1}/scale),
    w₀ = v, with no application of M⁻¹). A hand-picked ``scale`` is the scale of this recursion
    (compare it with ``preconditioned_lambda_max_estimate``). Each step costs one minibatch HVP and
    one application of M to the r columns (``info["preconditioner_columns"]``); ``prepared.info``
    holds the preconditioner's preparation cost and ``preconditioned_lambda_max_estimate`` /
    ``preconditioned_lambda_min_estimate`` (the extreme Ritz values of Â), while
    ``lambda_max_estimate`` is then the largest curvature uᵀAu/uᵀu seen (a lower bound of λ_max(A))
    and ``lambda_min_estimate`` is absent.

    Parameters
    ----------
    depth : int, default 1000
        Recursion steps per repeat (minibatch HVPs).
    scale : float or None, default None
        The scale of the recursion. None (recommended): chosen in ``prepare`` as
        ``safety · μ̂``, where μ̂ is the largest estimated eigenvalue of H + λI (Lanczos, above)
        and of H_B + λI for a few sampled minibatches B (power iteration, below). This keeps every
        step's factor I − (H_B + λI)/scale within [−1, 1] with margin for minibatches like those
        probed (any with eigenvalues up to 2·scale), so the recursion contracts. A hand-picked
        scale that is too small makes the iterates grow exponentially: detected, ConvergenceError;
        one far too large leaves the recursion unconverged: residual above ``tol``.
    repeats : int, default 4
        Independent runs averaged (each with its own minibatch sequence). ≥ 2 reports ``spread``.
    batch_size : int or None, default 64
        Training points per minibatch HVP. None, or ≥ the training-set size, uses the full
        Hessian (``op.matvec``): the recursion is then deterministic (Richardson iteration), so
        one repeat is run whatever ``repeats`` says.
    average_tail : float in [0, 1], default 0.5
        Fraction of the final steps whose iterates are averaged (above); 0 = the classic
        estimate h_depth/scale. Not used with the full Hessian (deterministic iterates).
    seed : int or None, default 0
        Seed of the ``torch.Generator`` (on the operator's device) that draws the minibatches.
        Every ``solve`` restarts from it, so results are reproducible and a column's estimate
        does not depend on which other columns are solved with it. None: fresh randomness.
    safety : float, default 1.1
        Automatic scale = safety · μ̂ (> 0.5; below 1 converges faster but is less robust).
    power_iters : int, default 40
        Lanczos steps in ``prepare`` (each one full-Hessian HVP of one column; fewer when p is
        smaller or the Krylov space becomes invariant). They estimate λ_max(H + λI) and search
        for negative curvature (above), with or without a hand-picked scale. (The name is
        historical: a power iteration used to estimate λ_max alone.)
    probe_batches : int, default 4
        Minibatches whose Hessian's largest eigenvalue is also estimated (10 power iterations
        each, from the Lanczos estimate of H's top eigenvector, re-drawing the same minibatch by
        restoring the generator state — this needs ``op.sample_matvec`` to draw its minibatch
        from the generator only, as the operator contract requires). Minibatch Hessians have
        larger eigenvalues than the full one — the smaller the batch, the larger — so a scale from
        H alone could make single steps expand. 0 disables probing. Automatic scale only.
    divergence_factor : float, default 100
        Every 10 steps, ‖h_j‖ is compared with divergence_factor · (j + 1) · ‖v‖: for a positive
        definite A and contracting steps ‖h_j‖ ≤ (j + 1)‖v‖ always, so exceeding the bound (or
        a non-finite value) means divergence: NotPositiveDefiniteError if the diverging iterates
        have curvature ≤ 0, ConvergenceError (scale too small) otherwise — never NaN/inf.
    tol : float in (0, 1), default 0.2
        Largest accepted final relative residual ‖(H + λI)x − v‖/‖v‖ of a column. LiSSA is a
        stochastic, truncated method, so the default is loose. It was set by measuring the
        benchmark's settings (``pyinfluence.bench``: batch 128, 50 test gradients, seed 0) against
        exact solves: on digits logistic regression (damping 0) and the digits tanh MLP (damping
        0.01), the runs whose max residual was ≤ 0.15 (MLP depth ≥ 300, logistic regression depth
        1000) had solutions within 19 % of the exact ones and influence-score rank correlations
        ≥ 0.96 for every test point; the runs at ≥ 0.25 (MLP depth ≤ 100, logistic regression
        depth ≤ 300) were 46–99 % off, with rank correlations down to 0.82 (depth 300) … 0.08
        (depth 3). 0.2 separates the two groups.
    raise_on_nonconvergence : bool, default True
        If some column's residual exceeds ``tol``, raise ConvergenceError (its ``result``
        attribute holds the SolveResult); with False, warn (ConvergenceWarning) and return it.
    preconditioner : None, "ekfac", "kfac" or a KFAC/EKFAC object, default None (keyword only)
        None: plain LiSSA, exactly as without the option. ``"ekfac"`` / ``"kfac"``:
        ``EKFAC(lanczos_steps=0)`` / ``KFAC(lanczos_steps=0)`` prepared in ``prepare`` from the
        same operator and damping (the operator must be a
        :class:`~pyinfluence.torch.hessian.HessianOperator` of a model of layers K-FAC supports); a
        configured KFAC/EKFAC object is prepared as configured. See "Preconditioning" above.

    Cost: ``prepare``: ≤ ``power_iters`` full HVPs of one column (and p × ``power_iters``
    memory for the Lanczos basis), plus 10·``probe_batches`` minibatch HVPs for an automatic
    scale. ``solve``: ``repeats · depth`` minibatch HVPs of r columns plus one full HVP of r
    columns for the residual and curvature check.
    """

    depth: int = 1000
    scale: float | None = None
    repeats: int = 4
    batch_size: int | None = 64
    seed: int | None = 0
    average_tail: float = 0.5
    safety: float = 1.1
    power_iters: int = 40
    probe_batches: int = 4
    divergence_factor: float = 100.0
    tol: float = _LISSA_TOL
    raise_on_nonconvergence: bool = True
    preconditioner: PreconditionerLike = field(default=None, kw_only=True)

    name: ClassVar[str] = "lissa"
    _restore_needs: ClassVar[tuple[str, ...]] = ("matvec", "sample_matvec")

    def __post_init__(self) -> None:
        _set(self, "depth", check_int("depth", self.depth, 1))
        if self.scale is not None:
            _set(self, "scale", check_positive_float("scale", self.scale))
        _set(self, "repeats", check_int("repeats", self.repeats, 1))
        if self.batch_size is not None:
            _set(self, "batch_size", check_int("batch_size", self.batch_size, 1))
        _set(self, "seed", _check_seed("seed", self.seed))
        tail = _as_fraction("average_tail", self.average_tail)
        _set(self, "average_tail", tail)
        safety = check_positive_float("safety", self.safety)
        if safety <= 0.5:
            raise ValueError(
                f"safety must be > 0.5 (scale = safety·λ_max; the recursion diverges when "
                f"scale < λ_max/2), got {safety}"
            )
        _set(self, "safety", safety)
        _set(self, "power_iters", check_int("power_iters", self.power_iters, 1))
        _set(self, "probe_batches", check_int("probe_batches", self.probe_batches, 0))
        factor = check_positive_float("divergence_factor", self.divergence_factor)
        if factor < 1:
            raise ValueError(f"divergence_factor must be >= 1, got {factor}")
        _set(self, "divergence_factor", factor)
        tol = check_positive_float("tol", self.tol)
        if tol >= 1:
            raise ValueError(
                f"tol must be < 1 (a relative residual; x = 0 already has residual 1), got {tol}"
            )
        _set(self, "tol", tol)
        _check_stopping_fields(self)
        _set(self, "preconditioner", check_preconditioner(self.preconditioner))

    @staticmethod
    def suggest_depth(scale: float, lambda_min: float, rtol: float = 1e-2) -> int:
        """Depth at which the expected LiSSA error along eigenvalue ``lambda_min`` of H + λI
        has decayed to ``rtol``: (1 − λ_min/scale)^depth ≤ rtol, i.e. about
        ln(1/rtol) · scale / λ_min steps (noise not counted)."""
        scale = check_positive_float("scale", scale)
        lambda_min = check_positive_float("lambda_min", lambda_min)
        rtol = check_positive_float("rtol", rtol)
        if rtol >= 1:
            return 1
        q = min(lambda_min / scale, 1.0)
        if q >= 1.0:
            return 1
        return max(1, math.ceil(math.log(rtol) / math.log1p(-q)))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedLiSSA:
        _check_operator(op, ("matvec", "sample_matvec"))
        damping = check_damping(damping)
        start = time.perf_counter()
        dev = _normalise_device(op.device)
        n_train = getattr(op, "n_train", None)
        batch = self.batch_size
        if batch is not None and isinstance(n_train, int) and batch >= n_train:
            batch = None  # the full Hessian is as cheap as a minibatch that large
        info: dict[str, Any] = {
            "depth": self.depth,
            "batch_size": batch if batch is not None else n_train,
            "full_batch": batch is None,
            "repeats": 1 if batch is None else self.repeats,
            # deterministic full-batch iterates are not averaged (it would only add bias)
            "averaged_steps": (1 if batch is None else max(1, math.ceil(self.average_tail * self.depth))),
            "tol": self.tol,
        }
        gen = _generator(dev, None if self.seed is None else self.seed + 1)
        pre = _prepare_preconditioner(self.preconditioner, op, damping, "LiSSA")
        # the operator whose spectrum sets the scale: A = H + λI, or Â = M^{1/2} A M^{1/2}
        it_op: Any = op
        it_damping = damping
        if pre is None:
            spec = _lanczos(op, damping, self.power_iters, gen)  # raises on negative curvature
            info.update(
                lambda_max_estimate=spec.lam_max,
                lambda_min_estimate=spec.lam_min,
                lanczos_steps=spec.steps,
            )
        else:
            info.update(pre.info)
            it_op, it_damping = _SplitOperator(op, damping, pre), 0.0  # λ is inside Â
            spec = _lanczos(it_op, 0.0, self.power_iters, gen, raise_npd=False)
            if spec.lam_min <= 0.0:
                self._raise_preconditioned_npd(op, damping, spec.lam_min, spec.lam_max, spec.steps, it_op)
            info.update(
                preconditioned_lambda_max_estimate=spec.lam_max,
                preconditioned_lambda_min_estimate=spec.lam_min,
                lambda_max_estimate=it_op.rq_max,
                lanczos_steps=spec.steps,
            )
        if self.scale is not None:
            info.update(scale=self.scale, scale_source="user")
            scale = self.scale
        else:
            lam_batch = 0.0
            if batch is not None and self.probe_batches:
                lam_batch = self._probe_minibatches(it_op, it_damping, batch, spec.top, gen)
            scale = self.safety * max(spec.lam_max, lam_batch)
            info.update(scale=scale, scale_source="auto", minibatch_lambda_max_estimate=lam_batch)
        return _PreparedLiSSA(self, op, damping, info, time.perf_counter() - start, scale, batch, pre)

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedLiSSA:
        """The saved scale and minibatch size (the Lanczos estimates are in ``info``), and the
        preconditioner (if any); no HVP."""
        who = "LiSSA.restore"
        scale = float(_state_field(state, "scale", who, (int, float)))
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{who}: the saved scale must be finite and > 0, got {scale}")
        batch = state.get("batch") if isinstance(state, Mapping) else None
        if batch is not None:
            batch = _state_field(state, "batch", who, int)
        expect = self.batch_size
        n_train = getattr(op, "n_train", None)
        if expect is not None and isinstance(n_train, int) and expect >= n_train:
            expect = None
        if batch != expect:
            raise ValueError(
                f"{who}: the saved minibatch size {batch} differs from this configuration's {expect}"
            )
        keys = ["averaged_steps", "scale_source", "batch_size"]
        keys += (
            ["lambda_max_estimate", "lambda_min_estimate"]
            if self.preconditioner is None
            else [
                "preconditioned_lambda_max_estimate",
                "preconditioned_lambda_min_estimate",
                "lambda_max_estimate",
            ]
        )
        missing = [k for k in keys if k not in info]
        if missing:
            raise ValueError(f"{who}: the saved info lacks {', '.join(map(repr, missing))}")
        pre = _restore_preconditioner(
            self.preconditioner, op, damping, tensors, state.get("preconditioner"), who
        )
        return _PreparedLiSSA(self, op, damping, info, 0.0, scale, batch, pre)

    @staticmethod
    def _raise_preconditioned_npd(
        op: HessianOperatorLike,
        damping: float,
        theta: float,
        theta_max: float,
        steps: int,
        split: _SplitOperator,
    ) -> None:
        """A Ritz value θ ≤ 0 of Â = M^{1/2}(H + λI)M^{1/2}: its unit Ritz vector y gives u = M^{1/2}y with
        uᵀ(H + λI)u = yᵀÂy = θ ≤ 0, so H + λI is not positive definite. The curvature of u itself
        is not at hand, so the suggested damping comes from a Lanczos process on H + λI (as CG's does),
        or from 0 if that finds nothing lower."""
        if theta_max == 0.0 and theta == 0.0:
            raise NotPositiveDefiniteError(
                f"LiSSA: H + λI maps a random vector to zero (the Hessian is zero and damping={damping:g}); "
                f"pass damping > 0"
            )
        c, note = _sharpen_negative_curvature(op, damping, 0.0, "LiSSA")
        raise _npd_error(
            "LiSSA",
            f"a Lanczos process of {steps} steps on the preconditioned M^{{1/2}}(H + λI)M^{{1/2}} "
            f"found a Ritz value {_fmt(theta)} ≤ 0, so some u = M^{{1/2}}y has uᵀ(H + λI)u ≤ 0{note}; "
            f"the smallest curvature uᵀ(H + λI)u / uᵀu found",
            c,
            damping,
            split.rq_max,
        )

    def _probe_minibatches(
        self,
        op: HessianOperatorLike,
        damping: float,
        batch: int,
        top: Tensor,
        gen: torch.Generator,
    ) -> float:
        """max over ``probe_batches`` minibatches B of λ̂_max(H_B + λI): ``_PROBE_ITERS`` power
        iterations each on the same minibatch, from H's top Ritz vector ``top`` (p, 1); the
        estimate is ‖(H_B + λI)u‖ for the final unit vector u."""
        lam_batch = 0.0
        for _ in range(self.probe_batches):
            state = gen.get_state()
            v = top
            nrm_t = torch.zeros((), dtype=top.dtype, device=top.device)
            for _ in range(_PROBE_ITERS):
                gen.set_state(state)  # the same minibatch on every iteration of this probe
                w = _sample_matvec(op, v, damping, batch, gen)
                nrm_t = torch.linalg.vector_norm(w)
                v = w / torch.where(nrm_t > 0, nrm_t, torch.ones_like(nrm_t))
            nrm = float(nrm_t)
            if not math.isfinite(nrm):
                raise ConvergenceError(
                    "LiSSA: a minibatch Hessian-vector product returned NaN or infinity "
                    "while estimating the scale; check the model and loss at these weights"
                )
            lam_batch = max(lam_batch, nrm)
        return lam_batch


class _PreparedLiSSA(PreparedSolver):
    solver: LiSSA

    def __init__(
        self,
        solver: LiSSA,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
        scale: float,
        batch: int | None,
        pre: _Preconditioner | None = None,
    ) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self.scale = float(scale)
        self._batch = batch
        self._pre = pre  # the preconditioner M (None: plain LiSSA)
        # the spectrum that governs the recursion: of H + λI, or of M(H + λI) when preconditioned
        if pre is None:
            self._what = "H + λI"
            self._lam_max_it = float(info["lambda_max_estimate"])
            self._lam_min_it = float(info["lambda_min_estimate"])
        else:
            self._what = "M(H + λI)"
            self._lam_max_it = float(info["preconditioned_lambda_max_estimate"])
            self._lam_min_it = float(info["preconditioned_lambda_min_estimate"])
        # seed None: one random stream for the lifetime of this object (not reproducible)
        self._gen = None if solver.seed is not None else _generator(self.device, None)

    def _state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "batch": self._batch,
            "preconditioner": _preconditioner_state(self._pre, tensors),
        }

    def _solve(self, V: Tensor):
        cfg = self.solver
        op, lam, s = self.op, self.damping, self.scale
        depth, batch = cfg.depth, self._batch
        repeats = cfg.repeats if batch is not None else 1
        gen = self._gen if self._gen is not None else _generator(self.device, cfg.seed)
        r = V.shape[1]
        vnorm = _col_norms(V)
        mean = torch.zeros_like(V)
        m2 = torch.zeros_like(vnorm)  # Σ_k ‖x_k − x̄‖² per column (Welford)
        keep = 1.0 - lam / s
        calls = columns = pre_cols = 0
        # iterates h_j with j > depth − n_avg are averaged (n_avg = 1: the classic h_depth)
        n_avg = self.info["averaged_steps"]
        pre = self._pre
        Mv = vnorm_hat = None
        if pre is not None:
            Mv = pre.apply(V)  # h₀ = M v
            pre_cols += r
            # ‖v̂‖ = ‖M^{1/2} v‖ = (vᵀMv)^{1/2}: the divergence bound's unit in the preconditioned variables
            vnorm_hat = (V * Mv).sum(0).clamp_min(0).sqrt()
        for k in range(repeats):
            acc = torch.zeros_like(V) if n_avg > 1 else None
            if pre is None:
                h = V.clone()
                for j in range(1, depth + 1):
                    Ah = _sample_matvec(op, h, 0.0, batch, gen)  # damping applied in `keep`
                    calls += 1
                    columns += r
                    h.mul_(keep).add_(V).sub_(Ah, alpha=1.0 / s)
                    if acc is not None and j > depth - n_avg:
                        acc.add_(h)
                    if j % _LISSA_CHECK_EVERY == 0 or j == depth:
                        self._watch(h, vnorm, j, k)
            else:
                assert Mv is not None and vnorm_hat is not None
                h = Mv.clone()
                w = V.clone()  # w = M⁻¹ h, tracked (w₀ = v), for ‖h‖_{M⁻¹} = (hᵀw)^{1/2}
                for j in range(1, depth + 1):
                    Ah = _sample_matvec(op, h, 0.0, batch, gen)
                    calls += 1
                    columns += r
                    g = V - Ah / s - h * (lam / s)  # g = v − (H_B + λI) h / scale
                    h.add_(pre.apply(g))  # h_j = h_{j−1} + M g
                    pre_cols += r
                    w.add_(g)  # M⁻¹h_j = M⁻¹h_{j−1} + g
                    if acc is not None and j > depth - n_avg:
                        acc.add_(h)
                    if j % _LISSA_CHECK_EVERY == 0 or j == depth:
                        self._watch(h, vnorm_hat, j, k, (h * w).sum(0).clamp_min(0).sqrt())
            x = h.div_(s) if acc is None else acc.div_(n_avg * s)
            delta = x - mean
            mean.add_(delta, alpha=1.0 / (k + 1))
            m2.add_((delta * (x - mean)).sum(0))
        # the check: true residual ‖(H + λI)x − v‖/‖v‖ and curvature xᵀ(H + λI)x/xᵀx per column,
        # from one batched full HVP
        res, curv, k = _residual_and_curvature(op, mean, V, lam)
        calls += int(k > 0)
        columns += k
        if bool((curv <= 0).any()):  # NaN curvature cannot occur: HVPs were finite so far
            raise _npd_error(
                "LiSSA",
                "a returned solution x has curvature xᵀ(H + λI)x / xᵀx",
                float(curv.min()),
                lam,
                self.info["lambda_max_estimate"],
            )
        spread = None
        if repeats >= 2:
            spread = _relative(torch.sqrt(m2.clamp_min(0) / (repeats - 1)), _col_norms(mean))
        converged = res <= cfg.tol
        info = {
            "scale": s,
            "scale_source": self.info["scale_source"],
            "repeats": repeats,
            "batch_size": self.info["batch_size"],
            "converged": converged,
            "tol": cfg.tol,
            "matvec_calls": calls,
            "matvec_columns": columns,
        }
        if pre is not None:
            info["preconditioner"] = pre.name
            info["preconditioner_columns"] = pre_cols
        for key in (
            "lambda_max_estimate",
            "lambda_min_estimate",
            "minibatch_lambda_max_estimate",
            "preconditioned_lambda_max_estimate",
            "preconditioned_lambda_min_estimate",
        ):
            if key in self.info:
                info[key] = self.info[key]
        if not bool(converged.all()):
            self._not_converged(
                "LiSSA",
                mean,
                depth,
                res,
                spread,
                converged,
                info,
                f"with depth={depth}, repeats={repeats}, batch_size={self.info['batch_size']}",
                self._advice(spread),
            )
        return mean, depth, res, spread, info

    def _advice(self, spread: Tensor | None) -> str:
        """What to change when the residual misses tol. The expected error along an eigenvalue μ
        of A = H + λI (preconditioned: of M A) decays like (1 − μ/scale)^depth (truncation); on top
        comes minibatch noise."""
        cfg = self.solver
        s, lam, depth = self.scale, self.damping, cfg.depth
        lam_max, lam_min, what = self._lam_max_it, self._lam_min_it, self._what
        advice = ""
        if self.info["scale_source"] == "user" and s > 2.0 * cfg.safety * lam_max:
            advice += (
                f"scale={_fmt(s)} is {_fmt(s / lam_max)}× the estimated largest eigenvalue "
                f"{_fmt(lam_max)} of {what}, which slows the recursion by about that factor: pass "
                f"scale=None to have it chosen. "
            )
        need = LiSSA.suggest_depth(s, lam_min, 0.1)
        if depth < need:
            advice += (
                f"Increase depth: the error along an eigenvalue μ of {what} decays like "
                f"(1 − μ/scale)^depth, and the smallest Ritz value found, {_fmt(lam_min)}, needs "
                f"depth ≥ {need} for a tenfold reduction (LiSSA.suggest_depth; more if the "
                f"smallest eigenvalue is lower). "
            )
        else:
            noise = ""
            if spread is not None:
                noise = f" (spread across repeats up to {_fmt(float(spread.max()))})"
            advice += (
                f"depth={depth} suffices for the smallest Ritz value found, {_fmt(lam_min)} (an "
                f"upper bound of the smallest eigenvalue), so the error is probably minibatch "
                f"noise{noise}: increase batch_size or repeats (or depth, if smaller eigenvalues "
                f"exist). "
            )
        return advice + (
            f"Damping raises every eigenvalue and speeds the recursion up (damping={lam:g} now); "
            f"or loosen tol (LiSSA is approximate)."
        )

    def _watch(self, h: Tensor, vnorm: Tensor, j: int, k: int, hn: Tensor | None = None) -> None:
        """Raise if the iterates h diverge: ‖h_j‖ > divergence_factor·(j + 1)·‖v‖ (``hn``, ``vnorm``: the
        norms to compare; preconditioned, those of the preconditioned variables) or non-finite."""
        en = _col_norms(h) if hn is not None else None  # Euclidean norms, for the curvature below
        if hn is None:
            hn = _col_norms(h)
        bound = vnorm * (self.solver.divergence_factor * (j + 1))
        bad = ~torch.isfinite(hn) | (hn > bound)
        if not bool(bad.any()):
            return
        s, lam = self.scale, self.damping
        # The component of h along an eigenvalue μ of A = H + λI is multiplied by about
        # (1 − μ/scale) per step: a diverging h is dominated by the directions that expand, which
        # have μ < 0 when A is indefinite. hᵀAh/hᵀh ≤ 0 proves it (one full HVP, failure path only).
        fin = bad & torch.isfinite(hn)
        if en is not None:
            fin &= torch.isfinite(en) & (en > 0)
        else:
            en = hn
        if bool(fin.any()):
            U = h[:, fin] / en[fin]
            rq = (U * _matvec(self.op, U, lam)).sum(0)
            if bool(torch.isfinite(rq).all()) and bool((rq <= 0).any()):
                raise _npd_error(
                    "LiSSA",
                    f"the recursion diverged at step {j} of {self.solver.depth} (repeat {k + 1}), "
                    f"and a diverging iterate h has curvature hᵀ(H + λI)h / hᵀh",
                    float(rq.min()),
                    lam,
                    self.info["lambda_max_estimate"],
                )
        finite = bool(torch.isfinite(hn[bad]).all())
        ratio = _relative(hn, vnorm)[bad].max()
        what = (
            f"‖h‖/‖v‖ reached {_fmt(float(ratio))}, beyond the bound "
            f"{self.solver.divergence_factor:g}·(j+1) = {_fmt(self.solver.divergence_factor * (j + 1))}"
            if finite
            else "the iterates became NaN or infinite"
        )
        if self.info.get("scale_source") == "auto":
            cause = (
                f"The scale was chosen automatically ({_fmt(s)} = {self.solver.safety:g} × the "
                f"estimated largest eigenvalue {_fmt(s / self.solver.safety)}), so some minibatch "
                f"Hessians H_B + λI most likely have eigenvalues above 2·scale or below 0 (a "
                f"non-convex model): pass a larger batch_size, a larger scale or a larger damping "
                f"(damping={lam:g} now)"
            )
        else:
            hb = "M(H_B + λI)" if self._pre is not None else "H_B + λI"
            cause = (
                f"The recursion contracts only if every minibatch Hessian satisfies 0 < eig({hb}) "
                f"< 2·scale: scale={_fmt(s)} is probably too small (the largest eigenvalue "
                f"of {self._what} is about {_fmt(self._lam_max_it)}) — pass scale=None "
                f"to have it estimated, or a larger scale — or some H_B + λI have negative "
                f"eigenvalues: pass a larger damping (damping={lam:g} now)"
            )
        raise ConvergenceError(
            f"LiSSA diverged at step {j} of {self.solver.depth} (repeat {k + 1}): {what}. {cause}."
        )
