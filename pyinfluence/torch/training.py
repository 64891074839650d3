"""Training to a tight optimum: the small digits models and the one full-batch trainer that the demo
(``pyinfluence demo``), the benchmark tasks (``pyinfluence bench``) and the benchmark studies
(:mod:`pyinfluence.bench.studies`) share.

Influence functions assume the model sits at a minimum of its training objective, and comparing them
with leave-one-out retraining needs refits converged the same way. Everything here minimises

    R_w(θ) = Σ_i w_i L(z_i, θ) / Σ_i w_i + (l2/2)‖θ‖²

over ALL parameters of the model (w = 1: the mean training loss; w_i = 0: point i left out), full
batch, in the model's own dtype, until a gradient tolerance:

- :class:`Objective`: R_w and its gradient on a model's parameters (in place), with two optimisers:
  :meth:`Objective.lbfgs` (``torch.optim.LBFGS`` with a strong-Wolfe line search, run in chunks of
  iterations between which ‖∇R_w‖ is checked, or as one call) and :meth:`Objective.bfgs`
  (quasi-Newton steps started from a given Hessian, with an Armijo line search).
- :func:`lbfgs_fit`: one L-BFGS call of at most ``max_iter`` iterations (the benchmark tasks' and
  studies' trainer, whose settings their published numbers were measured with);
  :func:`lbfgs_refit`: the same on a copy of a trained model, warm-started, optionally without one
  training point (leave-one-out retraining of the benchmarks).
- :func:`train_cnn` / :class:`TrainedCNN`: the demo's CNN fitted to ‖∇R‖ ≤ 1e-10 (L-BFGS, then BFGS
  from the exact Hessian) with its :class:`~pyinfluence.TorchInfluence`; :class:`CNNRetrainer`:
  its leave-one-out retraining from the trained weights (the ``retrain`` callable of
  :func:`~pyinfluence.applications.validate_loo`).

Models (inputs: 8×8 digits as (B, 1, 8, 8); :class:`DigitsCNN` also takes (B, 64)):

- :class:`DigitsCNN`: conv 3×3 (1 → 6 filters, no padding), tanh, 2×2 average pooling, linear
  (54 → classes): 610 parameters for 10 classes, smooth everywhere (the demo's CNN).
- :class:`SmallCNN`: conv 3×3 (1→4, padding 1) tanh, 2×2 max- (default) or average pooling, conv 3×3
  (4→8, padding 1) tanh, fc 128→64 tanh, fc 64→10: 9242 parameters (the ``digits-cnn`` and, with
  average pooling, ``digits-cnn-smooth`` benchmark tasks).
- :func:`digits_mlp`: 64-32-10 tanh MLP, an ``nn.Sequential`` (the ``digits-mlp`` task and study).

Each model draws its initial weights from torch's global RNG in construction order; the callers seed
it (``torch.manual_seed``) right before constructing, so the same seed gives the same weights.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CNN_FIT_TOL",
    "CNN_LOO_TOL",
    "CNNRetrainer",
    "DigitsCNN",
    "Objective",
    "SmallCNN",
    "TrainedCNN",
    "cross_entropy",
    "digits_mlp",
    "lbfgs_fit",
    "lbfgs_refit",
    "train_cnn",
]

#: Gradient-norm tolerance of :func:`train_cnn` and of :class:`CNNRetrainer`'s refits (float64;
#: ‖∇R‖ stalls around 1e-11–1e-10 where steps no longer change R measurably).
CNN_FIT_TOL = 1e-10
CNN_LOO_TOL = 1e-9


# ================================================================================================
# models
# ================================================================================================
class DigitsCNN(nn.Module):
    """A small CNN for 8×8 digits: conv 3×3 (1 → ``channels`` filters, no padding: 8×8 → 6×6),
    tanh, 2×2 average pooling (→ 3×3), linear (9·channels → ``n_classes``).

    Smooth (tanh, average pooling) so that its Hessian is well defined everywhere; with 6 filters
    it has 610 parameters, so the exact Hessian (610 Hessian-vector products over the training
    set) takes seconds on a CPU. Inputs: (B, 1, 8, 8) or flattened (B, 64).
    """

    def __init__(self, channels: int = 6, n_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3)
        self.fc = nn.Linear(9 * channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 2:
            x = x.reshape(-1, 1, 8, 8)
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(h.flatten(1))

    def describe(self) -> str:
        """The architecture in one line."""
        return (
            f"conv 3x3 (1->{self.conv.out_channels}, no padding) -> tanh -> avg-pool 2x2 -> "
            f"linear ({self.fc.in_features}->{self.fc.out_features})"
        )


class SmallCNN(nn.Module):
    """8×8 digits: conv 3×3 (1→4) tanh, 2×2 pooling, conv 3×3 (4→8) tanh, fc 128→64 tanh,
    fc 64→10 (p = 9242).

    ``pool="max"`` (default): the ``digits-cnn`` task of ``pyinfluence bench`` and of the deep-path
    study. ``pool="avg"``: the ``digits-cnn-smooth`` task — the same network with average pooling,
    so that the training objective is twice differentiable everywhere. Max-pooling is only piecewise
    smooth: full-batch L-BFGS stalls at ‖∇R‖ ≈ 2e-4 on it, so the optimum that influence functions
    (and leave-one-out retraining to a gradient-norm tolerance) assume is not reachable; with average
    pooling the same polish reaches ‖∇R‖ ≈ 1e-12.
    """

    def __init__(self, pool: str = "max") -> None:
        super().__init__()
        if pool not in ("max", "avg"):
            raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
        self.pool = pool
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.f1 = nn.Linear(8 * 4 * 4, 64)
        self.f2 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.c1(x))
        x = F.avg_pool2d(h, 2) if self.pool == "avg" else F.max_pool2d(h, 2)
        x = torch.tanh(self.c2(x)).flatten(1)
        return self.f2(torch.tanh(self.f1(x)))


def digits_mlp(hidden: int = 32, n_classes: int = 10, n_features: int = 64) -> nn.Sequential:
    """``Linear(64, 32), Tanh, Linear(32, 10)`` (2410 parameters): the ``digits-mlp`` task of
    ``pyinfluence bench`` and of the deep-path study. An ``nn.Sequential``, so other libraries'
    workers can rebuild it from a description (:mod:`pyinfluence.bench.peers`)."""
    return nn.Sequential(nn.Linear(n_features, hidden), nn.Tanh(), nn.Linear(hidden, n_classes))


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (targets: class indices)."""
    return F.cross_entropy(out, y, reduction="none")


# ================================================================================================
# the objective and the trainer
# ================================================================================================
class Objective:
    """R_w(θ) = Σ_i w_i L(z_i, θ) / Σ_i w_i + (l2/2)‖θ‖² over ALL parameters of ``model``
    (w = None or 1: the training objective; w_i = 0: point i left out), with the flat-vector
    helpers the optimisers need. ``loss(out, y)``: per-example losses (default cross-entropy).
    Works on the model's own parameters (in place)."""

    def __init__(
        self,
        model: nn.Module,
        X: Tensor,
        y: Tensor,
        l2: float,
        loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    ) -> None:
        self.model = model
        self.params = list(model.parameters())
        self.X, self.y, self.l2 = X, y, float(l2)
        self.loss = loss
        self.n = int(X.shape[0])

    def _R(self, w: Optional[Tensor]) -> Tensor:
        li = self.loss(self.model(self.X), self.y)
        data = li.mean() if w is None else (li * w).sum() / w.sum()
        return data + 0.5 * self.l2 * sum((p**2).sum() for p in self.params)

    def value(self, w: Optional[Tensor] = None) -> float:
        with torch.no_grad():
            return float(self._R(w))

    def grad(self, w: Optional[Tensor] = None) -> Tensor:
        g = torch.autograd.grad(self._R(w), self.params)
        return torch.cat([t.reshape(-1) for t in g])

    def get(self) -> Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.params]).clone()

    def set(self, theta: Tensor) -> None:
        o = 0
        with torch.no_grad():
            for p in self.params:
                k = p.numel()
                p.copy_(theta[o : o + k].view_as(p))
                o += k

    def lbfgs(
        self,
        w: Optional[Tensor] = None,
        *,
        tol: float,
        max_iter: int,
        chunk: Optional[int] = 25,
        history_size: int = 30,
        grad_tol_inf: Optional[float] = None,
        on_chunk: Optional[Callable[[int, float], None]] = None,
    ) -> Tuple[int, float]:
        """L-BFGS (strong Wolfe line search) until ‖∇R_w‖ ≤ ``tol`` or ``max_iter`` iterations;
        returns (iterations, final gradient norm).

        ``chunk``: torch's L-BFGS runs ``chunk`` iterations (at most 20·chunk evaluations) per
        call and ‖∇R_w‖ is checked between calls; ``on_chunk(new iterations, grad norm)`` is
        called after each (progress bars). ``chunk=None``: ONE call of up to ``max_iter``
        iterations with torch's own evaluation limit (1.25·max_iter) and stopping rules.
        ``grad_tol_inf``: torch's own test, on max |∂R/∂θ_j| (default tol/√p, the 2-norm
        tolerance spread over the parameters).
        """
        p = sum(q.numel() for q in self.params)
        per_call = max_iter if chunk is None else chunk
        opt = torch.optim.LBFGS(
            self.params,
            lr=1.0,
            max_iter=per_call,
            max_eval=None if chunk is None else 20 * chunk,
            tolerance_grad=tol / math.sqrt(p) if grad_tol_inf is None else grad_tol_inf,
            tolerance_change=0.0,
            history_size=history_size,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            opt.zero_grad()
            R = self._R(w)
            R.backward()
            return R

        done = 0
        gn = float(self.grad(w).norm())
        while done < max_iter and gn > tol:
            opt.step(closure)
            before, done = done, int(opt.state[self.params[0]].get("n_iter", done))
            gn = float(self.grad(w).norm())
            if on_chunk is not None:
                on_chunk(done - before, gn)
            if chunk is None or done == before:  # one call, or L-BFGS stalled: stop here
                break
        for q in self.params:
            q.grad = None
        return done, gn

    def bfgs(
        self, A: Tensor, w: Optional[Tensor] = None, *, tol: float, max_iter: int = 200
    ) -> Tuple[int, float]:
        """Quasi-Newton (BFGS) steps on R_w starting from the Hessian model ``A`` (the exact
        Hessian at the starting point): θ ← θ + t·d, d = −B⁻¹∇R_w(θ), with a backtracking
        (Armijo) line search and the BFGS update of B⁻¹ after every step, which corrects the
        model along the directions travelled — where a non-convex loss curves differently from
        A. A not positive definite is replaced by |A| (eigenvalues by their magnitude, floored).
        Returns (iterations, final gradient norm); the caller falls back to L-BFGS when the
        tolerance is not reached."""
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
        else:
            ev, V = torch.linalg.eigh(A)
            floor = max(1e-10, 1e-6 * float(ev.abs().max()))
            Hinv = (V / ev.abs().clamp_min(floor)) @ V.T
        g = self.grad(w)
        r = self.value(w)
        gn = float(g.norm())
        for it in range(max_iter):
            if gn <= tol:
                return it, gn
            d = -(Hinv @ g)
            slope = float(d @ g)
            if slope >= 0:  # not a descent direction: restart from the gradient
                Hinv = torch.eye(A.shape[0], dtype=A.dtype)
                d, slope = -g, -float(g @ g)
            theta, t = self.get(), 1.0
            while True:
                self.set(theta + t * d)
                r_new = self.value(w)
                if r_new <= r + 1e-4 * t * slope + 4e-16 * abs(r):  # Armijo, up to rounding
                    break
                t *= 0.5
                if t < 1e-10:
                    self.set(theta)
                    return it, gn
            g_new = self.grad(w)
            s, y = t * d, g_new - g
            sy = float(s @ y)
            if sy > 1e-12 * float(s.norm()) * float(y.norm()):  # keep B positive definite
                rho, Hy = 1.0 / sy, Hinv @ y
                Hinv = (
                    Hinv
                    - rho * (torch.outer(s, Hy) + torch.outer(Hy, s))
                    + (rho * rho * float(y @ Hy) + rho) * torch.outer(s, s)
                )
            g, r, gn = g_new, r_new, float(g_new.norm())
        return max_iter, gn


def lbfgs_fit(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    max_iter: int,
    l2: float = 1e-3,
    tol: float = 1e-10,
    *,
    history_size: int = 20,
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
) -> float:
    """Full-batch L-BFGS (strong Wolfe) on mean ``loss`` + (l2/2)‖θ‖² in place: one torch L-BFGS
    call of at most ``max_iter`` iterations, stopping early when max |∂R/∂θ_j| ≤ ``tol``; returns
    ‖∇R‖ (the benchmark tasks' and studies' trainer: :meth:`Objective.lbfgs` with
    ``chunk=None``)."""
    obj = Objective(model, X, y, l2, loss)
    return obj.lbfgs(tol=tol, max_iter=max_iter, chunk=None, history_size=history_size, grad_tol_inf=tol)[1]


def lbfgs_refit(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    max_iter: int,
    *,
    drop: Optional[int] = None,
    l2: float = 1e-3,
    tol: float = 1e-10,
    loss: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
) -> nn.Module:
    """A copy of the trained ``model`` retrained by :func:`lbfgs_fit` from its weights (warm
    start, as Koh & Liang's retraining) on (X, y) without row ``drop`` (None: nothing removed —
    the control refit, whose drift from θ̂ the leave-one-out changes are measured against)."""
    m = copy.deepcopy(model)
    if drop is None:
        lbfgs_fit(m, X, y, max_iter, l2=l2, tol=tol, loss=loss)
    else:
        keep = torch.ones(int(X.shape[0]), dtype=torch.bool)
        keep[int(drop)] = False
        lbfgs_fit(m, X[keep], y[keep], max_iter, l2=l2, tol=tol, loss=loss)
    return m


# ================================================================================================
# the demo's CNN, fitted to a tight optimum, and its leave-one-out retraining
# ================================================================================================
@dataclasses.dataclass
class TrainedCNN:
    """A :class:`DigitsCNN` fitted to ‖∇R(θ̂)‖ ≤ ``grad_norm`` (R: mean cross-entropy +
    (l2/2)‖θ‖² over all parameters), with its :class:`~pyinfluence.TorchInfluence` (exact
    Hessian over all parameters) and how it was obtained."""

    model: DigitsCNN
    influence: Any  # TorchInfluence
    l2: float
    damping: float
    grad_norm: float
    lbfgs_iterations: int
    polish_iterations: int
    train_accuracy: float
    test_accuracy: float
    time_s: float

    def summary(self) -> Dict[str, Any]:
        """The model and its fit as JSON-ready numbers."""
        return {
            "architecture": self.model.describe(),
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "influence_params": self.influence.n_params,
            "l2": self.l2,
            "damping": self.damping,
            "grad_norm": self.grad_norm,
            "lbfgs_iterations": self.lbfgs_iterations,
            "polish_iterations": self.polish_iterations,
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
            "time_s": self.time_s,
        }


class _NullBar:
    def update(self, k: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: bool, total: Optional[int], desc: str) -> Any:
    """A tqdm bar (or a no-op stand-in when progress is off or tqdm is missing)."""
    if not progress:
        return _NullBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return _NullBar()
    return tqdm(total=total, desc=desc, leave=False)


def train_cnn(
    X_train: Tensor,
    y_train: Tensor,
    X_test: Tensor,
    y_test: Tensor,
    *,
    channels: int = 6,
    n_classes: int = 10,
    l2: float = 1e-2,
    lbfgs_tol: float = 1e-5,
    seed: int = 0,
    progress: bool = False,
) -> TrainedCNN:
    """Fit a :class:`DigitsCNN` (float64) to a tight optimum and build its TorchInfluence.

    Full-batch L-BFGS to ‖∇R‖ ≤ ``lbfgs_tol``, then quasi-Newton (BFGS) steps started from the
    exact Hessian (built by TorchInfluence from Hessian-vector products) to ‖∇R‖ ≤ 1e-10:
    influence functions assume ∇R(θ̂) = 0, and leave-one-out retraining compares against this θ̂.
    Labels ``y_train`` are class indices 0..n_classes−1 (int64). The initial weights come from
    ``torch.manual_seed(seed)`` inside a forked RNG (the global torch RNG is untouched).
    H + λI must be positive definite: λ = 0 is tried first, then 1e-3 and 1e-2 (recorded as
    ``damping``).
    """
    from pyinfluence.errors import NotPositiveDefiniteError
    from pyinfluence.torch.influence import TorchInfluence

    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN(channels, n_classes).to(torch.float64)
    obj = Objective(model, X_train, y_train, l2)
    bar = _bar(progress, None, f"training the CNN ({n_classes} classes, L-BFGS)")

    def on_chunk(k: int, g: float) -> None:
        bar.update(k)
        bar.set_postfix_str(f"|grad| {g:.1e}")

    it_lbfgs, gn = obj.lbfgs(tol=lbfgs_tol, max_iter=3000, on_chunk=on_chunk)
    bar.close()
    ce = nn.CrossEntropyLoss(reduction="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not yet at the optimum: that is what the polish is for
        rough = TorchInfluence(
            model,
            ce,
            (X_train, y_train),
            l2=l2,
            solver="exact",
            optimum_tol=None,
            progress=progress,
        )
        H = rough.hessian()
    it_polish, gn = obj.bfgs(H, tol=CNN_FIT_TOL)
    if gn > CNN_FIT_TOL:
        more, gn = obj.lbfgs(tol=CNN_FIT_TOL, max_iter=1000)
        it_lbfgs += more
    inf = None
    damping = 0.0
    for damping in (0.0, 1e-3, 1e-2):
        inf = TorchInfluence(
            model, ce, (X_train, y_train), l2=l2, damping=damping, solver="exact", progress=progress
        )
        try:
            inf.prepare()
            break
        except NotPositiveDefiniteError:
            if damping == 1e-2:
                raise
    assert inf is not None
    with torch.no_grad():
        tr = float((model(X_train).argmax(1) == y_train).double().mean())
        te = float((model(X_test).argmax(1) == y_test).double().mean())
    return TrainedCNN(
        model=model,
        influence=inf,
        l2=float(l2),
        damping=damping,
        grad_norm=gn,
        lbfgs_iterations=it_lbfgs,
        polish_iterations=it_polish,
        train_accuracy=tr,
        test_accuracy=te,
        time_s=time.perf_counter() - t0,
    )


class CNNRetrainer:
    """Leave-one-out retraining of a trained CNN from its trained weights (the ``retrain``
    callable of :func:`~pyinfluence.applications.validate_loo`).

    For each removed point i: start at θ̂ and minimise R₋ᵢ(θ) (mean loss over the other n − 1
    points + (l2/2)‖θ‖²) by BFGS started from the exact leave-one-out Hessian at θ̂,
    H₋ᵢ = (n(H − l2·I) − ∇²L(zᵢ))/(n − 1) + l2·I (L-BFGS if BFGS stalls), until
    ‖∇R₋ᵢ‖ ≤ ``tol``. Returns the actual change of each test
    loss, L(z_test, θ̂₋ᵢ) − L(z_test, θ̂). ``grad_norms`` / ``iterations`` record every refit.
    """

    def __init__(
        self, trained: TrainedCNN, X_train: Tensor, y_train: Tensor, tol: float = CNN_LOO_TOL
    ) -> None:
        self.model = copy.deepcopy(trained.model)  # the original stays untouched
        self.obj = Objective(self.model, X_train, y_train, trained.l2)
        self.theta = self.obj.get()
        self.H = trained.influence.hessian()
        self.l2 = trained.l2
        self.tol = float(tol)
        self.n = int(X_train.shape[0])
        self.grad_norms: List[float] = []
        self.iterations: List[Tuple[int, int]] = []
        self._names = [k for k, _ in self.model.named_parameters()]
        self._shapes = [p.shape for p in self.model.parameters()]

    def _point_hessian(self, i: int) -> Tensor:
        from torch.func import functional_call, hessian

        x, y = self.obj.X[i : i + 1], self.obj.y[i : i + 1]

        def f(theta: Tensor) -> Tensor:
            ps, o = {}, 0
            for name, shape in zip(self._names, self._shapes):
                k = int(np.prod(shape))
                ps[name] = theta[o : o + k].view(shape)
                o += k
            return self.obj.loss(functional_call(self.model, ps, (x,)), y).sum()

        return hessian(f)(self.theta)

    def __call__(self, X_test: Any, y_test: Any, train_idx: Any) -> np.ndarray:
        """The actual change of each test loss (rows: ``train_idx``, columns: test points)."""
        Xt = torch.as_tensor(X_test, dtype=torch.float64)
        yt = torch.as_tensor(y_test)
        self.obj.set(self.theta)
        with torch.no_grad():
            base = self.obj.loss(self.model(Xt), yt)
        n, l2 = self.n, self.l2
        eye = torch.eye(self.theta.numel(), dtype=torch.float64)
        out = []
        for i in np.asarray(train_idx).ravel().tolist():
            A = (n * (self.H - l2 * eye) - self._point_hessian(int(i))) / (n - 1) + l2 * eye
            w = torch.ones(n, dtype=torch.float64)
            w[int(i)] = 0.0
            self.obj.set(self.theta)
            k_bfgs, gn = self.obj.bfgs(A, w, tol=self.tol)
            k_lbfgs = 0
            if gn > self.tol:
                k_lbfgs, gn = self.obj.lbfgs(w, tol=self.tol, max_iter=500)
            self.grad_norms.append(gn)
            self.iterations.append((k_bfgs, k_lbfgs))
            with torch.no_grad():
                out.append((self.obj.loss(self.model(Xt), yt) - base).numpy())
        self.obj.set(self.theta)
        return np.asarray(out, dtype=np.float64).reshape(len(out), -1)
