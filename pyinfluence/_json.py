"""The one JSON-safe conversion of the package (results.json, bench.json, the applications' ``to_dict``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["jsonable"]


def jsonable(v: Any) -> Any:
    """Plain-Python, JSON-ready copy of ``v``; never NaN or infinity (those become ``None``).

    - objects with ``to_dict()`` (result objects) → their dict, converted; other dataclass instances → a dict
      of their fields;
    - mappings → dicts with string keys; lists and tuples → lists;
    - numpy arrays and scalars, torch tensors (moved to the CPU; torch is never imported here) → lists and
      Python numbers;
    - bools, ints, strings and None as they are; floats, unless non-finite;
    - anything else (paths, torch dtypes and devices, ...) → ``str(v)`` without a ``torch.`` prefix.
    """
    if hasattr(v, "to_dict") and callable(v.to_dict) and not isinstance(v, type):
        return jsonable(v.to_dict())
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "detach") and hasattr(v, "cpu") and hasattr(v, "numpy"):  # a torch.Tensor
        v = v.detach().cpu().numpy()
    if hasattr(v, "tolist") and hasattr(v, "dtype"):  # a numpy array or scalar
        return jsonable(v.tolist())
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    return str(v).replace("torch.", "")
