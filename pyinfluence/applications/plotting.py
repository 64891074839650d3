"""Figures for the applications' ``plot`` methods and the HTML reports: matplotlib is imported only when a
figure is made, and figures are created without pyplot, so no backend or global state is touched.

:func:`bulk_limits` and :func:`plot_with_zoom` keep a few outliers from squashing a scatter: the figure
gets a second row of panels zoomed to limits that hold the bulk of the points, and a caption sentence
saying how many points lie outside them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._formatting import format_percent
from pyinfluence._validation import to_numpy

__all__ = [
    "ZOOM_COVERAGE",
    "ZOOM_RATIO",
    "Zoom",
    "axes_for",
    "bulk_limits",
    "new_figure",
    "plot_with_zoom",
    "scatter_points",
    "show_image",
]


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
# outliers: limits that hold the bulk of a scatter, and a zoomed row of panels
# ------------------------------------------------------------------------------------------------
#: Share of the points the zoomed limits hold at least.
ZOOM_COVERAGE = 0.95
#: A panel is zoomed when its points span this many times the zoomed limits (on either axis).
ZOOM_RATIO = 2.0
#: Beyond the ``coverage`` quantile, points keep joining the bulk while each one's distance from
#: the centre is at most this factor times the previous one's (a gap this wide marks outliers).
_GAP_FACTOR = 1.5
#: MAD to standard deviation for normal data.
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class Zoom:
    """Axis limits that hold the bulk of a scatter of points (see :func:`bulk_limits`).

    ``xlim``, ``ylim``: (low, high) each; ``n_points``: the finite points considered;
    ``n_outside``: how many of them lie outside the limits; ``squashed``: whether the points span
    more than :data:`ZOOM_RATIO` times these limits on an axis (a few outliers set the full view's
    axes and squash the rest)."""

    xlim: Tuple[float, float]
    ylim: Tuple[float, float]
    n_points: int
    n_outside: int
    squashed: bool

    def describe(self) -> str:
        """'2 of 300 points lie outside the zoomed limits'."""
        verb = "lies" if self.n_outside == 1 else "lie"
        return f"{self.n_outside} of {self.n_points} points {verb} outside the zoomed limits"


def _robust_scale(v: NDArray[np.float64]) -> float:
    """A scale of ``v`` that outliers barely move: the MAD (× 1.4826), else the interquartile
    range / 1.349, else the standard deviation, else 1 (all values equal)."""
    med = float(np.median(v))
    for s in (
        _MAD_TO_SD * float(np.median(np.abs(v - med))),
        float(np.subtract(*np.percentile(v, [75, 25]))) / 1.349,
        float(np.std(v)),
    ):
        if s > 0 and math.isfinite(s):
            return s
    return 1.0


def _span(lo: float, hi: float, scale: float, pad: float) -> Tuple[float, float]:
    """[lo, hi] widened by ``pad`` of its width on each side (a zero width: by ``pad`` × scale)."""
    width = hi - lo if hi > lo else scale
    return lo - pad * width, hi + pad * width


def bulk_limits(
    x: ArrayLike,
    y: ArrayLike,
    *,
    coverage: float = ZOOM_COVERAGE,
    pad: float = 0.05,
    ratio: float = ZOOM_RATIO,
) -> Zoom:
    """Axis limits for a scatter of (x, y) that hold the bulk of the points and leave out the few
    far ones that would otherwise set the axes.

    Each point's distance from the centre is d_i = max(|x_i − med x| / s_x, |y_i − med y| / s_y)
    with s a robust scale (the MAD × 1.4826). The bulk is the points with d_i up to the
    ``coverage`` quantile of d (so at least that share of the points), extended point by point in
    order of d while each next distance is at most 1.5 times the previous one (a wider gap marks
    outliers). The limits are the bulk's bounding box, padded by ``pad`` of its width on each side.
    Non-finite points are ignored. ``ratio``: the points are ``squashed`` when their full span is
    more than ``ratio`` times the limits' width on either axis.

    ``x``, ``y``: (N,) each. Raises ValueError when they differ in length or no point is finite."""
    xa, ya = to_numpy(x, np.float64).ravel(), to_numpy(y, np.float64).ravel()
    if xa.shape != ya.shape:
        raise ValueError(f"x and y must have the same length, got {xa.size} and {ya.size}")
    if not (isinstance(coverage, (int, float)) and 0.0 < coverage <= 1.0):
        raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
    if not (isinstance(pad, (int, float)) and 0.0 <= pad < 1.0):
        raise ValueError(f"pad must be in [0, 1), got {pad!r}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    if xa.size == 0:
        raise ValueError("x, y: no finite point to set limits from")
    sx, sy = _robust_scale(xa), _robust_scale(ya)
    d = np.maximum(np.abs(xa - np.median(xa)) / sx, np.abs(ya - np.median(ya)) / sy)
    ds = np.sort(d)
    j = max(int(math.ceil(coverage * ds.size)) - 1, 0)  # ds[: j + 1] holds >= coverage of the points
    floor = 1e-12 * max(float(ds[-1]), 1.0)
    while j + 1 < ds.size and ds[j + 1] <= _GAP_FACTOR * max(float(ds[j]), floor):
        j += 1
    inside = d <= ds[j]
    xlim = _span(float(xa[inside].min()), float(xa[inside].max()), sx, pad)
    ylim = _span(float(ya[inside].min()), float(ya[inside].max()), sy, pad)
    out = (xa < xlim[0]) | (xa > xlim[1]) | (ya < ylim[0]) | (ya > ylim[1])
    squashed = bool(
        (float(xa.max() - xa.min()) > ratio * (xlim[1] - xlim[0]))
        or (float(ya.max() - ya.min()) > ratio * (ylim[1] - ylim[0]))
    )
    return Zoom(xlim, ylim, int(xa.size), int(out.sum()), squashed)


def scatter_points(ax: Any) -> Tuple[NDArray[np.float64], NDArray[np.float64]]:
    """(x, y) of every point drawn by ``ax.scatter`` on the Axes ``ax`` (data coordinates), (N,) each."""
    parts = [
        np.asarray(c.get_offsets(), dtype=np.float64).reshape(-1, 2)
        for c in ax.collections
        if hasattr(c, "get_offsets") and c.get_offset_transform() is ax.transData
    ]
    pts = np.concatenate(parts) if parts else np.zeros((0, 2))
    return pts[:, 0], pts[:, 1]


def plot_with_zoom(
    draw: Callable[[List[Any]], Any],
    n_panels: int,
    *,
    coverage: float = ZOOM_COVERAGE,
    ratio: float = ZOOM_RATIO,
    panel_size: Tuple[float, float] = (4.2, 3.8),
) -> Tuple[Any, List[Zoom], str]:
    """A row of scatter panels drawn by ``draw(axes)`` (given a list of ``n_panels`` Axes; e.g. an
    application's ``plot(ax=...)``) and, when a few outliers squash a panel (see
    :func:`bulk_limits`), a second row with the same panels zoomed to the bulk of their points.

    Returns (Figure, the Zoom of each panel, a caption sentence saying what the zoomed row
    shows and how many points of each panel lie outside its limits; "" without a zoomed row)."""
    if isinstance(n_panels, bool) or not isinstance(n_panels, int) or n_panels < 1:
        raise ValueError(f"n_panels must be a positive int, got {n_panels!r}")
    w, h = panel_size
    probe = new_figure((w * n_panels, h))
    top = probe.subplots(1, n_panels, squeeze=False)[0].tolist()
    draw(top)
    zooms = []
    for a in top:
        px, py = scatter_points(a)
        zooms.append(bulk_limits(px, py, coverage=coverage, ratio=ratio) if px.size else None)
    if not any(z is not None and z.squashed for z in zooms):
        return probe, [z for z in zooms if z is not None], ""
    fig = new_figure((w * n_panels, 2 * h))
    axs = fig.subplots(2, n_panels, squeeze=False)
    draw(axs[0].tolist())
    draw(axs[1].tolist())
    parts = []
    for a, z, a_top in zip(axs[1], zooms, top):
        if z is None:
            continue
        a.set_xlim(*z.xlim)
        a.set_ylim(*z.ylim)
        a.set_title(f"{a.get_title()} (zoomed)", fontsize=a.title.get_fontsize())
        parts.append((a_top.get_title(), z))
    counts = {(z.n_outside, z.n_points) for _, z in parts}
    if len(counts) == 1:
        where = parts[0][1].describe() + (" in each panel" if len(parts) > 1 else "")
    else:
        where = "outside the zoomed limits: " + "; ".join(
            f"{z.n_outside} of {z.n_points} points ({t or f'panel {i + 1}'})"
            for i, (t, z) in enumerate(parts)
        )
    caption = (
        f"Top row: every point. Bottom row: the same panels zoomed to the bulk of the points "
        f"(limits holding at least {format_percent(coverage)} of them; a few far points set the full view's axes); "
        f"{where} (they are shown in the top row)."
    )
    return fig, [z for z in zooms if z is not None], caption
