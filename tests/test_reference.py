"""Self-checks of tests/reference.py (needs no pyinfluence): the references are only useful if right."""

import numpy as np
import pytest
import torch

import reference as ref

torch.set_num_threads(1)  # tiny problems: thread wake-ups cost more than they save

CASES = [(fam, fi, pi) for fam in ref.FAMILIES for (fi, pi) in [(True, False), (True, True), (False, False)]]


def _spec(fam, fi, pi, l2=0.02):
    K = 3 if fam == "multinomial" else 1
    t = 0.3 if fam == "smooth_hinge" else 1.0
    return ref.Spec(fam, K, fi, pi, l2=l2, temperature=t)


def _problem(fam, seed=3, n=50, d=4):
    return ref.make_problem(fam, n, d, n_classes=3, seed=seed)


def _fd_jac(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    cols = []
    for j in range(x.size):
        e = np.zeros_like(x)
        e.flat[j] = h
        cols.append((np.asarray(f(x + e)) - np.asarray(f(x - e))) / (2 * h))
    return np.stack(cols, axis=-1)


def _aug(X, fi):
    return np.hstack([X, np.ones((len(X), 1))]) if fi else X


@pytest.mark.parametrize("fam,fi,pi", CASES)
def test_hessian_matches_finite_differences_of_gradient(fam, fi, pi):
    spec = _spec(fam, fi, pi)
    X, y, _, _ = _problem(fam)
    rng = np.random.default_rng(0)
    th = rng.normal(scale=0.5, size=spec.n_params(X.shape[1]))
    H = ref.hessian(spec, X, y, th)
    Hfd = _fd_jac(lambda t: ref.objective_grad(spec, X, y, t), th, h=1e-5)
    assert np.abs(H - Hfd).max() <= 1e-7 * max(1.0, np.abs(H).max())
    g = ref.objective_grad(spec, X, y, th)
    gfd = _fd_jac(lambda t: ref.objective(spec, X, y, t), th, h=1e-6)
    assert np.abs(g - gfd).max() <= 1e-7 * max(1.0, np.abs(g).max())
    np.testing.assert_allclose(H, H.T, atol=0)


@pytest.mark.parametrize("fam,fi,pi", CASES)
def test_per_example_gradients_closed_form(fam, fi, pi):
    spec = _spec(fam, fi, pi)
    X, y, _, _ = _problem(fam)
    rng = np.random.default_rng(1)
    th = rng.normal(scale=0.5, size=spec.n_params(X.shape[1]))
    K = spec.n_outputs
    S = ref.scores(spec, X, th)
    np.testing.assert_allclose(S, _aug(X, fi) @ th.reshape(K, -1).T, rtol=1e-14, atol=1e-14)
    # closed-form residuals dL/ds
    s = S[:, 0]
    if fam == "logistic":
        r = (1 / (1 + np.exp(-s)) - y)[:, None]
        L = np.logaddexp(0, s) - y * s
    elif fam == "multinomial":
        P = np.exp(S - S.max(1, keepdims=True))
        P /= P.sum(1, keepdims=True)
        Y = np.eye(K)[y.astype(int)]
        r = P - Y
        L = np.log(np.exp(S).sum(1)) - (S * Y).sum(1)
    elif fam == "smooth_hinge":
        t = spec.temperature
        u = (1 - y * s) / t
        r = (-y / (1 + np.exp(-u)))[:, None]
        L = t * np.logaddexp(0, u)
    else:
        r = (s - y)[:, None]
        L = 0.5 * (s - y) ** 2
    np.testing.assert_allclose(ref.residuals(spec, X, y, th), r, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ref.losses(spec, X, y, th), L, rtol=1e-12, atol=1e-14)
    G = ref.per_example_grads(spec, X, y, th)
    Gcf = np.einsum("nk,nj->nkj", r, _aug(X, fi)).reshape(len(X), -1)
    np.testing.assert_allclose(G, Gcf, rtol=1e-12, atol=1e-14)
    # objective = mean loss + (l2/2)|Pθ|², gradient = mean per-example gradient + l2 P θ
    m = spec.penalty_mask(X.shape[1])
    assert abs(ref.objective(spec, X, y, th) - (L.mean() + 0.5 * spec.l2 * np.sum((m * th) ** 2))) < 1e-13
    np.testing.assert_allclose(
        ref.objective_grad(spec, X, y, th), G.mean(0) + spec.l2 * m * th, rtol=1e-12, atol=1e-14
    )


def test_weights_normalisation():
    spec = _spec("logistic", True, False)
    X, y, _, _ = _problem("logistic")
    th = np.random.default_rng(2).normal(size=spec.n_params(X.shape[1]))
    w = np.ones(len(X))
    w[[3, 7]] = 0
    keep = w > 0
    assert abs(ref.objective(spec, X, y, th, w) - ref.objective(spec, X[keep], y[keep], th)) < 1e-14
    np.testing.assert_allclose(
        ref.hessian(spec, X, y, th, 2.5 * w), ref.hessian(spec, X[keep], y[keep], th), rtol=1e-13, atol=1e-15
    )


@pytest.mark.parametrize("fam,fi,pi", CASES)
def test_reference_trainers_agree(fam, fi, pi):
    spec = _spec(fam, fi, pi)
    X, y, _, _ = _problem(fam)
    th, _, gn = ref.fit(spec, X, y)
    assert gn <= 1e-10
    assert np.linalg.norm(ref.objective_grad(spec, X, y, th)) <= 1e-10
    th2 = ref.fit_scipy(spec, X, y)
    P = ref.null_space_projector(spec, X.shape[1])
    assert np.abs(P @ (th - th2)).max() <= 1e-7 * max(1.0, np.abs(th).max())


def test_squared_trainer_closed_form():
    for fi, pi in [(True, False), (True, True), (False, False)]:
        spec = _spec("squared", fi, pi)
        X, y, _, _ = _problem("squared")
        Xa = _aug(X, fi)
        m = spec.penalty_mask(X.shape[1])
        th_cf = np.linalg.solve(Xa.T @ Xa / len(X) + spec.l2 * np.diag(m), Xa.T @ y / len(X))
        th, _, _ = ref.fit(spec, X, y)
        np.testing.assert_allclose(th, th_cf, rtol=1e-11, atol=1e-12)
        np.testing.assert_allclose(
            ref.hessian(spec, X, y, th), Xa.T @ Xa / len(X) + spec.l2 * np.diag(m), rtol=1e-13, atol=1e-14
        )


def test_trainer_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    X, y, _, _ = _problem("logistic", n=80)
    l2 = 0.02
    spec = ref.Spec("logistic", 1, True, False, l2=l2)
    th, _, _ = ref.fit(spec, X, y)
    sk = sklearn.LogisticRegression(C=1.0 / (l2 * len(X)), tol=1e-12, max_iter=10000).fit(X, y)
    np.testing.assert_allclose(th, np.r_[sk.coef_.ravel(), sk.intercept_], rtol=1e-5, atol=1e-7)
    Xr, yr, _, _ = _problem("squared", n=80)
    spec = ref.Spec("squared", 1, True, False, l2=l2)
    th, _, _ = ref.fit(spec, Xr, yr)
    sk = sklearn.Ridge(alpha=l2 * len(Xr)).fit(Xr, yr)
    np.testing.assert_allclose(th, np.r_[sk.coef_.ravel(), sk.intercept_], rtol=1e-9, atol=1e-11)


def test_multinomial_null_direction():
    spec = _spec("multinomial", True, False)
    X, y, _, _ = _problem("multinomial")
    th, _, _ = ref.fit(spec, X, y)
    H = ref.hessian(spec, X, y, th)
    P = ref.null_space_projector(spec, X.shape[1])
    v = np.linalg.svd(np.eye(len(P)) - P)[0][:, 0]
    assert np.abs(H @ v).max() < 1e-14
    G = ref.per_example_grads(spec, X, y, th)
    assert np.abs(G @ v).max() < 1e-14


@pytest.mark.parametrize("fam,fi,pi", CASES)
def test_influence_quantities_consistent(fam, fi, pi):
    spec = _spec(fam, fi, pi)
    X, y, Xt, yt = _problem(fam)
    th, _, _ = ref.fit(spec, X, y)
    lam = 1e-3 if fam == "multinomial" else 0.0
    idx = [0, 5, 9]
    H = ref.hessian(spec, X, y, th)
    G = ref.per_example_grads(spec, X, y, th)
    Gt = ref.per_example_grads(spec, Xt, yt, th)
    A = H + lam * np.eye(len(H))
    up = ref.up_params(spec, X, y, th, idx, lam)
    np.testing.assert_allclose(A @ up.T, -G[idx].T, atol=1e-12)
    ul = ref.up_loss(spec, X, y, th, Xt, yt, None, lam)
    np.testing.assert_allclose(ul[idx], up @ Gt.T, rtol=1e-10, atol=1e-14)
    si = ref.self_influence(spec, X, y, th, None, lam)
    assert np.all(si <= 1e-15)
    np.testing.assert_allclose(si[idx], np.einsum("kp,kp->k", up, G[idx]), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(
        ref.loo_influence(spec, X, y, th, Xt, yt, idx, lam), -ul[idx] / len(X), rtol=1e-13, atol=1e-18
    )
    # single test point as (d,), scalar
    np.testing.assert_allclose(
        ref.up_loss(spec, X, y, th, Xt[1], yt[1], idx, lam), ul[idx][:, 1:2], rtol=1e-12, atol=1e-16
    )
    # top_k ordering
    hi, hv, ai, av = ref.top_k(ul, 4)
    assert hi.shape == (Xt.shape[0], 4)
    for j in range(Xt.shape[0]):
        assert np.all(np.diff(hv[j]) >= 0) and np.all(np.diff(av[j]) <= 0)
        assert hv[j, 0] == ul[:, j].min() and av[j, 0] == ul[:, j].max()


@pytest.mark.parametrize("fam,fi,pi", CASES)
def test_pert_loss_finite_differences(fam, fi, pi):
    spec = _spec(fam, fi, pi)
    X, y, Xt, yt = _problem(fam)
    th, _, _ = ref.fit(spec, X, y)
    lam = 1e-3
    S = ref.solve_damped(ref.hessian(spec, X, y, th), ref.per_example_grads(spec, Xt, yt, th).T, lam)
    pl = ref.pert_loss(spec, X, y, th, Xt, yt, [2, 4], lam)
    assert pl.shape == (2, len(Xt), X.shape[1])
    for a, i in enumerate([2, 4]):
        fd = _fd_jac(
            lambda x, i=i: -(ref.per_example_grads(spec, x[None], y[i : i + 1], th)[0] @ S), X[i], h=1e-6
        )
        np.testing.assert_allclose(pl[a], fd, rtol=1e-6, atol=1e-8 * np.abs(pl[a]).max())


def test_loo_newton_exact_for_squared_loss():
    for fi, pi in [(True, False), (False, False)]:
        spec = _spec("squared", fi, pi)
        X, y, Xt, yt = _problem("squared")
        th, _, _ = ref.fit(spec, X, y)
        idx = [0, 3, 11]
        a = ref.loo_newton(spec, X, y, th, Xt, yt, idx)
        b = ref.retrain_loo(spec, X, y, th, Xt, yt, idx)
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13)
        ag = ref.loo_newton(spec, X, y, th, Xt, yt, idx, group=True)
        bg = ref.retrain_loo(spec, X, y, th, Xt, yt, idx, group=True)
        assert ag.shape == (len(Xt),)
        np.testing.assert_allclose(ag, bg, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("fam", ["logistic", "multinomial", "smooth_hinge"])
def test_loo_approximations_track_retraining(fam):
    spec = _spec(fam, True, True)
    X, y, Xt, yt = _problem(fam, n=80)
    th, _, _ = ref.fit(spec, X, y)
    idx = np.arange(0, 80, 8)
    rt = ref.retrain_loo(spec, X, y, th, Xt, yt, idx)
    nw = ref.loo_newton(spec, X, y, th, Xt, yt, idx)
    inf = ref.loo_influence(spec, X, y, th, Xt, yt, idx)
    scale = np.abs(rt).max()
    assert np.abs(nw - rt).max() <= 0.1 * scale
    assert np.abs(inf - rt).max() <= 0.3 * scale
    assert np.corrcoef(inf.ravel(), rt.ravel())[0, 1] > 0.9
