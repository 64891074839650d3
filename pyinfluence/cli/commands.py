"""The ``pyinfluence`` command line (also ``python -m pyinfluence``).

Subcommands:

- ``pyinfluence demo [--quick] [--out DIR] [--seed N]``: the paper's applications on
  scikit-learn's bundled digits; writes a report folder and prints the path of its report.html.
  Needs PyTorch (``pip install 'pyinfluence[torch]'``), as ``bench`` does; ``explain`` and
  ``mislabels`` do not.
- ``pyinfluence explain DATA [--label COL] [--test FILE | --test-indices LIST] [--model ...]``:
  for each test point, the training rows that helped and harmed its prediction most.
- ``pyinfluence mislabels DATA [--label COL] [--model ...]``: training rows ranked by
  self-influence, most suspicious (likely mislabeled) first.
- For both, DATA may be a folder of Parquet files (or one ``.parquet`` file): it runs on Dask
  (``pip install 'pyinfluence[dask]'``), on the running scheduler named by ``--scheduler ADDRESS``,
  else on a local cluster of ``--workers N`` processes (default 2) started for the run. The rows
  stay on the workers: the fit, the Hessian, the scores and the statistics (feature magnitudes,
  ``--standardize``'s means and standard deviations, the fit's accuracy or R^2) run chunk-wise, one
  chunk per file; only test-sized results and the reported rows (fetched by index) come back.
  Rows are numbered 0..N-1 across the files in name order (digits compared as numbers). The
  files of ``mislabels`` then rank the ``--max-rows`` most suspicious rows (default 10,000), not
  every row.
- ``pyinfluence bench [--quick] [--tasks LIST] [--n N --d D] [--repeats R] [--out DIR] [--peers]
  [--peer-python PATH] [--scaling] [--json]``: accuracy against time of every solver setting on
  standard tasks (see :mod:`pyinfluence.bench`); writes DIR/bench.json, bench.md and
  bench_accuracy_vs_time.png and prints the table.

Signs follow Koh & Liang (2017): ``influence`` is I_up,loss(z, z_test) — negative = helpful
(upweighting the training row lowers the test loss), positive = harmful; removing the row changes
the test loss by about −influence/n (``loss_change_if_removed``).

Errors in the input (missing file or column, non-numeric values, NaN, a single class, mismatched
feature counts, a continuous target given to a classifier, a file over the size limits, an output
path that cannot be written, ...) end the program with a one-line message on stderr and exit
status 1, before any computation where they can be seen up front; usage errors with status 2.
Any other failure is one line too (``--debug`` shows the traceback instead). Results are never
written with a non-finite number in them.

Guards of ``explain`` / ``mislabels`` (see ``--help``):

- Inputs: a CSV over ``--max-input-size`` (default 1 GiB), an .npz whose arrays decompress to
  more, and a problem with more than ``--max-params`` model parameters (default 10,000: the exact
  Hessian alone takes 8·p² bytes, 800 MB) are refused before they are read or fitted.
- Labels: a classifier (``logistic``, ``svm``) refuses a continuous-looking target (a
  non-integer value, or more than 20 distinct values with fewer than 5 rows per value on
  average) and suggests ``--model ridge``.
- Scale: features are used as given; when they look unscaled (see :func:`feature_scale_warning`)
  a warning on stderr (also in the JSON and the report) suggests ``--standardize``.
- Outputs: written files never follow a symbolic link; text cells of the CSV output that a
  spreadsheet would run as a formula (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage
  return, and not a number) get a leading single quote (OWASP's advice against CSV injection).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import errno
import io
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from pyinfluence._formatting import format_bytes, format_value, text_table
from pyinfluence.errors import PyInfluenceError

__all__ = ["main", "build_parser", "feature_scale_warning"]

PROG = "pyinfluence"
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

_EXPLAIN_COLUMNS = [
    "test_index",
    "test_label",
    "test_prediction",
    "test_loss",
    "kind",
    "rank",
    "train_index",
    "train_label",
    "influence",
    "loss_change_if_removed",
]
_MISLABEL_COLUMNS = [
    "rank",
    "train_index",
    "label",
    "prediction",
    "training_loss",
    "self_influence",
    "loss_change_if_removed",
]


#: Default of --max-params: the exact linear path forms the p×p Hessian (8·p² bytes: 800 MB here)
DEFAULT_MAX_PARAMS = 10_000
#: Default of --max-input-size (a CSV's size; an .npz's decompressed size).
DEFAULT_MAX_INPUT_SIZE = "1G"
#: Default of --workers: worker processes of the local Dask cluster started for Parquet DATA.
DEFAULT_DASK_WORKERS = 2
#: Default of mislabels' --max-rows for Parquet DATA: rows ranked in the output files.
DEFAULT_PARQUET_MAX_ROWS = 10_000
#: Seconds to wait for a connection to --scheduler and for its first worker.
SCHEDULER_TIMEOUT_S = 30


class CLIError(PyInfluenceError, ValueError):
    """A user-facing error of the command line (one line)."""


# ================================================================================================
# argument parsing
# ================================================================================================
def _int_arg(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum`` (``what`` names it in the error)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v

    return parse


def _float_arg(strict: bool) -> Callable[[str], float]:
    """An argparse ``type``: a finite number > 0 (``strict``) or >= 0."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v) or v < 0 or (strict and v == 0):
            raise argparse.ArgumentTypeError(
                f"expected a finite number {'>' if strict else '>='} 0, got {text!r}"
            )
        return v

    return parse


_positive_int = _int_arg(1, "a positive integer")
_nonnegative_int = _int_arg(0, "a non-negative integer")
_nonnegative_float = _float_arg(strict=False)
_positive_float = _float_arg(strict=True)

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> Optional[int]:
    """'1G', '500M', '2e9', '4096' → bytes (K, M, G, T: powers of 1024); '0' or 'none': no
    limit (None)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    if t in ("0", "NONE"):
        return None
    m = re.fullmatch(r"([0-9.eE+]+)\s*([KMGT]?)", t)
    try:
        v = float(m.group(1)) * _SIZE_UNITS[m.group(2)] if m else -1.0
    except ValueError:
        v = -1.0
    if not math.isfinite(v) or v < 1:
        raise argparse.ArgumentTypeError(
            f"expected a size such as 500M, 1G or 2e9 (bytes), or 0 for no limit; got {text!r}"
        )
    return int(v)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of the ``pyinfluence`` command."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's default must not overwrite "pyinfluence --debug COMMAND"
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback on errors",
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Influence functions (Koh & Liang 2017): which training points made the model say "
            "this. Signs: influence < 0 = helpful, > 0 = harmful; removing a training point "
            "changes the test loss by about -influence/n."
        ),
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        parents=[common],
        help="run the paper's applications on scikit-learn's digits and write an HTML report",
        description=(
            "Train exact linear models and a small CNN on scikit-learn's bundled digits (nothing "
            "is downloaded), run the five applications of Koh & Liang (2017, Section 5) and write "
            "a report folder (report.html, PNG figures, results.json). Prints the report's path."
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="smaller settings: about half a minute on 2 cores (default: about a minute)",
    )
    demo.add_argument(
        "--out",
        default="pyinfluence-report",
        metavar="DIR",
        help="report folder (default: ./pyinfluence-report)",
    )
    demo.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="seed of the data split, the CNN's weights and the random draws "
        "(default 0, the measured setting)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="threads for pyinfluence, torch and numpy during the demo (default 1: "
        "the problems are small; more threads mostly add overhead)",
    )
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    for name, helptext, desc in (
        (
            "explain",
            "top helpful and harmful training rows for each test point",
            "For each test point, the k training rows whose upweighting most lowers (helpful) and "
            "most raises (harmful) its loss, with the predicted change of its loss if the row "
            "were removed (-influence/n).",
        ),
        (
            "mislabels",
            "training rows ranked by self-influence (suspected label errors first)",
            "Rank the training rows by the magnitude of their self-influence I_up,loss(z, z): rows "
            "whose own loss depends most on their presence (likely mislabeled or atypical) "
            "first.",
        ),
    ):
        sp = sub.add_parser(name, parents=[common], help=helptext, description=desc)
        sp.add_argument(
            "data",
            metavar="DATA",
            help="a CSV file with a header row (label column: --label), an .npz "
            "with X_train, y_train (and optionally X_test, y_test), or a folder of Parquet files "
            "(or one .parquet file; label column: --label), which runs on Dask: see --workers",
        )
        sp.add_argument(
            "--label",
            metavar="COL",
            help="name (or 0-based index) of the label column of a CSV file or of Parquet files",
        )
        sp.add_argument(
            "--test",
            metavar="FILE",
            help="test points: a CSV with the same columns, or an .npz with X_test/y_test (or X/y); "
            "with Parquet DATA also a .parquet file with the same columns",
        )
        sp.add_argument(
            "--test-indices",
            metavar="LIST",
            help="e.g. 0,5,10-12: rows of the test set to use; without a test set, "
            "rows of DATA held out of training as test points",
        )
        sp.add_argument(
            "--model",
            choices=("logistic", "svm", "ridge"),
            default="logistic",
            help="model family (default logistic; svm: smooth-hinge linear SVM, "
            "binary; ridge: ridge regression). The classifiers refuse a label that looks "
            "continuous: a non-integer value, or more than 20 distinct values with fewer than "
            "5 rows per value on average (text labels are always classes)",
        )
        sp.add_argument(
            "--l2",
            type=_nonnegative_float,
            default=1e-3,
            help="L2 coefficient of the training objective mean loss + l2/2 |theta|^2 (default 1e-3)",
        )
        sp.add_argument(
            "--damping",
            type=_nonnegative_float,
            default=0.0,
            help="damping added to the Hessian in every solve (default 0)",
        )
        sp.add_argument(
            "--standardize",
            action="store_true",
            help="standardise each feature with the training mean and std first. Without it "
            "the features are used as given (influence values and the L2 penalty depend on "
            "their scale) and a warning suggests it when they look unscaled: the largest "
            "|value| of one column over 1000 times another's, or above 1e4, or all below 1e-4",
        )
        sp.add_argument(
            "--max-input-size",
            type=_byte_size,
            default=_byte_size(DEFAULT_MAX_INPUT_SIZE),
            metavar="SIZE",
            help="refuse a CSV larger than SIZE, or an .npz whose arrays take more once "
            "decompressed, before reading it (default 1G; K, M, G, T are powers of 1024; 0: "
            "no limit). Parquet DATA is read by the Dask workers, a file at a time: only its "
            "--test file is limited",
        )
        sp.add_argument(
            "--max-params",
            type=_positive_int,
            default=DEFAULT_MAX_PARAMS,
            metavar="N",
            help="refuse more than N model parameters (features + 1, times the number of "
            "classes for 3 or more classes) before fitting: the exact Hessian takes 8*N^2 "
            f"bytes (default {DEFAULT_MAX_PARAMS:,}: 800 MB)",
        )
        sp.add_argument(
            "-k",
            "--k",
            type=_positive_int,
            default=5 if name == "explain" else 20,
            help="rows per list on screen and in the files"
            + (
                " (default 5)"
                if name == "explain"
                else " shown on screen (default 20; the files rank every row, or --max-rows)"
            ),
        )
        if name == "explain":
            sp.add_argument(
                "--show",
                type=_nonnegative_int,
                default=5,
                metavar="N",
                help="test points printed on screen (default 5; the files have all)",
            )
        sp.add_argument(
            "--out",
            metavar="DIR",
            help=f"write {name}.csv and {name}.json into DIR. Every output path is checked "
            "before the computation; an existing symbolic link is refused, never written through",
        )
        sp.add_argument(
            "--out-csv",
            metavar="FILE",
            help="write the table as CSV (text cells starting with = + - @ get a leading ' so "
            "that spreadsheets do not run them as formulas)",
        )
        sp.add_argument(
            "--out-json",
            metavar="FILE",
            help="write the results as JSON (with model_fit: training and test accuracy, or R^2 "
            "for ridge; notes; warnings)",
        )
        if name == "mislabels":
            sp.add_argument(
                "--max-rows",
                type=_nonnegative_int,
                metavar="N",
                help="the files rank only the N most suspicious rows (0: every row). Default: every "
                f"row of a CSV or .npz; {DEFAULT_PARQUET_MAX_ROWS:,} for Parquet DATA (every row would "
                "bring n values into this process)",
            )
        sp.add_argument("--report", metavar="DIR", help="write an HTML report into DIR")
        sp.add_argument("--quiet", action="store_true", help="no table on screen")
        cluster = sp.add_mutually_exclusive_group()
        cluster.add_argument(
            "--scheduler",
            metavar="ADDRESS",
            help="Parquet DATA: run on the running dask.distributed scheduler at ADDRESS (e.g. "
            "tcp://host:8786; its workers need pyinfluence and read the files: the paths must be "
            "valid there)",
        )
        cluster.add_argument(
            "--workers",
            type=_positive_int,
            metavar="N",
            help="Parquet DATA: start a local Dask cluster of N worker processes (one thread each) for "
            "this run (default: 2, when --scheduler is not given). A folder of Parquet files (or a "
            ".parquet file) always runs on Dask, chunk by chunk (one chunk per file), and the rows "
            "never come into this process; CSV and .npz DATA run in this process and take neither "
            "option",
        )
        sp.set_defaults(func=_cmd_explain if name == "explain" else _cmd_mislabels)
    _add_bench_parser(sub, common)
    return parser


def _version() -> str:
    from pyinfluence import __version__

    return str(__version__)


# ================================================================================================
# main
# ================================================================================================
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        msg = f"{exc.filename}: {exc.strerror}"
    elif isinstance(exc, MemoryError):
        detail = str(exc)
        msg = "out of memory" + (f" ({detail})" if detail and detail != "std::bad_alloc" else "")
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version or a usage error (argparse printed it)
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_USAGE)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (PyInfluenceError, ValueError, TypeError, OSError, ImportError, MemoryError) as exc:
        if getattr(args, "debug", False):
            raise
        print(f"{PROG} {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug or an unforeseen failure: still one line, never a traceback
        if getattr(args, "debug", False):
            raise
        print(
            f"{PROG} {args.command}: error: {type(exc).__name__}: {_one_line(exc)} "
            f"(unexpected; --debug shows the traceback)",
            file=sys.stderr,
        )
        return EXIT_ERROR


# ================================================================================================
# bench
# ================================================================================================
def _add_bench_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    bench = sub.add_parser(
        "bench",
        parents=[common],
        help="benchmark influence solvers: accuracy against time on standard tasks",
        description=(
            "Time every applicable solver setting (C++ exact linear path, torch Exact, CG at "
            "several tolerances, LiSSA at several depths, and any solver added later) on "
            "standard tasks (scikit-learn digits and synthetic data; nothing is downloaded), "
            "measure accuracy against ground truth (exact solve, or CG at tol 1e-10 where exact "
            "is unaffordable) and against leave-one-out retraining. Writes DIR/bench.json, "
            "bench.md and bench_accuracy_vs_time.png and prints the table. See bench/README.md."
        ),
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="small grid, 1 repeat, 20 test points, no CNN: about a minute or two on 2 cores",
    )
    bench.add_argument(
        "--tasks",
        metavar="LIST",
        help="comma-separated tasks (default: all; quick: all but the CNNs): "
        "digits-logreg, digits-svm, digits-mlp, digits-cnn, digits-cnn-smooth, synthetic-linear",
    )
    bench.add_argument(
        "--solvers",
        metavar="LIST",
        help="only these solver families, e.g. linear-exact,exact,cg,block_cg,lissa",
    )
    bench.add_argument(
        "--n", type=_positive_int, help="synthetic-linear: training points (default 20000; quick 5000)"
    )
    bench.add_argument("--d", type=_positive_int, help="synthetic-linear: features (default 200; quick 100)")
    bench.add_argument(
        "--m", type=_positive_int, help="test points per task (default: 50, CNN 10; quick 20, CNN 5)"
    )
    bench.add_argument(
        "--repeats", type=_positive_int, help="timed runs per setting, median reported (default 3; quick 1)"
    )
    bench.add_argument(
        "--budget",
        type=_positive_float,
        metavar="SECONDS",
        help="stop repeating a setting after this many seconds (default 30; quick 10)",
    )
    bench.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        help="data split / generator and initial weights (default 0)",
    )
    bench.add_argument(
        "--out",
        default="pyinfluence-bench",
        metavar="DIR",
        help="output folder (default: ./pyinfluence-bench)",
    )
    bench.add_argument(
        "--peers",
        nargs="?",
        const="captum,pydvl,kronfluence",
        default=None,
        metavar="LIST",
        help="also run other influence libraries when installed (default list: "
        "captum,pydvl,kronfluence); skipped cleanly when absent",
    )
    bench.add_argument(
        "--peer-python", metavar="PATH", help="python interpreter of a separate environment holding the peers"
    )
    bench.add_argument(
        "--peer-timeout",
        type=_positive_float,
        default=600.0,
        metavar="SECONDS",
        help="time limit per peer run (default 600)",
    )
    bench.add_argument(
        "--scaling",
        action="store_true",
        help="also run the scaling sweep of the exact linear path (time against n and d)",
    )
    bench.add_argument(
        "--no-loo", action="store_true", help="skip the leave-one-out retraining check on linear tasks"
    )
    bench.add_argument(
        "--loo-deep",
        action="store_true",
        help="also retrain the deep tasks for the leave-one-out check (slow)",
    )
    bench.add_argument(
        "--retraining",
        action="store_true",
        help="also measure how well each method predicts retraining: LDS over random half subsets, "
        "leave-one-out Pearson (first order and Newton step), brittleness and mislabel AUC, on digits-logreg, "
        "digits-mlp and digits-cnn-smooth among --tasks (retrained models cached in OUT/retraining-cache; slow: "
        "minutes to an hour). Writes OUT/retraining.json and retraining.md",
    )
    bench.add_argument(
        "--subsets",
        type=_positive_int,
        default=None,
        metavar="M",
        help="--retraining: random half subsets for the LDS (default 100, the dattri/TRAK protocol; quick 20)",
    )
    bench.add_argument(
        "--ensemble",
        type=_nonnegative_int,
        default=None,
        metavar="K",
        help="--retraining: also score with influence averaged over K models from different initial weights "
        "(deep tasks; default 5, quick 0 = none)",
    )
    bench.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    bench.add_argument(
        "--threads",
        type=_nonnegative_int,
        default=1,
        help="threads for torch, pyinfluence's core and (with threadpoolctl) the "
        "BLAS/OpenMP pools during the run (default 1: on a shared 2-core "
        "machine, 2-thread pools waiting on each other made the quick run 3x "
        "slower; 0 = leave the libraries' defaults)",
    )
    bench.add_argument("--json", action="store_true", help="print the JSON document instead of the table")
    bench.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from pyinfluence._optional import require_torch

    require_torch("the benchmark")  # its tasks and solvers are torch models and torch solvers
    from pyinfluence.bench import run_bench

    t0 = time.perf_counter()
    limits: Any = None
    restore: Optional[Callable[[], None]] = None
    if args.threads:
        import torch

        from pyinfluence import get_num_threads, set_num_threads

        before = (torch.get_num_threads(), get_num_threads())

        def restore_threads() -> None:
            torch.set_num_threads(before[0])
            set_num_threads(before[1])

        restore = restore_threads
        torch.set_num_threads(args.threads)
        set_num_threads(args.threads)
        try:  # numpy's / scipy's BLAS and OpenMP too, where threadpoolctl is installed
            from threadpoolctl import threadpool_limits

            limits = threadpool_limits(limits=args.threads)
        except ImportError:
            pass

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        report = _run_bench_from_args(args, run_bench, log)
    finally:
        if limits is not None:
            limits.restore_original_limits()
        if restore is not None:
            restore()
    paths = report.save(args.out, plot=not args.no_plot)
    if args.retraining:
        paths.update(_run_retraining(args, log))
    if args.json:
        print(report.to_json())
    else:
        print(report.table(), end="")
        print(f"wall time {time.perf_counter() - t0:.1f} s")
        for key in ("json", "markdown", "plot", "scaling_plot", "retraining_json", "retraining_markdown"):
            if key in paths:
                print(f"{key}: {paths[key].resolve()}")
    return EXIT_OK


def _run_retraining(args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """``bench --retraining``: the retraining study (pyinfluence.bench.studies.retraining) on the digits tasks
    among ``--tasks``; writes OUT/retraining.json and retraining.md, prints the table on stderr."""
    import json
    import pathlib

    from pyinfluence.bench.studies import retraining

    chosen = [t.strip() for t in args.tasks.split(",")] if args.tasks else list(retraining.PUBLISHED)
    for t in chosen:
        if t in retraining.UNSUPPORTED:
            log(f"--retraining: skipping {t}: {retraining.UNSUPPORTED[t]}")
    tasks = [t for t in chosen if t in retraining.PUBLISHED]
    if not tasks:
        log(f"--retraining: none of {', '.join(retraining.PUBLISHED)} among --tasks; nothing to retrain")
        return {}
    out = pathlib.Path(args.out)
    res = retraining.run_study(
        tasks,
        n_subsets=args.subsets or (20 if args.quick else 100),
        ensemble=(0 if args.quick else 5) if args.ensemble is None else args.ensemble,
        loo_tests=2 if args.quick else 5,
        loo_points=10 if args.quick else 20,
        brittle_tests=2 if args.quick else 5,
        peers=[p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else (),
        cache_dir=str(out / "retraining-cache"),
        quick=args.quick,
        log=None if args.quiet else log,
    )
    table = retraining.render(res)
    (out / "retraining.md").write_text(table + "\n")
    (out / "retraining.json").write_text(json.dumps(res, indent=1, default=retraining.json_default))
    log(table)
    return {"retraining_json": out / "retraining.json", "retraining_markdown": out / "retraining.md"}


def _run_bench_from_args(args: argparse.Namespace, run_bench: Any, log: Any) -> Any:
    return run_bench(
        tasks=args.tasks,
        quick=args.quick,
        repeats=args.repeats,
        seed=args.seed,
        n=args.n,
        d=args.d,
        m=args.m,
        solvers=args.solvers,
        peers=[p.strip() for p in args.peers.split(",") if p.strip()] if args.peers else False,
        peer_python=args.peer_python,
        peer_timeout_s=args.peer_timeout,
        scaling=args.scaling,
        loo=not args.no_loo,
        loo_deep=args.loo_deep,
        budget_s=args.budget,
        progress=None if args.quiet else log,
    )


# ================================================================================================
# demo
# ================================================================================================
def _cmd_demo(args: argparse.Namespace) -> int:
    from pyinfluence._optional import require_torch

    require_torch("the demo")  # its CNN runs on the torch path
    from pyinfluence.cli.demo import run_demo

    run_demo(
        args.out,
        quick=args.quick,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        log=print,
    )
    return EXIT_OK


# ================================================================================================
# explain / mislabels on the user's data
# ================================================================================================
def _tell(args: argparse.Namespace, kind: str, message: str) -> None:
    """A note or warning on stderr (one line), beside the results on stdout."""
    print(f"{PROG} {args.command}: {kind}: {message}", file=sys.stderr)


#: Feature magnitudes (a column's largest |value|) that make the scale warning fire: one column
#: over _SCALE_RATIO times another, or any above _SCALE_HIGH, or all below _SCALE_LOW.
_SCALE_RATIO, _SCALE_HIGH, _SCALE_LOW = 1e3, 1e4, 1e-4
#: Feature values this large overflow float64 products (squares reach 1e200 and beyond).
_OVERFLOW_RISK = 1e100


def feature_scale_warning(X: np.ndarray, names: Sequence[str], source: str) -> Optional[str]:
    """A one-line warning when the features look unscaled, or None.

    A column's magnitude is its largest |value| (all-zero columns are ignored). The features look
    unscaled when the largest magnitude is more than 1000 times the smallest, or above 1e4, or
    below 1e-4: influence values, the L2 penalty and the Hessian's conditioning all depend on the
    feature scale, and defaults such as ``--l2 1e-3`` are meant for features of order 1."""
    mags = np.max(np.abs(X), axis=0) if X.size else np.zeros(0)
    return _scale_warning(mags, names, source)


def _scale_warning(mags: np.ndarray, names: Sequence[str], source: str) -> Optional[str]:
    """:func:`feature_scale_warning` from the columns' largest |values| ``mags`` (d,)."""
    used = np.flatnonzero(mags > 0)
    if used.size == 0:
        return None
    hi, lo = used[np.argmax(mags[used])], used[np.argmin(mags[used])]
    big, small = float(mags[hi]), float(mags[lo])
    if big > _SCALE_RATIO * small:
        why = f"|values| reach {big:.3g} in column {names[hi]!r} but only {small:.3g} in column {names[lo]!r}"
    elif big > _SCALE_HIGH:
        why = f"|values| reach {big:.3g} in column {names[hi]!r}"
    elif big < _SCALE_LOW:
        why = f"every |value| is below {_SCALE_LOW:g} (largest {big:.3g}, column {names[hi]!r})"
    else:
        return None
    return (
        f"{source}: the features look unscaled ({why}); influence values and the L2 penalty "
        f"depend on the feature scale: pass --standardize to standardise them"
    )


def _standardize(
    X: np.ndarray, Xt: Optional[np.ndarray]
) -> Tuple[np.ndarray, Optional[np.ndarray], Dict[str, np.ndarray]]:
    """(X - mean) / std per column with the training mean and std (constant columns only
    centred). Each column is first divided by its largest |value|, so that values near the float64
    limit (1e200) neither overflow the variance nor standardise to zeros."""
    scale = np.max(np.abs(X), axis=0)
    scale[scale == 0] = 1.0
    unit = X / scale
    mu, sd = unit.mean(axis=0), unit.std(axis=0)
    sd[sd == 0] = 1.0
    Xs = (unit - mu) / sd
    Xts = None if Xt is None else (Xt / scale - mu) / sd
    return Xs, Xts, {"mean": mu * scale, "std": sd * scale}


def _n_params(model: str, ud: Any) -> int:
    """Parameters of the linear model: (features + 1) per output; multinomial logistic regression
    has one output per class."""
    outputs = 1
    if model == "logistic":
        n_classes = int(np.unique(ud.y_train).size)
        outputs = n_classes if n_classes > 2 else 1
    return outputs * (int(ud.X_train.shape[1]) + 1)


def _largest_value(ud: Any) -> Tuple[float, str, str, bool]:
    """(|value|, column name, source, in the training data) of the largest feature value."""
    best = (0.0, "", ud.source, True)
    # Parquet data: the training rows' magnitudes from the pass on the workers (never the rows here)
    train_mags = getattr(ud, "max_abs", None)
    for X, source, training in ((ud.X_train, ud.source, True), (ud.X_test, ud.test_source, False)):
        if X is None or X.size == 0:
            continue
        mags = train_mags if training and train_mags is not None else np.max(np.abs(X), axis=0)
        j = int(np.argmax(mags))
        if mags[j] > best[0]:
            best = (float(mags[j]), ud.feature_names[j], source, training)
    return best


def _scale_hint(ud: Any, standardized: bool) -> str:
    """Which input to rescale: the column with the largest |feature value| and its file."""
    value, column, source, training = _largest_value(ud)
    fix = "pass --standardize or rescale it" if training and not standardized else "rescale it"
    return f"the largest |feature value| is {value:.3g}, in column {column!r} of {source}: {fix}"


@contextlib.contextmanager
def _numerics_guard(args: argparse.Namespace, ud: Any, n_params: int) -> Iterator[None]:
    """Turn out-of-memory and the numerical failures of extreme feature values into one-line
    errors that name the input and its size."""
    try:
        yield
    except MemoryError:
        n, d = ud.X_train.shape
        raise CLIError(
            f"out of memory on {ud.source}: {n:,} training rows x {d:,} features ({n_params:,} "
            f"model parameters; the Hessian alone takes {format_bytes(8 * n_params**2)}); use "
            f"fewer features or rows, or a machine with more memory"
        ) from None
    except (PyInfluenceError, ArithmeticError, ValueError) as exc:
        if _largest_value(ud)[0] < _OVERFLOW_RISK:
            raise
        raise CLIError(f"{_one_line(exc)}; {_scale_hint(ud, args.standardize)}") from exc


def _fit_quality(
    model_kind: str,
    model: Any,
    X: np.ndarray,
    y: np.ndarray,
    X_test: Optional[np.ndarray],
    y_test: Optional[np.ndarray],
) -> Dict[str, Any]:
    """How well the model fits: accuracy for the classifiers, R^2 for ridge, on the training
    data and (when there are test points) the test data; None where undefined (R^2 of targets
    that do not vary)."""

    has_test = X_test is not None and y_test is not None
    return {
        "metric": "R^2" if model_kind == "ridge" else "accuracy",
        "train": _score(model_kind, model, X, y),
        "test": _score(model_kind, model, X_test, y_test) if has_test else None,  # type: ignore[arg-type]
        "n_train": int(X.shape[0]),
        "n_test": int(X_test.shape[0]) if has_test else 0,  # type: ignore[union-attr]
    }


def _score(model_kind: str, model: Any, Xs: np.ndarray, ys: np.ndarray) -> Optional[float]:
    """Accuracy (classifiers) or R^2 = 1 - sum (y - pred)^2 / sum (y - mean y)^2 (ridge; None
    where undefined) of in-memory rows."""
    pred = model.predict(Xs)
    if model_kind != "ridge":
        return float(np.mean(pred == ys))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow: reported as undefined
        total = float(np.sum((ys - np.mean(ys)) ** 2))
        r2 = 1.0 - float(np.sum((ys - pred) ** 2)) / total if total > 0 else math.nan
    return r2 if math.isfinite(r2) else None


def _fit_line(quality: Dict[str, Any]) -> str:
    """'model fit: training accuracy 0.9735 (567 rows), test accuracy 1 (2 points)'."""
    metric = quality["metric"]

    def shown(v: Optional[float]) -> str:
        return "undefined" if v is None else f"{v:.4g}"

    line = f"model fit: training {metric} {shown(quality['train'])} ({quality['n_train']} rows)"
    if quality["n_test"]:
        line += f", test {metric} {shown(quality['test'])} ({quality['n_test']} points)"
    return line


def _check_param_limit(source: str, n_params: int, max_params: int, at_least: bool = False) -> None:
    """CLIError when the model has more than ``--max-params`` parameters (``at_least``: ``n_params`` is a
    lower bound, the classes having been counted only up to a cap)."""
    if n_params > max_params:
        raise CLIError(
            f"{source}: the model has {'more than ' if at_least else ''}{n_params:,} parameters, more than "
            f"the limit of {max_params:,} (the exact Hessian would take {format_bytes(8 * n_params**2)}); "
            f"raise it with --max-params"
        )


def _fit_model(
    args: argparse.Namespace,
    data: Any,
    X: Any,
    Xt: Any,
    scaling: Any,
    n_params: int,
    scale_warnings: List[str],
    fit_quality: Callable[..., Dict[str, Any]],
) -> Dict[str, Any]:
    """Fit ``args.model`` on (X, data.y_train) — numpy arrays or, for Parquet input, dask arrays — build its
    LinearInfluence and measure the fit with ``fit_quality``; the dict the commands work from."""
    import warnings

    from pyinfluence import LinearInfluence, LogisticRegression, RidgeRegression, SmoothHingeSVM

    model = {"logistic": LogisticRegression, "svm": SmoothHingeSVM, "ridge": RidgeRegression}[args.model](
        l2=args.l2
    )
    with _numerics_guard(args, data, n_params):
        model.fit(X, data.y_train)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fit is exact; a warning here is not actionable
            inf = LinearInfluence(model, X, data.y_train, damping=args.damping)
        quality = fit_quality(args.model, model, X, data.y_train, Xt, data.y_test)
    return {
        "data": data,
        "X": X,
        "X_test": Xt,
        "model": model,
        "inf": inf,
        "scaling": scaling,
        "n_params": n_params,
        "fit_quality": quality,
        "notes": list(data.notes),
        "warnings": scale_warnings,
        "args": args,
    }


def _fit(
    args: argparse.Namespace, need_test: bool, stack: Optional[contextlib.ExitStack] = None
) -> Dict[str, Any]:
    """Read the data, fit the model family, build the LinearInfluence. Parquet DATA runs on Dask
    (:func:`_fit_dask`); its cluster is entered into ``stack`` (closed when the command ends)."""

    from pyinfluence.cli.userdata import check_classes, is_parquet_input, load_user_data

    if is_parquet_input(args.data):
        return _fit_dask(args, need_test, stack if stack is not None else contextlib.ExitStack())
    if args.workers is not None or args.scheduler is not None:
        flag = "--workers" if args.workers is not None else "--scheduler"
        raise CLIError(
            f"{flag} applies to a folder of Parquet files (run on Dask); {args.data} is read into this "
            f"process and runs here"
        )

    ud = load_user_data(
        args.data,
        label=args.label,
        test=args.test,
        test_indices=args.test_indices,
        numeric_labels=args.model == "ridge",
        max_bytes=args.max_input_size,
        max_features=args.max_params - 1,  # p >= features + 1 (the intercept)
    )
    for note in ud.notes:
        _tell(args, "note", note)
    if need_test and not ud.has_test:
        raise CLIError(
            f"{ud.source} has no test points: pass --test FILE, --test-indices LIST (rows held "
            f"out of training) or an .npz with X_test and y_test"
        )
    if args.model != "ridge":
        check_classes(ud.y_train, args.model, ud.source)
    n_params = _n_params(args.model, ud)
    _check_param_limit(ud.source, n_params, args.max_params)
    X, Xt = ud.X_train, ud.X_test
    scaling = None
    scale_warnings: List[str] = []
    if args.standardize:
        X, Xt, scaling = _standardize(X, Xt)
    else:
        warning = feature_scale_warning(X, ud.feature_names, ud.source)
        if warning:
            scale_warnings.append(warning)
            _tell(args, "warning", warning)
    return _fit_model(args, ud, X, Xt, scaling, n_params, scale_warnings, _fit_quality)


# ------------------------------------------------------------------------------------------------
# Parquet DATA on Dask
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dask_client(args: argparse.Namespace) -> Iterator[str]:
    """A ``distributed.Client`` for the run, set as Dask's default scheduler and closed at the end:
    to the scheduler at ``--scheduler``, else to a local cluster of ``--workers`` processes (one
    thread each; default 2) started here. Yields a description of it for the output."""
    import logging
    import warnings

    try:
        import distributed
    except ImportError:
        raise ImportError(
            "a folder of Parquet files runs on Dask, which is not installed: pip install 'pyinfluence[dask]'",
            name="distributed",
        ) from None
    cluster = None
    if args.scheduler is not None:
        try:
            client = distributed.Client(args.scheduler, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, ValueError, TypeError) as exc:  # refused, timed out, not an address
            raise CLIError(
                f"--scheduler {args.scheduler}: cannot connect to a Dask scheduler there ({_one_line(exc)})"
            ) from None
        try:
            client.wait_for_workers(1, timeout=SCHEDULER_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            client.close()
            raise CLIError(
                f"--scheduler {args.scheduler}: no worker joined within {SCHEDULER_TIMEOUT_S} s ({_one_line(exc)})"
            ) from None
        workers = len(client.nthreads())  # every worker (scheduler_info lists only the first few)
        description = f"the Dask scheduler at {args.scheduler} ({workers} workers)"
    else:
        workers = args.workers if args.workers is not None else DEFAULT_DASK_WORKERS
        # the nannies set OMP_NUM_THREADS=1 and the like in this process's environment for their workers
        # to inherit: restored when the run ends (a later torch or BLAS import here would obey them)
        environ = dict(os.environ)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the dashboard's port or the memory limit
            cluster = distributed.LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
        client = distributed.Client(cluster)
        description = f"a local Dask cluster of {workers} worker processes"
    try:
        yield description
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            os.environ.update(environ)


def _predict_chunk(block: np.ndarray, model: Any) -> np.ndarray:
    """``model.predict`` of one chunk of rows (runs on a worker)."""
    return np.asarray(model.predict(block))


def _fit_quality_dask(
    model_kind: str, model: Any, X: Any, y: Any, X_test: Optional[np.ndarray], y_test: Optional[np.ndarray]
) -> Dict[str, Any]:
    """:func:`_fit_quality` with dask training rows: the training accuracy (or R^2's two sums) is
    reduced chunk-wise on the workers; the test points are in memory."""
    import dask

    dtype = np.dtype(np.float64) if model_kind == "ridge" else np.asarray(model.classes_).dtype
    pred = X.map_blocks(_predict_chunk, model=model, drop_axis=1, dtype=dtype, meta=np.empty(0, dtype=dtype))
    n = int(X.shape[0])
    train: Optional[float]
    if model_kind != "ridge":
        (correct,) = dask.compute((pred == y).sum())
        train = float(correct) / n
    else:
        # R^2 = 1 - sum (y - pred)^2 / sum (y - mean y)^2, both sums tree-reduced
        res, tot = dask.compute(((y - pred) ** 2).sum(), ((y - y.mean()) ** 2).sum())
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            total = float(tot)
            r2 = 1.0 - float(res) / total if total > 0 else math.nan
        train = r2 if math.isfinite(r2) else None
    has_test = X_test is not None and y_test is not None
    return {
        "metric": "R^2" if model_kind == "ridge" else "accuracy",
        "train": train,
        "test": _score(model_kind, model, X_test, y_test) if has_test else None,  # type: ignore[arg-type]
        "n_train": n,
        "n_test": int(X_test.shape[0]) if has_test else 0,  # type: ignore[union-attr]
    }


def _fit_dask(args: argparse.Namespace, need_test: bool, stack: contextlib.ExitStack) -> Dict[str, Any]:
    """:func:`_fit` for a folder of Parquet files: the footers are checked here, then a Dask
    cluster is entered into ``stack`` and the rows are read, checked, fitted and scored on its
    workers (see :func:`pyinfluence.cli.userdata.open_parquet_on_dask`); this process holds only
    p x p matrices, per-feature statistics, the test points and the results."""

    from pyinfluence.cli.userdata import (
        CONTINUOUS_MIN_DISTINCT,
        check_class_set,
        open_parquet_on_dask,
        scan_parquet,
    )

    pdata = scan_parquet(
        args.data,
        label=args.label,
        test=args.test,
        test_indices=args.test_indices,
        numeric_labels=args.model == "ridge",
        max_bytes=args.max_input_size,
        max_features=args.max_params - 1,  # p >= features + 1 (the intercept)
    )
    if need_test and not pdata.has_test:
        raise CLIError(
            f"{pdata.source} has no test points: pass --test FILE or --test-indices LIST (rows held out of "
            f"training)"
        )
    where = stack.enter_context(_dask_client(args))
    d = len(pdata.feature_names)
    classifier = args.model != "ridge"
    # classes beyond this bound exceed --max-params anyway (p = classes x (features + 1))
    class_cap = max(args.max_params // (d + 1), CONTINUOUS_MIN_DISTINCT) + 1
    open_parquet_on_dask(pdata, classifier=classifier, class_cap=class_cap)
    for note in pdata.notes:
        _tell(args, "note", note)
    assert pdata.max_abs is not None
    n_classes = 1
    if classifier:
        assert pdata.classes is not None
        check_class_set(pdata.classes, pdata.continuous, args.model, pdata.source)
        n_classes = int(pdata.classes.size)
    n_params = (n_classes if args.model == "logistic" and n_classes > 2 else 1) * (d + 1)
    _check_param_limit(pdata.source, n_params, args.max_params, at_least=n_classes >= class_cap)
    X, Xt = pdata.X_train, pdata.X_test
    scaling = None
    scale_warnings: List[str] = []
    if args.standardize:
        import dask

        # as _standardize, with the mean and std reduced on the workers
        scale = pdata.max_abs.copy()
        scale[scale == 0] = 1.0
        unit = X / scale
        mu, sd = dask.compute(unit.mean(axis=0), unit.std(axis=0))
        mu, sd = np.asarray(mu, dtype=np.float64), np.asarray(sd, dtype=np.float64)
        sd[sd == 0] = 1.0
        X = (unit - mu) / sd
        Xt = None if Xt is None else (Xt / scale - mu) / sd
        scaling = {"mean": mu * scale, "std": sd * scale}
    else:
        warning = _scale_warning(pdata.max_abs, pdata.feature_names, pdata.source)
        if warning:
            scale_warnings.append(warning)
            _tell(args, "warning", warning)
    fitted = _fit_model(args, pdata, X, Xt, scaling, n_params, scale_warnings, _fit_quality_dask)
    fitted["dask"] = where
    return fitted


def _top_magnitude_chunk(block: np.ndarray, offset: int, limit: int) -> Tuple[np.ndarray, np.ndarray, bool]:
    """(global indices, values, all finite) of the chunk's ``limit`` largest |values|, ties by the
    lower index (runs on a worker)."""
    v = np.asarray(block, dtype=np.float64)
    finite = bool(np.all(np.isfinite(v)))
    order = np.lexsort((np.arange(v.size), -np.abs(v)))[:limit]
    return order.astype(np.int64) + offset, v[order], finite


def _rank_by_magnitude(values: Any, limit: Optional[int]) -> Tuple[np.ndarray, np.ndarray, bool]:
    """(indices, values, all finite) of the ``limit`` (None: all) largest |values| of a dask vector,
    in the order of a stable ``np.argsort(-|values|)``: per-chunk candidates merged here."""
    import dask

    n = int(values.shape[0])
    limit = n if limit is None else min(limit, n)
    offsets = np.concatenate([[0], np.cumsum(values.chunks[0])[:-1]]).astype(np.int64)
    part = dask.delayed(_top_magnitude_chunk, pure=True)
    parts = dask.compute(*[part(b, int(o), limit) for b, o in zip(values.to_delayed().ravel(), offsets)])
    idx = np.concatenate([p[0] for p in parts])
    val = np.concatenate([p[1] for p in parts])
    order = np.lexsort((idx, -np.abs(val)))[:limit]  # |value| descending, ties by the lower index
    return idx[order], val[order], all(p[2] for p in parts)


def _mislabel_rows_dask(fitted: Dict[str, Any], max_rows: Optional[int]) -> List[Dict[str, Any]]:
    """:func:`mislabel_rows` for Parquet data: the self-influence of every row is computed and
    ranked chunk-wise on the workers; the ``max_rows`` top rows are fetched by index for their
    label, prediction and loss."""
    import dask

    ud, model, inf = fitted["data"], fitted["model"], fitted["inf"]
    with _numerics_guard(fitted["args"], ud, fitted["n_params"]):
        idx, self_influence, finite = _rank_by_magnitude(inf.self_influence(), max_rows)
    if not finite:
        _require_finite(fitted, "self-influence values", np.array([np.nan]))
    fetch = np.sort(idx)  # fetched in row order, then put in rank order
    Xs, ys = dask.compute(fitted["X"][fetch], ud.y_train[fetch])
    pos = np.searchsorted(fetch, idx)
    Xs, ys = np.ascontiguousarray(np.asarray(Xs, dtype=np.float64)[pos]), np.asarray(ys)[pos]
    with _numerics_guard(fitted["args"], ud, fitted["n_params"]):
        loss = model.loss(Xs, ys)
        pred = model.predict(Xs)
    _require_finite(fitted, "self-influence values", self_influence)
    _require_finite(fitted, "training losses", loss)
    n = inf.n_train
    rows_in_source = ud.train_rows_of(idx)
    return [
        {
            "rank": r,
            "train_index": int(rows_in_source[j]),
            "label": _label(ys[j]),
            "prediction": _label(pred[j]),
            "training_loss": float(loss[j]),
            "self_influence": float(self_influence[j]),
            "loss_change_if_removed": float(-self_influence[j] / n),
        }
        for j, r in enumerate(range(1, idx.size + 1))
    ]


def _require_finite(fitted: Dict[str, Any], what: str, *arrays: np.ndarray) -> None:
    """Refuse to report results with NaN or inf in them (defence in depth: the library raises
    too): a one-line error naming the input whose scale is the likely cause."""
    if all(np.all(np.isfinite(np.asarray(a, dtype=np.float64))) for a in arrays):
        return
    args = fitted["args"]
    raise CLIError(
        f"non-finite {what} (the float64 arithmetic overflowed), so nothing is written; "
        f"{_scale_hint(fitted['data'], args.standardize)}"
    )


def _label(v: Any) -> Any:
    """A label as plain Python (for JSON and CSV)."""
    return v.item() if hasattr(v, "item") else v


# ------------------------------------------------------------------------------------------------
# output files: checked before the computation, written without following symbolic links
# ------------------------------------------------------------------------------------------------
def _check_output_folder(folder: pathlib.Path, flag: str) -> None:
    """``folder`` is a writable folder, or can be created (its nearest existing ancestor is)."""
    if folder.exists():
        if not folder.is_dir():
            raise CLIError(f"{flag} {folder}: exists and is not a folder")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise CLIError(f"{flag} {folder}: the folder is not writable")
        return
    ancestor = folder.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CLIError(f"{flag} {folder}: cannot be created, {ancestor} is not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CLIError(f"{flag} {folder}: cannot be created, {ancestor} is not writable")


def _check_output_file(path: pathlib.Path, in_new_folder: bool = False) -> None:
    """``path`` can be written: not a symbolic link (never written through), not a folder, in
    a writable folder (``in_new_folder``: one that the command creates, checked already)."""
    if path.is_symlink():
        raise CLIError(
            f"{path}: is a symbolic link; refusing to write through it (remove it or choose another path)"
        )
    if path.is_dir():
        raise CLIError(f"{path}: is a folder, not a file")
    if in_new_folder and not path.parent.exists():
        return
    parent = path.parent
    if not parent.exists():
        raise CLIError(f"{path}: the folder {parent} does not exist")
    if not parent.is_dir():
        raise CLIError(f"{path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{path}: the folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise CLIError(f"{path}: the file is not writable")


def _report_files(name: str) -> List[str]:
    from pyinfluence.cli.report import Report

    figure = {"explain": "explain_top.png", "mislabels": "self_influence.png"}[name]
    return [Report.HTML_NAME, Report.JSON_NAME, figure]


def _output_targets(args: argparse.Namespace, name: str) -> List[Tuple[str, pathlib.Path]]:
    """The ("csv" | "json", path) files to write, every output path (the report's too) checked
    now, before any computation: a path that cannot be written fails here, not after minutes."""
    targets: List[Tuple[str, pathlib.Path]] = []
    if args.out:
        folder = pathlib.Path(args.out)
        _check_output_folder(folder, "--out")
        targets += [("csv", folder / f"{name}.csv"), ("json", folder / f"{name}.json")]
    if args.out_csv:
        targets.append(("csv", pathlib.Path(args.out_csv)))
    if args.out_json:
        targets.append(("json", pathlib.Path(args.out_json)))
    for _, path in targets:
        in_out_folder = bool(args.out) and path.parent == pathlib.Path(args.out)
        _check_output_file(path, in_new_folder=in_out_folder)
    resolved = [os.path.realpath(p) for _, p in targets]
    if len(set(resolved)) != len(resolved):
        raise CLIError("the same output file is named twice (--out, --out-csv, --out-json)")
    if args.report:
        folder = pathlib.Path(args.report)
        _check_output_folder(folder, "--report")
        for filename in _report_files(name):
            _check_output_file(folder / filename, in_new_folder=True)
    return targets


#: First characters that make a spreadsheet run a cell as a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _spreadsheet_safe(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula, prefixed with a single quote (so it
    shows as text); numbers and other text unchanged."""
    if not isinstance(value, str) or not value.startswith(_FORMULA_START):
        return value
    try:
        float(value)
        return value  # a number written as text, e.g. "-1.5": not a formula
    except ValueError:
        return "'" + value


def _write_text_nofollow(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` (created or truncated) without following a symbolic link."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link appeared after the check
            raise CLIError(f"{path}: is a symbolic link; refusing to write through it") from None
        raise
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)


def _write_outputs(
    targets: Sequence[Tuple[str, pathlib.Path]],
    columns: Sequence[str],
    rows: Sequence[Dict[str, Any]],
    payload: Dict[str, Any],
) -> List[pathlib.Path]:
    """Write the checked ``targets`` (from :func:`_output_targets`); return their paths."""
    from pyinfluence._json import jsonable

    written = []
    for kind, path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: _spreadsheet_safe(r[k]) for k in columns})
            text = buf.getvalue()
        else:
            text = json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n"
        _write_text_nofollow(path, text)
        written.append(path)
    return written


def _settings(args: argparse.Namespace, fitted: Dict[str, Any]) -> Dict[str, Any]:
    ud = fitted["data"]
    return {
        "data": ud.source,
        "test": ud.test_source or None,
        "label_column": ud.label_name,
        "n_train": ud.n_train,
        "n_features": int(ud.X_train.shape[1]),
        "model": repr(fitted["model"]),
        "damping": args.damping,
        "standardize": bool(args.standardize),
        # Parquet data on Dask: where it ran and from how many files
        **({"files": len(ud.files), "dask": fitted["dask"]} if fitted.get("dask") else {}),
    }


def _common_payload(command: str, args: argparse.Namespace, fitted: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON fields that explain and mislabels share."""
    return {
        "command": command,
        "settings": _settings(args, fitted),
        "model_fit": fitted["fit_quality"],
        "notes": fitted["notes"],
        "warnings": fitted["warnings"],
    }


def explain_points(fitted: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """Per test point: its label, prediction, loss and the top-k helpful and harmful training
    rows (train_index in the source file, label, influence = up_loss, loss change if removed =
    −influence/n)."""
    ud, model, inf = fitted["data"], fitted["model"], fitted["inf"]
    Xt, yt = fitted["X_test"], ud.y_test
    n = inf.n_train
    with _numerics_guard(fitted["args"], ud, fitted["n_params"]):
        tk = inf.top_k(Xt, yt, k=min(k, n))
        pred = model.predict(Xt)
        loss = model.loss(Xt, yt)
    _require_finite(fitted, "influence values", tk.helpful_scores, tk.harmful_scores)
    _require_finite(fitted, "test losses", loss)
    if pred.dtype.kind == "f":  # ridge: the predictions are numbers too
        _require_finite(fitted, "test predictions", pred)
    train_row = _train_row_lookup(fitted, np.concatenate([tk.helpful_idx.ravel(), tk.harmful_idx.ravel()]))
    points = []
    for j in range(Xt.shape[0]):
        pt: Dict[str, Any] = {
            "test_index": int(ud.test_rows[j]),
            "label": _label(yt[j]),
            "prediction": _label(pred[j]),
            "loss": float(loss[j]),
        }
        for kind, idx, sc in (
            ("helpful", tk.helpful_idx[j], tk.helpful_scores[j]),
            ("harmful", tk.harmful_idx[j], tk.harmful_scores[j]),
        ):
            pt[kind] = [
                {
                    "rank": r,
                    "train_index": train_row[int(i)][0],
                    "train_label": train_row[int(i)][1],
                    "influence": float(s),
                    "loss_change_if_removed": float(-s / n),
                }
                for r, (i, s) in enumerate(zip(idx, sc), start=1)
            ]
        points.append(pt)
    return points


def _train_row_lookup(fitted: Dict[str, Any], idx: np.ndarray) -> Dict[int, Tuple[int, Any]]:
    """Training position -> (row index in the source, label) for the positions ``idx``; for
    Parquet data the labels of these rows only are fetched from the workers."""
    ud = fitted["data"]
    if not fitted.get("dask"):
        return {int(i): (int(ud.train_rows[int(i)]), _label(ud.y_train[int(i)])) for i in idx}
    import dask

    wanted = np.unique(np.asarray(idx, dtype=np.int64))
    (labels,) = dask.compute(ud.y_train[wanted])
    rows = ud.train_rows_of(wanted)
    return {int(i): (int(r), _label(v)) for i, r, v in zip(wanted, rows, labels)}


def _explain_table(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The points flattened to the rows of explain.csv."""
    return [
        {
            "test_index": pt["test_index"],
            "test_label": pt["label"],
            "test_prediction": pt["prediction"],
            "test_loss": pt["loss"],
            "kind": kind,
            **e,
        }
        for pt in points
        for kind in ("helpful", "harmful")
        for e in pt[kind]
    ]


def _cmd_explain(args: argparse.Namespace) -> int:
    targets = _output_targets(args, "explain")
    with contextlib.ExitStack() as stack:  # Parquet DATA: the Dask cluster of the run
        return _explain(args, targets, _fit(args, need_test=True, stack=stack))


def _explain(
    args: argparse.Namespace, targets: List[Tuple[str, pathlib.Path]], fitted: Dict[str, Any]
) -> int:
    n = fitted["inf"].n_train
    points = explain_points(fitted, args.k)
    payload = {
        **_common_payload("explain", args, fitted),
        "sign_convention": (
            "influence = I_up,loss(z_train, z_test): negative = helpful (upweighting the training "
            "row lowers the test loss), positive = harmful; loss_change_if_removed = "
            "-influence/n, the predicted change of the test loss if the row were removed"
        ),
        "k": min(args.k, n),
        "test_points": points,
    }
    if not args.quiet:
        _print_explain(points, fitted, args, sys.stdout)
    for p in _write_outputs(targets, _EXPLAIN_COLUMNS, _explain_table(points), payload):
        print(f"wrote {p}")
    if args.report:
        path = _explain_report(args, fitted, points, payload)
        print(f"report: {path.resolve()}")
    return EXIT_OK


def _print_explain(
    points: List[Dict[str, Any]], fitted: Dict[str, Any], args: argparse.Namespace, out: TextIO
) -> None:
    ud, n = fitted["data"], fitted["inf"].n_train
    print(
        f"{fitted['model']!r} on {ud.source}: {n} training rows, {len(points)} test point(s) "
        f"from {ud.test_source}",
        file=out,
    )
    print(_fit_line(fitted["fit_quality"]), file=out)
    print("influence < 0: helpful, > 0: harmful; loss change if removed = -influence/n", file=out)
    cols = ["rank", "train row", "label", "influence", "loss change if removed"]
    for pt in points[: args.show]:
        print(
            f"\ntest point {pt['test_index']} (label {pt['label']}, predicted "
            f"{pt['prediction']}, loss {pt['loss']:.4g})",
            file=out,
        )
        for kind, what in (
            ("helpful", "removing them would raise this test loss"),
            ("harmful", "removing them would lower this test loss"),
        ):
            print(f" {kind} ({what}):", file=out)
            print(
                text_table(
                    cols,
                    [
                        [
                            e["rank"],
                            e["train_index"],
                            e["train_label"],
                            e["influence"],
                            e["loss_change_if_removed"],
                        ]
                        for e in pt[kind]
                    ],
                    indent="   ",
                ),
                file=out,
            )
    if len(points) > args.show:
        print(
            f"\n... {len(points) - args.show} more test point(s) in the CSV/JSON output "
            f"(--show N prints more)",
            file=out,
        )


def _max_rows(args: argparse.Namespace, fitted: Dict[str, Any]) -> Optional[int]:
    """Rows ranked in mislabels' files: --max-rows (0: all), by default all (in-memory data) or
    DEFAULT_PARQUET_MAX_ROWS (Parquet data)."""
    limit = getattr(args, "max_rows", None)
    if limit is None:
        return DEFAULT_PARQUET_MAX_ROWS if fitted.get("dask") else None
    return limit or None


def mislabel_rows(fitted: Dict[str, Any], max_rows: Optional[int] = None) -> List[Dict[str, Any]]:
    """Training rows ranked by |self-influence|, most suspicious first: every row, or the first
    ``max_rows``."""
    if fitted.get("dask"):
        return _mislabel_rows_dask(fitted, max_rows)
    ud, model, inf = fitted["data"], fitted["model"], fitted["inf"]
    with _numerics_guard(fitted["args"], ud, fitted["n_params"]):
        self_influence = np.asarray(inf.self_influence(), dtype=np.float64).ravel()
        loss = model.loss(fitted["X"], ud.y_train)
        pred = model.predict(fitted["X"])
    _require_finite(fitted, "self-influence values", self_influence)
    _require_finite(fitted, "training losses", loss)
    # the ranking of applications.find_mislabeled: |self-influence| descending, ties by index
    order = np.argsort(-np.abs(self_influence), kind="stable")[:max_rows]
    n = inf.n_train
    rows = []
    for r, i in enumerate(order, start=1):
        i, si = int(i), self_influence[i]
        rows.append(
            {
                "rank": r,
                "train_index": int(ud.train_rows[i]),
                "label": _label(ud.y_train[i]),
                "prediction": _label(pred[i]),
                "training_loss": float(loss[i]),
                "self_influence": float(si),
                "loss_change_if_removed": float(-si / n),
            }
        )
    return rows


def _cmd_mislabels(args: argparse.Namespace) -> int:
    targets = _output_targets(args, "mislabels")
    with contextlib.ExitStack() as stack:  # Parquet DATA: the Dask cluster of the run
        return _mislabels(args, targets, _fit(args, need_test=False, stack=stack))


def _mislabels(
    args: argparse.Namespace, targets: List[Tuple[str, pathlib.Path]], fitted: Dict[str, Any]
) -> int:
    ud = fitted["data"]
    rows = mislabel_rows(fitted, _max_rows(args, fitted))
    payload: Dict[str, Any] = {
        **_common_payload("mislabels", args, fitted),
        "sign_convention": (
            "self_influence = I_up,loss(z, z) <= 0; rows are ranked by its magnitude (most "
            "suspicious first); loss_change_if_removed = -self_influence/n, the predicted rise "
            "of the row's own loss if it were removed"
        ),
        "rows": rows,
    }
    if len(rows) < fitted["inf"].n_train:
        payload["notes"] = payload["notes"] + [
            f"the files rank the {len(rows):,} most suspicious of the {fitted['inf'].n_train:,} training rows "
            f"(--max-rows N; 0: every row)"
        ]
    if not args.quiet:
        k = min(args.k, len(rows))
        print(f"{fitted['model']!r} on {ud.source}")
        print(_fit_line(fitted["fit_quality"]))
        n = fitted["inf"].n_train
        ranked = (
            f"{len(rows)} training rows"
            if len(rows) == n
            else f"the {len(rows):,} most suspicious of {n:,} training rows"
        )
        print(f"{ranked} ranked by |self-influence| (most suspicious first); top {k}:")
        cols = ["rank", "train row", "label", "prediction", "training loss", "self-influence"]
        print(
            text_table(
                cols,
                [
                    [
                        r["rank"],
                        r["train_index"],
                        r["label"],
                        r["prediction"],
                        r["training_loss"],
                        r["self_influence"],
                    ]
                    for r in rows[:k]
                ],
            )
        )
    for p in _write_outputs(targets, _MISLABEL_COLUMNS, rows, payload):
        print(f"wrote {p}")
    if args.report:
        path = _mislabel_report(args, fitted, rows, payload)
        print(f"report: {path.resolve()}")
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# HTML reports for the user's data
# ------------------------------------------------------------------------------------------------
def _new_figure(size: tuple) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "--report needs matplotlib: pip install matplotlib (or 'pyinfluence[demo]')"
        ) from None
    return Figure(figsize=size, layout="constrained")


#: Feature columns shown beside the flagged rows in the reports (the first ones of a wider table).
REPORT_MAX_FEATURES = 20
#: Test points with a table of their own in the explain report (the rest: results.json).
REPORT_MAX_TEST_TABLES = 50


def _plain_text(s: Any) -> str:
    """A string for a matplotlib label: '$' escaped so that user text is never read as mathtext."""
    return str(s).replace("$", r"\$")


def _settings_rows(payload: Dict[str, Any]) -> List[List[Any]]:
    return [[k.replace("_", " "), v] for k, v in payload["settings"].items()]


def _fit_sentence(quality: Dict[str, Any]) -> str:
    """'Model fit: training accuracy 0.9333 (90 rows); test accuracy 1 (6 points).' (numbers by
    format_value; 'undefined' for an R^2 of targets that do not vary)."""

    def shown(v: Optional[float]) -> str:
        return "undefined" if v is None else format_value(v)

    metric = quality["metric"]
    text = f"Model fit: training {metric} {shown(quality['train'])} ({quality['n_train']} rows)"
    if quality["n_test"]:
        text += f"; test {metric} {shown(quality['test'])} ({quality['n_test']} points)"
    what = (
        "accuracy = the share of rows whose predicted class is their label"
        if metric == "accuracy"
        else "R^2 = 1 - sum (y - prediction)^2 / sum (y - mean y)^2"
    )
    return f"{text}; {what}."


def _feature_columns(fitted: Dict[str, Any]) -> Tuple[List[str], str]:
    """(names of the feature columns the report shows, a sentence when some are left out)."""
    names = list(fitted["data"].feature_names)
    if len(names) <= REPORT_MAX_FEATURES:
        return names, ""
    return names[:REPORT_MAX_FEATURES], (
        f"The tables show the first {REPORT_MAX_FEATURES} of the {len(names)} feature columns; the "
        f"rest are in the data file (rows as numbered here)."
    )


def _train_features(fitted: Dict[str, Any], rows: Sequence[int], d: int) -> np.ndarray:
    """(len(rows), d): the first ``d`` feature values, as read (before --standardize), of the
    training rows numbered ``rows`` in the source. Parquet data: fetched from the workers by
    position (row minus the held-out rows before it)."""
    ud = fitted["data"]
    rows_a = np.asarray(rows, dtype=np.int64)
    if rows_a.size == 0:
        return np.zeros((0, d))
    if fitted.get("dask"):
        import dask

        pos = rows_a - np.searchsorted(ud.held_out, rows_a)
        wanted, back = np.unique(pos, return_inverse=True)
        (vals,) = dask.compute(ud.X_train[wanted][:, :d])
        return np.asarray(vals, dtype=np.float64)[back]
    where = {int(r): i for i, r in enumerate(ud.train_rows)}
    return np.asarray(ud.X_train, dtype=np.float64)[[where[int(r)] for r in rows_a], :d]


def _report_with_settings(
    args: argparse.Namespace, fitted: Dict[str, Any], payload: Dict[str, Any], command: str
) -> Any:
    """A new HTML report for ``command`` on the user's data, opening with the model's fit and
    the table of settings."""
    from pyinfluence.cli.report import Report

    rep = Report(
        args.report,
        f"pyinfluence {command}: {pathlib.Path(fitted['data'].source).name}",
        intro=payload["sign_convention"] + ".",
    )
    sec = rep.section("Setting", "setting")
    quality = payload["model_fit"]
    sec.text(_fit_sentence(quality))
    for message in payload["warnings"]:
        sec.note(f"Warning: {message}")
    for message in payload["notes"]:
        sec.note(f"Note: {message}")
    sec.table(
        ["data", quality["metric"], "points"],
        [["training", quality["train"], quality["n_train"]]]
        + ([["test", quality["test"], quality["n_test"]]] if quality["n_test"] else []),
        caption="Model fit",
    )
    sec.table(["setting", "value"], _settings_rows(payload))
    return rep


def _explain_report(
    args: argparse.Namespace,
    fitted: Dict[str, Any],
    points: List[Dict[str, Any]],
    payload: Dict[str, Any],
) -> pathlib.Path:
    rep = _report_with_settings(args, fitted, payload, "explain")
    show = points[:12]
    fig = _new_figure((9.0, 1.0 + 2.4 * len(show)))
    axs = fig.subplots(len(show), 1, squeeze=False)[:, 0]
    for a, pt in zip(axs, show):
        entries = pt["helpful"] + pt["harmful"]
        vals = [e["influence"] for e in entries]
        names = [_plain_text(f"row {e['train_index']} (y={e['train_label']})") for e in entries]
        y = np.arange(len(entries))
        a.barh(y, vals, color=["C0" if v < 0 else "C3" for v in vals])
        a.set_yticks(y)
        a.set_yticklabels(names, fontsize=9)
        a.tick_params(axis="x", labelsize=9)
        a.invert_yaxis()
        a.axvline(0, color="k", lw=0.6)
        a.set_title(
            _plain_text(f"test point {pt['test_index']} (label {pt['label']}, predicted {pt['prediction']})"),
            fontsize=10,
        )
        a.set_xlabel("influence (negative = helpful)", fontsize=9)
    sec = rep.section("Most helpful and harmful training rows", "top")
    sec.figure(
        fig,
        "explain_top",
        "Influence of the top helpful (blue) and harmful (red) training rows"
        + (f" for the first {len(show)} test points" if len(points) > len(show) else ""),
    )
    features, left_out = _feature_columns(fitted)
    d = len(features)
    tables = points[:REPORT_MAX_TEST_TABLES]
    sec.text(
        "Each table: the test point's own feature values first, then its most helpful and harmful "
        "training rows with theirs (values as read, before any --standardize)."
        + (f" {left_out}" if left_out else "")
    )
    flagged = [e["train_index"] for pt in tables for kind in ("helpful", "harmful") for e in pt[kind]]
    values = _train_features(fitted, flagged, d)
    test_values = np.asarray(fitted["data"].X_test, dtype=np.float64)[:, :d]
    at = 0
    for j, pt in enumerate(tables):
        body: List[List[Any]] = [
            ["test point", None, pt["test_index"], pt["label"], None, None, *test_values[j]]
        ]
        for kind in ("helpful", "harmful"):
            for e in pt[kind]:
                body.append(
                    [
                        kind,
                        e["rank"],
                        e["train_index"],
                        e["train_label"],
                        e["influence"],
                        e["loss_change_if_removed"],
                        *values[at],
                    ]
                )
                at += 1
        sec.table(
            ["kind", "rank", "row", "label", "influence", "loss change if removed", *features],
            body,
            caption=f"test point {pt['test_index']}: label {pt['label']}, predicted "
            f"{pt['prediction']}, loss {format_value(pt['loss'])}",
        )
    if len(points) > len(tables):
        sec.text(f"{len(points) - len(tables)} more test points are in results.json.")
    return rep.write(payload)


def _mislabel_report(
    args: argparse.Namespace,
    fitted: Dict[str, Any],
    rows: List[Dict[str, Any]],
    payload: Dict[str, Any],
) -> pathlib.Path:
    rep = _report_with_settings(args, fitted, payload, "mislabels")
    mags = np.array([abs(r["self_influence"]) for r in rows])
    fig = _new_figure((6.0, 3.6))
    a = fig.subplots()
    ranks = np.arange(1, mags.size + 1)
    a.plot(ranks, mags, color="C0", lw=1.2)
    k = min(args.k, mags.size)
    a.scatter(ranks[:k], mags[:k], s=10, color="C3", zorder=3, label=f"top {k} (-k)")
    if np.all(mags > 0):
        a.set_yscale("log")
    a.set_xlabel("rank (most suspicious first)")
    a.set_ylabel("|self-influence|")
    a.legend(fontsize=9)
    sec = rep.section("Training rows ranked by self-influence", "ranking")
    n = fitted["inf"].n_train
    caption = (
        "Magnitude of self-influence of every training row, sorted."
        if len(rows) == n
        else f"Magnitude of self-influence of the {len(rows)} most suspicious of the {n} training rows "
        f"(--max-rows), sorted."
    )
    sec.figure(fig, "self_influence", caption)
    features, left_out = _feature_columns(fitted)
    top = rows[:k]
    values = _train_features(fitted, [r["train_index"] for r in top], len(features))
    sec.text(
        f"The {k} most suspicious rows (-k {args.k}) with their feature values as read (before any "
        f"--standardize); every ranked row is in results.json." + (f" {left_out}" if left_out else "")
    )
    sec.table(
        ["rank", "row", "label", "prediction", "training loss", "self-influence", *features],
        [
            [
                r["rank"],
                r["train_index"],
                r["label"],
                r["prediction"],
                r["training_loss"],
                r["self_influence"],
                *v,
            ]
            for r, v in zip(top, values)
        ],
        caption=f"The {k} most suspicious rows",
    )
    return rep.write(payload)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
