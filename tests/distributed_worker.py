"""The deep path on torch.distributed, run by tests/test_torch_distributed.py.

Under ``torchrun --nproc_per_node=2 tests/distributed_worker.py OUT`` every rank builds the same small problems
(a tiny tanh MLP and a tiny CNN, fixed seeds, trained in float64 on one thread), computes every method with
``distributed=True`` and writes its results to ``OUT/rank<r>/<name>.npy``; then it runs the error cases and
writes what each raised to ``OUT/rank<r>/errors.json``. The test calls :func:`run_methods` in its own process
with ``distributed=None`` for the single-process reference (same problems, same seeds) and compares.

Nothing here is pickled: results are ``.npy`` arrays, error messages JSON.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyinfluence.torch import CG, EKFAC, KFAC, BlockCG, Exact, GaussianProjection, GradientStore, LiSSA
from pyinfluence.torch import TorchInfluence as TI
from pyinfluence.torch.solvers import Arnoldi

N_TRAIN = 31  # odd: the two shards differ in size (15 and 16 examples)
N_TEST = 3
L2 = 1e-2
DAMPING = 0.05
BATCH = 8  # several blocks per shard and per solve
K = 4  # top-k


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def _train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, steps: int = 60) -> None:
    """Full-batch L-BFGS on mean cross-entropy + (l2/2)‖θ‖², deterministic on one thread."""
    params = [p for p in model.parameters()]
    opt = torch.optim.LBFGS(params, lr=0.5, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = cross_entropy(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    opt.step(closure)


def make_mlp() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A 5-6-3 tanh MLP (p = 57) fitted to 31 points of a random linear 3-class problem; 3 test points."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N_TRAIN + N_TEST, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = (X @ W + 0.5 * torch.randn(N_TRAIN + N_TEST, 3, generator=g, dtype=torch.float64)).argmax(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    _train(model, X[:N_TRAIN], y[:N_TRAIN])
    return model, (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def make_cnn() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """A conv(1→2, 3×3)-tanh-linear(32→3) CNN (p = 119) on 31 random 6×6 images; 3 test images."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(N_TRAIN + N_TEST, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + N_TEST,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).double()
    _train(model, X[:N_TRAIN], y[:N_TRAIN], steps=40)
    return model, (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])


def solvers() -> dict[str, Any]:
    """The solvers compared; LiSSA and the sampled Fisher with fixed seeds."""
    return {
        "exact": Exact(),
        "cg": CG(tol=1e-12),
        "block_cg": BlockCG(tol=1e-12),
        "lissa": LiSSA(depth=100, repeats=2, batch_size=8, seed=5, raise_on_nonconvergence=False),
        "kfac": KFAC(),
        "ekfac": EKFAC(),
        "ekfac_sampled": EKFAC(fisher="sampled", samples=2, seed=7),
        "arnoldi": Arnoldi(rank=20, block_size=4),
    }


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def _methods(
    inf: TI, test: tuple[torch.Tensor, torch.Tensor], prefix: str, out: dict[str, np.ndarray]
) -> None:
    Xt, yt = test
    out[f"{prefix}.up_loss"] = _np(inf.up_loss(Xt, yt))
    out[f"{prefix}.self_influence"] = _np(inf.self_influence())
    out[f"{prefix}.sub_up_loss"] = _np(inf.up_loss(Xt, yt, train_idx=[30, 0, 7, 7, 12]))
    top = inf.top_k(Xt, yt, k=K)
    for f in ("helpful_idx", "helpful_scores", "harmful_idx", "harmful_scores"):
        out[f"{prefix}.top_k.{f}"] = _np(getattr(top, f))
    out[f"{prefix}.grad_norm"] = np.asarray(inf.grad_norm_)


def run_methods(distributed: Any, tmp: Path) -> dict[str, np.ndarray]:
    """Every method on the MLP (all solvers), the CNN (Exact, CG, EK-FAC), streamed training data (a DataLoader
    over a map-style Dataset, a list of batches) and a gradient store; one process or this rank's view."""
    out: dict[str, np.ndarray] = {}
    model, train, test = make_mlp()
    kw: dict[str, Any] = dict(
        l2=L2, damping=DAMPING, batch_size=BATCH, optimum_tol=None, distributed=distributed
    )
    for name, solver in solvers().items():
        inf = TI(model, cross_entropy, train, solver=solver, **kw)
        _methods(inf, test, f"mlp.{name}", out)
        if name in ("exact", "cg"):
            out[f"mlp.{name}.up_params"] = _np(inf.up_params([3, 4, 30]))
        if name == "cg":  # saved by rank 0, loaded by every rank: the loaded object's HVPs are sharded again
            inf.save(tmp / "cg_saved")
            loaded = TI.load(tmp / "cg_saved", model, cross_entropy, train, distributed=distributed)
            out["mlp.cg.loaded_is_sharded"] = np.array([loaded.distributed is not None])
            out["mlp.cg.loaded_self_influence"] = _np(loaded.self_influence([0, 9, 30]))
        if name == "exact":
            out["mlp.exact.hessian"] = _np(inf.hessian())
            out["mlp.exact.pert_loss"] = _np(inf.pert_loss(*test, train_idx=[1, 2, 29]))
            out["mlp.exact.gradients"] = _np(inf.gradients())
            out["mlp.exact.loo_change"] = _np(inf.loo_change(*test))
            out["mlp.exact.s_test"] = _np(inf.s_test(*test))
            # a gradient store (Gaussian projection, float64 rows, shards of 8 rows: 4 shards, 2 per rank)
            store = GradientStore.build(
                inf,
                tmp / "store",
                projection=GaussianProjection(dim=16, seed=0),
                shard_size=8,
                dtype=torch.float64,
            )
            q = store.project_vectors(inf.s_test(*test).T)
            out["store.rows"] = store.rows()
            out["store.queries"] = _np(q)
            out["store.scores"] = _np(store.scores(q))
            top = store.top_k(q, k=K)
            out["store.top_k.helpful_idx"] = _np(top.helpful_idx)
            out["store.top_k.harmful_scores"] = _np(top.harmful_scores)
            pinf = store.projected_influence()
            out["store.projected.fisher"] = _np(pinf.fisher())
            phi = store.project_test(inf, *test)
            out["store.projected.up_loss"] = _np(pinf.up_loss(phi))
            out["store.projected.self_influence"] = _np(pinf.self_influence())
            out["store.data_sha256"] = np.array([e["data_sha256"] for e in store.manifest["shards"]])
            # the same store built from a list of batches passed as data (read by every rank, converted where owned)
            batches = [(train[0][s : s + 5], train[1][s : s + 5]) for s in range(0, N_TRAIN, 5)]
            store2 = GradientStore.build(
                inf, tmp / "store2", batches, projection=GaussianProjection(dim=16, seed=0), shard_size=8,
                dtype=torch.float64,
            )  # fmt: skip
            out["store2.rows"] = store2.rows()
    cnn, ctrain, ctest = make_cnn()
    for name, solver in (("exact", Exact()), ("cg", CG(tol=1e-12)), ("ekfac", EKFAC())):
        _methods(TI(cnn, cross_entropy, ctrain, solver=solver, **kw), ctest, f"cnn.{name}", out)
    # streamed training data: a DataLoader over a map-style Dataset (read by index), a list of batches
    ds = torch.utils.data.TensorDataset(*train)
    loader = torch.utils.data.DataLoader(ds, batch_size=6, shuffle=False)
    lists = [(train[0][s : s + 7], train[1][s : s + 7]) for s in range(0, N_TRAIN, 7)]
    for sname, src in (("loader", loader), ("list", lists)):
        for name, solver in (("cg", CG(tol=1e-12)), ("ekfac", EKFAC())):
            inf = TI(model, cross_entropy, src, solver=solver, stream=True, **kw)
            _methods(inf, test, f"stream_{sname}.{name}", out)
    return out


def _error_of(fn: Callable[[], Any]) -> dict[str, str] | None:
    try:
        fn()
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return None


def run_errors(rank: int) -> dict[str, Any]:
    """The error cases, each expected to raise the same error on every rank."""
    from pyinfluence.torch.distributed import DistributedContext

    model, train, test = make_mlp()
    kw: dict[str, Any] = dict(l2=L2, damping=DAMPING, batch_size=BATCH, optimum_tol=None, distributed=True)
    errors: dict[str, Any] = {}
    X, y = train[0].clone(), train[1].clone()
    if rank == 1:
        X[21, 0] += 1.0  # not among the first examples, but among the evenly spaced ones the digest reads
    errors["different_train_data"] = _error_of(lambda: TI(model, cross_entropy, (X, y), **kw))
    errors["different_n"] = _error_of(
        lambda: TI(model, cross_entropy, (train[0][: 30 + rank], train[1][: 30 + rank]), **kw)
    )
    errors["too_few_examples"] = _error_of(
        lambda: TI(model, cross_entropy, (train[0][:1], train[1][:1]), **kw)
    )
    errors["wrong_world_size"] = _error_of(
        lambda: TI(model, cross_entropy, train, **{**kw, "distributed": DistributedContext(rank, 3)})
    )
    inf = TI(model, cross_entropy, train, solver=CG(tol=1e-10), **kw)
    Xt = test[0].clone()
    if rank == 1:
        Xt[0, 0] += 1.0
    errors["different_X_test"] = _error_of(lambda: inf.up_loss(Xt, test[1]))
    errors["different_train_idx"] = _error_of(lambda: inf.self_influence(train_idx=[0, 1 + rank]))
    # still usable after the refused calls: the ranks are in step
    errors["after"] = _np(inf.up_loss(*test)).tolist()
    return errors


def main(out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    root = Path(out_dir)
    mine = root / f"rank{rank}"
    mine.mkdir(parents=True, exist_ok=True)
    try:
        results = run_methods(True, root / "shared")
        for name, arr in results.items():
            np.save(mine / f"{name}.npy", arr, allow_pickle=False)
        errors = run_errors(rank)
        with open(mine / "errors.json", "w", encoding="utf-8") as f:
            json.dump(errors, f, indent=1)
    finally:
        dist.destroy_process_group()
    # The threads left once the group is destroyed: gloo's ("gloo_tcp_loop", "pt_gloo_runloop") must be gone, or a
    # worker thread releasing a collective's tensors can race the interpreter's shutdown (SIGABRT). They stay when
    # torch.distributed.nn is imported after init_process_group (pyinfluence.torch imports it first; see
    # pyinfluence/torch/distributed.py); this module imports pyinfluence.torch at the top, as users should.
    task = Path("/proc/self/task")
    threads = [(t / "comm").read_text().strip() for t in task.iterdir()] if task.is_dir() else None
    with open(mine / "done", "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "threads_after_destroy": threads}, f)


if __name__ == "__main__":
    main(sys.argv[1])
