"""Retraining-based attribution measures (pyinfluence.bench.lds) and the tasks' own retraining
(Task.retrain / with_model / with_labels). Checked against independent computations: direct fits of
the estimator and scikit-learn on the subset arrays, the objective's gradient in numpy,
scipy.stats.spearmanr, sklearn.metrics.roc_auc_score, and independent refits for brittleness."""

from __future__ import annotations

import json
import math
import warnings
from typing import Optional

import numpy as np
import pytest
import torch
from scipy import stats

from pyinfluence.applications.mislabel import flip_labels
from pyinfluence.bench import lds as L
from pyinfluence.bench.tasks import Task, TrainedModel, lbfgs_fit, make_task
from pyinfluence.linear.models import LogisticRegression
from pyinfluence.torch.training import digits_mlp

pytestmark = [pytest.mark.usefixtures("one_torch_thread")]

N_LIN, M_LIN = 200, 8  # tiny linear task: each Newton refit takes milliseconds


@pytest.fixture(scope="module")
def lin() -> Task:
    return make_task("digits-logreg", n_train=N_LIN, m=M_LIN)


@pytest.fixture(scope="module")
def mlp() -> Task:
    return make_task("digits-mlp", n_train=40, m=4)


@pytest.fixture(scope="module")
def lin_retrains(lin: Task) -> L.SubsetRetrains:
    return L.retrain_subsets(lin, L.make_subsets(N_LIN, 24, seed=3))


@pytest.fixture(scope="module")
def lin_scores(lin: Task) -> np.ndarray:
    return np.asarray(lin.linear_influence().up_loss(_a(lin.X_test_np), _a(lin.y_test_np)))


def _a(x: Optional[np.ndarray]) -> np.ndarray:
    """A linear task's numpy array (never None for linear tasks)."""
    assert x is not None
    return x


def _fit(X: np.ndarray, y: np.ndarray) -> LogisticRegression:
    """The independent refit: a fresh estimator with the task's objective on the given arrays."""
    est = LogisticRegression(l2=1e-3, penalize_intercept=True)
    est.fit(X, y)
    return est


def _assert_same_optimum(a: LogisticRegression, b: LogisticRegression) -> None:
    """Two fits of the same objective agree: R is l2-strongly convex, so each θ lies within
    ‖∇R(θ)‖ / l2 of the optimum θ*, hence ‖θ_a − θ_b‖ ≤ (‖∇R(θ_a)‖ + ‖∇R(θ_b)‖) / l2 (≤ 1e-6 here)."""
    bound = (a.grad_norm_ + b.grad_norm_) / 1e-3
    assert bound <= 1e-6
    assert np.linalg.norm(a.theta_ - b.theta_) <= bound + 1e-12


def _ce_grad(theta: np.ndarray, X: np.ndarray, yi: np.ndarray, l2: float) -> np.ndarray:
    """∇ of mean multinomial cross-entropy + (l2/2)‖θ‖² (all parameters), closed form in numpy."""
    Xa = np.hstack([X, np.ones((X.shape[0], 1))])
    S = Xa @ theta.T
    P = np.exp(S - S.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    P[np.arange(X.shape[0]), yi] -= 1.0
    return P.T @ Xa / X.shape[0] + l2 * theta


# ------------------------------------------------------------------------------------------------
# subsets
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, fraction", [(200, 0.5), (7, 0.5), (101, 0.3)])
def test_make_subsets_sizes_and_determinism(n: int, fraction: float) -> None:
    a = L.make_subsets(n, 12, fraction=fraction, seed=5)
    assert a.dtype == np.bool_ and a.shape == (12, n)
    np.testing.assert_array_equal(a.sum(1), round(fraction * n))
    np.testing.assert_array_equal(a, L.make_subsets(n, 12, fraction=fraction, seed=5))
    assert not np.array_equal(a, L.make_subsets(n, 12, fraction=fraction, seed=6))
    if n >= 100:  # C(n, n/2) is astronomically large: repeats would mean a broken sampler
        assert len({r.tobytes() for r in a}) == 12
    assert L.make_subsets(n).shape == (L.DEFAULT_N_SUBSETS, n)


@pytest.mark.parametrize(
    "kw, exc, msg",
    [
        ({"n": 1}, ValueError, "n must be"),
        ({"n": 10, "fraction": 0.0}, ValueError, "fraction"),
        ({"n": 10, "fraction": 1.0}, ValueError, "fraction"),
        ({"n": 3, "fraction": 0.1}, ValueError, "between 1 and n - 1"),
        ({"n": 10, "n_subsets": 1}, ValueError, "n_subsets"),
        ({"n": 10, "seed": -1}, ValueError, "seed"),
        ({"n": 10.0}, TypeError, "n must be an integer"),
    ],
)
def test_make_subsets_bad_input(kw: dict, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        L.make_subsets(**kw)


# ------------------------------------------------------------------------------------------------
# the tasks' retraining
# ------------------------------------------------------------------------------------------------
def test_linear_retrain_on_subset_matches_independent_fits(lin: Task) -> None:
    keep = L.make_subsets(N_LIN, 2, seed=11)[0]
    tm = lin.retrain(keep)
    X, y = _a(lin.X_train_np)[keep], _a(lin.y_train_np)[keep]
    ref = _fit(X, y)  # pyinfluence's estimator fitted directly on the subset arrays
    _assert_same_optimum(tm.estimator, ref)
    # optimality in closed form: the gradient of the subset objective vanishes (strictly convex)
    g = _ce_grad(tm.estimator.theta_, X, np.searchsorted(ref.classes_, y), 1e-3)
    assert np.linalg.norm(g) < 1e-9 and tm.grad_norm < 1e-9
    # scikit-learn on the same objective: a constant column makes the intercept penalised, C = 1/(l2·n_S);
    # its L-BFGS stops at a relative decrease of ~64 eps in R, so θ agrees to ~1e-7, not to rounding
    from sklearn.linear_model import LogisticRegression as SkLR

    Xa = np.hstack([X, np.ones((X.shape[0], 1))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = SkLR(C=1.0 / (1e-3 * X.shape[0]), fit_intercept=False, tol=1e-12, max_iter=20000).fit(Xa, y)
    np.testing.assert_allclose(tm.estimator.theta_, sk.coef_, rtol=0, atol=1e-5)
    # outputs on the test points: losses (softmax cross-entropy in numpy), predictions, margins
    St = np.hstack([_a(lin.X_test_np), np.ones((M_LIN, 1))]) @ ref.theta_.T
    yt = np.searchsorted(ref.classes_, _a(lin.y_test_np))
    lse = np.log(np.exp(St - St.max(1, keepdims=True)).sum(1)) + St.max(1)
    np.testing.assert_allclose(tm.losses(lin.X_test, lin.y_test), lse - St[np.arange(M_LIN), yt], atol=1e-8)
    np.testing.assert_array_equal(tm.predict(lin.X_test), St.argmax(1))
    other = St.copy()
    other[np.arange(M_LIN), yt] = -np.inf
    lse_other = np.log(np.exp(other - St.max(1, keepdims=True)).sum(1)) + St.max(1)
    np.testing.assert_allclose(
        tm.margins(lin.X_test, lin.y_test), St[np.arange(M_LIN), yt] - lse_other, atol=1e-8
    )
    # an index array and a warm start give the same optimum
    tw = lin.retrain(np.flatnonzero(keep), warm_start=True)
    _assert_same_optimum(tw.estimator, ref)
    assert tm.rows is not None and tm.rows.size == keep.sum()


def test_linear_retrain_all_rows_reproduces_task_and_labels(lin: Task) -> None:
    _assert_same_optimum(lin.retrain().estimator, lin.linear_model)
    yf, _ = flip_labels(lin.train_label_values(), 0.1, np.random.default_rng(0))
    tm = lin.retrain(labels=yf)
    _assert_same_optimum(tm.estimator, _fit(_a(lin.X_train_np), yf))
    np.testing.assert_array_equal(tm.labels, yf)
    assert lin.retrain(labels=lin.train_label_values()).labels is not None


def test_deep_retrain_reproduces_model_and_uses_seed_and_rows(mlp: Task) -> None:
    state = torch.random.get_rng_state()
    same = mlp.retrain()
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    for a, b in zip(same.module.parameters(), mlp.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # independently: the model built from the seed and lbfgs_fit called on the sliced tensors
    keep = np.zeros(mlp.n_train, dtype=bool)
    keep[::2] = True
    tm = mlp.retrain(keep, seed=7)
    torch.manual_seed(7)
    ref = digits_mlp().double()
    torch.random.set_rng_state(state)
    idx = torch.from_numpy(np.flatnonzero(keep))
    gn = lbfgs_fit(ref, mlp.X_train[idx], mlp.y_train[idx], 300, l2=1e-3)
    for a, b in zip(tm.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert tm.grad_norm == pytest.approx(gn) and tm.seed == 7
    with torch.no_grad():
        out = ref(mlp.X_test)
        ce = torch.nn.functional.cross_entropy(out, mlp.y_test, reduction="none")
    np.testing.assert_allclose(tm.losses(mlp.X_test, mlp.y_test), ce.numpy(), atol=1e-12)
    np.testing.assert_array_equal(tm.predict(mlp.X_test), out.argmax(1).numpy())
    # warm start: begins at the trained weights, and the task's model is not modified
    before = [p.detach().clone() for p in mlp.model.parameters()]
    tw = mlp.retrain(keep, warm_start=True)
    assert tw.warm_start and tw.seed is None
    for a, b in zip(before, mlp.model.parameters()):
        assert torch.equal(a, b)


def test_with_model_and_with_labels(lin: Task, mlp: Task) -> None:
    yf, flipped = flip_labels(lin.train_label_values(), 0.1, np.random.default_rng(1))
    v = lin.with_labels(yf)
    assert v is not lin and make_task("digits-logreg", n_train=N_LIN, m=M_LIN) is lin  # not cached
    assert "labels_sha256" in v.spec and "labels_sha256" not in lin.spec
    np.testing.assert_array_equal(v.y_train_np, yf)
    np.testing.assert_array_equal(v.y_train.numpy(), np.searchsorted(lin.linear_model.classes_, yf))
    # its influence is that of a model fitted independently on the flipped labels
    from pyinfluence.linear.influence import LinearInfluence

    ref = LinearInfluence(_fit(_a(lin.X_train_np), yf), _a(lin.X_train_np), yf).self_influence()
    np.testing.assert_allclose(v.linear_influence().self_influence(), ref, rtol=1e-8, atol=1e-12)
    si_torch = v.torch_influence("exact").self_influence().detach().numpy()
    np.testing.assert_allclose(si_torch, ref, rtol=1e-6, atol=1e-10)
    # an ensemble member: another init seed of the MLP
    e = mlp.with_model(mlp.retrain(seed=2))
    assert e.spec["init_seed"] == 2 and e.info["variant"] == {"init_seed": 2}
    assert not torch.equal(next(e.model.parameters()), next(mlp.model.parameters()))
    assert torch.isfinite(e.torch_influence("exact").self_influence()).all()
    with pytest.raises(ValueError, match="all of them"):
        lin.with_model(lin.retrain(np.arange(100)))
    with pytest.raises(TypeError, match="trained must be a TrainedModel"):
        lin.with_model("model")  # type: ignore[arg-type]


def test_retrain_bad_input(lin: Task, mlp: Task) -> None:
    with pytest.raises(ValueError, match="keep is a boolean array of length 3"):
        lin.retrain(np.ones(3, dtype=bool))
    with pytest.raises(ValueError, match="keep is empty"):
        lin.retrain(np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="exclude each other"):
        mlp.retrain(seed=1, warm_start=True)
    with pytest.raises(ValueError, match=r"labels must have shape \(200,\)"):
        lin.retrain(labels=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="labels"):
        lin.retrain(labels=np.full(N_LIN, 42))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 10\)"):
        mlp.retrain(labels=np.full(mlp.n_train, 10))
    with pytest.raises(TypeError, match="labels must be integer"):
        mlp.retrain(labels=np.zeros(mlp.n_train))
    custom = Task(
        "custom",
        "deep",
        "hand-made",
        mlp.model,
        mlp.loss_fn,
        mlp.X_train,
        mlp.y_train,
        mlp.X_test,
        mlp.y_test,
        1e-3,
        0.0,
    )
    with pytest.raises(ValueError, match="no known trainer"):
        custom.retrain()


# ------------------------------------------------------------------------------------------------
# retrain_subsets and its cache
# ------------------------------------------------------------------------------------------------
def test_retrain_subsets_outputs_match_direct_refits(lin: Task, lin_retrains: L.SubsetRetrains) -> None:
    r = lin_retrains
    assert r.losses.shape == r.margins.shape == r.predictions.shape == (24, M_LIN)
    for k in (0, 17):
        ref = _fit(_a(lin.X_train_np)[r.masks[k]], _a(lin.y_train_np)[r.masks[k]])
        np.testing.assert_allclose(
            r.losses[k], ref.loss(_a(lin.X_test_np), _a(lin.y_test_np)), rtol=0, atol=1e-9
        )
        np.testing.assert_array_equal(
            r.predictions[k], np.searchsorted(ref.classes_, ref.predict(_a(lin.X_test_np)))
        )
    # cross-entropy = softplus(−margin): the loss and the margin rank the subsets in reverse
    np.testing.assert_allclose(r.losses, np.logaddexp(0.0, -r.margins), rtol=1e-10, atol=1e-12)
    assert np.all(r.grad_norms < 1e-8) and r.n_trained == 24 and r.cache_path is None
    d = json.loads(json.dumps(r.to_dict()))
    assert d["n_subsets"] == 24 and d["subset_size"] == {"min": 100, "max": 100} and "masks" not in d


def test_retrain_subsets_cache_reuse_and_resume(lin: Task, tmp_path, monkeypatch) -> None:
    masks = L.make_subsets(N_LIN, 6, seed=9)
    calls: dict[str, Optional[int]] = {"n": 0, "fail_after": None}
    real = Task.retrain

    def counting(self, *a, **kw):
        n, stop = calls["n"], calls["fail_after"]
        assert n is not None
        if stop is not None and n >= stop:
            raise KeyboardInterrupt  # an interrupted run
        calls["n"] = n + 1
        return real(self, *a, **kw)

    monkeypatch.setattr(Task, "retrain", counting)
    plain = L.retrain_subsets(lin, masks)  # no cache: reference numbers
    assert calls["n"] == 6
    calls.update(n=0, fail_after=2)
    with pytest.raises(KeyboardInterrupt):
        L.retrain_subsets(lin, masks, cache_dir=tmp_path)
    assert calls["n"] == 2
    calls.update(n=0, fail_after=None)
    lines: list[str] = []
    resumed = L.retrain_subsets(lin, masks, cache_dir=tmp_path, log=lines.append)
    assert calls["n"] == 4 and resumed.n_trained == 4  # resumed where it stopped
    assert sum("cached" in s for s in lines) == 2
    calls["n"] = 0
    again = L.retrain_subsets(lin, masks, cache_dir=str(tmp_path))
    assert calls["n"] == 0 and again.n_trained == 0  # nothing trained the second time
    for r in (resumed, again):
        np.testing.assert_array_equal(r.losses, plain.losses)
        np.testing.assert_array_equal(r.predictions, plain.predictions)
        np.testing.assert_array_equal(r.grad_norms, plain.grad_norms)
    assert again.cache_path == resumed.cache_path
    # other subsets, or another task (flipped labels), get their own folder
    L.retrain_subsets(lin, L.make_subsets(N_LIN, 6, seed=10), cache_dir=tmp_path)
    assert calls["n"] == 6
    files = list((tmp_path).iterdir())
    assert len(files) == 2 and all((f / "manifest.json").exists() for f in files)
    assert not list(tmp_path.rglob("*.pkl")) and not list(tmp_path.rglob("*.tmp"))


def test_retrain_subsets_deep_seeded(mlp: Task, tmp_path) -> None:
    masks = L.make_subsets(mlp.n_train, 3, seed=0)
    r = L.retrain_subsets(mlp, masks, cache_dir=tmp_path)
    assert r.seed == 0 and r.n_trained == 3
    direct = mlp.retrain(masks[1], seed=0)
    np.testing.assert_array_equal(r.losses[1], direct.losses(mlp.X_test, mlp.y_test))
    r1 = L.retrain_subsets(mlp, masks, seed=1, cache_dir=tmp_path)  # another seed: another key
    assert r1.n_trained == 3 and r1.cache_path != r.cache_path and not np.array_equal(r1.losses, r.losses)


def test_retrain_subsets_bad_input(lin: Task) -> None:
    with pytest.raises(TypeError, match="masks must be a boolean array"):
        L.retrain_subsets(lin, np.ones((2, N_LIN)))
    with pytest.raises(ValueError, match=r"masks must have shape \(n_subsets, 200\)"):
        L.retrain_subsets(lin, np.ones((2, 5), dtype=bool))
    bad = np.ones((2, N_LIN), dtype=bool)
    bad[1] = False
    with pytest.raises(ValueError, match="masks row 1 is empty"):
        L.retrain_subsets(lin, bad)
    with pytest.raises(TypeError, match="task must be"):
        L.retrain_subsets("digits-logreg", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="log must be callable"):
        L.retrain_subsets(lin, bad[:1], log="print")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# LDS
# ------------------------------------------------------------------------------------------------
def _fake_retrains(losses: np.ndarray, masks: np.ndarray) -> L.SubsetRetrains:
    M, m = losses.shape
    z = np.zeros((M, m))
    return L.SubsetRetrains(
        "fake",
        masks,
        losses,
        z.astype(np.int64),
        -losses,
        np.zeros(m, np.int64),
        np.zeros(M),
        z[:, 0],
        0,
        None,
        False,
    )


def test_lds_equals_scipy_spearman_per_test_point() -> None:
    rng = np.random.default_rng(0)
    n, m, M = 30, 6, 15
    masks = L.make_subsets(n, M, seed=1)
    scores = rng.integers(-3, 4, size=(n, m)).astype(float)  # small integers: ties in the sums
    losses = rng.standard_normal((M, m)).round(1)  # ties in the actual values too
    scores[:, 4] = 0.0  # undefined: every predicted sum is 0
    losses[:, 5] = 2.5  # undefined: constant actual output
    res = L.lds(scores, _fake_retrains(losses, masks))
    pred = masks.astype(float) @ scores
    for j in range(4):
        assert res.per_test[j] == pytest.approx(stats.spearmanr(pred[:, j], losses[:, j])[0], abs=1e-12)
    assert np.isnan(res.per_test[4:]).all() and res.n_undefined == 2 and res.undefined == [4, 5]
    vals = res.per_test[:4]
    assert res.mean == pytest.approx(vals.mean()) and res.se == pytest.approx(vals.std(ddof=1) / 2.0)
    d = json.loads(json.dumps(res.to_dict()))
    assert d["per_test"][4] is None and d["n_subsets"] == M
    # torch scores give the same
    assert L.lds(torch.from_numpy(scores), _fake_retrains(losses, masks)).mean == res.mean


def test_lds_on_real_retrains_matches_scipy(lin_retrains: L.SubsetRetrains, lin_scores: np.ndarray) -> None:
    res = L.lds(lin_scores, lin_retrains)
    pred = lin_retrains.masks.astype(float) @ lin_scores
    ref = [stats.spearmanr(pred[:, j], lin_retrains.losses[:, j])[0] for j in range(M_LIN)]
    np.testing.assert_allclose(res.per_test, ref, atol=1e-12)
    # the margin-based LDS is the same number (loss = softplus(−margin), sign flips cancel)
    marg = [stats.spearmanr(-pred[:, j], lin_retrains.margins[:, j])[0] for j in range(M_LIN)]
    np.testing.assert_allclose(res.per_test, marg, atol=1e-12)


def test_lds_exact_linear_influence_beats_random(
    lin_retrains: L.SubsetRetrains, lin_scores: np.ndarray
) -> None:
    exact = L.lds(lin_scores, lin_retrains)
    rand = L.lds(np.random.default_rng(0).standard_normal(lin_scores.shape), lin_retrains)
    # Scores unrelated to the retraining give ρ_j with mean 0 and sd ≈ 1/√(M−1) per test point, so
    # the two means differ by noise of about √(se_exact² + se_random²); demand 3 of those (a 3σ
    # one-sided test), and a clearly positive LDS for the exact scores.
    margin = 3.0 * math.hypot(exact.se, rand.se)
    assert exact.mean > rand.mean + margin
    assert exact.mean - 3.0 * exact.se > 0.0
    assert exact.n_undefined == 0


def test_lds_bad_input(lin_retrains: L.SubsetRetrains, lin_scores: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"scores must have shape \(n_train, m_test\) = \(200, 8\)"):
        L.lds(lin_scores[:, :3], lin_retrains)
    bad = lin_scores.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="scores contains NaN"):
        L.lds(bad, lin_retrains)
    with pytest.raises(ValueError, match="undefined for every test point"):
        L.lds(np.zeros_like(lin_scores), lin_retrains)
    with pytest.raises(TypeError, match="retrains must be a SubsetRetrains"):
        L.lds(lin_scores, {"losses": 1})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# AUC
# ------------------------------------------------------------------------------------------------
def test_roc_auc_matches_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    for _ in range(5):
        s = rng.standard_normal(60).round(1)  # ties
        y = rng.random(60) < 0.3
        assert L.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert L.roc_auc(s, y.astype(int)) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    si = -np.abs(rng.standard_normal(50))
    idx = np.array([3, 7, 11, 40])
    mask = np.zeros(50, dtype=bool)
    mask[idx] = True
    ref = roc_auc_score(mask, np.abs(si))
    assert L.mislabel_auc(si, idx) == pytest.approx(ref) and L.mislabel_auc(si, mask) == pytest.approx(ref)


def test_mislabel_auc_on_flipped_task(lin: Task) -> None:
    yf, flipped = flip_labels(lin.train_label_values(), 0.1, np.random.default_rng(2))
    v = lin.with_labels(yf)
    auc = L.mislabel_auc(v.linear_influence().self_influence(), flipped)
    # independently: the rank-sum AUC of |self-influence| by sklearn
    from sklearn.metrics import roc_auc_score

    mask = np.zeros(N_LIN, dtype=bool)
    mask[flipped] = True
    assert auc == pytest.approx(roc_auc_score(mask, np.abs(v.linear_influence().self_influence())))


@pytest.mark.parametrize(
    "args, exc, msg",
    [
        (([1.0, 2.0], [True, True]), ValueError, "both classes"),
        (([1.0, 2.0], [True]), ValueError, r"positives must have shape \(2,\)"),
        (([1.0, np.nan], [True, False]), ValueError, "scores contains NaN"),
        (([1.0, 2.0], [0.5, 1.0]), TypeError, "positives must be boolean"),
        (([[1.0, 2.0]], [True, False]), ValueError, "scores must be 1-D"),
    ],
)
def test_roc_auc_bad_input(args: tuple, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        L.roc_auc(*args)


def test_mislabel_auc_bad_input() -> None:
    with pytest.raises(IndexError, match="flipped contains index 9"):
        L.mislabel_auc(np.ones(5), [9])
    with pytest.raises(ValueError, match="flipped is empty"):
        L.mislabel_auc(np.ones(5), [])


# ------------------------------------------------------------------------------------------------
# brittleness
# ------------------------------------------------------------------------------------------------
def _refit_pred(lin: Task, removed: np.ndarray, j: int) -> int:
    keep = np.ones(N_LIN, dtype=bool)
    keep[removed] = False
    est = _fit(_a(lin.X_train_np)[keep], _a(lin.y_train_np)[keep])
    return int(est.predict(_a(lin.X_test_np)[j : j + 1])[0])


@pytest.mark.parametrize("refine", [False, True])
def test_brittleness_linear_checked_by_refits(
    lin: Task, lin_scores: np.ndarray, refine: bool, tmp_path
) -> None:
    sizes = (2, 6, 18, 54)
    res = L.brittleness(lin, lin_scores, range(M_LIN), sizes=sizes, refine=refine, cache_dir=tmp_path)
    own = lin.linear_model.predict(_a(lin.X_test_np))
    assert res.sizes == list(sizes) and len(res.status) == M_LIN
    for j, st, k, c in zip(res.test_idx, res.status, res.k, res.new_class):
        order = np.argsort(lin_scores[:, j], kind="stable")
        if own[j] != _a(lin.y_test_np)[j]:
            assert st == "misclassified" and k is None
            continue
        if st == "not_flipped":
            assert _refit_pred(lin, order[: sizes[-1]], j) == own[j]
            continue
        assert st == "flipped" and k is not None
        assert _refit_pred(lin, order[:k], j) == c != own[j]  # removing k flips it...
        if refine:
            assert k == 1 or _refit_pred(lin, order[: k - 1], j) == own[j]  # ...and k − 1 does not
        else:
            assert k in sizes
            prev = sizes.index(k) - 1
            assert prev < 0 or _refit_pred(lin, order[: sizes[prev]], j) == own[j]
    ev = [i for i, s in enumerate(res.status) if s != "misclassified"]
    flipped = [k for k in (res.k[i] for i in ev) if k is not None]
    assert res.n_evaluated == len(ev) and res.fraction_flipped == pytest.approx(len(flipped) / len(ev))
    assert flipped and res.median_k == pytest.approx(float(np.median(flipped)))
    assert res.curve[sizes[-1]] == pytest.approx(res.fraction_flipped)
    json.dumps(res.to_dict())
    # the cache: the same call again retrains nothing and finds the same k
    again = L.brittleness(lin, lin_scores, range(M_LIN), sizes=sizes, refine=refine, cache_dir=tmp_path)
    assert again.n_retrains == 0 and again.n_cached > 0 and again.k == res.k


def test_brittleness_custom_retrain_and_bad_input(lin: Task, lin_scores: np.ndarray, tmp_path) -> None:
    seen: list[int] = []

    def retrain(keep: np.ndarray) -> TrainedModel:
        seen.append(int((~keep).sum()))
        return lin.retrain(keep)

    res = L.brittleness(lin, lin_scores, [0, 1], sizes=(3, 9), retrain=retrain)
    assert seen and set(seen) <= {3, 9} and res.n_retrains == len(seen)
    with pytest.raises(ValueError, match="needs retrain_key"):
        L.brittleness(lin, lin_scores, [0], sizes=(3,), retrain=retrain, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="sizes must be strictly increasing"):
        L.brittleness(lin, lin_scores, [0], sizes=(5, 5))
    with pytest.raises(ValueError, match="sizes\\[\\] must be <= 199"):
        L.brittleness(lin, lin_scores, [0], sizes=(5, 200))
    with pytest.raises(IndexError, match="test_idx contains index 8"):
        L.brittleness(lin, lin_scores, [8])
    with pytest.raises(ValueError, match=r"scores must have shape \(n_train, m_test\)"):
        L.brittleness(lin, lin_scores.T, [0])
    assert L.brittleness(lin, lin_scores, [0], sizes=None, retrain=retrain).sizes == [5, 10, 20, 40, 80, 160]
