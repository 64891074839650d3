"""The deep path on torch.distributed (pyinfluence.torch.distributed; issue 16, item 2).

One ``torchrun --standalone --nproc_per_node=2`` launch (gloo, CPU) of tests/distributed_worker.py computes every
method on two ranks; this module runs the same problems in one process and compares (float64: relative
difference ≤ 1e-10 for every solver — LiSSA and the sampled Fisher with fixed seeds draw the same minibatches and
targets on both ranks as in one process), checks that both ranks return the same full results, checks the Exact
and CG results against an independent torch.func computation (dense Hessian, Cholesky solve) and the store's
scores against numpy formulas, and checks the errors for ranks that disagree. The quick tests below need no
second process: sharding of in-memory and streamed data (rank views without collectives), the option's
validation, and a one-rank process group against the single-process path.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import distributed_worker as worker
import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.func import functional_call, grad, jacrev, vmap

from pyinfluence.torch import CG, Exact
from pyinfluence.torch import TorchInfluence as TI
from pyinfluence.torch.batches import StreamingData
from pyinfluence.torch.data import TensorData
from pyinfluence.torch.distributed import DistributedContext, ShardedData, resolve_distributed, split_range

from helpers import flat_parameters

WORKER = Path(__file__).with_name("distributed_worker.py")
TOL = 1e-10  # relative, float64


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b| (0 when b is 0 and a equals it)."""
    scale = float(np.abs(b).max()) if b.size else 0.0
    diff = float(np.abs(a - b).max()) if b.size else 0.0
    return diff / scale if scale > 0 else diff


# ==============================================================================================
# two ranks under torchrun against one process
# ==============================================================================================
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """(the torchrun output folder, the single-process results): the launch runs while this process computes."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(WORKER),
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # LiSSA's ConvergenceWarning, if any: both runs see the same
            ref = worker.run_methods(None, tmp_path_factory.mktemp("single"))
    finally:
        torch.set_num_threads(before)
        try:
            log, _ = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
    assert proc.returncode == 0, log if len(log) <= 12000 else log[:6000] + "\n[...]\n" + log[-6000:]
    return out, ref


@pytest.mark.slow
def test_two_ranks_match_one_process_and_each_other(runs: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, ref = runs
    for rank in (0, 1):
        done = json.loads((out / f"rank{rank}" / "done").read_text(encoding="utf-8"))
        # destroy_process_group() freed the group: no gloo thread left to race the interpreter's exit
        if done["threads_after_destroy"] is not None:  # None: no /proc (not Linux)
            assert not [t for t in done["threads_after_destroy"] if "gloo" in t], (rank, done)
    solvers = {k.split(".")[1] for k in ref if k.startswith("mlp.")}
    assert solvers == {"exact", "cg", "block_cg", "lissa", "kfac", "ekfac", "ekfac_sampled", "arnoldi"}
    for name, want in ref.items():
        got0 = np.load(out / "rank0" / f"{name}.npy", allow_pickle=False)
        got1 = np.load(out / "rank1" / f"{name}.npy", allow_pickle=False)
        assert got0.shape == want.shape, name
        # every rank returns the full result, the same bits (the ranks run the same decisions on all-reduced sums)
        assert np.array_equal(got0, got1), name
        if want.dtype.kind == "f":
            assert np.isfinite(got0).all(), name
            assert _rel(got0, want) <= TOL, (name, _rel(got0, want))
        elif name.endswith("loaded_is_sharded"):  # TorchInfluence.load(..., distributed=True) shards again
            assert bool(got0[0]) and not bool(want[0])
        else:  # indices of top_k, the shards' data digests: exactly the single-process ones
            assert np.array_equal(got0, want), name
    # the distributed store holds the single-process rows for the same data, from the influence object's data
    # and from a list of batches passed as data
    assert _rel(ref["store2.rows"], ref["store.rows"]) <= 1e-12


def _flat_problem() -> tuple[torch.Tensor, Any, Any, Any]:
    """θ̂ flattened, the loss of one example as a function of it (torch.func), the training and test data."""
    model, train, test = worker.make_mlp()
    theta, unflat = flat_parameters(model)

    def loss(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return worker.cross_entropy(functional_call(model, unflat(t), (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    return theta, loss, train, test


@pytest.mark.slow
def test_against_torch_func_and_numpy(runs: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Independent maths: H = ∇²[(1/n) Σ L + (l2/2)‖θ‖²] by torch.func (jacrev of jacrev), up_loss = −g_iᵀ(H + λI)⁻¹g_test
    by a Cholesky solve, self-influence, top-k by argsort; the store's scores −Φqᵀ, its projected Fisher ΦᵀΦ/n and
    projected self-influence by numpy."""
    out, _ = runs
    theta, loss, (X, y), (Xt, yt) = _flat_problem()
    n = X.shape[0]

    def R(t: torch.Tensor) -> torch.Tensor:
        return vmap(loss, in_dims=(None, 0, 0))(t, X, y).mean() + 0.5 * worker.L2 * (t * t).sum()

    H = jacrev(jacrev(R))(theta)  # reverse over reverse
    G = vmap(grad(loss), in_dims=(None, 0, 0))(theta, X, y).numpy()  # (n, p)
    Gt = vmap(grad(loss), in_dims=(None, 0, 0))(theta, Xt, yt).numpy()  # (m, p)
    A = H.numpy() + worker.DAMPING * np.eye(H.shape[0])
    L = np.linalg.cholesky(A)
    S = np.linalg.solve(L.T, np.linalg.solve(L, Gt.T))  # (H + λI)⁻¹ g_test, (p, m)
    up = -G @ S  # (n, m)
    Z = np.linalg.solve(L.T, np.linalg.solve(L, G.T))
    self_inf = -np.einsum("ip,pi->i", G, Z)

    def got(name: str) -> np.ndarray:
        return np.load(out / "rank0" / f"{name}.npy", allow_pickle=False)

    assert _rel(got("mlp.exact.hessian"), H.numpy()) <= 1e-10
    for solver in ("exact", "cg", "block_cg"):
        assert _rel(got(f"mlp.{solver}.up_loss"), up) <= 1e-8, solver
        assert _rel(got(f"mlp.{solver}.self_influence"), self_inf) <= 1e-8, solver
    assert _rel(got("mlp.exact.loo_change"), -up / n) <= 1e-8
    assert _rel(got("mlp.exact.sub_up_loss"), up[[30, 0, 7, 7, 12]]) <= 1e-8
    order = np.argsort(up, axis=0, kind="stable")
    assert np.array_equal(got("mlp.exact.top_k.helpful_idx"), order[: worker.K].T)
    assert np.array_equal(got("mlp.exact.top_k.harmful_idx"), order[::-1][: worker.K].T)
    # the store: rows Φ (n, k), queries q = P s_test
    rows = got("store.rows")
    assert rows.shape == (n, 16)
    scores = got("store.scores")
    assert _rel(-rows @ got("store.queries").T, scores) <= 1e-10  # −qᵀφ_i
    F = rows.T @ rows / n
    assert _rel(got("store.projected.fisher"), F) <= 1e-12
    HP = F + (worker.L2 + worker.DAMPING) * np.eye(16)
    assert (
        _rel(got("store.projected.self_influence"), -np.einsum("ik,ki->i", rows, np.linalg.solve(HP, rows.T)))
        <= 1e-10
    )
    order_s = np.argsort(scores, axis=0, kind="stable")
    assert np.array_equal(got("store.top_k.helpful_idx"), order_s[: worker.K].T)


@pytest.mark.slow
def test_ranks_that_disagree_raise_on_every_rank(runs: tuple[Path, dict[str, np.ndarray]]) -> None:
    out, ref = runs
    errs = [json.loads((out / f"rank{r}" / "errors.json").read_text()) for r in (0, 1)]
    expect = {
        "different_train_data": "train_data differs",
        "different_n": "train_data differs",
        "too_few_examples": "train_data has 1 examples but the process group has 2 ranks",
        "wrong_world_size": "distributed: the context says rank",
        "different_X_test": "X_test differs",
        "different_train_idx": "train_idx differs",
    }
    for e in errs:
        for case, text in expect.items():
            assert e[case] is not None and e[case]["type"] == "ValueError", (case, e[case])
            assert text in e[case]["message"], (case, e[case]["message"])
    # after the refused calls the ranks are still in step: CG's up_loss equals the single-process Exact one
    for e in errs:
        assert _rel(np.array(e["after"]), ref["mlp.exact.up_loss"]) <= 1e-8


# ==============================================================================================
# quick tests: no second process
# ==============================================================================================
def test_split_range_covers_every_index_once() -> None:
    for n in (0, 1, 5, 31, 32):
        for W in (1, 2, 3, 7):
            parts = [split_range(0, n, W, r) for r in range(W)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(parts[r][1] == parts[r + 1][0] for r in range(W - 1))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1


def _stream_sources(X: torch.Tensor, y: torch.Tensor) -> dict[str, object]:
    ds = torch.utils.data.TensorDataset(X, y)
    return {
        "loader": torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False),
        "dataset": ds,
        "list": [(X[s : s + 6], y[s : s + 6]) for s in range(0, len(y), 6)],
    }


@pytest.mark.parametrize("kind", ["tensor", "loader", "dataset", "list"])
def test_a_rank_sees_exactly_its_shard_with_global_indices(kind: str) -> None:
    """Rank r of 3 (a context without collectives: blocks are local) reads examples ⌊rn/3⌋ … ⌊(r+1)n/3⌋ − 1 with
    their global start indices, from in-memory data, a map-style DataLoader / Dataset (read by index) and a list
    of batches (iterated, converted only where it overlaps); a subset (take) is sharded by position."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(23, 3, generator=g, dtype=torch.float64)
    y = torch.arange(23)
    cpu, f64 = torch.device("cpu"), torch.float64
    data: Any
    if kind == "tensor":
        data = TensorData(X, y)
    else:
        data = StreamingData("train_data", _stream_sources(X, y)[kind], device=cpu, dtype=f64)
    for r in range(3):
        sh = ShardedData(data, DistributedContext(r, 3))
        lo, hi = split_range(0, 23, 3, r)
        assert len(sh) == 23 and sh.local_len == hi - lo
        starts: list[int] = []
        rows: list[Any] = []
        labels: list[torch.Tensor] = []
        for s, Xb, Yb in sh.blocks(5):
            assert isinstance(Xb, torch.Tensor) and Xb.shape[0] <= 5
            starts.append(s)
            rows.append(Xb)
            labels.append(Yb)
        assert torch.equal(torch.cat(labels), y[lo:hi])  # targets = global indices
        assert torch.equal(torch.cat(rows), X[lo:hi])
        assert starts[0] == lo and all(b > a for a, b in zip(starts, starts[1:]))
        idx = torch.tensor([22, 3, 3, 10, 0])
        sub = sh.take(idx)
        a, b = split_range(0, 5, 3, r)
        got = [(s, Yb) for s, _, Yb in sub.blocks(2)]
        if b > a:
            assert got[0][0] == a
            assert torch.equal(torch.cat([t for _, t in got]), idx[a:b])
        else:
            assert got == []


def test_distributed_option_is_validated() -> None:
    assert resolve_distributed(None) is None and resolve_distributed(False) is None
    if not dist.is_initialized():
        assert resolve_distributed("auto") is None  # no process group: one process
        with pytest.raises(
            ValueError, match="distributed: torch.distributed has no initialised process group"
        ):
            resolve_distributed(True)
    with pytest.raises(ValueError, match="distributed must be None, False, True or 'auto'"):
        resolve_distributed("yes")
    with pytest.raises(TypeError, match="distributed must be"):
        resolve_distributed(2)
    with pytest.raises(ValueError, match="rank 3 of world_size 2 is impossible"):
        DistributedContext(3, 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def one_rank_group(tmp_path: Path):
    """A gloo process group of one rank in this process (removed afterwards)."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.usefixtures("one_rank_group", "one_torch_thread")
@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12)], ids=lambda s: s.name)
def test_one_rank_group_equals_one_process(solver: Any) -> None:
    """distributed=True on a one-rank group takes the sharded code paths (shards, gathers; Exact's local solves,
    CG's lockstep solves) and gives the single-process numbers; "auto" stays single-process with one rank."""
    model, train, test = worker.make_mlp()
    kw: dict[str, Any] = dict(
        l2=worker.L2, damping=worker.DAMPING, batch_size=worker.BATCH, optimum_tol=None, solver=solver
    )
    one = TI(model, worker.cross_entropy, train, **kw)
    sharded = TI(model, worker.cross_entropy, train, distributed=True, **kw)
    assert sharded.distributed is not None and sharded.distributed.world_size == 1
    assert TI(model, worker.cross_entropy, train, distributed="auto", **kw).distributed is None
    sub = list(range(0, 31, 3))  # 11 points: two blocks of batch_size 8
    for f in (
        lambda i: i.up_loss(*test),
        lambda i: i.self_influence(sub),
        lambda i: i.up_params([0, 30]),
        lambda i: i.top_k(*test, k=3).harmful_scores,
    ):
        a, b = f(sharded).numpy(), f(one).numpy()
        assert _rel(a, b) <= TOL


# ==============================================================================================
# the default process group is freed by destroy_process_group() (no gloo thread left at exit)
# ==============================================================================================
_TEARDOWN_SCRIPT = """
import json, sys, warnings
from pathlib import Path
import torch, torch.distributed as dist
if sys.argv[2] == "before":
    import pyinfluence.torch
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[1], rank=0, world_size=1)
if sys.argv[2] == "after":
    import pyinfluence.torch
import distributed_worker as worker  # the worker's small MLP, trained with L-BFGS after init (imports torch._dynamo)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    model, train, test = worker.make_mlp()
    inf = pyinfluence.torch.TorchInfluence(model, worker.cross_entropy, train, l2=worker.L2,
        damping=worker.DAMPING, optimum_tol=None, solver=pyinfluence.torch.CG(tol=1e-10), distributed=True)
    inf.up_loss(*test)
del inf
dist.destroy_process_group()
task = Path("/proc/self/task")
print(json.dumps({
    "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
    "threads": [(t / "comm").read_text().strip() for t in task.iterdir()] if task.is_dir() else None,
}))
"""


@pytest.mark.parametrize("order", ["before", "after"])
def test_destroy_process_group_frees_the_group(order: str, tmp_path: Path) -> None:
    """torch.distributed.nn binds ``group.WORLD`` as a default argument when imported; imported after
    init_process_group (torch.func and torch.optim do, through torch._dynamo) it keeps the group alive and gloo's
    threads race the interpreter's exit (SIGABRT). pyinfluence.torch imports it first: imported before
    init_process_group, destroy_process_group() leaves no gloo thread and nothing is said; imported after, building
    a distributed context warns, naming the remedy."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORKER.parent)}
    # cwd: not the repository root, whose source tree has no compiled core in CI's (non-editable) install
    proc = subprocess.run(
        [sys.executable, "-c", _TEARDOWN_SCRIPT, str(_free_port()), order],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if order == "before":
        assert report["warnings"] == [], report
        if report["threads"] is not None:  # None: no /proc (not Linux)
            assert not [t for t in report["threads"] if "gloo" in t], report
    else:
        assert len(report["warnings"]) == 1, report
        assert "imported after init_process_group" in report["warnings"][0]
        assert (
            "Import pyinfluence.torch (or torch.distributed.nn) before init_process_group"
            in report["warnings"][0]
        )


@pytest.mark.slow
def test_readme_example_under_torchrun(tmp_path: Path) -> None:
    """The README's torch.distributed example, verbatim, under torchrun with two gloo ranks: it exits cleanly,
    rank 0 prints 10 training indices, and the import order it shows raises no warning."""
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    head = "**The deep path on torch.distributed.**"
    assert head in readme, "README.md lost its torch.distributed section"
    block = readme.split(head, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert "torchrun" in block and "destroy_process_group" in block
    script = tmp_path / "influence_ddp.py"
    script.write_text(block, encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "always::RuntimeWarning"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-12000:]
    assert "imported after init_process_group" not in log, log[-12000:]
    printed = [line for line in proc.stdout.splitlines() if line.startswith("tensor([")]
    assert len(printed) == 1, proc.stdout  # rank 0 only
    idx = [int(v) for v in printed[0][len("tensor([") :].split("]")[0].split(",")]
    assert len(idx) == 10 and len(set(idx)) == 10 and all(0 <= i < 2000 for i in idx)
