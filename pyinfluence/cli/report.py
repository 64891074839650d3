"""A self-contained HTML report: one folder with ``report.html``, PNG figures and ``results.json``.

The HTML references every figure by its file name (``<img src="name.png">``), carries its own CSS
(no external stylesheet, font or script) and escapes every string it is given, so the folder can
be zipped, mailed and opened in any browser offline. Numbers shown in the HTML tables are the
same values written to ``results.json`` (formatted for reading by
:func:`pyinfluence._formatting.format_value`).

Usage::

    rep = Report("out-dir", "My report", intro="What this is.")
    sec = rep.section("Influence versus retraining")
    sec.text("Plain text; it is escaped.")
    sec.figure(fig, "loo", "Caption")          # saves out-dir/loo.png (a matplotlib Figure)
    sec.table(["method", "Pearson R"], [["Newton", 0.998]])
    rep.write(results={"loo": {...}})          # report.html and results.json; returns the path

matplotlib is imported only by :meth:`Section.figure` when it is given a figure to save, and
figures are expected to be :class:`matplotlib.figure.Figure` objects created without pyplot, so
nothing global (backend, rcParams) is touched.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence, Union

from pyinfluence._formatting import format_value
from pyinfluence._json import jsonable

__all__ = ["PNG_SIGNATURE", "Report", "Section", "format_value", "is_png"]

#: The 8 bytes every PNG file starts with.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #1d1d1f; background: #fafafa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { font-size: 1.3em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.sub { color: #555; margin-top: 0; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; margin-top: 0.3em; }
table { border-collapse: collapse; margin: 0.8em 0 1.2em; font-size: 0.92em; }
caption { text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
nav ol { columns: 2; font-size: 0.95em; }
.note { background: #fff8e5; border-left: 4px solid #f0c36d; padding: 0.5em 0.8em; }
footer { color: #777; font-size: 0.85em; margin-top: 3em; }
"""


def is_png(path: Union[str, pathlib.Path]) -> bool:
    """Whether the file starts with the PNG signature."""
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_SIGNATURE


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name.endswith(".png"):
        raise ValueError(
            f"figure name must be a plain file stem (letters, digits, '_', '-', '.'; no '.png', "
            f"no folders), got {name!r}"
        )
    return name


@dataclass
class _Block:
    kind: str  # "text", "note", "figure", "table"
    payload: Any


@dataclass
class Section:
    """One part of a :class:`Report`: paragraphs, figures and tables in the order added."""

    report: Report
    title: str
    anchor: str
    blocks: List[_Block] = field(default_factory=list)

    def text(self, *paragraphs: str) -> Section:
        """Add paragraphs of plain text (escaped; a blank line is not needed between them)."""
        for p in paragraphs:
            self.blocks.append(_Block("text", str(p)))
        return self

    def note(self, text: str) -> Section:
        """Add a highlighted paragraph (caveats, settings that matter)."""
        self.blocks.append(_Block("note", str(text)))
        return self

    def figure(self, fig: Any, name: str, caption: str = "", *, dpi: int = 100) -> str:
        """Save ``fig`` (a matplotlib Figure) as ``<out>/<name>.png``, add it here with
        ``caption`` and return the file name. ``fig`` may also be the name of an existing PNG in
        the report folder (then nothing is saved). The Figure is closed/cleared afterwards."""
        name = _check_name(name)
        filename = f"{name}.png"
        if name in self.report._figure_names:
            raise ValueError(f"the report already has a figure named {name!r}")
        path = self.report.out_dir / filename
        if isinstance(fig, (str, pathlib.Path)):
            if not path.is_file():
                raise FileNotFoundError(f"figure file {path} does not exist")
        else:
            if not hasattr(fig, "savefig"):
                raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
            fig.savefig(path, dpi=dpi, format="png")
            if hasattr(fig, "clear"):
                fig.clear()
        self.report._figure_names.append(name)
        self.blocks.append(_Block("figure", (filename, str(caption))))
        return filename

    def table(
        self,
        columns: Sequence[str],
        rows: Sequence[Sequence[Any]],
        caption: str = "",
        *,
        digits: int = 4,
    ) -> Section:
        """Add a table; cells are formatted by :func:`format_value` and escaped."""
        cols = [str(c) for c in columns]
        body = []
        for r in rows:
            r = list(r)
            if len(r) != len(cols):
                raise ValueError(f"table row has {len(r)} cells but there are {len(cols)} columns")
            body.append(r)
        self.blocks.append(_Block("table", (cols, body, str(caption), int(digits))))
        return self

    def key_values(self, items: Mapping[str, Any], caption: str = "") -> Section:
        """A two-column table of ``name: value`` pairs."""
        return self.table(["quantity", "value"], [[k, v] for k, v in items.items()], caption)

    # -- rendering ---------------------------------------------------------------------------
    def _html(self) -> str:
        e = html.escape
        out = [f'<section id="{e(self.anchor)}">', f"<h2>{e(self.title)}</h2>"]
        for b in self.blocks:
            if b.kind == "text":
                out.append(f"<p>{e(b.payload)}</p>")
            elif b.kind == "note":
                out.append(f'<p class="note">{e(b.payload)}</p>')
            elif b.kind == "figure":
                fn, cap = b.payload
                out.append(
                    f'<figure><img src="{e(fn)}" alt="{e(cap or fn)}">'
                    + (f"<figcaption>{e(cap)}</figcaption>" if cap else "")
                    + "</figure>"
                )
            elif b.kind == "table":
                cols, body, cap, digits = b.payload
                t = ["<table>"]
                if cap:
                    t.append(f"<caption>{e(cap)}</caption>")
                t.append("<thead><tr>" + "".join(f"<th>{e(c)}</th>" for c in cols) + "</tr></thead>")
                t.append("<tbody>")
                for r in body:
                    cells = []
                    for v in r:
                        num = isinstance(v, (int, float)) and not isinstance(v, bool)
                        cls = ' class="num"' if num else ""
                        cells.append(f"<td{cls}>{e(format_value(v, digits))}</td>")
                    t.append("<tr>" + "".join(cells) + "</tr>")
                t.append("</tbody></table>")
                out.append("".join(t))
        out.append("</section>")
        return "\n".join(out)


class Report:
    """A report folder: ``report.html``, its PNG figures and ``results.json``.

    ``out_dir`` is created if needed (an existing folder is reused; files of the same names are
    overwritten). ``title``/``intro`` head the page. Add sections with :meth:`section`, then
    :meth:`write`.
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

    def section(self, title: str, anchor: Optional[str] = None) -> Section:
        """Start a new section (appended at the end) and return it."""
        if anchor is None:
            anchor = re.sub(r"[^a-z0-9]+", "-", str(title).lower()).strip("-") or "section"
        taken = {s.anchor for s in self.sections}
        base, k = anchor, 2
        while anchor in taken:
            anchor, k = f"{base}-{k}", k + 1
        s = Section(self, str(title), anchor)
        self.sections.append(s)
        return s

    def html(self) -> str:
        """The page as a string."""
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{e(self.title)}</title>",
            f"<style>{_CSS}</style>",
            "</head><body><main>",
            f"<h1>{e(self.title)}</h1>",
        ]
        for p in self.intro:
            parts.append(f'<p class="sub">{e(p)}</p>')
        if len(self.sections) > 2:
            parts.append("<nav><ol>")
            for s in self.sections:
                parts.append(f'<li><a href="#{e(s.anchor)}">{e(s.title)}</a></li>')
            parts.append("</ol></nav>")
        for s in self.sections:
            parts.append(s._html())
        stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
        foot = f"{self.footer} " if self.footer else ""
        json_link = (
            f' Numbers are also in <a href="{self.JSON_NAME}">{self.JSON_NAME}</a>.'
            if self._json_written
            else ""
        )
        parts.append(f"<footer>{e(foot)}Generated by pyinfluence on {e(stamp)}.{json_link}</footer>")
        parts.append("</main></body></html>")
        return "\n".join(parts) + "\n"

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
