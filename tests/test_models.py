"""pyinfluence's estimators against scikit-learn and closed-form numpy, and from_sklearn."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import pyinfluence as pi
from pyinfluence.errors import ConvergenceError, NotAtOptimumWarning, NotFittedError

sklearn = pytest.importorskip("sklearn")
from sklearn import linear_model as sk  # noqa: E402
from sklearn.datasets import load_breast_cancer, load_digits  # noqa: E402

_NEW_PENALTY_API = sk.LogisticRegression().get_params().get("penalty") == "deprecated"


def _sk_logistic(**kw):
    """sklearn LogisticRegression with penalty given the way the installed version wants it."""
    penalty = kw.pop("penalty", "l2")
    if _NEW_PENALTY_API:
        if penalty == "l1":
            kw["l1_ratio"] = 1.0
        elif penalty == "elasticnet":
            kw["l1_ratio"] = 0.5
        elif penalty is None:
            kw["C"] = np.inf
    else:
        kw["penalty"] = penalty
        if penalty == "elasticnet":
            kw["l1_ratio"] = 0.5
    return sk.LogisticRegression(**kw)


@pytest.fixture(scope="module")
def cancer():
    X, y = load_breast_cancer(return_X_y=True)
    X = (X - X.mean(0)) / X.std(0)
    return X, y


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(y), 400, replace=False)
    return X[idx] / 16.0, y[idx]


@pytest.fixture(scope="module")
def regression():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((80, 6))
    y = X @ rng.standard_normal(6) + 0.3 + 0.2 * rng.standard_normal(80)
    return X, y


def _logistic_grad(model, X, y):
    """Independent numpy gradient of R for a binary LogisticRegression (y in {0,1})."""
    n, d = X.shape
    Xa = np.hstack([X, np.ones((n, 1))]) if model.fit_intercept else X
    s = Xa @ model.theta_[0]
    p = 1 / (1 + np.exp(-s))
    g = Xa.T @ (p - y) / n
    P = np.ones(Xa.shape[1])
    if model.fit_intercept and not model.penalize_intercept:
        P[-1] = 0
    return g + model.l2 * P * model.theta_[0]


# ------------------------------------------------------------------------------------------------
# estimators vs scikit-learn
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("l2", [1e-2, 1e-4])
def test_logistic_binary_matches_sklearn(cancer, l2, fit_intercept):
    X, y = cancer
    n = len(y)
    ours = pi.LogisticRegression(l2=l2, fit_intercept=fit_intercept).fit(X, y)
    ref = sk.LogisticRegression(
        C=1 / (l2 * n),
        solver="newton-cholesky",
        tol=1e-12,
        max_iter=1000,
        fit_intercept=fit_intercept,
    ).fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape == (1, X.shape[1])
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-5)
    assert ours.grad_norm_ <= 1e-10
    assert np.linalg.norm(_logistic_grad(ours, X, y)) <= 1e-9
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_allclose(ours.predict_log_proba(X[:20]), np.log(ours.predict_proba(X[:20])), atol=1e-10)
    np.testing.assert_allclose(ours.decision_function(X), ref.decision_function(X), atol=1e-4)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


def test_logistic_multinomial_matches_sklearn(digits):
    X, y = digits
    n = len(y)
    l2 = 1e-2
    ours = pi.LogisticRegression(l2=l2).fit(X, y)
    ref = sk.LogisticRegression(C=1 / (l2 * n), solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(X, y)
    assert ours.theta_.shape == (10, 65) and ours.coef_.shape == (10, 64)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-5)
    # softmax intercepts are defined up to a common shift
    np.testing.assert_allclose(
        ours.intercept_ - ours.intercept_.mean(), ref.intercept_ - ref.intercept_.mean(), atol=1e-5
    )
    np.testing.assert_allclose(ours.predict_proba(X), ref.predict_proba(X), atol=1e-6)
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    np.testing.assert_array_equal(ours.classes_, np.arange(10))


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_ridge_matches_sklearn(regression, fit_intercept):
    X, y = regression
    n = len(y)
    l2 = 0.05
    ours = pi.RidgeRegression(l2=l2, fit_intercept=fit_intercept).fit(X, y)
    ref = sk.Ridge(alpha=l2 * n, fit_intercept=fit_intercept).fit(X, y)
    np.testing.assert_allclose(ours.coef_, ref.coef_, atol=1e-9)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=1e-9)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), atol=1e-9)
    ols = pi.RidgeRegression(l2=0.0, fit_intercept=fit_intercept).fit(X, y)
    np.testing.assert_allclose(
        ols.coef_, sk.LinearRegression(fit_intercept=fit_intercept).fit(X, y).coef_, atol=1e-9
    )


def test_ridge_closed_form_with_penalized_intercept(regression):
    X, y = regression
    n, d = X.shape
    l2 = 0.1
    m = pi.RidgeRegression(l2=l2, penalize_intercept=True).fit(X, y)
    Xa = np.hstack([X, np.ones((n, 1))])
    w = np.linalg.solve(Xa.T @ Xa / n + l2 * np.eye(d + 1), Xa.T @ y / n)
    np.testing.assert_allclose(m.theta_[0], w, atol=1e-10)


def test_smooth_hinge_svm_stationary_and_labels(cancer):
    X, y = cancer
    labels = np.where(y == 1, "pos", "neg")
    t, l2 = 0.1, 1e-2
    m = pi.SmoothHingeSVM(l2=l2, temperature=t).fit(X, labels)
    np.testing.assert_array_equal(m.classes_, ["neg", "pos"])
    n = len(y)
    Xa = np.hstack([X, np.ones((n, 1))])
    ypm = np.where(y == 1, 1.0, -1.0)
    s = Xa @ m.theta_[0]
    u = (1 - ypm * s) / t
    dL = -ypm / (1 + np.exp(-u))
    grad = Xa.T @ dL / n + l2 * np.r_[m.theta_[0, :-1], 0.0]
    assert np.linalg.norm(grad) <= 1e-9
    np.testing.assert_allclose(m.loss(X, labels), t * np.logaddexp(0, u), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.decision_function(X), s, atol=1e-12)
    np.testing.assert_array_equal(m.predict(X), np.where(s > 0, "pos", "neg"))
    assert (m.predict(X) == labels).mean() > 0.95


def test_loss_matches_numpy(cancer, digits, regression):
    X, y = cancer
    m = pi.LogisticRegression(l2=1e-2).fit(X, y)
    s = m.decision_function(X)
    np.testing.assert_allclose(m.loss(X, y), np.logaddexp(0, s) - y * s, rtol=1e-10, atol=1e-13)
    X, y = digits
    m = pi.LogisticRegression(l2=1e-2).fit(X, y)
    S = m.decision_function(X)
    lse = np.log(np.exp(S - S.max(1, keepdims=True)).sum(1)) + S.max(1)
    np.testing.assert_allclose(m.loss(X, y), lse - S[np.arange(len(y)), y], rtol=1e-10, atol=1e-13)
    X, y = regression
    m = pi.RidgeRegression(l2=1e-2).fit(X, y)
    np.testing.assert_allclose(m.loss(X, y), 0.5 * (m.predict(X) - y) ** 2, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("labels", [(-1, 1), (3, 7), ("cat", "dog"), (False, True), (0.0, 1.0)])
def test_binary_label_encoding(cancer, labels):
    X, y = cancer
    y_lab = np.where(y == 1, labels[1], labels[0])
    m = pi.LogisticRegression(l2=1e-2).fit(X, y_lab)
    ref = pi.LogisticRegression(l2=1e-2).fit(X, y)
    np.testing.assert_array_equal(m.classes_, np.unique(y_lab))
    np.testing.assert_allclose(m.theta_, ref.theta_, atol=1e-12)
    np.testing.assert_array_equal(m.predict(X), np.where(ref.predict(X) == 1, labels[1], labels[0]))
    np.testing.assert_allclose(m.loss(X[:5], y_lab[:5]), ref.loss(X[:5], y[:5]))


def test_multinomial_string_labels(digits):
    X, y = digits
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    X, y = X[y < 3], y[y < 3]
    m = pi.LogisticRegression(l2=1e-2).fit(X, names[y])
    np.testing.assert_array_equal(m.classes_, np.sort(names[:3]))
    assert m.theta_.shape == (3, 65)
    assert (m.predict(X) == names[y]).mean() > 0.95


def test_inputs_torch_and_float32(cancer):
    torch = pytest.importorskip("torch")
    X, y = cancer
    ref = pi.LogisticRegression(l2=1e-2).fit(X, y)
    m = pi.LogisticRegression(l2=1e-2).fit(torch.from_numpy(X), torch.from_numpy(y))
    np.testing.assert_allclose(m.theta_, ref.theta_, atol=1e-12)
    m32 = pi.LogisticRegression(l2=1e-2).fit(X.astype(np.float32), y)  # fitted in float64
    assert m32.theta_.dtype == np.float64
    np.testing.assert_allclose(m32.theta_, ref.theta_, atol=1e-5)


def test_refit_clears_and_params(cancer):
    X, y = cancer
    m = pi.LogisticRegression(l2=1e-2)
    assert m.get_params()["l2"] == 1e-2
    m.set_params(l2=1e-1)
    assert "l2=0.1" in repr(m)
    with pytest.raises(ValueError, match="invalid parameter 'C'"):
        m.set_params(C=1.0)
    m.fit(X, y)
    assert m.n_features_in_ == 30
    m.fit(X[:, :5], y)
    assert m.coef_.shape == (1, 5)


# ------------------------------------------------------------------------------------------------
# from_sklearn
# ------------------------------------------------------------------------------------------------
def _convert(est, X, y, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        return pi.from_sklearn(est, X, y, **kw)


def _assert_same_influence(a, b, X, y, rtol=1e-6):
    ia, ib = pi.LinearInfluence(a, X, y), pi.LinearInfluence(b, X, y)
    ua, ub = ia.up_loss(X[:5], y[:5]), ib.up_loss(X[:5], y[:5])
    np.testing.assert_allclose(ua, ub, rtol=rtol, atol=rtol * np.abs(ub).max())


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_from_sklearn_logistic_binary(cancer, fit_intercept):
    X, y = cancer
    est = sk.LogisticRegression(C=0.5, fit_intercept=fit_intercept).fit(X, y)  # lbfgs, tol=1e-4
    with pytest.warns(NotAtOptimumWarning, match="not at the optimum"):
        model = pi.from_sklearn(est, X, y)
    assert isinstance(model, pi.LogisticRegression)
    assert model.l2 == pytest.approx(1 / (0.5 * len(y)))
    assert model.grad_norm_ <= 1e-10
    assert model.sklearn_grad_norm_ > 1e-6
    own = pi.LogisticRegression(l2=model.l2, fit_intercept=fit_intercept).fit(X, y)
    np.testing.assert_allclose(model.theta_, own.theta_, atol=1e-8)
    np.testing.assert_allclose(model.coef_, est.coef_, atol=0.1)  # sklearn stopped early (tol=1e-4)
    _assert_same_influence(model, own, X, y)


def test_from_sklearn_logistic_multinomial(digits):
    X, y = digits
    est = sk.LogisticRegression(C=1.0, max_iter=500).fit(X, y)
    model = _convert(est, X, y)
    assert model.theta_.shape == (10, 65)
    assert model.grad_norm_ <= 1e-10
    own = pi.LogisticRegression(l2=model.l2).fit(X, y)
    np.testing.assert_allclose(model.coef_, own.coef_, atol=1e-7)
    _assert_same_influence(model, own, X, y)


def test_from_sklearn_liblinear_penalizes_intercept(cancer):
    X, y = cancer
    est = sk.LogisticRegression(C=0.5, solver="liblinear", tol=1e-8).fit(X, y)
    model = _convert(est, X, y)
    assert model.penalize_intercept
    own = pi.LogisticRegression(l2=model.l2, penalize_intercept=True).fit(X, y)
    np.testing.assert_allclose(model.theta_, own.theta_, atol=1e-8)
    np.testing.assert_allclose(model.theta_[0, :-1], est.coef_[0], atol=1e-4)


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_from_sklearn_ridge_and_ols(regression, fit_intercept):
    X, y = regression
    est = sk.Ridge(alpha=3.0, fit_intercept=fit_intercept).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotAtOptimumWarning)  # sklearn's ridge is exact
        model = pi.from_sklearn(est, X, y)
    assert model.l2 == pytest.approx(3.0 / len(y))
    assert model.grad_norm_ <= 1e-10
    np.testing.assert_allclose(model.coef_, est.coef_, atol=1e-10)
    np.testing.assert_allclose(model.intercept_, est.intercept_, atol=1e-10)
    own = pi.RidgeRegression(l2=model.l2, fit_intercept=fit_intercept).fit(X, y)
    _assert_same_influence(model, own, X, y, rtol=1e-8)
    ols = pi.from_sklearn(sk.LinearRegression(fit_intercept=fit_intercept).fit(X, y), X, y)
    assert ols.l2 == 0.0 and ols.grad_norm_ <= 1e-10
    np.testing.assert_allclose(
        ols.predict(X),
        sk.LinearRegression(fit_intercept=fit_intercept).fit(X, y).predict(X),
        atol=1e-10,
    )


def test_from_sklearn_ridge_column_target(regression):
    X, y = regression
    est = sk.Ridge(alpha=1.0).fit(X, y[:, None])
    model = _convert(est, X, y)
    np.testing.assert_allclose(model.coef_, np.ravel(est.coef_), atol=1e-10)
    np.testing.assert_allclose(model.intercept_, np.ravel(est.intercept_)[0], atol=1e-10)


def test_from_sklearn_refine_false_keeps_parameters(cancer):
    X, y = cancer
    est = sk.LogisticRegression(C=0.5, tol=1e-2).fit(X, y)
    with pytest.warns(NotAtOptimumWarning, match="refine=True"):
        model = pi.from_sklearn(est, X, y, refine=False)
    np.testing.assert_array_equal(model.coef_, est.coef_)
    np.testing.assert_array_equal(model.intercept_, est.intercept_)
    assert model.grad_norm_ > 1e-6
    np.testing.assert_array_equal(model.predict(X), est.predict(X))


def test_from_sklearn_refusals(cancer, regression, digits):
    X, y = cancer
    with pytest.raises(NotFittedError, match="not fitted"):
        pi.from_sklearn(sk.LogisticRegression(), X, y)
    l1 = _sk_logistic(penalty="l1", solver="liblinear", C=0.5).fit(X, y)
    with pytest.raises(ValueError, match="not supported.*L2 penalty"):
        pi.from_sklearn(l1, X, y)
    en = _sk_logistic(penalty="elasticnet", solver="saga", max_iter=50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        en.fit(X, y)
    with pytest.raises(ValueError, match="not supported"):
        pi.from_sklearn(en, X, y)
    cw = sk.LogisticRegression(class_weight="balanced").fit(X, y)
    with pytest.raises(ValueError, match="class_weight"):
        pi.from_sklearn(cw, X, y)
    est = sk.LogisticRegression().fit(X, y)
    with pytest.raises(ValueError, match="X has 5 features but the LogisticRegression was trained on 30"):
        pi.from_sklearn(est, X[:, :5], y)
    with pytest.raises(ValueError, match=r"y contains label\(s\) 2"):
        pi.from_sklearn(est, X, np.where(y == 1, 2, 0))
    with pytest.raises(TypeError, match="LogisticRegressionCV.*C_"):
        pi.from_sklearn(sk.LogisticRegressionCV(), X, y)  # refused before any fit check
    with pytest.raises(TypeError, match="unsupported estimator"):
        pi.from_sklearn(sk.SGDClassifier().fit(X, y), X, y)
    with pytest.raises(TypeError, match="unsupported estimator"):
        pi.from_sklearn(object(), X, y)
    Xr, yr = regression
    with pytest.raises(ValueError, match="positive=True"):
        pi.from_sklearn(sk.Ridge(positive=True).fit(Xr, yr), Xr, yr)
    with pytest.raises(ValueError, match="single target"):
        pi.from_sklearn(sk.Ridge().fit(Xr, np.c_[yr, yr]), Xr, yr)
    with pytest.raises(TypeError, match="refine must be True or False"):
        pi.from_sklearn(sk.Ridge().fit(Xr, yr), Xr, yr, refine="yes")


def test_from_sklearn_ovr_refused(digits):
    X, y = digits
    est = sk.LogisticRegression(max_iter=300).fit(X, y)
    est.solver = "liblinear"  # as if fitted one-vs-rest
    if not hasattr(est, "multi_class"):
        est.multi_class = "auto"
    with pytest.raises(ValueError, match="one-vs-rest"):
        pi.from_sklearn(est, X, y)


def test_from_sklearn_separable_without_penalty():
    X = np.r_[np.linspace(-3, -1, 10), np.linspace(1, 3, 10)][:, None]
    y = (X[:, 0] > 0).astype(int)
    est = _sk_logistic(penalty=None, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X, y)
    with pytest.raises(ConvergenceError, match="separable"):
        _convert(est, X, y)
