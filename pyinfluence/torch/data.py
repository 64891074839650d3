"""Training and test data for the torch path: (inputs, targets) tensor pairs, Datasets and
DataLoaders → two tensors on the device, validated (lengths, shapes, NaN/inf), with messages
naming the argument; the device argument; class labels."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from pyinfluence.torch.batches import (
    Inputs,
    StreamingData,
    batch_len,
    cat_inputs,
    check_loader_order,
    convert_inputs,
    index_inputs,
    slice_inputs,
    split_batch,
)
from pyinfluence.torch.batches import (
    check_finite as _check_finite,
)
from pyinfluence.torch.batches import to_tensor as _to_tensor

__all__ = ["TensorData", "TrainingData", "as_tensor_pair", "check_class_labels", "resolve_device"]


# ==============================================================================================
# data
# ==============================================================================================
@dataclass
class TensorData:
    """The whole data set in memory: inputs (n, *input_shape) — a tensor, or a dict of tensors each with n
    rows (Hugging Face style) — and targets (n, *target_shape), on one device.

    Implements the training-data protocol shared with :class:`~pyinfluence.torch.batches.StreamingData`:
    ``len``, ``blocks(rows)``, ``batches()``, ``take(idx)``, ``head(k)``, ``random_access``, and
    ``range_blocks(ranges, rows)`` (a rank's shard, :mod:`pyinfluence.torch.distributed`).
    """

    inputs: Inputs
    targets: Tensor

    random_access: ClassVar[bool] = True

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def take(self, idx: Tensor | None) -> TensorData:
        if idx is None:
            return self
        return TensorData(index_inputs(self.inputs, idx), self.targets.index_select(0, idx))

    def blocks(self, rows: int) -> Iterator[tuple[int, Inputs, Tensor]]:
        n = len(self)
        for s in range(0, n, rows):
            yield s, slice_inputs(self.inputs, s, s + rows), self.targets[s : s + rows]

    def batches(self) -> Iterator[tuple[Inputs, Tensor]]:
        yield self.inputs, self.targets

    def range_blocks(
        self, ranges: Sequence[tuple[int, int]], rows: int
    ) -> Iterator[tuple[int, Inputs, Tensor]]:
        """(start, inputs, targets) of the examples in the sorted, disjoint index ranges [a, b), blocks of at
        most ``rows`` (views): a rank's shard (:mod:`pyinfluence.torch.distributed`)."""
        for a, b in ranges:
            for s in range(a, b, rows):
                e = min(b, s + rows)
                yield s, slice_inputs(self.inputs, s, e), self.targets[s:e]

    def head(self, k: int) -> tuple[Inputs, Tensor]:
        return slice_inputs(self.inputs, 0, k), self.targets[:k]


# The training data the Hessian operator, the solvers and TorchInfluence consume: in memory, or streamed.
TrainingData = Union[TensorData, StreamingData]


def _is_dataloader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, (torch.utils.data.Dataset, torch.utils.data.IterableDataset))


def _pair_from_batch(name: str, batch: Any, label_key: str = "labels") -> tuple[Any, Any]:
    try:
        return split_batch(name, batch, label_key)
    except TypeError as exc:
        raise TypeError(f"{exc}; wrap the dataset so that it yields (x, y)") from None


def _collect_loader(name: str, loader: Any, label_key: str = "labels") -> tuple[Any, Tensor]:
    xs: list[Any] = []
    ys: list[Tensor] = []
    for batch in loader:
        x, y = _pair_from_batch(name, batch, label_key)
        if isinstance(x, Mapping):
            xs.append({k: _at_least_1d(torch.as_tensor(v)) for k, v in x.items()})
        else:
            xs.append(_at_least_1d(torch.as_tensor(x)))
        ys.append(_at_least_1d(torch.as_tensor(y)))
    if not xs:
        raise ValueError(f"{name} is empty")
    if any(isinstance(x, dict) != isinstance(xs[0], dict) for x in xs):
        raise TypeError(f"{name}: some batches hold a dict of inputs and others a tensor; use one form")
    try:
        return cat_inputs(xs), torch.cat(ys)
    except (RuntimeError, KeyError) as exc:
        raise ValueError(
            f"{name}: the batches could not be concatenated into one set of inputs and one tensor of "
            f"targets ({exc}); all examples must have the same shape (and a dict of inputs the same keys). "
            f"Stream the data instead (TorchInfluence keeps a DataLoader's batches as they are)"
        ) from None


def _at_least_1d(t: Tensor) -> Tensor:
    return t if t.ndim else t.reshape(1)


def _unpack(name: str, data: Any, label_key: str = "labels") -> tuple[Any, Any]:
    """(inputs, targets) from a pair, a dict batch, a Dataset or a DataLoader (targets not given
    separately)."""
    if isinstance(data, Mapping):
        return split_batch(name, data, label_key)
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(
                f"{name} must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader; "
                f"got a {type(data).__name__} of length {len(data)}"
            )
        return data[0], data[1]
    if _is_dataloader(data):
        check_loader_order(name, data)
        return _collect_loader(name, data, label_key)
    if _is_dataset(data):
        tensors = getattr(data, "tensors", None)
        if isinstance(data, torch.utils.data.TensorDataset) and tensors is not None:
            if len(tensors) != 2:
                raise TypeError(
                    f"{name} is a TensorDataset of {len(tensors)} tensors; it must hold exactly "
                    f"(inputs, targets)"
                )
            return tensors[0], tensors[1]
        loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=False)
        return _collect_loader(name, loader, label_key)
    if isinstance(data, Tensor) or hasattr(data, "__array__"):
        raise TypeError(
            f"{name}: targets are missing. Pass the inputs and the targets (X, y), an "
            f"(inputs, targets) tuple, a Dataset or a DataLoader"
        )
    raise TypeError(
        f"{name} must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader, got "
        f"{type(data).__name__}"
    )


def resolve_device(device: Any, default: torch.device) -> torch.device:
    """``device`` as a torch.device where the computation can run (``default`` for None), or a ValueError
    naming the argument: a string torch cannot parse, a device type with no data (``"meta"``) or no support
    here, or a CUDA device that is not available."""
    if device is None:
        return default
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"device must be None, a string such as 'cpu' or 'cuda:0', an int (a CUDA device index) or a "
            f"torch.device, got {type(device).__name__}"
        )
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device must be a CUDA device index >= 0, got {device}")
        device = f"cuda:{device}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'cuda:N' (or a torch.device), got {device!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device={str(dev)!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise ValueError(
            f"device={str(dev)!r} is not supported: TorchInfluence computes on 'cpu' or 'cuda' devices"
            + (" ('meta' tensors hold no values)" if dev.type == "meta" else "")
        )
    return dev


def check_class_labels(name: str, targets: Tensor, n_outputs: int | None) -> None:
    """Integer targets of a model with ``n_outputs`` ≥ 2 scores per example are class labels: refuse any
    outside 0 … n_outputs − 1 with a message naming the argument (the loss would fail deep inside vmap, or
    index out of bounds)."""
    if n_outputs is None or n_outputs < 2 or targets.is_floating_point() or targets.dtype == torch.bool:
        return
    if targets.numel() == 0:
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= n_outputs:
        bad = targets[(targets < 0) | (targets >= n_outputs)]
        raise ValueError(
            f"{name} has class labels outside 0..{n_outputs - 1} (the model has {n_outputs} outputs per "
            f"example): {sorted(set(bad.reshape(-1).tolist()))[:10]}"
        )


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def as_tensor_pair(
    name: str,
    data: Any,
    targets: Any = None,
    *,
    device: torch.device,
    dtype: torch.dtype,
    like: TensorData | None = None,
    names: tuple[str, str] = ("inputs", "targets"),
    label_key: str = "labels",
) -> tuple[TensorData, bool]:
    """Validated (inputs, targets) on ``device``; returns (data, single).

    ``targets is None``: ``data`` is an (inputs, targets) tuple/list, a dict batch holding the targets
    under ``label_key``, a Dataset or a DataLoader. Otherwise ``data`` are the inputs (a tensor/array, or
    a dict of them: Hugging Face style inputs, each examples first) and ``targets`` the targets.
    Floating inputs and targets are converted to ``dtype`` (the model's parameter dtype).

    With ``like`` (the training data), test data must have the same per-example input and target
    shapes; a single example given without the batch axis (inputs of shape input_shape with
    targets of shape target_shape) becomes a batch of one and ``single`` is True. Integer targets
    given as floats with integral values are cast to the training targets' dtype.
    """
    if targets is None:
        x, y = _unpack(name, data, label_key)
        in_name, tg_name = f"{name} inputs", f"{name} targets"
    else:
        if (
            isinstance(data, (tuple, list))
            or _is_dataset(data)
            or _is_dataloader(data)
            or (isinstance(data, Mapping) and label_key in data)
        ):
            raise TypeError(
                f"{names[0]} is a {type(data).__name__} and {names[1]} was also given: pass "
                f"either inputs and targets, or one (inputs, targets) pair / Dataset / DataLoader "
                f"alone"
            )
        x, y = data, targets
        in_name, tg_name = names
    if isinstance(x, Mapping):
        return _dict_pair(in_name, tg_name, x, y, device=device, dtype=dtype, like=like), False
    if like is not None and isinstance(like.inputs, dict):
        raise TypeError(
            f"{in_name} is a {type(x).__name__} but the training inputs are a dict with keys "
            f"{', '.join(repr(k) for k in like.inputs)}; pass the inputs in the same form"
        )
    like_inputs = None if like is None else like.inputs
    assert like_inputs is None or isinstance(like_inputs, Tensor)  # a dict was refused just above
    X = _to_tensor(in_name, x)
    Y = _to_tensor(tg_name, y)
    single = False
    if like is not None:
        assert like_inputs is not None
        in_shape = tuple(like_inputs.shape[1:])
        tg_shape = tuple(like.targets.shape[1:])
        if tuple(X.shape) == in_shape and tuple(Y.shape) == tg_shape and X.ndim < like_inputs.ndim:
            X, Y, single = X.unsqueeze(0), Y.unsqueeze(0), True
    if X.ndim == 0:
        raise ValueError(f"{in_name} must have a batch dimension (examples first), got a scalar")
    if Y.ndim == 0:
        raise ValueError(
            f"{tg_name} must have one target per example (shape (n, ...)), got a scalar"
            + (
                f"; for a single example pass inputs of shape {_shape_str(like_inputs.shape[1:])}"
                if like_inputs is not None
                else ""
            )
        )
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"{in_name} has {X.shape[0]} examples but {tg_name} has {Y.shape[0]}; they must match"
        )
    if X.shape[0] == 0:
        raise ValueError(f"{in_name} is empty; at least one example is required")
    if like is not None:
        assert like_inputs is not None
        if tuple(X.shape[1:]) != tuple(like_inputs.shape[1:]):
            raise ValueError(
                f"{in_name} has shape {_shape_str(X.shape)}: examples of shape "
                f"{_shape_str(X.shape[1:])}, but the training inputs have examples of shape "
                f"{_shape_str(like_inputs.shape[1:])}"
            )
        if tuple(Y.shape[1:]) != tuple(like.targets.shape[1:]):
            raise ValueError(
                f"{tg_name} has shape {_shape_str(Y.shape)}, but the training targets have shape "
                f"{_shape_str(like.targets.shape)} (per-example target shape "
                f"{_shape_str(like.targets.shape[1:])})"
            )
        ref = like.targets.dtype
        if Y.dtype != ref and not ref.is_floating_point and Y.is_floating_point():
            Yr = Y.to(ref)
            if not bool((Yr.to(Y.dtype) == Y).all()):
                raise TypeError(
                    f"{tg_name} has non-integral values but the training targets are "
                    f"{str(ref).replace('torch.', '')} (class labels)"
                )
            Y = Yr
        elif Y.dtype != ref and not ref.is_floating_point and ref != torch.bool:
            Y = Y.to(ref)
        elif ref.is_floating_point and not Y.is_floating_point():
            Y = Y.to(dtype)
        if like_inputs.is_floating_point() and not X.is_floating_point():
            X = X.to(dtype)  # integer features (e.g. raw pixels) for a model trained on real-valued ones
        elif not like_inputs.is_floating_point() and X.is_floating_point():
            raise TypeError(
                f"{in_name} are floating-point ({str(X.dtype).replace('torch.', '')}) but the training "
                f"inputs are {str(like_inputs.dtype).replace('torch.', '')} (e.g. token ids for an "
                f"embedding); pass {in_name} of the same kind"
            )
    if X.is_floating_point() and X.dtype != dtype:
        X = X.to(dtype)
    if Y.is_floating_point() and Y.dtype != dtype:
        Y = Y.to(dtype)
    X = X.to(device)
    Y = Y.to(device)
    _check_finite(in_name, X)
    _check_finite(tg_name, Y)
    return TensorData(X, Y), single


def _dict_pair(
    in_name: str,
    tg_name: str,
    x: Mapping[str, Any],
    y: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    like: TensorData | None,
) -> TensorData:
    """Dict inputs (Hugging Face style) with their targets, validated and on ``device``. With ``like``, the
    keys and each tensor's kind (floating or integer) must match the training inputs'; the per-example
    shapes may differ (sequences padded per batch)."""
    X = convert_inputs(in_name, x, device=device, dtype=dtype)
    assert isinstance(X, dict)
    Y = _to_tensor(tg_name, y)
    if Y.ndim == 0:
        raise ValueError(f"{tg_name} must have one target per example (shape (n, ...)), got a scalar")
    n = batch_len(X)
    if int(Y.shape[0]) != n:
        raise ValueError(f"{in_name} has {n} examples but {tg_name} has {Y.shape[0]}; they must match")
    if n == 0:
        raise ValueError(f"{in_name} is empty; at least one example is required")
    if like is not None:
        ref = like.inputs
        if not isinstance(ref, dict):
            raise TypeError(
                f"{in_name} is a dict but the training inputs are one tensor; pass the inputs in the same form"
            )
        if set(X) != set(ref):
            raise ValueError(
                f"{in_name} has keys {sorted(X)} but the training inputs have {sorted(ref)}; they must match"
            )
        for k, t in X.items():
            if t.is_floating_point() != ref[k].is_floating_point():
                raise TypeError(
                    f"{in_name}[{k!r}] is {str(t.dtype).replace('torch.', '')} but the training inputs' is "
                    f"{str(ref[k].dtype).replace('torch.', '')}; pass inputs of the same kind"
                )
        if Y.dtype != like.targets.dtype and not like.targets.is_floating_point() and Y.is_floating_point():
            raise TypeError(f"{tg_name} are floating-point but the training targets are class labels")
    if Y.is_floating_point() and Y.dtype != dtype:
        Y = Y.to(dtype)
    Y = Y.to(device)
    _check_finite(tg_name, Y)
    return TensorData(X, Y)
