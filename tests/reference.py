"""Independent reference implementations for pyinfluence's linear models (tests only).

Written from scratch with torch (float64, ``torch.func``) and numpy; nothing here imports pyinfluence.
Every function takes numpy-compatible inputs (any float dtype; computed in float64) and returns
float64 numpy arrays (or Python floats).

Conventions (the API contract, as in pyinfluence's docstrings):
    θ is a (K, d_eff) matrix W, d_eff = d + 1 with fit_intercept (intercept = LAST column), flattened
    row-major to p = K·d_eff. Functions accept θ either as (K, d_eff) or flat (p,).
    R(θ) = Σ_i ω_i L(z_i, θ) / Σ_i ω_i + (l2/2)‖Pθ‖²   (ω = 1 by default, i.e. the mean over n);
    P masks the intercept column when fit_intercept and not penalize_intercept.
    Families: "logistic" (y∈{0,1}), "multinomial" (y∈{0..K−1}), "smooth_hinge" (y∈{−1,+1}, temperature t),
    "squared" (y real).  H = ∇²R(θ̂), every solve uses H + λI (λ = damping).

Signatures (spec = Spec(...); X (n, d); y (n,); theta (K, d_eff) or (p,); idx = int array or None = all):

    Spec(family, n_outputs=1, fit_intercept=True, penalize_intercept=False, l2=0.0, temperature=1.0)
        .n_params(d), .d_eff(d), .penalty_mask(d) -> (p,) of 0/1
    make_problem(family, n, d, n_classes=3, seed=0, m_test=5, dtype=np.float64)
        -> (X, y, X_test, y_test): random data with labels in the family's convention
    scores(spec, X, theta)                          -> (n, K)       s = X̃ Wᵀ
    losses(spec, X, y, theta)                       -> (n,)         L(z_i, θ)
    residuals(spec, X, y, theta)                    -> (n, K)       ∂L/∂s (autograd)
    per_example_grads(spec, X, y, theta)            -> (n, p)       ∇θ L(z_i) (vmap(grad))
    objective(spec, X, y, theta, weights=None)      -> float        R(θ)
    objective_grad(spec, X, y, theta, weights=None) -> (p,)         ∇R (torch.func.grad)
    hessian(spec, X, y, theta, weights=None)        -> (p, p)       ∇²R (torch.func, jacrev∘jacrev)
    fit(spec, X, y, theta0=None, weights=None, tol=1e-10, max_iter=200)
        -> (theta (p,), n_iter, grad_norm): damped Newton (numpy solve on the torch Hessian,
           minimum-norm direction when H is singular), ‖∇R‖₂ ≤ tol then polished; raises RuntimeError
    fit_scipy(spec, X, y, theta0=None, weights=None, gtol=1e-10)
        -> theta (p,): scipy.optimize.minimize(method="trust-exact") on the torch gradient/Hessian
    up_params(spec, X, y, theta, idx=None, damping=0.0)                        -> (k, p)
    up_loss(spec, X, y, theta, X_test, y_test, idx=None, damping=0.0)          -> (k, m)
    self_influence(spec, X, y, theta, idx=None, damping=0.0)                   -> (k,)
    pert_loss(spec, X, y, theta, X_test, y_test, idx=None, damping=0.0)        -> (k, m, d)
    loo_influence(spec, X, y, theta, X_test, y_test, idx=None, damping=0.0)    -> (k, m) = −(1/n) up_loss
    loo_newton_steps(spec, X, y, theta, idx, damping=0.0, group=False) -> (k, p) (or (p,)): the Δθ below
    loo_newton(spec, X, y, theta, X_test, y_test, idx, damping=0.0, group=False)
        -> (k, m) (or (m,) with group=True: idx removed together): one exact Newton step from θ
           on R₋ᵢ (mean over the remaining points, same l2; Hessian + λI), evaluated exactly on the
           test loss: L(z_test, θ+Δθ) − L(z_test, θ)
    retrain_loo(spec, X, y, theta, X_test, y_test, idx, group=False, tol=1e-10)
        -> (k, m) (or (m,)): L(z_test, θ̂₋ᵢ) − L(z_test, θ) with θ̂₋ᵢ = fit(...) on the remaining points
           (warm-started at θ)
    top_k(up_loss_matrix (k, m), k) -> (helpful_idx, helpful_val, harmful_idx, harmful_val), each (m, k):
        full stable argsort; helpful = most negative first, harmful = most positive first
    solve_damped(H, B, damping=0.0)  -> np.linalg.solve(H + λI, B)
    null_space_projector(spec, d)  -> (p, p) projector removing the direction (1_K ⊗ e_intercept) that
        is a null direction of a multinomial objective with unpenalised intercept (identity otherwise)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch
from torch.func import grad, jacrev, vmap

FAMILIES = ("logistic", "multinomial", "smooth_hinge", "squared")
_DT = torch.float64


def _t_hessian(f):
    """torch.func Hessian by reverse-over-reverse (jacrev(jacrev(f))): the same exact derivative as
    torch.func.hessian (= jacfwd(jacrev(f))), several times faster here and free of forward-AD warm-up."""
    return jacrev(jacrev(f))


@dataclass(frozen=True)
class Spec:
    family: str
    n_outputs: int = 1
    fit_intercept: bool = True
    penalize_intercept: bool = False
    l2: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}")
        if self.family != "multinomial" and self.n_outputs != 1:
            raise ValueError("binary/regression families have n_outputs = 1")

    def d_eff(self, d: int) -> int:
        return d + 1 if self.fit_intercept else d

    def n_params(self, d: int) -> int:
        return self.n_outputs * self.d_eff(d)

    def penalty_mask(self, d: int) -> np.ndarray:
        m = np.ones((self.n_outputs, self.d_eff(d)))
        if self.fit_intercept and not self.penalize_intercept:
            m[:, -1] = 0.0
        return m.reshape(-1)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=_DT)


def _theta(spec: Spec, theta, d: int) -> torch.Tensor:
    th = _t(theta).reshape(-1)
    if th.numel() != spec.n_params(d):
        raise ValueError(f"theta has {th.numel()} values, expected {spec.n_params(d)}")
    return th


def _targets(spec: Spec, y) -> torch.Tensor:
    """The label encoding used inside the torch losses: one-hot (n, K) for multinomial, else (n,)."""
    yt = _t(y).reshape(-1)
    if spec.family == "multinomial":
        yi = yt.round().long()
        if not torch.equal(yi.to(_DT), yt) or yi.min() < 0 or yi.max() >= spec.n_outputs:
            raise ValueError("multinomial labels must be integers in [0, K)")
        return torch.nn.functional.one_hot(yi, spec.n_outputs).to(_DT)
    return yt


def _augment(spec: Spec, x: torch.Tensor) -> torch.Tensor:
    if not spec.fit_intercept:
        return x
    ones = torch.ones(x.shape[:-1] + (1,), dtype=x.dtype)
    return torch.cat([x, ones], dim=-1)


def _loss_of_scores(spec: Spec, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """s (..., K), t (...) or (..., K) one-hot -> loss (...)."""
    fam = spec.family
    if fam == "multinomial":
        return torch.logsumexp(s, dim=-1) - (s * t).sum(-1)
    s0 = s[..., 0]
    if fam == "logistic":
        return torch.logaddexp(torch.zeros_like(s0), s0) - t * s0
    if fam == "smooth_hinge":
        tau = spec.temperature
        return tau * torch.logaddexp(torch.zeros_like(s0), (1.0 - t * s0) / tau)
    if fam == "squared":
        return 0.5 * (s0 - t) ** 2
    raise ValueError(fam)


def _scores_t(spec: Spec, th: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    d = X.shape[-1]
    W = th.reshape(spec.n_outputs, spec.d_eff(d))
    return _augment(spec, X) @ W.T


def _single_loss(spec: Spec):
    """L(θ_flat, x (d,), t) for one example (functional; for vmap/grad/jacrev)."""

    def f(th, x, t):
        return _loss_of_scores(spec, _scores_t(spec, th, x.unsqueeze(0))[0], t)

    return f


def _R_fn(spec: Spec, X: torch.Tensor, T: torch.Tensor, weights=None):
    d = X.shape[1]
    mask = _t(spec.penalty_mask(d))
    if weights is None:
        w = torch.full((X.shape[0],), 1.0 / X.shape[0], dtype=_DT)
    else:
        w = _t(weights).reshape(-1)
        if w.numel() != X.shape[0] or (w < 0).any() or w.sum() <= 0:
            raise ValueError("weights must be n nonnegative values with positive sum")
        w = w / w.sum()

    def R(th):
        L = _loss_of_scores(spec, _scores_t(spec, th, X), T)
        return (w * L).sum() + 0.5 * spec.l2 * ((mask * th) ** 2).sum()

    return R


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().astype(np.float64, copy=True)


def _as_idx(idx, n: int) -> np.ndarray:
    if idx is None:
        return np.arange(n)
    return np.atleast_1d(np.asarray(idx, dtype=np.int64))


def _test_arrays(X_test, y_test):
    Xt = np.asarray(X_test, dtype=np.float64)
    yt = np.asarray(y_test, dtype=np.float64)
    if Xt.ndim == 1:
        Xt, yt = Xt[None, :], yt.reshape(1)
    return Xt, yt.reshape(-1)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def make_problem(
    family: str, n: int, d: int, n_classes: int = 3, seed: int = 0, m_test: int = 5, dtype=np.float64
):
    """Random (X, y, X_test, y_test) with labels in the family's convention; X has a nonzero mean
    so that the intercept matters. Classes are all present in the training labels."""
    rng = np.random.default_rng(seed)
    K = n_classes if family == "multinomial" else 1
    for _ in range(100):
        N = n + m_test
        X = rng.normal(size=(N, d)) * rng.uniform(0.5, 1.5, size=d) + rng.normal(scale=0.5, size=d)
        W = rng.normal(size=(K, d))
        b = rng.normal(scale=0.5, size=K)
        s = X @ W.T + b
        if family == "logistic":
            y = (rng.uniform(size=N) < 1 / (1 + np.exp(-s[:, 0]))).astype(np.float64)
        elif family == "multinomial":
            P = np.exp(s - s.max(1, keepdims=True))
            P /= P.sum(1, keepdims=True)
            u = rng.uniform(size=(N, 1))
            y = np.minimum((u > np.cumsum(P, 1)).sum(1), K - 1).astype(np.float64)
        elif family == "smooth_hinge":
            y = np.where(s[:, 0] + 0.7 * rng.normal(size=N) > 0, 1.0, -1.0)
        else:
            y = s[:, 0] + 0.3 * rng.normal(size=N)
        ytr = y[:n]
        if family in ("logistic", "smooth_hinge") and len(np.unique(ytr)) < 2:
            continue
        if family == "multinomial" and len(np.unique(ytr)) < K:
            continue
        X = X.astype(dtype)
        y = y.astype(dtype)
        return (
            np.ascontiguousarray(X[:n]),
            np.ascontiguousarray(y[:n]),
            np.ascontiguousarray(X[n:]),
            np.ascontiguousarray(y[n:]),
        )
    raise RuntimeError("could not draw a problem with all classes present")


# ----------------------------------------------------------------------------------------------
# per-example quantities and the objective
# ----------------------------------------------------------------------------------------------
def scores(spec: Spec, X, theta) -> np.ndarray:
    Xt = _t(X)
    return _np(_scores_t(spec, _theta(spec, theta, Xt.shape[1]), Xt))


def losses(spec: Spec, X, y, theta) -> np.ndarray:
    Xt = _t(X)
    th = _theta(spec, theta, Xt.shape[1])
    return _np(_loss_of_scores(spec, _scores_t(spec, th, Xt), _targets(spec, y)))


def residuals(spec: Spec, X, y, theta) -> np.ndarray:
    """∂L/∂s per example by autograd, (n, K)."""
    Xt = _t(X)
    th = _theta(spec, theta, Xt.shape[1])
    S = _scores_t(spec, th, Xt).detach().requires_grad_(True)
    L = _loss_of_scores(spec, S, _targets(spec, y)).sum()
    (g,) = torch.autograd.grad(L, S)
    return _np(g)


def per_example_grads(spec: Spec, X, y, theta) -> np.ndarray:
    Xt = _t(X)
    th = _theta(spec, theta, Xt.shape[1])
    g = vmap(grad(_single_loss(spec)), in_dims=(None, 0, 0))(th, Xt, _targets(spec, y))
    return _np(g)


def objective(spec: Spec, X, y, theta, weights=None) -> float:
    Xt = _t(X)
    R = _R_fn(spec, Xt, _targets(spec, y), weights)
    return float(R(_theta(spec, theta, Xt.shape[1])))


def objective_grad(spec: Spec, X, y, theta, weights=None) -> np.ndarray:
    Xt = _t(X)
    R = _R_fn(spec, Xt, _targets(spec, y), weights)
    return _np(grad(R)(_theta(spec, theta, Xt.shape[1])))


def hessian(spec: Spec, X, y, theta, weights=None) -> np.ndarray:
    Xt = _t(X)
    R = _R_fn(spec, Xt, _targets(spec, y), weights)
    H = _np(_t_hessian(R)(_theta(spec, theta, Xt.shape[1])))
    return 0.5 * (H + H.T)


def null_space_projector(spec: Spec, d: int) -> np.ndarray:
    p = spec.n_params(d)
    if not (spec.family == "multinomial" and spec.fit_intercept and not spec.penalize_intercept):
        return np.eye(p)
    v = np.zeros((spec.n_outputs, spec.d_eff(d)))
    v[:, -1] = 1.0
    v = v.reshape(-1) / np.linalg.norm(v)
    return np.eye(p) - np.outer(v, v)


# ----------------------------------------------------------------------------------------------
# trainers
# ----------------------------------------------------------------------------------------------
def _newton_direction(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    try:
        c = np.linalg.cholesky(H)
        # well-conditioned enough? otherwise fall back to the minimum-norm solution
        if np.min(np.diag(c)) ** 2 > 1e-13 * np.max(np.diag(H)):
            return -np.linalg.solve(H, g)
    except np.linalg.LinAlgError:
        pass
    return -np.linalg.lstsq(H, g, rcond=1e-12)[0]


def fit(spec: Spec, X, y, theta0=None, weights=None, tol: float = 1e-10, max_iter: int = 200):
    """Newton with Armijo backtracking on the torch objective; returns (theta (p,), n_iter, ‖∇R‖₂)."""
    Xt = _t(X)
    d = Xt.shape[1]
    R = _R_fn(spec, Xt, _targets(spec, y), weights)
    gR = grad(R)
    hR = _t_hessian(R)
    th = torch.zeros(spec.n_params(d), dtype=_DT) if theta0 is None else _theta(spec, theta0, d).clone()
    polish = 0
    for it in range(max_iter):
        g = _np(gR(th))
        gn = float(np.linalg.norm(g))
        if gn <= tol:
            polish += 1
            if polish > 2:
                return _np(th), it, gn
        H = _np(hR(th))
        step = _newton_direction(0.5 * (H + H.T), g)
        if gn < 1e-6:  # quadratic regime: full steps (Armijo is below rounding of R here)
            th_new = th + _t(step)
            if polish and float(np.linalg.norm(_np(gR(th_new)))) >= gn:
                return _np(th), it, gn
            th = th_new
            continue
        f0 = float(R(th))
        slope = float(g @ step)
        a = 1.0
        while a > 1e-12:
            th_new = th + a * _t(step)
            if float(R(th_new)) <= f0 + 1e-4 * a * slope:
                break
            a *= 0.5
        th = th_new
    g = _np(gR(th))
    gn = float(np.linalg.norm(g))
    if gn <= tol:
        return _np(th), max_iter, gn
    raise RuntimeError(f"reference Newton did not converge: ‖∇R‖ = {gn:.3e}")


def fit_scipy(spec: Spec, X, y, theta0=None, weights=None, gtol: float = 1e-10) -> np.ndarray:
    """A second, structurally different reference trainer: scipy trust-exact on torch derivatives."""
    Xt = _t(X)
    d = Xt.shape[1]
    R = _R_fn(spec, Xt, _targets(spec, y), weights)
    gR = grad(R)
    hR = _t_hessian(R)
    x0 = np.zeros(spec.n_params(d)) if theta0 is None else np.asarray(theta0, np.float64).reshape(-1)

    def fun(x):
        t = _t(x)
        return float(R(t)), _np(gR(t))

    res = scipy.optimize.minimize(
        fun,
        x0,
        jac=True,
        hess=lambda x: _np(hR(_t(x))),
        method="trust-exact",
        options={"gtol": gtol, "maxiter": 500},
    )
    return np.asarray(res.x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# influence quantities (explicit H + λI, numpy solve)
# ----------------------------------------------------------------------------------------------
def solve_damped(H: np.ndarray, B: np.ndarray, damping: float = 0.0) -> np.ndarray:
    return np.linalg.solve(H + damping * np.eye(H.shape[0]), B)


def up_params(spec: Spec, X, y, theta, idx=None, damping: float = 0.0) -> np.ndarray:
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    i = _as_idx(idx, len(X))
    H = hessian(spec, X, y, theta)
    G = per_example_grads(spec, X[i], y[i], theta)
    return -solve_damped(H, G.T, damping).T


def _s_test(spec, X, y, theta, X_test, y_test, damping):
    H = hessian(spec, X, y, theta)
    Gt = per_example_grads(spec, X_test, y_test, theta)
    return solve_damped(H, Gt.T, damping)  # (p, m)


def up_loss(spec: Spec, X, y, theta, X_test, y_test, idx=None, damping: float = 0.0) -> np.ndarray:
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    Xt, yt = _test_arrays(X_test, y_test)
    i = _as_idx(idx, len(X))
    S = _s_test(spec, X, y, theta, Xt, yt, damping)
    G = per_example_grads(spec, X[i], y[i], theta)
    return -G @ S


def self_influence(spec: Spec, X, y, theta, idx=None, damping: float = 0.0) -> np.ndarray:
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    i = _as_idx(idx, len(X))
    H = hessian(spec, X, y, theta)
    G = per_example_grads(spec, X[i], y[i], theta)
    return -np.einsum("kp,pk->k", G, solve_damped(H, G.T, damping))


def pert_loss(spec: Spec, X, y, theta, X_test, y_test, idx=None, damping: float = 0.0) -> np.ndarray:
    """∇x of −s_testᵀ ∇θL(x, y_i, θ) at x = x_i, by autograd (jacrev of the θ-gradient in x)."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    Xt, yt = _test_arrays(X_test, y_test)
    i = _as_idx(idx, len(X))
    d = X.shape[1]
    th = _theta(spec, theta, d)
    S = _t(_s_test(spec, X, y, theta, Xt, yt, damping))  # (p, m)

    def f(x, t):  # (m,) = −S_jᵀ ∇θL(x, t)
        return -(S.T @ grad(_single_loss(spec))(th, x, t))

    J = vmap(jacrev(f, argnums=0), in_dims=(0, 0))(_t(X[i]), _targets(spec, y[i]))  # (k, m, d)
    return _np(J)


def loo_influence(spec: Spec, X, y, theta, X_test, y_test, idx=None, damping: float = 0.0) -> np.ndarray:
    return -up_loss(spec, X, y, theta, X_test, y_test, idx, damping) / len(X)


def _test_loss_change(spec, Xt, yt, theta_new, theta):
    return losses(spec, Xt, yt, theta_new) - losses(spec, Xt, yt, theta)


def loo_newton_steps(spec: Spec, X, y, theta, idx, damping: float = 0.0, group: bool = False) -> np.ndarray:
    """The Newton steps Δθ = −(∇²R₋ᵢ(θ) + λI)⁻¹ ∇R₋ᵢ(θ): (k, p), or (p,) with group=True."""
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    i = _as_idx(idx, len(X))
    th = np.asarray(theta, np.float64).reshape(-1)
    sets = [i] if group else [[j] for j in i]
    out = []
    for rem in sets:
        keep = np.setdiff1d(np.arange(len(X)), rem)
        g = objective_grad(spec, X[keep], y[keep], th)
        H = hessian(spec, X[keep], y[keep], th)
        out.append(-solve_damped(H, g, damping))
    out = np.array(out)
    return out[0] if group else out


def loo_newton(
    spec: Spec, X, y, theta, X_test, y_test, idx, damping: float = 0.0, group: bool = False
) -> np.ndarray:
    Xt, yt = _test_arrays(X_test, y_test)
    th = np.asarray(theta, np.float64).reshape(-1)
    steps = loo_newton_steps(spec, X, y, th, idx, damping, group)
    if group:
        return _test_loss_change(spec, Xt, yt, th + steps, th)
    return np.array([_test_loss_change(spec, Xt, yt, th + dl, th) for dl in steps])


def retrain_loo(
    spec: Spec, X, y, theta, X_test, y_test, idx, group: bool = False, tol: float = 1e-10
) -> np.ndarray:
    X = np.asarray(X, np.float64)
    y = np.asarray(y, np.float64)
    Xt, yt = _test_arrays(X_test, y_test)
    i = _as_idx(idx, len(X))
    th = np.asarray(theta, np.float64).reshape(-1)
    sets = [i] if group else [[j] for j in i]
    out = []
    for rem in sets:
        keep = np.setdiff1d(np.arange(len(X)), rem)
        th_new, _, _ = fit(spec, X[keep], y[keep], theta0=th, tol=tol)
        out.append(_test_loss_change(spec, Xt, yt, th_new, th))
    out = np.array(out)
    return out[0] if group else out


def top_k(ul: np.ndarray, k: int):
    """From a full (n_train, m) up_loss matrix: per test point the k most negative (helpful, ascending)
    and the k most positive (harmful, descending), by a full stable argsort."""
    ul = np.asarray(ul, np.float64)
    asc = np.argsort(ul, axis=0, kind="stable")[:k].T  # (m, k)
    desc = np.argsort(-ul, axis=0, kind="stable")[:k].T  # (m, k)
    cols = np.arange(ul.shape[1])[:, None]
    return asc, ul[asc, cols], desc, ul[desc, cols]
