"""Hand-written numpy/scipy implementation of the linear-model influence formulas.

The baseline of :mod:`pyinfluence.bench.studies.linear_core`. Same conventions as pyinfluence (Koh & Liang 2017;
the docstring of pyinfluence/__init__.py):

    R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖Pθ‖²   (P masks the unpenalised intercept)
    θ = W (K, d_eff) flattened row-major, x̃ = [x, 1], ∇θL(z) = r ⊗ x̃, r = dL/ds (K,)
    up_loss(z, z_test) = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z)        (n, m)
    self_influence(z)   = −∇θL(z)ᵀ (H+λI)⁻¹ ∇θL(z) = −‖L⁻¹g‖²   (n,)

Families: "logistic" (K = 1, y ∈ {0,1}) and "multinomial" (K classes, y the class index). The
Hessian is exactly ∇²R. For the undamped multinomial model with an unpenalised intercept, H is
singular along the shift of all intercepts; like the core we factorise H + γ·1_b1_bᵀ (γ = 1, the
gauge term (γ/2)(Σ_k b_k)²), which changes no influence value (every gradient is orthogonal to that
direction).

This is meant to be the fastest numpy a careful user would reasonably write: everything is a BLAS
call or a single vectorised pass, the Hessian exploits symmetry (numpy's ``np.dot(B.T, B)`` is
dispatched to SYRK), the factorisation and solves are LAPACK (scipy.linalg.cho_factor / cho_solve /
solve_triangular). Where two reasonable formulations exist, both are given and the benchmark times
both and compares against the faster:

- Hessian, multinomial: ``hessian_syrk`` (blockdiag(X̃ᵀdiag(p_a)X̃) − GᵀG with G_i = p_i ⊗ x̃_i,
  one SYRK of n·p² flops — what the core does) and ``hessian_kron`` (Kronecker structure
  H = Σ_i D_i ⊗ x̃_i x̃_iᵀ as one GEMM over the unique (a ≤ b) × (j ≤ l) index pairs: ≈ n·p²/2
  flops).
- up_loss: ``up_loss_G`` (the per-example gradient matrix G (n×p), then −G @ S) and
  ``up_loss_factored`` (−Σ_a r_a ∘ (X̃ Ŝ_a): the same GEMM flops without materialising G).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import scipy.linalg
import scipy.special

GAUGE = 1.0  # the core's intercept gauge γ (ModelSpec::intercept_gauge)


@dataclass
class Problem:
    family: str  # "logistic" or "multinomial"
    K: int  # number of score outputs (1 for logistic)
    l2: float
    fit_intercept: bool = True
    penalize_intercept: bool = False

    def d_eff(self, d: int) -> int:
        return d + (1 if self.fit_intercept else 0)

    def has_gauge(self) -> bool:
        return self.family == "multinomial" and self.fit_intercept and not self.penalize_intercept


# --------------------------------------------------------------------------------------------------
# per-example quantities


def augment(X: np.ndarray, fit_intercept: bool = True) -> np.ndarray:
    """X̃ = [X, 1] (a copy, C-contiguous) or X itself."""
    if not fit_intercept:
        return X
    n, d = X.shape
    Xt = np.empty((n, d + 1), dtype=X.dtype)
    Xt[:, :d] = X
    Xt[:, d] = 1
    return Xt


def scores(prob: Problem, X: np.ndarray, W: np.ndarray) -> np.ndarray:
    """s = X̃ Wᵀ, shape (n, K), without forming X̃."""
    d = X.shape[1]
    S = X @ W[:, :d].T
    if prob.fit_intercept:
        S += W[:, d]
    return S


def residuals(prob: Problem, X: np.ndarray, y: np.ndarray, W: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(r = dL/ds (n, K), curvature).

    Curvature: logistic → c = σ(1−σ) (n, 1); multinomial → p = softmax(s) (n, K).
    """
    S = scores(prob, X, W)
    if prob.family == "logistic":
        p = scipy.special.expit(S)
        return p - y[:, None], p * (1 - p)
    if prob.family == "multinomial":
        P = scipy.special.softmax(S, axis=1)
        R = P.copy()
        R[np.arange(R.shape[0]), y.astype(np.intp)] -= 1
        return R, P
    raise ValueError(f"unsupported family {prob.family!r}")


def gradients(prob: Problem, X: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Per-example gradient matrix G (n, p), G_i = r_i ⊗ x̃_i (row-major over (K, d_eff))."""
    n, d = X.shape
    de = prob.d_eff(d)
    G = np.empty((n, prob.K, de), dtype=X.dtype)
    np.multiply(R[:, :, None], X[:, None, :], out=G[:, :, :d])
    if prob.fit_intercept:
        G[:, :, d] = R
    return G.reshape(n, prob.K * de)


def _add_penalty(prob: Problem, H: np.ndarray, d: int) -> None:
    de = prob.d_eff(d)
    diag = np.full(de, prob.l2, dtype=H.dtype)
    if prob.fit_intercept and not prob.penalize_intercept:
        diag[d] = 0
    H[np.diag_indices_from(H)] += np.tile(diag, prob.K)


def gauge_indices(prob: Problem, d: int) -> Optional[np.ndarray]:
    """Positions of the K intercepts in θ when the multinomial gauge applies, else None."""
    if not prob.has_gauge():
        return None
    return np.arange(prob.K) * prob.d_eff(d) + d


# --------------------------------------------------------------------------------------------------
# Hessian assembly


def hessian_syrk(
    prob: Problem, X: np.ndarray, y: np.ndarray, W: np.ndarray, C: Optional[np.ndarray] = None
) -> np.ndarray:
    """H (p, p) with SYRKs: binary (1/n)·BᵀB, B = diag(√c) X̃; multinomial blockdiag − GᵀG.

    ``C``: the curvature from :func:`residuals` if already computed (else computed here).
    """
    n, d = X.shape
    de = prob.d_eff(d)
    if C is None:
        _, C = residuals(prob, X, y, W)
    if prob.family == "logistic":
        sc = np.sqrt(C[:, 0])
        B = np.empty((n, de), dtype=X.dtype)
        np.multiply(X, sc[:, None], out=B[:, :d])
        if prob.fit_intercept:
            B[:, d] = sc
        H = np.dot(B.T, B)  # numpy dispatches Bᵀ·B to SYRK (+ a symmetrising copy)
    else:
        G = gradients(prob, X, C)  # G_i = p_i ⊗ x̃_i
        H = np.dot(G.T, G)  # SYRK, n·p²
        H *= -1
        Xt = augment(X, prob.fit_intercept)
        for a in range(prob.K):
            B = Xt * np.sqrt(C[:, a])[:, None]
            H[a * de : (a + 1) * de, a * de : (a + 1) * de] += np.dot(B.T, B)
    H /= n
    _add_penalty(prob, H, d)
    return H


def hessian_kron(
    prob: Problem, X: np.ndarray, y: np.ndarray, W: np.ndarray, C: Optional[np.ndarray] = None
) -> np.ndarray:
    """Multinomial H = (1/n) Σ_i (diag(p_i) − p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ as ONE GEMM.

    The GEMM runs over the unique index pairs only:

    T[(a≤b), (j≤l)] = Σ_i D_i[a, b] x̃_ij x̃_il = Dpairsᵀ · Mpairs, Dpairs (n, K(K+1)/2), Mpairs
    (n, de(de+1)/2): 2·n·(K(K+1)/2)·(de(de+1)/2) ≈ n·p²/2 flops, then a scatter of p² entries.
    """
    if prob.family != "multinomial":
        return hessian_syrk(prob, X, y, W, C)
    n, d = X.shape
    de, K = prob.d_eff(d), prob.K
    P = residuals(prob, X, y, W)[1] if C is None else C
    Xt = augment(X, prob.fit_intercept)
    ju, lu = np.triu_indices(de)
    au, bu = np.triu_indices(K)
    M = Xt[:, ju] * Xt[:, lu]  # (n, de(de+1)/2)
    D = -(P[:, au] * P[:, bu])  # (n, K(K+1)/2): D_ab = δ_ab p_a − p_a p_b
    D[:, au == bu] += P
    T = D.T @ M  # (K(K+1)/2, de(de+1)/2)
    Tf = np.empty((T.shape[0], de, de), dtype=T.dtype)
    Tf[:, ju, lu] = T
    Tf[:, lu, ju] = T
    H4 = np.empty((K, de, K, de), dtype=T.dtype)
    H4[au, :, bu, :] = Tf
    H4[bu, :, au, :] = Tf
    H = H4.reshape(K * de, K * de)
    H /= n
    _add_penalty(prob, H, d)
    return H


HESSIANS = {"syrk": hessian_syrk, "kron": hessian_kron}


# --------------------------------------------------------------------------------------------------
# factorisation, queries


def factor(H: np.ndarray, damping: float = 0.0, overwrite: bool = False, gauge: Optional[np.ndarray] = None):
    """scipy.linalg.cho_factor of H + λI (lower); ``overwrite`` lets it factorise H in place.

    Undamped (λ = 0) multinomial models with an unpenalised intercept: like the core, factorise H +
    γ·1_b1_bᵀ (``gauge`` = the intercept positions from :func:`gauge_indices`), which leaves every
    influence unchanged.
    """
    A = H if overwrite else H.copy()
    if damping:
        A[np.diag_indices_from(A)] += damping
    elif gauge is not None:
        A[np.ix_(gauge, gauge)] += GAUGE
    return scipy.linalg.cho_factor(A, lower=True, overwrite_a=True, check_finite=False)


@dataclass
class State:
    """What a numpy user keeps after 'fitting' the influence engine (as the core caches)."""

    prob: Problem
    X: np.ndarray
    y: np.ndarray
    W: np.ndarray
    R: np.ndarray  # training residuals (n, K)
    cf: tuple  # cho_factor output


def build(
    prob: Problem, X: np.ndarray, y: np.ndarray, W: np.ndarray, hessian: str = "syrk", damping: float = 0.0
) -> State:
    """Hessian assembly + Cholesky, keeping the training residuals (the numpy 'engine')."""
    R, C = residuals(prob, X, y, W)
    H = HESSIANS[hessian](prob, X, y, W, C)
    cf = factor(H, damping, overwrite=True, gauge=gauge_indices(prob, X.shape[1]))
    return State(prob, X, y, W, R, cf)


def s_test(st: State, X_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """S = (H+λI)⁻¹ [∇θL(z_test)] (p, m)."""
    Rt, _ = residuals(st.prob, X_test, y_test, st.W)
    Gt = gradients(st.prob, X_test, Rt)
    return scipy.linalg.cho_solve(st.cf, Gt.T, check_finite=False)


def up_loss_G(st: State, X_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """−G S with the per-example gradient matrix G (n, p) materialised."""
    S = s_test(st, X_test, y_test)
    G = gradients(st.prob, st.X, st.R)
    U = G @ S
    U *= -1
    return U


def up_loss_factored(st: State, X_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """−Σ_a r_a ∘ (X̃ Ŝ_a): the same GEMM without forming G (Ŝ_a: the a-th (d_eff, m) block)."""
    prob, X, R = st.prob, st.X, st.R
    n, d = X.shape
    de, K = prob.d_eff(d), prob.K
    S = s_test(st, X_test, y_test)  # (K·de, m)
    m = S.shape[1]
    Sh = S.reshape(K, de, m).transpose(1, 0, 2).reshape(de, K * m)  # Ŝ (de, K·m)
    Z = X @ Sh[:d]  # (n, K·m)
    if prob.fit_intercept:
        Z += Sh[d]
    Z = Z.reshape(n, K, m)
    if K == 1:
        U = Z[:, 0, :]
        U *= -R
        return U
    U = Z[:, 0, :] * -R[:, :1]
    for a in range(1, K):
        U -= Z[:, a, :] * R[:, a : a + 1]
    return U


UP_LOSS = {"G@S": up_loss_G, "factored": up_loss_factored}


def top_k_from_matrix(U: np.ndarray, k: int):
    """Per column: k most negative (helpful) and k most positive (harmful), sorted; each (m, k)."""
    n = U.shape[0]
    k = min(k, n)
    hi = np.argpartition(U, k - 1, axis=0)[:k]  # (k, m)
    ri = np.argpartition(U, n - k, axis=0)[n - k :]
    hv = np.take_along_axis(U, hi, axis=0)
    rv = np.take_along_axis(U, ri, axis=0)
    oh = np.argsort(hv, axis=0, kind="stable")
    orr = np.argsort(-rv, axis=0, kind="stable")
    hi = np.take_along_axis(hi, oh, axis=0).T
    ri = np.take_along_axis(ri, orr, axis=0).T
    return hi, np.take_along_axis(hv, oh, axis=0).T, ri, np.take_along_axis(rv, orr, axis=0).T


def top_k(st: State, X_test: np.ndarray, y_test: np.ndarray, k: int, up_loss: str = "factored"):
    return top_k_from_matrix(UP_LOSS[up_loss](st, X_test, y_test), k)


def self_influence(st: State) -> np.ndarray:
    """−‖L⁻¹ g_i‖² for every training point: one triangular solve with n right-hand sides (TRSM)."""
    G = gradients(st.prob, st.X, st.R)  # (n, p) C-order → G.T is Fortran-ordered: no copy
    Y = scipy.linalg.solve_triangular(st.cf[0], G.T, lower=True, overwrite_b=True, check_finite=False)
    return -np.einsum("pn,pn->n", Y, Y)


def single_query(st: State, G_train: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """up_loss for ONE test point on cached state and G: test gradient, cho_solve, one matvec."""
    s = s_test(st, x, y)[:, 0]
    return -(G_train @ s)


def end_to_end(
    prob: Problem,
    X,
    y,
    W,
    X_test,
    y_test,
    hessian: str = "syrk",
    up_loss: str = "factored",
    damping: float = 0.0,
) -> np.ndarray:
    """Hessian + factorisation + the full up_loss matrix for m test points."""
    st = build(prob, X, y, W, hessian, damping)
    return UP_LOSS[up_loss](st, X_test, y_test)


def max_rel_err(a: np.ndarray, b: np.ndarray, scale: Optional[float] = None) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    s = scale if scale is not None else max(np.abs(b).max(), 1e-300)
    return float(np.abs(a - b).max() / s)
