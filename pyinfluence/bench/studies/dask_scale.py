"""Study: the exact linear path on Dask at scale (issue 16) — a synthetic logistic problem of N rows × 100
features generated chunk-wise on the workers, against the single-process engine.

The data: X ~ N(0, 1) (N × d, float64) drawn by ``dask.array.random.default_rng(seed)`` chunk by chunk on the
workers, labels y = 1[X w + ε > 0] (w fixed, ε ~ N(0, 1)), never held by one process (the arrays stay lazy:
every pass over the rows draws its chunk again, deterministically). The pipeline, timed phase by phase:

1. ``fit``: :class:`~pyinfluence.LogisticRegression` (l2 = 1e-3) by Newton's method, every pass over the rows
   chunk-wise (one per line-search trial point);
2. ``factor``: :class:`~pyinfluence.LinearInfluence` — H (the fit's last pass, reused) Cholesky-factorised on
   the client;
3. ``influence``: ``up_loss`` of m = 100 test points over all N rows, chunk-wise, reduced on the workers to
   per-test-point totals (the N × m matrix is never stored anywhere);
4. ``top-k``: the 10 most helpful and most harmful training points per test point (per-chunk top-k merged on
   the client);
5. ``self-influence ranking``: the 100 training points of most negative self-influence (``dask.array.argtopk``).

Each pipeline runs on a ``LocalCluster`` of 1 and of 2 worker processes (one thread each: Dask's nanny sets
OMP/OpenBLAS threads to 1), so the ratio shows how the time scales with workers. Besides, a *data pass*
(drawing X and y and summing them, nothing else) measures what the data source alone costs per pass.

The single-process baseline: the same steps with in-memory numpy arrays (``fit`` on numpy, the single-process
engine, ``up_loss`` of the whole set, ``top_k``, ``np.argsort`` of ``self_influence``) on the largest size that
fits in one process (``--baseline-n``, default 10⁶ rows: X is 0.8 GB and the up_loss matrix another 0.8 GB),
with the Dask pipeline on the same rows in the same run for the ratio; the two are checked to agree (top-k
indices, the self-influence top-100, the per-test totals and θ̂).

Peak memory per worker: each worker samples its own RSS every 20 ms (``psutil``) during the pipeline; the table
gives the largest peak over the workers and its excess over the worker's RSS at the start.

    python -m pyinfluence.bench.studies.dask_scale [--n 10000000] [--chunk-rows 250000] [--workers 1 2]
        [--baseline-n 1000000] [--d 100] [--m 100] [--k 10] [--quick] [--json FILE] [--out bench/RESULTS.md]

``--quick`` runs a tiny problem (12 000 rows, the baseline size only; the test suite runs it). The table goes to stdout and, with ``--out``,
to that file's section between ``<!-- dask_scale:start -->`` and ``<!-- dask_scale:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any, Dict, List, Optional

import numpy as np

MODULE = "pyinfluence.bench.studies.dask_scale"
L2 = 1e-3
SEED = 16

# -- per-worker RSS sampling (run on the workers through Client.run) ------------------------------------------
_SAMPLER: Dict[str, Any] = {}


def _start_sampler(interval: float = 0.02) -> int:
    """Starts a thread that records this process's peak RSS; returns the RSS now (bytes)."""
    import psutil

    proc = psutil.Process()
    _stop_sampler()
    state: Dict[str, Any] = {"peak": proc.memory_info().rss, "stop": threading.Event()}
    state["start"] = state["peak"]

    def loop() -> None:
        while not state["stop"].wait(interval):
            state["peak"] = max(state["peak"], proc.memory_info().rss)

    thread = threading.Thread(target=loop, daemon=True, name="pyinfluence-rss-sampler")
    thread.start()
    _SAMPLER.update(state=state, thread=thread)
    return int(state["start"])


def _stop_sampler() -> Optional[Dict[str, int]]:
    """Stops the sampler; returns {"start": RSS at start, "peak": peak RSS} (bytes), or None."""
    state = _SAMPLER.get("state")
    if state is None:
        return None
    state["stop"].set()
    _SAMPLER["thread"].join()
    _SAMPLER.clear()
    import psutil

    state["peak"] = max(state["peak"], psutil.Process().memory_info().rss)
    return {"start": int(state["start"]), "peak": int(state["peak"])}


def _warm_up() -> None:
    import dask.array  # noqa: F401

    import pyinfluence.linear.dask  # noqa: F401


# -- the problem --------------------------------------------------------------------------------------------------
def _true_weights(d: int) -> np.ndarray:
    return np.linspace(-1.0, 1.0, d) * 2.0 / np.sqrt(d)


def make_data(n: int, d: int, chunk_rows: int) -> tuple[Any, Any]:
    """X (n, d) and y (n,) as lazy dask arrays drawn chunk-wise on the workers (deterministic for a seed)."""
    import dask.array as da

    rng = da.random.default_rng(SEED)
    X = rng.standard_normal((n, d), chunks=(chunk_rows, d))
    noise = rng.standard_normal(n, chunks=chunk_rows)
    y = (X @ _true_weights(d) + noise > 0).astype(np.int64)
    return X, y


def make_test(m: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.random.default_rng(SEED + 1)
    Xt = r.standard_normal((m, d))
    return Xt, (Xt @ _true_weights(d) + r.standard_normal(m) > 0).astype(np.int64)


def dask_pipeline(X: Any, y: Any, Xt: np.ndarray, yt: np.ndarray, k: int, top_self: int) -> Dict[str, Any]:
    """The Dask pipeline on the current scheduler: times (s) per phase and the results compared with the baseline."""
    import dask.array as da

    from pyinfluence import LinearInfluence, LogisticRegression

    out: Dict[str, Any] = {"seconds": {}}
    sec = out["seconds"]
    t = time.perf_counter()
    model = LogisticRegression(l2=L2).fit(X, y)
    sec["fit"] = time.perf_counter() - t
    out["n_iter"] = int(model.n_iter_)
    t = time.perf_counter()
    inf = LinearInfluence(model, X, y)
    sec["factor"] = time.perf_counter() - t
    t = time.perf_counter()
    totals = inf.up_loss(Xt, yt).sum(axis=0).compute()  # every score of the m test points, reduced chunk-wise
    sec["influence"] = time.perf_counter() - t
    t = time.perf_counter()
    top = inf.top_k(Xt, yt, k=k)
    sec["top_k"] = time.perf_counter() - t
    t = time.perf_counter()
    ranking = da.argtopk(-inf.self_influence(), top_self).compute()  # most negative first
    sec["self_ranking"] = time.perf_counter() - t
    sec["total"] = sum(sec.values())
    out.update(theta=model.theta_, totals=np.asarray(totals), top=top, ranking=np.asarray(ranking))
    return out


def numpy_pipeline(
    X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray, k: int, top_self: int
) -> Dict[str, Any]:
    """The same steps with the single-process engine on in-memory arrays."""
    from pyinfluence import LinearInfluence, LogisticRegression

    out: Dict[str, Any] = {"seconds": {}}
    sec = out["seconds"]
    t = time.perf_counter()
    model = LogisticRegression(l2=L2).fit(X, y)
    sec["fit"] = time.perf_counter() - t
    out["n_iter"] = int(model.n_iter_)
    t = time.perf_counter()
    inf = LinearInfluence(model, X, y)
    sec["factor"] = time.perf_counter() - t
    t = time.perf_counter()
    totals = inf.up_loss(Xt, yt).sum(axis=0)
    sec["influence"] = time.perf_counter() - t
    t = time.perf_counter()
    top = inf.top_k(Xt, yt, k=k)
    sec["top_k"] = time.perf_counter() - t
    t = time.perf_counter()
    s = inf.self_influence()
    ranking = np.argsort(s, kind="stable")[:top_self]
    sec["self_ranking"] = time.perf_counter() - t
    sec["total"] = sum(sec.values())
    out.update(theta=model.theta_, totals=totals, top=top, ranking=ranking)
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300))


def agreement(got: Dict[str, Any], ref: Dict[str, Any]) -> Dict[str, Any]:
    """How the Dask results agree with the single-process ones (same data)."""
    top, top_ref = got["top"], ref["top"]
    return {
        "theta_rel_diff": _rel(got["theta"], ref["theta"]),
        "totals_rel_diff": _rel(got["totals"], ref["totals"]),
        "top_k_scores_rel_diff": _rel(top.helpful_scores, top_ref.helpful_scores),
        "top_k_indices_equal": bool(
            np.array_equal(top.helpful_idx, top_ref.helpful_idx)
            and np.array_equal(top.harmful_idx, top_ref.harmful_idx)
        ),
        "self_ranking_equal": bool(np.array_equal(np.sort(got["ranking"]), np.sort(ref["ranking"]))),
    }


def run_on_cluster(
    workers: int,
    X: Any,
    y: Any,
    Xt: np.ndarray,
    yt: np.ndarray,
    k: int,
    top_self: int,
    data_pass: bool = True,
) -> Dict[str, Any]:
    """The Dask pipeline on a fresh LocalCluster of ``workers`` processes (one thread each), with the per-worker
    peak RSS, and (``data_pass``) the time of one pass that only draws and sums the data."""
    import dask
    import distributed

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
    client = distributed.Client(cluster)
    try:
        row: Dict[str, Any] = {"workers": workers}
        # warm-up: the workers import pyinfluence, dask.array and the core before anything is timed
        client.run(_warm_up)
        dask.compute(X[:1].sum(), y[:1].sum())
        if data_pass:
            t = time.perf_counter()
            dask.compute(X.sum(), y.sum())
            row["data_pass_s"] = time.perf_counter() - t
        # by reference to this module (imported on the workers), so the sampler's state stays there; run as
        # ``python -m`` these functions belong to __main__ and would be pickled by value
        from pyinfluence.bench.studies import dask_scale as here

        client.run(here._start_sampler)
        res = dask_pipeline(X, y, Xt, yt, k, top_self)
        mem = client.run(here._stop_sampler)
        row.update(seconds=res["seconds"], n_iter=res["n_iter"])
        peaks = [v for v in mem.values() if v]
        row["peak_rss_mib"] = max(v["peak"] for v in peaks) / 2**20
        row["peak_above_start_mib"] = max(v["peak"] - v["start"] for v in peaks) / 2**20
        row["_results"] = res
        return row
    finally:
        client.close()
        cluster.close()


def table(rows: List[Dict[str, Any]]) -> str:
    from pyinfluence._formatting import markdown_table

    phases = ["fit", "factor", "influence", "top_k", "self_ranking", "total"]
    body = []
    for r in rows:
        s = r["seconds"]
        body.append(
            [
                r["engine"],
                f"{r['n']:,}",
                r.get("workers", "–"),
                *(f"{s[p]:.2f}" for p in phases),
                r["n_iter"],
                f"{r['data_pass_s']:.2f}" if "data_pass_s" in r else "–",
                f"{r['peak_rss_mib']:.0f} (+{r['peak_above_start_mib']:.0f})" if "peak_rss_mib" in r else "–",
            ]
        )
    return markdown_table(
        [
            "engine",
            "N",
            "workers",
            "fit (s)",
            "factor (s)",
            "influence, m test points (s)",
            "top-k (s)",
            "self-influence top (s)",
            "total (s)",
            "Newton iterations",
            "one data pass (s)",
            "peak RSS per worker, MiB (above start)",
        ],
        body,
        align="r",
    )


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="rows of the Dask problem (default 10^7)")
    ap.add_argument("--d", type=int, default=100, help="features (default 100)")
    ap.add_argument(
        "--chunk-rows", type=int, default=250_000, help="rows per chunk (default 250 000: 200 MB)"
    )
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker processes to run on")
    ap.add_argument(
        "--baseline-n",
        type=int,
        default=1_000_000,
        help="rows of the single-process comparison (default 10^6)",
    )
    ap.add_argument("--m", type=int, default=100, help="test points")
    ap.add_argument("--k", type=int, default=10, help="top-k per test point")
    ap.add_argument("--top-self", type=int, default=100, help="size of the self-influence ranking")
    ap.add_argument("--quick", action="store_true", help="a tiny problem (seconds)")
    ap.add_argument("--json", default=None, help="write every number to this JSON file")
    ap.add_argument("--out", default=None, help="write the table into this file's 'dask_scale' section")
    a = ap.parse_args(argv)
    if a.quick:
        a.n, a.d, a.chunk_rows, a.baseline_n, a.m, a.k, a.top_self = 12_000, 10, 2_500, 12_000, 5, 3, 20
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import dask.array as da

    Xt, yt = make_test(a.m, a.d)
    rows: List[Dict[str, Any]] = []

    # 1. the single-process baseline and the Dask pipeline on the same rows (the ratio, and the agreement)
    Xb, yb = make_data(a.baseline_n, a.d, a.chunk_rows)
    Xn, yn = da.compute(Xb, yb)  # the baseline holds its data in this process, as a single-process user would
    ref = numpy_pipeline(np.ascontiguousarray(Xn), yn, Xt, yt, a.k, a.top_self)
    rows.append({"engine": "single process (numpy)", "n": a.baseline_n, **ref})
    del Xn, yn
    agree: Dict[str, Any] = {}
    for w in a.workers:
        r = run_on_cluster(w, Xb, yb, Xt, yt, a.k, a.top_self)
        agree[w] = agreement(r.pop("_results"), ref)
        rows.append({"engine": "Dask", "n": a.baseline_n, **r})
    # 2. the full size: Dask only
    if a.n != a.baseline_n:
        X, y = make_data(a.n, a.d, a.chunk_rows)
        for w in a.workers:
            r = run_on_cluster(w, X, y, Xt, yt, a.k, a.top_self)
            r.pop("_results")
            rows.append({"engine": "Dask", "n": a.n, **r})

    text = table(rows)
    base = rows[0]["seconds"]["total"]
    lines = []
    for r in rows[1:]:
        if r["n"] == a.baseline_n:
            lines.append(
                f"At N = {a.baseline_n:,}: Dask on {r['workers']} worker(s) takes {r['seconds']['total'] / base:.2f}× "
                f"the single-process time (same run, same data; the single process used all cores)."
            )
    by_w = {r["workers"]: r["seconds"]["total"] for r in rows if r["engine"] == "Dask" and r["n"] == a.n}
    if 1 in by_w and len(by_w) > 1:
        for w, s in sorted(by_w.items()):
            if w > 1:
                lines.append(
                    f"Scaling at N = {a.n:,}: {w} workers take {s / by_w[1]:.2f}× the time of 1 (ideal 1/{w}); every "
                    f"pass over the rows is chunk-parallel, so time ≈ (passes × per-chunk work) / workers + the serial "
                    f"client part (p × p reductions, Cholesky, Newton steps), until the workers outnumber the cores."
                )
    agree_all = {
        "top_k_indices_equal": all(v["top_k_indices_equal"] for v in agree.values()),
        "self_ranking_equal": all(v["self_ranking_equal"] for v in agree.values()),
        "max_rel_diff": max(
            max(v["theta_rel_diff"], v["totals_rel_diff"], v["top_k_scores_rel_diff"]) for v in agree.values()
        ),
    }
    lines.append(
        f"Agreement with the single-process engine at N = {a.baseline_n:,}: top-k indices "
        f"{'equal' if agree_all['top_k_indices_equal'] else 'DIFFERENT'}, self-influence top-{a.top_self} "
        f"{'equal' if agree_all['self_ranking_equal'] else 'DIFFERENT'}, largest relative difference "
        f"(θ̂, per-test totals, top-k scores) {agree_all['max_rel_diff']:.1e}."
    )
    note = (
        f"Logistic regression, l2 = {L2:g}, d = {a.d} (p = {a.d + 1}), m = {a.m} test points, top-{a.k}; chunks of "
        f"{a.chunk_rows:,} rows ({a.chunk_rows * a.d * 8 / 2**20:.0f} MiB); LocalCluster worker processes with one "
        f"thread each; data drawn on the workers on every pass (the 'one data pass' column: drawing and summing X "
        f"and y only). Machine: {os.cpu_count()} cores."
    )
    print(text)
    print()
    print(note)
    for line in lines:
        print(line)
    plain = [{k: v for k, v in r.items() if k not in ("theta", "totals", "top", "ranking")} for r in rows]
    result = {
        "args": vars(a),
        "rows": plain,
        "runs": [r for r in plain if r["engine"] == "Dask"],
        "agreement": agree_all,
        "agreement_by_workers": {str(w): v for w, v in agree.items()},
        "notes": [note, *lines],
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    if a.out:
        from pyinfluence.bench.studies.results_file import command_line, write_section

        write_section(
            a.out,
            f"## The linear path on Dask ({MODULE})\n\nGenerated by `{command_line(MODULE)}`.\n\n{text}\n\n{note}\n\n"
            + "\n".join(f"- {line}" for line in lines),
            "dask_scale",
        )
    return result


if __name__ == "__main__":
    main()
