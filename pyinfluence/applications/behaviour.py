"""Understanding model behaviour (Koh & Liang 2017, Section 5.1 and Figure 4).

Two models with different inductive biases lean on different training points for the same test
prediction. The paper compared an RBF-kernel SVM, whose influential training points are the ones
close to the test image in pixel space, with Inception, whose helpful images can be far away in
pixel space but share the class. :func:`compare_models` computes, for a few test points and any
number of models, the most helpful and harmful training points under each model and the influence
of every training point against its pixel-space distance to the test point;
:func:`rbf_features` builds the RBF model's inputs (a linear model on RBF features is an RBF-kernel
machine with the chosen centres).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from numpy.typing import ArrayLike, NDArray

from pyinfluence._json import jsonable
from pyinfluence._validation import as_labels, as_matrix, check_int, to_numpy
from pyinfluence.applications.plotting import new_figure, show_image
from pyinfluence.applications.results import Result
from pyinfluence.interface import Influence

__all__ = ["ModelComparison", "compare_models", "rbf_features", "rbf_gamma"]


def rbf_gamma(centers: ArrayLike, rule: str = "scale") -> float:
    """A bandwidth γ for :func:`rbf_features` computed from the centres only (so train and test
    features agree): ``"scale"``: 1 / (D · Var(centers)) (scikit-learn's SVC default);
    ``"median"``: 1 / median of the squared distances between centres."""
    C = as_matrix("centers", centers)
    if rule == "scale":
        v = float(C.var())
        if v <= 0:
            raise ValueError("centers have zero variance; pass gamma explicitly")
        return 1.0 / (C.shape[1] * v)
    if rule == "median":
        sq = (C * C).sum(axis=1)
        D = sq[:, None] + sq[None, :] - 2.0 * C @ C.T
        off = D[~np.eye(C.shape[0], dtype=bool)]
        med = float(np.median(np.maximum(off, 0.0))) if off.size else 0.0
        if med <= 0:
            raise ValueError("the median squared distance between centers is 0; pass gamma explicitly")
        return 1.0 / med
    raise ValueError(f"gamma rule must be 'scale' or 'median', got {rule!r}")


def rbf_features(X: ArrayLike, centers: ArrayLike, gamma: Union[float, str] = "scale") -> NDArray[np.float64]:
    """RBF features φ(x)_c = exp(−γ‖x − c‖²) for each centre c: shape (n, n_centers).

    A linear model (``LogisticRegression``, ``SmoothHingeSVM``) on these features is the paper's
    "RBF SVM" with the centres as support (use the training inputs, or a subset, as ``centers``).
    For influence concentrated on near neighbours, as in the paper's Figure 4, use a narrow kernel:
    on digits (pixels in [0, 1], 1 vs 7, all training images as centres, logistic loss) with
    γ = 10·rbf_gamma(centers, "median") the 5 most helpful training images lie at 0.43–0.45 of the
    average pixel distance, versus 0.74 for logistic regression on the pixels (γ = 1× the median
    rule: 0.78–0.82, i.e. not local). A smooth-hinge SVM gives confidently classified test points a
    vanishing loss gradient, hence influence ~0 everywhere; the logistic loss does not.
    ``gamma``: a positive number, or a rule of :func:`rbf_gamma` ("scale", "median") — computed from
    the centres, so the same call works for training and test inputs."""
    Xa = as_matrix("X", X)
    C = as_matrix("centers", centers, Xa.shape[1])
    if isinstance(gamma, str):
        g = rbf_gamma(C, gamma)
    else:
        g = float(gamma)
        if not np.isfinite(g) or g <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
    D = (Xa * Xa).sum(axis=1)[:, None] + (C * C).sum(axis=1)[None, :] - 2.0 * Xa @ C.T
    np.maximum(D, 0.0, out=D)
    return np.exp(-g * D)


def _ranks(a: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1 with ties given their average rank."""
    order = np.argsort(a, kind="stable")
    r = np.empty(a.size, dtype=np.float64)
    r[order] = np.arange(a.size)
    _, inv, counts = np.unique(a, return_inverse=True, return_counts=True)
    if counts.max(initial=1) > 1:
        sums = np.bincount(inv, weights=r)
        r = sums[inv] / counts[inv]
    return r


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = _ranks(a), _ranks(b)
    sa, sb = ra.std(), rb.std()
    if sa == 0 or sb == 0:
        return float("nan")
    return float(np.mean((ra - ra.mean()) * (rb - rb.mean())) / (sa * sb))


@dataclass
class ModelComparison(Result):
    """Influential training points of several models for the same test points.

    For model ``name`` and test point j (of m), over the n training points:
    - ``influence[name]`` (m, n): up_loss(z_i, z_test_j) (negative = helpful);
    - ``helpful_idx[name]``/``harmful_idx[name]`` (m, k): most negative / most positive first,
      with ``helpful_scores``/``harmful_scores``;
    - ``distance`` (m, n): Euclidean distance in pixel (input) space between test point j and
      every training point; ``same_label`` (m, n): whether the training label equals the test label;
    - ``stats[name][j]``: ``spearman_abs_influence_distance`` (rank correlation of |influence| with
      distance: strongly negative = only nearby points matter), ``helpful_same_label`` (fraction of
      the top-k helpful with the test label), ``helpful_mean_distance`` / ``mean_distance`` and
      their ratio ``helpful_distance_ratio`` (small = the helpful points are near neighbours).
    Images for plotting: ``train_images`` (n, ...), ``test_images`` (m, ...), ``image_shape``.
    """

    names: List[str]
    influence: Dict[str, NDArray[np.float64]]
    helpful_idx: Dict[str, NDArray[np.int64]]
    helpful_scores: Dict[str, NDArray[np.float64]]
    harmful_idx: Dict[str, NDArray[np.int64]]
    harmful_scores: Dict[str, NDArray[np.float64]]
    distance: NDArray[np.float64]
    same_label: NDArray[np.bool_]
    y_train: np.ndarray
    y_test: np.ndarray
    stats: Dict[str, List[Dict[str, float]]]
    k: int
    image_shape: Optional[Tuple[int, ...]] = None
    train_images: Optional[np.ndarray] = None
    test_images: Optional[np.ndarray] = None
    test_index: Optional[NDArray[np.int64]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    _skip_in_dict = (
        "train_images",
        "test_images",
        "influence",
        "distance",
        "same_label",
        "y_train",
    )

    def to_dict(self, include_arrays: bool = False) -> Dict[str, Any]:
        """The top lists and statistics; with ``include_arrays`` also the (m, n) influence,
        distance and same-label matrices (for scatter plots elsewhere)."""
        d = super().to_dict()
        if include_arrays:
            d["influence"] = jsonable(self.influence)
            d["distance"] = jsonable(self.distance)
            d["same_label"] = jsonable(self.same_label)
            d["y_train"] = jsonable(self.y_train)
        return d

    def plot(self, test_point: int = 0, fig: Any = None, *, k: Optional[int] = None) -> Any:
        """Figure 4 for one test point: the test image; per model a row of the k most helpful and a
        row of the k most harmful training images (titled with label and up_loss); and per model
        a scatter of influence against pixel-space distance (same label as the test point in blue,
        other labels in red). Needs ``image_shape``; without images only the scatters are drawn.
        Returns the Figure."""
        m = self.distance.shape[0]
        j = check_int("test_point", test_point, 0, m - 1)
        k = self.k if k is None else min(check_int("k", k, 1), self.k)
        M = len(self.names)
        train_images = self.train_images
        show = self.image_shape is not None and train_images is not None
        rows = (2 * M if show else 0) + 1
        ncols = max(k + 1, M)
        if fig is None:
            fig = new_figure((1.35 * ncols + 0.5, 1.45 * (rows - 1) + 3.2))
        elif not hasattr(fig, "savefig"):
            raise TypeError("fig must be None or a matplotlib Figure")
        if show:
            top, bottom = fig.subfigures(2, 1, height_ratios=[1.45 * (rows - 1), 3.2])
            gs = top.subplots(rows - 1, k + 1, squeeze=False)
            for r in range(rows - 1):
                name = self.names[r // 2]
                kind = "helpful" if r % 2 == 0 else "harmful"
                idx = (self.helpful_idx if kind == "helpful" else self.harmful_idx)[name][j][:k]
                sc = (self.helpful_scores if kind == "helpful" else self.harmful_scores)[name][j][:k]
                a0 = gs[r, 0]
                if r == 0 and self.test_images is not None:
                    show_image(a0, self.test_images[j], self.image_shape, title=f"test, y={self.y_test[j]}")
                else:
                    a0.axis("off")
                a0.text(
                    -0.15,
                    0.5,
                    f"{name}\n{kind}",
                    transform=a0.transAxes,
                    ha="right",
                    va="center",
                    fontsize=8,
                )
                for c, (i, s) in enumerate(zip(idx, sc), start=1):
                    assert train_images is not None  # (show)
                    show_image(
                        gs[r, c],
                        train_images[i],
                        self.image_shape,
                        title=f"y={self.y_train[i]}\n{s:.3g}",
                    )
        else:
            bottom = fig
        sax = bottom.subplots(1, M, squeeze=False)[0]
        same = self.same_label[j]
        for a, name in zip(sax, self.names):
            infl = self.influence[name][j]
            a.scatter(self.distance[j][same], infl[same], s=6, alpha=0.6, color="C0", label="same label")
            a.scatter(
                self.distance[j][~same],
                infl[~same],
                s=6,
                alpha=0.6,
                color="C3",
                label="other label",
            )
            a.axhline(0, color="k", lw=0.5)
            a.set_xlabel("pixel-space distance to test image")
            a.set_ylabel("up_loss (negative = helpful)")
            st = self.stats[name][j]
            a.set_title(
                f"{name}: Spearman(|infl|, dist) = {st['spearman_abs_influence_distance']:.2f}",
                fontsize=9,
            )
            a.legend(fontsize=7)
        return fig


def compare_models(
    influences: Mapping[str, Influence],
    X_train: ArrayLike,
    y_train: ArrayLike,
    X_test: ArrayLike,
    y_test: ArrayLike,
    *,
    test_inputs: Optional[Mapping[str, Tuple[Any, Any]]] = None,
    k: int = 5,
    image_shape: Optional[Sequence[int]] = None,
    train_images: Optional[ArrayLike] = None,
    test_images: Optional[ArrayLike] = None,
    test_index: Optional[ArrayLike] = None,
) -> ModelComparison:
    """Most helpful/harmful training points and influence-versus-distance for several models.

    - ``influences``: {name: influence object} — :class:`~pyinfluence.interface.Influence` objects
      (LinearInfluence, TorchInfluence; only ``up_loss(X_test, y_test)`` is used, returning (n, m)
      numpy or torch), all on the same n training points in the same order.
    - ``X_train`` (n, D), ``X_test`` (m, D): the points in PIXEL (raw input) space, for distances;
      ``y_train`` (n,), ``y_test`` (m,): labels.
    - ``test_inputs``: {name: (X, y)} the test points as each model takes them (e.g. RBF features
      for the RBF model, (m, 1, 8, 8) tensors for a CNN); default ``(X_test, y_test)`` for all.
    - ``k``: top points per list. ``image_shape`` with ``train_images``/``test_images`` (default
      X_train/X_test) for the image grids of :meth:`ModelComparison.plot`.
    Returns :class:`ModelComparison`.
    """
    if not isinstance(influences, Mapping) or not influences:
        raise ValueError("influences must be a non-empty dict {name: influence object}")
    Xtr = as_matrix("X_train", X_train)
    n = Xtr.shape[0]
    Xte = as_matrix("X_test", X_test, Xtr.shape[1])
    m = Xte.shape[0]
    ytr = as_labels("y_train", y_train, n)
    yte = as_labels("y_test", y_test, m)
    k = check_int("k", k, 1, n)
    names = [str(s) for s in influences]
    test_inputs = dict(test_inputs or {})
    for name in test_inputs:
        if name not in influences:
            raise ValueError(f"test_inputs names {name!r}, which is not among influences {names}")
    sq_tr = (Xtr * Xtr).sum(axis=1)
    D = (Xte * Xte).sum(axis=1)[:, None] + sq_tr[None, :] - 2.0 * Xte @ Xtr.T
    dist = np.sqrt(np.maximum(D, 0.0))
    same = yte[:, None] == ytr[None, :]
    infl: Dict[str, np.ndarray] = {}
    h_idx, h_sc, r_idx, r_sc = {}, {}, {}, {}
    stats: Dict[str, List[Dict[str, float]]] = {}
    for name, obj in influences.items():
        name = str(name)
        Xq, yq = test_inputs.get(name, (X_test, y_test))
        up = to_numpy(obj.up_loss(Xq, yq), np.float64)
        if up.ndim != 2 or up.shape != (n, m):
            raise ValueError(
                f"influences[{name!r}].up_loss returned shape {up.shape}; "
                f"expected (n_train, n_test) = ({n}, {m})"
            )
        U = up.T.copy()  # (m, n)
        infl[name] = U
        order = np.argsort(U, axis=1, kind="stable")
        h_idx[name] = order[:, :k].astype(np.int64)
        r_idx[name] = order[:, ::-1][:, :k].astype(np.int64)
        h_sc[name] = np.take_along_axis(U, h_idx[name], axis=1)
        r_sc[name] = np.take_along_axis(U, r_idx[name], axis=1)
        stats[name] = [
            {
                "spearman_abs_influence_distance": _spearman(np.abs(U[j]), dist[j]),
                "helpful_same_label": float(same[j, h_idx[name][j]].mean()),
                "harmful_same_label": float(same[j, r_idx[name][j]].mean()),
                "helpful_mean_distance": float(dist[j, h_idx[name][j]].mean()),
                "mean_distance": float(dist[j].mean()),
                "helpful_distance_ratio": float(dist[j, h_idx[name][j]].mean() / dist[j].mean())
                if dist[j].mean() > 0
                else float("nan"),
            }
            for j in range(m)
        ]
    return ModelComparison(
        names=names,
        influence=infl,
        helpful_idx=h_idx,
        helpful_scores=h_sc,
        harmful_idx=r_idx,
        harmful_scores=r_sc,
        distance=dist,
        same_label=same,
        y_train=ytr,
        y_test=yte,
        stats=stats,
        k=k,
        image_shape=None if image_shape is None else tuple(int(s) for s in image_shape),
        train_images=to_numpy(train_images) if train_images is not None else Xtr,
        test_images=to_numpy(test_images) if test_images is not None else Xte,
        test_index=None if test_index is None else np.asarray(test_index, dtype=np.int64).ravel(),
    )
