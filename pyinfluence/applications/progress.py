"""Progress bars for the applications' long loops: tqdm when it is installed and asked for, else nothing
(tqdm is imported only then)."""

from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional

__all__ = ["progress_iter"]


def progress_iter(
    it: Iterable[Any], *, enabled: bool, total: Optional[int] = None, desc: str = ""
) -> Iterator[Any]:
    """The items of ``it``, under a tqdm bar when ``enabled`` and tqdm is installed."""
    if not enabled:
        yield from it
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is in the demo extra
        yield from it
        return
    yield from tqdm(it, total=total, desc=desc, leave=False)
