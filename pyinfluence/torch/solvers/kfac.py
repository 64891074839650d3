"""``KFAC`` and ``EKFAC``: Kronecker-factored curvature approximations of H for models of ``nn.Linear`` layers.

The Hessian H = ∇²R(θ̂) of R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖² is replaced by a
block-diagonal approximation over the layers, the L2 term and the damping λ kept exact:

    H + λI ≈ blockdiag_l(F_l) + (l2 + λ) I

For a Linear layer with input a (in,), pre-activation output s = W a + b (out,), augmented input
ā = [a, 1] (bias selected) or a, and per-example output gradient δ_i = ∂L(z_i, θ)/∂s_i (of the
example's own loss), the layer's block of the Fisher / generalised Gauss-Newton matrix
F_l = (1/n) Σ_i E[vec(δ_i ā_iᵀ) vec(δ_i ā_iᵀ)ᵀ] over the (out × in') parameter matrix M = [W b] is
approximated as follows (vec is ROW-major, the order of the flat parameter vector: W row by row,
then b; in this order vec(δ āᵀ) = δ ⊗ ā, so the Kronecker factors appear as G ⊗ A, which is
Martens & Grosse's A ⊗ G in their column-major vec):

- K-FAC (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored approximate
  curvature", eqs. 1–2 and §3): F_l ≈ G ⊗ A, A = (1/n) Σ_i ā_i ā_iᵀ, G = (1/n) Σ_i E[δ_i δ_iᵀ].
  With A = Q_A diag(a) Q_Aᵀ, G = Q_G diag(g) Q_Gᵀ (float64, symmetrised, eigenvalues clamped at
  0), the layer's block of X = (H + λI)⁻¹ V is, for the block M of V (eq. 4 of George et al. with
  exact damping — no factored Tikhonov approximation as in Martens & Grosse §6.3):

      X_l = Q_G [ (Q_Gᵀ M Q_A) ⊘ (g aᵀ + l2 + λ) ] Q_Aᵀ

- EK-FAC (George, Laurent, Bouthillier, Ballas & Vincent 2018, "Fast approximate natural gradient
  descent in a Kronecker-factored eigenbasis", §3, eq. 9): the same eigenbasis Q_G ⊗ Q_A, with
  the Kronecker eigenvalues g_j a_k replaced by the exact second moments of the per-example
  gradients in that basis, S_jk = (1/n) Σ_i E[(Q_Gᵀ δ_i ā_iᵀ Q_A)_jk²] — the diagonal of F_l in the
  eigenbasis, which minimises the Frobenius error of F_l among matrices diagonal there:

      X_l = Q_G [ (Q_Gᵀ M Q_A) ⊘ (S + l2 + λ) ] Q_Aᵀ

The expectation E over δ_i (``fisher``): ``"true"`` (default) — the output Hessian of the loss
∇²_z L(z_i, y_i) pushed back through the network (E[δδᵀ] = J_iᵀ ∇²_z L J_i, J_i = ∂z_i/∂s_i);
for cross-entropy on logits this is exactly the true Fisher, E_{y∼p(·|x_i)}[δ_i δ_iᵀ], since
∇²_z L = diag(p_i) − p_i p_iᵀ for every label; for other losses it is the generalised
Gauss-Newton matrix (Schraudolph 2002; squared error: 2I), its PSD part if the loss is not
convex in z. Computed exactly with K backward passes (K = outputs per example), no sampling.
``"empirical"`` — δ_i at the observed label (one backward pass).

The approximation ignores the second-derivative term of the network (the Hessian's difference
from the GGN) and all cross-layer blocks, so the solution is not that of (H + λI) X = V: every
solve measures its true relative residual ‖(H + λI)X − V‖/‖V‖ with one full-training-set HVP
and reports it. The approximation is positive definite even where the true H + λI is not (where
influence is undefined): ``prepare`` searches for negative curvature of the true H + λI with a
short Lanczos process (``lanczos_steps``) and every solve checks xᵀ(H + λI)x of its solutions;
either raises NotPositiveDefiniteError with a suggested damping, as every solver does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import check_bool, check_damping, check_int, check_positive_float
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError
from pyinfluence.torch.kfac_factors import LinearLayer, layer_statistics, linear_layers
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _check_operator,
    _check_seed,
    _fmt,
    _generator,
    _normalise_device,
    _npd_error,
    _residual_and_curvature,
    _round_up,
    _set,
)
from pyinfluence.torch.solvers.lanczos import _lanczos, _sharpen_negative_curvature

_FISHERS = ("true", "empirical")
_F64 = torch.float64


@dataclass(frozen=True)
class KFAC(Solver):
    """K-FAC: (H + λI)⁻¹ V with each Linear layer's curvature block approximated by G ⊗ A.

    See the module docstring for the formulas (Martens & Grosse 2015). The operator must be a
    :class:`~pyinfluence.torch.hessian.HessianOperator` (it needs ``fm``, ``data``, ``l2``,
    ``batch_size``, ``matvec``) whose selected parameters are all weights or biases of
    ``nn.Linear`` modules applied once per example to (batch, in_features) inputs; a selected
    parameter of any other module raises ValueError naming it and its module type.

    Parameters
    ----------
    fisher : {"true", "empirical"}, default "true"
        How E[δ δᵀ] is taken: ``"true"`` the loss's output Hessian pushed back (the true Fisher,
        exactly, for cross-entropy on logits; the Gauss-Newton matrix for other losses),
        ``"empirical"`` δ at the observed labels.
    tol : float or None, default None
        None: never fail on the residual (an approximation's residual is not small; it is
        reported in ``SolveResult.residual``). A float: raise ConvergenceError when some
        column's true relative residual exceeds it (or warn, with
        ``raise_on_nonconvergence=False``).
    raise_on_nonconvergence : bool, default True
        As for :class:`CG`; only used when ``tol`` is set.
    lanczos_steps : int, default 20
        The approximation is positive definite whatever the true H is, so ``prepare`` looks for
        negative curvature of the TRUE H + λI with a Lanczos process of this many steps (one
        one-column full-training-set HVP each, from a random start drawn with ``seed``), and
        raises NotPositiveDefiniteError with a suggested damping when it finds some (as every
        solver does). 0 skips the search (at scale it costs more than the factors: about three
        data passes per step); every solve still checks the curvature xᵀ(H + λI)x of its
        solution columns, free with the residual.
    seed : int or None, default 0
        Seed of the Lanczos start vector (None: a fresh one each time).

    ``prepare``: one pass over the training data in blocks of ``op.batch_size`` (EK-FAC: two, the
    second projecting the per-example gradients onto the eigenbases), then per layer one
    float64 eigendecomposition of A (in' × in') and of G (out × out). Raises
    NotPositiveDefiniteError (with a suggested damping) only when l2 + λ ≤ 0 and an eigenvalue
    of the approximation is ≤ −(l2 + λ): the factors are positive semidefinite, so l2 + λ > 0
    always succeeds. ``solve``: two small matrix products per layer and right-hand side, plus
    one batched HVP for the reported residual (``info["matvec_calls"]``).
    Memory: the factors and their eigenvectors, Σ_l (in'² + out²) floats.
    """

    fisher: str = "true"
    tol: float | None = None
    raise_on_nonconvergence: bool = True
    lanczos_steps: int = 20
    seed: int | None = 0

    name: ClassVar[str] = "kfac"
    _eigen_corrected: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.fisher, str) or self.fisher.strip().lower() not in _FISHERS:
            raise ValueError(f"fisher must be 'true' or 'empirical', got {self.fisher!r}")
        _set(self, "fisher", self.fisher.strip().lower())
        if self.tol is not None:
            _set(self, "tol", check_positive_float("tol", self.tol))
        _set(
            self,
            "raise_on_nonconvergence",
            check_bool("raise_on_nonconvergence", self.raise_on_nonconvergence),
        )
        _set(self, "lanczos_steps", check_int("lanczos_steps", self.lanczos_steps, 0))
        _set(self, "seed", _check_seed("seed", self.seed))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedKFAC:
        who = type(self).__name__
        _check_operator(op, ("matvec",))
        missing = [m for m in ("fm", "data", "l2") if not hasattr(op, m)]
        if missing:
            raise TypeError(
                f"{who} needs the model behind the Hessian: op must be a "
                f"pyinfluence.torch.hessian.HessianOperator (with fm, data, l2), "
                f"{type(op).__name__} lacks {', '.join(missing)}"
            )
        damping = check_damping(damping)
        start = time.perf_counter()
        fm: Any = op.fm  # type: ignore[attr-defined]
        data: Any = op.data  # type: ignore[attr-defined]
        l2 = float(op.l2)  # type: ignore[attr-defined]
        layers = linear_layers(fm.model, fm.names, who)
        if self.lanczos_steps:
            self._check_true_curvature(op, damping, who)
        n = len(data)
        rows = int(min(n, max(1, int(getattr(op, "batch_size", n)))))
        dev = fm.device
        A = [torch.zeros((ly.n_cols, ly.n_cols), dtype=_F64, device=dev) for ly in layers]
        G = [torch.zeros((ly.n_out, ly.n_out), dtype=_F64, device=dev) for ly in layers]
        rel_neg = 0.0
        for _, X, Y in data.blocks(rows):
            acts, deltas, rn = layer_statistics(fm, layers, X, Y, self.fisher)
            rel_neg = min(rel_neg, rn)
            for l_, (a, d) in enumerate(zip(acts, deltas)):
                a64 = a.to(_F64)
                d64 = d.to(_F64).reshape(-1, d.shape[-1])  # (B·C, out)
                A[l_].addmm_(a64.mT, a64)
                G[l_].addmm_(d64.mT, d64)
        factors = []
        for Al, Gl in zip(A, G):
            Al = 0.5 * (Al + Al.mT) / n
            Gl = 0.5 * (Gl + Gl.mT) / n
            ea, QA = torch.linalg.eigh(Al)
            eg, QG = torch.linalg.eigh(Gl)
            factors.append([QA, QG, torch.outer(eg.clamp_min(0.0), ea.clamp_min(0.0))])
        passes = 1
        if self._eigen_corrected:
            passes = 2
            S = [torch.zeros_like(f[2]) for f in factors]
            for _, X, Y in data.blocks(rows):
                acts, deltas, _ = layer_statistics(fm, layers, X, Y, self.fisher)
                for l_, (a, d) in enumerate(zip(acts, deltas)):
                    QA, QG, _ = factors[l_]
                    w = (a.to(_F64) @ QA).square()  # (B, in'): (Q_Aᵀ ā_i)_k²
                    u = (d.to(_F64) @ QG).square().sum(1)  # (B, out): Σ_c (Q_Gᵀ δ_i^(c))_j²
                    S[l_].addmm_(u.mT, w)
            for f, s in zip(factors, S):
                f[2] = s / n
        shift = l2 + damping
        lows = [float(f[2].min()) for f in factors]
        his = [float(f[2].max()) for f in factors]
        low, hi = min(lows), max(his)
        if low + shift <= 0:
            need = -(low + l2)
            suggest = _round_up(max(2.0 * need, need + 1e-4 * abs(hi), 1e-4 * abs(hi), 1e-12))
            bad = layers[lows.index(low)].path or "the model"
            raise NotPositiveDefiniteError(
                f"{who}: the approximation of H + λI is not positive definite: its smallest "
                f"eigenvalue (layer {bad!r}) is {_fmt(low)} + l2 + λ = {_fmt(low + shift)} ≤ 0 "
                f"(l2={l2:g}, damping={damping:g}; the largest curvature eigenvalue is "
                f"{_fmt(hi)}). The Kronecker factors are only positive semidefinite: pass "
                f"damping > {_fmt(max(need, 0.0))}, e.g. damping={suggest:g}",
                size=int(op.n_params),
                min_pivot=low + shift,
                suggested_damping=suggest,
            )
        info = {
            "fisher": self.fisher,
            "layers": [ly.path for ly in layers],
            "passes": passes,
            "n_train": n,
            "curvature_range": (low, hi),
        }
        if self.fisher == "true" and rel_neg < 0:
            info["output_hessian_min_relative_eigenvalue"] = rel_neg
        return _PreparedKFAC(self, op, damping, info, time.perf_counter() - start, fm, layers, factors, shift)

    def _check_true_curvature(self, op: HessianOperatorLike, damping: float, who: str) -> None:
        """Raise NotPositiveDefiniteError when a Lanczos process finds curvature ≤ 0 of the true H + λI
        (influence is not defined there, and the PSD approximation would hide it); the suggested damping
        comes from the same 40-step sharpening as CG's."""
        gen = _generator(_normalise_device(op.device), self.seed)
        spec = _lanczos(op, damping, self.lanczos_steps, gen, who=who, raise_npd=False)
        if spec.lam_min <= 0.0:
            c, note = _sharpen_negative_curvature(op, damping, spec.lam_min, who)
            raise _npd_error(
                who,
                f"a Lanczos process of {spec.steps} steps on the true H + λI found a direction u with "
                f"curvature uᵀ(H + λI)u / uᵀu = {_fmt(spec.lam_min)}{note}; the smallest curvature",
                c,
                damping,
                spec.lam_max,
            )


@dataclass(frozen=True)
class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbasis with the eigenvalues refitted to the per-example gradients.

    George et al. 2018 (§3, eq. 9): in the K-FAC eigenbasis Q_G ⊗ Q_A, the Kronecker eigenvalue
    g_j a_k of each layer is replaced by the second moment S_jk = (1/n) Σ_i E[(Q_Gᵀ δ_i ā_iᵀ Q_A)_jk²]
    (the same expectation ``fisher`` as K-FAC; for ``"true"``, exact over the classes), and
    X_l = Q_G [(Q_Gᵀ M Q_A) ⊘ (S + l2 + λ)] Q_Aᵀ. S is the exact diagonal of the layer's Fisher
    block in that basis, so EK-FAC is at least as close to it (in Frobenius norm) as K-FAC.
    Parameters and errors as :class:`KFAC`; ``prepare`` makes two passes over the training
    data (factors, then the projected second moments).
    """

    name: ClassVar[str] = "ekfac"
    _eigen_corrected: ClassVar[bool] = True


class _PreparedKFAC(PreparedSolver):
    solver: KFAC

    def __init__(
        self,
        solver: KFAC,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
        fm: Any,
        layers: list[LinearLayer],
        factors: list[list[Tensor]],
        shift: float,
    ) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._fm = fm
        self._layers = layers
        # per layer: Q_A, Q_G and the denominator (out, in') = eigenvalues + l2 + λ
        self._factors = [(QA, QG, ev + shift) for QA, QG, ev in factors]

    def _apply(self, V: Tensor) -> Tensor:
        """The block-diagonal approximate inverse applied to V (p, r), in float64."""
        fm = self._fm
        r = V.shape[1]
        T = fm.unflatten(V.mT.to(_F64))  # {name: (r, *shape)}
        out: dict[str, Tensor] = {}
        for ly, (QA, QG, den) in zip(self._layers, self._factors):
            parts = []
            if ly.weight is not None:
                parts.append(T[ly.weight])  # (r, out, in)
            if ly.bias is not None:
                parts.append(T[ly.bias].unsqueeze(-1))  # (r, out, 1)
            M = torch.cat(parts, dim=-1)  # (r, out, in'): the row-major blocks [W b]
            Xl = QG @ ((QG.mT @ M @ QA) / den) @ QA.mT
            if ly.weight is not None:
                out[ly.weight] = Xl[..., : ly.n_in]
            if ly.bias is not None:
                out[ly.bias] = Xl[..., -1]
        return fm.flatten(out, (r,)).mT.to(V.dtype)

    def _solve(self, V: Tensor):
        X = self._apply(V)
        if not bool(torch.isfinite(X).all()):  # denominators are ≥ l2 + λ > 0: only an overflow gets here
            raise NonFiniteError(
                f"{type(self.solver).__name__}: the solution overflowed to inf or NaN (the right-hand sides "
                f"or the curvature factors are too large for {V.dtype}); scale the inputs or use float64",
                what=f"the {type(self.solver).__name__} solution",
            )
        res, curv, k = _residual_and_curvature(self.op, X, V, self.damping)
        if bool((curv <= 0).any()):
            # xᵀ(H + λI)x ≤ 0 for a solution column: the true H + λI is not positive definite (the
            # approximation is, by construction); the same error and suggestion as the iterative solvers
            who = type(self.solver).__name__
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
        info: dict[str, Any] = {"matvec_calls": int(k > 0), "matvec_columns": k}
        tol = self.solver.tol
        if tol is not None:
            converged = res <= tol
            info["converged"] = converged
            if not bool(converged.all()):
                self._not_converged(
                    type(self.solver).__name__,
                    X,
                    0,
                    res,
                    None,
                    converged,
                    info,
                    f"(it is a curvature approximation: its residual is that of the {self.solver.name} "
                    f"approximation of H, not of an iteration)",
                    "Use an exact or iterative solver (solver='exact', 'cg', 'block_cg') for a smaller "
                    "residual, raise tol or set tol=None to accept the approximation; a larger damping "
                    "also makes the approximation relatively closer",
                )
        return X, None, res, None, info
