"""pyinfluence.bench: the quick benchmark through the API and the CLI, its JSON schema,
the agreement of the exact paths with each other and with a closed-form numpy computation, the
metrics against scipy and brute force, the Pareto front, compare_solvers on a small torch model,
error rows, extensibility of the solver grid, and argument errors.

Correctness only: no assertion on wall-clock time.
"""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch
from torch import nn

from pyinfluence.bench import (
    SCHEMA,
    BenchReport,
    GridContext,
    LooTruth,
    compare_solvers,
    make_task,
    pareto_front,
    pearson,
    run_bench,
    solver_grid,
    spearman,
    topk_overlap,
)
from pyinfluence.bench.metrics import max_rel_err, rankdata
from pyinfluence.torch.influence import TorchInfluence
from pyinfluence.torch.solvers import CG, Exact, LiSSA
from pyinfluence.torch.training import lbfgs_fit


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One thread per pool (torch, pyinfluence's core, BLAS/OpenMP) while these tests run, restored
    afterwards: the machine's 2 cores are shared, and a 2-thread kernel whose partner is
    descheduled waits for it (several-fold slower)."""
    from threadpoolctl import threadpool_limits

    import pyinfluence

    before, core_before = torch.get_num_threads(), pyinfluence.get_num_threads()
    torch.set_num_threads(1)
    pyinfluence.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)
    pyinfluence.set_num_threads(core_before)


ROW_KEYS = {
    "task": str,
    "label": str,
    "path": str,
    "family": str,
    "solver": str,
    "settings": dict,
    "status": str,
    "warnings": list,
    "repeats": int,
    "times_s": list,
    "reference": bool,
    "pareto": bool,
}
ROW_NUMBERS = [
    "time_s",
    "prepare_s",
    "solve_s",
    "peak_mem_mb",
    "flops",
    "max_residual",
    "pearson",
    "spearman",
    "top10_overlap",
    "top10_helpful",
    "top10_harmful",
    "max_rel_err",
    "loo_pearson",
]
ROW_INTS = ["hvp_columns", "minibatch_hvp_columns", "iterations"]


def _walk_numbers(obj, path="$"):
    """Yield (path, value) for every number in a parsed JSON document."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def _strict_json(text: str):
    def bad(name):
        raise AssertionError(f"JSON holds the non-standard constant {name}")

    return json.loads(text, parse_constant=bad)


def check_schema(doc: dict) -> None:
    assert doc["schema"] == SCHEMA == "pyinfluence.bench/1"
    assert set(doc) >= {
        "schema",
        "created",
        "machine",
        "settings",
        "tasks",
        "rows",
        "peers",
        "scaling",
        "notes",
    }
    assert isinstance(doc["machine"], dict) and isinstance(doc["machine"]["cores"], int)
    assert isinstance(doc["tasks"], list) and doc["tasks"]
    assert isinstance(doc["rows"], list) and doc["rows"]
    assert isinstance(doc["peers"], list)
    for path, v in _walk_numbers(doc):
        assert math.isfinite(v), path
    names = set()
    for t in doc["tasks"]:
        for k in ("name", "kind", "n_train", "m_test", "n_params", "l2", "damping", "reference"):
            assert k in t, k
        assert isinstance(t["n_train"], int)
        assert isinstance(t["n_params"], int) or (t["kind"] == "user" and t["n_params"] is None)
        assert isinstance(t["reference"]["label"], str)
        names.add(t["name"])
    for r in doc["rows"]:
        assert r["task"] in names
        for k, typ in ROW_KEYS.items():
            assert isinstance(r[k], typ), (k, r[k])
        assert r["status"] in ("ok", "error", "skipped")
        for k in ROW_NUMBERS:
            assert r[k] is None or isinstance(r[k], (int, float)), (k, r[k])
        for k in ROW_INTS:
            assert r[k] is None or isinstance(r[k], int), (k, r[k])
        if r["status"] == "ok":
            assert r["time_s"] > 0 and r["repeats"] >= 1 and len(r["times_s"]) == r["repeats"]
            assert r["time_s"] == pytest.approx(float(np.median(r["times_s"])))
            assert r["pearson"] is not None and -1 <= r["pearson"] <= 1
            assert 0 <= r["top10_overlap"] <= 1
            assert r["mem_method"] in ("vmhwm", "tracemalloc")
        else:
            assert isinstance(r["error"], str) and r["error"]


# ================================================================================================
# the quick benchmark through the API (digits multinomial logistic regression)
# ================================================================================================
M_TEST = 10


@pytest.fixture(scope="module")
def quick():
    rep = run_bench(tasks=["digits-logreg"], quick=True, m=M_TEST)
    return rep


@pytest.mark.slow
def test_quick_json_schema(quick, tmp_path):
    doc = _strict_json(quick.to_json())
    check_schema(doc)
    paths = quick.save(tmp_path)
    assert set(paths) >= {"json", "markdown", "plot"}
    saved = _strict_json(paths["json"].read_text())
    check_schema(saved)
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "## digits-logreg" in md and "bench_accuracy_vs_time.png" in md
    back = BenchReport.load(paths["json"])
    assert back.rows == saved["rows"] and back.tasks == saved["tasks"]


@pytest.mark.slow
def test_quick_has_every_family(quick):
    fams = [r["family"] for r in quick.rows]
    assert fams.count("linear-exact") == 1 and fams.count("exact") == 1
    assert fams.count("cg") >= 2 and fams.count("lissa") >= 2
    for r in quick.rows:
        if r["family"] in ("linear-exact", "exact", "cg"):
            assert r["status"] == "ok", r
    cg = [r for r in quick.rows if r["family"] == "cg"]
    assert all(r["hvp_columns"] > 0 and r["iterations"] >= 1 for r in cg)
    lissa = [r for r in quick.rows if r["family"] == "lissa" and r["status"] == "ok"]
    assert all(r["minibatch_hvp_columns"] >= r["settings"]["depth"] * M_TEST for r in lissa)
    ex = [r for r in quick.rows if r["family"] in ("linear-exact", "exact")]
    assert all(r["flops"] > 0 for r in ex)


@pytest.mark.slow
def test_exact_paths_agree(quick):
    ref = quick.row("digits-logreg", "linear-exact (C++)")
    tor = quick.row("digits-logreg", "Exact (torch)")
    assert ref["reference"] and not tor["reference"]
    assert quick.tasks[0]["reference"]["label"] == "linear-exact (C++)"
    assert ref["pearson"] == pytest.approx(1.0, abs=1e-12)
    assert tor["pearson"] >= 0.999999
    assert tor["spearman"] >= 0.999999
    assert tor["top10_overlap"] == 1.0
    assert tor["max_rel_err"] < 1e-8


def _numpy_multinomial_up_loss(task) -> np.ndarray:
    """Closed-form up_loss of the multinomial model from numpy alone: softmax gradients
    (p − e_y) ⊗ x̃, Hessian (1/n) Σ_i (diag p_i − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ + l2·I (all parameters
    penalised), np.linalg.solve."""
    theta = np.asarray(task.linear_model.theta_, dtype=np.float64)  # (K, d+1)
    K = theta.shape[0]

    def aug(X):
        return np.hstack([X, np.ones((X.shape[0], 1))])

    def probs(Xa):
        S = Xa @ theta.T
        S -= S.max(axis=1, keepdims=True)
        P = np.exp(S)
        return P / P.sum(axis=1, keepdims=True)

    def grads(Xa, y):
        R = probs(Xa)
        R[np.arange(len(y)), y] -= 1.0
        return (R[:, :, None] * Xa[:, None, :]).reshape(len(y), -1)

    classes = list(task.linear_model.classes_)
    ytr = np.array([classes.index(v) for v in task.y_train_np])
    yte = np.array([classes.index(v) for v in task.y_test_np])
    Xtr, Xte = aug(task.X_train_np), aug(task.X_test_np)
    n, d1 = Xtr.shape
    P = probs(Xtr)
    H = np.zeros((K * d1, K * d1))
    for a in range(K):
        for b in range(K):
            w = P[:, a] * ((a == b) - P[:, b])
            H[a * d1 : (a + 1) * d1, b * d1 : (b + 1) * d1] = (Xtr * w[:, None]).T @ Xtr / n
    H += task.l2 * np.eye(K * d1)
    S = np.linalg.solve(H, grads(Xte, yte).T)
    return -grads(Xtr, ytr) @ S


@pytest.mark.slow
def test_reference_matches_numpy_closed_form(quick):
    task = make_task("digits-logreg", quick=True, m=M_TEST)
    expected = _numpy_multinomial_up_loss(task)
    got = quick.reference_up_loss("digits-logreg")
    assert got.shape == expected.shape == (task.n_train, M_TEST)
    assert np.abs(got - expected).max() <= 1e-8 * np.abs(expected).max()
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] >= 0.999999


@pytest.mark.slow
def test_quick_loo_metric(quick):
    task_entry = quick.tasks[0]
    loo = task_entry["loo"]
    assert loo is not None and loo["n_train"] == task_entry["n_train"]
    ref = quick.reference_up_loss("digits-logreg")
    pred, act = [], []
    for t, j in enumerate(loo["test_idx"]):
        idx = loo["train_idx"][t]
        # the LOO set is the top-|up_loss| training points of that test column
        top = np.argsort(-np.abs(ref[:, j]), kind="stable")[: len(idx)]
        assert sorted(idx) == sorted(top.tolist())
        pred += list(-ref[idx, j] / loo["n_train"])
        act += loo["actual"][t]
    r = scipy.stats.pearsonr(pred, act)[0]
    assert quick.row("digits-logreg", "linear-exact (C++)")["loo_pearson"] == pytest.approx(r)


@pytest.mark.slow
def test_quick_table_and_pareto(quick):
    text = quick.table()
    assert "digits-logreg" in text and "Exact (torch)" in text and "linear-exact" in text
    front = quick.pareto("digits-logreg")
    assert front, "the Pareto front is never empty"
    ok = [r for r in quick.rows if r["status"] == "ok"]
    # brute force: on the front iff no other point is at least as good in both and better in one
    for r in ok:
        dominated = any(
            o["time_s"] <= r["time_s"]
            and (1 - o["pearson"]) <= (1 - r["pearson"])
            and (o["time_s"] < r["time_s"] or o["pearson"] > r["pearson"])
            for o in ok
            if o is not r
        )
        assert r["pareto"] == (not dominated), r["label"]


# ================================================================================================
# the CLI, in a fresh interpreter outside the source tree
# ================================================================================================
@pytest.mark.slow
def test_cli_bench_quick(tmp_path):
    out = tmp_path / "bench-out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyinfluence",
            "bench",
            "--quick",
            "--tasks",
            "digits-svm",
            "--m",
            "8",
            "--out",
            str(out),
            "--json",
            "--quiet",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = _strict_json(proc.stdout)
    check_schema(doc)
    assert _strict_json((out / "bench.json").read_text())["rows"] == doc["rows"]
    assert (out / "bench.md").read_text().startswith("# pyinfluence bench")
    assert (out / "bench_accuracy_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["linear-exact (C++)"]["reference"]
    assert rows["Exact (torch)"]["pearson"] >= 0.999999
    assert doc["settings"]["quick"] is True and doc["tasks"][0]["m_test"] == 8


def test_cli_bench_bad_arguments(tmp_path):
    from pyinfluence.cli.commands import main

    assert main(["bench", "--tasks", "no-such-task", "--out", str(tmp_path)]) == 1
    assert main(["bench", "--solvers", "newton", "--out", str(tmp_path)]) == 1
    assert main(["bench", "--repeats", "0"]) == 2  # argparse usage error


# ================================================================================================
# metrics
# ================================================================================================
def test_metrics_against_scipy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 3))
    b = a + 0.5 * rng.standard_normal((40, 3))
    assert pearson(a, b) == pytest.approx(scipy.stats.pearsonr(a.ravel(), b.ravel())[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(scipy.stats.spearmanr(a.ravel(), b.ravel())[0], abs=1e-12)
    # ties: average ranks, as scipy
    c = np.round(a, 0)
    d = np.round(b, 1)
    assert spearman(c, d) == pytest.approx(scipy.stats.spearmanr(c.ravel(), d.ravel())[0], abs=1e-12)
    np.testing.assert_allclose(rankdata(c.ravel()), scipy.stats.rankdata(c.ravel()))
    # torch tensors are accepted
    assert pearson(torch.from_numpy(a), b) == pytest.approx(pearson(a, b), abs=1e-15)
    assert math.isnan(pearson(np.ones((5, 2)), b[:5, :2]))
    assert max_rel_err(a, a) == 0.0


def _brute_overlap(est, ref, k):
    n, m = est.shape
    h, r = [], []
    for j in range(m):
        he = set(sorted(range(n), key=lambda i: (est[i, j], i))[:k])
        hr = set(sorted(range(n), key=lambda i: (ref[i, j], i))[:k])
        ae = set(sorted(range(n), key=lambda i: (-est[i, j], i))[:k])
        ar = set(sorted(range(n), key=lambda i: (-ref[i, j], i))[:k])
        h.append(len(he & hr) / k)
        r.append(len(ae & ar) / k)
    return np.mean(h), np.mean(r)


def test_topk_overlap_brute_force():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((60, 5))
    for noise in (0.0, 0.3, 3.0):
        est = ref + noise * rng.standard_normal(ref.shape)
        for k in (1, 10):
            got = topk_overlap(est, ref, k)
            h, r = _brute_overlap(est, ref, k)
            assert got["helpful"] == pytest.approx(h)
            assert got["harmful"] == pytest.approx(r)
            assert got["both"] == pytest.approx((h + r) / 2)
    assert topk_overlap(ref, ref, 10)["both"] == 1.0
    assert topk_overlap(-ref, ref, 10)["both"] == 0.0  # helpful and harmful swap
    with pytest.raises(ValueError, match="k"):
        topk_overlap(ref, ref, 0)
    with pytest.raises(ValueError, match="same shape"):
        topk_overlap(ref, ref[:, :2])


def test_pareto_front_hand_made():
    pts = [
        (1.0, 0.5),  # 0 front
        (2.0, 0.1),  # 1 front
        (3.0, 0.2),  # 2 dominated by 1
        (0.5, 0.9),  # 3 front (fastest)
        (2.0, 0.3),  # 4 dominated by 1 (same time, worse)
        (5.0, 0.0),  # 5 front (most accurate)
        (4.0, math.nan),  # 6 never
        (6.0, 0.0),  # 7 dominated by 5 (slower, same accuracy)
    ]
    assert pareto_front(pts) == [3, 0, 1, 5]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [0, 1]  # exact duplicates are both kept
    assert pareto_front([]) == []


# ================================================================================================
# compare_solvers on the user's own (tiny) torch model
# ================================================================================================
L2, DAMP = 1e-2, 1e-2


@pytest.fixture(scope="module")
def tiny():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    Xt = torch.randn(6, 4, generator=g, dtype=torch.float64)
    yt = torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    ce = nn.CrossEntropyLoss(reduction="none")
    # one L-BFGS call of up to 500 iterations (torch's default history of 100) on mean loss + (l2/2)‖θ‖²
    lbfgs_fit(model, X, y, 500, l2=L2, tol=1e-12, history_size=100, loss=ce)
    model.eval()

    def factory(solver):
        return TorchInfluence(model, ce, (X, y), l2=L2, damping=DAMP, solver=solver, optimum_tol=None)

    return model, ce, X, y, Xt, yt, factory


def _autograd_up_loss(model, ce, X, y, Xt, yt):
    """Independent: torch.autograd.functional.hessian of the objective, np.linalg.solve."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def params(theta):
        out, s = {}, 0
        for nm, sh, k in zip(names, shapes, sizes):
            out[nm] = theta[s : s + k].reshape(sh)
            s += k
        return out

    def loss(theta, Xb, yb):
        return ce(torch.func.functional_call(model, params(theta), (Xb,)), yb)

    def R(theta):
        return loss(theta, X, y).mean() + 0.5 * L2 * (theta**2).sum()

    H = torch.autograd.functional.hessian(R, theta0).numpy()
    H = (H + H.T) / 2 + DAMP * np.eye(len(theta0))

    def grads(Xb, yb):
        rows = []
        for i in range(len(yb)):
            th = theta0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss(th, Xb[i : i + 1], yb[i : i + 1]).sum(), [th])
            rows.append(g.numpy())
        return np.stack(rows)

    return -grads(X, y) @ np.linalg.solve(H, grads(Xt, yt).T)


@pytest.mark.slow
def test_compare_solvers_tiny_model(tiny):
    model, ce, X, y, Xt, yt, factory = tiny
    diverging = LiSSA(depth=50, scale=1e-4, batch_size=None)
    rep = compare_solvers(
        factory, (Xt, yt), solvers=[Exact(), CG(tol=1e-10), diverging], repeats=2, name="tiny"
    )
    check_schema(_strict_json(rep.to_json()))
    rows = {r["label"]: r for r in rep.rows}
    assert rep.tasks[0]["reference"]["label"] == "Exact (torch)"
    assert rows["Exact (torch)"]["reference"] and rows["Exact (torch)"]["repeats"] == 2
    assert rows["CG tol=1e-10"]["pearson"] >= 0.999999
    assert rows["CG tol=1e-10"]["hvp_columns"] > 0
    bad = rows[next(k for k in rows if k.startswith("LiSSA"))]
    assert bad["status"] == "error" and "ConvergenceError" in bad["error"]
    assert bad["pearson"] is None and bad["time_s"] is None
    # the reference against an independent autograd Hessian + numpy solve
    expected = _autograd_up_loss(model, ce, X, y, Xt, yt)
    got = rep.reference_up_loss("tiny")
    assert got.shape == (80, 6)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9 * np.abs(expected).max())


@pytest.mark.slow
def test_compare_solvers_default_grid_and_loo(tiny):
    *_, Xt, yt, factory = tiny
    exact = factory(Exact()).up_loss(Xt, yt).numpy()
    # a made-up "actual" change exactly equal to the prediction of Exact: r = 1 for Exact
    idx = [0, 3, 5, 7, 11]
    loo = LooTruth(
        test_idx=[1], train_idx=[idx], actual=[list(-exact[idx, 1] / 80)], n_train=80, method="synthetic"
    )
    rep = compare_solvers(factory, (Xt, yt), quick=True, repeats=1, loo=loo, memory=False)
    fams = {r["family"] for r in rep.rows}
    assert {"exact", "cg", "lissa"} <= fams and "linear-exact" not in fams
    ex = next(r for r in rep.rows if r["family"] == "exact")
    assert ex["loo_pearson"] == pytest.approx(1.0)
    assert rep.tasks[0]["loo"]["method"] == "synthetic"


def test_solver_grid_picks_up_new_solvers(tiny):
    *_, Xt, yt, factory = tiny

    class MyCG(CG):  # a solver "added later" with no registered grid
        pass

    try:
        grid = solver_grid(GridContext(n_params=38, kind="user"))
        mine = [s for s in grid if s.family == "mycg"]
        assert len(mine) == 1 and mine[0].label == "MyCG()"
        assert isinstance(mine[0].solver, MyCG)
        rep = compare_solvers(factory, (Xt, yt), solvers=[Exact(), mine[0]], repeats=1)
        row = rep.row("user", "MyCG()")
        assert row["status"] == "ok" and row["pearson"] >= 0.999999
        # linear tasks start with the C++ path; unaffordable Exact is listed as skipped
        big = solver_grid(GridContext(n_params=10**5, kind="linear"))
        assert big[0].family == "linear-exact"
        ex = next(s for s in big if s.family == "exact")
        assert ex.skip and "p = 100000" in ex.skip
    finally:
        del MyCG, grid, mine
        gc.collect()


# ================================================================================================
# argument errors
# ================================================================================================
def test_bad_arguments(tiny):
    *_, Xt, yt, factory = tiny
    with pytest.raises(ValueError, match="test_data"):
        compare_solvers(factory, Xt)
    with pytest.raises(ValueError, match="repeats"):
        compare_solvers(factory, (Xt, yt), solvers=["cg"], repeats=0)
    with pytest.raises(ValueError, match="budget_s"):
        compare_solvers(factory, (Xt, yt), solvers=["cg"], budget_s=-1)
    with pytest.raises(ValueError, match="solvers"):
        compare_solvers(factory, (Xt, yt), solvers=["newton"])
    with pytest.raises(TypeError, match="influence_factory"):
        compare_solvers(None, (Xt, yt))
    with pytest.raises(ValueError, match="name"):
        make_task("no-such-task")
    with pytest.raises(ValueError, match="'d'"):
        make_task("digits-logreg", d=5)
    with pytest.raises(ValueError, match="n must be"):
        make_task("synthetic-linear", n=0)
    with pytest.raises(ValueError, match="seed"):
        make_task("digits-svm", seed=-1)
    with pytest.raises(ValueError, match="tasks"):
        run_bench(tasks=["digits-logreg", "nope"])
    with pytest.raises(ValueError, match="solvers"):
        run_bench(tasks=["digits-svm"], solvers="newton")
    with pytest.raises(ValueError, match="repeats"):
        run_bench(tasks=["digits-svm"], repeats=0)
    with pytest.raises(ValueError, match="schema"):
        BenchReport.from_dict({"schema": "something/else"})


def test_the_smooth_cnn_task_is_the_cnn_with_average_pooling():
    """digits-cnn-smooth: the same architecture, data, seed and trainer as digits-cnn, average pooling; the
    models differ only in that (same initial weights from the same seed)."""
    from pyinfluence.bench.tasks import _new_deep_model

    smooth = make_task("digits-cnn-smooth", quick=True, n_train=60, m=3)
    assert smooth.model.pool == "avg" and smooth.n_params == 9242 and smooth.damping == 1e-2
    assert "avgpool2" in smooth.info["architecture"] and math.isfinite(smooth.info["grad_norm"])
    a, b = _new_deep_model("digits-cnn-smooth", 0), _new_deep_model("digits-cnn", 0)
    assert b.pool == "max"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    X, _ = make_task("digits-cnn", quick=True, n_train=60, m=3).test_data("torch")
    assert torch.equal(X, smooth.test_data("torch")[0])
