"""LinearInfluence's Python API: shapes, index handling, consistency between methods, dtypes,
torch inputs, and checks against independent numpy computations and actual retraining."""

from __future__ import annotations

import numpy as np
import pytest

import pyinfluence as pi


def _classification(n=60, d=4, K=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((K, d))
    y = np.argmax(X @ W.T + 0.7 * rng.standard_normal((n, K)), axis=1)
    return X, y


@pytest.fixture(scope="module", params=["logistic", "multinomial", "svm", "ridge"])
def case(request):
    kind = request.param
    if kind == "ridge":
        rng = np.random.default_rng(3)
        X = rng.standard_normal((50, 4))
        y = X @ rng.standard_normal(4) + 0.3 * rng.standard_normal(50)
        model = pi.RidgeRegression(l2=1e-2).fit(X, y)
    elif kind == "multinomial":
        X, y = _classification(K=3, seed=1)
        model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    elif kind == "svm":
        X, y = _classification(seed=2)
        model = pi.SmoothHingeSVM(l2=1e-2, temperature=0.5).fit(X, np.where(y == 1, "a", "b"))
        y = np.where(y == 1, "a", "b")
    else:
        X, y = _classification()
        model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    return kind, X, y, model, pi.LinearInfluence(model, X, y)


def _test_gradients(model, X, y):
    """Independent numpy ∇θL(z) for each row, (m, p)."""
    n, d = X.shape
    Xa = np.hstack([X, np.ones((n, 1))]) if model.fit_intercept else X
    S = Xa @ model.theta_.T
    if isinstance(model, pi.RidgeRegression):
        R = S - np.asarray(y, float)[:, None]
    elif isinstance(model, pi.SmoothHingeSVM):
        ypm = np.where(np.asarray(y) == model.classes_[1], 1.0, -1.0)
        u = (1 - ypm * S[:, 0]) / model.temperature
        R = (-ypm / (1 + np.exp(-u)))[:, None]
    elif S.shape[1] == 1:
        yb = (np.asarray(y) == model.classes_[1]).astype(float)
        R = 1 / (1 + np.exp(-S)) - yb[:, None]
    else:
        P = np.exp(S - S.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        R = P.copy()
        R[np.arange(n), np.searchsorted(model.classes_, y)] -= 1
    return np.einsum("ik,ij->ikj", R, Xa).reshape(n, -1)


def test_shapes_and_properties(case):
    kind, X, y, model, inf = case
    n, d = X.shape
    p = model.theta_.size
    m = 3
    assert inf.n_train == n and inf.n_params == p
    np.testing.assert_array_equal(inf.params, model.theta_.ravel())
    H = inf.hessian()
    assert H.shape == (p, p)
    np.testing.assert_allclose(H, H.T, atol=1e-12)
    assert inf.up_params().shape == (n, p)
    assert inf.up_params([1, 2]).shape == (2, p)
    assert inf.up_loss(X[:m], y[:m]).shape == (n, m)
    assert inf.pert_loss(X[:m], y[:m], [0, 1]).shape == (2, m, d)
    assert inf.self_influence().shape == (n,)
    assert inf.loo_change(X[:m], y[:m], [4, 5]).shape == (2, m)
    assert inf.loo_change(X[:m], y[:m], [4, 5], method="newton").shape == (2, m)
    assert inf.loo_change(X[:m], y[:m], [4, 5], group=True).shape == (m,)
    assert inf.loo_change(X[:m], y[:m], [4, 5], method="newton", group=True).shape == (m,)
    t = inf.top_k(X[:m], y[:m], k=4)
    for a in (t.helpful_idx, t.helpful_scores, t.harmful_idx, t.harmful_scores):
        assert a.shape == (m, 4)
    assert "LinearInfluence" in repr(inf)


def test_single_point_and_index_forms(case):
    kind, X, y, model, inf = case
    full = inf.up_loss(X[:4], y[:4])
    single = inf.up_loss(X[2], y[2])
    assert single.shape == (X.shape[0], 1)
    np.testing.assert_allclose(single[:, 0], full[:, 2], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(inf.up_loss(X[:4], y[:4], [3, 0]), full[[3, 0]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(inf.up_loss(X[:4], y[:4], 5), full[[5]], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(inf.up_loss(X[:4], y[:4], [-1]), full[[-1]], rtol=1e-12, atol=1e-15)
    mask = np.zeros(X.shape[0], dtype=bool)
    mask[[1, 7]] = True
    np.testing.assert_allclose(inf.up_loss(X[:4], y[:4], mask), full[[1, 7]], rtol=1e-12, atol=1e-15)
    assert inf.up_loss(X[:4], y[:4], []).shape == (0, 4)
    assert inf.up_params([]).shape == (0, inf.n_params)
    assert inf.pert_loss(X[:4], y[:4], []).shape == (0, 4, X.shape[1])
    np.testing.assert_allclose(inf.self_influence([2, 3]), inf.self_influence()[[2, 3]], rtol=1e-12)


def test_against_numpy(case):
    """up_params, up_loss, self_influence from an explicit numpy Hessian solve."""
    kind, X, y, model, inf = case
    H = inf.hessian()
    # pinv: the multinomial H is singular along the common intercept shift, to which every
    # gradient is orthogonal (the core answers with the pseudo-inverse there).
    Hinv = np.linalg.pinv(H, hermitian=True)
    G = _test_gradients(model, X, y)
    up_params = -G @ Hinv
    np.testing.assert_allclose(inf.up_params(), up_params, rtol=1e-8, atol=1e-10)
    ref = -G @ Hinv @ G[:5].T
    np.testing.assert_allclose(inf.up_loss(X[:5], y[:5]), ref, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(
        inf.self_influence(), np.einsum("ip,ip->i", G, up_params), rtol=1e-8, atol=1e-10
    )
    assert np.all(inf.self_influence() <= 1e-12)


def test_loo_influence_and_group_consistency(case):
    kind, X, y, model, inf = case
    n = X.shape[0]
    up = inf.up_loss(X[:3], y[:3], [1, 4, 9])
    np.testing.assert_allclose(inf.loo_change(X[:3], y[:3], [1, 4, 9]), -up / n, rtol=1e-12)
    np.testing.assert_allclose(
        inf.loo_change(X[:3], y[:3], [1, 4, 9], group=True), -up.sum(0) / n, rtol=1e-12
    )


def test_top_k_consistent_with_up_loss(case):
    kind, X, y, model, inf = case
    U = inf.up_loss(X[:3], y[:3]).T  # (m, n)
    t = inf.top_k(X[:3], y[:3], k=5)
    np.testing.assert_allclose(t.helpful_scores, np.sort(U, axis=1)[:, :5], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(t.harmful_scores, -np.sort(-U, axis=1)[:, :5], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        np.take_along_axis(U, t.helpful_idx, 1), t.helpful_scores, rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        np.take_along_axis(U, t.harmful_idx, 1), t.harmful_scores, rtol=1e-9, atol=1e-12
    )
    assert t.helpful_idx.dtype == np.int64


def test_retrain_loo_time_limit(case):
    """max_seconds: a generous limit changes nothing; a spent one is a ConvergenceError before any refit (never a
    partial result); a bad value names the argument."""
    from pyinfluence.errors import ConvergenceError

    kind, X, y, model, inf = case
    want = inf.retrain_loo(X[:2], y[:2], [0, 3])
    np.testing.assert_array_equal(inf.retrain_loo(X[:2], y[:2], [0, 3], max_seconds=1e6), want)
    with pytest.raises(ConvergenceError, match=r"max_seconds=0\b.*\[0\] \(0 of 2 refits done\)"):
        inf.retrain_loo(X[:2], y[:2], [0, 3], max_seconds=0)
    for bad in (-1.0, float("nan"), "soon"):
        with pytest.raises((ValueError, TypeError), match="max_seconds"):
            inf.retrain_loo(X[:2], y[:2], [0], max_seconds=bad)


def test_newton_loo_matches_retraining(case):
    """One Newton step on R₋ᵢ is exact for ridge and close for the smooth losses."""
    kind, X, y, model, inf = case
    idx = [0, 3, 11]
    newton = inf.loo_change(X[:4], y[:4], idx, method="newton")
    actual = inf.retrain_loo(X[:4], y[:4], idx)
    g_newton = inf.loo_change(X[:4], y[:4], idx, method="newton", group=True)
    g_actual = inf.retrain_loo(X[:4], y[:4], idx, group=True)
    if kind == "ridge":
        np.testing.assert_allclose(newton, actual, rtol=1e-7, atol=1e-12)
        np.testing.assert_allclose(g_newton, g_actual, rtol=1e-7, atol=1e-12)
    else:
        np.testing.assert_allclose(newton, actual, rtol=0.05, atol=2e-2 * np.abs(actual).max())
        np.testing.assert_allclose(g_newton, g_actual, rtol=0.05, atol=2e-2 * np.abs(g_actual).max())


def test_pert_loss_against_finite_differences(case):
    """Moving x_i by δ and refitting changes the test loss by ≈ (1/n)·pert_loss[i]·δ."""
    kind, X, y, model, inf = case
    n, d = X.shape
    i, eps = 5, 1e-4
    P = inf.pert_loss(X[:2], y[:2], [i])[0]  # (m, d)
    fd = np.empty_like(P)
    spec = model._spec()
    for a in range(d):
        losses = []
        for sgn in (+1, -1):
            Xp = X.copy()
            Xp[i, a] += sgn * eps
            m2 = type(model)(**model.get_params())
            m2.fit(Xp, y)
            losses.append(m2.loss(X[:2], y[:2]))
        fd[:, a] = (losses[0] - losses[1]) / (2 * eps)
    del spec
    np.testing.assert_allclose(P / n, fd, rtol=1e-4, atol=1e-7 * max(1.0, np.abs(P / n).max()))


def test_float32_engine_close_to_float64(case):
    kind, X, y, model, inf = case
    inf32 = pi.LinearInfluence(model, X.astype(np.float32), y)
    assert inf32.dtype == np.float32
    u32 = inf32.up_loss(X[:3], y[:3])
    assert u32.dtype == np.float32
    u64 = inf.up_loss(X[:3], y[:3])
    np.testing.assert_allclose(u32, u64, rtol=2e-3, atol=2e-3 * np.abs(u64).max())
    inf32b = pi.LinearInfluence(model, X, y, dtype=np.float32)
    np.testing.assert_allclose(inf32b.up_loss(X[:3], y[:3]), u32, rtol=1e-5, atol=1e-6 * np.abs(u64).max())


def test_torch_inputs(case):
    import torch

    kind, X, y, model, inf = case
    if kind == "svm":  # this case uses string labels, which torch cannot hold: refit on the ±1 encoding
        y = np.where(np.asarray(y) == np.asarray(y)[0], 1.0, -1.0)
        model = pi.SmoothHingeSVM(l2=model.l2, temperature=model.temperature).fit(X, y)
        inf = pi.LinearInfluence(model, X, y)
    inf_t = pi.LinearInfluence(model, torch.from_numpy(X), torch.from_numpy(np.asarray(y)))
    np.testing.assert_allclose(
        inf_t.up_loss(torch.from_numpy(X[:3]), torch.from_numpy(np.asarray(y[:3]))),
        inf.up_loss(X[:3], y[:3]),
        rtol=1e-12,
        atol=1e-15,
    )
    np.testing.assert_allclose(
        inf.up_loss(torch.from_numpy(X[0]), torch.tensor(np.asarray(y)[0])),
        inf.up_loss(X[0], y[0]),
        rtol=1e-12,
        atol=1e-15,
    )


def test_damping_changes_solve(case):
    kind, X, y, model, inf = case
    lam = 0.5
    d = pi.LinearInfluence(model, X, y, damping=lam)
    assert d.damping == lam
    np.testing.assert_allclose(d.hessian(), inf.hessian())  # hessian() is undamped
    G = _test_gradients(model, X, y)
    ref = -G[:4] @ np.linalg.solve(inf.hessian() + lam * np.eye(inf.n_params), G[:2].T)
    np.testing.assert_allclose(d.up_loss(X[:2], y[:2], np.arange(4)), ref, rtol=1e-8, atol=1e-12)


def test_training_arrays_not_copied():
    X, y = _classification()
    model = pi.LogisticRegression(l2=1e-2).fit(X, y)
    inf = pi.LinearInfluence(model, X, y)
    assert inf._X is X  # float64 C-contiguous input is kept as is
