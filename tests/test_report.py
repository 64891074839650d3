"""The HTML reports: the table of contents, figure resolution, outlier zoom, escaping, and the
own-data reports of ``pyinfluence explain`` / ``mislabels`` (the model's accuracy against
scikit-learn, the flagged rows' feature values against the data written here, ``-k``).

The HTML is read back with the standard library's :class:`html.parser.HTMLParser` and the PNG
files by reading their chunks here (IHDR for the pixel size, pHYs for the density), independently
of the code that wrote them.
"""

from __future__ import annotations

import html.parser
import json
import pathlib
import re
import struct
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

import matplotlib  # noqa: F401  (the reports' figures need it: the test extra has it)
import numpy as np
import pytest

from pyinfluence._formatting import format_percent
from pyinfluence.applications.plotting import bulk_limits, plot_with_zoom, scatter_points
from pyinfluence.cli.commands import main
from pyinfluence.cli.report import CSS_PX_PER_INCH, FIGURE_DPI, Report

ESCAPE_ME = '<b>&"'


# ------------------------------------------------------------------------------------------------
# readers written here
# ------------------------------------------------------------------------------------------------
class _Page(html.parser.HTMLParser):
    """Headings, table-of-contents entries, tables (caption, header, rows of cell text) and
    images (attributes) of a report page, with character references decoded."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.h2: List[str] = []
        self.toc: List[str] = []
        self.tables: List[Dict[str, Any]] = []
        self.images: List[Dict[str, Optional[str]]] = []
        self.captions: List[str] = []
        self._stack: List[str] = []
        self._text: Optional[List[str]] = None

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        self._stack.append(tag)
        if tag == "table":
            self.tables.append({"caption": "", "header": [], "rows": []})
        elif tag == "tr" and self.tables:
            self._row: List[str] = []
        elif tag == "img":
            self.images.append(dict(attrs))
            self._stack.pop()  # a void element
        if tag in ("h2", "li", "th", "td", "caption", "figcaption"):
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._text is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        text = "".join(self._text or [])
        if tag == "h2":
            self.h2.append(text)
        elif tag == "li" and "nav" in self._stack:
            self.toc.append(text)
        elif tag in ("th", "td"):
            self._row.append(text)
        elif tag == "caption":
            self.tables[-1]["caption"] = text
        elif tag == "figcaption":
            self.captions.append(text)
        elif tag == "tr" and self.tables:
            t = self.tables[-1]
            if "thead" in self._stack:
                t["header"] = self._row
            else:
                t["rows"].append(self._row)
        if tag in ("h2", "li", "th", "td", "caption", "figcaption"):
            self._text = None
        while self._stack and self._stack.pop() != tag:
            pass


def read_page(path: pathlib.Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def png_size_and_dpi(path: pathlib.Path) -> Tuple[int, int, Optional[float]]:
    """(width px, height px, dots per inch from pHYs or None), from the file's chunks."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    pos, dpi = 8, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if data[pos + 4 : pos + 8] == b"pHYs":
            ppm, _, unit = struct.unpack(">IIB", data[pos + 8 : pos + 17])
            dpi = ppm * 0.0254 if unit == 1 else None
        pos += 12 + length
    return width, height, dpi


def table_with(page: _Page, caption_part: str) -> Dict[str, Any]:
    found = [t for t in page.tables if caption_part in t["caption"]]
    assert len(found) == 1, [t["caption"] for t in page.tables]
    return found[0]


# ------------------------------------------------------------------------------------------------
# the report building blocks
# ------------------------------------------------------------------------------------------------
def test_table_of_contents_numbers_each_section_once(tmp_path):
    rep = Report(tmp_path / "r", "t")
    titles = ["Alpha", "Beta", "Gamma"]
    for t in titles:
        rep.section(t, numbered=True)
    rep.section("About this run")
    page = read_page(rep.write())
    expected = [f"{i}. {t}" for i, t in enumerate(titles, start=1)] + ["About this run"]
    assert page.toc == expected  # the list itself is not numbered (<ul>), the text is: once
    assert page.h2 == expected
    assert "<ol" not in (tmp_path / "r" / "report.html").read_text()
    for entry in page.toc:
        assert not re.match(r"^\s*\d+\.\s*\d+\.", entry)
    with pytest.raises(ValueError, match="already starts with a number"):
        rep.section("4. Delta", numbered=True)
    rep.section("2024 results", numbered=True)  # a number that is not a section number


def test_figures_are_saved_at_the_report_resolution_and_shown_at_their_size(tmp_path):
    from matplotlib.figure import Figure

    assert FIGURE_DPI >= 150  # the new-user trial found 100 dpi figures' tick labels unreadable
    rep = Report(tmp_path / "r", "t")
    sec = rep.section("s")
    size = (5.0, 3.0)
    fig = Figure(figsize=size)
    fig.subplots().plot([0, 1], [1, 0])
    sec.figure(fig, "line")
    w, h, dpi = png_size_and_dpi(tmp_path / "r" / "line.png")
    assert (w, h) == (round(size[0] * FIGURE_DPI), round(size[1] * FIGURE_DPI))
    assert dpi == pytest.approx(FIGURE_DPI, rel=1e-3)
    other = Figure(figsize=size)
    other.subplots().plot([0, 1], [0, 1])
    other.savefig(tmp_path / "r" / "made_elsewhere.png", dpi=100)
    sec.figure("made_elsewhere", "made_elsewhere")  # an existing PNG: its size from its own header
    page = read_page(rep.write())
    widths = [int(im["width"] or 0) for im in page.images]
    assert widths == [round(size[0] * CSS_PX_PER_INCH)] * 2
    with pytest.raises(ValueError, match="dpi"):
        sec.figure(Figure(figsize=(1, 1)), "low", dpi=20)


def test_strings_are_escaped_everywhere(tmp_path):
    rep = Report(tmp_path / "r", ESCAPE_ME, intro=ESCAPE_ME)
    sec = rep.section(ESCAPE_ME, numbered=True)
    sec.text(ESCAPE_ME)
    sec.note(ESCAPE_ME)
    sec.table([ESCAPE_ME], [[ESCAPE_ME]], caption=ESCAPE_ME)
    path = rep.write()
    source = path.read_text()
    assert ESCAPE_ME not in source and "<b>" not in source
    page = read_page(path)
    assert page.h2 == [f"1. {ESCAPE_ME}"]
    t = page.tables[0]
    assert (t["caption"], t["header"], t["rows"]) == (ESCAPE_ME, [ESCAPE_ME], [[ESCAPE_ME]])


def test_format_percent_matches_python_formatting():
    rng = np.random.default_rng(0)
    for v in [0.0, 1.0, *rng.uniform(0, 1, 20)]:
        ref = f"{100 * v:.3g}"
        ref = str(int(float(ref))) if float(ref).is_integer() else ref
        assert format_percent(v) == f"{ref}%"
    assert format_percent(float("nan")) == format_percent(None) == "–"


# ------------------------------------------------------------------------------------------------
# outliers: the zoomed row of panels
# ------------------------------------------------------------------------------------------------
def _planted(n: int = 300, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points along y = x (as predicted against actual changes) and two planted outliers at ±4."""
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=0.2, size=n)
    y = x + rng.normal(scale=0.05, size=n)
    far = np.array([0, 1])
    x[far], y[far] = [4.0, -4.0], [4.0, -4.0]
    return x, y, far


def _outside(
    x: np.ndarray, y: np.ndarray, xlim: Tuple[float, float], ylim: Tuple[float, float]
) -> np.ndarray:
    return (x < xlim[0]) | (x > xlim[1]) | (y < ylim[0]) | (y > ylim[1])


def test_two_outliers_get_a_zoomed_panel_that_holds_the_rest():
    x, y, far = _planted()

    def draw(axs):
        for a in axs:
            a.scatter(x, y, s=5)
            a.set_title("panel")

    fig, zooms, caption = plot_with_zoom(draw, 2)
    axes = fig.axes
    assert len(axes) == 4  # the full row and the zoomed row
    for a in axes[2:]:
        out = _outside(x, y, a.get_xlim(), a.get_ylim())
        assert (~out).mean() >= 0.95
        assert out[far].all()  # the planted outliers are what is left out
        assert f"{out.sum()} of {x.size} points" in caption
    for a in axes[:2]:  # the full row still shows every point
        assert not _outside(x, y, a.get_xlim(), a.get_ylim()).any()
    assert all(z.squashed for z in zooms)


def test_no_zoom_without_outliers():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=300), rng.normal(size=300)

    def draw(axs):
        axs[0].scatter(x, y)

    fig, zooms, caption = plot_with_zoom(draw, 1)
    assert len(fig.axes) == 1 and caption == "" and not zooms[0].squashed
    z = bulk_limits(x, y)
    assert (~_outside(x, y, z.xlim, z.ylim)).mean() >= 0.95
    assert z.n_outside == int(_outside(x, y, z.xlim, z.ylim).sum())


def test_bulk_limits_rejects_bad_input():
    with pytest.raises(ValueError, match="x and y"):
        bulk_limits([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="coverage"):
        bulk_limits([1.0, 2.0], [1.0, 2.0], coverage=1.5)
    with pytest.raises(ValueError, match="finite"):
        bulk_limits([np.nan], [1.0])
    with pytest.raises(ValueError, match="n_panels"):
        plot_with_zoom(lambda axs: None, 0)


def test_zoom_reads_the_points_of_a_leave_one_out_plot():
    """The demo zooms LOOValidation.plot's panels: every (test, train) pair is found there."""
    import pyinfluence
    from pyinfluence.applications import validate_loo

    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=40) > 0).astype(np.int64)
    model = pyinfluence.LogisticRegression(l2=0.05).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    loo = validate_loo(inf, X[:1], y[:1], n_top=4, n_random=3)
    fig, zooms, _ = plot_with_zoom(lambda axs: loo.plot(ax=axs), len(loo.methods))
    for a, method in zip(fig.axes, loo.methods):
        px, py = scatter_points(a)
        d = loo.pooled(method)
        np.testing.assert_allclose(np.sort(px), np.sort(d["actual"]))
        np.testing.assert_allclose(np.sort(py), np.sort(d["predicted"]))
    assert [z.n_points for z in zooms] == [7] * len(loo.methods)


# ------------------------------------------------------------------------------------------------
# the own-data reports (explain / mislabels)
# ------------------------------------------------------------------------------------------------
def _data(n: int = 90, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Three overlapping classes (accuracy below 1) with two label errors."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    X = 1.2 * np.eye(3)[y] + rng.normal(size=(n, 3))
    y = y.copy()
    y[[5, 17]] = (y[[5, 17]] + 1) % 3
    return X, y


def _write_csv(path: pathlib.Path, X: np.ndarray, y: np.ndarray, names: List[str]) -> pathlib.Path:
    quoted = ['"' + c.replace('"', '""') + '"' for c in names]
    lines = [",".join(quoted + ["label"])]
    lines += [",".join(f"{v:.17g}" for v in row) + f",{t}" for row, t in zip(X, y)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sklearn_accuracy(
    X: np.ndarray, y: np.ndarray, l2: float, X_eval: np.ndarray, y_eval: np.ndarray
) -> float:
    """Accuracy of scikit-learn's multinomial logistic regression with the same optimum as
    pyinfluence's (C = 1 / (n l2); the intercept unpenalised in both)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0 / (len(y) * l2), tol=1e-12, max_iter=10_000).fit(X, y)
    return float(np.mean(clf.predict(X_eval) == y_eval))


def _fit_cell(page: _Page, which: str) -> float:
    t = table_with(page, "Model fit")
    row = [r for r in t["rows"] if r[0] == which]
    assert len(row) == 1
    return float(row[0][1])


def _assert_features(cells: List[str], expected: np.ndarray) -> None:
    np.testing.assert_allclose([float(c) for c in cells], expected, rtol=5e-4)


@pytest.mark.parametrize("k", [3, 7])
def test_mislabels_report_honours_k_and_shows_accuracy_and_feature_values(tmp_path, k):
    X, y = _data()
    names = [ESCAPE_ME, "f1", "f2"]
    csv_path = _write_csv(tmp_path / "m.csv", X, y, names)
    l2 = 0.01
    rc = main(
        ["mislabels", str(csv_path), "--label", "label", "-k", str(k), "--l2", str(l2)]
        + ["--report", str(tmp_path / "rep"), "--quiet"]
    )
    assert rc == 0
    path = tmp_path / "rep" / "report.html"
    page = read_page(path)
    assert _fit_cell(page, "training") == pytest.approx(_sklearn_accuracy(X, y, l2, X, y), abs=5e-4)
    t = table_with(page, "most suspicious rows")
    assert len(t["rows"]) == k  # -k rows, no more
    assert t["header"][-3:] == names  # the column name comes back unescaped: it was escaped once
    assert ESCAPE_ME not in path.read_text()
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [int(r[1]) for r in t["rows"]] == [r["train_index"] for r in res["rows"][:k]]
    for r in t["rows"]:
        _assert_features(r[-3:], X[int(r[1])])
    w, _, dpi = png_size_and_dpi(tmp_path / "rep" / "self_influence.png")
    assert dpi == pytest.approx(FIGURE_DPI, rel=1e-3)


def test_explain_report_shows_accuracy_and_the_rows_feature_values(tmp_path):
    X, y = _data(seed=1)
    names = [ESCAPE_ME, "f1", "f2"]
    csv_path = _write_csv(tmp_path / "e.csv", X, y, names)
    test_rows = [0, 4, 8, 20]
    l2, k = 0.01, 2
    rc = main(
        ["explain", str(csv_path), "--label", "label", "--test-indices", ",".join(map(str, test_rows))]
        + ["-k", str(k), "--l2", str(l2), "--report", str(tmp_path / "rep"), "--quiet"]
    )
    assert rc == 0
    page = read_page(tmp_path / "rep" / "report.html")
    keep = np.setdiff1d(np.arange(len(y)), test_rows)
    Xtr, ytr, Xte, yte = X[keep], y[keep], X[test_rows], y[test_rows]
    assert _fit_cell(page, "training") == pytest.approx(_sklearn_accuracy(Xtr, ytr, l2, Xtr, ytr), abs=5e-4)
    assert _fit_cell(page, "test") == pytest.approx(_sklearn_accuracy(Xtr, ytr, l2, Xte, yte), abs=5e-4)
    for j, row in enumerate(test_rows):
        t = table_with(page, f"test point {row}:")
        assert t["header"][-3:] == names
        kinds = [r[0] for r in t["rows"]]
        assert kinds == ["test point"] + ["helpful"] * k + ["harmful"] * k
        _assert_features(t["rows"][0][-3:], Xte[j])
        for r in t["rows"][1:]:
            _assert_features(r[-3:], X[int(r[2])])  # rows are numbered as in the file


def test_wide_data_shows_the_first_feature_columns(tmp_path):
    from pyinfluence.cli.commands import REPORT_MAX_FEATURES

    rng = np.random.default_rng(3)
    d = REPORT_MAX_FEATURES + 5
    X = rng.normal(size=(60, d))
    y = (X[:, 0] > 0).astype(np.int64)
    csv_path = _write_csv(tmp_path / "w.csv", X, y, [f"c{j}" for j in range(d)])
    rc = main(
        [
            "mislabels",
            str(csv_path),
            "--label",
            "label",
            "-k",
            "2",
            "--report",
            str(tmp_path / "r"),
            "--quiet",
        ]
    )
    assert rc == 0
    page = read_page(tmp_path / "r" / "report.html")
    t = table_with(page, "most suspicious rows")
    assert t["header"][6:] == [f"c{j}" for j in range(REPORT_MAX_FEATURES)]
    assert (
        f"first {REPORT_MAX_FEATURES} of the {d} feature columns"
        in (tmp_path / "r" / "report.html").read_text()
    )


def test_feature_values_of_parquet_rows_come_from_their_positions():
    """Parquet data: rows are numbered over the files with the held-out test rows among them; the
    report fetches the training rows by position (row minus the held-out rows before it)."""
    da = pytest.importorskip("dask.array")
    from pyinfluence.cli.commands import _train_features

    rng = np.random.default_rng(4)
    X_all = rng.normal(size=(30, 4))
    held_out = np.array([2, 3, 11, 29])
    train_rows = np.setdiff1d(np.arange(30), held_out)
    ud = SimpleNamespace(X_train=da.from_array(X_all[train_rows], chunks=7), held_out=held_out)
    rows = [12, 0, 28, 4, 12]
    got = _train_features({"data": ud, "dask": "local"}, rows, 3)
    np.testing.assert_array_equal(got, X_all[rows, :3])
