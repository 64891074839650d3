"""Accuracy metrics of ``pyinfluence bench`` (numpy only; every input is converted to float64).

All compare an estimated ``up_loss`` matrix ``est`` with a reference ``ref`` of the same shape
(n_train, m_test), in our convention (``up_loss[i, j] = −g_testjᵀ (H + λI)⁻¹ g_train_i``; negative =
helpful).

- :func:`pearson`: Pearson r over all entries of the matrix (flattened).
- :func:`spearman`: Spearman ρ over all entries (Pearson r of the ranks; ties get their average
  rank, as ``scipy.stats.spearmanr``).
- :func:`topk_overlap`: for each test point j, the 10 (``k``) most **helpful** training points
  (most negative up_loss in column j) and the 10 most **harmful** ones (most positive) are
  taken in ``est`` and in ``ref``; the overlap of a pair of sets is |A ∩ B| / k. Returned: the
  mean over test points of the helpful overlap, of the harmful overlap, and their average
  (``"both"``, the number shown in the tables). Ties at the k-th place are broken by the lower
  training index (a stable sort), the same in both matrices.
- :func:`max_rel_err`: max |est − ref| / max |ref|.
- :func:`pareto_front`: which (time, error) points are not dominated.

Degenerate inputs: a constant array has no correlation; :func:`pearson` and :func:`spearman`
return NaN for it (the report writes it as null) rather than raising.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

__all__ = [
    "as_matrix",
    "max_rel_err",
    "pareto_front",
    "pearson",
    "rankdata",
    "spearman",
    "topk_overlap",
    "topk_sets",
]


def as_matrix(a: Any, name: str = "up_loss") -> np.ndarray:
    """A float64 numpy array from a numpy array or a torch tensor (any device)."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().double().numpy()
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a (n_train, m_test) matrix, got shape {arr.shape}")
    return arr


def _pair(est: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_matrix(est, "est"), as_matrix(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"est and ref must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    x = x - x.mean()
    y = y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    if not den > 0 or not math.isfinite(den):
        return math.nan
    r = float(x @ y) / den
    return max(-1.0, min(1.0, r))


def pearson(est: Any, ref: Any) -> float:
    """Pearson correlation of all entries of ``est`` and ``ref`` (NaN if either is constant or
    non-finite)."""
    a, b = _pair(est, ref)
    x, y = a.ravel(), b.ravel()
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return _corr(x, y)


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties sharing their average rank."""
    x = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    # boundaries of runs of equal values
    new = np.r_[True, xs[1:] != xs[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]
    avg = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(est: Any, ref: Any) -> float:
    """Spearman rank correlation of all entries (average ranks for ties; NaN if constant)."""
    a, b = _pair(est, ref)
    x, y = a.ravel(), b.ravel()
    if x.size < 2 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        return math.nan
    return _corr(rankdata(x), rankdata(y))


def topk_sets(M: Any, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(helpful, harmful) index arrays of shape (m, k): per column of M (n, m), the k rows with
    the most negative values and the k with the most positive (ties: lower index first)."""
    A = as_matrix(M)
    n = A.shape[0]
    k = min(int(k), n)
    helpful = np.argsort(A, axis=0, kind="stable")[:k].T
    harmful = np.argsort(-A, axis=0, kind="stable")[:k].T
    return helpful, harmful


def topk_overlap(est: Any, ref: Any, k: int = 10) -> dict[str, float]:
    """Mean top-k overlap per test point: ``{"helpful", "harmful", "both"}`` in [0, 1] (see the
    module docstring). NaN values in ``est`` give NaN."""
    a, b = _pair(est, ref)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not np.isfinite(a).all():
        return {"helpful": math.nan, "harmful": math.nan, "both": math.nan}
    kk = min(int(k), a.shape[0])
    he, ha = topk_sets(a, kk)
    hr, rr = topk_sets(b, kk)
    m = a.shape[1]
    if m == 0:
        return {"helpful": math.nan, "harmful": math.nan, "both": math.nan}
    h = np.mean([len(set(he[j]) & set(hr[j])) / kk for j in range(m)])
    r = np.mean([len(set(ha[j]) & set(rr[j])) / kk for j in range(m)])
    return {"helpful": float(h), "harmful": float(r), "both": float((h + r) / 2)}


def max_rel_err(est: Any, ref: Any) -> float:
    """max |est − ref| / max |ref| (NaN for a zero reference or non-finite values)."""
    a, b = _pair(est, ref)
    den = float(np.abs(b).max()) if b.size else 0.0
    if not den > 0 or not np.isfinite(a).all():
        return math.nan
    return float(np.abs(a - b).max()) / den


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (time, error) that no other point dominates — i.e. no other point
    has time ≤ and error ≤ with at least one strictly smaller. Points with a non-finite
    coordinate are never on the front. Returned in order of increasing time. Exact duplicates
    are all kept."""
    pts = [(float(t), float(e)) for t, e in points]
    ok = [i for i, (t, e) in enumerate(pts) if math.isfinite(t) and math.isfinite(e)]
    front = []
    for i in ok:
        ti, ei = pts[i]
        dominated = any(
            (pts[j][0] <= ti and pts[j][1] <= ei and (pts[j][0] < ti or pts[j][1] < ei)) for j in ok if j != i
        )
        if not dominated:
            front.append(i)
    front.sort(key=lambda i: (pts[i][0], pts[i][1]))
    return front
