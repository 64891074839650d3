"""Linear models trained to the exact optimum (Newton's method in the C++ core).

Influence functions assume ``∇R(θ̂) = 0``; these estimators minimise

    R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2) ‖P θ‖²

(``P`` masks the intercept unless ``penalize_intercept=True``) with Newton's method to a gradient
norm of ``tol`` (default 1e-10), starting from zero. Parameters are stored as ``theta_`` of shape
(K, d_eff): one row per output (K = 1 for binary classification and regression, K = n_classes
for multinomial), ``d_eff = d + 1`` with the intercept in the LAST column when
``fit_intercept=True`` (else ``d_eff = d``). The flat parameter vector used by
:class:`~pyinfluence.LinearInfluence` is ``theta_.ravel()`` (row-major), ``p = K * d_eff``.

``from_sklearn`` converts fitted scikit-learn ``LogisticRegression``, ``Ridge`` and
``LinearRegression`` estimators, translating their regularisation to ``l2``, and ``Pipeline``s ending in one
(the model then lives in the pipeline's transformed feature space: ``transformer_``, ``transform``).

``fit`` also takes a ``dask.array`` X chunked by rows (labels as a dask or numpy vector): the same Newton
iterations run with every sum over the rows computed chunk-wise on the Dask workers
(:mod:`pyinfluence.linear.dask`); the client holds only p × p matrices.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any, Dict, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from pyinfluence import _core
from pyinfluence._validation import (
    INT32_MAX,
    as_float_matrix,
    as_float_vector,
    as_label_array,
    check_bool,
    check_int,
    check_nonnegative_float,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError, NotAtOptimumWarning, NotFittedError, NotPositiveDefiniteError
from pyinfluence.linear import dask as _dask

__all__ = ["LogisticRegression", "SmoothHingeSVM", "RidgeRegression", "from_sklearn"]

_DEFAULT_TOL = 1e-10
# ‖∇R(θ)‖ above which parameters are reported as not being at the optimum.
OPTIMUM_GRAD_TOL = 1e-6


def _sigmoid(s: np.ndarray) -> np.ndarray:
    out = np.empty_like(s)
    pos = s >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-s[pos]))
    e = np.exp(s[~pos])
    out[~pos] = e / (1.0 + e)
    return out


def _softmax(S: np.ndarray) -> np.ndarray:
    S = S - S.max(axis=1, keepdims=True)
    np.exp(S, out=S)
    S /= S.sum(axis=1, keepdims=True)
    return S


class _LinearModel:
    """Shared machinery of the linear estimators (not public)."""

    _family: str = ""
    _is_classifier: bool = False
    sklearn_grad_norm_: float  # from_sklearn: ‖∇R‖ at scikit-learn's own solution (before refine)
    # from_sklearn(Pipeline): the fitted preceding steps (``pipeline[:-1]``) mapping raw rows to the
    # features this model was fitted on; None for a model that takes its features as they are.
    transformer_: Any = None

    # -- hyperparameters ---------------------------------------------------------------------
    def _check_params(self) -> None:
        check_nonnegative_float("l2", self.l2)
        check_bool("fit_intercept", self.fit_intercept)
        check_bool("penalize_intercept", self.penalize_intercept)
        if self.tol is not None:
            check_positive_float("tol", self.tol)
        check_int("max_iter", self.max_iter, 1, INT32_MAX)

    @property
    def _temperature(self) -> float:
        return 1.0

    def get_params(self, deep: bool = True) -> Dict[str, Any]:
        """Hyperparameters as a dict (scikit-learn convention)."""
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {k: getattr(self, k) for k in names}

    def set_params(self, **params: Any) -> _LinearModel:
        """Set hyperparameters (scikit-learn convention); returns ``self``."""
        valid = self.get_params()
        for k, v in params.items():
            if k not in valid:
                raise ValueError(f"invalid parameter {k!r} for {type(self).__name__}; valid: {sorted(valid)}")
            setattr(self, k, v)
        self._check_params()
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- fitted state --------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only called for missing attributes: fitted attributes (trailing "_") of an unfitted
        # model raise NotFittedError (an AttributeError, so hasattr() still answers False).
        if name.endswith("_") and not name.startswith("__") and "theta_" not in self.__dict__:
            self._check_fitted()
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _check_fitted(self) -> None:
        if "theta_" not in self.__dict__:
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) first "
                f"(or convert a fitted scikit-learn estimator with pyinfluence.from_sklearn)"
            )

    @property
    def n_outputs_(self) -> int:
        """K, the number of score rows (1 for binary classification and regression)."""
        self._check_fitted()
        return int(self.theta_.shape[0])

    @property
    def coef_(self) -> NDArray[np.float64]:
        """Weights without the intercept, shape (K, d)."""
        self._check_fitted()
        return self.theta_[:, : self.n_features_in_]

    @property
    def intercept_(self) -> NDArray[np.float64]:
        """Intercepts, shape (K,) (zeros when ``fit_intercept=False``)."""
        self._check_fitted()
        if self.fit_intercept:
            return self.theta_[:, -1].copy()
        return np.zeros(self.theta_.shape[0])

    def _spec(self, dtype: DTypeLike = np.float64, n_outputs: Optional[int] = None) -> _core.ModelSpec:
        """The ``_core.ModelSpec`` of this model (``dtype`` is accepted for symmetry; specs are
        dtype-independent)."""
        if n_outputs is None:
            n_outputs = self.n_outputs_
        return _core.ModelSpec(
            self._core_family(n_outputs),
            int(n_outputs),
            bool(self.fit_intercept),
            bool(self.penalize_intercept),
            float(self.l2),
            float(self._temperature),
        )

    def _core_family(self, n_outputs: int) -> str:
        return self._family

    # -- labels ----------------------------------------------------------------------------------
    def _encode_fit(self, y: Any, n: int) -> Tuple[NDArray[np.float64], int]:
        """Validate training labels, set ``classes_`` (classifiers); return (encoded y, K)."""
        raise NotImplementedError

    def _encode(
        self,
        name: str,
        y: Any,
        dtype: DTypeLike,
        n: Optional[int] = None,
        allow_scalar: bool = False,
    ) -> NDArray[np.floating]:
        """Validate labels/targets against the fitted model and encode them for the core."""
        raise NotImplementedError

    # -- fitting ---------------------------------------------------------------------------------
    def _tol(self) -> float:
        return _DEFAULT_TOL if self.tol is None else float(self.tol)

    def fit(self, X: ArrayLike, y: ArrayLike, *, retries: int = 0) -> _LinearModel:
        """Minimise R(θ) = (1/n) Σ L(z_i, θ) + (l2/2)‖Pθ‖² with Newton's method from θ = 0.

        ``X``: (n, d) numpy array or CPU torch tensor, or a ``dask.array`` chunked by rows (whole rows per
        chunk, known chunk sizes); ``y``: (n,) labels/targets (numpy, or dask for a dask ``X``).

        With a dask ``X`` every pass over the rows runs chunk-wise on the Dask workers (the current scheduler,
        e.g. an active ``distributed.Client``): per iteration the gradient and the Hessian are tree-reduced
        sums of per-chunk p × p partial sums, the Newton step is solved on the client and the line search is
        the core's, so the result agrees with the in-memory fit to rounding. Each trial point of the line
        search costs one pass over the rows (typically one per iteration, plus the classes of a dask ``y``).
        ``retries``: reruns of a Dask task that raises (dask input only; a task of a worker that dies is rerun
        by Dask anyway, see :mod:`pyinfluence.linear.dask`). Memory per worker: about one chunk plus p × p.

        Raises :class:`~pyinfluence.errors.ConvergenceError` when Newton does not reach ``tol``.
        Returns ``self``.
        """
        self._check_params()
        retries = check_int("retries", retries, 0, 1000)
        for attr in ("theta_", "classes_", "transformer_"):  # fit takes X's features as they are
            self.__dict__.pop(attr, None)
        cache = None
        y_enc: Any
        if _dask.is_dask_array(X) or _dask.is_dask_array(y):
            if not _dask.is_dask_array(X):
                raise TypeError(
                    "y is a dask array but X is not: pass X as a dask array chunked by rows (or both in memory)"
                )
            Xd = _dask.training_matrix("X", X, np.dtype(np.float64))
            n, d = int(Xd.shape[0]), int(Xd.shape[1])
            y_enc, K = _dask.encode_fit_labels(self, y, Xd, retries)
            cache = (self, _dask.data_key(X, y))
            X = Xd
        else:
            X = as_float_matrix("X", X, np.float64)
            n, d = X.shape
            y_enc, K = self._encode_fit(y, n)
        d_eff = d + 1 if self.fit_intercept else d
        theta0 = np.zeros((K, d_eff), dtype=np.float64)
        self.n_features_in_ = d
        theta, n_iter, grad_norm = self._newton(X, y_enc, theta0, K, what="fit", retries=retries, cache=cache)
        self.theta_ = theta
        self.n_iter_ = n_iter
        self.grad_norm_ = grad_norm
        return self

    def _newton(
        self,
        X: Any,
        y_enc: Any,
        theta0: np.ndarray,
        K: int,
        what: str,
        retries: int = 0,
        cache: Any = None,
    ) -> Tuple[NDArray[np.float64], int, float]:
        """Newton's method from ``theta0``: in the core for in-memory data, chunk-wise for dask data."""
        spec = self._spec(np.float64, n_outputs=K)
        tol = self._tol()
        dask_data = _dask.is_dask_array(X)
        theta: Any
        try:
            if dask_data:
                theta, n_iter, grad_norm, converged = _dask.fit_newton(
                    spec, X, y_enc, theta0, tol, int(self.max_iter), retries=retries, cache=cache
                )
            else:
                theta, n_iter, grad_norm, converged = _core.fit_newton(
                    spec, X, y_enc, theta0, None, tol, int(self.max_iter)
                )
        except NotPositiveDefiniteError as exc:
            # the cause (exc, chained) carries the failing pivot and the size of the Hessian
            raise ConvergenceError(
                f"{type(self).__name__}.{what}: Newton's method stopped: the Hessian of the "
                f"training objective is not positive definite ({exc}). {self._advice()}",
                tol=tol,
            ) from exc
        theta64 = np.asarray(theta, dtype=np.float64)
        if not converged or not np.all(np.isfinite(theta64)):
            raise ConvergenceError(
                f"{type(self).__name__}.{what}: Newton's method did not converge in "
                f"{n_iter} iterations (gradient norm {grad_norm:.3g} > tol={tol:g}). "
                f"{self._advice()}",
                iterations=int(n_iter),
                grad_norm=float(grad_norm),
                tol=tol,
            )
        if (
            self._is_classifier
            and float(self.l2) == 0.0
            and (
                _dask.separates(self, X, y_enc, theta64, retries)
                if dask_data
                else self._separates(X, y_enc, theta64)
            )
        ):
            raise ConvergenceError(
                f"{type(self).__name__}.{what}: the training data are linearly separable, so with "
                f"l2=0 the loss has no minimiser (it keeps decreasing as the weights grow; Newton "
                f"stopped at ‖θ‖ = {np.linalg.norm(theta64):.3g}). Influence functions need a "
                f"minimiser: use l2 > 0.",
                iterations=int(n_iter),
                grad_norm=float(grad_norm),
                tol=tol,
            )
        return theta64, int(n_iter), float(grad_norm)

    def _separates(self, X: np.ndarray, y_enc: np.ndarray, theta: np.ndarray) -> bool:
        """True if θ classifies every training point correctly (strictly): then the data are
        linearly separable and the unregularised classification loss has no minimiser."""
        d = X.shape[1]
        S = X @ theta[:, :d].T
        if theta.shape[1] > d:
            S += theta[:, d]
        if S.shape[1] == 1:
            s = S[:, 0]
            sign = 2.0 * y_enc - 1.0 if self._core_family(1) == "logistic" else y_enc
            return bool(np.all(sign * s > 0))
        yi = y_enc.astype(np.intp)
        true = S[np.arange(S.shape[0]), yi]
        S[np.arange(S.shape[0]), yi] = -np.inf
        return bool(np.all(true > S.max(axis=1)))

    def _advice(self) -> str:
        tips = []
        if float(self.l2) == 0.0:
            if self._is_classifier:
                tips.append(
                    "with l2=0 the training data may be linearly separable, so the loss "
                    "has no minimiser (the weights grow without bound)"
                )
            tips.append(
                "collinear, duplicated or constant features make the unregularised objective singular"
            )
            tips.append("use l2 > 0")
        tips.append("standardise the features or raise max_iter/tol")
        return "Hints: " + "; ".join(tips) + "."

    # -- prediction ------------------------------------------------------------------------------
    def _check_X(self, X: Any, name: str = "X") -> NDArray[np.floating]:
        self._check_fitted()
        if _dask.is_dask_array(X):  # never pull a distributed matrix into this process implicitly
            raise TypeError(
                f"{type(self).__name__}: {name} is a dask array; prediction and per-example losses take in-memory "
                f"arrays. Apply it chunk-wise instead, e.g. {name}.map_blocks(model.predict, drop_axis=1)"
            )
        return as_float_matrix(name, X, np.float64, n_features=self.n_features_in_)

    def transform(self, X: Any) -> NDArray[np.float64]:
        """Map raw rows to the feature space of this model, shape (n, d_raw) → (n, ``n_features_in_``).

        For a model converted from a scikit-learn ``Pipeline`` by :func:`from_sklearn` this applies the
        pipeline's fitted preceding steps (``transformer_``, i.e. ``pipeline[:-1].transform(X)``; X as the
        pipeline takes it: an array, or a DataFrame for a ``ColumnTransformer`` by column names); a sparse
        result is made dense. For any other model (``transformer_ is None``) it only validates X. Every method
        of the model and of :class:`~pyinfluence.LinearInfluence` works in that transformed space, so pass
        ``model.transform(X)`` to them, for training and test rows alike. Returns a C-contiguous float64 array.
        """
        self._check_fitted()
        if _dask.is_dask_array(X):
            raise TypeError(
                f"{type(self).__name__}.transform: X is a dask array; apply it chunk-wise instead, e.g. "
                f"X.map_blocks(model.transform, chunks=(X.chunks[0], (model.n_features_in_,)))"
            )
        if self.transformer_ is None:
            return np.asarray(
                as_float_matrix("X", X, np.float64, n_features=self.n_features_in_), dtype=np.float64
            )
        return _transform_rows(self.transformer_, X, self.n_features_in_, f"{type(self).__name__}.transform")

    def _scores(self, X: np.ndarray) -> NDArray[np.float64]:
        W = self.theta_
        d = self.n_features_in_
        S = X @ W[:, :d].T
        if self.fit_intercept:
            S += W[:, d]
        return S

    def loss(self, X: ArrayLike, y: ArrayLike) -> NDArray[np.float64]:
        """Per-example training loss L(z_i, θ̂) (no regularisation term), shape (n,)."""
        X = self._check_X(X)
        y_enc = self._encode("y", y, np.float64, n=X.shape[0])
        loss, _, _ = _core.per_example(self._spec(np.float64), X, y_enc, self.theta_)
        return np.asarray(loss)

    def objective(self, X: ArrayLike, y: ArrayLike) -> Tuple[float, NDArray[np.float64]]:
        """R(θ̂) and its gradient ∇R(θ̂) (shape (K, d_eff)) on the data (X, y)."""
        X = self._check_X(X)
        y_enc = self._encode("y", y, np.float64, n=X.shape[0])
        value, grad = _core.objective(self._spec(np.float64), X, y_enc, self.theta_, None)
        return float(value), np.asarray(grad)


class _BinaryLabelsMixin:
    """Label handling for classifiers (classes_ sorted as np.unique)."""

    def _fit_classes(self: Any, y: Any, n: int) -> Tuple[np.ndarray, np.ndarray]:
        a = as_label_array("y", y, n=n)
        try:
            classes, inv = np.unique(a, return_inverse=True)
        except TypeError as exc:
            raise TypeError(f"y contains labels that cannot be compared with each other: {exc}") from exc
        if classes.shape[0] < 2:
            raise ValueError(f"y contains a single class ({classes[0]!r}); a classifier needs at least 2")
        self.classes_ = classes
        return classes, inv.reshape(-1)

    def _class_index(self: Any, name: str, y: Any, n: Optional[int], allow_scalar: bool) -> np.ndarray:
        self._check_fitted()
        a = as_label_array(name, y, n=n, allow_scalar=allow_scalar)
        classes = self.classes_
        try:
            idx = np.searchsorted(classes, a)
            np.minimum(idx, classes.shape[0] - 1, out=idx)
            ok = np.asarray(classes[idx] == a)
            good = ok.shape == a.shape and bool(ok.all())
        except (TypeError, ValueError):
            good, ok = False, np.zeros(a.shape, dtype=bool)
        if not good:
            if ok.shape != a.shape:
                ok = np.zeros(a.shape, dtype=bool)
            unseen = list(dict.fromkeys(a[~ok].tolist()))
            shown = ", ".join(repr(u) for u in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
            raise ValueError(
                f"{name} contains label(s) {shown} that are not among the model's classes "
                f"{classes.tolist()!r}"
            )
        return idx


class LogisticRegression(_BinaryLabelsMixin, _LinearModel):
    """L2-regularised logistic regression, binary or multinomial, fitted exactly by Newton.

    Objective: R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖Pθ‖², with
    binary (2 classes, K = 1): L = log(1 + e^s) − y s, y ∈ {0, 1} (``classes_[1]`` is 1), and
    multinomial (≥ 3 classes, K = n_classes): L = logsumexp(s) − s_y, full K × d_eff parameters.
    scikit-learn's ``LogisticRegression(C=c)`` has the same optimum as ``l2 = 1/(c·n)``.

    Attributes after ``fit``: ``classes_``, ``theta_`` (K, d_eff), ``coef_`` (K, d),
    ``intercept_`` (K,), ``n_features_in_``, ``n_iter_``, ``grad_norm_`` (‖∇R(θ̂)‖).
    """

    _is_classifier = True

    def __init__(
        self,
        l2: float = 1e-3,
        fit_intercept: bool = True,
        penalize_intercept: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 100,
    ) -> None:
        self.l2 = l2
        self.fit_intercept = fit_intercept
        self.penalize_intercept = penalize_intercept
        self.tol = tol
        self.max_iter = max_iter
        self._check_params()

    def _core_family(self, n_outputs: int) -> str:
        return "logistic" if n_outputs == 1 else "multinomial"

    def _encode_fit(self, y: Any, n: int) -> Tuple[NDArray[np.float64], int]:
        classes, inv = self._fit_classes(y, n)
        K = 1 if classes.shape[0] == 2 else int(classes.shape[0])
        return inv.astype(np.float64), K

    def _encode(
        self,
        name: str,
        y: Any,
        dtype: DTypeLike,
        n: Optional[int] = None,
        allow_scalar: bool = False,
    ) -> NDArray[np.floating]:
        return self._class_index(name, y, n, allow_scalar).astype(dtype)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Scores s = W x̃: shape (n,) for binary (log-odds of ``classes_[1]``), (n, K) otherwise."""
        S = self._scores(self._check_X(X))
        return S[:, 0] if S.shape[1] == 1 else S

    def predict_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Class probabilities, shape (n, n_classes), columns ordered as ``classes_``."""
        S = self._scores(self._check_X(X))
        if S.shape[1] == 1:
            p = _sigmoid(S[:, 0])
            return np.column_stack([1.0 - p, p])
        return _softmax(S)

    def predict_log_proba(self, X: ArrayLike) -> NDArray[np.float64]:
        """Log of :meth:`predict_proba`, shape (n, n_classes)."""
        S = self._scores(self._check_X(X))
        if S.shape[1] == 1:
            s = S[:, 0]
            return np.column_stack([-np.logaddexp(0.0, s), -np.logaddexp(0.0, -s)])
        S = S - S.max(axis=1, keepdims=True)
        return S - np.log(np.exp(S).sum(axis=1, keepdims=True))

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted class labels (values from ``classes_``), shape (n,)."""
        S = self._scores(self._check_X(X))
        idx = (S[:, 0] > 0).astype(np.intp) if S.shape[1] == 1 else S.argmax(axis=1)
        return self.classes_[idx]


class SmoothHingeSVM(_BinaryLabelsMixin, _LinearModel):
    """Binary linear SVM with the smooth hinge loss of Koh & Liang (2017), fitted by Newton.

    L = t·log(1 + exp((1 − y s)/t)) with y ∈ {−1, +1} (``classes_[0]`` → −1, ``classes_[1]`` → +1)
    and temperature t > 0 (t → 0 recovers the hinge loss; small t makes Newton slower).
    Objective: R(θ) = (1/n) Σ L + (l2/2)‖Pθ‖².
    """

    _family = "smooth_hinge"
    _is_classifier = True

    def __init__(
        self,
        l2: float = 1e-3,
        temperature: float = 0.1,
        fit_intercept: bool = True,
        penalize_intercept: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 100,
    ) -> None:
        self.l2 = l2
        self.temperature = temperature
        self.fit_intercept = fit_intercept
        self.penalize_intercept = penalize_intercept
        self.tol = tol
        self.max_iter = max_iter
        self._check_params()

    def _check_params(self) -> None:
        super()._check_params()
        check_positive_float("temperature", self.temperature)

    @property
    def _temperature(self) -> float:
        return float(self.temperature)

    def _encode_fit(self, y: Any, n: int) -> Tuple[NDArray[np.float64], int]:
        classes, inv = self._fit_classes(y, n)
        if classes.shape[0] != 2:
            del self.classes_
            raise ValueError(f"SmoothHingeSVM is a binary classifier but y has {classes.shape[0]} classes")
        return 2.0 * inv - 1.0, 1

    def _encode(
        self,
        name: str,
        y: Any,
        dtype: DTypeLike,
        n: Optional[int] = None,
        allow_scalar: bool = False,
    ) -> NDArray[np.floating]:
        idx = self._class_index(name, y, n, allow_scalar)
        return (2 * idx - 1).astype(dtype)

    def decision_function(self, X: ArrayLike) -> NDArray[np.float64]:
        """Scores s = w·x + b, shape (n,); positive means ``classes_[1]``."""
        return self._scores(self._check_X(X))[:, 0]

    def predict(self, X: ArrayLike) -> np.ndarray:
        """Predicted class labels (values from ``classes_``), shape (n,)."""
        return self.classes_[(self.decision_function(X) > 0).astype(np.intp)]


class RidgeRegression(_LinearModel):
    """Ridge regression with squared loss L = ½(s − y)², fitted exactly.

    Objective: R(θ) = (1/n) Σ ½(wᵀx_i + b − y_i)² + (l2/2)‖w‖² (intercept unpenalised unless
    ``penalize_intercept``). scikit-learn's ``Ridge(alpha=a)`` has the same optimum as
    ``l2 = a/n``; ``LinearRegression`` as ``l2 = 0``.

    Attributes after ``fit``: ``theta_`` (1, d_eff), ``coef_`` (d,), ``intercept_`` (float),
    ``n_features_in_``, ``n_iter_``, ``grad_norm_``.
    """

    _family = "squared"

    def __init__(
        self,
        l2: float = 1e-3,
        fit_intercept: bool = True,
        penalize_intercept: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 100,
    ) -> None:
        self.l2 = l2
        self.fit_intercept = fit_intercept
        self.penalize_intercept = penalize_intercept
        self.tol = tol
        self.max_iter = max_iter
        self._check_params()

    @property
    def coef_(self) -> NDArray[np.float64]:
        """Weights, shape (d,) (as scikit-learn's ``Ridge`` for 1-D targets)."""
        self._check_fitted()
        return self.theta_[0, : self.n_features_in_]

    @property
    def intercept_(self) -> float:  # type: ignore[override]
        """Intercept (0.0 when ``fit_intercept=False``)."""
        self._check_fitted()
        return float(self.theta_[0, -1]) if self.fit_intercept else 0.0

    def _encode_fit(self, y: Any, n: int) -> Tuple[NDArray[np.float64], int]:
        return as_float_vector("y", y, np.float64, n=n).astype(np.float64, copy=False), 1

    def _encode(
        self,
        name: str,
        y: Any,
        dtype: DTypeLike,
        n: Optional[int] = None,
        allow_scalar: bool = False,
    ) -> NDArray[np.floating]:
        self._check_fitted()
        return as_float_vector(name, y, dtype, n=n, allow_scalar=allow_scalar)

    def predict(self, X: ArrayLike) -> NDArray[np.float64]:
        """Predictions wᵀx + b, shape (n,)."""
        return self._scores(self._check_X(X))[:, 0]

    decision_function = predict


# ------------------------------------------------------------------------------------------------
# scikit-learn conversion
# ------------------------------------------------------------------------------------------------
_SUPPORTED = ("LogisticRegression", "Ridge", "LinearRegression")


def _sk_fitted(est: Any, label: str, pipeline: bool = False) -> None:
    if not hasattr(est, "coef_"):
        what = "fit the pipeline" if pipeline else "call its fit(X, y)"
        raise NotFittedError(f"the {label} given to from_sklearn is not fitted; {what} first")


def _check_supported(estimator: Any, label: str) -> str:
    """The scikit-learn class name of a supported estimator, else a TypeError naming ``label``."""
    cls = type(estimator).__name__
    module = type(estimator).__module__ or ""
    where = "" if label == cls else f" ({label})"
    if not module.startswith("sklearn."):
        if isinstance(estimator, _LinearModel):
            raise TypeError(f"from_sklearn: the {label} is already a pyinfluence model")
        raise TypeError(
            f"from_sklearn: unsupported estimator {module}.{cls}{where}; supported are "
            f"sklearn.linear_model.LogisticRegression, Ridge and LinearRegression"
        )
    if cls not in _SUPPORTED:
        hint = ""
        if cls.endswith("CV"):
            hint = (
                "; refit the plain estimator with the selected hyperparameter "
                "(e.g. LogisticRegression(C=est.C_[0]) or Ridge(alpha=est.alpha_))"
            )
        raise TypeError(
            f"from_sklearn: unsupported estimator sklearn {cls}{where}; supported are "
            f"LogisticRegression, Ridge and LinearRegression{hint}"
        )
    return cls


def _is_pipeline(estimator: Any) -> bool:
    # A Pipeline instance exists only once sklearn.pipeline was imported: no import of scikit-learn here.
    mod = sys.modules.get("sklearn.pipeline")
    return mod is not None and isinstance(estimator, mod.Pipeline)


def _is_passthrough(step: Any) -> bool:
    return step is None or (isinstance(step, str) and step == "passthrough")


def _split_pipeline(pipe: Any) -> Tuple[Any, Any, str]:
    """(fitted preceding steps ``pipe[:-1]`` or None if there are none, last step, label of the last step).

    Refuses (TypeError/NotFittedError naming the step) a 'passthrough' last step, a preceding step without
    ``transform`` and an unfitted preceding step. A Pipeline as the last step is split in turn.
    """
    from sklearn.pipeline import Pipeline
    from sklearn.utils.validation import check_is_fitted

    steps = list(getattr(pipe, "steps", []))
    if not steps:
        raise ValueError("from_sklearn: the Pipeline has no steps")
    name, last = steps[-1]
    if _is_passthrough(last):
        raise TypeError(
            f"from_sklearn: the last step {name!r} of the Pipeline is 'passthrough'; the last step must be a "
            f"fitted LogisticRegression, Ridge or LinearRegression"
        )
    label = f"{type(last).__name__} (last step {name!r} of the Pipeline)"
    for step_name, step in steps[:-1]:
        if _is_passthrough(step):
            continue
        if not callable(getattr(step, "transform", None)):
            raise TypeError(
                f"from_sklearn: step {step_name!r} of the Pipeline ({type(step).__name__}) has no transform "
                f"method; every step before the last must be a fitted transformer"
            )
        try:
            check_is_fitted(step)
        except (
            ValueError,
            AttributeError,
            TypeError,
        ) as exc:  # sklearn's NotFittedError is both of the first
            raise NotFittedError(
                f"from_sklearn: step {step_name!r} of the Pipeline ({type(step).__name__}) is not fitted; "
                f"fit the pipeline first ({exc})"
            ) from exc
    transformer = pipe[:-1] if len(steps) > 1 else None  # the fitted preceding steps, as they are
    if _is_pipeline(last):  # a Pipeline as the last step: its own preceding steps come after ours
        inner, last, _ = _split_pipeline(last)
        label = f"{type(last).__name__} (last step of the Pipeline {name!r}, the last step of the Pipeline)"
        if inner is not None:
            transformer = (
                inner if transformer is None else Pipeline([("outer", transformer), ("inner", inner)])
            )
    return transformer, last, label


def _transform_rows(transformer: Any, X: Any, n_features: Optional[int], what: str) -> NDArray[np.float64]:
    """``transformer.transform(X)`` as a dense C-contiguous float64 (n, d) matrix (validated, finite)."""
    try:
        n_raw = int(X.shape[0]) if hasattr(X, "shape") else len(X)
    except TypeError:
        n_raw = None
    try:
        Xt = transformer.transform(X)
    except (ValueError, TypeError) as exc:  # e.g. a wrong number of columns: say where it came from
        kind = ValueError if isinstance(exc, ValueError) else TypeError
        raise kind(f"{what}: transforming X through the pipeline's preceding steps failed: {exc}") from exc
    if callable(getattr(Xt, "toarray", None)):  # scipy.sparse (e.g. from OneHotEncoder): the core is dense
        Xt = Xt.toarray()
    Xa = as_float_matrix(
        "X transformed by the pipeline's preceding steps", Xt, np.float64, n_features=n_features
    )
    if n_raw is not None and Xa.shape[0] != n_raw:
        raise ValueError(
            f"{what}: the pipeline's preceding steps turned {n_raw} rows of X into {Xa.shape[0]}; "
            f"influence needs one transformed row per training row"
        )
    return np.asarray(Xa, dtype=np.float64)  # float64 already (no copy)


def _from_sk_logistic(est: Any, n: int, name: str) -> Tuple[LogisticRegression, np.ndarray]:
    if getattr(est, "class_weight", None) is not None:
        raise ValueError(
            f"from_sklearn: {name} with class_weight={est.class_weight!r} is not supported "
            f"(pyinfluence weights every training point equally); refit with class_weight=None"
        )
    C = float(est.C)
    penalty = getattr(est, "penalty", "l2")
    l1_ratio = getattr(est, "l1_ratio", None)
    if penalty == "deprecated":  # scikit-learn >= 1.8: penalty chosen by l1_ratio and C
        penalty = "l2" if (l1_ratio is None or float(l1_ratio) == 0.0) else "elasticnet"
    if penalty == "elasticnet" and l1_ratio is not None and float(l1_ratio) == 0.0:
        penalty = "l2"
    if penalty in ("none", None) or np.isinf(C):
        l2 = 0.0
    elif penalty == "l2":
        if not C > 0:
            raise ValueError(f"from_sklearn: {name}.C must be > 0, got {C}")
        l2 = 1.0 / (C * n)
    else:
        raise ValueError(
            f"from_sklearn: {name} with penalty={penalty!r} (l1_ratio={l1_ratio!r}) is not "
            f"supported: influence functions need a twice-differentiable objective; use an L2 "
            f"penalty (l1_ratio=0) or none (C=np.inf)"
        )
    classes = np.asarray(est.classes_)
    n_classes = classes.shape[0]
    solver = getattr(est, "solver", "lbfgs")
    multi_class = getattr(est, "multi_class", "auto")
    if multi_class in (None, "deprecated"):
        multi_class = "auto"
    coef = np.asarray(est.coef_, dtype=np.float64)
    if n_classes > 2 and (multi_class == "ovr" or (multi_class == "auto" and solver == "liblinear")):
        raise ValueError(
            f"from_sklearn: {name} with {n_classes} classes was fitted one-vs-rest "
            f"(multi_class={multi_class!r}, solver={solver!r}), which is {n_classes} separate "
            f"binary objectives; only the multinomial objective is supported (use solver='lbfgs' "
            f"or 'newton-cholesky' and multi_class='multinomial'/'auto')"
        )
    if n_classes == 2 and multi_class == "multinomial":
        raise ValueError(
            f"from_sklearn: binary {name} with multi_class='multinomial' uses a symmetric "
            f"two-row parametrisation that is not supported; refit with multi_class='auto'"
        )
    if n_classes == 2 and coef.shape[0] != 1:
        raise ValueError(f"from_sklearn: unexpected coef_ shape {coef.shape} for a binary {name}")
    fit_intercept = bool(est.fit_intercept)
    penalize_intercept = False
    if solver == "liblinear" and fit_intercept and l2 > 0:
        # liblinear appends a constant feature `intercept_scaling` and penalises its weight.
        if float(getattr(est, "intercept_scaling", 1.0)) != 1.0:
            raise ValueError(
                f"from_sklearn: {name}(solver='liblinear', intercept_scaling="
                f"{est.intercept_scaling!r}) penalises a rescaled intercept, which is not "
                f"supported; use intercept_scaling=1 or another solver"
            )
        penalize_intercept = True
    model = LogisticRegression(l2=l2, fit_intercept=fit_intercept, penalize_intercept=penalize_intercept)
    model.classes_ = classes
    intercept = np.asarray(est.intercept_, dtype=np.float64).reshape(-1)
    if n_classes > 2 and fit_intercept and not penalize_intercept:
        # Softmax intercepts are defined up to a common shift; the core fixes Σ_k b_k = 0.
        intercept = intercept - intercept.mean()
    theta = np.hstack([coef, intercept[:, None]]) if fit_intercept else coef.copy()
    return model, np.ascontiguousarray(theta)


def _from_sk_regression(est: Any, n: int, kind: str, name: str) -> Tuple[RidgeRegression, np.ndarray]:
    if getattr(est, "positive", False):
        raise ValueError(
            f"from_sklearn: {name}(positive=True) is a constrained fit whose optimum is not a "
            f"stationary point; influence functions do not apply. Refit with positive=False"
        )
    coef = np.asarray(est.coef_, dtype=np.float64)
    if coef.ndim == 2:
        if coef.shape[0] != 1:
            raise ValueError(
                f"from_sklearn: {name} was fitted on {coef.shape[0]} targets; only a single "
                f"target (1-D y) is supported"
            )
        coef = coef[0]
    if kind == "ridge":
        alphas = np.asarray(est.alpha, dtype=np.float64)
        if alphas.size != 1:
            raise ValueError(f"from_sklearn: {name} with one alpha per target is not supported")
        alpha = float(alphas.reshape(()))
        if alpha < 0:
            raise ValueError(f"from_sklearn: {name}.alpha must be >= 0, got {alpha}")
        l2 = alpha / n
    else:
        l2 = 0.0
    fit_intercept = bool(est.fit_intercept)
    model = RidgeRegression(l2=l2, fit_intercept=fit_intercept)
    if fit_intercept:
        intercept = float(np.asarray(est.intercept_, dtype=np.float64).reshape(-1)[0])
        theta = np.append(coef, intercept)[None, :]
    else:
        theta = coef[None, :].copy()
    return model, np.ascontiguousarray(theta)


def from_sklearn(estimator: Any, X: Any, y: ArrayLike, refine: bool = True) -> _LinearModel:
    """Convert a fitted scikit-learn linear model (or a Pipeline ending in one) into the equivalent pyinfluence model.

    Supported: ``sklearn.linear_model.LogisticRegression`` (L2 or no penalty; binary, or
    multinomial for ≥ 3 classes) → :class:`LogisticRegression` with ``l2 = 1/(C·n)`` (``l2 = 0``
    for ``C=inf``/no penalty; the intercept is unpenalised except with ``solver='liblinear'``);
    ``Ridge(alpha)`` → :class:`RidgeRegression` with ``l2 = alpha/n``; ``LinearRegression`` →
    ``RidgeRegression(l2=0)``. ``X`` (n, d), ``y`` (n,) must be the training data the estimator was fitted on
    (n = len(X)), without sample weights. Refused (ValueError): L1/elastic-net penalties,
    ``class_weight``, one-vs-rest multiclass, ``positive=True``, multi-target regression.

    **Pipelines.** ``estimator`` may be a fitted ``sklearn.pipeline.Pipeline`` whose last step is one of the
    above; ``X`` is then the raw input the pipeline takes (an array, or a DataFrame for a ``ColumnTransformer``).
    The rows are transformed by the preceding steps, ``Z = pipeline[:-1].transform(X)`` (n, d_z; a sparse
    result is made dense), and the model is built from the last step on ``(Z, y)``. **Influence is then
    computed in the transformed feature space, with the preprocessing held fixed**: θ̂ are the last step's
    parameters, H is the Hessian over them, ``pert_loss`` differentiates with respect to the transformed
    features, and leave-one-out predictions/refits do not refit the scaler or encoder. The returned model
    says so: ``model.transformer_`` holds the fitted preceding steps (a ``Pipeline``; None for a plain
    estimator), ``model.n_features_in_`` is d_z, and ``model.transform(X)`` maps raw rows the same way. Every
    method of the model and of :class:`~pyinfluence.LinearInfluence` takes transformed rows::

        model = pyinfluence.from_sklearn(pipe, X_train, y_train)
        inf = pyinfluence.LinearInfluence(model, model.transform(X_train), y_train)
        scores = inf.up_loss(model.transform(X_test), y_test)   # (n_train, m); negative = helpful

    Refused with a message naming the step: a last step that is not supported or 'passthrough' (TypeError),
    a preceding step without ``transform`` (TypeError), an unfitted step (``NotFittedError``, a ValueError).

    **Refinement.** scikit-learn stops at a loose tolerance, so its solution is usually not the exact optimum
    that influence functions assume. The gradient norm ‖∇R‖ of the translated objective on ``(X, y)`` is
    checked; if it exceeds 1e-6 a :class:`~pyinfluence.errors.NotAtOptimumWarning` is issued.
    With ``refine=True`` (default) Newton's method is then run from scikit-learn's solution
    until ‖∇R‖ ≤ 1e-10 (so the returned model's coefficients may differ slightly from the
    estimator's); with ``refine=False`` scikit-learn's parameters are kept as they are. If Newton's method
    fails from scikit-learn's solution (typically because the estimator was fitted on other data than ``X``,
    e.g. a pipeline's last step given raw rows: its coefficients are then far from the optimum on ``X`` and
    the Hessian there is numerically singular), the model is fitted afresh on ``(X, y)`` from θ = 0 with the
    same ``l2`` and a ``NotAtOptimumWarning`` says so and why; the returned coefficients are then those of
    the exact fit on ``(X, y)``, not the estimator's. If that fresh fit fails too (a genuinely singular
    objective: e.g. ``l2 = 0`` with collinear features or separable classes), the
    :class:`~pyinfluence.errors.ConvergenceError` is raised.
    """
    check_bool("refine", refine)
    if _dask.is_dask_array(X) or _dask.is_dask_array(y):
        raise TypeError(
            "from_sklearn: X and y must be in-memory arrays (scikit-learn fitted on them in one process); for a "
            "dask training set, fit a pyinfluence estimator on it directly: e.g. "
            "pyinfluence.LogisticRegression(l2=...).fit(X_dask, y_dask)"
        )
    transformer: Any = None
    Xa: NDArray[np.floating]
    x_name = "X"
    if _is_pipeline(estimator):
        transformer, last, label = _split_pipeline(estimator)
        cls = _check_supported(last, label)
        _sk_fitted(last, label, pipeline=True)
        estimator = last
        if transformer is not None:
            Xa = _transform_rows(transformer, X, None, "from_sklearn")
            x_name = "X transformed by the pipeline's preceding steps"
        else:
            Xa = as_float_matrix("X", X, np.float64)
    else:
        label = type(estimator).__name__
        cls = _check_supported(estimator, label)
        _sk_fitted(estimator, label)
        Xa = as_float_matrix("X", X, np.float64)
    n, d = Xa.shape
    n_in = getattr(estimator, "n_features_in_", None)
    if n_in is not None and n_in != d:
        raise ValueError(f"{x_name} has {d} features but the {label} was trained on {n_in}")
    model: _LinearModel
    if cls == "LogisticRegression":
        model, theta = _from_sk_logistic(estimator, n, label)
    else:
        model, theta = _from_sk_regression(estimator, n, "ridge" if cls == "Ridge" else "ols", label)
    if theta.shape[1] != d + (1 if model.fit_intercept else 0):
        raise ValueError(
            f"{x_name} has {d} features but the {label} was trained on {theta.shape[1] - model.fit_intercept}"
        )
    model.n_features_in_ = d
    model.theta_ = theta
    y_enc = model._encode("y", y, np.float64, n=n)
    _, grad = _core.objective(model._spec(np.float64), Xa, y_enc, theta, None)
    grad_norm = float(np.linalg.norm(grad))
    model.n_iter_ = 0
    model.grad_norm_ = grad_norm
    model.sklearn_grad_norm_ = grad_norm
    if grad_norm > OPTIMUM_GRAD_TOL:
        if refine:
            msg = "refining it with Newton's method (refine=True)"
        else:
            msg = (
                "influence values computed from it are approximate; pass refine=True to "
                "polish it with Newton's method"
            )
        warnings.warn(
            f"the {label} solution is not at the optimum of the translated objective "
            f"(‖∇R(θ)‖ = {grad_norm:.3g} > {OPTIMUM_GRAD_TOL:g}, l2 = {model.l2:.6g}); {msg}",
            NotAtOptimumWarning,
            stacklevel=2,
        )
    if refine and grad_norm > model._tol():
        K = theta.shape[0]
        try:
            theta, n_iter, grad_norm = model._newton(Xa, y_enc, theta, K, what="refine")
        except ConvergenceError as exc:
            # Newton from the given θ failed (R is convex, so from a point near its optimum it would not):
            # θ is far from the optimum on this X. Fit afresh from θ = 0, as fit() does; only if that fails
            # too is the objective itself the problem (then its error is the one to report).
            try:
                theta, n_iter, grad_norm = model._newton(Xa, y_enc, np.zeros_like(theta), K, what="fit")
            except ConvergenceError as exc2:
                raise ConvergenceError(
                    f"from_sklearn(refine=True): refining the {label}'s coefficients failed, and so did a fresh "
                    f"fit on (X, y) from θ = 0: {exc2}",
                    iterations=exc2.iterations,
                    grad_norm=exc2.grad_norm,
                    tol=exc2.tol,
                ) from exc2
            hint = (
                "Was the estimator fitted on exactly these rows and features? If it is the last step of a "
                "Pipeline, pass the whole Pipeline with the raw X."
                if transformer is None
                else "Was the pipeline fitted on exactly these rows?"
            )
            warnings.warn(
                f"from_sklearn: the {label}'s coefficients are not near an optimum of the translated "
                f"objective on this X (‖∇R(θ)‖ = {model.sklearn_grad_norm_:.3g}, l2 = {model.l2:.6g}) and "
                f"refining them failed ({_first_sentence(exc)}). {hint} Fell back to a fresh exact fit on "
                f"(X, y) from θ = 0 with the same l2: the returned coefficients are the optimum on this X, "
                f"not the estimator's (‖∇R‖ = {grad_norm:.3g} after {n_iter} Newton iterations).",
                NotAtOptimumWarning,
                stacklevel=2,
            )
        model.theta_ = theta
        model.n_iter_ = n_iter
        model.grad_norm_ = grad_norm
    if transformer is not None:
        model.transformer_ = transformer
    return model


def _first_sentence(exc: BaseException) -> str:
    """Why Newton's method failed, without the generic hints of ``_advice`` (they do not apply to a start
    point far from the optimum: there the Hessian is singular only numerically, e.g. saturated sigmoids)."""
    cause = exc.__cause__
    if isinstance(cause, NotPositiveDefiniteError):
        where = f" (Cholesky pivot {cause.pivot} of {cause.size})" if cause.pivot is not None else ""
        return f"Newton's method from them met a numerically singular Hessian{where}"
    text = str(exc).split(" Hints:")[0].rstrip(".")
    return text.split(": ", 1)[-1]  # drop the "Model.refine" prefix
