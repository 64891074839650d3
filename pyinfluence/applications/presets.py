"""Measured settings for running the applications on scikit-learn's digits (the demo's data).

``DIGITS_PRESETS["quick"]`` fits the whole set of linear-path applications in well under a minute
on 2 cores; ``DIGITS_PRESETS["default"]`` in about two. Each entry names the data (arguments of
:func:`~pyinfluence.applications.load_digits_split` or
:func:`~pyinfluence.applications.make_readmission_data`), the model (``l2`` of a
:class:`~pyinfluence.LogisticRegression`) and the application's own arguments. Why these values
(see the applications' docstrings for the measurements):

- ``loo``: standardised pixels, l2 = 1e-3 (the set-up of examples/loo_validation.py); the highest-loss test points;
  Newton-step Pearson R ≥ 0.995 with 1–5 test points, first order 0.91–0.97.
- ``mislabel``: a 200-image training set — the regime where self-influence beats the training
  loss (on the full training set the two tie); l2 = 1e-2.
- ``attack``: pixels in [0, 1] with ``clip=(0, 1)``, l2 = 1e-3; the least confident correctly
  classified targets; 3 perturbed training images with ε = 0.25 flip 9 of 10 such targets.
- ``domain``: the generated readmission table; l2 = 1e-3; its wrongly classified children.
- ``behaviour``: the RBF model: 200 training images as centres, γ = 10 × the median rule,
  l2 = 1e-4, on pixels in [0, 1]; compared with logistic regression on the pixels (the CNN of the
  torch path joins here).
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["DIGITS_PRESETS"]

DIGITS_PRESETS: Dict[str, Dict[str, Dict[str, Any]]] = {
    "quick": {
        "loo": {
            "data": {"scale": "standardize"},
            "l2": 1e-3,
            "n_test_points": 1,
            "n_top": 30,
            "n_random": 20,
        },
        "mislabel": {
            "data": {"scale": "standardize", "n_train": 200},
            "l2": 1e-2,
            "flip_fraction": 0.1,
            "check_fractions": (0.05, 0.1, 0.2, 0.3),
            "seeds": (0, 1, 2),
        },
        "attack": {
            "data": {"scale": "unit"},
            "l2": 1e-3,
            "n_targets": 3,
            "epsilon": 0.25,
            "n_poison": 3,
            "n_steps": 5,
            "clip": (0.0, 1.0),
        },
        "domain": {"data": {"n_patients": 8000}, "l2": 1e-3, "k": 5},
        "behaviour": {
            "data": {"scale": "unit"},
            "l2": 1e-3,
            "rbf_l2": 1e-4,
            "n_centers": 200,
            "gamma_times_median": 10.0,
            "n_test_points": 2,
            "k": 5,
        },
    },
    "default": {
        "loo": {
            "data": {"scale": "standardize"},
            "l2": 1e-3,
            "n_test_points": 3,
            "n_top": 50,
            "n_random": 50,
        },
        "mislabel": {
            "data": {"scale": "standardize", "n_train": 200},
            "l2": 1e-2,
            "flip_fraction": 0.1,
            "check_fractions": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3),
            "seeds": tuple(range(10)),
        },
        "attack": {
            "data": {"scale": "unit"},
            "l2": 1e-3,
            "n_targets": 10,
            "epsilon": 0.25,
            "n_poison": 3,
            "n_steps": 10,
            "clip": (0.0, 1.0),
        },
        "domain": {"data": {"n_patients": 8000}, "l2": 1e-3, "k": 5},
        "behaviour": {
            "data": {"scale": "unit"},
            "l2": 1e-3,
            "rbf_l2": 1e-4,
            "n_centers": 200,
            "gamma_times_median": 10.0,
            "n_test_points": 4,
            "k": 5,
        },
    },
}
