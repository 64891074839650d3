"""Command-line traps on real files: no silent wrong results.

Each test here failed before its fix: an index column read as a feature, a continuous target
fitted as hundreds of classes, unscaled features without a word, no model-fit numbers, and bad
inputs that ended in tracebacks, bare words ("MemoryError", "std::bad_alloc"), an unbounded read,
a quadratic de-duplication, a formula-injectable CSV, a write through a symbolic link, or NaN
influences written with exit status 0.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import struct
import threading
import zipfile

import numpy as np
import pandas as pd  # the test extra installs it: the files here are written the way pandas users write them
import pytest
from sklearn import datasets

import pyinfluence
from pyinfluence.cli import commands as cli
from pyinfluence.cli.commands import main
from pyinfluence.cli.userdata import labels_look_continuous, parse_indices
from pyinfluence.errors import PyInfluenceError


def _run(capsys, *argv: str):
    """(exit status, stdout, stderr) of ``pyinfluence ARGV`` run in-process."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _assert_one_line_error(rc: int, out: str, err: str, *fragments: str) -> None:
    """Exit status 1 and one error line on stderr (beside any one-line notes and warnings)
    holding every fragment; no traceback."""
    assert rc == 1, (out, err)
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("pyinfluence ") and ": error: " in line]
    others = [line for line in lines if line not in errors]
    assert len(errors) == 1, err
    assert all(": warning: " in line or ": note: " in line for line in others), err
    assert "Traceback" not in err + out
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def _iris_frame() -> pd.DataFrame:
    return datasets.load_iris(as_frame=True).frame


def _binary_csv(path: pathlib.Path, n: int = 40, seed: int = 0) -> pathlib.Path:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0).astype(int)
    frame = pd.DataFrame(X, columns=["a", "b", "c"])
    frame["y"] = y
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def no_fit(monkeypatch):
    """Records whether the model was fitted: checks that must come first leave it at 0."""
    calls = []
    real_fit = cli._fit

    def recording_fit(*args, **kwargs):
        calls.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(cli, "_fit", recording_fit)
    return calls


# ================================================================================================
# 5(a) pandas' default index column
# ================================================================================================
def test_pandas_index_column_is_dropped_with_a_note(tmp_path, capsys):
    frame = _iris_frame()
    frame.to_csv(tmp_path / "with_index.csv")  # pandas' default: index=True, header cell empty
    frame.to_csv(tmp_path / "plain.csv", index=False)
    assert (tmp_path / "with_index.csv").read_text().startswith(",sepal length")
    results = {}
    for name in ("with_index", "plain"):
        rc, out, err = _run(
            capsys, "explain", tmp_path / f"{name}.csv", "--label", "target",
            "--test-indices", "0,60,120", "-k", "4", "--out-json", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert rc == 0, err
        results[name] = (json.loads((tmp_path / f"{name}.json").read_text()), err)
    indexed, indexed_err = results["with_index"]
    plain, plain_err = results["plain"]
    assert "note: " in indexed_err and "dropped the unnamed first column" in indexed_err
    assert "to_csv" in indexed_err and "dropped" not in plain_err
    assert indexed["test_points"] == plain["test_points"]
    assert indexed["model_fit"] == plain["model_fit"]
    assert indexed["settings"]["n_features"] == plain["settings"]["n_features"] == 4
    assert indexed["notes"] and not plain["notes"]


def test_pandas_index_read_back_and_written_again_is_dropped_too(tmp_path, capsys):
    # pd.read_csv(with_index) names the column "Unnamed: 0"; to_csv(index=False) keeps it
    frame = _iris_frame()
    frame.to_csv(tmp_path / "a.csv")
    pd.read_csv(tmp_path / "a.csv").to_csv(tmp_path / "b.csv", index=False)
    assert (tmp_path / "b.csv").read_text().startswith("Unnamed: 0,")
    rc, _, err = _run(capsys, "mislabels", tmp_path / "b.csv", "--label", "target", "--quiet")
    assert rc == 0 and "dropped the unnamed first column" in err


def test_unnamed_column_that_is_not_an_index_stays_a_feature(tmp_path, capsys):
    frame = _iris_frame()
    shuffled = frame.sample(frac=1.0, random_state=0)  # index no longer 0..n-1 in order
    shuffled.to_csv(tmp_path / "shuffled.csv")
    out_json = tmp_path / "r.json"
    rc, _, err = _run(
        capsys, "mislabels", tmp_path / "shuffled.csv", "--label", "target", "--quiet",
        "--out-json", out_json,
    )  # fmt: skip
    assert rc == 0 and "dropped" not in err
    assert json.loads(out_json.read_text())["settings"]["n_features"] == 5


# ================================================================================================
# 5(b) a continuous target under a classifier
# ================================================================================================
@pytest.mark.parametrize("model", ["logistic", "svm"])
def test_classifier_refuses_a_continuous_target(tmp_path, capsys, model):
    diabetes = datasets.load_diabetes(as_frame=True, scaled=False).frame  # 214 distinct targets
    diabetes.to_csv(tmp_path / "diabetes.csv", index=False)
    rc, out, err = _run(capsys, "mislabels", tmp_path / "diabetes.csv", "--label", "target", "--model", model)
    _assert_one_line_error(rc, out, err, "continuous", "214 distinct values", "--model ridge")
    rc, out, err = _run(
        capsys, "mislabels", tmp_path / "diabetes.csv", "--label", "target", "--model", "ridge",
        "--standardize", "--quiet",
    )  # fmt: skip
    assert rc == 0, err


def test_classifier_refuses_non_integer_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2))
    np.savez(tmp_path / "d.npz", X_train=X, y_train=np.where(X[:, 0] > 0, 1.5, 0.5))
    rc, out, err = _run(capsys, "mislabels", tmp_path / "d.npz")
    _assert_one_line_error(rc, out, err, "non-integer values such as", "--model ridge")


def test_the_continuous_label_rule():
    assert labels_look_continuous(np.array([0.0, 1.0, 2.0] * 10)) is None
    assert labels_look_continuous(np.array([0.5, 1.0])) is not None
    assert labels_look_continuous(np.array(["a", "b", "c"])) is None  # text: always classes
    digits = np.arange(100) % 10
    assert labels_look_continuous(digits) is None
    many = np.arange(21).repeat(5)  # 21 distinct values, exactly 5 rows each: classes
    assert labels_look_continuous(many) is None
    assert labels_look_continuous(np.arange(21).repeat(4)) is not None  # 4 rows each
    assert labels_look_continuous(np.arange(20)) is None  # only 20 distinct values


# ================================================================================================
# 5(c) unscaled features
# ================================================================================================
def test_unscaled_features_warn_and_suggest_standardize(tmp_path, capsys):
    cancer = datasets.load_breast_cancer(as_frame=True).frame
    cancer.to_csv(tmp_path / "cancer.csv", index=False)
    base = ["explain", tmp_path / "cancer.csv", "--label", "target", "--test-indices", "0,1"]
    rc, _, err = _run(
        capsys, *base, "--quiet", "--out-json", tmp_path / "raw.json", "--report", tmp_path / "rep"
    )
    assert rc == 0
    assert "warning: " in err and "look unscaled" in err and "--standardize" in err
    assert "'worst area'" in err
    raw = json.loads((tmp_path / "raw.json").read_text())
    assert len(raw["warnings"]) == 1 and "--standardize" in raw["warnings"][0]
    assert "look unscaled" in (tmp_path / "rep" / "report.html").read_text()
    rc, _, err = _run(capsys, *base, "--standardize", "--quiet", "--out-json", tmp_path / "s.json")
    assert rc == 0 and "warning" not in err
    assert json.loads((tmp_path / "s.json").read_text())["warnings"] == []
    # features of order 1 do not warn
    _iris_frame().to_csv(tmp_path / "iris.csv", index=False)
    rc, _, err = _run(capsys, "mislabels", tmp_path / "iris.csv", "--label", "target", "--quiet")
    assert rc == 0 and "warning" not in err


def test_standardize_is_documented_in_the_help(capsys):
    rc, helptext, _ = _run(capsys, "explain", "--help")
    assert rc == 0
    flat = " ".join(helptext.split())
    assert "--standardize" in flat and "look unscaled" in flat
    assert "--max-input-size" in flat and "--max-params" in flat


# ================================================================================================
# 5(d) model fit: accuracy / R^2 on screen, in the JSON and in the report
# ================================================================================================
def test_model_fit_is_printed_saved_and_reported(tmp_path, capsys):
    frame = _iris_frame()
    frame.to_csv(tmp_path / "iris.csv", index=False)
    test_rows = [0, 1, 60, 61, 120, 121]
    rc, out, _ = _run(
        capsys, "explain", tmp_path / "iris.csv", "--label", "target",
        "--test-indices", ",".join(map(str, test_rows)), "--out", tmp_path / "o",
        "--report", tmp_path / "rep",
    )  # fmt: skip
    assert rc == 0
    X, y = frame.drop(columns="target").to_numpy(), frame["target"].to_numpy()
    keep = np.setdiff1d(np.arange(len(y)), test_rows)
    model = pyinfluence.LogisticRegression(l2=1e-3).fit(X[keep], y[keep])
    train_acc = float(np.mean(model.predict(X[keep]) == y[keep]))
    test_acc = float(np.mean(model.predict(X[test_rows]) == y[test_rows]))
    fit = json.loads((tmp_path / "o" / "explain.json").read_text())["model_fit"]
    assert fit == {
        "metric": "accuracy",
        "train": pytest.approx(train_acc),
        "test": pytest.approx(test_acc),
        "n_train": len(keep),
        "n_test": len(test_rows),
    }
    assert f"training accuracy {train_acc:.4g} ({len(keep)} rows)" in out
    assert f"test accuracy {test_acc:.4g} ({len(test_rows)} points)" in out
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "Model fit" in html and "accuracy" in html
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["model_fit"]["train"] == (
        pytest.approx(train_acc)
    )


def test_ridge_reports_r2(tmp_path, capsys):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 3))
    t = X @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.normal(size=60)
    np.savez(tmp_path / "r.npz", X_train=X[:50], y_train=t[:50], X_test=X[50:], y_test=t[50:])
    rc, out, _ = _run(
        capsys, "mislabels", tmp_path / "r.npz", "--model", "ridge", "--out-json",
        tmp_path / "r.json",
    )  # fmt: skip
    assert rc == 0
    model = pyinfluence.RidgeRegression(l2=1e-3).fit(X[:50], t[:50])

    def r2(Xs, ts):
        return 1 - np.sum((ts - model.predict(Xs)) ** 2) / np.sum((ts - ts.mean()) ** 2)

    fit = json.loads((tmp_path / "r.json").read_text())["model_fit"]
    assert fit["metric"] == "R^2"
    assert fit["train"] == pytest.approx(r2(X[:50], t[:50]))
    assert fit["test"] == pytest.approx(r2(X[50:], t[50:]))
    assert "training R^2" in out and "test R^2" in out


# ================================================================================================
# 6. bad inputs: one-line errors
# ================================================================================================
def test_a_csv_cell_over_the_csv_field_limit(tmp_path, capsys):
    path = tmp_path / "long.csv"
    path.write_text("a,b,y\n1,2,0\n" + "1" * 200_000 + ",3,1\n4,5,0\n")
    rc, out, err = _run(capsys, "mislabels", path, "--label", "y")
    _assert_one_line_error(rc, out, err, "line 3", "131,072 characters")


def test_huge_and_reversed_index_ranges(tmp_path, capsys):
    path = _binary_csv(tmp_path / "d.csv")
    rc, out, err = _run(capsys, "explain", path, "--label", "y", "--test-indices", "0-1000000000000")
    _assert_one_line_error(rc, out, err, "index 1000000000000 is out of range for 40 rows")
    rc, out, err = _run(capsys, "explain", path, "--label", "y", "--test-indices", "5-2")
    _assert_one_line_error(rc, out, err, "'5-2' is reversed", "2-5")


def test_index_deduplication_keeps_first_appearances_in_order():
    assert parse_indices("5,3,5,0-4,3,-1", 10, "x").tolist() == [5, 3, 0, 1, 2, 4, 9]
    rng = np.random.default_rng(0)
    picks = rng.integers(0, 20_000, size=30_000)
    text = ",".join(map(str, picks))
    expected = list(dict.fromkeys(picks.tolist()))
    assert parse_indices(text, 20_000, "x").tolist() == expected
    # many overlapping ranges: each row once, memory bounded by the number of rows
    assert parse_indices(",".join(["0-9999"] * 200), 10_000, "x").tolist() == list(range(10_000))


def test_a_million_columns_is_refused_up_front(tmp_path, capsys):
    path = tmp_path / "wide.csv"
    d = 1_000_000
    with open(path, "w") as fh:
        fh.write(",".join(f"c{j}" for j in range(d)) + ",y\n")
        for i in range(3):
            fh.write("1," * d + f"{i % 2}\n")
    rc, out, err = _run(capsys, "mislabels", path, "--label", "y")
    _assert_one_line_error(rc, out, err, "wide.csv", "1,000,000 feature columns", "--max-params")
    assert "bad_alloc" not in err and "MemoryError" not in err


def test_too_many_parameters_counts_the_classes(tmp_path, capsys):
    _iris_frame().to_csv(tmp_path / "iris.csv", index=False)  # 4 features, 3 classes: 15
    rc, out, err = _run(capsys, "mislabels", tmp_path / "iris.csv", "--label", "target",
                        "--max-params", "14")  # fmt: skip
    _assert_one_line_error(rc, out, err, "15 parameters", "limit of 14", "--max-params")


def test_out_of_memory_names_the_file_and_its_size(tmp_path, capsys, monkeypatch):
    path = _binary_csv(tmp_path / "d.csv")

    def no_memory(*args, **kwargs):
        raise MemoryError("std::bad_alloc")

    monkeypatch.setattr(pyinfluence, "LinearInfluence", no_memory)
    rc, out, err = _run(capsys, "mislabels", path, "--label", "y")
    _assert_one_line_error(rc, out, err, "out of memory", "d.csv", "40 training rows x 3 features")


def test_dev_zero_is_refused_at_once(capsys):
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    rc, out, err = _run(capsys, "explain", "/dev/zero", "--label", "y")
    _assert_one_line_error(rc, out, err, "/dev/zero", "NUL bytes")


def test_a_stream_is_refused_at_the_input_size_limit(tmp_path, capsys):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes")
    fifo = tmp_path / "endless.csv"
    os.mkfifo(fifo)

    def write_forever() -> None:
        try:
            with open(fifo, "w") as fh:
                fh.write("a,b,y\n")
                while True:
                    fh.write("1,2,0\n3,4,1\n" * 1000)
        except (BrokenPipeError, OSError):
            pass  # the reader stopped at the limit

    writer = threading.Thread(target=write_forever, daemon=True)
    writer.start()
    rc, out, err = _run(capsys, "mislabels", fifo, "--label", "y", "--max-input-size", "2M")
    writer.join(timeout=30)
    _assert_one_line_error(rc, out, err, "more than 2 MiB read", "--max-input-size")
    assert not writer.is_alive()


def test_a_csv_over_the_size_limit(tmp_path, capsys):
    path = _binary_csv(tmp_path / "d.csv", n=2000)
    rc, out, err = _run(capsys, "mislabels", path, "--label", "y", "--max-input-size", "10K")
    _assert_one_line_error(rc, out, err, "d.csv", "input limit of 10 KiB", "--max-input-size")
    rc, _, err = _run(capsys, "mislabels", path, "--label", "y", "--max-input-size", "0", "--quiet")
    assert rc == 0, err


def _patch_central_directory_size(path: pathlib.Path, member: str, size: int) -> None:
    """Make the zip's central directory claim ``size`` decompressed bytes for ``member``."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack_from("<H", data, at + 28)[0]
        if data[at + 46 : at + 46 + name_len] == member.encode():
            struct.pack_into("<I", data, at + 24, size)
        at = data.find(b"PK\x01\x02", at + 4)
    path.write_bytes(bytes(data))


def test_npz_decompressing_to_1_5_gb_is_refused_from_its_headers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(30, 2))
    y = (X[:, 0] > 0).astype(int)
    # (1) the zip directory says X_train.npy decompresses to 1.5 GB
    path = tmp_path / "bomb.npz"
    np.savez(path, X_train=X, y_train=y)
    _patch_central_directory_size(path, "X_train.npy", 1_500_000_000)
    assert zipfile.ZipFile(path).getinfo("X_train.npy").file_size == 1_500_000_000
    rc, out, err = _run(capsys, "mislabels", path)
    _assert_one_line_error(rc, out, err, "bomb.npz", "decompressed", "input limit of 1 GiB")
    # (2) an .npy header declaring a (200000, 1000) float64 array (1.6 GB) with no data
    path = tmp_path / "declared.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("X_train.npy", "w") as fh:
            np.lib.format.write_array_header_1_0(
                fh, {"descr": "<f8", "fortran_order": False, "shape": (200_000, 1000)}
            )
        with zf.open("y_train.npy", "w") as fh:
            np.save(fh, y)
    rc, out, err = _run(capsys, "mislabels", path)
    _assert_one_line_error(rc, out, err, "declared.npz", "declare 1.49 GiB", "--max-input-size")
    # (3) the same limit, lowered by the flag, on a real compressed array (8 MB decompressed)
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, X_train=np.zeros((1000, 1000)), y_train=np.arange(1000) % 2)
    rc, out, err = _run(capsys, "mislabels", path, "--max-input-size", "1M")
    _assert_one_line_error(rc, out, err, "zeros.npz", "7.64 MiB decompressed")


# ------------------------------------------------------------------------------------------------
# output paths: checked before the computation; symbolic links not followed
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flag,where,fragment",
    [
        ("--out-json", "afile/r.json", "is not a folder"),
        ("--out-csv", "missing/r.csv", "does not exist"),
        ("--out-csv", "folder", "is a folder"),
        ("--out", "afile", "exists and is not a folder"),
        ("--out", "afile/sub", "afile is not a folder"),
        ("--report", "afile/rep", "afile is not a folder"),
    ],
)
def test_unwritable_output_fails_before_the_computation(tmp_path, capsys, no_fit, flag, where,
                                                        fragment):  # fmt: skip
    data = _binary_csv(tmp_path / "d.csv")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "folder").mkdir()
    rc, out, err = _run(
        capsys, "explain", data, "--label", "y", "--test-indices", "0", flag, tmp_path / where
    )
    _assert_one_line_error(rc, out, err, fragment)
    assert no_fit == [] and out == ""


def test_the_same_output_file_twice_is_refused(tmp_path, capsys, no_fit):
    data = _binary_csv(tmp_path / "d.csv")
    rc, out, err = _run(
        capsys, "mislabels", data, "--label", "y", "--out", tmp_path,
        "--out-json", tmp_path / "mislabels.json",
    )  # fmt: skip
    _assert_one_line_error(rc, out, err, "named twice")
    assert no_fit == []


@pytest.mark.parametrize("command", ["explain", "mislabels"])
def test_a_symbolic_link_at_an_output_path_is_not_followed(tmp_path, capsys, no_fit, command):
    data = _binary_csv(tmp_path / "d.csv")
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    extra = ["--test-indices", "0"] if command == "explain" else []
    cases = []
    (tmp_path / "link.csv").symlink_to(victim)
    cases.append(["--out-csv", tmp_path / "link.csv"])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / f"{command}.json").symlink_to(victim)
    cases.append(["--out", out_dir])
    rep_dir = tmp_path / "rep"
    rep_dir.mkdir()
    (rep_dir / "report.html").symlink_to(victim)
    cases.append(["--report", rep_dir])
    dangling = tmp_path / "dangling.json"
    dangling.symlink_to(tmp_path / "created_through_the_link.json")
    cases.append(["--out-json", dangling])
    for case in cases:
        rc, out, err = _run(capsys, command, data, "--label", "y", *extra, *case)
        _assert_one_line_error(rc, out, err, "symbolic link")
    assert victim.read_text() == "keep me\n"
    assert not (tmp_path / "created_through_the_link.json").exists()
    assert no_fit == []


def test_written_files_do_not_follow_a_link_that_appears_later(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "late.csv"
    link.symlink_to(victim)
    with pytest.raises(cli.CLIError, match="symbolic link"):
        cli._write_text_nofollow(link, "overwritten")
    assert victim.read_text() == "keep me\n"


# ------------------------------------------------------------------------------------------------
# CSV output: spreadsheet formula injection
# ------------------------------------------------------------------------------------------------
def test_text_labels_that_look_like_formulas_are_escaped_in_csv(tmp_path, capsys):
    rng = np.random.default_rng(0)
    names = np.array(['=HYPERLINK("http://x")', "+cmd", "-2+3", "@SUM(A1)"])
    centres = rng.normal(scale=3.0, size=(4, 2))
    y = np.arange(80) % 4
    X = centres[y] + rng.normal(size=(80, 2))
    frame = pd.DataFrame(X, columns=["a", "b"])
    frame["label"] = names[y]
    frame.to_csv(tmp_path / "d.csv", index=False)
    rc, _, err = _run(
        capsys, "mislabels", tmp_path / "d.csv", "--label", "label", "--quiet",
        "--out", tmp_path / "o",
    )  # fmt: skip
    assert rc == 0, err
    with open(tmp_path / "o" / "mislabels.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    escaped = {"'" + n for n in names}
    assert {r["label"] for r in rows} == escaped
    assert {r["prediction"] for r in rows} <= escaped
    # the JSON keeps the labels as they are
    doc = json.loads((tmp_path / "o" / "mislabels.json").read_text())
    assert {r["label"] for r in doc["rows"]} == set(names)


def test_spreadsheet_escaping_leaves_numbers_and_plain_text_alone():
    safe = cli._spreadsheet_safe
    assert safe("=1+1") == "'=1+1" and safe("@x") == "'@x" and safe("\tx") == "'\tx"
    assert safe("-1.5") == "-1.5" and safe("+3") == "+3"  # numbers written as text
    assert safe("cat") == "cat" and safe(-1) == -1 and safe(2.5) == 2.5


# ================================================================================================
# item 3: non-finite influences are never written; library errors are one line
# ================================================================================================
def _blobs(seed: int = 0, n: int = 40):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    return X, X @ np.array([1.0, -1.0, 0.5]) + 0.1 * rng.normal(size=n)


def test_test_features_at_1e200_end_in_an_error_naming_the_input(tmp_path, capsys):
    X, t = _blobs()
    Xt = X[30:] * np.array([1e200, 1.0, 1.0])
    np.savez(tmp_path / "d.npz", X_train=X[:30], y_train=t[:30], X_test=Xt, y_test=t[30:])
    out_json = tmp_path / "r.json"
    rc, out, err = _run(capsys, "explain", tmp_path / "d.npz", "--model", "ridge", "--out-json", out_json)
    # either the library raises (a PyInfluenceError) or the CLI's own check does; both name the
    # column and the file to rescale, and nothing is written
    _assert_one_line_error(rc, out, err, "'x0'", "d.npz (X_test)", "rescale")
    assert "nan" not in out.lower() and not out_json.exists()


def test_training_features_at_1e200(tmp_path, capsys):
    X, t = _blobs()
    np.savez(tmp_path / "big.npz", X_train=X[:30] * 1e200, y_train=t[:30],
             X_test=X[30:] * 1e200, y_test=t[30:])  # fmt: skip
    np.savez(tmp_path / "one.npz", X_train=X[:30], y_train=t[:30], X_test=X[30:], y_test=t[30:])
    rc, out, err = _run(capsys, "explain", tmp_path / "big.npz", "--model", "ridge")
    _assert_one_line_error(rc, out, err, "'x", "big.npz", "--standardize")
    # standardised, the scale is gone: the same results as the data at scale 1
    results = {}
    for name in ("big", "one"):
        rc, _, err = _run(
            capsys, "explain", tmp_path / f"{name}.npz", "--model", "ridge", "--standardize",
            "-k", "3", "--out-json", tmp_path / f"{name}.json",
        )  # fmt: skip
        assert rc == 0, err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())["test_points"]
    for big, one in zip(results["big"], results["one"]):
        for kind in ("helpful", "harmful"):
            assert [e["train_index"] for e in big[kind]] == [e["train_index"] for e in one[kind]]
            np.testing.assert_allclose(
                [e["influence"] for e in big[kind]], [e["influence"] for e in one[kind]],
                rtol=1e-6,
            )  # fmt: skip


def test_non_finite_scores_are_refused_even_if_the_library_returns_them(tmp_path, capsys, monkeypatch):
    path = _binary_csv(tmp_path / "d.csv")
    real_top_k = pyinfluence.LinearInfluence.top_k

    def nan_top_k(self, *args, **kwargs):
        tk = real_top_k(self, *args, **kwargs)
        tk.harmful_scores[0, 0] = np.nan
        return tk

    monkeypatch.setattr(pyinfluence.LinearInfluence, "top_k", nan_top_k)
    out_csv = tmp_path / "r.csv"
    rc, out, err = _run(
        capsys, "explain", path, "--label", "y", "--test-indices", "0,1", "--out-csv", out_csv
    )
    _assert_one_line_error(rc, out, err, "non-finite influence values", "nothing is written")
    assert not out_csv.exists() and out == ""


def test_non_finite_self_influence_is_refused_naming_the_input(tmp_path, capsys, monkeypatch):
    path = _binary_csv(tmp_path / "d.csv")
    real_self_influence = pyinfluence.LinearInfluence.self_influence

    def inf_self_influence(self, *args, **kwargs):
        values = np.array(real_self_influence(self, *args, **kwargs))
        values[3] = -np.inf
        return values

    monkeypatch.setattr(pyinfluence.LinearInfluence, "self_influence", inf_self_influence)
    out_dir = tmp_path / "o"
    rc, out, err = _run(capsys, "mislabels", path, "--label", "y", "--out", out_dir)
    _assert_one_line_error(rc, out, err, "non-finite self-influence values", "d.csv")
    assert not (out_dir / "mislabels.csv").exists() and out == ""


def test_a_library_error_is_one_line(tmp_path, capsys, monkeypatch):
    class NonFiniteOutput(PyInfluenceError, ArithmeticError):
        pass

    def raising_self_influence(self, *args, **kwargs):
        raise NonFiniteOutput("self_influence: the result is not finite\n(details)")

    monkeypatch.setattr(pyinfluence.LinearInfluence, "self_influence", raising_self_influence)
    rc, out, err = _run(capsys, "mislabels", _binary_csv(tmp_path / "d.csv"), "--label", "y")
    _assert_one_line_error(rc, out, err, "self_influence: the result is not finite (details)")


def test_an_unexpected_exception_is_one_line(tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_fit", broken)
    rc, out, err = _run(capsys, "mislabels", _binary_csv(tmp_path / "d.csv"), "--label", "y")
    _assert_one_line_error(rc, out, err, "RuntimeError: boom", "--debug")
