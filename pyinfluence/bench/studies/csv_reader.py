"""The CSV reader of the command line: pandas' parser against the hand parser (issue 18, item 1).

Writes a seeded CSV of ``--rows`` rows (default 10**6) by ``--cols`` feature columns (default 30,
values with 4 decimals, as exported data usually look) and a 0/1 label column into a temporary
folder, then reads it, one after the other in this process, with:

- ``pandas.read_csv`` alone (the floor: what parsing the text costs at best);
- ``read_csv`` on the pandas path (pyinfluence.cli.userdata, pandas' C parser plus the checks);
- ``read_csv`` on the pyarrow path, where pyarrow is installed;
- ``read_csv`` on the hand parser (Python's csv module: the fallback without pandas or pyarrow).

Prints a markdown table: wall-clock seconds and the peak of the process's resident memory above its
level before the read (sampled every millisecond from /proc/self/statm, Linux). The readers' tables
are compared bit for bit. ``--only NAME`` runs one reader (e.g. under ``/usr/bin/time -v``).

    python -m pyinfluence.bench.studies.csv_reader [--rows 1000000] [--cols 30] [--only hand]
"""

from __future__ import annotations

import argparse
import gc
import os
import pathlib
import resource
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from pyinfluence.cli import userdata


def _rss_bytes() -> Optional[int]:
    """The process's resident memory now (Linux), or None."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def measure(fn: Callable[[], Any]) -> Tuple[Any, float, Optional[int]]:
    """(fn(), seconds, peak resident memory above the level before the call in bytes; None
    without /proc)."""
    gc.collect()
    base = _rss_bytes()
    peak = [base or 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = _rss_bytes() or 0
            peak[0] = max(peak[0], now)
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes() or 0)
    return result, seconds, None if base is None else peak[0] - base


def write_csv(path: pathlib.Path, rows: int, cols: int, seed: int = 0) -> None:
    """A seeded CSV: ``cols`` normal features rounded to 4 decimals, a 0/1 label ``y``."""
    rng = np.random.default_rng(seed)
    header = ",".join([f"x{j}" for j in range(cols)] + ["y"]) + "\n"
    block = 100_000
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write(header)
        for start in range(0, rows, block):
            m = min(block, rows - start)
            X = np.round(rng.normal(size=(m, cols)), 4)
            y = (X[:, 0] + 0.5 * rng.normal(size=m) > 0).astype(np.int64)
            lines = [",".join(map(repr, row)) + f",{label}" for row, label in zip(X.tolist(), y.tolist())]
            fh.write("\n".join(lines) + "\n")


def readers(path: pathlib.Path) -> Dict[str, Callable[[], Any]]:
    """name -> a call reading ``path``; the fast readers that are not installed are left out."""
    out: Dict[str, Callable[[], Any]] = {}

    def via(engine: str) -> Callable[[], Any]:
        def read() -> Any:
            userdata._CSV_ENGINE = engine  # a private switch: the path to time, whatever the file size
            try:
                return userdata.read_csv(path, "y", max_bytes=None)
            finally:
                userdata._CSV_ENGINE = None

        return read

    try:
        import pandas as pd

        out["pandas"] = lambda: pd.read_csv(path)
        out["read_csv: pandas"] = via("pandas")
    except ImportError:
        pass
    try:
        import pyarrow.csv  # noqa: F401

        out["read_csv: pyarrow"] = via("pyarrow")
    except ImportError:
        pass
    out["read_csv: hand parser"] = via("python")
    return out


LABELS = {
    "pandas": "`pandas.read_csv` alone (floor)",
    "read_csv: pandas": "`read_csv`, pandas path",
    "read_csv: pyarrow": "`read_csv`, pyarrow path",
    "read_csv: hand parser": "`read_csv`, hand parser (fallback)",
}
SHORT = {
    "pandas": "floor",
    "read_csv: pandas": "pandas",
    "read_csv: pyarrow": "pyarrow",
    "read_csv: hand parser": "hand",
}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--cols", type=int, default=30)
    ap.add_argument("--only", choices=sorted(SHORT.values()), help="run one reader (for /usr/bin/time -v)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "data.csv"
        t0 = time.perf_counter()
        write_csv(path, args.rows, args.cols)
        size = path.stat().st_size
        print(
            f"{args.rows:,} rows x {args.cols} features + a label: {size / 2**20:,.0f} MiB "
            f"(written in {time.perf_counter() - t0:.1f} s); Python {sys.version.split()[0]}, "
            f"{os.cpu_count()} CPUs",
            file=sys.stderr,
        )
        rows = []
        tables: Dict[str, Any] = {}
        for name, fn in readers(path).items():
            if args.only and SHORT[name] != args.only:
                continue
            result, seconds, peak = measure(fn)
            rows.append((name, seconds, peak))
            if name != "pandas":
                tables[name] = result
            del result
        ref = tables.get("read_csv: hand parser")
        for name, t in tables.items():  # every reader's table, bit for bit
            if ref is not None and t is not ref:
                same = t.X.tobytes() == ref.X.tobytes() and t.y.tobytes() == ref.y.tobytes()
                same = same and t.y.dtype == ref.y.dtype and t.feature_names == ref.feature_names
                if not same:
                    raise SystemExit(f"{name}: a different table from the hand parser's")
    hand = next((s for n, s, _ in rows if n == "read_csv: hand parser"), None)
    print(f"| reader ({args.rows:,} rows x {args.cols} columns, {size / 2**20:,.0f} MiB) | seconds | "
          f"peak memory | time vs hand parser |")  # fmt: skip
    print("|---|---:|---:|---:|")
    for name, seconds, peak in rows:
        mem = "n/a" if peak is None else f"{peak / 2**20:,.0f} MiB"
        ratio = f"{hand / seconds:.1f}x faster" if hand and name != "read_csv: hand parser" else ""
        print(f"| {LABELS[name]} | {seconds:.2f} | {mem} | {ratio} |")
    print(
        f"\npeak memory: the process's resident memory above its level before the read; "
        f"max RSS of the whole run: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:,.0f} MiB",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
