"""Debugging a wrong prediction, e.g. from a domain mismatch (Koh & Liang 2017, Section 5.3).

:func:`debug_prediction` lists the training points with the largest influence on one test
prediction and splits each one's influence over the input features (:func:`feature_contributions`),
so a user sees *which* training points and *which* of their features drove the prediction.

The decomposition (linear models). With θ the (K, d̃) parameter matrix (d̃ = d + 1 with the
intercept as a last feature equal to 1), every per-example gradient is an outer product
∇θL(z) = r ⊗ x̃ (r = ∂L/∂s ∈ R^K, x̃ = [x, 1]). With s_test = (H+λI)⁻¹∇θL(z_test) reshaped to
(K, d̃),

    up_loss(z, z_test) = −s_testᵀ∇θL(z) = Σ_j C_j,   C_j = −x̃_j · Σ_k r_k · s_test[k, j],

so C_j is the part of training point z's influence carried by its feature j (the intercept column
is reported as a pseudo-feature "intercept"). The contributions sum exactly to ``up_loss``
(positive = harmful: upweighting z raises the test loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._validation import as_matrix, check_int, to_numpy
from pyinfluence.applications.plotting import axes_for
from pyinfluence.applications.results import Result
from pyinfluence.linear.influence import LinearInfluence

__all__ = ["PredictionDebug", "debug_prediction", "feature_contributions", "point_gradient"]


def _require_linear(inf: Any, what: str) -> LinearInfluence:
    """``inf`` if it is a LinearInfluence: the decomposition needs the gradient structure r ⊗ x̃ of a
    linear model's (K, d̃) parameter matrix, which a general model does not have."""
    if not isinstance(inf, LinearInfluence):
        raise TypeError(
            f"{what} needs a pyinfluence LinearInfluence (per-feature contributions use the linear "
            f"model's gradient structure r ⊗ x), got {type(inf).__name__}"
        )
    return inf


def _test_point(inf: LinearInfluence, x_test: Any, y_test: Any) -> Tuple[NDArray[np.float64], Any]:
    """(x_test as a (1, d) float64 array, its label as a scalar); the label is checked against the
    model's classes by the influence methods it is passed to."""
    X = as_matrix("x_test", x_test, inf.model.n_features_in_)
    if X.shape[0] != 1:
        raise ValueError(f"x_test must be one test point, got {X.shape[0]}")
    y = to_numpy(y_test)
    if y.ndim == 1 and y.shape[0] == 1:
        y = y[0]
    if np.ndim(y) != 0:
        raise ValueError(f"y_test must be one label, got shape {np.shape(y)}")
    return X, y.item() if hasattr(y, "item") else y


def point_gradient(inf: LinearInfluence, x_test: ArrayLike, y_test: Any) -> NDArray[np.float64]:
    """∇θL(z_test, θ̂) of one test point for a LinearInfluence's model, shape (K, d̃) (the flat
    parameter vector is its row-major ravel)."""
    inf = _require_linear(inf, "point_gradient")
    X, y = _test_point(inf, x_test, y_test)
    g = np.asarray(inf.test_gradients(X, np.asarray([y])), dtype=np.float64)[0]
    return g.reshape(inf.model.theta_.shape)


def feature_contributions(
    inf: LinearInfluence, x_test: ArrayLike, y_test: Any, train_idx: Any = None
) -> NDArray[np.float64]:
    """Per-feature split of up_loss(z_i, z_test) for the training points ``train_idx`` (default
    all): shape (k, d̃), d̃ = d + 1 with the intercept last when the model has one. Row i sums to
    ``inf.up_loss(x_test, y_test, train_idx)[i, 0]`` (positive = harmful). See the module docstring
    for the formula. Cost: one solve with the factorised H + λI (``inf.s_test``) plus k·p."""
    inf = _require_linear(inf, "feature_contributions")
    X, y = _test_point(inf, x_test, y_test)
    shape = inf.model.theta_.shape  # (K, d̃)
    S = np.asarray(inf.s_test(X, np.asarray([y])), dtype=np.float64)[:, 0].reshape(shape)
    G = np.asarray(inf.gradients(train_idx), dtype=np.float64).reshape((-1, *shape))  # r_i ⊗ x̃_i
    return -(G * S[None]).sum(axis=1)


@dataclass
class PredictionDebug(Result):
    """Why did the model predict this for one test point?

    - test point: ``label``, ``prediction``, ``probability`` (of each class, if the model has
      ``predict_proba``), ``loss``;
    - ``influence`` (n,): up_loss of every training point (positive = harmful: upweighting it
      raises this test loss; removing it would lower it by ≈ influence/n);
    - ``top_idx`` (k,): the k training points with the largest |influence|, largest first;
      ``harmful_idx``/``helpful_idx`` (k,): most positive / most negative;
    - ``contributions`` (k, d̃): per-feature split of the influence of ``top_idx`` (rows sum to
      their influence); ``feature_names`` (d̃,); ``feature_share`` (d̃,): Σᵢ sign(inflᵢ)·C[i, j] /
      Σᵢ|inflᵢ| over ``top_idx`` — the fraction of the top points' influence carried by each
      feature (sums to 1); ``responsible_feature``: its argmax;
    - ``x_top`` (k, d), ``y_top`` (k,): the top points' features and labels;
    - with ``group``: ``group_mean_abs_influence``, ``rest_mean_abs_influence``, their ``ratio``,
      and ``group_in_top`` (how many of ``top_idx`` belong to the group).
    """

    label: Any
    prediction: Any
    probability: Optional[NDArray[np.float64]]
    loss: float
    influence: NDArray[np.float64]
    top_idx: NDArray[np.int64]
    harmful_idx: NDArray[np.int64]
    helpful_idx: NDArray[np.int64]
    contributions: NDArray[np.float64]
    feature_names: List[str]
    feature_share: NDArray[np.float64]
    responsible_feature: str
    x_top: NDArray[np.float64]
    y_top: np.ndarray
    group: Optional[NDArray[np.bool_]] = None
    group_mean_abs_influence: Optional[float] = None
    rest_mean_abs_influence: Optional[float] = None
    ratio: Optional[float] = None
    group_in_top: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)

    _skip_in_dict = ("group",)

    def plot(self, ax: Any = None) -> Any:
        """Three panels: influence of every training point (group members in red, top points
        circled); per-feature contributions of the top points (heat map, red = harmful); the share
        of the top points' influence carried by each feature. ``ax``: None, a Figure or three Axes.
        Returns the Figure."""
        fig, (a1, a2, a3) = axes_for(ax, 3, panel_size=(4.3, 3.6))
        n = self.influence.size
        idx = np.arange(n)
        col = np.where(self.group, "C3", "0.55") if self.group is not None else "0.55"
        a1.scatter(idx, self.influence, s=5, c=col, alpha=0.8)
        a1.scatter(
            self.top_idx,
            self.influence[self.top_idx],
            s=40,
            facecolors="none",
            edgecolors="k",
            lw=0.8,
        )
        a1.axhline(0, color="k", lw=0.5)
        a1.set_xlabel("training point")
        a1.set_ylabel("up_loss (positive = harmful)")
        ttl = f"label {self.label}, predicted {self.prediction}"
        if self.ratio is not None:
            ttl += f"\ngroup |influence| {self.ratio:.0f}x the rest"
        a1.set_title(ttl, fontsize=9)
        C = self.contributions
        v = float(np.max(np.abs(C))) if C.size else 1.0
        im = a2.imshow(C, cmap="RdBu_r", vmin=-v, vmax=v, aspect="auto")
        a2.set_yticks(np.arange(self.top_idx.size))
        a2.set_yticklabels([f"#{i} (y={y})" for i, y in zip(self.top_idx, self.y_top)], fontsize=7)
        a2.set_xticks(np.arange(len(self.feature_names)))
        a2.set_xticklabels(self.feature_names, rotation=60, ha="right", fontsize=7)
        a2.set_title("per-feature contributions", fontsize=9)
        fig.colorbar(im, ax=a2, shrink=0.8)
        share = self.feature_share
        order = np.argsort(-np.abs(share))
        a3.barh(np.arange(share.size), share[order], color=np.where(share[order] >= 0, "C3", "C0"))
        a3.set_yticks(np.arange(share.size))
        a3.set_yticklabels([self.feature_names[i] for i in order], fontsize=7)
        a3.invert_yaxis()
        a3.set_xlabel("share of the top points' influence")
        a3.set_title(f"responsible feature: {self.responsible_feature}", fontsize=9)
        return fig


def debug_prediction(
    inf: LinearInfluence,
    x_test: ArrayLike,
    y_test: Any,
    *,
    feature_names: Optional[Sequence[str]] = None,
    k: int = 5,
    group: Optional[ArrayLike] = None,
) -> PredictionDebug:
    """The most influential training points for one test prediction and the features that make
    them influential (LinearInfluence).

    ``x_test`` (d,) or (1, d), ``y_test``: the test point and its TRUE label (influence is on the
    loss at the true label, so a wrong prediction's "harmful" points are those pushing it wrong).
    ``feature_names`` (d,): default "x0".."x{d−1}" ("intercept" is appended for the intercept
    column). ``k``: how many top points. ``group`` (n,) bool: optional subgroup of the training set
    (e.g. the under-represented one) for the influence ratio. Returns :class:`PredictionDebug`.
    """
    inf = _require_linear(inf, "debug_prediction")
    model = inf.model
    n = inf.n_train
    d = model.n_features_in_
    k = check_int("k", k, 1, n)
    if feature_names is None:
        names = [f"x{j}" for j in range(d)]
    else:
        names = [str(s) for s in feature_names]
        if len(names) != d:
            raise ValueError(f"feature_names has {len(names)} names but the model has {d} features")
    if model.fit_intercept:
        names = names + ["intercept"]
    X, y = _test_point(inf, x_test, y_test)
    y_arr = np.asarray([y])
    infl = np.asarray(inf.up_loss(X, y_arr), dtype=np.float64)[:, 0]
    top = np.argsort(-np.abs(infl), kind="stable")[:k].astype(np.int64)
    harmful = np.argsort(-infl, kind="stable")[:k].astype(np.int64)
    helpful = np.argsort(infl, kind="stable")[:k].astype(np.int64)
    C = feature_contributions(inf, X, y_arr, top)
    tot = float(np.abs(infl[top]).sum())
    share = (np.sign(infl[top])[:, None] * C).sum(axis=0) / tot if tot > 0 else np.zeros(C.shape[1])
    X_train, y_train = inf.training_data()
    prob = None
    if hasattr(model, "predict_proba"):
        prob = np.asarray(model.predict_proba(X), dtype=np.float64)[0]
    pred = model.predict(X)[0]
    loss = float(model.loss(X, y_arr)[0])
    out = PredictionDebug(
        label=y,
        prediction=pred.item() if hasattr(pred, "item") else pred,
        probability=prob,
        loss=loss,
        influence=infl,
        top_idx=top,
        harmful_idx=harmful,
        helpful_idx=helpful,
        contributions=C,
        feature_names=names,
        feature_share=share,
        responsible_feature=names[int(np.argmax(share))],
        x_top=np.asarray(X_train[top], dtype=np.float64),
        y_top=y_train[top],
    )
    if group is not None:
        gm = np.asarray(to_numpy(group)).astype(bool).ravel()
        if gm.size != n:
            raise ValueError(f"group has {gm.size} entries for {n} training points")
        out.group = gm
        if gm.any() and (~gm).any():
            g_mean = float(np.abs(infl[gm]).mean())
            r_mean = float(np.abs(infl[~gm]).mean())
            out.group_mean_abs_influence = g_mean
            out.rest_mean_abs_influence = r_mean
            out.ratio = g_mean / r_mean if r_mean > 0 else float("inf")
        out.group_in_top = int(gm[top].sum())
    return out
