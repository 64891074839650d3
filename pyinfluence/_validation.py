"""Input conversion and checking, done ONCE at the Python boundary.

The compiled core (``pyinfluence._core``) takes C-contiguous float32/float64 arrays of one dtype
per call and does not convert silently. Everything user-facing goes through these helpers, which

- accept numpy arrays, array-likes (lists, pandas) and CPU torch tensors (zero-copy via
  ``Tensor.numpy()`` where possible; torch is never imported by this module),
- keep float32/float64, convert integers/bools/float16/longdouble to float64,
- return C-contiguous arrays without copying when the input already is one,
- reject NaN/inf, wrong ndim, empty arrays, complex/object/string data, sparse matrices and
  non-CPU tensors,

and every message names the offending argument. They are cheap enough to run on every call of a
hot loop (a few microseconds for a single test point).
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from typing import Any, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import DTypeLike, NDArray

__all__ = [
    "as_float_matrix",
    "as_float_vector",
    "as_label_array",
    "as_index_array",
    "as_labels",
    "as_matrix",
    "check_n_features",
    "check_same_length",
    "check_damping",
    "check_float",
    "check_methods",
    "check_nonnegative_float",
    "check_positive_float",
    "check_int",
    "check_bool",
    "check_rng_seed",
    "resolve_dtype",
    "to_numpy",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
# Above this many elements, the finiteness check runs in row blocks so that it does not
# allocate a boolean array as large as the data.
_FINITE_BLOCK = 1 << 20


# --------------------------------------------------------------------------------------------
# generic conversion
# --------------------------------------------------------------------------------------------
def resolve_dtype(dtype: DTypeLike, name: str = "dtype") -> np.dtype:
    """Return ``np.dtype(dtype)`` if it is float32 or float64, else raise ``TypeError``."""
    try:
        dt = np.dtype(dtype)
    except TypeError as exc:
        raise TypeError(f"{name} must be float32 or float64, got {dtype!r}") from exc
    if dt not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {dt}")
    return dt


def _torch_to_numpy(name: str, X: Any) -> np.ndarray:
    """Convert a torch tensor to numpy without importing torch (it is already imported)."""
    torch = sys.modules["torch"]
    if X.layout != torch.strided:
        raise TypeError(
            f"{name} is a sparse torch tensor ({X.layout}); pass a dense tensor ({name}.to_dense())"
        )
    if X.device.type != "cpu":
        raise TypeError(
            f"{name} is a torch tensor on device '{X.device}'; pyinfluence's linear path runs on "
            f"the CPU: pass {name}.cpu() (or {name}.detach().cpu().numpy())"
        )
    if X.is_complex():
        raise TypeError(f"{name} has complex dtype {X.dtype}; real values are required")
    X = X.detach()
    if X.dtype in (torch.float16, torch.bfloat16):
        X = X.to(torch.float64)
    try:
        X = X.resolve_conj().resolve_neg()
        return X.numpy()
    except (TypeError, RuntimeError) as exc:
        raise TypeError(f"{name}: cannot convert torch tensor of dtype {X.dtype} to numpy: {exc}") from exc


def _to_numpy(name: str, X: Any) -> np.ndarray:
    """Array-like -> ndarray (no dtype change yet). Raises TypeError with ``name`` on failure."""
    if type(X) is np.ndarray:  # fast path
        return X
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(X, torch.Tensor):
        return _torch_to_numpy(name, X)
    if isinstance(X, np.ndarray):  # subclasses (np.matrix, masked arrays)
        if isinstance(X, np.ma.MaskedArray):
            if np.ma.is_masked(X):
                raise ValueError(f"{name} is a masked array with masked entries; fill them first")
            return np.asarray(X.data)
        return np.asarray(X)
    if hasattr(X, "nnz") and hasattr(X, "toarray"):
        raise TypeError(
            f"{name} is a sparse matrix ({type(X).__name__}); pyinfluence needs dense data: "
            f"pass {name}.toarray()"
        )
    if X is None:
        raise TypeError(f"{name} is None; an array is required")
    try:
        return np.asarray(X)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} could not be converted to a numeric array: {exc}") from exc


def to_numpy(a: Any, dtype: Any = None) -> np.ndarray:
    """``a`` (numpy array, CPU or GPU torch tensor, list, scalar) as a numpy array, detached and on the
    CPU (no checks; torch is not imported). With ``dtype``, converted to it (no copy if it already is)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor without importing torch
        a = a.detach().cpu().numpy()
    out = np.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


def _float_dtype_for(name: str, A: np.ndarray, dtype: Optional[np.dtype]) -> np.dtype:
    kind = A.dtype.kind
    if kind == "c":
        raise TypeError(f"{name} has complex dtype {A.dtype}; real values are required")
    if kind not in "fiub":
        raise TypeError(f"{name} has dtype {A.dtype}; a numeric (float, int or bool) array is required")
    if dtype is not None:
        return dtype
    if A.dtype in _FLOAT_DTYPES:
        return A.dtype
    return np.dtype(np.float64)


def _check_finite(name: str, A: np.ndarray) -> None:
    if A.dtype.kind != "f" or A.size == 0:
        return
    if A.size <= _FINITE_BLOCK:
        if np.isfinite(A).all():
            return
    else:
        rows = max(1, _FINITE_BLOCK // max(1, A.size // max(1, A.shape[0])))
        if all(np.isfinite(A[i : i + rows]).all() for i in range(0, A.shape[0], rows)):
            return
    bad = np.argwhere(~np.isfinite(A))
    first = tuple(int(i) for i in bad[0])
    where = f"index {first[0]}" if len(first) == 1 else f"row {first[0]}, column {first[1]}"
    what = "NaN" if np.isnan(A[first]) else "infinity"
    raise ValueError(
        f"{name} contains NaN or infinity ({len(bad)} non-finite value(s); first: {what} at "
        f"{where}); remove or impute them"
    )


def as_float_matrix(
    name: str,
    X: Any,
    dtype: Optional[DTypeLike] = None,
    *,
    allow_1d: bool = False,
    n_features: Optional[int] = None,
    allow_empty: bool = False,
) -> NDArray[np.floating]:
    """Convert ``X`` to a C-contiguous 2-D float32/float64 array of shape (n, d).

    float32/float64 inputs keep their dtype (unless ``dtype`` is given); integer, bool, float16
    and longdouble inputs become float64. No copy is made when ``X`` already is a C-contiguous
    array of the target dtype. With ``allow_1d``, a 1-D ``X`` is one point and becomes (1, d).
    With ``n_features``, the number of columns must equal it.

    Raises ``TypeError`` (complex, object, strings, sparse, non-CPU tensors) or ``ValueError``
    (wrong ndim, empty, NaN/inf, wrong number of features), naming ``name``.
    """
    A = _to_numpy(name, X)
    dt = _float_dtype_for(name, A, None if dtype is None else resolve_dtype(dtype))
    if A.ndim != 2:
        if A.ndim == 1 and allow_1d:
            A = A.reshape(1, -1)
        elif A.ndim == 1:
            raise ValueError(
                f"{name} must be a 2-D array of shape (n_samples, n_features), got a 1-D array "
                f"of shape {A.shape}; use {name}.reshape(-1, 1) for a single feature or "
                f"{name}.reshape(1, -1) for a single sample"
            )
        else:
            expect = "(n_features,) or (n_samples, n_features)" if allow_1d else "(n_samples, n_features)"
            raise ValueError(
                f"{name} must be {'1-D or ' if allow_1d else ''}2-D with shape {expect}, "
                f"got {A.ndim}-D array of shape {A.shape}"
            )
    if A.size == 0 and not (allow_empty and A.shape[1] > 0):
        raise ValueError(
            f"{name} is empty (shape {A.shape}); at least one sample and one feature are required"
        )
    if n_features is not None and A.shape[1] != n_features:
        raise ValueError(f"{name} has {A.shape[1]} features but the model was trained on {n_features}")
    if A.dtype != dt or not A.flags.c_contiguous:
        A = np.ascontiguousarray(A, dtype=dt)
    _check_finite(name, A)
    return A


def as_float_vector(
    name: str,
    y: Any,
    dtype: DTypeLike = np.float64,
    *,
    n: Optional[int] = None,
    allow_scalar: bool = False,
) -> NDArray[np.floating]:
    """Convert real-valued targets to a C-contiguous 1-D float array of ``dtype``.

    A column vector (n, 1) is accepted and flattened; with ``allow_scalar`` a scalar becomes (1,).
    With ``n``, the length must equal it. NaN/inf are rejected.
    """
    a = _to_numpy(name, y)
    dt = _float_dtype_for(name, a, resolve_dtype(dtype))
    a = _as_1d(name, a, allow_scalar)
    if n is not None and a.shape[0] != n:
        raise ValueError(_length_message(name, a.shape[0], n))
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype != dt or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=dt)
    _check_finite(name, a)
    return a


def as_matrix(name: str, X: Any, n_features: Optional[int] = None) -> NDArray[np.float64]:
    """A 2-D float64 array (a copy only when needed) with finite values; 1-D input is one row. Unlike
    :func:`as_float_matrix` it takes tensors on any device (copied to the CPU): for the applications,
    whose inputs may come from either path."""
    try:
        A = to_numpy(X, np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a numeric array: {exc}") from None
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2:
        raise ValueError(f"{name} must be 2-D (n_samples, n_features), got shape {A.shape}")
    if A.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if n_features is not None and A.shape[1] != n_features:
        raise ValueError(f"{name} has {A.shape[1]} features but {n_features} were expected")
    if not np.all(np.isfinite(A)):
        raise ValueError(f"{name} contains NaN or inf")
    return A


def as_labels(name: str, y: Any, n: Optional[int] = None) -> np.ndarray:
    """Labels or targets as a 1-D numpy array of their own dtype (a scalar becomes one entry), of length
    ``n`` if given, without NaN/inf; tensors on any device are accepted (copied to the CPU)."""
    a = to_numpy(y)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but {n} were expected")
    if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def _as_1d(name: str, a: np.ndarray, allow_scalar: bool) -> np.ndarray:
    if a.ndim == 1:
        return a
    if a.ndim == 0:
        if allow_scalar:
            return a.reshape(1)
        raise ValueError(f"{name} must be a 1-D array of shape (n_samples,), got a scalar")
    if a.ndim == 2 and a.shape[1] == 1:
        return a.reshape(-1)
    raise ValueError(
        f"{name} must be a 1-D array of shape (n_samples,), got {a.ndim}-D array of shape {a.shape}"
    )


def _length_message(name: str, got: int, n: int) -> str:
    return f"{name} has {got} entries but the features have {n} rows; they must match"


def as_label_array(name: str, y: Any, *, n: Optional[int] = None, allow_scalar: bool = False) -> np.ndarray:
    """Class labels -> 1-D ndarray (any orderable dtype: ints, floats, strings, bools).

    Rejects NaN/inf in float labels, None in object labels, complex labels, wrong ndim and a
    length different from ``n``.
    """
    a = _to_numpy(name, y)
    if a.dtype.kind == "c":
        raise TypeError(f"{name} has complex dtype {a.dtype}; class labels must be real or strings")
    a = _as_1d(name, a, allow_scalar)
    if n is not None and a.shape[0] != n:
        raise ValueError(_length_message(name, a.shape[0], n))
    if a.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    if a.dtype.kind == "f":
        _check_finite(name, a)
    elif a.dtype.kind == "O":
        if any(v is None or (isinstance(v, float) and not np.isfinite(v)) for v in a):
            raise ValueError(f"{name} contains None or NaN labels")
    elif a.dtype.kind not in "iubUS":
        raise TypeError(f"{name} has dtype {a.dtype}, which cannot hold class labels")
    return a


# --------------------------------------------------------------------------------------------
# consistency checks
# --------------------------------------------------------------------------------------------
def check_n_features(name: str, X: np.ndarray, n_features: int) -> None:
    """Raise ``ValueError`` if ``X.shape[1] != n_features``."""
    if X.shape[1] != n_features:
        raise ValueError(f"{name} has {X.shape[1]} features but the model was trained on {n_features}")


def check_same_length(name_X: str, X: np.ndarray, name_y: str, y: np.ndarray) -> None:
    """Raise ``ValueError`` if ``X`` and ``y`` have different numbers of samples."""
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{name_X} has {X.shape[0]} samples but {name_y} has {y.shape[0]}; they must match")


# --------------------------------------------------------------------------------------------
# scalars
# --------------------------------------------------------------------------------------------
def _as_real(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        if isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "fiu":
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    if not np.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def check_nonnegative_float(name: str, value: Any) -> float:
    """``value`` as a finite float ≥ 0."""
    v = _as_real(name, value)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


def check_positive_float(name: str, value: Any) -> float:
    """``value`` as a finite float > 0."""
    v = _as_real(name, value)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    return v


def check_float(
    name: str,
    value: Any,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """``value`` as a finite float within the bounds: ``low``/``high`` inclusive, or exclusive with
    ``low_open``/``high_open`` (bools are rejected; anything ``float()`` takes is accepted)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high:g}, got {v:g}")
    return v


def check_damping(damping: Any) -> float:
    """The damping λ added to the Hessian diagonal: a finite float ≥ 0."""
    return check_nonnegative_float("damping", damping)


# The C++ core's int: iteration counts and the like above this would not reach it intact.
INT32_MAX = 2**31 - 1


def check_int(
    name: str,
    value: Any,
    minimum: Optional[int] = None,
    maximum: Optional[int] = None,
    *,
    maximum_what: str = "",
) -> int:
    """``value`` as a Python int within [minimum, maximum] (bools are rejected)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        extra = f" ({maximum_what})" if maximum_what else ""
        raise ValueError(f"{name} must be <= {maximum}{extra}, got {v}")
    return v


def check_rng_seed(name: str, seed: Any) -> int:
    """A seed for ``np.random.default_rng``: an int >= 0."""
    return check_int(name, seed, 0)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; only real booleans are accepted."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_methods(name: str, methods: Any, allowed: Sequence[str]) -> Tuple[str, ...]:
    """A non-empty tuple of distinct names from ``allowed`` (one string is one name)."""
    if isinstance(methods, str):
        methods = (methods,)
    try:
        out = tuple(methods)
    except TypeError:
        raise TypeError(
            f"{name} must be a sequence of strings from {list(allowed)}, got {methods!r}"
        ) from None
    if not out:
        raise ValueError(f"{name} must name at least one of {list(allowed)}")
    for m in out:
        if m not in allowed:
            raise ValueError(f"{name} contains {m!r}; allowed: {list(allowed)}")
    if len(set(out)) != len(out):
        raise ValueError(f"{name} contains duplicates: {list(out)}")
    return out


# --------------------------------------------------------------------------------------------
# indices
# --------------------------------------------------------------------------------------------
def as_index_array(
    name: str, idx: Any, n: int, *, unique: bool = False, allow_empty: bool = True
) -> NDArray[np.int64]:
    """Training-point indices -> C-contiguous 1-D int64 array with values in [0, n).

    Accepts an int (one index), a sequence/array/tensor of ints (negative values count from the
    end, as in numpy) or a boolean mask of length exactly ``n``. A boolean array of another length
    and bool scalars are refused (``True`` is not index 1). Floats are refused even when
    integral. With ``unique``, repeated indices are refused.
    """
    if isinstance(idx, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer index or an array of indices, got bool {idx!r}")
    if isinstance(idx, numbers.Integral):
        i = operator.index(idx)
        if not -n <= i < n:  # also keeps Python ints beyond int64 out of numpy
            raise IndexError(f"{name} is {i}, out of range for {n} training points")
        a = np.array([i], dtype=np.int64)
    else:
        a = _to_numpy(name, idx)
        if a.ndim == 0:
            a = a.reshape(1)
        if a.ndim != 1:
            raise ValueError(f"{name} must be 1-D, got {a.ndim}-D array of shape {a.shape}")
        kind = a.dtype.kind
        if kind == "b":
            if a.shape[0] != n:
                raise ValueError(
                    f"{name} is a boolean array of length {a.shape[0]}; a boolean mask must have "
                    f"one entry per training point ({n}). Pass integer indices otherwise"
                )
            a = np.flatnonzero(a)
        elif kind in "iu":
            pass
        elif a.size == 0 and kind in "fO":  # [] from a Python list
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must contain integer indices, got dtype {a.dtype}")
    if a.size == 0 and not allow_empty:
        raise ValueError(f"{name} is empty; at least one training index is required")
    if a.size:
        lo, hi = int(a.min()), int(a.max())
        if lo < -n or hi >= n:
            bad = hi if hi >= n else lo
            raise IndexError(f"{name} contains index {bad}, out of range for {n} training points")
        if lo < 0:
            a = np.where(a < 0, a + n, a)
    if a.dtype != np.int64 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.int64)
    if unique and a.size > 1 and np.unique(a).size != a.size:
        raise ValueError(f"{name} contains repeated indices; each training point can be removed once")
    return a


def overflow_message(what: str, dtype_name: str, magnitudes: dict[str, float], float_max: float) -> str:
    """The message of a :class:`~pyinfluence.errors.NonFiniteError`: what overflowed, the largest magnitude of
    each input involved (``magnitudes``: name → max |value|), the likely culprit (the largest) and the cure.
    ``float_max``: the largest finite value of the computation's dtype (float32: suggest float64)."""
    culprit = max(magnitudes, key=magnitudes.__getitem__) if magnitudes else "X_train"
    shown = ", ".join(f"largest |{k}| = {v:.3g}" for k, v in magnitudes.items())
    f32 = (
        f"; or compute in float64 ({dtype_name}'s range ends at {float_max:.3g})"
        if dtype_name == "float32"
        else ""
    )
    return (
        f"{what}: the inputs are finite but too large in magnitude for {dtype_name}"
        f"{' (' + shown + ')' if shown else ''}. {culprit} is the likely cause: standardise the "
        f"features (zero mean, unit variance per feature, with the training set's statistics) and "
        f"refit{f32}. No influence value is returned or ranked when this happens."
    )
