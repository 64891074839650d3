"""The deep path on ``torch.distributed``: the training data sharded over ranks, the per-rank sums reduced.

Every deep-path method is "map, reduce, solve once, map again" (DESIGN §3a). Under ``torchrun`` each rank
holds the definition of the FULL training set (an in-memory pair, a Dataset, a DataLoader or an iterable of
batches: the same on every rank) and processes only its shard of it:

- **Shards**: contiguous ranges of training indices, rank r of W taking ``[⌊r·n/W⌋, ⌊(r+1)·n/W⌋)``
  (:func:`split_range`). Training index i is the i-th example of the source, exactly as in one process, so
  every result carries the single-process indices. In-memory tensors are sliced; a map-style Dataset (or a
  DataLoader over one) is read by index (a DataLoader over a ``Subset`` with the user's loader options); an
  iterable of batches that cannot be indexed (an IterableDataset, a list of batches) is iterated by every
  rank — an iterator cannot skip batches without producing them — but each rank converts, moves and
  differentiates only the batches that overlap its range, and stops after its range's end.
- **Reductions**: each rank sums its shard's contributions (Hessian-vector products Σ_i ∇²L(z_i)V, the
  gradient Σ_i ∇L(z_i), the dense Hessian's column blocks, the K-FAC/EK-FAC statistics) and the sums are
  all-reduced (:meth:`DistributedContext.all_reduce_sum`, accumulated in float64) before the division by n:
  every rank then holds the same H·V, the same factors, and runs the same (small, replicated) solve.
- **Gathers**: per-example results (``up_loss``, ``self_influence``, …) are computed by each rank for its
  rows and all-gathered (:meth:`DistributedContext.gather_rows`): **every rank returns the full result**, with
  the single-process indices and order. ``top_k`` merges each rank's top-k (:meth:`~DistributedContext.merge_top_k`).

Collectives run on the tensor's device where the backend allows it: gloo takes CPU tensors (a CUDA tensor is
staged through the CPU), NCCL CUDA tensors (a CPU tensor is staged through the context's CUDA device, or the
current one). Nothing is pickled: ranks exchange tensors (digests as integers, messages as bytes).

Every rank must call the same methods with the same arguments in the same order (collectives pair up by
order). Arguments that decide the collectives are compared across ranks with a cheap digest
(:meth:`DistributedContext.check_same`), and a mismatch raises the same ValueError, naming the argument, on
every rank. An exception raised on one rank alone (e.g. a bad batch in its shard) leaves the other ranks
waiting in their next collective until the process group's timeout; ``torchrun`` then stops the job.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from pyinfluence.torch.batches import Inputs, slice_inputs

if TYPE_CHECKING:
    from pyinfluence.torch.data import TensorData, TrainingData

__all__ = [
    "DistributedContext",
    "ShardedData",
    "digest_tensors",
    "resolve_distributed",
    "split_range",
]

# Bytes of an error message sent from a failing rank to the others (longer messages are cut).
_MESSAGE_BYTES = 1024
# Examples hashed (from the start, and evenly spaced when the data can be indexed) for the data fingerprint.
_FINGERPRINT_ROWS = 8


def split_range(lo: int, hi: int, parts: int, i: int) -> tuple[int, int]:
    """Part ``i`` of ``parts`` of the integer range [lo, hi): [lo + ⌊i·L/parts⌋, lo + ⌊(i+1)·L/parts⌋) with
    L = hi − lo (contiguous, sizes differing by at most one, empty parts when L < parts)."""
    length = hi - lo
    return lo + length * i // parts, lo + length * (i + 1) // parts


def _dist() -> Any:
    import torch.distributed as dist

    return dist


# -- torch.distributed.nn and the default process group ------------------------------------------
# torch.distributed.nn.functional declares its collectives with ``group=group.WORLD`` as a DEFAULT ARGUMENT, which
# Python evaluates once, when the module is imported. Imported after ``init_process_group`` — as the first use of
# torch.func or of a torch optimiser does, through torch._dynamo — those defaults hold the default process group
# for the life of the process: ``destroy_process_group()`` then cannot free it, gloo's worker threads outlive it,
# and one still releasing a finished collective's tensors while the interpreter shuts down aborts the process
# ("terminate called without an active exception", SIGABRT: 16 of 30 runs of a 2-rank gloo script on 2 cores).
# Imported before any process group exists, the defaults are None (the group at call time). pyinfluence.torch
# imports it here, so a program that imports pyinfluence.torch before init_process_group is safe; one that does
# not gets a RuntimeWarning when it builds a context (:func:`_warn_if_default_group_held`).
def _import_torch_distributed_nn() -> None:
    """Import ``torch.distributed.nn`` (3 ms) when this torch build has torch.distributed; nothing otherwise."""
    try:
        import torch.distributed as dist

        if dist.is_available():
            import torch.distributed.nn  # noqa: F401
    except ImportError:  # a build without the distributed extras: nothing to hold a group
        pass


_import_torch_distributed_nn()
_warned_default_group_held = False


def _default_group_held() -> bool:
    """True when torch.distributed.nn.functional's default arguments hold a process group (it was imported
    after ``init_process_group``): ``destroy_process_group()`` cannot then free that group."""
    functional = sys.modules.get("torch.distributed.nn.functional")
    if functional is None:
        return False
    group_type = _dist().ProcessGroup
    for name in ("broadcast", "all_gather", "all_reduce"):
        defaults = getattr(getattr(functional, name, None), "__defaults__", None) or ()
        if any(isinstance(d, group_type) for d in defaults):
            return True
    return False


def _warn_if_default_group_held() -> None:
    """One RuntimeWarning per process when :func:`_default_group_held` (see the comment above)."""
    global _warned_default_group_held
    if _warned_default_group_held or not _default_group_held():
        return
    _warned_default_group_held = True
    warnings.warn(
        "distributed: torch.distributed.nn was imported after init_process_group(), and its functions' default "
        "arguments now hold the default process group: destroy_process_group() cannot free it, and with gloo "
        "the process can abort at exit ('terminate called without an active exception'). Import "
        "pyinfluence.torch (or torch.distributed.nn) before init_process_group()",
        RuntimeWarning,
        stacklevel=4,
    )


def _tensor_bytes(t: Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return bytes(flat.view(torch.uint8).numpy().data)


def digest_tensors(*items: Any) -> str:
    """SHA-256 (hex) of tensors, dicts of tensors and plain values (their repr), with shapes and dtypes."""
    h = hashlib.sha256()

    def add(x: Any) -> None:
        if isinstance(x, Tensor):
            h.update(f"T{tuple(x.shape)}{x.dtype}|".encode())
            h.update(_tensor_bytes(x))
        elif isinstance(x, Mapping):
            for k in sorted(x):
                h.update(f"K{k!r}|".encode())
                add(x[k])
        else:
            h.update(f"V{x!r}|".encode())

    for it in items:
        add(it)
    return h.hexdigest()


# ==============================================================================================
# the context: rank, world size, collectives
# ==============================================================================================
@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a ``torch.distributed`` process group, and the collectives pyinfluence uses.

    - ``rank``, ``world_size``: of this process in ``group``.
    - ``group``: the process group (None: the default group, ``torch.distributed.init_process_group``'s).
    - ``device``: the computation's device; with NCCL, CPU tensors are staged through it when it is a CUDA
      device (else through ``torch.cuda.current_device()``).

    Build it with :meth:`from_group` (or let ``TorchInfluence(..., distributed=True)`` do it). Shards are
    contiguous (:meth:`shard`); reductions accumulate in float64 (:meth:`all_reduce_sum`); gathers return
    the full result on every rank (:meth:`gather_rows`).
    """

    rank: int
    world_size: int
    group: Any = None
    device: Any = None

    def __post_init__(self) -> None:
        for name in ("rank", "world_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"distributed: {name} must be an int, got {type(v).__name__}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"distributed: rank {self.rank} of world_size {self.world_size} is impossible (0 ≤ rank < "
                f"world_size, world_size ≥ 1)"
            )

    @classmethod
    def from_group(cls, group: Any = None, device: Any = None) -> DistributedContext:
        """The context of this process in ``group`` (None: the default process group), which must be
        initialised (ValueError otherwise)."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed: torch.distributed has no initialised process group. Launch with torchrun and call "
                "torch.distributed.init_process_group() (backend 'gloo' on CPU, 'nccl' on GPUs) before building "
                "the influence object, or pass distributed=None"
            )
        _warn_if_default_group_held()
        return cls(dist.get_rank(group), dist.get_world_size(group), group, device)

    def check_group(self) -> None:
        """ValueError naming ``distributed`` when the process group's rank or world size differ from this
        context's (e.g. a context built for another group or world size)."""
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed: the context needs an initialised torch.distributed process group "
                "(torch.distributed.init_process_group)"
            )
        r, w = dist.get_rank(self.group), dist.get_world_size(self.group)
        if (r, w) != (self.rank, self.world_size):
            raise ValueError(
                f"distributed: the context says rank {self.rank} of {self.world_size}, but the process group has "
                f"this process as rank {r} of {w}: the world size does not match; build the context with "
                f"DistributedContext.from_group()"
            )

    # -- shards ------------------------------------------------------------------------------------
    def shard(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The contiguous range [lo, hi) of n items that ``rank`` (default: this one) processes."""
        return split_range(0, n, self.world_size, self.rank if rank is None else rank)

    def shard_sizes(self, n: int) -> list[int]:
        """The number of items of each rank's contiguous shard of n, in rank order."""
        return [b - a for a, b in (self.shard(n, r) for r in range(self.world_size))]

    # -- collectives ---------------------------------------------------------------------------------
    def _comm_device(self, t: Tensor) -> torch.device:
        """Where a collective on ``t`` runs: CPU for gloo, CUDA for NCCL, the tensor's device otherwise."""
        backend = str(_dist().get_backend(self.group)).lower()
        if backend == "gloo":
            return torch.device("cpu")
        if backend == "nccl":
            if t.device.type == "cuda":
                return t.device
            dev = torch.device(self.device) if self.device is not None else None
            if dev is not None and dev.type == "cuda":
                return dev
            return torch.device("cuda", torch.cuda.current_device())
        return t.device

    def _stage(self, t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A private copy of ``t`` on the collective's device (in ``dtype``), contiguous."""
        dev = self._comm_device(t)
        return t.detach().to(device=dev, dtype=dtype or t.dtype, copy=True).contiguous()

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """Σ over ranks of ``t`` (the same shape on every rank), a new tensor of t's dtype on t's device.
        Floating tensors are summed in float64 (then rounded once to t's dtype), integers in int64."""
        if self.world_size == 1:
            return t.clone()
        acc = torch.float64 if t.is_floating_point() else torch.int64
        buf = self._stage(t, acc)
        _dist().all_reduce(buf, op=_dist().ReduceOp.SUM, group=self.group)
        return buf.to(device=t.device, dtype=t.dtype)

    def all_reduce_max(self, t: Tensor) -> Tensor:
        """The element-wise maximum over ranks of ``t``, a new tensor of t's dtype on t's device."""
        if self.world_size == 1:
            return t.clone()
        buf = self._stage(t, torch.float64 if t.is_floating_point() else torch.int64)
        _dist().all_reduce(buf, op=_dist().ReduceOp.MAX, group=self.group)
        return buf.to(device=t.device, dtype=t.dtype)

    def all_reduce_min(self, t: Tensor) -> Tensor:
        """The element-wise minimum over ranks of ``t``."""
        return self.all_reduce_max(-t).neg_() if t.is_floating_point() else -self.all_reduce_max(-t)

    def all_gather(self, t: Tensor) -> list[Tensor]:
        """``t`` of every rank (the same shape and dtype on every rank), in rank order, on t's device."""
        if self.world_size == 1:
            return [t.clone()]
        dtype = torch.uint8 if t.dtype == torch.bool else t.dtype
        buf = self._stage(t, dtype)
        outs = [torch.empty_like(buf) for _ in range(self.world_size)]
        _dist().all_gather(outs, buf, group=self.group)
        return [o.to(device=t.device, dtype=t.dtype) for o in outs]

    def gather_segments(self, local: Tensor, sizes: Sequence[int]) -> list[Tensor]:
        """Each rank's ``local`` rows ((sizes[r], ...) on rank r; trailing shape and dtype equal on all
        ranks), in rank order: padded to the largest, all-gathered, cut back."""
        if int(local.shape[0]) != int(sizes[self.rank]):
            raise RuntimeError(
                f"gather: rank {self.rank} holds {local.shape[0]} rows but its shard has {sizes[self.rank]}"
            )
        top = max(int(s) for s in sizes)
        buf = local.new_zeros((top,) + tuple(local.shape[1:]))
        buf[: local.shape[0]] = local
        return [o[: int(s)] for o, s in zip(self.all_gather(buf), sizes)]

    def gather_rows(self, local: Tensor, n: int) -> Tensor:
        """The full (n, ...) result from each rank's rows of its contiguous shard (:meth:`shard`): every rank
        returns the same tensor, rows in index order (as one process computes them)."""
        return torch.cat(self.gather_segments(local, self.shard_sizes(n)))

    def merge_top_k(
        self, hv: Tensor, hi: Tensor, rv: Tensor, ri: Tensor, k: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Merge each rank's running top-k: helpful (smallest values, ascending) ``hv``/``hi`` and harmful
        (largest, descending) ``rv``/``ri``, (m, ≤ k) each with global indices, into the top-k over all ranks
        (m, k) — the same on every rank. ``k`` must not exceed the total number of candidates."""
        m = hv.shape[0]
        pad = k - hv.shape[1]
        vals = torch.cat(
            [
                torch.cat([hv, hv.new_full((m, pad), float("inf"))], 1),
                torch.cat([rv, rv.new_full((m, pad), float("-inf"))], 1),
            ],
            1,
        )
        ids = torch.cat(
            [torch.cat([hi, hi.new_full((m, pad), -1)], 1), torch.cat([ri, ri.new_full((m, pad), -1)], 1)], 1
        )
        gv, gi = self.all_gather(vals), self.all_gather(ids)
        hvals = torch.cat([v[:, :k] for v in gv], 1)
        hids = torch.cat([i[:, :k] for i in gi], 1)
        rvals = torch.cat([v[:, k:] for v in gv], 1)
        rids = torch.cat([i[:, k:] for i in gi], 1)
        v1, j1 = torch.topk(hvals, k, dim=1, largest=False, sorted=True)
        v2, j2 = torch.topk(rvals, k, dim=1, largest=True, sorted=True)
        return v1, hids.gather(1, j1), v2, rids.gather(1, j2)

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce of one number, which works on every backend and device)."""
        if self.world_size > 1:
            self.all_reduce_sum(torch.zeros((), dtype=torch.int64))

    def check_same(self, fields: Sequence[tuple[str, str]]) -> None:
        """Compare ``(name, value)`` pairs across ranks by SHA-256 digest; ValueError naming the first
        argument that differs (the same error on every rank)."""
        if self.world_size == 1 or not fields:
            return
        words: list[int] = []
        for _, value in fields:
            d = hashlib.sha256(value.encode()).digest()[:16]
            words.extend(int.from_bytes(d[i : i + 4], "little") for i in (0, 4, 8, 12))
        mine = torch.tensor(words, dtype=torch.int64)
        allw = torch.stack(self.all_gather(mine)).reshape(self.world_size, len(fields), 4)
        for f, (name, _) in enumerate(fields):
            differ = [r for r in range(self.world_size) if not torch.equal(allw[r, f], allw[0, f])]
            if differ:
                raise ValueError(
                    f"{name} differs between the ranks of the process group (rank(s) {differ} against rank 0). "
                    f"With distributed=..., every rank must pass the same {name} (the full data set, not its own "
                    f"part: pyinfluence shards it by index) and call the same methods in the same order"
                )

    def agree(self, error: BaseException | None, what: str) -> None:
        """Collective error agreement: every rank passes the exception it caught (or None); if any rank failed,
        every rank raises — the failing rank its own exception, the others a RuntimeError quoting it."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES]
        buf = torch.zeros(_MESSAGE_BYTES + 1, dtype=torch.int64)
        buf[0] = 0 if error is None else 1
        if msg:
            buf[1 : 1 + len(msg)] = torch.tensor(list(msg), dtype=torch.int64)
        outs = self.all_gather(buf)
        failed = [r for r, o in enumerate(outs) if int(o[0]) != 0]
        if not failed:
            return
        if error is not None:
            raise error
        r = failed[0]
        text = bytes(int(c) for c in outs[r][1:].tolist() if c).decode(errors="replace")
        raise RuntimeError(f"{what} failed on rank {r}: {text}")

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` (an int64), on every rank."""
        if self.world_size == 1:
            return int(value)
        return int(self.all_gather(torch.tensor([int(value)], dtype=torch.int64))[0][0])


def resolve_distributed(distributed: Any, device: torch.device | None = None) -> DistributedContext | None:
    """The ``distributed`` option of TorchInfluence / GradientStore.open → a context or None.

    - None or False: one process (no collectives).
    - True: the default process group, which must be initialised (ValueError otherwise).
    - ``"auto"``: the default process group when ``torch.distributed`` is initialised with more than one rank,
      else None.
    - a :class:`DistributedContext`, or a ``torch.distributed.ProcessGroup`` (a subgroup): used as given
      (checked against the process group: ValueError when the rank or world size differ).
    """
    if distributed is None or distributed is False:
        return None
    if distributed is True:
        return DistributedContext.from_group(None, device)
    if isinstance(distributed, str):
        if distributed.strip().lower() != "auto":
            raise ValueError(f"distributed must be None, False, True or 'auto', got {distributed!r}")
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return DistributedContext.from_group(None, device)
    if isinstance(distributed, DistributedContext):
        distributed.check_group()
        if distributed.device is None and device is not None:
            return DistributedContext(distributed.rank, distributed.world_size, distributed.group, device)
        return distributed
    dist = _dist()
    if dist.is_available() and isinstance(distributed, dist.ProcessGroup):
        return DistributedContext.from_group(distributed, device)
    raise TypeError(
        f"distributed must be None, False, True, 'auto', a DistributedContext or a torch.distributed "
        f"ProcessGroup, got {type(distributed).__name__}"
    )


# ==============================================================================================
# sharded training data
# ==============================================================================================
class ShardedData:
    """The part of a data set that this rank processes, with the data set's own (global) indices.

    ``source``: the full training data (a :class:`~pyinfluence.torch.data.TensorData` or
    :class:`~pyinfluence.torch.batches.StreamingData`, defined identically on every rank). ``idx``: None (the
    data set itself, n = len(source)) or training indices (a subset view: position j is training example
    ``idx[j]``, n = len(idx)). ``ranges``: the sorted, disjoint position ranges [a, b) this rank processes
    (default: its contiguous shard of n).

    Implements the training-data protocol (``len`` = n, the global size; ``blocks(rows)`` yields this rank's
    blocks with GLOBAL start positions; ``take(idx)``; ``head(k)``; ``random_access``), so the Hessian operator
    and the solvers run unchanged on their shard; ``context`` tells them to all-reduce their sums.
    """

    def __init__(
        self,
        source: TrainingData,
        context: DistributedContext,
        idx: Tensor | None = None,
        ranges: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.source = source
        self.context = context
        self.idx = idx
        self._n = len(source) if idx is None else int(idx.numel())
        self.contiguous = ranges is None
        self.ranges: list[tuple[int, int]] = (
            [context.shard(self._n)] if ranges is None else [(int(a), int(b)) for a, b in ranges]
        )

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"ShardedData(n={self._n}, rank={self.context.rank}/{self.context.world_size}, "
            f"local={self.local_len})"
        )

    @property
    def local_len(self) -> int:
        """The number of examples this rank processes."""
        return sum(b - a for a, b in self.ranges)

    @property
    def start(self) -> int:
        """The first position of this rank's (contiguous) shard."""
        return self.ranges[0][0] if self.ranges else 0

    @property
    def random_access(self) -> bool:
        return bool(self.source.random_access)

    def with_ranges(self, ranges: Sequence[tuple[int, int]]) -> ShardedData:
        """The same data with this rank processing ``ranges`` instead."""
        return ShardedData(self.source, self.context, self.idx, ranges)

    def take(self, idx: Tensor | None) -> ShardedData:
        """The examples ``idx`` (global positions of this data), sharded contiguously over the ranks."""
        if idx is None:
            return self
        sub = idx if self.idx is None else self.idx.index_select(0, idx.to(self.idx.device))
        return ShardedData(self.source, self.context, sub)

    def head(self, k: int) -> tuple[Inputs, Tensor]:
        if self.idx is None:
            return self.source.head(k)
        d = self.source.take(self.idx[:k])
        return d.inputs, d.targets

    def blocks(self, rows: int) -> Iterator[tuple[int, Inputs, Tensor]]:
        """(global start position, inputs, targets) of this rank's examples, blocks of at most ``rows``."""
        ranges = [(a, b) for a, b in self.ranges if b > a]
        if not ranges:
            return
        if self.idx is None:
            yield from range_blocks(self.source, ranges, rows)
            return
        # a subset: read this rank's examples once (one pass for a stream), then cut them by range
        want = torch.cat([self.idx[a:b] for a, b in ranges])
        local: TensorData = self.source.take(want)
        off = 0
        for a, b in ranges:
            for s in range(a, b, rows):
                e = min(b, s + rows)
                yield (
                    s,
                    slice_inputs(local.inputs, off + s - a, off + e - a),
                    local.targets[off + s - a : off + e - a],
                )
            off += b - a

    def batches(self) -> Iterator[tuple[Inputs, Tensor]]:
        """This rank's examples, in blocks."""
        for _, X, Y in self.blocks(1 << 30):
            yield X, Y

    def gather(self, local: Tensor) -> Tensor:
        """The full (n, ...) result from this rank's rows of a contiguous shard (every rank returns it)."""
        if not self.contiguous:
            raise RuntimeError("gather needs the contiguous sharding")
        return self.context.gather_rows(local, self._n)


def range_blocks(
    data: Any, ranges: Sequence[tuple[int, int]], rows: int
) -> Iterator[tuple[int, Inputs, Tensor]]:
    """(start, inputs, targets) of the examples of ``data`` in the sorted, disjoint ``ranges``, blocks of at
    most ``rows``; delegates to ``data.range_blocks`` (TensorData, StreamingData)."""
    fn: Callable[..., Iterator[tuple[int, Inputs, Tensor]]] | None = getattr(data, "range_blocks", None)
    if fn is None:
        raise TypeError(f"{type(data).__name__} cannot be sharded (it has no range_blocks)")
    yield from fn(ranges, rows)


def data_fingerprint(data: Any, n: int) -> str:
    """A cheap digest of a data set: n, its first examples and, when it can be indexed, evenly spaced ones."""
    k = min(n, _FINGERPRINT_ROWS)
    X, Y = data.head(k)
    parts: list[Any] = [n, X, Y]
    if data.random_access and n > k:
        idx = torch.linspace(0, n - 1, _FINGERPRINT_ROWS).round().to(torch.int64)
        sel = data.take(idx.to(Y.device))
        parts += [sel.inputs, sel.targets]
    return digest_tensors(*parts)
