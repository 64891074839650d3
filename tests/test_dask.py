"""The exact linear path on Dask (issue 16): LinearInfluence and the estimators' fit on a dask.array chunked by
rows, run on a dask.distributed LocalCluster of 2 worker processes.

- Every method on Dask data against the single-process (numpy) result on the same data, float64, relative
  difference ≤ 1e-10 (max |a − b| / max |b|), for binary and multinomial logistic regression, the smooth-hinge
  SVM and ridge; top-k indices equal. The Newton fit against the in-memory fit (same iterations, θ to 1e-10).
- Ridge against closed-form numpy written here: θ̂ from the normal equations, H = X̃ᵀX̃/n + l2·P,
  up_loss = −g_testᵀ H⁻¹ g_i, self-influence, and the Newton-step leave-one-out against exact leave-one-out
  refits (for a quadratic objective one Newton step is the refit).
- The client never holds the training matrix: its traced peak memory while fitting and scoring 320 MB generated
  on the workers stays far below that.
- A worker killed mid-computation (its process exits) and a task that raises once (with retries) still give the
  in-memory answer.
- Bad input raises clear errors naming the argument; an error in a chunk names the chunk and its rows; a file
  that fails to load names the file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
import warnings
from typing import Any

import numpy as np
import pytest

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

import pyinfluence  # noqa: E402
from pyinfluence import LinearInfluence, LogisticRegression, RidgeRegression, SmoothHingeSVM  # noqa: E402
from pyinfluence.linear import dask as pdask  # noqa: E402

N, D, M = 2000, 8, 4
# unequal row chunks, one of them empty (dask allows it; every chunk function must too)
ROW_CHUNKS = (300, 500, 0, 200, 600, 400)
TOL = 1e-10
# map_blocks runs its function on an empty block to infer the output unless meta is given: in this process
META = np.empty((0, 0))


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes (not threads), one thread each; the test module's functions are
    pickled by value so the workers need not import it."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    environ = dict(os.environ)  # LocalCluster sets OMP_NUM_THREADS & co. in this process: restore them after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=40
        )
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()
    os.environ.clear()
    os.environ.update(environ)
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def lazy(a: Any) -> Any:
    """A training-size result of Dask data: a lazy dask array (LinearInfluence's annotations say numpy)."""
    assert isinstance(a, da.Array), type(a)
    return a


def rel(a, b) -> float:
    """max |a − b| / max |b| (a dask array is computed first)."""
    a = np.asarray(a.compute() if hasattr(a, "compute") else a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = float(np.max(np.abs(b))) if b.size else 1.0
    return float(np.max(np.abs(a - b))) / scale if b.size else 0.0


def make_problem(kind: str, seed: int = 0):
    """(model factory, X, y, X_test, y_test) of a synthetic problem with overlapping classes."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, D))
    Xt = rng.standard_normal((M, D))
    if kind == "multinomial":
        W = rng.standard_normal((3, D))
        p = np.exp(X @ W.T)
        p /= p.sum(1, keepdims=True)
        y = np.array([rng.choice(3, p=q) for q in p])
        yt = rng.integers(0, 3, M)
        return (lambda: LogisticRegression(l2=1e-2)), X, y, Xt, yt
    w = rng.standard_normal(D)
    if kind == "ridge":
        y = X @ w + 0.5 * rng.standard_normal(N)
        return (lambda: RidgeRegression(l2=1e-2)), X, y, Xt, Xt @ w
    labels = (X @ w + rng.standard_normal(N) > 0).astype(np.int64)
    yt = (Xt @ w > 0).astype(np.int64)
    if kind == "svm":  # string labels: encoded by the model, chunk-wise
        names = np.array(["neg", "pos"])
        return (lambda: SmoothHingeSVM(l2=1e-2, temperature=0.5)), X, names[labels], Xt, names[yt]
    return (lambda: LogisticRegression(l2=1e-2)), X, labels, Xt, yt


def as_dask(X, y):
    return da.from_array(X, chunks=(ROW_CHUNKS, (X.shape[1],))), da.from_array(y, chunks=(ROW_CHUNKS,))


KINDS = ["logistic", "multinomial", "svm", "ridge"]


@pytest.mark.parametrize("kind", KINDS)
def test_fit_matches_the_in_memory_fit(client, kind):
    factory, X, y, _, _ = make_problem(kind)
    ref = factory().fit(X, y)
    Xd, yd = as_dask(X, y)
    got = factory().fit(Xd, yd)
    assert got.n_iter_ == ref.n_iter_
    assert rel(got.theta_, ref.theta_) <= TOL
    assert got.grad_norm_ <= 1e-10
    if kind != "ridge":
        assert list(got.classes_) == list(ref.classes_)
    # numpy labels with a dask X give the same fit
    assert rel(factory().fit(Xd, y).theta_, ref.theta_) <= TOL


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_matches_the_single_process_engine(client, kind):
    factory, X, y, Xt, yt = make_problem(kind, seed=1)
    model = factory().fit(X, y)
    ref = LinearInfluence(model, X, y)
    Xd, yd = as_dask(X, y)
    inf = LinearInfluence(model, Xd, yd)
    assert inf.device == "dask" and inf.n_train == N and inf.n_params == ref.n_params
    assert rel(inf.hessian(), ref.hessian()) <= TOL
    assert abs(inf.grad_norm_ - ref.grad_norm_) <= 1e-12

    # training-size results: lazy dask arrays chunked like the training rows
    up = inf.up_loss(Xt, yt)
    assert isinstance(up, da.Array) and up.chunks == (ROW_CHUNKS, (M,))
    assert rel(up, ref.up_loss(Xt, yt)) <= TOL
    assert rel(inf.self_influence(), ref.self_influence()) <= TOL
    assert rel(inf.up_params(), ref.up_params()) <= TOL
    assert rel(inf.gradients(), ref.gradients()) <= TOL
    pert = lazy(inf.pert_loss(Xt[:2], yt[:2]))
    assert pert.chunks == (ROW_CHUNKS, (2,), (D,))
    assert rel(pert, ref.pert_loss(Xt[:2], yt[:2])) <= TOL
    assert rel(inf.loo_change(Xt, yt), ref.loo_change(Xt, yt)) <= TOL
    assert rel(inf.loo_change(Xt, yt, method="newton"), ref.loo_change(Xt, yt, method="newton")) <= TOL

    # selected training points (unsorted, negative, a mask), and groups
    idx = np.array([1999, 3, 700, -5, 301, 0])
    for name in ("up_loss", "pert_loss"):
        assert rel(getattr(inf, name)(Xt, yt, idx), getattr(ref, name)(Xt, yt, idx)) <= TOL
    mask = np.zeros(N, dtype=bool)
    mask[::97] = True
    assert rel(inf.self_influence(mask), ref.self_influence(mask)) <= TOL
    assert rel(inf.up_params(idx), ref.up_params(idx)) <= TOL
    assert (
        rel(inf.loo_change(Xt, yt, idx, method="newton"), ref.loo_change(Xt, yt, idx, method="newton")) <= TOL
    )
    group = [5, 1999, 3, 700, 1200]
    for method in ("influence", "newton"):
        got = inf.loo_change(Xt, yt, group, method=method, group=True)
        assert isinstance(got, np.ndarray) and got.shape == (M,)
        assert rel(got, ref.loo_change(Xt, yt, group, method=method, group=True)) <= TOL

    # test-size results: numpy
    for name in ("s_test", "test_gradients", "loss"):
        got = getattr(inf, name)(Xt, yt)
        assert isinstance(got, np.ndarray)
        assert rel(got, getattr(ref, name)(Xt, yt)) <= TOL
    top, top_ref = inf.top_k(Xt, yt, k=7), ref.top_k(Xt, yt, k=7)
    np.testing.assert_array_equal(top.helpful_idx, top_ref.helpful_idx)
    np.testing.assert_array_equal(top.harmful_idx, top_ref.harmful_idx)
    assert top.helpful_idx.dtype == np.int64
    assert rel(top.helpful_scores, top_ref.helpful_scores) <= TOL
    assert rel(top.harmful_scores, top_ref.harmful_scores) <= TOL
    # k larger than some chunks (200 rows): the merge takes candidates from every chunk
    big, big_ref = inf.top_k(Xt[:1], yt[:1], k=250), ref.top_k(Xt[:1], yt[:1], k=250)
    np.testing.assert_array_equal(big.helpful_idx, big_ref.helpful_idx)

    X_back, y_back = inf.training_data()
    assert isinstance(X_back, da.Array)
    np.testing.assert_array_equal(y_back.compute(), y)


def test_the_fit_and_the_influence_share_the_last_pass(client):
    """LinearInfluence on the arrays a model was fitted on reuses the fit's sums at θ̂ (one pass fewer), with the
    same results as recomputing them."""
    factory, X, y, Xt, yt = make_problem("logistic", seed=2)
    Xd, yd = as_dask(X, y)
    model = factory().fit(Xd, yd)
    args = pdask.spec_args(model._spec())
    assert pdask.fitted_sums(model, pdask.data_key(Xd, yd), args, model.theta_) is not None
    assert pdask.fitted_sums(model, pdask.data_key(Xd, yd[::-1]), args, model.theta_) is None
    reused = LinearInfluence(model, Xd, yd)
    fresh = LinearInfluence(model, Xd, yd.map_blocks(np.copy))  # another graph: the sums are recomputed
    assert rel(reused.hessian(), fresh.hessian()) <= TOL
    assert rel(reused.up_loss(Xt, yt), fresh.up_loss(Xt, yt)) <= TOL


def test_float32(client):
    factory, X, y, Xt, yt = make_problem("logistic", seed=3)
    model = factory().fit(X, y)
    ref = LinearInfluence(model, X.astype(np.float32), y)
    inf = LinearInfluence(model, da.from_array(X.astype(np.float32), chunks=(ROW_CHUNKS, (D,))), y)
    up = inf.up_loss(Xt, yt)
    assert inf.dtype == np.float32 and up.dtype == np.float32
    assert rel(up, ref.up_loss(Xt, yt)) <= 1e-4


def test_ridge_against_closed_form_numpy(client):
    """Independent numpy: the normal equations, H = X̃ᵀX̃/n + l2·P, g_i = (s_i − y_i) x̃_i,
    up_loss = −g_tᵀ H⁻¹ g_i, self-influence −g_iᵀ H⁻¹ g_i, and exact leave-one-out refits."""
    rng = np.random.default_rng(4)
    X = rng.standard_normal((N, D))
    y = X @ rng.standard_normal(D) + 0.3 + 0.5 * rng.standard_normal(N)
    Xt = rng.standard_normal((M, D))
    yt = rng.standard_normal(M)
    l2 = 0.05
    Xd, yd = as_dask(X, y)
    model = RidgeRegression(l2=l2).fit(Xd, yd)
    inf = LinearInfluence(model, Xd, yd)

    A = np.hstack([X, np.ones((N, 1))])
    At = np.hstack([Xt, np.ones((M, 1))])
    P = np.diag([l2] * D + [0.0])  # the intercept is not penalised
    theta = np.linalg.solve(A.T @ A / N + P, A.T @ y / N)
    assert rel(model.theta_.ravel(), theta) <= 1e-9
    H = A.T @ A / N + P
    assert rel(inf.hessian(), H) <= 1e-12
    G = (A @ theta - y)[:, None] * A
    Gt = (At @ theta - yt)[:, None] * At
    assert rel(inf.up_loss(Xt, yt), -G @ np.linalg.solve(H, Gt.T)) <= 1e-9
    assert rel(inf.self_influence(), -np.einsum("ij,ij->i", G, np.linalg.solve(H, G.T).T)) <= 1e-9
    # quadratic objective: the Newton step is the refit without the point
    rows = [0, 450, 1999]
    exact = []
    for i in rows:
        keep = np.arange(N) != i
        th = np.linalg.solve(A[keep].T @ A[keep] / (N - 1) + P, A[keep].T @ y[keep] / (N - 1))
        exact.append(0.5 * (At @ th - yt) ** 2 - 0.5 * (At @ theta - yt) ** 2)
    assert rel(inf.loo_change(Xt, yt, rows, method="newton"), np.array(exact)) <= 1e-7


@pytest.mark.slow
def test_the_client_never_holds_the_training_matrix(client):
    """2·10⁶ × 20 float64 (320 MB) generated on (and kept by) the workers: fitting, factorising, top-k and the
    self-influence ranking keep the client's traced peak allocation far below the matrix's size."""
    n, d, rows = 2_000_000, 20, 250_000
    rng = da.random.default_rng(5)
    X = rng.standard_normal((n, d), chunks=(rows, d))
    w = np.linspace(-1.0, 1.0, d)
    y = (X @ w + rng.standard_normal(n, chunks=rows) > 0).astype(np.int64)
    X, y = client.persist([X, y])  # drawn once, held by the workers (160 MB each)
    distributed.wait([X, y])
    Xt = np.random.default_rng(6).standard_normal((3, d))
    yt = np.array([0, 1, 1])
    tracemalloc.start()
    try:
        model = LogisticRegression(l2=1e-3).fit(X, y)
        inf = LinearInfluence(model, X, y)
        top = inf.top_k(Xt, yt, k=10)
        self_inf = inf.self_influence()
        worst = da.argtopk(-self_inf, 100).compute()  # the 100 most negative self-influences
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes / 20, f"client peak {peak / 2**20:.1f} MiB for a {X.nbytes / 2**20:.0f} MiB matrix"
    assert model.grad_norm_ <= 1e-10
    # the chunk-wise results agree with each other: the top-k scores are the up_loss of those rows
    chosen = lazy(inf.up_loss(Xt, yt, top.helpful_idx[0])).compute()[:, 0]
    assert rel(chosen, top.helpful_scores[0]) <= TOL
    assert np.all(np.diff(top.helpful_scores[0]) >= 0)
    picked = lazy(inf.self_influence(np.sort(worst))).compute()
    sample = lazy(inf.self_influence(np.arange(0, n, 1000))).compute()  # 2000 of the n values
    assert np.all(picked <= 0) and picked.max() <= np.quantile(sample, 0.01)


def _die_once(block, marker):
    """Exits its worker process the first time any chunk runs (the marker file says it happened)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return block
    os.close(fd)
    os._exit(1)


def _raise_once(block, marker):
    """Raises the first time any chunk runs: a transient failure that retries cure."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return block
    os.close(fd)
    raise OSError("transient read error")


def test_a_worker_killed_mid_computation_still_gives_the_right_answer(client, tmp_path):
    factory, X, y, Xt, yt = make_problem("logistic", seed=7)
    ref_model = factory().fit(X, y)
    ref = LinearInfluence(ref_model, X, y)
    Xd, yd = as_dask(X, y)
    marker = str(tmp_path / "killed")
    flaky = Xd.map_blocks(_die_once, marker=marker, dtype=Xd.dtype, meta=META)
    model = factory().fit(flaky, yd, retries=1)
    assert os.path.exists(marker)  # a worker did die
    assert rel(model.theta_, ref_model.theta_) <= TOL
    marker2 = str(tmp_path / "killed-again")
    inf = LinearInfluence(
        model, Xd.map_blocks(_die_once, marker=marker2, dtype=Xd.dtype, meta=META), yd, retries=1
    )
    assert rel(inf.up_loss(Xt, yt), ref.up_loss(Xt, yt)) <= TOL
    assert os.path.exists(marker2)
    assert len(client.scheduler_info()["workers"]) >= 1


def test_retries_rerun_a_task_that_raised(client, tmp_path):
    factory, X, y, Xt, yt = make_problem("ridge", seed=8)
    ref = factory().fit(X, y)
    Xd, yd = as_dask(X, y)
    marker = str(tmp_path / "raised")
    flaky = Xd.map_blocks(_raise_once, marker=marker, dtype=Xd.dtype, meta=META)
    model = factory().fit(flaky, yd, retries=2)
    assert os.path.exists(marker)
    assert rel(model.theta_, ref.theta_) <= TOL
    # without retries the same failure reaches the caller
    with pytest.raises(OSError, match="transient"):
        factory().fit(
            Xd.map_blocks(_raise_once, marker=str(tmp_path / "raised-2"), dtype=Xd.dtype, meta=META), yd
        )


def test_bad_input_names_the_argument(client):
    factory, X, y, Xt, yt = make_problem("logistic", seed=9)
    model = factory().fit(X, y)
    Xd, yd = as_dask(X, y)
    with pytest.raises(ValueError, match=r"X_train is chunked along its columns.*rechunk"):
        LinearInfluence(model, da.from_array(X, chunks=(500, 4)), yd)
    with pytest.raises(ValueError, match=r"X_train has unknown chunk sizes.*compute_chunk_sizes"):
        LinearInfluence(model, Xd[Xd[:, 0] > 0], yd)
    with pytest.raises(ValueError, match=r"y_train has 1999 entries but X_train has 2000 rows"):
        LinearInfluence(model, Xd, yd[1:])
    with pytest.raises(ValueError, match=r"y_train"):
        LinearInfluence(model, Xd, y[1:])
    with pytest.raises(ValueError, match=r"X_train has 5 features but the model was trained on 8"):
        LinearInfluence(model, Xd[:, :5].rechunk({1: -1}), yd)
    with pytest.raises(ValueError, match=r"y has 1999 entries but X has 2000 rows"):
        LogisticRegression().fit(Xd, yd[1:])
    with pytest.raises(ValueError, match=r"X is chunked along its columns"):
        LogisticRegression().fit(da.from_array(X, chunks=(500, 4)), yd)
    with pytest.raises(TypeError, match=r"y_train is a dask array but X_train is not"):
        LinearInfluence(model, X, yd)
    with pytest.raises(ValueError, match=r"device='cuda'"):
        LinearInfluence(model, Xd, yd, device="cuda")
    with pytest.raises(ValueError, match=r"retries"):
        LinearInfluence(model, Xd, yd, retries=-1)
    # differently chunked labels are aligned with X's rows
    assert (
        rel(
            LinearInfluence(model, Xd, yd.rechunk(700)).self_influence(),
            LinearInfluence(model, X, y).self_influence(),
        )
        <= TOL
    )

    inf = LinearInfluence(model, Xd, yd)
    for call, name in ((lambda: inf.retrain_loo(Xt, yt, [0]), "retrain_loo"), (lambda: inf.refit(), "refit")):
        with pytest.raises(NotImplementedError, match=name):
            call()
    assert not inf.can_retrain
    with pytest.raises(TypeError, match="from_sklearn"):
        pyinfluence.from_sklearn(object(), Xd, yd)
    with pytest.raises(TypeError, match="dask array"):
        model.predict(Xd)


def test_an_error_in_a_chunk_names_the_chunk(client):
    factory, X, y, Xt, yt = make_problem("logistic", seed=10)
    model = factory().fit(X, y)
    bad = X.copy()
    bad[850, 3] = np.nan  # chunk 3 holds rows 800:1000
    Xd, yd = as_dask(bad, y)
    with pytest.raises(ValueError, match=r"chunk 3 of X_train \(rows 800:1000\).*NaN"):
        LinearInfluence(model, Xd, yd)
    labels = y.copy().astype(np.int64)
    labels[1500] = 7  # not one of the model's classes; chunk 4 holds rows 1000:1600
    Xd, yd = as_dask(X, labels)
    with pytest.raises(ValueError, match=r"chunk 4 of y_train \(rows 1000:1600\).*7"):
        LinearInfluence(model, Xd, yd)


def test_readers_name_the_file_that_fails(client, tmp_path):
    rng = np.random.default_rng(11)
    parts = [rng.standard_normal((n, 3)) for n in (40, 25, 35)]
    for i, a in enumerate(parts):
        np.save(tmp_path / f"part{i}.npy", a)
    X = pdask.read_npy(tmp_path)
    assert X.chunks == ((40, 25, 35), (3,))
    np.testing.assert_array_equal(X.compute(), np.vstack(parts))
    # the file changes after the headers were read: the load fails, naming it
    with open(tmp_path / "part1.npy", "r+b") as f:
        f.truncate(200)
    with pytest.raises(ValueError, match=r"reading .*part1\.npy"):
        X.compute()

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder = tmp_path / "pq"
    folder.mkdir()
    labels = []
    for i, a in enumerate(parts):
        lab = (a[:, 0] > 0).astype(np.int64)
        labels.append(lab)
        pq.write_table(
            pa.table({"a": a[:, 0], "b": a[:, 1], "c": a[:, 2], "label": lab}), folder / f"p{i}.parquet"
        )
    Xp, yp = pdask.read_parquet(folder, label="label")
    np.testing.assert_array_equal(Xp.compute(), np.vstack(parts))
    np.testing.assert_array_equal(yp.compute(), np.concatenate(labels))
    (folder / "p2.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(Exception, match=r"reading .*p2\.parquet"):
        Xp.compute()


def test_the_package_imports_without_dask(tmp_path):
    code = (
        "import sys, numpy as np, pyinfluence\n"
        "X = np.random.default_rng(0).standard_normal((50, 3)); y = (X[:, 0] > 0).astype(int)\n"
        "m = pyinfluence.LogisticRegression().fit(X, y); pyinfluence.LinearInfluence(m, X, y).self_influence()\n"
        "assert not any(k == 'dask' or k.startswith('dask.') for k in sys.modules), 'dask was imported'\n"
    )
    # run in tmp_path: from the repository root, `python -c` would import the source tree, which (in a
    # non-editable install, as in CI) has no compiled core
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


@pytest.mark.slow
def test_the_benchmark_runs_in_quick_mode(tmp_path):
    out = tmp_path / "dask_scale.json"
    res = subprocess.run(
        [sys.executable, "-m", "pyinfluence.bench.studies.dask_scale", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,  # not the repository root, whose source tree would shadow the installed package
    )
    assert res.returncode == 0, res.stdout + res.stderr
    import json

    data = json.loads(out.read_text())
    assert data["agreement"]["top_k_indices_equal"]
    assert data["agreement"]["max_rel_diff"] <= 1e-8
    assert {r["workers"] for r in data["runs"]} == {1, 2}
