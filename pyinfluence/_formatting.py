"""Numbers and tables for people to read: the one formatter behind the command line's screen tables
(:mod:`pyinfluence.cli.commands`), the HTML reports (:mod:`pyinfluence.cli.report`), the tables and
markdown of ``pyinfluence bench`` (:mod:`pyinfluence.bench.report`, :mod:`pyinfluence.bench.scaling`)
and the benchmark studies' sections of bench/RESULTS.md (:mod:`pyinfluence.bench.studies`).

- :func:`format_value`: one cell — floats to ``digits`` significant digits, integers as they are,
  None / NaN / inf as an en dash, booleans as yes / no, anything else ``str``.
- :func:`format_seconds`, :func:`format_bytes`, :func:`format_correlation`, :func:`format_percent`: a
  duration with its unit (s, ms, µs), a size (KiB … TiB), a correlation coefficient (more digits
  near 1), a fraction as a percentage.
- :func:`text_table` (aligned plain text for a terminal) and :func:`markdown_table`: a header and
  rows; cells that are not already strings go through :func:`format_value`.

Plain Python and the standard library only (numpy scalars are accepted through their ``item()``).
"""

from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Union

__all__ = [
    "DASH",
    "format_bytes",
    "format_correlation",
    "format_percent",
    "format_seconds",
    "format_value",
    "markdown_table",
    "text_table",
]

#: What an unknown or undefined number shows as.
DASH = "–"


def _plain(v: Any) -> Any:
    """A numpy scalar (or 0-d array) as the Python number it holds; anything else unchanged."""
    if hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "ndim", 1) == 0:
        return v.item()
    return v


def format_value(v: Any, digits: int = 4) -> str:
    """A table cell: floats with ``digits`` significant digits and no trailing zeros (``:g``;
    whole numbers below 1e7 stay whole), ints as they are, None/NaN/inf as an en dash, booleans as
    yes/no, numpy scalars as the Python value they hold, everything else ``str``."""
    if v is None:
        return DASH
    v = _plain(v)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return DASH
        if v.is_integer() and abs(v) < 1e7:
            return str(int(v))
        return f"{v:.{digits}g}"
    return str(v)


def format_seconds(s: Optional[float]) -> str:
    """A duration to 3 significant digits in s, ms or µs: "1.23 s", "12.3 ms", "523 µs", "1234 s";
    None or non-finite: an en dash. Negative durations (differences) keep their sign."""
    if s is None or not math.isfinite(s):
        return DASH
    r = float(f"{abs(s):.3g}")  # rounded first, so that 999.7 ms is shown as 1.00 s
    unit, scale = next((u, f) for u, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)) if r >= f or u == "µs")
    decimals = 0 if r >= 100 * scale else 1 if r >= 10 * scale else 2
    return f"{'-' if s < 0 else ''}{abs(s) / scale:.{decimals}f} {unit}"


def format_bytes(n: Optional[float]) -> str:
    """A byte count: '1 GiB', '512 MiB', '1.4 GiB', '300 bytes' (3 significant digits); None: an
    en dash."""
    if n is None:
        return DASH
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} bytes"


def format_correlation(r: Optional[float]) -> str:
    """A correlation coefficient: 4 decimals, 7 above 0.9999 (where the differences are); None:
    an en dash."""
    if r is None or not math.isfinite(r):
        return DASH
    return f"{r:.7f}" if r > 0.9999 else f"{r:.4f}"


def format_percent(fraction: Any, digits: int = 3) -> str:
    """A fraction as a percentage with ``digits`` significant digits and no trailing zeros (as
    :func:`format_value`): 0.95 → '95%', 0.125 → '12.5%', 1/3 → '33.3%'; None / NaN / inf: an en
    dash."""
    v = _plain(fraction)
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return DASH
    return f"{format_value(100.0 * float(v), digits)}%"


def _cells(columns: Sequence[Any], rows: Sequence[Sequence[Any]], digits: int) -> List[List[str]]:
    head = [str(c) for c in columns]
    out = [head]
    for r in rows:
        r = list(r)
        if len(r) != len(head):
            raise ValueError(f"table row has {len(r)} cells but there are {len(head)} columns")
        out.append([c if isinstance(c, str) else format_value(c, digits) for c in r])
    return out


def _aligns(align: Union[str, Sequence[str]], n: int) -> List[str]:
    """One of 'l' / 'r' per column; the last one given repeats."""
    a = list(align) or ["l"]
    if any(x not in ("l", "r") for x in a):
        raise ValueError(f"align takes 'l' and 'r' per column, got {align!r}")
    return (a + [a[-1]] * n)[:n]


def text_table(
    columns: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    *,
    indent: str = "  ",
    align: Union[str, Sequence[str]] = "r",
    rule: bool = False,
    digits: int = 6,
) -> str:
    """Aligned plain text: the header left-justified, then a line of dashes under each column when
    ``rule``, then the rows, each cell justified by ``align`` ('l'/'r' per column, the last one
    repeating: "lr" = first column left, the rest right). Lines carry no trailing blanks."""
    cells = _cells(columns, rows, digits)
    widths = [max(len(r[j]) for r in cells) for j in range(len(cells[0]))]
    al = _aligns(align, len(widths))
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(cells[0], widths))]
    if rule:
        lines.append(indent + "  ".join("-" * w for w in widths))
    for r in cells[1:]:
        lines.append(
            indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(r, widths, al))
        )
    return "\n".join(line.rstrip() for line in lines)


def markdown_table(
    columns: Sequence[Any],
    rows: Sequence[Sequence[Any]],
    *,
    align: Union[str, Sequence[str]] = "l",
    digits: int = 4,
) -> str:
    """A markdown (GitHub) table: header, the alignment row ('l' → ``---``, 'r' → ``---:`` per
    column, the last one repeating) and the rows; ``|`` inside a cell is escaped."""
    cells = _cells(columns, rows, digits)
    al = _aligns(align, len(cells[0]))

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in r) + " |"

    return "\n".join(
        [line(cells[0]), "|" + "".join("---:|" if a == "r" else "---|" for a in al)]
        + [line(r) for r in cells[1:]]
    )
