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

The statistics are collected with forward hooks on the module tree the functional model calls
(its private per-thread copy, or the model itself under the model's lock); the hooks are removed
before each function returns, whatever happens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


@dataclass
class LayerStatistics:
    """Per-example statistics of one block of B training examples.

    ``acts[l]``: ā_it (B, T, in') of Kronecker layer l (T = 1 for "linear");
    ``deltas[l]``: δ_it^(c) (B, C, T, out); ``diag``: {name: Σ_i Σ_c (g_i^(c))²} (float64, the
    parameter's shape) for the diagonal blocks' parameters; ``rel_neg``: see
    :func:`_output_hessian_factor` (0.0 for the empirical Fisher)."""

    acts: list[Tensor]
    deltas: list[Tensor]
    diag: dict[str, Tensor]
    rel_neg: float


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
    fm: FunctionalModel, plan: BlockPlan, X: Inputs, Y: Tensor, fisher: str, who: str = "KFAC"
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
      ``rel_neg`` reports the most negative eigenvalue clamped, relative to the largest.

    The diagonal blocks' per-example gradients g_i^(c) = J_θ,iᵀ c use the same cotangents, so
    Σ_c (g_i^(c))² is the diagonal of the same (true or empirical) Fisher.

    Raises ValueError when a Kronecker layer is not called exactly once, or its input changed
    form since the blocks were planned, or the model's output is not a tensor.
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

    def losses_of(z: Tensor) -> Tensor:
        return _per_example(fm.loss_fn(z, Y), B)

    rel_neg = 0.0
    if fisher == "empirical":
        Zl = Z.detach().requires_grad_(True)
        with torch.enable_grad():
            cot = torch.autograd.grad(losses_of(Zl).sum(), Zl)[0].unsqueeze(0)  # (1, B, *z)
    else:
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
    return LayerStatistics(acts, out_deltas, diag, rel_neg)
