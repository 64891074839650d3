"""The exact linear path on Dask: :class:`~pyinfluence.LinearInfluence` and the estimators' ``fit`` on a
``dask.array`` training matrix chunked by rows (issue 16).

Every pass over the training rows runs chunk by chunk on the Dask workers with the C++ core; the client only
ever holds p × p matrices, (K, d_eff) parameters, the test points and results of test size. The shape is
"map, reduce, solve once, map again" (DESIGN.md §3a):

- **Sums over the rows** (the Newton fit's objective, gradient and Hessian; the influence Hessian):
  per chunk c, ``Σ_{i∈c} L_i``, ``Σ_{i∈c} r_i ⊗ x̃_i`` (K × d_eff) and the data Hessian
  ``Σ_{i∈c} D_i ⊗ x̃_i x̃_iᵀ`` (p × p, the core's SYRK), packed in one row per chunk and added by Dask's tree
  reduction (``sum(split_every=8)``), in float64. The client forms R = ΣL/n + (l2/2)‖Pθ‖²,
  ∇R = Σ r⊗x̃ / n + l2·Pθ and H = Σ D⊗x̃x̃ᵀ / n + l2·P, exactly the quantities of the single-process core.
- **The Newton fit** is the core's (csrc/src/newton.cpp) step for step: the same gauge for the multinomial
  intercepts, the same Cholesky solve (on the client), the same line search (Armijo with c = 1e-4, halving,
  the rounding-level acceptance rule) and the same stopping rule; one pass over the rows per trial point
  (objective, gradient and Hessian together: the Hessian of an accepted point is the next iteration's).
- **Scoring**: H + λI is Cholesky-factorised once on the client (its failure raises the single-process
  engine's errors); every chunk then builds a *block engine* of the core (``_core.LinearEngine.block``: the
  chunk's rows with the whole set's H, n and Σ∇L, which it re-factorises: p³/3 per chunk, negligible beside
  the chunk's own n_c·p·m when n_c ≫ p) and answers ``up_loss``, ``pert_loss``, ``self_influence``,
  ``up_params``, ``gradients``, the Newton-step leave-one-out and its chunk's top-k with the same kernels as
  the single-process engine. Results of training size come back as dask arrays chunked like the training
  rows; ``top_k`` merges the per-chunk top-k on the client (indices are global training indices; ties
  broken by the lower index, as the core does). The small objects every chunk needs (θ, H, Σ∇L, the test
  points) travel as one graph key per computation, fetched once per worker, not embedded in every task.

Memory per worker is bounded by the chunk size: one chunk of X (n_c × d values of the computation's dtype;
float64 for the fit's sums), its labels, the core's per-chunk buffers (residuals and curvatures n_c × K, the
scoring blocks of ≤ 32 MB) and the chunk's result (n_c × m scores, n_c × m × d for ``pert_loss``, n_c × p for
``gradients`` / ``up_params``), plus a few p × p matrices. Choose the chunk rows so that
``n_c·(d + m)·8 bytes`` stays well below a worker's memory limit.

Faults: Dask reruns the tasks of a worker that dies (up to ``distributed.scheduler.allowed-failures`` times,
default 3) on another worker; tasks are pure functions of their chunk, so a rerun gives the same numbers.
``retries=r`` (on ``LinearInfluence`` and ``fit``) additionally reruns a task whose function *raised* (a
transient read error), r times: passed to every ``compute`` pyinfluence makes and attached as a Dask
annotation to the layers of the lazy results it returns. An error in a chunk names the chunk and its rows;
:func:`read_npy` and :func:`read_parquet` build dask arrays whose loading errors name the file.

Everything here imports dask lazily: ``import pyinfluence`` and the numpy path never import it.
"""

from __future__ import annotations

import copy
import glob
import os
import sys
import uuid
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import NDArray

from pyinfluence import _core
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError

if TYPE_CHECKING:  # pragma: no cover
    from pyinfluence.linear.models import _LinearModel

__all__ = [
    "DASK_EXTRA",
    "DaskLinearEngine",
    "is_dask_array",
    "read_npy",
    "read_parquet",
    "require_dask",
]

DASK_EXTRA = "pip install 'pyinfluence[dask]'"
# Fan-in of the tree reductions: a node adds at most this many p × p partial sums.
SPLIT_EVERY = 8


# ------------------------------------------------------------------------------------------------
# dask, imported lazily
# ------------------------------------------------------------------------------------------------
def is_dask_array(x: Any) -> bool:
    """True if ``x`` is a ``dask.array.Array`` (never imports dask: an instance implies it is imported)."""
    mod = sys.modules.get("dask.array")
    return mod is not None and isinstance(x, mod.Array)


def require_dask(feature: str) -> Any:
    """``dask.array``, or an ImportError naming the ``dask`` extra (``feature`` says what needs it)."""
    try:
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"{feature} needs Dask, which is not installed: {DASK_EXTRA}", name="dask") from exc
    return da


def _compute(*objs: Any, retries: int = 0) -> Tuple[Any, ...]:
    """``dask.compute(*objs)`` on the current scheduler (a ``distributed.Client`` if one is active), with
    ``retries`` reruns of a task that raises (distributed only; the local schedulers ignore it)."""
    import dask

    kwargs = {"retries": int(retries)} if retries else {}
    return dask.compute(*objs, **kwargs)


def _annotated(retries: int) -> Any:
    """A context that attaches ``retries`` to the Dask layers built inside it (nothing when 0)."""
    import contextlib

    if not retries:
        return contextlib.nullcontext()
    import dask

    return dask.annotate(retries=int(retries))


def _broadcast(obj: Any) -> Any:
    """``obj`` as one key of the graph (a ``dask.delayed``), so that the tasks that need it share it: it is
    sent to each worker once per computation instead of being embedded in every task."""
    import dask

    return dask.delayed(obj, pure=False, traverse=False, name=f"pyinfluence-payload-{uuid.uuid4().hex}")


# ------------------------------------------------------------------------------------------------
# errors in chunks
# ------------------------------------------------------------------------------------------------
def _with_context(exc: BaseException, where: str) -> BaseException:
    """``exc`` with ``where`` in front of its message: same class and fields (a copy), else a RuntimeError."""
    message = f"{where}: {exc}"
    try:
        new = copy.copy(exc)
        new.args = (message,)
        if str(new) == message:
            return new
    except Exception:  # an exception class that cannot be copied: keep its message at least
        pass
    return RuntimeError(f"{message} ({type(exc).__name__})")


def _where(block_info: Optional[dict], what: str) -> str:
    """'chunk i of <what> (rows a:b)' from map_blocks' block_info of the first input."""
    info = (block_info or {}).get(0) or {}
    try:
        i = info["chunk-location"][0]
        a, b = info["array-location"][0]
        return f"chunk {i} of {what} (rows {a}:{b})"
    except (KeyError, IndexError, TypeError):
        return f"a chunk of {what}"


def _run(what: str, block_info: Optional[dict], fn: Callable[[], Any]) -> Any:
    """``fn()``, re-raising any exception with the chunk (and its rows) named."""
    try:
        return fn()
    except Exception as exc:
        raise _with_context(exc, _where(block_info, what)) from exc


# ------------------------------------------------------------------------------------------------
# the model as plain data (pickled into the graph), penalty and gauge
# ------------------------------------------------------------------------------------------------
SpecArgs = Tuple[str, int, bool, bool, float, float]


def spec_args(spec: _core.ModelSpec) -> SpecArgs:
    """The arguments that rebuild ``spec`` (``_core.ModelSpec`` itself is not picklable)."""
    return (
        str(spec.family),
        int(spec.n_outputs),
        bool(spec.fit_intercept),
        bool(spec.penalize_intercept),
        float(spec.l2),
        float(spec.temperature),
    )


def _spec(args: SpecArgs, l2: Optional[float] = None) -> _core.ModelSpec:
    family, K, fit_intercept, penalize_intercept, spec_l2, temperature = args
    return _core.ModelSpec(
        family, K, fit_intercept, penalize_intercept, spec_l2 if l2 is None else float(l2), temperature
    )


def _penalty(args: SpecArgs, d: int) -> NDArray[np.float64]:
    """The (K, d_eff) diagonal of l2·P: l2 on penalised parameters, 0 on an unpenalised intercept."""
    _, K, fit_intercept, penalize_intercept, l2, _ = args
    pen = np.full((K, d + (1 if fit_intercept else 0)), l2, dtype=np.float64)
    if fit_intercept and not penalize_intercept:
        pen[:, d] = 0.0
    return pen


def _has_gauge(args: SpecArgs) -> bool:
    """The multinomial intercept gauge (γ/2)(Σ_k b_k)², γ = 1, of families.hpp applies."""
    family, _, fit_intercept, penalize_intercept, _, _ = args
    return family == "multinomial" and fit_intercept and not penalize_intercept


# ------------------------------------------------------------------------------------------------
# validation of dask inputs
# ------------------------------------------------------------------------------------------------
def training_matrix(name: str, X: Any, dtype: Optional[np.dtype], n_features: Optional[int] = None) -> Any:
    """A validated dask training matrix (n, d) chunked by whole rows, cast (lazily) to ``dtype`` (default:
    its own float32/float64 dtype, else float64). Raises ValueError/TypeError naming ``name`` for a matrix
    that is not 2-D, has unknown chunk sizes, is chunked along its columns, is empty, has the wrong number of
    features or a non-numeric dtype. Finiteness is checked chunk by chunk when the chunks are computed."""
    if X.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D dask array of shape (n_samples, n_features); got {X.ndim} dimensions"
        )
    if any(np.isnan(c) for c in X.chunks[0]) or any(np.isnan(c) for c in X.chunks[1]):
        raise ValueError(
            f"{name} has unknown chunk sizes (e.g. after boolean indexing, or from a dask DataFrame); "
            f"compute them first: {name}.compute_chunk_sizes(), or df.to_dask_array(lengths=True)"
        )
    if len(X.chunks[1]) != 1:
        raise ValueError(
            f"{name} is chunked along its columns ({len(X.chunks[1])} column chunks: {X.chunks[1]}); "
            f"every chunk must hold whole rows: pass {name}.rechunk({{1: -1}})"
        )
    n, d = int(X.shape[0]), int(X.shape[1])
    if n == 0 or d == 0:
        raise ValueError(f"{name} is empty (shape {X.shape}); it needs at least one row and one column")
    if n_features is not None and d != n_features:
        raise ValueError(f"{name} has {d} features but the model was trained on {n_features}")
    kind = np.dtype(X.dtype).kind
    if kind not in "biuf":
        raise TypeError(f"{name} has dtype {X.dtype}; expected real numbers (float32/float64, ints or bools)")
    target = np.dtype(dtype) if dtype is not None else None
    if target is None:
        target = np.dtype(X.dtype) if np.dtype(X.dtype) in (np.float32, np.float64) else np.dtype(np.float64)
    return X if X.dtype == target else X.astype(target)


def _label_vector(name: str, y: Any, X: Any, x_name: str) -> Any:
    """A dask label vector ``y`` (n,) aligned with X's row chunks; ValueError naming ``name`` otherwise."""
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-dimensional (n_samples,); got {y.ndim} dimensions")
    if any(np.isnan(c) for c in y.chunks[0]):
        raise ValueError(f"{name} has unknown chunk sizes; compute them first: {name}.compute_chunk_sizes()")
    if y.shape[0] != X.shape[0]:
        raise ValueError(
            f"{name} has {y.shape[0]} entries but {x_name} has {X.shape[0]} rows; they must match"
        )
    return y if y.chunks[0] == X.chunks[0] else y.rechunk({0: X.chunks[0]})


def _as_dask_vector(y: NDArray[Any], X: Any) -> Any:
    """An in-memory vector as a dask array with X's row chunks."""
    da = require_dask("Dask training data")
    return da.from_array(np.ascontiguousarray(y), chunks=(X.chunks[0],))


def _encode_chunk(
    yb: NDArray[Any], *, encoder: Any, label: str, out_dtype: str, block_info: Any = None
) -> Any:
    if np.shape(yb)[0] == 0:  # an empty chunk (the validators refuse empty label arrays)
        return np.empty(0, dtype=out_dtype)
    return _run(label, block_info, lambda: encoder._encode(label, yb, np.dtype(out_dtype), n=yb.shape[0]))


def _encode_lazy(y: Any, encoder: Any, name: str, dtype: Any) -> Any:
    """``encoder._encode`` chunk by chunk (errors name ``name``, the chunk and its rows)."""
    dt = np.dtype(dtype)
    return y.map_blocks(
        _encode_chunk, encoder=encoder, label=name, out_dtype=dt.name, dtype=dt, meta=np.empty(0, dtype=dt)
    )


def _unique_chunk(yb: NDArray[Any], name: str, index: int) -> NDArray[Any]:
    from pyinfluence._validation import as_label_array

    if np.shape(yb)[0] == 0:
        return np.asarray(yb)
    try:
        return np.unique(as_label_array(name, yb))
    except Exception as exc:
        raise _with_context(exc, f"chunk {index} of {name}") from exc


def _encoder(model: _LinearModel, K: int, d: int) -> _LinearModel:
    """A light copy of ``model`` whose ``_encode`` works (fitted attributes present), to pickle into tasks."""
    enc = copy.copy(model)
    if "theta_" not in enc.__dict__:
        enc.theta_ = np.zeros((K, d + (1 if model.fit_intercept else 0)))
    return enc


def encode_labels(model: _LinearModel, name: str, y: Any, X: Any, dtype: np.dtype) -> Any:
    """Labels of a fitted model, encoded for the core, as a dask vector aligned with X's rows: an in-memory
    ``y`` is validated and encoded here (errors name ``name``), a dask ``y`` chunk by chunk (errors name
    ``name``, the chunk and its rows)."""
    if is_dask_array(y):
        y = _label_vector(name, y, X, "X_train")
        enc = _encoder(model, model.n_outputs_, int(X.shape[1]))
        return _encode_lazy(y, enc, name, dtype)
    return _as_dask_vector(model._encode(name, y, dtype, n=int(X.shape[0])), X)


def encode_fit_labels(model: _LinearModel, y: Any, X: Any, retries: int = 0) -> Tuple[Any, int]:
    """``model._encode_fit`` for Dask data: (encoded labels as a dask vector, K). Sets ``classes_`` of a
    classifier; for a dask ``y`` the classes are found by one pass over its chunks (per-chunk unique values,
    merged on the client)."""
    n = int(X.shape[0])
    if not is_dask_array(y):
        y_enc, K = model._encode_fit(y, n)
        return _as_dask_vector(y_enc, X), K
    y = _label_vector("y", y, X, "X")
    if not model._is_classifier:
        enc = _encoder(model, 1, int(X.shape[1]))
        return _encode_lazy(y, enc, "y", np.float64), 1
    import dask

    parts = [dask.delayed(_unique_chunk)(b, "y", i) for i, b in enumerate(y.to_delayed().ravel())]
    uniques = _compute(*parts, retries=retries)
    model._fit_classes(np.concatenate(uniques), n=None)  # the classes, with their checks (≥ 2 classes)
    classes = model.classes_
    if model._family == "smooth_hinge" and classes.shape[0] != 2:
        del model.classes_
        raise ValueError(f"SmoothHingeSVM is a binary classifier but y has {classes.shape[0]} classes")
    K = 1 if classes.shape[0] == 2 else int(classes.shape[0])
    enc = _encoder(model, K, int(X.shape[1]))
    return _encode_lazy(y, enc, "y", np.float64), K


def data_key(X: Any, y: Any) -> Tuple[str, str]:
    """An identity of the training data (X a dask array, y dask or in memory) for reusing the fit's sums."""
    import dask.base

    y_key = y.name if is_dask_array(y) else dask.base.tokenize(np.asarray(y))
    return (X.name, y_key)


# ------------------------------------------------------------------------------------------------
# the work of one chunk (module-level functions: pickled by reference, run on the workers)
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Payload:
    """What every chunk of one computation needs; one graph key per computation (see :func:`_broadcast`)."""

    spec: SpecArgs
    theta: NDArray[Any]
    dtype: str = "float64"
    what: str = "X_train"
    damping: float = 0.0
    # Any: None where a computation does not need them
    H: Any = None
    n_total: int = 0
    grad_sum: Any = None
    X_test: Any = None
    y_test: Any = None
    k: int = 0
    method: str = ""
    extra: Dict[str, Any] = field(default_factory=dict)

    def arrays(self, Xb: NDArray[Any], yb: NDArray[Any]) -> Tuple[NDArray[Any], NDArray[Any]]:
        """A chunk as the core takes it: C-contiguous, of the computation's dtype, labels 1-D."""
        dt = np.dtype(self.dtype)
        return np.ascontiguousarray(Xb, dtype=dt), np.ascontiguousarray(np.asarray(yb).reshape(-1), dtype=dt)

    def engine(self, X: NDArray[Any], y: NDArray[Any]) -> _core.LinearEngine:
        """The core's block engine of a chunk: the whole set's H, n and Σ∇L, the chunk's rows."""
        return _core.LinearEngine.block(
            _spec(self.spec), X, y, self.theta, self.damping, self.H, self.n_total, self.grad_sum
        )


def _stats_chunk(Xb: NDArray[Any], yb: NDArray[Any], *, payload: _Payload, block_info: Any = None) -> Any:
    """One row [Σ L_i, Σ r_i ⊗ x̃_i (p), Σ D_i ⊗ x̃_i x̃_iᵀ (p²)] over the chunk's rows, float64."""

    def run() -> NDArray[np.float64]:
        X, y = payload.arrays(Xb, yb)
        theta = payload.theta
        K, de = theta.shape
        p = K * de
        out = np.zeros((1, 1 + p + p * p), dtype=np.float64)
        b, d = X.shape
        if b == 0:
            return out
        spec = _spec(payload.spec)
        loss, R, _ = _core.per_example(spec, X, y, theta)
        G = np.empty((K, de), dtype=np.float64)
        G[:, :d] = R.T @ X  # Σ_i r_i x_iᵀ
        if de > d:
            G[:, d] = R.sum(axis=0)  # the intercept's constant feature
        # the core's data Hessian (l2 = 0) is the mean over the chunk: times b for the sum
        Hd = _core.hessian(_spec(payload.spec, l2=0.0), X, y, theta)
        out[0, 0] = float(np.sum(loss, dtype=np.float64))
        out[0, 1 : 1 + p] = G.ravel()
        out[0, 1 + p :] = (Hd * b).ravel()
        return out

    return _run(payload.what, block_info, run)


def _rows_chunk(Xb: NDArray[Any], yb: NDArray[Any], *, payload: _Payload, block_info: Any = None) -> Any:
    """A per-training-point query of the chunk's rows, by the chunk's block engine (``payload.method``)."""

    def run() -> NDArray[Any]:
        X, y = payload.arrays(Xb, yb)
        b, d = X.shape
        dt = np.dtype(payload.dtype)
        method = payload.method
        m = 0 if payload.X_test is None else payload.X_test.shape[0]
        p = int(payload.theta.size)
        shapes = {
            "up_loss": (b, m),
            "loo_newton": (b, m),
            "pert_loss": (b, m, d),
            "self_influence": (b,),
            "up_params": (b, p),
            "gradients": (b, p),
        }
        if b == 0:
            return np.empty(shapes[method], dtype=dt)
        engine = payload.engine(X, y)
        Xt, yt = payload.X_test, payload.y_test
        if method == "up_loss":
            out = engine.up_loss(Xt, yt)
        elif method == "pert_loss":
            out = engine.pert_loss(Xt, yt)
        elif method == "loo_newton":
            out = engine.loo_newton(Xt, yt, np.arange(b, dtype=np.int64))
        elif method == "self_influence":
            out = engine.self_influence()
        elif method == "up_params":
            out = engine.up_params(X, y)
        else:
            out = engine.gradients(X, y)
        return np.asarray(out)

    return _run(payload.what, block_info, run)


def _empty_top_k_block(m: int, k: int) -> NDArray[np.float64]:
    """One chunk's top-k result before any score: (1, m, 4k) = [helpful idx | value | harmful idx | value],
    indices −1 and values NaN (no candidate yet)."""
    out = np.full((1, m, 4 * k), np.nan, dtype=np.float64)
    out[0, :, 0:k] = -1.0
    out[0, :, 2 * k : 3 * k] = -1.0
    return out


def _top_k_chunk(Xb: NDArray[Any], yb: NDArray[Any], *, payload: _Payload, block_info: Any = None) -> Any:
    """The chunk's top-k (k_c = min(k, rows)) as one (1, m, 4k) float64 block: [helpful indices, helpful
    values, harmful indices, harmful values]; indices global (the chunk's first row added), padding with
    index −1 and value NaN. float64 holds every index below 2⁵³ exactly."""

    def run() -> NDArray[np.float64]:
        X, y = payload.arrays(Xb, yb)
        b = X.shape[0]
        m, k = payload.X_test.shape[0], payload.k
        out = _empty_top_k_block(m, k)
        kc = min(k, b)
        if kc == 0:
            return out
        start = int(block_info[0]["array-location"][0][0]) if block_info else 0
        hi, hv, ri, rv = payload.engine(X, y).top_k(payload.X_test, payload.y_test, kc)
        out[0, :, 0:kc] = np.asarray(hi) + start
        out[0, :, k : k + kc] = hv
        out[0, :, 2 * k : 2 * k + kc] = np.asarray(ri) + start
        out[0, :, 3 * k : 3 * k + kc] = rv
        return out

    return _run(payload.what, block_info, run)


def rank_top_k(
    ids: NDArray[Any], vals: NDArray[Any], k: int
) -> Tuple[NDArray[Any], NDArray[Any], NDArray[Any], NDArray[Any]]:
    """The top-k of candidate scores ``vals`` (m, c) with training indices ``ids`` (m, c), ordered as the core
    orders them: helpful = increasing value, harmful = decreasing value, ties by increasing index; NaN values
    (padding) sort last. Returns (helpful_idx, helpful_val, harmful_idx, harmful_val), each (m, min(k, c)).
    Plain numpy (also LinearInfluence's merge of in-memory blocks)."""
    h_order = np.lexsort((ids, vals), axis=-1)[:, :k]
    r_order = np.lexsort((ids, -vals), axis=-1)[:, :k]
    take = np.take_along_axis
    return (
        take(ids, h_order, axis=1),
        take(vals, h_order, axis=1),
        take(ids, r_order, axis=1),
        take(vals, r_order, axis=1),
    )


def _top_k_scores_chunk(S: NDArray[Any], *, k: int, block_info: Any = None) -> Any:
    """A chunk of precomputed scores (n_c, m) → its top-k as one (1, m, 4k) float64 block laid out like
    :func:`_top_k_chunk`'s (global indices; padding index −1, value NaN)."""

    def run() -> NDArray[np.float64]:
        b, m = S.shape
        out = _empty_top_k_block(m, k)
        kc = min(k, b)
        if kc == 0:
            return out
        start = int(block_info[0]["array-location"][0][0]) if block_info else 0
        vals = np.ascontiguousarray(np.asarray(S, dtype=np.float64).T)  # (m, b)
        ids = np.broadcast_to(np.arange(start, start + b, dtype=np.int64), (m, b))
        hi, hv, ri, rv = rank_top_k(ids, vals, kc)
        out[0, :, 0:kc] = hi
        out[0, :, k : k + kc] = hv
        out[0, :, 2 * k : 2 * k + kc] = ri
        out[0, :, 3 * k : 3 * k + kc] = rv
        return out

    return _run("the normalised influence scores", block_info, run)


def _separates_chunk(Xb: NDArray[Any], yb: NDArray[Any], *, payload: _Payload, block_info: Any = None) -> Any:
    """(1, 1): 1.0 if θ classifies every row of the chunk strictly correctly (see _LinearModel._separates)."""

    def run() -> NDArray[np.float64]:
        X, y = payload.arrays(Xb, yb)
        if X.shape[0] == 0:
            return np.ones((1, 1))
        model = payload.extra["model"]
        return np.full((1, 1), 1.0 if model._separates(X, y, payload.theta) else 0.0)

    return _run(payload.what, block_info, run)


def _decode_chunk(yb: NDArray[Any], *, model: Any) -> NDArray[Any]:
    from pyinfluence.linear.influence import _decode_labels

    return _decode_labels(model, yb)


# ------------------------------------------------------------------------------------------------
# sums over the rows, and the Newton fit
# ------------------------------------------------------------------------------------------------
def _map_rows(
    func: Callable[..., Any],
    X: Any,
    y: Any,
    payload: _Payload,
    out_shape: Tuple[Any, ...],
    dtype: Any,
    retries: int,
) -> Any:
    """``func`` over the row chunks of (X, y) with one broadcast payload: a dask array whose leading axis is
    chunked like X's rows (``out_shape`` gives the trailing sizes; ``"rows1"`` as the leading entry makes one
    row per chunk instead)."""
    da = require_dask("Dask training data")
    nb = X.numblocks[0]
    per_chunk = out_shape[0] == "rows1"
    tail = tuple(out_shape[1:])
    lead = (1,) * nb if per_chunk else X.chunks[0]
    chunks = (lead, *((s,) for s in tail))
    ndim = 1 + len(tail)
    kwargs: Dict[str, Any] = {}
    if ndim == 1:
        kwargs["drop_axis"] = 1
    elif ndim == 3:
        kwargs["new_axis"] = [1]
    with _annotated(retries):
        return da.map_blocks(
            func,
            X,
            y[:, None],
            payload=_broadcast(payload),
            chunks=chunks,
            dtype=dtype,
            meta=np.empty((0,) * ndim, dtype=dtype),
            **kwargs,
        )


@dataclass
class _Sums:
    """Σ over all n rows at one θ: loss, gradient (K, d_eff) and data Hessian (p, p), float64."""

    n: int
    loss: float
    grad: NDArray[np.float64]
    hess: NDArray[np.float64]


def row_sums(args: SpecArgs, X: Any, y: Any, theta: NDArray[Any], retries: int = 0) -> _Sums:
    """The tree-reduced per-chunk sums (one pass over the rows, float64)."""
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    K, de = theta.shape
    p = K * de
    payload = _Payload(spec=args, theta=theta, dtype="float64", what="X_train")
    parts = _map_rows(_stats_chunk, X, y, payload, ("rows1", 1 + p + p * p), np.float64, retries)
    (flat,) = _compute(parts.sum(axis=0, split_every=SPLIT_EVERY), retries=retries)
    flat = np.asarray(flat, dtype=np.float64)
    return _Sums(
        n=int(X.shape[0]),
        loss=float(flat[0]),
        grad=flat[1 : 1 + p].reshape(K, de).copy(),
        hess=flat[1 + p :].reshape(p, p).copy(),
    )


def _objective(args: SpecArgs, sums: _Sums, theta: NDArray[np.float64], d: int) -> Tuple[float, NDArray[Any]]:
    """R(θ) = ΣL/n + (l2/2)‖Pθ‖² and ∇R = Σ r⊗x̃ / n + l2·Pθ (objective.cpp), without the gauge."""
    pen = _penalty(args, d)
    value = sums.loss / sums.n + 0.5 * float(np.sum(pen * theta * theta))
    return value, sums.grad / sums.n + pen * theta


def _hessian(args: SpecArgs, sums: _Sums, d: int) -> NDArray[np.float64]:
    """H = Σ D⊗x̃x̃ᵀ / n + l2·P (objective.cpp: the mean data Hessian plus the penalty's diagonal)."""
    H = sums.hess / sums.n
    H[np.diag_indices_from(H)] += _penalty(args, d).ravel()
    return H


def _gauge_hessian(args: SpecArgs, A: NDArray[Any], K: int, de: int) -> None:
    """Adds the intercept gauge γ·11ᵀ (γ = 1) on the intercepts to A, in place (objective.cpp)."""
    if _has_gauge(args):
        idx = np.arange(K) * de + (de - 1)
        A[np.ix_(idx, idx)] += 1.0


def _gauge_objective(
    args: SpecArgs, theta: NDArray[Any], value: float, grad: NDArray[Any]
) -> Tuple[float, Any]:
    """The gauge (γ/2)(Σ_k b_k)² added to an objective value and gradient (objective.cpp)."""
    if not _has_gauge(args):
        return value, grad
    bsum = float(theta[:, -1].sum())
    grad = grad.copy()
    grad[:, -1] += bsum
    return value + 0.5 * bsum * bsum, grad


# The fit's sums at its final θ, reused by LinearInfluence on the same data (saves a pass over the rows):
# model -> (data key, spec args, θ bytes, sums). Weak keys: nothing outlives the model.
_FIT_SUMS: weakref.WeakKeyDictionary[Any, Tuple[Any, SpecArgs, bytes, _Sums]] = weakref.WeakKeyDictionary()


def fitted_sums(model: Any, key: Any, args: SpecArgs, theta: NDArray[Any]) -> Optional[_Sums]:
    """The sums the Dask fit of ``model`` left at ``theta`` for the data ``key``, if any."""
    entry = _FIT_SUMS.get(model)
    theta64 = np.ascontiguousarray(theta, dtype=np.float64)
    if entry is not None and entry[0] == key and entry[1] == args and entry[2] == theta64.tobytes():
        return entry[3]
    return None


def fit_newton(
    spec: _core.ModelSpec,
    X: Any,
    y: Any,
    theta0: NDArray[np.float64],
    tol: float,
    max_iter: int,
    retries: int = 0,
    cache: Optional[Tuple[Any, Any]] = None,
) -> Tuple[NDArray[np.float64], int, float, bool]:
    """Newton's method of the core (csrc/src/newton.cpp) on Dask data: (θ (K, d_eff), iterations, ‖∇R(θ)‖,
    converged), raising as ``_core.fit_newton`` does (NotPositiveDefiniteError for a Hessian that is not
    positive definite, ValueError when the objective becomes NaN or inf).

    Per iteration: the Newton direction from the Cholesky factor of ∇²R (+ the multinomial gauge) on the
    client, then a backtracking line search whose every trial point costs one pass over the rows (objective,
    gradient and, for the next iteration, the Hessian). ``cache``: (model, data key) under which the sums at
    the final θ are kept for :class:`DaskLinearEngine`.
    """
    args = spec_args(spec)
    d = int(X.shape[1])
    theta = np.ascontiguousarray(theta0, dtype=np.float64).copy()
    K, de = theta.shape
    eps = float(np.finfo(np.float64).eps)

    def evaluate(W: NDArray[np.float64]) -> Tuple[_Sums, float, NDArray[Any]]:
        sums = row_sums(args, X, y, W, retries)
        value, grad = _objective(args, sums, W, d)
        gv, gg = _gauge_objective(args, W, value, grad)
        return sums, gv, gg

    sums, value, grad = evaluate(theta)
    iterations = 0
    status = "ok"
    failure: Optional[NotPositiveDefiniteError] = None
    while iterations < max_iter:
        gnorm = float(np.linalg.norm(grad))
        if not (np.isfinite(value) and np.isfinite(gnorm)):
            status = "non_finite"
            break
        if gnorm <= tol:
            break
        H = _hessian(args, sums, d)
        _gauge_hessian(args, H, K, de)
        try:
            factor = _core.CholeskyFactor(np.ascontiguousarray(H), 0.0)
        except NotPositiveDefiniteError as exc:
            status, failure = "not_positive_definite", exc
            break
        except ValueError:  # NaN or inf in H
            status = "non_finite"
            break
        g = grad.ravel()
        step = np.asarray(factor.solve(np.ascontiguousarray(g)))  # the Newton direction is −step
        decrement = float(g @ step)  # gᵀ H⁻¹ g ≥ 0
        alpha = 1.0
        accepted = False
        for _ in range(60):
            Wt = theta - alpha * step.reshape(K, de)
            t_sums, t_value, t_grad = evaluate(Wt)
            armijo = t_value <= value - 1e-4 * alpha * decrement
            # near the optimum the decrease of R is below rounding: accept steps that do not raise R beyond
            # rounding and reduce the gradient (newton.cpp)
            rounding_ok = t_value <= value + 16 * eps * abs(value) and float(np.linalg.norm(t_grad)) < gnorm
            if np.isfinite(t_value) and (armijo or rounding_ok):
                accepted = True
                break
            alpha *= 0.5
        if not accepted:
            status = "not_converged"
            break
        theta, sums, value, grad = Wt, t_sums, t_value, t_grad
        iterations += 1
    if status == "not_positive_definite":
        assert failure is not None
        raise NotPositiveDefiniteError(
            f"the training Hessian became singular or indefinite during Newton's method (iteration {iterations}: "
            f"{failure})",
            pivot=failure.pivot,
            size=failure.size,
            min_pivot=failure.min_pivot,
            suggested_damping=failure.suggested_damping,
        )
    if status == "non_finite":
        raise ValueError(
            "the training objective became NaN or inf during Newton's method; check the scale of X"
        )
    _, plain = _objective(args, sums, theta, d)  # ‖∇R‖ without the gauge, as the core reports it
    grad_norm = float(np.linalg.norm(plain))
    if cache is not None:
        _FIT_SUMS[cache[0]] = (cache[1], args, theta.tobytes(), sums)
    return theta, iterations, grad_norm, bool(grad_norm <= tol)


def separates(model: Any, X: Any, y: Any, theta: NDArray[np.float64], retries: int = 0) -> bool:
    """``model._separates`` over every chunk (θ classifies every training point strictly correctly)."""
    spec = model._spec(np.float64, n_outputs=theta.shape[0])
    enc = _encoder(model, int(theta.shape[0]), int(X.shape[1]))
    payload = _Payload(spec=spec_args(spec), theta=theta, what="X", extra={"model": enc})
    parts = _map_rows(_separates_chunk, X, y, payload, ("rows1", 1), np.float64, retries)
    (low,) = _compute(parts.min(), retries=retries)
    return bool(float(low) > 0.5)


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
class DaskLinearEngine:
    """The influence engine of a fitted linear model over a dask training matrix: the interface of
    ``_core.LinearEngine`` (and ``cuda.CudaLinearEngine``), so ``LinearInfluence`` uses it unchanged.

    ``DaskLinearEngine(spec, X, y, theta, damping, retries=0, sums=None)``: ``X`` (n, d) a validated dask array
    of the computation's dtype chunked by rows, ``y`` (n,) the encoded labels as a dask array with the same row
    chunks, ``theta`` (K, d_eff). ``sums``: the row sums at θ if already known (from the fit), else one pass over
    the rows computes them. H + λI is factorised here, on the client, by the core's block engine with no rows
    (which also answers every test-side query: s_test, solve, gradients of in-memory points); it raises the
    core's NotPositiveDefiniteError / NonFiniteError exactly as the single-process engine.

    Training-side queries take the whole training set (X = None) or a dask array of selected rows and return
    lazy dask arrays chunked like those rows; ``top_k`` and ``loo_newton_group`` return numpy.
    """

    def __init__(
        self,
        spec: _core.ModelSpec,
        X: Any,
        y: Any,
        theta: NDArray[Any],
        damping: float,
        retries: int = 0,
        sums: Optional[_Sums] = None,
    ) -> None:
        self._args = spec_args(spec)
        self._spec = spec
        self._X, self._y = X, y
        self._dt = np.dtype(X.dtype)
        self._theta = np.ascontiguousarray(theta, dtype=self._dt)
        self._damping = float(damping)
        self._retries = int(retries)
        self._n, self._d = int(X.shape[0]), int(X.shape[1])
        if sums is None:
            sums = row_sums(self._args, X, y, theta, self._retries)
        H = _hessian(self._args, sums, self._d)
        self._H = np.ascontiguousarray(H, dtype=self._dt)
        self._grad_sum = np.ascontiguousarray(sums.grad, dtype=self._dt)
        self._client = _core.LinearEngine.block(
            spec,
            np.empty((0, self._d), dtype=self._dt),
            np.empty(0, dtype=self._dt),
            self._theta,
            self._damping,
            self._H,
            self._n,
            self._grad_sum,
        )

    # -- what LinearInfluence reads -----------------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self._dt.name

    @property
    def n_train(self) -> int:
        return self._n

    @property
    def n_params(self) -> int:
        return int(self._theta.size)

    @property
    def grad_norm(self) -> float:
        return float(self._client.grad_norm)

    @property
    def retries(self) -> int:
        return self._retries

    def compute(self, *objs: Any) -> Tuple[Any, ...]:
        """``dask.compute`` with this engine's retries."""
        return _compute(*objs, retries=self._retries)

    def hessian(self) -> NDArray[Any]:
        return np.asarray(self._client.hessian())

    def solve(self, B: NDArray[Any]) -> NDArray[Any]:
        return np.asarray(self._client.solve(B))

    def _payload(self, what: str, **kw: Any) -> _Payload:
        return _Payload(
            spec=self._args,
            theta=self._theta,
            dtype=self._dt.name,
            what=what,
            damping=self._damping,
            H=self._H,
            n_total=self._n,
            grad_sum=self._grad_sum,
            **kw,
        )

    def _rows(
        self, method: str, X: Any, y: Any, tail: Tuple[int, ...], Xt: Any = None, yt: Any = None
    ) -> Any:
        """``method`` over the rows of X (None: the training set) as a lazy dask array (rows, *tail)."""
        what = "X_train"
        if X is None:
            X, y = self._X, self._y
        elif X is not self._X:
            what = "the training points selected by train_idx"
        payload = self._payload(what, X_test=Xt, y_test=yt, method=method)
        return _map_rows(_rows_chunk, X, y, payload, ("rows", *tail), self._dt, self._retries)

    # -- queries -----------------------------------------------------------------------------------
    def gradients(self, X: Any, y: Any) -> Any:
        if not is_dask_array(X):
            return np.asarray(self._client.gradients(X, y))
        return self._rows("gradients", X, y, (self.n_params,))

    def up_params(self, X: Any, y: Any) -> Any:
        if not is_dask_array(X):
            return np.asarray(self._client.up_params(X, y))
        return self._rows("up_params", X, y, (self.n_params,))

    def up_loss(self, Xt: NDArray[Any], yt: NDArray[Any], X: Any = None, y: Any = None) -> Any:
        self._check_test(Xt, yt)
        return self._rows("up_loss", X, y, (Xt.shape[0],), Xt, yt)

    def pert_loss(self, Xt: NDArray[Any], yt: NDArray[Any], X: Any = None, y: Any = None) -> Any:
        self._check_test(Xt, yt)
        return self._rows("pert_loss", X, y, (Xt.shape[0], self._d), Xt, yt)

    def self_influence(self, X: Any = None, y: Any = None) -> Any:
        return self._rows("self_influence", X, y, ())

    def loo_newton(self, Xt: NDArray[Any], yt: NDArray[Any], idx: NDArray[np.int64]) -> Any:
        """Newton-step leave-one-out for the training points ``idx``: each chunk of the selected rows builds its
        block engine over those rows (the whole set's H, n and Σ∇L), so it answers for any selection."""
        self._check_test(Xt, yt)
        if idx.size == self._n and np.array_equal(idx, np.arange(self._n)):
            X, y = self._X, self._y
        else:
            X, y = self._X[idx], self._y[idx]
        return self._rows("loo_newton", X, y, (Xt.shape[0],), Xt, yt)

    def _check_test(self, Xt: NDArray[Any], yt: NDArray[Any]) -> None:
        """Test points are checked here, once, by the client engine (labels, finiteness, overflow of s_test),
        so that a bad test point fails before any chunk runs."""
        self._client.up_params(Xt, yt)

    def top_k(self, Xt: NDArray[Any], yt: NDArray[Any], k: int) -> Tuple[NDArray[Any], ...]:
        """Per chunk its top-k (global indices), merged here: (helpful_idx, helpful_val, harmful_idx,
        harmful_val), each (m, k); ordered as the core orders them ((value, index) lexicographically)."""
        self._check_test(Xt, yt)
        m = Xt.shape[0]
        payload = self._payload("X_train", X_test=Xt, y_test=yt, k=int(k))
        parts = _map_rows(
            _top_k_chunk, self._X, self._y, payload, ("rows1", m, 4 * k), np.float64, self._retries
        )
        return self._merge_top_k(parts, m, k)

    def top_k_of_scores(self, scores: Any, k: int) -> Tuple[NDArray[Any], ...]:
        """:meth:`top_k` of precomputed lazy scores (n, m) chunked like the training rows (LinearInfluence's
        normalised ``top_k``): per chunk its top-k, merged here; same layout and ordering as :meth:`top_k`."""
        da = require_dask("Dask training data")
        scores = scores.rechunk({1: -1})  # every chunk holds whole rows of scores (all m test points)
        m, nb = int(scores.shape[1]), scores.numblocks[0]
        with _annotated(self._retries):
            parts = da.map_blocks(
                _top_k_scores_chunk,
                scores,
                k=int(k),
                chunks=((1,) * nb, (m,), (4 * k,)),
                new_axis=[2],
                dtype=np.float64,
                meta=np.empty((0, 0, 0), dtype=np.float64),
            )
        return self._merge_top_k(parts, m, k)

    def _merge_top_k(self, parts: Any, m: int, k: int) -> Tuple[NDArray[Any], ...]:
        """The per-chunk candidates ``parts`` (chunks, m, 4k), computed and merged into the global top-k."""
        (blocks,) = self.compute(parts)
        blocks = np.asarray(blocks)  # (chunks, m, 4k)
        cand = np.moveaxis(blocks.reshape(blocks.shape[0], m, 4, k), 0, 1)  # (m, chunks, 4, k)
        hi = cand[:, :, 0, :].reshape(m, -1)
        hv = cand[:, :, 1, :].reshape(m, -1)
        ri = cand[:, :, 2, :].reshape(m, -1)
        rv = cand[:, :, 3, :].reshape(m, -1)
        if not (np.isfinite(hv[hi >= 0]).all() and np.isfinite(rv[ri >= 0]).all()):
            raise NonFiniteError(
                "the influence scores ranked by top_k overflowed to inf or NaN",
                what="the influence scores ranked by top_k",
            )
        # helpful: increasing value, ties by increasing index; harmful: decreasing value, same ties. Padding
        # (index −1, value NaN) sorts last: NaN goes after every number in np.lexsort.
        out_hi, out_hv, _, _ = rank_top_k(hi, hv, k)
        _, _, out_ri, out_rv = rank_top_k(ri, rv, k)
        if (out_hi < 0).any() or (out_ri < 0).any():  # k ≤ n is checked by LinearInfluence
            raise RuntimeError("top_k: fewer candidates than k came back from the chunks")
        return (
            out_hi.astype(np.int64),
            out_hv.astype(self._dt),
            out_ri.astype(np.int64),
            out_rv.astype(self._dt),
        )

    def loo_newton_group(self, Xt: NDArray[Any], yt: NDArray[Any], idx: NDArray[np.int64]) -> NDArray[Any]:
        """One Newton step from θ̂ on the objective without the group ``idx`` (mean over the n − g kept points),
        on the client: only the g rows of the group are brought there. With H_data = H − l2P,
        ∇²R₋ = (n·H_data − g·H_data(group))/(n − g) + l2P and ∇R₋(θ̂) = (Σ∇L − Σ_group ∇L)/(n − g) + l2Pθ̂
        (engine.cpp's leave_out_hessian and the weighted objective); the test-loss change at θ̂ − (∇²R₋+λI)⁻¹∇R₋."""
        dt = self._dt
        Xg, yg = self.compute(self._X[idx], self._y[idx])
        Xg, yg = np.ascontiguousarray(Xg, dtype=dt), np.ascontiguousarray(yg, dtype=dt)
        n, g = self._n, int(idx.size)
        K, de = self._theta.shape
        d = self._d
        pen = _penalty(self._args, d).ravel().astype(dt)
        H_data = self._H.copy()
        H_data[np.diag_indices_from(H_data)] -= pen
        Hg = np.asarray(_core.hessian(_spec(self._args, l2=0.0), Xg, yg, self._theta))
        M = (dt.type(n) * H_data - dt.type(g) * Hg) / dt.type(n - g)
        M[np.diag_indices_from(M)] += pen + dt.type(self._damping)
        if self._damping == 0.0:
            _gauge_hessian(self._args, M, K, de)
        try:
            factor = _core.CholeskyFactor(np.ascontiguousarray(M), 0.0)
        except NotPositiveDefiniteError as exc:
            raise NotPositiveDefiniteError(
                f"the leave-group-out Hessian (without {g} training points) is not positive definite ({exc}). "
                f"Influence needs H + damping*I to be positive definite: pass damping > 0 or increase l2.",
                pivot=exc.pivot,
                size=exc.size,
                min_pivot=exc.min_pivot,
                suggested_damping=exc.suggested_damping,
            ) from None
        spec = self._spec
        _, R, _ = _core.per_example(spec, Xg, yg, self._theta)
        Gg = np.zeros((K, de), dtype=dt)
        Gg[:, :d] = R.T @ Xg
        if de > d:
            Gg[:, d] = R.sum(axis=0)
        grad = (self._grad_sum - Gg) / dt.type(n - g) + pen.reshape(K, de) * self._theta
        step = np.asarray(factor.solve(np.ascontiguousarray(grad.ravel())))
        W1 = np.ascontiguousarray(self._theta - step.reshape(K, de))
        l0 = np.asarray(_core.per_example(spec, Xt, yt, self._theta)[0])
        l1 = np.asarray(_core.per_example(spec, Xt, yt, W1)[0])
        with np.errstate(over="ignore", invalid="ignore"):
            out = l1 - l0
        if not np.isfinite(out).all():
            raise NonFiniteError(
                "the Newton-step leave-group-out loss change overflowed to inf or NaN",
                what="the Newton-step leave-group-out loss change",
            )
        return out

    def refit_without(self, idx: Any, tol: float = 1e-10, max_iter: int = 100) -> Any:
        raise NotImplementedError(
            "retrain_loo is not available for Dask training data: each refit is a full Newton fit over every "
            "row. Use loo_change(method='newton') (one exact Newton step, chunk-wise), or compute X_train and "
            "y_train into memory and use LinearInfluence on numpy arrays."
        )

    def decode(self, model: Any, y: Any) -> Any:
        """Encoded labels back to the model's label values, chunk-wise (a lazy dask array)."""
        classes = model.__dict__.get("classes_")
        dtype = np.dtype(np.float64) if classes is None else np.asarray(classes).dtype
        return y.map_blocks(_decode_chunk, model=model, dtype=dtype, meta=np.empty(0, dtype=dtype))


# ------------------------------------------------------------------------------------------------
# readers whose loading errors name the file
# ------------------------------------------------------------------------------------------------
def _files(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]], pattern: str, name: str
) -> List[str]:
    """A sorted list of files: a directory (its files matching ``pattern``), a glob pattern, or a list."""
    if isinstance(paths, (str, os.PathLike)):
        p = os.fspath(paths)
        if os.path.isdir(p):
            files = sorted(glob.glob(os.path.join(p, pattern)))
        elif any(c in p for c in "*?["):
            files = sorted(glob.glob(p))
        else:
            files = [p]
    else:
        files = [os.fspath(f) for f in paths]
    if not files:
        raise FileNotFoundError(f"{name}: no files match {paths!r}")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{name}: {f} is not a file")
    return files


def _load_npy(path: str, shape: Tuple[int, ...], dtype: str) -> NDArray[Any]:
    def run() -> NDArray[Any]:
        a = np.load(path, allow_pickle=False)
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise ValueError(f"it now holds shape {a.shape}, dtype {a.dtype}; expected {shape}, {dtype}")
        return a

    return _run_file(path, run)


def _run_file(path: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:
        raise _with_context(exc, f"reading {path}") from exc


def read_npy(paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]) -> Any:
    """A dask array of ``.npy`` files stacked along the first axis, one chunk per file, read lazily on the
    workers. ``paths``: a directory (its ``*.npy``, sorted), a glob pattern or a list. Shapes and dtypes
    come from the file headers (read here, not the data); every file must have the same trailing shape and
    dtype. A file that fails to load raises its error with the file named."""
    da = require_dask("read_npy")
    import dask

    files = _files(paths, "*.npy", "read_npy")
    blocks = []
    tail: Optional[Tuple[int, ...]] = None
    dtype: Optional[np.dtype] = None
    for f in files:
        try:
            header = np.load(f, mmap_mode="r", allow_pickle=False)  # maps the file: reads its header only
            shape, dt = tuple(header.shape), header.dtype
            del header
        except Exception as exc:
            raise _with_context(exc, f"reading the header of {f}") from exc
        if len(shape) == 0:
            raise ValueError(f"read_npy: {f} holds a scalar; expected an array of rows")
        if tail is None:
            tail, dtype = tuple(shape[1:]), np.dtype(dt)
        elif tuple(shape[1:]) != tail or np.dtype(dt) != dtype:
            raise ValueError(
                f"read_npy: {f} has shape {shape} and dtype {dt}, but {files[0]} has rows of shape {tail} and "
                f"dtype {dtype}; every file must match"
            )
        load = dask.delayed(_load_npy, pure=True)(f, tuple(shape), np.dtype(dt).str)
        blocks.append(da.from_delayed(load, shape=tuple(shape), dtype=dt))
    return da.concatenate(blocks, axis=0)


def _load_parquet(path: str, columns: List[str], label: Optional[str], dtype: str) -> Tuple[Any, Any]:
    def run() -> Tuple[Any, Any]:
        import pyarrow.parquet as pq

        wanted = columns + ([label] if label is not None else [])
        table = pq.read_table(path, columns=wanted)
        X = np.column_stack([table.column(c).to_numpy(zero_copy_only=False) for c in columns]).astype(dtype)
        y = None if label is None else table.column(label).to_numpy(zero_copy_only=False)
        return np.ascontiguousarray(X), y

    return _run_file(path, run)


def read_parquet(
    paths: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    label: Optional[str] = None,
    columns: Optional[Sequence[str]] = None,
    dtype: Any = np.float64,
) -> Any:
    """Parquet files as a dask feature matrix (and label vector), one chunk per file, read lazily on the
    workers (needs pyarrow). ``paths``: a directory (its ``*.parquet``, sorted), a glob pattern or a list.
    ``label``: the label column (then ``(X, y)`` is returned, else ``X``); ``columns``: the feature columns
    (default: every column but the label, in the file's order). Row counts and the schema come from the files'
    footers (read here); a file that fails to load raises its error with the file named."""
    da = require_dask("read_parquet")
    import dask

    try:
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            f"read_parquet needs pyarrow, which is not installed: {DASK_EXTRA}", name="pyarrow"
        ) from exc
    files = _files(paths, "*.parquet", "read_parquet")
    try:
        schema = pq.read_schema(files[0])
    except Exception as exc:
        raise _with_context(exc, f"reading the schema of {files[0]}") from exc
    names = list(schema.names)
    if label is not None and label not in names:
        raise ValueError(f"read_parquet: label column {label!r} is not in {files[0]} (columns: {names})")
    cols = [c for c in names if c != label] if columns is None else [str(c) for c in columns]
    missing = [c for c in cols if c not in names]
    if missing or not cols:
        raise ValueError(
            f"read_parquet: feature columns {missing or cols} not in {files[0]} (columns: {names})"
        )
    y_dtype = None
    if label is not None:
        try:
            y_dtype = np.dtype(schema.field(label).type.to_pandas_dtype())
        except (NotImplementedError, TypeError):
            y_dtype = np.dtype(object)
    dt = np.dtype(dtype)
    xs, ys = [], []
    for f in files:
        try:
            rows = int(pq.read_metadata(f).num_rows)
        except Exception as exc:
            raise _with_context(exc, f"reading the footer of {f}") from exc
        part = dask.delayed(_load_parquet, pure=True, nout=2)(f, cols, label, dt.str)
        xs.append(da.from_delayed(part[0], shape=(rows, len(cols)), dtype=dt))
        if label is not None:
            ys.append(da.from_delayed(part[1], shape=(rows,), dtype=y_dtype))
    X = da.concatenate(xs, axis=0)
    return (X, da.concatenate(ys, axis=0)) if label is not None else X
