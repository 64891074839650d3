"""The one influence interface (pyinfluence.interface.Influence), answered by both paths.

(a) One scenario — an L2-regularised logistic regression (binary and 3-class) fitted exactly with
    pyinfluence.LogisticRegression — run through LinearInfluence and through TorchInfluence(solver="exact")
    on the same model written as a torch nn.Linear, by one function that sees only the interface. Every
    quantity agrees across the paths, and both agree with a closed-form numpy computation written here
    (softmax/sigmoid gradients, the Hessian of the mean loss + (l2/2)‖θ‖², −g_testᵀ H⁻¹ g_train, and
    finite differences for pert_loss), not with the library's code.
(b) Both classes are Influence subclasses with identical parameter names, kinds and defaults on every
    interface method; a subclass missing an abstract method cannot be instantiated.
(c) The torch path's leave-out Newton step, retraining and refit agree with the linear path's and with the
    closed form.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Dict

import numpy as np
import pytest

import pyinfluence
from pyinfluence.interface import Influence, TopK

torch = pytest.importorskip("torch")
from pyinfluence.torch.influence import TorchInfluence  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]

L2 = 0.05


# ------------------------------------------------------------------------------------------------
# the scenario
# ------------------------------------------------------------------------------------------------
def _data(n_classes: int):
    rng = np.random.default_rng(10 + n_classes)
    n, d, m = 90, 4, 5
    X = rng.standard_normal((n, d))
    Xt = rng.standard_normal((m, d))
    W = rng.standard_normal((n_classes, d))
    noise = rng.standard_normal((n, n_classes))
    if n_classes == 2:
        y = (X @ W[0] + 0.8 * noise[:, 0] > 0).astype(np.int64)
        yt = (Xt @ W[0] > 0).astype(np.int64)
    else:
        y = np.argmax(X @ W.T + noise, axis=1).astype(np.int64)
        yt = np.argmax(Xt @ W.T, axis=1).astype(np.int64)
    return X, y, Xt, yt


def _both_paths(n_classes: int):
    """(LinearInfluence, TorchInfluence, X, y, Xt, yt, perm) with torch_flat[perm] = linear_flat."""
    X, y, Xt, yt = _data(n_classes)
    # penalize_intercept: TorchInfluence's l2 covers every selected parameter, the bias included
    model = pyinfluence.LogisticRegression(l2=L2, penalize_intercept=True, tol=1e-12).fit(X, y)
    lin = pyinfluence.LinearInfluence(model, X, y)
    K, dt = model.theta_.shape  # K = 1 (binary) or n_classes; dt = d + 1, intercept last
    d = dt - 1
    net = torch.nn.Linear(d, K).double()
    with torch.no_grad():
        net.weight.copy_(torch.as_tensor(model.theta_[:, :d]))
        net.bias.copy_(torch.as_tensor(model.theta_[:, d]))
    if K == 1:

        def loss_fn(out, target):
            return torch.nn.functional.binary_cross_entropy_with_logits(
                out.squeeze(-1), target, reduction="none"
            )

        targets = torch.as_tensor(y, dtype=torch.float64)
    else:
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        targets = torch.as_tensor(y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fit is exact: no NotAtOptimumWarning on either path
        tor = TorchInfluence(net, loss_fn, (torch.as_tensor(X), targets), l2=L2, solver="exact")
    # torch flattens weight (K, d) then bias (K,); the linear θ is (K, d + 1) row-major
    W_pos = np.arange(K * d).reshape(K, d)
    b_pos = K * d + np.arange(K)
    perm = np.hstack([W_pos, b_pos[:, None]]).ravel()
    return lin, tor, X, y, Xt, yt, perm


def _np(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def scenario(inf: Influence, X_test: Any, y_test: Any, train_idx: Any) -> Dict[str, np.ndarray]:
    """Everything the interface offers for one test set, as numpy arrays (the interface alone)."""
    tk = inf.top_k(X_test, y_test, k=5)
    assert isinstance(tk, TopK)
    out = {
        "up_loss": inf.up_loss(X_test, y_test),
        "up_loss_pair": inf.up_loss((X_test, y_test)),  # (inputs, targets) with y_test omitted
        "up_loss_subset": inf.up_loss(X_test, y_test, train_idx),
        "up_loss_single": inf.up_loss(X_test[0], y_test[0]),  # one point without the batch axis
        "up_params": inf.up_params(train_idx),
        "self_influence": inf.self_influence(),
        "loo_change": inf.loo_change(X_test, y_test),
        "loo_group": inf.loo_change(X_test, y_test, train_idx, group=True),
        "pert_loss": inf.pert_loss(X_test, y_test, train_idx),
        "s_test": inf.s_test(X_test, y_test),
        "test_gradients": inf.test_gradients(X_test, y_test),
        "gradients": inf.gradients(train_idx),
        "hessian": inf.hessian(),
        "loss": inf.loss(X_test, y_test),
        "top_helpful_idx": tk.helpful_idx,
        "top_helpful": tk.helpful_scores,
        "top_harmful_idx": tk.harmful_idx,
        "top_harmful": tk.harmful_scores,
    }
    return {k: _np(v).astype(np.float64) for k, v in out.items()}


def _closed_form(X, y, Xt, yt, theta):
    """Per-example gradients (θ in the linear layout, (K, d+1) row-major), H and loss, in numpy."""
    K, dt = theta.shape
    n = X.shape[0]

    def aug(A):
        return np.hstack([A, np.ones((A.shape[0], 1))])

    def resid(A, labels):  # ∂L/∂s: (m, K)
        S = aug(A) @ theta.T
        if K == 1:
            return 1.0 / (1.0 + np.exp(-S)) - labels[:, None]
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        return P - np.eye(K)[labels]

    def grads(A, labels):  # (m, K·(d+1)): r ⊗ x̃
        return (resid(A, labels)[:, :, None] * aug(A)[:, None, :]).reshape(A.shape[0], -1)

    def loss(A, labels):
        S = aug(A) @ theta.T
        if K == 1:
            s = S[:, 0]
            return np.logaddexp(0.0, s) - labels * s
        return np.logaddexp.reduce(S, axis=1) - S[np.arange(len(labels)), labels]

    Xa = aug(X)
    S = Xa @ theta.T
    H = np.zeros((K * dt, K * dt))
    if K == 1:
        p = 1.0 / (1.0 + np.exp(-S[:, 0]))
        H = (Xa * (p * (1 - p))[:, None]).T @ Xa / n
    else:
        P = np.exp(S - S.max(axis=1, keepdims=True))
        P /= P.sum(axis=1, keepdims=True)
        for a in range(K):
            for b in range(K):
                w = P[:, a] * (a == b) - P[:, a] * P[:, b]
                H[a * dt : (a + 1) * dt, b * dt : (b + 1) * dt] = (Xa * w[:, None]).T @ Xa / n
    H += L2 * np.eye(K * dt)
    return grads, loss, H


@pytest.fixture(scope="module", params=[2, 3], ids=["binary", "3-class"])
def paths(request):
    return _both_paths(request.param)


def test_both_paths_agree_through_the_interface_and_with_numpy(paths):
    lin, tor, X, y, Xt, yt, perm = paths
    idx = np.array([3, 0, 41, 17, 88])
    n = X.shape[0]
    a = scenario(lin, Xt, yt, idx)
    b = scenario(tor, Xt, yt, idx)

    # the closed form, in the linear layout: −g_testᵀ H⁻¹ g_train
    grads, loss, H = _closed_form(X, y, Xt, yt, lin.model.theta_)
    G, Gt = grads(X, y), grads(Xt, yt)
    S = np.linalg.solve(H, Gt.T)  # s_test (p, m)
    up = -G @ S  # (n, m)
    ref = {
        "up_loss": up,
        "up_loss_pair": up,
        "up_loss_subset": up[idx],
        "up_loss_single": up[:, :1],
        "up_params": -np.linalg.solve(H, G[idx].T).T,
        "self_influence": -np.einsum("ip,pi->i", G, np.linalg.solve(H, G.T)),
        "loo_change": -up / n,
        "loo_group": -up[idx].sum(axis=0) / n,
        "s_test": S,
        "test_gradients": Gt,
        "gradients": G[idx],
        "hessian": H,
        "loss": loss(Xt, yt),
    }
    order = np.argsort(up, axis=0, kind="stable").T  # (m, n), most helpful first
    ref["top_helpful_idx"] = order[:, :5]
    ref["top_helpful"] = np.take_along_axis(up.T, order[:, :5], axis=1)
    ref["top_harmful_idx"] = order[:, ::-1][:, :5]
    ref["top_harmful"] = np.take_along_axis(up.T, order[:, ::-1][:, :5], axis=1)

    # the torch path's parameter order, mapped to the linear one where a quantity has a parameter axis
    to_linear = {
        "up_params": lambda v: v[:, perm],
        "s_test": lambda v: v[perm],
        "test_gradients": lambda v: v[:, perm],
        "gradients": lambda v: v[:, perm],
        "hessian": lambda v: v[np.ix_(perm, perm)],
    }
    assert set(a) == set(b) and set(ref) == set(a) - {"pert_loss"}
    for key, want in ref.items():
        got_torch = to_linear.get(key, lambda v: v)(b[key])
        for path, got in (("linear", a[key]), ("torch", got_torch)):
            assert got.shape == want.shape, (key, path, got.shape, want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-11, err_msg=f"{key} ({path} path)")
        np.testing.assert_allclose(
            a[key], got_torch, rtol=1e-8, atol=1e-12, err_msg=f"{key}: linear vs torch"
        )

    # shapes documented on the interface
    k, m, p, d = idx.size, Xt.shape[0], lin.n_params, X.shape[1]
    assert a["up_loss"].shape == (n, m) and a["up_params"].shape == (k, p)
    assert a["pert_loss"].shape == (k, m, d) and a["self_influence"].shape == (n,)
    assert a["top_helpful_idx"].shape == (m, 5) and a["loo_group"].shape == (m,)
    assert np.all(a["self_influence"] <= 0)

    # pert_loss: across paths, and against central differences of the closed form in x_i
    np.testing.assert_allclose(a["pert_loss"], b["pert_loss"], rtol=1e-8, atol=1e-12)
    h = 1e-6
    fd = np.empty((k, m, d))
    for r, i in enumerate(idx):
        for j in range(d):
            xp, xm = X[i : i + 1].copy(), X[i : i + 1].copy()
            xp[0, j] += h
            xm[0, j] -= h
            gp, gm = grads(xp, y[i : i + 1])[0], grads(xm, y[i : i + 1])[0]
            fd[r, :, j] = -(gp - gm) @ S / (2 * h)
    np.testing.assert_allclose(a["pert_loss"], fd, rtol=1e-5, atol=1e-8)


def test_sizes_predictions_and_training_data_across_paths(paths):
    lin, tor, X, y, Xt, yt, _ = paths
    assert lin.n_train == tor.n_train == X.shape[0]
    assert lin.n_params == tor.n_params == lin.model.theta_.size
    Xl, yl = lin.training_data()
    Xtr, ytr = tor.training_data()
    np.testing.assert_array_equal(Xl, X)
    np.testing.assert_array_equal(yl, y)  # the labels as given, not their encoding
    np.testing.assert_array_equal(_np(Xtr), X)
    np.testing.assert_array_equal(_np(ytr), y)
    Xl[0, 0] = 1e3  # a copy: the influence object is unchanged
    assert lin.training_data()[0][0, 0] == X[0, 0]
    np.testing.assert_array_equal(lin.predict(Xt), lin.model.predict(Xt))
    if lin.model.theta_.shape[0] > 1:  # several outputs with class labels: the torch path predicts classes
        np.testing.assert_array_equal(_np(tor.predict(Xt)), lin.predict(Xt))
        np.testing.assert_array_equal(_np(tor.predict(Xt[0])), lin.predict(Xt[:1]))
    else:  # one output (BCE on logits): the torch path returns the outputs, here the decision function
        np.testing.assert_allclose(_np(tor.predict(Xt)), lin.model.decision_function(Xt), rtol=1e-12)


def test_hessian_max_params_on_both_paths(paths):
    lin, tor, *_ = paths
    p = lin.n_params
    for inf in (lin, tor):
        assert _np(inf.hessian(max_params=p)).shape == (p, p)
        assert _np(inf.hessian(p)).shape == (p, p)  # positional, as before on the torch path
        with pytest.raises(ValueError, match="more than max_params"):
            inf.hessian(max_params=p - 1)


def test_linear_refit_matches_a_fresh_fit():
    lin, _, X, y, Xt, yt, _ = _both_paths(3)
    assert lin.can_retrain
    y2 = y.copy()
    y2[:5] = (y2[:5] + 1) % 3
    X2 = X.copy()
    X2[7] += 0.5
    new = lin.refit(X2, y2)
    assert isinstance(new, pyinfluence.LinearInfluence) and new is not lin
    fresh = pyinfluence.LogisticRegression(l2=L2, penalize_intercept=True, tol=1e-12).fit(X2, y2)
    np.testing.assert_allclose(new.model.theta_, fresh.theta_, rtol=1e-8, atol=1e-10)
    ref = pyinfluence.LinearInfluence(fresh, X2, y2)
    np.testing.assert_allclose(new.up_loss(Xt, yt), ref.up_loss(Xt, yt), rtol=1e-6, atol=1e-10)
    assert new.damping == lin.damping and new.dtype == lin.dtype
    np.testing.assert_array_equal(new.training_data()[1], y2)
    # the original object and its model are untouched
    np.testing.assert_array_equal(lin.training_data()[1], y)
    only_x = lin.refit(X2)  # the labels kept
    np.testing.assert_array_equal(only_x.training_data()[1], y)


# ------------------------------------------------------------------------------------------------
# (b) the classes and their signatures
# ------------------------------------------------------------------------------------------------
def _interface_members():
    methods, props = [], []
    for name in sorted(Influence.__abstractmethods__):
        (props if isinstance(inspect.getattr_static(Influence, name), property) else methods).append(name)
    return methods, props


def test_both_classes_implement_the_interface_with_identical_signatures():
    from pyinfluence.linear.influence import LinearInfluence

    assert issubclass(LinearInfluence, Influence) and issubclass(TorchInfluence, Influence)
    assert not LinearInfluence.__abstractmethods__ and not TorchInfluence.__abstractmethods__
    methods, props = _interface_members()
    assert set(props) == {"n_train", "n_params", "can_retrain"}
    required = {
        "up_params",
        "up_loss",
        "pert_loss",
        "self_influence",
        "loo_change",
        "top_k",
        "retrain_loo",
        "hessian",
        "refit",
        "training_data",
    }
    assert required <= set(methods)
    for name in methods:

        def params(cls, name=name):
            sig = inspect.signature(getattr(cls, name))
            return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

        assert params(LinearInfluence) == params(Influence) == params(TorchInfluence), name
        # the shared docstring lives on the interface; each path keeps a docstring of its own
        assert Influence.__dict__[name].__doc__
        for cls in (LinearInfluence, TorchInfluence):
            assert name in cls.__dict__ and cls.__dict__[name].__doc__, (cls.__name__, name)
    for name in props:
        for cls in (LinearInfluence, TorchInfluence):
            assert isinstance(inspect.getattr_static(cls, name), property), (cls.__name__, name)
    # the interface states the signs and the 1/n once
    assert "−(1/n)" in Influence.loo_change.__doc__ and "No 1/n factor" in Influence.up_loss.__doc__
    assert "(k, m)" in Influence.up_loss.__doc__ and "(m, k)" in Influence.top_k.__doc__
    assert "(k,)" in Influence.self_influence.__doc__ and "(k, p)" in Influence.up_params.__doc__


def test_a_subclass_missing_a_method_cannot_be_instantiated():
    with pytest.raises(TypeError, match="abstract"):
        Influence()

    methods, props = _interface_members()

    def implement(skip):
        ns: Dict[str, Any] = {}
        for name in methods:
            if name != skip:
                ns[name] = lambda self, *a, **k: None
        for name in props:
            if name != skip:
                ns[name] = property(lambda self: 0)
        return type(f"Without_{skip}", (Influence,), ns)

    implement(None)()  # everything implemented: fine
    for skip in methods + props:
        with pytest.raises(TypeError, match=skip):
            implement(skip)()


def test_topk_is_one_generic_type_exported_everywhere():
    import pyinfluence.linear
    import pyinfluence.linear.influence

    assert pyinfluence.TopK is TopK and pyinfluence.linear.TopK is TopK
    assert pyinfluence.linear.influence.TopK is TopK
    t = TopK[np.ndarray](np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)))
    assert t.helpful_idx.shape == (1, 1)


# ------------------------------------------------------------------------------------------------
# (c) leave-out Newton steps and retraining on both paths
# ------------------------------------------------------------------------------------------------
def test_torch_path_retrains_like_the_linear_path(paths):
    """The torch path's Newton step, retraining and refit (pyinfluence.torch.leave_out: CG on the leave-out
    Hessian, quasi-Newton retraining from θ̂) agree with the linear path's (the C++ core: a Woodbury step on
    the Cholesky factor, exact Newton refits) on the same model, and the Newton step with the closed form
    written here: Δ = −∇²R₋ᵢ(θ̂)⁻¹ ∇R₋ᵢ(θ̂) from numpy gradients and Hessians, the test loss at θ̂ + Δ."""
    lin, tor, X, y, Xt, yt, perm = paths
    assert tor.can_retrain and lin.can_retrain
    idx = [0, 41, 88]
    n = X.shape[0]
    a = lin.loo_change(Xt, yt, idx, method="newton")
    b = _np(tor.loo_change(Xt, yt, idx, method="newton"))
    np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-12)
    # the closed form (linear layout): R₋ᵢ's gradient and Hessian at θ̂ from per-example quantities
    theta = lin.model.theta_
    grads, loss, H = _closed_form(X, y, Xt, yt, theta)
    G = grads(X, y)
    for r, i in enumerate(idx):
        keep = np.arange(n) != i
        g = G[keep].sum(0) / (n - 1) + L2 * theta.ravel()
        grads_i, _, H_i = _closed_form(X[keep], y[keep], Xt, yt, theta)  # H of the mean over the n − 1 kept
        step = -np.linalg.solve(H_i, g)
        _, loss_new, _ = _closed_form(X, y, Xt, yt, theta + step.reshape(theta.shape))
        np.testing.assert_allclose(b[r], loss_new(Xt, yt) - loss(Xt, yt), rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(
        _np(tor.loo_change(Xt, yt, idx, method="newton", group=True)),
        lin.loo_change(Xt, yt, idx, method="newton", group=True),
        rtol=1e-7,
        atol=1e-12,
    )
    # retraining: both to ‖∇R₋‖ ≤ 1e-11, so the changes agree far below their size
    ra = lin.retrain_loo(Xt, yt, idx, tol=1e-11)
    rb = _np(tor.retrain_loo(Xt, yt, idx, tol=1e-11))
    np.testing.assert_allclose(rb, ra, rtol=1e-6, atol=1e-10)
    assert tor.last_retrain is not None and (tor.last_retrain.grad_norm <= 1e-11).all()
    ga = lin.retrain_loo(Xt, yt, idx, group=True, tol=1e-11)
    np.testing.assert_allclose(
        _np(tor.retrain_loo(Xt, yt, idx, group=True, tol=1e-11)), ga, rtol=1e-6, atol=1e-10
    )
    # refit on relabelled data: the refitted models' influence agrees
    y2 = y.copy()
    y2[[3, 7]] = (y2[[3, 7]] + 1) % (int(y.max()) + 1)
    _, t_targets = tor.training_data()
    t2 = t_targets.clone()
    t2[[3, 7]] = torch.as_tensor(y2[[3, 7]], dtype=t2.dtype)
    lin2 = lin.refit(y_train=y2)
    tor2 = tor.refit(y_train=t2)
    np.testing.assert_allclose(_np(tor2.up_loss(Xt, yt)), lin2.up_loss(Xt, yt), rtol=1e-6, atol=1e-10)
    assert tor2.grad_norm_ <= 1e-9
    assert not torch.equal(tor2.params, tor.params)  # the original is untouched, the copy moved
    # the linear path answers with exact refits too
    assert lin.retrain_loo(Xt, yt, [0, 1]).shape == (2, Xt.shape[0])
