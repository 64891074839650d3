"""Running the benchmark: solver grids, timing, memory, HVP counts and accuracy.

What one *row* measures (one solver setting on one task or on the user's model):

- **wall time** ``time_s``: the median over repeats of the full computation of the ``up_loss``
  matrix for the task's m test points from scratch — a fresh influence object (for
  TorchInfluence: the gradient ∇R and model checks), the solver's preparation (``prepare()``:
  Exact builds and factorises H + λI, LiSSA estimates its scale) and ``up_loss`` itself (test
  gradients, the solve, the training gradients and scores). ``prepare_s`` is everything before
  the ``up_loss`` call (construction + ``prepare()``), ``solve_s`` the ``up_loss`` call. Repeats
  stop early once a setting has used ``budget_s`` seconds (at least one run); ``repeats`` says how
  many ran.
- **peak memory** ``peak_mem_mb``: during the first repeat, the rise of the process's resident
  high-water mark (VmHWM) above its resident size before the run, after freeing cached heap
  (``malloc_trim``) and resetting the mark through ``/proc/self/clear_refs`` (Linux;
  ``mem_method = "vmhwm"``). It counts every allocation (torch, BLAS, the C++ core) and the result.
  Elsewhere ``mem_method = "tracemalloc"``: the Python-heap peak during one extra untimed run
  (numpy buffers are seen; torch's and BLAS's are NOT, so it understates), or ``None``.
- **cost** ``hvp_columns``: Hessian-vector products over the full training set, counted in
  columns (one HVP of r vectors = r), by wrapping the TorchInfluence operator: CG iterations, the
  final residual check, LiSSA's power iterations for the scale; ``minibatch_hvp_columns``:
  minibatch HVPs (LiSSA's recursion and scale probes). Exact paths make no such HVP calls: their
  ``flops`` are counted instead — torch Exact: p³/3 (Cholesky) + 2·p²·m (solves), plus the dense
  Hessian build (about p HVP columns, not counted); C++ linear exact: n·p² (assembly) + p³/3 +
  2·p²·m + 2·n·p·m (scores). ``iterations`` and ``max_residual`` come from the last
  :class:`~pyinfluence.solvers.SolveResult`.
- **accuracy** against the task's reference up_loss (see :func:`run_task`): ``pearson``,
  ``spearman`` (whole matrix), ``top10_overlap`` (mean over test points of the 10-most-helpful and
  10-most-harmful overlaps, see :mod:`pyinfluence.bench.metrics`), ``max_rel_err``; and
  ``loo_pearson``: the Pearson r between the predicted leave-one-out change −up_loss[i, j]/n and
  the actual change after retraining without training point i, over the (i, j) pairs of the
  task's LOO set (pooled over its test points).

Failures (a diverging LiSSA, a CG that meets negative curvature, out of memory, ...) are recorded
in the row (``status = "error"``, ``error``), never raised. Settings that are not affordable
(Exact above ``EXACT_MAX_PARAMS`` parameters) are listed with ``status = "skipped"``.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import math
import statistics
import time
import tracemalloc
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from pyinfluence._json import jsonable
from pyinfluence.bench import metrics as M
from pyinfluence.bench._measure import hwm_supported, malloc_trim, reset_hwm, status_kb

__all__ = [
    "EXACT_MAX_PARAMS",
    "GridContext",
    "LooTruth",
    "Setting",
    "compare_solvers",
    "register_grid",
    "registered_grids",
    "run_bench",
    "run_task",
    "solver_classes",
    "solver_grid",
]

#: The torch Exact solver is benchmarked (and used as the reference) up to this many parameters;
#: above it, it is listed as skipped and the reference is CG at tol 1e-10.
EXACT_MAX_PARAMS = 5000
#: The reference solver when Exact is not affordable.
REFERENCE_CG_TOL = 1e-10
TOPK = 10
DEFAULT_BUDGET_S = 30.0

LINEAR_EXACT = "linear-exact"

ProgressFn = Optional[Callable[[str], None]]


# ================================================================================================
# settings and grids
# ================================================================================================
@dataclass(frozen=True)
class GridContext:
    """What a grid function may look at: the problem's size and kind, and quick mode."""

    n_params: Optional[int] = None
    n_train: Optional[int] = None
    kind: str = "user"  # "linear" | "deep" | "user"
    quick: bool = False


@dataclass
class Setting:
    """One benchmarked configuration: ``solver`` is ``"linear-exact"`` (the C++ LinearInfluence
    path) or a :class:`~pyinfluence.solvers.Solver` object for TorchInfluence. ``skip`` (a reason)
    lists it without running it."""

    solver: Any
    label: str = ""
    skip: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.label:
            self.label = setting_label(self.solver)

    @property
    def family(self) -> str:
        if isinstance(self.solver, str):
            return self.solver
        if isinstance(self.solver, _Unconstructible):
            return self.solver.cls.__name__.lower()
        # subclasses inherit the ClassVar `name`: they are reported under their own class name
        return _family_of_class(type(self.solver))

    @property
    def path(self) -> str:
        return "linear" if isinstance(self.solver, str) else "torch"

    def settings_dict(self) -> dict[str, Any]:
        if isinstance(self.solver, str):
            return {}
        if dataclasses.is_dataclass(self.solver):
            out = {}
            for f in dataclasses.fields(self.solver):
                out[f.name] = jsonable(getattr(self.solver, f.name))
            return out
        try:
            return {k: jsonable(v) for k, v in vars(self.solver).items() if not k.startswith("_")}
        except TypeError:
            return {}


def setting_label(solver: Any) -> str:
    """A short, readable label for a solver setting."""
    if isinstance(solver, str):
        if solver == LINEAR_EXACT:
            return "linear-exact (C++)"
        return solver
    cls = type(solver).__name__
    pc = getattr(solver, "preconditioner", None)
    suffix = (
        "" if pc is None else f" +{pc if isinstance(pc, str) else getattr(pc, 'name', type(pc).__name__)}"
    )
    if cls == "Exact":
        return "Exact (torch)"
    if cls == "CG":
        return f"CG tol={solver.tol:g}{suffix}"
    if cls == "BlockCG":
        return f"block CG tol={solver.tol:g}{suffix}"
    if cls == "LiSSA":
        b = "full" if solver.batch_size is None else solver.batch_size
        sc = "" if solver.scale is None else f" scale={solver.scale:g}"
        return f"LiSSA depth={solver.depth} repeats={solver.repeats} batch={b}{sc}{suffix}"
    if dataclasses.is_dataclass(solver):
        args = []
        for f in dataclasses.fields(solver):
            v = getattr(solver, f.name)
            if f.default is not dataclasses.MISSING and v == f.default:
                continue
            args.append(f"{f.name}={v!r}")
        return f"{cls}({', '.join(args)})"
    return f"{cls}()"


GridFn = Callable[[GridContext], list]
_GRIDS: dict[type, GridFn] = {}


def register_grid(solver_cls: type, grid: GridFn) -> None:
    """Benchmark ``solver_cls`` with the settings ``grid(ctx)`` returns (a list of solver objects
    or :class:`Setting` objects) instead of its default constructor. ``ctx`` is a
    :class:`GridContext` (n_params, n_train, kind, quick)."""
    from pyinfluence.torch.solvers import Solver

    if not (isinstance(solver_cls, type) and issubclass(solver_cls, Solver)):
        raise TypeError(f"solver_cls must be a subclass of pyinfluence.solvers.Solver, got {solver_cls!r}")
    if not callable(grid):
        raise TypeError(f"grid must be callable (GridContext) -> list of solvers, got {grid!r}")
    _GRIDS[solver_cls] = grid


def registered_grids() -> dict[type, GridFn]:
    """The registered grids (a copy): solver class -> grid function."""
    _ensure_default_grids()
    return dict(_GRIDS)


def solver_classes() -> list[type]:
    """Every concrete :class:`~pyinfluence.solvers.Solver` subclass defined so far (found
    recursively through ``__subclasses__``), public ones only (no leading underscore), in
    definition order: Exact, CG, LiSSA first, then anything added later."""
    from pyinfluence.torch.solvers import Solver

    seen: list[type] = []
    stack = list(Solver.__subclasses__())
    while stack:
        cls = stack.pop(0)
        if cls in seen:
            continue
        seen.append(cls)
        stack.extend(cls.__subclasses__())
    return [c for c in seen if not inspect.isabstract(c) and not c.__name__.startswith("_")]


def _exact_grid(ctx: GridContext) -> list:
    from pyinfluence.torch.solvers import Exact

    if ctx.n_params is not None and ctx.n_params > EXACT_MAX_PARAMS:
        return [
            Setting(
                Exact(),
                skip=(
                    f"p = {ctx.n_params} > {EXACT_MAX_PARAMS}: the dense Hessian "
                    f"({8 * ctx.n_params**2 / 1e9:.2g} GB) and its ~p HVP columns are not affordable "
                    f"here; the reference is CG at tol {REFERENCE_CG_TOL:g}"
                ),
            )
        ]
    return [Exact()]


def _cg_grid(ctx: GridContext) -> list:
    from pyinfluence.torch.solvers import CG

    tols = [1e-2, 1e-6] if ctx.quick else [1e-2, 1e-4, 1e-6, 1e-8]
    return [CG(tol=t, raise_on_nonconvergence=False) for t in tols]


def _block_cg_grid(ctx: GridContext) -> list:
    from pyinfluence.torch.solvers import BlockCG

    tols = [1e-2, 1e-6] if ctx.quick else [1e-2, 1e-4, 1e-6, 1e-8]
    return [BlockCG(tol=t, raise_on_nonconvergence=False) for t in tols]


def _lissa_grid(ctx: GridContext) -> list:
    from pyinfluence.torch.solvers import LiSSA

    if ctx.quick:
        cfg = [(50, 1, 128), (100, 1, 128)]
    else:
        cfg = [(100, 1, 128), (300, 1, 128), (1000, 1, 128), (300, 4, 128)]
    # like CG's grid: a setting that misses LiSSA's tol is a row with its residual and accuracy (and
    # the ConvergenceWarning in its warnings), not an error row, so the accuracy-time curve is complete
    return [LiSSA(depth=d, repeats=r, batch_size=b, seed=0, raise_on_nonconvergence=False) for d, r, b in cfg]


def _ensure_default_grids() -> None:
    from pyinfluence.torch.solvers import CG, BlockCG, Exact, LiSSA

    _GRIDS.setdefault(Exact, _exact_grid)
    _GRIDS.setdefault(CG, _cg_grid)
    _GRIDS.setdefault(BlockCG, _block_cg_grid)
    _GRIDS.setdefault(LiSSA, _lissa_grid)


def _families_filter(families: Optional[Iterable[str]]) -> Optional[set[str]]:
    if families is None:
        return None
    if isinstance(families, str):
        families = [f for f in families.split(",")]
    out = {str(f).strip().lower() for f in families if str(f).strip()}
    if not out:
        raise ValueError("solvers must name at least one solver family (e.g. exact,cg,lissa)")
    return out


def solver_grid(
    task_or_ctx: Any = None, quick: bool = False, families: Optional[Iterable[str]] = None
) -> list[Setting]:
    """The settings benchmarked on a task (or a :class:`GridContext`).

    ``"linear-exact"`` first for linear tasks, then for every solver class of
    :func:`solver_classes` its registered grid (:func:`register_grid`; Exact: one setting, skipped
    above ``EXACT_MAX_PARAMS``; CG: tol 1e-2, 1e-4, 1e-6, 1e-8 (quick: 1e-2, 1e-6); LiSSA: depth ×
    repeats (100, 1), (300, 1), (1000, 1), (300, 4) with minibatches of 128 and the automatic
    scale (quick: (50, 1), (100, 1))), or, for a class without one, its default constructor — so
    a solver added to pyinfluence later is benchmarked automatically. ``families``: keep only
    these (``"linear-exact"``, ``"exact"``, ``"cg"``, ``"lissa"``, or a class name in lower case).
    """
    _ensure_default_grids()
    if task_or_ctx is None:
        ctx = GridContext(quick=bool(quick))
    elif isinstance(task_or_ctx, GridContext):
        ctx = dataclasses.replace(task_or_ctx, quick=bool(quick) or task_or_ctx.quick)
    else:
        ctx = GridContext(
            n_params=task_or_ctx.n_params,
            n_train=task_or_ctx.n_train,
            kind=task_or_ctx.kind,
            quick=bool(quick),
        )
    keep = _families_filter(families)
    out: list[Setting] = []
    if ctx.kind == "linear":
        out.append(Setting(LINEAR_EXACT))
    for cls in solver_classes():
        grid = _GRIDS.get(cls)
        if grid is None:
            try:
                items: list = [cls()]
            except Exception as exc:  # a solver without a usable default: list it as an error
                items = [Setting(_Unconstructible(cls, exc), label=f"{cls.__name__}()")]
        else:
            items = list(grid(ctx))
        for it in items:
            out.append(it if isinstance(it, Setting) else Setting(it))
    if keep is not None:
        out = [s for s in out if s.family in keep]
    return out


class _Unconstructible:
    """Stands for a solver class whose default constructor failed (recorded as an error row)."""

    def __init__(self, cls: type, exc: BaseException) -> None:
        self.cls, self.exc = cls, exc

    def __repr__(self) -> str:
        return f"{self.cls.__name__}()"


def _as_setting(s: Any, name: str = "solvers") -> Setting:
    from pyinfluence.torch.solvers import Solver, resolve_solver

    if isinstance(s, Setting):
        return s
    if isinstance(s, str):
        key = s.strip().lower()
        if key == LINEAR_EXACT:
            return Setting(LINEAR_EXACT)
        try:
            return Setting(resolve_solver(key, name))
        except ValueError:
            raise ValueError(
                f"{name} entries must be 'linear-exact', 'exact', 'cg', 'block_cg', 'lissa' or solver objects "
                f"such as pyinfluence.CG(tol=1e-6), got {s!r}"
            ) from None
    if isinstance(s, Solver) or (isinstance(s, type) and issubclass(s, Solver)):
        return Setting(resolve_solver(s, name))
    raise TypeError(
        f"{name} entries must be solver objects, solver names or 'linear-exact', got {type(s).__name__} {s!r}"
    )


# ================================================================================================
# measurement helpers
# ================================================================================================
_MEM_METHOD: Optional[str] = None


def memory_method() -> Optional[str]:
    """``"vmhwm"`` where the resident high-water mark can be reset (Linux), else
    ``"tracemalloc"``."""
    global _MEM_METHOD
    if _MEM_METHOD is None:
        _MEM_METHOD = "vmhwm" if hwm_supported() else "tracemalloc"
    return _MEM_METHOD


class _Counter:
    """Counts HVP columns through a TorchInfluence operator's matvec / sample_matvec."""

    def __init__(self) -> None:
        self.full = 0
        self.mini = 0
        self.active = False

    def attach(self, obj: Any) -> bool:
        op = getattr(obj, "operator", None)
        if op is None or not hasattr(op, "matvec"):
            return False
        counter = self
        mv, smv = op.matvec, getattr(op, "sample_matvec", None)

        def matvec(V, *a, **kw):
            counter.full += int(V.shape[1]) if getattr(V, "ndim", 1) == 2 else 1
            return mv(V, *a, **kw)

        try:
            op.matvec = matvec
            if smv is not None:

                def sample_matvec(V, *a, **kw):
                    counter.mini += int(V.shape[1]) if getattr(V, "ndim", 1) == 2 else 1
                    return smv(V, *a, **kw)

                op.sample_matvec = sample_matvec
        except (AttributeError, TypeError):
            return False
        self.active = True
        return True


def _one_line(exc: BaseException, limit: int = 400) -> str:
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _to_numpy(up: Any) -> np.ndarray:
    return M.as_matrix(up)


@dataclass
class _Run:
    total: float
    prepare: float
    solve: float
    up: Optional[np.ndarray] = None
    last_solve: Any = None
    hvp_full: Optional[int] = None
    hvp_mini: Optional[int] = None
    n_params: Optional[int] = None
    n_train: Optional[int] = None


def _sync_if_cuda(obj: Any) -> None:
    dev = getattr(obj, "device", None)
    if dev is not None and "cuda" in str(dev):
        import torch

        torch.cuda.synchronize()


def _run_once(factory: Callable[[Any], Any], setting: Setting, X_test: Any, y_test: Any, keep: bool) -> _Run:
    solver = setting.solver
    if isinstance(solver, _Unconstructible):
        raise solver.exc
    counter = _Counter()
    t0 = time.perf_counter()
    obj = factory(solver)
    counter.attach(obj)
    prep = getattr(obj, "prepare", None)
    if callable(prep) and not isinstance(solver, str):
        prep()
    _sync_if_cuda(obj)
    t1 = time.perf_counter()
    up = obj.up_loss(X_test, y_test)
    _sync_if_cuda(obj)
    t2 = time.perf_counter()
    run = _Run(total=t2 - t0, prepare=t1 - t0, solve=t2 - t1)
    if keep:
        run.up = _to_numpy(up)
        run.last_solve = getattr(obj, "last_solve", None)
        if counter.active:
            run.hvp_full, run.hvp_mini = counter.full, counter.mini
        run.n_params = getattr(obj, "n_params", None)
        run.n_train = getattr(obj, "n_train", None)
    del obj, up
    return run


def _measure(
    factory, setting, X_test, y_test, repeats: int, budget_s: float, memory: bool
) -> tuple[list[_Run], Optional[float], Optional[str], list[str]]:
    """Run a setting ``repeats`` times (fewer once ``budget_s`` is used); returns (runs, peak MB,
    memory method, warnings). Raises the setting's error."""
    runs: list[_Run] = []
    peak_mb: Optional[float] = None
    method = memory_method() if memory else None
    seen: list[str] = []
    spent = 0.0
    with warnings.catch_warnings(record=True) as wlist:
        warnings.simplefilter("always")
        for r in range(repeats):
            gc.collect()
            if r == 0 and method == "vmhwm":
                malloc_trim()
                reset_hwm()
                base = status_kb("VmRSS")
                run = _run_once(factory, setting, X_test, y_test, keep=True)
                peak = status_kb("VmHWM")
                if base > 0 and peak > 0:
                    peak_mb = max(0, peak - base) / 1024.0
            else:
                run = _run_once(factory, setting, X_test, y_test, keep=(r == 0))
            runs.append(run)
            spent += run.total
            if spent >= budget_s:
                break
        if method == "tracemalloc":
            gc.collect()
            tracemalloc.start()
            try:
                b0, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                _run_once(factory, setting, X_test, y_test, keep=False)
                _, pk = tracemalloc.get_traced_memory()
                peak_mb = max(0, pk - b0) / 2**20
            finally:
                tracemalloc.stop()
    for w in wlist:
        msg = f"{w.category.__name__}: {' '.join(str(w.message).split())}"[:300]
        if msg not in seen:
            seen.append(msg)
    return runs, peak_mb, method, seen


def _flops(setting: Setting, p: Optional[int], n: Optional[int], m: int) -> Optional[float]:
    if p is None:
        return None
    if setting.family == LINEAR_EXACT and n is not None:
        return float(n * p * p + p**3 / 3 + 2 * p * p * m + 2 * n * p * m)
    if setting.family == "exact":
        # factorisation + solve only: torch Exact builds the dense Hessian from p HVP columns (autograd),
        # whose flops depend on the model and are not counted here
        return float(p**3 / 3 + 2 * p * p * m)
    return None


# ================================================================================================
# leave-one-out ground truth
# ================================================================================================
@dataclass
class LooTruth:
    """Actual leave-one-out changes to compare predictions with.

    For each LOO test point t: ``test_idx[t]`` (a column of up_loss), ``train_idx[t]`` (training
    indices removed one at a time) and ``actual[t]`` (L(z_test, θ̂₋ᵢ) − L(z_test, θ̂) for each).
    ``n_train`` is the n of the predicted change −up_loss/n. ``method`` says how it was computed.
    """

    test_idx: list[int]
    train_idx: list[list[int]]
    actual: list[list[float]]
    n_train: int
    method: str = ""
    seconds: Optional[float] = None

    def predicted(self, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(predicted, actual) flattened over all (i, t) pairs; predicted = −up[i, t]/n."""
        pred, act = [], []
        for t, j in enumerate(self.test_idx):
            idx = np.asarray(self.train_idx[t], dtype=np.int64)
            pred.append(-up[idx, j] / self.n_train)
            act.append(np.asarray(self.actual[t], dtype=np.float64))
        return np.concatenate(pred), np.concatenate(act)

    def pearson(self, up: Optional[np.ndarray]) -> Optional[float]:
        if up is None:
            return None
        p, a = self.predicted(up)
        r = M.pearson(p, a)
        return None if not math.isfinite(r) else r

    def to_dict(self) -> dict[str, Any]:
        return {
            "test_idx": list(map(int, self.test_idx)),
            "train_idx": [list(map(int, t)) for t in self.train_idx],
            "actual": [[float(v) for v in a] for a in self.actual],
            "n_train": int(self.n_train),
            "method": self.method,
            "seconds": self.seconds,
        }


def _top_abs(col: np.ndarray, k: int) -> list[int]:
    k = min(k, col.shape[0])
    return [int(i) for i in np.argsort(-np.abs(col), kind="stable")[:k]]


def linear_loo_truth(task: Any, ref: np.ndarray, n_tests: int = 2, n_points: int = 50) -> LooTruth:
    """Actual LOO changes for a linear task by exact refits (``LinearInfluence.retrain_loo``): the
    first ``n_tests`` test points, for each the ``n_points`` training points with the largest
    |reference up_loss| (as in Koh & Liang's Figure 2)."""
    t0 = time.perf_counter()
    li = task.linear_influence()
    Xt, yt = task.test_data("numpy")
    tests = list(range(min(n_tests, Xt.shape[0])))
    train_idx, actual = [], []
    for j in tests:
        idx = _top_abs(ref[:, j], n_points)
        a = li.retrain_loo(Xt[j : j + 1], yt[j : j + 1], idx)[:, 0]
        train_idx.append(idx)
        actual.append([float(v) for v in a])
    return LooTruth(
        tests,
        train_idx,
        actual,
        task.n_train,
        method="exact refits (LinearInfluence.retrain_loo: Newton from θ̂, no damping)",
        seconds=time.perf_counter() - t0,
    )


def fixed_budget_loo(task: Any, tests: Sequence[int], removed: np.ndarray, iters: int) -> np.ndarray:
    """Koh & Liang's leave-one-out protocol for non-convex models: the task's trainer (full-batch L-BFGS, same
    objective) run for ``iters`` iterations from θ̂ without each training point of ``removed``, minus the same
    run with nothing removed (the control, whose drift from θ̂ cancels). Returns the change of each test
    point's loss, (len(removed), len(tests)); one refit per removed point, shared by all test points."""
    import torch

    from pyinfluence.torch.training import lbfgs_refit

    X, y = task.X_test[list(tests)], task.y_test[list(tests)]

    def test_losses(module: Any) -> np.ndarray:
        with torch.no_grad():
            return task.loss_fn(module(X), y).detach().double().cpu().numpy()

    def refit(drop: Optional[int]) -> Any:
        return lbfgs_refit(
            task.model, task.X_train, task.y_train, iters, drop=drop, l2=task.l2, loss=task.loss_fn
        )

    control = test_losses(refit(None))
    out = np.empty((len(removed), len(tests)))
    for r, i in enumerate(removed):
        out[r] = test_losses(refit(int(i))) - control
    return out


def deep_loo_truth(
    task: Any, ref: np.ndarray, n_tests: int = 1, n_points: int = 10, iters: int = 150
) -> LooTruth:
    """Actual LOO changes for a deep task by :func:`fixed_budget_loo` (L-BFGS warm-started from θ̂ for
    ``iters`` iterations without each point, minus the control refit), for the ``n_points`` training points of
    largest |``ref``| per test point, as the deep-path study (:mod:`pyinfluence.bench.studies.deep_path`)."""
    t0 = time.perf_counter()
    tests = list(range(min(n_tests, task.m_test)))
    train_idx = [_top_abs(ref[:, j], n_points) for j in tests]
    union = np.unique(np.concatenate(train_idx))
    changes = fixed_budget_loo(task, tests, union, iters)
    row = {int(i): r for r, i in enumerate(union)}
    actual = [[float(changes[row[int(i)], t]) for i in train_idx[t]] for t in range(len(tests))]
    return LooTruth(
        tests,
        train_idx,
        actual,
        task.n_train,
        method=f"L-BFGS refits warm-started from θ̂ ({iters} iterations), minus the "
        f"control refit with nothing removed",
        seconds=time.perf_counter() - t0,
    )


# ================================================================================================
# rows
# ================================================================================================
#: A row's accuracy fields (None until measured against the reference).
_ACCURACY_FIELDS = (
    "pearson",
    "spearman",
    "top10_overlap",
    "top10_helpful",
    "top10_harmful",
    "max_rel_err",
    "loo_pearson",
)


def _accuracy(up: Optional[np.ndarray], ref: Optional[np.ndarray], loo: Optional[LooTruth]) -> dict[str, Any]:
    out: dict[str, Any] = dict.fromkeys(_ACCURACY_FIELDS)
    if up is None:
        return out

    def fin(x: float) -> Optional[float]:
        return float(x) if math.isfinite(x) else None

    if ref is not None and ref.shape == up.shape:
        out["pearson"] = fin(M.pearson(up, ref))
        out["spearman"] = fin(M.spearman(up, ref))
        ov = M.topk_overlap(up, ref, TOPK)
        out["top10_overlap"] = fin(ov["both"])
        out["top10_helpful"] = fin(ov["helpful"])
        out["top10_harmful"] = fin(ov["harmful"])
        out["max_rel_err"] = fin(M.max_rel_err(up, ref))
    if loo is not None and np.isfinite(up).all():
        out["loo_pearson"] = loo.pearson(up)
    return out


def _empty_row(task_name: str, setting: Setting) -> dict[str, Any]:
    return {
        "task": task_name,
        "label": setting.label,
        "path": setting.path,
        "family": setting.family,
        "solver": (
            "LinearInfluence"
            if isinstance(setting.solver, str)
            else getattr(setting.solver, "cls", type(setting.solver)).__name__
        ),
        "settings": setting.settings_dict(),
        "status": "skipped" if setting.skip else "ok",
        "error": setting.skip,
        "warnings": [],
        "repeats": 0,
        "time_s": None,
        "times_s": [],
        "prepare_s": None,
        "solve_s": None,
        "peak_mem_mb": None,
        "mem_method": None,
        "hvp_columns": None,
        "minibatch_hvp_columns": None,
        "flops": None,
        "iterations": None,
        "max_residual": None,
        "reference": False,
        **dict.fromkeys(_ACCURACY_FIELDS),
        "pareto": False,
    }


def _reference_info(setting: Setting, row: dict[str, Any]) -> dict[str, Any]:
    """What a task records about its reference (the ground truth) from the reference's row."""
    return {
        "label": setting.label,
        "kind": setting.family,
        "time_s": row["time_s"],
        "max_residual": row["max_residual"],
        "error": row["error"],
    }


def _bench_setting(
    task_name: str,
    factory,
    setting: Setting,
    X_test,
    y_test,
    m: int,
    repeats: int,
    budget_s: float,
    memory: bool,
    log: ProgressFn,
) -> tuple[dict[str, Any], Optional[np.ndarray]]:
    row = _empty_row(task_name, setting)
    if setting.skip:
        if log:
            log(f"  {setting.label}: skipped ({setting.skip})")
        return row, None
    if log:
        log(f"  {setting.label} ...")
    try:
        runs, peak, method, warns = _measure(factory, setting, X_test, y_test, repeats, budget_s, memory)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, never raised
        row.update(status="error", error=_one_line(exc))
        if log:
            log(f"    error: {row['error'][:160]}")
        return row, None
    first = runs[0]
    times = [r.total for r in runs]
    row.update(
        repeats=len(runs),
        times_s=times,
        time_s=float(statistics.median(times)),
        prepare_s=float(statistics.median([r.prepare for r in runs])),
        solve_s=float(statistics.median([r.solve for r in runs])),
        peak_mem_mb=peak,
        mem_method=method,
        warnings=warns,
        hvp_columns=first.hvp_full,
        minibatch_hvp_columns=first.hvp_mini,
    )
    ls = first.last_solve
    if ls is not None:
        row["iterations"] = getattr(ls, "iterations", None)
        mr = getattr(ls, "max_residual", None)
        row["max_residual"] = float(mr) if mr is not None and math.isfinite(mr) else None
        if row["hvp_columns"] is None:
            info = getattr(ls, "info", {}) or {}
            row["hvp_columns"] = info.get("matvec_columns")
    row["flops"] = _flops(setting, first.n_params, first.n_train, m)
    up = first.up
    if up is not None and not np.isfinite(up).all():
        row.update(status="error", error="the up_loss matrix contains NaN or infinity")
        up = None
    if log:
        log(f"    {row['time_s']:.3f} s" + (f" ({len(runs)} runs)" if len(runs) > 1 else ""))
    return row, up


def _check_repeats(repeats: Any) -> int:
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    return int(repeats)


def _check_budget(budget_s: Any) -> float:
    if isinstance(budget_s, bool) or not isinstance(budget_s, (int, float)) or not budget_s > 0:
        raise ValueError(f"budget_s must be a number > 0 (seconds), got {budget_s!r}")
    return float(budget_s)


def _bench_settings(
    task_name: str,
    factory,
    settings: Sequence[Setting],
    X_test,
    y_test,
    m: int,
    reference: Any,
    repeats: int,
    budget_s: float,
    memory: bool,
    loo_fn: Optional[Callable[[np.ndarray], Optional[LooTruth]]],
    log: ProgressFn,
    warmup: Optional[Callable[[], Any]] = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], Optional[LooTruth]]:
    """Benchmark the settings; the reference first. Returns (rows, reference info, loo).

    ``warmup`` (untimed, errors ignored) runs first: the first torch.func call of a process or
    model pays one-off costs that would otherwise be charged to whichever setting runs first."""
    if warmup is not None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warmup()
        except Exception:  # only a warm-up
            pass
    rows: list[Optional[dict[str, Any]]] = [None] * len(settings)
    ups: list[Optional[np.ndarray]] = [None] * len(settings)
    ref_up: Optional[np.ndarray] = None
    ref_info: dict[str, Any] = {}
    ref_pos: Optional[int] = None
    if isinstance(reference, np.ndarray) or hasattr(reference, "detach"):
        ref_up = M.as_matrix(reference, "reference")
        ref_info = {"label": "user-supplied matrix", "kind": "user"}
    else:
        ref_setting = reference if isinstance(reference, Setting) else _as_setting(reference, "reference")
        for i, s in enumerate(settings):
            if s.label == ref_setting.label and not s.skip:
                ref_pos = i
                break
        if ref_pos is not None:
            row, up = _bench_setting(
                task_name, factory, settings[ref_pos], X_test, y_test, m, repeats, budget_s, memory, log
            )
            rows[ref_pos], ups[ref_pos] = row, up
            ref_up = up
            ref_info = _reference_info(ref_setting, row)
        else:
            if log:
                log(f"  reference {ref_setting.label} ...")
            row, up = _bench_setting(
                task_name, factory, ref_setting, X_test, y_test, m, 1, budget_s, False, None
            )
            ref_up = up
            ref_info = _reference_info(ref_setting, row)
    loo = None
    if ref_up is not None and loo_fn is not None:
        try:
            if log:
                log("  leave-one-out retraining ...")
            loo = loo_fn(ref_up)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            ref_info["loo_error"] = _one_line(exc)
            if log:
                log(f"    error: {ref_info['loo_error'][:160]}")
    for i, s in enumerate(settings):
        if rows[i] is None:
            rows[i], ups[i] = _bench_setting(
                task_name, factory, s, X_test, y_test, m, repeats, budget_s, memory, log
            )
    out: list[dict[str, Any]] = []
    for i, done in enumerate(rows):
        assert done is not None
        if done["status"] == "ok":
            done.update(_accuracy(ups[i], ref_up, loo))
            done["reference"] = ref_pos == i
        out.append(done)
    if ref_up is None:
        ref_info.setdefault("error", "the reference computation failed")
    ref_info["up_loss"] = ref_up  # kept in memory for peers; dropped from the JSON
    return out, ref_info, loo


# ================================================================================================
# public entry points
# ================================================================================================
def compare_solvers(
    influence_factory: Callable[[Any], Any],
    test_data: Any,
    solvers: Optional[Sequence[Any]] = None,
    reference: Any = None,
    repeats: int = 3,
    *,
    name: str = "user",
    loo: Optional[LooTruth] = None,
    budget_s: float = DEFAULT_BUDGET_S,
    memory: bool = True,
    quick: bool = False,
    warmup: bool = True,
    progress: ProgressFn = None,
):
    """Benchmark solvers on YOUR model: the same table as ``pyinfluence bench``.

    - ``influence_factory(solver)``: returns a fresh object with ``.up_loss(X_test, y_test)``
      for ``solver`` — e.g. ``lambda s: TorchInfluence(model, loss_fn, (X, y), l2=1e-3,
      damping=0.01, solver=s)``; called with the string ``"linear-exact"`` for that setting (return
      a :class:`~pyinfluence.LinearInfluence`). Construction counts in the measured time.
    - ``test_data``: ``(X_test, y_test)``, passed to ``up_loss`` as they are.
    - ``solvers``: solver objects (``CG(tol=1e-6)``), names (``"exact"``, ``"cg"``, ``"lissa"``,
      ``"linear-exact"``), or :class:`Setting` objects. Default: :func:`solver_grid` for the
      model's number of parameters (``quick=True``: the small grid).
    - ``reference``: the ground truth the accuracy is measured against — a solver / name /
      Setting (computed with the factory) or a precomputed (n_train, m_test) matrix. Default:
      ``"linear-exact"`` when it is among ``solvers``, else ``Exact()`` when the model has ≤
      ``EXACT_MAX_PARAMS`` parameters (asked through the object's ``n_params``), else
      ``CG(tol=1e-10)``.
    - ``repeats``: timed runs per setting (median reported; fewer once ``budget_s`` seconds have
      been spent on a setting). ``loo``: a :class:`LooTruth` of actual leave-one-out changes to
      report ``loo_pearson``. ``memory``: measure peak memory. ``warmup``: one untimed call
      first (a loose CG on two test points) so that one-off torch costs are not charged to the
      first setting. ``progress``: a callable taking one-line progress messages (e.g. ``print``).

    Returns a :class:`~pyinfluence.bench.BenchReport` with one task entry (``name``).
    """
    from pyinfluence.bench.report import BenchReport, machine_info
    from pyinfluence.torch.solvers import CG, Exact

    if not callable(influence_factory):
        raise TypeError(
            f"influence_factory must be callable (solver) -> influence object, got "
            f"{type(influence_factory).__name__}"
        )
    if not isinstance(test_data, (tuple, list)) or len(test_data) != 2:
        raise ValueError(
            f"test_data must be a pair (X_test, y_test), got "
            f"{type(test_data).__name__}"
            + (f" of length {len(test_data)}" if hasattr(test_data, "__len__") else "")
        )
    repeats = _check_repeats(repeats)
    budget_s = _check_budget(budget_s)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if loo is not None and not isinstance(loo, LooTruth):
        raise TypeError(f"loo must be a LooTruth or None, got {type(loo).__name__}")
    X_test, y_test = test_data
    m = int(X_test.shape[0]) if hasattr(X_test, "shape") and len(X_test.shape) > 0 else 1
    n_params = n_train = l2 = damping = None
    if solvers is None or reference is None:
        # the model's size (for the grid and the default reference), from a cheap object
        try:
            probe = influence_factory(CG(tol=1e-2))
        except Exception:  # the settings' own runs will report what fails
            probe = None
        n_params = getattr(probe, "n_params", None)
        n_train = getattr(probe, "n_train", None)
        l2 = getattr(probe, "l2", None)
        damping = getattr(probe, "damping", None)
        del probe
    if solvers is None:
        settings = solver_grid(GridContext(n_params=n_params, n_train=n_train, kind="user", quick=quick))
    else:
        if isinstance(solvers, (str, bytes)) or not isinstance(solvers, Iterable):
            raise TypeError(f"solvers must be a list of solvers, got {type(solvers).__name__}")
        settings = [_as_setting(s) for s in solvers]
        if not settings:
            raise ValueError("solvers must not be empty")
    labels = [s.label for s in settings]
    for i, s in enumerate(settings):  # make labels unique
        if labels.count(s.label) > 1:
            s.label = f"{s.label} #{labels[: i + 1].count(s.label)}"
    if reference is None:
        lin = [s for s in settings if s.family == LINEAR_EXACT and not s.skip]
        if lin:
            reference = lin[0]
        elif n_params is not None and n_params <= EXACT_MAX_PARAMS:
            reference = Exact()
        else:
            reference = CG(tol=REFERENCE_CG_TOL, raise_on_nonconvergence=False)

    def warm() -> None:
        X2, y2 = (X_test[:2], y_test[:2]) if m >= 2 else (X_test, y_test)
        influence_factory(CG(tol=0.5, raise_on_nonconvergence=False)).up_loss(X2, y2)

    rows, ref_info, loo_t = _bench_settings(
        name,
        influence_factory,
        settings,
        X_test,
        y_test,
        m,
        reference,
        repeats,
        budget_s,
        memory,
        (lambda _ref: loo) if loo is not None else None,
        log=progress,
        warmup=warm if warmup else None,
    )
    ref_up = ref_info.pop("up_loss", None)
    if ref_up is not None:
        n_train = n_train if n_train is not None else int(ref_up.shape[0])
    task_entry = {
        "name": name,
        "kind": "user",
        "description": "user-supplied model",
        "m_test": m,
        "n_params": n_params,
        "n_train": n_train,
        "l2": l2,
        "damping": damping,
        "reference": ref_info,
        "loo": loo_t.to_dict() if loo_t is not None else None,
    }
    rep = BenchReport(
        rows=rows,
        tasks=[task_entry],
        peers=[],
        scaling=None,
        machine=machine_info(),
        settings={"repeats": repeats, "budget_s": budget_s, "quick": quick, "api": "compare_solvers"},
    )
    rep._references[name] = ref_up
    rep.mark_pareto()
    return rep


def run_task(
    task: Any,
    quick: bool = False,
    *,
    solvers: Optional[Iterable[str]] = None,
    settings: Optional[Sequence[Any]] = None,
    repeats: int = 3,
    budget_s: float = DEFAULT_BUDGET_S,
    memory: bool = True,
    loo: bool = True,
    loo_deep: bool = False,
    progress: ProgressFn = None,
):
    """Benchmark every applicable setting on one :class:`~pyinfluence.bench.Task`.

    Reference (ground truth): linear tasks — the C++ exact path (``linear-exact``, float64
    Cholesky of the assembled Hessian); deep tasks — torch ``Exact`` when p ≤
    ``EXACT_MAX_PARAMS``, else ``CG(tol=1e-10)``. The reference setting's own row is marked
    ``reference: true``. ``loo``: for linear tasks, actual leave-one-out retraining (exact refits)
    on the top-|up_loss| training points of 1 (quick) or 3 test points (20 / 50 points each);
    ``loo_deep``: also for deep tasks (L-BFGS refits; slow: 10 points, 1 test point).
    ``solvers``: families to keep; ``settings``: explicit settings instead of the grid.
    Returns ``(task_entry, rows, reference_up_loss)``.
    """
    from pyinfluence.torch.solvers import CG, Exact

    repeats = _check_repeats(repeats)
    budget_s = _check_budget(budget_s)
    if settings is None:
        sets = solver_grid(task, quick=quick, families=solvers)
    else:
        sets = [_as_setting(s, "settings") for s in settings]
    if task.kind == "linear":
        reference: Any = Setting(LINEAR_EXACT)
    elif task.n_params <= EXACT_MAX_PARAMS:
        reference = Setting(Exact())
    else:
        reference = Setting(
            CG(tol=REFERENCE_CG_TOL, max_iter=3000, raise_on_nonconvergence=False),
            label=f"CG tol={REFERENCE_CG_TOL:g} (reference)",
        )
    loo_fn = None
    if loo and task.kind == "linear":
        nt, npt = (1, 20) if quick else (3, 50)
        loo_fn = lambda ref: linear_loo_truth(task, ref, nt, npt)  # noqa: E731
    elif loo_deep and task.kind == "deep":
        loo_fn = lambda ref: deep_loo_truth(task, ref, 1, 5 if quick else 10, 50 if quick else 150)  # noqa: E731

    def factory(solver: Any) -> Any:
        return task.influence(solver)

    if progress:
        progress(
            f"{task.name}: n = {task.n_train}, p = {task.n_params}, m = {task.m_test} ({len(sets)} settings)"
        )

    def warm() -> None:
        task.torch_influence(CG(tol=0.5, raise_on_nonconvergence=False)).up_loss(
            task.X_test[:2], task.y_test[:2]
        )
        if task.kind == "linear":
            task.linear_influence().up_loss(task.X_test_np[:2], task.y_test_np[:2])

    rows, ref_info, loo_t = _bench_settings(
        task.name,
        factory,
        sets,
        task.X_test,
        task.y_test,
        task.m_test,
        reference,
        repeats,
        budget_s,
        memory,
        loo_fn,
        progress,
        warmup=warm,
    )
    ref_up = ref_info.pop("up_loss", None)
    entry = task.to_dict()
    entry["reference"] = ref_info
    entry["loo"] = loo_t.to_dict() if loo_t is not None else None
    return entry, rows, ref_up


def _peer_rows(
    task: Any,
    ref_up: Optional[np.ndarray],
    rows: list[dict[str, Any]],
    loo: Optional[dict[str, Any]],
    peers: Sequence[str],
    peer_python: Optional[str],
    timeout_s: float,
    log: ProgressFn,
) -> tuple[list[dict[str, Any]], Optional[str]]:
    try:
        from pyinfluence.bench import peers as peers_mod
    except ImportError as exc:
        return [], f"pyinfluence.bench.peers is not available: {_one_line(exc)}"
    kw: dict[str, Any] = {}
    try:
        if "log" in inspect.signature(peers_mod.run_peers).parameters and log is not None:
            kw["log"] = lambda msg: log(f"    {msg}")
    except (TypeError, ValueError):
        pass
    try:
        runs = peers_mod.run_peers(
            task, peers=tuple(peers), peer_python=peer_python, timeout_s=timeout_s, **kw
        )
    except Exception as exc:  # the contract says it never raises; be safe anyway
        return [], f"run_peers failed: {_one_line(exc)}"
    loo_t = (
        LooTruth(**{k: loo[k] for k in ("test_idx", "train_idx", "actual", "n_train", "method", "seconds")})
        if loo
        else None
    )
    ok_rows = [r for r in rows if r["status"] == "ok" and r["time_s"] is not None]
    exact_rows = [r for r in ok_rows if r["family"] in (LINEAR_EXACT, "exact")]
    out = []
    for pr in runs:
        up = None if getattr(pr, "up_loss", None) is None else M.as_matrix(pr.up_loss)
        err = getattr(pr, "error", None)
        if up is not None and not np.isfinite(up).all():
            err = err or "the peer returned NaN or infinity"
            up_ok = None
        else:
            up_ok = up
        if up_ok is not None and ref_up is not None and up_ok.shape != ref_up.shape:
            err = err or f"the peer returned shape {up_ok.shape}, expected {ref_up.shape}"
            up_ok = None
        acc = _accuracy(up_ok, ref_up, loo_t)
        t = getattr(pr, "time_s", None)
        row = {
            "task": task.name,
            "library": pr.library,
            "method": pr.method,
            "settings": jsonable(dict(getattr(pr, "settings", {}) or {})),
            "status": "ok" if err is None and up_ok is not None else "error",
            "error": err,
            "time_s": t,
            "peak_mem_mb": getattr(pr, "peak_mem_mb", None),
            **acc,
            "pyinfluence_time_at_accuracy_s": None,
            "pyinfluence_setting_at_accuracy": None,
            "ratio_at_accuracy": None,
            "pyinfluence_exact_time_s": None,
            "ratio_vs_exact": None,
            "details": jsonable(dict(getattr(pr, "details", {}) or {})),
        }
        if t is not None and t > 0:
            if exact_rows:
                fe = min(exact_rows, key=lambda r: r["time_s"])
                row["pyinfluence_exact_time_s"] = fe["time_s"]
                row["ratio_vs_exact"] = fe["time_s"] / t
            if acc["pearson"] is not None:
                good = [r for r in ok_rows if r["pearson"] is not None and r["pearson"] >= acc["pearson"]]
                if good:
                    b = min(good, key=lambda r: r["time_s"])
                    row["pyinfluence_time_at_accuracy_s"] = b["time_s"]
                    row["pyinfluence_setting_at_accuracy"] = b["label"]
                    row["ratio_at_accuracy"] = b["time_s"] / t
        out.append(row)
        if log and "log" not in kw:
            log(
                f"  peer {pr.library} {pr.method}: "
                + (f"{t:.3f} s" if t is not None else "–")
                + (f", error: {err[:120]}" if err else "")
            )
    return out, None


def run_bench(
    tasks: Optional[Sequence[str]] = None,
    quick: bool = False,
    *,
    repeats: Optional[int] = None,
    seed: int = 0,
    n: Optional[int] = None,
    d: Optional[int] = None,
    m: Optional[int] = None,
    solvers: Optional[Iterable[str]] = None,
    peers: Union[bool, Sequence[str]] = False,
    peer_python: Optional[str] = None,
    peer_timeout_s: float = 600.0,
    scaling: bool = False,
    loo: bool = True,
    loo_deep: bool = False,
    budget_s: Optional[float] = None,
    memory: bool = True,
    progress: ProgressFn = None,
):
    """Run the standard benchmark and return a :class:`~pyinfluence.bench.BenchReport`.

    - ``tasks``: names (default: all six; quick: all but the two CNNs).
    - ``quick``: the small solver grid, 1 repeat, fewer test points on deep tasks, a smaller
      synthetic problem (about a minute on 2 cores).
    - ``repeats``: timed runs per setting (default 3; quick 1); ``budget_s``: stop repeating a
      setting after this many seconds (default 30; quick 10).
    - ``seed``: data split and initial weights; ``n``, ``d``: the synthetic-linear size;
      ``m``: test points per task (default: the task's own).
    - ``solvers``: keep only these families (``linear-exact``, ``exact``, ``cg``, ``lissa``, ...).
    - ``peers``: True (Captum and pyDVL) or a list of library names: run the other libraries on the
      same tasks through :mod:`pyinfluence.bench.peers`; ``peer_python``: the interpreter of a
      separate environment holding them.
    - ``scaling``: also run the exact linear path's scaling sweep
      (:mod:`pyinfluence.bench.scaling`).
    - ``loo`` / ``loo_deep``: leave-one-out retraining checks (linear tasks / also deep tasks).
    - ``progress``: a callable for one-line progress messages.
    """
    from pyinfluence.bench.report import BenchReport, machine_info
    from pyinfluence.bench.tasks import TASKS, make_task

    t_start = time.perf_counter()
    if tasks is None:
        names = [t for t in TASKS if not (quick and t.startswith("digits-cnn"))]
    else:
        if isinstance(tasks, str):
            tasks = [t for t in tasks.split(",")]
        names = [str(t).strip() for t in tasks if str(t).strip()]
        if not names:
            raise ValueError("tasks must name at least one task")
        bad = [t for t in names if t not in TASKS]
        if bad:
            raise ValueError(
                f"tasks: unknown task(s) {', '.join(map(repr, bad))}; choose from {', '.join(TASKS)}"
            )
    reps = _check_repeats(repeats if repeats is not None else (1 if quick else 3))
    budget = _check_budget(budget_s if budget_s is not None else (10.0 if quick else DEFAULT_BUDGET_S))
    fam = _families_filter(solvers)
    if fam is not None:
        known = {LINEAR_EXACT} | {_family_of_class(c) for c in solver_classes()}
        bad = sorted(fam - known)
        if bad:
            raise ValueError(
                f"solvers: unknown solver famil{'y' if len(bad) == 1 else 'ies'} "
                f"{', '.join(map(repr, bad))}; choose from "
                f"{', '.join(sorted(known))}"
            )
    peer_list: list[str] = []
    if peers is True:
        from pyinfluence.bench.peers import PEERS

        peer_list = list(PEERS)
    elif peers:
        peer_list = [peers] if isinstance(peers, str) else list(peers)
    rows: list[dict[str, Any]] = []
    entries: list[dict[str, Any]] = []
    peer_rows: list[dict[str, Any]] = []
    notes: list[str] = []
    refs: dict[str, Any] = {}
    for name in names:
        size: dict[str, Any] = {}
        if name == "synthetic-linear":
            size.update(n=n, d=d)
        if m is not None:
            size["m"] = m
        if progress:
            progress(f"{name}: training ...")
        try:
            task = make_task(name, quick=quick, seed=seed, **size)
        except ValueError:
            raise
        except Exception as exc:  # record and go on with the other tasks
            entries.append({"name": name, "error": _one_line(exc)})
            notes.append(f"{name}: building the task failed: {_one_line(exc)}")
            continue
        entry, trows, ref_up = run_task(
            task,
            quick,
            solvers=fam,
            repeats=reps,
            budget_s=budget,
            memory=memory,
            loo=loo,
            loo_deep=loo_deep,
            progress=progress,
        )
        refs[name] = ref_up
        entries.append(entry)
        rows.extend(trows)
        if peer_list:
            if progress:
                progress(f"{name}: peers ({', '.join(peer_list)}) ...")
            prow, note = _peer_rows(
                task, ref_up, trows, entry.get("loo"), peer_list, peer_python, peer_timeout_s, progress
            )
            peer_rows.extend(prow)
            if note and note not in notes:
                notes.append(note)
    scal = None
    if scaling:
        if progress:
            progress("scaling sweep of the exact linear path ...")
        try:
            from pyinfluence.bench.scaling import scaling_sweep

            scal = scaling_sweep(quick=quick)
        except ImportError as exc:
            notes.append(f"scaling sweep not available: {_one_line(exc)}")
        except Exception as exc:
            notes.append(f"scaling sweep failed: {_one_line(exc)}")
    settings = {
        "quick": quick,
        "repeats": reps,
        "budget_s": budget,
        "seed": seed,
        "tasks": names,
        "solvers": sorted(fam) if fam else None,
        "peers": peer_list,
        "peer_python": peer_python,
        "scaling": scaling,
        "loo": loo,
        "loo_deep": loo_deep,
        "memory": memory,
        "wall_s": None,
    }
    rep = BenchReport(
        rows=rows,
        tasks=entries,
        peers=peer_rows,
        scaling=scal,
        machine=machine_info(),
        settings=settings,
        notes=notes,
    )
    rep._references.update(refs)
    rep.mark_pareto()
    rep.settings["wall_s"] = time.perf_counter() - t_start
    return rep


def _family_of_class(cls: type) -> str:
    if cls.__name__ in ("Exact", "CG", "BlockCG", "LiSSA"):
        return str(getattr(cls, "name", cls.__name__.lower()))
    return cls.__name__.lower()
