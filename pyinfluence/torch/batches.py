"""Batches as users hold them: model inputs that are one tensor or a dict of tensors (Hugging Face style),
and training data streamed from a ``DataLoader`` / ``Dataset`` / any re-iterable of batches.

Two kinds of training data implement one small protocol (``__len__``, ``blocks(rows)``, ``take(idx)``,
``head(k)``), consumed by the Hessian operator, the solvers and :class:`~pyinfluence.TorchInfluence`:

- :class:`pyinfluence.torch.data.TensorData`: the whole set in memory, on the computation's device.
- :class:`StreamingData`: the set stays where the user holds it; every pass iterates the source, and
  each batch is converted (floating tensors to the computation dtype), checked (finite values, class
  labels) and moved to the device on its own, so the peak memory is one batch (plus the model's
  working set), not the data set. Example i is the i-th example the source yields; the source must
  yield the same examples in the same order on every pass (checked by count: a pass that yields a
  different number of examples raises :class:`~pyinfluence.errors.DataError`).

Batch forms (training data and test data alike):

- ``(inputs, targets)`` or ``[inputs, targets]``: ``inputs`` a tensor (examples first) or a dict of
  tensors (each examples first), ``targets`` a tensor.
- a dict of tensors holding the targets under ``label_key`` (default ``"labels"``), the rest being the
  model's inputs: ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``.

A model whose inputs are a dict is called as ``model(**inputs)`` (the Hugging Face convention); with a
tensor, as ``model(inputs)``. ``loss_fn(outputs, targets)`` receives whatever the model returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, Union

import torch
from torch import Tensor

from pyinfluence.errors import DataError

__all__ = [
    "Inputs",
    "StreamingData",
    "batch_len",
    "cat_inputs",
    "check_finite",
    "check_loader_order",
    "index_inputs",
    "inputs_equal",
    "is_reiterable_source",
    "map_inputs",
    "slice_inputs",
    "split_batch",
    "to_tensor",
]

# One batch of model inputs: a tensor (B, ...) or a dict {name: (B, ...)} (Hugging Face style).
Inputs = Union[Tensor, dict[str, Tensor]]


# ==============================================================================================
# inputs that are a tensor or a dict of tensors
# ==============================================================================================
def map_inputs(X: Inputs, fn: Callable[[Tensor], Tensor]) -> Inputs:
    """``fn`` applied to the tensor, or to every tensor of the dict."""
    if isinstance(X, dict):
        return {k: fn(v) for k, v in X.items()}
    return fn(X)


def batch_len(X: Inputs) -> int:
    """The number of examples B in a batch of inputs (the first dimension)."""
    if isinstance(X, dict):
        for v in X.values():
            return int(v.shape[0])
        raise ValueError("a dict of inputs must hold at least one tensor")
    return int(X.shape[0])


def slice_inputs(X: Inputs, start: int, stop: int) -> Inputs:
    """Examples start … stop − 1 (views)."""
    return map_inputs(X, lambda t: t[start:stop])


def index_inputs(X: Inputs, idx: Tensor) -> Inputs:
    """The examples ``idx`` (a 1-D int64 tensor on the inputs' device), copied."""
    return map_inputs(X, lambda t: t.index_select(0, idx))


def cat_inputs(parts: list[Inputs]) -> Inputs:
    """Batches of inputs concatenated along the examples."""
    first = parts[0]
    if isinstance(first, dict):
        return {k: torch.cat([p[k] for p in parts]) for k in first}  # type: ignore[index]
    return torch.cat(parts)  # type: ignore[arg-type]


def inputs_equal(a: Inputs, b: Inputs) -> bool:
    """Same structure, shapes, dtypes and values."""
    if isinstance(a, dict) or isinstance(b, dict):
        if not (isinstance(a, dict) and isinstance(b, dict)) or a.keys() != b.keys():
            return False
        return all(_tensor_equal(a[k], b[k]) for k in a)
    return _tensor_equal(a, b)


def _tensor_equal(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _describe(x: Any) -> str:
    if isinstance(x, Tensor):
        return f"tensor of shape {tuple(x.shape)}"
    if isinstance(x, dict):
        return "dict with keys " + ", ".join(repr(k) for k in x)
    if isinstance(x, (tuple, list)):
        return f"{type(x).__name__} of length {len(x)}"
    return type(x).__name__


def split_batch(name: str, batch: Any, label_key: str) -> tuple[Any, Any]:
    """(inputs, targets) of one batch: an (inputs, targets) pair, or a dict holding the targets under
    ``label_key``. Raises TypeError naming ``name`` for anything else."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        if label_key not in batch:
            raise TypeError(
                f"{name}: a batch is a dict with keys {', '.join(repr(k) for k in batch)} but no "
                f"{label_key!r} entry holding the targets; pass label_key='<your key>' if the targets are "
                f"under another name"
            )
        inputs = {k: v for k, v in batch.items() if k != label_key}
        if not inputs:
            raise TypeError(f"{name}: a batch dict holds only {label_key!r}; the model's inputs are missing")
        return inputs, batch[label_key]
    raise TypeError(
        f"{name}: every batch must be an (inputs, targets) pair or a dict of tensors with the targets under "
        f"{label_key!r}, got a {_describe(batch)}"
    )


def to_tensor(name: str, a: Any) -> Tensor:
    """``a`` as a dense real tensor (detached; arrays and numbers converted), or a TypeError naming ``name``."""
    if isinstance(a, Tensor):
        t = a.detach()
    else:
        if a is None:
            raise TypeError(f"{name} is None; a tensor is required")
        try:
            t = torch.as_tensor(a)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} could not be converted to a tensor: {exc}") from None
    if t.is_complex():
        raise TypeError(f"{name} has complex dtype {t.dtype}; real values are required")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a sparse tensor ({t.layout}); pass a dense tensor")
    return t


def check_finite(name: str, t: Tensor, of: str = "") -> None:
    """A ValueError naming ``name`` and the first example (row) holding NaN or infinity; ``of`` qualifies the
    row number (e.g. " of its batch")."""
    if not t.is_floating_point() or t.numel() == 0 or t.ndim == 0:
        return
    ok = torch.isfinite(t)
    if bool(ok.all()):
        return
    bad_rows = (~ok).reshape(t.shape[0], -1).any(dim=1).nonzero()
    raise ValueError(
        f"{name} contains NaN or infinity ({int(bad_rows.numel())} example(s); first: example "
        f"{int(bad_rows[0, 0])}{of}); remove or impute them"
    )


def convert_inputs(
    name: str, x: Any, *, device: torch.device, dtype: torch.dtype, non_blocking: bool = False
) -> Inputs:
    """Inputs as a tensor or a dict of tensors on ``device``: floating tensors in ``dtype``, others
    (token ids, masks) unchanged; NaN/inf refused naming ``name`` (and the dict key)."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{name} is an empty dict; the model's inputs are missing")
        out: dict[str, Tensor] = {}
        n = None
        for k, v in x.items():
            if not isinstance(k, str):
                raise TypeError(f"{name}: the keys of a dict of inputs must be strings, got {k!r}")
            t = _to_device(to_tensor(f"{name}[{k!r}]", v), device, dtype, non_blocking)
            if t.ndim == 0:
                raise ValueError(f"{name}[{k!r}] must have a batch dimension (examples first), got a scalar")
            if n is None:
                n = int(t.shape[0])
            elif int(t.shape[0]) != n:
                raise ValueError(
                    f"{name}[{k!r}] has {t.shape[0]} examples but the other inputs have {n}; every "
                    f"tensor of a dict of inputs holds the same examples"
                )
            check_finite(f"{name}[{k!r}]", t, " of its batch")
            out[k] = t
        return out
    t = _to_device(to_tensor(name, x), device, dtype, non_blocking)
    check_finite(name, t, " of its batch")
    return t


def _to_device(t: Tensor, device: torch.device, dtype: torch.dtype, non_blocking: bool) -> Tensor:
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    if t.device != device:
        t = t.to(device, non_blocking=non_blocking)
    return t


# ==============================================================================================
# streamed training data
# ==============================================================================================
def is_reiterable_source(obj: Any) -> bool:
    """Whether ``obj`` is a source of batches that :class:`StreamingData` can stream: a DataLoader, a
    Dataset, or any other iterable that is not its own iterator (a list of batches, a custom object
    whose ``__iter__`` starts a new pass)."""
    if isinstance(obj, (Tensor, tuple, str, bytes, Mapping)) or hasattr(obj, "__array__"):
        return False
    if isinstance(obj, (torch.utils.data.DataLoader, torch.utils.data.Dataset)):
        return True
    return isinstance(obj, Iterable)


class StreamingData:
    """Training data streamed from where the user holds it; see the module docstring.

    ``source``: a ``DataLoader`` (its order must be fixed: no shuffling sampler, ``drop_last=False``),
    a map-style or iterable ``Dataset`` (wrapped in a DataLoader of ``batch_size`` with its default
    collation), or any re-iterable of batches (a list of batches, an object whose ``__iter__`` starts a
    new pass). A generator or other one-pass iterator is refused (it would be exhausted after the first
    pass; influence needs several).

    ``take(idx)`` (random training subsets: ``train_idx=``, LiSSA's minibatches) reads the chosen examples
    by index from a map-style dataset (``dataset[i]``, collated like the loader's batches); for other
    sources it makes one pass and keeps the chosen examples (as a :class:`TensorData` in memory).

    Not thread-safe by itself (a DataLoader with worker processes is not either); TorchInfluence
    serialises passes over a stream with a lock.
    """

    def __init__(
        self,
        name: str,
        source: Any,
        *,
        device: torch.device,
        dtype: torch.dtype,
        label_key: str = "labels",
        batch_size: int = 256,
    ) -> None:
        self.name = name
        self.device = device
        self.dtype = dtype
        self.label_key = label_key
        self._dataset: Any = None
        self._collate: Callable[[list[Any]], Any] | None = None
        if isinstance(source, torch.utils.data.DataLoader):
            check_loader_order(name, source)
            self._loader: Any = source
            ds = source.dataset
            if not isinstance(ds, torch.utils.data.IterableDataset) and hasattr(ds, "__getitem__"):
                self._dataset, self._collate = ds, source.collate_fn
        elif isinstance(source, torch.utils.data.Dataset):
            self._loader = torch.utils.data.DataLoader(source, batch_size=batch_size, shuffle=False)
            if not isinstance(source, torch.utils.data.IterableDataset):
                self._dataset, self._collate = source, self._loader.collate_fn
        elif isinstance(source, Iterable):
            if iter(source) is source:
                raise TypeError(
                    f"{name} is a one-pass iterator ({type(source).__name__}); influence makes several passes "
                    f"over the training data. Pass a DataLoader, a Dataset, a list of batches or an object "
                    f"whose __iter__ starts a new pass"
                )
            self._loader = source
        else:
            raise TypeError(
                f"{name} must be a DataLoader, a Dataset or an iterable of batches, got {source!r}"
            )
        self._n: int | None = None
        n = _sized_length(source)
        if n is not None:
            self._n = n
        self.non_blocking = device.type == "cuda" and bool(getattr(self._loader, "pin_memory", False))
        self._head: tuple[Inputs, Tensor] | None = None
        # an extra check of every batch's targets (TorchInfluence sets it: class labels in range)
        self.check_targets: Callable[[Tensor], None] | None = None

    # -- the protocol ------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self._n is None:
            self._count()
        assert self._n is not None
        return self._n

    @property
    def random_access(self) -> bool:
        """Whether single examples can be read by index (a map-style dataset)."""
        return self._dataset is not None

    def batches(self) -> Iterator[tuple[Inputs, Tensor]]:
        """One pass over the source: its batches converted and on the device; counts the examples and
        raises DataError if a pass yields a different number than the first."""
        seen = 0
        for batch in self._loader:
            X, Y = self._convert(batch)
            b = batch_len(X)
            if b == 0:
                continue
            seen += b
            if self._n is not None and seen > self._n:
                raise self._count_error(seen)
            yield X, Y
        if self._n is None:
            if seen == 0:
                raise ValueError(f"{self.name} is empty: it yielded no examples")
            self._n = seen
        elif seen != self._n:
            raise self._count_error(seen)

    def blocks(self, rows: int) -> Iterator[tuple[int, Inputs, Tensor]]:
        """(start index, inputs, targets) for one pass, blocks of at most ``rows`` examples (a larger batch
        of the source is split; smaller ones are passed as they are)."""
        start = 0
        for X, Y in self.batches():
            b = batch_len(X)
            for s in range(0, b, rows):
                e = min(b, s + rows)
                yield start + s, (X if (s == 0 and e == b) else slice_inputs(X, s, e)), Y[s:e]
            start += b

    def range_blocks(
        self, ranges: Sequence[tuple[int, int]], rows: int
    ) -> Iterator[tuple[int, Inputs, Tensor]]:
        """(start, inputs, targets) of the examples in the sorted, disjoint index ranges [a, b), blocks of at
        most ``rows``: a rank's shard (:mod:`pyinfluence.torch.distributed`).

        A map-style dataset is read by index: per range, a DataLoader over ``Subset(dataset, range(a, b))``
        with the source loader's batch size, collate function, workers and pinning. Any other stream is
        iterated from the start: batches that do not overlap a range are skipped unconverted (only their length
        is read), overlapping ones are converted and cut; the pass stops after the last range (DataError if the
        stream ends before it, or yields more than n examples when read to its end)."""
        ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        if not ranges:
            return
        if self._dataset is not None:
            for a, b in ranges:
                start = a
                for batch in self._subset_loader(a, b, rows):
                    X, Y = self._convert(batch)
                    B = batch_len(X)
                    for s in range(0, B, rows):
                        e = min(B, s + rows)
                        yield start + s, (X if (s == 0 and e == B) else slice_inputs(X, s, e)), Y[s:e]
                    start += B
                if start != b:
                    raise DataError(
                        f"{self.name}: examples {a}…{b - 1} read by index gave {start - a} examples, not {b - a}"
                    )
            return
        pos = 0
        j = 0
        end = ranges[-1][1]
        for batch in self._loader:
            B = _raw_len(self.name, batch, self.label_key)
            lo, hi = pos, pos + B
            pos = hi
            if B == 0 or hi <= ranges[j][0]:
                continue
            X, Y = self._convert(batch)
            if batch_len(X) != B:
                raise ValueError(
                    f"{self.name}: a batch's inputs and targets disagree on its number of examples"
                )
            while j < len(ranges) and ranges[j][0] < hi:
                a, b = max(ranges[j][0], lo), min(ranges[j][1], hi)
                for s in range(a, b, rows):
                    e = min(b, s + rows)
                    yield s, slice_inputs(X, s - lo, e - lo), Y[s - lo : e - lo]
                if ranges[j][1] <= hi:
                    j += 1
                else:
                    break
            if j == len(ranges):
                break
        if pos < end:
            raise self._count_error(pos)
        if self._n is not None and pos > self._n:
            raise self._count_error(pos)

    def _subset_loader(self, a: int, b: int, rows: int) -> Any:
        """A DataLoader over examples a … b − 1 of the map-style dataset, with the source loader's options."""
        src = self._loader
        sub = torch.utils.data.Subset(self._dataset, range(a, b))
        nw = int(getattr(src, "num_workers", 0) or 0)
        kw: dict[str, Any] = {
            "batch_size": getattr(src, "batch_size", None) or rows,
            "shuffle": False,
            "collate_fn": self._collate,
            "num_workers": nw,
            "pin_memory": bool(getattr(src, "pin_memory", False)),
        }
        if nw > 0:
            kw["worker_init_fn"] = getattr(src, "worker_init_fn", None)
            kw["timeout"] = getattr(src, "timeout", 0)
            kw["multiprocessing_context"] = getattr(src, "multiprocessing_context", None)
            if getattr(src, "prefetch_factor", None) is not None:
                kw["prefetch_factor"] = src.prefetch_factor
        return torch.utils.data.DataLoader(sub, **kw)

    def take(self, idx: Tensor | None) -> Any:
        """The examples ``idx`` (int64, any device), in that order: ``self`` for None; a TensorData."""
        from pyinfluence.torch.data import TensorData

        if idx is None:
            return self
        order = idx.detach().to("cpu", torch.int64)
        if self._dataset is not None:
            assert self._collate is not None
            items = [self._dataset[int(i)] for i in order.tolist()]
            if not items:
                X, Y = self.head(1)
                return TensorData(slice_inputs(X, 0, 0), Y[:0])
            X, Y = self._convert(self._collate(items))
            return TensorData(X, Y)
        # one pass, keeping the chosen rows
        uniq, inverse = torch.unique(order, return_inverse=True)
        want = uniq.tolist()
        got_x: list[Inputs] = []
        got_y: list[Tensor] = []
        j = 0
        for s, X, Y in self.blocks(1 << 30):
            b = batch_len(X)
            lo = j
            while j < len(want) and want[j] < s + b:
                j += 1
            if j > lo:
                local = torch.tensor(want[lo:j], dtype=torch.int64) - s
                local = local.to(Y.device)
                got_x.append(index_inputs(X, local))
                got_y.append(Y.index_select(0, local))
        if not got_x:
            X, Y = self.head(1)
            return TensorData(slice_inputs(X, 0, 0), Y[:0])
        Xs, Ys = cat_inputs(got_x), torch.cat(got_y)
        inv = inverse.to(Ys.device)
        return TensorData(index_inputs(Xs, inv), Ys.index_select(0, inv))

    def head(self, k: int) -> tuple[Inputs, Tensor]:
        """The first ``k`` examples (at most; from the first batch), cached: for shape, dtype and sanity
        checks without a pass."""
        if self._head is None or batch_len(self._head[0]) < k:
            for X, Y in self._first_batches(k):
                self._head = (X, Y)
                break
            else:
                raise ValueError(f"{self.name} is empty: it yielded no examples")
        assert self._head is not None
        X, Y = self._head
        return slice_inputs(X, 0, k), Y[:k]

    # -- helpers ---------------------------------------------------------------------------------
    def _first_batches(self, k: int) -> Iterator[tuple[Inputs, Tensor]]:
        xs: list[Inputs] = []
        ys: list[Tensor] = []
        total = 0
        for batch in self._loader:
            X, Y = self._convert(batch)
            if batch_len(X) == 0:
                continue
            xs.append(X)
            ys.append(Y)
            total += batch_len(X)
            if total >= k:
                break
        if xs:
            yield (xs[0], ys[0]) if len(xs) == 1 else (cat_inputs(xs), torch.cat(ys))

    def _count(self) -> None:
        for _ in self.batches():
            pass

    def _count_error(self, seen: int) -> DataError:
        return DataError(
            f"{self.name} yielded {seen}{'+' if self._n is not None and seen > self._n else ''} examples on this "
            f"pass but {self._n} before: the training data must yield the same examples in the same order on "
            f"every pass (training index i is the i-th example)"
        )

    def _convert(self, batch: Any) -> tuple[Inputs, Tensor]:
        x, y = split_batch(self.name, batch, self.label_key)
        X = convert_inputs(
            f"{self.name} inputs", x, device=self.device, dtype=self.dtype, non_blocking=self.non_blocking
        )
        Y = to_tensor(f"{self.name} targets", y)
        if Y.ndim == 0:
            raise ValueError(f"{self.name} targets must have one target per example, got a scalar")
        if Y.is_floating_point() and Y.dtype != self.dtype:
            Y = Y.to(self.dtype)
        Y = Y.to(self.device, non_blocking=self.non_blocking)
        if int(Y.shape[0]) != batch_len(X):
            raise ValueError(
                f"{self.name}: a batch has {batch_len(X)} examples of inputs but {Y.shape[0]} targets; they "
                f"must match"
            )
        check_finite(f"{self.name} targets", Y, " of its batch")
        if self.check_targets is not None:
            self.check_targets(Y)
        return X, Y


def _raw_len(name: str, batch: Any, label_key: str) -> int:
    """The number of examples of a batch as the source yields it, without converting it: the length of its
    targets (a tensor, array or sequence)."""
    _, y = split_batch(name, batch, label_key)
    shape = getattr(y, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    try:
        return len(y)
    except TypeError:
        raise ValueError(f"{name} targets must have one target per example, got a scalar") from None


def _sized_length(source: Any) -> int | None:
    """The number of examples, when the source knows it without a pass (a DataLoader over a sized
    map-style dataset, a sized Dataset); None otherwise (counted on the first pass)."""
    ds = source.dataset if isinstance(source, torch.utils.data.DataLoader) else source
    if isinstance(ds, torch.utils.data.IterableDataset) or not isinstance(ds, torch.utils.data.Dataset):
        return None
    try:
        return int(len(ds))  # type: ignore[arg-type]
    except TypeError:
        return None


def check_loader_order(name: str, loader: torch.utils.data.DataLoader) -> None:
    """A DataLoader must yield the same examples in the same order on every pass: no shuffling sampler,
    no ``drop_last``."""
    sampler = loader.sampler
    if not isinstance(
        sampler,
        (torch.utils.data.SequentialSampler, torch.utils.data.dataloader._InfiniteConstantSampler),
    ):
        raise ValueError(
            f"{name} is a DataLoader with {type(sampler).__name__}: its order changes from pass to pass, so "
            f"training indices would be meaningless. Pass a DataLoader with shuffle=False (or the Dataset "
            f"itself)"
        )
    if getattr(loader, "drop_last", False):
        raise ValueError(
            f"{name} is a DataLoader with drop_last=True, which leaves examples out; influence needs every "
            f"example: use drop_last=False"
        )
