"""Scoring a gradient store: streaming GEMMs over its shards and a streaming top-k, memory flat in n.

Notation: the store holds Φ (n × k), row φ_i = P ∇θL(z_i, θ̂) (P: the store's projection, E[PᵀP] = I; see
:mod:`pyinfluence.torch.stores.projections`). Signs follow Koh & Liang and the rest of pyinfluence: a score is
an ``up_loss`` value, **negative = helpful** (upweighting z_i lowers the test loss), **positive = harmful**, no
1/n factor (the predicted leave-one-out change of the test loss is −score/n).

Two ways to score:

(a) **Influence in the projected space** (:class:`ProjectedInfluence`; TRAK's and LoGra's estimator):

        I(z_i, z_test) = −φ_testᵀ H_P⁻¹ φ_i,      H_P = (1/n) ΦᵀΦ + (l2 + λ) I_k,

    with φ_test = P ∇θL(z_test, θ̂) projected by the SAME P (:meth:`GradientStore.project_test
    <pyinfluence.torch.stores.store.GradientStore.project_test>`). (1/n) ΦᵀΦ = P [(1/n) Σ_i g_i g_iᵀ] Pᵀ is the
    empirical Fisher (the Gauss-Newton matrix of the log-likelihood at the observed labels) of the mean loss,
    projected: it replaces the exact Hessian ∇²R(θ̂) of the mean loss; l2 is the L2 coefficient of R(θ) =
    (1/n) Σ L + (l2/2)‖θ‖² and λ the damping, both added in the projected space (as TRAK and LoGra do; note
    that P(l2 + λ)I Pᵀ = (l2 + λ) P Pᵀ has expectation (l2 + λ)(p/k) I, not (l2 + λ) I). ΦᵀΦ is accumulated
    shard by shard in float64 and Cholesky-factorised once; a failure raises
    :class:`~pyinfluence.errors.NotPositiveDefiniteError` with a suggested damping.

(b) **Queries already in the projected space** (:func:`scores`, :func:`top_k`): the score of row i for a
    query q is −qᵀφ_i. With q = P s_test, s_test = (H + λI)⁻¹ ∇θL(z_test) from any exact or iterative solver
    of :class:`~pyinfluence.TorchInfluence` (``influence.s_test(X_test, y_test).T``, projected by
    ``store.project_vectors``), −(P s_test)ᵀ(P g_i) is an unbiased Johnson-Lindenstrauss estimate of the exact
    ``up_loss`` −s_testᵀ g_i (exact for the identity projection).

Every pass reads the store in chunks of rows (``chunk_rows``, default 32 MiB of rows) straight from the shard
files: :func:`scores` holds one chunk plus its (chunk × m) scores (plus the n × m result, in memory or in a
``.npy`` memory map the caller names); :func:`top_k` holds one chunk plus the running (m × k) best of each
side, so its memory does not grow with n. Scores are computed in float64 for float64 stores and float32
otherwise, on ``device`` (default: the CPU); a NaN or infinite score raises NonFiniteError.

**Distributed**: on a store opened (or built) with a ``torch.distributed`` context, every rank reads only its
shards (s mod W): :func:`scores` and :meth:`ProjectedInfluence.self_influence` all-reduce the rows each rank
filled (every rank returns the full (n, m) / (n,) result; with ``out=`` rank 0 creates the file and every rank
writes its rows into it, so it must be on a shared file system), :func:`top_k` merges the ranks' top-k, and
:meth:`ProjectedInfluence.fisher` all-reduces ΦᵀΦ (float64). Every rank must pass the same queries (checked by
digest: ValueError naming them on every rank).

**Threads**: the functions keep no state; :class:`ProjectedInfluence` factorises H_P once under a lock and
may then be shared by threads.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
from torch import Tensor

from pyinfluence._validation import check_int, check_nonnegative_float
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError
from pyinfluence.interface import TopK
from pyinfluence.torch.data import resolve_device
from pyinfluence.torch.solvers.exact import cholesky_solve

if TYPE_CHECKING:
    from pyinfluence.torch.stores.store import GradientStore

__all__ = ["ProjectedInfluence", "scores", "top_k"]

PathLike = Union[str, "os.PathLike[str]"]


# ==============================================================================================
# helpers
# ==============================================================================================
def _compute_dtype(store: GradientStore) -> torch.dtype:
    return torch.float64 if store.dtype == np.float64 else torch.float32


def _device(device: Any) -> torch.device:
    return resolve_device(device, torch.device("cpu"))


def _as_queries(name: str, Q: Any, k: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``Q`` as an (m, k) tensor on ``device`` in ``dtype``: (m, k) or one (k,) vector; floating, finite."""
    if isinstance(Q, np.ndarray):
        Q = torch.from_numpy(Q)
    if not isinstance(Q, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor or numpy array of shape (m, {k}), got {type(Q).__name__}"
        )
    if not Q.is_floating_point():
        raise TypeError(f"{name} must be floating-point, got {Q.dtype}")
    if Q.ndim == 1:
        Q = Q.unsqueeze(0)
    if Q.ndim != 2 or Q.shape[1] != k or Q.shape[0] == 0:
        raise ValueError(
            f"{name} has shape {tuple(Q.shape)}, but the store holds k = {k} projected dimensions: pass (m, {k}) "
            f"(m ≥ 1), projected by the store's own projection (store.project_vectors / store.project_test)"
        )
    if not bool(torch.isfinite(Q).all()):
        raise ValueError(f"{name} contains NaN or infinity")
    return Q.detach().to(device=device, dtype=dtype)


def _chunks(
    store: GradientStore, chunk_rows: int | None, device: torch.device, dtype: torch.dtype
) -> Iterator[tuple[int, Tensor]]:
    # one reused read buffer: each chunk is consumed before the next is read (F may share its memory);
    # distributed: this rank's shards only
    for start, arr in store.local_chunks(chunk_rows, reuse=True):
        yield start, torch.from_numpy(arr).to(device=device, dtype=dtype)


def _check_queries(store: GradientStore, Q: Tensor, name: str = "queries") -> Any:
    """The store's distributed context (after checking that every rank passes the same ``Q``), or None."""
    ctx = store.distributed
    if ctx is not None:
        from pyinfluence.torch.distributed import digest_tensors

        ctx.check_same([(name, digest_tensors(Q))])
    return ctx


def _check_store(store: Any) -> None:
    from pyinfluence.torch.stores.store import GradientStore

    if not isinstance(store, GradientStore):
        raise TypeError(f"store must be a GradientStore, got {type(store).__name__}")


# ==============================================================================================
# (b) queries in the projected space
# ==============================================================================================
def scores(
    store: GradientStore,
    queries: Any,
    *,
    out: PathLike | None = None,
    device: str | torch.device | None = None,
    chunk_rows: int | None = None,
) -> Any:
    """S = −Φ Qᵀ: S[i, j] = −q_jᵀ φ_i for every stored row i and query q_j, shape (n, m).

    ``queries`` Q: (m, k) (or one (k,) vector; then m = 1), in the store's projected space — e.g.
    ``store.project_vectors(influence.s_test(X_test, y_test).T)``, for which S estimates the exact ``up_loss``
    (negative = helpful); or H_P⁻¹ φ_test (what :meth:`ProjectedInfluence.up_loss` passes). Streams over the
    shards in chunks of ``chunk_rows`` rows on ``device`` (default CPU), in float64 for float64 stores and
    float32 otherwise.

    ``out``: None → a tensor (n, m) on ``device``; a path → the scores are written chunk by chunk into a new
    ``.npy`` file there (``numpy.lib.format.open_memmap``, overwritten if it exists), which is returned as a
    writable ``numpy.memmap`` (n, m): the n × m result then never needs to fit in memory.
    """
    _check_store(store)
    dev = _device(device)
    dt = _compute_dtype(store)
    Q = _as_queries("queries", queries, store.dim, dev, dt)
    ctx = _check_queries(store, Q)
    n, m = store.n, Q.shape[0]
    mm: Any = None
    res: Tensor | None = None
    if out is not None:
        if not isinstance(out, (str, os.PathLike)):
            raise TypeError(f"out must be None or a file path (str or os.PathLike), got {type(out).__name__}")
        np_dt = np.float64 if dt == torch.float64 else np.float32
        if ctx is None:
            mm = np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=np_dt, shape=(n, m))
        else:  # rank 0 creates the file; every rank writes its own shards' rows into it
            err: BaseException | None = None
            if ctx.rank == 0:
                try:
                    np.lib.format.open_memmap(os.fspath(out), mode="w+", dtype=np_dt, shape=(n, m)).flush()
                except Exception as exc:
                    err = exc
            ctx.agree(err, "scores (creating out on rank 0)")
            mm = np.load(os.fspath(out), mmap_mode="r+", allow_pickle=False)
    elif ctx is None:
        res = torch.empty((n, m), dtype=dt, device=dev)
    else:
        res = torch.zeros((n, m), dtype=dt, device=dev)  # this rank's rows; the others' are added below
    bad: BaseException | None = None
    for start, F in _chunks(store, chunk_rows, dev, dt):
        S = (F @ Q.t()).neg_()  # −φ_iᵀ q_j   (r, m)
        if not bool(torch.isfinite(S).all()):
            bad = NonFiniteError(
                f"the scores of rows {start}…{start + F.shape[0] - 1} overflowed to inf or NaN; use a float64 store "
                f"or smaller queries",
                what="the store's scores",
            )
            if ctx is None:
                raise bad
            break
        if mm is not None:
            mm[start : start + F.shape[0]] = S.cpu().numpy()
        else:
            assert res is not None
            res[start : start + F.shape[0]] = S
    if ctx is not None:
        ctx.agree(bad, "scores")
        if res is not None:
            res = ctx.all_reduce_sum(res)  # every row is non-zero on exactly one rank: the sum is exact
    if mm is not None:
        mm.flush()
        if ctx is not None:
            ctx.barrier()  # every rank's rows are in the file
        return mm
    return res


def top_k(
    store: GradientStore,
    queries: Any,
    k: int = 10,
    *,
    device: str | torch.device | None = None,
    chunk_rows: int | None = None,
) -> TopK[Tensor]:
    """The k most helpful and most harmful stored rows per query, by the scores of :func:`scores` (−qᵀφ_i),
    streaming: :class:`~pyinfluence.TopK` of four (m, k) tensors on ``device`` (int64 indices): ``helpful_*`` the
    most NEGATIVE scores, most helpful first; ``harmful_*`` the most POSITIVE, most harmful first (as
    :meth:`TorchInfluence.top_k <pyinfluence.TorchInfluence.top_k>`).

    Memory: one chunk (``chunk_rows`` × k) plus its (m × chunk) scores plus the running (m × 2k) best of each
    side, whatever n (a running merge: the best k of [best so far, this chunk])."""
    _check_store(store)
    kk = check_int("k", k, 1, store.n, maximum_what="the number of stored rows")
    dev = _device(device)
    dt = _compute_dtype(store)
    Q = _as_queries("queries", queries, store.dim, dev, dt)
    ctx = _check_queries(store, Q)
    if ctx is not None:
        ctx.check_same([("k", repr(kk))])
    m = Q.shape[0]
    hv = torch.empty((m, 0), dtype=dt, device=dev)
    hi = torch.empty((m, 0), dtype=torch.int64, device=dev)
    rv, ri = hv, hi
    finite = torch.ones((), dtype=torch.bool, device=dev)  # one flag: no host synchronisation per chunk
    for start, F in _chunks(store, chunk_rows, dev, dt):
        sc = (Q @ F.t()).neg_()  # (m, r): −q_jᵀ φ_i
        finite &= torch.isfinite(sc).all()
        ids = torch.arange(start, start + F.shape[0], device=dev).expand(m, -1)
        cv, ci = torch.cat([hv, sc], 1), torch.cat([hi, ids], 1)
        j = min(kk, cv.shape[1])
        v, idx = torch.topk(cv, j, dim=1, largest=False, sorted=True)
        hv, hi = v, ci.gather(1, idx)
        cv, ci = torch.cat([rv, sc], 1), torch.cat([ri, ids], 1)
        v, idx = torch.topk(cv, j, dim=1, largest=True, sorted=True)
        rv, ri = v, ci.gather(1, idx)
    if ctx is not None:  # this rank's top-k of its shards → the top-k over all ranks
        finite = ctx.all_reduce_min(finite.to(torch.int64)).to(torch.bool)
        if bool(finite):
            hv, hi, rv, ri = ctx.merge_top_k(hv, hi, rv, ri, kk)
    if not bool(finite):
        raise NonFiniteError(
            "the store's scores ranked by top_k overflowed to inf or NaN", what="the store's scores"
        )
    return TopK(hi, hv, ri, rv)


# ==============================================================================================
# (a) influence in the projected space
# ==============================================================================================
class ProjectedInfluence:
    """Influence in the projected space of a :class:`~pyinfluence.torch.stores.store.GradientStore`:

        I(z_i, z_test) = −φ_testᵀ H_P⁻¹ φ_i,      H_P = (1/n) ΦᵀΦ + (l2 + λ) I_k      (k × k)

    φ_i = P ∇θL(z_i, θ̂) the stored rows, φ_test = P ∇θL(z_test, θ̂) by the same P (``store.project_test``),
    (1/n) ΦᵀΦ the projected empirical Fisher of the mean loss standing in for the Hessian, l2 and the damping
    λ added in the projected space (see :mod:`pyinfluence.torch.stores.scoring`). Negative = helpful, positive =
    harmful, no 1/n factor — the sign and scale of ``up_loss``.

    - ``l2``, ``damping``: default to those of the influence object the store was built from.
    - ``device``: where H_P is factorised and scores are computed (default CPU); ``chunk_rows``: rows per
      streamed chunk.

    :meth:`prepare` (run by the first call that needs it) makes one pass over the store accumulating ΦᵀΦ in
    float64 (k² memory, 2·n·k² flops), then a Cholesky factorisation (k³/3 flops).
    """

    def __init__(
        self,
        store: GradientStore,
        *,
        l2: float | None = None,
        damping: float | None = None,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> None:
        _check_store(store)
        self.store = store
        self.l2 = store.l2 if l2 is None else check_nonnegative_float("l2", l2)
        self.damping = store.damping if damping is None else check_nonnegative_float("damping", damping)
        self.device = _device(device)
        self.chunk_rows = store.chunk_rows(chunk_rows)
        self._lock = threading.Lock()
        self._gram: Tensor | None = None
        self._chol: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"ProjectedInfluence(n={self.store.n}, k={self.store.dim}, l2={self.l2:g}, damping={self.damping:g}, "
            f"device={self.device})"
        )

    # -- curvature ----------------------------------------------------------------------------------------
    def fisher(self) -> Tensor:
        """(1/n) ΦᵀΦ, (k, k) float64 on ``device``, exactly symmetric (accumulated shard by shard, cached)."""
        with self._lock:
            if self._gram is None:
                k = self.store.dim
                A = torch.zeros((k, k), dtype=torch.float64, device=self.device)
                for _, F in _chunks(self.store, self.chunk_rows, self.device, torch.float64):
                    A.addmm_(F.t(), F)  # Σ_i φ_i φ_iᵀ
                if self.store.distributed is not None:  # Σ over every rank's shards
                    A = self.store.distributed.all_reduce_sum(A)
                A.div_(self.store.n)
                self._gram = 0.5 * (A + A.t())
            return self._gram.clone()

    def hessian(self) -> Tensor:
        """H_P = (1/n) ΦᵀΦ + (l2 + λ) I_k, (k, k) float64 on ``device``."""
        H = self.fisher()
        H.diagonal().add_(self.l2 + self.damping)
        return H

    def prepare(self) -> ProjectedInfluence:
        """Accumulate and Cholesky-factorise H_P (once). Raises NotPositiveDefiniteError with a suggested
        damping when it fails (only possible when l2 + λ ≈ 0 and ΦᵀΦ is singular, e.g. n < k)."""
        if self._chol is not None:
            return self
        H = self.hessian()
        with self._lock:
            if self._chol is not None:
                return self
            L, info = torch.linalg.cholesky_ex(H)
            d = torch.diagonal(L) ** 2 if int(info) == 0 else None
            scale = float(torch.diagonal(H).abs().max()) if H.numel() else 0.0
            tiny = H.shape[0] * torch.finfo(torch.float64).eps * max(scale, 1e-300)
            if d is None or float(d.min()) <= tiny or not bool(torch.isfinite(L).all()):
                raise self._npd_error(H, int(info))
            self._chol = L
        return self

    def _npd_error(self, H: Tensor, info: int) -> NotPositiveDefiniteError:
        from pyinfluence.torch.solvers.base import _round_up

        ev = torch.linalg.eigvalsh(H)
        lo, hi = float(ev[0]), float(ev[-1])
        lam = self.damping
        need = max(lam - lo, 0.0)  # λ_min(H_P − λI) = lo − λ, so damping must exceed λ − lo
        suggest = _round_up(max(lam + 2.0 * max(-lo, 0.0), need * 1.5, lam + 1e-6 * abs(hi), 1e-12))
        return NotPositiveDefiniteError(
            f"the projected Hessian H_P = (1/n) ΦᵀΦ + (l2 + λ) I ({H.shape[0]} × {H.shape[0]}, n = {self.store.n}) "
            f"is not numerically positive definite: its smallest eigenvalue is {lo:.3g} (largest {hi:.3g}); "
            f"with l2 = {self.l2:g} and damping = {lam:g}. ΦᵀΦ is singular when n < k or the projected gradients "
            f"are collinear: pass e.g. damping={suggest:g} to ProjectedInfluence / store.projected_influence",
            pivot=info - 1 if info > 0 else None,
            size=int(H.shape[0]),
            min_pivot=lo,
            suggested_damping=suggest,
        )

    # -- scores --------------------------------------------------------------------------------------------
    def solve(self, phi_test: Any) -> Tensor:
        """H_P⁻¹ φ for the rows φ of ``phi_test`` (m, k) (or one (k,)): (m, k) float64 on ``device``."""
        Q = _as_queries("phi_test", phi_test, self.store.dim, self.device, torch.float64)
        self.prepare()
        assert self._chol is not None
        return cholesky_solve(self._chol, Q.t()).t()

    def up_loss(self, phi_test: Any, *, out: PathLike | None = None) -> Any:
        """I(z_i, z_test) = −φ_testᵀ H_P⁻¹ φ_i for every stored row i and test row φ_test of ``phi_test``
        (m, k): (n, m) (a tensor on ``device``, or a ``.npy`` memmap at ``out``; see :func:`scores`).
        Negative = helpful, no 1/n factor."""
        return scores(
            self.store, self._queries(phi_test), out=out, device=self.device, chunk_rows=self.chunk_rows
        )

    def top_k(self, phi_test: Any, k: int = 10) -> TopK[Tensor]:
        """The k most helpful (most negative I) and most harmful (most positive) stored rows per test row,
        streaming (:func:`top_k`)."""
        return top_k(self.store, self._queries(phi_test), k, device=self.device, chunk_rows=self.chunk_rows)

    def self_influence(self) -> Tensor:
        """I(z_i, z_i) = −φ_iᵀ H_P⁻¹ φ_i ≤ 0 for every stored row, (n,) float64 on ``device``, streaming."""
        self.prepare()
        assert self._chol is not None
        ctx = self.store.distributed
        out = (torch.empty if ctx is None else torch.zeros)(
            (self.store.n,), dtype=torch.float64, device=self.device
        )
        for start, F in _chunks(self.store, self.chunk_rows, self.device, torch.float64):
            Z = torch.cholesky_solve(F.t(), self._chol)  # H_P⁻¹ φ_i   (k, r)
            out[start : start + F.shape[0]] = -(F * Z.t()).sum(dim=1)
        if ctx is not None:  # every row is filled on exactly one rank: the sum is exact
            out = ctx.all_reduce_sum(out)
        return out

    def _queries(self, phi_test: Any) -> Tensor:
        Z = self.solve(phi_test)
        if not bool(torch.isfinite(Z).all()):
            raise NonFiniteError("H_P⁻¹ φ_test overflowed to inf or NaN", what="H_P⁻¹ φ_test")
        return Z
