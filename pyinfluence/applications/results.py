"""The applications' result objects: the :class:`Result` base class (``to_dict``), agreement statistics
(:func:`fit_stats`) and the conversion of either path's arrays to numpy (:func:`to_numpy`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Tuple

import numpy as np
from numpy.typing import ArrayLike

from pyinfluence._json import jsonable
from pyinfluence._validation import to_numpy

__all__ = ["Result", "fit_stats", "to_numpy"]


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
