"""Study: what LiSSA's checks cost (convergence and negative-curvature checks): the current LiSSA
against the LiSSA of an earlier commit, side by side in one process on the benchmark's digits MLP and
CNN tasks.

The earlier commit's ``pyinfluence/solvers.py`` (default: the commit before the checks, c7de123) is
loaded from the source checkout's git history as a module of its own; both solvers run on the same
HessianOperator, interleaved (old/new, then new/old), three repeats each. Reported (a markdown table
on stdout): median wall time of prepare + one solve of 50 test gradients, the preparation time of the
last repeat, and the relative error of each solution against CG at tol 1e-10.

    python -m pyinfluence.bench.studies.lissa_checks [--commit REV] [--tasks digits-mlp,digits-cnn]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import warnings
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

import pyinfluence
from pyinfluence._formatting import markdown_table
from pyinfluence.bench.studies.results_file import repo_root
from pyinfluence.bench.tasks import make_task
from pyinfluence.torch import solvers as current


def load_old_solvers(rev: str) -> ModuleType:
    """``pyinfluence/solvers.py`` of commit ``rev``, imported as ``pyinfluence._solvers_before``."""
    root = repo_root() or os.getcwd()
    source = subprocess.run(
        ["git", "-C", str(root), "show", f"{rev}:pyinfluence/solvers.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(source)
    spec = importlib.util.spec_from_file_location("pyinfluence._solvers_before", fh.name)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the solvers of {rev} from {fh.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # relative imports resolve in the installed pyinfluence package
    spec.loader.exec_module(module)
    return module


def compare(name: str, old: ModuleType, depths: Sequence[int]) -> List[List[str]]:
    """One table row per LiSSA depth on the task ``name``."""
    task = make_task(name)
    inf = pyinfluence.TorchInfluence(
        task.model,
        task.loss_fn,
        (task.X_train, task.y_train),
        l2=task.l2,
        damping=task.damping,
        optimum_tol=None,
        solver="cg",
    )
    X_test = torch.as_tensor(task.X_test)[:50]
    X_test = X_test.to(inf.dtype) if X_test.is_floating_point() else X_test
    V = inf._fm.per_example_grads(X_test, torch.as_tensor(task.y_test)[:50]).T.contiguous()
    op = inf.operator
    ref = current.CG(tol=1e-10).prepare(op, task.damping).solve(V).solution
    rows = []
    for depth in depths:
        times: Dict[str, List[float]] = {"before": [], "now": []}
        prep: Dict[str, float] = {}
        err: Dict[str, float] = {}
        for rep in range(3):
            order = [("before", old), ("now", current)]
            for label, module in order if rep % 2 == 0 else order[::-1]:
                kw: Dict[str, Any] = dict(depth=depth, repeats=1, batch_size=128, seed=0)
                if label == "now":
                    kw["raise_on_nonconvergence"] = False
                t = time.perf_counter()
                prepared = module.LiSSA(**kw).prepare(op, task.damping)
                out = prepared.solve(V)
                times[label].append(time.perf_counter() - t)
                prep[label] = prepared.prepare_time_s
                err[label] = float(torch.linalg.norm(out.solution - ref) / torch.linalg.norm(ref))
        tb, tn = float(np.median(times["before"])), float(np.median(times["now"]))
        rows.append(
            [
                name,
                str(depth),
                f"{tb:.2f} s ({prep['before']:.2f} s)",
                f"{tn:.2f} s ({prep['now']:.2f} s)",
                f"{tn / tb:.2f}",
                f"{err['before']:.3g} / {err['now']:.3g}",
            ]
        )
    return rows


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="c7de123")
    ap.add_argument("--tasks", default="digits-mlp,digits-cnn")
    ap.add_argument("--depths", default="100,300,1000")
    args = ap.parse_args(argv)
    old = load_old_solvers(args.commit)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    depths = [int(d) for d in args.depths.split(",")]
    rows = [row for name in args.tasks.split(",") for row in compare(name, old, depths)]
    print(
        markdown_table(
            [
                "task",
                "depth",
                "before: total (prepare)",
                "now: total (prepare)",
                "now / before",
                "rel. error before / now",
            ],
            rows,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
