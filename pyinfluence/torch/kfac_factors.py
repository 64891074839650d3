"""Per-layer activations and output gradients of ``nn.Linear`` layers, for the K-FAC / EK-FAC solvers.

Private machinery of :mod:`pyinfluence.torch.solvers.kfac`:

- :func:`linear_layers`: the selected parameters grouped by the ``nn.Linear`` module that owns
  them (ValueError naming any selected parameter that belongs to another module type).
- :func:`layer_statistics`: for one block of training examples, each layer's augmented input
  ā_i (B, in') and the output-gradient "cotangents" δ_i^(c) (B, C, out) whose outer products
  give the expectation E[δ_i δ_iᵀ] = Σ_c δ_i^(c) δ_i^(c)ᵀ (see the function for the two choices).

The statistics are collected with forward hooks on the module tree the functional model calls
(its private per-thread copy, or the model itself under the model's lock); the hooks are removed
before the function returns, whatever happens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from pyinfluence.torch.functional import FunctionalModel, _per_example

__all__ = ["LinearLayer", "layer_statistics", "linear_layers"]


@dataclass(frozen=True)
class LinearLayer:
    """One ``nn.Linear`` module with at least one selected parameter.

    ``path``: the module's name in the model ("" for the model itself); ``weight`` / ``bias``:
    the selected parameter names (None when not selected, or absent); ``n_out``, ``n_in``:
    the weight's shape (out, in). The layer's block of θ is the (out × in') matrix
    M = [W b] with in' = (in if the weight is selected else 0) + (1 if the bias is selected).
    """

    path: str
    weight: str | None
    bias: str | None
    n_out: int
    n_in: int

    @property
    def n_cols(self) -> int:
        """in': the columns of the layer's parameter matrix [W b] (selected parts only)."""
        return (self.n_in if self.weight is not None else 0) + (1 if self.bias is not None else 0)


def _split(name: str) -> tuple[str, str]:
    path, _, attr = name.rpartition(".")
    return path, attr


def linear_layers(model: nn.Module, names: Sequence[str], who: str = "KFAC") -> list[LinearLayer]:
    """The selected parameters ``names`` grouped into ``nn.Linear`` layers, in the order of their
    first parameter. Raises ValueError naming the first selected parameter that is not the
    ``weight`` or ``bias`` of an ``nn.Linear``."""
    layers: dict[str, dict[str, Any]] = {}
    for name in names:
        path, attr = _split(name)
        try:
            module = model.get_submodule(path)
        except AttributeError:  # cannot happen for names from named_parameters
            module = None
        if not isinstance(module, nn.Linear) or attr not in ("weight", "bias"):
            owner = type(module).__name__ if module is not None else "an unknown module"
            raise ValueError(
                f"{who} supports nn.Linear layers only; parameter {name!r} belongs to {owner}. "
                f"Select only the Linear layers' parameters with params=[...] (e.g. the last "
                f"layers), or use solver='exact', 'cg' or 'block_cg'"
            )
        entry = layers.setdefault(path, {"weight": None, "bias": None, "module": module})
        entry[attr] = name
    out = []
    for path, e in layers.items():
        m: nn.Linear = e["module"]
        n_out, n_in = (int(s) for s in m.weight.shape)
        out.append(LinearLayer(path, e["weight"], e["bias"], n_out, n_in))
    return out


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


def layer_statistics(
    fm: FunctionalModel, layers: Sequence[LinearLayer], X: Tensor, Y: Tensor, fisher: str
) -> tuple[list[Tensor], list[Tensor], float]:
    """Per-example statistics of every layer over the block (X, Y).

    Returns (acts, deltas, rel_neg): ``acts[l]`` ā_i (B, in') = [a_i, 1] (the layer's input,
    with a 1 appended when its bias is selected; only the 1 when only the bias is selected);
    ``deltas[l]`` δ_i^(c) (B, C, out), with Σ_c δ_i^(c) δ_i^(c)ᵀ the expectation the Fisher
    takes of δ_i δ_iᵀ, δ_i = ∂L(z_i, θ)/∂s_i the gradient of the example's own loss with respect
    to the layer's pre-activation output s_i (out,):

    - ``fisher="empirical"``: C = 1, δ_i at the observed target y_i.
    - ``fisher="true"``: C = K (the number of model outputs per example), the columns of a
      square-root factor of the output Hessian ∇²_z L(z_i, y_i) pushed back through the network
      (δ^(c) = J_iᵀ c_c, J_i = ∂z_i/∂s_i): Σ_c δ^(c)δ^(c)ᵀ = J_iᵀ ∇²_z L J_i. For cross-entropy on
      logits, ∇²_z L = diag(p_i) − p_i p_iᵀ = E_{y∼p(·|x_i)}[(p_i − e_y)(p_i − e_y)ᵀ], the model's
      predictive expectation of the output-gradient outer product, whatever y_i: the true
      Fisher, computed exactly (no sampling). For other losses it is the generalised
      Gauss-Newton output matrix (squared error Σ(z − y)²: 2I), clamped to its PSD part;
      ``rel_neg`` reports the most negative eigenvalue clamped, relative to the largest.

    Raises ValueError when a layer's input is not (batch, in) or a layer is called twice in one
    forward pass (a shared module), or the model's output is not a tensor.
    """
    shared = fm._shared_module_lock
    module = fm.model if shared is not None else fm._thread_module()
    B = X.shape[0]
    captured: dict[str, list[tuple[Tensor, Tensor]]] = {ly.path: [] for ly in layers}

    def make_hook(path: str):
        def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
            captured[path].append((inputs[0], output))

        return hook

    with shared if shared is not None else contextlib.nullcontext():
        handles = []
        try:
            for ly in layers:
                handles.append(module.get_submodule(ly.path).register_forward_hook(make_hook(ly.path)))
            leaves = {k: v.detach().requires_grad_(True) for k, v in fm.params.items()}
            with torch.enable_grad():
                Z = fm.forward(leaves, X)
        finally:
            for h in handles:
                h.remove()
    if not isinstance(Z, Tensor):
        raise ValueError(f"KFAC needs a model whose output is one tensor; it returned {type(Z).__name__}")
    outs: list[Tensor] = []
    acts: list[Tensor] = []
    for ly in layers:
        seen = captured[ly.path]
        label = ly.path or "the model"
        if len(seen) != 1:
            raise ValueError(
                f"KFAC: the Linear layer {label!r} was called {len(seen)} times in one forward pass; "
                f"only layers applied once per example are supported (no shared modules)"
            )
        a, s = seen[0]
        if a.ndim != 2 or a.shape[0] != B:
            raise ValueError(
                f"KFAC: the Linear layer {label!r} received an input of shape {tuple(a.shape)} for a "
                f"batch of {B} examples; only (batch, in_features) inputs are supported"
            )
        parts = []
        if ly.weight is not None:
            parts.append(a.detach())
        if ly.bias is not None:
            parts.append(a.new_ones((B, 1)))
        acts.append(torch.cat(parts, dim=1))
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
    with torch.enable_grad():
        for c in range(cot.shape[0]):
            gs = torch.autograd.grad(Z, outs, grad_outputs=cot[c], retain_graph=True, allow_unused=True)
            for lst, g, s in zip(deltas, gs, outs):
                lst.append(torch.zeros_like(s) if g is None else g.detach())
    return acts, [torch.stack(d, dim=1) for d in deltas], rel_neg
