"""The command line and its report: ``pyinfluence demo --quick`` end to end, ``explain``
and ``mislabels`` against direct LinearInfluence computations, and every error path.

The demo runs once per module (about half a minute on 2 cores), as ``python -m pyinfluence`` in
a subprocess: the same entry point as the ``pyinfluence`` console script.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import subprocess
import sys
from typing import Any, List

# The demo needs scikit-learn (bundled digits) and matplotlib (figures): both belong in the test
# extra, so a missing one fails here loudly instead of skipping the demo's checks.
import matplotlib  # noqa: F401
import numpy as np
import pytest
import sklearn  # noqa: F401

import pyinfluence
from pyinfluence.cli.commands import main
from pyinfluence.cli.report import PNG_SIGNATURE, Report, format_value


def _run_module(*args: str, cwd: pathlib.Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m pyinfluence ARGS`` in a fresh interpreter, run from ``cwd`` (a temporary
    folder: the installed package is imported, not the source tree)."""
    return subprocess.run(
        [sys.executable, "-m", "pyinfluence", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


# ================================================================================================
# pyinfluence demo --quick
# ================================================================================================
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("demo")
    out = base / "report"
    proc = _run_module("demo", "--quick", "--out", str(out), "--no-progress", cwd=base)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    html = (out / "report.html").read_text(encoding="utf-8")
    return {"out": out, "proc": proc, "results": results, "html": html}


EXPECTED_FIGURES = {
    "behaviour_1.png",
    "behaviour_2.png",
    "loo_logistic.png",
    "loo_cnn.png",
    "mislabel.png",
    "mislabel_top.png",
    "attack_example.png",
    "attack_summary.png",
    "domain.png",
}


@pytest.mark.slow
def test_demo_prints_the_report_path(demo):
    last = demo["proc"].stdout.strip().splitlines()[-1]
    assert last.startswith("report: ")
    path = pathlib.Path(last[len("report: ") :])
    assert path.is_absolute() and path == (demo["out"] / "report.html").resolve()
    assert "Traceback" not in demo["proc"].stderr


@pytest.mark.slow
def test_demo_figures_are_valid_pngs(demo):
    from matplotlib.image import imread

    figures = demo["results"]["figures"]
    assert set(figures) == EXPECTED_FIGURES
    on_disk = {p.name for p in demo["out"].glob("*.png")}
    assert on_disk == EXPECTED_FIGURES
    for name in figures:
        path = demo["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        img = imread(path)  # decoded by Pillow
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, (name, img.shape)
        assert float(img[..., :3].std()) > 0.01, f"{name} is blank"


@pytest.mark.slow
def test_demo_contents_are_numbered_once_and_figures_are_sharp(demo):
    """The new-user trial's findings: "1. 1. ..." in the table of contents, 100 dpi figures."""
    from PIL import Image

    from pyinfluence.cli.report import FIGURE_DPI

    nav = re.search(r"<nav>(.*?)</nav>", demo["html"], re.S)
    assert nav is not None and "<ol" not in nav.group(1)
    entries = re.findall(r"<li><a [^>]*>([^<]*)</a></li>", nav.group(1))
    numbered = [e for e in entries if re.match(r"\d+\. ", e)]
    assert [int(e.split(".")[0]) for e in numbered] == list(range(1, len(numbered) + 1))
    assert len(numbered) == 5 and not any(re.match(r"\d+\.\s*\d+\.", e) for e in entries)
    for name in demo["results"]["figures"]:
        with Image.open(demo["out"] / name) as img:
            assert img.info["dpi"][0] == pytest.approx(FIGURE_DPI, rel=1e-3), name


@pytest.mark.slow
def test_demo_html_references_every_figure_and_is_self_contained(demo):
    html = demo["html"]
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert set(srcs) == EXPECTED_FIGURES
    assert "<script" not in html.lower()
    assert not re.search(r"<link\b", html, re.IGNORECASE)
    assert not re.search(r'(src|href)="(https?:)?//', html, re.IGNORECASE)
    for section in ("behaviour", "loo", "mislabel", "attack", "domain"):
        assert f'id="{section}"' in html


@pytest.mark.slow
def test_demo_results_meet_their_bounds(demo):
    s = demo["results"]["summary"]
    # Figure 2, logistic regression: the Newton-step estimate tracks exact retraining
    newton = s["loo"]["logistic"]["newton"]
    assert newton["pearson"] >= 0.99, newton
    first = s["loo"]["logistic"]["influence"]["pearson"]
    assert 0.5 < first <= 1.0  # reported beside it, not bounded here
    cnn = s["loo"]["cnn"]
    assert cnn["paper_pearson"] == 0.86
    assert 0.5 < cnn["influence"]["pearson"] <= 1.0
    # the CNN's Newton-step row: on the same pairs as the first-order one, a finite correlation
    n_pairs = (
        demo["results"]["settings"]["cnn"]["loo_n_top"] + demo["results"]["settings"]["cnn"]["loo_n_random"]
    )
    assert cnn["newton"]["n"] == cnn["influence"]["n"] == n_pairs
    assert np.isfinite(cnn["newton"]["pearson"]) and -1.0 <= cnn["newton"]["pearson"] <= 1.0
    assert np.isfinite(cnn["newton"]["slope_origin"])
    # Section 5.4: at 10% of the training data checked, self-influence beats loss and random
    found = s["mislabel"]["found_at_10_percent"]
    assert found["influence"] > found["loss"], found
    assert found["influence"] > found["random"], found
    # Section 5.2: the fraction of targets flipped is reported
    att = s["attack"]
    assert 0.0 <= att["fraction_flipped"] <= 1.0
    assert att["fraction_flipped"] == pytest.approx(att["n_flipped"] / att["n_targets"])
    # Section 5.3: the feature that drives the wrong prediction is found
    assert s["domain"]["responsible_feature"] == "age<10"
    # Figure 4: both models' statistics are there
    assert set(s["behaviour"]) == {"RBF model", "CNN"}
    # the full results behind the summary
    r = demo["results"]
    assert r["loo"]["logistic"]["stats"]["newton"]["pearson"] == newton["pearson"]
    assert (
        len(r["loo"]["cnn"]["actual"][0])
        == r["settings"]["cnn"]["loo_n_top"] + r["settings"]["cnn"]["loo_n_random"]
    )
    rc = r["loo"]["cnn"]
    assert rc["methods"] == ["influence", "newton"]
    assert len(rc["predicted"]["newton"][0]) == len(rc["actual"][0])
    assert rc["stats"]["newton"] == cnn["newton"]
    # the refits reached the tolerance the report states
    assert rc["retrain_max_grad_norm"] <= rc["retrain_tol"] < 1e-6
    # the damping of both estimates follows the ladder rule: the first value not below the trained
    # CNN's damping that no removal rejected (every rejected one is smaller)
    ladder = r["settings"]["cnn"]["loo_dampings"]
    assert cnn["damping"] == rc["damping"] >= rc["model"]["damping"]
    assert cnn["damping"] in ladder or cnn["damping"] == rc["model"]["damping"]
    assert all(d["damping"] < cnn["damping"] for d in rc["damping_rejected"])
    assert r["mode"] == "quick" and r["seed"] == 0


@pytest.mark.slow
def test_demo_numbers_in_html_match_results_json(demo):
    from pyinfluence.cli.demo import CNN_LOO_DIGITS

    s, html = demo["results"]["summary"], demo["html"]
    cnn = s["loo"]["cnn"]
    for v in (
        cnn["influence"]["pearson"],
        cnn["influence"]["slope_origin"],
        cnn["newton"]["pearson"],
        cnn["newton"]["slope_origin"],
    ):
        assert f">{format_value(v, CNN_LOO_DIGITS)}<" in html, v
    for v in (
        s["loo"]["logistic"]["newton"]["pearson"],
        s["loo"]["logistic"]["influence"]["pearson"],
        s["mislabel"]["found_at_10_percent"]["influence"],
        s["mislabel"]["found_at_10_percent"]["loss"],
        s["mislabel"]["found_at_10_percent"]["random"],
        s["attack"]["fraction_flipped"],
    ):
        assert f">{format_value(v)}<" in html, v


def test_cnn_loo_damping_ladder(monkeypatch):
    """The CNN's leave-one-out check takes the first damping of its ladder, not below the trained
    CNN's own, at which no removal raises NotPositiveDefiniteError; a larger damping gets its own
    TorchInfluence of the same model and l2; when every damping fails, the error is raised."""
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from pyinfluence.cli import demo as demo_mod
    from pyinfluence.errors import NotAtOptimumWarning, NotPositiveDefiniteError

    gen = torch.Generator().manual_seed(0)
    X = torch.rand(12, 1, 8, 8, generator=gen, dtype=torch.float64)
    y = torch.arange(12) % 3
    tensors = (X, y, X[:2], y[:2])
    calls: List[Any] = []

    def run(threshold, damping, ladder):
        calls.clear()

        def fake_validate_loo(inf, *args, **kwargs):
            calls.append(inf)
            assert kwargs["methods"] == ("influence", "newton")
            if inf.damping < threshold:
                raise NotPositiveDefiniteError(
                    "loo_change(method='newton') (removal training point 7): H + λI is not positive definite"
                )
            return "validation"

        monkeypatch.setattr(demo_mod, "app", SimpleNamespace(validate_loo=fake_validate_loo))
        own = SimpleNamespace(damping=damping)
        model = demo_mod.DigitsCNN(2, 3).to(torch.float64)
        cnn: Any = SimpleNamespace(damping=damping, influence=own, model=model, l2=0.1)
        no_retrainer: Any = None  # never called: validate_loo is replaced
        pc = {"loo_dampings": ladder, "loo_n_top": 2, "loo_n_random": 1}
        # a new TorchInfluence of the (untrained) stand-in model warns that it is not at an optimum
        with pytest.warns(NotAtOptimumWarning) if threshold > damping else contextlib.nullcontext():
            out = demo_mod._validate_cnn_loo(
                cnn, tensors, np.array([0]), np.zeros(2), pc, no_retrainer, 0, False
            )
        return own, out

    # the trained CNN's damping (0) is rejected, then 1e-4; 1e-3 is taken
    own, (loo, inf, lam, rejected) = run(5e-4, 0.0, (0.0, 1e-4, 1e-3, 1e-2))
    assert loo == "validation" and lam == 1e-3
    assert calls[0] is own and [c.damping for c in calls] == [0.0, 1e-4, 1e-3]
    assert inf is calls[-1] and inf.damping == 1e-3 and inf.l2 == 0.1
    assert [(d["damping"], d["train_index"]) for d in rejected] == [(0.0, 7), (1e-4, 7)]
    # a trained CNN that already needed damping starts there (its own influence object), skipping
    # the smaller values of the ladder
    own, (_, inf, lam, rejected) = run(0.0, 5e-4, (0.0, 1e-4, 1e-3))
    assert inf is own and lam == 5e-4 and rejected == [] and len(calls) == 1
    # nothing on the ladder is enough: the last error is raised
    with pytest.raises(NotPositiveDefiniteError, match="training point 7"):
        run(1.0, 0.0, (0.0, 1e-2))
    assert [c.damping for c in calls] == [0.0, 1e-2]


# ================================================================================================
# report building blocks
# ================================================================================================
def test_report_escapes_strings_and_rejects_bad_names(tmp_path):
    from matplotlib.figure import Figure

    rep = Report(tmp_path / "r", "<b>title</b>", intro="a & b")
    sec = rep.section("<script>alert(1)</script>")
    sec.text("x < y")
    sec.table(["<col>"], [["<cell>"], [float("nan")], [1.23456789]])
    fig = Figure(figsize=(2, 2))
    fig.subplots().plot([0, 1], [1, 0])
    assert sec.figure(fig, "fig_1", "caption <i>") == "fig_1.png"
    with pytest.raises(ValueError, match="already has a figure"):
        sec.figure(fig, "fig_1")
    for bad in ("../x", "a/b", "x.png", "", "<x>"):
        with pytest.raises(ValueError, match="figure name"):
            sec.figure(fig, bad)
    path = rep.write({"x": np.float64(np.nan), "a": np.arange(3)})
    html = path.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "&lt;b&gt;title&lt;/b&gt;" in html and "x &lt; y" in html and "&lt;cell&gt;" in html
    assert ">–<" in html and ">1.235<" in html
    assert json.loads((tmp_path / "r" / "results.json").read_text()) == {"x": None, "a": [0, 1, 2]}


def test_limited_threads_restores_settings():
    torch = pytest.importorskip("torch")
    from pyinfluence.cli.demo import limited_threads

    before = (torch.get_num_threads(), pyinfluence.get_num_threads())
    with limited_threads(1):
        assert torch.get_num_threads() == 1
        assert pyinfluence.get_num_threads() == 1
    assert (torch.get_num_threads(), pyinfluence.get_num_threads()) == before
    with pytest.raises(ValueError, match="threads"), limited_threads(0):
        pass


# ================================================================================================
# explain / mislabels on the user's data
# ================================================================================================
def _classification_data(seed: int = 0, n: int = 90, d: int = 4, classes: int = 3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=2.0, size=(classes, d))
    y = np.arange(n) % classes
    X = centres[y] + rng.normal(size=(n, d))
    return X, y


def _write_csv(path, X, y, names=None, label="label", ylabels=None):
    names = names or [f"f{j}" for j in range(X.shape[1])]
    lab = y if ylabels is None else np.asarray(ylabels)[y]
    lines = [",".join(names + [label])]
    lines += [",".join(f"{v:.17g}" for v in row) + f",{t}" for row, t in zip(X, lab)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_explain_csv_with_held_out_rows_matches_linear_influence(tmp_path, capsys):
    X, y = _classification_data()
    species = np.array(["ant", "bee", "cat"])
    csv_path = _write_csv(tmp_path / "d.csv", X, y, ylabels=species)
    test_rows = [0, 7, 40]
    out = tmp_path / "out"
    rc = main(
        [
            "explain",
            str(csv_path),
            "--label",
            "label",
            "--test-indices",
            "0,7,40",
            "-k",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    screen = capsys.readouterr().out
    assert "test point 7" in screen and "helpful" in screen and "harmful" in screen

    keep = np.setdiff1d(np.arange(len(y)), test_rows)
    model = pyinfluence.LogisticRegression(l2=1e-3).fit(X[keep], species[y[keep]])
    inf = pyinfluence.LinearInfluence(model, X[keep], species[y[keep]])
    up = inf.up_loss(X[test_rows], species[y[test_rows]])  # (n, m)
    n = len(keep)

    res = json.loads((out / "explain.json").read_text())
    assert res["k"] == 4 and res["settings"]["n_train"] == n
    assert [p["test_index"] for p in res["test_points"]] == test_rows
    for j, pt in enumerate(res["test_points"]):
        assert pt["label"] == species[y[test_rows[j]]]
        order = np.argsort(up[:, j], kind="stable")
        for kind, idx in (("helpful", order[:4]), ("harmful", order[::-1][:4])):
            got = pt[kind]
            assert [e["rank"] for e in got] == [1, 2, 3, 4]
            assert [e["train_index"] for e in got] == keep[idx].tolist()  # rows of the CSV file
            np.testing.assert_allclose([e["influence"] for e in got], up[idx, j], rtol=1e-9)
            np.testing.assert_allclose([e["loss_change_if_removed"] for e in got], -up[idx, j] / n, rtol=1e-9)
            assert [e["train_label"] for e in got] == species[y[keep[idx]]].tolist()

    import csv

    with open(out / "explain.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 * 2 * 4
    first = rows[0]
    assert first["kind"] == "helpful" and int(first["test_index"]) == 0
    assert float(first["influence"]) == pytest.approx(res["test_points"][0]["helpful"][0]["influence"])


def test_explain_npz_ridge_and_csv_test_file_svm(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3))
    t = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=60)
    np.savez(tmp_path / "r.npz", X_train=X[:50], y_train=t[:50], X_test=X[50:], y_test=t[50:])
    rc = main(
        [
            "explain",
            str(tmp_path / "r.npz"),
            "--model",
            "ridge",
            "--l2",
            "0.01",
            "-k",
            "3",
            "--test-indices",
            "2",
            "--out-json",
            str(tmp_path / "r.json"),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "r.json").read_text())
    model = pyinfluence.RidgeRegression(l2=0.01).fit(X[:50], t[:50])
    up = pyinfluence.LinearInfluence(model, X[:50], t[:50]).up_loss(X[52:53], t[52:53])[:, 0]
    pt = res["test_points"][0]
    assert pt["test_index"] == 2
    assert [e["train_index"] for e in pt["harmful"]] == np.argsort(-up, kind="stable")[:3].tolist()
    np.testing.assert_allclose([e["influence"] for e in pt["harmful"]], np.sort(up)[::-1][:3])

    # binary smooth-hinge SVM, test points from a second CSV with the columns in another order
    Xb, yb = _classification_data(seed=2, n=40, d=3, classes=2)
    _write_csv(tmp_path / "tr.csv", Xb[:30], yb[:30], names=["a", "b", "c"], label="y")
    _write_csv(tmp_path / "te.csv", Xb[30:, ::-1], yb[30:], names=["c", "b", "a"], label="y")
    rc = main(
        [
            "explain",
            str(tmp_path / "tr.csv"),
            "--label",
            "y",
            "--test",
            str(tmp_path / "te.csv"),
            "--model",
            "svm",
            "--l2",
            "0.1",
            "-k",
            "2",
            "--quiet",
            "--out-csv",
            str(tmp_path / "s.csv"),
        ]
    )
    assert rc == 0
    svm = pyinfluence.SmoothHingeSVM(l2=0.1).fit(Xb[:30], yb[:30])
    up = pyinfluence.LinearInfluence(svm, Xb[:30], yb[:30]).up_loss(Xb[30:], yb[30:])
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert len(lines) == 1 + 10 * 2 * 2
    first = lines[1].split(",")
    assert first[4] == "helpful" and int(first[6]) == int(np.argmin(up[:, 0]))


def test_mislabels_ranks_by_self_influence(tmp_path, capsys):
    X, y = _classification_data(seed=3)
    y_bad = y.copy()
    y_bad[[5, 17]] = (y[[5, 17]] + 1) % 3  # two label errors
    csv_path = _write_csv(tmp_path / "m.csv", X, y_bad)
    rc = main(
        [
            "mislabels",
            str(csv_path),
            "--label",
            "label",
            "-k",
            "5",
            "--l2",
            "0.01",
            "--out",
            str(tmp_path / "o"),
            "--report",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 0
    screen = capsys.readouterr().out
    assert "most suspicious first" in screen and "report: " in screen
    model = pyinfluence.LogisticRegression(l2=0.01).fit(X, y_bad)
    si = pyinfluence.LinearInfluence(model, X, y_bad).self_influence()
    order = np.argsort(-np.abs(si), kind="stable")
    res = json.loads((tmp_path / "o" / "mislabels.json").read_text())
    rows = res["rows"]
    assert len(rows) == len(y)
    assert [r["train_index"] for r in rows] == order.tolist()
    np.testing.assert_allclose([r["self_influence"] for r in rows], si[order], rtol=1e-9)
    np.testing.assert_allclose([r["loss_change_if_removed"] for r in rows], -si[order] / len(y), rtol=1e-9)
    assert {5, 17} <= {r["train_index"] for r in rows[:5]}
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'src="self_influence.png"' in html
    assert (tmp_path / "rep" / "self_influence.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "o" / "mislabels.csv").read_text().startswith("rank,train_index,label,")


def test_explain_report(tmp_path):
    X, y = _classification_data(seed=4, n=30)
    np.savez(tmp_path / "d.npz", X_train=X[:24], y_train=y[:24], X_test=X[24:], y_test=y[24:])
    rc = main(["explain", str(tmp_path / "d.npz"), "--report", str(tmp_path / "rep"), "--quiet"])
    assert rc == 0
    html = (tmp_path / "rep" / "report.html").read_text()
    assert 'src="explain_top.png"' in html
    assert (tmp_path / "rep" / "explain_top.png").read_bytes()[:8] == PNG_SIGNATURE
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert len(res["test_points"]) == 6


# ================================================================================================
# error paths: one line on stderr, exit status != 0, no traceback
# ================================================================================================
@pytest.fixture
def files(tmp_path):
    def w(name, text):
        (tmp_path / name).write_text(text)
        return str(tmp_path / name)

    f = {
        "ok": w("ok.csv", "a,b,y\n1,2,0\n3,4,1\n5,6,1\n2,2,0\n"),
        "nonnum": w("nonnum.csv", "a,b,y\n1,2,0\n3,abc,1\n"),
        "nan": w("nan.csv", "a,b,y\n1,2,0\n3,,1\n"),
        "nan_text": w("nan2.csv", "a,b,y\n1,NaN,0\n3,4,1\n"),
        "single": w("single.csv", "a,b,y\n1,2,0\n3,4,0\n"),
        "wide": w("wide.csv", "a,b,c,y\n1,2,3,0\n"),
        "ragged": w("ragged.csv", "a,b,y\n1,2\n"),
        "empty": w("empty.csv", ""),
        "missing": str(tmp_path / "does_not_exist.csv"),
    }
    np.savez(
        tmp_path / "mism.npz",
        X_train=np.ones((4, 3)),
        y_train=[0, 1, 0, 1],
        X_test=np.ones((2, 2)),
        y_test=[0, 1],
    )
    np.savez(tmp_path / "nokey.npz", X=np.ones((4, 3)))
    np.savez(tmp_path / "nan.npz", X_train=np.array([[1.0, np.nan], [2, 3]]), y_train=[0, 1])
    f["mism_npz"] = str(tmp_path / "mism.npz")
    f["nokey_npz"] = str(tmp_path / "nokey.npz")
    f["nan_npz"] = str(tmp_path / "nan.npz")
    return f


ERROR_CASES = [
    (["explain", "{missing}", "--label", "y", "--test-indices", "0"], "no such file"),
    (["explain", "{ok}", "--label", "zz", "--test-indices", "0"], "no label column 'zz'"),
    (["mislabels", "{ok}"], "--label"),
    (["explain", "{nonnum}", "--label", "y", "--test-indices", "0"], "'abc' is not a number"),
    (["explain", "{nan}", "--label", "y", "--test-indices", "0"], "missing value (NaN)"),
    (["mislabels", "{nan_text}", "--label", "y"], "missing value (NaN)"),
    (["mislabels", "{nan_npz}"], "missing value (NaN)"),
    (["explain", "{single}", "--label", "y", "--test-indices", "0"], "single class"),
    (["mislabels", "{single}", "--label", "y"], "single class"),
    (["explain", "{ok}", "--label", "y", "--test", "{wide}"], "3 feature columns"),
    (["explain", "{mism_npz}"], "2 features but the training data has 3"),
    (["explain", "{nokey_npz}"], "no array 'X_train'"),
    (["explain", "{ragged}", "--label", "y", "--test-indices", "0"], "fields but the header"),
    (["explain", "{empty}", "--label", "y"], "empty file"),
    (["explain", "{ok}", "--label", "y"], "no test points"),
    (["explain", "{ok}", "--label", "y", "--test-indices", "9"], "out of range"),
    (
        [
            "explain",
            "{ok}",
            "--label",
            "y",
            "--test-indices",
            "0",
            "--model",
            "ridge",
            "--test",
            "{missing}",
        ],
        "no such file",
    ),
]


@pytest.mark.parametrize(
    "argv,message",
    ERROR_CASES,
    ids=[" ".join(c[0][:2]) + f" {i}" for i, c in enumerate(ERROR_CASES)],
)
def test_error_paths(files, capsys, argv, message):
    rc = main([a.format(**files) for a in argv])
    captured = capsys.readouterr()
    assert rc == 1
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"pyinfluence {argv[0]}: error: ")
    assert message in err
    assert "Traceback" not in captured.err + captured.out


def test_usage_errors_exit_2(files, capsys):
    assert main(["explain", files["ok"], "--model", "forest"]) == 2
    assert main(["explain", files["ok"], "--l2", "-1"]) == 2
    assert main([]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_debug_shows_the_traceback(files):
    from pyinfluence.cli.userdata import DataError

    with pytest.raises(DataError, match="not a number"):
        main(["--debug", "explain", files["nonnum"], "--label", "y", "--test-indices", "0"])
    with pytest.raises(DataError, match="not a number"):
        main(["explain", files["nonnum"], "--label", "y", "--test-indices", "0", "--debug"])


def test_python_m_pyinfluence_error_and_help(files, tmp_path):
    proc = _run_module("mislabels", files["single"], "--label", "y", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "single class" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _run_module("--help", cwd=tmp_path)
    assert proc.returncode == 0
    assert "demo" in proc.stdout and "explain" in proc.stdout and "mislabels" in proc.stdout
