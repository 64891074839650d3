"""Datasets for the applications, built from data that ships with scikit-learn or generated here:
nothing is downloaded.

- :func:`load_digits_split`: scikit-learn's bundled 8×8 digits (1797 images, 16 grey levels), a
  stratified train/test split, optional subsets of classes or of the training set, and a choice of
  scaling. Raw images are kept beside the model inputs for plotting.
- :func:`digits_multiclass`, :func:`digits_even_odd`: the two set-ups of
  ``examples/loo_validation.py``
  (kept as tuples for that example and ``tests/test_retraining.py``).
- :func:`make_readmission_data`: a generated hospital-readmission table with a subgroup (children,
  "age < 10") that is under-represented in training — the paper's Section 5.3 set-up (see its
  docstring for exactly how it is built).

scikit-learn is needed only by the digits loaders (imported when they are called).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import NDArray

from pyinfluence._validation import check_float, check_int, check_rng_seed
from pyinfluence.applications.results import Result

__all__ = [
    "DigitsSplit",
    "DomainMismatchData",
    "digits_even_odd",
    "digits_multiclass",
    "load_digits_split",
    "make_readmission_data",
]

_SCALES = ("standardize", "unit", "none")


@dataclass
class DigitsSplit(Result):
    """A train/test split of scikit-learn's digits.

    ``X_train`` (n, 64), ``X_test`` (m, 64): model inputs after ``scale``; ``y_train`` (n,),
    ``y_test`` (m,): labels (digit values, or as mapped by ``task``); ``images_train``,
    ``images_test``: the raw pixel values 0..16 of the same images, shape (·, 64), for plotting
    with ``image_shape`` (8, 8); ``index_train``/``index_test``: rows of ``load_digits()``;
    ``mean``/``std``: the training statistics used for ``scale="standardize"`` (else 0 and the
    divisor). ``to_dict()`` gives the description only (no arrays).
    """

    X_train: NDArray[np.float64]
    y_train: np.ndarray
    X_test: NDArray[np.float64]
    y_test: np.ndarray
    images_train: NDArray[np.float64]
    images_test: NDArray[np.float64]
    index_train: NDArray[np.int64]
    index_test: NDArray[np.int64]
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    image_shape: Tuple[int, int] = (8, 8)
    description: str = ""

    _skip_in_dict = (
        "X_train",
        "y_train",
        "X_test",
        "y_test",
        "images_train",
        "images_test",
        "index_train",
        "index_test",
        "mean",
        "std",
    )

    def as_tuple(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(X_train, y_train, X_test, y_test)."""
        return self.X_train, self.y_train, self.X_test, self.y_test

    def to_image_space(self, X: Any) -> NDArray[np.float64]:
        """Model inputs (·, 64) back to pixel values 0..16 (undoes ``scale``)."""
        return np.asarray(X, dtype=np.float64) * self.std + self.mean


def load_digits_split(
    *,
    scale: str = "standardize",
    test_size: float = 0.2,
    n_train: Optional[int] = None,
    digits: Optional[Sequence[int]] = None,
    task: str = "multiclass",
    seed: int = 0,
) -> DigitsSplit:
    """scikit-learn's bundled digits as a stratified train/test split (no download).

    - ``scale``: ``"standardize"`` (training mean/std per pixel; always-zero pixels divided by 1),
      ``"unit"`` (pixels / 16 ∈ [0, 1]) or ``"none"`` (raw 0..16).
    - ``test_size``: fraction of the images held out (stratified, ``random_state=seed``).
    - ``n_train``: keep a stratified subset of this many training images (drawn with
      ``random_state=seed`` from the training part; the test set is unchanged). Standardisation
      uses the statistics of the kept training images.
    - ``digits``: keep only these digit classes (e.g. ``(1, 7)``).
    - ``task``: ``"multiclass"`` (labels = digits) or ``"even_odd"`` (labels −1 for even, +1 for
      odd digits).
    - ``seed``: the split's (and the subset's) random state.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {list(_SCALES)}, got {scale!r}")
    if task not in ("multiclass", "even_odd"):
        raise ValueError(f"task must be 'multiclass' or 'even_odd', got {task!r}")
    test_size = check_float("test_size", test_size, low=0.0, high=1.0, low_open=True, high_open=True)
    seed = check_rng_seed("seed", seed)
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    index = np.arange(labels.shape[0])
    if digits is not None:
        digits = [check_int("digits", d, 0, 9) for d in digits]
        if len(set(digits)) < 2:
            raise ValueError(f"digits must name at least 2 different classes, got {digits}")
        keep = np.isin(labels, digits)
        index = index[keep]
    task_labels = labels if task == "multiclass" else np.where(labels % 2 == 1, 1, -1)
    # stratified on the task's labels (digit, or parity for even_odd)
    idx_train, idx_test = train_test_split(
        index, test_size=test_size, random_state=seed, stratify=task_labels[index]
    )
    if n_train is not None:
        n_train = check_int("n_train", n_train, 2, idx_train.shape[0])
        if n_train < idx_train.shape[0]:
            idx_train, _ = train_test_split(
                idx_train, train_size=n_train, random_state=seed, stratify=task_labels[idx_train]
            )
    img_tr = images[idx_train].astype(np.float64)
    img_te = images[idx_test].astype(np.float64)
    if scale == "standardize":
        mean, std = img_tr.mean(axis=0), img_tr.std(axis=0)
        std[std == 0] = 1.0
    elif scale == "unit":
        mean, std = np.zeros(64), np.full(64, 16.0)
    else:
        mean, std = np.zeros(64), np.ones(64)
    y_tr, y_te = task_labels[idx_train], task_labels[idx_test]
    desc = (
        f"scikit-learn digits (8x8, 16 grey levels){'' if digits is None else f', digits {digits}'}"
        f"{', even (-1) vs odd (+1)' if task == 'even_odd' else ''}; stratified split "
        f"(test_size={test_size:g}, random_state={seed}): {len(idx_train)} train, "
        f"{len(idx_test)} test; "
        f"scale={scale}"
    )
    return DigitsSplit(
        X_train=(img_tr - mean) / std,
        y_train=y_tr,
        X_test=(img_te - mean) / std,
        y_test=y_te,
        images_train=img_tr,
        images_test=img_te,
        index_train=np.asarray(idx_train, dtype=np.int64),
        index_test=np.asarray(idx_test, dtype=np.int64),
        mean=mean,
        std=std,
        description=desc,
    )


def digits_multiclass(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Standardised digits (train mean/std; constant pixels divided by 1), 80/20 stratified split:
    (X_train, y_train, X_test, y_test)."""
    return load_digits_split(scale="standardize", seed=seed).as_tuple()


def digits_even_odd(seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All digits, label −1 for even and +1 for odd, pixels scaled to [0, 1], 80/20 stratified
    split:
    (X_train, y_train, X_test, y_test)."""
    return load_digits_split(scale="unit", task="even_odd", seed=seed).as_tuple()


# ------------------------------------------------------------------------------------------------
# domain mismatch (Section 5.3)
# ------------------------------------------------------------------------------------------------
READMISSION_FEATURES: Tuple[str, ...] = (
    "age<10",
    "prior_visits",
    "medications/10",
    "stay_days/5",
    "hba1c_high",
    "emergency_admission",
    "male",
)


@dataclass
class DomainMismatchData(Result):
    """A tabular dataset whose training set under-represents a subgroup (see
    :func:`make_readmission_data`).

    ``X_train`` (n, d), ``y_train`` (n,) ∈ {0, 1} (1 = readmitted), ``X_test``, ``y_test``;
    ``feature_names`` (d,); ``group_feature``: the column marking the subgroup; ``group_train``,
    ``group_test``: boolean masks of subgroup rows; ``removed_train``: how many subgroup rows were
    dropped from training; counts and the generating coefficients in ``info``. ``to_dict()``
    gives the description, counts and coefficients (no arrays).
    """

    X_train: NDArray[np.float64]
    y_train: NDArray[np.int64]
    X_test: NDArray[np.float64]
    y_test: NDArray[np.int64]
    feature_names: List[str]
    group_feature: str
    group_train: NDArray[np.bool_]
    group_test: NDArray[np.bool_]
    info: Dict[str, Any] = field(default_factory=dict)
    description: str = ""

    _skip_in_dict = ("X_train", "y_train", "X_test", "y_test", "group_train", "group_test")


def make_readmission_data(
    *,
    n_patients: int = 8000,
    test_fraction: float = 0.25,
    child_fraction: float = 0.03,
    keep_children_readmitted: int = 3,
    keep_children_not_readmitted: int = 1,
    seed: int = 0,
) -> DomainMismatchData:
    """A generated hospital-readmission table with a domain mismatch, after Koh & Liang §5.3.

    How it is built (all draws from ``np.random.default_rng(seed)``):

    1. ``n_patients`` patients; each is a child (age < 10) with probability ``child_fraction``.
       Features, drawn independently of age: ``prior_visits`` ~ Poisson(1), ``medications`` ~
       Poisson(12) (stored /10), ``stay_days`` ~ Gamma(2, 2) (stored /5), ``hba1c_high`` ~
       Bernoulli(0.3), ``emergency_admission`` ~ Bernoulli(0.5), ``male`` ~ Bernoulli(0.5), plus the
       indicator ``age<10``.
    2. Readmission ~ Bernoulli(sigmoid(s)) with s = −0.9 + 0.6·(visits − 1) + 0.06·(medications −
       12) + 0.15·(stay − 4) + 0.8·hba1c_high + 0.5·emergency − 3.0·child (``male`` has no effect):
       about 40% of adults and 5% of children are readmitted — children are rarely readmitted.
    3. The last ``test_fraction`` of the patients form the test set, unchanged (children appear in
       it at their natural rate, almost all not readmitted).
    4. The training set is the rest, MINUS most children: only ``keep_children_readmitted``
       readmitted children and ``keep_children_not_readmitted`` healthy ones are kept (the paper
       kept 3 readmitted and 1 healthy child out of 24). From these few children a model learns that
       children are readmitted, and then wrongly predicts readmission for healthy test children;
       on the full training set it would not.
    """
    n_patients = check_int("n_patients", n_patients, 100)
    test_fraction = check_float(
        "test_fraction", test_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    child_fraction = check_float("child_fraction", child_fraction, low=0.0, high=0.5, low_open=True)
    keep_pos = check_int("keep_children_readmitted", keep_children_readmitted, 0)
    keep_neg = check_int("keep_children_not_readmitted", keep_children_not_readmitted, 0)
    seed = check_rng_seed("seed", seed)
    rng = np.random.default_rng(seed)
    N = n_patients
    child = rng.random(N) < child_fraction
    visits = rng.poisson(1.0, N).astype(np.float64)
    meds = rng.poisson(12.0, N).astype(np.float64)
    stay = rng.gamma(2.0, 2.0, N)
    hba1c = (rng.random(N) < 0.3).astype(np.float64)
    emerg = (rng.random(N) < 0.5).astype(np.float64)
    male = (rng.random(N) < 0.5).astype(np.float64)
    coef = {
        "intercept": -0.9,
        "prior_visits (centred at 1)": 0.6,
        "medications (centred at 12)": 0.06,
        "stay_days (centred at 4)": 0.15,
        "hba1c_high": 0.8,
        "emergency_admission": 0.5,
        "male": 0.0,
        "age<10": -3.0,
    }
    s = (
        -0.9
        + 0.6 * (visits - 1)
        + 0.06 * (meds - 12)
        + 0.15 * (stay - 4)
        + 0.8 * hba1c
        + 0.5 * emerg
        - 3.0 * child
    )
    y = (rng.random(N) < 1.0 / (1.0 + np.exp(-s))).astype(np.int64)
    X = np.column_stack([child.astype(np.float64), visits, meds / 10, stay / 5, hba1c, emerg, male])
    n_test = max(1, round(test_fraction * N))
    is_test = np.arange(N) >= N - n_test
    tr = np.flatnonzero(~is_test)
    te = np.flatnonzero(is_test)
    ch_tr = tr[child[tr]]
    pos, neg = ch_tr[y[ch_tr] == 1], ch_tr[y[ch_tr] == 0]
    if pos.size < keep_pos or neg.size < keep_neg:
        raise ValueError(
            f"the generated training part has {pos.size} readmitted and {neg.size} healthy "
            f"children, fewer than keep_children_readmitted={keep_pos} / "
            f"keep_children_not_readmitted={keep_neg}; "
            f"raise n_patients or child_fraction"
        )
    drop = np.concatenate([pos[keep_pos:], neg[keep_neg:]])
    keep = np.setdiff1d(tr, drop)
    info = {
        "n_train": int(keep.size),
        "n_test": int(te.size),
        "children_in_full_training_part": int(ch_tr.size),
        "children_readmitted_in_full_training_part": int(pos.size),
        "children_kept_in_training": int(keep_pos + keep_neg),
        "children_kept_readmitted": keep_pos,
        "children_removed_from_training": int(drop.size),
        "children_in_test": int(child[te].sum()),
        "children_readmitted_in_test": int(y[te][child[te]].sum()),
        "readmission_rate_adults": float(y[~child].mean()),
        "readmission_rate_children": float(y[child].mean()) if child.any() else float("nan"),
        "generating_coefficients": coef,
        "seed": seed,
    }
    desc = (
        f"generated hospital readmission data ({N} patients, {child.mean():.1%} children aged "
        f"< 10; {info['readmission_rate_adults']:.0%} of adults and "
        f"{info['readmission_rate_children']:.0%} of children readmitted). Training set: "
        f"{keep.size} patients, of whose {ch_tr.size} children only {keep_pos} readmitted and "
        f"{keep_neg} healthy were kept; test set: {te.size} patients including "
        f"{info['children_in_test']} children ({info['children_readmitted_in_test']} readmitted)."
    )
    return DomainMismatchData(
        X_train=X[keep],
        y_train=y[keep],
        X_test=X[te],
        y_test=y[te],
        feature_names=list(READMISSION_FEATURES),
        group_feature="age<10",
        group_train=child[keep],
        group_test=child[te],
        info=info,
        description=desc,
    )
