"""``KFAC`` and ``EKFAC``: Kronecker-factored curvature approximations of H for ``nn.Linear`` and
``nn.Conv2d`` layers, with an optional exact-diagonal fallback for any other parameter.

The Hessian H = ∇²R(θ̂) of R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖² is replaced by a
block-diagonal approximation over the layers, the L2 term and the damping λ kept exact:

    H + λI ≈ blockdiag_l(F_l) + (l2 + λ) I

where F_l approximates the layer's diagonal block of the Fisher / generalised Gauss-Newton matrix
F = (1/n) Σ_i E[g_i g_iᵀ] of the per-example gradients g_i = ∇θ L(z_i, θ̂) (the expectation E is
``fisher``, see below). All cross-layer blocks, and the network's second-derivative term (the
Hessian's difference from the GGN), are ignored.

**Layers and positions.** A layer's parameters form the (out × in') matrix M = [W b] (in' = in +
1 when the bias is selected; the flat parameter order is W row-major, then b, so vec is ROW-major
and vec(δ āᵀ) = δ ⊗ ā: the Kronecker factors appear as G ⊗ A, Martens & Grosse's A ⊗ G in their
column-major vec). The layer is applied at T "positions" t per example, s_it = M ā_it:

- ``nn.Linear`` on (batch, in) inputs (kind ``"linear"``): T = 1, ā_i = [a_i, 1];
- ``nn.Linear`` on (batch, *, in) inputs (kind ``"linear-sequence"``, e.g. the (B, T, d) tokens of
  a transformer's attention and MLP blocks): t runs over all the middle dimensions;
- ``nn.Conv2d`` (kind ``"conv2d"``; groups = 1, padding_mode "zeros", any stride, padding,
  dilation): W is read as W.reshape(out, C·kh·kw), t runs over the oh·ow output pixels and ā_it is
  the input patch at t (``torch.nn.functional.unfold``, zero padded) with a 1 appended for the bias.

With δ_it = ∂L(z_i, θ)/∂s_it the per-example gradient is exactly g_i = Σ_t δ_it ā_itᵀ, and

    F_l = (1/n) Σ_i E[vec(g_i) vec(g_i)ᵀ] = (1/n) Σ_i Σ_{t,t'} E[δ_it δ_it'ᵀ] ⊗ ā_it ā_it'ᵀ.

- K-FAC (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored approximate
  curvature", eqs. 1–2 and §3; for T > 1 Grosse & Martens 2016, "A Kronecker-factored
  approximate Fisher matrix for convolution layers" (KFC), §3): F_l ≈ G ⊗ A with

      A = (1/(nT)) Σ_i Σ_t ā_it ā_itᵀ          (mean over examples AND positions)
      G = (1/n)    Σ_i Σ_t E[δ_it δ_itᵀ]       (mean over examples, SUM over positions)

  Why the T goes there: KFC assumes (IAD) activations independent of the derivatives, so
  E[δδ'ᵀ ⊗ āā'ᵀ] = E[δδ'ᵀ] ⊗ E[āā'ᵀ]; (SUD) spatially uncorrelated derivatives, E[δ_t δ_t'ᵀ] = 0
  for t ≠ t', which leaves the T diagonal terms Σ_t E[δ_t δ_tᵀ] ⊗ E[ā_t ā_tᵀ]; and (SH) spatial
  homogeneity, the same second moments Γ = E[δ_t δ_tᵀ], Ω = E[ā_t ā_tᵀ] at every t. Then F_l =
  T · Γ ⊗ Ω exactly; Ω is estimated by the mean over positions (A) and T·Γ by the sum over
  positions (G). Putting the T in G keeps A on the scale of one input vector (as for a
  Linear layer), and for T = 1 both are the Linear layer's factors, bit for bit. (This is
  "K-FAC-expand" in Eschenhagen et al. 2023; with a number of positions that varies between
  examples, A divides by the total number of positions Σ_i T_i. kronfluence divides both factors
  by nT, so its K-FAC block is 1/T of this one; its EK-FAC eigenvalues agree with ours.) SUD is an approximation: it
  is wrong where one example's positions share the loss (a mean-pooled sequence, global average
  pooling), which EK-FAC's correction below repairs within the eigenbasis.
  With A = Q_A diag(a) Q_Aᵀ, G = Q_G diag(g) Q_Gᵀ (float64, symmetrised, eigenvalues clamped at
  0), the layer's block of X = (H + λI)⁻¹ V is, for the block M of V (eq. 4 of George et al. with
  exact damping — no factored Tikhonov approximation as in Martens & Grosse §6.3):

      X_l = Q_G [ (Q_Gᵀ M Q_A) ⊘ (g aᵀ + l2 + λ) ] Q_Aᵀ

- EK-FAC (George, Laurent, Bouthillier, Ballas & Vincent 2018, "Fast approximate natural gradient
  descent in a Kronecker-factored eigenbasis", §3, eq. 9): the same eigenbasis Q_G ⊗ Q_A, with
  the Kronecker eigenvalues g_j a_k replaced by the exact second moments of the per-example
  gradients in that basis,

      S_jk = (1/n) Σ_i E[(Q_Gᵀ (Σ_t δ_it ā_itᵀ) Q_A)_jk²]

  — the exact per-example gradient g_i, all positions summed BEFORE squaring (no SUD), computed
  as (δ_i Q_G)ᵀ (ā_i Q_A) by a batched product over t (B × out × in' per block of examples);
  S is the diagonal of F_l in the eigenbasis, which minimises the Frobenius error of F_l among
  matrices diagonal there:

      X_l = Q_G [ (Q_Gᵀ M Q_A) ⊘ (S + l2 + λ) ] Q_Aᵀ

- Diagonal fallback (``unsupported="diagonal"``; e.g. LayerNorm, Embedding, custom parameters,
  grouped convolutions, shared modules): for each such parameter coordinate j the exact diagonal
  of the Fisher, D_j = (1/n) Σ_i E[(g_i)_j²], from per-example gradients of just those
  parameters (``torch.func.vmap`` of a ``vjp``), and X_j = V_j / (D_j + l2 + λ). Its couplings
  with every other parameter are ignored.

The expectation E over δ_i (``fisher``):

- ``"true"`` (default) — the output Hessian of the loss ∇²_z L(z_i, y_i) pushed back through the
  network (E[δδᵀ] = J_iᵀ ∇²_z L J_i, J_i = ∂z_i/∂s_i); for cross-entropy on logits this is exactly
  the true Fisher, E_{y∼p(·|x_i)}[δ_i δ_iᵀ], since ∇²_z L = diag(p_i) − p_i p_iᵀ for every label;
  for other losses it is the generalised Gauss-Newton matrix (Schraudolph 2002; squared error:
  2I), its PSD part if the loss is not convex in z. Computed exactly, no sampling: per block of B
  examples K double-backward passes over the loss, B eigendecompositions of K × K and K backward
  passes through the network (K = outputs per example), with memory of order
  B·K·(K + Σ_l T_l·out_l). Refused (ValueError) when K > ``max_outputs`` (default 512): a language
  model has K = T·V outputs per sequence (T tokens, vocabulary V; 16 × 25 = 400 for the quick GPT
  of :mod:`pyinfluence.bench.ladder`, which already takes 1.7 GB (K-FAC) and 2.4 GB (EK-FAC) for 48
  sequences, 32 × 25 = 800 for the full one, 10⁶ and more for real vocabularies). For large
  output spaces ``"sampled"`` is the affordable choice.
- ``"sampled"`` — the same expectation by Monte Carlo (Martens & Grosse 2015, §5; kronfluence's
  default): per example ``samples`` draws of targets ŷ from the model's predictive distribution
  (the likelihood whose negative logarithm the loss is) and δ̂ = ∂L(z_i, ŷ)/∂s_i, one backward pass
  per draw, memory like the empirical Fisher times ``samples``; the cotangents ĉ_s/√samples
  average the draws. E[ĉĉᵀ] is EXACTLY "true"'s ∇²_z L (so the factors converge to "true"'s as
  samples grows, with a standard error ∝ 1/√(n·samples)) for:

  * ``likelihood="categorical"``: a weighted sum of cross-entropies of logits over the LAST
    dimension of the output, L(z, y) = Σ_t w_t CE(z_t, y_t) over the output positions t (one
    integer label each; T = 1 for a classifier; w_t = 1/T for the mean over T tokens, 1/T_i over
    the valid tokens of a padded sequence). Each position's label is drawn independently,
    ŷ_t ∼ softmax(z_t), and the cotangent is the loss's gradient at the drawn labels divided by
    √w_t: ĉ_t = ∂L(z, ŷ)/∂z_t / √w_t = √w_t (p_t − e_ŷt).
    The scaling: ∂L/∂z_t = w_t (p_t − e_ŷt), and the draws are independent with E[p_t − e_ŷt] = 0,
    Cov[p_t − e_ŷt] = diag p_t − p_t p_tᵀ, so the plain sampled gradient of the loss has second
    moment Σ_t w_t² J_tᵀ (diag p_t − p_t p_tᵀ) J_t — for the mean over T tokens
    (1/T²) Σ_t J_tᵀ (…) J_t — while the Gauss-Newton matrix of that loss is
    Σ_t w_t J_tᵀ (diag p_t − p_t p_tᵀ) J_t = (1/T) Σ_t J_tᵀ (…) J_t (its output Hessian is
    blockdiag_t(w_t (diag p_t − p_t p_tᵀ))): T times larger. With ĉ_t = √w_t (p_t − e_ŷt),
    E[ĉĉᵀ] = blockdiag_t(w_t (diag p_t − p_t p_tᵀ)) = ∇²_z L exactly (the cross-position terms
    vanish by independence). The weights are measured, not assumed: the loss's gradient at the
    observed labels and at probe labels (y + 1) mod V, and at every draw, must be
    w_t (p_t − e_y) with one w_t ≥ 0 per position (relative tolerance 10³ machine epsilons);
    label smoothing, class weights or another loss are refused (ValueError). Positions the loss
    ignores (a label outside [0, V), e.g. ignore_index=-100, or an exactly zero gradient) keep
    their label in every call and get w_t = 0.
  * ``likelihood="gaussian"``: a weighted squared error L(z, y) = Σ_k c_k (z_k − y_k)² (c_k ≥ 0;
    c = 1 for the sum, 1/K for the mean over K outputs, ½ for ½‖z − y‖²), the negative
    log-likelihood of N(z, diag(1/(2c))) up to a constant. The draws are ŷ = z + ξ ⊘ √(2c),
    ξ ∼ N(0, I) (variance 1/(2c_k): K/2 for the mean), and ĉ = ∂L(z, ŷ)/∂z = −√(2c) ⊙ ξ, so
    E[ĉĉᵀ] = diag(2c) = ∇²_z L. 2c is measured from the loss's gradient at y = z + 1, and the
    gradient is checked to be 2c ⊙ (z − y) at y = z, at the observed y, at a random probe and at
    every draw (an absolute or Huber error, a logistic loss or coupled outputs are refused).

  ``likelihood="auto"`` (default) picks categorical for integer targets of the outputs' shape
  without the last dimension, gaussian for floating targets of the outputs' shape, and refuses
  anything else. The draws are a counter-based hash (lowbias32) of (``seed``, the example's index
  in the pass over the training data, the sample, the output position) — reproducible, and the
  same whatever the block size, the number of shards or the device; both passes of EK-FAC see the
  same draws. ``seed=None`` draws a fresh seed (``info["sampling_seed"]``).
- ``"empirical"`` — δ_i at the observed label (one backward pass).

Because of what it ignores, the solution is not that of (H + λI) X = V: every solve measures
its true relative residual ‖(H + λI)X − V‖/‖V‖ with one full-training-set HVP and reports it.
The approximation is positive definite even where the true H + λI is not (where influence is
undefined): ``prepare`` searches for negative curvature of the true H + λI with a short Lanczos
process (``lanczos_steps``) and every solve checks xᵀ(H + λI)x of its solutions; either raises
NotPositiveDefiniteError with a suggested damping, as every solver does.

The prepared solver's ``info`` says what the approximation covers: ``blocks`` (one entry per
layer: path, kind, parameters, positions T, eigenvalue ranges of A, G and of the block's
curvature; one per diagonal-fallback module with its reason), ``coverage`` (the fraction of the
selected parameters in each kind of block, and in Kronecker blocks altogether).
Prepared solvers are read-only after ``prepare`` and safe to share between threads.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from pyinfluence._validation import check_damping, check_int
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError
from pyinfluence.torch.kfac_factors import (
    DEFAULT_MAX_OUTPUTS,
    FISHERS,
    KRONECKER_KINDS,
    LIKELIHOODS,
    MAX_SAMPLES,
    BlockPlan,
    ConvGeometry,
    KroneckerLayer,
    layer_statistics,
    plan_blocks,
)
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
    _normalise_device,
    _npd_error,
    _round_up,
    _sampled_residual_and_curvature,
    _set,
    _state_field,
    _state_tensor,
)
from pyinfluence.torch.solvers.lanczos import _lanczos, _sharpen_negative_curvature

# fields written to config() only where they matter, so that configurations (and saved states) written
# before they existed read back unchanged: samples / likelihood only for fisher="sampled", max_outputs
# only when it is not the default
_SAMPLING_FIELDS = {"samples": 1, "likelihood": "auto"}
_UNSUPPORTED = ("error", "diagonal")
_F64 = torch.float64


def _range(t: Tensor) -> tuple[float, float]:
    return (float(t.min()), float(t.max())) if t.numel() else (0.0, 0.0)


@dataclass(frozen=True)
class KFAC(Solver):
    """K-FAC: (H + λI)⁻¹ V with each Linear / Conv2d layer's curvature block approximated by G ⊗ A.

    See the module docstring for the formulas (Martens & Grosse 2015; Grosse & Martens 2016 for
    convolutions and layers applied at several positions per example). The operator must be a
    :class:`~pyinfluence.torch.hessian.HessianOperator` (it needs ``fm``, ``data``, ``l2``,
    ``batch_size``, ``matvec``). Its selected parameters are grouped by module:

    - weights and biases of ``nn.Linear`` modules called once per forward pass on
      (batch, in_features) inputs (kind "linear") or (batch, *, in_features) inputs (kind
      "linear-sequence": every middle index is a position);
    - weights and biases of ``nn.Conv2d`` modules (groups=1, padding_mode="zeros", any stride,
      padding, dilation) called once per forward pass on (batch, C, H, W) inputs (kind "conv2d");
    - anything else (another module type; a grouped or non-zero-padded convolution; a module
      called twice, e.g. a shared layer, or never, e.g. a weight used through ``F.linear``):
      ValueError naming the parameter or layer and the setting, unless
      ``unsupported="diagonal"``.

    Parameters
    ----------
    fisher : {"true", "sampled", "empirical"}, default "true"
        How E[δ δᵀ] is taken: ``"true"`` the loss's output Hessian pushed back (the true Fisher,
        exactly, for cross-entropy on logits; the Gauss-Newton matrix for other losses; K backward
        passes for K outputs per example, refused above ``max_outputs``), ``"sampled"`` the same
        expectation by Monte Carlo over targets drawn from the model's predictive distribution
        (``samples`` backward passes; the affordable choice for language models and other large
        output spaces; see the module docstring for the likelihoods and the 1/√w_t scaling of
        per-token losses), ``"empirical"`` δ at the observed labels.
    unsupported : {"error", "diagonal"}, default "error"
        What to do with selected parameters that cannot be Kronecker-factored (see above):
        ``"error"`` raise ValueError; ``"diagonal"`` give them the exact diagonal of the same
        Fisher, (1/n) Σ_i E[(g_i)_j²] per coordinate (per-example gradients of just those
        parameters; memory: about 2²⁴ gradient entries at a time), plus l2 + λ. ``info["blocks"]``
        and ``info["coverage"]`` say which parameters went where.
    tol : float or None, default None
        None: never fail on the residual (an approximation's residual is not small; it is
        reported in ``SolveResult.residual``). A float: raise ConvergenceError when some
        column's true relative residual exceeds it (or warn, with
        ``raise_on_nonconvergence=False``).
    raise_on_nonconvergence : bool, default True
        As for :class:`CG`; only used when ``tol`` is set.
    lanczos_steps : int, default 40
        The approximation is positive definite whatever the true H is, so ``prepare`` looks for
        negative curvature of the TRUE H + λI with a Lanczos process of this many steps (one
        one-column full-training-set HVP each, from a random start drawn with ``seed``), and
        raises NotPositiveDefiniteError with a suggested damping when it finds some (as every
        solver does). 40 as LiSSA's ``power_iters``: on a trained 64-12-10 ReLU MLP (p = 910,
        λ_min = −7e-4 beside λ_max = 0.98) 20 steps missed the negative eigenvalues from two of
        three starts, 30 found them from all three, 40 to within 7 %. 0 skips the search (at
        scale it costs more than the factors: about three data passes per step); every solve
        still checks the curvature xᵀ(H + λI)x of its solution columns, free with the residual.
    seed : int or None, default 0
        Seed of the Lanczos start vector and of the sampled Fisher's draws (None: a fresh one each
        time; the sampling seed used is ``info["sampling_seed"]``).
    samples : int, default 1
        ``fisher="sampled"`` only (ValueError otherwise unless 1): target draws per example, one
        backward pass each; the factors' standard error shrinks as 1/√(n·samples).
    likelihood : {"auto", "categorical", "gaussian"}, default "auto"
        ``fisher="sampled"`` only (ValueError otherwise unless "auto"): the distribution the targets
        are drawn from — categorical over the outputs' last dimension (integer targets of the
        outputs' shape without it; the loss a weighted sum of cross-entropies) or Gaussian (targets
        of the outputs' shape; the loss a weighted squared error); "auto" picks by the targets'
        dtype and shape. A loss that does not fit raises ValueError naming the likelihood.
    max_outputs : int, default 512
        ``fisher="true"`` only: refuse (ValueError advising ``fisher="sampled"``) a model with more
        than this many outputs per example, whose exact output Hessian would cost K backward
        passes and memory of order B·K·(K + Σ_l T_l·out_l) per block of B examples.
    residual_columns : int or None, default None
        None: the true residual ‖(H + λI)x − v‖/‖v‖ and the curvature xᵀ(H + λI)x of every solution
        column, from one batched HVP of all r columns. At scale that check is the dominant cost of a
        solve for many test points (each column costs about three passes over the training data; the
        approximation's own solve, none): an int k measures at most k columns, evenly spaced over the
        block (first and last included; all when r ≤ k); ``SolveResult.residual`` then holds those
        columns' residuals only and ``info["residual_columns"]`` their indices. Needs ``tol=None``.

    ``prepare``: one forward pass on two training examples to find how each layer is called,
    then one pass over the training data in blocks of ``op.batch_size`` (EK-FAC: two, the second
    projecting the per-example gradients onto the eigenbases), then per layer one float64
    eigendecomposition of A (in' × in') and of G (out × out). Raises NotPositiveDefiniteError
    (with a suggested damping) only when l2 + λ ≤ 0 and an eigenvalue of the approximation is
    ≤ −(l2 + λ): the factors are positive semidefinite, so l2 + λ > 0 always succeeds.
    ``solve``: two small matrix products per layer and right-hand side, plus one batched HVP for
    the reported residual (``info["matvec_calls"]``). Memory: the factors and their
    eigenvectors, Σ_l (in'² + out²) floats, plus the diagonal; during ``prepare`` a block's
    patches (B × T × in') and output gradients (B × C × T × out) — C = 1 (empirical), ``samples``
    (sampled) or K (true) — and for EK-FAC with T > 1 the per-example gradients in the eigenbasis
    (B × out × in'). ``info`` holds ``fisher`` and, for "sampled", ``samples``, the ``likelihood``
    used and the ``sampling_seed``.
    """

    fisher: str = "true"
    tol: float | None = None
    raise_on_nonconvergence: bool = True
    lanczos_steps: int = 40
    seed: int | None = 0
    unsupported: str = "error"
    samples: int = 1
    likelihood: str = "auto"
    max_outputs: int = DEFAULT_MAX_OUTPUTS
    residual_columns: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fisher, str) or self.fisher.strip().lower() not in FISHERS:
            raise ValueError(f"fisher must be 'true', 'sampled' or 'empirical', got {self.fisher!r}")
        _set(self, "fisher", self.fisher.strip().lower())
        _set(self, "samples", check_int("samples", self.samples, 1, MAX_SAMPLES))
        if not isinstance(self.likelihood, str) or self.likelihood.strip().lower() not in LIKELIHOODS:
            raise ValueError(
                f"likelihood must be 'auto', 'categorical' or 'gaussian', got {self.likelihood!r}"
            )
        _set(self, "likelihood", self.likelihood.strip().lower())
        if self.fisher != "sampled":
            for name, default in _SAMPLING_FIELDS.items():
                if getattr(self, name) != default:
                    raise ValueError(
                        f"{name}={getattr(self, name)!r} is used only with fisher='sampled' (here "
                        f"fisher={self.fisher!r}); pass fisher='sampled' or leave {name} at {default!r}"
                    )
        _set(self, "max_outputs", check_int("max_outputs", self.max_outputs, 1))
        if not isinstance(self.unsupported, str) or self.unsupported.strip().lower() not in _UNSUPPORTED:
            raise ValueError(f"unsupported must be 'error' or 'diagonal', got {self.unsupported!r}")
        _set(self, "unsupported", self.unsupported.strip().lower())
        _check_stopping_fields(self, optional_tol=True)
        _check_residual_columns(self)
        _set(self, "lanczos_steps", check_int("lanczos_steps", self.lanczos_steps, 0))
        _set(self, "seed", _check_seed("seed", self.seed))

    name: ClassVar[str] = "kfac"
    _eigen_corrected: ClassVar[bool] = False
    _restore_needs: ClassVar[tuple[str, ...]] = ("matvec",)

    def config(self) -> dict[str, Any]:
        """As :meth:`Solver.config`, with ``samples`` and ``likelihood`` written only for
        ``fisher="sampled"``, ``max_outputs`` only when it is not 512 and ``residual_columns`` only when
        set: a configuration written
        before these fields existed is the same configuration (absent fields take their defaults in
        :func:`~pyinfluence.torch.solvers.solver_from_config`)."""
        cfg = super().config()
        if self.fisher != "sampled":
            for name in _SAMPLING_FIELDS:
                cfg.pop(name, None)
        if self.max_outputs == DEFAULT_MAX_OUTPUTS:
            cfg.pop("max_outputs", None)
        if self.residual_columns is None:
            cfg.pop("residual_columns", None)
        return cfg

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedKFAC:
        who = type(self).__name__
        _check_operator(op, ("matvec",))
        _check_model_operator(op, who, ("fm", "data", "l2"))
        damping = check_damping(damping)
        start = time.perf_counter()
        fm: Any = op.fm  # type: ignore[attr-defined]
        data: Any = op.data  # type: ignore[attr-defined]
        l2 = float(op.l2)  # type: ignore[attr-defined]
        n = len(data)
        plan = plan_blocks(fm, data.head(min(2, n))[0], who, self.unsupported)
        layers = plan.layers
        if self.lanczos_steps:
            self._check_true_curvature(op, damping, who)
        rows = int(min(n, max(1, int(getattr(op, "batch_size", n)))))
        dev = fm.device
        A = [torch.zeros((ly.n_cols, ly.n_cols), dtype=_F64, device=dev) for ly in layers]
        G = [torch.zeros((ly.n_out, ly.n_out), dtype=_F64, device=dev) for ly in layers]
        positions = [0] * len(layers)  # Σ_i T_i per layer: A is the mean over examples and positions
        t_range = [(0, 0)] * len(layers)  # (min, max) positions per example
        D = {nm: torch.zeros(fm.params[nm].shape, dtype=_F64, device=dev) for nm in plan.diagonal_names}
        rel_neg = 0.0
        # the sampled Fisher's draws: one seed for every pass (EK-FAC's second pass sees the same targets)
        sampling_seed = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        # sharded training data (torch.distributed): each rank sums its shard, the sums are all-reduced below;
        # a random seed is rank 0's, so that every rank draws the same targets for the same example
        dist: Any = getattr(op, "dist", None)
        if dist is not None:
            sampling_seed = dist.broadcast_int(sampling_seed)
        stat_kw: dict[str, Any] = {
            "samples": self.samples,
            "likelihood": self.likelihood,
            "seed": sampling_seed,
            "max_outputs": self.max_outputs,
        }
        likelihoods: set[str] = set()
        for start_i, X, Y in _data_pass(op, data, rows, f"{who}: factors"):
            st = layer_statistics(fm, plan, X, Y, self.fisher, who, start=start_i, **stat_kw)
            rel_neg = min(rel_neg, st.rel_neg)
            if st.likelihood is not None:
                likelihoods.add(st.likelihood)
            for l_, (a, d) in enumerate(zip(st.acts, st.deltas)):
                B, T = a.shape[0], a.shape[1]
                a64 = a.to(_F64).reshape(-1, a.shape[-1])  # (B·T, in')
                A[l_].addmm_(a64.mT, a64)  # Σ_i Σ_t ā_it ā_itᵀ
                if T == 1:
                    d64 = d.to(_F64).reshape(-1, d.shape[-1])  # (B·C, out)
                    G[l_].addmm_(d64.mT, d64)  # Σ_i Σ_c δ_i^(c) δ_i^(c)ᵀ
                else:  # one cotangent at a time: a float64 copy of (B·T, out), not (B·C·T, out)
                    for c in range(d.shape[1]):
                        d64 = d[:, c].to(_F64).reshape(-1, d.shape[-1])
                        G[l_].addmm_(d64.mT, d64)  # Σ_i Σ_t δ_it^(c) δ_it^(c)ᵀ
                positions[l_] += B * T
                t_lo, t_hi = t_range[l_]
                t_range[l_] = (T if t_lo == 0 else min(t_lo, T), max(t_hi, T))
            for nm, sq in st.diag.items():
                D[nm] += sq  # Σ_i Σ_c (g_i^(c))²
        if dist is not None:
            A, G, D, positions, t_range, rel_neg, likelihoods = _reduce_statistics(
                dist, A, G, D, positions, t_range, rel_neg, likelihoods
            )
        factors = []
        spectra = []
        for Al, Gl, cnt in zip(A, G, positions):
            Al = 0.5 * (Al + Al.mT) / max(cnt, 1)  # (1/(nT)) Σ_i Σ_t ā āᵀ  (cnt = n for T = 1)
            Gl = 0.5 * (Gl + Gl.mT) / n  # (1/n) Σ_i Σ_t E[δ δᵀ]
            ea, QA = torch.linalg.eigh(Al)
            eg, QG = torch.linalg.eigh(Gl)
            spectra.append((_range(ea), _range(eg)))
            factors.append([QA, QG, torch.outer(eg.clamp_min(0.0), ea.clamp_min(0.0))])
        passes = 1
        if self._eigen_corrected and layers:
            passes = 2
            S = [torch.zeros_like(f[2]) for f in factors]
            for start_i, X, Y in _data_pass(op, data, rows, f"{who}: eigenvalue correction"):
                st = layer_statistics(fm, BlockPlan(layers), X, Y, self.fisher, who, start=start_i, **stat_kw)
                for l_, (ly, a, d) in enumerate(zip(layers, st.acts, st.deltas)):
                    QA, QG, _ = factors[l_]
                    if ly.kind == "linear":  # T = 1: (Q_Gᵀ δ āᵀ Q_A)_jk² = (Q_Gᵀ δ)_j² (Q_Aᵀ ā)_k²
                        w = (a[:, 0].to(_F64) @ QA).square()  # (B, in'): (Q_Aᵀ ā_i)_k²
                        u = (d[:, :, 0].to(_F64) @ QG).square().sum(1)  # (B, out): Σ_c (Q_Gᵀ δ_i^(c))_j²
                        S[l_].addmm_(u.mT, w)
                        continue
                    aq = a.to(_F64) @ QA  # (B, T, in'): ā_it Q_A
                    for c in range(d.shape[1]):
                        dq = d[:, c].to(_F64) @ QG  # (B, T, out): δ_it^(c) Q_G
                        # Q_Gᵀ g_i^(c) Q_A = Σ_t (Q_Gᵀ δ_it)(Q_Aᵀ ā_it)ᵀ = (δ_i Q_G)ᵀ (ā_i Q_A): (B, out, in')
                        S[l_].add_(torch.bmm(dq.mT, aq).square().sum(0))
            if dist is not None:
                S = [dist.all_reduce_sum(s) for s in S]  # Σ over every rank's shard
            for f, s in zip(factors, S):
                f[2] = s / n
        diag = {nm: t / n for nm, t in D.items()}  # (1/n) Σ_i E[g_ij²]
        shift = l2 + damping
        lows = [float(f[2].min()) for f in factors] + [float(t.min()) for t in diag.values() if t.numel()]
        his = [float(f[2].max()) for f in factors] + [float(t.max()) for t in diag.values() if t.numel()]
        low, hi = (min(lows), max(his)) if lows else (0.0, 0.0)
        if low + shift <= 0:
            need = -(low + l2)
            suggest = _round_up(max(2.0 * need, need + 1e-4 * abs(hi), 1e-4 * abs(hi), 1e-12))
            at = lows.index(low)
            if at < len(layers):
                bad = f"layer {layers[at].path or 'the model'!r}"
            else:
                bad = "the diagonal block"
            raise NotPositiveDefiniteError(
                f"{who}: the approximation of H + λI is not positive definite: its smallest "
                f"eigenvalue ({bad}) is {_fmt(low)} + l2 + λ = {_fmt(low + shift)} ≤ 0 "
                f"(l2={l2:g}, damping={damping:g}; the largest curvature eigenvalue is "
                f"{_fmt(hi)}). The Kronecker factors are only positive semidefinite: pass "
                f"damping > {_fmt(max(need, 0.0))}, e.g. damping={suggest:g}",
                size=int(op.n_params),
                min_pivot=low + shift,
                suggested_damping=suggest,
            )
        info: dict[str, Any] = {
            "fisher": self.fisher,
            "layers": [ly.path for ly in layers],
            "passes": passes,
            "n_train": n,
            "curvature_range": (low, hi),
            "unsupported": self.unsupported,
        }
        info.update(_coverage(plan, factors, spectra, t_range, diag, int(op.n_params)))
        if self.fisher == "sampled":
            info["samples"] = self.samples
            info["likelihood"] = "/".join(sorted(likelihoods))
            info["sampling_seed"] = sampling_seed
        if self.fisher == "true" and rel_neg < 0:
            info["output_hessian_min_relative_eigenvalue"] = rel_neg
        return _PreparedKFAC(
            self, op, damping, info, time.perf_counter() - start, fm, layers, factors, diag, shift
        )

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedKFAC:
        """The layers from the saved plan, checked against the operator's parameters (names, shapes, every
        selected parameter in exactly one block), and their saved eigenbases and eigenvalues; no pass over
        the data, no forward pass."""
        who = f"{type(self).__name__}.restore"
        _check_model_operator(op, type(self).__name__, ("fm", "l2"))
        fm: Any = op.fm  # type: ignore[attr-defined]
        l2 = float(op.l2)  # type: ignore[attr-defined]
        dev = fm.device
        shapes = dict(zip(fm.names, fm.shapes))
        layers = [
            _layer_from_json(d, i, shapes, who)
            for i, d in enumerate(_state_field(state, "layers", who, list))
        ]
        diag_names = _state_field(state, "diagonal", who, list)
        owners: dict[str, str] = {}
        for i, ly in enumerate(layers):
            for nm in ly.names:
                if nm in owners:
                    raise ValueError(f"{who}: parameter {nm!r} is in two blocks of the saved state")
                owners[nm] = f"layer {i}"
        for nm in diag_names:
            if not isinstance(nm, str) or nm not in shapes:
                raise ValueError(
                    f"{who}: the saved diagonal block names {nm!r}, not a selected parameter here"
                )
            if nm in owners:
                raise ValueError(f"{who}: parameter {nm!r} is in two blocks of the saved state")
            owners[nm] = "diagonal"
        left = [nm for nm in fm.names if nm not in owners]
        if left:
            raise ValueError(f"{who}: the saved state has no block for the selected parameter(s) {left}")
        factors = []
        for i, ly in enumerate(layers):
            QA = _state_tensor(tensors, f"layers.{i}.QA", who, (ly.n_cols, ly.n_cols), _F64, dev)
            QG = _state_tensor(tensors, f"layers.{i}.QG", who, (ly.n_out, ly.n_out), _F64, dev)
            ev = _state_tensor(tensors, f"layers.{i}.eigenvalues", who, (ly.n_out, ly.n_cols), _F64, dev)
            factors.append([QA, QG, ev])
        diag = {nm: _state_tensor(tensors, f"diagonal.{nm}", who, shapes[nm], _F64, dev) for nm in diag_names}
        shift = l2 + damping  # as in prepare: the same float, so the same denominators bit for bit
        return _PreparedKFAC(self, op, damping, info, 0.0, fm, layers, factors, diag, shift)

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


def _check_model_operator(op: Any, who: str, needs: tuple[str, ...]) -> None:
    missing = [m for m in needs if not hasattr(op, m)]
    if missing:
        raise TypeError(
            f"{who} needs the model behind the Hessian: op must be a "
            f"pyinfluence.torch.hessian.HessianOperator (with fm, data, l2), "
            f"{type(op).__name__} lacks {', '.join(missing)}"
        )


def _layer_to_json(ly: KroneckerLayer) -> dict[str, Any]:
    g = ly.conv
    return {
        "path": ly.path,
        "kind": ly.kind,
        "weight": ly.weight,
        "bias": ly.bias,
        "n_out": ly.n_out,
        "n_in": ly.n_in,
        "weight_shape": list(ly.weight_shape),
        "conv": None
        if g is None
        else {
            "kernel_size": list(g.kernel_size),
            "stride": list(g.stride),
            "dilation": list(g.dilation),
            "pad": list(g.pad),
        },
    }


def _int_list(v: Any, n: int | None) -> bool:
    return (
        isinstance(v, list)
        and (n is None or len(v) == n)
        and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)
    )


def _layer_from_json(d: Any, i: int, shapes: dict[str, tuple[int, ...]], who: str) -> KroneckerLayer:
    """A saved layer, checked against the selected parameters' shapes (``shapes``: name → shape)."""
    bad = f"{who}: the saved layer {i} is malformed"
    if not isinstance(d, Mapping):
        raise ValueError(bad)
    path, kind, weight, bias = d.get("path"), d.get("kind"), d.get("weight"), d.get("bias")
    n_out, n_in, conv = d.get("n_out"), d.get("n_in"), d.get("conv")
    w_shape: Any = d.get("weight_shape")
    if (
        not isinstance(path, str)
        or kind not in KRONECKER_KINDS
        or not (weight is None or isinstance(weight, str))
        or not (bias is None or isinstance(bias, str))
        or (weight is None and bias is None)
        or not _int_list(w_shape, None)
        or len(w_shape) < 2
        or n_out != w_shape[0]
        or n_in != math.prod(w_shape[1:])
    ):
        raise ValueError(bad)
    geometry = None
    if kind == "conv2d":
        if not isinstance(conv, Mapping) or not all(
            _int_list(conv.get(k), n)
            for k, n in (("kernel_size", 2), ("stride", 2), ("dilation", 2), ("pad", 4))
        ):
            raise ValueError(bad)
        geometry = ConvGeometry(
            tuple(conv["kernel_size"]), tuple(conv["stride"]), tuple(conv["dilation"]), tuple(conv["pad"])
        )
    label = repr(path) if path else "'' (the model itself)"
    for nm, want in ((weight, tuple(w_shape)), (bias, (n_out,))):
        if nm is None:
            continue
        if nm not in shapes:
            raise ValueError(
                f"{who}: the saved layer {label} has parameter {nm!r}, which is not selected here"
            )
        if tuple(shapes[nm]) != want:
            raise ValueError(
                f"{who}: the saved layer {label} has parameter {nm!r} of shape {want}, here it has shape "
                f"{tuple(shapes[nm])}"
            )
    return KroneckerLayer(path, kind, weight, bias, n_out, n_in, tuple(w_shape), geometry)


def _coverage(
    plan: BlockPlan,
    factors: list[list[Tensor]],
    spectra: list[tuple[tuple[float, float], tuple[float, float]]],
    t_range: list[tuple[int, int]],
    diag: dict[str, Tensor],
    p: int,
) -> dict[str, Any]:
    """``info["blocks"]``, ``info["coverage"]`` and ``info["diagonal_params"]``: what the
    approximation covers."""
    blocks: list[dict[str, Any]] = []
    by_kind = {k: 0 for k in ("linear", "linear-sequence", "conv2d", "diagonal")}
    for ly, f, (ra, rg), (t_lo, t_hi) in zip(plan.layers, factors, spectra, t_range):
        by_kind[ly.kind] += ly.n_params
        blocks.append(
            {
                "path": ly.path,
                "kind": ly.kind,
                "params": ly.names,
                "n_params": ly.n_params,
                "shape": (ly.n_out, ly.n_cols),
                "positions": t_lo if t_lo == t_hi else (t_lo, t_hi),
                "A_eigenvalue_range": ra,
                "G_eigenvalue_range": rg,
                "curvature_range": _range(f[2]),
            }
        )
    for blk in plan.diagonal:
        by_kind["diagonal"] += blk.n_params
        vals = torch.cat([diag[nm].reshape(-1) for nm in blk.names])
        blocks.append(
            {
                "path": blk.path,
                "kind": "diagonal",
                "module": blk.module,
                "params": list(blk.names),
                "n_params": blk.n_params,
                "reason": blk.reason,
                "curvature_range": _range(vals),
            }
        )
    coverage: dict[str, float] = {k: v / p for k, v in by_kind.items()}
    coverage["kronecker"] = (p - by_kind["diagonal"]) / p
    return {"blocks": blocks, "coverage": coverage, "diagonal_params": plan.diagonal_names}


def _reduce_statistics(
    dist: Any,
    A: list[Tensor],
    G: list[Tensor],
    D: dict[str, Tensor],
    positions: list[int],
    t_range: list[tuple[int, int]],
    rel_neg: float,
    likelihoods: set[str],
) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor], list[int], list[tuple[int, int]], float, set[str]]:
    """The first pass's statistics summed over the ranks' shards (torch.distributed): the factor sums A, G and
    the diagonal D (float64), the position counts; the per-layer (min, max) positions per example, the most
    negative output-Hessian eigenvalue ratio and the likelihoods used, over every rank."""
    A = [dist.all_reduce_sum(a) for a in A]
    G = [dist.all_reduce_sum(g) for g in G]
    D = {nm: dist.all_reduce_sum(t) for nm, t in D.items()}
    L = len(positions)
    big = 1 << 62  # "no example seen" (t_lo = 0) must not win the minimum
    ints = torch.tensor(
        positions + [-(t if t else big) for t, _ in t_range] + [hi for _, hi in t_range], dtype=torch.int64
    )
    sums = dist.all_reduce_sum(ints[:L])
    maxes = dist.all_reduce_max(ints[L:])
    lik = sorted(LIKELIHOODS)
    flags = torch.tensor([-rel_neg] + [float(k in likelihoods) for k in lik], dtype=torch.float64)
    flags = dist.all_reduce_max(flags)
    t_lo = [(-int(v) if -int(v) != big else 0) for v in maxes[:L].tolist()]
    t_hi = [int(v) for v in maxes[L:].tolist()]
    return (
        A,
        G,
        D,
        [int(v) for v in sums.tolist()],
        list(zip(t_lo, t_hi)),
        -float(flags[0]),
        {k for k, f in zip(lik, flags[1:].tolist()) if f > 0},
    )


def _data_pass(op: Any, data: Any, rows: int, desc: str) -> Any:
    """The operator's pass over the data with its progress bar, if it has one (a HessianOperator), else the
    data's own blocks."""
    passes = getattr(op, "data_pass", None)
    return passes(rows, desc) if callable(passes) else data.blocks(rows)


@dataclass(frozen=True)
class EKFAC(KFAC):
    """EK-FAC: K-FAC's eigenbasis with the eigenvalues refitted to the per-example gradients.

    George et al. 2018 (§3, eq. 9): in the K-FAC eigenbasis Q_G ⊗ Q_A, the Kronecker eigenvalue
    g_j a_k of each layer is replaced by the second moment
    S_jk = (1/n) Σ_i E[(Q_Gᵀ (Σ_t δ_it ā_itᵀ) Q_A)_jk²] of the EXACT per-example gradient (all
    positions t summed before squaring; the same expectation ``fisher`` as K-FAC, for
    ``"true"`` exact over the output-Hessian square-root columns, for ``"sampled"`` over the
    same draws as the first pass), and
    X_l = Q_G [(Q_Gᵀ M Q_A) ⊘ (S + l2 + λ)] Q_Aᵀ. S is the exact diagonal of the layer's Fisher
    block in that basis, so EK-FAC is at least as close to it (in Frobenius norm) as K-FAC —
    and, unlike K-FAC, it does not assume spatially uncorrelated derivatives. Parameters, the
    diagonal fallback and errors as :class:`KFAC`; ``prepare`` makes two passes over the
    training data (factors, then the projected second moments).
    """

    name: ClassVar[str] = "ekfac"
    _eigen_corrected: ClassVar[bool] = True


class _PreparedKFAC(PreparedSolver):
    """The prepared K-FAC / EK-FAC approximate inverse. Read-only after construction: ``solve``,
    ``_apply`` and ``_apply_sqrt_inverse`` may be called from several threads at once."""

    solver: KFAC

    def __init__(
        self,
        solver: KFAC,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
        fm: Any,
        layers: list[KroneckerLayer],
        factors: list[list[Tensor]],
        diag: dict[str, Tensor],
        shift: float,
    ) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._fm = fm
        self._layers = layers
        # per layer: Q_A, Q_G and the denominator (out, in') = eigenvalues + l2 + λ
        self._factors = [(QA, QG, ev + shift) for QA, QG, ev in factors]
        # per diagonal-fallback parameter: the denominator D + l2 + λ (the parameter's shape)
        self._diag = {nm: t + shift for nm, t in diag.items()}
        # the curvature itself (eigenvalues, Fisher diagonal) without l2 + λ, for state()
        self._eigenvalues = [ev for _, _, ev in factors]
        self._diag_moments = dict(diag)

    def _state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        for i, ((QA, QG, _), ev) in enumerate(zip(self._factors, self._eigenvalues)):
            tensors[f"layers.{i}.QA"] = QA
            tensors[f"layers.{i}.QG"] = QG
            tensors[f"layers.{i}.eigenvalues"] = ev
        for nm, t in self._diag_moments.items():
            tensors[f"diagonal.{nm}"] = t
        return {"layers": [_layer_to_json(ly) for ly in self._layers], "diagonal": list(self._diag_moments)}

    def _apply(self, V: Tensor) -> Tensor:
        """M V for V (p, r), M = the block-diagonal approximate (H + λI)⁻¹ (computed in float64,
        returned in V's dtype): per layer X_l = Q_G [(Q_Gᵀ V_l Q_A) ⊘ D] Q_Aᵀ, D = eigenvalues + l2 + λ;
        per diagonal-fallback coordinate X_j = V_j / (D_j + l2 + λ)."""
        return self._apply_power(V, sqrt=False)

    def _apply_sqrt_inverse(self, V: Tensor) -> Tensor:
        """M^{1/2} V for V (p, r) (float64 inside, V's dtype out), with M the approximate (H + λI)⁻¹
        of :meth:`_apply`: the symmetric square root in the same eigenbasis, per layer
        Q_G [(Q_Gᵀ V_l Q_A) ⊙ D^(−1/2)] Q_Aᵀ (diagonal blocks: V_j (D_j + l2 + λ)^(−1/2)), so
        ``_apply_sqrt_inverse(_apply_sqrt_inverse(V))`` equals ``_apply(V)`` (up to rounding). For a
        preconditioned LiSSA / CG that needs a symmetric split M = M^{1/2} M^{1/2}."""
        return self._apply_power(V, sqrt=True)

    def _apply_power(self, V: Tensor, sqrt: bool) -> Tensor:
        """The block-diagonal approximate inverse (``sqrt``: its square root) applied to V (p, r)."""
        fm = self._fm
        r = V.shape[1]
        T = fm.unflatten(V.mT.to(_F64))  # {name: (r, *shape)}
        out: dict[str, Tensor] = {}
        for ly, (QA, QG, den) in zip(self._layers, self._factors):
            parts = []
            if ly.weight is not None:
                parts.append(T[ly.weight].reshape(r, ly.n_out, ly.n_in))  # (r, out, in)
            if ly.bias is not None:
                parts.append(T[ly.bias].unsqueeze(-1))  # (r, out, 1)
            M = torch.cat(parts, dim=-1)  # (r, out, in'): the row-major blocks [W b]
            if sqrt:
                Xl = QG @ ((QG.mT @ M @ QA) * den.rsqrt()) @ QA.mT
            else:
                Xl = QG @ ((QG.mT @ M @ QA) / den) @ QA.mT
            if ly.weight is not None:
                out[ly.weight] = Xl[..., : ly.n_in]
            if ly.bias is not None:
                out[ly.bias] = Xl[..., -1]
        for nm, den in self._diag.items():
            out[nm] = T[nm] * den.rsqrt() if sqrt else T[nm] / den
        return fm.flatten(out, (r,)).mT.to(V.dtype)

    def _solve(self, V: Tensor):
        X = self._apply(V)
        if not bool(torch.isfinite(X).all()):  # denominators are ≥ l2 + λ > 0: only an overflow gets here
            raise NonFiniteError(
                f"{type(self.solver).__name__}: the solution overflowed to inf or NaN (the right-hand sides "
                f"or the curvature factors are too large for {V.dtype}); scale the inputs or use float64",
                what=f"the {type(self.solver).__name__} solution",
            )
        res, curv, k, measured = _sampled_residual_and_curvature(
            self.op, X, V, self.damping, self.solver.residual_columns
        )
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
        if measured is not None:
            info["residual_columns"] = measured
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
