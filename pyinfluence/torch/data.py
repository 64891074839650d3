"""Training and test data for the torch path: (inputs, targets) tensor pairs, Datasets and
DataLoaders → two tensors on the device, validated (lengths, shapes, NaN/inf), with messages
naming the argument; the device argument; class labels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["TensorData", "as_tensor_pair", "check_class_labels", "resolve_device"]


# ==============================================================================================
# data
# ==============================================================================================
@dataclass
class TensorData:
    """Inputs (n, *input_shape) and targets (n, *target_shape), on one device."""

    inputs: Tensor
    targets: Tensor

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def take(self, idx: Tensor | None) -> TensorData:
        if idx is None:
            return self
        return TensorData(self.inputs.index_select(0, idx), self.targets.index_select(0, idx))

    def blocks(self, rows: int) -> Iterator[tuple[int, Tensor, Tensor]]:
        n = len(self)
        for s in range(0, n, rows):
            yield s, self.inputs[s : s + rows], self.targets[s : s + rows]


def _is_dataloader(obj: Any) -> bool:
    return isinstance(obj, torch.utils.data.DataLoader)


def _is_dataset(obj: Any) -> bool:
    return isinstance(obj, (torch.utils.data.Dataset, torch.utils.data.IterableDataset))


def _pair_from_batch(name: str, batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    what = type(batch).__name__
    if isinstance(batch, (tuple, list)):
        what += f" of length {len(batch)}"
    raise TypeError(
        f"{name}: every item/batch must be an (inputs, targets) pair, got a {what}; wrap the "
        f"dataset so that it yields (x, y)"
    )


def _collect_loader(name: str, loader: Any) -> tuple[Tensor, Tensor]:
    xs, ys = [], []
    for batch in loader:
        x, y = _pair_from_batch(name, batch)
        xs.append(torch.as_tensor(x))
        ys.append(torch.as_tensor(y))
    if not xs:
        raise ValueError(f"{name} is empty")
    try:
        X = torch.cat([x if x.ndim else x.reshape(1) for x in xs])
        Y = torch.cat([y if y.ndim else y.reshape(1) for y in ys])
        return X, Y
    except RuntimeError as exc:
        raise ValueError(
            f"{name}: the batches could not be concatenated into one tensor of inputs and one of "
            f"targets ({exc}); all examples must have the same shape"
        ) from None


def _unpack(name: str, data: Any) -> tuple[Any, Any]:
    """(inputs, targets) from a pair, a Dataset or a DataLoader (targets not given separately)."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2:
            raise TypeError(
                f"{name} must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader; "
                f"got a {type(data).__name__} of length {len(data)}"
            )
        return data[0], data[1]
    if _is_dataloader(data):
        sampler = data.sampler
        if not isinstance(
            sampler,
            (torch.utils.data.SequentialSampler, torch.utils.data.dataloader._InfiniteConstantSampler),
        ):
            raise ValueError(
                f"{name} is a DataLoader with {type(sampler).__name__}: its order changes from pass "
                f"to pass, so training indices would be meaningless. Pass a DataLoader with "
                f"shuffle=False (or the Dataset itself)"
            )
        if getattr(data, "drop_last", False):
            raise ValueError(
                f"{name} is a DataLoader with drop_last=True, which leaves examples out; influence "
                f"needs every example: use drop_last=False"
            )
        return _collect_loader(name, data)
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
        return _collect_loader(name, loader)
    if isinstance(data, Tensor) or hasattr(data, "__array__"):
        raise TypeError(
            f"{name}: targets are missing. Pass the inputs and the targets (X, y), an "
            f"(inputs, targets) tuple, a Dataset or a DataLoader"
        )
    raise TypeError(
        f"{name} must be an (inputs, targets) pair of tensors, a Dataset or a DataLoader, got "
        f"{type(data).__name__}"
    )


def _to_tensor(name: str, a: Any) -> Tensor:
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


def _check_finite(name: str, t: Tensor) -> None:
    if not t.is_floating_point() or t.numel() == 0:
        return
    ok = torch.isfinite(t)
    if bool(ok.all()):
        return
    bad_rows = (~ok).reshape(t.shape[0], -1).any(dim=1).nonzero()
    first = int(bad_rows[0, 0])
    raise ValueError(
        f"{name} contains NaN or infinity ({int(bad_rows.numel())} example(s); first: example "
        f"{first}); remove or impute them"
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
) -> tuple[TensorData, bool]:
    """Validated (inputs, targets) on ``device``; returns (data, single).

    ``targets is None``: ``data`` is an (inputs, targets) tuple/list, a Dataset or a DataLoader.
    Otherwise ``data`` are the inputs and ``targets`` the targets (tensors, arrays or numbers).
    Floating inputs and targets are converted to ``dtype`` (the model's parameter dtype).

    With ``like`` (the training data), test data must have the same per-example input and target
    shapes; a single example given without the batch axis (inputs of shape input_shape with
    targets of shape target_shape) becomes a batch of one and ``single`` is True. Integer targets
    given as floats with integral values are cast to the training targets' dtype.
    """
    if targets is None:
        x, y = _unpack(name, data)
        in_name, tg_name = f"{name} inputs", f"{name} targets"
    else:
        if isinstance(data, (tuple, list)) or _is_dataset(data) or _is_dataloader(data):
            raise TypeError(
                f"{names[0]} is a {type(data).__name__} and {names[1]} was also given: pass "
                f"either inputs and targets, or one (inputs, targets) pair / Dataset / DataLoader "
                f"alone"
            )
        x, y = data, targets
        in_name, tg_name = names
    X = _to_tensor(in_name, x)
    Y = _to_tensor(tg_name, y)
    single = False
    if like is not None:
        in_shape = tuple(like.inputs.shape[1:])
        tg_shape = tuple(like.targets.shape[1:])
        if tuple(X.shape) == in_shape and tuple(Y.shape) == tg_shape and X.ndim < like.inputs.ndim:
            X, Y, single = X.unsqueeze(0), Y.unsqueeze(0), True
    if X.ndim == 0:
        raise ValueError(f"{in_name} must have a batch dimension (examples first), got a scalar")
    if Y.ndim == 0:
        raise ValueError(
            f"{tg_name} must have one target per example (shape (n, ...)), got a scalar"
            + (
                f"; for a single example pass inputs of shape {_shape_str(like.inputs.shape[1:])}"
                if like is not None
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
        if tuple(X.shape[1:]) != tuple(like.inputs.shape[1:]):
            raise ValueError(
                f"{in_name} has shape {_shape_str(X.shape)}: examples of shape "
                f"{_shape_str(X.shape[1:])}, but the training inputs have examples of shape "
                f"{_shape_str(like.inputs.shape[1:])}"
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
        if like.inputs.is_floating_point() and not X.is_floating_point():
            X = X.to(dtype)  # integer features (e.g. raw pixels) for a model trained on real-valued ones
        elif not like.inputs.is_floating_point() and X.is_floating_point():
            raise TypeError(
                f"{in_name} are floating-point ({str(X.dtype).replace('torch.', '')}) but the training "
                f"inputs are {str(like.inputs.dtype).replace('torch.', '')} (e.g. token ids for an "
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
