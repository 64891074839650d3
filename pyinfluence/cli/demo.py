"""``pyinfluence demo``: the paper's applications on scikit-learn's bundled digits, as a report.

:func:`run_demo` trains the models it needs — exact linear models on the C++ path and a small
CNN on the torch path (:class:`~pyinfluence.torch.training.DigitsCNN`, trained here in seconds by
:func:`~pyinfluence.torch.training.train_cnn`) — runs the five applications of Koh & Liang (2017,
§5) through :mod:`pyinfluence.applications` and writes a self-contained report folder
(``report.html``, PNG figures, ``results.json``; see :mod:`pyinfluence.cli.report`):

1. model behaviour (Figure 4): most helpful / harmful training images of an RBF-feature model and
   of the CNN for a few test images, and influence against pixel-space distance;
2. influence versus leave-one-out retraining (Figure 2): logistic regression (exact refits) and
   the CNN (retrained from its trained weights), each with the first-order and the Newton-step
   estimate;
3. fixing mislabeled examples (§5.4, Figure 6): self-influence versus training loss and random;
4. training-set attacks (§5.2): perturbed training images that flip test predictions;
5. debugging a domain mismatch (§5.3): a generated readmission table with few children.

Each section is computed by a ``compute_*`` function that returns a small result object
(:class:`BehaviourStudy`, :class:`LooStudy`, :class:`MislabelStudy`, :class:`AttackStudy`,
:class:`DomainStudy`: the applications' results plus the data and settings behind them, with
``summary()`` and ``to_dict()`` for ``results.json``) and drawn into the report by the matching
``render_*`` function.

Nothing is downloaded. The settings (:data:`DEMO_SETTINGS`) extend the applications' measured
:data:`~pyinfluence.applications.DIGITS_PRESETS`. Measured on 2 cores (one thread per pool):
``quick`` 20–30 s, ``default`` about 70 s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import platform
import re
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from pyinfluence._optional import require_torch

require_torch("the demo (pyinfluence.cli.demo)")  # its CNN runs on the torch path

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import pyinfluence  # noqa: E402
from pyinfluence import applications as app  # noqa: E402
from pyinfluence._formatting import format_percent, format_value  # noqa: E402
from pyinfluence.applications.plotting import plot_with_zoom  # noqa: E402
from pyinfluence.applications.presets import DIGITS_PRESETS  # noqa: E402
from pyinfluence.cli.report import Report  # noqa: E402
from pyinfluence.errors import NotPositiveDefiniteError  # noqa: E402
from pyinfluence.torch.training import (  # noqa: E402
    CNN_FIT_TOL,
    CNN_LOO_TOL,
    CNNRetrainer,
    DigitsCNN,
    TrainedCNN,
    cross_entropy,
    train_cnn,
)

__all__ = [
    "CNN_FIT_TOL",
    "CNN_LOO_DIGITS",
    "CNN_LOO_TOL",
    "DEMO_SETTINGS",
    "AttackStudy",
    "BehaviourStudy",
    "CNNRetrainer",
    "DemoOutput",
    "DigitsCNN",
    "DomainStudy",
    "LooStudy",
    "MislabelStudy",
    "RunInfo",
    "TrainedCNN",
    "compute_attack",
    "compute_behaviour",
    "compute_domain",
    "compute_loo",
    "compute_mislabel",
    "limited_threads",
    "render_about",
    "render_attack",
    "render_behaviour",
    "render_domain",
    "render_loo",
    "render_mislabel",
    "run_demo",
    "train_cnn",
]

Settings = Dict[str, Any]
#: Settings of the demo: the applications' measured digits presets (``loo``, ``mislabel``,
#: ``attack``, ``domain``), the model-behaviour comparison (``behaviour``) and the 10-class CNN of
#: the torch path (``cnn``: filters, L2 coefficient, the L-BFGS tolerance before the BFGS polish,
#: and its leave-one-out check: test points, most influential and random training points, and the
#: damping ladder of its estimates — see :func:`compute_loo`).
DEMO_SETTINGS: Dict[str, Dict[str, Any]] = {
    mode: {
        **DIGITS_PRESETS[mode],
        # Figure 4 was binary (dog vs fish); here 4 vs 9. RBF model: logistic regression on RBF
        # features centred on every training image (an RBF-kernel machine), gamma = 10 x the
        # median rule; measured (seed 0, the first 8 test images): its 5 most helpful images lie at
        # 0.52 of the mean pixel distance, the CNN's at 0.82.
        "behaviour": {
            "digits": (4, 9),
            "gamma_times_median": 10.0,
            "rbf_l2": 1e-4,
            "cnn_l2": 1e-2,
            "n_test_points": n_test,
            "k": 5,
        },
        "cnn": {
            "channels": 6,
            "l2": 1e-2,
            "lbfgs_tol": 1e-5,
            "loo_n_test": 1,
            "loo_n_top": n_top,
            "loo_n_random": n_random,
            # the first damping λ here, not below the CNN's own, at which every leave-one-out
            # Hessian ∇²R₋ᵢ(θ̂) + λI of the check is positive definite (the Newton step needs it)
            "loo_dampings": (0.0, 1e-4, 1e-3, 1e-2),
        },
    }
    for mode, n_test, n_top, n_random in (("quick", 2, 8, 4), ("default", 4, 100, 20))
}


# ================================================================================================
# threads
# ================================================================================================
@contextlib.contextmanager
def limited_threads(n: Optional[int]) -> Iterator[None]:
    """Run the block with ``n`` threads in pyinfluence's core, torch and numpy's BLAS (via
    threadpoolctl when installed); restore the previous settings afterwards. ``None``: change
    nothing.

    The demo's problems are small (p ≤ 2000 parameters, n ≤ 6000 rows): one thread per pool avoids
    the thread wake-ups and spinning that dominate such calls, above all on a machine whose cores
    are busy (measured on 2 cores while other jobs ran: the quick demo took 30 s with 1 thread and
    590 s with 2, most of it in the CNN's Hessian-vector products).
    """
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive int or None, got {n!r}")
    prev_torch = torch.get_num_threads()
    prev_core = pyinfluence.get_num_threads()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        limiter: Any = contextlib.nullcontext()
    else:
        limiter = threadpool_limits(limits=n)
    try:
        with limiter:
            torch.set_num_threads(n)
            pyinfluence.set_num_threads(n)
            yield
    finally:
        torch.set_num_threads(prev_torch)
        pyinfluence.set_num_threads(max(1, int(prev_core)))


# ================================================================================================
# helpers shared by the sections
# ================================================================================================
def _fit_logistic(X: np.ndarray, y: np.ndarray, l2: float) -> Tuple[Any, Any]:
    """A multinomial logistic regression fitted to its exact optimum and its LinearInfluence."""
    model = pyinfluence.LogisticRegression(l2=l2).fit(X, y)
    return model, pyinfluence.LinearInfluence(model, X, y)


def _mean(values: Sequence[float]) -> float:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else float("nan")


def _digits_tensors(
    ds: Any, classes: Optional[Sequence[int]] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(X_train (n, 1, 8, 8), y_train, X_test, y_test) tensors of a DigitsSplit; labels mapped to
    their position in ``classes`` (default: the labels themselves)."""
    f64 = torch.float64

    def lab(y: np.ndarray) -> Tensor:
        y = np.asarray(y, dtype=np.int64)
        if classes is not None:
            y = np.searchsorted(np.asarray(classes), y).astype(np.int64)
        return torch.as_tensor(y)

    return (
        torch.tensor(ds.X_train, dtype=f64).reshape(-1, 1, 8, 8),
        lab(ds.y_train),
        torch.tensor(ds.X_test, dtype=f64).reshape(-1, 1, 8, 8),
        lab(ds.y_test),
    )


def _train_digits_cnn(
    tensors: Tuple[Tensor, Tensor, Tensor, Tensor],
    pc: Settings,
    *,
    l2: float,
    n_classes: int,
    seed: int,
    progress: bool,
) -> TrainedCNN:
    """The demo's CNN (settings ``pc`` = DEMO_SETTINGS[mode]["cnn"]) on digit tensors."""
    Xtr, ytr, Xte, yte = tensors
    return train_cnn(
        Xtr,
        ytr,
        Xte,
        yte,
        channels=pc["channels"],
        n_classes=n_classes,
        l2=l2,
        lbfgs_tol=pc["lbfgs_tol"],
        seed=seed,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------
# 1. model behaviour
# ------------------------------------------------------------------------------------------------
_STAT_KEYS = (
    "helpful_distance_ratio",
    "helpful_same_label",
    "harmful_same_label",
    "spearman_abs_influence_distance",
)


@dataclasses.dataclass
class BehaviourStudy:
    """Section 1: an RBF-feature model and the CNN on a binary digit task, compared on a few test
    images (``comparison``: :class:`~pyinfluence.applications.ModelComparison`)."""

    settings: Settings  # DEMO_SETTINGS[mode]["behaviour"]
    pair: Tuple[int, ...]
    data: Any  # DigitsSplit
    n_centers: int
    gamma: float
    rbf_accuracy: float
    cnn: TrainedCNN
    test_index: np.ndarray
    comparison: Any  # ModelComparison
    stats: Dict[str, Dict[str, float]]  # per model: the means of _STAT_KEYS over the test images

    def summary(self) -> Dict[str, Any]:
        return self.stats

    def to_dict(self) -> Dict[str, Any]:
        return {
            "data": self.data.description,
            "rbf_model": {
                "n_centers": self.n_centers,
                "gamma": self.gamma,
                "l2": float(self.settings["rbf_l2"]),
                "test_accuracy": self.rbf_accuracy,
            },
            "cnn": self.cnn.summary(),
            "comparison": self.comparison.to_dict(),
            "mean_stats": self.stats,
        }


def compute_behaviour(S: Settings, seed: int, progress: bool = False) -> BehaviourStudy:
    """Section 1 with the settings ``S`` (= DEMO_SETTINGS[mode])."""
    p, pc = S["behaviour"], S["cnn"]
    pair = tuple(sorted(p["digits"]))
    ds = app.load_digits_split(scale="unit", digits=pair, seed=seed)
    centers = ds.X_train  # every training image is a centre: an RBF-kernel machine
    gamma = p["gamma_times_median"] * app.rbf_gamma(centers, "median")
    F_tr = app.rbf_features(ds.X_train, centers, gamma)
    F_te = app.rbf_features(ds.X_test, centers, gamma)
    rbf, inf_rbf = _fit_logistic(F_tr, ds.y_train, p["rbf_l2"])
    tensors = _digits_tensors(ds, pair)
    Xte, yte = tensors[2], tensors[3]
    cnn = _train_digits_cnn(tensors, pc, l2=p["cnn_l2"], n_classes=len(pair), seed=seed, progress=progress)
    # test images: classified correctly by both models, alternating labels, drawn with the seed
    with torch.no_grad():
        pred_cnn = np.asarray(pair)[cnn.model(Xte).argmax(1).numpy()]
    rbf_pred = rbf.predict(F_te)
    ok = np.flatnonzero((rbf_pred == ds.y_test) & (pred_cnn == ds.y_test))
    order = np.random.default_rng(seed).permutation(ok)
    chosen: List[int] = []
    for r in range(p["n_test_points"]):
        want = pair[r % len(pair)]
        pick = [int(j) for j in order if ds.y_test[j] == want and int(j) not in chosen]
        if pick:
            chosen.append(pick[0])
    tj = np.asarray(chosen, dtype=np.int64)
    cmp = app.compare_models(
        {"RBF model": inf_rbf, "CNN": cnn.influence},
        ds.X_train,
        ds.y_train,
        ds.X_test[tj],
        ds.y_test[tj],
        test_inputs={"RBF model": (F_te[tj], ds.y_test[tj]), "CNN": (Xte[tj], yte[tj])},
        k=p["k"],
        image_shape=(8, 8),
        test_index=tj,
    )
    stats = {
        name: {key: _mean([s[key] for s in cmp.stats[name]]) for key in _STAT_KEYS} for name in cmp.names
    }
    return BehaviourStudy(
        settings=p,
        pair=pair,
        data=ds,
        n_centers=int(centers.shape[0]),
        gamma=float(gamma),
        rbf_accuracy=float(np.mean(rbf_pred == ds.y_test)),
        cnn=cnn,
        test_index=tj,
        comparison=cmp,
        stats=stats,
    )


def render_behaviour(rep: Report, st: BehaviourStudy) -> None:
    p, pair, cnn, stats, ds = st.settings, st.pair, st.cnn, st.stats, st.data
    sec = rep.section("Understanding model behaviour: an RBF model versus a CNN", "behaviour", numbered=True)
    sec.text(
        "The paper's Figure 4 compares an RBF-kernel SVM with Inception on a binary task (dog "
        "versus fish): for the same test image the two models lean on different training images. "
        f"Here the task is digit {pair[0]} versus digit {pair[1]}. The RBF model is a logistic "
        "regression on RBF features exp(-gamma |x - c|^2) centred on every training image (an "
        f"RBF-kernel machine; gamma = {format_value(p['gamma_times_median'])} x the median rule, l2 = "
        f"{format_value(p['rbf_l2'])}); the CNN is a small convolutional network trained here "
        f"({cnn.summary()['architecture']}; {cnn.summary()['n_params']} parameters, l2 = "
        f"{format_value(p['cnn_l2'])}). Data: {ds.description}."
    )
    sec.text(
        "For each test image: the most helpful (most negative up_loss) and most harmful (most "
        "positive) training images under each model, titled with their label and up_loss, and "
        "each model's up_loss of every training image against its pixel-space distance to the "
        "test image (blue: same label as the test image, red: the other label)."
    )
    r_rbf = stats["RBF model"]["helpful_distance_ratio"]
    r_cnn = stats["CNN"]["helpful_distance_ratio"]
    if r_cnn > r_rbf:
        verdict = (
            f"As in the paper, the RBF model relies on training images close to the test image in "
            f"pixel space (its {p['k']} most helpful images lie at {format_value(r_rbf, 2)} of the mean "
            f"distance), while the CNN's helpful images lie further away ({format_value(r_cnn, 2)}): it "
            "generalises from images of the same class that do not look alike pixel by pixel."
        )
    else:
        verdict = (
            f"Unlike the paper, in this run the CNN's most helpful images are not further from the "
            f"test image than the RBF model's ({format_value(r_cnn, 2)} versus {format_value(r_rbf, 2)} of the mean pixel "
            "distance)."
        )
    sec.text(verdict)
    sec.note(
        f"CNN influence is computed over all {cnn.influence.n_params} of its parameters "
        "(no restriction to the top layer was needed): the exact Hessian is built from "
        f"{cnn.influence.n_params} Hessian-vector products over the training set, with damping "
        f"{format_value(cnn.damping)}. The CNN was trained to |grad R| = {format_value(cnn.grad_norm, 2)} (L-BFGS, then "
        "BFGS from the exact Hessian), since influence functions assume a minimum."
    )
    sec.table(
        [
            "model",
            "test accuracy",
            "helpful images' distance / mean distance",
            "helpful with the test label",
            "harmful with the test label",
            "Spearman(|influence|, distance)",
        ],
        [
            ["RBF model", st.rbf_accuracy] + [stats["RBF model"][k] for k in _STAT_KEYS],
            ["CNN", cnn.test_accuracy] + [stats["CNN"][k] for k in _STAT_KEYS],
        ],
        caption=f"Averages over the {st.test_index.size} test images (top {p['k']} helpful / harmful each)",
    )
    for r, j in enumerate(st.test_index):
        sec.figure(
            st.comparison.plot(r),
            f"behaviour_{r + 1}",
            f"Test image #{int(j)} (label {int(ds.y_test[j])}): most helpful and harmful "
            "training images under each model, and influence against pixel distance.",
        )


# ------------------------------------------------------------------------------------------------
# 2. influence versus leave-one-out retraining
# ------------------------------------------------------------------------------------------------
#: Significant digits of the CNN's leave-one-out table (its Pearson R lie close to 1).
CNN_LOO_DIGITS = 6


@dataclasses.dataclass
class LooStudy:
    """Section 2: predicted against actual leave-one-out changes for logistic regression
    (``logistic``) and the 10-class CNN (``cnn_loo``), both
    :class:`~pyinfluence.applications.LOOValidation` with the first-order (``"influence"``:
    -up_loss/n) and the Newton-step (``"newton"``) estimate.

    The CNN's estimates come from ``cnn_influence``: the CNN's TorchInfluence with the damping
    ``cnn_damping`` (the first of ``cnn_settings["loo_dampings"]``, not below ``cnn.damping``, at
    which every removal of the check has a positive definite leave-one-out Hessian + λI;
    ``cnn_damping_rejected``: the smaller ones tried and why each failed). Its actual changes come
    from ``retrainer`` (:class:`~pyinfluence.torch.training.CNNRetrainer`: BFGS from the exact
    leave-one-out Hessian, independent of the library's leave-out code)."""

    settings: Settings  # DEMO_SETTINGS[mode]["loo"]
    cnn_settings: Settings  # DEMO_SETTINGS[mode]["cnn"]
    data: Any  # DigitsSplit (standardised pixels)
    model: Any  # LogisticRegression
    test_index: np.ndarray
    logistic: Any  # LOOValidation
    cnn_data: Any  # DigitsSplit (pixels in [0, 1])
    cnn: TrainedCNN
    cnn_test_index: np.ndarray
    retrainer: CNNRetrainer
    cnn_loo: Any  # LOOValidation
    paper_pearson: float
    cnn_influence: Any = None  # TorchInfluence of the check (damping cnn_damping)
    cnn_damping: float = 0.0
    cnn_damping_rejected: List[Dict[str, Any]] = dataclasses.field(default_factory=list)

    def summary(self) -> Dict[str, Any]:
        cnn: Dict[str, Any] = {m: dict(self.cnn_loo.stats[m]) for m in self.cnn_loo.methods}
        return {
            "logistic": {m: dict(self.logistic.stats[m]) for m in self.logistic.methods},
            "cnn": {**cnn, "paper_pearson": self.paper_pearson, "damping": self.cnn_damping},
        }

    def to_dict(self) -> Dict[str, Any]:
        return {
            "logistic": {
                **self.logistic.to_dict(),
                "data": self.data.description,
                "model": repr(self.model),
                "test_index": self.test_index,
            },
            "cnn": {
                **self.cnn_loo.to_dict(),
                "data": self.cnn_data.description,
                "model": self.cnn.summary(),
                "test_index": self.cnn_test_index,
                "damping": self.cnn_damping,
                "damping_rejected": self.cnn_damping_rejected,
                "retrain": "CNNRetrainer: BFGS from the exact leave-one-out Hessian, L-BFGS where it stalled",
                "retrain_tol": self.retrainer.tol,
                "retrain_max_grad_norm": max(self.retrainer.grad_norms),
                "retrain_iterations_bfgs_lbfgs": self.retrainer.iterations,
            },
        }


def _failed_removal(err: Exception) -> Optional[int]:
    """The training point named by a leave-out NotPositiveDefiniteError (its ``train_index``, or
    "training point N" in its message), or None."""
    idx = getattr(err, "train_index", None)
    if idx is not None:
        return int(idx)
    found = re.search(r"training point (\d+)", str(err))
    return int(found.group(1)) if found else None


def _validate_cnn_loo(
    cnn: TrainedCNN,
    tensors: Tuple[Tensor, Tensor, Tensor, Tensor],
    jc: np.ndarray,
    test_loss: np.ndarray,
    pc: Settings,
    retrainer: CNNRetrainer,
    seed: int,
    progress: bool,
) -> Tuple[Any, Any, float, List[Dict[str, Any]]]:
    """The CNN's leave-one-out check with both estimates: (LOOValidation, its TorchInfluence, the
    damping λ used, the dampings rejected).

    The Newton step solves (∇²R₋ᵢ(θ̂) + λI) Δ = −∇R₋ᵢ(θ̂), which needs that matrix positive
    definite; for a non-convex model removing a high-curvature point can make ∇²R₋ᵢ(θ̂) indefinite
    even where H = ∇²R(θ̂) is not. Rule (one λ for both estimates and the whole check, not chosen
    per point): the first λ of ``pc["loo_dampings"]`` that is not below the CNN's own damping and
    at which no removal of the check raises NotPositiveDefiniteError. The estimates are computed
    before any retraining, so a rejected λ costs the estimates only.
    """
    Xtr, ytr, Xte, yte = tensors
    ladder = [float(d) for d in pc["loo_dampings"] if float(d) >= cnn.damping]
    if not ladder or ladder[0] != cnn.damping:
        ladder.insert(0, float(cnn.damping))
    rejected: List[Dict[str, Any]] = []
    for k, lam in enumerate(ladder):
        if lam == cnn.damping:
            inf = cnn.influence
        else:  # the same model and objective, H + λI with the larger λ
            inf = pyinfluence.TorchInfluence(
                cnn.model,
                torch.nn.CrossEntropyLoss(reduction="none"),
                (Xtr, ytr),
                l2=cnn.l2,
                damping=lam,
                solver="exact",
                progress=progress,
            )
        try:
            loo = app.validate_loo(
                inf,
                Xte[jc],
                yte[jc],
                n_top=pc["loo_n_top"],
                n_random=pc["loo_n_random"],
                seed=seed,
                methods=("influence", "newton"),
                retrain=retrainer,
                test_losses=test_loss[jc],
                chunk=1,
                progress=progress,
                label="CNN",
            )
        except NotPositiveDefiniteError as err:
            if k == len(ladder) - 1:
                raise
            rejected.append({"damping": lam, "train_index": _failed_removal(err), "error": str(err)})
            continue
        return loo, inf, lam, rejected
    raise AssertionError("unreachable: the last damping either returns or raises")  # pragma: no cover


def compute_loo(S: Settings, seed: int, progress: bool = False) -> LooStudy:
    """Section 2 with the settings ``S`` (= DEMO_SETTINGS[mode])."""
    p = S["loo"]
    ds = app.load_digits_split(**p["data"], seed=seed)
    model, inf = _fit_logistic(ds.X_train, ds.y_train, p["l2"])
    j = app.highest_loss_points(model, ds.X_test, ds.y_test, k=p["n_test_points"])
    loo = app.validate_loo(
        inf,
        ds.X_test[j],
        ds.y_test[j],
        n_top=p["n_top"],
        n_random=p["n_random"],
        seed=seed,
        progress=progress,
        label="logistic regression",
    )
    # the CNN (10 classes, pixels in [0, 1]): its highest-loss test point(s), retrained from the
    # trained weights by CNNRetrainer (faster here than TorchInfluence.retrain_loo, which agrees
    # with it, and independent of the leave-out code behind the Newton-step estimate)
    pc = S["cnn"]
    du = app.load_digits_split(scale="unit", seed=seed)
    Xtr, ytr, Xte, yte = tensors = _digits_tensors(du)
    cnn = _train_digits_cnn(tensors, pc, l2=pc["l2"], n_classes=10, seed=seed, progress=progress)
    with torch.no_grad():
        test_loss = cross_entropy(cnn.model(Xte), yte).numpy()
    jc = app.highest_loss_points(test_loss, k=pc["loo_n_test"])
    retrainer = CNNRetrainer(cnn, Xtr, ytr, tol=CNN_LOO_TOL)
    loo_cnn, inf_cnn, lam, rejected = _validate_cnn_loo(
        cnn, tensors, jc, test_loss, pc, retrainer, seed, progress
    )
    return LooStudy(
        settings=p,
        cnn_settings=pc,
        data=ds,
        model=model,
        test_index=j,
        logistic=loo,
        cnn_data=du,
        cnn=cnn,
        cnn_test_index=jc,
        retrainer=retrainer,
        cnn_loo=loo_cnn,
        paper_pearson=app.PAPER_FIG2_PEARSON["cnn"],
        cnn_influence=inf_cnn,
        cnn_damping=lam,
        cnn_damping_rejected=rejected,
    )


def render_loo(rep: Report, st: LooStudy) -> None:
    p, pc, ds, du, cnn = st.settings, st.cnn_settings, st.data, st.cnn_data, st.cnn
    summary = st.summary()
    sec = rep.section("Influence versus leave-one-out retraining", "loo", numbered=True)
    sec.text(
        "The paper's Figure 2: for a test point, remove each of its most influential training "
        "points (and some random ones), retrain, and compare the actual change of the test loss "
        "with the predicted one. Points on the diagonal are predicted exactly; the slope is that "
        "of actual regressed on predicted through the origin (above 1: the estimate "
        "under-predicts). Two estimates are shown for each model: the paper's first-order "
        "-up_loss/n, and one Newton step on the leave-one-out objective "
        "(loo_change(method='newton'): it adds the removed point's own curvature and the loss's "
        "curvature along the step)."
    )
    s = summary["logistic"]
    sec.text(
        f"Logistic regression ({repr(st.model)}, standardised pixels, {ds.y_train.shape[0]} training "
        f"images): the {len(st.test_index)} highest-loss test point(s), each with its {p['n_top']} most "
        f"influential and {p['n_random']} random training points, retrained exactly (Newton refits "
        "to the optimum). Left: the first-order estimate; right: the exact Newton step."
    )
    sec.table(
        ["estimate", "Pearson R", "slope (actual on predicted)", "pairs"],
        [
            [
                "first order, -up_loss/n",
                s["influence"]["pearson"],
                s["influence"]["slope_origin"],
                s["influence"]["n"],
            ],
            ["Newton step", s["newton"]["pearson"], s["newton"]["slope_origin"], s["newton"]["n"]],
        ],
        caption="Logistic regression",
    )
    fig, _, zoomed = plot_with_zoom(lambda axs: st.logistic.plot(ax=axs), len(st.logistic.methods))
    sec.figure(
        fig,
        "loo_logistic",
        "Logistic regression: predicted against actual change of the test loss."
        + (f" {zoomed}" if zoomed else ""),
    )
    c = summary["cnn"]
    r = st.retrainer
    lbfgs_used = sum(1 for _, k_lbfgs in r.iterations if k_lbfgs > 0)
    fallback = f"; L-BFGS took over in {lbfgs_used} refit(s) where BFGS stalled" if lbfgs_used else ""
    sec.text(
        f"CNN ({cnn.summary()['architecture']}; {cnn.summary()['n_params']} parameters, l2 = "
        f"{format_value(cnn.l2)}, trained on all 10 digits: {du.y_train.shape[0]} images, pixels in [0, 1]; "
        f"test accuracy {format_percent(cnn.test_accuracy)}; influence over all parameters, exact Hessian): "
        f"its highest-loss test image, its {pc['loo_n_top']} most influential and "
        f"{pc['loo_n_random']} random training images. Each was removed and the network retrained "
        "from the trained weights, as the paper did, here to a gradient norm of the leave-one-out "
        f"objective of at most {format_value(r.tol)} (largest reached over the {len(r.grad_norms)} refits: "
        f"{format_value(max(r.grad_norms), 2)}) by BFGS started from the exact leave-one-out Hessian at the "
        f"trained weights{fallback}. This retraining (CNNRetrainer) shares no code with the "
        "estimates."
    )
    lam, rejected = st.cnn_damping, st.cnn_damping_rejected
    if rejected:
        why = "; ".join(
            f"at λ = {format_value(d['damping'])} it had negative curvature without training point {d['train_index']}"
            if d["train_index"] is not None
            else f"at λ = {format_value(d['damping'])} it had negative curvature for some removal"
            for d in rejected
        )
        damping_text = (
            f"Both estimates use H + λI with damping λ = {format_value(lam)}: the first value of "
            f"{', '.join(format_value(d) for d in pc['loo_dampings'])} (not below the trained CNN's "
            f"{format_value(cnn.damping)}) at which conjugate gradients on the leave-one-out Hessian + λI meet no "
            f"negative curvature for any removal in the check, as the Newton step needs ({why}: a "
            "non-convex loss can lose positive curvature when a point with large curvature of its "
            "own is removed). The retraining minimises the undamped objective."
        )
    else:
        damping_text = (
            f"Both estimates use H + λI with damping λ = {format_value(lam)} (the trained CNN's): conjugate "
            "gradients on the leave-one-out Hessian + λI met no negative curvature for any removal "
            "in the check, as the Newton step needs (rule: the first damping of "
            f"{', '.join(format_value(d) for d in pc['loo_dampings'])} at which none does)."
        )
    sec.text(damping_text)
    sec.table(
        ["estimate", "Pearson R", "slope (actual on predicted)", "pairs", "paper's Pearson R"],
        [
            [
                "first order, -up_loss/n",
                c["influence"]["pearson"],
                c["influence"]["slope_origin"],
                c["influence"]["n"],
                st.paper_pearson,
            ],
            ["Newton step", c["newton"]["pearson"], c["newton"]["slope_origin"], c["newton"]["n"], None],
        ],
        caption="CNN: influence versus retraining, beside the paper's Figure 2 (first-order estimate)",
        digits=CNN_LOO_DIGITS,
    )
    sec.note(
        "The paper's CNN panel (R = 0.86, first order) is a larger network on MNIST, retrained from "
        "the trained weights by a fixed number of optimiser steps; this CNN is small, strongly "
        f"regularised (l2 = {format_value(cnn.l2)}) and every refit is converged tightly, so a higher R is "
        "expected here."
    )
    fig, _, zoomed = plot_with_zoom(
        lambda axs: st.cnn_loo.plot(axs, paper={"influence": st.paper_pearson}), len(st.cnn_loo.methods)
    )
    sec.figure(
        fig,
        "loo_cnn",
        "CNN: predicted against actual change of the test loss after retraining; left: the "
        "first-order estimate -up_loss/n, right: the Newton step." + (f" {zoomed}" if zoomed else ""),
    )


# ------------------------------------------------------------------------------------------------
# 3. mislabeled examples
# ------------------------------------------------------------------------------------------------
_RANKINGS = (("influence", "self-influence"), ("loss", "training loss"), ("random", "random"))


@dataclasses.dataclass
class MislabelStudy:
    """Section 3: the flip-and-check experiment over seeds (``experiment``:
    :class:`~pyinfluence.applications.MislabelExperiment`) and, for the first seed, the ranking a
    user would look at (``ranking``: :class:`~pyinfluence.applications.MislabelRanking`)."""

    settings: Settings  # DEMO_SETTINGS[mode]["mislabel"]
    data: Any  # DigitsSplit
    seeds: List[int]
    experiment: Any  # MislabelExperiment
    ranking: Any  # MislabelRanking of the first seed's flipped training set
    flipped: np.ndarray  # bool (n_train,): the first seed's flipped labels
    names: np.ndarray  # per training image: its given label ("(true t)" when flipped)

    @property
    def top20_flipped(self) -> int:
        return int(self.flipped[self.ranking.indices].sum())

    def summary(self) -> Dict[str, Any]:
        mis = self.experiment
        return {
            "found_at_10_percent": mis.at(0.1),
            "accuracy_at_10_percent": mis.at(0.1, "accuracy"),
            "n_train": mis.n_train,
            "n_flipped": mis.n_flipped,
            "seeds": self.seeds,
            "top20_flipped_in_example": self.top20_flipped,
        }

    def to_dict(self) -> Dict[str, Any]:
        return {
            **self.experiment.to_dict(),
            "data": self.data.description,
            "example_ranking": {**self.ranking.to_dict(), "flipped": self.flipped[self.ranking.indices]},
        }


def compute_mislabel(S: Settings, seed: int, progress: bool = False) -> MislabelStudy:
    """Section 3 with the settings ``S`` (= DEMO_SETTINGS[mode])."""
    p = S["mislabel"]
    ds = app.load_digits_split(**p["data"], seed=seed)
    seeds = [1000 * seed + s for s in p["seeds"]]
    mis = app.mislabel_experiment(
        *ds.as_tuple(),
        model_factory=lambda: pyinfluence.LogisticRegression(l2=p["l2"]),
        flip_fraction=p["flip_fraction"],
        check_fractions=p["check_fractions"],
        seeds=seeds,
        progress=progress,
    )
    # one flipped training set, ranked: what a user would look at
    y_fl, flipped = app.flip_labels(ds.y_train, p["flip_fraction"], np.random.default_rng(seeds[0]))
    ranking = app.find_mislabeled(_fit_logistic(ds.X_train, y_fl, p["l2"])[1], k=20)
    is_fl = np.zeros(y_fl.shape[0], dtype=bool)
    is_fl[flipped] = True
    names = np.array(
        [f"{y_fl[i]} (true {ds.y_train[i]})" if is_fl[i] else f"{y_fl[i]}" for i in range(len(y_fl))],
        dtype=object,
    )
    return MislabelStudy(
        settings=p, data=ds, seeds=seeds, experiment=mis, ranking=ranking, flipped=is_fl, names=names
    )


def render_mislabel(rep: Report, st: MislabelStudy) -> None:
    p, ds, mis, seeds = st.settings, st.data, st.experiment, st.seeds
    sec = rep.section("Fixing mislabeled examples", "mislabel", numbered=True)
    sec.text(
        f"As in the paper's Section 5.4: flip {format_percent(p['flip_fraction'])} of the training labels "
        "(each to a random other digit), train, and rank the training points three ways: by the "
        "magnitude of their self-influence I_up,loss(z, z), by their training loss, and at random. "
        "Checking the top of a ranking finds the flipped labels; fixing them and retraining "
        "restores test accuracy. Curves are means over the seeds (bands: one standard deviation)."
    )
    sec.note(
        f"Setting: {ds.description}; multinomial logistic regression, l2 = {format_value(p['l2'])}; seeds "
        f"{seeds}. The training set is a {mis.n_train}-image subset on purpose: there the model "
        "has more parameters (650) than training points and partly fits the wrong labels - the "
        "paper's regime, where self-influence finds flips that the training loss misses "
        "(measured with the demo's seed 0, i.e. flip seeds 0-9: 0.78 versus 0.735 of the flips "
        "found at 10% checked). On the full 1437-image training set, loss and self-influence tie "
        "(0.93 versus 0.91, flip seeds 0-2), both far above random."
    )
    at = mis.at(0.1)
    a_inf, a_loss, a_rand = at["influence"], at["loss"], at["random"]
    sec.text(
        f"In this run, at 10% of the training data checked: self-influence found {format_value(a_inf, 3)} of "
        f"the flipped labels, the training loss {format_value(a_loss, 3)}, random checks {format_value(a_rand, 3)}"
        + (
            " - self-influence finds the most."
            if a_inf > max(a_loss, a_rand)
            else " - here self-influence does not beat the training loss."
        )
    )
    sec.table(
        ["fraction checked"] + [format_percent(f) for f in mis.check_fractions],
        [[f"found: {lab}"] + list(mis.mean_std("found")[m]["mean"]) for m, lab in _RANKINGS]
        + [[f"test accuracy: {lab}"] + list(mis.mean_std("accuracy")[m]["mean"]) for m, lab in _RANKINGS],
        caption=(
            f"Fraction of the {mis.n_flipped} flipped labels found, and test accuracy after "
            f"fixing them (clean: {format_value(mis.clean_accuracy, 4)}; flipped, unfixed: "
            f"{format_value(float(np.mean(mis.flipped_accuracy)), 4)})"
        ),
    )
    sec.figure(
        mis.plot(),
        "mislabel",
        "Fraction of flipped labels found and test accuracy after fixing them, against "
        "the fraction of training data checked.",
    )
    sec.figure(
        st.ranking.plot_top(ds.images_train, st.names, n_show=10),
        "mislabel_top",
        f"The 10 most suspicious training images (seed {seeds[0]}), titled with their index, "
        "given label ('true' when it was flipped) and |self-influence|; "
        f"{st.top20_flipped} of the top 20 are flipped.",
    )


# ------------------------------------------------------------------------------------------------
# 4. training-set attacks
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttackStudy:
    """Section 4: one training-set attack per target (``attacks``:
    :class:`~pyinfluence.applications.AttackSummary`)."""

    settings: Settings  # DEMO_SETTINGS[mode]["attack"]
    data: Any  # DigitsSplit
    model: Any  # LogisticRegression
    targets: np.ndarray  # test indices of the targets
    attacks: Any  # AttackSummary

    @property
    def best(self) -> Any:
        """The attack shown in the figure: a flipped one with the largest loss change."""
        return max(self.attacks.attacks, key=lambda a: (a.flipped, a.loss_change))

    def summary(self) -> Dict[str, Any]:
        att, p = self.attacks, self.settings
        return {
            "fraction_flipped": att.fraction_flipped,
            "n_flipped": int(att.flipped.sum()),
            "n_targets": int(len(att.attacks)),
            "epsilon": float(p["epsilon"]),
            "n_poison": int(p["n_poison"]),
            "mean_loss_change": float(np.mean(att.loss_change)),
        }

    def to_dict(self) -> Dict[str, Any]:
        return {**self.attacks.to_dict(), "data": self.data.description, "model": repr(self.model)}


def compute_attack(S: Settings, seed: int, progress: bool = False) -> AttackStudy:
    """Section 4 with the settings ``S`` (= DEMO_SETTINGS[mode])."""
    p = S["attack"]
    ds = app.load_digits_split(**p["data"], seed=seed)
    model, inf = _fit_logistic(ds.X_train, ds.y_train, p["l2"])
    targets = app.pick_targets(inf, ds.X_test, ds.y_test, p["n_targets"])
    att = app.attack_many(
        inf,
        ds.X_test[targets],
        ds.y_test[targets],
        epsilon=p["epsilon"],
        n_poison=p["n_poison"],
        n_steps=p["n_steps"],
        clip=p["clip"],
        image_shape=(8, 8),
        target_index=targets,
        progress=progress,
    )
    return AttackStudy(settings=p, data=ds, model=model, targets=targets, attacks=att)


def render_attack(rep: Report, st: AttackStudy) -> None:
    p, ds, att = st.settings, st.data, st.attacks
    sec = rep.section("Training-set attacks", "attack", numbered=True)
    sec.text(
        "The paper's Section 5.2: perturb a few training images, each pixel by at most epsilon, "
        "so that the retrained model gets a chosen test image (the target) wrong. Each step "
        "moves the training images along the sign of I_pert,loss(z, z_target) - the direction "
        "that raises the target's loss after retraining - and the model is refit after every "
        "step, as in the paper's code."
    )
    sec.note(
        f"Setting: {ds.description}; multinomial logistic regression (l2 = {format_value(p['l2'])}); targets: "
        f"the {len(att.attacks)} least confident correctly classified test images; "
        f"{p['n_poison']} training images perturbed per target (those with the largest "
        f"|I_pert,loss|), epsilon = {format_value(p['epsilon'])} on pixels in [0, 1], {p['n_steps']} steps. "
        "Random, confidently classified targets are much harder to flip for a linear model on 64 "
        "pixels (none flipped at epsilon <= 0.5 in the applications' measurements)."
    )
    sec.table(
        [
            "target (test index)",
            "label",
            "prediction before",
            "prediction after",
            "flipped",
            "loss before",
            "loss after",
            "perturbed training images",
        ],
        [
            [
                int(t),
                a.target_label,
                a.prediction_before,
                a.prediction_after,
                a.flipped,
                a.loss_before,
                a.loss_after,
                ", ".join(str(int(i)) for i in a.train_idx),
            ]
            for t, a in zip(st.targets, att.attacks)
        ],
        caption=f"{st.summary()['n_flipped']} of {len(att.attacks)} targets flipped "
        f"(fraction {format_value(att.fraction_flipped, 3)})",
    )
    sec.figure(
        st.best.plot(),
        "attack_example",
        "One attack: the target test image; per perturbed training image the original, "
        "the perturbation (red: raised, blue: lowered; scale +-epsilon) and the perturbed "
        "image.",
    )
    sec.figure(
        att.plot(),
        "attack_summary",
        "Target loss before and after each attack (red: the prediction flipped).",
    )


# ------------------------------------------------------------------------------------------------
# 5. domain mismatch
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DomainStudy:
    """Section 5: the readmission model's accuracy on children and adults and, when a child is
    classified wrongly, the debugging of the first such prediction (``debug``:
    :class:`~pyinfluence.applications.PredictionDebug`, None when no child is wrong)."""

    settings: Settings  # DEMO_SETTINGS[mode]["domain"]
    data: Any  # DomainMismatchData
    children_accuracy: float
    adults_accuracy: float
    wrong: np.ndarray  # test indices of the wrongly classified children
    debug: Optional[Any]  # PredictionDebug of wrong[0]

    def _base(self) -> Dict[str, Any]:
        return {
            "children_test_accuracy": self.children_accuracy,
            "adults_test_accuracy": self.adults_accuracy,
            "n_wrong_children": int(self.wrong.size),
        }

    def summary(self) -> Dict[str, Any]:
        k = int(self.settings["k"])
        dbg = self.debug
        if dbg is None:
            return {**self._base(), "responsible_feature": None, "group_in_top": None, "k": k}
        return {
            **self._base(),
            "responsible_feature": dbg.responsible_feature,
            "responsible_feature_share": float(np.max(dbg.feature_share)),
            "group_in_top": int(dbg.group_in_top),
            "children_in_training": int(self.data.group_train.sum()),
            "influence_ratio_children_to_rest": float(dbg.ratio),
            "k": k,
        }

    def to_dict(self) -> Dict[str, Any]:
        if self.debug is None:
            return {"data": self.data.to_dict(), **self._base()}
        return {"data": self.data.to_dict(), "debug": self.debug.to_dict(), **self._base()}


def compute_domain(S: Settings, seed: int) -> DomainStudy:
    """Section 5 with the settings ``S`` (= DEMO_SETTINGS[mode])."""
    p = S["domain"]
    dm = app.make_readmission_data(**p["data"], seed=seed)
    model, inf = _fit_logistic(dm.X_train, dm.y_train, p["l2"])
    pred = model.predict(dm.X_test)
    wrong = np.flatnonzero(dm.group_test & (pred != dm.y_test))
    dbg = None
    if wrong.size:
        dbg = app.debug_prediction(
            inf,
            dm.X_test[wrong[0]],
            dm.y_test[wrong[0]],
            feature_names=dm.feature_names,
            k=p["k"],
            group=dm.group_train,
        )
    return DomainStudy(
        settings=p,
        data=dm,
        children_accuracy=float((pred == dm.y_test)[dm.group_test].mean()),
        adults_accuracy=float((pred == dm.y_test)[~dm.group_test].mean()),
        wrong=wrong,
        debug=dbg,
    )


def render_domain(rep: Report, st: DomainStudy) -> None:
    p, dm, dbg = st.settings, st.data, st.debug
    sec = rep.section("Debugging a domain mismatch", "domain", numbered=True)
    sec.text(
        "The paper's Section 5.3: a hospital-readmission model trained on data in which children "
        "are nearly absent predicts readmission for healthy children. Influence shows which few "
        "training points drive such a wrong prediction, and splitting each point's influence over "
        "the features (exact for linear models: the gradient is r x [x, 1]) shows which feature "
        "makes them influential."
    )
    sec.note(f"Data (generated, documented in make_readmission_data): {dm.description}")
    if dbg is None:
        sec.text("No child in the test set was classified wrongly with this seed; nothing to debug.")
        return
    sec.table(
        ["quantity", "value"],
        [
            ["test accuracy, children", st.children_accuracy],
            ["test accuracy, adults", st.adults_accuracy],
            ["children in the training set", int(dm.group_train.sum())],
            [f"children among the top {p['k']} training points", int(dbg.group_in_top)],
            ["mean |influence| of children / of the rest", float(dbg.ratio)],
            ["responsible feature", dbg.responsible_feature],
            ["its share of the top points' influence", float(np.max(dbg.feature_share))],
        ],
        caption=f"A healthy child (test #{int(st.wrong[0])}, label {dbg.label}) predicted {dbg.prediction}",
    )
    sec.figure(
        dbg.plot(),
        "domain",
        "Influence of every training point on the wrong prediction (children in red, the "
        "top points circled), per-feature contributions of the top points, and each "
        "feature's share.",
    )


# ------------------------------------------------------------------------------------------------
# about this run
# ------------------------------------------------------------------------------------------------
_IGNORED_WARNINGS = (
    DeprecationWarning,
    PendingDeprecationWarning,
    FutureWarning,
    ImportWarning,
    ResourceWarning,
)


def _warning_lines(caught: Sequence[warnings.WarningMessage]) -> List[str]:
    """Distinct warnings worth reporting (library deprecation notices left out)."""
    return sorted(
        {
            f"{w.category.__name__}: {w.message}"
            for w in caught
            if not issubclass(w.category, _IGNORED_WARNINGS)
        }
    )


@dataclasses.dataclass
class RunInfo:
    """The closing section: settings, versions, wall time per step and the warnings raised."""

    mode: str
    seed: int
    threads: Optional[int]
    times: Dict[str, float]
    warnings: List[str]

    def settings_rows(self) -> List[List[Any]]:
        return [
            ["mode", self.mode],
            ["seed", self.seed],
            ["threads", "unchanged" if self.threads is None else self.threads],
            ["pyinfluence", pyinfluence.__version__],
            ["torch", torch.__version__],
            ["numpy", np.__version__],
            ["Python", platform.python_version()],
            ["machine", f"{platform.machine()}, {platform.system()}"],
        ]


def render_about(rep: Report, info: RunInfo) -> None:
    sec = rep.section("About this run", "about")
    sec.table(["setting", "value"], info.settings_rows())
    sec.table(["step", "seconds"], [[k, v] for k, v in info.times.items()], caption="Wall time")
    if info.warnings:
        sec.text("Warnings raised during the run:")
        sec.table(["warning"], [[m] for m in info.warnings])


# ================================================================================================
# the demo
# ================================================================================================
@dataclasses.dataclass
class DemoOutput:
    """What :func:`run_demo` produced: the report's path, its folder, the figure files and the
    results (the content of ``results.json``)."""

    report_path: pathlib.Path
    out_dir: pathlib.Path
    figures: List[str]
    results: Dict[str, Any]

    @property
    def summary(self) -> Dict[str, Any]:
        return self.results["summary"]


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ImportError(
            f"{what} needs the {module!r} package; install it with: pip install "
            f"'pyinfluence[demo]' (or pip install {module})"
        )


class _Timer:
    """Numbered step lines ("[k/total] title ...") and the wall time of each step."""

    def __init__(self, log: Callable[[str], None], total: int) -> None:
        self.log, self.total = log, total
        self.times: Dict[str, float] = {}
        self.k = 0

    @contextlib.contextmanager
    def step(self, key: str, title: str) -> Iterator[Dict[str, str]]:
        self.k += 1
        self.log(f"[{self.k}/{self.total}] {title} ...")
        t0 = time.perf_counter()
        info: Dict[str, str] = {"line": ""}
        yield info
        dt = time.perf_counter() - t0
        self.times[key] = dt
        self.log(f"      {info['line']}  ({dt:.1f} s)" if info["line"] else f"      ({dt:.1f} s)")


def _behaviour_line(s: Dict[str, Any]) -> str:
    return "helpful images' distance / mean distance: " + ", ".join(
        f"{k} {v['helpful_distance_ratio']:.2f}" for k, v in s.items()
    )


def _loo_line(s: Dict[str, Any]) -> str:
    return (
        f"logistic: Newton-step R = {s['logistic']['newton']['pearson']:.4f}, first-order "
        f"R = {s['logistic']['influence']['pearson']:.4f}; CNN: Newton-step R = "
        f"{s['cnn']['newton']['pearson']:.5f}, first-order R = "
        f"{s['cnn']['influence']['pearson']:.5f} (paper 0.86)"
    )


def _mislabel_line(s: Dict[str, Any]) -> str:
    at = s["found_at_10_percent"]
    return "flips found at 10% checked: " + ", ".join(f"{k} {v:.3f}" for k, v in at.items())


def _attack_line(s: Dict[str, Any]) -> str:
    return f"{s['n_flipped']}/{s['n_targets']} targets flipped"


def _domain_line(s: Dict[str, Any]) -> str:
    return (
        f"responsible feature {s['responsible_feature']!r}; {s['group_in_top']} of the "
        f"top {s['k']} training points are children"
    )


#: The sections in report order: (key, step title, compute(S, seed, progress), render, step line).
_SECTIONS: Tuple[
    Tuple[str, str, Callable[..., Any], Callable[[Report, Any], None], Callable[..., str]], ...
] = (
    (
        "behaviour",
        "model behaviour: RBF-feature model versus a CNN",
        compute_behaviour,
        render_behaviour,
        _behaviour_line,
    ),
    ("loo", "influence versus leave-one-out retraining", compute_loo, render_loo, _loo_line),
    ("mislabel", "fixing mislabeled examples", compute_mislabel, render_mislabel, _mislabel_line),
    ("attack", "training-set attacks", compute_attack, render_attack, _attack_line),
    (
        "domain",
        "debugging a domain mismatch",
        lambda S, seed, progress: compute_domain(S, seed),
        render_domain,
        _domain_line,
    ),
)


def run_demo(
    out: Union[str, pathlib.Path] = "pyinfluence-report",
    *,
    quick: bool = False,
    seed: int = 0,
    threads: Optional[int] = 1,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = print,
) -> DemoOutput:
    """Run the five applications on digits and write the report folder ``out``.

    ``quick``: the smaller :data:`DEMO_SETTINGS` (20–30 s on 2 cores) instead of the default
    (about 70 s). ``seed``: the train/test split, the CNN's initial weights, the RBF centres, the
    test images shown, the random training points of the LOO check and the label flips (the
    measured claims in the report — e.g. self-influence beating the training loss — are for seed 0;
    other seeds give other, honestly reported, numbers). ``threads``: threads for pyinfluence's
    core, torch and numpy during the demo (restored afterwards; None leaves them alone).
    ``progress``: tqdm bars on long steps (stderr). ``log``: called with one line per step
    (default ``print``; None for silence).

    Returns :class:`DemoOutput`; ``results.json`` holds ``summary`` (the headline numbers),
    ``settings`` and each section's full results.
    """
    _require("sklearn", "the demo (scikit-learn's bundled digits)")
    _require("matplotlib", "the demo's figures")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    seed = int(seed)
    if progress:
        import importlib.util

        progress = importlib.util.find_spec("tqdm") is not None  # bars only when tqdm is there
    mode = "quick" if quick else "default"
    S = DEMO_SETTINGS[mode]
    say: Callable[[str], None] = log if log is not None else (lambda s: None)
    out_dir = pathlib.Path(out)
    t_start = time.perf_counter()
    with limited_threads(threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = Report(
            out_dir,
            "pyinfluence demo: influence functions on handwritten digits",
            intro=(
                "Which training points made the model say this? The five applications of Koh & "
                "Liang, 'Understanding Black-box Predictions via Influence Functions' (ICML 2017, "
                "Section 5), run on scikit-learn's bundled 8x8 digits (1797 images, nothing "
                "downloaded) with exact linear models (pyinfluence's C++ path) and a small CNN "
                "trained here (the torch path). Signs follow the paper: up_loss = "
                "I_up,loss(z, z_test) is negative for a helpful training point (upweighting it "
                "lowers the test loss) and positive for a harmful one; removing a point changes "
                "the test loss by about -up_loss/n."
            ),
        )
        results: Dict[str, Any] = {
            "pyinfluence_version": pyinfluence.__version__,
            "mode": mode,
            "seed": seed,
            "settings": {k: v for k, v in S.items()},
        }
        summary: Dict[str, Any] = {}
        timer = _Timer(say, len(_SECTIONS))
        for key, title, compute, render, line in _SECTIONS:
            with timer.step(key, title) as info:
                study = compute(S, seed, progress)
                summary[key], results[key] = study.summary(), study.to_dict()
                render(rep, study)
                info["line"] = line(summary[key])
        times = dict(timer.times)
        times["total"] = time.perf_counter() - t_start
        about = RunInfo(mode, seed, threads, times, _warning_lines(caught))
        render_about(rep, about)
        results["summary"] = summary
        results["times_s"] = times
        results["warnings"] = about.warnings
        results["figures"] = rep.figures
        path = rep.write(results)
    say(f"report: {path.resolve()}")
    return DemoOutput(path, out_dir, rep.figures, results)
