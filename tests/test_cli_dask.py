"""``pyinfluence explain`` / ``mislabels`` on a folder of Parquet files, run on Dask (issue 16, item 3).

- The same data as Parquet files (run on a local cluster of 2 worker processes: ``--workers 2``, or on a
  running scheduler: ``--scheduler``) and as one CSV file (today's in-process path): the same test points,
  top-k training rows, flagged rows and labels, and scores within 1e-8 relative (max |a - b| / max |b|);
  with held-out rows spread over several files, ``--standardize``, text labels, 3 classes and ``--max-rows``.
- Ridge ``mislabels`` against closed-form numpy written here: θ̂ from the normal equations on the
  intercept-augmented rows X̃, H = X̃ᵀX̃/n + l2·P, g_i = (s_i − y_i) x̃_i, self-influence −g_iᵀ H⁻¹ g_i, the
  training loss (s_i − y_i)²/2 and R².
- The client never holds the training matrix: every result it gathers from the workers is far smaller than
  the matrix, and it never reads a Parquet file's rows itself.
- Bad input ends with exit status 1 and a one-line error naming the file (and row, column) or the argument:
  an empty folder, a non-Parquet file, a missing label column, files with different columns, a non-numeric
  feature, a missing value; ``--workers`` with a CSV; an unreachable scheduler.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("pyarrow")
pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from pyinfluence.cli import commands as cli  # noqa: E402

FILES, ROWS, FEATURES = 3, 300, 5
NAMES = [f"f{j}" for j in range(FEATURES)]
TOL = 1e-8


# ------------------------------------------------------------------------------------------------
# data and helpers
# ------------------------------------------------------------------------------------------------
def _write(folder: pathlib.Path, X: np.ndarray, y: np.ndarray, label: str = "y") -> pathlib.Path:
    """X, y as FILES Parquet files of equal size in ``folder`` (named so that plain string order would
    differ from the natural order once there are 10 or more) and as one CSV file beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(X, columns=NAMES)
    frame[label] = y
    bounds = np.linspace(0, X.shape[0], FILES + 1).astype(int)
    for i in range(FILES):
        frame.iloc[bounds[i] : bounds[i + 1]].to_parquet(folder / f"part.{i}.parquet", index=False)
    csv = folder.parent / f"{folder.name}.csv"
    frame.to_csv(csv, index=False, float_format="%.17g")
    return csv


def _binary(seed: int, text: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = FILES * ROWS
    X = rng.standard_normal((n, FEATURES)) * np.array([1.0, 3.0, 0.5, 2.0, 1.0]) + np.array([0, 1, 0, -2, 0])
    y = (X[:, 0] - 0.5 * X[:, 1] + rng.standard_normal(n) > 0).astype(np.int64)
    y[rng.choice(n, 20, replace=False)] ^= 1  # a few flipped labels
    return X, (np.array(["neg", "pos"])[y] if text else y)


def run(capsys: Any, *argv: Any) -> Tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def rel(a: Any, b: Any) -> float:
    """max |a − b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def same_fit(a: Dict[str, Any], b: Dict[str, Any]) -> None:
    assert (a["metric"], a["n_train"], a["n_test"]) == (b["metric"], b["n_train"], b["n_test"])
    for key in ("train", "test"):
        assert (a[key] is None) == (b[key] is None)
        if b[key] is not None:
            assert a[key] == pytest.approx(b[key], rel=TOL, abs=TOL)


def same_explain(dask_json: Dict[str, Any], csv_json: Dict[str, Any]) -> None:
    """The same test points, top-k rows (indices, labels) and scores within TOL relative."""
    same_fit(dask_json["model_fit"], csv_json["model_fit"])
    assert dask_json["k"] == csv_json["k"]
    pa, pb = dask_json["test_points"], csv_json["test_points"]
    assert [p["test_index"] for p in pa] == [p["test_index"] for p in pb]
    assert [(p["label"], p["prediction"]) for p in pa] == [(p["label"], p["prediction"]) for p in pb]
    assert rel([p["loss"] for p in pa], [p["loss"] for p in pb]) <= TOL
    for kind in ("helpful", "harmful"):
        ea = [e for p in pa for e in p[kind]]
        eb = [e for p in pb for e in p[kind]]
        assert [(e["rank"], e["train_index"], e["train_label"]) for e in ea] == [
            (e["rank"], e["train_index"], e["train_label"]) for e in eb
        ]
        for key in ("influence", "loss_change_if_removed"):
            assert rel([e[key] for e in ea], [e[key] for e in eb]) <= TOL


def same_mislabels(dask_rows: List[Dict[str, Any]], csv_rows: List[Dict[str, Any]]) -> None:
    """The same ranked rows (indices, labels, predictions) and values within TOL relative."""
    assert [(r["rank"], r["train_index"], r["label"], r["prediction"]) for r in dask_rows] == [
        (r["rank"], r["train_index"], r["label"], r["prediction"]) for r in csv_rows
    ]
    for key in ("training_loss", "self_influence", "loss_change_if_removed"):
        assert rel([r[key] for r in dask_rows], [r[key] for r in csv_rows]) <= TOL


@pytest.fixture(scope="module")
def scheduler():
    """The address of a LocalCluster of 2 worker processes (not threads), one thread each. Its nannies set
    OMP_NUM_THREADS=1 and the like in this process's environment: restored afterwards."""
    environ = dict(os.environ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
    yield cluster.scheduler_address
    cluster.close()
    os.environ.clear()
    os.environ.update(environ)


@pytest.fixture(scope="module")
def binary(tmp_path_factory):
    base = tmp_path_factory.mktemp("binary")
    X, y = _binary(0)
    return base / "pq", _write(base / "pq", X, y)


# ------------------------------------------------------------------------------------------------
# --workers 2: a local cluster started by the command
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_explain_on_a_local_cluster_matches_the_csv_path(binary, tmp_path, capsys):
    folder, csv = binary
    # held-out test rows in each of the three files; the features are standardised on the workers
    common = ["--label", "y", "--test-indices", "899,3,450,301", "--standardize", "-k", "4"]
    environ = dict(os.environ)
    rc, out, err = run(capsys, "explain", folder, *common, "--workers", 2, "--out", tmp_path / "d")
    assert rc == 0, err
    assert dict(os.environ) == environ  # the cluster's nannies set OMP_NUM_THREADS=1 here: restored
    assert "test point 899" in out and "896 training rows" in out
    assert "numbered 0..899 across the files" in err
    rc, _, err = run(capsys, "explain", csv, *common, "--out", tmp_path / "c")
    assert rc == 0, err
    jd = json.loads((tmp_path / "d" / "explain.json").read_text())
    jc = json.loads((tmp_path / "c" / "explain.json").read_text())
    same_explain(jd, jc)
    assert jd["settings"]["files"] == FILES
    assert jd["settings"]["dask"] == "a local Dask cluster of 2 worker processes"
    # the CSV tables have the same columns and rows (global row indices)
    td = pd.read_csv(tmp_path / "d" / "explain.csv")
    tc = pd.read_csv(tmp_path / "c" / "explain.csv")
    assert list(td.columns) == list(tc.columns) == cli._EXPLAIN_COLUMNS
    assert td["train_index"].tolist() == tc["train_index"].tolist()


@pytest.mark.slow
def test_mislabels_on_a_local_cluster_matches_the_csv_path(binary, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    folder, csv = binary
    rc, out, err = run(
        capsys, "mislabels", folder, "--label", "y", "--workers", 2, "--out", tmp_path / "d",
        "--report", tmp_path / "r",
    )  # fmt: skip
    assert rc == 0, err
    rc, _, err = run(capsys, "mislabels", csv, "--label", "y", "--out", tmp_path / "c")
    assert rc == 0, err
    jd = json.loads((tmp_path / "d" / "mislabels.json").read_text())
    jc = json.loads((tmp_path / "c" / "mislabels.json").read_text())
    assert len(jd["rows"]) == FILES * ROWS  # fewer rows than the default --max-rows: every row
    same_mislabels(jd["rows"], jc["rows"])
    same_fit(jd["model_fit"], jc["model_fit"])
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert [r["train_index"] for r in results["rows"]] == [r["train_index"] for r in jc["rows"]]
    assert (tmp_path / "r" / "self_influence.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# --scheduler: a running cluster
# ------------------------------------------------------------------------------------------------
def test_explain_text_labels_and_a_test_file_on_a_scheduler(scheduler, tmp_path, capsys):
    X, y = _binary(1, text=True)
    csv = _write(tmp_path / "pq", X, y, label="cls")
    rng = np.random.default_rng(2)
    test = pd.DataFrame(rng.standard_normal((3, FEATURES)), columns=NAMES)
    test["cls"] = ["pos", "neg", "pos"]
    test[NAMES[::-1] + ["cls"]].to_csv(
        tmp_path / "test.csv", index=False, float_format="%.17g"
    )  # other order
    common = ["--label", "cls", "--test", tmp_path / "test.csv", "-k", "3"]
    rc, _, err = run(
        capsys,
        "explain",
        tmp_path / "pq",
        *common,
        "--scheduler",
        scheduler,
        "--out-json",
        tmp_path / "d.json",
    )
    assert rc == 0, err
    rc, _, err = run(capsys, "explain", csv, *common, "--out-json", tmp_path / "c.json")
    assert rc == 0, err
    jd, jc = (json.loads((tmp_path / f).read_text()) for f in ("d.json", "c.json"))
    same_explain(jd, jc)
    assert {e["train_label"] for p in jd["test_points"] for e in p["helpful"] + p["harmful"]} <= {
        "neg",
        "pos",
    }
    assert jd["settings"]["dask"].startswith(f"the Dask scheduler at {scheduler}")
    # the same test points in a .parquet test file (read into this process)
    test.to_parquet(tmp_path / "test.parquet", index=False)
    common[common.index(tmp_path / "test.csv")] = tmp_path / "test.parquet"
    rc, _, err = run(
        capsys,
        "explain",
        tmp_path / "pq",
        *common,
        "--scheduler",
        scheduler,
        "--out-json",
        tmp_path / "p.json",
    )
    assert rc == 0, err
    same_explain(json.loads((tmp_path / "p.json").read_text()), jc)


def test_ridge_mislabels_against_closed_form_numpy(scheduler, tmp_path, capsys):
    rng = np.random.default_rng(3)
    n, l2 = FILES * ROWS, 0.05
    X = rng.standard_normal((n, FEATURES))
    y = X @ rng.standard_normal(FEATURES) + 0.3 + 0.5 * rng.standard_normal(n)
    _write(tmp_path / "pq", X, y)
    rc, _, err = run(
        capsys, "mislabels", tmp_path / "pq", "--label", "y", "--model", "ridge", "--l2", l2, "--max-rows", 0,
        "--scheduler", scheduler, "--out-json", tmp_path / "d.json",
    )  # fmt: skip
    assert rc == 0, err
    rows = json.loads((tmp_path / "d.json").read_text())
    A = np.hstack([X, np.ones((n, 1))])
    P = np.diag([l2] * FEATURES + [0.0])  # the intercept is not penalised
    H = A.T @ A / n + P
    theta = np.linalg.solve(H, A.T @ y / n)
    s = A @ theta
    G = (s - y)[:, None] * A  # ∇θ (s − y)²/2
    self_influence = -np.einsum("ij,ij->i", G, np.linalg.solve(H, G.T).T)
    order = np.argsort(-np.abs(self_influence), kind="stable")
    got = rows["rows"]
    assert [r["train_index"] for r in got] == order.tolist()  # every row, most suspicious first
    assert rel([r["self_influence"] for r in got], self_influence[order]) <= TOL
    assert rel([r["loss_change_if_removed"] for r in got], -self_influence[order] / n) <= TOL
    assert rel([r["training_loss"] for r in got], 0.5 * (s - y)[order] ** 2) <= TOL
    assert rel([r["prediction"] for r in got], s[order]) <= TOL
    r2 = 1 - np.sum((y - s) ** 2) / np.sum((y - y.mean()) ** 2)
    assert rows["model_fit"]["train"] == pytest.approx(r2, rel=TOL)


def test_three_classes_and_max_rows_on_a_scheduler(scheduler, tmp_path, capsys):
    rng = np.random.default_rng(5)
    n = FILES * ROWS
    X = rng.standard_normal((n, FEATURES))
    y = np.argmax(X[:, :3] + rng.standard_normal((n, 3)), axis=1)
    csv = _write(tmp_path / "pq", X, y)
    rc, out, err = run(
        capsys, "mislabels", tmp_path / "pq", "--label", "y", "--max-rows", 25, "-k", 3,
        "--scheduler", scheduler, "--out-json", tmp_path / "d.json",
    )  # fmt: skip
    assert rc == 0, err
    assert f"the 25 most suspicious of {n} training rows" in out
    rc, _, err = run(capsys, "mislabels", csv, "--label", "y", "--out-json", tmp_path / "c.json")
    assert rc == 0, err
    jd, jc = (json.loads((tmp_path / f).read_text()) for f in ("d.json", "c.json"))
    assert len(jd["rows"]) == 25 and len(jc["rows"]) == n
    same_mislabels(jd["rows"], jc["rows"][:25])
    assert any("25 most suspicious" in note for note in jd["notes"])


def _nbytes(obj: Any) -> int:
    """Bytes of the numpy arrays in a result (nested in tuples, lists and dicts)."""
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes)
    if isinstance(obj, (tuple, list)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(o) for o in obj.values())
    return 0


def test_the_client_never_holds_the_training_matrix(scheduler, tmp_path, capsys, monkeypatch):
    """Everything computed comes to the client through Client.gather: counted here, it stays far below the
    matrix's size; and the client never reads a Parquet file's rows itself (the workers are other processes)."""
    import pyarrow.parquet as pq

    rng = np.random.default_rng(6)
    n, d = 30_000, 20
    folder = tmp_path / "pq"
    folder.mkdir()
    for i in range(3):
        X = rng.standard_normal((n // 3, d))
        frame = pd.DataFrame(X, columns=[f"x{j}" for j in range(d)])
        frame["y"] = (X[:, 0] + rng.standard_normal(n // 3) > 0).astype(np.int64)
        frame.to_parquet(folder / f"p{i}.parquet", index=False)
    matrix_bytes = n * d * 8  # 4.8 MB
    gathered: List[int] = []
    real_gather = distributed.Client.gather

    def counting_gather(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = real_gather(self, *args, **kwargs)
        gathered.append(_nbytes(result))
        return result

    def no_rows_here(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the client read the rows of a Parquet file")

    monkeypatch.setattr(distributed.Client, "gather", counting_gather)
    monkeypatch.setattr(pq, "read_table", no_rows_here)
    rc, _, err = run(
        capsys, "mislabels", folder, "--label", "y", "--max-rows", 100, "--standardize",
        "--scheduler", scheduler, "--out-json", tmp_path / "d.json", "--quiet",
    )  # fmt: skip
    assert rc == 0, err
    assert len(json.loads((tmp_path / "d.json").read_text())["rows"]) == 100
    assert len(gathered) > 5  # the checks, the fit's passes, the scores, the fetched rows
    assert max(gathered) < matrix_bytes / 100, (max(gathered), matrix_bytes)
    assert sum(gathered) < matrix_bytes / 10, (sum(gathered), matrix_bytes)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def _one_line_error(rc: int, err: str, *fragments: str) -> None:
    assert rc == 1, err
    lines = [line for line in err.strip().splitlines() if ": note: " not in line]
    assert len(lines) == 1 and lines[0].startswith("pyinfluence "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def _frame(seed: int = 0, rows: int = 20) -> Any:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.standard_normal((rows, 3)), columns=["a", "b", "c"])
    frame["y"] = rng.integers(0, 2, rows)
    return frame


def test_bad_folders_are_refused_naming_the_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run(capsys, "mislabels", empty, "--label", "y")
    _one_line_error(rc, err, str(empty), "no Parquet files")

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _frame().to_parquet(mixed / "a.parquet", index=False)
    (mixed / "notes.txt").write_text("hello")
    (mixed / "_SUCCESS").write_text("")  # skipped, as Spark and pyarrow do
    rc, _, err = run(capsys, "mislabels", mixed, "--label", "y")
    _one_line_error(rc, err, str(mixed / "notes.txt"), "not a Parquet file")

    fake = tmp_path / "fake"
    fake.mkdir()
    _frame().to_parquet(fake / "a.parquet", index=False)
    (fake / "b.parquet").write_bytes(b"not parquet at all")
    rc, _, err = run(capsys, "mislabels", fake, "--label", "y")
    _one_line_error(rc, err, str(fake / "b.parquet"), "not a readable Parquet file")

    rc, _, err = run(capsys, "mislabels", mixed / "a.parquet", "--label", "label")
    _one_line_error(rc, err, str(mixed / "a.parquet"), "no label column 'label'", "a, b, c, y")

    differ = tmp_path / "differ"
    differ.mkdir()
    _frame().to_parquet(differ / "p1.parquet", index=False)
    _frame().rename(columns={"c": "z"}).to_parquet(differ / "p2.parquet", index=False)
    rc, _, err = run(capsys, "explain", differ, "--label", "y", "--test-indices", "0")
    _one_line_error(
        rc, err, str(differ / "p2.parquet"), "columns differ", "missing: c", "not in p1.parquet: z"
    )

    text = tmp_path / "text"
    text.mkdir()
    _frame().assign(b="word").to_parquet(text / "p.parquet", index=False)
    rc, _, err = run(capsys, "mislabels", text, "--label", "y")
    _one_line_error(rc, err, str(text / "p.parquet"), "column 'b'", "features must be numbers")


def test_a_missing_value_is_named_by_file_row_and_column(scheduler, tmp_path, capsys):
    folder = tmp_path / "pq"
    folder.mkdir()
    _frame(1).to_parquet(folder / "p1.parquet", index=False)
    frame = _frame(2)
    frame.loc[7, "b"] = np.nan
    frame.to_parquet(folder / "p2.parquet", index=False)
    rc, _, err = run(capsys, "mislabels", folder, "--label", "y", "--scheduler", scheduler)
    _one_line_error(
        rc, err, str(folder / "p2.parquet"), "row 7 (row 27 of the data)", "column 'b'", "missing"
    )


def test_cluster_options_are_checked(tmp_path, capsys, monkeypatch):
    csv = tmp_path / "d.csv"
    _frame().to_csv(csv, index=False)
    rc, _, err = run(capsys, "mislabels", csv, "--label", "y", "--workers", 2)
    _one_line_error(rc, err, "--workers applies to a folder of Parquet files", str(csv))
    rc, _, err = run(capsys, "mislabels", csv, "--label", "y", "--workers", 2, "--scheduler", "tcp://x:1")
    assert rc == 2 and "not allowed with argument" in err  # a usage error
    rc, _, err = run(capsys, "mislabels", csv, "--label", "y", "--workers", 0)
    assert rc == 2 and "expected a positive integer" in err
    folder = tmp_path / "pq"
    folder.mkdir()
    _frame().to_parquet(folder / "p.parquet", index=False)
    monkeypatch.setattr(cli, "SCHEDULER_TIMEOUT_S", 2)
    rc, _, err = run(capsys, "mislabels", folder, "--label", "y", "--scheduler", "tcp://127.0.0.1:9")
    _one_line_error(rc, err, "--scheduler tcp://127.0.0.1:9: cannot connect")


def test_a_classifier_refuses_a_continuous_target(scheduler, tmp_path, capsys):
    folder = tmp_path / "pq"
    folder.mkdir()
    for i in range(2):
        frame = _frame(i, rows=50)
        frame["y"] = np.arange(50) + 50 * i  # 100 distinct integers for 100 rows
        frame.to_parquet(folder / f"p{i}.parquet", index=False)
    rc, _, err = run(capsys, "mislabels", folder, "--label", "y", "--scheduler", scheduler)
    _one_line_error(rc, err, str(folder), "100 distinct values for 100 rows", "use --model ridge")
