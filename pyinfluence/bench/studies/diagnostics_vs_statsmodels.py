"""Regression diagnostics: pyinfluence against statsmodels, side by side in one process.

``python -m pyinfluence.bench.studies.diagnostics_vs_statsmodels [--n 100000] [--d 19] [--seed 0] [--refits 20]``

Synthetic seeded data: n rows, d standard-normal features plus the intercept (p = d + 1). For OLS
(``RidgeRegression(l2=0)`` against ``sm.OLS(...).get_influence()``) and for logistic regression
(``LogisticRegression(l2=0)`` against ``sm.GLM(..., Binomial()).get_influence()``) it times the diagnostics
only — the fits are excluded on both sides, but pyinfluence's time includes building the LinearInfluence
(assembling and factorising H), statsmodels' includes ``get_influence`` — and prints a markdown table with the
seconds, the ratio and the largest relative difference of the results.

statsmodels computes OLS ``dfbeta``, ``dfbetas`` and ``dffits`` from n leave-one-out refits (its
``_res_looo`` loop); at this n that loop would take hours, so its time is estimated from ``--refits`` refits
timed one by one exactly as the loop does them (``OLS(endog[keep], exog[keep]).fit()`` plus ``params``,
``mse_resid`` and ``det(cov_params())``), times n, and marked "est.". Every other statsmodels time is measured.

statsmodels is a test-only dependency of pyinfluence: it is imported only here and in the tests.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable, Dict, List, Tuple, TypeVar

import numpy as np
import statsmodels.api as sm

from pyinfluence.linear import LogisticRegression, RidgeRegression
from pyinfluence.linear.diagnostics import regression_diagnostics

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeat: int) -> Tuple[float, T]:
    """The shortest wall time of ``repeat`` calls (at least one), and the last call's result."""
    t0 = time.perf_counter()
    out = fn()
    best = time.perf_counter() - t0
    for _ in range(repeat - 1):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max |b|."""
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=19)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refits", type=int, default=20, help="statsmodels OLS leave-one-out refits timed")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n, d = args.n, args.d
    X = rng.standard_normal((n, d))
    beta = rng.standard_normal(d) / np.sqrt(d)
    y_ols = X @ beta + 0.5 + rng.standard_t(5, size=n)
    y_log = (rng.random(n) < 1.0 / (1.0 + np.exp(-(X @ beta - 0.3)))).astype(np.float64)
    Xa = np.column_stack([X, np.ones(n)])  # statsmodels' design: intercept last, as pyinfluence's theta_
    rows: List[Dict[str, str]] = []

    # -- OLS -----------------------------------------------------------------------------------------------------
    ols = RidgeRegression(l2=0.0).fit(X, y_ols)
    res = sm.OLS(y_ols, Xa).fit()
    t_ours, D = best_of(lambda: regression_diagnostics(ols, X, y_ols), args.repeat)

    def sm_closed_form() -> Tuple[np.ndarray, np.ndarray]:
        oi = res.get_influence()
        return oi.hat_matrix_diag, oi.cooks_distance[0]

    t_sm, (hat, cook) = best_of(sm_closed_form, args.repeat)
    diff = max(rel_diff(D.leverage, hat), rel_diff(D.cooks_distance, cook))
    rows.append(_row("OLS: leverage, Cook's D (statsmodels closed form)", t_ours, t_sm, f"{diff:.1e}"))
    # statsmodels' leave-one-out loop, timed on a few points and extrapolated to all n
    idx = rng.choice(n, size=args.refits + 1, replace=False)
    t0 = time.perf_counter()
    for j, i in enumerate(idx):
        if j == 1:  # the first refit warms statsmodels up (lazy imports): not timed
            t0 = time.perf_counter()
        keep = np.ones(n, dtype=bool)
        keep[i] = False
        r = sm.OLS(y_ols[keep], Xa[keep]).fit()
        _ = (r.params, r.mse_resid, np.linalg.det(r.cov_params()))
    t_loop = (time.perf_counter() - t0) / args.refits * n
    # check our dfbeta and s₍ᵢ₎ against statsmodels refits without 5 of those points
    assert D.sigma_loo is not None
    errs = []
    for i in idx[:5]:
        keep = np.arange(n) != i
        r = sm.OLS(y_ols[keep], Xa[keep]).fit()
        errs += [rel_diff(D.dfbeta[i], res.params - r.params), abs(D.sigma_loo[i] ** 2 / r.mse_resid - 1)]
    rows.append(
        _row(
            "OLS: dfbeta, dfbetas, dffits (statsmodels: n refits)",
            t_ours,
            t_loop,
            f"{max(errs):.1e} (5 refits)",
            est=True,
        )
    )

    # -- logistic (binomial GLM) ---------------------------------------------------------------------------------
    logit = LogisticRegression(l2=0.0).fit(X, y_log)
    glm = sm.GLM(y_log, Xa, family=sm.families.Binomial()).fit(tol=1e-14)
    t_ours, D = best_of(lambda: regression_diagnostics(logit, X, y_log), args.repeat)

    def sm_glm() -> Tuple[np.ndarray, ...]:
        gi = glm.get_influence()
        return gi.hat_matrix_diag, gi.cooks_distance[0], gi.d_params, gi.dfbetas, gi.d_linpred_scaled

    t_sm, (hat, cook, dpar, dfbs, dlin) = best_of(sm_glm, args.repeat)
    diff = max(
        rel_diff(D.leverage, hat),
        rel_diff(D.cooks_distance, cook),
        rel_diff(D.dfbeta, dpar),
        rel_diff(D.dfbetas, dfbs),
        rel_diff(D.dffits, dlin),
    )
    rows.append(_row("logistic: all five (both one-step, closed form)", t_ours, t_sm, f"{diff:.1e}"))

    print(
        f"n = {n}, p = {d + 1} (d = {d} features + intercept), seed {args.seed}; best of {args.repeat}. Fits excluded; "
        f"pyinfluence: regression_diagnostics(model, X, y) incl. building the LinearInfluence (H, Cholesky), all five "
        f"quantities; statsmodels: get_influence() and the quantities named.\n"
    )
    print("| diagnostics | pyinfluence (s) | statsmodels (s) | statsmodels / pyinfluence | max rel. diff |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['ours']} | {r['sm']} | {r['ratio']} | {r['diff']} |")


def _row(what: str, ours: float, sm_time: float, diff: str, est: bool = False) -> Dict[str, str]:
    mark = " (est.)" if est else ""
    return {
        "what": what,
        "ours": f"{ours:.3f}",
        "sm": f"{sm_time:.3g}{mark}",
        "ratio": f"{sm_time / ours:.3g}×{mark}",
        "diff": diff,
    }


if __name__ == "__main__":
    main()
