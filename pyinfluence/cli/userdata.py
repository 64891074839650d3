"""Reading a user's data for the command line (``pyinfluence explain`` / ``mislabels``).

Formats:

- CSV with a header row; one column holds the label (named by ``label``, or given as a 0-based
  column index when no column has that name); every other column is a numeric feature. The
  delimiter (``,``, ``;``, tab) is detected from the header line. Parsed by pandas' C parser
  where pandas is installed, else by pyarrow's, else by a hand parser (Python's csv module): the
  same table bit for bit, and the hand parser's messages for bad cells (:func:`read_csv`).
- ``.npz`` with arrays ``X_train`` (n, d), ``y_train`` (n,) and optionally ``X_test`` (m, d),
  ``y_test`` (m,). A test file given separately may instead hold ``X``/``y``.
- A folder of Parquet files (or one ``.parquet`` file): :func:`scan_parquet` checks the files'
  footers here (no rows are read into this process), :func:`open_parquet_on_dask` reads them on
  the Dask workers. See :class:`ParquetData`.

Every problem is a :class:`DataError` (a ``ValueError``) with a one-line message naming the file,
the line and the column: missing file, missing label column, non-numeric or missing (NaN) values,
ragged rows, a single class, mismatched feature counts between training and test data.

Quirks of real files that are handled rather than misread:

- An unnamed first column (header cell empty, or pandas' ``Unnamed: 0``) holding exactly
  0, 1, ..., n-1 is the row index that pandas' ``DataFrame.to_csv`` writes by default; it is
  dropped (not used as a feature) and a note says so (:attr:`UserData.notes`).
- Limits, checked before anything large is read: a CSV file larger than ``max_bytes`` (default
  :data:`DEFAULT_MAX_INPUT_BYTES`, 1 GiB), an ``.npz`` whose members decompress (sizes from the
  zip headers and the ``.npy`` headers) to more than ``max_bytes`` in total, and a CSV with more
  than ``max_features`` feature columns are refused. A file with NUL bytes (``/dev/zero``, a
  binary file) is not a CSV and is refused at its first chunk. Streams (pipes) are read in chunks
  and refused as soon as they pass the limit.
"""

from __future__ import annotations

import array
import codecs
import csv
import importlib
import io
import itertools
import math
import os
import pathlib
import re
import stat
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from pyinfluence._formatting import format_bytes
from pyinfluence.errors import DataError

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "DataError",
    "ParquetData",
    "UserData",
    "check_classes",
    "format_bytes",
    "CONTINUOUS_MAX_ROWS_PER_VALUE",
    "CONTINUOUS_MIN_DISTINCT",
    "labels_look_continuous",
    "check_class_set",
    "is_parquet_input",
    "load_user_data",
    "open_parquet_on_dask",
    "parse_indices",
    "scan_parquet",
]

PathLike = Union[str, pathlib.Path]

_MISSING = {"", "nan", "na", "n/a", "null", "none", "?"}

#: Default limit on what is read from one input file: a CSV's size, an .npz's decompressed size.
DEFAULT_MAX_INPUT_BYTES = 1 << 30

#: Header names of a column without a name (pandas writes "" for its index, and reads it back
#: as "Unnamed: 0").
_UNNAMED_INDEX_HEADERS = ("", "Unnamed: 0")

_READ_CHUNK = 1 << 20


@dataclass
class UserData:
    """Training (and test) data read from the user's files.

    ``train_rows`` (n,): for each training row, its 0-based data row in the source file (header
    not counted) — the index reported to the user. ``test_rows`` (m,): the same for the test rows
    in their source (``test_source``)."""

    X_train: np.ndarray
    y_train: np.ndarray
    feature_names: List[str]
    label_name: str
    train_rows: np.ndarray
    source: str
    X_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    test_rows: Optional[np.ndarray] = None
    test_source: str = ""
    #: what was done to the input on the user's behalf (one line each), e.g. a dropped index column
    notes: List[str] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def has_test(self) -> bool:
        return self.X_test is not None


def _too_large(path: pathlib.Path, what: str, max_bytes: int) -> DataError:
    return DataError(
        f"{path}: {what}, more than the input limit of {format_bytes(max_bytes)} "
        f"(raise it with --max-input-size)"
    )


def _check_input_path(path: pathlib.Path) -> os.stat_result:
    """The file's stat; one-line errors for a missing file or a folder."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(f"{path} is a folder, not a data file")
    return st


def _read_text(path: pathlib.Path, max_bytes: Optional[int]) -> str:
    """The file as text (UTF-8, an optional BOM dropped), read in chunks so that a stream or a
    device is refused once it passes ``max_bytes`` (None: no limit) or shows a NUL byte."""
    st = _check_input_path(path)
    if max_bytes is not None and stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
        raise _too_large(path, f"{format_bytes(st.st_size)}", max_bytes)
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    parts: List[str] = []
    total = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise _too_large(path, f"more than {format_bytes(max_bytes)} read", max_bytes)
            if b"\x00" in chunk:
                raise DataError(f"{path}: contains NUL bytes; not a text (CSV) file")
            try:
                parts.append(decoder.decode(chunk))
            except UnicodeDecodeError:
                raise DataError(f"{path}: not a UTF-8 text (CSV) file") from None
    try:
        parts.append(decoder.decode(b"", final=True))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text (CSV) file") from None
    return "".join(parts)


def _sniff_delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def _parse_number(cell: str) -> float:
    """float(cell); NaN for a missing cell; ValueError for anything else non-numeric."""
    c = cell.strip()
    if c.lower() in _MISSING:
        return math.nan
    return float(c)


def _convert_labels(values: List[str], lines: Sequence[int], where: str, numeric: bool) -> np.ndarray:
    """Label cells (``lines``: their line numbers) → an int64 (integral numbers), float64 or
    string array."""
    nums: List[float] = []
    all_numeric = True
    for r, v in enumerate(values):
        c = v.strip()
        if c.lower() in _MISSING:
            raise DataError(f"{where}, line {lines[r]}: a missing label ({v!r})")
        try:
            x = float(c)
        except ValueError:
            all_numeric = False
            if numeric:
                raise DataError(
                    f"{where}, line {lines[r]}: label {v!r} is not a number (ridge regression "
                    f"needs numeric targets)"
                ) from None
            break
        if not math.isfinite(x):
            raise DataError(f"{where}, line {lines[r]}: a non-finite label ({v!r})")
        nums.append(x)
    if not all_numeric:
        return np.array([v.strip() for v in values])
    a = np.asarray(nums, dtype=np.float64)
    if not numeric and a.size and np.all(a == np.round(a)) and np.all(np.abs(a) < 2**53):
        return a.astype(np.int64)
    return a


class CsvTable(NamedTuple):
    """What :func:`read_csv` returns."""

    X: np.ndarray  # (n, d) float64
    y: Optional[np.ndarray]  # (n,) or None without a label column
    feature_names: List[str]
    label_name: str  # "" without a label column
    notes: List[str]  # what was done on the user's behalf (a dropped index column)


def _column_name(header: List[str], j: int) -> str:
    """A column's name for messages: 'name', or 'column 3 (unnamed)'."""
    return repr(header[j]) if header[j] else f"column {j + 1} (unnamed)"


def _resolve_label_column(p: pathlib.Path, header: List[str], label: str) -> int:
    if label in header:
        return header.index(label)
    try:
        k = int(label)
    except ValueError:
        k = None
    if k is None or not -len(header) <= k < len(header):
        shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
        raise DataError(f"{p}: no label column {label!r} (columns: {shown})")
    return k % len(header)


def _row_features(
    p: pathlib.Path, line: int, row: List[str], feat_idx: List[int], header: List[str]
) -> List[float]:
    """The feature cells of one row as floats; a one-line error naming the line and column for a
    non-number, a missing value or an infinite value."""
    try:
        values = [float(row[j]) for j in feat_idx]  # fast path: every cell a plain number
        if all(math.isfinite(x) for x in values):
            return values
    except ValueError:
        pass
    for j in feat_idx:  # slow path: find the first bad cell and say what is wrong with it
        where = f"{p}, line {line}, column {_column_name(header, j)}"
        try:
            x = _parse_number(row[j])
        except ValueError:
            raise DataError(f"{where}: {row[j].strip()!r} is not a number") from None
        if not math.isfinite(x):
            what = "a missing value (NaN)" if math.isnan(x) else "an infinite value"
            raise DataError(f"{where}: {what}")
    raise AssertionError("unreachable: a row failed the fast path but has no bad cell")


def _csv_error(p: pathlib.Path, line: int, exc: csv.Error) -> DataError:
    msg = str(exc)
    if "field larger than field limit" in msg:
        msg = (
            f"a field longer than {csv.field_size_limit():,} characters (no number is that "
            f"long: is this a CSV file?)"
        )
    return DataError(f"{p}, line {line}: cannot parse the CSV ({msg})")


class _Header(NamedTuple):
    """The checked header row of a CSV file."""

    names: List[str]  # the header cells, stripped
    label_index: Optional[int]  # the label column, None without one
    feat_idx: List[int]  # the feature columns (every column but the label's)
    maybe_index: bool  # the first feature column is unnamed: maybe pandas' row index


def _check_header(
    p: pathlib.Path, cells: List[str], label: Optional[str], require_label: bool, max_features: Optional[int]
) -> _Header:
    """The header row's checks (duplicate names, the label column, the feature count), each a
    one-line :class:`DataError` naming the file."""
    header = [h.strip() for h in cells]
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{p}: duplicate column name(s) {', '.join(repr(d) for d in dup)}")
    li: Optional[int] = None
    if label is not None:
        li = _resolve_label_column(p, header, label)
    elif require_label:
        raise DataError(f"{p}: name the label column with --label")
    feat_idx = [j for j in range(len(header)) if j != li]
    if not feat_idx:
        raise DataError(f"{p}: no feature columns besides the label column")
    maybe_index = feat_idx[0] == 0 and header[0] in _UNNAMED_INDEX_HEADERS
    n_features = len(feat_idx) - int(maybe_index)
    if max_features is not None and n_features > max_features:
        raise DataError(
            f"{p}: {n_features:,} feature columns, more than the limit of {max_features:,} "
            f"features (each adds a model parameter; raise the limit with --max-params)"
        )
    return _Header(header, li, feat_idx, maybe_index)


def _finish_table(
    p: pathlib.Path, X: np.ndarray, hdr: _Header, labels: Callable[[str], Optional[np.ndarray]]
) -> CsvTable:
    """The table from the features ``X`` (n, d) in the columns ``hdr.feat_idx``: pandas' index
    column dropped (with a note), then the labels converted by ``labels(where)`` (None without a
    label column)."""
    n = X.shape[0]
    feat_idx = hdr.feat_idx
    notes: List[str] = []
    if hdr.maybe_index and np.array_equal(X[:, 0], np.arange(n)):
        # pandas' DataFrame.to_csv writes the row index as an unnamed first column by default
        X, feat_idx = np.ascontiguousarray(X[:, 1:]), feat_idx[1:]
        notes.append(
            f"{p}: dropped the unnamed first column: it holds 0..{n - 1}, the row index that "
            f"pandas' to_csv writes by default (index=False leaves it out), not a feature"
        )
        if not feat_idx:
            raise DataError(f"{p}: no feature columns besides the row index and the label")
    li, header = hdr.label_index, hdr.names
    y = None
    if li is not None:
        y = labels(f"{p}, label column {header[li]!r}")
    return CsvTable(X, y, [header[j] for j in feat_idx], header[li] if li is not None else "", notes)


def _read_csv_python(
    p: pathlib.Path,
    label: Optional[str],
    numeric_labels: bool,
    require_label: bool,
    max_bytes: Optional[int],
    max_features: Optional[int],
) -> CsvTable:
    """The hand parser (Python's csv module, row by row): the reference the fast readers match,
    and the one whose messages name the line and column of the first bad cell. Memory: the file as
    text (1 to 4 bytes a character) plus 8 bytes a cell, and one Python string a label."""
    text = _read_text(p, max_bytes)
    end = text.find("\n")
    first_line = text if end < 0 else text[:end]
    if not first_line.strip():
        raise DataError(f"{p}: empty file (a header row is expected)")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_sniff_delimiter(first_line))
    try:
        hdr = _check_header(p, next(reader), label, require_label, max_features)
        header, li, feat_idx = hdr.names, hdr.label_index, hdr.feat_idx
        values = array.array("d")  # the features, row after row: 8 bytes a cell
        labels: List[str] = []
        label_lines: List[int] = []
        for row in reader:
            line = reader.line_num
            if not any(c.strip() for c in row):
                continue  # a blank line
            if len(row) != len(header):
                raise DataError(f"{p}, line {line}: {len(row)} fields but the header has {len(header)}")
            values.extend(_row_features(p, line, row, feat_idx, header))
            if li is not None:
                labels.append(row[li])
                label_lines.append(line)
    except csv.Error as exc:
        raise _csv_error(p, reader.line_num, exc) from None
    del text
    n = len(values) // len(feat_idx)
    if n == 0:
        raise DataError(f"{p}: no data rows after the header")
    X = np.frombuffer(values, dtype=np.float64).reshape(n, len(feat_idx)).copy()
    del values
    return _finish_table(p, X, hdr, lambda where: _convert_labels(labels, label_lines, where, numeric_labels))


# ------------------------------------------------------------------------------------------------
# the fast readers: pandas' C parser, else pyarrow's CSV reader
# ------------------------------------------------------------------------------------------------
#: Which reader parses a CSV file: None picks pandas, else pyarrow, where installed (see
#: :func:`_fast_engine`); "pandas" or "pyarrow" forces one, "python" the hand parser (tests).
_CSV_ENGINE: Optional[str] = None
#: Below this size a CSV is read by the hand parser unless pandas or pyarrow is already imported:
#: importing pandas takes about 0.4 s, in which the hand parser reads about 6 MB.
_FAST_MIN_BYTES = 4 << 20


class _Defer(Exception):
    """The fast reader cannot vouch for this file (a bad cell, a ragged row, an unusual label
    column, ...): the hand parser reads it, and raises its message naming the line and column."""


def _fast_engine(size: int) -> Optional[str]:
    """The reader of a regular file of ``size`` bytes: "pandas", "pyarrow" or None (the hand
    parser)."""
    if _CSV_ENGINE is not None:
        return None if _CSV_ENGINE == "python" else _CSV_ENGINE
    names = ("pandas", "pyarrow")
    if size < _FAST_MIN_BYTES:
        # a small file: only a reader that is already imported is faster than the hand parser
        return next((m for m in names if sys.modules.get(m) is not None), None)
    for name in names:
        try:
            importlib.import_module("pyarrow.csv" if name == "pyarrow" else name)
        except ImportError:
            continue
        return name
    return None


def _head(p: pathlib.Path) -> Tuple[str, List[str]]:
    """(the delimiter, the header cells) as the hand parser reads them: the delimiter from the
    text up to the first newline, the header as the csv module's first record, which must end on
    that line."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    parts: List[str] = []
    with open(p, "rb") as fh:
        while True:
            chunk = fh.read(1 << 16)
            try:
                text = decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise _Defer from None
            k = text.find("\n")
            if k >= 0 or not chunk:
                parts.append(text if k < 0 else text[:k])
                break
            parts.append(text)
    first_line = "".join(parts)
    if not first_line.strip():
        raise _Defer
    delimiter = _sniff_delimiter(first_line)
    reader = csv.reader(iter([first_line + "\n", "\n"]), delimiter=delimiter)
    try:
        cells = next(reader)
    except csv.Error:
        raise _Defer from None
    if reader.line_num != 1:  # a quoted newline in the header: rare, and the readers differ on it
        raise _Defer
    return delimiter, cells


def _longest_run(p: pathlib.Path, separators: bytes, max_bytes: Optional[int], check_text: bool) -> int:
    """The longest run of bytes between two of ``separators`` (or the file's ends): a bound on
    the length of a CSV field when ``separators`` holds the delimiter and the line ends. With
    ``check_text``: raise :class:`_Defer` for what the hand parser refuses (a NUL byte, invalid
    UTF-8, more than ``max_bytes``)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    longest = run = total = 0
    with open(p, "rb") as fh:
        while True:
            chunk = fh.read(_READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if check_text:
                if (max_bytes is not None and total > max_bytes) or b"\x00" in chunk:
                    raise _Defer
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError:
                    raise _Defer from None
            a = np.frombuffer(chunk, dtype=np.uint8)
            mask = a == separators[0]
            for s in separators[1:]:
                mask |= a == s
            at = np.flatnonzero(mask)
            if at.size == 0:
                run += a.size
                continue
            longest = max(longest, run + int(at[0]))
            if at.size > 1:
                longest = max(longest, int(np.diff(at).max()) - 1)
            run = a.size - int(at[-1]) - 1
    if check_text:
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise _Defer from None
    return max(longest, run)


#: What pandas' C parser reads as True/False (case-insensitive), even into a float64 column.
_BOOLEAN_WORDS = [
    "".join(c) for w in ("true", "false") for c in itertools.product(*[(ch, ch.upper()) for ch in w])
]


def _float_columns(hdr: _Header, numeric_labels: bool) -> List[int]:
    """The columns a fast reader parses as float64: the features, and the label column with
    ``numeric_labels`` (then a "-0" keeps its sign, as float() gives it)."""
    li = hdr.label_index
    return hdr.feat_idx + ([li] if numeric_labels and li is not None else [])


def _pandas_columns(
    p: pathlib.Path, delimiter: str, hdr: _Header, numeric_labels: bool
) -> Tuple[List[np.ndarray], Any]:
    """(the feature columns, float64 (n,) each; the label column (n,) or None: float64 with
    ``numeric_labels``, else as pandas infers it) read by pandas' C parser with the csv module's
    dialect; :class:`_Defer` on any error or warning."""
    import pandas as pd

    version = tuple(int(v) for v in re.findall(r"\d+", pd.__version__)[:2])
    extra: Dict[str, Any] = {}
    if version < (3, 1):
        # Python's own string-to-double (correctly rounded, as float()); pandas >= 3.1 has one
        # converter, correctly rounded, and deprecates the argument
        extra["float_precision"] = "round_trip"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            frame = pd.read_csv(
                p,
                sep=delimiter,
                header=0,  # the header row, already read by the csv module
                names=list(range(len(hdr.names))),
                index_col=False,
                dtype={j: np.float64 for j in _float_columns(hdr, numeric_labels)},  # else raises
                engine="c",
                # "", "NA", ... are not numbers (they raise); "true"/"false" in any case would be
                # read as 1.0/0.0 in a float column: as NaN instead, the hand parser names them
                na_filter=True,
                keep_default_na=False,
                na_values=_BOOLEAN_WORDS,
                skip_blank_lines=True,
                quotechar='"',
                doublequote=True,
                escapechar=None,
                skipinitialspace=False,
                comment=None,
                encoding="utf-8",
                encoding_errors="strict",
                on_bad_lines="error",
                **extra,
            )
        except MemoryError:
            raise
        except Exception:  # a bad cell, a ragged row (ParserError), ...: the hand parser says which
            raise _Defer from None
    # ParserWarning: a first row with more fields than the header (pandas drops the extra ones);
    # DtypeWarning: a label column whose type differs between chunks
    if any(issubclass(w.category, (pd.errors.ParserWarning, pd.errors.DtypeWarning)) for w in caught):
        raise _Defer
    features = [frame[j].to_numpy(dtype=np.float64) for j in hdr.feat_idx]
    li = hdr.label_index
    return features, (None if li is None else frame[li].to_numpy())


def _pyarrow_columns(
    p: pathlib.Path, delimiter: str, hdr: _Header, numeric_labels: bool
) -> Tuple[List[np.ndarray], Any]:
    """As :func:`_pandas_columns`, read by pyarrow's CSV reader."""
    import pyarrow as pa
    import pyarrow.csv as pc

    names = [str(j) for j in range(len(hdr.names))]
    try:
        table = pc.read_csv(
            p,
            read_options=pc.ReadOptions(skip_rows=1, column_names=names, encoding="utf8"),
            parse_options=pc.ParseOptions(
                delimiter=delimiter,
                quote_char='"',
                double_quote=True,
                escape_char=False,
                newlines_in_values=True,
                ignore_empty_lines=True,
            ),
            convert_options=pc.ConvertOptions(
                column_types={names[j]: pa.float64() for j in _float_columns(hdr, numeric_labels)},
                null_values=[],  # no cell is read as null
                strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                true_values=[],  # "True" stays text, as in the hand parser
                false_values=[],
                check_utf8=True,
            ),
        )
    except MemoryError:
        raise
    except Exception:  # ArrowInvalid: a bad cell, a ragged row, ...
        raise _Defer from None
    features = [table.column(names[j]).to_numpy() for j in hdr.feat_idx]
    li = hdr.label_index
    if li is None:
        return features, None
    column = table.column(names[li])
    t = column.type
    if not (
        pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
    ):
        raise _Defer  # a date, a null column, ...: the hand parser's text or numbers
    return features, column.to_numpy(zero_copy_only=False)


def _fast_labels(col: np.ndarray, numeric: bool, field_limit: int) -> np.ndarray:
    """The labels as :func:`_convert_labels` returns them, from a column that a fast reader parsed
    (float64 with ``numeric``; else integers, floats or text as inferred); :class:`_Defer` where
    the hand parser would raise or might read them otherwise (a missing or non-finite label,
    mixed types, an empty cell: a short row's)."""
    kind = col.dtype.kind
    # whether a zero's sign is the text's: an inferred column may hold "-0" as the integer 0
    exact_zeros = numeric
    if kind in "iu":
        a = col.astype(np.float64)  # correctly rounded, as float() of the integer's digits
    elif kind == "f":
        a = col.astype(np.float64, copy=False)
    elif kind in "OUT":
        values = np.asarray(col, dtype=object)
        if not all(isinstance(v, str) for v in values):
            raise _Defer  # mixed chunks: numbers and text
        if values.size and (np.any(values == "") or max(map(len, values)) > field_limit):
            raise _Defer  # "" is also what a short row's missing label reads as
        try:
            a = values.astype(np.float64)  # float(cell) on each: Python's own parsing
        except (ValueError, TypeError):
            try:  # text labels: the hand parser's own conversion (and its checks up to the first text)
                return _convert_labels(list(values), range(values.size), "", numeric)
            except DataError:
                raise _Defer from None
        exact_zeros = True
    else:
        raise _Defer  # booleans (pandas), ...: text in the hand parser
    if not np.all(np.isfinite(a)):
        raise _Defer  # a missing ("nan") or infinite label
    if not numeric and a.size and np.all(a == np.round(a)) and np.all(np.abs(a) < 2**53):
        return a.astype(np.int64)
    if not exact_zeros and np.any(a == 0):
        raise _Defer  # float labels with a zero that may have been written "-0"
    return a


def _read_csv_fast(
    p: pathlib.Path,
    engine: str,
    label: Optional[str],
    numeric_labels: bool,
    require_label: bool,
    max_bytes: Optional[int],
    max_features: Optional[int],
) -> CsvTable:
    """:func:`read_csv` with pandas' or pyarrow's parser: the same table, bit for bit, as the hand
    parser's, or :class:`_Defer` (any doubt, every error: then the hand parser reads the file).
    Memory: 8 bytes a cell twice (the parser's columns and the (n, d) matrix), no text copy."""
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise _Defer
    delimiter, cells = _head(p)
    try:
        hdr = _check_header(p, cells, label, require_label, max_features)
    except DataError:
        raise _Defer from None  # the hand parser's message, after its checks of the whole text
    # NUL bytes, invalid UTF-8, the input limit: refused by the hand parser before any cell. A
    # field longer than the csv module's limit is refused too; a line bounds a field (quoted
    # labels are measured below, quoted numbers over lines fail to parse)
    field_limit = csv.field_size_limit()
    if _longest_run(p, b"\n", max_bytes, check_text=True) > field_limit:
        seps = bytes([ord(delimiter), ord("\n"), ord("\r")])
        if _longest_run(p, seps, None, check_text=False) > field_limit:
            raise _Defer
    reader = _pandas_columns if engine == "pandas" else _pyarrow_columns
    features, label_col = reader(p, delimiter, hdr, numeric_labels)
    n = features[0].shape[0]
    if n == 0:
        raise _Defer
    X = np.empty((n, len(features)), dtype=np.float64)
    for k, column in enumerate(features):
        X[:, k] = column
    del features
    if not np.all(np.isfinite(X)):
        raise _Defer  # the hand parser names the first missing or infinite cell
    y = None if label_col is None else _fast_labels(label_col, numeric_labels, field_limit)
    try:
        return _finish_table(p, X, hdr, lambda where: y)
    except DataError:
        raise _Defer from None


def read_csv(
    path: PathLike,
    label: Optional[str],
    *,
    numeric_labels: bool = False,
    require_label: bool = True,
    max_bytes: Optional[int] = DEFAULT_MAX_INPUT_BYTES,
    max_features: Optional[int] = None,
) -> CsvTable:
    """Features, labels and names from a CSV file with a header row.

    ``max_bytes``: refuse a larger file (None: no limit). ``max_features``: refuse more feature
    columns, from the header alone, before the rows are parsed (None: no limit). An unnamed first
    column equal to 0..n-1 (pandas' default index) is dropped with a note.

    Parsing: with pandas' C parser where pandas is installed, else with pyarrow's CSV reader
    where pyarrow is, else with the hand parser (Python's csv module); files under 4 MiB with the
    hand parser unless pandas or pyarrow is already imported. Every reader returns the same table,
    bit for bit. A file that the fast reader cannot vouch for (a cell that is not a number, a
    missing or infinite value, a ragged row, a label column of mixed types, a NUL byte, ...) is
    read again by the hand parser, whose one-line :class:`DataError` names the file, the line, the
    column and the offending text. Memory: about 16 bytes a cell with pandas or pyarrow (their
    columns, then the (n, d) float64 matrix); the file's text plus 16 bytes a cell with the hand
    parser."""
    p = pathlib.Path(path)
    try:
        st: Optional[os.stat_result] = p.stat()
    except OSError:
        st = None
    engine = _fast_engine(st.st_size) if st is not None and stat.S_ISREG(st.st_mode) else None
    if engine is not None:
        try:
            return _read_csv_fast(p, engine, label, numeric_labels, require_label, max_bytes, max_features)
        except _Defer:
            pass
    return _read_csv_python(p, label, numeric_labels, require_label, max_bytes, max_features)


def _npy_declared_bytes(fh: IO[bytes]) -> Optional[int]:
    """The data size an .npy header declares (shape × item size), or None if it cannot be read
    (np.load then reports the problem)."""
    try:
        version = np.lib.format.read_magic(fh)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0  # 3.0 differs only in the text encoding
        )
        shape, _, dtype = read_header(fh)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        return None
    return math.prod(int(s) for s in shape) * int(dtype.itemsize)


def _check_npz_sizes(p: pathlib.Path, max_bytes: int) -> None:
    """Refuse an .npz whose arrays would take more than ``max_bytes`` once read, from the zip
    directory (decompressed sizes) and the .npy headers (declared shapes), before reading any
    array."""
    try:
        with zipfile.ZipFile(p) as zf:
            members = zf.infolist()
            total = sum(m.file_size for m in members)
            if total > max_bytes:
                what = f"its arrays take {format_bytes(total)} decompressed"
                raise _too_large(p, what, max_bytes)
            declared = 0
            for m in members:
                if m.filename.endswith(".npy"):
                    with zf.open(m) as fh:
                        declared += _npy_declared_bytes(fh) or 0
            if declared > max_bytes:
                raise _too_large(p, f"its array headers declare {format_bytes(declared)}", max_bytes)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise DataError(f"{p}: not a valid .npz file ({exc})") from None


def _npz_arrays(path: PathLike, max_bytes: Optional[int] = DEFAULT_MAX_INPUT_BYTES) -> dict:
    p = pathlib.Path(path)
    st = _check_input_path(p)
    if max_bytes is not None:
        if stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
            raise _too_large(p, format_bytes(st.st_size), max_bytes)
        if not stat.S_ISREG(st.st_mode):
            raise DataError(f"{p}: an .npz must be a regular file (not a pipe or a device)")
        _check_npz_sizes(p, max_bytes)
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        raise DataError(f"{p}: cannot read the .npz file ({str(exc).splitlines()[0]})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: not a valid .npz file ({exc})") from None


def _check_X(X: np.ndarray, where: str) -> np.ndarray:
    if X.dtype.kind not in "biuf":
        raise DataError(f"{where} has dtype {X.dtype}; numeric features are expected")
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2:
        raise DataError(f"{where} must be 2-D (rows, features), got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise DataError(f"{where} is empty (shape {X.shape})")
    bad = ~np.isfinite(X)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        what = "a missing value (NaN)" if np.isnan(X[r, c]) else "an infinite value"
        raise DataError(f"{where}: row {r}, feature {c}: {what}")
    return X


def _check_y(y: np.ndarray, n: int, where: str, numeric: bool) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and 1 in y.shape:
        y = y.ravel()
    if y.ndim != 1:
        raise DataError(f"{where} must be 1-D, got shape {y.shape}")
    if y.shape[0] != n:
        raise DataError(f"{where} has {y.shape[0]} entries but the features have {n} rows")
    if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        raise DataError(f"{where} contains NaN or infinite labels")
    if numeric and y.dtype.kind not in "biuf":
        raise DataError(f"{where} has dtype {y.dtype}; ridge regression needs numeric targets")
    if y.dtype.kind not in "biufUS":
        raise DataError(f"{where} has dtype {y.dtype}; labels must be numbers or strings")
    return y


def read_npz(
    path: PathLike,
    *,
    numeric_labels: bool = False,
    test_file: bool = False,
    max_bytes: Optional[int] = DEFAULT_MAX_INPUT_BYTES,
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(X_train, y_train, X_test or None, y_test or None) from an .npz file (for a separate test
    file: its (X_test, y_test) or (X, y) as the first two). ``max_bytes``: see
    :func:`load_user_data`."""
    p = pathlib.Path(path)
    arrs = _npz_arrays(p, max_bytes)
    names = ", ".join(sorted(arrs)) or "none"
    if test_file:
        for kx, ky in (("X_test", "y_test"), ("X", "y")):
            if kx in arrs and ky in arrs:
                X = _check_X(arrs[kx], f"{p}: {kx}")
                return X, _check_y(arrs[ky], X.shape[0], f"{p}: {ky}", numeric_labels), None, None
        raise DataError(f"{p}: expected arrays X_test and y_test (or X and y); found: {names}")
    for key in ("X_train", "y_train"):
        if key not in arrs:
            raise DataError(f"{p}: no array {key!r} (found: {names})")
    X = _check_X(arrs["X_train"], f"{p}: X_train")
    y = _check_y(arrs["y_train"], X.shape[0], f"{p}: y_train", numeric_labels)
    if ("X_test" in arrs) != ("y_test" in arrs):
        have, miss = ("X_test", "y_test") if "X_test" in arrs else ("y_test", "X_test")
        raise DataError(f"{p}: has {have} but no {miss}")
    Xt = yt = None
    if "X_test" in arrs:
        Xt = _check_X(arrs["X_test"], f"{p}: X_test")
        yt = _check_y(arrs["y_test"], Xt.shape[0], f"{p}: y_test", numeric_labels)
    return X, y, Xt, yt


_RANGE = re.compile(r"(\d+)-(\d+)")


def parse_indices(text: str, n: int, what: str) -> np.ndarray:
    """'0,5,10-12' → [0, 5, 10, 11, 12] (0-based, negative counts from the end), checked against
    ``n`` rows; duplicates removed, order of first appearance kept.

    Every bound is checked before a range is expanded, and duplicates are dropped with a
    "seen" mask over the n rows, so time and memory are linear in n plus the text's length."""
    seen = bytearray(n)  # seen[j] == 1 once row j is taken
    seen_mask = np.frombuffer(seen, dtype=bool) if n else np.zeros(0, dtype=bool)
    chunks: List[np.ndarray] = []
    singles: List[int] = []  # taken single indices not yet moved into chunks

    def check(i: int) -> int:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise DataError(f"{what}: index {i} is out of range for {n} rows")
        return j

    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = _RANGE.fullmatch(part)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            if hi < lo:
                raise DataError(f"{what}: the range {part!r} is reversed; write {hi}-{lo}")
            span = np.arange(check(lo), check(hi) + 1, dtype=np.int64)
            new = span[~seen_mask[span]]
            seen_mask[new] = True
            chunks += [np.asarray(singles, dtype=np.int64), new]
            singles = []
            continue
        try:
            index = int(part)
        except ValueError:
            raise DataError(f"{what}: {part!r} is not an index or a range like 10-12 (in {text!r})") from None
        j = check(index)
        if not seen[j]:
            seen[j] = 1
            singles.append(j)
    chunks.append(np.asarray(singles, dtype=np.int64))
    result = np.concatenate(chunks)
    if result.size == 0:  # the first index given is always new: nothing was given
        raise DataError(f"{what}: no indices given")
    return result


def _is_npz(path: PathLike) -> bool:
    """Whether the file is an .npz: by its suffix, or (for a regular file only: reading a pipe
    would consume it) by the zip signature that np.savez writes."""
    p = pathlib.Path(path)
    if p.suffix.lower() == ".npz":
        return True
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def _read_csv_test(
    tpath: pathlib.Path,
    names: List[str],
    label_name: str,
    numeric_labels: bool,
    max_bytes: Optional[int],
    max_features: Optional[int],
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str]]:
    """(X_test (m, d) in the training data's column order ``names``, y_test (m,), notes) of a CSV
    test file with the training data's feature and label columns (in any order)."""
    ttable = read_csv(
        tpath,
        label_name,
        numeric_labels=numeric_labels,
        max_bytes=max_bytes,
        max_features=max_features,
    )
    Xt, yt, tnames = ttable.X, ttable.y, ttable.feature_names
    if tnames != names:
        missing = [c for c in names if c not in tnames]
        extra = [c for c in tnames if c not in names]
        if missing or extra:
            raise DataError(
                f"{tpath} has {len(tnames)} feature columns but the training data has "
                f"{len(names)}"
                + (f"; missing: {', '.join(missing[:5])}" if missing else "")
                + (f"; not in the training data: {', '.join(extra[:5])}" if extra else "")
            )
        order = [tnames.index(c) for c in names]  # same columns, other order
        Xt = Xt[:, order]
    return Xt, yt, ttable.notes


def load_user_data(
    data: PathLike,
    *,
    label: Optional[str] = None,
    test: Optional[PathLike] = None,
    test_indices: Optional[str] = None,
    numeric_labels: bool = False,
    max_bytes: Optional[int] = DEFAULT_MAX_INPUT_BYTES,
    max_features: Optional[int] = None,
) -> UserData:
    """Read the training (and test) data for the CLI.

    - ``data``: CSV (``label`` names the label column) or .npz (X_train, y_train[, X_test,
      y_test]).
    - ``test``: optional separate test file (CSV with the same feature and label columns, or .npz
      with X_test/y_test or X/y).
    - ``test_indices``: e.g. ``"0,5,10-12"``: rows of the test set to use; when there is no test
      set (a CSV without ``test``), rows of ``data`` held out of training as test points.
    - ``numeric_labels``: labels must be numbers (ridge regression).
    - ``max_bytes``: refuse a CSV larger than this, or an .npz whose arrays take more once
      decompressed (None: no limit). ``max_features``: refuse more feature columns (None: no
      limit); a CSV is refused from its header alone.
    """
    dpath = pathlib.Path(data)
    _check_input_path(dpath)
    notes: List[str] = []
    if _is_npz(dpath):
        if label is not None:
            raise DataError("--label applies to CSV files; an .npz file has X_train and y_train")
        X, y_npz, Xt, yt = read_npz(dpath, numeric_labels=numeric_labels, max_bytes=max_bytes)
        y: Optional[np.ndarray] = y_npz
        names = [f"x{j}" for j in range(X.shape[1])]
        label_name = "y"
    else:
        table = read_csv(
            dpath,
            label,
            numeric_labels=numeric_labels,
            max_bytes=max_bytes,
            max_features=max_features,
        )
        X, y, names, label_name = table.X, table.y, table.feature_names, table.label_name
        notes += table.notes
        Xt = yt = None
    assert y is not None
    if max_features is not None and X.shape[1] > max_features:
        raise DataError(
            f"{dpath}: {X.shape[1]:,} features, more than the limit of {max_features:,} "
            f"features (each adds a model parameter; raise the limit with --max-params)"
        )
    ud = UserData(
        X_train=X,
        y_train=y,
        feature_names=names,
        label_name=label_name,
        train_rows=np.arange(X.shape[0], dtype=np.int64),
        source=str(dpath),
        notes=notes,
    )
    if Xt is not None:
        ud.X_test, ud.y_test = Xt, yt
        ud.test_rows = np.arange(Xt.shape[0], dtype=np.int64)
        ud.test_source = f"{dpath} (X_test)"
    if test is not None:
        if Xt is not None:
            raise DataError(f"{dpath} already has X_test/y_test; do not also pass --test")
        tpath = pathlib.Path(test)
        _check_input_path(tpath)
        if _is_npz(tpath):
            Xt, yt, _, _ = read_npz(tpath, numeric_labels=numeric_labels, test_file=True, max_bytes=max_bytes)
        else:
            if _is_npz(dpath):
                raise DataError(f"{tpath}: a CSV test file needs a CSV data file (got {dpath})")
            Xt, yt, tnotes = _read_csv_test(tpath, names, label_name, numeric_labels, max_bytes, max_features)
            ud.notes += tnotes
        ud.X_test, ud.y_test = Xt, yt
        ud.test_rows = np.arange(Xt.shape[0], dtype=np.int64)
        ud.test_source = str(tpath)
    if ud.X_test is not None and ud.X_test.shape[1] != ud.X_train.shape[1]:
        raise DataError(
            f"the test data has {ud.X_test.shape[1]} features but the training data has {ud.X_train.shape[1]}"
        )
    if test_indices is not None:
        if ud.X_test is not None:
            idx = parse_indices(test_indices, ud.X_test.shape[0], "--test-indices")
            ud.X_test, ud.y_test = ud.X_test[idx], ud.y_test[idx]  # type: ignore[index]
            ud.test_rows = ud.test_rows[idx]  # type: ignore[index]
        else:
            idx = parse_indices(test_indices, X.shape[0], "--test-indices")
            if idx.size >= X.shape[0]:
                raise DataError("--test-indices holds out every row; nothing is left to train on")
            keep = np.setdiff1d(np.arange(X.shape[0]), idx)
            ud.X_test, ud.y_test, ud.test_rows = X[idx], y[idx], idx
            ud.X_train, ud.y_train, ud.train_rows = X[keep], y[keep], keep.astype(np.int64)
            ud.test_source = f"{dpath} (held-out rows)"
    return ud


#: A numeric label column is read as a continuous target (not classes) when some value is not an
#: integer, or when it has more than this many distinct values ...
CONTINUOUS_MIN_DISTINCT = 20
#: ... and fewer than this many rows per distinct value on average.
CONTINUOUS_MAX_ROWS_PER_VALUE = 5


def labels_look_continuous(y: np.ndarray) -> Optional[str]:
    """Why numeric labels look like a continuous (regression) target rather than classes, or
    None. The rule: some value is not an integer, or there are more than
    ``CONTINUOUS_MIN_DISTINCT`` (20) distinct values with fewer than
    ``CONTINUOUS_MAX_ROWS_PER_VALUE`` (5) rows per value on average. Text labels are always
    classes."""
    y = np.asarray(y)
    if y.dtype.kind not in "biuf" or y.size == 0:
        return None
    if y.dtype.kind == "f":
        fractional = y[y != np.round(y)]
        if fractional.size:
            return f"non-integer values such as {fractional[0].item():.6g}"
    distinct = np.unique(y).size
    if distinct > CONTINUOUS_MIN_DISTINCT and distinct * CONTINUOUS_MAX_ROWS_PER_VALUE > y.size:
        return f"{distinct} distinct values for {y.size} rows"
    return None


def check_classes(y: np.ndarray, model_name: str, where: str) -> None:
    """One-line errors for labels a classifier cannot use: a continuous target (see
    :func:`labels_look_continuous`), a single class, more than 2 classes for the SVM."""
    check_class_set(np.unique(y), labels_look_continuous(y), model_name, where)


def check_class_set(classes: np.ndarray, continuous: Optional[str], model_name: str, where: str) -> None:
    """:func:`check_classes` from the sorted distinct labels ``classes`` and the reason the labels
    look continuous (None if they do not), for labels that are not all in this process."""
    if continuous:
        raise DataError(
            f"{where}: the labels look like a continuous target ({continuous}), not classes; "
            f"--model {model_name} is a classifier: use --model ridge for regression"
        )
    if classes.size < 2:
        only = classes[0].item() if hasattr(classes[0], "item") else classes[0]
        raise DataError(
            f"{where}: the training labels contain a single class ({only!r}); {model_name} needs at least 2"
        )
    if model_name == "svm" and classes.size != 2:
        raise DataError(
            f"{where}: --model svm is a binary classifier but the labels have {classes.size} "
            f"classes; use --model logistic"
        )


# ================================================================================================
# a folder of Parquet files: the training data stays on the Dask workers
# ================================================================================================
#: The suffix of the files read from a Parquet folder; names starting with these prefixes are
#: skipped (Spark's _SUCCESS, Dask's _metadata / _common_metadata, hidden and .crc files), as
#: pyarrow's datasets skip them.
PARQUET_SUFFIX = ".parquet"
_SKIPPED_PREFIXES = ("_", ".")
#: Columns that pandas' ``to_parquet`` writes for a non-default index: not features.
_PANDAS_INDEX_COLUMN = re.compile(r"__index_level_\d+__")


def is_parquet_input(data: PathLike) -> bool:
    """Whether ``data`` is read as Parquet (and run on Dask): an existing folder, or a file named
    ``*.parquet``."""
    p = pathlib.Path(data)
    return p.is_dir() or p.suffix.lower() == PARQUET_SUFFIX


def _natural_key(name: str) -> List[Any]:
    """Sort key comparing runs of digits as numbers: part.2 before part.10."""
    return [(0, int(t), t) if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


@dataclass
class ParquetData:
    """Training data in Parquet files, read on the Dask workers; test points in this process.

    Training rows are numbered 0..N-1 across ``files`` in their order (natural name order: digits
    compare as numbers), the index reported to the user. ``held_out`` (sorted): rows held out of
    training as test points (``--test-indices`` without a test file). The client never holds the
    feature matrix: :func:`scan_parquet` reads footers only, :func:`open_parquet_on_dask` runs one
    pass over the files on the workers (checks and per-column statistics) and builds the lazy
    dask arrays ``X_train`` (n, d) float64 and ``y_train`` (n,), one chunk per file."""

    source: str
    files: List[str]
    file_rows: np.ndarray  # (F,) rows per file (from the footers)
    feature_names: List[str]
    label_name: str
    label_kind: str  # "number", "text" or "bool"
    label_dtype: np.dtype  # common numpy dtype of the label column ("text": object until opened)
    held_out: np.ndarray  # sorted global rows held out of training (test points)
    X_test: Optional[np.ndarray] = None
    y_test: Optional[np.ndarray] = None
    test_rows: Optional[np.ndarray] = None
    test_source: str = ""
    test_indices: Optional[np.ndarray] = None  # the held-out rows in the order given (test points)
    notes: List[str] = field(default_factory=list)
    # set by open_parquet_on_dask
    X_train: Any = None  # dask (n, d) float64
    y_train: Any = None  # dask (n,)
    max_abs: Optional[np.ndarray] = None  # (d,) largest |value| of each feature over the training rows
    classes: Optional[np.ndarray] = None  # sorted distinct training labels (classifiers)
    continuous: Optional[str] = None  # why the training labels look continuous (classifiers), or None

    @property
    def n_total(self) -> int:
        return int(self.file_rows.sum())

    @property
    def n_train(self) -> int:
        return self.n_total - int(self.held_out.size)

    @property
    def has_test(self) -> bool:
        return self.X_test is not None or self.test_indices is not None

    def train_rows_of(self, idx: np.ndarray) -> np.ndarray:
        """Global rows (0..N-1 over the files) of the training positions ``idx`` (0..n-1).

        With h the sorted held-out rows, s_i = h_i − i counts the training rows before h_i, so the
        training position j lies after exactly #{i : s_i ≤ j} held-out rows."""
        idx = np.asarray(idx, dtype=np.int64)
        h = self.held_out
        return idx + np.searchsorted(h - np.arange(h.size), idx, side="right")


def _parquet_files(folder: pathlib.Path) -> Tuple[List[str], List[str]]:
    """(the folder's Parquet files in natural name order, notes); one-line errors for an empty
    folder, a sub-folder or a file that is not ``*.parquet``."""
    files, skipped = [], []
    for entry in sorted(folder.iterdir(), key=lambda e: _natural_key(e.name)):
        if entry.name.startswith(_SKIPPED_PREFIXES):
            skipped.append(entry.name)
            continue
        if entry.is_dir():
            raise DataError(
                f"{entry}: a sub-folder; a Parquet folder must hold the .parquet files themselves "
                f"(partitioned folders are not supported)"
            )
        if entry.suffix.lower() != PARQUET_SUFFIX:
            raise DataError(
                f"{entry}: not a Parquet file: a Parquet folder must hold only *{PARQUET_SUFFIX} files "
                f"(names starting with '_' or '.' are skipped)"
            )
        files.append(str(entry))
    if not files:
        raise DataError(f"{folder}: no Parquet files (*{PARQUET_SUFFIX}) in this folder")
    notes = [f"{folder}: skipped {', '.join(skipped[:5])}" + (", ..." if len(skipped) > 5 else "")]
    return files, notes if skipped else []


def _arrow_kind(t: Any) -> Optional[str]:
    """'number', 'bool', 'text' or None (unusable) for a pyarrow type."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return "number"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    return None


def _footer(path: str) -> Tuple[int, Any]:
    """(rows, arrow schema) of a Parquet file from its footer; a one-line error naming it."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(
            "a Parquet folder needs pyarrow: pip install 'pyinfluence[dask]'", name="pyarrow"
        ) from None
    try:
        meta = pq.read_metadata(path)
        return int(meta.num_rows), meta.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow's ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a readable Parquet file ({' '.join(str(exc).split())})") from None


def scan_parquet(
    data: PathLike,
    *,
    label: Optional[str] = None,
    test: Optional[PathLike] = None,
    test_indices: Optional[str] = None,
    numeric_labels: bool = False,
    max_bytes: Optional[int] = DEFAULT_MAX_INPUT_BYTES,
    max_features: Optional[int] = None,
) -> ParquetData:
    """The checks of a Parquet folder (or one ``.parquet`` file) that need no rows: every file's
    footer (row count, columns and types), the label column, the test file (read here: it is
    small) and ``--test-indices``. One-line :class:`DataError` naming the file and column for: an
    empty folder, a file that is not Parquet, files whose columns differ, a missing label column, a
    feature column that is not numeric, a label column of another kind than the first file's.

    ``max_bytes`` applies to the test file only (the Parquet files are read by the workers, one
    file at a time); ``max_features``: refuse more feature columns, from the first footer."""
    folder = pathlib.Path(data)
    notes: List[str] = []
    if folder.is_dir():
        files, notes = _parquet_files(folder)
    else:
        _check_input_path(folder)
        files = [str(folder)]
    rows0, schema0 = _footer(files[0])
    names0 = list(schema0.names)
    index_cols = [c for c in names0 if _PANDAS_INDEX_COLUMN.fullmatch(c)]
    header = [c for c in names0 if c not in index_cols]
    if label is None:
        raise DataError(f"{files[0]}: name the label column with --label")
    label_name = header[_resolve_label_column(pathlib.Path(files[0]), header, label)]
    features = [c for c in header if c != label_name]
    if not features:
        raise DataError(f"{files[0]}: no feature columns besides the label column {label_name!r}")
    if max_features is not None and len(features) > max_features:
        raise DataError(
            f"{files[0]}: {len(features):,} feature columns, more than the limit of {max_features:,} "
            f"features (each adds a model parameter; raise the limit with --max-params)"
        )
    if index_cols:
        notes.append(
            f"{files[0]}: left out {', '.join(index_cols)}: the row index that pandas' to_parquet writes"
        )
    file_rows = []
    label_kind = ""
    label_dtypes = []
    for f in files:
        rows, schema = (rows0, schema0) if f == files[0] else _footer(f)
        names = [c for c in schema.names if not _PANDAS_INDEX_COLUMN.fullmatch(c)]
        if set(names) != set(header):
            missing = [c for c in header if c not in names]
            extra = [c for c in names if c not in header]
            raise DataError(
                f"{f}: its columns differ from those of {files[0]}"
                + (f"; missing: {', '.join(missing[:5])}" if missing else "")
                + (f"; not in {pathlib.Path(files[0]).name}: {', '.join(extra[:5])}" if extra else "")
            )
        for c in features:
            t = schema.field(c).type
            if _arrow_kind(t) not in ("number", "bool"):
                raise DataError(f"{f}, column {c!r}: type {t}; features must be numbers")
        t = schema.field(label_name).type
        kind = _arrow_kind(t)
        if kind is None:
            raise DataError(f"{f}, label column {label_name!r}: type {t}; labels must be numbers or text")
        if numeric_labels and kind != "number":
            raise DataError(
                f"{f}, label column {label_name!r}: type {t}; ridge regression needs numeric targets"
            )
        if label_kind and kind != label_kind:
            raise DataError(
                f"{f}, label column {label_name!r}: type {t} ({kind}), but in {files[0]} it holds {label_kind}"
            )
        label_kind = kind
        if kind != "text":
            vt = t.value_type if hasattr(t, "value_type") else t
            label_dtypes.append(np.dtype(vt.to_pandas_dtype()))
        file_rows.append(rows)
    n_total = int(sum(file_rows))
    if n_total == 0:
        raise DataError(f"{data}: no data rows in its Parquet file(s)")
    pdata = ParquetData(
        source=str(data),
        files=files,
        file_rows=np.asarray(file_rows, dtype=np.int64),
        feature_names=features,
        label_name=label_name,
        label_kind=label_kind,
        # ridge's targets are float64, as read_csv gives them
        label_dtype=(
            np.dtype(np.float64)
            if numeric_labels
            else np.result_type(*label_dtypes)
            if label_dtypes
            else np.dtype(object)
        ),
        held_out=np.zeros(0, dtype=np.int64),
        notes=notes,
    )
    if len(files) > 1:
        pdata.notes.append(
            f"{data}: {len(files)} Parquet files, {n_total:,} rows, numbered 0..{n_total - 1} across the "
            f"files in name order (digits as numbers: part.2 before part.10)"
        )
    if test is not None:
        _read_parquet_test(pdata, pathlib.Path(test), numeric_labels, max_bytes, max_features)
    if test_indices is not None:
        if pdata.X_test is not None:
            idx = parse_indices(test_indices, pdata.X_test.shape[0], "--test-indices")
            pdata.X_test, pdata.y_test = pdata.X_test[idx], pdata.y_test[idx]  # type: ignore[index]
            pdata.test_rows = pdata.test_rows[idx]  # type: ignore[index]
        else:
            idx = parse_indices(test_indices, n_total, "--test-indices")
            if idx.size >= n_total:
                raise DataError("--test-indices holds out every row; nothing is left to train on")
            pdata.test_indices, pdata.test_rows = idx, idx
            pdata.held_out = np.sort(idx)
            pdata.test_source = f"{data} (held-out rows)"
    return pdata


def _read_parquet_test(
    pdata: ParquetData,
    tpath: pathlib.Path,
    numeric_labels: bool,
    max_bytes: Optional[int],
    max_features: Optional[int],
) -> None:
    """Test points from a CSV, an .npz or a .parquet file (read into this process) with the
    training data's feature and label columns."""
    st = _check_input_path(tpath)
    names = pdata.feature_names
    if _is_npz(tpath):
        Xt, yt, _, _ = read_npz(tpath, numeric_labels=numeric_labels, test_file=True, max_bytes=max_bytes)
        if Xt.shape[1] != len(names):
            raise DataError(
                f"{tpath}: the test data has {Xt.shape[1]} features but the training data has {len(names)}"
            )
    elif tpath.suffix.lower() == PARQUET_SUFFIX:
        if max_bytes is not None and stat.S_ISREG(st.st_mode) and st.st_size > max_bytes:
            raise _too_large(tpath, format_bytes(st.st_size), max_bytes)
        _, schema = _footer(str(tpath))
        missing = [c for c in [*names, pdata.label_name] if c not in schema.names]
        if missing:
            raise DataError(
                f"{tpath}: no column(s) {', '.join(repr(c) for c in missing[:5])} of the training data"
            )
        Xt, yt = _read_parquet_rows(str(tpath), names, pdata.label_name)
        Xt = _check_X(Xt, f"{tpath}: the features")
        if yt.dtype.kind == "O":  # text labels (pyarrow gives objects; None for a null)
            if any(v is None for v in yt):
                raise DataError(f"{tpath}: label column {pdata.label_name!r} has missing labels")
            yt = yt.astype(str)
        yt = _check_y(yt, Xt.shape[0], f"{tpath}: label column {pdata.label_name!r}", numeric_labels)
    else:
        Xt, yt_csv, tnotes = _read_csv_test(
            tpath, names, pdata.label_name, numeric_labels, max_bytes, max_features
        )
        assert yt_csv is not None
        yt = yt_csv
        pdata.notes += tnotes
    pdata.X_test, pdata.y_test = Xt, yt
    pdata.test_rows = np.arange(Xt.shape[0], dtype=np.int64)
    pdata.test_source = str(tpath)


def _read_parquet_rows(path: str, features: Sequence[str], label: str) -> Tuple[np.ndarray, np.ndarray]:
    """(X (rows, d) float64, labels (rows,)) of one Parquet file; nulls become NaN (features) or
    None (text labels)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=[*features, label])
    X = np.empty((table.num_rows, len(features)), dtype=np.float64)
    for j, c in enumerate(features):
        X[:, j] = table.column(c).to_numpy(zero_copy_only=False)
    return X, table.column(label).to_numpy(zero_copy_only=False)


def _profile_file(
    path: str,
    rows: int,
    first_row: int,
    features: List[str],
    label: str,
    held_local: np.ndarray,
    class_cap: int,
) -> Dict[str, Any]:
    """Runs on a Dask worker: one pass over one Parquet file (one chunk in memory). Returns the
    first problem as a one-line message naming the file, its row and column (``"error"``), else
    the largest |value| of each feature over the training rows (``held_local``: the file's rows
    held out of training are left out), the file's distinct training labels (at most
    ``class_cap``, 0: none; ``"truncated"`` when there are more), the first non-integer numeric
    label and the longest text label."""
    out: Dict[str, Any] = {"error": None}
    try:
        X, y = _read_parquet_rows(path, features, label)
    except Exception as exc:
        out["error"] = f"{path}: cannot read the Parquet file ({' '.join(str(exc).split())})"
        return out
    if X.shape[0] != rows:
        out["error"] = f"{path}: holds {X.shape[0]} rows, but its footer said {rows} when the run started"
        return out

    def where(r: int) -> str:
        return f"{path}, row {r} (row {first_row + r} of the data)"

    bad = ~np.isfinite(X)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        what = "a missing value (null or NaN)" if np.isnan(X[r, c]) else "an infinite value"
        out["error"] = f"{where(int(r))}, column {features[c]!r}: {what}"
        return out
    if y.dtype.kind == "O":
        missing = np.flatnonzero([v is None for v in y])
        if missing.size:
            out["error"] = f"{where(int(missing[0]))}, label column {label!r}: a missing label"
            return out
        y = y.astype(str)
    elif y.dtype.kind == "f" and not np.all(np.isfinite(y)):
        r = int(np.flatnonzero(~np.isfinite(y))[0])
        what = "a missing label (null or NaN)" if np.isnan(y[r]) else "a non-finite label"
        out["error"] = f"{where(r)}, label column {label!r}: {what}"
        return out
    keep = np.ones(X.shape[0], dtype=bool)
    keep[held_local] = False
    Xk, yk = X[keep], y[keep]
    out["max_abs"] = np.max(np.abs(Xk), axis=0) if Xk.shape[0] else np.zeros(X.shape[1])
    uniq = np.unique(yk) if class_cap > 0 else yk[:0]  # class_cap 0: not a classifier
    out["truncated"] = uniq.size > class_cap
    out["classes"] = uniq[:class_cap]
    out["width"] = int(np.char.str_len(y).max()) if y.dtype.kind == "U" and y.size else 0
    frac = None
    if yk.dtype.kind == "f":
        fractional = yk[yk != np.round(yk)]
        frac = float(fractional[0]) if fractional.size else None
    out["fractional"] = frac
    return out


def _text_chunk(block: np.ndarray, width: int) -> np.ndarray:
    """Text labels (an object array from pyarrow) as fixed-width unicode, as the CSV reader gives."""
    return np.asarray(block).astype(f"<U{max(width, 1)}")


def _drop_rows_chunk(block: np.ndarray, held: np.ndarray, block_info: Any = None) -> np.ndarray:
    """The chunk without the held-out rows (``held``: sorted global rows) that fall into it."""
    start, stop = block_info[0]["array-location"][0]
    local = held[(held >= start) & (held < stop)] - start
    return np.delete(block, local, axis=0)


def _drop_rows(a: Any, held: np.ndarray) -> Any:
    """The dask array ``a`` without the rows ``held`` (sorted), chunk by chunk: each chunk keeps its
    place (one chunk per file), only its held-out rows go."""
    if held.size == 0:
        return a
    bounds = np.cumsum((0,) + a.chunks[0])
    counts = np.diff(np.searchsorted(held, bounds))  # held-out rows per chunk
    chunks = (tuple(int(c - h) for c, h in zip(a.chunks[0], counts)),) + a.chunks[1:]
    return a.map_blocks(
        _drop_rows_chunk, held=held, chunks=chunks, dtype=a.dtype, meta=np.empty((0,) * a.ndim, dtype=a.dtype)
    )


def open_parquet_on_dask(pdata: ParquetData, *, classifier: bool, class_cap: int) -> None:
    """Read the files on the Dask workers (the active ``distributed`` client): one pass of
    :func:`_profile_file` per file (checks naming the file, row and column; per-feature largest
    |value|; the distinct labels), then the lazy training arrays (one chunk per file, held-out rows
    dropped) and the held-out test rows (fetched by index: only those rows come back).

    ``classifier``: collect the distinct labels (at most ``class_cap``, > CONTINUOUS_MIN_DISTINCT,
    a bound past which the model could not be fitted anyway) and decide whether they look
    continuous (the rule of :func:`labels_look_continuous`, on the training labels)."""
    import dask

    from pyinfluence.linear.dask import read_parquet

    offsets = np.concatenate([[0], np.cumsum(pdata.file_rows)])
    held = pdata.held_out
    tasks = []
    for i, f in enumerate(pdata.files):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        local = held[(held >= lo) & (held < hi)] - lo
        profile = dask.delayed(_profile_file, pure=True)
        cap = class_cap if classifier else 0
        tasks.append(
            profile(f, int(pdata.file_rows[i]), lo, pdata.feature_names, pdata.label_name, local, cap)
        )
    results = dask.compute(*tasks)
    for r in results:
        if r["error"]:
            raise DataError(r["error"])
    d = len(pdata.feature_names)
    pdata.max_abs = np.max(np.vstack([r["max_abs"] for r in results] + [np.zeros((1, d))]), axis=0)
    n_train = pdata.n_train
    if classifier:
        classes = np.unique(np.concatenate([np.asarray(r["classes"]) for r in results]))
        truncated = any(r["truncated"] for r in results) or classes.size > class_cap
        fractional = next((r["fractional"] for r in results if r["fractional"] is not None), None)
        if fractional is not None:
            pdata.continuous = f"non-integer values such as {fractional:.6g}"
        elif truncated and (class_cap + 1) * CONTINUOUS_MAX_ROWS_PER_VALUE > n_train:
            # more than class_cap (> CONTINUOUS_MIN_DISTINCT) distinct values: the rule holds already
            pdata.continuous = f"more than {class_cap} distinct values for {n_train} rows"
        elif (
            not truncated
            and classes.size > CONTINUOUS_MIN_DISTINCT
            and classes.size * CONTINUOUS_MAX_ROWS_PER_VALUE > n_train
        ):
            pdata.continuous = f"{classes.size} distinct values for {n_train} rows"
        pdata.classes = classes[:class_cap] if truncated else classes
        if pdata.label_dtype.kind == "f" and fractional is None:
            pdata.label_dtype = np.dtype(np.int64)  # integral class labels as integers, as read_csv does
    X, y = read_parquet(pdata.files, label=pdata.label_name, columns=pdata.feature_names, dtype=np.float64)
    if pdata.label_kind == "text":
        width = max(int(r["width"]) for r in results)
        dt = np.dtype(f"<U{max(width, 1)}")
        y = y.map_blocks(_text_chunk, width=width, dtype=dt, meta=np.empty(0, dtype=dt))
    elif y.dtype != pdata.label_dtype:
        y = y.astype(pdata.label_dtype)
    if pdata.test_indices is not None:
        Xt, yt = dask.compute(X[pdata.test_indices], y[pdata.test_indices])
        pdata.X_test, pdata.y_test = np.ascontiguousarray(Xt, dtype=np.float64), np.asarray(yt)
    pdata.X_train, pdata.y_train = _drop_rows(X, held), _drop_rows(y, held)
