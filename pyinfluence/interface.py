"""The one influence interface: :class:`Influence`, answered by both paths, and its result type :class:`TopK`.

Notation (Koh & Liang 2017; signs exactly as in the paper):

    R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²,   θ̂ = argmin R,   H = ∇²R(θ̂)  (L2 term included)

Every solve uses ``H + λI`` with the damping λ the influence object was built with. θ is the flat
parameter vector, p entries (:attr:`Influence.n_params`); n is the number of training points
(:attr:`Influence.n_train`).

=====================  ==========================================================  ===================
method                 quantity                                                    shape
=====================  ==========================================================  ===================
``up_params``          I_up,params(z)         = −(H+λI)⁻¹ ∇θL(z)                   (k, p)
``up_loss``            I_up,loss(z, z_test)   = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z)      (k, m)
``pert_loss``          I_pert,loss(z, z_test) = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇x∇θL(z)    (k, m, *input shape)
``self_influence``     I_up,loss(z, z) ≤ 0                                         (k,)
``loo_change``         L(z_test, θ̂₋z) − L(z_test, θ̂) ≈ −(1/n)·I_up,loss(z, z_test)  (k, m)
``helpfulness``        −I_up,loss(z, z_test): the peers' sign, positive = helpful   (k, m)
``top_k``              the k most helpful / harmful training points per test point  TopK of (m, k)
=====================  ==========================================================  ===================

``up_*`` are derivatives with respect to the weight ε of upweighting z in (1/n) Σ L + ε L(z): they
have NO 1/n factor. Removing z is ε = −1/n, hence the −1/n in ``loo_change`` (the only method with
it). A positive ``up_loss`` means upweighting z *raises* the test loss (z is harmful); a negative one
means it lowers it (z is helpful).

**The other sign convention.** Captum, pyDVL, kronfluence, TRAK and dattri all report positive =
helpful (a score that grows with how much z lowers the test loss). ``helpfulness`` returns exactly
that, −up_loss, with no 1/n and the same (k, m) layout; it is the only method in that convention
(``loo_change`` is positive for helpful points too, but carries the −1/n: ``loo_change ≈
helpfulness/n``). Every other method and ``top_k``'s scores keep the paper's sign.

**Normalised influence** (``top_k(..., normalize=...)``, see :data:`NORMALIZATIONS`). Raw up_loss
is large for training points with large, poorly-constrained gradients (high leverage): a handful of
such rows tops the harmful and helpful lists of almost every test point. Dividing by a per-training-
point norm ranks by how much of z's influence is *aimed at* the test point (Barshan et al. 2020,
RelatIF; TrackStar's unit-normalised gradients). With A = (H+λI)⁻¹, g = ∇θL(z), g_t = ∇θL(z_test):

- ``"theta"`` (RelatIF θ-relative): up_loss / ‖A g‖ = up_loss / ‖up_params(z)‖;
- ``"loss"`` (RelatIF ℓ-relative): up_loss / √(gᵀ A g) = up_loss / √(−self_influence(z));
- ``"cosine"``: up_loss / (√(g_tᵀ A g_t)·√(gᵀ A g)) = −cos_A(g_t, g), in [−1, 1] (the cosine of the two
  gradients in the A metric; −1: z's gradient points exactly along the test point's, most helpful).

They keep up_loss's sign (helpful = negative, ranked first in ``helpful_*``). A training point whose
gradient is zero has up_loss = 0 and normalised score 0 (not 0/0). ``"loss"`` and ``"cosine"`` rank
the training points of one test point identically (the cosine only divides by a per-test constant);
the cosine's scores are comparable across test points and bounded. Use raw scores for the size of an
effect (−score/n predicts the leave-one-out change); ``"loss"``/``"cosine"`` to find the training points
most specific to a prediction (whose influence is mostly on it, not everywhere); ``"theta"`` to discount
points that move the parameters a lot (the leverage itself), leaving more of the gradient's
alignment with the test point in the ranking.

Two implementations, with the same methods, parameters, shapes and signs (a linear model gives the
same numbers through both):

- :class:`~pyinfluence.LinearInfluence`: fitted pyinfluence linear models, exact, over the C++ core;
  returns numpy arrays.
- :class:`~pyinfluence.TorchInfluence`: any ``torch.nn.Module`` and per-example loss; returns torch
  tensors on its device.

Conventions for every method:

- **Test data** ``X_test, y_test``: inputs (m, *input shape) with targets/labels (m,) (numpy arrays
  or tensors), or a single point without the batch axis (then m = 1 and the m axis is kept in the
  output), or one ``(inputs, targets)`` pair as ``X_test`` with ``y_test`` omitted (TorchInfluence
  also takes a ``Dataset`` or ``DataLoader`` there).
- **Training points** ``train_idx``: None (all n, in training order), an int, a sequence/array of
  ints (negative values count from the end) or a boolean mask of length n; k is their number and
  the rows of the result follow their order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Generic, Optional, Tuple, TypeVar

__all__ = ["NORMALIZATIONS", "ArrayT", "Influence", "TopK", "check_normalize"]

#: The array type of a path's results: numpy arrays (LinearInfluence) or torch tensors (TorchInfluence).
ArrayT = TypeVar("ArrayT")

#: The values of ``top_k``'s ``normalize``: None (raw up_loss) or a normalisation (module docstring).
NORMALIZATIONS: Tuple[Optional[str], ...] = (None, "theta", "loss", "cosine")


def check_normalize(normalize: Any) -> Optional[str]:
    """``normalize`` itself if it is one of :data:`NORMALIZATIONS`, else ValueError (TypeError for a
    non-string) naming the argument and the accepted values."""
    if normalize is None:
        return None
    if not isinstance(normalize, str):
        raise TypeError(
            f"normalize must be None, 'theta', 'loss' or 'cosine', got {type(normalize).__name__} {normalize!r}"
        )
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be None, 'theta', 'loss' or 'cosine', got {normalize!r}")
    return normalize


@dataclass(frozen=True)
class TopK(Generic[ArrayT]):
    """Most helpful and most harmful training points for each of m test points.

    ``helpful_idx``/``helpful_scores`` (m, k): training indices with the most NEGATIVE ``up_loss``
    (upweighting them lowers the test loss; removing them raises it), most helpful first.
    ``harmful_idx``/``harmful_scores`` (m, k): the most POSITIVE ``up_loss``, most harmful first.
    Scores are ``up_loss`` values, I_up,loss(z, z_test) = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z) (no 1/n
    factor; the predicted leave-one-out change of the test loss is −score/n), or with
    ``top_k(..., normalize=...)`` the normalised scores (same sign; see :mod:`pyinfluence.interface`).
    Indices are int64. In the other libraries' convention (positive = helpful; :meth:`Influence.helpfulness`)
    the helpful scores are ``-helpful_scores``.

    The array type is the path's: numpy arrays from :class:`~pyinfluence.LinearInfluence`
    (``TopK[numpy.ndarray]``), torch tensors on its device from :class:`~pyinfluence.TorchInfluence`
    (``TopK[torch.Tensor]``).
    """

    helpful_idx: ArrayT
    helpful_scores: ArrayT
    harmful_idx: ArrayT
    harmful_scores: ArrayT


class Influence(abc.ABC, Generic[ArrayT]):
    """Influence functions of a trained model on its training set (Koh & Liang 2017).

    The interface both paths implement (:class:`~pyinfluence.LinearInfluence`,
    :class:`~pyinfluence.TorchInfluence`); code written against it (such as
    :mod:`pyinfluence.applications`) works with either. See the module docstring
    (:mod:`pyinfluence.interface`) for the notation, the signs, the 1/n convention and the forms of
    ``X_test``, ``y_test`` and ``train_idx`` every method accepts. Results are ``ArrayT``: numpy
    arrays on the linear path, torch tensors on the torch path.

    Methods a path cannot offer still exist and raise :class:`NotImplementedError` naming the
    alternative (:attr:`can_retrain` says beforehand whether :meth:`retrain_loo` and :meth:`refit`
    work). A subclass that misses an abstract method cannot be instantiated.
    """

    # -- sizes and capabilities ------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def n_train(self) -> int:
        """n, the number of training points."""

    @property
    @abc.abstractmethod
    def n_params(self) -> int:
        """p, the number of parameters θ (the length of the flat parameter vector)."""

    @property
    @abc.abstractmethod
    def can_retrain(self) -> bool:
        """Whether this object can refit its model: :meth:`retrain_loo` and :meth:`refit` work
        (LinearInfluence: True, exact Newton refits; TorchInfluence: False, it has no training loop)."""

    # -- the model at θ̂ ---------------------------------------------------------------------------
    @abc.abstractmethod
    def hessian(self, max_params: Optional[int] = None) -> ArrayT:
        """H = ∇²R(θ̂) (L2 term included, damping λ NOT added), shape (p, p), symmetric.

        Costs p² memory (and, on the torch path, about p Hessian-vector products over the training
        set). ``max_params``: refuse (ValueError) when p exceeds it; None = the path's default limit
        (TorchInfluence: 20 000; LinearInfluence: none, H is assembled anyway).
        """

    @abc.abstractmethod
    def gradients(self, train_idx: Any = None) -> ArrayT:
        """Per-example training-loss gradients ∇θL(z_i, θ̂) (no 1/n, no L2 term), shape (k, p)."""

    @abc.abstractmethod
    def test_gradients(self, X_test: Any, y_test: Any = None) -> ArrayT:
        """Loss gradients ∇θL(z_test, θ̂) of test points (no 1/n, no L2 term), shape (m, p)."""

    @abc.abstractmethod
    def s_test(self, X_test: Any, y_test: Any = None) -> ArrayT:
        """s_test = (H+λI)⁻¹ ∇θL(z_test) for each test point, shape (p, m).

        ``up_loss[i, j] = −∇θL(z_i)ᵀ s_test[:, j]``.
        """

    @abc.abstractmethod
    def loss(self, X_test: Any, y_test: Any = None) -> ArrayT:
        """The loss L(z, θ̂) of each test point at the model's parameters, shape (m,)."""

    @abc.abstractmethod
    def predict(self, X_test: Any) -> ArrayT:
        """The model's predictions for the inputs ``X_test`` (m, *input shape) (or one input without
        the batch axis): predicted labels for classifiers, predicted values otherwise; shape (m,)
        (or (m, outputs) for a model with several real-valued outputs)."""

    # -- influence -----------------------------------------------------------------------------
    @abc.abstractmethod
    def up_params(self, train_idx: Any = None) -> ArrayT:
        """I_up,params(z) = −(H+λI)⁻¹ ∇θL(z): dθ̂/dε for upweighting z by ε, shape (k, p).

        Removing z changes θ̂ by ≈ −(1/n)·I_up,params(z) (this method has no 1/n factor). Rows
        follow ``train_idx`` (default: all n training points).
        """

    @abc.abstractmethod
    def up_loss(self, X_test: Any, y_test: Any = None, train_idx: Any = None) -> ArrayT:
        """I_up,loss(z, z_test) = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z), shape (k, m).

        Entry [i, j]: derivative of test loss j with respect to upweighting training point i.
        Positive = harmful (upweighting raises the test loss), negative = helpful. No 1/n factor:
        the predicted leave-one-out change is −up_loss/n (see :meth:`loo_change`).
        """

    @abc.abstractmethod
    def pert_loss(self, X_test: Any, y_test: Any = None, train_idx: Any = None) -> ArrayT:
        """I_pert,loss(z, z_test) = −∇θL(z_test)ᵀ (H+λI)⁻¹ ∇x∇θL(z), shape (k, m, *input shape).

        Entry [i, j]: gradient, with respect to the input x_i of training point i, of test loss j
        after upweighting z_i (Koh & Liang §2.2): moving x_i by a small δ changes test loss j by
        ≈ (1/n)·⟨pert_loss[i, j], δ⟩ (this method has no 1/n factor). Needs real-valued inputs.
        """

    @abc.abstractmethod
    def self_influence(self, train_idx: Any = None) -> ArrayT:
        """I_up,loss(z, z) = −∇θL(z)ᵀ (H+λI)⁻¹ ∇θL(z) ≤ 0, shape (k,).

        Large magnitude = the point's own loss depends strongly on it (outliers, mislabelled
        points). No 1/n factor.
        """

    @abc.abstractmethod
    def loo_change(
        self,
        X_test: Any,
        y_test: Any = None,
        train_idx: Any = None,
        method: str = "influence",
        group: bool = False,
    ) -> ArrayT:
        """Predicted change of the test loss when training points are removed and the model refit:
        L(z_test, θ̂₋) − L(z_test, θ̂). Positive = removal raises the test loss (a helpful point).

        - ``method="influence"`` (both paths): first order, −(1/n)·up_loss, shape (k, m); with
          ``group=True`` the points in ``train_idx`` are removed together: −(1/n)·Σ_i up_loss[i],
          shape (m,).
        - ``method="newton"``: one Newton step from θ̂ on the leave-out objective (its Hessian + λI; the
          test loss evaluated exactly at the stepped parameters), same shapes. It adds the removed points'
          own curvature, which the first-order estimate leaves out.

        ``train_idx`` default: all n points, one at a time (required with ``group=True``). The model
        is refit on the mean loss over the remaining points with the same l2 (as in
        :meth:`retrain_loo`).
        """

    @abc.abstractmethod
    def helpfulness(self, X_test: Any, y_test: Any = None, train_idx: Any = None) -> ArrayT:
        """−I_up,loss(z, z_test) = ∇θL(z_test)ᵀ (H+λI)⁻¹ ∇θL(z), shape (k, m): :meth:`up_loss` in the
        convention of Captum, pyDVL, kronfluence, TRAK and dattri — **positive = helpful** (upweighting z
        lowers the test loss), negative = harmful.

        Exactly ``-up_loss(X_test, y_test, train_idx)``: same layout (training points × test points), no
        1/n factor (the predicted leave-one-out change of the test loss is helpfulness/n, see
        :meth:`loo_change`). Peers differ from it by more than the sign in places (a sum- rather than a
        mean-loss Hessian: a factor n; a (test, train) layout: a transpose; random projections or K-FAC
        curvature: not a fixed factor); the README's "Signs and other libraries" gives each conversion.
        """

    @abc.abstractmethod
    def top_k(
        self, X_test: Any, y_test: Any = None, k: int = 10, normalize: Optional[str] = None
    ) -> TopK[ArrayT]:
        """The k most helpful and k most harmful training points for each test point.

        Ranked by up_loss = −∇θL(z_test)ᵀ(H+λI)⁻¹∇θL(z): helpful = most negative first, harmful =
        most positive first. Scores have no 1/n factor (the predicted leave-one-out change of the
        test loss is −score/n). Returns :class:`TopK` with four (m, k) arrays. ``k``: 1 to n_train.

        ``normalize``: None (raw up_loss), ``"theta"`` (RelatIF θ-relative: up_loss/‖(H+λI)⁻¹∇θL(z)‖),
        ``"loss"`` (RelatIF ℓ-relative: up_loss/√(∇θL(z)ᵀ(H+λI)⁻¹∇θL(z))) or ``"cosine"`` (also divided by
        √(∇θL(z_test)ᵀ(H+λI)⁻¹∇θL(z_test)): −cos of the gradients in the (H+λI)⁻¹ metric, in [−1, 1]); the
        scores are then the normalised ones, with up_loss's sign, ranked the same way. The normalisations
        need a solve per training point (the cost of :meth:`self_influence` / :meth:`up_params` over the
        training set) besides the scoring. See the module docstring for when to use which. Any other value:
        ValueError naming ``normalize``.
        """

    # -- ground truth and refits ----------------------------------------------------------------
    @abc.abstractmethod
    def retrain_loo(
        self,
        X_test: Any,
        y_test: Any = None,
        train_idx: Any = None,
        group: bool = False,
        tol: Optional[float] = None,
        max_iter: int = 100,
        max_seconds: Optional[float] = None,
    ) -> ArrayT:
        """Actual change L(z_test, θ̂₋) − L(z_test, θ̂) after removing training points and refitting
        the model (the ground truth that :meth:`loo_change` predicts).

        One refit per index in ``train_idx`` (required) → shape (k, m); with ``group=True`` the
        points are removed together → (m,). ``tol``, ``max_iter``: the refit's convergence
        tolerance (None: the model's) and iteration limit; ``max_seconds`` (None: none): a time limit
        for the whole call, checked between refits (linear: one refit may overrun it) or between steps
        and before every conjugate-gradient iteration (torch: a step's line search may overrun it). Raises ConvergenceError if a refit does not converge or the time limit
        runs out (never a partial result), and NotImplementedError where the path cannot refit
        (:attr:`can_retrain`).
        """

    @abc.abstractmethod
    def refit(self, X_train: Any = None, y_train: Any = None) -> Influence[ArrayT]:
        """A new influence object, configured like this one (damping, dtype, device, ...), for the
        model refitted on modified training data: ``X_train`` and/or ``y_train`` replace the
        current training inputs/targets (None keeps them; same number of points).

        Raises NotImplementedError where the path cannot refit (:attr:`can_retrain`).
        """

    @abc.abstractmethod
    def training_data(self) -> Tuple[ArrayT, Any]:
        """A copy of the training set as ``(inputs, targets)`` in training order: inputs (n, *input
        shape) as the computation sees them, targets (n, ...) in the values the model was given
        (class labels, not their encoding)."""
