"""Study: gradient stores at n and 10·n training examples — build time, and the peak memory of streaming
top-k scoring, which must not grow with n.

A synthetic problem: an MLP 32 → 64 → 10 (p = 2762, float32) and random inputs/labels streamed in batches
from a seeded generator (the data is never held in memory; the TorchInfluence object only supplies the model,
the loss and θ̂, on a small sample). For each size, :meth:`GradientStore.build
<pyinfluence.torch.stores.GradientStore.build>` writes the sparse-JL-projected per-example gradients (k = 256,
s = 4 non-zeros per column, float32 shards of 16 384 rows); then a **fresh child process** opens the store and
runs :meth:`GradientStore.top_k <pyinfluence.torch.stores.GradientStore.top_k>` for m = 16 random queries
(k = 10 per side).

Peak memory is the peak resident set size of the child: its high-water mark ``VmHWM`` is reset just before
scoring by writing ``5`` to ``/proc/self/clear_refs`` (Linux ≥ 4.0) and read from ``/proc/self/status`` after,
so the column is the peak RSS *during* top-k (imports and interpreter excluded); where the reset is not
available (other systems) the child reports ``resource.getrusage`` ``ru_maxrss`` over its whole life instead,
and says so. The rows are streamed by ``np.fromfile`` reads of 32 MiB chunks (not through the memory maps),
so file pages do not count in the RSS; the expected peak is about one chunk (``--chunk-rows``, default 4096
rows = 4 MiB) plus its (m × chunk) scores.

    python -m pyinfluence.bench.studies.gradient_store [--n 20000] [--factor 10] [--out bench/RESULTS.md]

The table goes to stdout and, with ``--out``, to that file's section between ``<!-- gradient_store:start -->``
and ``<!-- gradient_store:end -->``. Defaults run in about a minute on 2 cores and need ~250 MB of temporary
disk (removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

MODULE = "pyinfluence.bench.studies.gradient_store"
D_IN, HIDDEN, CLASSES = 32, 64, 10

CHILD = r"""
import json, os, resource, sys, time
import torch
from pyinfluence.torch.stores import GradientStore
torch.set_num_threads(int(sys.argv[4]))
store = GradientStore.open(sys.argv[1])
m, k, chunk = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
Q = torch.randn(m, store.dim, generator=torch.Generator().manual_seed(0))
store.top_k(Q, k, chunk_rows=64)  # warm-up: first-call allocations of torch kernels
def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    method = "VmHWM reset"
except OSError:
    method = "ru_maxrss (whole process)"
rss_before = status("VmRSS")
t = time.perf_counter()
top = store.top_k(Q, k, chunk_rows=chunk)
seconds = time.perf_counter() - t
peak = status("VmHWM") if method == "VmHWM reset" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
assert top.helpful_idx.shape == (m, k)
print(json.dumps({"seconds": seconds, "rss_before": rss_before, "peak": peak, "method": method}))
"""


def _batches(n: int, batch: int, seed: int) -> Iterator[Any]:
    """Synthetic (inputs, labels) batches, generated on the fly from (seed, batch index)."""
    import torch

    for b, start in enumerate(range(0, n, batch)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + b)
        rows = min(batch, n - start)
        yield torch.randn(rows, D_IN, generator=g), torch.randint(0, CLASSES, (rows,), generator=g)


def _influence() -> Any:
    import torch
    import torch.nn.functional as F
    from torch import nn

    from pyinfluence import TorchInfluence

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES))
    X, y = next(_batches(256, 256, 99))
    return TorchInfluence(
        model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (X, y), l2=1e-3, optimum_tol=None
    )


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def measure(n: int, dim: int, m: int, k: int, threads: int, chunk_rows: int, folder: str) -> dict[str, Any]:
    """Build a store of n examples in ``folder``, then score it in a child process."""
    import torch

    from pyinfluence.torch.stores import GradientStore, SparseJLProjection

    torch.set_num_threads(threads)
    inf = _influence()
    t = time.perf_counter()
    store = GradientStore.build(
        inf,
        folder,
        _batches(n, 1024, 1),
        projection=SparseJLProjection(dim=dim, nnz=4),
        shard_size=16384,
        batch_size=1024,
        overwrite=True,
    )
    build = time.perf_counter() - t
    assert store.n == n
    folder = os.path.abspath(folder)
    res = subprocess.run(  # cwd: a source checkout's pyinfluence/ must not shadow the installed package
        [sys.executable, "-c", CHILD, folder, str(m), str(k), str(threads), str(chunk_rows)],
        capture_output=True,
        text=True,
        check=True,
        cwd=folder,
    )
    child = json.loads(res.stdout.strip().splitlines()[-1])
    return {"n": n, "bytes": _du(folder), "build": build, "shards": store.n_shards, **child}


def table(rows: Sequence[dict[str, Any]]) -> str:
    from pyinfluence._formatting import markdown_table

    mib = 1 << 20
    out = []
    for r in rows:
        out.append(
            [
                f"{r['n']:,}",
                f"{r['bytes'] / mib:.0f}",
                str(r["shards"]),
                f"{r['build']:.1f}",
                f"{r['n'] / r['build']:,.0f}",
                f"{r['seconds']:.2f}",
                f"{r['peak'] / mib:.0f}",
                f"{(r['peak'] - r['rss_before']) / mib:.0f}",
            ]
        )
    return markdown_table(
        [
            "n",
            "store (MiB)",
            "shards",
            "build (s)",
            "build (examples/s)",
            "top-k (s)",
            "peak RSS in top-k (MiB)",
            "above RSS before top-k (MiB)",
        ],
        out,
        align="r",
    )


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="the smaller number of training examples")
    ap.add_argument("--factor", type=int, default=10, help="the larger size is factor × n")
    ap.add_argument("--dim", type=int, default=256, help="projected dimension k")
    ap.add_argument("--queries", type=int, default=16, help="m, the number of queries scored")
    ap.add_argument("--k", type=int, default=10, help="top-k per side")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--chunk-rows", type=int, default=4096, help="rows per streamed chunk in top-k")
    ap.add_argument("--out", default=None, help="write the table into this file's 'gradient_store' section")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyinfluence-store-") as tmp:
        for n in (args.n, args.n * args.factor):
            folder = os.path.join(tmp, f"n{n}")
            rows.append(measure(n, args.dim, args.queries, args.k, args.threads, args.chunk_rows, folder))
    text = table(rows)
    method = rows[-1]["method"]
    note = (
        f"Sparse JL (k = {args.dim}, s = 4), MLP {D_IN}-{HIDDEN}-{CLASSES} (p = "
        f"{D_IN * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES}), float32 shards of 16 384 rows; top-k of "
        f"m = {args.queries} queries, k = {args.k}, chunks of {args.chunk_rows} rows "
        f"({args.chunk_rows * args.dim * 4 / (1 << 20):.0f} MiB), {args.threads} torch thread(s). Peak RSS: {method} in a fresh "
        f"child process per size."
    )
    print(text)
    print()
    print(note)
    if args.out:
        from pyinfluence.bench.studies.results_file import command_line, write_section

        write_section(
            args.out,
            f"## Gradient stores: memory of streaming top-k ({MODULE})\n\nGenerated by "
            f"`{command_line(MODULE)}`.\n\n{text}\n\n{note}",
            "gradient_store",
        )


if __name__ == "__main__":
    main()
