"""Per-layer statistics for the K-FAC / EK-FAC solvers: which blocks, and the per-example quantities.

Private machinery of :mod:`pyinfluence.torch.solvers.kfac` (see its docstring for the maths):

- :func:`plan_blocks`: the selected parameters grouped by the module that owns them, each group
  assigned a block kind. Kronecker-factored kinds (layer parameter matrix M = [W b], flat order W
  row-major then b):

  * ``"linear"``: ``nn.Linear`` called once per forward pass on (batch, in_features) inputs;
    M is (out × in'), in' = in + [bias];
  * ``"linear-sequence"``: ``nn.Linear`` called once on (batch, *, in_features) inputs (e.g.
    (B, T, d) tokens): the middle dimensions are the T "positions" t of the layer, each applying
    the same M;
  * ``"conv2d"``: ``nn.Conv2d`` with groups = 1 and padding_mode "zeros", called once on
    (batch, C, H, W) inputs: M = [W.reshape(out, C·kh·kw) b], positions t = the oh·ow output
    pixels, patches ā_it from ``torch.nn.functional.unfold`` (channel-major, then kh, then kw:
    the order of W.reshape).

  Everything else — a parameter of another module type (LayerNorm, Embedding, a custom
  parameter), a grouped or non-zero-padded convolution, a module called more or less than once
  per forward pass (shared / tied weights, ``F.linear(x, module.weight)``) or fed inputs whose
  first dimension is not the batch — raises ValueError (``unsupported="error"``) or becomes a
  ``"diagonal"`` block (``unsupported="diagonal"``).
- :func:`layer_statistics`: for one block of training examples, each Kronecker layer's
  augmented inputs ā_it (B, T, in') and output-gradient "cotangents" δ_it^(c) (B, C, T, out)
  with Σ_c δ_it^(c) δ_it'^(c)ᵀ = E[δ_it δ_it'ᵀ] (the expectation ``fisher`` takes), and for the
  diagonal blocks Σ_i Σ_c (g_i^(c))², g_i^(c) = J_iᵀ c the per-example parameter gradient pushed
  from the same cotangents (``torch.func.vmap`` over examples of a ``vjp``).
- :func:`sampled_cotangents`: the cotangents of ``fisher="sampled"`` (targets drawn from the
  model's predictive distribution, checked against the likelihood; see the K-FAC module
  docstring for the maths), from a counter-based hash of (seed, example index, sample, position)
  so that the draws do not depend on the block size or the device.

The statistics are collected with forward hooks on the module tree the functional model calls
(its private per-thread copy, or the model itself under the model's lock); the hooks are removed
before each function returns, whatever happens.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp, vmap

from pyinfluence.torch.batches import Inputs, batch_len, map_inputs, slice_inputs
from pyinfluence.torch.functional import FunctionalModel, _per_example

__all__ = [
    "BlockPlan",
    "DiagonalBlock",
    "KroneckerLayer",
    "LayerStatistics",
    "layer_statistics",
    "plan_blocks",
    "resolve_likelihood",
    "sampled_cotangents",
]

KRONECKER_KINDS = ("linear", "linear-sequence", "conv2d")
# the diagonal fallback processes at most this many per-example gradient entries at once
# (examples × cotangents × fallback parameters), to bound the memory of the vmapped vjp
_DIAG_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class ConvGeometry:
    """How ``nn.Conv2d`` extracts its patches: ``kernel_size``, ``stride``, ``dilation`` (h, w)
    and the zero padding (left, right, top, bottom) in ``F.pad`` order (asymmetric only for
    padding="same" with an even receptive field, where torch pads the extra row/column at the end)."""

    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int]


@dataclass(frozen=True)
class KroneckerLayer:
    """One ``nn.Linear`` or ``nn.Conv2d`` module with at least one selected parameter.

    ``path``: the module's name in the model ("" for the model itself); ``kind``: "linear",
    "linear-sequence" or "conv2d"; ``weight`` / ``bias``: the selected parameter names (None when
    not selected, or absent); ``n_out``: out_features / out_channels; ``n_in``: in_features /
    in_channels·kh·kw (the weight's columns after ``reshape(out, -1)``); ``conv``: the patch
    geometry of a convolution. The layer's block of θ is the (out × in') matrix M = [W b] with
    in' = (n_in if the weight is selected else 0) + (1 if the bias is selected).
    """

    path: str
    kind: str
    weight: str | None
    bias: str | None
    n_out: int
    n_in: int
    weight_shape: tuple[int, ...]
    conv: ConvGeometry | None = None

    @property
    def n_cols(self) -> int:
        """in': the columns of the layer's parameter matrix [W b] (selected parts only)."""
        return (self.n_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)

    @property
    def n_params(self) -> int:
        return self.n_out * self.n_cols

    @property
    def names(self) -> list[str]:
        return [n for n in (self.weight, self.bias) if n is not None]


@dataclass(frozen=True)
class DiagonalBlock:
    """Selected parameters of one module that get the exact diagonal of the Fisher block
    (``unsupported="diagonal"``): ``path`` of the module, its type name ``module``, the parameter
    ``names`` and ``sizes``, and the ``reason`` they are not Kronecker-factored."""

    path: str
    module: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    reason: str

    @property
    def n_params(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class BlockPlan:
    """The Kronecker ``layers`` (in the order of their first selected parameter) and the
    ``diagonal`` blocks covering the remaining selected parameters."""

    layers: list[KroneckerLayer]
    diagonal: list[DiagonalBlock] = field(default_factory=list)

    @property
    def diagonal_names(self) -> list[str]:
        return [n for blk in self.diagonal for n in blk.names]


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


def _label(path: str) -> str:
    return repr(path) if path else "'' (the model itself)"


def _conv_geometry(m: nn.Conv2d) -> ConvGeometry:
    k = (int(m.kernel_size[0]), int(m.kernel_size[1]))
    s = (int(m.stride[0]), int(m.stride[1]))
    d = (int(m.dilation[0]), int(m.dilation[1]))
    if isinstance(m.padding, str):
        if m.padding == "valid":
            ph = pw = (0, 0)
        else:  # "same": total d·(k − 1) per dimension, the odd one at the end (as torch does)
            th, tw = d[0] * (k[0] - 1), d[1] * (k[1] - 1)
            ph, pw = (th // 2, th - th // 2), (tw // 2, tw - tw // 2)
    else:
        ph = (int(m.padding[0]),) * 2
        pw = (int(m.padding[1]),) * 2
    return ConvGeometry(k, s, d, (pw[0], pw[1], ph[0], ph[1]))


def _unsupported_setting(m: nn.Module) -> str | None:
    """Why a Linear / Conv2d module cannot be Kronecker-factored from its type and settings alone."""
    if isinstance(m, nn.Conv2d):
        if int(m.groups) != 1:
            return f"groups={m.groups} (only groups=1 is supported)"
        if m.padding_mode != "zeros":
            return f"padding_mode={m.padding_mode!r} (only 'zeros' is supported)"
    return None


def _hooked_forward(
    fm: FunctionalModel, paths: Sequence[str], X: Inputs
) -> tuple[Any, dict[str, list[tuple[Any, Any]]]]:
    """The model's output on X at θ̂ (parameters as autograd leaves) and, per module path, the
    (input, output) of every call of that module during the forward pass."""
    captured: dict[str, list[tuple[Any, Any]]] = {p: [] for p in paths}

    def make_hook(path: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            captured[path].append((inputs[0] if inputs else None, output))

        return hook

    with fm.hooked_module() as module:
        handles = []
        try:
            for p in paths:
                handles.append(module.get_submodule(p).register_forward_hook(make_hook(p)))
            leaves = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
            with torch.enable_grad():
                Z = fm.forward(leaves, X)
        finally:
            for h in handles:
                h.remove()
    return Z, captured


def _call_problem(kind: str, seen: list[tuple[Any, Any]], B: int) -> str | None:
    """Why a Linear / Conv2d module's calls in one forward pass on B examples cannot be factored."""
    if len(seen) != 1:
        if not seen:
            return (
                "it was not called in the forward pass (unused, or its weight is used without calling "
                "the module, e.g. F.linear(x, module.weight) as in nn.MultiheadAttention's out_proj)"
            )
        return (
            f"it was called {len(seen)} times in one forward pass (a shared module or tied weights); only "
            f"modules applied once per forward pass are supported"
        )
    a, s = seen[0]
    if not isinstance(a, Tensor) or not isinstance(s, Tensor):
        return "its input or output is not a tensor"
    if kind == "conv2d":
        if a.ndim != 4 or a.shape[0] != B:
            return (
                f"it received an input of shape {tuple(a.shape)} for a batch of {B} examples; only "
                f"(batch, channels, height, width) inputs are supported"
            )
    elif a.ndim < 2 or a.shape[0] != B:
        return (
            f"it received an input of shape {tuple(a.shape)} for a batch of {B} examples; only "
            f"(batch, *, in_features) inputs with the examples first are supported"
        )
    return None


def plan_blocks(
    fm: FunctionalModel, X_probe: Inputs, who: str = "KFAC", unsupported: str = "error"
) -> BlockPlan:
    """The selected parameters grouped into Kronecker layers and (``unsupported="diagonal"``)
    diagonal blocks. ``X_probe``: a few training inputs (one forward pass with hooks finds how
    often each Linear / Conv2d module is called and the shape of its input; two or more examples
    make the batch dimension identifiable).

    With ``unsupported="error"``, raises ValueError naming the first selected parameter whose
    module type is not ``nn.Linear`` / ``nn.Conv2d``, or the layer and the setting that cannot be
    factored (groups > 1, padding_mode other than "zeros", a module called other than once per
    forward pass, inputs without the examples first)."""
    model = fm.model
    groups: dict[str, dict[str, Any]] = {}
    sizes = dict(zip(fm.names, fm.sizes))
    for name in fm.names:
        path, attr = _split(name)
        try:
            module: nn.Module | None = model.get_submodule(path)
        except AttributeError:  # cannot happen for names from named_parameters
            module = None
        entry = groups.setdefault(path, {"module": module, "names": [], "reason": None})
        entry["names"].append(name)
        if entry["reason"] is not None:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or attr not in ("weight", "bias"):
            owner = type(module).__name__ if module is not None else "an unknown module"
            entry["reason"] = f"unsupported module type {owner}"
            if unsupported == "error":
                raise ValueError(
                    f"{who} supports nn.Linear and nn.Conv2d layers only; parameter {name!r} belongs to "
                    f"{owner}. Pass unsupported='diagonal' to give such parameters the exact diagonal of "
                    f"the Fisher, select only the Linear / Conv2d layers' parameters with params=[...], "
                    f"or use solver='exact', 'cg' or 'block_cg'"
                )
            continue
        setting = _unsupported_setting(module)
        if setting is not None:
            entry["reason"] = f"{type(module).__name__} with {setting}"
            if unsupported == "error":
                raise ValueError(
                    f"{who}: the {type(module).__name__} layer {_label(path)} (parameter {name!r}) has "
                    f"{setting}. Pass unsupported='diagonal' to give its parameters the exact diagonal of "
                    f"the Fisher, leave it out of params=[...], or use solver='exact', 'cg' or 'block_cg'"
                )
    candidates = [p for p, e in groups.items() if e["reason"] is None]
    if candidates:
        B = batch_len(X_probe)
        _, captured = _hooked_forward(fm, candidates, X_probe)
        for p in candidates:
            e = groups[p]
            kind = "conv2d" if isinstance(e["module"], nn.Conv2d) else "linear"
            problem = _call_problem(kind, captured[p], B)
            if problem is None:
                if kind == "linear" and captured[p][0][0].ndim > 2:
                    kind = "linear-sequence"
                e["kind"] = kind
                continue
            e["reason"] = f"{type(e['module']).__name__}: {problem}"
            if unsupported == "error":
                raise ValueError(
                    f"{who}: the {type(e['module']).__name__} layer {_label(p)} cannot be Kronecker-factored: "
                    f"{problem}. Pass unsupported='diagonal' to give its parameters the exact diagonal of the "
                    f"Fisher, leave it out of params=[...], or use solver='exact', 'cg' or 'block_cg'"
                )
    layers: list[KroneckerLayer] = []
    diagonal: list[DiagonalBlock] = []
    for path, e in groups.items():
        m = e["module"]
        if e["reason"] is not None:
            owner = type(m).__name__ if m is not None else "unknown"
            names = tuple(e["names"])
            diagonal.append(DiagonalBlock(path, owner, names, tuple(sizes[n] for n in names), e["reason"]))
            continue
        attrs = {_split(n)[1]: n for n in e["names"]}
        w_shape = tuple(int(s) for s in m.weight.shape)
        layers.append(
            KroneckerLayer(
                path=path,
                kind=e["kind"],
                weight=attrs.get("weight"),
                bias=attrs.get("bias"),
                n_out=w_shape[0],
                n_in=int(math.prod(w_shape[1:])),
                weight_shape=w_shape,
                conv=_conv_geometry(m) if e["kind"] == "conv2d" else None,
            )
        )
    return BlockPlan(layers, diagonal)


def _output_hessian_factor(Z: Tensor, losses_of: Any) -> tuple[Tensor, float]:
    """C (B, K, K) with C_i C_iᵀ = [∇²_z L(z_i, y_i)]₊ for the flattened outputs z_i (K,): the
    per-example output Hessian of the loss (K double-backward passes over the loss alone),
    symmetrised and eigendecomposed in float64, negative eigenvalues clamped to 0 (the
    positive-semidefinite part; exact for losses convex in z). Also returns the most negative
    eigenvalue clamped relative to the largest (0.0 if none)."""
    B = Z.shape[0]
    Zl = Z.detach().requires_grad_(True)
    with torch.enable_grad():
        g = torch.autograd.grad(losses_of(Zl).sum(), Zl, create_graph=True)[0].reshape(B, -1)
        K = g.shape[1]
        rows = []
        for k in range(K):
            if g.requires_grad:
                (h,) = torch.autograd.grad(g[:, k].sum(), Zl, retain_graph=True, allow_unused=True)
            else:
                h = None
            rows.append(torch.zeros_like(Zl) if h is None else h)
    Hz = torch.stack([r.reshape(B, K) for r in rows], dim=1).to(torch.float64)  # (B, K, K)
    Hz = 0.5 * (Hz + Hz.mT)
    evals, evecs = torch.linalg.eigh(Hz)
    top = float(evals.abs().max()) if evals.numel() else 0.0
    neg = float(evals.min()) if evals.numel() else 0.0
    rel_neg = min(neg, 0.0) / top if top > 0 else 0.0
    C = evecs * evals.clamp_min(0.0).sqrt().unsqueeze(-2)  # columns: √e_k u_k
    return C.to(Z.dtype), rel_neg


# ==============================================================================================
# the sampled (Monte Carlo) true Fisher
# ==============================================================================================
FISHERS = ("true", "empirical", "sampled")
LIKELIHOODS = ("auto", "categorical", "gaussian")
# fisher="true" refuses models with more outputs per example than this (KFAC.max_outputs' default): its
# cost is K backward passes and a K × K eigendecomposition per example, its memory B·K·(K + Σ_l T_l·out_l)
DEFAULT_MAX_OUTPUTS = 512
_F64 = torch.float64
_M32 = 0xFFFFFFFF
_PROBE_STREAM = _M32  # the stream of the squared-error check's probe targets (samples use 0 … samples − 1)
MAX_SAMPLES = 1 << 20


def _mul32(x: Any, m: int) -> Any:
    """(x · m) mod 2³² for uint32 values x held in int64 (a tensor or an int) and a constant m < 2³²,
    multiplied in 16-bit halves so that no product exceeds 2⁴⁸ (int64 never overflows)."""
    return (x * (m & 0xFFFF) + (((x * (m >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x: Any) -> Any:
    """lowbias32 (C. Wellons' 32-bit integer hash) of uint32 values held in int64 tensors or ints:
    x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16 (mod 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _example_keys(seed: int, start: int, B: int, streams: Sequence[int], device: torch.device) -> Tensor:
    """The keys k (len(streams), B) int64 of the examples i = start … start + B − 1 of a pass, one row
    per stream (the sample index s): k = h(h(h(h(h(seed_lo) ⊕ seed_hi) ⊕ i_lo) ⊕ i_hi) ⊕ s), h =
    :func:`_hash32`, lo / hi the low and high 32 bits."""
    base = _hash32(_hash32(seed & _M32) ^ ((seed >> 32) & _M32))
    i = torch.arange(start, start + B, dtype=torch.int64, device=device)
    x = _hash32((i & _M32) ^ base)
    x = _hash32(x ^ (i >> 32))
    s = torch.tensor([int(t) & _M32 for t in streams], dtype=torch.int64, device=device)
    return _hash32(x.unsqueeze(0) ^ s.unsqueeze(1))


def _uniforms(keys: Tensor, n: int) -> Tensor:
    """U(0, 1) draws, float64 (*keys.shape, n), a function of (key, counter c) only:
    u = ((w(2c) >> 5)·2²⁶ + (w(2c + 1) >> 6) + ½) / 2⁵³ with w(j) = h(h(k ⊕ j) ⊕ h(k ⊕ 0x9E3779B9)):
    53 random bits, strictly inside (0, 1)."""
    k = keys.unsqueeze(-1)
    k2 = _hash32(k ^ 0x9E3779B9)
    c = torch.arange(n, dtype=torch.int64, device=keys.device) * 2
    hi = _hash32(_hash32(k ^ c) ^ k2) >> 5
    lo = _hash32(_hash32(k ^ (c + 1)) ^ k2) >> 6
    return ((hi << 26) + lo).to(_F64).add_(0.5).mul_(2.0**-53)


def _normals(keys: Tensor, n: int) -> Tensor:
    """N(0, 1) draws, float64 (*keys.shape, n): Box-Muller, ξ_c = √(−2 ln u_2c) cos(2π u_2c+1) of
    :func:`_uniforms` (keys, 2n)."""
    u = _uniforms(keys, 2 * n).unflatten(-1, (n, 2))
    return torch.sqrt(-2.0 * torch.log(u[..., 0])) * torch.cos(2.0 * math.pi * u[..., 1])


def _draws(
    fn: Any, seed: int, start: int, B: int, n: int, samples: int, device: torch.device
) -> Iterator[tuple[int, Tensor]]:
    """(s, fn(keys of sample s, n) (B, n)) for s = 0 … samples − 1, drawn for several samples at once
    (at most about 2²⁰ draws per call, to bound the memory of the hash's intermediates)."""
    chunk = max(1, min(samples, (1 << 20) // max(1, B * n)))
    for s0 in range(0, samples, chunk):
        block = fn(_example_keys(seed, start, B, range(s0, min(samples, s0 + chunk)), device), n)
        for j in range(block.shape[0]):
            yield s0 + j, block[j]


def _fit_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the likelihood checks: 10³ machine epsilons of the outputs' dtype, at most 1 %
    (float64: 2.2e-13, float32: 1.2e-4; label smoothing of 0.1 misfits by ≥ 0.07)."""
    return min(1e-2, 1e3 * float(torch.finfo(dtype).eps))


def resolve_likelihood(likelihood: str, Z: Tensor, Y: Tensor, who: str) -> str:
    """``"categorical"`` or ``"gaussian"``: the likelihood the sampled Fisher draws targets from, for
    outputs Z and targets Y (``likelihood="auto"``: integer Y of shape Z.shape[:-1] → categorical over
    Z's last dimension; floating Y of Z's shape → gaussian). ValueError when they do not fit."""
    zs, ys = tuple(Z.shape), tuple(Y.shape)
    integer = not (Y.dtype.is_floating_point or Y.dtype.is_complex or Y.dtype == torch.bool)
    cat_ok = integer and Z.ndim >= 2 and ys == zs[:-1]
    gauss_ok = ys == zs
    advice = (
        "use fisher='true' (exact Gauss-Newton, for models with at most max_outputs outputs per example) "
        "or fisher='empirical'"
    )
    if not Z.dtype.is_floating_point:
        raise ValueError(
            f"{who}(fisher='sampled'): the model's outputs must be floating, got {Z.dtype}; {advice}"
        )
    if likelihood == "auto":
        if cat_ok:
            return "categorical"
        if gauss_ok and Y.dtype.is_floating_point:
            return "gaussian"
        raise ValueError(
            f"{who}(fisher='sampled', likelihood='auto'): cannot tell the likelihood of the loss from the "
            f"model's outputs of shape {zs} ({Z.dtype}) and the targets of shape {ys} ({Y.dtype}): "
            f"likelihood='categorical' (cross-entropy on logits) needs integer class targets of the outputs' "
            f"shape without the last dimension (outputs (B, …, classes), targets (B, …)); "
            f"likelihood='gaussian' (squared error) needs floating targets of the outputs' shape. Make the "
            f"outputs and targets fit one of them, or {advice}"
        )
    if likelihood == "categorical" and not cat_ok:
        raise ValueError(
            f"{who}(fisher='sampled', likelihood='categorical') needs integer class targets of the outputs' "
            f"shape without the last (class) dimension: outputs (B, …, classes), targets (B, …); got "
            f"outputs {zs} ({Z.dtype}) and targets {ys} ({Y.dtype}) (a class dimension that is not the last: "
            f"move it last in the model's output and in loss_fn); otherwise {advice}"
        )
    if likelihood == "gaussian" and not gauss_ok:
        raise ValueError(
            f"{who}(fisher='sampled', likelihood='gaussian') needs targets of the outputs' shape, got "
            f"outputs {zs} and targets {ys}; {advice}"
        )
    return likelihood


def _loss_grad(loss_at: Any, Z: Tensor, targets: Tensor, who: str, what: str | None) -> Tensor:
    """∂ Σ_i L(z_i, targets_i) / ∂z at the outputs Z, float64 of Z's shape: each example's loss gradient
    (zeros where the loss does not depend on z). ``what``: the targets' description when they are not the
    observed ones (then an error of loss_fn is re-raised as ValueError saying so)."""
    Zl = Z.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = loss_at(Zl, targets)
            if not out.requires_grad:
                return torch.zeros(Z.shape, dtype=_F64, device=Z.device)
            (g,) = torch.autograd.grad(out.sum(), Zl, allow_unused=True)
    except (RuntimeError, TypeError, ValueError, IndexError) as exc:
        if what is None:
            raise
        raise ValueError(
            f"{who}(fisher='sampled'): loss_fn failed when called with {what} ({type(exc).__name__}: {exc})"
        ) from exc
    return torch.zeros(Z.shape, dtype=_F64, device=Z.device) if g is None else g.to(_F64)


def _misfit(
    who: str, likelihood: str, what: str, ratio: Tensor, index_shape: tuple[int, ...], start: int, tol: float
) -> ValueError:
    """The refusal of a loss whose gradients do not fit the likelihood, naming the worst example / entry."""
    flat = int(ratio.reshape(-1).argmax())
    where = []
    for size in reversed(index_shape):  # unravel the flat index (row-major)
        where.append(flat % size)
        flat //= size
    where.reverse()
    i, rest = start + where[0], tuple(where[1:])
    at = f"example {i}" + (
        f", {'position' if likelihood == 'categorical' else 'output'} {rest}" if rest else ""
    )
    if likelihood == "categorical":
        form = (
            "w·(softmax(z) − onehot(y)) over the last dimension, with one weight w ≥ 0 per position that does "
            "not depend on the label (a weighted sum of cross-entropies; label smoothing, class weights, an "
            "ignore_index among the classes or another loss do not fit)"
        )
    else:
        form = (
            "2c ⊙ (z − y) with fixed c ≥ 0 per output (a weighted squared error Σ c_k (z_k − y_k)²; an "
            "absolute or Huber error, a logistic loss on floating targets or a coupling of outputs do not fit)"
        )
    return ValueError(
        f"{who}(fisher='sampled', likelihood='{likelihood}'): the loss does not fit a {likelihood} likelihood: "
        f"its gradient with respect to the model's outputs at {what} is not {form}; at {at} it misfits by "
        f"{float(ratio.max()):.3g} relative (tolerance {tol:.2g}). The sampled Fisher equals the loss's "
        f"Gauss-Newton matrix only for such losses: use fisher='true' (exact, for models with at most "
        f"max_outputs outputs per example) or fisher='empirical'"
    )


def _categorical_cotangents(
    Z: Tensor, Y: Tensor, loss_at: Any, samples: int, seed: int, start: int, who: str
) -> Tensor:
    """(samples, B, *z) cotangents ĉ_s/√samples for the categorical likelihood over Z's last dimension
    (see :func:`layer_statistics`): ĉ_s,it = ∂L(z_i, ŷ_s,i)/∂z_it / √w_it with ŷ_s,it ~ softmax(z_it)."""
    B, V = Z.shape[0], Z.shape[-1]
    tol = _fit_tol(Z.dtype)
    p = torch.softmax(Z.detach().to(_F64), dim=-1)  # (B, *t, V)
    in_range = (Y >= 0) & (Y < V)
    g_obs = _loss_grad(loss_at, Z, Y, who, None)
    # positions the loss ignores (an out-of-range label such as ignore_index=-100, a zero weight, or a
    # saturated softmax): the label is kept there in every call, and the weight is 0
    active = in_range & (g_obs != 0).any(-1)

    def minus_onehot(lab: Tensor) -> Tensor:  # p − e_lab (float64), lab clamped where it is out of range
        d = p.clone()
        idx = lab.clamp(0, V - 1).to(torch.int64).unsqueeze(-1)
        return d.scatter_add_(-1, idx, torch.full(idx.shape, -1.0, dtype=_F64, device=p.device))

    probe = torch.where(active, torch.remainder(Y + 1, V), Y)
    g_probe = _loss_grad(loss_at, Z, probe, who, "the probe labels (y + 1) mod classes")
    d_obs, d_probe = minus_onehot(Y), minus_onehot(probe)
    n_obs, n_probe = d_obs.square().sum(-1), d_probe.square().sum(-1)
    # w_t = ⟨g_t, p_t − e⟩ / ‖p_t − e‖² from the better conditioned of the two labels (‖p − e‖ ≥ ½ there)
    w_obs = (g_obs * d_obs).sum(-1) / n_obs.clamp_min(1e-300)
    w_probe = (g_probe * d_probe).sum(-1) / n_probe.clamp_min(1e-300)
    w = torch.where(active, torch.where(n_obs >= n_probe, w_obs, w_probe), 0.0)  # (B, *t)
    w_max = float(w.abs().max()) if w.numel() else 0.0
    if bool((w < -tol * w_max).any()):
        raise _misfit(who, "categorical", "the observed labels", (-w).clamp_min(0) / max(w_max, 1e-300),
                      tuple(w.shape), start, tol)  # fmt: skip
    w = w.clamp_min(0.0)

    def check(g: Tensor, d: Tensor, what: str) -> None:
        r = (g - w.unsqueeze(-1) * d).norm(dim=-1)
        bound = w + g.norm(dim=-1)
        bad = r > tol * bound
        if bool(bad.any()):
            raise _misfit(
                who, "categorical", what, torch.where(bad, r / bound, 0.0), tuple(w.shape), start, tol
            )

    check(g_obs, d_obs, "the observed labels")
    check(g_probe, d_probe, "the probe labels (y + 1) mod classes")
    cdf = p.cumsum(-1)
    cdf = (cdf / cdf[..., -1:]).contiguous()
    scale = torch.where(w > 0, w.clamp_min(1e-300).rsqrt(), 0.0).unsqueeze(-1) / math.sqrt(samples)
    P = Y[0].numel() if B else 0
    cots = []
    for s, U in _draws(_uniforms, seed, start, B, P, samples, Z.device):
        u = U.reshape(Y.shape)
        # inverse CDF: ŷ = #{v : cdf_v ≤ u} ~ p (u < 1 = cdf_V−1)
        draw = torch.searchsorted(cdf, u.unsqueeze(-1), right=True).squeeze(-1).clamp_max(V - 1)
        y_hat = torch.where(active, draw.to(Y.dtype), Y)
        what = f"labels sampled from softmax(outputs) (sample {s})"
        g = _loss_grad(loss_at, Z, y_hat, who, what)
        check(g, minus_onehot(y_hat), what)
        cots.append((g * scale).to(Z.dtype))  # √w_t (p_t − e_ŷ) / √samples
    return torch.stack(cots)


def _gaussian_cotangents(
    Z: Tensor, Y: Tensor, loss_at: Any, samples: int, seed: int, start: int, who: str
) -> Tensor:
    """(samples, B, *z) cotangents ĝ_s/√samples for the Gaussian likelihood (see :func:`layer_statistics`):
    ĝ_s,i = ∂L(z_i, ŷ_s,i)/∂z_i with ŷ_s,i = z_i + ξ ⊘ √(2c_i), ξ ~ N(0, I)."""
    B = Z.shape[0]
    K = Z[0].numel() if B else 0
    tol = _fit_tol(Z.dtype)
    zt = Z.detach()
    z = zt.to(_F64)
    # 2c: the loss's curvature per output, from its gradient at y = z + 1 (g = 2c ⊙ (z − y) = −2c)
    c2 = -_loss_grad(loss_at, Z, zt + 1, who, "the probe targets y = z + 1")
    c_max = float(c2.abs().max()) if c2.numel() else 0.0
    index_shape = (B, K)
    if bool((c2 < -tol * c_max).any()):
        ratio = ((-c2).clamp_min(0) / max(c_max, 1e-300)).reshape(B, K)
        raise _misfit(who, "gaussian", "the probe targets y = z + 1", ratio, index_shape, start, tol)
    c2 = c2.clamp_min(0.0)

    def check(t: Tensor, g: Tensor, what: str) -> None:
        t64 = t.to(_F64)
        r = z - t64
        err = (g - c2 * r).abs()
        # rounding: z − t in the outputs' dtype, and 2c itself (measured at z + 1)
        bound = c2 * (z.abs() + t64.abs() + (z.abs() + 1.0) * r.abs()) + g.abs()
        bad = err > tol * bound
        if bool(bad.any()):
            ratio = torch.where(bad, err / bound.clamp_min(1e-300), 0.0).reshape(B, K)
            raise _misfit(who, "gaussian", what, ratio, index_shape, start, tol)

    check(zt, _loss_grad(loss_at, Z, zt, who, "the targets y = z"), "the targets y = z")
    check(Y, _loss_grad(loss_at, Z, Y, who, None), "the observed targets")
    u = (z + _normals(_example_keys(seed, start, B, [_PROBE_STREAM], Z.device)[0], K).reshape(Z.shape)).to(
        Z.dtype
    )
    check(
        u,
        _loss_grad(loss_at, Z, u, who, "the probe targets y = z + N(0, 1)"),
        "the probe targets y = z + N(0, 1)",
    )
    sigma = torch.where(c2 > 0, c2.clamp_min(1e-300).rsqrt(), 0.0)  # √(1/(2c)): the likelihood's std
    cots = []
    for s, Xi in _draws(_normals, seed, start, B, K, samples, Z.device):
        xi = Xi.reshape(Z.shape)
        y_hat = (z + sigma * xi).to(Z.dtype)
        what = f"targets sampled from N(z, 1/(2c)) (sample {s})"
        g = _loss_grad(loss_at, Z, y_hat, who, what)
        check(y_hat, g, what)
        cots.append((g / math.sqrt(samples)).to(Z.dtype))
    return torch.stack(cots)


def sampled_cotangents(
    Z: Tensor, Y: Tensor, loss_at: Any, likelihood: str, samples: int, seed: int, start: int, who: str
) -> tuple[Tensor, str]:
    """(samples, B, *z) output cotangents of the sampled true Fisher for the outputs Z of the examples
    start … start + B − 1 of a pass and their targets Y, and the likelihood used (see
    :func:`layer_statistics`)."""
    lik = resolve_likelihood(likelihood, Z, Y, who)
    if Z.shape[0] and Z[0].numel() * 2 >= 1 << 31:
        raise ValueError(f"{who}(fisher='sampled'): more than 2³⁰ outputs per example are not supported")
    fn = _categorical_cotangents if lik == "categorical" else _gaussian_cotangents
    return fn(Z, Y, loss_at, samples, seed, start, who), lik


@dataclass
class LayerStatistics:
    """Per-example statistics of one block of B training examples.

    ``acts[l]``: ā_it (B, T, in') of Kronecker layer l (T = 1 for "linear");
    ``deltas[l]``: δ_it^(c) (B, C, T, out); ``diag``: {name: Σ_i Σ_c (g_i^(c))²} (float64, the
    parameter's shape) for the diagonal blocks' parameters; ``rel_neg``: see
    :func:`_output_hessian_factor` (0.0 for the empirical and sampled Fisher); ``likelihood``: the
    likelihood the sampled Fisher drew from ("categorical" / "gaussian"; None for the others)."""

    acts: list[Tensor]
    deltas: list[Tensor]
    diag: dict[str, Tensor]
    rel_neg: float
    likelihood: str | None = None


def _layer_input(ly: KroneckerLayer, a: Tensor, B: int, who: str) -> Tensor:
    """ā_it (B, T, in') from the module's input a: patches of a convolution, the positions of a
    sequence Linear, with a column of ones appended when the bias is selected."""
    label = _label(ly.path)
    if ly.kind == "conv2d":
        if a.ndim != 4 or a.shape[0] != B:
            raise ValueError(
                f"{who}: the Conv2d layer {label} received an input of shape {tuple(a.shape)} for a batch "
                f"of {B} examples; only (batch, channels, height, width) inputs are supported"
            )
        g = ly.conv
        assert g is not None
        x = a.detach()
        left, right, top, bottom = g.pad
        if left == right and top == bottom:
            padding: tuple[int, int] = (top, left)
        else:
            x = F.pad(x, g.pad)
            padding = (0, 0)
        cols = F.unfold(x, g.kernel_size, dilation=g.dilation, padding=padding, stride=g.stride)
        x = cols.transpose(1, 2)  # (B, T, C·kh·kw): the patch of each output position
    elif ly.kind == "linear":
        if a.ndim != 2 or a.shape[0] != B:
            raise ValueError(
                f"{who}: the Linear layer {label} received an input of shape {tuple(a.shape)} for a batch "
                f"of {B} examples; it received (batch, in_features) inputs when the blocks were planned"
            )
        x = a.detach().unsqueeze(1)
    else:
        if a.ndim < 3 or a.shape[0] != B:
            raise ValueError(
                f"{who}: the Linear layer {label} received an input of shape {tuple(a.shape)} for a batch "
                f"of {B} examples; it received (batch, *, in_features) inputs when the blocks were planned"
            )
        x = a.detach().reshape(B, -1, a.shape[-1])
    T = x.shape[1]
    parts = []
    if ly.weight is not None:
        parts.append(x)
    if ly.bias is not None:
        parts.append(x.new_ones((B, T, 1)))
    return torch.cat(parts, dim=-1)


def _positions(ly: KroneckerLayer, d: Tensor, B: int) -> Tensor:
    """The output gradients (C, B, *s) of layer ly as (B, C, T, out)."""
    C = d.shape[0]
    if ly.kind == "conv2d":  # (C, B, out, oh, ow) → (B, C, oh·ow, out)
        return d.reshape(C, B, ly.n_out, -1).permute(1, 0, 3, 2)
    return d.reshape(C, B, -1, ly.n_out).transpose(0, 1)  # (B, C, T, out)


def _diagonal_moments(fm: FunctionalModel, names: Sequence[str], X: Inputs, cot: Tensor) -> dict[str, Tensor]:
    """Σ_i Σ_c (J_iᵀ c_i^(c))² per parameter of ``names``: the per-example gradients of the model's
    outputs z_i pushed back from the cotangents ``cot`` (C, B, *z) (the observed-label loss gradient
    for the empirical Fisher, C = 1; the output-Hessian square-root columns for the true Fisher),
    by ``vmap`` over examples of a ``vjp`` with respect to those parameters only; float64 sums."""
    sub = {n: fm.params[n] for n in names}
    rest = {n: v for n, v in fm.params.items() if n not in sub}
    B = batch_len(X)
    Cc = cot.shape[0]
    p_diag = sum(int(t.numel()) for t in sub.values())
    chunk = max(1, min(B, _DIAG_CHUNK_ELEMENTS // max(1, Cc * p_diag)))

    def one(x: Inputs, cots: Tensor) -> dict[str, Tensor]:
        def out_of(s: dict[str, Tensor]) -> Tensor:
            return fm.forward({**rest, **s}, map_inputs(x, lambda t: t.unsqueeze(0)))[0]

        pull = vjp(out_of, sub)[1]
        g = vmap(pull)(cots)[0]  # {name: (C, *shape)}: J_iᵀ c for every cotangent c
        return {n: t.square().sum(0) for n, t in g.items()}

    sums = {n: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for n, t in sub.items()}
    per_example = vmap(one, in_dims=(0, 1))
    for s in range(0, B, chunk):
        Xc = slice_inputs(X, s, s + chunk)
        out = per_example(Xc, cot[:, s : s + chunk])
        for n, t in out.items():
            sums[n] += t.to(torch.float64).sum(0)
    return sums


def layer_statistics(
    fm: FunctionalModel,
    plan: BlockPlan,
    X: Inputs,
    Y: Tensor,
    fisher: str,
    who: str = "KFAC",
    *,
    samples: int = 1,
    likelihood: str = "auto",
    seed: int = 0,
    start: int = 0,
    max_outputs: int | None = None,
) -> LayerStatistics:
    """Per-example statistics of every block over the training examples (X, Y) (see
    :class:`LayerStatistics` for the shapes). δ_it = ∂L(z_i, θ)/∂s_it is the gradient of the
    example's own loss with respect to the layer's pre-activation output s_it (out,) at position
    t; the cotangents δ^(c) are chosen so that Σ_c δ^(c)_it δ^(c)_it'ᵀ is the expectation the
    Fisher takes of δ_it δ_it'ᵀ:

    - ``fisher="empirical"``: C = 1, δ_i at the observed target y_i.
    - ``fisher="true"``: C = K (the number of model outputs per example), the columns of a
      square-root factor of the output Hessian ∇²_z L(z_i, y_i) pushed back through the network
      (δ^(c) = J_iᵀ c_c, J_i = ∂z_i/∂s_i): Σ_c δ^(c)δ^(c)ᵀ = J_iᵀ ∇²_z L J_i. For cross-entropy on
      logits, ∇²_z L = diag(p_i) − p_i p_iᵀ = E_{y∼p(·|x_i)}[(p_i − e_y)(p_i − e_y)ᵀ], the model's
      predictive expectation of the output-gradient outer product, whatever y_i: the true
      Fisher, computed exactly (no sampling). For other losses it is the generalised
      Gauss-Newton output matrix (squared error Σ(z − y)²: 2I), clamped to its PSD part;
      ``rel_neg`` reports the most negative eigenvalue clamped, relative to the largest. Costs K
      double-backward passes over the loss, a K × K eigendecomposition per example and K backward
      passes through the network: ValueError when K > ``max_outputs`` (None: no limit).
    - ``fisher="sampled"``: C = ``samples``, Monte Carlo draws with the same expectation (see
      :func:`sampled_cotangents` and the K-FAC module docstring): ĉ_s/√samples, s = 1 … samples,
      from targets drawn from the model's predictive distribution; one backward pass per sample.
      The draws are a function of (``seed``, the example's index ``start`` + i in the pass, s, the
      output position) only — not of the block size or the device.

    The diagonal blocks' per-example gradients g_i^(c) = J_θ,iᵀ c use the same cotangents, so
    Σ_c (g_i^(c))² is the diagonal of the same (true, sampled or empirical) Fisher.

    Raises ValueError when a Kronecker layer is not called exactly once, or its input changed
    form since the blocks were planned, or the model's output is not a tensor; for "true" when
    the model has more than ``max_outputs`` outputs per example; for "sampled" when the outputs,
    targets or loss do not fit the likelihood (see :func:`resolve_likelihood`).
    """
    layers = plan.layers
    B = batch_len(X)
    Z, captured = _hooked_forward(fm, [ly.path for ly in layers], X)
    if not isinstance(Z, Tensor):
        raise ValueError(f"{who} needs a model whose output is one tensor; it returned {type(Z).__name__}")
    outs: list[Tensor] = []
    acts: list[Tensor] = []
    for ly in layers:
        seen = captured[ly.path]
        problem = _call_problem("conv2d" if ly.kind == "conv2d" else "linear", seen, B)
        if problem is not None and (len(seen) != 1 or not all(isinstance(t, Tensor) for t in seen[0])):
            kind = "Conv2d" if ly.kind == "conv2d" else "Linear"
            raise ValueError(
                f"{who}: the {kind} layer {_label(ly.path)} cannot be Kronecker-factored: {problem}"
            )
        a, s = seen[0]
        acts.append(_layer_input(ly, a, B, who))
        outs.append(s)

    def loss_at(z: Tensor, targets: Tensor) -> Tensor:
        return _per_example(fm.loss_fn(z, targets), B)

    def losses_of(z: Tensor) -> Tensor:
        return loss_at(z, Y)

    rel_neg = 0.0
    lik: str | None = None
    if fisher == "empirical":
        Zl = Z.detach().requires_grad_(True)
        with torch.enable_grad():
            cot = torch.autograd.grad(losses_of(Zl).sum(), Zl)[0].unsqueeze(0)  # (1, B, *z)
    elif fisher == "sampled":
        cot, lik = sampled_cotangents(Z, Y, loss_at, likelihood, samples, seed, start, who)  # (S, B, *z)
    else:
        K = Z.numel() // max(B, 1)
        if max_outputs is not None and max_outputs < K:
            raise ValueError(
                f"{who}(fisher='true'): the model has K = {K} outputs per example (output shape "
                f"{tuple(Z.shape[1:])}), more than max_outputs={max_outputs}. The exact true Fisher needs the "
                f"K × K output Hessian of every example, K backward passes and memory of order "
                f"B·K·(K + Σ_l T_l·out_l) per block of B examples. Use fisher='sampled' (the true Fisher by "
                f"Monte Carlo: targets drawn from the model's predictive distribution, `samples` backward "
                f"passes, memory like the empirical Fisher) — the affordable choice for language models and "
                f"other large output spaces — or fisher='empirical', or raise max_outputs"
            )
        C, rel_neg = _output_hessian_factor(Z, losses_of)  # (B, K, K)
        cot = C.permute(2, 0, 1).reshape((C.shape[2],) + tuple(Z.shape))  # (K, B, *z)
    deltas: list[list[Tensor]] = [[] for _ in layers]
    if layers:
        with torch.enable_grad():
            for c in range(cot.shape[0]):
                gs = torch.autograd.grad(Z, outs, grad_outputs=cot[c], retain_graph=True, allow_unused=True)
                for lst, g, s in zip(deltas, gs, outs):
                    lst.append(torch.zeros_like(s) if g is None else g.detach())
    out_deltas = []
    for ly, a, d in zip(layers, acts, deltas):
        dl = _positions(ly, torch.stack(d, dim=0), B)
        if dl.shape[2] != a.shape[1]:  # cannot happen for torch's Conv2d / Linear
            raise ValueError(
                f"{who}: layer {_label(ly.path)} has {a.shape[1]} input positions but {dl.shape[2]} outputs"
            )
        out_deltas.append(dl)
    diag = _diagonal_moments(fm, plan.diagonal_names, X, cot.detach()) if plan.diagonal else {}
    return LayerStatistics(acts, out_deltas, diag, rel_neg, lik)
