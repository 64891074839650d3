"""Exact influence functions for linear models (C++/Eigen core): :class:`LinearInfluence`.

It implements the one interface, :class:`pyinfluence.interface.Influence`, whose docstrings state the
quantities, their signs (exactly as in Koh & Liang 2017), the 1/n of ``loo_change`` and the shapes.
What is particular to this path:

- R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖Pθ‖² with P the model's penalty mask (the intercept is not
  penalised unless ``penalize_intercept=True``); θ is the model's ``theta_`` (K, d_eff) flattened
  row-major to p = K·d_eff entries (the intercept, if any, is the last column).
- Results are numpy arrays; every quantity is exact (one Cholesky factorisation of H + λI).
- ``loo_change(method="newton")`` and ``retrain_loo`` / ``refit`` (exact Newton refits) are available.
- ``X_train`` may be a ``dask.array`` chunked by rows: every pass over the training rows then runs chunk-wise
  on the Dask workers (:mod:`pyinfluence.linear.dask`) and results of training size are lazy dask arrays.
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import TYPE_CHECKING, Any, Optional, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

import pyinfluence._core as _core
from pyinfluence._validation import (
    INT32_MAX,
    as_float_matrix,
    as_index_array,
    check_bool,
    check_damping,
    check_int,
    check_nonnegative_float,
    overflow_message,
    resolve_dtype,
)
from pyinfluence.errors import ConvergenceError, NonFiniteError, NotAtOptimumWarning, NotPositiveDefiniteError
from pyinfluence.interface import Influence, TopK, check_normalize
from pyinfluence.linear import cuda as _cuda
from pyinfluence.linear import dask as _dask
from pyinfluence.linear.models import OPTIMUM_GRAD_TOL, _LinearModel

if TYPE_CHECKING:
    from pyinfluence.linear.diagnostics import RegressionDiagnostics

__all__ = ["LinearInfluence", "TopK"]

IndexLike = Union[int, ArrayLike, None]

# Byte budget for one block of training rows in the normalised top_k (its (B, m) scores or (B, p) up_params).
_BLOCK_BYTES = 64 << 20


class LinearInfluence(Influence[np.ndarray]):
    """Exact influence functions of a fitted pyinfluence linear model on its training set.

    ``LinearInfluence(model, X_train, y_train, damping=0.0, dtype=None)``

    - ``model``: a fitted :class:`~pyinfluence.LogisticRegression`,
      :class:`~pyinfluence.SmoothHingeSVM` or :class:`~pyinfluence.RidgeRegression` (use
      :func:`~pyinfluence.from_sklearn` for scikit-learn estimators). Its ``theta_`` is θ̂.
    - ``X_train`` (n, d), ``y_train`` (n,): the data the model was fitted on (numpy arrays or
      CPU torch tensors; labels in the model's original label values). A C-contiguous
      float32/float64 ``X_train`` is used in place, not copied: do not modify it afterwards.
    - ``damping`` λ ≥ 0: every solve uses H + λI.
    - ``dtype``: float32 or float64 for the computation; default: ``X_train``'s dtype if it is
      float32/float64, else float64.
    - ``device``: None or ``"cpu"`` (the C++ core on the CPU), ``"cuda"``/``"cuda:N"`` (its CUDA kernels
      for the Hessian, ``up_loss`` and ``top_k``; needs a build with ``PYINFLUENCE_CUDA=1``, a CUDA torch and
      a GPU, else a RuntimeError says which is missing). Default: the CPU, or the GPU that holds ``X_train``
      if it is a CUDA tensor. Inputs may be CUDA tensors; results are numpy arrays either way.
    - ``retries``: with Dask training data, reruns of a Dask task that raises (see below); ignored otherwise.

    **Dask training data.** ``X_train`` may be a ``dask.array`` (n, d) chunked by rows (whole rows per chunk,
    known chunk sizes), e.g. from :func:`pyinfluence.linear.dask.read_parquet` / ``read_npy`` or generated on
    the workers; ``y_train`` a dask or numpy vector of n labels. The client never holds the training matrix:
    H is a tree-reduced sum of per-chunk p × p partial sums (one pass over the rows, skipped when the model was
    fitted on the same dask arrays: the fit's last pass is reused), H + λI is factorised once on the client,
    and every training-side query runs chunk-wise on the workers with the C++ core. ``up_loss``,
    ``loo_change`` (both methods), ``pert_loss``, ``self_influence``, ``up_params`` and ``gradients`` return
    lazy dask arrays chunked like the training rows (or like the selected rows when ``train_idx`` is given;
    call ``.compute()``, or reduce them further with Dask); ``top_k`` (per-chunk top-k merged on the client,
    global training indices), ``loo_change(..., group=True)`` and every test-side result (``s_test``,
    ``test_gradients``, ``loss``, ``predict``, ``hessian``) are numpy arrays. Same shapes, signs and names
    as with numpy input. ``retrain_loo`` and ``refit`` (full refits over every row) raise
    NotImplementedError; ``training_data`` returns the dask arrays. Memory per worker: about one chunk of
    X_train plus the chunk's result (n_c × m scores; n_c × m × d for ``pert_loss``) and a few p × p matrices.
    Faults: the tasks of a worker that dies are rerun by Dask; ``retries`` reruns tasks that raise (passed
    to every computation made here and attached to the lazy results as a Dask annotation).

    H + λI is assembled and Cholesky-factorised once, here; raises
    :class:`~pyinfluence.errors.NotPositiveDefiniteError` (a ValueError) if it is not positive
    definite (pass ``damping > 0``). Issues :class:`~pyinfluence.errors.NotAtOptimumWarning` if
    ‖∇R(θ̂)‖ on (X_train, y_train) is not tiny (the model was fitted elsewhere, or loosely).

    No method returns or ranks inf or NaN: a result that overflows from finite inputs (features of very
    large magnitude, or float32 beyond its range) raises :class:`~pyinfluence.errors.NonFiniteError`
    naming the input with the largest magnitude (here already if H overflows). The object is read-only
    after construction and safe to share between threads.

    The methods are those of :class:`~pyinfluence.interface.Influence`, which documents the signs (as
    in Koh & Liang), the 1/n convention and the shapes. Test inputs ``X_test`` are (m, d) with labels
    ``y_test`` (m,) in the model's label values, a single point as a 1-D ``x`` (d,) with a scalar
    ``y`` (then m = 1; the m axis is kept in the output), or an ``(X, y)`` tuple as ``X_test`` with
    ``y_test`` omitted. ``train_idx`` selects k training points: None (all n), an int, an array of
    ints (negative count from the end) or a boolean mask of length n.
    """

    def __init__(
        self,
        model: _LinearModel,
        X_train: ArrayLike,
        y_train: ArrayLike,
        damping: float = 0.0,
        dtype: Optional[DTypeLike] = None,
        device: Any = None,
        retries: int = 0,
    ) -> None:
        if not isinstance(model, _LinearModel):
            mod = type(model).__module__ or ""
            hint = (
                " Convert it with pyinfluence.from_sklearn(estimator, X_train, y_train)."
                if mod.startswith("sklearn.")
                else ""
            )
            raise TypeError(
                f"model must be a pyinfluence LogisticRegression, SmoothHingeSVM or "
                f"RidgeRegression, got {mod}.{type(model).__name__}.{hint}"
            )
        model._check_fitted()
        self._damping = check_damping(damping)
        self._retries = check_int("retries", retries, 0, 1000)
        self._dask = _dask.is_dask_array(X_train) or _dask.is_dask_array(y_train)
        if self._dask:
            self._init_dask(model, X_train, y_train, dtype, device)
            return
        self._device = _cuda.resolve_device(device, X_train)  # None: the CPU engine
        if self._device is not None:
            X_train, y_train = _cuda.to_host(X_train), _cuda.to_host(y_train)
        X = as_float_matrix(
            "X_train",
            X_train,
            None if dtype is None else resolve_dtype(dtype),
            n_features=model.n_features_in_,
        )
        dt = X.dtype
        n = X.shape[0]
        y = model._encode("y_train", y_train, dt, n=n)
        self._model = model
        self._X = X
        self._y = y
        self._n = n
        self._d = X.shape[1]
        self._dtype = dt
        self._theta = np.ascontiguousarray(model.theta_, dtype=dt)
        self._spec = model._spec(dt)
        self._engine: Union[_core.LinearEngine, _cuda.CudaLinearEngine, _dask.DaskLinearEngine]
        try:
            if self._device is None:
                self._engine = _core.LinearEngine(self._spec, X, y, self._theta, self._damping)
            else:
                self._engine = _cuda.CudaLinearEngine(
                    self._spec, X, y, self._theta, self._damping, self._device
                )
        except NotPositiveDefiniteError as exc:
            raise self._npd_error(exc) from None
        except NonFiniteError as exc:  # H or the residuals overflowed: scale X_train, damping would not help
            raise self._overflow_error(exc.what or str(exc), train=X) from None
        self._check_optimum(stacklevel=3)

    def _check_optimum(self, stacklevel: int) -> None:
        """``grad_norm_`` = ‖∇R(θ̂)‖ from the engine; NotAtOptimumWarning if it is not tiny."""
        self.grad_norm_ = float(self._engine.grad_norm)  # ‖∇R(θ̂)‖, from the engine's cached residuals
        limit = OPTIMUM_GRAD_TOL if self._dtype == np.float64 else 1e-3
        if not np.isfinite(self.grad_norm_) or self.grad_norm_ > limit:
            hint = ""
            if getattr(getattr(self, "_model", None), "transformer_", None) is not None:
                hint = (
                    " The model was converted from a scikit-learn Pipeline: pass the transformed rows "
                    "model.transform(X_train) (and model.transform(X_test)), not the raw ones."
                )
            warnings.warn(
                f"the model's parameters are not at the optimum of the training objective on "
                f"X_train, y_train (‖∇R(θ̂)‖ = {self.grad_norm_:.3g} > {limit:g}); influence "
                f"functions assume ∇R(θ̂) = 0, so their values are approximate. Was the model "
                f"fitted on this exact training set (same order, no sample weights)?{hint}",
                NotAtOptimumWarning,
                stacklevel=stacklevel,
            )

    def _init_dask(self, model: _LinearModel, X_train: Any, y_train: Any, dtype: Any, device: Any) -> None:
        """The Dask engine (see the class docstring): validation, labels, H and its factorisation."""
        if not _dask.is_dask_array(X_train):
            raise TypeError(
                "y_train is a dask array but X_train is not: pass X_train as a dask array chunked by rows "
                "(or both in memory)"
            )
        if device is not None and str(device) != "cpu":
            raise ValueError(
                f"device={device!r}: Dask training data is processed on the Dask workers' CPUs; pass device=None"
            )
        _dask.require_dask("LinearInfluence on a dask array")
        self._device = None
        X = _dask.training_matrix(
            "X_train",
            X_train,
            None if dtype is None else resolve_dtype(dtype),
            n_features=model.n_features_in_,
        )
        dt = np.dtype(X.dtype)
        y = _dask.encode_labels(model, "y_train", y_train, X, dt)
        self._model = model
        self._X = X
        self._y = y
        self._n = int(X.shape[0])
        self._d = int(X.shape[1])
        self._dtype = dt
        self._theta = np.ascontiguousarray(model.theta_, dtype=dt)
        self._spec = model._spec(dt)
        args = _dask.spec_args(self._spec)
        sums = _dask.fitted_sums(model, _dask.data_key(X_train, y_train), args, model.theta_)
        try:
            self._engine = _dask.DaskLinearEngine(
                self._spec, X, y, self._theta, self._damping, retries=self._retries, sums=sums
            )
        except NotPositiveDefiniteError as exc:
            raise self._npd_error(exc) from None
        except NonFiniteError as exc:
            raise self._overflow_error(exc.what or str(exc), train=X) from None
        self._check_optimum(stacklevel=4)

    def _npd_error(self, exc: NotPositiveDefiniteError) -> NotPositiveDefiniteError:
        """The engine's NotPositiveDefiniteError in LinearInfluence's words, with the engine's fields."""
        m = self._model
        extra = ""
        if float(m.l2) == 0.0:
            extra = (
                " The model has l2=0, so collinear, duplicated or constant features"
                + (" (or the multinomial softmax's shift invariance)" if m.n_outputs_ > 1 else "")
                + " make H singular."
            )
        reason = "Cholesky factorisation failed"
        if exc.pivot is not None:
            reason += f" at pivot {exc.pivot}"
        if exc.min_pivot is not None:
            reason += f", whose value is {exc.min_pivot:.3g}"
        example = 1e-3
        hint = ""
        if exc.suggested_damping is not None:
            example = max(example, exc.suggested_damping)
            hint = f"; damping >= {exc.suggested_damping:.2g} makes the failing pivot positive"
        return NotPositiveDefiniteError(
            f"the Hessian H + λI ({self.n_params} x {self.n_params}, "
            f"damping λ = {self._damping:g}) "
            f"is not positive definite ({reason}).{extra} Pass damping=λ > 0 to LinearInfluence "
            f"(e.g. damping={example:.2g}{hint}; influence values then approximate the undamped ones), or "
            f"fit the model with a larger l2.",
            pivot=exc.pivot,
            size=exc.size,
            min_pivot=exc.min_pivot,
            suggested_damping=exc.suggested_damping,
            train_index=exc.train_index,
        )

    def _overflow_message(
        self, what: str, test: Optional[np.ndarray] = None, train: Optional[np.ndarray] = None
    ) -> str:
        """What overflowed, which input is the likely cause (the largest in magnitude) and the cure."""
        return overflow_message(
            what, self._dtype.name, self._magnitudes(test, train), float(np.finfo(self._dtype).max)
        )

    @staticmethod
    def _magnitudes(test: Optional[np.ndarray], train: Optional[np.ndarray]) -> dict:
        """The largest |value| of each feature array involved, by name."""
        return {
            name: float(np.max(np.abs(a)))
            for name, a in (("X_test", test), ("X_train", train))
            if a is not None and a.size
        }

    def _overflow_error(
        self, what: str, test: Optional[np.ndarray] = None, train: Optional[np.ndarray] = None
    ) -> NonFiniteError:
        """NonFiniteError for ``what`` (e.g. "the influence scores up_loss") having overflowed: the message of
        :meth:`_overflow_message`, ``what`` and ``where`` (the input largest in magnitude) as fields."""
        sizes = self._magnitudes(test, train)
        where = max(sizes, key=sizes.__getitem__) if sizes else "X_train"
        return NonFiniteError(
            self._overflow_message(f"{what} overflowed to inf or NaN", test, train), what=what, where=where
        )

    def _query(
        self, method: str, *args: Any, test: Optional[np.ndarray] = None, train: Optional[np.ndarray] = None
    ) -> Any:
        """``self._engine.<method>(*args)``, naming the overflowing input if its result is not finite (the
        engine checks every result it returns; ``test`` / ``train`` are the feature arrays involved)."""
        try:
            return getattr(self._engine, method)(*args)
        except NonFiniteError as exc:
            raise self._overflow_error(exc.what or str(exc), test, train) from None

    # -- properties ------------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        """p = K·d_eff, the number of model parameters."""
        return int(self._theta.size)

    @property
    def n_train(self) -> int:
        """n, the number of training points."""
        return self._n

    @property
    def params(self) -> NDArray[np.floating]:
        """θ̂ flattened row-major, shape (p,) (a copy)."""
        return self._theta.ravel().copy()

    @property
    def damping(self) -> float:
        """λ, added to the Hessian diagonal in every solve."""
        return self._damping

    @property
    def dtype(self) -> np.dtype:
        """The floating-point type of the computation."""
        return self._dtype

    @property
    def device(self) -> str:
        """Where the engine runs: ``"cpu"``, ``"cuda:N"`` or ``"dask"`` (the Dask workers' CPUs)."""
        if self._dask:
            return "dask"
        return "cpu" if self._device is None else str(self._device)

    @property
    def retries(self) -> int:
        """Reruns of a Dask task that raises (Dask training data only)."""
        return self._retries

    @property
    def model(self) -> _LinearModel:
        """The model whose influence is computed."""
        return self._model

    def __repr__(self) -> str:
        return (
            f"LinearInfluence({type(self._model).__name__}, n_train={self._n}, "
            f"n_params={self.n_params}, damping={self._damping:g}, dtype={self._dtype})"
        )

    # -- input helpers ---------------------------------------------------------------------------
    def _host(self, a: Any) -> Any:
        """``a`` with CUDA tensors copied to the host (the CUDA engine takes inputs on any device)."""
        return a if self._device is None else _cuda.to_host(a)

    @staticmethod
    def _pair(X: Any, y: Any) -> Tuple[Any, Any]:
        """``(X, y)``, unpacking an ``(inputs, targets)`` tuple given as ``X`` with ``y`` omitted."""
        if y is None and isinstance(X, tuple) and len(X) == 2:
            return X[0], X[1]
        return X, y

    def _test(self, X_test: Any, y_test: Any) -> Tuple[np.ndarray, np.ndarray]:
        X_test, y_test = self._pair(X_test, y_test)
        if self._device is not None:
            X_test, y_test = _cuda.to_host(X_test), _cuda.to_host(y_test)
        Xt = as_float_matrix("X_test", X_test, self._dtype, allow_1d=True, n_features=self._d)
        single = np.ndim(X_test) == 1
        yt = self._model._encode("y_test", y_test, self._dtype, allow_scalar=single)
        if yt.shape[0] != Xt.shape[0]:
            if single:
                raise ValueError(
                    f"X_test is a single point (1-D) but y_test has {yt.shape[0]} entries; "
                    f"pass one label (a scalar), or a 2-D X_test for several points"
                )
            raise ValueError(
                f"X_test has {Xt.shape[0]} samples but y_test has {yt.shape[0]}; they must match"
            )
        return Xt, yt

    def _idx(self, train_idx: IndexLike, **kw: Any) -> Optional[NDArray[np.int64]]:
        if train_idx is None:
            return None
        return as_index_array("train_idx", train_idx, self._n, **kw)

    def _subset(self, idx: Optional[np.ndarray]) -> Tuple[Any, Any]:
        if idx is None:
            return self._X, self._y
        if self._dask:  # lazy selection of rows: the rows stay on the workers
            return self._X[idx], self._y[idx]
        return np.take(self._X, idx, axis=0), np.take(self._y, idx)

    def _result(self, a: Any) -> Any:
        """An engine's result as this object returns it: a numpy array, or a lazy dask array (Dask data)."""
        return a if _dask.is_dask_array(a) else np.asarray(a)

    # -- core quantities ---------------------------------------------------------------------
    # The formulas, signs, 1/n convention and shapes are documented once, on the interface
    # (pyinfluence.interface.Influence); the docstrings here add what is particular to this path.
    def hessian(self, max_params: Optional[int] = None) -> NDArray[np.floating]:
        """H = ∇²R(θ̂) (damping NOT added), numpy (p, p); see :meth:`Influence.hessian`. No size limit
        unless ``max_params`` is given (H is assembled at construction anyway).

        For multinomial models with an unpenalised intercept this H is exactly singular along "shift every
        intercept by the same amount" (the softmax is invariant to it). The undamped solves behind every
        influence value add the gauge (γ/2)(Σ_k b_k)² to fix that direction; it is NOT included here, and it
        changes no prediction or influence value (every gradient is orthogonal to that direction).
        """
        if max_params is not None:
            max_params = check_int("max_params", max_params, 1)
            if self.n_params > max_params:
                raise ValueError(
                    f"the Hessian has p = {self.n_params} parameters, more than max_params={max_params}; "
                    f"raise max_params (or pass None)"
                )
        return np.asarray(self._engine.hessian())

    def gradients(self, train_idx: IndexLike = None) -> NDArray[np.floating]:
        """∇θL(z_i, θ̂) of training points, numpy (k, p); see :meth:`Influence.gradients`."""
        X, y = self._subset(self._idx(train_idx))
        if X.shape[0] == 0:
            return np.empty((0, self.n_params), dtype=self._dtype)
        return self._result(self._query("gradients", X, y, train=X))

    def test_gradients(self, X_test: ArrayLike, y_test: Any = None) -> NDArray[np.floating]:
        """∇θL(z_test, θ̂), numpy (m, p); see :meth:`Influence.test_gradients`."""
        Xt, yt = self._test(X_test, y_test)
        return np.asarray(self._query("gradients", Xt, yt, test=Xt))

    def s_test(self, X_test: ArrayLike, y_test: Any = None) -> NDArray[np.floating]:
        """(H+λI)⁻¹ ∇θL(z_test), numpy (p, m); see :meth:`Influence.s_test`. One solve with the
        factorisation made at construction (not cached: it costs m·p² like ``up_loss``)."""
        Xt, yt = self._test(X_test, y_test)
        # the engine's up_params is −(H+λI)⁻¹∇θL for whichever points it is given
        up = np.asarray(self._query("up_params", Xt, yt, test=Xt))
        return np.ascontiguousarray(-up.T)

    def loss(self, X_test: ArrayLike, y_test: Any = None) -> NDArray[np.float64]:
        """L(z_test, θ̂), numpy float64 (m,): the model's ``loss``; see :meth:`Influence.loss`."""
        X_test, y_test = self._pair(X_test, y_test)
        return np.asarray(self._model.loss(self._host(X_test), self._host(y_test)), dtype=np.float64)

    def predict(self, X_test: ArrayLike) -> np.ndarray:
        """The model's ``predict``: labels in the model's label values (classifiers) or values
        (regression), numpy (m,); see :meth:`Influence.predict`."""
        X = as_float_matrix("X_test", self._host(X_test), np.float64, allow_1d=True, n_features=self._d)
        return np.asarray(self._model.predict(X))

    def up_params(self, train_idx: IndexLike = None) -> NDArray[np.floating]:
        """I_up,params(z), numpy (k, p); see :meth:`Influence.up_params`."""
        X, y = self._subset(self._idx(train_idx))
        if X.shape[0] == 0:
            return np.empty((0, self.n_params), dtype=self._dtype)
        return self._result(self._query("up_params", X, y, train=X))

    def up_loss(
        self, X_test: ArrayLike, y_test: Any = None, train_idx: IndexLike = None
    ) -> NDArray[np.floating]:
        """I_up,loss(z, z_test), numpy (k, m); see :meth:`Influence.up_loss`."""
        Xt, yt = self._test(X_test, y_test)
        idx = self._idx(train_idx)
        if idx is None:
            return self._result(self._query("up_loss", Xt, yt, None, None, test=Xt, train=self._X))
        if idx.size == 0:
            return np.empty((0, Xt.shape[0]), dtype=self._dtype)
        X, y = self._subset(idx)
        return self._result(self._query("up_loss", Xt, yt, X, y, test=Xt, train=X))

    def pert_loss(
        self, X_test: ArrayLike, y_test: Any = None, train_idx: IndexLike = None
    ) -> NDArray[np.floating]:
        """I_pert,loss(z, z_test), numpy (k, m, d) (d features); see :meth:`Influence.pert_loss`."""
        Xt, yt = self._test(X_test, y_test)
        idx = self._idx(train_idx)
        if idx is None:
            return self._result(self._query("pert_loss", Xt, yt, None, None, test=Xt, train=self._X))
        if idx.size == 0:
            return np.empty((0, Xt.shape[0], self._d), dtype=self._dtype)
        X, y = self._subset(idx)
        return self._result(self._query("pert_loss", Xt, yt, X, y, test=Xt, train=X))

    def diagnostics(self) -> RegressionDiagnostics:
        """Leverage, Cook's distance, DFBETA/DFBETAS and DFFITS of every training point (statsmodels'
        definitions; unpenalised models only: l2 = 0 and damping = 0); see
        :func:`pyinfluence.linear.diagnostics.regression_diagnostics`."""
        from pyinfluence.linear.diagnostics import regression_diagnostics

        return regression_diagnostics(self)

    def self_influence(self, train_idx: IndexLike = None) -> NDArray[np.floating]:
        """I_up,loss(z, z) ≤ 0, numpy (k,); see :meth:`Influence.self_influence`."""
        idx = self._idx(train_idx)
        if idx is None:
            return self._result(self._query("self_influence", None, None, train=self._X))
        if idx.size == 0:
            return np.empty((0,), dtype=self._dtype)
        X, y = self._subset(idx)
        return self._result(self._query("self_influence", X, y, train=X))

    def loo_change(
        self,
        X_test: ArrayLike,
        y_test: Any = None,
        train_idx: IndexLike = None,
        method: str = "influence",
        group: bool = False,
    ) -> NDArray[np.floating]:
        """Predicted L(z_test, θ̂₋) − L(z_test, θ̂), numpy (k, m) or (m,); see :meth:`Influence.loo_change`.

        ``method="newton"``: one exact Newton step from θ̂ on the leave-out objective
        R₋(θ) = (1/(n−g)) Σ_{j kept} L_j + (l2/2)‖Pθ‖² (Hessian + λI), the test loss evaluated exactly
        at the new θ. The first-order estimate (``"influence"``, −(1/n)·up_loss) ignores the removed
        point's own curvature and the relative strengthening of the l2 term (of order l2/n); on digits
        it under-predicts the largest effects about twofold, while the Newton step tracks retraining
        closely (see examples/loo_validation.py).
        """
        if method not in ("influence", "newton"):
            raise ValueError(f"method must be 'influence' or 'newton', got {method!r}")
        group = check_bool("group", group)
        idx: Optional[NDArray[np.int64]]
        if group:
            if train_idx is None:
                raise ValueError("train_idx is required with group=True (the points removed together)")
            idx = as_index_array("train_idx", train_idx, self._n, unique=True, allow_empty=False)
            if idx.size >= self._n:
                raise ValueError(f"train_idx removes all {self._n} training points; at least one must remain")
        else:
            idx = self._idx(train_idx)
        if method == "influence":
            up = self.up_loss(X_test, y_test, idx)
            if self._dask:
                up = up * (-1.0 / self._n)  # lazy; the group's sum is test-sized: computed
                return np.asarray(self._dask_engine().compute(up.sum(axis=0))[0]) if group else up
            up *= -1.0 / self._n
            return up.sum(axis=0) if group else up
        Xt, yt = self._test(X_test, y_test)
        if idx is None:
            idx = np.arange(self._n, dtype=np.int64)
        if group:
            return np.asarray(self._query("loo_newton_group", Xt, yt, idx, test=Xt, train=self._X))
        if idx.size == 0:
            return np.empty((0, Xt.shape[0]), dtype=self._dtype)
        if self._n < 2:
            raise ValueError("leave-one-out needs at least 2 training points")
        return self._result(self._query("loo_newton", Xt, yt, idx, test=Xt, train=self._X))

    def helpfulness(
        self, X_test: ArrayLike, y_test: Any = None, train_idx: IndexLike = None
    ) -> NDArray[np.floating]:
        """−I_up,loss(z, z_test), numpy (k, m) (a lazy dask array with Dask training data): positive =
        helpful, the convention of Captum, pyDVL, kronfluence, TRAK and dattri; exactly
        ``-up_loss(X_test, y_test, train_idx)``. See :meth:`Influence.helpfulness`."""
        return -self.up_loss(X_test, y_test, train_idx)

    def top_k(
        self, X_test: ArrayLike, y_test: Any = None, k: int = 10, normalize: Optional[str] = None
    ) -> TopK[np.ndarray]:
        """:class:`~pyinfluence.TopK` of four numpy (m, k) arrays (int64 indices); see
        :meth:`Influence.top_k`. Raw scores stream over the training set in the core (never the n × m
        scores). ``normalize`` ("theta", "loss", "cosine"): exact, from the same Cholesky factor —
        "loss"/"cosine" add :meth:`self_influence` over the training set (n·p²/2 flops), "theta" the norms of
        :meth:`up_params` rows (n·p²); the scores are then formed in blocks of training rows (memory
        ≤ 64 MiB per block; with Dask training data chunk-wise on the workers)."""
        k = check_int("k", k, 1, self._n, maximum_what="the number of training points")
        normalize = check_normalize(normalize)
        Xt, yt = self._test(X_test, y_test)
        if normalize is not None:
            return self._top_k_normalized(Xt, yt, k, normalize)
        hi, hv, ri, rv = self._query("top_k", Xt, yt, k, test=Xt, train=self._X)
        return TopK(
            np.asarray(hi, dtype=np.int64),
            np.asarray(hv),
            np.asarray(ri, dtype=np.int64),
            np.asarray(rv),
        )

    def _train_norms(self, normalize: str) -> Any:
        """Per training point, the normaliser of ``normalize``, (n,) (numpy, or lazy dask):
        "theta": ‖(H+λI)⁻¹∇L(z)‖ = ‖up_params(z)‖; "loss"/"cosine": √(∇L(z)ᵀ(H+λI)⁻¹∇L(z)) = √(−self_influence(z))."""
        if normalize == "theta":
            if self._dask:
                U = self._query("up_params", self._X, self._y, train=self._X)  # lazy (n, p), chunk-wise
                return (U * U).sum(axis=1) ** 0.5
            rows = max(1, _BLOCK_BYTES // (self._dtype.itemsize * max(1, self.n_params)))
            out = np.empty(self._n, dtype=self._dtype)
            for s in range(0, self._n, rows):
                X, y = self._X[s : s + rows], self._y[s : s + rows]  # views: whole rows are contiguous
                out[s : s + rows] = np.linalg.norm(
                    np.asarray(self._query("up_params", X, y, train=X)), axis=1
                )
            return out
        si = self._query("self_influence", None, None, train=self._X)  # −gᵀ(H+λI)⁻¹g ≤ 0 (−‖L⁻¹g‖²)
        if self._dask:
            return (-si).clip(0.0, None) ** 0.5
        return np.sqrt(np.maximum(-np.asarray(si), 0.0))

    def _top_k_normalized(self, Xt: np.ndarray, yt: np.ndarray, k: int, normalize: str) -> TopK[np.ndarray]:
        """top_k of up_loss / (per-training-point norm) [/ per-test-point norm for "cosine"]; 0 where a norm
        is 0 (a zero gradient: its up_loss is exactly 0 too)."""
        den = self._train_norms(normalize)
        tden: Optional[np.ndarray] = None
        if normalize == "cosine":
            # √(g_tᵀ(H+λI)⁻¹g_t) per test point: the engine's up_params of the test points is −(H+λI)⁻¹g_t
            G = np.asarray(self._query("gradients", Xt, yt, test=Xt))
            Z = np.asarray(self._query("up_params", Xt, yt, test=Xt))
            tden = np.sqrt(np.maximum(-np.einsum("ij,ij->i", G, Z), 0.0))
        if self._dask:
            scores = self._query("up_loss", Xt, yt, None, None, test=Xt, train=self._X)  # lazy (n, m)
            scores = _safe_divide(scores, den[:, None])
            if tden is not None:
                scores = _safe_divide(scores, tden[None, :])
            hi, hv, ri, rv = self._dask_engine().top_k_of_scores(scores, k)
            return TopK(hi, hv, ri, rv)
        m = Xt.shape[0]
        rows = max(k, _BLOCK_BYTES // (self._dtype.itemsize * max(1, m, self.n_params)))
        best: Optional[Tuple[np.ndarray, ...]] = None
        for s in range(0, self._n, rows):
            X, y = self._X[s : s + rows], self._y[s : s + rows]
            sc = _safe_divide(
                np.asarray(self._query("up_loss", Xt, yt, X, y, test=Xt, train=X)), den[s : s + rows, None]
            )
            if tden is not None:
                sc = _safe_divide(sc, tden[None, :])
            vals = np.ascontiguousarray(sc.T)  # (m, b)
            ids = np.broadcast_to(np.arange(s, s + vals.shape[1], dtype=np.int64), vals.shape)
            if best is None:
                best = _dask.rank_top_k(ids, vals, k)
                continue
            # the running top-k of the earlier blocks compete with this block's rows (each side separately)
            hi, hv, ri, rv = best
            hi, hv, _, _ = _dask.rank_top_k(np.concatenate([hi, ids], 1), np.concatenate([hv, vals], 1), k)
            _, _, ri, rv = _dask.rank_top_k(np.concatenate([ri, ids], 1), np.concatenate([rv, vals], 1), k)
            best = (hi, hv, ri, rv)
        assert best is not None
        hi, hv, ri, rv = best
        return TopK(hi.astype(np.int64), hv.astype(self._dtype), ri.astype(np.int64), rv.astype(self._dtype))

    # -- ground truth by retraining -------------------------------------------------------------
    @property
    def can_retrain(self) -> bool:
        """True: :meth:`retrain_loo` and :meth:`refit` refit the linear model exactly (Newton); False for Dask
        training data (a refit would be a full Newton fit over every row)."""
        return not self._dask

    def _dask_engine(self) -> _dask.DaskLinearEngine:
        assert isinstance(self._engine, _dask.DaskLinearEngine)
        return self._engine

    def _no_dask(self, method: str, instead: str) -> None:
        """NotImplementedError for ``method`` with Dask training data, saying what to do instead."""
        if self._dask:
            raise NotImplementedError(
                f"LinearInfluence.{method} is not available with Dask training data: it needs the whole training "
                f"set in one process (an exact refit over every row). {instead}"
            )

    def retrain_loo(
        self,
        X_test: ArrayLike,
        y_test: Any = None,
        train_idx: IndexLike = None,
        group: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 100,
        max_seconds: Optional[float] = None,
    ) -> NDArray[np.floating]:
        """Actual L(z_test, θ̂₋) − L(z_test, θ̂), numpy float64 (k, m) or (m,); see
        :meth:`Influence.retrain_loo` (``max_seconds`` is checked before each refit).

        θ̂₋ is the exact minimiser of R₋(θ) = (1/(n−g)) Σ_{j kept} L_j + (l2/2)‖Pθ‖² (no damping),
        found by Newton's method warm-started from θ̂, in float64 whatever the engine's dtype.
        Cost per refit (float64): g·p² + p³/3 to set up chord (simplified Newton) steps on the cached
        Hessian, then n·p per step, polished to rounding level; full Newton (n·p² + p³/3 per iteration) is the
        fallback. ``tol`` default: the model's tolerance.
        """
        self._no_dask(
            "retrain_loo",
            "Use loo_change(..., method='newton') (one exact Newton step, computed chunk-wise), or load the "
            "training data into memory (X_train.compute()) and use LinearInfluence on numpy arrays.",
        )
        group = check_bool("group", group)
        Xt, yt = self._test(X_test, y_test)
        if train_idx is None:
            raise ValueError("train_idx is required for retrain_loo (each entry costs a full refit)")
        idx = as_index_array("train_idx", train_idx, self._n, unique=group, allow_empty=not group)
        tol = self._model._tol() if tol is None else float(tol)
        max_iter = check_int("max_iter", max_iter, 1, INT32_MAX)
        limit = None if max_seconds is None else check_nonnegative_float("max_seconds", max_seconds)
        deadline = None if limit is None else time.perf_counter() + limit
        # Ground truth is computed in float64 whatever the engine's dtype.
        f64 = np.float64
        X = self._X if self._dtype == f64 else self._X.astype(f64)
        y = self._y if self._dtype == f64 else self._y.astype(f64)
        Xt = Xt if Xt.dtype == f64 else Xt.astype(f64)
        yt = yt if yt.dtype == f64 else yt.astype(f64)
        theta0 = np.ascontiguousarray(self._model.theta_, dtype=f64)
        spec = self._model._spec(f64)
        base = np.asarray(_core.per_example(spec, Xt, yt, theta0)[0])
        groups = [idx] if group else [idx[i : i + 1] for i in range(idx.size)]
        out = np.empty((len(groups), Xt.shape[0]), dtype=f64)
        for r, g in enumerate(groups):
            if g.size >= self._n:
                raise ValueError(f"train_idx removes all {self._n} training points; at least one must remain")
            removed = g.tolist()[:10]
            if deadline is not None and time.perf_counter() > deadline:
                raise ConvergenceError(
                    f"retrain_loo: the time limit (max_seconds={limit:g}) ran out before refitting without "
                    f"training point(s) {removed} ({r} of {len(groups)} refits done); raise max_seconds"
                )
            try:
                theta, n_iter, gnorm, converged = self._refit_without(g, spec, X, y, theta0, tol, max_iter)
            except NotPositiveDefiniteError as exc:
                raise ConvergenceError(
                    f"retrain_loo: refitting without training point(s) {removed} met a Hessian "
                    f"that is not positive definite; the leave-out objective has no unique "
                    f"minimiser (fit the model with l2 > 0)"
                ) from exc
            if not converged:
                raise ConvergenceError(
                    f"retrain_loo: refitting without training point(s) {removed} did not "
                    f"converge in {n_iter} Newton iterations (gradient norm {gnorm:.3g} > "
                    f"tol={tol:g}); pass a larger tol"
                )
            with np.errstate(over="ignore", invalid="ignore"):  # checked below, with a clear error
                out[r] = np.asarray(_core.per_example(spec, Xt, yt, theta)[0]) - base
        if not np.isfinite(out).all():
            raise self._overflow_error("retrain_loo's test-loss changes", Xt, X)
        return out[0] if group else out

    def _refit_without(self, g, spec, X, y, theta0, tol, max_iter):
        """θ̂ refit without the training points g (float64): (theta, n_iter, grad_norm, converged).

        A float64 engine refits in C++ with chord steps on its cached Hessian (g·p² + p³/3 to set up, then
        n·p per step, polished to rounding); a float32 engine's ground truth is a float64 Newton fit,
        polished by one extra Newton step (quadratic convergence takes it to rounding level).
        """
        if self._dtype == np.float64:
            return self._engine.refit_without(g, tol, max_iter)
        # Weights n/(n-g) on the kept points: the weighted mean is the mean over the kept points.
        w = np.full(self._n, self._n / (self._n - g.size), dtype=np.float64)
        w[g] = 0.0
        theta, n_iter, gnorm, converged = _core.fit_newton(spec, X, y, theta0, w, tol, max_iter)
        if converged:
            try:
                polished, _, gnorm2, _ = _core.fit_newton(spec, X, y, theta, w, 0.0, 1)
                if gnorm2 <= gnorm and np.all(np.isfinite(polished)):
                    theta, gnorm = polished, gnorm2
            except (ValueError, RuntimeError):
                pass
        return theta, n_iter, gnorm, converged

    # -- the training set and refits --------------------------------------------------------------
    def training_data(self) -> Tuple[Any, Any]:
        """A copy of ``(X_train, y_train)``: X (n, d) in the computation's dtype, y in the model's label
        values (classifiers) or float64 targets (regression); see :meth:`Influence.training_data`. With Dask
        training data: lazy dask arrays (nothing is computed)."""
        if self._dask:
            return self._X, self._dask_engine().decode(self._model, self._y)
        return self._X.copy(), _decode_labels(self._model, self._y)

    def refit(
        self, X_train: Optional[ArrayLike] = None, y_train: Optional[ArrayLike] = None
    ) -> LinearInfluence:
        """A LinearInfluence (same damping, dtype and device) of a copy of the model refitted exactly on the
        modified training data; see :meth:`Influence.refit`.

        The refit is Newton's method warm-started at θ̂ with the model's tolerance; the objective is
        strictly convex for l2 > 0, so the result is the optimum ``fit`` reaches from zero (to the fit
        tolerance), in fewer iterations. Labels must be among the model's classes. This object and its
        model are not changed. Raises :class:`~pyinfluence.errors.ConvergenceError` like ``fit``.
        Not available with Dask training data (NotImplementedError): fit a new estimator on the modified
        dask arrays (``fit`` runs chunk-wise) and build a new LinearInfluence.
        """
        self._no_dask(
            "refit",
            "Fit a new estimator on the modified dask arrays (fit runs chunk-wise) and build a new LinearInfluence.",
        )
        X0, y0 = self.training_data()
        X = as_float_matrix(
            "X_train", X0 if X_train is None else self._host(X_train), np.float64, n_features=self._d
        )
        y = y0 if y_train is None else self._host(y_train)
        if X.shape[0] != self._n and (X_train is None or y_train is None):
            raise ValueError(
                f"X_train has {X.shape[0]} rows but the training set has {self._n} points; pass both "
                f"X_train and y_train to refit on a training set of another size"
            )
        model = copy.copy(self._model)
        y_enc = model._encode("y_train", y, np.float64, n=X.shape[0])
        theta0 = np.array(self._model.theta_, dtype=np.float64, copy=True)
        theta, n_iter, grad_norm = model._newton(X, y_enc, theta0, theta0.shape[0], what="refit")
        model.theta_ = theta
        model.n_iter_ = n_iter
        model.grad_norm_ = grad_norm
        return LinearInfluence(
            model,
            X,
            y,
            damping=self._damping,
            dtype=self._dtype,
            device=None if self._device is None else self.device,
        )


def _decode_labels(model: _LinearModel, y_enc: np.ndarray) -> np.ndarray:
    """The model's original label values (classifiers) or float64 targets (regression) of encoded labels."""
    classes = getattr(model, "classes_", None)
    if classes is None:  # regression: the targets are the values
        return np.asarray(y_enc, dtype=np.float64).copy()
    y = np.asarray(y_enc, dtype=np.float64)
    idx = (y > 0).astype(np.intp) if model._family == "smooth_hinge" else np.rint(y).astype(np.intp)
    return np.asarray(classes)[idx]


def _safe_divide(num: Any, den: Any) -> Any:
    """num / den elementwise (numpy or dask, broadcasting), 0 where den is 0: a normaliser is 0 only for a zero
    gradient, whose up_loss is exactly 0 too (the ratio is bounded by Cauchy–Schwarz elsewhere)."""
    pos = (den > 0).astype(den.dtype)
    return num / (den + (1 - pos)) * pos
