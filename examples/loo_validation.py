"""Does influence predict retraining? Two experiments on scikit-learn's bundled digits.

    python examples/loo_validation.py

Experiment 1 is pyinfluence.applications.validate_loo (which also draws the scatter plots:
``result.plot()``); the datasets and fit statistics come from pyinfluence.applications as well.

1. Multinomial logistic regression (10 classes, standardised features, l2 = 1e-3, intercept
   unpenalised, fixed stratified 80/20 split, random_state=0 -> n = 1437, p = 650). Test point: the
   test image with the highest loss. Training points: the 50 with the largest |up_loss| for it plus 50
   others drawn at random (seed 0). For each we compare the ACTUAL change of the test loss after
   removing the point and retraining exactly (``LinearInfluence.retrain_loo``: Newton warm-started at
   θ̂ to ‖∇R‖ ≤ 1e-10, mean over the n − 1 remaining points, same l2) with
     - the paper's first-order estimate, ``loo_change(method="influence")`` = −up_loss / n, and
     - one exact Newton step of the leave-one-out objective, ``loo_change(method="newton")``.
   Reported: Pearson R and the fitted slope of actual regressed on predicted, both through the origin
   (actual ≈ b·predicted, b = Σ a p / Σ p²) and by ordinary least squares (with an intercept).
   Earlier hand measurements: first order R 0.93–0.98 with slope ≈ 1.9–2.0 (it under-predicts the
   largest effects about 2×), Newton step R ≈ 0.997 with slope ≈ 1.0.

2. Koh & Liang's Figure 3 (influence for a non-differentiable loss, the hinge). Binary task: digits
   even (−1) vs odd (+1), all ten classes, pixel values scaled to [0, 1] (x/16), no intercept, l2 = 0.01
   (the paper: MNIST 1 vs 7, pixels in [0, 1], no bias, weight decay 0.01). Why not 1 vs 7: on the 8×8
   digits it has only 288 training points, is separable with a wide margin (24 support vectors, no test
   point on the wrong side), and removing one of so few points is not a small perturbation any more, so
   the experiment would measure something else.
   - The "hinge" model: ``SmoothHingeSVM`` with temperature t0 = 1e-5 (the hinge up to ≤ t0·log 2 per
     point; Newton needs ~220 iterations from zero, ~4–40 warm-started). tests/test_retraining.py
     checks it against an exact hinge solver (KKT active set): θ̂ within 4e-5 relative, leave-one-out
     changes within 0.3% of the largest, Pearson R the same to 1e-3.
   - Test point: the smallest margin y·s on the test set (the paper picked among the lowest margins).
   - Training points (the paper's rule): the 100 with the largest |influence| computed as if the hinge
     were twice differentiable with zero curvature: H = l2·I and the hinge's (sub)gradients, i.e. the
     paper's "t = 0" column.
   - Actual: retrain the hinge model without each point (``retrain_loo``), change of its test loss.
   - Predicted at t ∈ {0.001, 0.1}: influence computed with the smooth hinge at temperature t *at the
     hinge model's parameters θ̂* (the paper sets the smooth-hinge model's weights to the hinge SVM's;
     it does not refit at t). θ̂ is then not the minimiser of the t-objective, so LinearInfluence warns
     NotAtOptimumWarning; that is expected here and silenced. H is the smooth hinge's Hessian at θ̂,
     gradients of the training and test losses are the smooth hinge's at θ̂.
   Paper: R = 0.63 (t = 0), 0.95 (t = 0.001), 0.91 (t = 0.1).
"""

from __future__ import annotations

import copy
import time
import warnings

import numpy as np

import pyinfluence
from pyinfluence.applications import (
    digits_even_odd,
    digits_multiclass,
    fit_stats,
    highest_loss_points,
    validate_loo,
)

SPLIT_SEED = 0
PAPER_FIG3 = {0.0: 0.63, 0.001: 0.95, 0.1: 0.91}
EARLIER_MEASUREMENTS = "first order R 0.93–0.98, slope ≈ 1.9–2.0; Newton step R ≈ 0.997, slope ≈ 1.0"


def multinomial_experiment(n_top=50, n_random=50, l2=1e-3, seed=SPLIT_SEED):
    """Experiment 1 (pyinfluence.applications.validate_loo on the highest-loss test point); returns a
    dict with the data, the model, the chosen points and the statistics."""
    t_start = time.perf_counter()
    X_train, y_train, X_test, y_test = digits_multiclass(seed)
    model = pyinfluence.LogisticRegression(l2=l2).fit(X_train, y_train)
    infl = pyinfluence.LinearInfluence(model, X_train, y_train)

    j = int(highest_loss_points(model, X_test, y_test, k=1)[0])  # the worst test point (deterministic)
    res = validate_loo(
        infl,
        X_test[j : j + 1],
        y_test[j : j + 1],
        n_top=n_top,
        n_random=n_random,
        seed=seed,
        methods=("influence", "newton"),
    )
    return {
        "X_train": X_train,
        "y_train": y_train,
        "X_test": X_test,
        "y_test": y_test,
        "model": model,
        "influence": infl,
        "l2": l2,
        "result": res,
        "test_index": j,
        "test_label": int(y_test[j]),
        "test_prediction": int(model.predict(X_test[j : j + 1])[0]),
        "test_loss": float(res.test_losses[0]),
        "train_idx": res.train_idx[0],
        "actual": res.actual[0],
        "first_order": res.predicted["influence"][0],
        "newton": res.predicted["newton"][0],
        "first_order_stats": res.stats["influence"],
        "newton_stats": res.stats["newton"],
        "time_predict_s": res.time_predict_s,
        "time_retrain_s": res.time_retrain_s,
        "time_total_s": time.perf_counter() - t_start,
    }


def hinge_experiment(
    temperatures=(0.001, 0.1), hinge_temperature=1e-5, l2=0.01, n_points=100, seed=SPLIT_SEED
):
    """Experiment 2 (Figure 3); returns a dict with the data, models, points and Pearson R per t."""
    t_start = time.perf_counter()
    X_train, y_train, X_test, y_test = digits_even_odd(seed)
    n = len(y_train)
    hinge = pyinfluence.SmoothHingeSVM(
        l2=l2, temperature=hinge_temperature, fit_intercept=False, max_iter=1000
    ).fit(X_train, y_train)
    infl_hinge = pyinfluence.LinearInfluence(hinge, X_train, y_train)

    margins_test = y_test * hinge.decision_function(X_test)
    j = int(np.argmin(margins_test))
    x_t, y_t = X_test[j], y_test[j]

    # The paper's "t = 0" influence: hinge (sub)gradients and zero loss curvature, so H = l2·I.
    # Gradients of the t0-smoothed hinge are the hinge's subgradients (−y·x inside the margin, 0 outside,
    # a value in between for the points on the margin).
    g_train = infl_hinge.gradients()  # (n, p)
    g_test = -y_t * x_t * (1.0 - _sigmoid((margins_test[j] - 1.0) / hinge_temperature))
    pred_t0 = g_train @ g_test / (l2 * n)  # −(1/n)·up_loss with H = l2·I
    idx = np.argsort(-np.abs(pred_t0), kind="stable")[:n_points]

    t0 = time.perf_counter()
    actual = infl_hinge.retrain_loo(x_t, y_t, idx, max_iter=1000)[:, 0]
    t_retrain = time.perf_counter() - t0

    predicted = {0.0: pred_t0[idx]}
    for t in temperatures:
        smooth = copy.deepcopy(hinge).set_params(temperature=t)  # same θ̂, loss at temperature t
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pyinfluence.NotAtOptimumWarning)
            infl_t = pyinfluence.LinearInfluence(smooth, X_train, y_train)
        predicted[t] = infl_t.loo_change(x_t, y_t, idx, method="influence")[:, 0]
    margins_train = y_train * hinge.decision_function(X_train)
    return {
        "X_train": X_train,
        "y_train": y_train,
        "X_test": X_test,
        "y_test": y_test,
        "model": hinge,
        "influence": infl_hinge,
        "l2": l2,
        "hinge_temperature": hinge_temperature,
        "test_index": j,
        "test_margin": float(margins_test[j]),
        "train_idx": idx,
        "margins_train": margins_train,
        "actual": actual,
        "predicted": predicted,
        "stats": {t: fit_stats(actual, p) for t, p in predicted.items()},
        "n_iter_fit": int(hinge.n_iter_),
        "time_retrain_s": t_retrain,
        "time_total_s": time.perf_counter() - t_start,
    }


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def main():
    r = multinomial_experiment()
    n = len(r["y_train"])
    print(
        "1. Influence predicts retraining: digits, 10-class multinomial logistic regression, "
        f"standardised, l2={r['l2']:g}, n={n}, p={r['influence'].n_params}"
    )
    print(
        f"   test point #{r['test_index']} (label {r['test_label']}, predicted {r['test_prediction']}, "
        f"loss {r['test_loss']:.3f}: the highest test loss); 50 most influential + 50 random training "
        f"points, actual change by exact retraining"
    )
    print(f"   {'estimate':<28}{'Pearson R':>10}{'slope (origin)':>16}{'slope (OLS)':>13}")
    for name, key in (("first order (-up_loss/n)", "first_order_stats"), ("Newton step", "newton_stats")):
        s = r[key]
        print(f"   {name:<28}{s['pearson']:>10.4f}{s['slope_origin']:>16.3f}{s['slope_ols']:>13.3f}")
    print(f"   earlier hand measurements: {EARLIER_MEASUREMENTS}")
    print(
        f"   slope = actual regressed on predicted; max |actual| = {np.abs(r['actual']).max():.3f}; "
        f"retraining 100 points {r['time_retrain_s']:.1f} s, estimates {r['time_predict_s']:.2f} s, "
        f"total {r['time_total_s']:.1f} s"
    )

    h = hinge_experiment()
    m = h["margins_train"]
    print(
        "\n2. Figure 3 (hinge loss): digits even vs odd, linear SVM without intercept, x/16, "
        f"l2={h['l2']:g}, n={len(h['y_train'])}"
    )
    print(
        f"   hinge = SmoothHingeSVM(temperature={h['hinge_temperature']:g}) "
        f"({h['n_iter_fit']} Newton iterations); support vectors: {np.sum(m < 1 - 1e-3)} inside the "
        f"margin, {np.sum(np.abs(m - 1) <= 1e-3)} on it"
    )
    print(
        f"   test point #{h['test_index']} (margin {h['test_margin']:.3f}, the smallest); the 100 "
        f"training points with the largest |t=0 influence|; actual = hinge retrained without each"
    )
    print(f"   {'influence computed with':<30}{'Pearson R':>10}{'paper':>8}{'slope (origin)':>16}")
    for t, s in h["stats"].items():
        name = "t = 0 (hinge, H = l2·I)" if t == 0.0 else f"smooth hinge, t = {t:g}"
        print(
            f"   {name:<30}{s['pearson']:>10.3f}{PAPER_FIG3.get(t, float('nan')):>8.2f}"
            f"{s['slope_origin']:>16.3f}"
        )
    print(f"   retraining 100 points {h['time_retrain_s']:.1f} s, total {h['time_total_s']:.1f} s")


if __name__ == "__main__":
    main()
