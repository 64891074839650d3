"""Reading a user's data for the command line (``pyinfluence explain`` / ``mislabels``).

Formats:

- CSV with a header row; one column holds the label (named by ``label``, or given as a 0-based
  column index when no column has that name); every other column is a numeric feature. The
  delimiter (``,``, ``;``, tab) is detected from the header line.
- ``.npz`` with arrays ``X_train`` (n, d), ``y_train`` (n,) and optionally ``X_test`` (m, d),
  ``y_test`` (m,). A test file given separately may instead hold ``X``/``y``.

Every problem is a :class:`DataError` (a ``ValueError``) with a one-line message naming the file,
the line and the column: missing file, missing label column, non-numeric or missing (NaN) values,
ragged rows, a single class, mismatched feature counts between training and test data.
"""

from __future__ import annotations

import csv
import math
import pathlib
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np

__all__ = ["DataError", "UserData", "check_classes", "load_user_data", "parse_indices"]

PathLike = Union[str, pathlib.Path]

_MISSING = {"", "nan", "na", "n/a", "null", "none", "?"}


class DataError(ValueError):
    """A problem with the user's data file; the message is one line."""


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

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def has_test(self) -> bool:
        return self.X_test is not None


def _read_text(path: pathlib.Path) -> str:
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a data file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text (CSV) file") from None


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


def _convert_labels(values: List[str], lines: List[int], where: str, numeric: bool) -> np.ndarray:
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


def read_csv(
    path: PathLike,
    label: Optional[str],
    *,
    numeric_labels: bool = False,
    require_label: bool = True,
) -> Tuple[np.ndarray, Optional[np.ndarray], List[str], str]:
    """(X (n, d) float64, y (n,) or None, feature names, label column name) from a CSV file."""
    p = pathlib.Path(path)
    text = _read_text(p)
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise DataError(f"{p}: empty file (a header row is expected)")
    delim = _sniff_delimiter(lines[0])
    rows = list(csv.reader(lines, delimiter=delim))
    header = [h.strip() for h in rows[0]]
    # (line number in the file, cells) of the non-blank data rows
    numbered = [(k + 1, r) for k, r in enumerate(rows) if k > 0 and any(c.strip() for c in r)]
    body = [r for _, r in numbered]
    if not body:
        raise DataError(f"{p}: no data rows after the header")
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise DataError(f"{p}: duplicate column name(s) {', '.join(repr(d) for d in dup)}")
    li: Optional[int] = None
    if label is not None:
        if label in header:
            li = header.index(label)
        else:
            try:
                k = int(label)
            except ValueError:
                k = None
            if k is None or not -len(header) <= k < len(header):
                shown = ", ".join(header[:12]) + (", ..." if len(header) > 12 else "")
                raise DataError(f"{p}: no label column {label!r} (columns: {shown})")
            li = k % len(header)
    elif require_label:
        raise DataError(f"{p}: name the label column with --label")
    feat_idx = [j for j in range(len(header)) if j != li]
    if not feat_idx:
        raise DataError(f"{p}: no feature columns besides the label column")
    X = np.empty((len(body), len(feat_idx)), dtype=np.float64)
    labels: List[str] = []
    for r, (line, row) in enumerate(numbered):
        if len(row) != len(header):
            raise DataError(f"{p}, line {line}: {len(row)} fields but the header has {len(header)}")
        for c, j in enumerate(feat_idx):
            try:
                x = _parse_number(row[j])
            except ValueError:
                raise DataError(
                    f"{p}, line {line}, column {header[j]!r}: {row[j].strip()!r} is not a number"
                ) from None
            if not math.isfinite(x):
                what = "a missing value (NaN)" if math.isnan(x) else "an infinite value"
                raise DataError(f"{p}, line {line}, column {header[j]!r}: {what}")
            X[r, c] = x
        if li is not None:
            labels.append(row[li])
    y = None
    if li is not None:
        y = _convert_labels(
            labels, [ln for ln, _ in numbered], f"{p}, label column {header[li]!r}", numeric_labels
        )
    return X, y, [header[j] for j in feat_idx], (header[li] if li is not None else "")


def _npz_arrays(path: PathLike) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file")
    try:
        with np.load(p, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as exc:
        raise DataError(f"{p}: cannot read the .npz file ({str(exc).splitlines()[0]})") from None
    except (OSError, EOFError) as exc:
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
    path: PathLike, *, numeric_labels: bool = False, test_file: bool = False
) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """(X_train, y_train, X_test or None, y_test or None) from an .npz file (for a separate test
    file: its (X_test, y_test) or (X, y) as the first two)."""
    p = pathlib.Path(path)
    arrs = _npz_arrays(p)
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


def parse_indices(text: str, n: int, what: str) -> np.ndarray:
    """'0,5,10-12' → [0, 5, 10, 11, 12] (0-based, negative counts from the end), checked against
    ``n`` rows; duplicates removed, order kept."""
    out: List[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            if m:
                lo, hi = int(m.group(1)), int(m.group(2))
                if hi < lo:
                    raise ValueError
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise DataError(
                f"{what}: {part!r} is not an index or a range like 10-12 (in {text!r})"
            ) from None
    if not out:
        raise DataError(f"{what}: no indices given")
    res = []
    for i in out:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise DataError(f"{what}: index {i} is out of range for {n} rows")
        if j not in res:
            res.append(j)
    return np.asarray(res, dtype=np.int64)


def _is_npz(path: PathLike) -> bool:
    p = pathlib.Path(path)
    if p.suffix.lower() == ".npz":
        return True
    try:
        with open(p, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"  # a zip archive, as np.savez writes
    except OSError:
        return False


def load_user_data(
    data: PathLike,
    *,
    label: Optional[str] = None,
    test: Optional[PathLike] = None,
    test_indices: Optional[str] = None,
    numeric_labels: bool = False,
) -> UserData:
    """Read the training (and test) data for the CLI.

    - ``data``: CSV (``label`` names the label column) or .npz (X_train, y_train[, X_test,
      y_test]).
    - ``test``: optional separate test file (CSV with the same feature and label columns, or .npz
      with X_test/y_test or X/y).
    - ``test_indices``: e.g. ``"0,5,10-12"``: rows of the test set to use; when there is no test
      set (a CSV without ``test``), rows of ``data`` held out of training as test points.
    - ``numeric_labels``: labels must be numbers (ridge regression).
    """
    dpath = pathlib.Path(data)
    if not dpath.exists():
        raise DataError(f"{dpath}: no such file")
    if _is_npz(dpath):
        if label is not None:
            raise DataError("--label applies to CSV files; an .npz file has X_train and y_train")
        X, y, Xt, yt = read_npz(dpath, numeric_labels=numeric_labels)
        names = [f"x{j}" for j in range(X.shape[1])]
        label_name = "y"
    else:
        X, y, names, label_name = read_csv(dpath, label, numeric_labels=numeric_labels)
        Xt = yt = None
    assert y is not None
    ud = UserData(
        X_train=X,
        y_train=y,
        feature_names=names,
        label_name=label_name,
        train_rows=np.arange(X.shape[0], dtype=np.int64),
        source=str(dpath),
    )
    if Xt is not None:
        ud.X_test, ud.y_test = Xt, yt
        ud.test_rows = np.arange(Xt.shape[0], dtype=np.int64)
        ud.test_source = f"{dpath} (X_test)"
    if test is not None:
        if Xt is not None:
            raise DataError(f"{dpath} already has X_test/y_test; do not also pass --test")
        tpath = pathlib.Path(test)
        if not tpath.exists():
            raise DataError(f"{tpath}: no such file")
        if _is_npz(tpath):
            Xt, yt, _, _ = read_npz(tpath, numeric_labels=numeric_labels, test_file=True)
        else:
            if _is_npz(dpath):
                raise DataError(f"{tpath}: a CSV test file needs a CSV data file (got {dpath})")
            Xt, yt, tnames, _ = read_csv(tpath, label_name, numeric_labels=numeric_labels)
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
        ud.X_test, ud.y_test = Xt, yt
        ud.test_rows = np.arange(Xt.shape[0], dtype=np.int64)
        ud.test_source = str(tpath)
    if ud.X_test is not None and ud.X_test.shape[1] != ud.X_train.shape[1]:
        raise DataError(
            f"the test data has {ud.X_test.shape[1]} features but the training data has "
            f"{ud.X_train.shape[1]}"
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


def check_classes(y: np.ndarray, model_name: str, where: str) -> None:
    """One-line errors for labels a classifier cannot use."""
    classes = np.unique(y)
    if classes.size < 2:
        only = classes[0].item() if hasattr(classes[0], "item") else classes[0]
        raise DataError(
            f"{where}: the training labels contain a single class ({only!r}); "
            f"{model_name} needs at least 2"
        )
    if model_name == "svm" and classes.size != 2:
        raise DataError(
            f"{where}: --model svm is a binary classifier but the labels have {classes.size} "
            f"classes; use --model logistic"
        )
