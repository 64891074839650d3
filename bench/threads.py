"""Small-call latency with several thread pools loaded (numpy's OpenBLAS, ours, OpenMP, torch).

OpenBLAS and libgomp read their spin settings once, when loaded, so the two configurations run in separate
child processes, alternated several times (the machine is shared and noisy): "polite" is pyinfluence's default
(short spin for its own pools, see pyinfluence/_blas.py); "default spin" forces OpenBLAS's stock 2**28-cycle
spin for our pool (OPENBLAS_THREAD_TIMEOUT=28, GOMP_SPINCOUNT=300000), as a library that does nothing would get.
Each child measures, on a cached digits engine (p = 650): one single-test-point up_loss alone, a 300×300 numpy
matmul alone, a 300×300 torch matmul alone, and the interleaved pairs (numpy; ours) and (torch; ours).

    python bench/threads.py [--rounds 3] [--out bench/RESULTS-threads.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, time, numpy as np, torch
import pyinfluence
from sklearn.datasets import load_digits
X, y = load_digits(return_X_y=True)
X = (X - X.mean(0)) / (X.std(0) + 1e-8)
model = pyinfluence.LogisticRegression(l2=1e-3).fit(X[:1437], y[:1437])
inf = pyinfluence.LinearInfluence(model, X[:1437], y[:1437])
x1, y1 = X[1437], y[1437]
A = np.random.rand(300, 300); T = torch.rand(300, 300)
def med(f, reps=200):
    for _ in range(5): f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1e6)
out = {
  "ours alone": med(lambda: inf.up_loss(x1, y1)),
  "numpy alone": med(lambda: A @ A),
  "torch alone": med(lambda: T @ T),
  "numpy then ours": med(lambda: (A @ A, inf.up_loss(x1, y1))),
  "torch then ours": med(lambda: (T @ T, inf.up_loss(x1, y1))),
}
print(json.dumps(out))
"""


def run(config: str) -> dict:
    env = dict(os.environ)
    for name in ("OPENBLAS_THREAD_TIMEOUT", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        env.pop(name, None)
    if config == "default spin":
        env["OPENBLAS_THREAD_TIMEOUT"] = "28"
        env["GOMP_SPINCOUNT"] = "300000"
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="append a markdown table to this file")
    args = ap.parse_args()
    configs = ["polite", "default spin"]
    results: dict[str, list[dict]] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c in configs:
            results[c].append(run(c))
    keys = list(results[configs[0]][0])
    lines = [
        "| call (median µs, median over rounds) | " + " | ".join(configs) + " | default / polite |",
        "|---|" + "---|" * (len(configs) + 1),
    ]
    for k in keys:
        vals = [sorted(r[k] for r in results[c])[len(results[c]) // 2] for c in configs]
        lines.append(f"| {k} | " + " | ".join(f"{v:.0f}" for v in vals) + f" | {vals[1] / vals[0]:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n## Thread pools: small-call latency (bench/threads.py)\n\n" + table + "\n")


if __name__ == "__main__":
    main()
