"""The standard benchmark tasks of ``pyinfluence bench``: trained models on data that ships with
installed packages (scikit-learn's bundled digits) or is generated here from a seed.

Every :class:`Task` has a **torch view** (a trained ``nn.Module`` in eval mode, a per-example loss,
train/test tensors, ``l2`` and ``damping``: everything :class:`~pyinfluence.TorchInfluence` needs)
and, for ``kind == "linear"``, a **linear view** (the fitted pyinfluence estimator and the numpy
arrays :class:`~pyinfluence.LinearInfluence` needs). For linear tasks the two views are the same
model with the same weights: the torch module is the ``nn.Linear`` equivalent of the estimator
(intercept as the bias), and the estimator is fitted with ``penalize_intercept=True`` so that its
objective ``mean loss + (l2/2)‖θ‖²`` over *all* parameters is exactly TorchInfluence's. Both views
therefore define the same ``up_loss`` (H is the Hessian of the mean training loss plus
the L2 term, no 1/n factor).

Tasks (``make_task(name, quick=False, seed=0, **size)``):

- ``"digits-logreg"``: 10-class multinomial logistic regression on standardised digits (80/20
  stratified split, 1437 train), l2 = 1e-3, fitted by pyinfluence's Newton trainer to ‖∇R‖ ≈ 1e-15;
  p = 10·65 = 650; m = 50 test points (the first 50 of the test split); damping 0.
- ``"digits-svm"``: binary smooth-hinge SVM (temperature 0.1) on standardised digits, even (−1)
  against odd (+1), l2 = 1e-3, Newton; p = 65; m = 50; damping 0.
- ``"digits-mlp"``: 64-32-10 tanh MLP on digits scaled to [0, 1], cross-entropy, l2 = 1e-3, trained
  by full-batch L-BFGS in float64 to a tight optimum; p = 2410; m = 50; damping 1e-2 (the Hessian
  of a non-convex model need not be positive definite; Koh & Liang §4).
- ``"digits-cnn"``: small CNN (conv 3×3 1→4, tanh, max-pool 2, conv 3×3 4→8, tanh, fc 128→64
  tanh, fc 64→10) on 8×8 digits in [0, 1], l2 = 1e-3, L-BFGS in float64; p = 9242; m = 10;
  damping 1e-2. Max-pooling makes the objective only piecewise smooth: L-BFGS stalls at ‖∇R‖ ≈ 2e-4.
- ``"digits-cnn-smooth"``: the same CNN with 2×2 average pooling instead of max-pooling (twice
  differentiable everywhere), same data, trainer and damping: the CNN whose optimum can be polished
  to ‖∇R‖ ≈ 1e-12 and whose leave-one-out truth can be retrained to a tolerance (the retraining
  study's CNN).
- ``"synthetic-linear"``: binary logistic regression on X ~ N(0, 1) (n × d, default
  n = 20 000, d = 200; ``n=``, ``d=`` to scale up), labels from a logistic model with a random
  weight vector, l2 = 1e-3, Newton; p = d + 1; m = 50 held-out points; damping 0.

The deep tasks' models (``digits_mlp``, ``SmallCNN``) and their trainer (``lbfgs_fit``: one full-batch
L-BFGS call) come from :mod:`pyinfluence.torch.training`.

``size`` keywords: ``m`` (test points, all tasks), ``n`` and ``d`` (synthetic-linear),
``n_train`` (digits tasks: a stratified subset of the training images). ``quick=True`` keeps the
models the same (the CNN gets 200 L-BFGS iterations instead of 1000) but scores fewer test points
(m = 20; CNN 5) and makes the synthetic problem smaller (n = 5 000, d = 100) unless ``n``/``d``
are given.

Trained tasks are cached within the process (keyed on name, quick, seed and size), so a second
``make_task`` with the same arguments is free; ``clear_cache()`` forgets them.

Retraining with the task's own trainer (:meth:`Task.retrain`, returning a :class:`TrainedModel`):
on a subset of the training rows, from another initial seed, warm-started from the trained
weights, or on replaced labels — the same objective (mean loss + (l2/2)‖θ‖² over all parameters)
and the same trainer settings as the task. :meth:`Task.with_model` / :meth:`Task.with_labels`
wrap such a model as a new (uncached) Task whose influence views work unchanged (ensembles over
initial seeds; mislabel detection on a model trained on flipped labels). Used by
:mod:`pyinfluence.bench.lds` (LDS, brittleness, mislabel AUC).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyinfluence.torch.training import SmallCNN, cross_entropy, digits_mlp, lbfgs_fit

__all__ = [
    "TASKS",
    "SmallCNN",
    "Task",
    "TrainedModel",
    "clear_cache",
    "lbfgs_fit",
    "make_task",
    "task_names",
]

L2 = 1e-3
DEEP_DAMPING = 1e-2
SVM_TEMPERATURE = 0.1
SYNTH_DEFAULT = {"n": 20_000, "d": 200}
SYNTH_QUICK = {"n": 5_000, "d": 100}
#: L-BFGS settings of the deep tasks' trainer (``lbfgs_fit``): iterations (full, quick) and tolerance
DEEP_MAX_ITER: dict[str, tuple[int, int]] = {
    "digits-mlp": (300, 300),
    "digits-cnn": (1000, 200),
    "digits-cnn-smooth": (1000, 200),
}
DEEP_TOL = 1e-10
DEEP_HISTORY = 20

#: name -> (kind, one-line description); the order is the order of ``pyinfluence bench``.
TASKS: dict[str, tuple[str, str]] = {
    "digits-logreg": ("linear", "10-class multinomial logistic regression on standardised digits"),
    "digits-svm": ("linear", "binary smooth-hinge SVM (t = 0.1), even vs odd digits"),
    "digits-mlp": ("deep", "64-32-10 tanh MLP on digits, L-BFGS to a tight optimum"),
    "digits-cnn": ("deep", "small CNN (2 conv + 2 fc, p = 9242) on 8x8 digits, L-BFGS"),
    "digits-cnn-smooth": ("deep", "the same CNN with average pooling (smooth objective), L-BFGS"),
    "synthetic-linear": ("linear", "binary logistic regression on Gaussian X (n x d)"),
}

_CACHE: dict[tuple, Task] = {}


def task_names() -> list[str]:
    """The names of the standard tasks, in benchmark order."""
    return list(TASKS)


def clear_cache() -> None:
    """Forget the trained tasks cached by :func:`make_task`."""
    _CACHE.clear()


@dataclass(eq=False)
class TrainedModel:
    """A model trained by a task's own trainer (:meth:`Task.retrain`).

    ``module``: the trained ``nn.Module`` (float64, eval mode; for linear tasks the ``nn.Linear``
    equivalent of the estimator, intercept as the bias). ``estimator``: the fitted pyinfluence
    estimator (linear tasks; None for deep ones). ``loss_fn``: the task's per-example loss.
    ``grad_norm``: ‖∇R_S(θ)‖ of the training objective on the rows it was trained on (how close the
    fit got to its optimum). ``rows``: the training rows used (sorted int64 indices; None = all).
    ``labels``: the training labels used when they differ from the task's (the task's label values,
    see :meth:`Task.train_label_values`; None = the task's). ``seed``: the initial-weight seed
    (deep tasks, cold start; None when warm-started or linear). ``warm_start``, ``iterations``
    (Newton iterations; None for L-BFGS, whose count torch does not return) and ``seconds``.
    """

    module: Any
    loss_fn: Callable[..., Any]
    grad_norm: float
    seconds: float
    rows: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    seed: Optional[int] = None
    warm_start: bool = False
    iterations: Optional[int] = None
    estimator: Any = None

    def outputs(self, X: Any) -> Any:
        """The model's outputs (logits / scores) on the tensor ``X``, shape (m, K), no grad."""
        with torch.no_grad():
            out = self.module(X)
        return out.reshape(out.shape[0], -1)

    def losses(self, X: Any, y: Any) -> np.ndarray:
        """Per-example losses L(z, θ) on (X, y) (task's torch convention for y), float64 (m,)."""
        with torch.no_grad():
            li = self.loss_fn(self.module(X), y)
        return li.detach().cpu().double().numpy().reshape(-1)

    def predict(self, X: Any) -> np.ndarray:
        """Predicted class indices, int64 (m,): argmax of the logits, or (score > 0) for a single
        output (binary logistic / SVM; index 1 = the estimator's ``classes_[1]``)."""
        return _predicted_class(self.outputs(X))

    def margins(self, X: Any, y: Any) -> np.ndarray:
        """Correct-class margins φ, float64 (m,): φ = s_y − logsumexp_{k≠y} s_k (multiclass; TRAK's
        log(p_y / (1 − p_y))), φ = (2c − 1)·s for a single output (c the true class index). The
        cross-entropy / logistic loss is softplus(−φ) and the smooth hinge t·softplus((1 − φ)/t):
        both strictly decreasing in φ."""
        return _margins(self.outputs(X), y)


def _class_index(y: Any) -> np.ndarray:
    """True class indices (int64) of torch-convention labels: integer labels as they are, float
    labels ({0, 1} logistic or {−1, +1} SVM) as (y > 0)."""
    t = torch.as_tensor(y)
    if t.dtype.is_floating_point:
        return (t > 0).long().cpu().numpy().reshape(-1)
    return t.long().cpu().numpy().reshape(-1)


def _predicted_class(out: Any) -> np.ndarray:
    if out.shape[1] == 1:
        return (out[:, 0] > 0).long().cpu().numpy()
    return out.argmax(1).long().cpu().numpy()


def _outputs(module: Any, X: Any) -> Any:
    with torch.no_grad():
        out = module(X)
    return out.reshape(out.shape[0], -1)


def _margins(out: Any, y: Any) -> np.ndarray:
    out = out.detach().double()
    c = torch.from_numpy(_class_index(y))
    if out.shape[1] == 1:
        return ((2.0 * c.double() - 1.0) * out[:, 0]).cpu().numpy()
    rows = torch.arange(out.shape[0])
    s_y = out[rows, c]
    others = out.clone()
    others[rows, c] = -math.inf
    return (s_y - torch.logsumexp(others, dim=1)).cpu().numpy()


@dataclass(eq=False)
class Task:
    """One benchmark problem: a trained model, its training objective and data.

    Torch view (every task): ``model`` (trained ``nn.Module`` in eval mode), ``loss_fn``
    (per-example loss, no reduction), ``X_train``, ``y_train``, ``X_test``, ``y_test`` (tensors;
    inputs float64), ``l2`` (the training objective's (l2/2)‖θ‖² coefficient over ``params``),
    ``damping`` (λ for every solve), ``params`` (TorchInfluence's parameter selection; None = all).

    Linear view (``kind == "linear"`` only, else None): ``linear_model`` (the fitted pyinfluence
    estimator with the same weights as ``model``), ``X_train_np``, ``y_train_np``, ``X_test_np``,
    ``y_test_np`` (numpy; labels in the estimator's label values).

    ``info``: sizes and training diagnostics (n_train, m_test, n_params, grad_norm, train/test
    accuracy, fit seconds); ``spec``: the ``make_task`` arguments that rebuild this task.
    """

    name: str
    kind: str
    description: str
    model: Any
    loss_fn: Callable[..., Any]
    X_train: Any
    y_train: Any
    X_test: Any
    y_test: Any
    l2: float
    damping: float
    params: Optional[list[str]] = None
    linear_model: Any = None
    X_train_np: Optional[np.ndarray] = None
    y_train_np: Optional[np.ndarray] = None
    X_test_np: Optional[np.ndarray] = None
    y_test_np: Optional[np.ndarray] = None
    info: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def m_test(self) -> int:
        return int(self.X_test.shape[0])

    @property
    def n_params(self) -> int:
        return int(self.info["n_params"])

    def torch_influence(self, solver: Any = "exact", **kw: Any):
        """A fresh :class:`~pyinfluence.TorchInfluence` on this task with ``solver`` (the optimum
        check is off: ``info['grad_norm']`` records how close the training got)."""
        from pyinfluence.torch.influence import TorchInfluence

        kw.setdefault("optimum_tol", None)
        return TorchInfluence(
            self.model,
            self.loss_fn,
            (self.X_train, self.y_train),
            params=self.params,
            l2=self.l2,
            damping=self.damping,
            solver=solver,
            **kw,
        )

    def linear_influence(self, **kw: Any):
        """A fresh :class:`~pyinfluence.LinearInfluence` (C++ exact path); linear tasks only."""
        if self.kind != "linear":
            raise ValueError(f"task {self.name!r} is not linear: it has no C++ exact path")
        from pyinfluence.linear.influence import LinearInfluence

        assert self.X_train_np is not None and self.y_train_np is not None
        return LinearInfluence(
            self.linear_model, self.X_train_np, self.y_train_np, damping=self.damping, **kw
        )

    def influence(self, solver: Any):
        """``linear_influence()`` for ``solver == "linear-exact"``, else
        ``torch_influence(solver)``."""
        if isinstance(solver, str) and solver == "linear-exact":
            return self.linear_influence()
        return self.torch_influence(solver)

    def test_data(self, which: str = "torch") -> tuple[Any, Any]:
        """(X_test, y_test) for the torch view (``"torch"``) or the linear view (``"numpy"``)."""
        if which == "numpy":
            return self.X_test_np, self.y_test_np
        return self.X_test, self.y_test

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly description (no arrays, no model)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "description": self.description,
            "l2": self.l2,
            "damping": self.damping,
            "params": self.params,
            "dtype": str(self.X_train.dtype).replace("torch.", ""),
            **{k: v for k, v in self.info.items()},
            "spec": dict(self.spec),
        }

    def __repr__(self) -> str:
        return (
            f"Task({self.name!r}, kind={self.kind!r}, n_train={self.n_train}, "
            f"m_test={self.m_test}, n_params={self.info.get('n_params')}, "
            f"l2={self.l2:g}, damping={self.damping:g})"
        )

    # -- retraining with the task's own trainer ---------------------------------------------------
    def trainer_settings(self) -> dict[str, Any]:
        """The trainer and objective :meth:`retrain` uses, JSON-able (part of the retraining cache
        keys of :mod:`pyinfluence.bench.lds`). Linear: pyinfluence's Newton fit of the task's
        estimator (its hyperparameters and tolerance; ``penalize_intercept=True``). Deep: one
        full-batch L-BFGS call (``lbfgs_fit``) with the task's iteration count. Raises ValueError
        for a task whose trainer is not known (a task not built by :func:`make_task`)."""
        if self.kind == "linear":
            est = self.linear_model
            if est is None or "theta_" not in getattr(est, "__dict__", {}):
                raise ValueError(f"task {self.name!r} has no fitted linear estimator to retrain")
            classes = getattr(est, "classes_", None)
            return {
                "trainer": "pyinfluence Newton",
                "estimator": type(est).__name__,
                "params": {k: v for k, v in est.get_params().items()},
                "tol": float(est._tol()),
                "classes": None if classes is None else np.asarray(classes).tolist(),
            }
        name = self.spec.get("name", self.name)
        if name not in DEEP_MAX_ITER:
            raise ValueError(
                f"task {self.name!r} has no known trainer: retraining covers the linear tasks and the deep "
                f"tasks {', '.join(DEEP_MAX_ITER)} built by make_task"
            )
        return {
            "trainer": "lbfgs_fit (full-batch L-BFGS, strong Wolfe), float64",
            "architecture": name,
            "max_iter": _deep_max_iter(name, bool(self.spec.get("quick", False))),
            "l2": float(self.l2),
            "tol": DEEP_TOL,
            "history_size": DEEP_HISTORY,
        }

    def train_label_values(self) -> np.ndarray:
        """A copy of the training labels in the values :meth:`retrain`'s ``labels`` takes, (n,):
        the estimator's label values (``y_train_np``) for linear tasks, class indices for deep
        ones (for the digits tasks both are the digits 0–9)."""
        if self.kind == "linear" and self.y_train_np is not None:
            return np.asarray(self.y_train_np).copy()
        return self.y_train.detach().cpu().numpy().copy()

    def _init_seed(self) -> int:
        return int(self.spec.get("init_seed", self.spec.get("seed", 0)))

    def _rows(self, keep: Any) -> Optional[np.ndarray]:
        """``keep`` (None, a boolean mask (n,) or indices) as sorted unique int64 rows; None = all."""
        if keep is None:
            return None
        from pyinfluence._validation import as_index_array

        rows = np.unique(as_index_array("keep", keep, self.n_train, unique=True, allow_empty=False))
        return None if rows.size == self.n_train else rows

    def _training_labels(self, labels: Any) -> tuple[Any, Optional[np.ndarray]]:
        """(torch labels (n,) in the task's convention, label values (n,) or None) for ``labels``
        given as :meth:`train_label_values` (None: the task's own)."""
        if labels is None:
            return self.y_train, (None if self.y_train_np is None else np.asarray(self.y_train_np))
        if hasattr(labels, "detach") and hasattr(labels, "cpu"):
            labels = labels.detach().cpu().numpy()
        arr = np.asarray(labels)
        n = self.n_train
        if arr.ndim != 1 or arr.shape[0] != n:
            raise ValueError(f"labels must have shape ({n},) (one per training point), got {arr.shape}")
        if self.kind == "linear":
            # the estimator's own encoding (index for logistic/multinomial, ±1 for the SVM);
            # raises ValueError naming `labels` for values outside its classes_
            enc = self.linear_model._encode("labels", arr, np.float64, n=n)
            dt = np.int64 if self.y_train.dtype == torch.int64 else np.float64
            return torch.from_numpy(np.ascontiguousarray(enc.astype(dt))), arr
        if arr.dtype.kind not in "iu":
            raise TypeError(
                f"labels must be integer class indices for task {self.name!r}, got dtype {arr.dtype}"
            )
        with torch.no_grad():
            n_classes = int(self.model(self.X_train[:1]).reshape(1, -1).shape[1])
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= n_classes):
            raise ValueError(
                f"labels must be class indices in [0, {n_classes}), got values in [{arr.min()}, {arr.max()}]"
            )
        return torch.from_numpy(arr.astype(np.int64)), arr

    def retrain(
        self,
        keep: Any = None,
        *,
        seed: Optional[int] = None,
        warm_start: bool = False,
        labels: Any = None,
    ) -> TrainedModel:
        """Train the task's model again with the task's own trainer and objective.

        ``keep``: the training rows to train on (None: all; a boolean mask (n,) or an index array);
        the objective is the mean loss over those rows + (l2/2)‖θ‖² (all parameters), as the task's.
        ``seed``: initial weights for a deep task (None: the task's own seed, so that
        ``retrain()`` reproduces ``task.model``); the model is built as :func:`make_task` builds it
        (``torch.manual_seed(seed)`` then the constructor), with torch's global RNG state saved
        and restored. Linear tasks ignore it: their objective is strictly convex (l2 > 0) and
        Newton starts from θ = 0 as ``fit`` does. ``warm_start=True``: start from the task's trained
        weights (deep) or θ̂ (linear; the same optimum in fewer iterations); excludes ``seed``.
        ``labels`` (n,): training labels replacing the task's, in :meth:`train_label_values`
        form (e.g. from :func:`pyinfluence.applications.mislabel.flip_labels`).

        Linear: pyinfluence's Newton fit of a copy of the task's estimator (classes fixed to the
        task's, so a subset that lacks a class keeps the parameter shape); raises
        :class:`~pyinfluence.errors.ConvergenceError` if Newton does not converge. Deep: one
        ``lbfgs_fit`` call with the task's iteration count, l2 and tolerance. Returns a
        :class:`TrainedModel` (outputs, losses, predictions, margins, ‖∇R‖ on the rows used).
        """
        from pyinfluence._validation import check_bool, check_rng_seed

        warm_start = check_bool("warm_start", warm_start)
        if seed is not None:
            seed = check_rng_seed("seed", seed)
            if warm_start:
                raise ValueError(
                    "seed and warm_start=True exclude each other: a warm start begins at the trained weights"
                )
        settings = self.trainer_settings()  # raises for a task without a known trainer
        rows = self._rows(keep)
        y_t, y_vals = self._training_labels(labels)
        kept_labels = None if labels is None else np.array(y_vals, copy=True)
        t0 = time.perf_counter()
        if self.kind == "linear":
            base = self.linear_model
            assert self.X_train_np is not None and self.y_train_np is not None
            est = copy.copy(base)  # shares classes_ (read-only); theta_ is replaced below
            Xs = self.X_train_np if rows is None else self.X_train_np[rows]
            ys = self.y_train_np if labels is None else y_vals
            assert ys is not None
            ys = ys if rows is None else ys[rows]
            y_enc = est._encode("labels", ys, np.float64, n=Xs.shape[0])
            theta_hat = np.asarray(base.theta_, dtype=np.float64)
            theta0 = theta_hat.copy() if warm_start else np.zeros_like(theta_hat)
            theta, n_iter, grad_norm = est._newton(Xs, y_enc, theta0, theta0.shape[0], what="retrain")
            est.theta_, est.n_iter_, est.grad_norm_ = theta, n_iter, grad_norm
            module = _linear_module(theta)
            used_seed, iterations = None, int(n_iter)
        else:
            if warm_start:
                module = copy.deepcopy(self.model)
                used_seed = None
            else:
                used_seed = self._init_seed() if seed is None else seed
                module = _new_deep_model(settings["architecture"], used_seed)
            Xs = self.X_train if rows is None else self.X_train[torch.from_numpy(rows)]
            ys_t = y_t if rows is None else y_t[torch.from_numpy(rows)]
            grad_norm = lbfgs_fit(
                module,
                Xs,
                ys_t,
                settings["max_iter"],
                l2=self.l2,
                tol=DEEP_TOL,
                history_size=DEEP_HISTORY,
                loss=self.loss_fn,
            )
            est, iterations = None, None
        module.eval()
        for p in module.parameters():
            p.requires_grad_(True)
        return TrainedModel(
            module=module,
            loss_fn=self.loss_fn,
            grad_norm=float(grad_norm),
            seconds=time.perf_counter() - t0,
            rows=rows,
            labels=kept_labels,
            seed=used_seed,
            warm_start=warm_start,
            iterations=iterations,
            estimator=est,
        )

    def with_model(self, trained: TrainedModel) -> Task:
        """A new Task (not cached by :func:`make_task`) whose model is ``trained`` (from
        :meth:`retrain` on all training rows) and whose training labels are the ones it was
        trained on; everything else (data, loss, l2, damping, params) as this task's, so
        ``torch_influence``, ``linear_influence`` and the peers work on it unchanged. Its
        ``spec`` records the difference (``init_seed``, ``labels_sha256``, ``warm_start``), which
        also keys retraining caches and is the default seed of its own :meth:`retrain`."""
        if not isinstance(trained, TrainedModel):
            raise TypeError(
                f"trained must be a TrainedModel (from Task.retrain), got {type(trained).__name__}"
            )
        if trained.rows is not None:
            raise ValueError(
                f"trained was fitted on {trained.rows.size} of the {self.n_train} training rows; with_model "
                f"needs a model trained on all of them (retrain(keep=None))"
            )
        if self.kind == "linear" and trained.estimator is None:
            raise ValueError("trained has no fitted estimator: it is not a model of a linear task")
        y_t, y_vals = self._training_labels(trained.labels)
        spec = dict(self.spec)
        if trained.seed is not None:
            spec["init_seed"] = int(trained.seed)
        if trained.warm_start:
            spec["warm_start"] = True
        if trained.labels is not None:
            spec["labels_sha256"] = hashlib.sha256(
                repr(np.asarray(trained.labels).tolist()).encode()
            ).hexdigest()
        module = trained.module
        info = dict(self.info)
        info.update(
            grad_norm=float(trained.grad_norm),
            train_accuracy=float(
                np.mean(_predicted_class(_outputs(module, self.X_train)) == _class_index(y_t))
            ),
            test_accuracy=float(
                np.mean(_predicted_class(_outputs(module, self.X_test)) == _class_index(self.y_test))
            ),
            fit_s=float(trained.seconds),
            variant={k: spec[k] for k in ("init_seed", "warm_start", "labels_sha256") if k in spec},
        )
        return replace(
            self,
            model=module,
            y_train=y_t,
            linear_model=trained.estimator if self.kind == "linear" else self.linear_model,
            y_train_np=(None if y_vals is None else np.asarray(y_vals).copy())
            if self.kind == "linear"
            else self.y_train_np,
            info=info,
            spec=spec,
        )

    def with_labels(self, labels: Any, *, seed: Optional[int] = None) -> Task:
        """``with_model(retrain(labels=labels, seed=seed))``: the task's model trained from its
        initial weights on replaced training labels (e.g. 10% flipped, for mislabel detection)."""
        return self.with_model(self.retrain(labels=labels, seed=seed))


# ================================================================================================
# construction
# ================================================================================================
def _check_size(name: str, size: dict[str, Any]) -> dict[str, int]:
    allowed = {"m", "n_train"} | ({"n", "d"} if name == "synthetic-linear" else set())
    if name == "synthetic-linear":
        allowed.discard("n_train")
    out: dict[str, int] = {}
    for k, v in size.items():
        if v is None:
            continue
        if k not in allowed:
            raise ValueError(
                f"make_task({name!r}) got an unexpected size keyword {k!r}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or int(v) < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")
        out[k] = int(v)
    if name == "synthetic-linear" and out.get("n", 2) < 2:
        raise ValueError(f"n must be >= 2, got {out['n']}")
    return out


def make_task(name: str, quick: bool = False, seed: int = 0, **size: Any) -> Task:
    """Build (or fetch from the process cache) the trained benchmark task ``name``.

    ``name``: one of :data:`TASKS` (``"digits-logreg"``, ``"digits-svm"``, ``"digits-mlp"``,
    ``"digits-cnn"``, ``"digits-cnn-smooth"``, ``"synthetic-linear"``). ``quick``: fewer test points on deep tasks and a
    smaller synthetic problem. ``seed``: the data split / generator and the initial weights.
    ``size``: ``m`` (test points), ``n``/``d`` (synthetic-linear), ``n_train`` (digits tasks).
    Raises ValueError naming the argument for an unknown name or a bad size.
    """
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"name must be one of {', '.join(TASKS)}; got {name!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    quick = bool(quick)
    sz = _check_size(name, size)
    key = (name, quick, seed, tuple(sorted(sz.items())))
    if key in _CACHE:
        return _CACHE[key]
    t0 = time.perf_counter()
    builder = {
        "digits-logreg": _digits_logreg,
        "digits-svm": _digits_svm,
        "digits-mlp": _digits_mlp,
        "digits-cnn": _digits_cnn,
        "digits-cnn-smooth": _digits_cnn_smooth,
        "synthetic-linear": _synthetic_linear,
    }[name]
    # the builders use torch's global RNG for initial weights: keep the caller's state
    state = torch.random.get_rng_state()
    try:
        task = builder(quick, seed, sz)
    finally:
        torch.random.set_rng_state(state)
    task.info["fit_s"] = time.perf_counter() - t0
    task.spec = {"name": name, "quick": quick, "seed": seed, **sz}
    task.model.eval()
    for p in task.model.parameters():
        p.requires_grad_(True)
    _CACHE[key] = task
    return task


# -- losses (module-level functions: picklable, usable by a peer's worker) ----------------------
#: Per-example cross-entropy (targets: class indices): the deep tasks' loss and their trainer's.
cross_entropy_loss = cross_entropy


def logistic_loss(out: Any, y: Any) -> Any:
    """Per-example binary logistic loss on a (batch, 1) logit with targets in {0, 1}."""
    return F.binary_cross_entropy_with_logits(out.reshape(-1), y.to(out.dtype), reduction="none")


def svm_loss(out: Any, y: Any) -> Any:
    """Per-example smooth hinge loss with temperature 0.1 (targets in {−1, +1})."""
    from pyinfluence.torch.losses import smooth_hinge_loss

    return smooth_hinge_loss(out, y, temperature=SVM_TEMPERATURE)


# -- linear tasks -----------------------------------------------------------------------------
def _linear_module(theta: np.ndarray):
    """nn.Linear (float64) with weight theta[:, :-1] and bias theta[:, -1]."""

    K, d1 = theta.shape
    lin = nn.Linear(d1 - 1, K).double()
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(theta[:, :-1])))
        lin.bias.copy_(torch.from_numpy(np.ascontiguousarray(theta[:, -1])))
    return lin


def _linear_task(name: str, est: Any, Xtr, ytr, Xte, yte, loss_fn, y_torch, extra: dict) -> Task:

    est.fit(Xtr, ytr)
    model = _linear_module(np.asarray(est.theta_, dtype=np.float64))
    kind, desc = TASKS[name]
    ytr_t, yte_t = y_torch(est, ytr), y_torch(est, yte)
    info = {
        "n_train": int(Xtr.shape[0]),
        "m_test": int(Xte.shape[0]),
        "n_features": int(Xtr.shape[1]),
        "n_params": int(np.asarray(est.theta_).size),
        "grad_norm": float(est.grad_norm_),
        "train_accuracy": float(np.mean(est.predict(Xtr) == ytr)),
        "test_accuracy": float(np.mean(est.predict(Xte) == yte)),
        "trainer": "pyinfluence Newton (C++ core), penalize_intercept=True",
        **extra,
    }
    return Task(
        name=name,
        kind=kind,
        description=desc,
        model=model,
        loss_fn=loss_fn,
        X_train=torch.from_numpy(np.ascontiguousarray(Xtr, dtype=np.float64)),
        y_train=ytr_t,
        X_test=torch.from_numpy(np.ascontiguousarray(Xte, dtype=np.float64)),
        y_test=yte_t,
        l2=L2,
        damping=0.0,
        params=None,
        linear_model=est,
        X_train_np=np.ascontiguousarray(Xtr, dtype=np.float64),
        y_train_np=np.asarray(ytr),
        X_test_np=np.ascontiguousarray(Xte, dtype=np.float64),
        y_test_np=np.asarray(yte),
        info=info,
    )


def _digits(scale: str, task: str, seed: int, sz: dict, m_default: int):
    from pyinfluence.applications.datasets import load_digits_split

    split = load_digits_split(scale=scale, task=task, seed=seed, n_train=sz.get("n_train"))
    m = sz.get("m", m_default)
    if m > split.X_test.shape[0]:
        raise ValueError(f"m must be <= {split.X_test.shape[0]} (the digits test set), got {m}")
    return split.X_train, split.y_train, split.X_test[:m], split.y_test[:m], split.description


def _digits_logreg(quick: bool, seed: int, sz: dict) -> Task:

    from pyinfluence.linear.models import LogisticRegression

    Xtr, ytr, Xte, yte, desc = _digits("standardize", "multiclass", seed, sz, 20 if quick else 50)
    est = LogisticRegression(l2=L2, penalize_intercept=True)
    return _linear_task(
        "digits-logreg",
        est,
        Xtr,
        ytr,
        Xte,
        yte,
        cross_entropy_loss,
        lambda e, y: torch.from_numpy(np.searchsorted(e.classes_, y).astype(np.int64)),
        {"data": desc, "loss": "cross-entropy (softmax over 10 classes)"},
    )


def _digits_svm(quick: bool, seed: int, sz: dict) -> Task:

    from pyinfluence.linear.models import SmoothHingeSVM

    Xtr, ytr, Xte, yte, desc = _digits("standardize", "even_odd", seed, sz, 20 if quick else 50)
    est = SmoothHingeSVM(l2=L2, temperature=SVM_TEMPERATURE, penalize_intercept=True)
    return _linear_task(
        "digits-svm",
        est,
        Xtr,
        ytr,
        Xte,
        yte,
        svm_loss,
        lambda e, y: torch.from_numpy((2.0 * np.searchsorted(e.classes_, y) - 1.0).astype(np.float64)),
        {"data": desc, "loss": f"smooth hinge, temperature {SVM_TEMPERATURE:g}"},
    )


def _synthetic_linear(quick: bool, seed: int, sz: dict) -> Task:

    from pyinfluence.linear.models import LogisticRegression

    base = SYNTH_QUICK if quick else SYNTH_DEFAULT
    n, d = sz.get("n", base["n"]), sz.get("d", base["d"])
    m = sz.get("m", 20 if quick else 50)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + m, d))
    w = rng.standard_normal(d) * (2.0 / math.sqrt(d))
    s = X @ w + 0.2
    y = (rng.random(n + m) < 1.0 / (1.0 + np.exp(-s))).astype(np.int64)
    if len(np.unique(y[:n])) < 2:
        raise ValueError(f"n={n} is too small: the generated training labels have one class")
    est = LogisticRegression(l2=L2, penalize_intercept=True)
    desc = (
        f"X ~ N(0, 1) of shape ({n} + {m}) x {d} (numpy default_rng({seed})), "
        f"y ~ Bernoulli(sigmoid(X w + 0.2)), w ~ N(0, 4/d)"
    )
    return _linear_task(
        "synthetic-linear",
        est,
        X[:n],
        y[:n],
        X[n:],
        y[n:],
        logistic_loss,
        lambda e, yy: torch.from_numpy(np.searchsorted(e.classes_, yy).astype(np.float64)),
        {"data": desc, "loss": "binary logistic", "n": n, "d": d},
    )


# -- deep tasks -------------------------------------------------------------------------------
def _deep_max_iter(name: str, quick: bool) -> int:
    """The L-BFGS iteration count of deep task ``name`` (full or quick)."""
    full, fast = DEEP_MAX_ITER[name]
    return fast if quick else full


def _new_deep_model(name: str, seed: int) -> nn.Module:
    """The untrained float64 model of deep task ``name`` with initial weights from
    ``torch.manual_seed(seed)``; torch's global RNG state is saved and restored."""
    ctors: dict[str, Callable[[], nn.Module]] = {
        "digits-mlp": digits_mlp,
        "digits-cnn": SmallCNN,
        "digits-cnn-smooth": lambda: SmallCNN(pool="avg"),
    }
    ctor = ctors[name]
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = ctor().double()
    finally:
        torch.random.set_rng_state(state)
    return model


def _deep_task(name: str, model: Any, Xtr, ytr, Xte, yte, iters: int, desc: str, arch: str) -> Task:

    gn = lbfgs_fit(model, Xtr, ytr, iters, l2=L2)
    model.eval()
    with torch.no_grad():
        acc_tr = float((model(Xtr).argmax(1) == ytr).double().mean())
        acc_te = float((model(Xte).argmax(1) == yte).double().mean())
    kind, d = TASKS[name]
    info = {
        "n_train": int(Xtr.shape[0]),
        "m_test": int(Xte.shape[0]),
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "grad_norm": gn,
        "train_accuracy": acc_tr,
        "test_accuracy": acc_te,
        "trainer": f"full-batch L-BFGS (strong Wolfe), {iters} iterations max, float64",
        "architecture": arch,
        "data": desc,
        "loss": "cross-entropy",
    }
    return Task(
        name=name,
        kind=kind,
        description=d,
        model=model,
        loss_fn=cross_entropy_loss,
        X_train=Xtr,
        y_train=ytr,
        X_test=Xte,
        y_test=yte,
        l2=L2,
        damping=DEEP_DAMPING,
        info=info,
    )


def _digits_torch(seed: int, sz: dict, m_default: int):

    Xtr, ytr, Xte, yte, desc = _digits("unit", "multiclass", seed, sz, m_default)
    return (
        torch.from_numpy(np.ascontiguousarray(Xtr)),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(Xte)),
        torch.from_numpy(yte.astype(np.int64)),
        desc,
    )


def _digits_mlp(quick: bool, seed: int, sz: dict) -> Task:

    Xtr, ytr, Xte, yte, desc = _digits_torch(seed, sz, 20 if quick else 50)
    model = _new_deep_model("digits-mlp", seed)
    return _deep_task(
        "digits-mlp",
        model,
        Xtr,
        ytr,
        Xte,
        yte,
        _deep_max_iter("digits-mlp", quick),
        desc,
        "Linear(64, 32), Tanh, Linear(32, 10)",
    )


def _digits_cnn(quick: bool, seed: int, sz: dict, name: str = "digits-cnn") -> Task:

    Xtr, ytr, Xte, yte, desc = _digits_torch(seed, sz, 5 if quick else 10)
    model = _new_deep_model(name, seed)
    Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    pool = "avgpool2" if name == "digits-cnn-smooth" else "maxpool2"
    return _deep_task(
        name,
        model,
        Xtr,
        ytr,
        Xte,
        yte,
        _deep_max_iter(name, quick),
        desc,
        f"Conv2d(1,4,3,p=1) tanh {pool}, Conv2d(4,8,3,p=1) tanh, Linear(128,64) tanh, Linear(64,10)",
    )


def _digits_cnn_smooth(quick: bool, seed: int, sz: dict) -> Task:
    return _digits_cnn(quick, seed, sz, name="digits-cnn-smooth")
