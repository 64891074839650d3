"""Influence functions for any torch model (Koh & Liang 2017, §3–4): :class:`TorchInfluence`.

It implements the one interface, :class:`pyinfluence.interface.Influence` (the same methods, shapes and
signs as :class:`~pyinfluence.LinearInfluence`; the interface's docstrings state the quantities, the
signs and the 1/n of ``loo_change``). What is particular to this path:

    R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²,   θ̂ = the model's parameters,   H = ∇²R(θ̂)

θ is the flat vector of the *selected* parameters (``params=``; default: all trainable ones), in
``model.named_parameters()`` order, p entries; the L2 term applies to them only and every other
parameter and buffer is held fixed. Every solve uses ``H + λI`` with the damping λ. Results are torch
tensors on the computation's device; ``pert_loss`` has shape (k, m, *input_shape).

Per-example gradients are ``torch.func.vmap(grad(...))`` over ``functional_call``; Hessian-vector
products (for a block of vectors at once) are double backward passes over the training set in
batches (or over one minibatch, for LiSSA) — reverse-over-reverse measured faster than
forward-over-reverse on CPU; see ``FunctionalModel.hvp_rows`` (pyinfluence.torch.functional); the dense Hessian (for
:class:`~pyinfluence.solvers.Exact`) is built from blocks of HVPs with identity columns and kept
for reuse when it is small. Solves go through :mod:`pyinfluence.solvers`. Leave-out Newton steps
(``loo_change(method="newton")``) and warm-started retraining (``retrain_loo``, ``refit``) are in
:mod:`pyinfluence.torch.leave_out`.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from pyinfluence._validation import (
    as_index_array,
    check_bool,
    check_damping,
    check_int,
    check_nonnegative_float,
    overflow_message,
)
from pyinfluence.errors import NonFiniteError, NotAtOptimumWarning, NotPositiveDefiniteError
from pyinfluence.interface import Influence, TopK, check_normalize
from pyinfluence.torch.batches import (
    Inputs,
    StreamingData,
    batch_len,
    cat_inputs,
    convert_inputs,
    inputs_equal,
    is_reiterable_source,
    map_inputs,
    slice_inputs,
)
from pyinfluence.torch.data import (
    TensorData,
    TrainingData,
    _check_finite,
    _to_tensor,
    as_tensor_pair,
    check_class_labels,
    resolve_device,
)
from pyinfluence.torch.distributed import (
    DistributedContext,
    ShardedData,
    data_fingerprint,
    digest_tensors,
    resolve_distributed,
    split_range,
)
from pyinfluence.torch.functional import (
    FunctionalModel,
    ParamSelection,
    _per_example,
    check_model_mode,
    select_params,
)
from pyinfluence.torch.hessian import HessianOperator
from pyinfluence.torch.leave_out import LeaveOut, RetrainReport, default_retrain_tol, test_losses_at
from pyinfluence.torch.solvers import (
    _SOLVERS,
    BlockCG,
    Exact,
    PreparedSolver,
    Solver,
    SolveResult,
    resolve_solver,
)

__all__ = ["TorchInfluence"]

# hessian(max_params=None): the largest p for which the dense Hessian is built.
HESSIAN_MAX_PARAMS = 20_000

# solver="auto": Exact up to this many parameters (the dense build costs ~p HVPs over the
# training set and p² memory), BlockCG above.
AUTO_EXACT_MAX_PARAMS = 10_000
# Byte budget for one block of per-example gradients (block × p) or pert_loss outputs.
_BLOCK_BYTES = 64 << 20
# Removals per leave-out solve (loo_change(method="newton"), retrain_loo): columns of one (p, k) block.
_LEAVE_OUT_CHUNK = 64
# Quasi-Newton steps of refit() at most.
_REFIT_MAX_ITER = 100
# Test sets whose s_test vectors are kept (least recently used dropped first).
_CACHE_SIZE = 8

IndexLike = Union[int, Any, None]
# training data as the methods see it: in memory, streamed, or this rank's shard of either
AnyData = Union[TrainingData, ShardedData]


class TorchInfluence(Influence[Tensor]):
    """Influence functions of a trained torch model on its training set.

    ``TorchInfluence(model, loss_fn, train_data, *, params=None, l2=0.0, damping=0.0,
    solver="auto", batch_size=None, device=None, progress=False, optimum_tol=1e-2)``

    - ``model``: any ``torch.nn.Module`` taking one input tensor (batch first). Put it in eval
      mode first if it has BatchNorm or Dropout (a model in training mode with such layers is
      refused: per-example gradients are undefined with batch statistics or random masks);
      buffers (e.g. BatchNorm running statistics) are used as they are.
    - ``loss_fn(outputs, targets)``: the training loss **per example**, shape (batch,) (a trailing
      dimension of size 1 is accepted), e.g. ``torch.nn.CrossEntropyLoss(reduction="none")`` or
      ``lambda out, y: F.binary_cross_entropy_with_logits(out.squeeze(-1), y,
      reduction="none")``. TorchInfluence averages it itself; a reduced (scalar) loss is refused.
      See also :func:`pyinfluence.losses.smooth_hinge_loss`.
    - ``train_data``: the training set the model was fitted on, in one of two forms:

      * in memory: an ``(inputs, targets)`` pair (tensors or arrays; ``inputs`` may be a dict of tensors,
        Hugging Face style) or a ``TensorDataset`` — moved once to ``device``;
      * streamed (the set never has to fit in memory): a ``DataLoader`` (with ``shuffle=False``), any
        other ``Dataset``, or a re-iterable of batches (a list of batches, an object whose ``__iter__``
        starts a new pass). Every pass iterates it; each batch is converted and moved to ``device`` on
        its own. Batches are ``(inputs, targets)`` pairs or dicts of tensors holding the targets under
        ``label_key`` (default ``"labels"``), the rest being the model's inputs. Random subsets
        (``train_idx=``, LiSSA's minibatches) are read by index from a map-style dataset; an unsized
        stream is counted once at construction. See :mod:`pyinfluence.torch.batches`.

      Floating inputs and targets are converted to the computation dtype. Training index i is the
      i-th example in that order; a stream must yield the same examples in the same order on every
      pass (a pass yielding a different count raises :class:`~pyinfluence.errors.DataError`). A
      model whose inputs are a dict is called as ``model(**inputs)``.
    - ``stream``: None (default): stream DataLoaders, Datasets other than ``TensorDataset`` and
      iterables of batches, keep pairs and TensorDatasets in memory; False: materialise any form in
      memory once (fastest for a small set); True: stream.
    - ``label_key``: the key of the targets in dict batches.
    - ``params``: which parameters θ are, ``None`` = all with ``requires_grad``; a name or list of
      names / module prefixes (``["fc"]`` = ``fc.weight``, ``fc.bias``); or a predicate
      ``f(name)`` / ``f(name, parameter) -> bool``. All selected parameters must share one dtype
      (float64, float32, bfloat16 or float16). Influence is computed with every other parameter
      held fixed (e.g. the paper's Inception experiment: the top layer only).
    - ``dtype``: the computation dtype, float64 or float32. Default: the selected parameters' dtype,
      or float32 for a bfloat16/float16 model (whose floating parameters and buffers are then
      copied once in float32; the model itself is not changed). All results are in this dtype.
    - ``l2``: the weight decay that was part of the training objective: R includes
      (l2/2)‖θ‖² over the selected parameters (SGD's ``weight_decay=wd`` is ``l2=wd``). Its term
      is in the Hessian.
    - ``damping`` λ ≥ 0: every solve uses H + λI (Koh & Liang §4: the Hessian of a non-convex
      model at its trained parameters — rarely an exact local minimum — often has small negative
      eigenvalues; λ larger than their magnitude makes the local quadratic model convex). Values
      then approximate the undamped ones; e.g. λ = 1e-3…1e-2 × the largest eigenvalue.
    - ``solver``: ``"auto"`` (default: :class:`~pyinfluence.solvers.Exact` when p ≤ 10 000, else
      :class:`~pyinfluence.solvers.BlockCG`, which shares one Krylov space across the test points
      and needs ~4× fewer HVPs than independent CG on the digits MLP), ``"exact"``, ``"cg"``,
      ``"block_cg"``, ``"lissa"``, ``"kfac"``, ``"ekfac"`` (curvature approximations for models of
      ``nn.Linear`` layers) or a configured solver object such as ``BlockCG(tol=1e-6)`` or
      ``LiSSA(depth=2000)``.
    - ``batch_size``: the most training examples per pass (per-example gradient blocks, HVP
      batches); default: chosen from the memory of a (batch × p) gradient block (64 MiB).
    - ``device``: where the computation runs; default: the selected parameters' device. The model
      itself is not moved (its parameters and buffers are copied to ``device`` if needed).
    - ``progress``: show tqdm progress bars on long loops (requires ``tqdm``; ImportError if
      missing).
    - ``optimum_tol``: warn (:class:`~pyinfluence.errors.NotAtOptimumWarning`) when
      ‖∇R(θ̂)‖ > optimum_tol · RMS_i ‖∇θL(z_i)‖ (the RMS over the first batch of training
      examples): influence functions assume ∇R(θ̂) = 0. The relative form suits deep models,
      which are rarely exactly at an optimum; ``None`` disables the check. ``grad_norm_`` holds
      ‖∇R(θ̂)‖.
    - ``distributed``: run on the ranks of a ``torch.distributed`` process group (under ``torchrun``). None
      or False (default): one process. True: the default process group (ValueError if it is not
      initialised). ``"auto"``: the default group when ``torch.distributed`` is initialised with more than
      one rank, else one process. Also a :class:`~pyinfluence.torch.distributed.DistributedContext` or a
      ``ProcessGroup`` (a subgroup). See **Distributed** below.

    θ̂ (the selected parameters) is copied here; the other parameters and buffers are used as they
    are, so do not change the model while using this object. The solver is prepared (Exact: the
    dense Hessian is built and factorised) on the first call that needs a solve, or by
    :meth:`prepare`; a non-positive-definite H + λI raises
    :class:`~pyinfluence.errors.NotPositiveDefiniteError` then, with a suggested damping.

    The methods are those of :class:`~pyinfluence.interface.Influence`, which documents the signs (as
    in Koh & Liang), the 1/n convention and the shapes. **Outputs are torch tensors on ``device``** in
    the parameters' dtype (:class:`~pyinfluence.LinearInfluence` returns numpy arrays).

    Test data, for every method taking ``X_test, y_test``: inputs ``X_test`` (m, *input_shape)
    with targets ``y_test`` (m, *target_shape) (tensors or arrays), a single example without the
    batch axis (``x`` of shape input_shape with a scalar/target-shaped ``y``; then m = 1 and the
    m axis is kept in the output), **or** one ``(inputs, targets)`` pair, ``Dataset`` or
    ``DataLoader`` as ``X_test`` with ``y_test`` omitted. ``train_idx`` selects k training
    points: None (all n), an int, a sequence/array/tensor of ints (negative from the end) or a
    boolean mask of length n.

    The vectors s_test = (H+λI)⁻¹ ∇θL(z_test) are cached per test set (compared by value; the 8
    most recent sets), so ``up_loss``, ``pert_loss``, ``top_k``, ``loo_change`` and ``s_test`` on
    the same test data solve once. ``last_solve`` is the :class:`~pyinfluence.solvers.SolveResult`
    of the most recent solve (residual, iterations, time, …); ``n_solves`` counts solves.

    **Saving** (:meth:`save`, :meth:`load`): the fitted curvature — what the solver's preparation found
    (Exact: H and its factor; KFAC / EKFAC: per-layer eigenbases, eigenvalues and diagonal blocks; Arnoldi:
    the top-r Ritz pairs; LiSSA: its scale and Lanczos estimates; CG / BlockCG: their preconditioner) — is
    written to a folder of ``.npy`` arrays with a JSON manifest (nothing pickled), and
    ``TorchInfluence.load(path, model, loss_fn, train_data)`` rebuilds the object for the same model and data,
    on this machine or another (``device=``), without preparing again. The manifest's SHA-256 fingerprints
    of θ̂ and of the other parameters and buffers, ``n_train`` and the selected parameters are checked on
    load; the saved ``l2``, ``damping``, solver and dtype are used, and a conflicting explicit one raises.

    **Distributed** (``distributed=``; :mod:`pyinfluence.torch.distributed`): every rank passes the SAME,
    FULL training data (an in-memory pair, a Dataset, a DataLoader or an iterable of batches — not its own
    part) and the same model, options and arguments; pyinfluence shards it by index: rank r of W processes
    the contiguous training indices ⌊r·n/W⌋ … ⌊(r+1)·n/W⌋ − 1 (an iterable that cannot be indexed is read
    by every rank, which converts and differentiates only its range). Every sum over training examples — the
    Hessian-vector products of CG, BlockCG, LiSSA (its minibatch, drawn identically on every rank, is split
    over the ranks) and Arnoldi, the dense Hessian of Exact, the K-FAC/EK-FAC factors and eigenvalue
    correction, ∇R(θ̂) — runs over the rank's shard and is all-reduced (float64); the small reduced object
    is factorised or solved on every rank. Per-example results (``up_loss``, ``pert_loss``, ``loo_change``,
    ``self_influence``, ``up_params``, ``gradients``) are computed shard by shard and all-gathered, and
    ``top_k`` merges the ranks' top-k: **every rank returns the full result**, with the single-process
    training indices in the single-process order. ``self_influence`` and ``up_params`` solve in blocks of
    ``batch_size`` training points as one process does (each block's gradients computed by all ranks and
    gathered), so iterative solvers see the same right-hand sides. Results equal the single-process ones up
    to the order of floating-point additions (tested: relative difference ≤ 1e-10 in float64 for Exact, CG,
    BlockCG, LiSSA with a fixed seed, K-FAC, EK-FAC and Arnoldi). The construction compares, across ranks,
    n and a digest of the data's first (and, when indexable, evenly spaced) examples, θ̂, ``params``,
    ``l2``, ``damping``, the solver, ``batch_size`` and ``dtype``, and each call compares its test data and
    ``train_idx``: a difference raises ValueError naming the argument, on every rank. A solver seed of None
    is replaced by one random seed shared by all ranks. Every rank must make the same calls in the same
    order (from one thread); :meth:`save` writes from rank 0. ``loss``, ``predict`` and ``test_gradients``
    run on each rank alone.

    **Threads**: one object may be shared by many threads and every call returns exactly what
    it returns when called alone (tested bit for bit). The model is evaluated on a private copy
    of its module tree per thread (sharing all tensors; the user's module is never touched), so
    gradient passes and scoring run concurrently; the solver's preparation, the solves and the
    s_test cache are shared and serialised by a lock. With several threads, ``last_solve`` is
    the most recent solve of any thread.
    """

    _data: AnyData  # in memory, streamed, or (distributed) this rank's shard of either
    _dist: DistributedContext | None

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Any,
        *,
        params: ParamSelection = None,
        l2: float = 0.0,
        damping: float = 0.0,
        solver: str | Solver = "auto",
        batch_size: int | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
        optimum_tol: float | None = 1e-2,
        stream: bool | None = None,
        label_key: str = "labels",
        dtype: torch.dtype | str | None = None,
        distributed: Any = None,
    ) -> None:
        optimum_tol = self._setup(
            model, loss_fn, train_data, params, l2, damping, solver, batch_size, device, progress,
            optimum_tol, stream, label_key, dtype, distributed,
        )  # fmt: skip
        self._check_optimum(optimum_tol)

    def _setup(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Any,
        params: ParamSelection,
        l2: float,
        damping: float,
        solver: str | Solver,
        batch_size: int | None,
        device: str | torch.device | None,
        progress: bool,
        optimum_tol: float | None,
        stream: bool | None,
        label_key: str,
        dtype: torch.dtype | str | None,
        distributed: Any = None,
    ) -> float | None:
        """Everything ``__init__`` does but the check of the optimum (one pass over the data, which
        :meth:`load` skips); returns the validated ``optimum_tol``."""
        named = self._check_arguments(model, loss_fn, params, l2, damping, progress)
        if optimum_tol is not None:
            optimum_tol = check_nonnegative_float("optimum_tol", optimum_tol)
        if stream is not None:
            stream = check_bool("stream", stream)
        if not isinstance(label_key, str):
            raise TypeError(
                f"label_key must be a str (the key of the targets in dict batches), got {label_key!r}"
            )
        self._label_key = label_key
        dev = resolve_device(device, named[0][1].device)
        self._solver_cfg = self._pick_solver(solver, sum(int(p.numel()) for _, p in named))
        cdtype = _compute_dtype(dtype, named[0][1].dtype)
        self._prepare_data(model, loss_fn, named, train_data, dev, cdtype, stream)
        self._batch = self._choose_batch_size(batch_size)
        self._dist = None
        self._distribute(distributed)
        self._init_solving()
        return optimum_tol

    # -- construction steps (in the order __init__ runs them) -----------------------------------
    def _check_arguments(
        self,
        model: Any,
        loss_fn: Any,
        params: ParamSelection,
        l2: Any,
        damping: Any,
        progress: Any,
    ) -> list[tuple[str, nn.Parameter]]:
        """Validate the model, the loss and the scalar options (setting ``_l2``, ``_damping``,
        ``_progress``); return the selected (name, parameter) pairs."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(
                f"loss_fn must be callable (outputs, targets) -> per-example losses, got "
                f"{type(loss_fn).__name__}"
            )
        red = getattr(loss_fn, "reduction", None)
        if isinstance(loss_fn, nn.Module) and red in ("mean", "sum", "batchmean"):
            raise ValueError(
                f"loss_fn is {type(loss_fn).__name__}(reduction={red!r}), which returns one number "
                f"per batch; TorchInfluence needs one loss per example: use "
                f"{type(loss_fn).__name__}(reduction='none') (the mean is taken internally)"
            )
        check_model_mode(model)
        named = select_params(model, params)
        self._l2 = check_nonnegative_float("l2", l2)
        self._damping = check_damping(damping)
        self._progress = check_bool("progress", progress)
        if self._progress:
            try:
                import tqdm  # noqa: F401
            except ImportError:
                raise ImportError(
                    "progress=True needs the tqdm package (pip install tqdm); or pass progress=False"
                ) from None
        return named

    def _prepare_data(
        self,
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        named: list[tuple[str, nn.Parameter]],
        train_data: Any,
        dev: torch.device,
        dtype: torch.dtype,
        stream: bool | None,
    ) -> None:
        """The training set in memory on ``dev`` in the computation dtype, or a stream over it; the
        functional model; a check that model and loss run on it (sets ``_model``, ``_fm``, ``_data``,
        ``_like``, ``_n``, ``_device``, ``_dtype``, ``_n_outputs``)."""
        data: TrainingData
        if _streams(train_data, stream):
            data = StreamingData("train_data", train_data, device=dev, dtype=dtype, label_key=self._label_key)
        else:
            data, _ = as_tensor_pair(
                "train_data", train_data, device=dev, dtype=dtype, label_key=self._label_key
            )
        self._model = model
        self._fm = FunctionalModel(model, loss_fn, named, dev, dtype)
        self._data = data
        # the first examples: the per-example shapes and kinds test data must match (in memory, always)
        self._like = TensorData(*data.head(2))
        self._n = len(data)
        self._device = dev
        self._dtype = dtype
        self._check_callables()

    def _choose_batch_size(self, batch_size: Any) -> int:
        """The most training examples per pass: ``batch_size``, or what fits a (batch × (p + activations))
        block in 64 MiB."""
        item = torch.finfo(self._dtype).bits // 8
        act = self._fm.activation_numel(self._like.inputs)
        if batch_size is None:
            return int(min(self._n, max(16, _BLOCK_BYTES // ((self._fm.n_params + act) * item))))
        return check_int("batch_size", batch_size, 1)

    def _init_solving(self) -> None:
        """The Hessian operator and the solver's shared state (prepared lazily; see :meth:`prepare`)."""
        self._op = HessianOperator(
            self._fm, self._data, self._l2, self._batch, self._bar if self._progress else None
        )
        self._prep: PreparedSolver | None = None
        self._cache: list[tuple[TensorData, Tensor]] = []
        # guards _prep, _cache, last_solve and n_solves, and serialises solves (see Threads above)
        self._solve_lock = threading.RLock()
        self.last_solve: SolveResult | None = None
        self.n_solves = 0
        self.last_retrain: RetrainReport | None = None

    def _distribute(self, distributed: Any) -> None:
        """Shard the training data over the ranks of the process group ``distributed`` names (see
        **Distributed** in the class docstring): check across ranks that data, model and options agree
        (ValueError naming the first that differs, on every rank), agree on random solver seeds, wrap the data
        in a :class:`~pyinfluence.torch.distributed.ShardedData` (and rewire the Hessian operator when it
        exists already: :meth:`load`)."""
        ctx = resolve_distributed(distributed, self._device)
        if ctx is None:
            return
        fm, n, data = self._fm, self._n, self._data
        if isinstance(data, ShardedData):
            raise RuntimeError("the training data is sharded already")
        cfg = self._solver_cfg
        ctx.check_same(
            [
                ("train_data", data_fingerprint(data, n)),
                ("params", repr(list(fm.names)) + repr([tuple(t) for t in fm.shapes])),
                ("model", digest_tensors(fm.theta, dict(fm.fixed))),
                ("l2", repr(self._l2)),
                ("damping", repr(self._damping)),
                ("solver", f"{cfg.name}:{sorted(cfg.config().items())!r}"),
                ("batch_size", repr(self._batch)),
                ("dtype", str(self._dtype)),
            ]
        )
        if n < ctx.world_size:
            raise ValueError(
                f"train_data has {n} examples but the process group has {ctx.world_size} ranks: every rank needs "
                f"at least one training example (use fewer ranks, or distributed=None)"
            )
        self._solver_cfg = _agree_seeds(cfg, ctx)
        self._dist = ctx
        self._data = ShardedData(data, ctx)
        op = getattr(self, "_op", None)
        if op is not None:
            op.data, op.dist = self._data, ctx

    def _check_optimum(self, optimum_tol: float | None) -> None:
        """Set ``grad_norm_`` = ‖∇R(θ̂)‖ and warn (NotAtOptimumWarning, pointing at the caller of
        ``TorchInfluence(...)``) when it is large relative to the per-example gradients."""
        g = self._op.gradient()
        self.grad_norm_ = float(torch.linalg.vector_norm(g))
        self._finite(g, "the training-loss gradient ∇R(θ̂)")  # an overflow of X_train's magnitude
        if optimum_tol is None:
            return
        X0, Y0 = self._data.head(min(self._n, self._batch, 256))
        b = batch_len(X0)
        G0 = self._fm.per_example_grads(X0, Y0)
        rms = float(torch.linalg.vector_norm(G0)) / math.sqrt(b)
        ratio = self.grad_norm_ / rms if rms > 0 else (math.inf if self.grad_norm_ > 0 else 0.0)
        if not math.isfinite(self.grad_norm_) or ratio > optimum_tol:
            warnings.warn(
                f"the model's parameters are not at an optimum of the training objective "
                f"R(θ) = mean loss + (l2/2)‖θ‖² on train_data: ‖∇R(θ̂)‖ = "
                f"{self.grad_norm_:.3g}, {ratio:.3g} × the RMS per-example gradient norm "
                f"(> optimum_tol={optimum_tol:g}). Influence functions assume ∇R(θ̂) = 0, so "
                f"their values are approximate. Check that l2 matches the training weight "
                f"decay and that train_data is the training set; train longer; or pass "
                f"optimum_tol=None to silence this",
                NotAtOptimumWarning,
                stacklevel=3,  # this method, __init__, the caller
            )

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _pick_solver(solver: Any, p: int) -> Solver:
        if isinstance(solver, str):
            key = solver.strip().lower()
            if key == "auto":
                return Exact() if p <= AUTO_EXACT_MAX_PARAMS else BlockCG()
            if key not in _SOLVERS:
                names = ", ".join(repr(k) for k in ("auto", *_SOLVERS))
                raise ValueError(
                    f"solver must be one of {names} or a solver object such as pyinfluence.CG(tol=1e-6), "
                    f"got {solver!r}"
                )
        return resolve_solver(solver)

    def _check_callables(self) -> None:
        """Run the model and loss on two training examples: shapes, reduction, torch.func."""
        fm, d = self._fm, self._like
        X, Y = d.inputs, d.targets
        dt = _dtype_str(X)
        try:
            with torch.no_grad():
                out = fm.forward(fm.params, X)
        except Exception as exc:
            hint = (
                f" They are {dt}: integer inputs reach the model unchanged (as token ids for an "
                f"embedding would); if they are real-valued features, pass them as floats (X.float())."
                if isinstance(X, Tensor) and not X.is_floating_point()
                else ""
            )
            raise ValueError(
                f"calling the model on train_data's inputs ({_shape_desc(X)} for two examples, "
                f"dtype {dt}) failed with {type(exc).__name__}: {exc}. train_data's inputs must be a "
                f"batch the model accepts, examples first.{hint}"
            ) from exc
        # Integer targets of a model with C ≥ 2 outputs per example are class labels 0..C−1.
        self._n_outputs = int(out.shape[-1]) if isinstance(out, Tensor) and out.ndim == 2 else None
        check_class_labels("train_data's targets", d.targets, self._n_outputs)
        if isinstance(self._data, TensorData):
            check_class_labels("train_data's targets", self._data.targets, self._n_outputs)
        else:  # every streamed batch, as it arrives
            assert isinstance(self._data, StreamingData)  # not sharded yet (_distribute runs later)
            n_out = self._n_outputs
            self._data.check_targets = lambda Yb: check_class_labels("train_data's targets", Yb, n_out)
        try:
            with torch.no_grad():
                losses = fm.loss_fn(out, Y)
        except Exception as exc:
            raise ValueError(
                f"calling loss_fn(outputs, targets) on the model's outputs for train_data (shape "
                f"{tuple(getattr(out, 'shape', ()))}) and train_data's targets (shape "
                f"{tuple(Y.shape)}, dtype {str(Y.dtype).replace('torch.', '')}) failed with "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        losses = _per_example(losses, batch_len(X))
        if not losses.is_floating_point():
            raise TypeError(f"loss_fn must return floating-point losses, got {losses.dtype}")
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(
                "loss_fn returned NaN or infinity on the first training examples at the model's parameters"
            )
        try:
            fm.per_example_grads(X, Y)
        except Exception as exc:  # torch.func limitations, e.g. in-place buffer updates
            raise RuntimeError(
                f"per-example gradients (torch.func.vmap over torch.func.grad of "
                f"functional_call(model, ...)) failed: {type(exc).__name__}: {exc}. The model and "
                f"loss must be pure functions of parameters and inputs (no in-place updates of "
                f"buffers, no .item() or data-dependent Python control flow)"
            ) from exc

    def _bar(self, it: Iterable, total: int | None = None, desc: str = "") -> Iterable:
        if not self._progress:
            return it
        from tqdm.auto import tqdm

        return tqdm(it, total=total, desc=desc, leave=False)

    # -- properties ------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """p, the number of selected parameters."""
        return self._fm.n_params

    @property
    def n_train(self) -> int:
        """n, the number of training points."""
        return self._n

    @property
    def params(self) -> Tensor:
        """θ̂, the selected parameters flattened in ``param_names`` order, shape (p,) (a copy)."""
        return self._fm.theta.clone()

    @property
    def param_names(self) -> list[str]:
        """Names of the selected parameters, in the order they are flattened into θ."""
        return list(self._fm.names)

    @property
    def damping(self) -> float:
        """λ, added to the Hessian diagonal in every solve."""
        return self._damping

    @property
    def l2(self) -> float:
        """The L2 coefficient of R(θ) (on the selected parameters)."""
        return self._l2

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point type of the computation (the selected parameters' dtype)."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """The device of the computation and of every returned tensor."""
        return self._device

    @property
    def model(self) -> nn.Module:
        """The model whose influence is computed."""
        return self._model

    @property
    def solver(self) -> Solver:
        """The solver configuration in use."""
        return self._solver_cfg

    @property
    def distributed(self) -> DistributedContext | None:
        """The process group's context (rank, world size) when the training data is sharded over ranks,
        else None (see **Distributed** in the class docstring)."""
        return self._dist

    @property
    def operator(self) -> HessianOperator:
        """The Hessian operator (``matvec``, ``sample_matvec``, ``dense``) of R at θ̂."""
        return self._op

    def __repr__(self) -> str:
        return (
            f"TorchInfluence({type(self._model).__name__}, n_train={self._n}, "
            f"n_params={self.n_params}, l2={self._l2:g}, damping={self._damping:g}, "
            f"solver={self._solver_cfg.name}, dtype={str(self._dtype).replace('torch.', '')}, "
            f"device={self._device})"
        )

    # -- solving -----------------------------------------------------------------------------------
    def prepare(self) -> TorchInfluence:
        """Do the solver's one-off work now (Exact: build and factorise H + λI); returns self."""
        with self._solve_lock:
            if self._prep is None:
                self._prep = self._solver_cfg.prepare(self._op, self._damping)
        return self

    def _solve(self, V: Tensor) -> Tensor:
        with self._solve_lock:
            self.prepare()
            assert self._prep is not None
            res = self._prep.solve(V)
            self.last_solve = res
            self.n_solves += 1
        return res.solution

    def clear_cache(self) -> None:
        """Forget the cached s_test vectors."""
        with self._solve_lock:
            self._cache.clear()

    # -- saving and loading ------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the fitted curvature to the folder ``path`` (created if needed): the prepared solver's
        arrays as ``.npy`` files and ``manifest.json``; returns the folder's path. Prepares the solver
        first if it is not prepared yet (:meth:`prepare`). :meth:`load` rebuilds an equal object from the
        folder for the same model and data without preparing again — on another machine too.

        The manifest holds the format name and version, the library version, the creation time, the
        solver's name and configuration, ``l2``, ``damping``, the computation dtype, the selected
        parameters' names and shapes, ``n_train``, ``batch_size``, ``grad_norm`` (‖∇R(θ̂)‖), SHA-256
        fingerprints of θ̂ and of the model's other parameters and buffers (whole and per tensor: the
        curvature depends on all of them), the solver's state metadata (its ``info`` included) and, per
        array, its file, shape, dtype and SHA-256. Nothing is pickled; every file is written under a
        temporary name and renamed, the manifest last, so a folder with a manifest is complete.

        ``overwrite``: replace an earlier save in ``path`` (otherwise FileExistsError); a folder holding
        anything else is never written into (FileExistsError). Raises ValueError when the solver's state
        cannot be written (``Exact(compute_residual=False)`` on the CPU, whose factor stays inside the C++
        core) and TypeError for a solver without state support (a user-defined Solver). Safe to call while
        other threads use the object (it holds the solve lock while reading the state).
        """
        from pyinfluence.torch.persistence import save_influence

        overwrite = check_bool("overwrite", overwrite)
        ctx = self._dist
        if ctx is None:
            return save_influence(self, path, overwrite=overwrite)
        # distributed: every rank prepares (collectively) and holds the same state; rank 0 writes it
        self.prepare()
        err: BaseException | None = None
        out = Path(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None
        if ctx.rank == 0:
            try:
                out = save_influence(self, path, overwrite=overwrite)
            except Exception as exc:  # every rank raises it (ctx.agree)
                err = exc
        ctx.agree(err, "TorchInfluence.save")
        assert out is not None
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        model: nn.Module,
        loss_fn: Callable[[Tensor, Tensor], Tensor],
        train_data: Any,
        **options: Any,
    ) -> TorchInfluence:
        """The TorchInfluence that :meth:`save` wrote to ``path``, rebuilt for ``model``, ``loss_fn`` and
        ``train_data`` (these cannot be saved: pass the same ones) with the saved ``l2``, ``damping``,
        solver configuration, selected parameters and dtype, and its prepared solver restored from the
        arrays WITHOUT preparing again (no Hessian-vector product, no pass over the training data; a stream
        of unknown length — an IterableDataset, a list of batches — is counted once, as the constructor
        does, to check n_train): every method returns what the saved object returned (bit for bit on the
        same device and thread count).

        ``options``: the keyword arguments of the constructor. ``params``, ``l2``, ``damping``, ``solver``
        and ``dtype`` default to the saved values; passing a different one raises ValueError (the saved
        curvature belongs to them). ``batch_size`` defaults to the saved one; ``device`` to the model's
        (so a folder saved on a CPU is loaded onto the GPU of a model there, or pass ``device="cuda"``:
        the arrays are moved to it); ``progress``, ``stream``, ``label_key``, ``distributed`` as for the
        constructor (every rank reads the folder).
        ``optimum_tol`` defaults to None: the check of ‖∇R(θ̂)‖ ran when the object was saved, and
        ``grad_norm_`` is the saved value; pass a tolerance to check again (one pass over the data).

        Checks, each a ValueError naming what differs: the model's selected parameter names and shapes;
        SHA-256 fingerprints of θ̂ and of the other parameters and buffers (naming the tensors that
        changed); ``n_train``. The training data itself is not read: pass the data the object was saved
        with. Errors naming the file: FileNotFoundError for a missing folder, manifest or array file;
        ValueError for invalid JSON, a manifest of another format or of a newer format version, or an array
        file that is truncated, damaged or differs from its manifest entry (shape, dtype, SHA-256).
        """
        from pyinfluence.torch.persistence import load_influence

        options = dict(options)
        distributed = options.pop("distributed", None)
        obj, optimum_tol, grad_norm = load_influence(cls, path, model, loss_fn, train_data, options)
        obj._distribute(distributed)  # after the restore: the prepared solver keeps the (rewired) operator
        if optimum_tol is None:
            obj.grad_norm_ = grad_norm
        else:
            obj._check_optimum(optimum_tol)  # warns pointing at the caller of load (stacklevel 3)
        return obj

    # -- input helpers ---------------------------------------------------------------------------
    def _test(self, X_test: Any, y_test: Any) -> TensorData:
        data, _ = as_tensor_pair(
            "X_test",
            X_test,
            y_test,
            device=self._device,
            dtype=self._dtype,
            like=self._like,
            names=("X_test", "y_test"),
            label_key=self._label_key,
        )
        check_class_labels("y_test", data.targets, self._n_outputs)
        return data

    def _idx(self, train_idx: IndexLike, **kw: Any) -> Tensor | None:
        if train_idx is None:
            if self._dist is not None:
                self._dist.check_same([("train_idx", "None")])
            return None
        if isinstance(train_idx, Tensor) and train_idx.device.type != "cpu":
            train_idx = train_idx.cpu()
        idx = as_index_array("train_idx", train_idx, self._n, **kw)
        if self._dist is not None:
            self._dist.check_same([("train_idx", digest_tensors(torch.from_numpy(idx)))])
        return torch.from_numpy(idx).to(self._device)

    def _train(self, idx: Tensor | None) -> AnyData:
        return self._data.take(idx)

    def _grad_rows(self) -> int:
        return self._batch

    def _blocks(self, data: AnyData, rows: int, desc: str) -> Iterable[tuple[int, Inputs, Tensor]]:
        it: Iterable[tuple[int, Inputs, Tensor]] = data.blocks(rows)
        if self._progress:
            it = self._bar(it, total=math.ceil(_span(data)[1] / rows), desc=desc)
        return it

    def _finite(self, t: Tensor, what: str, test: TensorData | None = None) -> Tensor:
        """``t`` itself after checking it holds no inf or NaN; else :meth:`_non_finite_error` (every
        returned tensor passes through here; top_k checks its blocks with one device flag)."""
        if bool(torch.isfinite(t).all()):
            return t
        raise self._non_finite_error(what, test)

    def _non_finite_error(self, what: str, test: TensorData | None) -> NonFiniteError:
        """NonFiniteError for ``what``, naming the inputs involved with their largest magnitudes."""
        sizes = {}
        own = self._data.source if isinstance(self._data, ShardedData) else self._data
        train = own if isinstance(own, TensorData) else None  # a stream is not read again
        for name, data in (("X_test", test), ("X_train", train)):
            x = None if data is None else data.inputs
            if isinstance(x, Tensor) and x.numel() and x.is_floating_point():
                sizes[name] = float(x.abs().max())
        return NonFiniteError(
            overflow_message(
                f"{what} overflowed to inf or NaN",
                str(self._dtype).replace("torch.", ""),
                sizes,
                float(torch.finfo(self._dtype).max),
            )
        )

    def _s_test(self, test: TensorData, extra: tuple[tuple[str, str], ...] = ()) -> Tensor:
        if self._dist is not None:  # every rank must solve for the same test points (collective solves)
            self._dist.check_same([("X_test", digest_tensors(test.inputs, test.targets)), *extra])
        # under the lock: a second thread asking for the same test set waits and reuses the solve
        with self._solve_lock:
            for i, (d, s) in enumerate(self._cache):
                if inputs_equal(d.targets, test.targets) and inputs_equal(d.inputs, test.inputs):
                    if i:
                        self._cache.insert(0, self._cache.pop(i))
                    return s
            G = self._finite(self._per_example_grads(test, "test gradients"), "the test gradients", test)
            s = self._finite(self._solve(G.t()), "s_test = (H + λI)⁻¹ ∇θL(z_test)", test)
            self._cache.insert(0, (test, s))
            del self._cache[_CACHE_SIZE:]
            return s

    def _per_example_grads(self, data: AnyData, desc: str = "gradients") -> Tensor:
        lo, k = _span(data)  # this rank's rows (all of them in one process)
        out = torch.empty((k, self.n_params), dtype=self._dtype, device=self._device)
        for s, X, Y in self._blocks(data, self._grad_rows(), desc):
            out[s - lo : s - lo + batch_len(X)] = self._fm.per_example_grads(X, Y)
        return _gathered(out, data)

    def _solve_map(
        self, data: AnyData, fn: Callable[[Tensor, Tensor], Tensor], tail: tuple[int, ...], desc: str
    ) -> Tensor:
        """``fn(G, Z)`` for consecutive blocks of ``batch_size`` training points of ``data``: G (B, p) their
        gradients, Z = (H + λI)⁻¹ Gᵀ (p, B); returns the (k, *tail) rows, on every rank.

        Distributed: with a solver whose solve is local to the rank (Exact: triangular solves) each rank maps
        its own shard and the rows are gathered; otherwise the solves are collective (their HVPs are
        all-reduced), so the ranks go through the SAME blocks as one process in lockstep: each computes the
        gradients of its even share of the block, they are all-gathered, and every rank solves the block."""
        k = len(data)
        rows = self._grad_rows()
        dev, dt = self._device, self._dtype
        ctx = self._dist
        if ctx is None or not isinstance(data, ShardedData):
            out = torch.empty((k, *tail), dtype=dt, device=dev)
            for s, X, Y in self._blocks(data, rows, desc):
                G = self._fm.per_example_grads(X, Y)
                out[s : s + batch_len(X)] = fn(G, self._solve(G.t()))
            return out
        self.prepare()
        if getattr(self._prep, "local_solve", False):
            lo, kl = data.start, data.local_len
            loc = torch.empty((kl, *tail), dtype=dt, device=dev)
            for s, X, Y in self._blocks(data, rows, desc):
                G = self._fm.per_example_grads(X, Y)
                loc[s - lo : s - lo + batch_len(X)] = fn(G, self._solve(G.t()))
            return data.gather(loc)
        W, r = ctx.world_size, ctx.rank
        out = torch.empty((k, *tail), dtype=dt, device=dev)
        starts = list(range(0, k, rows))
        shares = [split_range(s, min(k, s + rows), W, r) for s in starts]
        pieces = iter(data.with_ranges(shares).blocks(rows))
        for s, (a, b) in zip(starts, shares):
            e = min(k, s + rows)
            parts: list[Tensor] = []
            got = 0
            while got < b - a:  # this rank's share of the block (one piece, or several from a stream)
                _, X, Y = next(pieces)
                parts.append(self._fm.per_example_grads(X, Y))
                got += batch_len(X)
            G_loc = torch.cat(parts) if parts else torch.empty((0, self.n_params), dtype=dt, device=dev)
            sizes = [q1 - q0 for q0, q1 in (split_range(s, e, W, q) for q in range(W))]
            G = torch.cat(ctx.gather_segments(G_loc, sizes))  # the block's (B, p) gradients, on every rank
            out[s:e] = fn(G, self._solve(G.t()))
        return out

    # -- core quantities ---------------------------------------------------------------------
    # The formulas, signs, 1/n convention and shapes are documented once, on the interface
    # (pyinfluence.interface.Influence); the docstrings here add what is particular to this path.
    def s_test(self, X_test: Any, y_test: Any = None) -> Tensor:
        """(H+λI)⁻¹ ∇θL(z_test), tensor (p, m); see :meth:`Influence.s_test`. Cached per test set (a
        copy is returned)."""
        return self._s_test(self._test(X_test, y_test)).clone()

    def hessian(self, max_params: int | None = None) -> Tensor:
        """H = ∇²R(θ̂) (damping NOT added), tensor (p, p), exactly symmetric; see :meth:`Influence.hessian`.

        Costs about p Hessian-vector products over the training set and p² memory; refused
        (ValueError) above ``max_params`` parameters (None: 20 000).
        """
        max_params = check_int("max_params", HESSIAN_MAX_PARAMS if max_params is None else max_params, 1)
        if self.n_params > max_params:
            raise ValueError(
                f"the Hessian has p = {self.n_params} parameters, more than max_params="
                f"{max_params} ({self.n_params**2 * (torch.finfo(self._dtype).bits // 8) / 1e9:.3g}"
                f" GB); select fewer parameters (params=...) or raise max_params"
            )
        with self._solve_lock:  # shares the dense build with Exact's preparation
            return self._op.dense()

    def gradients(self, train_idx: IndexLike = None) -> Tensor:
        """∇θL(z_i, θ̂) of training points, tensor (k, p); see :meth:`Influence.gradients`."""
        return self._finite(self._per_example_grads(self._train(self._idx(train_idx))), "the gradients")

    def test_gradients(self, X_test: Any, y_test: Any = None) -> Tensor:
        """∇θL(z_test, θ̂), tensor (m, p); see :meth:`Influence.test_gradients`."""
        test = self._test(X_test, y_test)
        return self._finite(self._per_example_grads(test, "test gradients"), "the test gradients", test)

    def loss(self, X_test: Any, y_test: Any = None) -> Tensor:
        """L(z_test, θ̂) = ``loss_fn(model(x), y)`` per test point, tensor (m,); see :meth:`Influence.loss`."""
        return self._test_losses(self._test(X_test, y_test))

    def _test_losses(self, test: TensorData) -> Tensor:
        out = torch.empty((len(test),), dtype=self._dtype, device=self._device)
        with torch.no_grad():
            for s, X, Y in self._blocks(test, self._grad_rows(), "loss"):
                out[s : s + batch_len(X)] = self._fm.losses(self._fm.params, X, Y)
        return out

    def predict(self, X_test: Any) -> Tensor:
        """The model's outputs for ``X_test`` (inputs (m, *input_shape), or one input without the batch
        axis), tensor: for a classifier (integer class-label targets and C ≥ 2 outputs per example) the
        predicted class, argmax of the outputs, (m,) int64; otherwise the outputs themselves, with a
        trailing axis of size 1 dropped (a binary classifier with one logit gets its logits: threshold
        them at 0). See :meth:`Influence.predict`."""
        X = self._inputs(X_test)
        outs = []
        rows = self._grad_rows()
        with torch.no_grad():
            for i in range(0, batch_len(X), rows):
                outs.append(self._fm.forward(self._fm.params, slice_inputs(X, i, i + rows)))
        out = torch.cat(outs)
        if self._classifies():
            return out.argmax(dim=-1)
        return out.squeeze(-1) if out.ndim == 2 and out.shape[1] == 1 else out

    def up_params(self, train_idx: IndexLike = None) -> Tensor:
        """I_up,params(z), tensor (k, p); see :meth:`Influence.up_params`. One solve per block of
        ``batch_size`` training points."""
        data = self._train(self._idx(train_idx))
        out = self._solve_map(data, lambda G, Z: Z.t().neg(), (self.n_params,), "up_params")  # −H⁻¹∇L(z)
        return self._finite(out, "up_params")

    def up_loss(self, X_test: Any, y_test: Any = None, train_idx: IndexLike = None) -> Tensor:
        """I_up,loss(z, z_test), tensor (k, m); see :meth:`Influence.up_loss`. One solve per test set
        (cached), then per-example gradients of the training points block by block."""
        test = self._test(X_test, y_test)
        S = self._s_test(test)  # (p, m)
        data = self._train(self._idx(train_idx))
        lo, kl = _span(data)  # this rank's rows (all of them in one process)
        out = torch.empty((kl, S.shape[1]), dtype=self._dtype, device=self._device)
        for s, X, Y in self._blocks(data, self._grad_rows(), "up_loss"):
            G = self._fm.per_example_grads(X, Y)
            torch.matmul(G, S, out=out[s - lo : s - lo + batch_len(X)])
        out = _gathered(out, data)
        return self._finite(out.neg_(), "the influence scores up_loss", test)

    def pert_loss(self, X_test: Any, y_test: Any = None, train_idx: IndexLike = None) -> Tensor:
        """I_pert,loss(z, z_test), tensor (k, m, *input_shape); see :meth:`Influence.pert_loss`.

        Computed as ∇x[−s_testᵀ ∇θL(x_i, y_i)] by differentiating through the training input (jvp over
        θ of the input gradient). Needs floating-point inputs (TypeError otherwise).
        """
        like = self._like.inputs
        if not isinstance(like, Tensor) or not like.is_floating_point():
            raise TypeError(
                f"pert_loss differentiates with respect to the training inputs, which are "
                f"{_dtype_str(like)}; it needs one tensor of floating-point inputs"
            )
        test = self._test(X_test, y_test)
        S = self._s_test(test)
        St = S.t().contiguous()  # (m, p)
        m = St.shape[0]
        data = self._train(self._idx(train_idx))
        in_shape = tuple(like.shape[1:])
        lo, kl = _span(data)  # this rank's rows (all of them in one process)
        out = torch.empty((kl, m) + in_shape, dtype=self._dtype, device=self._device)
        item = torch.finfo(self._dtype).bits // 8
        per = max(1, m * (math.prod(in_shape) + self._fm.activation_numel(like)) * item)
        rows = int(max(1, min(self._batch, _BLOCK_BYTES // per)))
        for s, X, Y in self._blocks(data, rows, "pert_loss"):
            assert isinstance(X, Tensor)  # like the first examples: one tensor (checked above)
            J = self._fm.mixed_input_grad(St, X, Y)  # (m, B, *in)
            out[s - lo : s - lo + batch_len(X)] = J.transpose(0, 1).neg()
        return self._finite(_gathered(out, data), "pert_loss", test)

    def self_influence(self, train_idx: IndexLike = None) -> Tensor:
        """I_up,loss(z, z) ≤ 0, tensor (k,); see :meth:`Influence.self_influence`. One solve per block
        of ``batch_size`` training points."""
        data = self._train(self._idx(train_idx))
        # −∇L(z)ᵀ (H + λI)⁻¹ ∇L(z) per row: G (B, p), Z (p, B)
        out = self._solve_map(data, lambda G, Z: -(G * Z.t()).sum(dim=1), (), "self_influence")
        return self._finite(out, "self_influence")

    def loo_change(
        self,
        X_test: Any,
        y_test: Any = None,
        train_idx: IndexLike = None,
        method: str = "influence",
        group: bool = False,
    ) -> Tensor:
        """Predicted L(z_test, θ̂₋) − L(z_test, θ̂), tensor (k, m) or (m,); see :meth:`Influence.loo_change`.

        - ``method="influence"``: −(1/n)·up_loss (Koh & Liang's first-order estimate).
        - ``method="newton"``: one Newton step from θ̂ on the leave-out objective
          R₋(θ) = (1/(n−s)) Σ_{j kept} L_j + (l2/2)‖θ‖² with its Hessian + λI, the test loss evaluated exactly
          at θ̂ + Δ (:mod:`pyinfluence.torch.leave_out`: equations (1)–(2) there). The step adds what the
          first-order estimate leaves out: the removed points' own curvature and the loss's curvature along
          the step. It is solved by conjugate gradients on the leave-out Hessian, column by column (one
          column per removal), to a relative residual of 1e-10 (float64; 1e-5 in float32), checked on the
          true residual (ConvergenceError past it); preconditioned by the solver's inverse where that is
          cheap (Exact: its Cholesky factor, and H V from its dense H — a few iterations; K-FAC, EK-FAC,
          Arnoldi), else plain CG with Hessian-vector products over the training set (about one solve's
          cost per block of 64 removals). A leave-out Hessian + λI that is not positive definite raises
          NotPositiveDefiniteError with a suggested damping. Not available with ``distributed``.
        """
        if method not in ("influence", "newton"):
            raise ValueError(f"method must be 'influence' or 'newton', got {method!r}")
        group = check_bool("group", group)
        idx = self._removal_index(train_idx, group)
        if method == "newton":
            test = self._test(X_test, y_test)
            return self._finite(
                self._leave_out_changes(test, idx, group, None), "loo_change(method='newton')", test
            )
        up = self.up_loss(X_test, y_test, idx)
        up.mul_(-1.0 / self._n)
        return up.sum(dim=0) if group else up

    def _removal_index(self, train_idx: IndexLike, group: bool) -> Tensor | None:
        """The removed training points: all n one at a time (None), the given ones, or a group (required,
        unique, not all of the set)."""
        if not group:
            return self._idx(train_idx)
        if train_idx is None:
            raise ValueError("train_idx is required with group=True (the points removed together)")
        idx = self._idx(train_idx, unique=True, allow_empty=False)
        assert idx is not None
        if idx.numel() >= self._n:
            raise ValueError(f"train_idx removes all {self._n} training points; at least one must remain")
        return idx

    def _leave_out(self, removed: Tensor, group: bool) -> LeaveOut:
        if self._dist is not None:
            raise NotImplementedError(
                "loo_change(method='newton'), retrain_loo and refit are not available with distributed=...: "
                "run them in one process (the first-order loo_change is)"
            )
        return LeaveOut(
            self._fm, self._op, self._leave_out_preconditioner(), self._data, self._damping, removed, group,
            self._grad_rows(),
        )  # fmt: skip

    def _leave_out_preconditioner(self) -> PreparedSolver | None:
        """The prepared solver when the leave-out solves can use it (a direct or approximate inverse: Exact,
        K-FAC, EK-FAC, Arnoldi, or an iterative solver's configured preconditioner); None for a plain iterative
        solver, which is then not prepared at all (LiSSA's scale estimate would be wasted work)."""
        cfg = self._solver_cfg
        if cfg.name in ("cg", "block_cg", "lissa") and getattr(cfg, "preconditioner", None) is None:
            return None
        with self._solve_lock:
            self.prepare()
            return self._prep

    def _leave_out_changes(
        self,
        test: TensorData,
        idx: Tensor | None,
        group: bool,
        retrain: tuple[float, int, float | None] | None,
    ) -> Tensor:
        """L(z_test, θ) − L(z_test, θ̂) for θ = θ̂ + the Newton step (``retrain`` None) or the retrained
        minimiser (``retrain`` = (tol, max_iter, deadline: a time.perf_counter() value or None)), per removal:
        (k, m), or (m,) for a group."""
        base = self._test_losses(test)  # (m,)
        if idx is None:
            idx = torch.arange(self._n, device=self._device)
        chunks = (
            [idx]
            if group
            else [idx[c : c + _LEAVE_OUT_CHUNK] for c in range(0, idx.numel(), _LEAVE_OUT_CHUNK)]
        )
        out = []
        reports = []
        for chunk in chunks:
            lo = self._leave_out(chunk, group)
            if retrain is None:
                Theta = lo.newton_step().add_(self._fm.theta[:, None])
            else:
                Theta, rep = lo.retrain(*retrain)
                reports.append(rep)
            out.append(test_losses_at(self._fm, Theta, test, self._grad_rows()) - base)
        if retrain is not None:
            self.last_retrain = _merge_reports(reports, retrain[0])
        if not out:
            return torch.empty((0, len(test)), dtype=self._dtype, device=self._device)
        res = torch.cat(out)
        return res[0] if group else res

    def helpfulness(self, X_test: Any, y_test: Any = None, train_idx: IndexLike = None) -> Tensor:
        """−I_up,loss(z, z_test), tensor (k, m): positive = helpful, the convention of Captum, pyDVL,
        kronfluence, TRAK and dattri; exactly ``-up_loss(X_test, y_test, train_idx)`` (same solve, same
        cache). See :meth:`Influence.helpfulness`."""
        return self.up_loss(X_test, y_test, train_idx).neg_()

    def top_k(
        self, X_test: Any, y_test: Any = None, k: int = 10, normalize: str | None = None
    ) -> TopK[Tensor]:
        """:class:`~pyinfluence.TopK` holding four (m, k) **tensors** on ``device`` (int64 indices); see
        :meth:`Influence.top_k`. Streams over blocks of training points (memory m·(k + batch_size),
        never the n × m score matrix).

        ``normalize`` ("theta", "loss", "cosine") first solves for every training gradient, in blocks of
        ``batch_size`` as :meth:`self_influence` does (the cost of n right-hand sides with the configured
        solver: cheap with Exact's factor, about n/batch_size solves with an iterative one), keeping only one
        number per training point: ‖(H+λI)⁻¹∇L(z)‖ ("theta") or ∇L(z)ᵀ(H+λI)⁻¹∇L(z) ("loss", "cosine").
        A negative ∇L(z)ᵀ(H+λI)⁻¹∇L(z) (H + λI not positive definite along that gradient, or an
        unconverged solve) raises :class:`~pyinfluence.errors.NotPositiveDefiniteError` (increase the
        damping)."""
        k = check_int("k", k, 1, self._n, maximum_what="the number of training points")
        normalize = check_normalize(normalize)
        test = self._test(X_test, y_test)
        S = self._s_test(test, (("k", repr(k)), ("normalize", repr(normalize))))
        m = S.shape[1]
        den = None if normalize is None else self._train_norms(normalize)  # (n,), every rank
        tden = None
        if normalize == "cosine":  # √(g_tᵀ(H+λI)⁻¹g_t) per test point, from s_test and the test gradients
            Gt = self._per_example_grads(test, "test gradients")
            tden = self._sqrt_quadratic((Gt * S.t()).sum(dim=1), "the test points")
        dev, dt = self._device, self._dtype
        hv = torch.empty((m, 0), dtype=dt, device=dev)
        hi = torch.empty((m, 0), dtype=torch.int64, device=dev)
        rv, ri = hv, hi
        # one flag on the device for all blocks: no host synchronisation per block (on CUDA); checked before
        # anything is returned, so no ranking that saw a NaN or inf ever leaves this method
        finite = torch.ones((), dtype=torch.bool, device=dev)
        for s, X, Y in self._blocks(self._data, self._grad_rows(), "top_k"):
            G = self._fm.per_example_grads(X, Y)
            sc = (G @ S).neg_().t()  # (m, B)
            if den is not None:  # RelatIF / cosine: up_loss over the norms (0 for a zero gradient)
                sc = _safe_divide(sc, den[None, s : s + batch_len(X)])
                if tden is not None:
                    sc = _safe_divide(sc, tden[:, None])
            finite &= torch.isfinite(sc).all()
            ids = torch.arange(s, s + batch_len(X), device=dev).expand(m, -1)
            cv, ci = torch.cat([hv, sc], 1), torch.cat([hi, ids], 1)
            kk = min(k, cv.shape[1])
            v, j = torch.topk(cv, kk, dim=1, largest=False, sorted=True)
            hv, hi = v, ci.gather(1, j)
            cv, ci = torch.cat([rv, sc], 1), torch.cat([ri, ids], 1)
            v, j = torch.topk(cv, kk, dim=1, largest=True, sorted=True)
            rv, ri = v, ci.gather(1, j)
        if self._dist is not None:  # this rank's top-k of its shard → the top-k over all ranks
            finite = self._dist.all_reduce_min(finite.to(torch.int64)).to(torch.bool)
            if bool(finite):
                hv, hi, rv, ri = self._dist.merge_top_k(hv, hi, rv, ri, k)
        if not bool(finite):
            raise self._non_finite_error("the influence scores ranked by top_k", test)
        return TopK(hi, hv, ri, rv)

    def _train_norms(self, normalize: str) -> Tensor:
        """Per training point (all n, every rank), the normaliser of ``normalize``, tensor (n,):
        "theta": ‖(H+λI)⁻¹∇L(z)‖; "loss"/"cosine": √(∇L(z)ᵀ(H+λI)⁻¹∇L(z))."""
        if normalize == "theta":  # G (B, p), Z = (H + λI)⁻¹Gᵀ (p, B): the norms of Z's columns
            out = self._solve_map(
                self._data, lambda G, Z: torch.linalg.vector_norm(Z, dim=0), (), "top_k norms"
            )
            return self._finite(out, "‖(H + λI)⁻¹∇L(z)‖ of the training points")
        q = self._solve_map(self._data, lambda G, Z: (G * Z.t()).sum(dim=1), (), "top_k norms")
        return self._sqrt_quadratic(self._finite(q, "∇L(z)ᵀ(H + λI)⁻¹∇L(z)"), "the training points")

    def _sqrt_quadratic(self, q: Tensor, whose: str) -> Tensor:
        """√q for q = gᵀ(H+λI)⁻¹g ≥ 0; rounding-level negatives are taken as 0, larger ones raise
        NotPositiveDefiniteError (H + λI indefinite along g, or an unconverged iterative solve)."""
        tol = float(torch.finfo(q.dtype).eps) ** 0.5 * float(q.abs().max()) if q.numel() else 0.0
        bad = q < -tol
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise NotPositiveDefiniteError(
                f"top_k(normalize=...): ∇L(z)ᵀ(H + λI)⁻¹∇L(z) = {float(q[i]):.3g} < 0 for {whose} (index {i}): "
                f"H + λI (damping λ = {self._damping:g}) is not positive definite along its gradient, or the "
                f"solver did not converge; pass a larger damping, or normalize=None"
            )
        return q.clamp_min(0.0).sqrt_()

    # -- the training set and retraining ---------------------------------------------------------------
    @property
    def can_retrain(self) -> bool:
        """True in one process: :meth:`retrain_loo` and :meth:`refit` retrain the model warm-started from θ̂
        (in-memory training data for ``refit``); False with ``distributed``."""
        return self._dist is None

    def retrain_loo(
        self,
        X_test: Any,
        y_test: Any = None,
        train_idx: IndexLike = None,
        group: bool = False,
        tol: float | None = None,
        max_iter: int = 100,
        max_seconds: float | None = None,
    ) -> Tensor:
        """Actual L(z_test, θ̂₋) − L(z_test, θ̂) after removing training points and retraining, tensor (k, m), or
        (m,) with ``group=True``; see :meth:`Influence.retrain_loo`. ``train_idx`` is required.

        Retraining minimises R₋(θ) = (1/(n−s)) Σ_{j kept} L_j + (l2/2)‖θ‖² (the training objective without
        the removed points; damping is not part of it) warm-started from θ̂ plus the Newton step, by chord
        (simplified Newton) steps with the leave-out Hessian at θ̂ and a backtracking line search, then
        Newton-CG with the Hessian at the current point (:meth:`LeaveOut.retrain
        <pyinfluence.torch.leave_out.LeaveOut.retrain>`), until ‖∇R₋(θ)‖₂ ≤ ``tol`` (None: 1e-9 in float64,
        1e-4 in float32) at a point without negative curvature; ConvergenceError after ``max_iter`` steps per
        removal, or once ``max_seconds`` (None: no limit) have passed since the call began — checked between
        steps and before every iteration of a step's CG solve (a line search, a few loss passes, may overrun it). Where θ̂ is a minimum of R₋ too, θ̂₋ lies O(1/n) from θ̂ and a few
        steps suffice; each costs one pass over the training set for the gradients and one solve (cheap with
        Exact, a CG solve otherwise). On a non-convex model a removal can leave θ̂ a saddle point of R₋ (the
        leave-out Hessian indefinite; ``loo_change(method="newton")`` raises NotPositiveDefiniteError for it) and
        the retraining then follows the negative curvature to another minimum, which can take many Newton-CG
        steps: ``max_seconds`` bounds that. Like the linear path's refits,
        the change is measured from θ̂ itself: for a model not at an optimum (large ``grad_norm_``) the
        refit also moves θ̂ towards the optimum, and that drift is part of every change (polish the model
        first, or subtract the change of a refit with nothing removed). ``last_retrain``
        (:class:`~pyinfluence.torch.leave_out.RetrainReport`) records the gradient norms reached, the steps
        and the seconds. The model itself is never changed. Not available with ``distributed``.
        """
        if train_idx is None:
            raise ValueError(
                "train_idx is required: retrain_loo refits the model once per removed point (or once for a group)"
            )
        group = check_bool("group", group)
        max_iter = check_int("max_iter", max_iter, 0)
        tol_v = default_retrain_tol(self._dtype) if tol is None else check_nonnegative_float("tol", tol)
        if not tol_v > 0:
            raise ValueError(f"tol must be > 0, got {tol!r}")
        limit = None if max_seconds is None else check_nonnegative_float("max_seconds", max_seconds)
        idx = self._removal_index(train_idx, group)
        test = self._test(X_test, y_test)
        deadline = None if limit is None else time.perf_counter() + limit
        changes = self._leave_out_changes(test, idx, group, (tol_v, max_iter, deadline))
        return self._finite(changes, "retrain_loo", test)

    def refit(self, X_train: Any = None, y_train: Any = None) -> TorchInfluence:
        """A new TorchInfluence, configured like this one (params, l2, damping, solver, batch size, device,
        dtype), for a COPY of the model retrained on modified training data; see :meth:`Influence.refit`.

        ``X_train`` / ``y_train`` replace the training inputs / targets (None keeps them; same number of
        points, same shapes). The copy is retrained from θ̂ on R'(θ) = mean loss on the new data + (l2/2)‖θ‖²
        by quasi-Newton steps on top of the new objective's Hessian at θ̂ + λI (Hessian-vector products over the
        new data, preconditioned by this object's solver) with a backtracking line search, to ‖∇R'‖₂ ≤ 1e-9
        (float64; 1e-4 in float32); ConvergenceError after 100 steps. Suited to modifications
        whose optimum lies near θ̂ (perturbed or relabelled points: training-set attacks, fixing labels);
        ``last_retrain`` on THIS object records the fit. Needs the training data in memory (a stream:
        NotImplementedError) and one process. The original model is not changed.
        """
        import copy

        if self._dist is not None:
            raise NotImplementedError("refit is not available with distributed=...: run it in one process")
        own = self._data
        if not isinstance(own, TensorData):
            raise NotImplementedError(
                "refit needs the training data in memory (an (inputs, targets) pair or a TensorDataset); for "
                "streamed data retrain the model yourself and build a new TorchInfluence on the modified stream"
            )
        Xn = own.inputs if X_train is None else X_train
        Yn = own.targets if y_train is None else y_train
        new, _ = as_tensor_pair(
            "X_train", Xn, Yn, device=self._device, dtype=self._dtype, like=self._like,
            names=("X_train", "y_train"), label_key=self._label_key,
        )  # fmt: skip
        if len(new) != self._n:
            raise ValueError(
                f"refit keeps the number of training points: X_train/y_train have {len(new)}, the model was "
                f"trained on {self._n}"
            )
        check_class_labels("y_train", new.targets, self._n_outputs)
        op = HessianOperator(self._fm, new, self._l2, self._batch)
        lo = LeaveOut(
            self._fm, op, self._leave_out_preconditioner(), new, self._damping, torch.empty(0, dtype=torch.long, device=self._device),
            True, self._grad_rows(), dense_hessian=False,
        )  # fmt: skip
        Theta, rep = lo.retrain(default_retrain_tol(self._dtype), _REFIT_MAX_ITER)
        self.last_retrain = rep
        model = copy.deepcopy(self._model)
        fitted = self._fm.unflatten(Theta[:, 0])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in fitted:
                    p.copy_(fitted[name].to(device=p.device, dtype=p.dtype))
        return TorchInfluence(
            model, self._fm.loss_fn, (new.inputs, new.targets), params=list(self._fm.names), l2=self._l2,
            damping=self._damping, solver=self._solver_cfg, batch_size=self._batch, device=self._device,
            progress=self._progress, optimum_tol=None, label_key=self._label_key, dtype=self._dtype,
        )  # fmt: skip

    def training_data(self) -> tuple[Any, Tensor]:
        """A copy of the training set as ``(inputs, targets)`` on ``device`` (inputs a tensor, or a dict of
        tensors), floating values in the computation dtype; see :meth:`Influence.training_data`. For
        streamed training data this reads the whole stream into memory (one pass): it is the set itself
        that is asked for."""
        own = self._data.source if isinstance(self._data, ShardedData) else self._data  # the full set
        if isinstance(own, TensorData):
            return map_inputs(own.inputs, lambda t: t.clone()), own.targets.clone()
        xs: list[Inputs] = []
        ys: list[Tensor] = []
        for X, Y in own.batches():
            xs.append(X)
            ys.append(Y)
        try:
            return cat_inputs(xs), torch.cat(ys)
        except (RuntimeError, KeyError) as exc:
            raise ValueError(
                f"training_data(): the streamed batches cannot be joined into one set of tensors ({exc}); "
                f"their examples differ in shape (e.g. sequences padded per batch)"
            ) from None

    def _classifies(self) -> bool:
        """Whether the targets are class labels: integer targets of a model with C ≥ 2 outputs."""
        t = self._like.targets
        return (
            self._n_outputs is not None
            and self._n_outputs >= 2
            and not t.is_floating_point()
            and t.dtype != torch.bool
        )

    def _inputs(self, X_test: Any) -> Inputs:
        """Test inputs alone (no targets) as a batch on ``device``, shaped and typed like the training
        inputs; one input without the batch axis becomes a batch of one (tensor inputs only)."""
        like = self._like.inputs
        if isinstance(like, dict) or isinstance(X_test, Mapping):
            if not (isinstance(like, dict) and isinstance(X_test, Mapping)) or set(X_test) != set(like):
                raise TypeError(
                    f"X_test must be inputs of the training inputs' form: "
                    f"{'a dict with keys ' + str(sorted(like)) if isinstance(like, dict) else 'a tensor'}"
                )
            return convert_inputs("X_test", X_test, device=self._device, dtype=self._dtype)
        X = _to_tensor("X_test", X_test)
        if tuple(X.shape) == tuple(like.shape[1:]):
            X = X.unsqueeze(0)
        if X.ndim == 0 or tuple(X.shape[1:]) != tuple(like.shape[1:]):
            raise ValueError(
                f"X_test has shape {tuple(X.shape)}, but the training inputs have examples of shape "
                f"{tuple(like.shape[1:])}: pass (m, {', '.join(str(s) for s in like.shape[1:])}) inputs"
            )
        if like.is_floating_point():
            X = X.to(self._dtype)
        elif X.is_floating_point():
            raise TypeError(
                f"X_test is floating-point but the training inputs are {like.dtype} (e.g. token ids); "
                f"pass inputs of the same kind"
            )
        X = X.to(self._device)
        _check_finite("X_test", X)
        return X


# ==============================================================================================
# helpers
# ==============================================================================================
def _safe_divide(num: Tensor, den: Tensor) -> Tensor:
    """num / den (broadcasting), 0 where den is 0: a normaliser is 0 only for a zero gradient, whose up_loss is
    exactly 0 too (elsewhere the ratio is bounded, by Cauchy–Schwarz in the (H + λI)⁻¹ metric)."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _compute_dtype(dtype: Any, model_dtype: torch.dtype) -> torch.dtype:
    """The computation dtype: ``dtype`` (float64 / float32, or their names) or, for None, the model's
    parameter dtype — float32 for a bfloat16/float16 model."""
    if dtype is None:
        return model_dtype if model_dtype in (torch.float32, torch.float64) else torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype.strip().lower(), dtype)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float64, torch.float32 or None, got {dtype!r}")
    return dtype


def _streams(train_data: Any, stream: bool | None) -> bool:
    """Whether ``train_data`` is streamed (see ``stream`` in TorchInfluence's docstring)."""
    if stream is False:
        return False
    if isinstance(train_data, torch.utils.data.TensorDataset) and stream is None:
        return False
    if isinstance(train_data, (tuple, list)):
        # a list of batches (each a pair or a dict) is a stream; an (inputs, targets) pair is not
        batches = len(train_data) > 0 and all(isinstance(b, (tuple, list, Mapping)) for b in train_data)
        if not batches or (
            len(train_data) == 2
            and isinstance(train_data[0], Mapping)
            and not isinstance(train_data[1], (tuple, list, Mapping))
        ):
            if stream:
                raise ValueError(
                    "stream=True needs a DataLoader, a Dataset or an iterable of batches as train_data"
                )
            return False
        return True
    if is_reiterable_source(train_data):
        return True
    if stream:
        raise ValueError(
            f"stream=True needs a DataLoader, a Dataset or an iterable of batches as train_data, got "
            f"{type(train_data).__name__}"
        )
    return False


def _merge_reports(reports: list[RetrainReport], tol: float) -> RetrainReport:
    """One RetrainReport for the removals of several leave-out blocks, in order."""
    import numpy as np

    return RetrainReport(
        grad_norm=np.concatenate([r.grad_norm for r in reports]) if reports else np.empty(0),
        steps=np.concatenate([r.steps for r in reports]) if reports else np.empty(0, np.int64),
        start_grad_norm=np.concatenate([r.start_grad_norm for r in reports]) if reports else np.empty(0),
        solve_iterations=sum(r.solve_iterations for r in reports),
        tol=tol,
        seconds=sum(r.seconds for r in reports),
        info={  # the per-removal lists, concatenated in order
            key: [v for r in reports for v in r.info.get(key, [])]
            for key in ("newton_cg_steps", "saddle_escapes", "min_curvature")
        },
    )


def _span(data: Any) -> tuple[int, int]:
    """(first position, number of rows) that this rank computes of ``data``: its shard of a
    :class:`~pyinfluence.torch.distributed.ShardedData`, else all of it."""
    if isinstance(data, ShardedData):
        return data.start, data.local_len
    return 0, len(data)


def _gathered(out: Tensor, data: Any) -> Tensor:
    """The full result from this rank's rows (``out``, of its contiguous shard of ``data``): all-gathered
    on sharded data, ``out`` itself otherwise."""
    return data.gather(out) if isinstance(data, ShardedData) else out


def _agree_seeds(solver: Solver, ctx: DistributedContext) -> Solver:
    """``solver`` with every ``seed=None`` (its own, and a configured preconditioner's) replaced by one random
    seed drawn on rank 0: the ranks must draw the same random numbers (LiSSA's minibatches, Arnoldi's and
    Lanczos's start vectors, the sampled Fisher's targets)."""
    import dataclasses

    if not dataclasses.is_dataclass(solver):
        return solver
    changes: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(solver)}
    if "seed" in fields and getattr(solver, "seed", 0) is None:
        changes["seed"] = ctx.broadcast_int(int.from_bytes(os.urandom(4), "little"))
    pre = getattr(solver, "preconditioner", None)
    if "preconditioner" in fields and isinstance(pre, Solver):
        new_pre = _agree_seeds(pre, ctx)
        if new_pre is not pre:
            changes["preconditioner"] = new_pre
    return dataclasses.replace(solver, **changes) if changes else solver


def _dtype_str(X: Any) -> str:
    if isinstance(X, dict):
        return "a dict of " + ", ".join(f"{k}: {str(v.dtype).replace('torch.', '')}" for k, v in X.items())
    return str(getattr(X, "dtype", type(X).__name__)).replace("torch.", "")


def _shape_desc(X: Any) -> str:
    if isinstance(X, dict):
        return "inputs " + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in X.items())
    return f"shape {tuple(X.shape)}"
