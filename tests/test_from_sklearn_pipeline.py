"""from_sklearn with scikit-learn Pipelines, and its fallback to a fresh fit when refining fails.

Every expected value is computed here independently of pyinfluence: the transformed features by hand in numpy
(standardisation, degree-2 monomials, one-hot columns), the optimum by scikit-learn refits at a tight tolerance
or by the ridge normal equations, and the influence from H and the per-example gradients written out below.
"""

from __future__ import annotations

import warnings
from itertools import combinations_with_replacement

import numpy as np
import pytest

import pyinfluence as pi
from pyinfluence.errors import ConvergenceError, NotAtOptimumWarning, NotFittedError

pytest.importorskip("sklearn")
from sklearn import linear_model as sk
from sklearn.compose import ColumnTransformer
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, PolynomialFeatures, StandardScaler
from sklearn.svm import SVC


@pytest.fixture(scope="module")
def cancer():
    return load_breast_cancer(return_X_y=True)  # raw features, scales from 1e-3 to 1e3


@pytest.fixture(scope="module")
def diabetes():
    return load_diabetes(return_X_y=True)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotAtOptimumWarning)
        return fn(*args, **kw)


def _standardise(X, ref):
    """StandardScaler by hand: (x − mean) / std over ``ref`` (population std, ddof = 0)."""
    return (X - ref.mean(0)) / ref.std(0)


def _augment(Z):
    return np.hstack([Z, np.ones((Z.shape[0], 1))])  # the intercept is the last parameter


def _up_loss(H, G_test, G_train):
    """I_up,loss = −∇L(z_test)ᵀ H⁻¹ ∇L(z), shape (k train, m test)."""
    return -(G_train @ np.linalg.solve(H, G_test.T))


def _logistic_parts(Za, y, theta, l2):
    """Binary logistic, L = log(1 + eˢ) − y s, s = θᵀz: ∇L = (σ(s) − y) z; H = (1/n) Σ σ(1−σ) z zᵀ + l2·P."""
    p = 1.0 / (1.0 + np.exp(-(Za @ theta)))
    G = (p - y)[:, None] * Za
    P = np.eye(Za.shape[1])
    P[-1, -1] = 0.0  # the intercept is not penalised
    H = (Za * (p * (1 - p))[:, None]).T @ Za / len(y) + l2 * P
    return G, H


def _ridge_parts(Za, y, l2):
    """Squared loss ½(s − y)² with R = (1/n) Σ L + (l2/2)‖w‖²: the normal equations give θ̂; ∇L = (s − y) z;
    H = ZᵀZ/n + l2·P."""
    n = len(y)
    P = np.eye(Za.shape[1])
    P[-1, -1] = 0.0
    H = Za.T @ Za / n + l2 * P
    theta = np.linalg.solve(H, Za.T @ y / n)
    G = (Za @ theta - y)[:, None] * Za
    return theta, G, H


# ------------------------------------------------------------------------------------------------
# influence through a pipeline equals influence computed by hand on the transformed data
# ------------------------------------------------------------------------------------------------
def test_scaler_logistic_pipeline(cancer):
    X, y = cancer
    C = 0.5
    pipe = make_pipeline(StandardScaler(), sk.LogisticRegression(C=C, max_iter=1000)).fit(X, y)
    with pytest.warns(NotAtOptimumWarning, match="last step 'logisticregression' of the Pipeline"):
        model = pi.from_sklearn(pipe, X, y)
    assert isinstance(model, pi.LogisticRegression)
    assert isinstance(model.transformer_, Pipeline)  # it says where the features come from
    assert model.n_features_in_ == 30 and model.grad_norm_ <= 1e-10
    Z = _standardise(X, X)
    np.testing.assert_allclose(model.transform(X[:7]), Z[:7], rtol=1e-12, atol=1e-12)
    # θ̂ is the exact optimum on the standardised data: scikit-learn's Newton solver at a tight tolerance
    ref = sk.LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=200).fit(Z, y)
    theta = np.r_[ref.coef_[0], ref.intercept_[0]]
    np.testing.assert_allclose(model.theta_[0], theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(model.predict(model.transform(X)), pipe.predict(X))

    l2 = 1.0 / (C * len(y))
    G, H = _logistic_parts(_augment(Z), y, theta, l2)
    test = np.arange(0, len(y), 57)
    expected = _up_loss(H, G[test], G)
    inf = pi.LinearInfluence(model, model.transform(X), y)
    got = inf.up_loss(model.transform(X[test]), y[test])
    assert got.shape == (len(y), len(test))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_polynomial_ridge_pipeline(diabetes):
    X, y = diabetes
    alpha = 0.05
    pipe = make_pipeline(PolynomialFeatures(degree=2, include_bias=False), sk.Ridge(alpha=alpha)).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotAtOptimumWarning)  # scikit-learn's ridge solve is exact
        model = pi.from_sklearn(pipe, X, y)
    assert isinstance(model, pi.RidgeRegression)
    # degree-2 monomials in scikit-learn's order: x_0..x_9, then x_i·x_j for i ≤ j
    pairs = list(combinations_with_replacement(range(X.shape[1]), 2))
    Z = np.hstack([X, np.stack([X[:, i] * X[:, j] for i, j in pairs], axis=1)])
    assert model.n_features_in_ == Z.shape[1] == 65
    np.testing.assert_allclose(model.transform(X), Z, rtol=1e-12, atol=1e-15)

    theta, G, H = _ridge_parts(_augment(Z), y, alpha / len(y))
    np.testing.assert_allclose(model.theta_[0], theta, rtol=1e-7, atol=1e-7 * np.abs(theta).max())
    test = np.arange(3, len(y), 40)
    expected = _up_loss(H, G[test], G)
    inf = pi.LinearInfluence(model, model.transform(X), y)
    got = inf.up_loss(model.transform(X[test]), y[test])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())
    # loo_change = −up_loss/n: the predicted change of each test loss when a training row is left out
    np.testing.assert_allclose(
        inf.loo_change(model.transform(X[test]), y[test]),
        -expected / len(y),
        rtol=1e-6,
        atol=1e-8 * np.abs(expected).max() / len(y),
    )


def test_column_transformer_dataframe_with_sparse_one_hot(diabetes):
    pd = pytest.importorskip("pandas")
    X, y = diabetes
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    frame["sex"] = np.where(X[:, 1] > 0, "m", "f")  # a string column: only the pipeline can read it
    numeric = [f"f{i}" for i in range(X.shape[1]) if i != 1]
    prep = ColumnTransformer(
        [("num", StandardScaler(), numeric), ("cat", OneHotEncoder(), ["sex"])],
        sparse_threshold=1.0,  # a scipy.sparse output: from_sklearn makes it dense
    )
    pipe = make_pipeline(prep, sk.Ridge(alpha=2.0)).fit(frame, y)
    assert hasattr(pipe[:-1].transform(frame), "toarray")
    model = _quiet(pi.from_sklearn, pipe, frame, y)
    Xn = X[:, [i for i in range(X.shape[1]) if i != 1]]
    onehot = np.stack([X[:, 1] <= 0, X[:, 1] > 0], axis=1).astype(float)  # categories sorted: "f", "m"
    Z = np.hstack([_standardise(Xn, Xn), onehot])
    np.testing.assert_allclose(model.transform(frame), Z, rtol=1e-12, atol=1e-12)

    theta, G, H = _ridge_parts(_augment(Z), y, 2.0 / len(y))
    np.testing.assert_allclose(model.theta_[0], theta, rtol=1e-8, atol=1e-8 * np.abs(theta).max())
    inf = pi.LinearInfluence(model, model.transform(frame), y)
    test = [0, 100, 200]
    got = inf.up_loss(model.transform(frame.iloc[test]), y[test])
    expected = _up_loss(H, G[test], G)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-8 * np.abs(expected).max())


def test_nested_pipeline_and_plain_model_transform(cancer):
    X, y = cancer
    X = X[:, :8]
    inner = make_pipeline(
        PolynomialFeatures(degree=2, include_bias=False), sk.LogisticRegression(max_iter=5000)
    )
    pipe = make_pipeline(StandardScaler(), inner).fit(X, y)
    model = _quiet(pi.from_sklearn, pipe, X, y)
    Zs = _standardise(X, X)
    pairs = list(combinations_with_replacement(range(8), 2))
    Z = np.hstack([Zs, np.stack([Zs[:, i] * Zs[:, j] for i, j in pairs], axis=1)])
    np.testing.assert_allclose(model.transform(X), Z, rtol=1e-10, atol=1e-12)
    ref = sk.LogisticRegression(solver="newton-cholesky", tol=1e-12, max_iter=200).fit(Z, y)
    np.testing.assert_allclose(model.coef_[0], ref.coef_[0], rtol=1e-5, atol=1e-7)

    # a model that was not built from a pipeline: no transformer, transform only validates
    plain = _quiet(pi.from_sklearn, sk.LogisticRegression().fit(Z, y), Z, y)
    assert plain.transformer_ is None
    np.testing.assert_array_equal(plain.transform(Z[:3]), Z[:3])
    with pytest.raises(ValueError, match="X has 5 features but the model was trained on 44"):
        plain.transform(Z[:3, :5])
    model.fit(Z, y)  # refitting on given features drops the transformer
    assert model.transformer_ is None


# ------------------------------------------------------------------------------------------------
# refining fails (X is not the data the estimator was fitted on): a fresh fit, with a warning
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["last_step_on_raw_X", "labels_of_other_rows"])
def test_fallback_gives_a_fresh_fit(cancer, case):
    X, y = cancer
    C = 1.0
    pipe = make_pipeline(StandardScaler(), sk.LogisticRegression(C=C, max_iter=1000)).fit(X, y)
    est = pipe[-1]
    if case == "last_step_on_raw_X":  # the common mistake: the last step alone with the raw rows
        X_new, y_new = X, y
        with pytest.warns(NotAtOptimumWarning) as record:
            model = pi.from_sklearn(est, X_new, y_new)
        messages = " ".join(str(w.message) for w in record)
        assert "not near an optimum" in messages and "Fell back to a fresh exact fit" in messages
        assert "pass the whole Pipeline" in messages
        assert "standardise" not in messages  # not the misleading advice of a singular objective
    else:  # standardised rows, but paired with other labels: refining from the estimator's θ works
        X_new, y_new = _standardise(X, X), y[::-1].copy()
        model = _quiet(pi.from_sklearn, est, X_new, y_new)
    assert model.grad_norm_ <= 1e-10
    ref = sk.LogisticRegression(C=C, solver="newton-cholesky", tol=1e-12, max_iter=500).fit(X_new, y_new)
    np.testing.assert_allclose(model.coef_[0], ref.coef_[0], rtol=1e-6, atol=1e-8 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(model.intercept_, ref.intercept_, rtol=1e-6, atol=1e-8)
    assert not np.allclose(model.coef_[0], est.coef_[0], rtol=1e-2)  # not the estimator's coefficients


def test_genuinely_singular_objective_stays_an_error(cancer):
    X, y = cancer
    Z = _standardise(X[:, :2], X[:, :2])
    Z = np.hstack([Z, Z[:, :1]])  # a duplicated column with no penalty: H is singular at every θ
    est = sk.LogisticRegression(C=np.inf, max_iter=1000).fit(Z, y)
    with pytest.raises(ConvergenceError, match="and so did a fresh fit.*not positive definite"):
        _quiet(pi.from_sklearn, est, Z, y)


# ------------------------------------------------------------------------------------------------
# bad pipelines: clear errors naming the step
# ------------------------------------------------------------------------------------------------
def test_bad_pipelines_are_refused(cancer):
    X, y = cancer
    X, y = X[:200], y[:200]
    with pytest.raises(TypeError, match=r"unsupported estimator sklearn SVC \(SVC \(last step 'svc'"):
        pi.from_sklearn(make_pipeline(StandardScaler(), SVC()).fit(X, y), X, y)
    with pytest.raises(TypeError, match="last step 'model' of the Pipeline is 'passthrough'"):
        pi.from_sklearn(Pipeline([("scale", StandardScaler()), ("model", "passthrough")]).fit(X), X, y)
    unfitted = make_pipeline(StandardScaler(), sk.LogisticRegression())
    with pytest.raises(
        NotFittedError, match="step 'standardscaler' of the Pipeline.*not fitted; fit the pipeline"
    ):
        pi.from_sklearn(unfitted, X, y)
    last_unfitted = Pipeline([("scale", StandardScaler().fit(X)), ("lr", sk.LogisticRegression())])
    with pytest.raises(
        NotFittedError, match="LogisticRegression \\(last step 'lr' of the Pipeline\\).*not fitted"
    ):
        pi.from_sklearn(last_unfitted, X, y)
    lr = sk.LogisticRegression(max_iter=1000).fit(_standardise(X, X), y)
    with pytest.raises(
        NotFittedError, match=r"step 'scale' of the Pipeline \(StandardScaler\) is not fitted"
    ):
        pi.from_sklearn(Pipeline([("scale", StandardScaler()), ("lr", lr)]), X, y)
    no_transform = Pipeline([("ols", sk.LinearRegression().fit(X, y)), ("lr", lr)])
    with pytest.raises(TypeError, match=r"step 'ols' of the Pipeline \(LinearRegression\) has no transform"):
        pi.from_sklearn(no_transform, X, y)
    pipe = make_pipeline(StandardScaler(), lr).fit(X, y)
    with pytest.raises(ValueError, match="transforming X through the pipeline's preceding steps failed"):
        pi.from_sklearn(pipe, X[:, :5], y)
    with pytest.raises(ValueError, match="class_weight"):
        pi.from_sklearn(
            make_pipeline(StandardScaler(), sk.LogisticRegression(class_weight="balanced")).fit(X, y), X, y
        )
    model = _quiet(pi.from_sklearn, pipe, X, y)
    with pytest.raises(ValueError, match="transforming X through the pipeline's preceding steps failed"):
        model.transform(X[:, :5])
