"""Shared machinery of the applications: result base class, array conversion, statistics, plotting
helpers, progress bars and the adapter to the linear path's training data and refits.

Nothing here has global side effects: matplotlib and tqdm are imported lazily inside the functions
that need them, and no backend, thread count or random state is ever set.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._json import jsonable

__all__ = ["Result", "fit_stats", "to_numpy"]


# ------------------------------------------------------------------------------------------------
# conversion
# ------------------------------------------------------------------------------------------------
def to_numpy(a: Any, dtype: Any = None) -> np.ndarray:
    """``a`` (numpy array, CPU/GPU torch tensor, list, scalar) as a numpy array (detached, on the
    CPU)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # torch.Tensor without importing torch
        a = a.detach().cpu().numpy()
    out = np.asarray(a)
    return out if dtype is None else out.astype(dtype, copy=False)


class Result:
    """Base of the applications' result dataclasses.

    ``to_dict()`` returns every field as plain Python (lists, floats, ints, strings, None for
    NaN/inf), ready for ``json.dumps``. Fields listed in ``_skip_in_dict`` (large inputs kept only
    for plotting, such as images) are left out.
    """

    _skip_in_dict: Tuple[str, ...] = ()

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of the numbers (see the class docstring)."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in self._skip_in_dict or f.name.startswith("_"):
                continue
            out[f.name] = jsonable(getattr(self, f.name))
        return out


# ------------------------------------------------------------------------------------------------
# statistics
# ------------------------------------------------------------------------------------------------
def fit_stats(actual: ArrayLike, predicted: ArrayLike) -> Dict[str, float]:
    """Agreement of predicted with actual changes: Pearson R, and the slope of actual regressed on
    predicted, through the origin (``actual ≈ b·predicted``, b = Σap/Σp²) and by ordinary least
    squares with an intercept. A slope above 1 means the prediction UNDER-estimates the actual
    effect. NaN where undefined (fewer than 2 points, or no variation)."""
    a = np.asarray(actual, dtype=np.float64).ravel()
    p = np.asarray(predicted, dtype=np.float64).ravel()
    if a.shape != p.shape:
        raise ValueError(f"actual has {a.size} values but predicted has {p.size}; they must match")
    nan = float("nan")
    if a.size < 2:
        return {"pearson": nan, "slope_origin": nan, "slope_ols": nan, "n": int(a.size)}
    with np.errstate(invalid="ignore", divide="ignore"):
        sa, sp = a.std(), p.std()
        pearson = float(np.mean((a - a.mean()) * (p - p.mean())) / (sa * sp)) if sa > 0 and sp > 0 else nan
        pp = float(p @ p)
        slope_origin = float(p @ a / pp) if pp > 0 else nan
        slope_ols = float(np.mean((a - a.mean()) * (p - p.mean())) / sp**2) if sp > 0 else nan
    return {
        "pearson": pearson,
        "slope_origin": slope_origin,
        "slope_ols": slope_ols,
        "n": int(a.size),
    }


# ------------------------------------------------------------------------------------------------
# argument checks (messages name the argument)
# ------------------------------------------------------------------------------------------------
def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {v}")
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


def check_methods(name: str, methods: Any, allowed: Sequence[str]) -> Tuple[str, ...]:
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


def as_matrix(name: str, X: Any, n_features: Optional[int] = None) -> NDArray[np.float64]:
    """A 2-D float64 array with finite values (1-D input is one row)."""
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


# ------------------------------------------------------------------------------------------------
# progress bars (tqdm if installed; nothing otherwise)
# ------------------------------------------------------------------------------------------------
def progress_iter(
    it: Iterable[Any], *, enabled: bool, total: Optional[int] = None, desc: str = ""
) -> Iterator[Any]:
    if not enabled:
        yield from it
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        yield from it
        return
    yield from tqdm(it, total=total, desc=desc, leave=False)


# ------------------------------------------------------------------------------------------------
# plotting helpers (matplotlib imported lazily; figures are created without pyplot's global state)
# ------------------------------------------------------------------------------------------------
def new_figure(figsize: Tuple[float, float]) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover
        raise ImportError(
            "plot() needs matplotlib; install it (pip install matplotlib, or pyinfluence[demo])"
        ) from exc
    return Figure(figsize=figsize, layout="constrained")


def axes_for(
    target: Any,
    n: int,
    *,
    ncols: Optional[int] = None,
    panel_size: Tuple[float, float] = (4.2, 3.8),
) -> Tuple[Any, List[Any]]:
    """(figure, list of n Axes) for ``target``: None (a new Figure), a Figure (subplots added to
    it), one Axes (n must be 1) or a sequence of n Axes."""
    ncols = n if ncols is None else ncols
    nrows = math.ceil(n / ncols)
    if target is None:
        fig = new_figure((panel_size[0] * ncols, panel_size[1] * nrows))
        axs = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
        for a in axs[n:]:
            a.set_visible(False)
        return fig, axs[:n]
    if hasattr(target, "add_subplot") and hasattr(target, "savefig"):  # a Figure
        axs = target.subplots(nrows, ncols, squeeze=False).ravel().tolist()
        for a in axs[n:]:
            a.set_visible(False)
        return target, axs[:n]
    if hasattr(target, "plot") and hasattr(target, "figure"):  # one Axes
        if n != 1:
            raise ValueError(f"ax: this plot has {n} panels; pass a Figure, a sequence of {n} Axes or None")
        return target.figure, [target]
    try:
        axs = list(target)
    except TypeError:
        raise TypeError(
            f"ax must be None, a matplotlib Figure, an Axes or a sequence of Axes, "
            f"got {type(target).__name__}"
        ) from None
    if len(axs) != n:
        raise ValueError(f"ax: this plot has {n} panels but {len(axs)} Axes were given")
    return axs[0].figure, axs


def show_image(
    ax: Any,
    x: ArrayLike,
    shape: Optional[Sequence[int]],
    title: str = "",
    cmap: str = "gray_r",
    **kw: Any,
) -> None:
    """Draw one image (flattened ``x`` reshaped to ``shape``; a channel-first (C, H, W) image with
    C = 1 is drawn as (H, W)) without axes ticks."""
    a = to_numpy(x, np.float64)
    if shape is not None:
        a = a.reshape(tuple(shape))
    a = np.squeeze(a)
    if a.ndim == 3 and a.shape[0] in (3, 4):
        a = np.moveaxis(a, 0, -1)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if a.ndim == 1:
        a = a[None, :]
    ax.imshow(a, cmap=cmap, interpolation="nearest", **kw)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


# ------------------------------------------------------------------------------------------------
# influence objects: the linear path's training data and exact refits
# ------------------------------------------------------------------------------------------------
def is_linear(inf: Any) -> bool:
    from pyinfluence.linear.influence import LinearInfluence

    return isinstance(inf, LinearInfluence)


def n_train_of(inf: Any) -> int:
    n = getattr(inf, "n_train", None)
    if n is None:
        raise TypeError(
            f"the influence object ({type(inf).__name__}) has no n_train; pass a "
            f"pyinfluence LinearInfluence or TorchInfluence"
        )
    return int(n)


def decode_labels(model: Any, y_enc: np.ndarray) -> np.ndarray:
    """Original label values of a pyinfluence linear model from its encoded labels."""
    classes = getattr(model, "classes_", None)
    if classes is None:  # regression: targets are the values
        return np.asarray(y_enc, dtype=np.float64).copy()
    y = np.asarray(y_enc, dtype=np.float64)
    if model._family == "smooth_hinge":
        idx = (y > 0).astype(np.intp)
    else:
        idx = np.rint(y).astype(np.intp)
    return np.asarray(classes)[idx]


def linear_training_data(inf: Any) -> Tuple[NDArray[np.float64], np.ndarray]:
    """(X_train (n, d) float64 copy, y_train in the model's original label values) of a
    LinearInfluence. (Uses the object's stored arrays; a public accessor is requested.)"""
    X = np.array(inf._X, dtype=np.float64, copy=True)
    y = decode_labels(inf.model, np.asarray(inf._y))
    return X, y


def refit_linear(model: Any, X: np.ndarray, y: Any, theta0: Optional[np.ndarray] = None) -> Any:
    """A copy of the pyinfluence linear ``model`` refitted exactly on (X, y), Newton warm-started
    at ``theta0`` (default: the model's θ̂). Labels must be among the model's classes. The
    objective is strictly convex for l2 > 0, so the result is the same optimum as ``fit`` from
    zero (to the fit tolerance), reached in fewer iterations."""
    new = copy.copy(model)
    Xf = np.ascontiguousarray(X, dtype=np.float64)
    y_enc = new._encode("y", y, np.float64, n=Xf.shape[0])
    theta0 = np.array(model.theta_ if theta0 is None else theta0, dtype=np.float64, copy=True)
    theta, n_iter, grad_norm = new._newton(Xf, y_enc, theta0, theta0.shape[0], what="refit")
    new.theta_ = theta
    new.n_iter_ = n_iter
    new.grad_norm_ = grad_norm
    return new


def linear_influence_like(inf: Any, model: Any, X: np.ndarray, y: Any, *, quiet: bool = False) -> Any:
    """A LinearInfluence for ``model`` on (X, y) with ``inf``'s damping and device (float64)."""
    from pyinfluence.errors import NotAtOptimumWarning
    from pyinfluence.linear.influence import LinearInfluence

    kw: Dict[str, Any] = {"damping": inf.damping}
    device = getattr(inf, "device", "cpu")
    if device not in (None, "cpu"):
        kw["device"] = device
    if quiet:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotAtOptimumWarning)
            return LinearInfluence(model, X, y, **kw)
    return LinearInfluence(model, X, y, **kw)


def check_rng_seed(name: str, seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(seed).__name__} {seed!r}")
    if int(seed) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(seed)}")
    return int(seed)


ArrayOrTensor = Union[np.ndarray, Any]
