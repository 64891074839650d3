"""Does influence predict retraining? (Koh & Liang 2017, Figure 2)

:func:`validate_loo` compares, for chosen test points, the PREDICTED change of the test loss when a
training point is removed (``loo_change``: the paper's first-order −(1/n)·I_up,loss, and/or one
exact Newton step) with the ACTUAL change after removing it and retraining, over the most
influential and some random training points of each test point.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._validation import check_int, check_methods, check_rng_seed, to_numpy
from pyinfluence.applications.plotting import axes_for
from pyinfluence.applications.progress import progress_iter
from pyinfluence.applications.results import Result, fit_stats
from pyinfluence.interface import Influence

__all__ = ["PAPER_FIG2_PEARSON", "LOOValidation", "highest_loss_points", "validate_loo"]

#: Pearson R printed in Koh & Liang (2017), Figure 2 (10-class MNIST): the CNN panel, influence
#: computed with CG on the 100 most influential training points, actual change by retraining from
#: the trained weights. (The authors' notebook gives 0.875 for the same data.)
PAPER_FIG2_PEARSON: Dict[str, float] = {"cnn": 0.86}

_METHOD_LABELS = {
    "influence": "first order, -up_loss/n",
    "newton": "Newton step",
}

#: retrain(X_test (m, ...), y_test (m,), train_idx (k,)) -> actual loss changes (k, m)
RetrainFn = Callable[[Any, Any, NDArray[np.int64]], Any]


@dataclass
class LOOValidation(Result):
    """Predicted versus actual leave-one-out changes of test losses.

    For test point j (of m) and its k training points ``train_idx[j]`` (the ``n_top`` with the
    largest |up_loss| first, then ``n_random`` others drawn at random):

    - ``actual[j]`` (k,): L(z_test, θ̂₋ᵢ) − L(z_test, θ̂), the change of test loss j after removing
      training point i and retraining (positive: removing i raises the test loss, i.e. i helped);
    - ``predicted[method][j]`` (k,): ``loo_change(method=...)`` for the same pairs (``"influence"``:
      −(1/n)·up_loss; ``"newton"``: one Newton step on the leave-one-out objective);
    - ``is_top[j]`` (k,): True for the most influential points, False for the random ones;
    - ``stats[method]``: Pearson R and the slopes of actual regressed on predicted (through the
      origin and OLS; > 1 means the estimate under-predicts) over all m·k pairs pooled;
      ``stats_per_test[method][j]`` the same per test point.

    ``test_losses`` (m,) (given, or ``inf.loss(X_test, y_test)`` of an Influence), ``n_train``,
    ``seed``, ``time_predict_s``, ``time_retrain_s`` complete it.
    """

    methods: List[str]
    train_idx: List[NDArray[np.int64]]
    is_top: List[NDArray[np.bool_]]
    actual: List[NDArray[np.float64]]
    predicted: Dict[str, List[NDArray[np.float64]]]
    stats: Dict[str, Dict[str, float]]
    stats_per_test: Dict[str, List[Dict[str, float]]]
    test_losses: Optional[NDArray[np.float64]]
    n_train: int
    n_top: int
    n_random: int
    seed: int
    time_predict_s: float = 0.0
    time_retrain_s: float = 0.0
    label: str = ""
    info: Dict[str, Any] = field(default_factory=dict)

    def pooled(self, method: Optional[str] = None) -> Dict[str, np.ndarray]:
        """All pairs concatenated: ``{"actual": (m·k,), "predicted": (m·k,), "is_top": (m·k,)}``
        for ``method`` (default: the first one)."""
        method = self.methods[0] if method is None else method
        if method not in self.predicted:
            raise ValueError(f"method must be one of {self.methods}, got {method!r}")
        return {
            "actual": np.concatenate(self.actual),
            "predicted": np.concatenate(self.predicted[method]),
            "is_top": np.concatenate(self.is_top),
        }

    def plot(self, ax: Any = None, *, paper: Optional[Mapping[str, float]] = None) -> Any:
        """Scatter of predicted (y) against actual (x) change per method (one panel each), the y = x
        line, Pearson R and the slope in the legend. ``paper``: optional {method: paper's R} to
        print in the panel (e.g. ``{"influence": PAPER_FIG2_PEARSON["cnn"]}`` for a CNN).
        ``ax``: None, a Figure, an Axes (one method) or a sequence of Axes. Returns the Figure."""
        fig, axs = axes_for(ax, len(self.methods))
        for a, method in zip(axs, self.methods):
            d = self.pooled(method)
            act, pred, top = d["actual"], d["predicted"], d["is_top"]
            s = self.stats[method]
            a.scatter(act[top], pred[top], s=14, alpha=0.75, color="C0", label="most influential")
            if (~top).any():
                a.scatter(act[~top], pred[~top], s=14, alpha=0.75, color="C1", label="random")
            vals = np.concatenate([act, pred])
            lo, hi = (float(vals.min()), float(vals.max())) if vals.size else (-1.0, 1.0)
            pad = 0.05 * (hi - lo if hi > lo else 1.0)
            a.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8, alpha=0.4, zorder=0)
            a.plot([], [], " ", label=f"R = {s['pearson']:.3f}, slope = {s['slope_origin']:.2f}")
            if paper and method in paper:
                a.plot([], [], " ", label=f"paper: R = {paper[method]:.2f}")
            a.set_xlabel("actual change in test loss (retrained)")
            a.set_ylabel("predicted change in test loss")
            title = _METHOD_LABELS.get(method, method)
            a.set_title(f"{self.label}: {title}" if self.label else title, fontsize=10)
            a.legend(fontsize=7, loc="upper left")
        return fig


def highest_loss_points(
    model_or_loss: Any, X_test: Any = None, y_test: Any = None, k: int = 1
) -> NDArray[np.int64]:
    """Indices of the ``k`` test points with the highest loss, highest first (the paper picked a
    wrongly classified test point; the highest loss is a deterministic choice of one).

    ``model_or_loss``: a model with ``loss(X, y)`` (per-example losses, e.g. a pyinfluence linear
    model) used with ``X_test``, ``y_test``; or an array of per-example test losses."""
    k = check_int("k", k, 1)
    if X_test is None:
        losses = to_numpy(model_or_loss, np.float64).ravel()
    else:
        loss_fn = getattr(model_or_loss, "loss", None)
        if loss_fn is None:
            raise TypeError("model_or_loss must have a loss(X, y) method when X_test is given")
        losses = to_numpy(loss_fn(X_test, y_test), np.float64).ravel()
    if k > losses.size:
        raise ValueError(f"k={k} exceeds the number of test points ({losses.size})")
    return np.argsort(-losses, kind="stable")[:k].astype(np.int64)


def _single(X: Any, y: Any, j: int) -> Any:
    """Test point j as a batch of one (works for numpy arrays, torch tensors and lists)."""
    return X[j : j + 1], y[j : j + 1]


def validate_loo(
    inf: Influence,
    X_test: Any,
    y_test: Any,
    *,
    n_top: int = 50,
    n_random: int = 50,
    seed: int = 0,
    methods: Sequence[str] = ("influence", "newton"),
    retrain: Optional[RetrainFn] = None,
    test_losses: Optional[ArrayLike] = None,
    chunk: int = 10,
    progress: bool = False,
    label: str = "",
) -> LOOValidation:
    """Predicted versus actual leave-one-out change for each test point in ``X_test``.

    For each test point j (``X_test`` (m, ...), ``y_test`` (m,); a single point may be given as
    ``X_test[None]``): the ``n_top`` training points with the largest |up_loss| for it (ties broken
    by index), plus ``n_random`` other training points drawn with ``np.random.default_rng(seed)``
    (one generator, used for the test points in order). For each (test, train) pair:

    - predicted: ``inf.loo_change(x_j, y_j, train_idx, method=m)`` for m in ``methods``
      (``"influence"``: −(1/n)·up_loss, the paper's estimate; ``"newton"``: one Newton step on the
      leave-one-out objective, both paths);
    - actual: ``retrain(X_test, y_test, train_idx)`` → (k, m) changes L(θ̂₋ᵢ) − L(θ̂) of every test
      loss after removing each training point and retraining. Default: ``inf.retrain_loo`` where the
      influence object can retrain (``inf.can_retrain``: LinearInfluence's exact refits; TorchInfluence's
      quasi-Newton retraining from θ̂ to a gradient-norm tolerance, in one process). Or pass a callable
      that retrains another way (e.g. a fixed number of SGD steps, as in the paper) — the training points
      of all test points are retrained once each and every refit is evaluated on all m test points.

    Signs (Koh & Liang): positive change = removing the point raises the test loss (it helped).
    Returns :class:`LOOValidation` (``.stats[method]["pearson"]``, ``["slope_origin"]``, ...;
    ``.plot()``; ``.to_dict()``). ``chunk``: refits per ``retrain`` call (progress granularity).
    """
    n = int(inf.n_train)
    n_top = check_int("n_top", n_top, 0)
    n_random = check_int("n_random", n_random, 0)
    if n_top + n_random < 2:
        raise ValueError(f"n_top + n_random must be >= 2 (got {n_top} + {n_random})")
    if n_top + n_random > n:
        raise ValueError(f"n_top + n_random = {n_top + n_random} exceeds the number of training points ({n})")
    seed = check_rng_seed("seed", seed)
    chunk = check_int("chunk", chunk, 1)
    methods = check_methods("methods", methods, ("influence", "newton"))
    if retrain is None:
        retrain = getattr(inf, "retrain_loo", None)
        if retrain is None or not getattr(inf, "can_retrain", True):
            why = "has no retrain_loo" if retrain is None else "cannot refit its model (can_retrain is False)"
            raise ValueError(
                f"{type(inf).__name__} {why}; pass retrain=callable(X_test, y_test, train_idx) -> (k, m) "
                f"actual loss changes"
            )
    elif not callable(retrain):
        raise TypeError(f"retrain must be callable, got {type(retrain).__name__}")
    if "newton" in methods and not _has_method_kw(inf):
        raise ValueError(
            f"methods contains 'newton' but {type(inf).__name__}.loo_change has no method= "
            f"argument; "
            f"use methods=('influence',)"
        )
    m = len(X_test)
    if m == 0:
        raise ValueError("X_test is empty")
    if len(y_test) != m:
        raise ValueError(f"X_test has {m} points but y_test has {len(y_test)}; they must match")
    if np.ndim(X_test) == 1:
        raise ValueError("X_test must have one row per test point; for a single point pass X_test[None]")

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    train_idx: List[NDArray[np.int64]] = []
    is_top: List[NDArray[np.bool_]] = []
    predicted: Dict[str, List[NDArray[np.float64]]] = {mt: [] for mt in methods}
    for j in range(m):
        xj, yj = _single(X_test, y_test, j)
        up = to_numpy(inf.up_loss(xj, yj), np.float64).reshape(n, -1)[:, 0]
        top = np.argsort(-np.abs(up), kind="stable")[:n_top]
        others = np.setdiff1d(np.arange(n), top)
        rand = rng.choice(others, n_random, replace=False) if n_random else np.empty(0, np.int64)
        idx = np.concatenate([top, rand]).astype(np.int64)
        train_idx.append(idx)
        is_top.append(np.arange(idx.size) < top.size)
        for mt in methods:
            kw: Dict[str, Any] = {} if mt == "influence" and not _has_method_kw(inf) else {"method": mt}
            p = to_numpy(inf.loo_change(xj, yj, idx, **kw), np.float64).reshape(idx.size, -1)[:, 0]
            predicted[mt].append(p)
    t_pred = time.perf_counter() - t0

    # Actual: retrain once per distinct training point; each refit evaluates every test point.
    t0 = time.perf_counter()
    union = np.unique(np.concatenate(train_idx))
    blocks = [union[i : i + chunk] for i in range(0, union.size, chunk)]
    rows = []
    for b in progress_iter(blocks, enabled=progress, total=len(blocks), desc="leave-one-out retraining"):
        r = to_numpy(retrain(X_test, y_test, b), np.float64)
        if r.shape != (b.size, m):
            raise ValueError(
                f"retrain returned shape {r.shape}; expected (len(train_idx), n_test) = ({b.size}, {m})"
            )
        rows.append(r)
    actual_all = np.concatenate(rows, axis=0)
    pos = {int(i): r for r, i in enumerate(union)}
    actual = [actual_all[[pos[int(i)] for i in idx], j] for j, idx in enumerate(train_idx)]
    t_retrain = time.perf_counter() - t0

    stats = {mt: fit_stats(np.concatenate(actual), np.concatenate(predicted[mt])) for mt in methods}
    per_test = {mt: [fit_stats(a, p) for a, p in zip(actual, predicted[mt])] for mt in methods}
    if test_losses is None and isinstance(inf, Influence):
        test_losses = inf.loss(X_test, y_test)
    losses = None if test_losses is None else to_numpy(test_losses, np.float64).ravel()
    return LOOValidation(
        methods=list(methods),
        train_idx=train_idx,
        is_top=is_top,
        actual=actual,
        predicted=predicted,
        stats=stats,
        stats_per_test=per_test,
        test_losses=losses,
        n_train=n,
        n_top=n_top,
        n_random=n_random,
        seed=seed,
        time_predict_s=t_pred,
        time_retrain_s=t_retrain,
        label=label,
    )


def _has_method_kw(inf: Any) -> bool:
    """Whether ``inf.loo_change`` accepts ``method=`` (LinearInfluence does; a minimal torch
    implementation may not)."""
    import inspect

    try:
        return "method" in inspect.signature(inf.loo_change).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return True
