"""Regression diagnostics for statisticians: leverage, Cook's distance, DFBETA/DFBETAS and DFFITS.

:func:`regression_diagnostics` computes, for every training point at once, the classical case-deletion
diagnostics of an unpenalised linear model, with statsmodels' definitions (``OLSInfluence`` for
``RidgeRegression(l2=0)`` = ordinary least squares, ``GLMInfluence`` for binary
``LogisticRegression(l2=0)`` = the binomial GLM with logit link). Notation: X̃ (n, p) the design matrix with
the intercept column (last, as in ``theta_``) when ``fit_intercept=True``; w_i the GLM weight (1 for OLS,
μ_i(1−μ_i) for logistic); H = (1/n) X̃ᵀWX̃ the Hessian of the mean training loss at θ̂ (the one
:class:`~pyinfluence.LinearInfluence` factorises); e_i = y_i − ŷ_i (OLS) or y_i − μ_i (logistic).

- leverage h_i = w_i x̃_iᵀ(X̃ᵀWX̃)⁻¹x̃_i = w_i x̃_iᵀH⁻¹x̃_i / n, in [0, 1), Σ h_i = p.
- dfbeta_i = θ̂ − θ̂₍ᵢ₎ = (X̃ᵀWX̃)⁻¹x̃_i e_i / (1 − h_i): the Sherman–Morrison (Woodbury, rank one) form of a
  Newton step from θ̂ on the leave-one-out objective, the same step as ``loo_change(method="newton")``.
  For OLS the objective is quadratic, so this is the EXACT leave-one-out change (statsmodels computes it by
  n refits); for logistic it is the one-step (Pregibon 1981) approximation, exactly as statsmodels'
  ``GLMInfluence.d_params`` (the refit differs by O(1/n²)). Sign: removing point i moves θ̂ by −dfbeta_i;
  to first order dfbeta_i ≈ up_params(z_i)/n (Koh & Liang's I_up,params divided by n).
- dfbetas_ij = dfbeta_ij / se_j: OLS se_j = s₍ᵢ₎ √[(X̃ᵀX̃)⁻¹]_jj (statsmodels ``OLSInfluence.dfbetas``, the
  leave-one-out s); logistic se_j = √[(X̃ᵀWX̃)⁻¹]_jj = ``bse`` (``GLMInfluence.dfbetas``).
- Cook's distance D_i = r_i² h_i / (p (1 − h_i)) with r_i the internally studentised residual
  (``cooks_distance[0]`` of both classes; for logistic a one-step quantity).
- DFFITS_i = t_i √(h_i / (1 − h_i)): OLS with the externally studentised t_i (``OLSInfluence.dffits[0]``,
  exact); logistic with the internally studentised Pearson residual, which equals statsmodels'
  ``GLMInfluence.d_linpred_scaled`` (the one-step change of the linear predictor over its standard error).

Everything comes from one factorisation of H (the engine's own, when it is a float64 CPU engine), H⁻¹ from it
(p × p, as in the core's leave-one-out step), one GEMM with the n design rows (n·p² flops) and O(n·p)
elementwise work; no refits, no loops over points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

import pyinfluence._core as _core
from pyinfluence.errors import NonFiniteError
from pyinfluence.linear.influence import LinearInfluence
from pyinfluence.linear.models import _LinearModel

__all__ = ["RegressionDiagnostics", "regression_diagnostics"]

# 1 − h_i at or below this: removing point i leaves a parameter undetermined (leverage 1 to rounding).
_LEVERAGE_ONE_TOL = 1e-10
# OLS residual norm at or below this fraction of ‖y‖ (or of the whole SSE's root, without one point): an exact fit.
_EXACT_FIT_TOL = 1e-10


@dataclass(frozen=True)
class RegressionDiagnostics:
    """Case-deletion diagnostics of every training point (float64, read-only arrays, all finite).

    Shapes: n training points, p parameters (columns in ``theta_.ravel()`` order: the features, then the
    intercept when ``fit_intercept=True``). Signs follow statsmodels: ``dfbeta`` = θ̂ − θ̂₍ᵢ₎.

    - ``kind``: ``"ols"`` (exact leave-one-out) or ``"logistic"`` (one Newton step, as statsmodels' GLM).
    - ``leverage`` (n,): hat-matrix diagonal h_i ∈ [0, 1) (``hat_matrix_diag``).
    - ``cooks_distance`` (n,): Cook's D_i ≥ 0 (``cooks_distance[0]``).
    - ``dfbeta`` (n, p): θ̂ − θ̂₍ᵢ₎ (OLS ``dfbeta``, GLM ``d_params``).
    - ``dfbetas`` (n, p): dfbeta scaled by the parameters' standard errors (``dfbetas``).
    - ``dffits`` (n,): OLS ``dffits[0]``; logistic ``d_linpred_scaled``.
    - ``resid_studentized`` (n,): internally studentised residuals e_i/(s√(1−h_i)) (Pearson for logistic, s = 1).
    - ``resid_studentized_external`` (n,) or None: e_i/(s₍ᵢ₎√(1−h_i)) (OLS only).
    - ``sigma_loo`` (n,) or None: s₍ᵢ₎, the residual standard error without point i (OLS only).
    - ``scale``: s² = Σe²/(n − p) for OLS, 1 for logistic.
    - ``dffits_threshold``: 2√(p/n), the customary cut-off for |DFFITS|.
    """

    kind: str
    leverage: NDArray[np.float64]
    cooks_distance: NDArray[np.float64]
    dfbeta: NDArray[np.float64]
    dfbetas: NDArray[np.float64]
    dffits: NDArray[np.float64]
    resid_studentized: NDArray[np.float64]
    resid_studentized_external: Optional[NDArray[np.float64]]
    sigma_loo: Optional[NDArray[np.float64]]
    scale: float
    dffits_threshold: float

    @property
    def n_train(self) -> int:
        """n, the number of training points."""
        return int(self.leverage.shape[0])

    @property
    def n_params(self) -> int:
        """p, the number of parameters (intercept included)."""
        return int(self.dfbeta.shape[1])

    @property
    def exact(self) -> bool:
        """True for OLS (every quantity is the exact leave-one-out one); False for logistic (one Newton step)."""
        return self.kind == "ols"


def regression_diagnostics(
    model: Union[LinearInfluence, _LinearModel],
    X_train: Optional[ArrayLike] = None,
    y_train: Optional[ArrayLike] = None,
) -> RegressionDiagnostics:
    """Leverage, Cook's distance, DFBETA/DFBETAS and DFFITS of every training point; see the module docstring.

    ``model``: a :class:`~pyinfluence.LinearInfluence` (its factorisation of H is reused), or a fitted
    ``RidgeRegression(l2=0)`` / binary ``LogisticRegression(l2=0)`` with its training data ``X_train`` (n, d)
    and ``y_train`` (n,) (a LinearInfluence is built from them). The model must be unpenalised (l2 = 0) and the
    influence undamped: the classical diagnostics are those of the maximum-likelihood fit.

    Returns a :class:`RegressionDiagnostics` (float64 arrays (n,) and (n, p)). Cost: one Cholesky of the p × p
    Hessian (already made by LinearInfluence), n·p² flops for the product with the design rows, O(n·p) else.

    Raises ValueError for a penalised (l2 > 0) or damped model, a multinomial or smooth-hinge model, too few
    points (OLS needs n ≥ p + 2 for s₍ᵢ₎), a perfect OLS fit (s = 0) or a point of leverage 1 (named);
    TypeError for another kind of ``model``; NotImplementedError for Dask training data;
    :class:`~pyinfluence.errors.NonFiniteError` if a result overflows.
    """
    inf = _influence(model, X_train, y_train)
    m = inf.model
    family = m._core_family(m.n_outputs_)  # "squared", "logistic", "multinomial" or "smooth_hinge"
    if family not in ("squared", "logistic"):
        what = (
            "multinomial logistic regression (statsmodels has no GLM influence for it either)"
            if family == "multinomial"
            else f"{type(m).__name__} (not a generalised linear model)"
        )
        raise ValueError(
            f"model: regression diagnostics are defined for RidgeRegression(l2=0) (OLS) and binary "
            f"LogisticRegression(l2=0) (binomial GLM), got {what}; use self_influence() or "
            f"loo_change(method='newton') for its leave-one-out influence"
        )
    if float(m.l2) != 0.0:
        raise ValueError(
            f"model has l2={float(m.l2):g}: leverage, Cook's distance, DFBETA(S) and DFFITS are the unpenalised "
            f"{'OLS' if family == 'squared' else 'binomial GLM'} diagnostics (statsmodels' "
            f"{'OLSInfluence' if family == 'squared' else 'GLMInfluence'}) and are not defined for a penalised "
            f"fit; refit with l2=0, or use loo_change(method='newton') / self_influence() for the penalised "
            f"model's exact leave-one-out influence"
        )
    if inf.damping != 0.0:
        raise ValueError(
            f"damping={inf.damping:g}: the diagnostics need the undamped Hessian; build the LinearInfluence with "
            f"damping=0"
        )
    if inf.device == "dask":
        raise NotImplementedError(
            "regression_diagnostics does not support Dask training data yet; load it into memory "
            "(X_train.compute()) and build a LinearInfluence on numpy arrays"
        )
    return _compute(inf, ols=family == "squared")


def _influence(model: Any, X_train: Any, y_train: Any) -> LinearInfluence:
    """The LinearInfluence to read: ``model`` itself, or one built from a model and its training data."""
    if isinstance(model, LinearInfluence):
        if X_train is not None or y_train is not None:
            raise ValueError(
                "X_train and y_train are taken from the LinearInfluence; pass them only with a model"
            )
        return model
    if isinstance(model, _LinearModel):
        if X_train is None or y_train is None:
            raise ValueError(
                "X_train and y_train are required when model is an estimator (not a LinearInfluence)"
            )
        return LinearInfluence(model, X_train, y_train)
    raise TypeError(
        f"model must be a LinearInfluence or a fitted pyinfluence RidgeRegression / LogisticRegression, got "
        f"{type(model).__module__}.{type(model).__name__}"
    )


def _compute(inf: LinearInfluence, ols: bool) -> RegressionDiagnostics:
    """The diagnostics of a squared-loss (``ols``) or binary logistic LinearInfluence (l2 = 0, no damping)."""
    f64 = np.float64
    m = inf.model
    X = inf._X if inf.dtype == f64 else inf._X.astype(f64)  # (n, d), float64 whatever the engine's dtype
    y = inf._y if inf.dtype == f64 else inf._y.astype(f64)  # encoded: targets, or 0/1 class indices
    theta = np.ascontiguousarray(m.theta_, dtype=f64)
    spec = m._spec(f64)
    n, d = X.shape
    p = inf.n_params
    if ols and n < p + 2:
        raise ValueError(
            f"X_train has {n} rows for p = {p} parameters: OLS diagnostics need n ≥ p + 2 (the leave-one-out "
            f"residual variance s₍ᵢ₎² has n − p − 1 degrees of freedom)"
        )
    if inf.dtype == f64 and inf.device == "cpu":
        solve = inf._engine.solve  # (H + 0·I)⁻¹ with the engine's own Cholesky factor
    else:  # float32 or CUDA engine: a float64 host factor of the float64 Hessian (1 − h_i needs float64)
        solve = _core.CholeskyFactor(np.ascontiguousarray(_core.hessian(spec, X, y, theta)), 0.0).solve
    # H⁻¹ (p × p) from the Cholesky factor, as the core's leave-one-out step does (LooContext::Ainv); the n
    # design rows then cost one GEMM (n·p² flops at the BLAS rate) instead of n pairs of triangular solves.
    Hinv = np.asarray(solve(np.eye(p, dtype=f64)))
    Hinv = 0.5 * (Hinv + Hinv.T)
    U = X @ Hinv[:d]  # rows x̃_iᵀH⁻¹ (n, p): the intercept's column of X̃ (ones, last) is added below
    if m.fit_intercept:
        U += Hinv[d]
    _, R, S = _core.per_example(spec, X, y, theta)  # residual dL/ds = ŷ − y (OLS) or μ − y (logistic)
    e = -np.asarray(R, dtype=f64)[:, 0]  # e_i = y_i − ŷ_i  /  y_i − μ_i
    with np.errstate(all="ignore"):  # every result is checked below, with clear errors
        M = np.einsum("ij,ij->i", X, U[:, :d])  # x̃_iᵀH⁻¹x̃_i (n,)
        if m.fit_intercept:
            M += U[:, d]
        if ols:
            w = np.ones(n)
        else:
            mu = 1.0 / (1.0 + np.exp(-np.asarray(S, dtype=f64)[:, 0]))
            w = mu * (1.0 - mu)  # the logistic curvature μ(1 − μ)
        h = w * M / n  # h_i = w_i x̃_iᵀ(X̃ᵀWX̃)⁻¹x̃_i, since X̃ᵀWX̃ = nH
        one_minus_h = 1.0 - h
        _check_leverage(one_minus_h, h)
        # dfbeta_i = (X̃ᵀWX̃)⁻¹x̃_i e_i/(1 − h_i) (Sherman–Morrison on the leave-one-out Newton step)
        coef = e / (n * one_minus_h)
        dfbeta = U  # (n, p), scaled in place: U is not used again
        dfbeta *= coef[:, None]
        cov_diag = np.diag(Hinv) / n  # diag (X̃ᵀWX̃)⁻¹: the parameters' variances over the scale
        if ols:
            sse = float(e @ e)
            df = n - p
            scale = sse / df
            if not sse > (_EXACT_FIT_TOL * float(np.linalg.norm(y))) ** 2:
                raise ValueError(
                    "y_train is fitted exactly (every residual is 0 to rounding): the residual variance s² is 0, so "
                    "studentised residuals, Cook's distance, DFFITS and DFBETAS are undefined"
                )
            r_int = e / np.sqrt(scale * one_minus_h)
            # s₍ᵢ₎² = (SSE − e_i²/(1 − h_i)) / (n − p − 1): the exact residual variance without point i
            sse_loo = sse - e * e / one_minus_h
            s2_loo = sse_loo / (df - 1)
            bad = np.flatnonzero(~(sse_loo > _EXACT_FIT_TOL**2 * sse))
            if bad.size:
                raise ValueError(
                    f"without training point(s) {bad[:10].tolist()} the remaining points are fitted exactly "
                    f"(s₍ᵢ₎ = 0): their externally studentised residual, DFFITS and DFBETAS are undefined"
                )
            sigma_loo = np.sqrt(s2_loo)
            r_ext = e / (sigma_loo * np.sqrt(one_minus_h))
            dffits = r_ext * np.sqrt(h / one_minus_h)
            dfbetas = dfbeta * (1.0 / sigma_loo)[:, None]
            dfbetas *= (1.0 / np.sqrt(cov_diag))[None, :]
        else:
            scale = 1.0
            r_int = e / np.sqrt(w * one_minus_h)  # Pearson residual (y − μ)/√w, studentised
            r_ext = sigma_loo = None
            dffits = r_int * np.sqrt(h / one_minus_h)  # = d_linpred / se(linpred), one step
            dfbetas = dfbeta * (1.0 / np.sqrt(cov_diag))[None, :]
        cooks = r_int * r_int * h / (p * one_minus_h)
    out = {  # in the order their finiteness is checked: the residuals first (the usual root cause)
        "resid_studentized": r_int,
        "leverage": h,
        "cooks_distance": cooks,
        "dfbeta": dfbeta,
        "dfbetas": dfbetas,
        "dffits": dffits,
        "resid_studentized_external": r_ext,
        "sigma_loo": sigma_loo,
    }
    for name, a in out.items():
        if a is None:
            continue
        if not np.all(np.isfinite(a)):
            rows = np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(axis=1))[:10].tolist()
            raise NonFiniteError(
                f"the regression diagnostic {name} is not finite for training point(s) {rows} (a Pearson residual "
                f"of a point fitted with probability 0 or 1, or features of extreme magnitude): standardise "
                f"X_train or check the fit",
                what=name,
                where="X_train",
            )
        a.flags.writeable = False
    return RegressionDiagnostics(
        kind="ols" if ols else "logistic",
        scale=float(scale),
        dffits_threshold=float(2.0 * np.sqrt(p / n)),
        **out,
    )


def _check_leverage(one_minus_h: np.ndarray, h: np.ndarray) -> None:
    """ValueError naming the points of leverage 1 (to rounding): removing one leaves a parameter undetermined."""
    bad = np.flatnonzero(~(one_minus_h > _LEVERAGE_ONE_TOL))
    if bad.size:
        raise ValueError(
            f"training point(s) {bad[:10].tolist()} have leverage h = {float(h[bad[0]]):.12g} (1 to rounding): "
            f"the model without one of them is not identified (e.g. the only point with a nonzero value of a "
            f"feature), so its DFBETA, Cook's distance and studentised residual are undefined; drop that "
            f"feature or point"
        )
