"""Solving with a Cholesky factor: ``torch.cholesky_solve`` against two ``torch.linalg.solve_triangular`` calls.

pyinfluence's torch paths solve (L Lᵀ) X = B with a known factor L in the Exact solver (CUDA, or a build without
the C++ core), the projected-gradient store's scoring, and the leave-out retraining's preconditioner — there with
one column per conjugate-gradient iteration. On the CPU, ``torch.cholesky_solve`` copies L into a column-major
buffer on every call; :func:`pyinfluence.torch.solvers.exact.cholesky_solve` reads L in place. Both are timed side
by side on the same factor (float64, median of repeats), with the largest difference between their results.

Run: ``python -m pyinfluence.bench.studies.cholesky_solve [--sizes 1000,4000,9242] [--columns 1,8,64]
[--out bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from pyinfluence.torch.solvers.exact import cholesky_solve

__all__ = ["main", "render", "run"]


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(
    sizes: Sequence[int], columns: Sequence[int], repeats: int = 5, seed: int = 0
) -> List[Dict[str, Any]]:
    """One row per (p, k): seconds per solve of each implementation, their ratio and the largest difference."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for p in sizes:
        G = torch.randn(p, p, dtype=torch.float64, generator=gen) / p**0.5
        A = G @ G.T
        A.diagonal().add_(1e-2)
        L = torch.linalg.cholesky(A)
        del G, A
        for k in columns:
            B = torch.randn(p, k, dtype=torch.float64, generator=gen)
            t_torch = _median_time(functools.partial(torch.cholesky_solve, B, L), repeats)
            t_ours = _median_time(functools.partial(cholesky_solve, L, B), repeats)
            ref, ours = torch.cholesky_solve(B, L), cholesky_solve(L, B)
            diff = float((ref - ours).abs().max() / ref.abs().max())
            rows.append({"p": p, "k": k, "torch_s": t_torch, "ours_s": t_ours, "speedup": t_torch / t_ours,
                         "max_rel_diff": diff})  # fmt: skip
    return rows


def render(rows: List[Dict[str, Any]], threads: int) -> str:
    lines = [
        "## Cholesky solves on the torch path (`python -m pyinfluence.bench.studies.cholesky_solve`)",
        "",
        f"float64, CPU, {threads} thread(s); seconds per solve (median), `torch.cholesky_solve(B, L)` against "
        "pyinfluence's two triangular solves on the same factor; max |difference| / max |X|.",
        "",
        "| p | columns k | torch.cholesky_solve (s) | two solve_triangular (s) | speed-up | max rel. difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['p']} | {r['k']} | {r['torch_s']:.4f} | {r['ours_s']:.4f} | {r['speedup']:.1f}× | "
            f"{r['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pyinfluence.bench.studies.cholesky_solve", description=__doc__
    )
    ap.add_argument("--sizes", default="1000,4000,9242")
    ap.add_argument("--columns", default="1,8,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="RESULTS.md to update (section 'cholesky-solve')")
    a = ap.parse_args(argv)
    rows = run([int(s) for s in a.sizes.split(",")], [int(s) for s in a.columns.split(",")], a.repeats)
    text = render(rows, torch.get_num_threads())
    print(text)
    if a.out:
        from pyinfluence.bench.studies.results_file import write_section

        write_section(a.out, text, "cholesky-solve")


if __name__ == "__main__":  # pragma: no cover
    main()
