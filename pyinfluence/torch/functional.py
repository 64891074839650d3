"""The model as a pure function of its selected parameters θ (private machinery of TorchInfluence).

- :func:`select_params`: which parameters θ count (all trainable, names/module prefixes, or a
  predicate), with the dtype/device checks.
- :func:`check_model_mode`: refuse models whose per-example outputs depend on the batch or on
  random numbers (BatchNorm / Dropout in training mode).
- :func:`module_tree_copy`: a private module tree per thread (tensors shared).
- :class:`FunctionalModel`: per-example losses, per-example gradients (``vmap(grad)``),
  Hessian-vector products for blocks of vectors (double backward: ``torch.autograd`` for a few
  vectors, ``vmap(vjp(grad))`` for many; forward-over-reverse ``jvp(grad)`` on request), and the
  mixed derivative ∇x∇θL used by ``pert_loss``.

Every function assumes that each example's loss depends on that example only (no batch
statistics): then the HVP of the *summed* batch loss is the sum of per-example HVPs, and the
gradient of the summed loss with respect to the inputs is the per-example input gradient.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, grad_and_value, jvp, vjp, vmap

from pyinfluence.torch.batches import Inputs, batch_len, map_inputs, slice_inputs
from pyinfluence.torch.data import _shape_str

__all__ = ["FunctionalModel", "ParamSelection", "check_model_mode", "module_tree_copy", "select_params"]

ParamSelection = Union[None, str, Sequence[str], Callable[..., Any]]

_FLOAT_DTYPES = (torch.float32, torch.float64)
# Low-precision models are accepted and evaluated in float32 by default (see FunctionalModel's dtype).
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# HVP mode: the most rows for which "auto" uses torch.autograd's double backward rather than
# torch.func's vmapped vjp (see FunctionalModel.hvp_rows).
_AUTOGRAD_MAX_ROWS = 1


# ==============================================================================================
# second derivatives through attention
# ==============================================================================================
def second_order() -> contextlib.AbstractContextManager[Any]:
    """A context for double backward passes: ``F.scaled_dot_product_attention`` restricted to its "math"
    kernel, the one with a differentiable backward (the fused CPU/CUDA kernels' backward passes are not
    differentiable: an HVP through them fails with "derivative for ..._backward is not implemented"). The
    math kernel computes the same values. The restriction is torch's process-wide SDPA setting, held only
    for the duration of the call (another thread's attention may run the math kernel meanwhile)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


# ==============================================================================================
# a private module tree per thread


def module_tree_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of ``module``'s tree of module objects that shares every parameter, buffer and other
    attribute value with the original (no tensor is copied).

    ``torch.func.functional_call`` swaps the tensors it is given into the module's attributes for
    the duration of the call and then swaps the originals back. Two threads calling it on the same
    module see each other's tensors (and a user calling the model meanwhile sees ours), so each
    thread gets its own tree: every module object is copied shallowly and its dict-valued
    attributes (``_parameters``, ``_buffers``, ``_modules``, the hook dicts) are new dicts, so that
    a swap or a hook registered on the copy never reaches the original. A module reused at two
    places of the tree stays one object in the copy.
    """
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)  # a new object and __dict__, attribute values shared
    memo[id(module)] = new
    for name, value in list(vars(new).items()):
        if isinstance(value, dict):
            vars(new)[name] = copy.copy(value)  # keeps OrderedDict and friends
    children = vars(new)["_modules"]
    for name, child in children.items():
        if child is not None:
            children[name] = module_tree_copy(child, memo)
    return new


# ==============================================================================================
# parameter selection and model checks
# ==============================================================================================
def _call_predicate(pred: Callable[..., Any]) -> Callable[[str, nn.Parameter], bool]:
    """A predicate taking (name) or (name, parameter), as a two-argument function."""
    n_args = 2
    try:
        sig = inspect.signature(pred)
        positional = [
            p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        var = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
        if not var and len(positional) == 1:
            n_args = 1
    except (TypeError, ValueError):  # builtins without a signature
        pass
    if n_args == 1:
        return lambda name, param: bool(pred(name))
    return lambda name, param: bool(pred(name, param))


def select_params(model: nn.Module, params: ParamSelection = None) -> list[tuple[str, nn.Parameter]]:
    """The parameters θ that influence is computed for, in the model's parameter order.

    - ``None``: every parameter with ``requires_grad=True``.
    - a name or a list of names: exact parameter names (``"fc.weight"``) or module prefixes
      (``"fc"`` selects ``fc.weight`` and ``fc.bias``), from ``model.named_parameters()``;
      frozen parameters are selected when named.
    - a callable: ``predicate(name)`` or ``predicate(name, parameter)`` → bool, over all of
      ``model.named_parameters()``.

    Raises ValueError when the selection names nothing (or an unknown name), TypeError when the
    selected parameters are not all float32 or all float64, ValueError when they are on
    different devices.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = list(model.named_parameters())
    if not named:
        raise ValueError(f"model ({type(model).__name__}) has no parameters")
    all_names = [n for n, _ in named]
    shown = ", ".join(all_names[:12]) + (", ..." if len(all_names) > 12 else "")
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "params=None selects the trainable parameters (requires_grad=True), but the model "
                f"has none; name the parameters to use with params=[...] (available: {shown})"
            )
    elif callable(params) and not isinstance(params, (str, nn.Module)):
        pred = _call_predicate(params)
        chosen = [(n, p) for n, p in named if pred(n, p)]
        if not chosen:
            raise ValueError(f"params: the predicate selects none of the model's parameters ({shown})")
    else:
        if isinstance(params, str):
            wanted = [params]
        else:
            try:
                wanted = list(params)  # type: ignore[arg-type]  # a TypeError below names the argument
            except TypeError:
                raise TypeError(
                    "params must be None, a parameter name, a list of names or module prefixes, "
                    f"or a predicate; got {type(params).__name__}"
                ) from None
        if not wanted:
            raise ValueError(f"params is empty; it selects no parameters (available: {shown})")
        keep = set()
        for w in wanted:
            if not isinstance(w, str):
                raise TypeError(f"params must contain parameter names (str), got {w!r}")
            hits = [n for n in all_names if n == w or n.startswith(w + ".")]
            if not hits:
                raise ValueError(
                    f"params: {w!r} is neither a parameter name nor a module prefix of this "
                    f"model (parameters: {shown})"
                )
            keep.update(hits)
        chosen = [(n, p) for n, p in named if n in keep]
    dtypes = {p.dtype for _, p in chosen}
    bad = [n for n, p in chosen if p.dtype not in _FLOAT_DTYPES + _LOW_PRECISION]
    if bad:
        raise TypeError(
            f"the selected parameters must be real floating point (float64, float32, bfloat16 or float16); "
            f"{bad[0]!r} is {str(dict(chosen)[bad[0]].dtype).replace('torch.', '')} (convert the model with "
            f"model.float() or model.double())"
        )
    if len(dtypes) > 1:
        desc = ", ".join(f"{n}: {str(p.dtype).replace('torch.', '')}" for n, p in chosen[:6])
        raise TypeError(
            f"the selected parameters have different dtypes ({desc}); influence needs one "
            f"floating dtype: convert the model with model.float() or model.double()"
        )
    devices = {p.device for _, p in chosen}
    if len(devices) > 1:
        raise ValueError(
            f"the selected parameters are on different devices ({sorted(map(str, devices))}); "
            f"move the model to one device"
        )
    return chosen


def check_model_mode(model: nn.Module) -> None:
    """Refuse a model in training mode with layers whose per-example outputs are undefined.

    BatchNorm in training mode normalises with the batch's statistics (and updates its running
    buffers), and Dropout draws random masks: per-example gradients and Hessians do not exist.
    In eval mode (``model.eval()``) both are deterministic per-example functions and are fine.
    """
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from torch.nn.modules.instancenorm import _InstanceNorm

    for name, m in model.named_modules():
        if not m.training:
            continue
        what = None
        if isinstance(m, _BatchNorm):
            what = "normalises with the statistics of the batch"
        elif isinstance(m, _InstanceNorm) and m.track_running_stats:
            what = "updates its running statistics"
        elif isinstance(m, _DropoutNd) and m.p > 0:
            what = "draws random dropout masks"
        if what is not None:
            label = name or "the model"
            raise ValueError(
                f"model is in training mode and its layer {label!r} ({type(m).__name__}) {what}: "
                f"per-example gradients and Hessians are then undefined. Call model.eval() "
                f"before creating TorchInfluence (influence is computed for the model as it "
                f"predicts, with running statistics and without dropout)"
            )


# ==============================================================================================
# the model as a function of θ
# ==============================================================================================
def _per_example(out: Any, batch: int) -> Tensor:
    """The loss function's output as a (batch,) tensor; clear errors for reduced losses."""
    if not isinstance(out, Tensor):
        raise TypeError(f"loss_fn must return a tensor of per-example losses, got {type(out).__name__}")
    if out.ndim == 0:
        raise ValueError(
            f"loss_fn returned a scalar for a batch of {batch} examples: it must return one loss "
            f"per example, shape ({batch},). Use reduction='none' (e.g. "
            f"torch.nn.CrossEntropyLoss(reduction='none') or F.cross_entropy(out, y, "
            f"reduction='none')); TorchInfluence takes the mean itself"
        )
    if out.shape == (batch,):
        return out
    if out.shape == (batch, 1):
        return out.reshape(batch)
    raise ValueError(
        f"loss_fn returned shape {_shape_str(out.shape)} for a batch of {batch} examples; it must "
        f"return one loss per example, shape ({batch},): sum or average over the other "
        f"dimensions inside loss_fn"
    )


class FunctionalModel:
    """``model`` as a pure function of the selected parameters θ, through ``functional_call``.

    θ̂ is a copy of the selected parameters taken here, held both as the flat vector ``theta``
    (p,) (in ``names`` order) and as the dict ``params`` of views into it; the transforms work
    on the dict (no flattening inside traced code) and flatten their results once. Unselected
    parameters and all buffers are passed to ``functional_call`` as they are (not copied; moved to
    ``device`` if needed).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        named: Sequence[tuple[str, nn.Parameter]],
        device: torch.device,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.names = [n for n, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [int(p.numel()) for _, p in named]
        model_dtype = named[0][1].dtype
        # the computation dtype: the parameters' own, unless asked otherwise (a bfloat16/float16 model is
        # evaluated in float32: then every floating parameter and buffer is copied once in that dtype)
        self.dtype: torch.dtype = model_dtype if dtype is None else dtype
        self.device = device
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).to(device, self.dtype).clone()
        self.params = self.unflatten(self.theta)
        sel = set(self.names)
        cast = self.dtype != model_dtype

        def place(t: Tensor) -> Tensor:
            t = t.detach().to(device)
            return t.to(self.dtype) if cast and t.is_floating_point() else t

        fixed: dict[str, Tensor] = {}
        for n, p in model.named_parameters():
            if n not in sel:
                fixed[n] = place(p)
        for n, b in model.named_buffers():
            fixed[n] = place(b)
        self.fixed = fixed
        self.n_params = int(self.theta.numel())
        self._pe_grad = vmap(grad(self._one_loss), in_dims=(None, 0, 0))
        self._act: int | None = None
        self._per_thread = threading.local()
        try:
            self._per_thread.module = module_tree_copy(model)
            self._shared_module_lock: threading.RLock | None = None
        except Exception:  # an exotic module that cannot be copied: serialise instead
            self._shared_module_lock = threading.RLock()

    def at(self, theta: Tensor) -> FunctionalModel:
        """This model at other values θ (p,) of the selected parameters (a shallow copy: the module copies,
        the fixed tensors and the transforms are shared; θ is copied). For Hessian-vector products away from θ̂
        (the Newton-CG steps of the leave-out retraining)."""
        other = copy.copy(self)
        other.theta = theta.detach().to(device=self.device, dtype=self.dtype).clone()
        other.params = other.unflatten(other.theta)
        return other

    def _thread_module(self) -> nn.Module:
        """This thread's private copy of the module tree (see the class docstring)."""
        module = getattr(self._per_thread, "module", None)
        if module is None:
            module = self._per_thread.module = module_tree_copy(self.model)
        return module

    @contextlib.contextmanager
    def hooked_module(self) -> Iterator[nn.Module]:
        """The module tree that this thread's :meth:`forward` calls, to register hooks on (forward hooks
        collecting layer inputs/outputs: K-FAC statistics, LoGra projections). Held under the model's lock
        when the tree is shared (a model that could not be copied per thread); remove the hooks before
        leaving the block."""
        if self._shared_module_lock is None:
            yield self._thread_module()
        else:
            with self._shared_module_lock:
                yield self.model

    # -- flat <-> dict ---------------------------------------------------------------------------
    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """(…, p) → {name: (…, *shape)} views (leading dims kept)."""
        lead = tuple(v.shape[:-1])
        return {
            name: t.reshape(lead + shape)
            for name, t, shape in zip(self.names, torch.split(v, self.sizes, dim=-1), self.shapes)
        }

    def flatten(self, d: dict[str, Tensor], lead: tuple[int, ...] = ()) -> Tensor:
        """{name: (…, *shape)} → (…, p), in ``names`` order."""
        return torch.cat([d[n].reshape(lead + (-1,)) for n in self.names], dim=-1)

    # -- plain evaluation ----------------------------------------------------------------------
    def forward(self, ps: dict[str, Tensor], X: Inputs) -> Any:
        """The model's outputs for a batch: ``model(X)``, or ``model(**X)`` for a dict of inputs."""
        tensors = {**self.fixed, **ps}
        args, kwargs = ((), X) if isinstance(X, dict) else ((X,), None)
        if self._shared_module_lock is None:
            return functional_call(self._thread_module(), tensors, args, kwargs)
        with self._shared_module_lock:  # the swap lasts only for the call itself
            return functional_call(self.model, tensors, args, kwargs)

    def losses(self, ps: dict[str, Tensor], X: Inputs, Y: Tensor) -> Tensor:
        """Per-example losses (B,) at the parameters ``ps``."""
        return _per_example(self.loss_fn(self.forward(ps, X), Y), batch_len(X))

    def loss_sum(self, ps: dict[str, Tensor], X: Inputs, Y: Tensor) -> Tensor:
        return self.losses(ps, X, Y).sum()

    def _one_loss(self, ps: dict[str, Tensor], x: Inputs, y: Tensor) -> Tensor:
        return self.losses(ps, map_inputs(x, lambda t: t.unsqueeze(0)), y.unsqueeze(0))[0]

    # -- derivatives ---------------------------------------------------------------------------
    def per_example_grads(self, X: Inputs, Y: Tensor) -> Tensor:
        """∇θ L(z_i, θ̂) for a block of examples: (B, p), by ``vmap(grad)``."""
        return self.flatten(self._pe_grad(self.params, X, Y), (batch_len(X),))

    def grad_sum(self, X: Inputs, Y: Tensor) -> Tensor:
        """Σ_i ∇θ L(z_i, θ̂) over a block: (p,)."""
        return self.flatten(grad(self.loss_sum)(self.params, X, Y))

    def hvp_rows(self, Vt: Tensor, X: Inputs, Y: Tensor, mode: str = "auto") -> Tensor:
        """Σ_i ∇²θ L(z_i, θ̂) v for the rows v of ``Vt`` (r, p) → (r, p), over the block (X, Y).

        Modes (same numbers, H being symmetric):

        - ``"revrev"``: reverse-over-reverse with torch.func, one ``vjp(grad(f))`` (forward and
          first backward once per block) vmapped over the rows as cotangents;
        - ``"autograd"``: the same double backward with ``torch.autograd.grad`` (create_graph, then
          ``is_grads_batched`` for several rows) — less per-call overhead;
        - ``"fwdrev"``: forward-over-reverse, ``jvp(grad(f))`` vmapped over the rows;
        - ``"auto"`` (default): ``"autograd"`` for one row, else ``"revrev"``.

        Measured across digits MLPs of 2.4k, 9.6k and 85k parameters (CPU, float64, 2 threads, the whole
        training set of 1437 examples in one call; pyinfluence.bench.studies.hvp_rate): for 10 rows revrev
        ran at 27 / 42 / 49 GFLOP/s (the last is this machine's GEMM rate), autograd at 24 / 7 / 35 and
        fwdrev at 21 / 22 / 47; for one row autograd was 10–25 % faster than revrev. (An earlier choice,
        autograd up to 32 rows, was tuned on the 2.4k model alone and cost 1.7× at 85k.)
        """
        with second_order():
            return self._hvp_rows(Vt, X, Y, mode)

    def _hvp_rows(self, Vt: Tensor, X: Inputs, Y: Tensor, mode: str) -> Tensor:
        r = Vt.shape[0]
        if mode == "auto":
            mode = "autograd" if r <= _AUTOGRAD_MAX_ROWS else "revrev"
        ps = self.params
        loss_sum = self.loss_sum
        T = self.unflatten(Vt)  # {name: (r, *shape)}
        if mode == "autograd":
            leaves = {k: v.detach().requires_grad_(True) for k, v in ps.items()}
            lst = list(leaves.values())
            with torch.enable_grad():
                g1 = torch.autograd.grad(loss_sum(leaves, X, Y), lst, create_graph=True)
                if r == 1:
                    hv = torch.autograd.grad(g1, lst, grad_outputs=[T[k][0] for k in leaves])
                    return self.flatten(dict(zip(leaves, hv))).unsqueeze(0)
                hv = torch.autograd.grad(g1, lst, grad_outputs=[T[k] for k in leaves], is_grads_batched=True)
            return self.flatten(dict(zip(leaves, hv)), (r,))

        def g(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return grad(loss_sum)(p, X, Y)

        if mode == "revrev":
            pullback = vjp(g, ps)[1]
            if r == 1:
                out = pullback({k: t[0] for k, t in T.items()})[0]
                return self.flatten(out).unsqueeze(0)
            out = vmap(lambda t: pullback(t)[0])(T)
        elif mode == "fwdrev":
            if r == 1:
                out = jvp(g, (ps,), ({k: t[0] for k, t in T.items()},))[1]
                return self.flatten(out).unsqueeze(0)
            out = vmap(lambda t: jvp(g, (ps,), (t,))[1])(T)
        else:
            raise ValueError(f"mode must be 'auto', 'autograd', 'revrev' or 'fwdrev', got {mode!r}")
        return self.flatten(out, (r,))

    def hessian_block_pullback(
        self, col: str, rows: Sequence[str], X: Inputs, Y: Tensor
    ) -> Callable[[Tensor], dict[str, Tensor]]:
        """A function E (r, *shape of ``col``) → {name: (r, *shape)} for the names in ``rows``:
        the rows of Σ_i ∇²L(z_i, θ̂) belonging to the parameters ``rows`` (which must include
        ``col``), for the r directions E in the parameter ``col`` only.

        Reverse-over-reverse restricted on both sides: the first backward differentiates with
        respect to θ_col only and the second with respect to θ_rows only (every other parameter
        is held fixed, so autograd does none of their work, and no zero cotangents are pushed
        back). The forward and the first backward run once here; the returned function applies
        the second backward to any number of column blocks (vmapped over E's rows).
        """
        ps = self.params
        sub = {k: ps[k] for k in rows}
        fixed = {k: v for k, v in ps.items() if k not in sub}
        loss_sum = self.loss_sum

        def g(q: dict[str, Tensor]) -> Tensor:
            def loss_col(th: Tensor) -> Tensor:
                return loss_sum({**fixed, **q, col: th}, X, Y)

            return grad(loss_col)(q[col])

        with second_order():
            pullback = vjp(g, sub)[1]

        def apply(E: Tensor) -> dict[str, Tensor]:
            with second_order():
                if E.shape[0] == 1:
                    return {k: t.unsqueeze(0) for k, t in pullback(E[0])[0].items()}
                return vmap(lambda t: pullback(t)[0])(E)

        return apply

    def paired_hvp(self, Vt: Tensor, X: Inputs, Y: Tensor) -> Tensor:
        """∇²θ L(z_i, θ̂) v_i for each example i of the block and ITS OWN row v_i of ``Vt`` (B, p) → (B, p).

        One example's Hessian applied to one vector per example (the leave-one-out Newton steps: each
        removed point's curvature, :mod:`pyinfluence.torch.leave_out`): forward-over-reverse
        ``jvp(grad(L_i))`` vmapped over the (example, vector) pairs."""
        ps = self.params
        one_loss = self._one_loss

        def one(v: Tensor, x: Inputs, y: Tensor) -> Tensor:
            def g(p: dict[str, Tensor]) -> dict[str, Tensor]:
                return grad(one_loss)(p, x, y)

            return self.flatten(jvp(g, (ps,), (self.unflatten(v),))[1])

        with second_order():
            return vmap(one)(Vt, X, Y)

    def losses_at(self, Theta: Tensor, X: Inputs, Y: Tensor) -> Tensor:
        """Per-example losses of the block at each of the k parameter vectors ``Theta`` (k, p): (k, B)."""
        return vmap(lambda th: self.losses(self.unflatten(th), X, Y))(Theta)

    def grad_value_at(self, Theta: Tensor, X: Inputs, Y: Tensor) -> tuple[Tensor, Tensor]:
        """(Σ_i ∇θ L(z_i, θ_j), Σ_i L(z_i, θ_j)) over the block for each of the k parameter vectors θ_j of
        ``Theta`` (k, p): shapes (k, p) and (k,)."""

        def f(th: Tensor) -> Tensor:
            return self.loss_sum(self.unflatten(th), X, Y)

        return vmap(grad_and_value(f))(Theta)

    def paired_grad_value_at(self, Theta: Tensor, X: Inputs, Y: Tensor) -> tuple[Tensor, Tensor]:
        """(∇θ L(z_i, θ_i), L(z_i, θ_i)) for each example i of the block at ITS OWN parameter vector θ_i
        (row i of ``Theta`` (B, p)): shapes (B, p) and (B,)."""
        one_loss = self._one_loss

        def one(th: Tensor, x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
            return grad_and_value(lambda t: one_loss(self.unflatten(t), x, y))(th)

        return vmap(one)(Theta, X, Y)

    def mixed_input_grad(self, St: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        """∇x (sᵀ ∇θ L(z_i, θ̂)) for each row s of ``St`` (m, p) and example i: (m, B, *x.shape).

        The mixed derivative of ``pert_loss``: the vector-Jacobian product of the map
        X ↦ ∇θ Σ_i L(z_i, θ̂) with cotangent s (reverse-over-reverse, one ``vjp`` per block,
        vmapped over the rows; the loss of example i depends on x_i only, so the input gradient
        of the summed loss is per example).
        """
        ps = self.params
        loss_sum = self.loss_sum

        def g(x: Tensor) -> dict[str, Tensor]:
            return grad(loss_sum)(ps, x, Y)

        with second_order():
            pullback = vjp(g, X)[1]
            T = self.unflatten(St)
            if St.shape[0] == 1:
                return pullback({k: t[0] for k, t in T.items()})[0].unsqueeze(0)
            return vmap(lambda t: pullback(t)[0])(T)

    # -- sizing --------------------------------------------------------------------------------
    def activation_numel(self, x1: Inputs) -> int:
        """Rough number of activation values per example (sum of leaf-module output sizes)."""
        if self._act is not None:
            return self._act
        total = [0]

        def hook(_m: nn.Module, _inp: Any, out: Any) -> None:
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for o in outs:
                if isinstance(o, Tensor):
                    total[0] += int(o.numel())

        with self.hooked_module() as module:
            handles = [
                m.register_forward_hook(hook) for m in module.modules() if not any(True for _ in m.children())
            ]
            try:
                with torch.no_grad():
                    out = self.forward(self.params, slice_inputs(x1, 0, 1))
            finally:
                for h in handles:
                    h.remove()
        out_numel = int(out.numel()) if isinstance(out, Tensor) else 1
        self._act = max(total[0], 4 * out_numel, 16)
        return self._act


# ==============================================================================================
