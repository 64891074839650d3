"""Hessian-vector products at the machine's rate, across model sizes (issue 15, item 0).

For digits MLPs from ~2k to ~10⁶ parameters (64-h-10 and 64-h-h-10, tanh, float64, trained by L-BFGS on the
1437 standardised digits training images, l2 = 1e-3, damping 1e-2), side by side in one process:

1. one r-column HVP over the whole training set, H V (p, r), in each mode of
   :meth:`pyinfluence.torch.functional.FunctionalModel.hvp_rows` ("autograd", "revrev", "fwdrev"), through
   the operator's own blocking (:meth:`HessianOperator.matvec`, the "auto" mode the solvers use), and a plain
   baseline written here: ``vmap`` over the columns of ``jvp(grad(mean loss))`` on the whole set at once;
2. the s_test solve for 10 test points with :class:`~pyinfluence.BlockCG` (defaults, tol 1e-8) against a
   plain batched CG written here (one independent CG recursion per column, all columns in one vmapped
   forward-over-reverse HVP per iteration, tolerance 1e-8 on each column's recursive residual): time,
   iterations, HVP columns and the agreement of the two solutions.

GFLOP/s are nominal: 8·n·p·r floating-point operations per r-column HVP over n examples (forward 2np, first
backward 4np, the directional second pass ~2np more, counting the dominant matrix products only; the issue's
own count for the 85k model gives the same 8). Compare them with the machine's GEMM rate (torch float64 ≈ 47
GFLOP/s on this 2-core machine, DESIGN.md §5).

Run: ``python -m pyinfluence.bench.studies.hvp_rate [--sizes 32 128 256x2 1024x2] [--cols 10] [--repeats 3]
[--out FILE.json]``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

L2 = 1e-3
DAMPING = 1e-2


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-8
    f = torch.float64
    return (
        torch.tensor((Xtr - mu) / sd, dtype=f),
        torch.tensor(ytr),
        torch.tensor((Xte - mu) / sd, dtype=f),
        torch.tensor(yte),
    )


def _mlp(spec: str) -> nn.Module:
    """ "256x2" → 64-256-256-10, "128" → 64-128-10 (tanh)."""
    width, _, depth = spec.partition("x")
    h, d = int(width), int(depth or 1)
    layers: list[nn.Module] = []
    fan_in = 64
    for _ in range(d):
        layers += [nn.Linear(fan_in, h), nn.Tanh()]
        fan_in = h
    layers.append(nn.Linear(fan_in, 10))
    return nn.Sequential(*layers).double()


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, iters: int = 300) -> float:
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-9, history_size=30)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    start = time.perf_counter()
    opt.step(closure)
    return time.perf_counter() - start


def _plain_hvp(model: nn.Module, X: torch.Tensor, y: torch.Tensor):
    """The baseline: V (p, r) ↦ (H + λI) V with vmap over columns of jvp(grad(R)), R = mean loss + l2 term."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def objective(th: torch.Tensor) -> torch.Tensor:
        ps = {n: t.reshape(s) for n, t, s in zip(names, torch.split(th, sizes), shapes)}
        return F.cross_entropy(functional_call(model, ps, (X,)), y) + 0.5 * L2 * (th * th).sum()

    g = grad(objective)

    def hvp(V: torch.Tensor) -> torch.Tensor:
        return vmap(lambda v: jvp(g, (theta,), (v,))[1], in_dims=1, out_dims=1)(V) + DAMPING * V

    return hvp


def _plain_batched_cg(
    hvp, B: torch.Tensor, tol: float = 1e-8, max_iter: int = 1000
) -> tuple[torch.Tensor, int, int]:
    """Independent CG per column, all active columns in one HVP call. Returns (X, iterations, HVP columns)."""
    Xs = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rr = (R * R).sum(0)
    stop = (tol * B.norm(dim=0)) ** 2
    cols = 0
    it = 0
    active = rr > stop
    while bool(active.any()) and it < max_iter:
        idx = active.nonzero().flatten()
        AP = hvp(P[:, idx])
        cols += int(idx.numel())
        alpha = rr[idx] / (P[:, idx] * AP).sum(0)
        Xs[:, idx] += alpha * P[:, idx]
        R[:, idx] -= alpha * AP
        rr_new = (R[:, idx] ** 2).sum(0)
        P[:, idx] = R[:, idx] + (rr_new / rr[idx]) * P[:, idx]
        rr[idx] = rr_new
        active = rr > stop
        it += 1
    return Xs, it, cols


def _with_previous_defaults(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` under the HVP defaults before issue 15 (torch.autograd's double backward for up to 32
    columns, blocks of at most 64 columns), tuned on the 2.4k-parameter model only: the A/B baseline."""
    from pyinfluence.torch import functional, hessian

    saved = functional._AUTOGRAD_MAX_ROWS, hessian._AUTOGRAD_MAX_ROWS, hessian._MAX_COLUMNS
    functional._AUTOGRAD_MAX_ROWS = hessian._AUTOGRAD_MAX_ROWS = 32
    hessian._MAX_COLUMNS = 64
    try:
        return fn(*args)
    finally:
        functional._AUTOGRAD_MAX_ROWS, hessian._AUTOGRAD_MAX_ROWS, hessian._MAX_COLUMNS = saved


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run(sizes: list[str], cols: int = 10, repeats: int = 3, solve: bool = True) -> list[dict[str, Any]]:
    from pyinfluence import BlockCG, TorchInfluence

    Xtr, ytr, Xte, yte = _digits()
    n = Xtr.shape[0]
    rows: list[dict[str, Any]] = []
    for spec in sizes:
        torch.manual_seed(0)
        model = _mlp(spec)
        p = sum(q.numel() for q in model.parameters())
        train_s = _train(model, Xtr, ytr)
        inf = TorchInfluence(
            model,
            lambda out, t: F.cross_entropy(out, t, reduction="none"),
            (Xtr, ytr),
            l2=L2,
            damping=DAMPING,
            solver=BlockCG(),
            optimum_tol=None,
        )
        op, fm = inf.operator, inf.operator.fm
        gen = torch.Generator().manual_seed(1)
        V = torch.randn(p, cols, generator=gen, dtype=torch.float64)
        flops = 8.0 * n * p * cols
        row: dict[str, Any] = {"model": f"64-{spec.replace('x', '×')}-10", "p": p, "n": n, "train_s": train_s}
        plain = _plain_hvp(model, Xtr, ytr)
        Vt = V.t().contiguous()
        timings: dict[str, Callable[[], Any]] = {
            "matvec (auto, blocked)": functools.partial(op.matvec, V),
            "plain vmap(jvp(grad))": functools.partial(plain, V),
        }
        for mode in ("autograd", "revrev", "fwdrev"):
            timings[f"hvp_rows {mode} (one block)"] = functools.partial(fm.hvp_rows, Vt, Xtr, ytr, mode)
        timings["matvec (previous defaults)"] = functools.partial(_with_previous_defaults, op.matvec, V)
        for fn in timings.values():
            fn()  # warm-up
        best = dict.fromkeys(timings, float("inf"))
        for _ in range(repeats):  # interleaved rounds: drift and other processes hit every variant alike
            for name, fn in timings.items():
                best[name] = min(best[name], _best(fn, 1))
        for name, t in best.items():
            row[f"hvp_s[{name}]"] = t
            row[f"gflops[{name}]"] = flops / t / 1e9
        # the same numbers (the baseline adds damping; matvec does not)
        ref = plain(V) - DAMPING * V
        row["hvp_max_rel_diff"] = float((op.matvec(V) - ref).norm() / ref.norm())
        if solve:
            G = inf.test_gradients(Xte[:10], yte[:10]).t().contiguous()  # (p, 10)
            start = time.perf_counter()
            S = inf.s_test(Xte[:10], yte[:10])
            row["block_cg_s"] = time.perf_counter() - start
            last = inf.last_solve
            assert last is not None
            row["block_cg_iterations"] = last.iterations
            row["block_cg_hvp_columns"] = last.info.get("matvec_columns")
            inf.clear_cache()
            start = time.perf_counter()
            _with_previous_defaults(inf.s_test, Xte[:10], yte[:10])
            row["block_cg_previous_defaults_s"] = time.perf_counter() - start
            start = time.perf_counter()
            S2, it, ncols = _plain_batched_cg(plain, G)
            row["plain_cg_s"] = time.perf_counter() - start
            row["plain_cg_iterations"] = it
            row["plain_cg_hvp_columns"] = ncols
            row["solutions_rel_diff"] = float((S - S2).norm() / S2.norm())
            row["speedup_block_cg_vs_plain_cg"] = row["plain_cg_s"] / row["block_cg_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    names = [k[len("hvp_s[") : -1] for k in rows[0] if k.startswith("hvp_s[")]
    head = "| model | p | " + " | ".join(f"{n}: s (GFLOP/s)" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in rows:
        cells = [f"{r[f'hvp_s[{n}]']:.3f} ({r[f'gflops[{n}]']:.1f})" for n in names]
        lines.append(f"| {r['model']} | {r['p']:,} | " + " | ".join(cells) + " |")
    if "block_cg_s" in rows[0]:
        lines += [
            "",
            "| model | BlockCG s (iters, HVP cols) | BlockCG, previous HVP defaults s | plain batched CG s "
            "(iters, HVP cols) | plain / BlockCG | solutions differ |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['block_cg_s']:.2f} ({r['block_cg_iterations']}, {r['block_cg_hvp_columns']}) | "
                f"{r['block_cg_previous_defaults_s']:.2f} | "
                f"{r['plain_cg_s']:.2f} ({r['plain_cg_iterations']}, {r['plain_cg_hvp_columns']}) | "
                f"{r['speedup_block_cg_vs_plain_cg']:.2f}× | {r['solutions_rel_diff']:.1e} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["32", "128", "256x2", "1024x2"])
    ap.add_argument("--cols", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-solve", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    rows = run(a.sizes, a.cols, a.repeats, solve=not a.no_solve)
    text = markdown(rows)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {"rows": rows, "threads": torch.get_num_threads(), "torch": torch.__version__}, f, indent=1
            )


if __name__ == "__main__":
    main()
