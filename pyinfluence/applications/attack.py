"""Training-set attacks (Koh & Liang 2017, Section 5.2).

Perturb one (or a few) training inputs, within a small L∞ ball, so that the model retrained on the
perturbed training set gets a chosen test point (the *target*) wrong. The paper's update is an
iterated signed gradient step on the target's test loss as a function of the training input:

    x̃ ← Π( x̃ + α · sign(I_pert,loss(z̃, z_target)) )

with I_pert,loss(z, z_test) = −∇θL(z_test)ᵀ(H+λI)⁻¹∇x∇θL(z): moving the training input x by δ
changes the retrained test loss by ≈ (1/n)·I_pert,loss·δ, so stepping along its sign INCREASES
the target's loss. Π projects onto the L∞ ball of radius ε around the original input and onto the
optional ``clip`` range (valid pixel values).

Re-fitting between steps (``refit_each_step=True``, the default) is what the paper's code does:
after every step the model is retrained on the perturbed training set and I_pert,loss is
recomputed at the new optimum θ̂(x̃) with the new Hessian, at the current x̃ — so each step follows
the gradient of the *retrained* loss at the current point. For the linear path a refit is an exact
Newton fit warm-started at the previous θ̂ (a few Hessian assemblies). With
``refit_each_step=False`` θ̂, H and the gradient stay those of the original model (one
linearisation: the sign never changes, so the iterates walk to the corner x + ε·sign(I_pert,loss)
of the box — the fast-gradient-sign variant); the model is then retrained once at the end
(``retrain=True``) to measure what actually happened.

Measured on digits (pixels in [0, 1], ``clip=(0, 1)``; multinomial logistic regression, l2 = 1e-3,
n = 1437; targets: the 10 least confident correctly classified test images (:func:`pick_targets`);
10 steps, default step size, perturbed points chosen by ``select="pert"``), fraction of targets
flipped:

=========================  =======  ========  =======
perturbed training images  ε = 0.1  ε = 0.25  ε = 0.5
=========================  =======  ========  =======
3, refit every step        0.3      0.9       1.0
3, no refit between steps  0.3      0.7       0.9
1, refit every step        0.0      0.1       0.5
1, no refit between steps  0.0      0.0       0.0
=========================  =======  ========  =======

Ten *random* correctly classified targets: none flipped at ε ≤ 0.5 (their loss rose by 0.01–0.2):
a linear model on 64 pixels trained on 1437 images is hard to steer with one or three images,
unlike the paper's model on 2048-dimensional Inception features. Refitting costs 1–2 s per target
on one core (n = 1437, p = 650); without refits 0.15–0.25 s.

The settings of an attack are an :class:`AttackSettings` (or its fields as keyword arguments of
:func:`training_set_attack` and :func:`attack_many`); the attack works through the influence interface
(:class:`~pyinfluence.interface.Influence`: ``pert_loss``, ``up_loss``, ``training_data``, ``refit``,
``loss``, ``predict``), with callables for what a path cannot do (a torch model's refit).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._validation import check_float, check_int, check_rng_seed, to_numpy
from pyinfluence.applications.plotting import axes_for, new_figure, show_image
from pyinfluence.applications.progress import progress_iter
from pyinfluence.applications.results import Result
from pyinfluence.interface import Influence

__all__ = [
    "AttackResult",
    "AttackSettings",
    "AttackSummary",
    "attack_many",
    "pick_targets",
    "training_set_attack",
]

#: refit(X_train_perturbed (n, ...), previous_influence) -> influence object of the retrained model
RefitFn = Callable[[np.ndarray, Any], Any]
#: evaluate(influence, X (m, ...), y (m,)) -> (losses (m,), predictions (m,))
EvaluateFn = Callable[[Any, Any, Any], Tuple[Any, Any]]

_SELECT = ("pert", "helpful")


@dataclass(frozen=True)
class AttackSettings:
    """How to attack: the same for every target (validated here; messages name the field).

    - ``epsilon`` > 0: L∞ budget in input units (for pixels in [0, 1], 0.25 is a quarter of the
      range). ``step_size`` α > 0 (None: 2.5·epsilon/n_steps, see :attr:`step`); ``n_steps`` ≥ 1
      signed steps; ``clip=(lo, hi)``: valid input range (scalars or arrays broadcastable to one
      input; stored as float64 arrays).
    - ``n_poison`` ≥ 1 training points to perturb, chosen by ``select`` (unless the attack is given
      ``train_idx``): ``"pert"`` (default; largest ‖I_pert,loss(z, z_target)‖₁ = the largest predicted
      loss increase per unit of a signed step, the rule of the paper's code) or ``"helpful"`` (most
      negative up_loss: the points that most support the current prediction).
    - ``refit_each_step`` (default True, the paper's code): retrain and recompute I_pert,loss at the
      new optimum and the current x̃ after every step; False: keep the original model's gradient
      (see the module docstring). ``retrain``: retrain once at the end when steps did not refit
      (False: report only the first-order ``predicted_loss_change``). ``stop_on_flip``: stop as soon
      as a refit flips the prediction.
    - ``image_shape``: the shape of one input as an image, for :meth:`AttackResult.plot`.
    """

    epsilon: float
    n_poison: int = 1
    select: str = "pert"
    step_size: Optional[float] = None
    n_steps: int = 10
    clip: Optional[Tuple[Any, Any]] = None
    refit_each_step: bool = True
    retrain: bool = True
    stop_on_flip: bool = False
    image_shape: Optional[Tuple[int, ...]] = None

    def __post_init__(self) -> None:
        fix = functools.partial(object.__setattr__, self)  # frozen: normalise the fields once, here
        fix("epsilon", check_float("epsilon", self.epsilon, low=0.0, low_open=True))
        fix("n_steps", check_int("n_steps", self.n_steps, 1))
        if self.step_size is not None:
            fix("step_size", check_float("step_size", self.step_size, low=0.0, low_open=True))
        if self.select not in _SELECT:
            raise ValueError(f"select must be 'pert' or 'helpful', got {self.select!r}")
        fix("n_poison", check_int("n_poison", self.n_poison, 1))
        if self.clip is not None:
            try:
                c_lo, c_hi = self.clip
            except (TypeError, ValueError):
                raise ValueError(f"clip must be a pair (lo, hi), got {self.clip!r}") from None
            fix("clip", (to_numpy(c_lo, np.float64), to_numpy(c_hi, np.float64)))
        for name in ("refit_each_step", "retrain", "stop_on_flip"):
            fix(name, bool(getattr(self, name)))
        if self.image_shape is not None:
            fix("image_shape", tuple(int(s) for s in self.image_shape))

    @property
    def step(self) -> float:
        """α, the size of one signed step: ``step_size``, or 2.5·epsilon/n_steps when it is None."""
        return 2.5 * self.epsilon / self.n_steps if self.step_size is None else float(self.step_size)

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The names of the settings (the keyword options the attack functions accept for them)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def resolve(cls, settings: Optional[AttackSettings], options: Dict[str, Any]) -> AttackSettings:
        """``settings`` with the keyword ``options`` (field names) applied on top; without ``settings``,
        the options alone (``epsilon`` required)."""
        unknown = sorted(set(options) - set(cls.field_names()))
        if unknown:
            raise TypeError(
                f"unexpected keyword argument(s) {unknown}; the attack settings are {list(cls.field_names())}"
            )
        if settings is None:
            if "epsilon" not in options:
                raise TypeError(
                    "epsilon is required (the L∞ budget): pass epsilon=... or settings=AttackSettings(epsilon=...)"
                )
            return cls(**options)
        if not isinstance(settings, cls):
            raise TypeError(f"settings must be an AttackSettings, got {type(settings).__name__}")
        return dataclasses.replace(settings, **options) if options else settings

    def as_dict(self) -> Dict[str, Any]:
        """The settings as a dict (``step_size`` resolved), e.g. for ``AttackSummary.settings``."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["step_size"] = self.step
        return d


@dataclass
class AttackResult(Result):
    """Outcome of one training-set attack on one target test point.

    - ``train_idx`` (k,): the perturbed training points; ``x_original``, ``x_perturbed``,
      ``perturbation`` = x̃ − x (k, ...) in input units; ``linf`` = max|perturbation| (≤ epsilon);
    - ``target_label``, ``prediction_before``, ``prediction_after``, ``flipped`` (prediction after
      retraining ≠ target label, and it was right before);
    - ``loss_before``, ``loss_after``, ``loss_change``: the target's test loss on the original and
      on the retrained model; ``predicted_loss_change``: the first-order prediction
      (1/n)·Σᵢ I_pert,loss(zᵢ, z_target)·δᵢ from the ORIGINAL model;
    - ``loss_history`` (steps,): target loss after each refit (``refit_each_step=True``);
    - ``eval_flipped``: indices into ``X_eval`` whose prediction changed (if ``X_eval`` given);
    - the settings: ``epsilon``, ``step_size``, ``n_steps``, ``steps_run``, ``clip``,
      ``refit_each_step``, ``select``; ``image_shape`` for plotting; ``time_s``.
    """

    train_idx: NDArray[np.int64]
    target_label: Any
    prediction_before: Any
    prediction_after: Any
    flipped: bool
    loss_before: float
    loss_after: float
    loss_change: float
    predicted_loss_change: float
    x_original: np.ndarray
    x_perturbed: np.ndarray
    perturbation: np.ndarray
    linf: float
    epsilon: float
    step_size: float
    n_steps: int
    steps_run: int
    loss_history: NDArray[np.float64]
    refit_each_step: bool
    select: str
    clip: Optional[Tuple[Any, Any]] = None
    image_shape: Optional[Tuple[int, ...]] = None
    eval_flipped: Optional[NDArray[np.int64]] = None
    x_target: Optional[np.ndarray] = None
    time_s: float = 0.0

    _skip_in_dict = ("x_target",)

    def plot(self, ax: Any = None, *, max_points: int = 3) -> Any:
        """Per perturbed training point: original, perturbation (scaled to ±epsilon, red = raised)
        and perturbed input — images when ``image_shape`` is set (original, perturbed and target
        on one grey scale: the clip range, else their joint range), else bars per feature; the
        target image on the left. ``ax``: None or a Figure. Returns the Figure."""
        k = min(int(self.train_idx.size), check_int("max_points", max_points, 1))
        img = self.image_shape is not None
        ncol = 4 if img else 1
        if ax is None:
            fig = new_figure((2.1 * ncol + (0 if img else 4.0), 2.2 * k + 0.5))
        elif hasattr(ax, "savefig"):
            fig = ax
        else:
            raise TypeError("ax must be None or a matplotlib Figure for this plot")
        axs = fig.subplots(k, ncol, squeeze=False)
        status = "FLIPPED" if self.flipped else "not flipped"
        fig.suptitle(
            f"target (label {self.target_label}): prediction {self.prediction_before} -> "
            f"{self.prediction_after} ({status})\n"
            f"loss {self.loss_before:.3g} -> {self.loss_after:.3g}; "
            f"||delta||_inf = {self.linf:.3g} <= {self.epsilon:g}",
            fontsize=9,
        )
        # one grey scale for every image: the clip range, else the joint range of the inputs
        if self.clip is not None:
            lo, hi = float(np.min(self.clip[0])), float(np.max(self.clip[1]))
        else:
            both = np.concatenate([np.ravel(self.x_original), np.ravel(self.x_perturbed)])
            lo, hi = float(both.min()), float(both.max())
        grey: Dict[str, Any] = {"vmin": lo, "vmax": hi if hi > lo else lo + 1.0}
        for r in range(k):
            i = int(self.train_idx[r])
            if img:
                if self.x_target is not None and r == 0:
                    show_image(
                        axs[r, 0],
                        self.x_target,
                        self.image_shape,
                        title="target test image",
                        **grey,
                    )
                else:
                    axs[r, 0].set_visible(False)
                show_image(
                    axs[r, 1],
                    self.x_original[r],
                    self.image_shape,
                    title=f"train #{i} original",
                    **grey,
                )
                e = max(self.epsilon, 1e-12)
                show_image(
                    axs[r, 2],
                    self.perturbation[r],
                    self.image_shape,
                    title="perturbation",
                    cmap="RdBu_r",
                    vmin=-e,
                    vmax=e,
                )
                show_image(axs[r, 3], self.x_perturbed[r], self.image_shape, title="perturbed", **grey)
            else:
                a = axs[r, 0]
                dlt = np.ravel(self.perturbation[r])
                a.bar(np.arange(dlt.size), dlt, color=np.where(dlt >= 0, "C3", "C0"))
                a.axhline(0, color="k", lw=0.6)
                a.set_ylim(-1.05 * self.epsilon, 1.05 * self.epsilon)
                a.set_xlabel("feature")
                a.set_ylabel("perturbation")
                a.set_title(f"train #{i}", fontsize=9)
        return fig


@dataclass
class AttackSummary(Result):
    """Training-set attacks on several targets.

    ``attacks``: one :class:`AttackResult` per target (``to_dict`` keeps their numbers without the
    input arrays); ``flipped`` (m,) bool; ``fraction_flipped``; ``loss_change`` (m,);
    ``target_index`` (m,): positions in the ``X_targets`` given; ``time_s``.
    """

    attacks: List[AttackResult]
    target_index: NDArray[np.int64]
    flipped: NDArray[np.bool_]
    fraction_flipped: float
    loss_change: NDArray[np.float64]
    predicted_loss_change: NDArray[np.float64]
    epsilon: float
    settings: Dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        keep = (
            "train_idx",
            "target_label",
            "prediction_before",
            "prediction_after",
            "flipped",
            "loss_before",
            "loss_after",
            "loss_change",
            "predicted_loss_change",
            "linf",
            "steps_run",
        )
        d["attacks"] = [{k: v for k, v in a.to_dict().items() if k in keep} for a in self.attacks]
        return d

    def plot(self, ax: Any = None) -> Any:
        """Target loss before and after the attack per target (flipped targets in red).
        ``ax``: None, a Figure or an Axes. Returns the Figure."""
        fig, (a,) = axes_for(ax, 1, panel_size=(max(4.0, 0.45 * len(self.attacks) + 2.0), 3.4))
        x = np.arange(len(self.attacks))
        before = np.array([t.loss_before for t in self.attacks])
        after = np.array([t.loss_after for t in self.attacks])
        a.bar(x - 0.2, before, 0.4, color="0.6", label="before")
        a.bar(
            x + 0.2,
            after,
            0.4,
            color=np.where(self.flipped, "C3", "C0"),
            label="after (red: flipped)",
        )
        a.set_xticks(x)
        a.set_xticklabels([str(int(i)) for i in self.target_index], fontsize=7)
        a.set_xlabel("target")
        a.set_ylabel("target test loss")
        a.set_title(
            f"{int(self.flipped.sum())}/{len(self.attacks)} targets flipped (epsilon = {self.epsilon:g})",
            fontsize=10,
        )
        a.legend(fontsize=8)
        return fig


# ------------------------------------------------------------------------------------------------
# the computation: backend (training inputs, refit, evaluate), target, points, box, steps, result
# ------------------------------------------------------------------------------------------------
@dataclass
class _Backend:
    """What an attack needs besides influence values: the training inputs X0 (n, ...) float64, and how
    to refit on perturbed inputs and to evaluate an influence object's model."""

    X0: np.ndarray
    refit: RefitFn
    evaluate: EvaluateFn


def _evaluate_with_interface(obj: Influence, X: Any, y: Any) -> Tuple[Any, Any]:
    return obj.loss(X, y), obj.predict(X)


def _refit_with_interface(X_new: np.ndarray, previous: Influence) -> Influence:
    return previous.refit(X_new)


def _resolve_backend(
    inf: Any, X_train: Any, refit: Optional[RefitFn], evaluate: Optional[EvaluateFn]
) -> _Backend:
    if not isinstance(inf, Influence):  # a duck-typed influence object: everything comes from the caller
        if X_train is None or refit is None or evaluate is None:
            raise ValueError(
                f"for a {type(inf).__name__} (not a pyinfluence Influence) pass X_train (the training "
                f"inputs), refit=callable(X_train_perturbed, previous_influence) -> influence of the "
                f"retrained model, and evaluate=callable(influence, X, y) -> (losses, predictions)"
            )
        return _Backend(to_numpy(X_train, np.float64).copy(), refit, evaluate)
    if refit is None and not inf.can_retrain:
        raise ValueError(
            f"a {type(inf).__name__} cannot refit its model (can_retrain is False): pass "
            f"refit=callable(X_train_perturbed, previous_influence) -> influence of the retrained model"
        )
    X0 = inf.training_data()[0] if X_train is None else X_train
    return _Backend(
        to_numpy(X0, np.float64).copy(),
        _refit_with_interface if refit is None else refit,
        _evaluate_with_interface if evaluate is None else evaluate,
    )


def _one(x: Any, y: Any) -> Tuple[np.ndarray, np.ndarray]:
    xa = to_numpy(x, np.float64)
    ya = to_numpy(y)
    if ya.ndim == 0:
        ya = ya.reshape(1)
        xa = xa[None]
    if ya.shape[0] != 1 or xa.shape[0] != 1:
        raise ValueError(
            f"x_target must be one test point (its input, or a batch of one) with one label; got "
            f"x_target shape {xa.shape} and y_target shape {ya.shape}"
        )
    return xa, ya


def _select(inf: Any, xt: np.ndarray, yt: np.ndarray, k: int, select: str) -> NDArray[np.int64]:
    n = int(inf.n_train)
    if select == "pert":
        P = to_numpy(inf.pert_loss(xt, yt), np.float64).reshape(n, -1)
        score = np.abs(P).sum(axis=1)
        return np.argsort(-score, kind="stable")[:k].astype(np.int64)
    up = to_numpy(inf.up_loss(xt, yt), np.float64).reshape(n, -1)[:, 0]
    return np.argsort(up, kind="stable")[:k].astype(np.int64)


def _points_to_perturb(
    inf: Any, xt: np.ndarray, yt: np.ndarray, train_idx: Any, settings: AttackSettings, n: int
) -> Tuple[NDArray[np.int64], str]:
    """(indices of the training points to perturb, how they were chosen: the select rule or "given")."""
    if train_idx is None:
        n_poison = check_int("n_poison", settings.n_poison, 1, n)
        return _select(inf, xt, yt, n_poison, settings.select), settings.select
    idx = np.atleast_1d(to_numpy(train_idx))
    if idx.dtype.kind not in "iu" or idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"train_idx must be an int or a 1-D array of ints, got {train_idx!r}")
    if np.any(idx < 0) or np.any(idx >= n):
        raise ValueError(f"train_idx must be in [0, {n - 1}], got {idx.tolist()}")
    if np.unique(idx).size != idx.size:
        raise ValueError(f"train_idx contains duplicates: {idx.tolist()}")
    return idx.astype(np.int64), "given"


def _box(x_orig: np.ndarray, settings: AttackSettings) -> Tuple[np.ndarray, np.ndarray]:
    """(lo, hi): the L∞ ball of radius epsilon around the original inputs, within the clip range."""
    eps = settings.epsilon
    lo, hi = x_orig - eps, x_orig + eps
    if settings.clip is not None:
        c_lo = np.broadcast_to(settings.clip[0], x_orig.shape[1:])
        c_hi = np.broadcast_to(settings.clip[1], x_orig.shape[1:])
        if np.any(c_lo > c_hi):
            raise ValueError("clip: lo must be <= hi")
        if np.any(x_orig < c_lo - 1e-12) or np.any(x_orig > c_hi + 1e-12):
            raise ValueError("clip: the original training inputs lie outside the clip range")
        lo, hi = np.maximum(lo, c_lo), np.minimum(hi, c_hi)
    return lo, hi


@dataclass
class _Outcome:
    """The target's loss and prediction under one model."""

    loss: float
    prediction: Any


def _outcome(evaluate: EvaluateFn, obj: Any, xt: np.ndarray, yt: np.ndarray) -> _Outcome:
    loss, pred = evaluate(obj, xt, yt)
    return _Outcome(float(to_numpy(loss, np.float64).ravel()[0]), to_numpy(pred).ravel()[0])


@dataclass
class _Steps:
    """Where the signed steps ended: the perturbed inputs, the influence object of the last refit
    (``refitted``) or the original one, the target loss after each refit, and the steps taken."""

    x: np.ndarray
    influence: Any
    history: List[float]
    steps_run: int
    refitted: bool


def _signed_steps(
    inf: Any,
    backend: _Backend,
    xt: np.ndarray,
    yt: np.ndarray,
    idx: NDArray[np.int64],
    box: Tuple[np.ndarray, np.ndarray],
    P0: np.ndarray,
    settings: AttackSettings,
) -> _Steps:
    """x̃ ← Π(x̃ + α·sign(I_pert,loss)) ``n_steps`` times (refitting after each with ``refit_each_step``),
    then the final refit when steps did not refit and ``retrain`` is set."""
    X_cur = backend.X0.copy()
    cur = inf
    x_t = backend.X0[idx].copy()
    history: List[float] = []
    g = P0
    steps_run = 0
    refitted = False
    for step in range(settings.n_steps):
        if settings.refit_each_step and step > 0:
            g = to_numpy(cur.pert_loss(xt, yt, idx), np.float64)[:, 0]
        x_t = np.clip(x_t + settings.step * np.sign(g), *box)
        X_cur[idx] = x_t
        steps_run = step + 1
        if settings.refit_each_step:
            cur = backend.refit(X_cur, cur)
            refitted = True
            now = _outcome(backend.evaluate, cur, xt, yt)
            history.append(now.loss)
            if settings.stop_on_flip and now.prediction != yt[0]:
                break
    if not refitted and settings.retrain:
        cur = backend.refit(X_cur, inf)
        refitted = True
    return _Steps(x_t, cur, history, steps_run, refitted)


def _item(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def training_set_attack(
    inf: Influence,
    x_target: ArrayLike,
    y_target: Any,
    settings: Optional[AttackSettings] = None,
    *,
    train_idx: Any = None,
    X_eval: Optional[ArrayLike] = None,
    y_eval: Optional[ArrayLike] = None,
    X_train: Optional[ArrayLike] = None,
    refit: Optional[RefitFn] = None,
    evaluate: Optional[EvaluateFn] = None,
    **options: Any,
) -> AttackResult:
    """Perturb training inputs within an L∞ ball so that the retrained model's loss on the target
    test point rises — and, if enough, its prediction flips (Koh & Liang §5.2).

    - ``x_target``, ``y_target``: the target test point (input and true label).
    - ``settings``: an :class:`AttackSettings`, and/or its fields as keyword ``options``
      (``epsilon=0.25, n_steps=10, ...``; options override the fields of ``settings``): the budget
      ``epsilon``, ``step_size``, ``n_steps``, ``clip``, ``n_poison``, ``select``,
      ``refit_each_step``, ``retrain``, ``stop_on_flip``, ``image_shape`` (see :class:`AttackSettings`).
    - ``train_idx``: the training point(s) to perturb; default: the ``n_poison`` points chosen by
      ``select``.
    - ``X_eval``, ``y_eval``: other test points whose predictions are compared before and after.
    - ``inf``: an :class:`~pyinfluence.interface.Influence`. The training inputs come from
      ``inf.training_data()``, the test loss and prediction from ``inf.loss`` and ``inf.predict``,
      and refits from ``inf.refit`` (LinearInfluence: exact, warm-started, same damping). Where the
      path cannot refit (TorchInfluence: ``can_retrain`` is False) pass
      ``refit(X_train_perturbed, previous_influence) -> influence of the retrained model``;
      ``evaluate(influence, X, y) -> (losses, predictions)`` and ``X_train`` (the training inputs)
      may replace the defaults (pass ``evaluate`` for a torch model with one output, e.g. a binary
      classifier on logits, whose ``predict`` returns the outputs rather than labels). Any other object with ``n_train``, ``pert_loss`` and ``up_loss``
      works when all three are given.

    Returns :class:`AttackResult`.
    """
    t_start = time.perf_counter()
    settings = AttackSettings.resolve(settings, options)
    backend = _resolve_backend(inf, X_train, refit, evaluate)
    n = backend.X0.shape[0]
    if int(inf.n_train) != n:
        raise ValueError(f"X_train has {n} rows but the influence object has {inf.n_train} training points")
    xt, yt = _one(x_target, y_target)
    if xt.shape[1:] != backend.X0.shape[1:]:
        raise ValueError(
            f"x_target has input shape {xt.shape[1:]} but the training inputs have {backend.X0.shape[1:]}"
        )
    idx, select = _points_to_perturb(inf, xt, yt, train_idx, settings, n)
    x_orig = backend.X0[idx].copy()
    box = _box(x_orig, settings)
    if X_eval is not None:
        if y_eval is None:
            raise ValueError("y_eval is required with X_eval")
        ev_pred0 = to_numpy(backend.evaluate(inf, X_eval, y_eval)[1])

    before = _outcome(backend.evaluate, inf, xt, yt)
    P0 = to_numpy(inf.pert_loss(xt, yt, idx), np.float64)[:, 0]  # (k, ...) at the original model
    steps = _signed_steps(inf, backend, xt, yt, idx, box, P0, settings)
    delta = steps.x - x_orig
    after = _outcome(backend.evaluate, steps.influence, xt, yt) if steps.refitted else None
    eval_flipped = None
    if X_eval is not None and steps.refitted:
        ev_pred1 = to_numpy(backend.evaluate(steps.influence, X_eval, y_eval)[1])
        eval_flipped = np.flatnonzero(ev_pred1 != ev_pred0).astype(np.int64)
    loss1 = float("nan") if after is None else after.loss
    pred1 = before.prediction if after is None else after.prediction
    return AttackResult(
        train_idx=idx,
        target_label=_item(yt[0]),
        prediction_before=_item(before.prediction),
        prediction_after=_item(pred1),
        flipped=bool(after is not None and before.prediction == yt[0] and pred1 != yt[0]),
        loss_before=before.loss,
        loss_after=loss1,
        loss_change=loss1 - before.loss,
        predicted_loss_change=float(np.sum(P0 * delta) / n),
        x_original=x_orig,
        x_perturbed=steps.x,
        perturbation=delta,
        linf=float(np.max(np.abs(delta))) if delta.size else 0.0,
        epsilon=settings.epsilon,
        step_size=settings.step,
        n_steps=settings.n_steps,
        steps_run=steps.steps_run,
        loss_history=np.asarray(steps.history),
        refit_each_step=settings.refit_each_step,
        select=select,
        clip=settings.clip,
        image_shape=settings.image_shape,
        eval_flipped=eval_flipped,
        x_target=xt[0],
        time_s=time.perf_counter() - t_start,
    )


def pick_targets(
    inf_or_model: Any,
    X_test: ArrayLike,
    y_test: ArrayLike,
    k: int,
    *,
    how: str = "least_confident",
    seed: int = 0,
) -> NDArray[np.int64]:
    """Indices of ``k`` correctly classified test points to attack.

    ``how="least_confident"``: the smallest margin p(true) − max p(other) (or y·score for binary
    models without probabilities) first — the targets a small perturbation can flip;
    ``how="random"``: uniformly at random (``np.random.default_rng(seed)``). ``inf_or_model``: an
    influence object with ``.model`` or the model itself (``predict`` and ``predict_proba`` or
    ``decision_function``)."""
    model = getattr(inf_or_model, "model", inf_or_model)
    k = check_int("k", k, 1)
    if how not in ("least_confident", "random"):
        raise ValueError(f"how must be 'least_confident' or 'random', got {how!r}")
    seed = check_rng_seed("seed", seed)
    y = to_numpy(y_test)
    pred = to_numpy(model.predict(X_test))
    correct = np.flatnonzero(pred == y)
    if correct.size == 0:
        raise ValueError("no test point is classified correctly; nothing to attack")
    k = min(k, correct.size)
    if how == "random":
        return np.sort(np.random.default_rng(seed).choice(correct, k, replace=False)).astype(np.int64)
    if hasattr(model, "predict_proba"):
        P = to_numpy(model.predict_proba(X_test), np.float64)
        classes = list(to_numpy(model.classes_))
        ti = np.array([classes.index(v) for v in y])
        pt = P[np.arange(len(y)), ti]
        P2 = P.copy()
        P2[np.arange(len(y)), ti] = -np.inf
        margin = pt - P2.max(axis=1)
    else:
        s = to_numpy(model.decision_function(X_test), np.float64).ravel()
        cls = to_numpy(model.classes_)
        margin = np.where(y == cls[1], s, -s)
    order = correct[np.argsort(margin[correct], kind="stable")]
    return order[:k].astype(np.int64)


def attack_many(
    inf: Influence,
    X_targets: ArrayLike,
    y_targets: ArrayLike,
    settings: Optional[AttackSettings] = None,
    *,
    progress: bool = False,
    target_index: Optional[ArrayLike] = None,
    **kwargs: Any,
) -> AttackSummary:
    """:func:`training_set_attack` on each target (each attack starts from the original training
    set and model), all with the same settings (``settings`` and/or its fields as keywords, e.g.
    ``epsilon=0.25``) and the same other keyword arguments (``train_idx`` is chosen per target unless
    given; ``X_train``, ``refit``, ``evaluate``, ``X_eval``, ``y_eval``). ``target_index``: labels for
    the targets in the summary (e.g. their indices in the test set; default 0..m−1). Returns
    :class:`AttackSummary` with the fraction of targets whose prediction flipped."""
    t0 = time.perf_counter()
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in AttackSettings.field_names()}
    settings = AttackSettings.resolve(settings, options)
    Xa = to_numpy(X_targets)
    ya = to_numpy(y_targets)
    if ya.ndim != 1 or Xa.shape[0] != ya.shape[0] or ya.shape[0] == 0:
        raise ValueError(
            f"X_targets (m, ...) and y_targets (m,) must have the same non-zero length; got "
            f"{Xa.shape} and {ya.shape}"
        )
    tidx = np.arange(ya.shape[0]) if target_index is None else np.asarray(target_index).ravel()
    if tidx.shape[0] != ya.shape[0]:
        raise ValueError(f"target_index has {tidx.shape[0]} entries for {ya.shape[0]} targets")
    attacks = []
    for j in progress_iter(
        range(ya.shape[0]), enabled=progress, total=ya.shape[0], desc="training-set attacks"
    ):
        attacks.append(training_set_attack(inf, Xa[j : j + 1], ya[j : j + 1], settings, **kwargs))
    flipped = np.array([a.flipped for a in attacks], dtype=bool)
    return AttackSummary(
        attacks=attacks,
        target_index=tidx.astype(np.int64),
        flipped=flipped,
        fraction_flipped=float(flipped.mean()),
        loss_change=np.array([a.loss_change for a in attacks]),
        predicted_loss_change=np.array([a.predicted_loss_change for a in attacks]),
        epsilon=settings.epsilon,
        settings=settings.as_dict(),
        time_s=time.perf_counter() - t0,
    )
