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
  damping 1e-2. Exact is not affordable here (p² doubles and ~p HVPs).
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pyinfluence.torch.training import SmallCNN, cross_entropy, digits_mlp, lbfgs_fit

__all__ = ["TASKS", "SmallCNN", "Task", "clear_cache", "lbfgs_fit", "make_task", "task_names"]

L2 = 1e-3
DEEP_DAMPING = 1e-2
SVM_TEMPERATURE = 0.1
SYNTH_DEFAULT = {"n": 20_000, "d": 200}
SYNTH_QUICK = {"n": 5_000, "d": 100}

#: name -> (kind, one-line description); the order is the order of ``pyinfluence bench``.
TASKS: dict[str, tuple[str, str]] = {
    "digits-logreg": ("linear", "10-class multinomial logistic regression on standardised digits"),
    "digits-svm": ("linear", "binary smooth-hinge SVM (t = 0.1), even vs odd digits"),
    "digits-mlp": ("deep", "64-32-10 tanh MLP on digits, L-BFGS to a tight optimum"),
    "digits-cnn": ("deep", "small CNN (2 conv + 2 fc, p = 9242) on 8x8 digits, L-BFGS"),
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
    ``"digits-cnn"``, ``"synthetic-linear"``). ``quick``: fewer test points on deep tasks and a
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
    import time

    t0 = time.perf_counter()
    builder = {
        "digits-logreg": _digits_logreg,
        "digits-svm": _digits_svm,
        "digits-mlp": _digits_mlp,
        "digits-cnn": _digits_cnn,
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
    torch.manual_seed(seed)
    model = digits_mlp().double()
    return _deep_task(
        "digits-mlp", model, Xtr, ytr, Xte, yte, 300, desc, "Linear(64, 32), Tanh, Linear(32, 10)"
    )


def _digits_cnn(quick: bool, seed: int, sz: dict) -> Task:

    Xtr, ytr, Xte, yte, desc = _digits_torch(seed, sz, 5 if quick else 10)
    torch.manual_seed(seed)
    model = SmallCNN().double()
    Xtr, Xte = Xtr.reshape(-1, 1, 8, 8), Xte.reshape(-1, 1, 8, 8)
    return _deep_task(
        "digits-cnn",
        model,
        Xtr,
        ytr,
        Xte,
        yte,
        200 if quick else 1000,
        desc,
        "Conv2d(1,4,3,p=1) tanh maxpool2, Conv2d(4,8,3,p=1) tanh, Linear(128,64) tanh, Linear(64,10)",
    )
