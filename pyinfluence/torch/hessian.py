"""The Hessian operator consumed by the solvers: H = ∇²R(θ̂) of
R(θ) = (1/n) Σ L(z_i, θ) + (l2/2)‖θ‖² (``matvec``, ``sample_matvec``, ``dense``, ``gradient``).

On sharded training data (:class:`~pyinfluence.torch.distributed.ShardedData`, under ``torchrun``) every
sum over training examples runs over this rank's shard and is all-reduced (float64) before the division by n,
so every rank gets the same H V, ∇R(θ̂) and dense H as one process (up to the order of the additions).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable, Union

import torch
from torch import Tensor

from pyinfluence.torch.data import TrainingData, _shape_str
from pyinfluence.torch.functional import _AUTOGRAD_MAX_ROWS, FunctionalModel

if TYPE_CHECKING:
    from pyinfluence.torch.distributed import ShardedData

__all__ = ["HessianOperator"]

# Working-set budget (bytes) of one HVP call: columns × examples × activations. On the digits MLP
# (2 shared cores) 64 MiB — one call over all 1437 examples per 64-column block — was as fast as
# smaller blocks with one thread and much less sensitive to other processes with two (fewer,
# larger operations mean fewer thread synchronisations).
_HVP_WORKSET = 64 << 20
# Most columns per vmapped HVP call (the dense build uses blocks of identity columns this wide),
# and the HVP mode of the legacy full-row dense build (``HessianOperator._dense_full``). 32: on the
# 85k-parameter digits MLP 64-column calls cost 1.5–4× more per column than 32-column ones (the working set
# leaves the caches); on the 2.4k one all widths from 8 to 64 ran within noise (~1 ms per column).
_MAX_COLUMNS = 32
_DENSE_MODE = "revrev"
# The dense build: "triangular" (default; block-triangular over parameter tensors, see
# ``HessianOperator.dense``) or "full" (every column block differentiated with respect to all
# parameters; ~1.9× slower on the digits MLP, kept for comparisons in the deep-path study,
# pyinfluence.bench.studies.deep_path).
_DENSE_METHOD = "triangular"
# HVP mode of matvec / sample_matvec (see FunctionalModel.hvp_rows), and the most rows for which
# "auto" uses torch.autograd's double backward rather than torch.func's vmapped vjp.
_HVP_MODE = "auto"
# The dense Hessian is kept for reuse when it takes at most this many bytes.
_DENSE_KEEP_BYTES = 256 << 20


# the Hessian operator consumed by the solvers
# ==============================================================================================
class HessianOperator:
    """H = ∇²R(θ̂), R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖², over the selected parameters.

    Implements the solvers' operator protocol (:class:`pyinfluence.solvers.HessianOperatorLike`):

    - ``matvec(V)``: V (p, r) → H V (p, r), over the full training set in batches of at most
      ``batch_size`` examples (fewer when r is large, to bound the working set) and blocks of at
      most 64 columns; L2 included, damping not.
    - ``sample_matvec(V, batch_size, generator)``: (1/b) Σ_{j∈B} ∇²L(z_j) V + l2 V for a minibatch
      B of b indices drawn uniformly WITH replacement by ``generator`` (on the generator's device,
      then moved): an unbiased estimate of H V.
    - ``dense()``: H (p, p), column blocks of HVPs with identity columns, block-triangular over
      the parameter tensors (each tensor's columns differentiated only with respect to itself and
      the larger tensors); L2 included, exactly symmetric; kept for reuse when ≤ 256 MiB.
    - ``gradient()``: ∇R(θ̂) (p,).

    ``n_params``, ``dtype``, ``device``, ``n_train`` as in the protocol. ``progress``: a callable
    wrapping an iterable in a progress bar (used by ``dense``), or None.

    Distributed (``data`` a :class:`~pyinfluence.torch.distributed.ShardedData`; ``dist`` its context):
    every sum above runs over this rank's shard and is all-reduced before the division by n (``n_train`` is
    the global n). ``sample_matvec``'s minibatch indices are drawn identically on every rank (the same
    generator state) and split over the ranks. ``reduce_sum`` / ``reduce_min`` / ``reduce_max`` are the
    reductions other passes over ``data`` use (K-FAC's statistics); the identity in one process.
    """

    def __init__(
        self,
        fm: FunctionalModel,
        data: Union[TrainingData, ShardedData],
        l2: float,
        batch_size: int,
        progress: Callable[..., Any] | None = None,
    ) -> None:
        self.fm = fm
        self.data = data
        self.l2 = float(l2)
        self.batch_size = int(batch_size)
        self.n_params = fm.n_params
        self.dtype = fm.dtype
        self.device = fm.device
        self.n_train = len(data)
        # the process group's context when the data is sharded over ranks (then sums are all-reduced)
        self.dist: Any = getattr(data, "context", None)
        self._progress = progress
        self._dense: Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"HessianOperator(n_params={self.n_params}, n_train={self.n_train}, l2={self.l2:g}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device})"
        )

    def reduce_sum(self, t: Tensor) -> Tensor:
        """Σ over the ranks of a partial sum over this rank's shard (float64 accumulation); ``t`` itself
        in one process."""
        return t if self.dist is None else self.dist.all_reduce_sum(t)

    def reduce_min(self, t: Tensor) -> Tensor:
        """The minimum over the ranks (``t`` itself in one process)."""
        return t if self.dist is None else self.dist.all_reduce_min(t)

    def reduce_max(self, t: Tensor) -> Tensor:
        """The maximum over the ranks (``t`` itself in one process)."""
        return t if self.dist is None else self.dist.all_reduce_max(t)

    def _local_len(self, data: Any = None) -> int:
        d = self.data if data is None else data
        return int(getattr(d, "local_len", len(d)))

    def _rows(self, r: int) -> int:
        """Examples per HVP call with r columns: the working-set budget, ≤ batch_size."""
        act = self.fm.activation_numel(self.data.head(1)[0])
        item = torch.finfo(self.dtype).bits // 8
        rows = _HVP_WORKSET // max(1, r * (act + 8) * item)
        return int(min(self.n_train, self.batch_size, max(rows, 16)))

    def _check_V(self, V: Any) -> tuple[Tensor, bool]:
        if not isinstance(V, Tensor):
            raise TypeError(f"V must be a torch tensor, got {type(V).__name__}")
        one_d = V.ndim == 1
        W = V.unsqueeze(1) if one_d else V
        if W.ndim != 2 or W.shape[0] != self.n_params:
            raise ValueError(
                f"V must have shape ({self.n_params}, r) or ({self.n_params},), got {_shape_str(V.shape)}"
            )
        if W.dtype != self.dtype or W.device != self.device:
            W = W.to(device=self.device, dtype=self.dtype)
        return W, one_d

    def _sum_hvp(self, Vt: Tensor, data: Any, mode: str = _HVP_MODE) -> Tensor:
        """Σ_{i ∈ data} ∇²L(z_i) v for the rows v of Vt (r, p): blocks of at most
        ``_MAX_COLUMNS`` rows (beyond the autograd range) times blocks of examples; on sharded data
        this rank's partial sum, all-reduced."""
        r = Vt.shape[0]
        cols = r if r <= _AUTOGRAD_MAX_ROWS else min(r, _MAX_COLUMNS)
        rows = self._rows(cols)
        out = Vt.new_empty(Vt.shape) if cols < r else None
        for c in range(0, r, cols):
            V = Vt[c : c + cols]
            acc = None
            for _, X, Y in data.blocks(rows):
                h = self.fm.hvp_rows(V, X, Y, mode)
                acc = h if acc is None else acc.add_(h)
            if acc is None:  # no example on this rank (a shard of a small minibatch)
                acc = torch.zeros_like(V)
            if out is None:
                return self.reduce_sum(acc)
            out[c : c + cols] = acc
        assert out is not None
        return self.reduce_sum(out)

    def matvec(self, V: Tensor) -> Tensor:
        """H V for V (p, r) (or (p,)), over the full training set; L2 included, no damping."""
        W, one_d = self._check_V(V)
        if W.shape[1] == 0:
            return W.clone()
        Vt = W.t().contiguous()
        out = self._sum_hvp(Vt, self.data).div_(self.n_train)
        if self.l2:
            out.add_(Vt, alpha=self.l2)
        out = out.t()
        return out.reshape(-1) if one_d else out

    def sample_matvec(self, V: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        """Unbiased minibatch estimate of H V: b indices uniform with replacement."""
        W, one_d = self._check_V(V)
        b = int(batch_size)
        if b < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.data.random_access:
            raise ValueError(
                "minibatch Hessian-vector products (LiSSA) draw random training examples, but the training "
                "data is a stream without random access (an IterableDataset or an iterable of batches): "
                "pass a map-style Dataset (or a DataLoader over one), or use a full-pass solver "
                "(solver='block_cg', 'cg', 'ekfac')"
            )
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.randint(self.n_train, (b,), generator=generator, device=gdev)
        if idx.device != self.device:
            idx = idx.to(self.device)
        Vt = W.t().contiguous()
        out = self._sum_hvp(Vt, self.data.take(idx)).div_(b)
        if self.l2:
            out.add_(Vt, alpha=self.l2)
        out = out.t()
        return out.reshape(-1) if one_d else out

    def data_pass(self, rows: int, desc: str) -> Iterable[tuple[int, Any, Tensor]]:
        """One pass over the training data in blocks of at most ``rows`` examples, ``(start, inputs,
        targets)``, with a progress bar labelled ``desc`` when the operator was given one (for the passes of
        a solver's preparation, e.g. K-FAC's factor statistics; HVPs inside iterations have none)."""
        it: Iterable[tuple[int, Any, Tensor]] = self.data.blocks(rows)
        if self._progress is not None:
            it = self._progress(it, total=math.ceil(self._local_len() / max(1, rows)), desc=desc)
        return it

    def gradient(self) -> Tensor:
        """∇R(θ̂) = (1/n) Σ ∇L(z_i, θ̂) + l2 θ̂, shape (p,)."""
        rows = min(self.n_train, self.batch_size)
        g = None
        for _, X, Y in self.data_pass(rows, "gradient ∇R(θ̂)"):
            h = self.fm.grad_sum(X, Y)
            g = h if g is None else g.add_(h)
        if g is None:
            g = torch.zeros_like(self.fm.theta)
        g = self.reduce_sum(g)  # Σ over every rank's shard
        g.div_(self.n_train)
        if self.l2:
            g.add_(self.fm.theta, alpha=self.l2)
        return g

    def dense(self) -> Tensor:
        """H (p, p): L2 included, no damping, exactly symmetric; a new tensor each call.

        Built from HVPs with identity columns, block-triangular over the parameter tensors:
        the tensors are ordered by size (largest first), and the columns of tensor t are
        differentiated only with respect to t and the tensors before it (its blocks H[s, t]
        for the others are the transposes of blocks computed with their columns). For each
        tensor and training batch, one forward and first backward pass (with respect to θ_t
        only), then the second backward for blocks of at most 64 identity columns, vmapped.
        Cost ≤ p HVPs over the training set, and much less than that when the largest tensors
        come first in the order (on the digits MLP 1.9× less time than full HVPs). Diagonal
        blocks are symmetrised ((B + Bᵀ)/2). The result is kept (and copied on later calls)
        when it takes at most 256 MiB, so that ``TorchInfluence.hessian()`` and the Exact
        solver build it once between them.
        """
        if self._dense is not None:
            return self._dense.clone()
        if _DENSE_METHOD == "full":
            H = self._dense_full()
        elif _DENSE_METHOD == "triangular":
            H = self._dense_triangular()
        else:
            raise ValueError(f"_DENSE_METHOD must be 'triangular' or 'full', got {_DENSE_METHOD!r}")
        if H.numel() * H.element_size() <= _DENSE_KEEP_BYTES:
            self._dense = H
            return H.clone()
        return H

    def _dense_triangular(self) -> Tensor:
        fm, p, n = self.fm, self.n_params, self.n_train
        names, sizes, shapes = fm.names, fm.sizes, fm.shapes
        offs = [0]
        for sz in sizes:
            offs.append(offs[-1] + sz)
        order = sorted(range(len(names)), key=lambda t: -sizes[t])  # stable: ties keep model order
        H = torch.zeros((p, p), dtype=self.dtype, device=self.device)
        steps: Any = enumerate(order)
        if self._progress is not None:
            steps = self._progress(steps, total=len(order), desc="Hessian (parameter tensors)")
        for k, t in steps:
            col, size, lo = names[t], sizes[t], offs[t]
            if size == 0:
                continue
            row_ts = sorted(order[: k + 1])  # model order
            rows = [names[j] for j in row_ts]
            cols = min(size, _MAX_COLUMNS)
            n_rows = self._rows(cols)
            starts = range(0, size, cols)
            for _, X, Y in self.data.blocks(n_rows):
                apply = fm.hessian_block_pullback(col, rows, X, Y)
                for s in starts:
                    e = min(size, s + cols)
                    E = torch.zeros((e - s, size), dtype=self.dtype, device=self.device)
                    ar = torch.arange(e - s, device=self.device)
                    E[ar, ar + s] = 1
                    out = apply(E.reshape((e - s,) + shapes[t]))
                    for j in row_ts:
                        H[lo + s : lo + e, offs[j] : offs[j + 1]].add_(out[names[j]].reshape(e - s, sizes[j]))
            # blocks H[row tensor j, col tensor t] for j before t in the order: by symmetry
            for j in row_ts:
                if j != t:
                    H[offs[j] : offs[j + 1], lo : lo + size] = H[lo : lo + size, offs[j] : offs[j + 1]].mT
        # every step above is linear in the examples' contributions, so the shards' partial H sum to the whole
        H = self.reduce_sum(H)
        H.div_(n)
        if self.l2:
            H.diagonal().add_(self.l2)
        H.add_(H.mT.clone()).mul_(0.5)  # only the diagonal blocks change
        return H

    def _dense_full(self) -> Tensor:
        """The dense Hessian from full HVPs (every column block differentiated with respect to
        all parameters): ≈ p HVPs over the training set. Kept for comparisons."""
        p, n = self.n_params, self.n_train
        H = torch.empty((p, p), dtype=self.dtype, device=self.device)
        r = min(p, _MAX_COLUMNS)
        starts = range(0, p, r)
        if self._progress is not None:
            starts = self._progress(starts, total=math.ceil(p / r), desc="Hessian columns")
        for s in starts:
            e = min(p, s + r)
            E = torch.zeros((e - s, p), dtype=self.dtype, device=self.device)
            E[torch.arange(e - s, device=self.device), torch.arange(s, e, device=self.device)] = 1
            H[s:e] = self._sum_hvp(E, self.data, _DENSE_MODE)
        H.div_(n)
        if self.l2:
            H.diagonal().add_(self.l2)
        H.add_(H.mT.clone()).mul_(0.5)
        return H
