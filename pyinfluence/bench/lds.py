"""Does an attribution predict retraining? The retraining-based measures of ``pyinfluence bench``:
the linear datamodeling score (LDS), brittleness and mislabel-detection AUC.

Scores everywhere are in pyinfluence's ``up_loss`` convention: ``scores[i, j] = I_up,loss(z_i,
z_test_j) = −g_testjᵀ (H + λI)⁻¹ g_i`` (no 1/n; negative = helpful: upweighting z_i lowers test loss j).

**LDS** (Park et al. 2023, "TRAK", Definition 2.3). Draw M random subsets S_1..S_M of the training
set, each of exactly ``round(α·n)`` points (:func:`make_subsets`; α = 0.5 as in TRAK and dattri),
retrain the task's model on each with the task's own trainer (:func:`retrain_subsets`; the same
initial seed for every subset, so the models differ only by their data) and record the actual
test losses L(z_test_j, θ̂_S). The attribution's prediction for subset S and test point j is
``Σ_{i∈S} scores[i, j]``: training on S removes the complement, whose first-order predicted
change of test loss j is −(1/n) Σ_{i∉S} up_loss[i, j] = −(1/n) Σ_i up_loss[i, j] + (1/n) Σ_{i∈S}
up_loss[i, j] — a constant plus (1/n) Σ_{i∈S} up_loss[i, j], so over the subsets it ranks exactly
as Σ_{i∈S} scores[i, j]. ``LDS_j`` = Spearman ρ over the M subsets between these sums and the actual
test losses (:func:`lds`); reported: the per-test values, their mean and standard error
(sample std / √m over the test points where LDS is defined). Where the predictions or the actual
losses are constant over the subsets (e.g. an all-zero score column) ρ is undefined: that test
point gets NaN, is excluded from the mean and counted in ``n_undefined``.

Loss or margin? TRAK and dattri report LDS on the correct-class margin φ = log(p_y / (1 − p_y)) =
s_y − logsumexp_{k≠y} s_k. For cross-entropy the test loss is softplus(−φ), a strictly decreasing
function of φ, so over the subsets the actual loss ranks exactly in reverse of the actual margin;
and per test point ∇θ loss = −σ(−φ)·∇θ φ (parallel gradients, a negative factor fixed at θ̂), so
the influence scores on the margin are the loss scores times one negative number per test point,
and their subset sums rank in reverse too. The two sign flips cancel: with scores computed for the
same quantity as the outputs, the loss-based LDS computed here equals the margin-based one (up to
rank ties). This is a statement about the measure, not about how good any estimate is; the
margins are kept in :class:`SubsetRetrains` for whoever wants them.

**Brittleness** (Ilyas et al. 2022, datamodels; TRAK §4): for a test point the model classifies
correctly, the smallest number k of its most helpful training points (most negative
``scores[:, j]``) whose removal, followed by retraining, flips its predicted class
(:func:`brittleness`).

**Mislabel AUC**: the ROC AUC of |self-influence| (larger = more suspicious) against the set of
deliberately flipped labels (:func:`mislabel_auc`, :func:`roc_auc`).

Retraining is cached on disk (``cache_dir``): one subfolder per (task, trainer settings, data,
subsets, seed), keyed by a SHA-256 of all of them; each retrained model's outputs on the test points
are written as ``.npy`` plus a JSON record as soon as it is trained (the JSON, written last and
atomically, marks the item complete), so an interrupted run resumes where it stopped and comparing
many attributions costs the retraining once. Models themselves are not stored; nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from pyinfluence._json import jsonable
from pyinfluence._validation import as_index_array, check_bool, check_float, check_int, check_rng_seed
from pyinfluence.applications.progress import progress_iter
from pyinfluence.applications.results import Result
from pyinfluence.bench.metrics import as_matrix, rankdata, spearman
from pyinfluence.bench.tasks import Task, _class_index, _outputs, _predicted_class

__all__ = [
    "DEFAULT_N_SUBSETS",
    "DEFAULT_SIZES",
    "BrittlenessResult",
    "LDSResult",
    "SubsetRetrains",
    "brittleness",
    "lds",
    "make_subsets",
    "mislabel_auc",
    "retrain_subsets",
    "roc_auc",
]

#: Number of random subsets M by default: dattri's ``retrain_lds`` default (``num_subsets=100``,
#: ``subset_ratio=0.5``); TRAK's protocol fixes α = 0.5 (subsets of half the training set).
DEFAULT_N_SUBSETS = 100
#: Removal sizes tried by :func:`brittleness` by default (those below n_train are used).
DEFAULT_SIZES = (5, 10, 20, 40, 80, 160, 320)
_FORMAT = "pyinfluence.bench.lds/1"
_CONST_RTOL = 1e-12  # a vector whose spread is below this fraction of its magnitude is constant


# ================================================================================================
# subsets
# ================================================================================================
def make_subsets(
    n: int, n_subsets: int = DEFAULT_N_SUBSETS, fraction: float = 0.5, seed: int = 0
) -> NDArray[np.bool_]:
    """Random training subsets for the LDS: a boolean array (n_subsets, n), each row with exactly
    ``round(fraction·n)`` True entries (Python's round; the protocol of TRAK / dattri: α = 0.5),
    drawn uniformly without replacement, row by row, from ``np.random.default_rng(seed)``.

    Default ``n_subsets`` = :data:`DEFAULT_N_SUBSETS` = 100, dattri's default for LDS retraining.
    Raises ValueError when a subset would be empty or the whole training set (no variation).
    """
    n = check_int("n", n, 2)
    n_subsets = check_int("n_subsets", n_subsets, 2)
    fraction = check_float("fraction", fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    seed = check_rng_seed("seed", seed)
    k = int(round(fraction * n))
    if not 1 <= k <= n - 1:
        raise ValueError(
            f"fraction={fraction:g} of n={n} gives subsets of {k} points; they must hold between 1 and n - 1"
        )
    rng = np.random.default_rng(seed)
    masks = np.zeros((n_subsets, n), dtype=bool)
    for r in range(n_subsets):
        masks[r, rng.choice(n, size=k, replace=False)] = True
    return masks


def _check_masks(masks: Any, n: int) -> NDArray[np.bool_]:
    if hasattr(masks, "detach") and hasattr(masks, "cpu"):
        masks = masks.detach().cpu().numpy()
    a = np.asarray(masks)
    if a.dtype != np.bool_:
        raise TypeError(f"masks must be a boolean array (n_subsets, n_train), got dtype {a.dtype}")
    if a.ndim != 2 or a.shape[1] != n:
        raise ValueError(
            f"masks must have shape (n_subsets, {n}) (one column per training point), got {a.shape}"
        )
    if a.shape[0] < 1:
        raise ValueError("masks has no rows: at least one subset is needed")
    sizes = a.sum(axis=1)
    if sizes.min() < 1:
        raise ValueError(f"masks row {int(np.argmin(sizes))} is empty: every subset needs a training point")
    return np.ascontiguousarray(a)


# ================================================================================================
# the on-disk cache of retrained models' test outputs
# ================================================================================================
def _task_digest(task: Task) -> Dict[str, Any]:
    """What identifies the models a task's trainer produces: spec, trainer settings and a SHA-256
    of the data (train and test) and of the task's current weights (warm starts begin there)."""
    h = hashlib.sha256()
    tensors = [task.X_train, task.y_train, task.X_test, task.y_test, *list(task.model.parameters())]
    for t in tensors:
        a = t.detach().cpu().contiguous()
        h.update(f"{a.dtype}{tuple(a.shape)}".encode())
        h.update(a.numpy().tobytes())
    if task.y_train_np is not None:
        h.update(repr(np.asarray(task.y_train_np).tolist()).encode())
    return {
        "task": task.name,
        "kind": task.kind,
        "spec": jsonable(task.spec),
        "trainer": jsonable(task.trainer_settings()),
        "data_and_weights_sha256": h.hexdigest(),
    }


class _Store:
    """A cache folder: ``manifest.json`` (the full key), then per item ``<item>.npy`` (the outputs,
    float64) and ``<item>.json`` (scalars; written last and atomically: its presence marks the
    item complete)."""

    def __init__(self, cache_dir: Union[str, os.PathLike[str]], prefix: str, key: Dict[str, Any], m: int):
        text = json.dumps(jsonable(key), sort_keys=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)
        self.path = Path(cache_dir) / f"{safe}-{digest[:20]}"
        self.m = m
        self.path.mkdir(parents=True, exist_ok=True)
        manifest = self.path / "manifest.json"
        if manifest.exists():
            try:
                old = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(
                    f"cache_dir: unreadable manifest {manifest} ({exc}); remove the folder"
                ) from exc
            if old.get("digest") != digest:
                raise ValueError(
                    f"cache_dir: {self.path} holds another experiment (digest mismatch); remove it"
                )
        else:
            self._atomic_write(
                manifest,
                json.dumps({"format": _FORMAT, "digest": digest, "key": json.loads(text)}, indent=1).encode(),
            )

    @staticmethod
    def _atomic_write(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def load(self, item: str) -> Optional[tuple[NDArray[np.float64], Dict[str, Any]]]:
        rec, arr = self.path / f"{item}.json", self.path / f"{item}.npy"
        if not (rec.exists() and arr.exists()):
            return None
        try:
            scalars = json.loads(rec.read_text())
            out = np.load(arr, allow_pickle=False)
        except (OSError, ValueError):
            return None  # a damaged item is retrained
        if out.shape != (3, self.m) or not np.isfinite(out).all():
            return None
        return np.asarray(out, dtype=np.float64), scalars

    def save(self, item: str, out: NDArray[np.float64], scalars: Dict[str, Any]) -> None:
        tmp = self.path / f".{item}.npy.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(out, dtype=np.float64), allow_pickle=False)
        os.replace(tmp, self.path / f"{item}.npy")
        self._atomic_write(self.path / f"{item}.json", json.dumps(jsonable(scalars)).encode())


def _evaluate(trained: Any, task: Task, what: str) -> NDArray[np.float64]:
    """(3, m): test losses, predicted classes and correct-class margins of a retrained model."""
    out = np.stack(
        [
            np.asarray(trained.losses(task.X_test, task.y_test), dtype=np.float64).reshape(-1),
            np.asarray(trained.predict(task.X_test), dtype=np.float64).reshape(-1),
            np.asarray(trained.margins(task.X_test, task.y_test), dtype=np.float64).reshape(-1),
        ]
    )
    if out.shape != (3, task.m_test):
        raise ValueError(
            f"{what}: the retrained model gave outputs of shape {out.shape[1:]}, expected ({task.m_test},)"
        )
    if not np.isfinite(out).all():
        raise ValueError(
            f"{what}: the retrained model gives non-finite test losses or margins (training diverged?)"
        )
    return out


# ================================================================================================
# retraining on the subsets
# ================================================================================================
@dataclass
class SubsetRetrains(Result):
    """Models retrained on training subsets, evaluated on the task's test points.

    ``masks`` (M, n) bool: the subsets; ``losses`` (M, m): test losses L(z_test_j, θ̂_S);
    ``predictions`` (M, m) int64: predicted class indices; ``margins`` (M, m): correct-class
    margins φ (see :meth:`TrainedModel.margins <pyinfluence.bench.tasks.TrainedModel.margins>`);
    ``test_classes`` (m,): the true class indices; ``grad_norms`` (M,): ‖∇R_S‖ each fit reached;
    ``seconds`` (M,): training time of each (as recorded when it was trained, also if read from the
    cache); ``n_trained``: models trained by this call (0 = all from the cache); ``seed``: the
    initial-weight seed (deep, cold start; None otherwise); ``warm_start``; ``trainer``: the
    task's trainer settings; ``cache_path``: the cache folder (None = no cache).
    ``to_dict()`` leaves out the masks (``n_subsets``, ``subset_size`` summarise them).
    """

    task: str
    masks: NDArray[np.bool_]
    losses: NDArray[np.float64]
    predictions: NDArray[np.int64]
    margins: NDArray[np.float64]
    test_classes: NDArray[np.int64]
    grad_norms: NDArray[np.float64]
    seconds: NDArray[np.float64]
    n_trained: int
    seed: Optional[int]
    warm_start: bool
    trainer: Dict[str, Any] = field(default_factory=dict)
    cache_path: Optional[str] = None

    _skip_in_dict = ("masks",)

    @property
    def n_subsets(self) -> int:
        return int(self.masks.shape[0])

    @property
    def n_train(self) -> int:
        return int(self.masks.shape[1])

    @property
    def m_test(self) -> int:
        return int(self.losses.shape[1])

    def accuracy(self) -> NDArray[np.float64]:
        """Test accuracy of each retrained model, (M,)."""
        return np.mean(self.predictions == self.test_classes[None, :], axis=1)

    def to_dict(self) -> Dict[str, Any]:
        d = super().to_dict()
        sizes = self.masks.sum(axis=1)
        d.update(
            n_subsets=self.n_subsets,
            n_train=self.n_train,
            subset_size={"min": int(sizes.min()), "max": int(sizes.max())},
            total_seconds=float(np.sum(self.seconds)),
        )
        return d


def retrain_subsets(
    task: Task,
    masks: Any,
    *,
    cache_dir: Optional[Union[str, os.PathLike[str]]] = None,
    seed: Optional[int] = None,
    warm_start: bool = False,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> SubsetRetrains:
    """One model per subset, trained by the task's own trainer (:meth:`Task.retrain`) on the rows
    ``masks[k]`` and evaluated on the task's test points.

    ``masks``: (M, n_train) bool (e.g. :func:`make_subsets`). ``seed``: initial weights of every
    model (deep tasks; None = the task's own seed; the same for all subsets, so the models differ
    only by their training data); ignored by linear tasks (a strictly convex objective, fitted by
    Newton from θ = 0). ``warm_start=True``: start each fit at the task's trained weights instead
    (cheaper; not the TRAK protocol for deep models). ``cache_dir``: a folder for the on-disk cache
    (None = no cache); a subfolder is keyed by a SHA-256 of the task (spec, trainer settings, data,
    weights), the masks, the seed and ``warm_start``; each model's test outputs are written as soon
    as it is trained, so a second call with the same arguments trains nothing and an interrupted
    one resumes. ``progress``: a tqdm bar (if installed). ``log``: called with one line per model.
    Deterministic: the same arguments give the same numbers (float64, CPU).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a pyinfluence.bench.tasks.Task, got {type(task).__name__}")
    masks = _check_masks(masks, task.n_train)
    warm_start = check_bool("warm_start", warm_start)
    if seed is not None:
        seed = check_rng_seed("seed", seed)
        if warm_start:
            raise ValueError(
                "seed and warm_start=True exclude each other: a warm start begins at the trained weights"
            )
    if log is not None and not callable(log):
        raise TypeError(f"log must be callable or None, got {type(log).__name__}")
    trainer = task.trainer_settings()
    used_seed: Optional[int] = None
    if task.kind != "linear" and not warm_start:
        used_seed = task._init_seed() if seed is None else seed
    M, m = masks.shape[0], task.m_test
    store = None
    if cache_dir is not None:
        key = {
            "what": "subset retrains",
            **_task_digest(task),
            "masks_shape": list(masks.shape),
            "masks_sha256": hashlib.sha256(np.packbits(masks, axis=1).tobytes()).hexdigest(),
            "seed": used_seed,
            "warm_start": warm_start,
        }
        store = _Store(cache_dir, f"lds-{task.name}", key, m)
    outs = np.empty((M, 3, m), dtype=np.float64)
    grad_norms = np.empty(M, dtype=np.float64)
    seconds = np.empty(M, dtype=np.float64)
    n_trained = 0
    for k in progress_iter(range(M), enabled=bool(progress), total=M, desc=f"LDS retraining {task.name}"):
        item = f"subset_{k:05d}"
        hit = store.load(item) if store is not None else None
        if hit is None:
            trained = task.retrain(masks[k], seed=seed, warm_start=warm_start)
            out = _evaluate(trained, task, f"subset {k}")
            scalars: Dict[str, Any] = {
                "grad_norm": trained.grad_norm,
                "seconds": trained.seconds,
                "iterations": trained.iterations,
            }
            if store is not None:
                store.save(item, out, scalars)
            n_trained += 1
            source = "trained"
        else:
            out, scalars = hit
            source = "cached"
        outs[k] = out
        grad_norms[k] = float(scalars.get("grad_norm", math.nan))
        seconds[k] = float(scalars.get("seconds", math.nan))
        if log is not None:
            log(
                f"{task.name} subset {k + 1}/{M} ({int(masks[k].sum())} points): {source}, "
                f"|grad R| = {grad_norms[k]:.2e}, {seconds[k]:.2f} s"
            )
    return SubsetRetrains(
        task=task.name,
        masks=masks,
        losses=np.ascontiguousarray(outs[:, 0]),
        predictions=np.rint(outs[:, 1]).astype(np.int64),
        margins=np.ascontiguousarray(outs[:, 2]),
        test_classes=_class_index(task.y_test),
        grad_norms=grad_norms,
        seconds=seconds,
        n_trained=n_trained,
        seed=used_seed,
        warm_start=warm_start,
        trainer=trainer,
        cache_path=None if store is None else str(store.path),
    )


# ================================================================================================
# LDS
# ================================================================================================
@dataclass
class LDSResult(Result):
    """Linear datamodeling score of one attribution (see the module docstring).

    ``per_test`` (m,): Spearman ρ per test point over the subsets (NaN where undefined);
    ``mean`` and ``se`` (sample std / √m_defined; NaN with fewer than 2 defined points) over the
    defined test points; ``n_test``; ``n_undefined`` and ``undefined`` (their test indices: the
    predicted or the actual values are constant over the subsets); ``n_subsets``.
    ``to_dict()`` writes NaN as null.
    """

    per_test: NDArray[np.float64]
    mean: float
    se: float
    n_test: int
    n_undefined: int
    undefined: List[int]
    n_subsets: int


def _is_constant(v: NDArray[np.float64]) -> bool:
    span = float(v.max() - v.min())
    return span <= _CONST_RTOL * float(np.abs(v).max())


def lds(scores: Any, retrains: SubsetRetrains) -> LDSResult:
    """The LDS of ``scores`` (n_train, m_test) — up_loss convention, numpy or torch — against
    the retrained models ``retrains`` (:func:`retrain_subsets` on the same task).

    Per test point j: ρ_j = Spearman over the M subsets S_k between the predicted output
    Σ_{i∈S_k} scores[i, j] (= masks @ scores) and the actual test loss ``retrains.losses[k, j]``.
    Higher is better (1: the attribution ranks the subsets' effects on test point j exactly).
    Raises ValueError for mismatched shapes, non-finite scores, fewer than 3 subsets, and when ρ
    is undefined for every test point.
    """
    if not isinstance(retrains, SubsetRetrains):
        raise TypeError(
            f"retrains must be a SubsetRetrains (from retrain_subsets), got {type(retrains).__name__}"
        )
    S = as_matrix(scores, "scores")
    want = (retrains.n_train, retrains.m_test)
    if S.shape != want:
        raise ValueError(
            f"scores must have shape (n_train, m_test) = {want} to match retrains, got {S.shape}"
        )
    if not np.isfinite(S).all():
        raise ValueError("scores contains NaN or infinite values")
    if retrains.n_subsets < 3:
        raise ValueError(f"retrains has {retrains.n_subsets} subsets; a rank correlation needs at least 3")
    pred = retrains.masks.astype(np.float64) @ S  # (M, m): Σ_{i∈S_k} scores[i, j]
    actual = retrains.losses
    m = S.shape[1]
    rho = np.full(m, np.nan)
    for j in range(m):
        if _is_constant(pred[:, j]) or _is_constant(actual[:, j]):
            continue
        rho[j] = spearman(pred[:, j], actual[:, j])
    ok = np.isfinite(rho)
    if not ok.any():
        raise ValueError(
            "the LDS is undefined for every test point: the predicted sums or the actual test losses are "
            "constant over the subsets (all-zero scores?)"
        )
    vals = rho[ok]
    se = float(np.std(vals, ddof=1) / math.sqrt(vals.size)) if vals.size >= 2 else math.nan
    return LDSResult(
        per_test=rho,
        mean=float(np.mean(vals)),
        se=se,
        n_test=m,
        n_undefined=int((~ok).sum()),
        undefined=[int(j) for j in np.flatnonzero(~ok)],
        n_subsets=retrains.n_subsets,
    )


# ================================================================================================
# AUC
# ================================================================================================
def _as_vector(name: str, a: Any) -> NDArray[np.float64]:
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu().double().numpy()
    try:
        v = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D array of numbers") from None
    if v.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return v


def roc_auc(scores: Any, positives: Any) -> float:
    """Area under the ROC curve of ``scores`` (n,) for the boolean labels ``positives`` (n,)
    (bool, or integers 0/1): P(score of a random positive > score of a random negative), ties
    counting one half — the Mann–Whitney statistic (R₊ − P(P+1)/2) / (P·N) with average ranks.
    Raises ValueError without both positives and negatives."""
    s = _as_vector("scores", scores)
    if hasattr(positives, "detach") and hasattr(positives, "cpu"):
        positives = positives.detach().cpu().numpy()
    p = np.asarray(positives)
    if p.ndim != 1 or p.shape[0] != s.shape[0]:
        raise ValueError(f"positives must have shape ({s.shape[0]},) like scores, got {p.shape}")
    if p.dtype != np.bool_:
        if p.dtype.kind not in "iu" or not np.isin(p, (0, 1)).all():
            raise TypeError(f"positives must be boolean (or 0/1 integers), got dtype {p.dtype}")
        p = p.astype(bool)
    P = int(p.sum())
    N = int(p.size - P)
    if P == 0 or N == 0:
        raise ValueError(f"positives must contain both classes: got {P} positive and {N} negative")
    r = rankdata(s)
    return float((r[p].sum() - P * (P + 1) / 2.0) / (P * N))


def mislabel_auc(self_influence: Any, flipped: Any) -> float:
    """ROC AUC of |self_influence| (n,) (larger magnitude = more suspicious; self-influence is
    ≤ 0, so this ranks the most negative first) for finding the flipped labels ``flipped``: a
    boolean mask (n,) or the indices (as returned by
    :func:`pyinfluence.applications.mislabel.flip_labels`). 0.5 = chance, 1 = every flipped label
    ranked above every clean one."""
    si = _as_vector("self_influence", self_influence)
    idx = as_index_array("flipped", flipped, si.shape[0], unique=True, allow_empty=False)
    mask = np.zeros(si.shape[0], dtype=bool)
    mask[idx] = True
    return roc_auc(np.abs(si), mask)


# ================================================================================================
# brittleness
# ================================================================================================
@dataclass
class BrittlenessResult(Result):
    """Brittleness of a task's predictions under an attribution's removals.

    Per test point (``test_idx`` (T,)): ``status`` ``"flipped"`` / ``"not_flipped"`` (not flipped
    at the largest size) / ``"misclassified"`` (the model is wrong already: not evaluated);
    ``k``: the removal size found (None unless flipped), ``new_class`` the class predicted then.
    ``sizes``: the ladder; ``refine``: whether k was bisected between ladder sizes.
    Summary over the evaluated (correctly classified) points: ``fraction_flipped`` (None if none
    was evaluated), ``median_k`` over the flipped ones (None if none flipped), ``curve``: per ladder
    size s, the fraction with k ≤ s. ``n_retrains``: models trained by this call (cache misses);
    ``n_cached``; ``seconds``.
    """

    test_idx: List[int]
    status: List[str]
    k: List[Optional[int]]
    new_class: List[Optional[int]]
    sizes: List[int]
    refine: bool
    n_evaluated: int
    n_misclassified: int
    fraction_flipped: Optional[float]
    median_k: Optional[float]
    curve: Dict[int, Optional[float]]
    n_retrains: int
    n_cached: int
    seconds: float


def _check_sizes(sizes: Optional[Sequence[int]], n: int) -> List[int]:
    if sizes is None:
        out = [s for s in DEFAULT_SIZES if s < n]
        if not out:
            raise ValueError(f"n_train={n} is too small for the default sizes {DEFAULT_SIZES}; pass sizes")
        return out
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"sizes must be a sequence of integers, got {type(sizes).__name__}")
    out = [
        check_int("sizes[]", s, 1, n - 1, maximum_what="at least one training point must remain")
        for s in sizes
    ]
    if not out:
        raise ValueError("sizes is empty")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"sizes must be strictly increasing, got {out}")
    return out


def brittleness(
    task: Task,
    scores: Any,
    test_idx: Any,
    *,
    sizes: Optional[Sequence[int]] = None,
    refine: bool = False,
    retrain: Optional[Callable[[NDArray[np.bool_]], Any]] = None,
    retrain_key: Optional[str] = None,
    cache_dir: Optional[Union[str, os.PathLike[str]]] = None,
    progress: bool = False,
    log: Optional[Callable[[str], None]] = None,
) -> BrittlenessResult:
    """For each test point j in ``test_idx`` that ``task.model`` classifies correctly: the smallest
    removal size k such that retraining without the k most helpful training points for j (the k
    most negative ``scores[:, j]``, up_loss convention; ties by lower index) flips its predicted
    class.

    Search: the sizes of the ladder (default :data:`DEFAULT_SIZES`, those below n_train; explicit
    ``sizes`` must be strictly increasing and below n_train) are tried in increasing order until
    one flips; k is that size. With ``refine=True``, k is then bisected over the integers between
    the previous ladder size (which did not flip; 0 for the first) and it, so the reported k flips
    and k − 1 does not (the flip need not be monotone in k; the bisection finds one such boundary).
    Not flipped at the largest size: k = None.

    ``retrain(keep)`` (keep: bool (n_train,)) returns the retrained model (anything with
    ``predict``, ``losses`` and ``margins`` like :class:`~pyinfluence.bench.tasks.TrainedModel`);
    default ``task.retrain(keep, warm_start=True)``: for linear tasks the exact optimum (Newton,
    strictly convex) reached in fewer iterations, for deep tasks L-BFGS from the trained weights
    (cheaper than from scratch, and the same notion of retraining as the leave-one-out
    measurements). ``cache_dir``: retrains cached on disk keyed by the task and the removed set
    (a custom ``retrain`` needs a ``retrain_key`` string naming it to be cached).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a pyinfluence.bench.tasks.Task, got {type(task).__name__}")
    n, m = task.n_train, task.m_test
    S = as_matrix(scores, "scores")
    if S.shape != (n, m):
        raise ValueError(f"scores must have shape (n_train, m_test) = {(n, m)}, got {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError("scores contains NaN or infinite values")
    tidx = as_index_array("test_idx", test_idx, m, unique=True, allow_empty=False)
    ladder = _check_sizes(sizes, n)
    refine = check_bool("refine", refine)
    if retrain is not None and not callable(retrain):
        raise TypeError(f"retrain must be callable or None, got {type(retrain).__name__}")
    if log is not None and not callable(log):
        raise TypeError(f"log must be callable or None, got {type(log).__name__}")
    if retrain_key is not None and not isinstance(retrain_key, str):
        raise TypeError(f"retrain_key must be a string, got {type(retrain_key).__name__}")
    store = None
    if cache_dir is not None:
        if retrain is not None and retrain_key is None:
            raise ValueError(
                "cache_dir with a custom retrain needs retrain_key (a string naming that retraining)"
            )
        key = {
            "what": "brittleness retrains",
            **_task_digest(task),
            "retrain": "task.retrain(keep, warm_start=True)" if retrain is None else retrain_key,
        }
        store = _Store(cache_dir, f"brittle-{task.name}", key, m)
    fit = retrain if retrain is not None else (lambda keep: task.retrain(keep, warm_start=True))

    t0 = time.perf_counter()
    base_pred = _predicted_class(_outputs(task.model, task.X_test))
    truth = _class_index(task.y_test)
    memo: Dict[str, NDArray[np.int64]] = {}
    counts = {"trained": 0, "cached": 0}

    def predictions_without(removed: NDArray[np.int64]) -> NDArray[np.int64]:
        rm = np.sort(removed)
        item = "removed_" + hashlib.sha256(rm.astype(np.int64).tobytes()).hexdigest()[:32]
        if item in memo:
            return memo[item]
        hit = store.load(item) if store is not None else None
        if hit is None:
            keep = np.ones(n, dtype=bool)
            keep[rm] = False
            trained = fit(keep)
            out = _evaluate(trained, task, f"retraining without {rm.size} points")
            if store is not None:
                scalars = {
                    "n_removed": int(rm.size),
                    "grad_norm": getattr(trained, "grad_norm", None),
                    "seconds": getattr(trained, "seconds", None),
                }
                store.save(item, out, scalars)
            counts["trained"] += 1
        else:
            out = hit[0]
            counts["cached"] += 1
        memo[item] = np.rint(out[1]).astype(np.int64)
        return memo[item]

    status: List[str] = []
    ks: List[Optional[int]] = []
    new_cls: List[Optional[int]] = []
    for j in progress_iter(
        tidx.tolist(), enabled=bool(progress), total=tidx.size, desc=f"brittleness {task.name}"
    ):
        if base_pred[j] != truth[j]:
            status.append("misclassified")
            ks.append(None)
            new_cls.append(None)
            continue
        order = np.argsort(S[:, j], kind="stable")  # most helpful (most negative up_loss) first

        def flips(k: int, j: int = j, order: NDArray[np.intp] = order) -> Optional[int]:
            c = int(predictions_without(order[:k])[j])
            return None if c == int(base_pred[j]) else c

        found: Optional[int] = None
        cls: Optional[int] = None
        prev = 0
        for s in ladder:
            c = flips(s)
            if c is not None:
                found, cls = s, c
                break
            prev = s
        if found is not None and refine:
            lo, hi = prev, found  # lo does not flip (0: the task's model, correct), hi flips
            while hi - lo > 1:
                mid = (lo + hi) // 2
                c = flips(mid)
                if c is not None:
                    hi, cls = mid, c
                else:
                    lo = mid
            found = hi
        status.append("flipped" if found is not None else "not_flipped")
        ks.append(found)
        new_cls.append(cls)
        if log is not None:
            log(
                f"{task.name} test point {j}: "
                + (f"flipped to class {cls} by removing {found}" if found is not None else "not flipped")
            )

    evaluated = [i for i, st in enumerate(status) if st != "misclassified"]
    flipped_k = [ks[i] for i in evaluated if ks[i] is not None]
    n_eval = len(evaluated)
    curve: Dict[int, Optional[float]] = {
        s: (sum(1 for k in flipped_k if k is not None and k <= s) / n_eval if n_eval else None)
        for s in ladder
    }
    return BrittlenessResult(
        test_idx=[int(j) for j in tidx],
        status=status,
        k=ks,
        new_class=new_cls,
        sizes=ladder,
        refine=refine,
        n_evaluated=n_eval,
        n_misclassified=len(status) - n_eval,
        fraction_flipped=(len(flipped_k) / n_eval) if n_eval else None,
        median_k=float(np.median(np.asarray(flipped_k, dtype=np.float64))) if flipped_k else None,
        curve=curve,
        n_retrains=counts["trained"],
        n_cached=counts["cached"],
        seconds=time.perf_counter() - t0,
    )
