"""The paper's applications (Koh & Liang 2017, Section 5) as functions returning result objects.

They are written against the one influence interface, :class:`pyinfluence.interface.Influence`, so they
take a :class:`~pyinfluence.LinearInfluence` or a :class:`~pyinfluence.TorchInfluence` alike; where the
torch path cannot do something (refit a model), a callable argument supplies it.

Every function returns a dataclass with the numbers, ``.to_dict()`` (JSON-ready: plain lists,
floats, ints, strings; NaN → None) and ``.plot(...)`` (matplotlib, imported only when called;
figures are created without pyplot, so nothing global changes; returns the Figure). Signs follow
the paper: ``up_loss`` negative = helpful, ``loo_change ≈ −up_loss/n``.

- :func:`validate_loo` — influence versus leave-one-out retraining (Figure 2).
- :func:`find_mislabeled`, :func:`mislabel_experiment` — fixing mislabeled examples (§5.4,
  Figure 6).
- :func:`training_set_attack`, :func:`attack_many` — training-set attacks (§5.2).
- :func:`make_readmission_data`, :func:`debug_prediction`, :func:`feature_contributions` —
  debugging a domain mismatch (§5.3).
- :func:`compare_models`, :func:`rbf_features` — understanding model behaviour (§5.1, Figure 4).
- :mod:`~pyinfluence.applications.datasets` — scikit-learn's bundled digits and generated data;
  :data:`DIGITS_PRESETS` — measured settings for running all of them on digits (quick / default).
"""

from pyinfluence.applications.attack import (
    AttackResult,
    AttackSettings,
    AttackSummary,
    attack_many,
    pick_targets,
    training_set_attack,
)
from pyinfluence.applications.behaviour import ModelComparison, compare_models, rbf_features, rbf_gamma
from pyinfluence.applications.datasets import (
    DigitsSplit,
    DomainMismatchData,
    digits_even_odd,
    digits_multiclass,
    load_digits_split,
    make_readmission_data,
)
from pyinfluence.applications.domain import PredictionDebug, debug_prediction, feature_contributions
from pyinfluence.applications.loo import PAPER_FIG2_PEARSON, LOOValidation, highest_loss_points, validate_loo
from pyinfluence.applications.mislabel import (
    MislabelExperiment,
    MislabelRanking,
    find_mislabeled,
    flip_labels,
    mislabel_experiment,
)
from pyinfluence.applications.presets import DIGITS_PRESETS
from pyinfluence.applications.results import Result, fit_stats

__all__ = [
    "DIGITS_PRESETS",
    "PAPER_FIG2_PEARSON",
    "AttackResult",
    "AttackSettings",
    "AttackSummary",
    "DigitsSplit",
    "DomainMismatchData",
    "LOOValidation",
    "MislabelExperiment",
    "MislabelRanking",
    "ModelComparison",
    "PredictionDebug",
    "Result",
    "attack_many",
    "compare_models",
    "debug_prediction",
    "digits_even_odd",
    "digits_multiclass",
    "feature_contributions",
    "find_mislabeled",
    "fit_stats",
    "flip_labels",
    "highest_loss_points",
    "load_digits_split",
    "make_readmission_data",
    "mislabel_experiment",
    "pick_targets",
    "rbf_features",
    "rbf_gamma",
    "training_set_attack",
    "validate_loo",
]
