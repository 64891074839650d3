"""Study: the scale ladder — every influence method on models from 2·10³ to 2.4·10⁶ parameters and training
sets up to 10⁵ examples: time, peak memory and agreement with a reference.

    python -m pyinfluence.bench.studies.scale_ladder                      # every rung (hours on 2 cores)
    python -m pyinfluence.bench.studies.scale_ladder --rungs mlp-2k,mlp-85k --out /tmp/ladder.json
    python -m pyinfluence.bench.studies.scale_ladder --quick --out /tmp/quick.json   # smoke run, ~15 min

The rungs (trained models, training sets, test points) are defined in :mod:`pyinfluence.bench.ladder`. On
each rung, the quantity compared is the full ``up_loss`` matrix (n_train × m_test) in pyinfluence's
convention, ``up_loss[i, j] = −∇L(z_test_j)ᵀ (H + λI)⁻¹ ∇L(z_i)`` with H the Hessian of the mean training
loss plus the l2 term, and the methods are

- every pyinfluence solver registered in ``pyinfluence.torch.solvers._SOLVERS`` (iterated at run time, so
  solvers added later are included) at its default settings, except ``raise_on_nonconvergence=False``
  where the solver has that field (a solve that misses its tolerance is still scored; its residual is
  recorded), ``Exact`` only where p ≤ 10⁴; plus ``BlockCG(preconditioner="ekfac")``;
- kronfluence 1.0.1 EK-FAC and K-FAC, pyDVL 0.10 block CG (``CgInfluence(solve_simultaneously=True)``)
  and rank-50 Arnoldi, through :func:`pyinfluence.bench.peers.run_peers` (normalised to our convention
  there), where they are installed (``--peer-python`` / ``$PYINFLUENCE_PEER_PYTHON``).

**Time** is the method's own work: for pyinfluence, ``TorchInfluence(...)`` construction (data checks and
the optimum check's gradient pass) + ``prepare()`` + ``up_loss(test)``; for a peer, its fit + scores
(:class:`~pyinfluence.bench.peers.PeerRun`). Training the rung's model is timed apart
(``train_time_s``) and not counted; neither are imports, data loading and a warm-up of torch's one-off
first-use costs (the same warm-up for every method).

**Peak memory**: every method — pyinfluence's as well as the peers', and the reference — runs in a fresh
process of its own (``python -m pyinfluence.bench.studies.scale_ladder --worker DIR`` for ours, the peer
worker for theirs), which loads the saved rung (no pickle: JSON + ``.npz``), and reports the process's
resident high-water mark (VmHWM) after the method: ``peak_mem_mb`` (imports, data and model included,
what the operating system had to provide) and ``delta_mem_mb`` = peak − the resident size just before
the method's work (what the method itself added). Measuring in one long-running process would mix up the
methods' peaks (the high-water mark only rises) and its allocator's cached memory.

**Agreement** with the reference (``pyinfluence.bench.ladder.reference_up_loss``: torch.func only, exact
where p ≤ 10⁴ (2000 with ``--quick``), else CG to a relative residual of 1e-9 on the same H + λI; its own
process, time and memory are reported too): Pearson and Spearman r over all entries, the top-10 overlap per test point (the mean
over the 10 most helpful and the 10 most harmful training points of |A ∩ B|/10) and its mean, and the
fitted slope b = Σ est·ref / Σ ref² (least squares of the method's matrix on the reference, through
the origin: 1 = the right scale).

Results: a JSON document (``--out``; default ``bench/scale_ladder.json`` for a full run, nothing for
``--quick`` without ``--out``) and a markdown table on stdout. Each method has a time limit
(``--timeout``, default 1800 s; the reference ``--reference-timeout``, default 6 h: on the GPT rung each CG
iteration costs ten HVP columns over the training set, ~10 s each on one core): a method killed, failing or
returning non-finite numbers is a row with its error. Every process uses ``--threads`` torch threads
(default 1: the machine is shared; the peers get the same).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Sequence
from typing import Any, Callable, Optional

import numpy as np

MODULE = "pyinfluence.bench.studies.scale_ladder"
SCHEMA = "pyinfluence.scale_ladder/1"
DEFAULT_TIMEOUT_S = 1800.0
QUICK_TIMEOUT_S = 300.0
#: Values of ``--reference``.
REFERENCE_METHODS = ("auto", "exact", "cg", "none")

#: The reference's own time limit (the GPT rung's CG to 1e-9 takes hours on one CPU core).
DEFAULT_REFERENCE_TIMEOUT_S = 6 * 3600.0
TOP_K = 10
#: With --quick the reference is exact only up to this many parameters (CG to 1e-9 above).
QUICK_EXACT_MAX_PARAMS = 2000

#: The peer methods of the ladder (``run_peers``'s ``methods=``): kronfluence EK-FAC / K-FAC, pyDVL block
#: CG and rank-50 Arnoldi, at the settings of ``pyinfluence.bench.peers.PEER_METHODS``.
PEER_LADDER_METHODS: list[dict[str, Any]] = [
    {"library": "kronfluence", "method": "ekfac", "label": "kronfluence EK-FAC", "settings": {}},
    {"library": "kronfluence", "method": "kfac", "label": "kronfluence K-FAC", "settings": {}},
    {
        "library": "pydvl",
        "method": "CgInfluence",
        "label": "pyDVL CgInfluence(block)",
        "settings": {"solve_simultaneously": True, "rtol": 1e-4, "atol": 1e-6},
    },
    {
        "library": "pydvl",
        "method": "ArnoldiInfluence",
        "label": "pyDVL ArnoldiInfluence(rank 50)",
        "settings": {"batch_size": 256, "rank": 50},
    },
]


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# ==============================================================================================
# agreement metrics
# ==============================================================================================
def slope_through_origin(est: Any, ref: Any) -> float:
    """b minimising ‖est − b·ref‖² over all entries: Σ est·ref / Σ ref² (NaN for a zero reference or
    non-finite entries). 1 = the method has the reference's scale; K-FAC-type approximations are often
    several times off."""
    from pyinfluence.bench.metrics import as_matrix

    a, b = as_matrix(est, "est"), as_matrix(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"est and ref must have the same shape, got {a.shape} and {b.shape}")
    den = float((b * b).sum())
    if not den > 0 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.nan
    return float((a * b).sum()) / den


def topk_overlap_per_test(est: Any, ref: Any, k: int = TOP_K) -> list[float]:
    """Per test point j (column): ( |helpful_est ∩ helpful_ref| + |harmful_est ∩ harmful_ref| ) / (2k), the
    k most negative (helpful) and most positive (harmful) entries of the column (k capped at n; ties: the
    lower training index first, as :func:`pyinfluence.bench.metrics.topk_sets`)."""
    from pyinfluence.bench.metrics import as_matrix, topk_sets

    a, b = as_matrix(est, "est"), as_matrix(ref, "ref")
    if a.shape != b.shape:
        raise ValueError(f"est and ref must have the same shape, got {a.shape} and {b.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if not np.isfinite(a).all():
        return [math.nan] * a.shape[1]
    kk = min(int(k), a.shape[0])
    he, ha = topk_sets(a, kk)
    hr, rr = topk_sets(b, kk)
    return [
        (len(set(he[j]) & set(hr[j])) + len(set(ha[j]) & set(rr[j]))) / (2.0 * kk) for j in range(a.shape[1])
    ]


def agreement(est: Any, ref: Any, k: int = TOP_K) -> dict[str, Any]:
    """Pearson, Spearman (over all entries), ``top10`` (the mean of ``top10_per_test``), ``top10_per_test``,
    ``slope`` (:func:`slope_through_origin`) and ``max_rel_err`` of ``est`` against ``ref`` (both (n, m))."""
    from pyinfluence.bench.metrics import max_rel_err, pearson, spearman

    per = topk_overlap_per_test(est, ref, k)
    return {
        "pearson": pearson(est, ref),
        "spearman": spearman(est, ref),
        "top10": float(np.mean(per)) if per else math.nan,
        "top10_per_test": per,
        "slope": slope_through_origin(est, ref),
        "max_rel_err": max_rel_err(est, ref),
    }


# ==============================================================================================
# the methods
# ==============================================================================================
def pyinfluence_methods(n_params: int, sampled_fisher: bool = False) -> list[dict[str, Any]]:
    """The pyinfluence settings run on a rung of ``n_params`` parameters: ``{"label", "solver" (a key of
    ``_SOLVERS``), "settings" (the solver's configuration as JSON, for
    :func:`~pyinfluence.torch.solvers.solver_from_config`), "skip" (None or why not)}``, one per registered
    solver (Exact skipped above 10⁴ parameters), plus BlockCG with an EK-FAC preconditioner where
    BlockCG has that field. ``sampled_fisher``: K-FAC / EK-FAC (and the preconditioner) take the Monte
    Carlo true Fisher (``fisher="sampled"``), as for language models whose T·V outputs per example make the
    exact expectation unaffordable (KFAC refuses "true" above 512 outputs per example)."""
    from pyinfluence.bench.ladder import EXACT_MAX_PARAMS
    from pyinfluence.torch.solvers import _SOLVERS

    out: list[dict[str, Any]] = []

    def settings_for(cls: type, extra: dict) -> dict:
        names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
        s = {"raise_on_nonconvergence": False} if "raise_on_nonconvergence" in names else {}
        s.update({k: v for k, v in extra.items() if k in names})
        return s

    fisher = {"fisher": "sampled"} if sampled_fisher else {}
    for key, cls in _SOLVERS.items():
        skip = None
        if key == "exact" and n_params > EXACT_MAX_PARAMS:
            skip = f"p = {n_params} > {EXACT_MAX_PARAMS}: the dense Hessian is not affordable"
        extra = fisher if key in ("kfac", "ekfac") else {}
        out.append({"label": key, "solver": key, "settings": settings_for(cls, extra), "skip": skip})
    ekfac_cls: Any = _SOLVERS.get("ekfac")
    ekfac_fields = (
        {f.name for f in dataclasses.fields(ekfac_cls)} if dataclasses.is_dataclass(ekfac_cls) else set()
    )
    if "residual_columns" in ekfac_fields:
        # EK-FAC with its checks sized for scale: no Lanczos search of the true H, the residual and
        # curvature of 8 solution columns (the defaults cost 40 single-column HVPs and one HVP per test point)
        s = settings_for(ekfac_cls, {**fisher, "lanczos_steps": 0, "residual_columns": 8})
        out.append({"label": "ekfac (scale checks)", "solver": "ekfac", "settings": s, "skip": None})
    if "block_cg" in _SOLVERS:  # at pyDVL's block-CG tolerance (rtol 1e-4): the equal-accuracy comparison
        s = settings_for(_SOLVERS["block_cg"], {"tol": 1e-4})
        out.append({"label": "block_cg tol=1e-4", "solver": "block_cg", "settings": s, "skip": None})
    bcg = _SOLVERS.get("block_cg")
    if (
        bcg is not None
        and dataclasses.is_dataclass(bcg)
        and "preconditioner" in {f.name for f in dataclasses.fields(bcg)}
    ):
        pre: Any = (
            {"solver": "ekfac", "config": {**fisher, "lanczos_steps": 0}} if sampled_fisher else "ekfac"
        )
        s = settings_for(bcg, {"preconditioner": pre})
        out.append({"label": "block_cg+ekfac", "solver": "block_cg", "settings": s, "skip": None})
    return out


# ==============================================================================================
# one method in a process of its own
# ==============================================================================================
def _status_mb(key: str) -> Optional[float]:
    from pyinfluence.bench._measure import status_kb

    kb = status_kb(key)
    return kb / 1024.0 if kb >= 0 else None


def _worker_main(run_dir: str) -> int:
    """``--worker RUN_DIR``: run ``RUN_DIR/job.json`` (``rung_dir``, ``kind`` "reference" | "pyinfluence",
    ``solver``, ``settings``, ``num_threads``, ``warm_up``) and write ``RUN_DIR/result.json`` (always) and
    ``RUN_DIR/up_loss.npy`` (on success)."""
    t_start = time.perf_counter()
    res: dict[str, Any] = {"error": None, "traceback": None, "warnings": []}
    try:
        with open(os.path.join(run_dir, "job.json")) as f:
            job = json.load(f)
        import torch

        from pyinfluence.bench._peer_worker import _warm_up
        from pyinfluence.bench.ladder import load_rung, reference_up_loss

        torch.set_num_threads(int(job.get("num_threads") or 1))
        torch.manual_seed(0)
        rung = load_rung(job["rung_dir"])
        if job.get("warm_up", True):
            _warm_up(torch.float64)
        res["load_s"] = time.perf_counter() - t_start
        res["baseline_mem_mb"] = _status_mb("VmRSS")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if job["kind"] == "reference":
                t0 = time.perf_counter()
                up, info = reference_up_loss(rung, **job.get("settings", {}))
                res["time_s"] = time.perf_counter() - t0
                res["info"] = info
            else:
                up = _run_pyinfluence(rung, job["solver"], job.get("settings", {}), res)
        res["peak_mem_mb"] = _status_mb("VmHWM")
        res["warnings"] = [f"{w.category.__name__}: {str(w.message)[:300]}" for w in caught[:20]]
        if not np.isfinite(up).all():
            raise FloatingPointError(f"non-finite up_loss entries: {int((~np.isfinite(up)).sum())}")
        np.save(os.path.join(run_dir, "up_loss.npy"), up, allow_pickle=False)
    except BaseException as e:
        msg = str(e).strip().splitlines()
        res["error"] = f"{type(e).__name__}: {msg[0][:600] if msg else ''}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["total_s"] = time.perf_counter() - t_start
    if res.get("peak_mem_mb") is None:
        res["peak_mem_mb"] = _status_mb("VmHWM")
    from pyinfluence._json import jsonable

    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(jsonable(res), f, indent=1)
    return 0


def _run_pyinfluence(rung: Any, solver_key: str, settings: dict, res: dict) -> np.ndarray:
    """TorchInfluence with solver ``_SOLVERS[solver_key](**settings)`` on the rung; times its construction,
    ``prepare()`` and ``up_loss`` and returns the (n, m) matrix."""
    from pyinfluence.torch.influence import TorchInfluence
    from pyinfluence.torch.solvers import solver_from_config

    solver = solver_from_config(solver_key, settings)
    t0 = time.perf_counter()
    inf = TorchInfluence(
        rung.model,
        rung.loss_fn,
        rung.train_data(),
        params=rung.params,
        l2=rung.l2,
        damping=rung.damping,
        solver=solver,
        stream=False,
    )
    t1 = time.perf_counter()
    inf.prepare()
    t2 = time.perf_counter()
    up = inf.up_loss(rung.test_data())
    t3 = time.perf_counter()
    res.update(construct_s=t1 - t0, prepare_s=t2 - t1, score_s=t3 - t2, time_s=t3 - t0)
    last = inf.last_solve
    if last is not None:
        conv = last.info.get("converged")
        res["info"] = {
            "solver": repr(solver),
            "max_residual": last.max_residual,
            "iterations": last.iterations,
            "converged": None if conv is None else bool(np.all(np.asarray(_as_list(conv)))),
            "matvec_columns": last.info.get("matvec_columns"),
            "grad_norm": inf.grad_norm_,
        }
    return up.detach().cpu().double().numpy()


def _as_list(v: Any) -> Any:
    """A tensor / array / list of booleans as a list (for ``np.all``)."""
    if hasattr(v, "detach"):
        return v.detach().cpu().numpy().tolist()
    return v


def _launch(
    run_dir: str, job: dict, timeout_s: float
) -> tuple[Optional[np.ndarray], dict[str, Any]]:  # pragma: no cover - exercised through run_ladder
    """Run one job in a fresh ``python -m MODULE --worker`` process (its own session, killed — it and
    its children only — after ``timeout_s``); returns (up_loss or None, result dict)."""
    run_dir = os.path.abspath(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "job.json"), "w") as f:
        json.dump(job, f, indent=1)
    t0 = time.perf_counter()
    with open(os.path.join(run_dir, "output.log"), "w") as out:
        # cwd = the job's folder: `python -m` puts the working directory first on sys.path, and a source
        # checkout's pyinfluence/ (without the compiled core of a non-editable install) must not shadow the
        # installed package
        proc = subprocess.Popen(
            [sys.executable, "-m", MODULE, "--worker", run_dir],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=run_dir,
        )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                proc.kill()
            proc.wait()
            return None, {"error": f"timeout: no result after {timeout_s:g} s (killed)", "wall_s": timeout_s}
    wall = time.perf_counter() - t0
    path = os.path.join(run_dir, "result.json")
    if not os.path.exists(path):
        with open(os.path.join(run_dir, "output.log"), errors="replace") as f:
            tail = f.read()[-800:]
        why = (
            "killed by SIGKILL (out of memory?)"
            if proc.returncode == -signal.SIGKILL
            else f"exit {proc.returncode}"
        )
        return None, {"error": f"worker died without a result ({why}): {tail}", "wall_s": wall}
    with open(path) as f:
        res = json.load(f)
    res["wall_s"] = wall
    up = None
    if res.get("error") is None:
        up = np.load(os.path.join(run_dir, "up_loss.npy"), allow_pickle=False)
    return up, res


# ==============================================================================================
# the ladder
# ==============================================================================================
def _row(
    rung: str, library: str, method: str, res: dict, up: Optional[np.ndarray], ref: Optional[np.ndarray]
) -> dict:
    peak, base = res.get("peak_mem_mb"), res.get("baseline_mem_mb")
    row: dict[str, Any] = {
        "rung": rung,
        "library": library,
        "method": method,
        "status": "ok" if res.get("error") is None and up is not None else "error",
        "error": res.get("error"),
        "time_s": res.get("time_s"),
        "peak_mem_mb": peak,
        "delta_mem_mb": (peak - base) if peak is not None and base is not None else None,
        "details": {k: v for k, v in res.items() if k not in ("error", "time_s", "peak_mem_mb")},
    }
    if up is not None and ref is not None:
        if up.shape != ref.shape:
            row.update(status="error", error=f"scores of shape {up.shape}, expected {ref.shape}")
        else:
            row.update(agreement(up, ref))
    return row


def run_rung(
    name: str,
    *,
    quick: bool = False,
    seed: int = 0,
    work_dir: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    reference_timeout_s: Optional[float] = None,
    num_threads: int = 1,
    peers: Sequence[str] = ("kronfluence", "pydvl"),
    peer_python: Optional[str] = None,
    methods: Optional[Sequence[str]] = None,
    warm_up: bool = True,
    progress: Callable[[str], None] = log,
    test_points: Optional[int] = None,
    reference: str = "auto",
    reference_tol: float = 1e-9,
) -> dict[str, Any]:
    """Train rung ``name``, compute its reference and run every method on it; returns its JSON entry
    (``rung`` info, ``reference`` {label, time_s, peak/delta memory, max_residual, error}, ``rows``).

    ``test_points``: m (default: the rung's, 10). ``reference``: "auto" (exact up to 10⁴ parameters, else
    CG), "exact", "cg" (to ``reference_tol``) or "none" (no agreement columns: a timing-only run).

    ``methods``: labels to run (pyinfluence: the ``_SOLVERS`` keys and ``"block_cg+ekfac"``; peers: the
    labels of :data:`PEER_LADDER_METHODS`); None = all. ``peers``: which peer libraries (empty = none).
    ``timeout_s``: each method's limit; ``reference_timeout_s``: the reference's (default: the larger of
    ``timeout_s`` and 6 h)."""
    import torch

    from pyinfluence.bench.ladder import EXACT_MAX_PARAMS, make_rung
    from pyinfluence.bench.peers import run_peers

    progress(f"[{name}] training ...")
    threads = torch.get_num_threads()
    try:  # training runs here, with the methods' thread count; the global RNG is left as it was
        torch.set_num_threads(max(1, int(num_threads)))
        with torch.random.fork_rng(devices=[]):
            rung = make_rung(name, quick=quick, seed=seed, m_test=test_points)
    finally:
        torch.set_num_threads(threads)
    rung_dir = os.path.abspath(os.path.join(work_dir, name))
    rung.save(rung_dir)
    p = rung.n_params
    entry: dict[str, Any] = {
        "rung": name,
        "description": rung.description,
        "n_params": p,
        "n_train": int(rung.X_train.shape[0]),
        "m_test": int(rung.X_test.shape[0]),
        "l2": rung.l2,
        "damping": rung.damping,
        "params": "all"
        if rung.params is None
        else f"{len(rung.params)} tensors (nn.Linear weights and biases)",
        "info": rung.info,
    }
    progress(f"[{name}] p = {p}, n = {entry['n_train']}, trained in {rung.info.get('train_time_s', 0):.1f} s")
    base_job = {"rung_dir": rung_dir, "num_threads": int(num_threads), "warm_up": bool(warm_up)}
    ref: Optional[np.ndarray] = None
    if reference == "none":
        entry["reference"] = {"label": "none (timing-only run)", "method": "none"}
    else:
        progress(f"[{name}] reference ...")
        # auto: exact where p ≤ 10⁴ (2000 with --quick, to keep the smoke run short), else CG
        ref_method = reference
        if reference == "auto":
            ref_method = "exact" if p <= (QUICK_EXACT_MAX_PARAMS if quick else EXACT_MAX_PARAMS) else "cg"
        ref_job = {
            **base_job,
            "kind": "reference",
            "settings": {"method": ref_method, "tol": float(reference_tol)},
        }
        ref_limit = (
            reference_timeout_s
            if reference_timeout_s is not None
            else max(timeout_s, DEFAULT_REFERENCE_TIMEOUT_S)
        )
        ref, rres = _launch(os.path.join(rung_dir, "reference"), ref_job, float(ref_limit))
        peak, base = rres.get("peak_mem_mb"), rres.get("baseline_mem_mb")
        entry["reference"] = {
            **(rres.get("info") or {}),
            "time_s": rres.get("time_s"),
            "peak_mem_mb": peak,
            "delta_mem_mb": (peak - base) if peak is not None and base is not None else None,
            "error": rres.get("error"),
        }
        progress(
            f"[{name}] reference: " + (rres["error"] if rres.get("error") else f"{rres['time_s']:.3g} s")
        )
    rows: list[dict[str, Any]] = []
    for k, meth in enumerate(pyinfluence_methods(p, sampled_fisher=bool(rung.dict_batches))):
        if methods is not None and meth["label"] not in methods:
            continue
        if meth["skip"]:
            rows.append(
                {
                    "rung": name,
                    "library": "pyinfluence",
                    "method": meth["label"],
                    "status": "skipped",
                    "error": meth["skip"],
                    "settings": meth["settings"],
                }
            )
            continue
        progress(f"[{name}] pyinfluence {meth['label']} ...")
        job = {**base_job, "kind": "pyinfluence", "solver": meth["solver"], "settings": meth["settings"]}
        up, res = _launch(os.path.join(rung_dir, f"run{k:02d}"), job, timeout_s)
        row = _row(name, "pyinfluence", meth["label"], res, up, ref)
        row["settings"] = meth["settings"]
        rows.append(row)
        progress(f"[{name}] pyinfluence {meth['label']}: " + _summary(row))
    peer_methods = [m for m in PEER_LADDER_METHODS if m["library"] in peers]
    if methods is not None:
        peer_methods = [m for m in peer_methods if m["label"] in methods]
    if peer_methods:
        prs = run_peers(
            rung.as_task(),
            peers=tuple(dict.fromkeys(m["library"] for m in peer_methods)),
            peer_python=peer_python,
            timeout_s=timeout_s,
            methods=peer_methods,
            num_threads=num_threads,
            warm_up=warm_up,
            log=progress,
        )
        for r in prs:
            res = {"error": r.error, "time_s": r.time_s, "peak_mem_mb": r.peak_mem_mb, **r.details}
            row = _row(name, r.library, r.method, res, r.up_loss, ref)
            row["settings"] = r.settings
            rows.append(row)
    entry["rows"] = rows
    return entry


def _summary(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {row.get('error')}"
    pr = row.get("pearson")
    return (
        f"{row['time_s']:.3g} s, Pearson {pr:.4f}"
        if pr is not None and pr == pr
        else f"{row['time_s']:.3g} s"
    )


def run_ladder(
    rungs: Sequence[str],
    *,
    quick: bool = False,
    seed: int = 0,
    timeout_s: Optional[float] = None,
    reference_timeout_s: Optional[float] = None,
    num_threads: int = 1,
    peers: Sequence[str] = ("kronfluence", "pydvl"),
    peer_python: Optional[str] = None,
    methods: Optional[Sequence[str]] = None,
    keep_dir: Optional[str] = None,
    warm_up: bool = True,
    progress: Callable[[str], None] = log,
    checkpoint: Optional[str] = None,
    test_points: Optional[int] = None,
    reference: str = "auto",
    reference_tol: float = 1e-9,
) -> dict[str, Any]:
    """The study's JSON document (schema ``pyinfluence.scale_ladder/1``): ``created``, ``machine``,
    ``settings``, ``rungs`` (one :func:`run_rung` entry each), ``wall_s``. Rungs are saved (and the
    workers' files kept) under ``keep_dir`` if given, else in a temporary folder removed at the end.
    ``checkpoint``: a JSON file rewritten after every rung (the document so far), so that an interrupted
    run keeps the rungs it finished."""
    from pyinfluence.bench.ladder import RUNGS
    from pyinfluence.bench.report import machine_info

    if reference not in REFERENCE_METHODS:
        raise ValueError(f"reference must be one of {', '.join(REFERENCE_METHODS)}, got {reference!r}")
    if not (isinstance(reference_tol, (int, float)) and 0 < reference_tol < 1):
        raise ValueError(f"reference_tol must be a float in (0, 1), got {reference_tol!r}")
    bad = [r for r in rungs if r not in RUNGS]
    if bad or not rungs:
        raise ValueError(f"rungs must be a non-empty list among {', '.join(RUNGS)}; unknown: {bad}")
    t0 = time.perf_counter()
    timeout = float(timeout_s if timeout_s is not None else (QUICK_TIMEOUT_S if quick else DEFAULT_TIMEOUT_S))
    if keep_dir is not None:
        os.makedirs(keep_dir, exist_ok=True)
        base = tempfile.mkdtemp(prefix="ladder-", dir=keep_dir)
    else:
        base = tempfile.mkdtemp(prefix="pyinfluence-ladder-")
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "settings": {
            "quick": quick,
            "seed": seed,
            "timeout_s": timeout,
            "reference_timeout_s": reference_timeout_s,
            "num_threads": num_threads,
            "peers": list(peers),
            "peer_python": peer_python or os.environ.get("PYINFLUENCE_PEER_PYTHON"),
            "methods": None if methods is None else list(methods),
            "rungs": list(rungs),
            "test_points": test_points,
            "reference": reference,
            "reference_tol": reference_tol,
        },
        "rungs": [],
    }
    try:
        for name in rungs:
            doc["rungs"].append(
                run_rung(
                    name,
                    quick=quick,
                    seed=seed,
                    work_dir=base,
                    timeout_s=timeout,
                    reference_timeout_s=reference_timeout_s,
                    num_threads=num_threads,
                    peers=peers,
                    peer_python=peer_python,
                    methods=methods,
                    warm_up=warm_up,
                    progress=progress,
                    test_points=test_points,
                    reference=reference,
                    reference_tol=reference_tol,
                )
            )
            if checkpoint:
                from pyinfluence._json import jsonable

                tmp = checkpoint + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(jsonable(doc), f, indent=1)
                os.replace(tmp, checkpoint)
    finally:
        if keep_dir is None:
            shutil.rmtree(base, ignore_errors=True)
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def markdown(doc: dict[str, Any]) -> str:
    """The document as markdown: one table per rung (method, time, peak and added memory, agreement)."""
    from pyinfluence._formatting import markdown_table

    parts = []
    for e in doc["rungs"]:
        ref = e.get("reference") or {}
        info = e.get("info") or {}
        parts.append(
            f"### {e['rung']}: {e['description']}\n\n"
            f"p = {e['n_params']}, n = {e['n_train']}, m = {e['m_test']}, l2 = {e['l2']:g}, "
            f"damping = {e['damping']:g}; training {_fmt(info.get('train_time_s'))} s (not counted). "
            f"Reference: {ref.get('label', '–')}, {_fmt(ref.get('time_s'))} s, peak "
            f"{_fmt(ref.get('peak_mem_mb'), 4)} MB, max residual {_fmt(ref.get('max_residual'))}"
            + (f" — error: {ref['error']}" if ref.get("error") else "")
            + "\n"
        )
        rows = []
        for r in e["rows"]:
            note = r.get("error") or ""
            res = (r.get("details") or {}).get("info") or {}
            if not note and res.get("max_residual") is not None:
                note = f"residual {res['max_residual']:.2g}"
            rows.append(
                [
                    r["library"],
                    r["method"],
                    _fmt(r.get("time_s")),
                    _fmt(r.get("peak_mem_mb"), 4),
                    _fmt(r.get("delta_mem_mb"), 4),
                    _fmt(r.get("pearson"), 4),
                    _fmt(r.get("spearman"), 4),
                    _fmt(r.get("top10"), 3),
                    _fmt(r.get("slope"), 3),
                    note[:90],
                ]
            )
        parts.append(
            markdown_table(
                [
                    "library",
                    "method",
                    "time s",
                    "peak MB",
                    "added MB",
                    "Pearson",
                    "Spearman",
                    "top-10",
                    "slope",
                    "note",
                ],
                rows,
                align="llrrrrrrrl",
            )
        )
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if len(args_in) == 2 and args_in[0] == "--worker":
        return _worker_main(args_in[1])
    from pyinfluence.bench.ladder import RUNGS

    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--rungs", default=",".join(RUNGS), help=f"comma-separated, among {', '.join(RUNGS)} (default: all)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    ap.add_argument(
        "--out", default=None, help="JSON file (default bench/scale_ladder.json; none with --quick)"
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="seconds per method (default 1800; 300 with --quick)"
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads of every method's process (default 1)"
    )
    ap.add_argument(
        "--reference-timeout",
        type=float,
        default=None,
        help="seconds for the reference (default: max(--timeout, 6 h))",
    )
    ap.add_argument("--peers", default="kronfluence,pydvl", help="peer libraries ('' = none)")
    ap.add_argument("--peer-python", default=None, help="interpreter of the venv holding the peers")
    ap.add_argument("--methods", default=None, help="comma-separated method labels to run (default: all)")
    ap.add_argument(
        "--keep", default=None, metavar="DIR", help="keep the saved rungs and the workers' files here"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-points", type=int, default=None, help="test points m per rung (default 10)")
    ap.add_argument(
        "--reference",
        default="auto",
        choices=REFERENCE_METHODS,
        help="auto: exact up to 10⁴ parameters, else CG; none: time and memory only",
    )
    ap.add_argument("--reference-tol", type=float, default=1e-9, help="the CG reference's tolerance")
    a = ap.parse_args(args_in)
    rungs = [r.strip() for r in a.rungs.split(",") if r.strip()]
    out = a.out
    if out is None and not a.quick:
        from pyinfluence.bench.studies.results_file import results_dir

        out = str(results_dir() / "scale_ladder.json")
    doc = run_ladder(
        rungs,
        quick=a.quick,
        seed=a.seed,
        timeout_s=a.timeout,
        reference_timeout_s=a.reference_timeout,
        num_threads=a.threads,
        peers=[p.strip() for p in a.peers.split(",") if p.strip()],
        peer_python=a.peer_python,
        methods=None if a.methods is None else [m.strip() for m in a.methods.split(",") if m.strip()],
        keep_dir=a.keep,
        checkpoint=out or None,
        test_points=a.test_points,
        reference=a.reference,
        reference_tol=a.reference_tol,
    )
    if out:
        from pyinfluence._json import jsonable

        with open(out, "w") as f:
            json.dump(jsonable(doc), f, indent=1)
        log(f"wrote {out}")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
