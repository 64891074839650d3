"""A self-contained HTML report: one folder with ``report.html``, PNG figures and ``results.json``.

The page is rendered by jinja2 from ``pyinfluence/cli/templates/report.html.j2`` (with its
stylesheet ``report.css`` inlined) with autoescaping on, so every string given (titles, column
names, cells, captions) is escaped. The HTML references every figure by its file name
(``<img src="name.png">``) and carries its own CSS (no external stylesheet, font or script), so the
folder can be zipped, mailed and opened in any browser offline. Numbers shown in the HTML tables
are the same values written to ``results.json``, formatted for reading by the one formatter of the
package, :func:`pyinfluence._formatting.format_value`.

Figures are saved at :data:`FIGURE_DPI` (200) dots per inch and shown at their designed size (the
figure's width in inches at 96 CSS pixels per inch, never wider than the page), so that text drawn
at 8–10 pt stays legible and sharp on high-density screens.

Usage::

    rep = Report("out-dir", "My report", intro="What this is.")
    sec = rep.section("Influence versus retraining", numbered=True)   # "1. Influence versus ..."
    sec.text("Plain text; it is escaped.")
    sec.figure(fig, "loo", "Caption")          # saves out-dir/loo.png (a matplotlib Figure)
    sec.table(["method", "Pearson R"], [["Newton", 0.998]])
    rep.write(results={"loo": {...}})          # report.html and results.json; returns the path

Sections are numbered by the report (``numbered=True``), once: the number is part of the heading
and of its entry in the table of contents, which is an unnumbered list.

matplotlib is imported only by :meth:`Section.figure` when it is given a figure to save, and
figures are expected to be :class:`matplotlib.figure.Figure` objects created without pyplot, so
nothing global (backend, rcParams) is touched.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import pathlib
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from pyinfluence._formatting import format_value
from pyinfluence._json import jsonable

__all__ = ["CSS_PX_PER_INCH", "FIGURE_DPI", "PNG_SIGNATURE", "Report", "Section", "format_value", "is_png"]

#: The 8 bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: Dots per inch of the saved figures (a 6-inch figure is 1200 pixels wide).
FIGURE_DPI = 200
#: CSS pixels per inch: a figure is shown ``width_in_inches * 96`` CSS pixels wide (at most the page).
CSS_PX_PER_INCH = 96

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
#: A title that already carries a section number ("1. ...", "2) ...", "3.1 ...").
_NUMBERED_TITLE_RE = re.compile(r"^\s*(\d+[.)]|\d+(\.\d+)+[.)]?)\s")
_TEMPLATE = "report.html.j2"


def is_png(path: Union[str, pathlib.Path]) -> bool:
    """Whether the file starts with the PNG signature."""
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_SIGNATURE


def _png_css_width(path: pathlib.Path) -> Optional[int]:
    """The CSS width (px) of an existing PNG: its pixel width over its dots per inch (the pHYs
    chunk, pixels per metre) times 96; None when the file states no density."""
    data = path.read_bytes()
    if data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    (width,) = struct.unpack(">I", data[16:20])
    pos = 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"pHYs" and length == 9:
            ppm_x, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            if unit == 1 and ppm_x > 0:  # unit 1: pixels per metre
                return max(1, round(width / (ppm_x * 0.0254) * CSS_PX_PER_INCH))
            return None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".png"):
        raise ValueError(
            f"figure name must be a plain file stem (letters, digits, '_', '-', '.'; no '.png', "
            f"no folders), got {name!r}"
        )
    return name


def _is_number_cell(v: Any) -> bool:
    """Whether a table cell is a number (shown right-aligned): an int or float (numpy scalars
    included) that is not a bool."""
    v = v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_ENV: Any = None


def _environment() -> Any:
    """The jinja2 environment of the reports (built once): templates from the package's
    ``cli/templates`` folder, autoescape on, undefined names an error."""
    global _ENV
    if _ENV is None:
        import importlib.resources

        import jinja2

        folder = importlib.resources.files("pyinfluence.cli").joinpath("templates")

        def load(name: str) -> str:
            return folder.joinpath(name).read_text(encoding="utf-8")

        env = jinja2.Environment(
            loader=jinja2.FunctionLoader(load),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        env.filters["cell"] = format_value
        env.tests["number_cell"] = _is_number_cell
        _ENV = env
    return _ENV


@dataclass
class _Block:
    kind: str  # "text", "note", "figure", "table"
    payload: Any


@dataclass
class Section:
    """One part of a :class:`Report`: paragraphs, figures and tables in the order added.
    ``number``: its number in the report (None: not numbered); ``heading`` is what the page shows."""

    report: Report
    title: str
    anchor: str
    number: Optional[int] = None
    blocks: List[_Block] = field(default_factory=list)

    @property
    def heading(self) -> str:
        """The title as shown in the heading and the table of contents: "3. Title" when numbered."""
        return self.title if self.number is None else f"{self.number}. {self.title}"

    def text(self, *paragraphs: str) -> Section:
        """Add paragraphs of plain text (escaped; a blank line is not needed between them)."""
        for p in paragraphs:
            self.blocks.append(_Block("text", str(p)))
        return self

    def note(self, text: str) -> Section:
        """Add a highlighted paragraph (caveats, settings that matter)."""
        self.blocks.append(_Block("note", str(text)))
        return self

    def figure(self, fig: Any, name: str, caption: str = "", *, dpi: int = FIGURE_DPI) -> str:
        """Save ``fig`` (a matplotlib Figure) as ``<out>/<name>.png`` at ``dpi`` dots per inch, add it
        here with ``caption`` and return the file name. The page shows it at the figure's size
        (inches × 96 CSS px, at most the page width). ``fig`` may also be the name of an existing
        PNG in the report folder (then nothing is saved). The Figure is cleared afterwards."""
        name = _check_name(name)
        if isinstance(dpi, bool) or not isinstance(dpi, int) or dpi < 50:
            raise ValueError(f"dpi must be an int >= 50, got {dpi!r}")
        filename = f"{name}.png"
        if name in self.report._figure_names:
            raise ValueError(f"the report already has a figure named {name!r}")
        path = self.report.out_dir / filename
        width: Optional[int]
        if isinstance(fig, (str, pathlib.Path)):
            if not path.is_file():
                raise FileNotFoundError(f"figure file {path} does not exist")
            width = _png_css_width(path)
        else:
            if not hasattr(fig, "savefig"):
                raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
            inches = float(fig.get_size_inches()[0]) if hasattr(fig, "get_size_inches") else math.nan
            fig.savefig(path, dpi=dpi, format="png")
            width = round(inches * CSS_PX_PER_INCH) if math.isfinite(inches) and inches > 0 else None
            if hasattr(fig, "clear"):
                fig.clear()
        self.report._figure_names.append(name)
        self.blocks.append(_Block("figure", {"filename": filename, "caption": str(caption), "width": width}))
        return filename

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str = "",
        *,
        digits: int = 4,
    ) -> Section:
        """Add a table; cells are formatted by :func:`format_value` (``digits`` significant digits)
        and escaped; numbers are right-aligned."""
        cols = [str(c) for c in columns]
        body = []
        for r in rows:
            r = list(r)
            if len(r) != len(cols):
                raise ValueError(f"table row has {len(r)} cells but there are {len(cols)} columns")
            body.append(r)
        self.blocks.append(
            _Block("table", {"columns": cols, "rows": body, "caption": str(caption), "digits": int(digits)})
        )
        return self

    def key_values(self, items: Mapping[str, Any], caption: str = "") -> Section:
        """A two-column table of ``name: value`` pairs."""
        return self.table(["quantity", "value"], [[k, v] for k, v in items.items()], caption)


class Report:
    """A report folder: ``report.html``, its PNG figures and ``results.json``.

    ``out_dir`` is created if needed (an existing folder is reused; files of the same names are
    overwritten). ``title``/``intro`` head the page. Add sections with :meth:`section`, then
    :meth:`write`. With more than two sections the page opens with a table of contents.
    """

    HTML_NAME = "report.html"
    JSON_NAME = "results.json"

    def __init__(self, out_dir: Union[str, pathlib.Path], title: str, intro: str = "") -> None:
        self.out_dir = pathlib.Path(out_dir)
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise NotADirectoryError(f"{self.out_dir} exists and is not a folder")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.title = str(title)
        self.intro: List[str] = [intro] if intro else []
        self.sections: List[Section] = []
        self._figure_names: List[str] = []
        self.footer = ""
        self._json_written = False

    @property
    def figures(self) -> List[str]:
        """File names of the figures added so far (``name.png``)."""
        return [f"{n}.png" for n in self._figure_names]

    def section(self, title: str, anchor: Optional[str] = None, *, numbered: bool = False) -> Section:
        """Start a new section (appended at the end) and return it. ``numbered``: the report
        numbers it (1, 2, ... over the numbered sections, in order) in its heading and in the
        table of contents; its ``title`` must then not start with a number of its own."""
        title = str(title)
        if numbered and _NUMBERED_TITLE_RE.match(title):
            raise ValueError(
                f"title {title!r} already starts with a number; with numbered=True the report numbers "
                f"the sections: drop the number from the title"
            )
        if anchor is None:
            anchor = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "section"
        taken = {s.anchor for s in self.sections}
        base, k = anchor, 2
        while anchor in taken:
            anchor, k = f"{base}-{k}", k + 1
        number = sum(s.number is not None for s in self.sections) + 1 if numbered else None
        s = Section(self, title, anchor, number)
        self.sections.append(s)
        return s

    def _context(self) -> Dict[str, Any]:
        return {
            "title": self.title,
            "intro": self.intro,
            "toc": len(self.sections) > 2,
            "sections": self.sections,
            "footer": self.footer,
            "stamp": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "json_name": self.JSON_NAME if self._json_written else "",
        }

    def html(self) -> str:
        """The page as a string (rendered from the package's ``report.html.j2``)."""
        return str(_environment().get_template(_TEMPLATE).render(**self._context()))

    def write(self, results: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
        """Write ``report.html`` (and ``results.json`` from ``results``, made JSON-ready with
        :func:`jsonable`; strict JSON: no NaN) into the folder; return the HTML's path."""
        if results is not None:
            text = json.dumps(jsonable(results), indent=1, allow_nan=False)
            (self.out_dir / self.JSON_NAME).write_text(text + "\n", encoding="utf-8")
            self._json_written = True
        path = self.out_dir / self.HTML_NAME
        path.write_text(self.html(), encoding="utf-8")
        return path
