#!/usr/bin/env python
"""Study: pyinfluence's exact linear-model influence (C++/Eigen) against hand-written numpy
(:mod:`pyinfluence.bench.studies.numpy_baseline`).

Both implementations run side by side in ONE process, interleaved (each repeat runs every
implementation of a step once, alternating the order), and we report medians. See bench/README.md
for what each number means.

    python -m pyinfluence.bench.studies.linear_core                 # full run (minutes)
    python -m pyinfluence.bench.studies.linear_core --quick --out /tmp/r.md   # smoke run (< 30 s)
    python -m pyinfluence.bench.studies.linear_core --tasks digits --dtypes float64

Results go to the section of ``--out`` (default bench/RESULTS.md) between the markers
``<!-- linear:start -->`` and ``<!-- linear:end -->`` (replaced if present, appended if not; the rest
of the file is left alone).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import os
import platform
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import scipy.linalg

from pyinfluence._formatting import format_bytes, format_seconds, markdown_table
from pyinfluence.bench._measure import (
    cpu_model,
    hwm_supported,
    rss_peak_delta,
    tracemalloc_peak,
    usable_cores,
)
from pyinfluence.bench._measure import interleaved as _interleaved
from pyinfluence.bench.studies import numpy_baseline as nb
from pyinfluence.bench.studies.results_file import (
    command_line,
    git_state,
    results_dir,
    write_section,
)

MODULE = "pyinfluence.bench.studies.linear_core"

TOPK = 10
L2 = 1e-3
M_TEST = 50


# --------------------------------------------------------------------------------------------------
# timing


def _now() -> float:
    return time.perf_counter()


BUDGET_S: Optional[float] = None  # per step group: stop repeating after this many seconds ...
MIN_REPEATS = 5  # ... once at least this many repeats are done (or all asked for)


def interleaved(
    impls: Dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> Dict[str, np.ndarray]:
    """Wall seconds per repeat of each implementation, timed interleaved
    (:func:`pyinfluence.bench._measure.interleaved`; with --budget, repeating stops once the
    budget is spent and MIN_REPEATS are done)."""
    res = _interleaved(impls, repeats, warmup, budget_s=BUDGET_S, min_repeats=MIN_REPEATS)
    return {nm: wall for nm, (wall, _) in res.items()}


def per_call(impls: Dict[str, Callable[[], object]], calls: int, rounds: int) -> Dict[str, np.ndarray]:
    """Per-call seconds of small calls: `rounds` interleaved rounds of calls/rounds calls each."""
    per_round = max(1, calls // rounds)
    for f in impls.values():  # warm up
        for _ in range(min(per_round, 20)):
            f()

    def batch(f: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(per_round):
                f()

        return run

    res = interleaved({nm: batch(f) for nm, f in impls.items()}, rounds, warmup=0)
    return {nm: t / per_round for nm, t in res.items()}


# --------------------------------------------------------------------------------------------------
# memory

_LIBC: Any = None


def keep_heap() -> bool:
    """Make glibc keep freed memory in the process (no mmap for big blocks, no automatic trimming).

    On the VM this was written on, memory returned to the kernel is reported to the host after
    ~2 s and discarded; touching it again costs ~1.3 ms per MB. A step that allocates a big
    temporary right after the other implementation ran for a few seconds then pays up to 2×
    (measured: building numpy's 800 MB B took 0.23 s after a numpy step, 1.0–1.5 s after a
    pyinfluence step). Keeping the heap removes that order-dependent penalty for both sides;
    memory measurements still work because they call malloc_trim(0) first.
    """
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = bool(_LIBC.mallopt(m_mmap_max, 0))
        return ok and bool(_LIBC.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# --------------------------------------------------------------------------------------------------
# machine


def machine_description(pyinfluence: Any, core: Any) -> Dict[str, str]:
    info: Dict[str, str] = {}
    cpu = cpu_model() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            flags = re.search(r"^flags\s*:\s*(.+)$", f.read(), re.M)
        if flags:
            fl = set(flags.group(1).split())
            cpu += " (" + ", ".join(x for x in ("avx2", "fma", "avx512f") if x in fl) + ")"
    except OSError:
        pass
    info["CPU"] = cpu
    info["cores"] = f"{os.cpu_count()} logical, {usable_cores()} usable by this process"
    try:
        with open("/proc/meminfo") as f:
            mt = re.search(r"MemTotal:\s+(\d+)", f.read())
        if mt:
            info["memory"] = f"{int(mt.group(1)) / 2**20:.1f} GiB"
    except OSError:
        pass
    info["load average at start"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["python"] = platform.python_version()
    import scipy

    info["numpy"] = np.__version__
    info["scipy"] = scipy.__version__
    try:
        import torch

        info["torch"] = torch.__version__ + f" (intra-op threads {torch.get_num_threads()})"
    except ImportError:
        info["torch"] = "not installed"
    info["pyinfluence"] = getattr(pyinfluence, "__version__", "?")
    info["pyinfluence build"] = build_stamp(core)
    info["pyinfluence._core.blas"] = str(getattr(core, "blas", "?"))
    info["pyinfluence._core.has_openmp"] = str(getattr(core, "has_openmp", "?"))
    if hasattr(core, "max_threads"):
        info["pyinfluence._core.max_threads()"] = str(core.max_threads())
    try:
        from threadpoolctl import threadpool_info

        pools = [
            f"{p['internal_api']} {p.get('version') or ''} {os.path.basename(p['filepath'])} "
            f"({p['num_threads']} threads)"
            for p in threadpool_info()
        ]
        info["thread pools loaded"] = "; ".join(pools)
    except ImportError:
        pass
    env = {
        k: os.environ[k]
        for k in (
            "OMP_NUM_THREADS",
            "OPENBLAS_NUM_THREADS",
            "MKL_NUM_THREADS",
            "OMP_WAIT_POLICY",
            "GOMP_SPINCOUNT",
        )
        if k in os.environ
    }
    info["thread env"] = ", ".join(f"{k}={v}" for k, v in env.items()) or "(none set)"
    return info


def build_stamp(core: Any) -> str:
    """Where the compiled core was loaded from, its mtime, and the source tree's git state."""
    path = getattr(core, "__file__", "?")
    try:
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path)).astimezone()
        stamp = mtime.isoformat(timespec="seconds")
    except OSError:
        stamp = "?"
    return f"{os.path.basename(path)} built {stamp}; {git_state(('csrc', 'CMakeLists.txt'))}"


def measure_gemm(n: int, dtypes: List[str], repeats: int) -> Dict[str, np.ndarray]:
    """numpy matmul GFLOP/s on n×n matrices, one entry per repeat."""
    rng = np.random.default_rng(1)
    out = {}
    for dt in dtypes:
        A = rng.standard_normal((n, n)).astype(dt)
        B = rng.standard_normal((n, n)).astype(dt)
        ts = interleaved({"gemm": functools.partial(np.matmul, A, B)}, repeats, warmup=0)["gemm"]
        out[dt] = 2 * n**3 / ts / 1e9
    return out


# --------------------------------------------------------------------------------------------------
# tasks


@dataclass
class Task:
    name: str
    family: str
    K: int
    X: np.ndarray  # float64 training features (n, d), C-contiguous
    y_labels: np.ndarray  # original labels (for the public API)
    y_core: np.ndarray  # float64 encoded labels (0/1 or class index)
    Xt: np.ndarray  # (m, d) test features
    yt_labels: np.ndarray
    yt_core: np.ndarray
    model: Any  # fitted pyinfluence LogisticRegression
    fit_s: float

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def p(self) -> int:
        return self.K * (self.X.shape[1] + 1)


def _fitted_task(
    pyinfluence: Any,
    name: str,
    family: str,
    K: int,
    Xtr: np.ndarray,
    ytr: np.ndarray,
    Xte: np.ndarray,
    yte: np.ndarray,
) -> Task:
    """The task with its model fitted (pyinfluence.LogisticRegression, l2 = L2), fit time recorded."""
    t0 = _now()
    model = pyinfluence.LogisticRegression(l2=L2).fit(Xtr, ytr)
    fit_s = _now() - t0
    return Task(
        name, family, K, Xtr, ytr, ytr.astype(np.float64), Xte, yte, yte.astype(np.float64), model, fit_s
    )


def make_digits(pyinfluence: Any) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0)
    sc = StandardScaler().fit(Xtr)
    Xtr = np.ascontiguousarray(sc.transform(Xtr))
    Xte = np.ascontiguousarray(sc.transform(Xte))[:M_TEST]
    return _fitted_task(pyinfluence, "digits", "multinomial", 10, Xtr, ytr, Xte, yte[:M_TEST])


def make_synthetic(pyinfluence: Any, n: int, d: int) -> Task:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n + M_TEST, d))
    w = rng.standard_normal(d) * (2.0 / np.sqrt(d))
    prob = 1.0 / (1.0 + np.exp(-(X @ w + 0.2)))
    y = (rng.random(n + M_TEST) < prob).astype(np.int64)
    Xtr, Xte = np.ascontiguousarray(X[:n]), np.ascontiguousarray(X[n:])
    del X
    return _fitted_task(pyinfluence, f"synthetic binary n={n} d={d}", "logistic", 1, Xtr, y[:n], Xte, y[n:])


# --------------------------------------------------------------------------------------------------
# one task × dtype


@dataclass
class Row:
    step: str
    flops: float
    pyi: Optional[float]  # median seconds
    numpy: Dict[str, float]  # variant → median seconds
    note: str = ""
    spread: Dict[str, float] = field(default_factory=dict)  # impl → IQR / median
    min_ratio: float = float("nan")  # fastest pyinfluence run / fastest numpy run

    @property
    def np_best(self) -> Tuple[str, float]:
        k = min(self.numpy, key=lambda v: self.numpy[v])
        return k, self.numpy[k]


def _med(ts: np.ndarray) -> float:
    return float(np.median(ts))


def _iqr(ts: np.ndarray) -> float:
    q1, q3 = np.percentile(ts, [25, 75])
    return float((q3 - q1) / max(np.median(ts), 1e-300))


@dataclass
class _Case:
    """One task in one dtype: the arrays both implementations run on, the rows timed so far and
    the repeats each row got."""

    task: Task
    dtype: np.dtype
    core: Any
    X: np.ndarray
    y: np.ndarray
    Xt: np.ndarray
    yt: np.ndarray
    W: np.ndarray
    spec: Any
    prob: Any
    hess_variants: List[str]
    repeats: int
    warm: int
    rows: List[Row] = field(default_factory=list)
    n_rep: List[int] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        return int(self.X.shape[1])

    @property
    def m(self) -> int:
        return int(self.Xt.shape[0])

    def time(self, impls: Dict[str, Callable[[], object]]) -> Dict[str, np.ndarray]:
        return interleaved(impls, self.repeats, self.warm)

    def add(
        self,
        step: str,
        flops: float,
        res: Dict[str, np.ndarray],
        pyi_key: str,
        np_keys: Dict[str, str],
        note: str = "",
    ) -> Row:
        self.n_rep.append(len(res[pyi_key]))
        row = Row(step, flops, _med(res[pyi_key]), {k: _med(res[v]) for k, v in np_keys.items()}, note)
        row.spread = {"pyi": _iqr(res[pyi_key]), "np": _iqr(res[np_keys[row.np_best[0]]])}
        row.min_ratio = float(res[pyi_key].min() / min(res[v].min() for v in np_keys.values()))
        self.rows.append(row)
        return row


def _check_against_numpy(c: _Case, eng: Any, st0: Any) -> Dict[str, str]:
    """Once, before timing: the largest relative differences between pyinfluence and numpy."""
    X, y, W, Xt, yt, prob, core = c.X, c.y, c.W, c.Xt, c.yt, c.prob, c.core
    tol = 1e-8 if c.dtype == np.float64 else 1e-3
    H_core = core.hessian(c.spec, X, y, W)
    errs = {
        f"hessian ({hv})": nb.max_rel_err(nb.HESSIANS[hv](prob, X, y, W), H_core) for hv in c.hess_variants
    }
    U_core = eng.up_loss(Xt, yt)
    for uv, f in nb.UP_LOSS.items():
        errs[f"up_loss ({uv})"] = nb.max_rel_err(f(st0, Xt, yt), U_core)
    errs["self_influence"] = nb.max_rel_err(nb.self_influence(st0), eng.self_influence())
    tk_c = eng.top_k(Xt, yt, TOPK)
    tk_n = nb.top_k(st0, Xt, yt, TOPK)
    errs["top_k scores"] = max(nb.max_rel_err(tk_n[1], tk_c[1]), nb.max_rel_err(tk_n[3], tk_c[3]))
    idx_agree = float(np.mean(np.asarray(tk_c[0]) == tk_n[0]) + np.mean(np.asarray(tk_c[2]) == tk_n[2])) / 2
    worst = max(errs.values())
    return {
        "max relative error vs numpy": (
            f"{worst:.1e} ({'ok' if worst <= tol else 'CHECK'}; "
            + ", ".join(f"{k} {v:.0e}" for k, v in errs.items())
            + ")"
        ),
        "top_k index agreement": f"{idx_agree:.4f}",
    }


def _time_hessian_and_factor(c: _Case) -> str:
    """Hessian assembly, Cholesky factorisation and both together; returns the faster numpy
    Hessian variant. The p × p temporaries live only while this runs."""
    X, y, W, prob, core, spec, hvs = c.X, c.y, c.W, c.prob, c.core, c.spec, c.hess_variants
    n, p = c.n, c.task.p
    H_np = nb.hessian_syrk(prob, X, y, W)
    gauge = nb.gauge_indices(prob, c.d)
    # what both factorisations see: H (+ the multinomial intercept gauge when undamped)
    A_gauged = np.array(H_np, order="C")
    if gauge is not None:
        A_gauged[np.ix_(gauge, gauge)] += nb.GAUGE
    impls: Dict[str, Callable[[], object]] = {
        "pyi hessian": functools.partial(core.hessian, spec, X, y, W),
        "pyi hessian+factor": functools.partial(core.LinearEngine, spec, X, y, W, 0.0),
        "pyi factor": functools.partial(core.CholeskyFactor, A_gauged, 0.0),
    }
    for hv in hvs:
        impls[f"np hessian {hv}"] = functools.partial(nb.HESSIANS[hv], prob, X, y, W)
    impls["np factor"] = functools.partial(nb.factor, H_np, gauge=gauge)
    for hv in hvs:
        impls[f"np hessian+factor {hv}"] = functools.partial(nb.build, prob, X, y, W, hv)
    res = c.time(impls)
    c.add(
        "Hessian assembly",
        n * p * p,
        res,
        "pyi hessian",
        {hv: f"np hessian {hv}" for hv in hvs},
        "pyinfluence: _core.hessian",
    )
    c.add(
        "Cholesky factorisation",
        p**3 / 3,
        res,
        "pyi factor",
        {"cho_factor": "np factor"},
        "pyinfluence: _core.CholeskyFactor (copy + in-place factorisation, as cho_factor)",
    )
    c.add(
        "Hessian + factorisation",
        n * p * p + p**3 / 3,
        res,
        "pyi hessian+factor",
        {hv: f"np hessian+factor {hv}" for hv in hvs},
        "pyinfluence: LinearEngine constructor",
    )
    return min(hvs, key=lambda hv: _med(res[f"np hessian {hv}"]))


def _time_scores(c: _Case, eng: Any, st0: Any) -> str:
    """up_loss, top-k and self-influence; returns the faster numpy up_loss variant."""
    Xt, yt = c.Xt, c.yt
    n, p, m = c.n, c.task.p, c.m
    impls: Dict[str, Callable[[], object]] = {"pyi up_loss": functools.partial(eng.up_loss, Xt, yt)}
    for uv, f in nb.UP_LOSS.items():
        impls[f"np up_loss {uv}"] = functools.partial(f, st0, Xt, yt)
    res = c.time(impls)
    c.add(
        f"up_loss matrix (n×m, m={m})",
        2 * n * p * m,
        res,
        "pyi up_loss",
        {uv: f"np up_loss {uv}" for uv in nb.UP_LOSS},
        "pyinfluence: LinearEngine.up_loss (cached residuals)",
    )
    best_u = min(nb.UP_LOSS, key=lambda uv: _med(res[f"np up_loss {uv}"]))

    res = c.time(
        {
            "pyi top_k": functools.partial(eng.top_k, Xt, yt, TOPK),
            f"np top_k {best_u}": functools.partial(nb.top_k, st0, Xt, yt, TOPK, best_u),
        }
    )
    c.add(
        f"top-k (k={TOPK}, both ends)",
        2 * n * p * m,
        res,
        "pyi top_k",
        {best_u: f"np top_k {best_u}"},
        "numpy: the faster up_loss variant + argpartition",
    )
    res = c.time({"pyi self": eng.self_influence, "np self": functools.partial(nb.self_influence, st0)})
    c.add("self-influence (all n)", n * p * p, res, "pyi self", {"trsm": "np self"})
    return best_u


def _time_end_to_end(c: _Case, pyinfluence: Any, best_u: str) -> None:
    X, y, W, Xt, yt, task = c.X, c.y, c.W, c.Xt, c.yt, c.task
    n, p, m = c.n, task.p, c.m

    def engine() -> object:
        return c.core.LinearEngine(c.spec, X, y, W, 0.0).up_loss(Xt, yt)

    def public() -> object:
        # the public API takes the user's arrays as they are (float32 stays float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            li = pyinfluence.LinearInfluence(task.model, X, task.y_labels)
            return li.up_loss(Xt, task.yt_labels)

    impls: Dict[str, Callable[[], object]] = {"pyi e2e": engine, "pyi public e2e": public}
    for hv in c.hess_variants:
        impls[f"np e2e {hv}"] = functools.partial(nb.end_to_end, c.prob, X, y, W, Xt, yt, hv, best_u)
    res = c.time(impls)
    e2e_flops = n * p * p + p**3 / 3 + 2 * n * p * m
    npk = {hv: f"np e2e {hv}" for hv in c.hess_variants}
    c.add(
        "end to end (H + factor + up_loss)", e2e_flops, res, "pyi e2e", npk, "pyinfluence: _core.LinearEngine"
    )
    c.add(
        "end to end, public API",
        e2e_flops,
        res,
        "pyi public e2e",
        npk,
        "LinearInfluence(model, X, y).up_loss(X_test, y_test)",
    )


def _time_single_query(
    c: _Case, pyinfluence: Any, eng: Any, st0: Any, calls: int
) -> Tuple[Dict[str, float], Tuple[str, str], int]:
    """Per-call time of one single-test-point up_loss, public and engine, against numpy and the
    bare matvec and solve any implementation needs; returns (medians, notes, calls made). The
    n × p gradient matrix numpy caches lives only while this runs."""
    X, Xt, yt, W, prob, task = c.X, c.Xt, c.yt, c.W, c.prob, c.task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = pyinfluence.LinearInfluence(task.model, X, task.y_labels)
    x1m, y1m = np.ascontiguousarray(Xt[:1]), np.ascontiguousarray(yt[:1])
    G = nb.gradients(prob, X, st0.R)
    s1 = nb.s_test(st0, x1m, y1m)[:, 0].copy()
    bare: Callable[[], object]
    np_query: Callable[[], object]
    if task.K == 1:
        bare = functools.partial(np.matmul, X, np.ascontiguousarray(s1[: c.d]))
        bare_note = "X @ s (n×d matvec)"
        np_query = functools.partial(nb.up_loss_factored, st0, x1m, y1m)
        np_query_note = "test gradient + cho_solve + r ∘ (X̃ s)"
    else:
        bare = functools.partial(np.matmul, G, s1)
        bare_note = "G @ s (n×p matvec, G cached)"
        np_query = functools.partial(nb.single_query, st0, G, x1m, y1m)
        np_query_note = "test gradient + cho_solve + G @ s"
    g1 = nb.gradients(prob, x1m, nb.residuals(prob, x1m, y1m, W)[0]).T.copy()
    impls: Dict[str, Callable[[], object]] = {
        "public": functools.partial(inf.up_loss, Xt[0], task.yt_labels[0]),
        "engine": functools.partial(eng.up_loss, x1m, y1m),
        "numpy query": np_query,
        "bare matvec": bare,
        "bare solve": functools.partial(scipy.linalg.cho_solve, st0.cf, g1, check_finite=False),
    }
    rounds = 20 if calls >= 200 else 10
    pc = per_call(impls, calls, rounds)
    calls_done = len(pc["public"]) * max(1, calls // rounds)
    return {k: _med(v) for k, v in pc.items()}, (bare_note, np_query_note), calls_done


def _measure_memory(
    c: _Case, eng: Any, st0: Any, mem_scaling: bool
) -> Tuple[Dict[str, Dict[str, int]], List[Tuple[int, int, int]]]:
    """Peak memory of pyinfluence's and numpy's top-k and self-influence (and pyinfluence's dense
    up_loss); with ``mem_scaling``, pyinfluence's top-k and up_loss on the first n/4, n/2, n rows."""
    X, y, W, Xt, yt = c.X, c.y, c.W, c.Xt, c.yt
    hwm = hwm_supported()
    mem: Dict[str, Dict[str, int]] = {}
    if hwm:
        mem["pyinfluence top_k (streaming)"] = {
            "rss": rss_peak_delta(functools.partial(eng.top_k, Xt, yt, TOPK))
        }
        mem["pyinfluence up_loss (dense n×m)"] = {
            "rss": rss_peak_delta(functools.partial(eng.up_loss, Xt, yt))
        }
        mem["pyinfluence self_influence"] = {"rss": rss_peak_delta(eng.self_influence)}
    for nm, f in (
        ("numpy top_k (factored; dense)", functools.partial(nb.top_k, st0, Xt, yt, TOPK, "factored")),
        ("numpy top_k (G@S; dense)", functools.partial(nb.top_k, st0, Xt, yt, TOPK, "G@S")),
        ("numpy self_influence", functools.partial(nb.self_influence, st0)),
    ):
        mem[nm] = {}
        if c.warm or not hwm:  # large task: VmHWM only (the two agree within 1%)
            mem[nm]["tracemalloc"] = tracemalloc_peak(f)
        if hwm:
            mem[nm]["rss"] = rss_peak_delta(f)
    scaling: List[Tuple[int, int, int]] = []
    if mem_scaling and hwm:
        for frac in (4, 2, 1):
            nn = c.n // frac
            if frac == 1:
                Xs, ys = X, y
            else:
                Xs, ys = np.ascontiguousarray(X[:nn]), np.ascontiguousarray(y[:nn])
            e2 = eng if frac == 1 else c.core.LinearEngine(c.spec, Xs, ys, W, 0.0)
            scaling.append(
                (
                    nn,
                    rss_peak_delta(functools.partial(e2.top_k, Xt, yt, TOPK)),
                    rss_peak_delta(functools.partial(e2.up_loss, Xt, yt)),
                )
            )
            del e2, Xs, ys
    return mem, scaling


def run_case(
    task: Task,
    dtype: str,
    repeats: int,
    pyinfluence: Any,
    core: Any,
    calls: int,
    mem_scaling: bool,
    log: Callable[[str], None],
) -> Dict[str, Any]:
    dt = np.dtype(dtype)
    c = _Case(
        task=task,
        dtype=dt,
        core=core,
        X=task.X if dt == np.float64 else np.ascontiguousarray(task.X, dtype=dt),
        y=np.ascontiguousarray(task.y_core, dtype=dt),
        Xt=np.ascontiguousarray(task.Xt, dtype=dt),
        yt=np.ascontiguousarray(task.yt_core, dtype=dt),
        W=np.ascontiguousarray(task.model.theta_, dtype=dt),
        spec=core.ModelSpec(task.family, task.K, True, False, L2),
        prob=nb.Problem(task.family, task.K, L2),
        hess_variants=["syrk", "kron"] if task.family == "multinomial" else ["syrk"],
        repeats=repeats,
        warm=0,
    )
    c.warm = 0 if c.n * task.p * task.p > 5e9 else 1  # large task: calls take seconds; no untimed warm-up

    # --- correctness (once) -----------------------------------------------------------------------
    eng = core.LinearEngine(c.spec, c.X, c.y, c.W, 0.0)  # raises NotPositiveDefiniteError on failure
    st0 = nb.build(c.prob, c.X, c.y, c.W, "syrk")
    checks = _check_against_numpy(c, eng, st0)

    log(f"  [{task.name} {dtype}] hessian / factor")
    best_h = _time_hessian_and_factor(c)
    log(f"  [{task.name} {dtype}] up_loss / top_k / self_influence")
    best_u = _time_scores(c, eng, st0)
    log(f"  [{task.name} {dtype}] end to end")
    _time_end_to_end(c, pyinfluence, best_u)
    log(f"  [{task.name} {dtype}] per-call overhead")
    percall, percall_note, calls_done = _time_single_query(c, pyinfluence, eng, st0, calls)
    log(f"  [{task.name} {dtype}] memory")
    mem, scaling = _measure_memory(c, eng, st0, mem_scaling)

    n_rep = c.n_rep
    reps = f"{min(n_rep)}–{max(n_rep)}" if min(n_rep) != max(n_rep) else str(n_rep[0])
    return {
        "task": task,
        "dtype": dtype,
        "n": c.n,
        "d": c.d,
        "p": task.p,
        "m": c.m,
        "rows": c.rows,
        "checks": checks,
        "percall": percall,
        "percall_note": percall_note,
        "calls": calls,
        "mem": mem,
        "scaling": scaling,
        "best_h": best_h,
        "best_u": best_u,
        "repeats": reps,
        "calls_done": calls_done,
    }


# --------------------------------------------------------------------------------------------------
# report


def _gf(flops: float, s: Optional[float]) -> Optional[float]:
    if s is None or not s > 0:
        return None
    return flops / s / 1e9


_PERCALL_LABELS = {
    "public": "LinearInfluence.up_loss(x, y) (public API)",
    "engine": "_core.LinearEngine.up_loss(X_test[:1], y_test[:1])",
    "numpy query": "numpy: {query}",
    "bare matvec": "numpy bare matvec: {matvec}",
    "bare solve": "numpy bare solve: scipy.linalg.cho_solve for one right-hand side",
}


def _step_cells(row: Row, g_med: float) -> Tuple[List[str], Optional[float]]:
    """One step's cells of the comparison table, and pyinfluence / the best numpy."""
    v, tn = row.np_best
    ratio = row.pyi / tn if row.pyi is not None and tn > 0 else None
    gp, gn = _gf(row.flops, row.pyi), _gf(row.flops, tn)
    nan = float("nan")
    cells = [
        row.step,
        f"{row.flops / 1e9:.3g}",
        format_seconds(row.pyi),
        f"{format_seconds(tn)} ({v})",
        ("–" if ratio is None else f"{ratio:.2f}") + (" **>1**" if ratio is not None and ratio > 1.0 else ""),
        f"{row.min_ratio:.2f}",
        "–" if gp is None else f"{gp:.1f}",
        "–" if gn is None else f"{gn:.1f}",
        "–" if gp is None else f"{gp / g_med:.0%}",
        f"{row.spread.get('pyi', nan):.0%} / {row.spread.get('np', nan):.0%}",
        ", ".join(f"{k} {format_seconds(s)}" for k, s in row.numpy.items()),
        row.note,
    ]
    return cells, ratio


def render_section(
    results: List[Dict[str, Any]], gemm: Dict[str, Tuple[float, float]], gemm_n: int, title: str, label: str
) -> Tuple[str, List[str]]:
    """Markdown for one thread configuration: (text, list of steps with ratio > 1)."""
    out: List[str] = [f"## {title}", ""]
    flagged: List[str] = []
    out.append(
        f"Dense GEMM rate in this configuration (numpy matmul n={gemm_n}; start and end "
        "of the configuration pooled):\n"
    )
    out.append(
        markdown_table(
            ["dtype", "GFLOP/s median", "best"],
            [[dt, f"{a:.1f}", f"{b:.1f}"] for dt, (a, b) in gemm.items()],
            align="lr",
        )
    )
    out.append("")
    for R in results:
        t: Task = R["task"]
        dt = R["dtype"]
        out.append(
            f"### {t.name} — {dt}  (n={R['n']}, d={R['d']}, p={R['p']}, m={R['m']}; "
            f"median of {R['repeats']} interleaved repeats)\n"
        )
        rows = []
        for row in R["rows"]:
            cells, ratio = _step_cells(row, gemm[dt][0])
            rows.append(cells)
            if ratio is not None and ratio > 1.0:
                flagged.append(
                    f"{label} — {t.name} {dt}: {row.step}: ratio {ratio:.2f} "
                    f"({format_seconds(row.pyi)} vs {format_seconds(row.np_best[1])})"
                )
        out.append(
            markdown_table(
                [
                    "step",
                    "GFLOP",
                    "pyinfluence",
                    "numpy (best variant)",
                    "ratio pyi/numpy",
                    "ratio of minima",
                    "GFLOP/s pyi",
                    "GFLOP/s numpy",
                    "pyi / GEMM rate",
                    "spread pyi / np (IQR/median)",
                    "numpy variants",
                    "note",
                ],
                rows,
                align="lrrrrrrrrrll",
            )
        )
        out.append("")
        pc = R["percall"]
        out.append(
            f"Single-test-point `up_loss` on a cached engine (median per call over "
            f"interleaved rounds, {R['calls_done']} calls each):\n"
        )
        matvec_note, query_note = R["percall_note"]
        floor = pc["bare matvec"] + pc["bare solve"]
        out.append(
            markdown_table(
                ["call", "time", "× bare matvec"],
                [
                    [
                        lab.format(query=query_note, matvec=matvec_note),
                        format_seconds(pc[k]),
                        f"{pc[k] / pc['bare matvec']:.2f}",
                    ]
                    for k, lab in _PERCALL_LABELS.items()
                ]
                + [
                    [
                        "floor: bare matvec + bare solve",
                        format_seconds(floor),
                        f"{floor / pc['bare matvec']:.2f}",
                    ]
                ],
                align="lr",
            )
        )
        out.append(
            f"\nPython-layer overhead (public − engine): "
            f"{format_seconds(pc['public'] - pc['engine'])}; "
            f"engine − floor: {format_seconds(pc['engine'] - floor)}; "
            f"engine / numpy query: {pc['engine'] / pc['numpy query']:.2f}.\n"
        )
        out.append("Peak memory above the resident baseline (results included):\n")
        out.append(
            markdown_table(
                ["computation", "VmHWM delta", "tracemalloc peak"],
                [
                    [nm, format_bytes(v.get("rss")), format_bytes(v.get("tracemalloc"))]
                    for nm, v in R["mem"].items()
                ],
                align="lr",
            )
        )
        if R["scaling"]:
            out.append("\npyinfluence top-k vs dense up_loss memory as n grows (VmHWM delta):\n")
            out.append(
                markdown_table(
                    ["n", "top_k (streaming)", "up_loss (dense n×m)"],
                    [[nn, format_bytes(a), format_bytes(b)] for nn, a, b in R["scaling"]],
                    align="r",
                )
            )
        out.append("\nChecks: " + "; ".join(f"{k}: {v}" for k, v in R["checks"].items()) + "\n")
    return "\n".join(out), flagged


def render_file(
    sections: List[Tuple[str, List[str]]], machine: Dict[str, str], tasks: List[Task], wall: float
) -> str:
    lines = [
        "# pyinfluence linear benchmark: results",
        "",
        f"Generated by `{command_line(MODULE)}` on "
        f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')} "
        f"(wall time {wall:.0f} s). See bench/README.md for what each number means and how "
        "to reproduce.",
        "",
        "## Machine",
        "",
    ]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    lines += [f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]
    lines += [
        "Flop conventions: Hessian assembly n·p² (a SYRK computes one triangle: the "
        "GEMM-equivalent 2·n·p²/2); Cholesky p³/3; up_loss and top-k 2·n·p·m (the scoring "
        "GEMM; the p×m solve and the test gradients are not counted); self-influence n·p² "
        "(triangular solve with n right-hand sides); end to end the sum. GFLOP/s = these "
        "counts / median time; 'pyi / GEMM rate' divides by the median numpy matmul rate "
        "of the same dtype in the same thread configuration. The ratio compares pyinfluence "
        "with the FASTEST numpy variant of the step.",
        "",
    ]
    lines += ["## Steps where pyinfluence is slower than the best numpy (ratio > 1)", ""]
    flagged = [f for _, fl in sections for f in fl]
    lines += [f"- {f}" for f in flagged] or ["- none"]
    lines += [""]
    for text, _ in sections:
        lines += [text, ""]
    fit = ", ".join(f"{t.name}: {t.fit_s:.2f} s" for t in tasks)
    lines += [
        f"Model fits (pyinfluence.LogisticRegression, float64, 1 thread; not part of the comparison): {fit}.",
        "",
    ]
    return "\n".join(lines)


def _apply_threads(cfg: str, core):
    """Limit every thread pool to cfg threads ('default': leave them); returns (handle, title)."""
    if cfg == "default":
        return None, (
            f"Default threads (each library's own setting: core max_threads = {core.max_threads()})"
        )
    nthr = int(cfg)
    # Read every current setting BEFORE limiting anything: torch and the core report the OpenMP
    # setting that threadpoolctl is about to change.
    handle = {"core": core.max_threads() if hasattr(core, "max_threads") else None}
    if "torch" in sys.modules:
        handle["torch"] = sys.modules["torch"].get_num_threads()
    try:
        from threadpoolctl import threadpool_limits

        handle["tpc"] = threadpool_limits(limits=nthr)
    except ImportError:
        handle["tpc"] = None
    if hasattr(core, "set_max_threads"):
        core.set_max_threads(nthr)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(nthr)
    return handle, (
        f"{nthr} thread{'s' if nthr > 1 else ''} per pool (threadpoolctl limits on "
        f"every BLAS and OpenMP pool, _core.set_max_threads({nthr}))"
    )


def _restore_threads(handle, core) -> None:
    if not handle:
        return
    if handle.get("tpc") is not None:
        handle["tpc"].restore_original_limits()
    if handle.get("torch") is not None:
        sys.modules["torch"].set_num_threads(handle["torch"])
    if handle.get("core") is not None:
        core.set_max_threads(handle["core"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run (< 30 s)")
    ap.add_argument(
        "--out",
        default=str(results_dir() / "RESULTS.md"),
        help="markdown file whose 'linear' section is written ('' = none; default: %(default)s)",
    )
    ap.add_argument("--tasks", default="digits,synthetic", help="comma-separated: digits, synthetic")
    ap.add_argument("--dtypes", default="float64,float32", help="comma-separated: float64, float32")
    ap.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved repeats per step (default: 25 digits, 3 synthetic)",
    )
    ap.add_argument("--n", type=int, default=None, help="synthetic task: training points (default 200000)")
    ap.add_argument("--d", type=int, default=None, help="synthetic task: features (default 500)")
    ap.add_argument("--calls", type=int, default=None, help="single-point calls for the overhead measurement")
    ap.add_argument("--gemm-n", type=int, default=None, help="matrix size for the GEMM rate (default 4000)")
    ap.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread configurations to run, each 'default' (the "
        "libraries' own settings) or N (every BLAS/OpenMP/torch pool limited to N "
        "via threadpoolctl and _core.set_max_threads); default: '1'; "
        "bench/RESULTS.md is made with 'default,1'",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds per step group after which repeating stops (at least 5 "
        "repeats); default 10 (3 with --quick); 0 = no budget",
    )
    ap.add_argument(
        "--allocator",
        choices=("keep", "default"),
        default="keep",
        help="'keep' (default): glibc keeps freed memory in the process (mallopt "
        "M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1); 'default': stock glibc settings",
    )
    ap.add_argument(
        "--no-torch",
        action="store_true",
        help="do not start torch's thread pool (torch itself is loaded with the pyinfluence.bench package)",
    )
    args = ap.parse_args(argv)
    t_start = _now()
    q = args.quick
    global BUDGET_S
    budget = args.budget if args.budget is not None else (3.0 if q else 10.0)
    BUDGET_S = budget if budget > 0 else None
    n_syn = args.n or (20000 if q else 200000)
    d_syn = args.d or (100 if q else 500)
    args.gemm_n = args.gemm_n or (1000 if q else 4000)
    task_names = [s.strip() for s in args.tasks.split(",") if s.strip()]
    dtypes = [s.strip() for s in args.dtypes.split(",") if s.strip()]
    if args.threads is None:
        args.threads = "1"
    thread_cfgs = [s.strip() for s in args.threads.split(",") if s.strip()]
    for cfg in thread_cfgs:
        if cfg != "default" and not (cfg.isdigit() and int(cfg) > 0):
            ap.error(f"--threads entries must be 'default' or a positive integer, got {cfg!r}")
    for tk in task_names:
        if tk not in ("digits", "synthetic"):
            ap.error(f"unknown task {tk!r} (digits, synthetic)")
    for dt in dtypes:
        if dt not in ("float64", "float32"):
            ap.error(f"unknown dtype {dt!r} (float64, float32)")

    def log(msg: str) -> None:
        print(f"[{_now() - t_start:6.1f} s] {msg}", file=sys.stderr, flush=True)

    if not args.no_torch:  # start torch's thread pool too: the library's users have it running
        import torch

        (torch.ones(256, 256) @ torch.ones(256, 256)).sum().item()
    import pyinfluence
    from pyinfluence import _core as core

    machine = machine_description(pyinfluence, core)
    if args.allocator == "keep":
        ok = keep_heap()
        machine["allocator"] = (
            "glibc keeps freed memory (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1); see bench/README.md"
            if ok
            else "could not set mallopt; stock glibc settings"
        )
    else:
        machine["allocator"] = "stock glibc settings (--allocator default)"
    tasks_built: List[Task] = []
    # The fits are not measured; one thread is robust on a busy machine.
    fit_limit, _ = _apply_threads("1", core)
    try:
        for tk in task_names:
            log(f"task {tk}: data + model fit")
            tasks_built.append(
                make_digits(pyinfluence) if tk == "digits" else make_synthetic(pyinfluence, n_syn, d_syn)
            )
    finally:
        _restore_threads(fit_limit, core)

    sections = []
    for cfg in thread_cfgs:
        limiter, title = _apply_threads(cfg, core)
        try:
            log(f"[threads={cfg}] GEMM rate (n={args.gemm_n})")
            g1 = measure_gemm(args.gemm_n, dtypes, 2)
            results = []
            for task in tasks_built:
                for dt in dtypes:
                    if args.repeats:
                        reps = args.repeats
                    elif task.family == "multinomial":
                        reps = 5 if q else 25
                    else:
                        reps = 3
                    small = task.family == "multinomial"
                    calls = args.calls or ((200 if q else 2000) if small else 20)
                    results.append(
                        run_case(
                            task,
                            dt,
                            reps,
                            pyinfluence,
                            core,
                            calls,
                            mem_scaling=(task.family == "logistic"),
                            log=log,
                        )
                    )
                    gc.collect()
            log(f"[threads={cfg}] GEMM rate again")
            g2 = measure_gemm(args.gemm_n, dtypes, 1)
        finally:
            _restore_threads(limiter, core)
        gemm = {}
        for dt in dtypes:  # pool start and end: the machine is shared and its speed drifts
            rates = np.concatenate([g1[dt], g2[dt]])
            gemm[dt] = (float(np.median(rates)), float(rates.max()))
        text, flagged = render_section(results, gemm, args.gemm_n, title, f"threads={cfg}")
        print(text, flush=True)
        sections.append((text, flagged))
    stamp_end = build_stamp(core)
    if stamp_end != machine["pyinfluence build"]:
        machine["WARNING"] = (
            f"the compiled core on disk changed during the run (now: "
            f"{stamp_end}); the process kept the one it loaded at the start"
        )
    md = render_file(sections, machine, tasks_built, _now() - t_start)
    if args.out:
        write_section(args.out, md, "linear")
        log(f"wrote the linear section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
