"""The ``pyinfluence`` command line (also ``python -m pyinfluence``).

Subcommands:

- ``pyinfluence demo [--quick] [--out DIR] [--seed N]``: the paper's applications on
  scikit-learn's bundled digits; writes a report folder and prints the path of its report.html.
- ``pyinfluence explain DATA [--label COL] [--test FILE | --test-indices LIST] [--model ...]``:
  for each test point, the training rows that helped and harmed its prediction most.
- ``pyinfluence mislabels DATA [--label COL] [--model ...]``: training rows ranked by
  self-influence, most suspicious (likely mislabeled) first.
- ``pyinfluence bench [--quick] [--tasks LIST] [--n N --d D] [--repeats R] [--out DIR] [--peers]
  [--peer-python PATH] [--scaling] [--json]``: accuracy against time of every solver setting on
  standard tasks (see :mod:`pyinfluence.bench`); writes DIR/bench.json, bench.md and
  bench_accuracy_vs_time.png and prints the table.

Signs follow Koh & Liang (2017): ``influence`` is I_up,loss(z, z_test) — negative = helpful
(upweighting the training row lowers the test loss), positive = harmful; removing the row changes
the test loss by about −influence/n (``loss_change_if_removed``).

Errors in the input (missing file or column, non-numeric values, NaN, a single class, mismatched
feature counts, ...) end the program with a one-line message on stderr and exit status 1; usage
errors with status 2. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import pathlib
import sys
from typing import Any, Dict, List, Optional, Sequence, TextIO

import numpy as np

__all__ = ["main", "build_parser"]

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


class CLIError(ValueError):
    """A user-facing error of the command line (one line)."""


# ================================================================================================
# argument parsing
# ================================================================================================
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _nonnegative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return v


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
            help="a CSV file with a header row (label column: --label) or an .npz "
            "with X_train, y_train (and optionally X_test, y_test)",
        )
        sp.add_argument(
            "--label",
            metavar="COL",
            help="name (or 0-based index) of the label column of a CSV file",
        )
        sp.add_argument(
            "--test",
            metavar="FILE",
            help="test points: a CSV with the same columns, or an .npz with X_test/y_test (or X/y)",
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
            "binary; ridge: ridge regression)",
        )
        sp.add_argument(
            "--l2",
            type=_nonnegative_float,
            default=1e-3,
            help="L2 coefficient of the training objective mean loss + l2/2 |theta|^2 "
            "(default 1e-3)",
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
            help="standardise each feature with the training mean and std first",
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
                else " shown on screen (default 20; the files rank every row)"
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
        sp.add_argument("--out", metavar="DIR", help=f"write {name}.csv and {name}.json into DIR")
        sp.add_argument("--out-csv", metavar="FILE", help="write the table as CSV")
        sp.add_argument("--out-json", metavar="FILE", help="write the results as JSON")
        sp.add_argument("--report", metavar="DIR", help="write an HTML report into DIR")
        sp.add_argument("--quiet", action="store_true", help="no table on screen")
        sp.set_defaults(func=_cmd_explain if name == "explain" else _cmd_mislabels)
    _add_bench_parser(sub, common)
    return parser


def _version() -> str:
    from . import __version__

    return str(__version__)


# ================================================================================================
# main
# ================================================================================================
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        msg = f"{exc.filename}: {exc.strerror}"
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status."""
    from .errors import PyInfluenceError

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


# ================================================================================================
# bench
# ================================================================================================
def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return v


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
    bench.add_argument("--quick", action="store_true",
                       help="small grid, 1 repeat, 20 test points, no CNN: about a minute or two "
                            "on 2 cores")
    bench.add_argument("--tasks", metavar="LIST",
                       help="comma-separated tasks (default: all; quick: all but digits-cnn): "
                            "digits-logreg, digits-svm, digits-mlp, digits-cnn, synthetic-linear")
    bench.add_argument("--solvers", metavar="LIST",
                       help="only these solver families, e.g. linear-exact,exact,cg,block_cg,lissa")
    bench.add_argument("--n", type=_positive_int, help="synthetic-linear: training points "
                       "(default 20000; quick 5000)")
    bench.add_argument("--d", type=_positive_int, help="synthetic-linear: features "
                       "(default 200; quick 100)")
    bench.add_argument("--m", type=_positive_int, help="test points per task (default: 50, "
                       "CNN 10; quick 20, CNN 5)")
    bench.add_argument("--repeats", type=_positive_int,
                       help="timed runs per setting, median reported (default 3; quick 1)")
    bench.add_argument("--budget", type=_positive_float, metavar="SECONDS",
                       help="stop repeating a setting after this many seconds (default 30; "
                            "quick 10)")
    bench.add_argument("--seed", type=_nonnegative_int, default=0,
                       help="data split / generator and initial weights (default 0)")
    bench.add_argument("--out", default="pyinfluence-bench", metavar="DIR",
                       help="output folder (default: ./pyinfluence-bench)")
    bench.add_argument("--peers", nargs="?", const="captum,pydvl", default=None, metavar="LIST",
                       help="also run other influence libraries when installed (default list: "
                            "captum,pydvl); skipped cleanly when absent")
    bench.add_argument("--peer-python", metavar="PATH",
                       help="python interpreter of a separate environment holding the peers")
    bench.add_argument("--peer-timeout", type=_positive_float, default=600.0, metavar="SECONDS",
                       help="time limit per peer run (default 600)")
    bench.add_argument("--scaling", action="store_true",
                       help="also run the scaling sweep of the exact linear path (time against "
                            "n and d)")
    bench.add_argument("--no-loo", action="store_true",
                       help="skip the leave-one-out retraining check on linear tasks")
    bench.add_argument("--loo-deep", action="store_true",
                       help="also retrain the deep tasks for the leave-one-out check (slow)")
    bench.add_argument("--no-plot", action="store_true", help="do not draw the figure")
    bench.add_argument("--threads", type=_nonnegative_int, default=1,
                       help="threads for torch, pyinfluence's core and (with threadpoolctl) the "
                            "BLAS/OpenMP pools during the run (default 1: on a shared 2-core "
                            "machine, 2-thread pools waiting on each other made the quick run 3x "
                            "slower; 0 = leave the libraries' defaults)")
    bench.add_argument("--json", action="store_true",
                       help="print the JSON document instead of the table")
    bench.add_argument("--quiet", action="store_true", help="no progress messages on stderr")
    bench.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    from .bench import run_bench

    t0 = time.perf_counter()
    limits: Any = None
    restore: Any = None
    if args.threads:
        import torch

        from . import get_num_threads, set_num_threads

        before = (torch.get_num_threads(), get_num_threads())
        restore = lambda: (torch.set_num_threads(before[0]), set_num_threads(before[1]))  # noqa: E731
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
    if args.json:
        print(report.to_json())
    else:
        print(report.table(), end="")
        print(f"wall time {time.perf_counter() - t0:.1f} s")
        for key in ("json", "markdown", "plot", "scaling_plot"):
            if key in paths:
                print(f"{key}: {paths[key].resolve()}")
    return EXIT_OK


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
    from .demo import run_demo

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
def _fit(args: argparse.Namespace, need_test: bool) -> Dict[str, Any]:
    """Read the data, fit the model family, build the LinearInfluence."""
    import warnings

    from . import LinearInfluence, LogisticRegression, RidgeRegression, SmoothHingeSVM
    from ._userdata import check_classes, load_user_data

    ud = load_user_data(
        args.data,
        label=args.label,
        test=args.test,
        test_indices=args.test_indices,
        numeric_labels=args.model == "ridge",
    )
    if need_test and not ud.has_test:
        raise CLIError(
            f"{ud.source} has no test points: pass --test FILE, --test-indices LIST (rows held "
            f"out of training) or an .npz with X_test and y_test"
        )
    if args.model != "ridge":
        check_classes(ud.y_train, args.model, ud.source)
    X, Xt = ud.X_train, ud.X_test
    scaling = None
    if args.standardize:
        mu, sd = X.mean(axis=0), X.std(axis=0)
        sd[sd == 0] = 1.0
        X = (X - mu) / sd
        Xt = None if Xt is None else (Xt - mu) / sd
        scaling = {"mean": mu, "std": sd}
    model = {"logistic": LogisticRegression, "svm": SmoothHingeSVM, "ridge": RidgeRegression}[
        args.model
    ](l2=args.l2)
    model.fit(X, ud.y_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fit is exact; a warning here is not actionable
        inf = LinearInfluence(model, X, ud.y_train, damping=args.damping)
    return {"data": ud, "X": X, "X_test": Xt, "model": model, "inf": inf, "scaling": scaling}


def _label(v: Any) -> Any:
    """A label as plain Python (for JSON and CSV)."""
    return v.item() if hasattr(v, "item") else v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [[str(c) for c in columns]] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(columns))]
    lines = []
    for k, r in enumerate(cells):
        lines.append(indent + "  ".join(c.rjust(w) if k else c.ljust(w) for c, w in zip(r, widths)))
    return "\n".join(lines)


def _write_outputs(
    args: argparse.Namespace,
    name: str,
    columns: Sequence[str],
    rows: Sequence[Dict[str, Any]],
    payload: Dict[str, Any],
) -> List[pathlib.Path]:
    from .report import jsonable

    targets: List[tuple] = []
    if args.out:
        d = pathlib.Path(args.out)
        if d.exists() and not d.is_dir():
            raise CLIError(f"--out {d}: exists and is not a folder")
        d.mkdir(parents=True, exist_ok=True)
        targets += [("csv", d / f"{name}.csv"), ("json", d / f"{name}.json")]
    if args.out_csv:
        targets.append(("csv", pathlib.Path(args.out_csv)))
    if args.out_json:
        targets.append(("json", pathlib.Path(args.out_json)))
    written = []
    for kind, path in targets:
        if path.parent and not path.parent.exists():
            raise CLIError(f"{path}: the folder {path.parent} does not exist")
        if kind == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({k: r[k] for k in columns})
            path.write_text(buf.getvalue(), encoding="utf-8")
        else:
            path.write_text(
                json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n", encoding="utf-8"
            )
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
    }


def explain_points(fitted: Dict[str, Any], k: int) -> List[Dict[str, Any]]:
    """Per test point: its label, prediction, loss and the top-k helpful and harmful training
    rows (train_index in the source file, label, influence = up_loss, loss change if removed =
    −influence/n)."""
    ud, model, inf = fitted["data"], fitted["model"], fitted["inf"]
    Xt, yt = fitted["X_test"], ud.y_test
    n = inf.n_train
    tk = inf.top_k(Xt, yt, k=min(k, n))
    pred = model.predict(Xt)
    loss = model.loss(Xt, yt)
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
                    "train_index": int(ud.train_rows[int(i)]),
                    "train_label": _label(ud.y_train[int(i)]),
                    "influence": float(s),
                    "loss_change_if_removed": float(-s / n),
                }
                for r, (i, s) in enumerate(zip(idx, sc), start=1)
            ]
        points.append(pt)
    return points


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
    fitted = _fit(args, need_test=True)
    n = fitted["inf"].n_train
    points = explain_points(fitted, args.k)
    payload = {
        "command": "explain",
        "settings": _settings(args, fitted),
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
    for p in _write_outputs(args, "explain", _EXPLAIN_COLUMNS, _explain_table(points), payload):
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
                _table(
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
                    "   ",
                ),
                file=out,
            )
    if len(points) > args.show:
        print(
            f"\n... {len(points) - args.show} more test point(s) in the CSV/JSON output "
            f"(--show N prints more)",
            file=out,
        )


def mislabel_rows(fitted: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every training row ranked by |self-influence|, most suspicious first."""
    ud, model, inf = fitted["data"], fitted["model"], fitted["inf"]
    from .applications import find_mislabeled

    ranking = find_mislabeled(inf)
    n = inf.n_train
    loss = model.loss(fitted["X"], ud.y_train)
    pred = model.predict(fitted["X"])
    rows = []
    for r, (i, si) in enumerate(zip(ranking.indices, ranking.self_influence), start=1):
        i = int(i)
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
    fitted = _fit(args, need_test=False)
    ud = fitted["data"]
    rows = mislabel_rows(fitted)
    payload: Dict[str, Any] = {
        "command": "mislabels",
        "settings": _settings(args, fitted),
        "sign_convention": (
            "self_influence = I_up,loss(z, z) <= 0; rows are ranked by its magnitude (most "
            "suspicious first); loss_change_if_removed = -self_influence/n, the predicted rise "
            "of the row's own loss if it were removed"
        ),
        "rows": rows,
    }
    if ud.has_test:
        pred = fitted["model"].predict(fitted["X_test"])
        if args.model != "ridge":
            payload["test_accuracy"] = float(np.mean(pred == ud.y_test))
    if not args.quiet:
        k = min(args.k, len(rows))
        print(
            f"{fitted['model']!r} on {ud.source}: {len(rows)} training rows ranked by "
            f"|self-influence| (most suspicious first); top {k}:"
        )
        cols = ["rank", "train row", "label", "prediction", "training loss", "self-influence"]
        print(
            _table(
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
    for p in _write_outputs(args, "mislabels", _MISLABEL_COLUMNS, rows, payload):
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


def _settings_rows(payload: Dict[str, Any]) -> List[List[Any]]:
    return [[k.replace("_", " "), "–" if v is None else v] for k, v in payload["settings"].items()]


def _report_with_settings(
    args: argparse.Namespace, fitted: Dict[str, Any], payload: Dict[str, Any], command: str
) -> Any:
    """A new HTML report for ``command`` on the user's data, opening with the table of settings."""
    from .report import Report

    rep = Report(
        args.report,
        f"pyinfluence {command}: {pathlib.Path(fitted['data'].source).name}",
        intro=payload["sign_convention"] + ".",
    )
    rep.section("Setting", "setting").table(["setting", "value"], _settings_rows(payload))
    return rep


def _explain_report(
    args: argparse.Namespace,
    fitted: Dict[str, Any],
    points: List[Dict[str, Any]],
    payload: Dict[str, Any],
) -> pathlib.Path:
    rep = _report_with_settings(args, fitted, payload, "explain")
    show = points[:12]
    fig = _new_figure((9.0, 1.0 + 2.2 * len(show)))
    axs = fig.subplots(len(show), 1, squeeze=False)[:, 0]
    for a, pt in zip(axs, show):
        entries = pt["helpful"] + pt["harmful"]
        vals = [e["influence"] for e in entries]
        names = [f"row {e['train_index']} (y={e['train_label']})" for e in entries]
        y = np.arange(len(entries))
        a.barh(y, vals, color=["C0" if v < 0 else "C3" for v in vals])
        a.set_yticks(y)
        a.set_yticklabels(names, fontsize=7)
        a.invert_yaxis()
        a.axvline(0, color="k", lw=0.6)
        a.set_title(
            f"test point {pt['test_index']} (label {pt['label']}, predicted {pt['prediction']})",
            fontsize=9,
        )
        a.set_xlabel("influence (negative = helpful)", fontsize=8)
    sec = rep.section("Most helpful and harmful training rows", "top")
    sec.figure(
        fig,
        "explain_top",
        "Influence of the top helpful (blue) and harmful (red) training rows"
        + (f" for the first {len(show)} test points" if len(points) > len(show) else ""),
    )
    for pt in points[:50]:
        sec.table(
            ["kind", "rank", "train row", "label", "influence", "loss change if removed"],
            [
                [
                    kind,
                    e["rank"],
                    e["train_index"],
                    e["train_label"],
                    e["influence"],
                    e["loss_change_if_removed"],
                ]
                for kind in ("helpful", "harmful")
                for e in pt[kind]
            ],
            caption=f"test point {pt['test_index']}: label {pt['label']}, predicted "
            f"{pt['prediction']}, loss {pt['loss']:.4g}",
        )
    if len(points) > 50:
        sec.text(f"{len(points) - 50} more test points are in results.json.")
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
    a.scatter(ranks[:k], mags[:k], s=10, color="C3", zorder=3, label=f"top {k}")
    if np.all(mags > 0):
        a.set_yscale("log")
    a.set_xlabel("rank (most suspicious first)")
    a.set_ylabel("|self-influence|")
    a.legend(fontsize=8)
    sec = rep.section("Training rows ranked by self-influence", "ranking")
    sec.figure(fig, "self_influence", "Magnitude of self-influence of every training row, sorted.")
    sec.table(
        ["rank", "train row", "label", "prediction", "training loss", "self-influence"],
        [
            [
                r["rank"],
                r["train_index"],
                r["label"],
                r["prediction"],
                r["training_loss"],
                r["self_influence"],
            ]
            for r in rows[: max(k, 20)]
        ],
        caption=f"The {max(k, 20) if len(rows) >= 20 else len(rows)} most suspicious rows",
    )
    return rep.write(payload)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
