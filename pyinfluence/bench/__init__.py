"""Benchmarking influence solvers as a product: accuracy against cost, on standard tasks and on
your own model (``pyinfluence bench`` on the command line).

Standard tasks (:func:`make_task`): ``digits-logreg``, ``digits-svm``, ``digits-mlp``,
``digits-cnn``, ``digits-cnn-smooth`` (the same CNN with average pooling), ``synthetic-linear`` —
data that ships with scikit-learn or is generated from a seed. For each, every applicable path and solver (:func:`solver_grid`: the C++ exact linear path,
torch ``Exact``, ``CG`` at several tolerances, ``LiSSA`` at several depths/repeats, and any
:class:`~pyinfluence.solvers.Solver` subclass defined later, with its default constructor unless
:func:`register_grid` gives it a grid) is timed and compared with ground truth::

    from pyinfluence.bench import run_bench, compare_solvers
    report = run_bench(quick=True)                     # BenchReport
    print(report.table()); report.save("bench-out")    # bench.json, bench.md, a plot

    # your own model
    rep = compare_solvers(lambda s: TorchInfluence(model, loss_fn, (X, y), l2=1e-3, solver=s),
                          (X_test, y_test), solvers=[Exact(), CG(tol=1e-4), LiSSA(depth=500)])

Conventions (as in :mod:`pyinfluence`): ``up_loss[i, j] = −g_testjᵀ (H + λI)⁻¹ g_train_i``, H the Hessian of the
mean training loss plus the L2 term, no 1/n. Metrics: :mod:`pyinfluence.bench.metrics`; what a row
measures: :mod:`pyinfluence.bench.runner`; the JSON schema: :mod:`pyinfluence.bench.report`.
Other libraries side by side: :mod:`pyinfluence.bench.peers`; scaling sweeps of the exact linear
path: :mod:`pyinfluence.bench.scaling` (``scaling_sweep``). The one-off measurements behind
bench/RESULTS.md: :mod:`pyinfluence.bench.studies` (``python -m pyinfluence.bench.studies.NAME``). Whether
influence predicts retraining (LDS over random half subsets, brittleness, mislabel AUC): :mod:`pyinfluence.bench.lds`
and the ``retraining`` study (``pyinfluence bench --retraining``).
"""

from __future__ import annotations

from pyinfluence._optional import require_torch

require_torch("pyinfluence.bench")  # the tasks and solvers are torch models and torch solvers

from pyinfluence.bench.metrics import max_rel_err, pareto_front, pearson, spearman, topk_overlap  # noqa: E402
from pyinfluence.bench.report import SCHEMA, BenchReport, machine_info  # noqa: E402
from pyinfluence.bench.runner import (  # noqa: E402
    EXACT_MAX_PARAMS,
    GridContext,
    LooTruth,
    Setting,
    compare_solvers,
    register_grid,
    run_bench,
    run_task,
    solver_classes,
    solver_grid,
)
from pyinfluence.bench.tasks import TASKS, Task, TrainedModel, make_task, task_names  # noqa: E402

__all__ = [
    "EXACT_MAX_PARAMS",
    "SCHEMA",
    "TASKS",
    "BenchReport",
    "TrainedModel",
    "GridContext",
    "LooTruth",
    "Setting",
    "Task",
    "compare_solvers",
    "machine_info",
    "make_task",
    "max_rel_err",
    "pareto_front",
    "pearson",
    "register_grid",
    "run_bench",
    "run_task",
    "scaling_sweep",
    "solver_classes",
    "solver_grid",
    "spearman",
    "task_names",
    "topk_overlap",
]


def __getattr__(name: str):  # PEP 562: the scaling sweep is imported on first use
    if name == "scaling_sweep":
        from pyinfluence.bench.scaling import scaling_sweep

        globals()[name] = scaling_sweep
        return scaling_sweep
    raise AttributeError(f"module 'pyinfluence.bench' has no attribute {name!r}")
