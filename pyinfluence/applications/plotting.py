"""Figures for the applications' ``plot`` methods: matplotlib is imported only when a figure is made, and
figures are created without pyplot, so no backend or global state is touched."""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike

from pyinfluence._validation import to_numpy

__all__ = ["axes_for", "new_figure", "show_image"]


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
