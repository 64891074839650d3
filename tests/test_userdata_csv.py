"""The CSV reader (pyinfluence.cli.userdata.read_csv): pandas' or pyarrow's parser where installed,
the hand parser (Python's csv module) otherwise.

Every fast reader must return the hand parser's table bit for bit on good files, and on bad files
the hand parser's one-line message (file, line, column, the offending text). The expected values
are written here: numbers as Python's float() reads the cells this test writes, and the line and
column of each bad cell. pandas and pyarrow are optional: without them only the hand parser's cases
run (the numpy-only CI environment).
"""

from __future__ import annotations

import csv
import importlib
import pathlib
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from pyinfluence.cli import userdata
from pyinfluence.cli.userdata import CsvTable, DataError, read_csv

FAST = ["pandas", "pyarrow"]
ALL = ["python", *FAST]


def _need(engine: str) -> None:
    if engine != "python":
        pytest.importorskip("pyarrow.csv" if engine == "pyarrow" else engine)


@pytest.fixture
def use(monkeypatch) -> Callable[[str], None]:
    """use(engine): force the reader ("python": the hand parser); skips if it is not installed."""

    def force(engine: str) -> None:
        _need(engine)
        monkeypatch.setattr(userdata, "_CSV_ENGINE", engine)

    return force


@pytest.fixture
def no_fallback(monkeypatch) -> Callable[[], None]:
    """no_fallback(): from now on, a call of the hand parser fails the test: the fast reader must
    read the file itself (so that comparing it with the hand parser means something)."""

    def forbid() -> None:
        def refuse(*args, **kwargs):
            raise AssertionError("the fast reader handed a good file to the hand parser")

        monkeypatch.setattr(userdata, "_read_csv_python", refuse)

    return forbid


def _bits(t: CsvTable) -> tuple:
    """Everything in a table, arrays as (dtype, shape, bytes): equal tuples = equal bit for bit."""
    y = None if t.y is None else (t.y.dtype.str, t.y.shape, t.y.tobytes())
    return (
        t.X.dtype.str,
        t.X.shape,
        t.X.tobytes(),
        t.X.flags.c_contiguous,
        y,
        t.feature_names,
        t.label_name,
        t.notes,
    )


def _write(path: pathlib.Path, text: str, newline: str = "\n", bom: bool = False) -> pathlib.Path:
    data = text.replace("\n", newline).encode("utf-8")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def _read(path: pathlib.Path, label: Optional[str], **kw) -> CsvTable:
    return read_csv(path, label, **kw)


# ================================================================================================
# good files: the same table as the hand parser's, and the values the test wrote
# ================================================================================================
GOOD = {
    # name: (text, label, kwargs, expected X, expected y, expected feature names)
    "plain": ("a,b,y\n1,2.5,0\n-3,4e-3,1\n", "y", {}, [[1, 2.5], [-3, 4e-3]], [0, 1], ["a", "b"]),
    "quoted": (
        '"a","b c",y\n"1.5",2,"x,y"\n3,"-4","say ""hi"""\n',
        "y",
        {},
        [[1.5, 2], [3, -4]],
        ["x,y", 'say "hi"'],
        ["a", "b c"],
    ),
    "label_by_index": ("a,y,b\n1,0,2\n3,1,4\n", "1", {}, [[1, 2], [3, 4]], [0, 1], ["a", "b"]),
    "label_by_negative_index": ("a,b,y\n1,2,0\n3,4,1\n", "-1", {}, [[1, 2], [3, 4]], [0, 1], ["a", "b"]),
    "string_labels": (
        "a,b,kind\n1,2, cat \n3,4,dog\n5,6,cat\n",
        "kind",
        {},
        [[1, 2], [3, 4], [5, 6]],
        ["cat", "dog", "cat"],
        ["a", "b"],
    ),  # fmt: skip
    "whitespace": (" a , b ,y\n 1.5 ,\t2\t, 1 \n3 , 4,0\n", "y", {}, [[1.5, 2], [3, 4]], [1, 0], ["a", "b"]),
    "blank_lines": ("a,b,y\n1,2,0\n\n3,4,1\n\n", "y", {}, [[1, 2], [3, 4]], [0, 1], ["a", "b"]),
    "semicolons": ("a;b;y\n1;2;0\n3;4;1\n", "y", {}, [[1, 2], [3, 4]], [0, 1], ["a", "b"]),
    "tabs": ("a\tb\ty\n1\t2\t0\n3\t4\t1\n", "y", {}, [[1, 2], [3, 4]], [0, 1], ["a", "b"]),
    "float_labels": ("a,y\n1,0.5\n2,-2.5\n", "y", {}, [[1], [2]], [0.5, -2.5], ["a"]),
    "ridge_targets": ("a,y\n1,-0\n2,3\n", "y", {"numeric_labels": True}, [[1], [2]], [-0.0, 3.0], ["a"]),
    "no_label": ("a,b\n1,2\n3,4\n", None, {"require_label": False}, [[1, 2], [3, 4]], None, ["a", "b"]),
    "pandas_index": (",a,y\n0,5,0\n1,6,1\n2,7,0\n", "y", {}, [[5], [6], [7]], [0, 1, 0], ["a"]),
    "signed_zero_features": (
        "a,b,y\n-0,-0.0,0\n0,+0,1\n",
        "y",
        {},
        [[-0.0, -0.0], [0, 0]],
        [0, 1],
        ["a", "b"],
    ),
    "multiline_quoted_label": (
        'a,y\n1,"two\nlines"\n2,one\n',
        "y",
        {},
        [[1], [2]],
        ["two\nlines", "one"],
        ["a"],
    ),
}


def _expected_y(values, numeric: bool) -> Optional[np.ndarray]:
    """Text labels as text; integral numbers as int64 (float64 for ridge targets); else float64."""
    if values is None:
        return None
    if isinstance(values[0], str):
        return np.array(values)
    a = np.array(values, dtype=np.float64)
    return a.astype(np.int64) if not numeric and all(float(v).is_integer() for v in values) else a


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["LF", "CRLF"])
@pytest.mark.parametrize("bom", [False, True], ids=["", "BOM"])
@pytest.mark.parametrize("engine", ALL)
@pytest.mark.parametrize("name", list(GOOD))
def test_good_files_read_the_same_bit_for_bit(tmp_path, use, no_fallback, name, engine, bom, newline):
    text, label, kw, X, y, names = GOOD[name]
    if newline == "\r\n" and name == "multiline_quoted_label":
        y = ["two\r\nlines", "one"]  # the line end inside the quotes is part of the label
    path = _write(tmp_path / f"{name}.csv", text, newline, bom)
    use("python")
    reference = _read(path, label, **kw)
    use(engine)
    if engine != "python":
        no_fallback()
    got = _read(path, label, **kw)
    assert _bits(got) == _bits(reference)
    # and both are what the test wrote
    expected_X = np.array(X, dtype=np.float64)
    assert got.X.tobytes() == expected_X.tobytes() and got.X.shape == expected_X.shape
    expected_y = _expected_y(y, kw.get("numeric_labels", False))
    if expected_y is None:
        assert got.y is None
    else:
        assert got.y is not None and got.y.dtype.kind == expected_y.dtype.kind
        assert got.y.tolist() == expected_y.tolist()
        if expected_y.dtype.kind == "f":
            assert got.y.tobytes() == expected_y.tobytes()  # the signs of zeros too
    assert got.feature_names == names
    assert bool(got.notes) == (name == "pandas_index")


def _hard_number(rng: random.Random) -> str:
    """A number as people and programs write them, including the hard cases of decimal-to-binary
    rounding: 17 to 30 significant digits, exponents near the ends of the range, subnormals,
    halfway cases, leading zeros, integers past 2**53."""
    kind = rng.randrange(8)
    if kind == 0:
        return repr(rng.uniform(-1e6, 1e6))
    if kind == 1:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(17, 30)))
        return f"{rng.choice(['', '-'])}{rng.randint(1, 9)}.{digits}e{rng.randint(-330, 305)}"
    if kind == 2:
        return "0." + "0" * rng.randint(0, 25) + str(rng.randint(1, 10**18))
    if kind == 3:
        return str(rng.randint(-(10**22), 10**22))
    if kind == 4:
        return repr(rng.uniform(0, 1) * 2.0 ** rng.randint(-1074, -1022))  # subnormals
    if kind == 5:  # exactly halfway between two doubles: ties to even
        m = rng.getrandbits(53) | 1
        return str(2 * m + 1) + "e0" if rng.random() < 0.5 else f"{(2 * m + 1) * 2**970}"
    if kind == 6:
        return rng.choice(
            ["1.", ".5", "+.5", "1E5", "-0", "0e0", "9007199254740993", "5e-324", "1.7976931348623157e308"]
        )
    return f"{rng.uniform(-100, 100):.{rng.randint(0, 12)}f}"


@pytest.mark.parametrize("engine", FAST)
def test_hard_numbers_are_rounded_as_python_rounds_them(tmp_path, use, no_fallback, engine):
    rng = random.Random(18)
    n, d = 400, 5
    cells = [[_hard_number(rng) for _ in range(d)] for _ in range(n)]
    labels = [rng.choice(["0", "1", "2"]) for _ in range(n)]
    lines = [",".join([f"x{j}" for j in range(d)] + ["y"])]
    lines += [",".join(row + [lab]) for row, lab in zip(cells, labels)]
    path = _write(tmp_path / "hard.csv", "\n".join(lines) + "\n")
    expected = np.array([[float(c) for c in row] for row in cells])  # Python's correctly rounded float()
    use("python")
    reference = _read(path, "y")
    use(engine)
    no_fallback()
    got = _read(path, "y")
    assert got.X.tobytes() == expected.tobytes()
    assert _bits(got) == _bits(reference)
    assert got.y is not None
    assert got.y.tolist() == [int(v) for v in labels]


@pytest.mark.parametrize("engine", FAST)
@pytest.mark.parametrize(
    "text,label,expected_y",
    [
        ("a,y\n1,1_0\n2,3\n", "y", [10, 3]),  # Python's float() reads 1_0; the parsers do not
        ("a,y\n1,True\n2,False\n", "y", ["True", "False"]),  # text labels, not booleans
        ("a,y\n1,9007199254740993\n2,-0\n", "y", [9007199254740992.0, -0.0]),  # past 2**53: floats
        ("a,y\n1,0.5\n2,-0\n", "y", [0.5, -0.0]),  # "-0" read as an integer loses its sign
        ("a,y\n1,2020-01-01\n2,2020-01-02\n", "y", ["2020-01-01", "2020-01-02"]),  # text, not dates
        ("a,y\n1,cat\n2,\n", "y", ["cat", ""]),  # an empty label after a text label is text
        ("a,b,y\n1,2,0\n,,\n , ,\n3,4,1\n", "y", [0, 1]),  # rows of empty cells are blank lines
        ("a,b,y\n1,1_000,0\n3,4,1\n", "y", [0, 1]),  # float('1_000') == 1000.0
    ],
)
def test_files_the_fast_reader_hands_over_read_the_same(tmp_path, use, engine, text, label, expected_y):
    path = _write(tmp_path / "d.csv", text)
    use("python")
    reference = _read(path, label)
    use(engine)
    got = _read(path, label)
    assert _bits(got) == _bits(reference)
    assert got.y is not None
    assert got.y.tolist() == expected_y
    if got.y.dtype.kind == "f":
        assert np.signbit(got.y).tolist() == np.signbit(np.array(expected_y, dtype=float)).tolist()


# ================================================================================================
# bad files: the hand parser's message, naming the line, the column and the text
# ================================================================================================
LIMIT = csv.field_size_limit()
BAD: Dict[str, Tuple[str, Optional[str], Dict[str, Any], List[str]]] = {
    # name: (text, label, kwargs, fragments of the message)
    "not_a_number": ("a,b,y\n1,2,0\n3,abc,1\n", "y", {}, ["line 3, column 'b': 'abc' is not a number"]),
    "empty_cell": ("a,b,y\n1,2,0\n3,,1\n", "y", {}, ["line 3, column 'b': a missing value (NaN)"]),
    "na_cell": ("a,b,y\n1,NA,0\n3,4,1\n", "y", {}, ["line 2, column 'b': a missing value (NaN)"]),
    "nan_cell": ("a,b,y\n1,2,0\n3,4,1\nnan,5,0\n", "y", {}, ["line 4, column 'a': a missing value (NaN)"]),
    "infinite": ("a,b,y\n1,2,0\n3,-inf,1\n", "y", {}, ["line 3, column 'b': an infinite value"]),
    "overflow": ("a,b,y\n1,1e400,0\n", "y", {}, ["line 2, column 'b': an infinite value"]),
    "boolean_column": (
        "a,b,y\n1,True,0\n3,false,1\n",
        "y",
        {},
        ["line 2, column 'b': 'True' is not a number"],
    ),
    "boolean_ridge_target": (
        "a,y\n1,True\n2,False\n",
        "y",
        {"numeric_labels": True},
        ["line 2: label 'True' is not a number (ridge regression needs numeric targets)"],
    ),
    "unnamed_column": ("a,,y\n1,x,0\n", "y", {}, ["line 2, column column 2 (unnamed): 'x' is not a number"]),
    "extra_field_first_row": ("a,b,y\n1,2,0,9\n3,4,1\n", "y", {}, ["line 2: 4 fields but the header has 3"]),
    "trailing_delimiter": ("a,b,y\n1,2,0\n3,4,1,\n", "y", {}, ["line 3: 4 fields but the header has 3"]),
    "short_row_text_label": ("a,b,y\n1,2,cat\n3,4\n", "y", {}, ["line 3: 2 fields but the header has 3"]),
    "short_row": ("a,b,y\n1,2,0\n3\n", "y", {}, ["line 3: 1 fields but the header has 3"]),
    "missing_label": ("a,y\n1,0\n2,\n", "y", {}, ["label column 'y', line 3: a missing label ('')"]),
    "nan_label": ("a,y\n1,0\n2,NaN\n", "y", {}, ["label column 'y', line 3: a missing label ('NaN')"]),
    "infinite_label": (
        "a,y\n1,0\n2,inf\n",
        "y",
        {},
        ["label column 'y', line 3: a non-finite label ('inf')"],
    ),
    "text_ridge_target": (
        "a,y\n1,0.5\n2,cat\n",
        "y",
        {"numeric_labels": True},
        ["line 3: label 'cat' is not a number (ridge regression needs numeric targets)"],
    ),
    "header_only": ("a,b,y\n", "y", {}, ["no data rows after the header"]),
    "empty": ("", "y", {}, ["empty file (a header row is expected)"]),
    "duplicate_names": ("a,a,y\n1,2,0\n", "y", {}, ["duplicate column name(s) 'a'"]),
    "no_label_column": ("a,b,y\n1,2,0\n", "zz", {}, ["no label column 'zz' (columns: a, b, y)"]),
    "label_not_named": ("a,b,y\n1,2,0\n", None, {}, ["name the label column with --label"]),
    "too_many_features": (
        "a,b,c,y\n1,2,3,0\n",
        "y",
        {"max_features": 2},
        ["3 feature columns", "limit of 2"],
    ),
    "too_large": (
        "a,b,y\n" + "1,2,0\n" * 100,
        "y",
        {"max_bytes": 100},
        ["606 bytes, more than the input limit of 100 bytes"],
    ),
    "long_text_label": (
        "a,y\n1,0\n2," + "x" * (LIMIT + 1) + "\n",
        "y",
        {},
        [f"line 3: cannot parse the CSV (a field longer than {LIMIT:,} characters"],
    ),
    "long_number": (  # a finite number longer than the csv module's field limit
        "a,y\n1,0\n0." + "0" * LIMIT + "1,1\n",
        "y",
        {},
        [f"line 3: cannot parse the CSV (a field longer than {LIMIT:,} characters"],
    ),
    "late_bad_cell": (
        "a,b,y\n" + "1.5,2,0\r\n" * 3000 + '4,"5\n",1\n' + "\n" + "1,2,1\n" * 2000 + "7,x8,0\n",
        "y",
        {},
        [
            "line 5005, column 'b': 'x8' is not a number"
        ],  # 1 + 3000 + 2 (a quoted newline) + 1 blank + 2000 + 1
    ),
}


@pytest.mark.parametrize("engine", ALL)
@pytest.mark.parametrize("name", list(BAD))
def test_bad_files_get_the_hand_parsers_message(tmp_path, use, name, engine):
    text, label, kw, fragments = BAD[name]
    path = _write(tmp_path / f"{name}.csv", text)
    use("python")
    with pytest.raises(DataError) as reference:
        _read(path, label, **kw)
    use(engine)
    with pytest.raises(DataError) as got:
        _read(path, label, **kw)
    message = str(got.value)
    assert message == str(reference.value)
    assert len(message.splitlines()) == 1 and message.startswith(str(path))
    for fragment in fragments:
        assert fragment in message, (fragment, message)


@pytest.mark.parametrize("engine", ALL)
@pytest.mark.parametrize(
    "data,what",
    [(b"a,b,y\n1,2,0\n3,\x004,1\n", "contains NUL bytes"), (b"a,b,y\n1,2,0\n3,\xff,1\n", "not a UTF-8 text")],
    ids=["NUL", "latin-1"],
)
def test_binary_files_get_the_hand_parsers_message(tmp_path, use, engine, data, what):
    path = tmp_path / "d.csv"
    path.write_bytes(data)
    use(engine)
    with pytest.raises(DataError, match=what) as got:
        _read(path, "y")
    use("python")
    with pytest.raises(DataError) as reference:
        _read(path, "y")
    assert str(got.value) == str(reference.value)


# ================================================================================================
# which reader runs
# ================================================================================================
def test_the_reader_is_pandas_else_pyarrow_else_the_hand_parser(monkeypatch):
    monkeypatch.setattr(userdata, "_CSV_ENGINE", None)
    big = userdata._FAST_MIN_BYTES
    expected: List[Optional[str]] = []
    for name in FAST:  # what an import finds here
        try:
            importlib.import_module("pyarrow.csv" if name == "pyarrow" else name)
            expected.append(name)
        except ImportError:
            pass
    assert userdata._fast_engine(big) == (expected[0] if expected else None)
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` now raises ImportError
    assert userdata._fast_engine(big) == ("pyarrow" if "pyarrow" in expected else None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.csv", None)
    assert userdata._fast_engine(big) is None


def test_small_files_use_a_fast_reader_only_if_already_imported(monkeypatch):
    monkeypatch.setattr(userdata, "_CSV_ENGINE", None)
    small = userdata._FAST_MIN_BYTES - 1
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    assert userdata._fast_engine(small) is None
    fake = type(sys)("pyarrow")
    monkeypatch.setitem(sys.modules, "pyarrow", fake)  # imported (by anyone) counts; no import is tried
    assert userdata._fast_engine(small) == "pyarrow"


@pytest.mark.parametrize("missing", [["pandas"], ["pandas", "pyarrow"]], ids=["no pandas", "neither"])
def test_without_pandas_the_next_reader_reads_the_same(tmp_path, monkeypatch, missing):
    path = _write(tmp_path / "d.csv", "a,b,y\n1,2.5,cat\n3,-4,dog\n")
    monkeypatch.setattr(userdata, "_CSV_ENGINE", "python")
    reference = _read(path, "y")
    monkeypatch.setattr(userdata, "_CSV_ENGINE", None)
    monkeypatch.setattr(userdata, "_FAST_MIN_BYTES", 0)  # as for a large file
    if "pyarrow" not in missing:
        pytest.importorskip("pyarrow.csv")
    for name in missing:
        monkeypatch.setitem(sys.modules, name, None)
    if "pyarrow" in missing:
        monkeypatch.setitem(sys.modules, "pyarrow.csv", None)
    used = []
    for fn in ("_pandas_columns", "_pyarrow_columns", "_read_csv_python"):
        real = getattr(userdata, fn)

        def spy(*args, _real=real, _name=fn, **kwargs):
            used.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(userdata, fn, spy)
    got = _read(path, "y")
    assert used == (["_pyarrow_columns"] if missing == ["pandas"] else ["_read_csv_python"])
    assert _bits(got) == _bits(reference)


def test_a_pipe_is_read_by_the_hand_parser(tmp_path, monkeypatch):
    # a stream can be read once only: the fast readers (which may hand a file over) leave it alone
    if not hasattr(__import__("os"), "mkfifo"):
        pytest.skip("no named pipes")
    import os
    import threading

    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    monkeypatch.setattr(userdata, "_CSV_ENGINE", None)
    monkeypatch.setattr(userdata, "_FAST_MIN_BYTES", 0)

    def write() -> None:
        with open(fifo, "w") as fh:
            fh.write("a,b,y\n1,2,0\n3,4,1\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    got = _read(fifo, "y")
    writer.join(timeout=30)
    assert got.y is not None
    assert got.X.tolist() == [[1.0, 2.0], [3.0, 4.0]] and got.y.tolist() == [0, 1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", FAST)
def test_a_file_large_enough_for_parallel_parsing(tmp_path, use, no_fallback, engine):
    # pandas >= 3.1 splits files over 5 MB between threads: a first row of a piece with an extra
    # field must still end in the hand parser's message, and a good file must read the same
    rng = np.random.default_rng(18)
    n = 120_000
    X = rng.normal(size=(n, 4))
    rows = [",".join(repr(float(v)) for v in X[i]) + ("," + ("cat" if i % 3 else "dog")) for i in range(n)]
    bad_rows = list(rows)
    bad_rows[90_000] += ",1"
    bad = _write(tmp_path / "bad.csv", "a,b,c,d,y\n" + "\n".join(bad_rows) + "\n")
    use(engine)
    with pytest.raises(DataError, match="line 90002: 6 fields but the header has 5"):
        _read(bad, "y")
    good = _write(tmp_path / "good.csv", "a,b,c,d,y\n" + "\n".join(rows) + "\n")
    assert good.stat().st_size > 6 << 20
    no_fallback()
    got = _read(good, "y")
    assert got.X.tobytes() == X.tobytes()
    assert got.y is not None
    assert got.y.tolist() == ["cat" if i % 3 else "dog" for i in range(n)]
