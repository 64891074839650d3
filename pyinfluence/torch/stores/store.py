"""Gradient stores on disk: projected per-example training gradients, computed once, sharded, memory-mapped.

A store holds, for n training examples z_i in data order, the rows

    φ_i = P ∇θL(z_i, θ̂)      (k,)      (no 1/n factor, no L2 term: the gradient of the example's own loss)

with P (k × p) a :mod:`projection <pyinfluence.torch.stores.projections>` (E[PᵀP] = I), as TRAK, LoGra,
GraSS and Bergson do. On disk, a folder:

- ``shard_00000.npy``, ``shard_00001.npy``, …: (rows, k) arrays in the store's dtype (numpy ``.npy``, written
  through ``numpy.lib.format.open_memmap``); row j of shard s is example ``s·shard_size + j``. Every shard has
  ``shard_size`` rows except the last.
- ``manifest.json``: the format and library versions, the creation time, the model's class, the selected
  parameters' names and shapes (p), the projection's kind, dimension, seed and parameters, the dtype,
  ``shard_size``, per shard its file, first row, row count and SHA-256 digests of its rows and of the
  training data it was computed from, the total n, SHA-256 fingerprints of θ̂ and of the other parameters and
  buffers of the model, and the influence object's ``l2`` and damping.

Nothing is pickled (``np.load(..., allow_pickle=False)``, JSON).

**Building** (:meth:`GradientStore.build`) streams over the training data in batches: per-example gradients
of one batch at a time (or, for :class:`~pyinfluence.torch.stores.projections.LoGraProjection`, the projected
gradients directly from hooks), projected and written into the current shard. A shard is written under a
temporary name and renamed when complete (atomic), then the manifest is replaced (atomically) — so an
interrupted build **resumes**: ``build`` on the same folder with the same configuration and the same θ̂
verifies the completed shards' training data (by their SHA-256, while consuming the iterable's first batches
without computing any gradient) and continues with the next shard. A different configuration or θ̂ raises
ValueError unless ``overwrite=True``.

**Reading** (:meth:`GradientStore.open`) validates the manifest and every shard (a missing, truncated or
mismatched shard raises, naming the file) and memory-maps the shards read-only. Scoring
(:mod:`pyinfluence.torch.stores.scoring`) streams the rows in chunks read from the files, with memory that
does not grow with n.

**Distributed** (``torch.distributed``, under ``torchrun``): :meth:`GradientStore.build` with a
:class:`~pyinfluence.TorchInfluence` built with ``distributed=...`` writes ONE store from all ranks, into a folder
every rank can reach (a shared file system). Shard s (rows s·shard_size … (s+1)·shard_size − 1 of the global data
order, so a shard's name carries its range) is computed and written by rank s mod W; rank 0 prepares the folder,
and after the ranks are done it merges their shard records (``shards.rankNNNNN.json``, removed afterwards) into
the one manifest. The files are those of a single-process build of the same data. Each rank reads only the
examples of its shards (an iterable that cannot be indexed is iterated by every rank, converting only its
shards' batches). A build resumes from the shards its manifest records; an interrupted distributed build records
none (its manifest is written at the end), so it is recomputed. A store opened or built with a context
(``GradientStore.open(path, distributed=...)``) scores shard by shard on the ranks, each rank its own shards
(s mod W), and merges: :meth:`~GradientStore.scores`, :meth:`~GradientStore.top_k` and
:class:`~pyinfluence.torch.stores.scoring.ProjectedInfluence` return the full results, with global row indices, on
every rank.

**Threads**: a store object is read-only after :meth:`~GradientStore.open`; its methods may be called from
several threads (each streaming pass opens its own file handles). A build must be the only writer of its
folder (one process, one thread; there is no lock file).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor

from pyinfluence._validation import check_bool, check_int
from pyinfluence._version import __version__
from pyinfluence.errors import DataError, NonFiniteError
from pyinfluence.interface import TopK
from pyinfluence.torch.batches import batch_len, convert_inputs, slice_inputs, split_batch
from pyinfluence.torch.stores.projections import (
    LoGraProjection,
    ParamLayout,
    Projection,
    projection_from_config,
    resolve_projection,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "GradientStore"]

PathLike = Union[str, "os.PathLike[str]"]

#: The ``format`` entry of every manifest, and the version of the layout described in the module docstring.
FORMAT = "pyinfluence-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Default shard size: as many rows as fit this many bytes (rounded down to a multiple of 1024 rows).
_SHARD_BYTES = 64 << 20
# Rows read per chunk when streaming: as many as fit this many bytes.
_CHUNK_BYTES = 32 << 20
_STORE_DTYPES: dict[str, np.dtype] = {
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}
# The per-rank shard records of a distributed build (merged into the manifest by rank 0, then removed).
_RANK_RECORD = "shards.rank{:05d}.json"
# The manifest entries that must agree for a build to resume (or be returned as it is).
_CONFIG_KEYS = (
    "format",
    "format_version",
    "model_class",
    "param_names",
    "param_shapes",
    "n_params",
    "param_dtype",
    "projection",
    "dim",
    "dtype",
    "shard_size",
    "theta_sha256",
    "fixed_sha256",
)
_REQUIRED: dict[str, Any] = {
    "format": str,
    "format_version": int,
    "library_version": str,
    "created": str,
    "complete": bool,
    "model_class": str,
    "param_names": list,
    "param_shapes": list,
    "n_params": int,
    "param_dtype": str,
    "projection": dict,
    "dim": int,
    "dtype": str,
    "shard_size": int,
    "n": int,
    "shards": list,
    "theta_sha256": str,
    "fixed_sha256": str,
    "l2": (int, float),
    "damping": (int, float),
}


# ==============================================================================================
# small helpers
# ==============================================================================================
def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.npy"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _tensor_bytes(t: Tensor) -> memoryview:
    """The raw bytes of a tensor (moved to the CPU, C order)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().data


def _sha256_named(items: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of named tensors, in order."""
    h = hashlib.sha256()
    for name, t in items:
        h.update(f"{name}|{tuple(t.shape)}|{str(t.dtype).replace('torch.', '')}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _fingerprints(fm: Any) -> tuple[str, str]:
    """(SHA-256 of θ̂: the selected parameters, in order; SHA-256 of the model's other parameters and
    buffers, by name): a store's rows depend on both."""
    theta = _sha256_named((n, fm.params[n]) for n in fm.names)
    fixed = _sha256_named(sorted(fm.fixed.items()))
    return theta, fixed


def _functional_model(influence: Any, name: str = "influence") -> Any:
    fm = getattr(getattr(influence, "operator", None), "fm", None)
    if fm is None or not hasattr(fm, "per_example_grads"):
        raise TypeError(
            f"{name} must be a pyinfluence.TorchInfluence (the model, loss and selected parameters whose "
            f"gradients are stored), got {type(influence).__name__}"
        )
    return fm


def _store_dtype(dtype: Any) -> np.dtype:
    key = str(dtype).replace("torch.", "") if dtype is not None else ""
    if isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        key = np.dtype(dtype).name
    if key not in _STORE_DTYPES:
        raise TypeError(f"dtype must be torch.float16, torch.float32 or torch.float64, got {dtype!r}")
    return _STORE_DTYPES[key]


def _model_class(model: Any) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _loss_name(loss_fn: Any) -> str:
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    return f"{getattr(loss_fn, '__module__', None) or type(loss_fn).__module__}.{name}"


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (atomic on POSIX and Windows)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _check_path(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike (a folder), got {type(path).__name__}")
    return Path(os.fspath(path))


class _DataHasher:
    """SHA-256 of a stream of batches (inputs and targets hashed separately, so that the digest does not
    depend on where the stream is cut into batches)."""

    def __init__(self) -> None:
        self._h: dict[str, Any] = {}

    def update(self, X: Any, Y: Tensor) -> None:
        items = [(f"inputs[{k}]", v) for k, v in X.items()] if isinstance(X, Mapping) else [("inputs", X)]
        for name, t in [*items, ("targets", Y)]:
            self._h.setdefault(name, hashlib.sha256()).update(_tensor_bytes(t))

    def hexdigest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self._h):
            h.update(f"{name}:{self._h[name].hexdigest()}\n".encode())
        return h.hexdigest()


# ==============================================================================================
# training data as converted batches
# ==============================================================================================
def _convert_batch(name: str, x: Any, y: Any, fm: Any) -> tuple[Any, Tensor]:
    X = convert_inputs(f"{name} inputs", x, device=fm.device, dtype=fm.dtype)
    if isinstance(y, Tensor):
        Y = y.detach()
    else:
        try:
            Y = torch.as_tensor(np.asarray(y) if not isinstance(y, np.ndarray) else y)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{name} targets could not be converted to a tensor: {exc}") from None
    if Y.ndim == 0:
        raise ValueError(f"{name} targets must have one target per example (batch first), got a scalar")
    if Y.is_floating_point():
        Y = Y.to(fm.dtype)
        if not bool(torch.isfinite(Y).all()):
            raise ValueError(f"{name} targets contain NaN or infinity")
    Y = Y.to(fm.device)
    if int(Y.shape[0]) != batch_len(X):
        raise ValueError(
            f"{name}: a batch has {batch_len(X)} examples of inputs but {Y.shape[0]} targets; they must match"
        )
    return X, Y


def _is_pair(data: Any) -> bool:
    """Whether ``data`` is one (inputs, targets) pair of arrays (rather than a sequence of batches)."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (Tensor, np.ndarray, Mapping))
        and isinstance(data[1], (Tensor, np.ndarray))
    )


def _check_loader(loader: Any) -> None:
    sampler = getattr(loader, "sampler", None)
    ok = (torch.utils.data.SequentialSampler, torch.utils.data.dataloader._InfiniteConstantSampler)
    if sampler is not None and not isinstance(sampler, ok):
        raise ValueError(
            f"data is a DataLoader with {type(sampler).__name__}: row i of the store is the i-th example the "
            f"loader yields, so its order must be fixed. Pass a DataLoader with shuffle=False"
        )
    if getattr(loader, "drop_last", False):
        raise ValueError(
            "data is a DataLoader with drop_last=True, which leaves examples out: use drop_last=False"
        )


def _iter_batches(data: Any, influence: Any, fm: Any, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
    """The training data as converted batches (inputs, targets) on the functional model's device."""
    if data is None:
        own = getattr(influence.operator, "data", None)
        if own is not None and hasattr(own, "blocks"):  # the influence object's data, without a copy
            for _, X, Y in own.blocks(batch_size):
                yield X, Y
            return
        data = influence.training_data()
    if _is_pair(data):
        x, y = data
        n = batch_len(dict(x)) if isinstance(x, Mapping) else len(x)
        if len(y) != n:
            raise ValueError(f"data: the inputs have {n} examples but the targets {len(y)}")
        for s in range(0, n, batch_size):
            xs = (
                {k: v[s : s + batch_size] for k, v in x.items()}
                if isinstance(x, Mapping)
                else x[s : s + batch_size]
            )
            yield _convert_batch("data", xs, y[s : s + batch_size], fm)
        return
    if isinstance(data, torch.utils.data.DataLoader):
        _check_loader(data)
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, (Tensor, np.ndarray, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be None (the influence object's training data), an (inputs, targets) pair, a "
            f"DataLoader with shuffle=False, a Dataset or an iterable of (inputs, targets) batches; got "
            f"{type(data).__name__}"
        )
    for batch in data:
        x, y = split_batch("data", batch, "labels")
        yield _convert_batch("data", x, y, fm)


def _raw_rows(x: Any) -> int:
    """The number of examples of a batch's inputs as the source yields them (not converted)."""
    if isinstance(x, Mapping):
        for v in x.values():
            return _raw_rows(v)
        raise ValueError("data: a batch's dict of inputs is empty")
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return len(x)


def _owned_blocks(
    data: Any, influence: Any, fm: Any, batch: int, R: int, keep: Any, total: list[int]
) -> Iterator[tuple[int, Any, Tensor]]:
    """(global start, inputs, targets) of the rows of ``data`` that lie in shards ``si`` with ``keep(si)`` (shards
    of ``R`` rows), converted; other batches are skipped unconverted (only their length is read). At the end
    ``total[0]`` is the number of rows ``data`` yielded. ``data`` as for :meth:`GradientStore.build` (None: the
    influence object's full training data)."""
    if data is None:
        own = getattr(influence.operator, "data", None)
        src = getattr(own, "source", own)
        if src is not None and getattr(own, "idx", None) is None and hasattr(src, "range_blocks"):
            n = len(src)
            ranges = [(si * R, min(n, si * R + R)) for si in range(-(-n // R)) if keep(si)]
            yield from src.range_blocks(ranges, batch)
            total[0] = n
            return
        data = influence.training_data()
    if _is_pair(data):
        x, y = data
        n = _raw_rows(x)
        if len(y) != n:
            raise ValueError(f"data: the inputs have {n} examples but the targets {len(y)}")
        for si in range(-(-n // R)):
            if keep(si):
                for s in range(si * R, min(n, si * R + R), batch):
                    e = min(n, s + batch, si * R + R)
                    xs = {k: v[s:e] for k, v in x.items()} if isinstance(x, Mapping) else x[s:e]
                    X, Y = _convert_batch("data", xs, y[s:e], fm)
                    yield s, X, Y
        total[0] = n
        return
    if isinstance(data, torch.utils.data.DataLoader):
        _check_loader(data)
    elif isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        data = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    elif isinstance(data, (Tensor, np.ndarray, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            "data must be None (the influence object's training data), an (inputs, targets) pair, a "
            f"DataLoader with shuffle=False, a Dataset or an iterable of (inputs, targets) batches; got "
            f"{type(data).__name__}"
        )
    row = 0
    for b in data:
        x, y = split_batch("data", b, "labels")
        B = _raw_rows(x)
        lo, hi = row, row + B
        row = hi
        if B == 0 or not any(keep(si) for si in range(lo // R, (hi - 1) // R + 1)):
            continue
        X, Y = _convert_batch("data", x, y, fm)
        for si in range(lo // R, (hi - 1) // R + 1):
            if keep(si):
                a, e = max(lo, si * R), min(hi, si * R + R)
                yield a, slice_inputs(X, a - lo, e - lo), Y[a - lo : e - lo]
    total[0] = row


# ==============================================================================================
# shards
# ==============================================================================================
@dataclass(frozen=True)
class _Shard:
    file: Path
    start: int
    rows: int
    offset: int  # byte offset of the data in the .npy file


class _ShardWriter:
    """One shard being written: a (capacity, k) memmap under a temporary name, renamed when complete."""

    def __init__(self, root: Path, index: int, capacity: int, k: int, dtype: np.dtype) -> None:
        self.final = root / _shard_name(index)
        self.tmp = root / (_shard_name(index) + ".tmp")
        self.capacity, self.k, self.dtype = capacity, k, dtype
        self.arr: Any = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=dtype, shape=(capacity, k))
        self.rows_hash = hashlib.sha256()
        self.data_hash = _DataHasher()

    def write(self, at: int, block: np.ndarray) -> None:
        self.arr[at : at + block.shape[0]] = block
        self.rows_hash.update(np.ascontiguousarray(block).data)

    def finish(self, rows: int) -> None:
        """Flush and rename to the final name; a partial (last) shard is first copied to exactly ``rows``."""
        if rows < self.capacity:
            part = self.final.with_name(self.final.name + ".part")
            out: Any = np.lib.format.open_memmap(part, mode="w+", dtype=self.dtype, shape=(rows, self.k))
            step = max(1, _CHUNK_BYTES // max(1, self.k * self.dtype.itemsize))
            for s in range(0, rows, step):
                out[s : min(rows, s + step)] = self.arr[s : min(rows, s + step)]
            out.flush()
            del out
            self._close()
            os.remove(self.tmp)
            os.replace(part, self.final)
        else:
            self.arr.flush()
            self._close()
            os.replace(self.tmp, self.final)

    def _close(self) -> None:
        arr, self.arr = self.arr, None
        if arr is not None:
            mm = getattr(arr, "_mmap", None)
            del arr
            if mm is not None:
                mm.close()

    def abort(self) -> None:
        self._close()
        for f in (self.tmp, self.final.with_name(self.final.name + ".part")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)


def _shard_entry(index: int, shard_size: int, rows: int, writer: _ShardWriter) -> dict[str, Any]:
    """The manifest entry of a written shard."""
    return {
        "file": _shard_name(index),
        "start": index * shard_size,
        "rows": rows,
        "rows_sha256": writer.rows_hash.hexdigest(),
        "data_sha256": writer.data_hash.hexdigest(),
    }


def _read_header(file: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran_order, dtype, data offset) of a .npy file, without loading it."""
    with open(file, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        return tuple(shape), bool(fortran), np.dtype(dtype), f.tell()


def _open_shard(file: Path, rows: int, k: int, dtype: np.dtype) -> tuple[Any, int]:
    """Validate one shard file against the manifest and memory-map it read-only: (array, data offset)."""
    if not file.is_file():
        raise FileNotFoundError(f"gradient store: shard file {file} is missing")
    try:
        shape, fortran, dt, offset = _read_header(file)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:
        raise ValueError(f"gradient store: shard file {file} is not a valid .npy file ({exc})") from None
    if shape != (rows, k) or fortran or dt != dtype:
        raise ValueError(
            f"gradient store: shard file {file} holds a {'Fortran-order ' if fortran else ''}{dt} array of shape "
            f"{shape}, but the manifest describes ({rows}, {k}) {dtype} rows: the manifest and the shard do not "
            f"match"
        )
    size = file.stat().st_size
    want = offset + rows * k * dtype.itemsize
    if size != want:
        what = "truncated" if size < want else "longer than its header says"
        raise ValueError(
            f"gradient store: shard file {file} is {what} ({size} bytes, expected {want}); rebuild the store "
            f"(GradientStore.build(..., overwrite=True)) or restore the file"
        )
    try:
        arr = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"gradient store: shard file {file} could not be memory-mapped ({exc})") from None
    return arr, offset


def _read_manifest(root: Path) -> dict[str, Any]:
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(
            f"no gradient store at {root}: {MANIFEST} is missing (build one with GradientStore.build)"
        )
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"gradient store: {mpath} is not valid JSON ({exc})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        raise ValueError(f"gradient store: {mpath} is not a pyinfluence gradient-store manifest")
    for key, typ in _REQUIRED.items():
        if key not in man:
            raise ValueError(f"gradient store: {mpath} lacks the entry {key!r}")
        v = man[key]
        if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
            raise ValueError(
                f"gradient store: {mpath}: entry {key!r} has the wrong type ({type(v).__name__})"
            )
    if man["format_version"] > FORMAT_VERSION:
        raise ValueError(
            f"gradient store: {mpath} has format version {man['format_version']}, newer than this pyinfluence "
            f"({__version__}) reads ({FORMAT_VERSION}); upgrade pyinfluence"
        )
    if man["dtype"] not in _STORE_DTYPES:
        raise ValueError(f"gradient store: {mpath}: unknown dtype {man['dtype']!r}")
    if man["dim"] < 1 or man["shard_size"] < 1 or man["n"] < 0:
        raise ValueError(f"gradient store: {mpath}: dim, shard_size and n must be positive")
    return man


# ==============================================================================================
# the store
# ==============================================================================================
class GradientStore:
    """Projected per-example training gradients φ_i = P ∇θL(z_i, θ̂), (n, k), sharded on disk.

    Create with :meth:`build` (or resume a build), read with :meth:`open`. See the module docstring for the
    format. Attributes: ``path``, ``n`` (also ``len(store)``), ``dim`` (k), ``dtype`` (numpy), ``projection``
    (the :class:`~pyinfluence.torch.stores.projections.Projection`, rebuilt from the manifest), ``layout``
    (names and shapes of the selected parameters), ``l2`` and ``damping`` (of the influence object the store
    was built from; the defaults of :meth:`projected_influence`), ``manifest`` (a copy), ``shard(i)``.

    Scoring (memory flat in n; see :mod:`pyinfluence.torch.stores.scoring` for the formulas and signs):

    - :meth:`scores` ``(queries)`` → −Φ qᵀ, (n, m), for queries q (m, k) already in the projected space, e.g.
      q = P s_test with s_test = (H + λI)⁻¹∇θL(z_test) from any solver (:meth:`project_vectors`): then
      −(P s_test)ᵀ φ_i is a Johnson-Lindenstrauss estimate of the exact ``up_loss`` −s_testᵀ ∇θL(z_i).
    - :meth:`top_k` ``(queries, k)`` → :class:`~pyinfluence.TopK` of the same scores, streaming.
    - :meth:`projected_influence` → :class:`~pyinfluence.torch.stores.scoring.ProjectedInfluence`: influence
      in the projected space, −φ_testᵀ H_P⁻¹ φ_i with H_P = (1/n) ΦᵀΦ + (l2 + λ) I_k.
    - :meth:`project_test` ``(influence, X_test, y_test)``: test gradients projected by the same P.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], shards: list[_Shard], arrays: list[Any]) -> None:
        """Use :meth:`open` or :meth:`build`."""
        self._dist: Any = None  # the process group's context (scoring shard by shard on the ranks), or None
        self._root = root
        self._man = manifest
        self._shards = shards
        self._arrays = arrays
        self._projection = projection_from_config(manifest["projection"])
        self._layout = ParamLayout(
            tuple(manifest["param_names"]), tuple(tuple(int(d) for d in s) for s in manifest["param_shapes"])
        )
        self._dtype = _STORE_DTYPES[manifest["dtype"]]

    # -- creation ----------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        influence: Any,
        path: PathLike,
        data: Any = None,
        *,
        projection: Projection | None = None,
        shard_size: int | None = None,
        batch_size: int | None = None,
        dtype: Any = torch.float32,
        progress: bool = False,
        overwrite: bool = False,
    ) -> GradientStore:
        """Compute, project and write φ_i = P ∇θL(z_i, θ̂) for every training example; return the opened store.

        - ``influence``: a :class:`~pyinfluence.TorchInfluence`: its model, loss, selected parameters θ̂ (the
          store's p) and device; its ``l2`` and damping are recorded as the defaults for scoring.
        - ``path``: the store's folder (created if missing; a non-empty folder that is not a store is refused
          unless ``overwrite=True``, which removes only store files).
        - ``data``: None (the influence object's own training data, in its order), an ``(inputs, targets)``
          pair, a ``DataLoader`` (``shuffle=False``, ``drop_last=False``), a ``Dataset``, or any iterable of
          ``(inputs, targets)`` batches (or dicts with the targets under ``"labels"``). Row i of the store is
          the i-th example ``data`` yields; it is read once, one batch at a time.
        - ``projection``: a :class:`~pyinfluence.torch.stores.projections.Projection`; None stores the
          gradients themselves (:class:`~pyinfluence.torch.stores.projections.Identity`, k = p, n·p values).
        - ``shard_size``: rows per shard (default: as many as fit 64 MiB, a multiple of 1024; when resuming,
          the existing store's).
        - ``batch_size``: the most examples whose gradients are computed at once (default: the influence
          object's batch size; larger batches of ``data`` are split).
        - ``dtype``: of the stored rows: torch.float32 (default), torch.float16 or torch.float64 (the gradients
          are computed in the model's dtype and rounded once).
        - ``progress``: a tqdm progress bar over the batches (needs tqdm).
        - ``overwrite``: rebuild from scratch even if ``path`` holds a (complete or partial) store.

        Resuming: if ``path`` holds a store with the same configuration (model class, parameter names and
        shapes, projection, dtype, shard size) and the same fingerprints of θ̂ and of the rest of the model,
        the completed shards are kept: the batches they cover are consumed (their data's SHA-256 checked
        against the manifest: DataError if the data changed) without computing gradients, and the build
        continues; a complete store is returned as it is (``data`` is not read). Anything else raises
        ValueError naming the differences, unless ``overwrite=True``.

        Raises TypeError/ValueError for bad arguments (naming them), NonFiniteError if a projected gradient is
        NaN or infinite (or overflows float16), DataError if ``data`` differs from the data of the completed
        shards, and whatever ``data`` itself raises (the completed shards stay on disk; call again to resume).

        Distributed: when ``influence`` was built with ``distributed=...``, every rank calls ``build`` with the
        same arguments (``data``: the full data, or None) and a ``path`` on a file system they share; shard s
        is written by rank s mod W, rank 0 writes the one manifest, and every rank returns the store opened
        with the same context (see the module docstring). An error on any rank is raised on every rank.
        """
        fm = _functional_model(influence)
        proj = resolve_projection(projection)
        layout = ParamLayout.of(fm)
        if isinstance(proj, LoGraProjection):
            proj.check_model(fm.model, layout)  # names a parameter of another module type
        k = proj.out_dim(layout)
        np_dtype = _store_dtype(dtype)
        if shard_size is not None:
            shard_size = check_int("shard_size", shard_size, 1)
        batch = check_int(
            "batch_size", influence.operator.batch_size if batch_size is None else batch_size, 1
        )
        progress = check_bool("progress", progress)
        overwrite = check_bool("overwrite", overwrite)
        root = _check_path(path)
        bar: Any = None
        if progress:
            try:
                from tqdm.auto import tqdm

                bar = tqdm
            except ImportError:
                raise ImportError("progress=True needs the tqdm package (pip install tqdm)") from None
        theta_fp, fixed_fp = _fingerprints(fm)
        default_rows = max(1, _SHARD_BYTES // (k * np_dtype.itemsize))
        default_rows = default_rows // 1024 * 1024 if default_rows >= 1024 else default_rows
        config: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model_class": _model_class(fm.model),
            "param_names": list(layout.names),
            "param_shapes": [list(s) for s in layout.shapes],
            "n_params": layout.p,
            "param_dtype": str(fm.dtype).replace("torch.", ""),
            "projection": proj.config(),
            "dim": k,
            "dtype": np_dtype.name,
            "shard_size": shard_size,
            "theta_sha256": theta_fp,
            "fixed_sha256": fixed_fp,
        }
        extra = {
            "loss_fn": _loss_name(fm.loss_fn),
            "l2": float(getattr(influence, "l2", 0.0)),
            "damping": float(getattr(influence, "damping", 0.0)),
            "quantity": "phi_i = P grad_theta L(z_i, theta_hat): the projected gradient of example i's own "
            "loss (no 1/n, no L2 term), row i = the i-th training example in data order",
        }
        ctx = getattr(influence, "distributed", None)
        if ctx is not None:
            return cls._build_distributed(
                ctx, root, config, overwrite, default_rows, extra, influence, fm, proj, data, batch, np_dtype
            )
        man = cls._prepare_folder(root, config, overwrite, default_rows)
        if man["complete"]:
            return cls.open(root)
        man.update(extra)
        _write_json_atomic(root / MANIFEST, man)
        batches: Iterable[tuple[Any, Tensor]] = _iter_batches(data, influence, fm, batch)
        if bar is not None:
            batches = bar(batches, desc="gradient store", leave=False)
        cls._fill(root, man, fm, proj, batches, batch, np_dtype)
        return cls.open(root)

    @staticmethod
    def _prepare_folder(
        root: Path, config: dict[str, Any], overwrite: bool, default_rows: int
    ) -> dict[str, Any]:
        """The manifest to continue from: an existing compatible one, or a fresh one (old store files
        removed with ``overwrite``). Raises ValueError for an incompatible store or a foreign folder."""
        if root.exists() and not root.is_dir():
            raise ValueError(f"path {root} exists and is not a folder")
        root.mkdir(parents=True, exist_ok=True)
        ours = [
            f
            for f in root.iterdir()
            if f.name.startswith(MANIFEST) or (f.name.startswith("shard_") and ".npy" in f.name)
        ]
        has_manifest = (root / MANIFEST).is_file()
        if overwrite:
            for f in ours:
                f.unlink()
        elif has_manifest:
            old = _read_manifest(root)
            if config["shard_size"] is None:
                config["shard_size"] = old["shard_size"]
            diffs = [k for k in _CONFIG_KEYS if old.get(k) != config[k]]
            if diffs:
                detail = "; ".join(
                    f"{k}: stored {_short(old.get(k))}, now {_short(config[k])}"
                    for k in diffs
                    if k != "format"
                )
                raise ValueError(
                    f"path {root} holds a gradient store built with a different configuration or model "
                    f"({detail}). Its rows do not apply: pass overwrite=True to rebuild it, or choose another "
                    f"path"
                    + (
                        " (θ̂ or the model's other parameters/buffers changed)"
                        if {"theta_sha256", "fixed_sha256"} & set(diffs)
                        else ""
                    )
                )
            for f in root.iterdir():  # leftovers of an interrupted shard
                if f.name.startswith("shard_") and (f.name.endswith(".tmp") or f.name.endswith(".part")):
                    f.unlink()
            for e in old["shards"]:  # the completed shards must still be intact
                _open_shard(root / e["file"], e["rows"], old["dim"], _STORE_DTYPES[old["dtype"]])
            return old
        elif any(root.iterdir()):
            raise ValueError(
                f"path {root} is a non-empty folder without a gradient store ({MANIFEST} is missing); choose "
                f"an empty or new folder, or pass overwrite=True (which removes only store files)"
            )
        if config["shard_size"] is None:
            config["shard_size"] = default_rows
        now = _now()
        return {
            **config,
            "library_version": __version__,
            "created": now,
            "updated": now,
            "complete": False,
            "n": 0,
            "shards": [],
            "l2": 0.0,
            "damping": 0.0,
        }

    @staticmethod
    def _fill(
        root: Path,
        man: dict[str, Any],
        fm: Any,
        proj: Projection,
        batches: Iterable[tuple[Any, Tensor]],
        batch: int,
        np_dtype: np.dtype,
    ) -> None:
        """The streaming loop: skip (and verify) the completed shards, compute and write the rest."""
        R, k = int(man["shard_size"]), int(man["dim"])
        done = len(man["shards"])
        skip_rows = done * R
        row = 0
        checking: _DataHasher | None = None
        writer: _ShardWriter | None = None
        try:
            for X, Y in batches:
                B = batch_len(X)
                pos = 0
                while pos < B:
                    si, off = divmod(row, R)
                    take = min(B - pos, R - off)
                    whole = pos == 0 and take == B
                    Xs = X if whole else slice_inputs(X, pos, pos + take)
                    Ys = Y if whole else Y[pos : pos + take]
                    if si < done:  # a completed shard: verify its data, compute nothing
                        if off == 0:
                            checking = _DataHasher()
                        assert checking is not None
                        checking.update(Xs, Ys)
                        if off + take == R and checking.hexdigest() != man["shards"][si]["data_sha256"]:
                            raise DataError(
                                f"data differs from the training data of the completed shard "
                                f"{man['shards'][si]['file']} (examples {si * R}…{si * R + R - 1}; SHA-256 "
                                f"mismatch): resume with the same data in the same order, or pass overwrite=True"
                            )
                    else:
                        if writer is None:
                            writer = _ShardWriter(root, si, R, k, np_dtype)
                        writer.data_hash.update(Xs, Ys)
                        for s in range(0, take, batch):
                            e = min(take, s + batch)
                            Xb = Xs if (s == 0 and e == take) else slice_inputs(Xs, s, e)
                            phi = _project_batch(proj, fm, Xb, Ys[s:e], "data")
                            writer.write(off + s, _to_store(phi, np_dtype, row + s))
                        if off + take == R:
                            writer.finish(R)
                            GradientStore._add_shard(root, man, si, R, writer)
                            writer = None
                    pos += take
                    row += take
            if row < skip_rows:
                raise DataError(
                    f"data yielded {row} examples, but the store at {root} already holds {skip_rows} from an "
                    f"earlier build: resume with the same data, or pass overwrite=True"
                )
            if row == 0:
                raise ValueError("data is empty: it yielded no examples")
            if writer is not None:  # the last, partial shard: written with the final manifest
                rows = row - len(man["shards"]) * R
                writer.finish(rows)
                GradientStore._add_shard(root, man, len(man["shards"]), rows, writer, complete=True)
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if not man["complete"]:
            man["n"] = row
            man["complete"] = True
            man["updated"] = _now()
            _write_json_atomic(root / MANIFEST, man)

    @classmethod
    def _build_distributed(
        cls,
        ctx: Any,
        root: Path,
        config: dict[str, Any],
        overwrite: bool,
        default_rows: int,
        extra: dict[str, Any],
        influence: Any,
        fm: Any,
        proj: Projection,
        data: Any,
        batch: int,
        np_dtype: np.dtype,
    ) -> GradientStore:
        """:meth:`build` on the ranks of ``ctx`` (see the module docstring); each step ends with a collective
        agreement, so an error on one rank is raised on all of them."""
        ctx.check_same([("the GradientStore.build configuration", json.dumps(config, sort_keys=True))])
        man: dict[str, Any] | None = None
        err: BaseException | None = None
        if ctx.rank == 0:
            try:
                man = cls._prepare_folder(root, config, overwrite, default_rows)
                for f in root.glob("shards.rank*.json*"):  # records of an interrupted distributed build
                    f.unlink()
                if not man["complete"]:
                    man.update(extra)
                    _write_json_atomic(root / MANIFEST, man)
            except Exception as exc:
                err = exc
        ctx.agree(err, "GradientStore.build (preparing the folder on rank 0)")
        err = None
        if man is None:
            try:
                man = _read_manifest(root)
            except Exception as exc:
                err = (
                    FileNotFoundError(
                        f"{exc} (the store's folder must be on a file system every rank shares)"
                    )
                    if isinstance(exc, FileNotFoundError)
                    else exc
                )
        ctx.agree(err, "GradientStore.build (reading the manifest that rank 0 wrote)")
        assert man is not None
        if man["complete"]:
            return cls.open(root, distributed=ctx)
        W, r, R = ctx.world_size, ctx.rank, int(man["shard_size"])
        err = None
        try:
            total = [0]
            blocks = _owned_blocks(data, influence, fm, batch, R, lambda si: si % W == r, total)
            entries = cls._fill_owned(root, man, fm, proj, blocks, total, batch, np_dtype)
            _write_json_atomic(root / _RANK_RECORD.format(r), {"rank": r, "n": total[0], "shards": entries})
        except Exception as exc:
            err = exc
        ctx.agree(err, "GradientStore.build (computing this rank's shards)")
        err = None
        if ctx.rank == 0:
            try:
                cls._merge_records(root, man, W)
            except Exception as exc:
                err = exc
        ctx.agree(err, "GradientStore.build (merging the shard records into the manifest on rank 0)")
        return cls.open(root, distributed=ctx)

    @staticmethod
    def _fill_owned(
        root: Path,
        man: dict[str, Any],
        fm: Any,
        proj: Projection,
        blocks: Iterable[tuple[int, Any, Tensor]],
        total: list[int],
        batch: int,
        np_dtype: np.dtype,
    ) -> list[dict[str, Any]]:
        """Write this rank's shards from ``blocks`` ((global start, inputs, targets), covering its shards in
        order); shards the manifest records already are verified (their data's SHA-256), not recomputed.
        Returns the manifest entries of this rank's shards."""
        R, k = int(man["shard_size"]), int(man["dim"])
        done = {int(e["start"]) // R: e for e in man["shards"]}
        entries: list[dict[str, Any]] = []
        writer: _ShardWriter | None = None
        wsi = -1
        checking: _DataHasher | None = None
        try:
            for start, X, Y in blocks:
                B = batch_len(X)
                pos = 0
                while pos < B:
                    si, off = divmod(start + pos, R)
                    take = min(B - pos, R - off)
                    whole = pos == 0 and take == B
                    Xs = X if whole else slice_inputs(X, pos, pos + take)
                    Ys = Y if whole else Y[pos : pos + take]
                    if si in done:
                        if off == 0:
                            checking = _DataHasher()
                        assert checking is not None
                        checking.update(Xs, Ys)
                        if off + take == R:
                            if checking.hexdigest() != done[si]["data_sha256"]:
                                raise DataError(
                                    f"data differs from the training data of the completed shard "
                                    f"{done[si]['file']} (examples {si * R}…{si * R + R - 1}; SHA-256 mismatch): "
                                    f"resume with the same data in the same order, or pass overwrite=True"
                                )
                            entries.append(done[si])
                    else:
                        if writer is None:
                            writer, wsi = _ShardWriter(root, si, R, k, np_dtype), si
                        writer.data_hash.update(Xs, Ys)
                        for s in range(0, take, batch):
                            e = min(take, s + batch)
                            Xb = Xs if (s == 0 and e == take) else slice_inputs(Xs, s, e)
                            phi = _project_batch(proj, fm, Xb, Ys[s:e], "data")
                            writer.write(off + s, _to_store(phi, np_dtype, start + pos + s))
                        if off + take == R:
                            writer.finish(R)
                            entries.append(_shard_entry(si, R, R, writer))
                            writer = None
                    pos += take
            n = total[0]
            if n == 0:
                raise ValueError("data is empty: it yielded no examples")
            if done and max(done) * R + R > n:
                raise DataError(
                    f"data yielded {n} examples, but the store at {root} already holds {(max(done) + 1) * R} from an "
                    f"earlier build: resume with the same data, or pass overwrite=True"
                )
            if writer is not None:  # the last, partial shard
                writer.finish(n - wsi * R)
                entries.append(_shard_entry(wsi, R, n - wsi * R, writer))
                writer = None
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return entries

    @staticmethod
    def _merge_records(root: Path, man: dict[str, Any], world_size: int) -> None:
        """Rank 0: the ranks' shard records merged into the one manifest (checked: the same n on every rank,
        every shard 0 … ⌈n/shard_size⌉ − 1 exactly once), written complete; the records removed."""
        R = int(man["shard_size"])
        ns: list[int] = []
        entries: list[dict[str, Any]] = []
        files = [root / _RANK_RECORD.format(r) for r in range(world_size)]
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(
                    f"gradient store: {f} (a rank's shard record) is missing: the store's folder must be on a file "
                    f"system every rank shares"
                )
            with open(f, encoding="utf-8") as fh:
                rec = json.load(fh)
            ns.append(int(rec["n"]))
            entries.extend(rec["shards"])
        if len(set(ns)) != 1:
            raise DataError(
                f"the ranks read different numbers of examples from data ({ns} on ranks 0…{world_size - 1}): every "
                f"rank must pass the same, full data"
            )
        n = ns[0]
        entries.sort(key=lambda e: int(e["start"]))
        starts = [int(e["start"]) for e in entries]
        if starts != list(range(0, n, R)):
            raise RuntimeError(
                f"gradient store: the ranks wrote shards starting at {starts}, expected 0, {R}, … < {n}"
            )
        man["shards"] = entries
        man["n"] = n
        man["complete"] = True
        man["updated"] = _now()
        _write_json_atomic(root / MANIFEST, man)
        for f in files:
            f.unlink()

    @staticmethod
    def _add_shard(
        root: Path, man: dict[str, Any], index: int, rows: int, writer: _ShardWriter, complete: bool = False
    ) -> None:
        """Record a written shard in the manifest and replace the manifest (atomically)."""
        man["shards"].append(_shard_entry(index, int(man["shard_size"]), rows, writer))
        man["n"] = index * int(man["shard_size"]) + rows
        man["complete"] = complete
        man["updated"] = _now()
        _write_json_atomic(root / MANIFEST, man)

    @classmethod
    def open(
        cls, path: PathLike, *, influence: Any = None, allow_incomplete: bool = False, distributed: Any = None
    ) -> GradientStore:
        """Open the store at ``path``: validate the manifest and every shard (FileNotFoundError for a missing
        manifest or shard, ValueError for invalid JSON, a truncated shard or one that does not match the
        manifest — each naming the file) and memory-map the shards read-only.

        ``influence``: if given, also check that it is the model the store was built from (its parameter
        names and shapes and the SHA-256 fingerprints of θ̂ and of the other parameters and buffers; ValueError
        otherwise). ``allow_incomplete``: open the completed shards of an interrupted build (otherwise
        ValueError). ``distributed``: score on the ranks of a ``torch.distributed`` process group, each rank its
        shards s mod W, merged on every rank (None: one process; True, ``"auto"``, a context or a process
        group as for :class:`~pyinfluence.TorchInfluence`; every rank opens the same folder)."""
        from pyinfluence.torch.distributed import resolve_distributed

        ctx = resolve_distributed(distributed, None)
        root = _check_path(path)
        allow_incomplete = check_bool("allow_incomplete", allow_incomplete)
        if not root.is_dir():
            raise FileNotFoundError(f"no gradient store at {root}: not a folder")
        man = _read_manifest(root)
        mpath = root / MANIFEST
        if not man["complete"] and not allow_incomplete:
            raise ValueError(
                f"the gradient store at {root} is incomplete ({len(man['shards'])} shard(s), {man['n']} rows "
                f"written): its build was interrupted. Resume it by calling GradientStore.build with the same "
                f"arguments, or open it with allow_incomplete=True"
            )
        k, R, dtype = man["dim"], man["shard_size"], _STORE_DTYPES[man["dtype"]]
        shards: list[_Shard] = []
        arrays: list[Any] = []
        start = 0
        n_sh = len(man["shards"])
        for i, e in enumerate(man["shards"]):
            if not isinstance(e, dict) or not {"file", "start", "rows"} <= set(e):
                raise ValueError(f"gradient store: {mpath}: shard entry {i} is malformed")
            name, rows = e["file"], e["rows"]
            if not isinstance(name, str) or Path(name).name != name or not name.endswith(".npy"):
                raise ValueError(f"gradient store: {mpath}: shard entry {i} names an invalid file {name!r}")
            last = i == n_sh - 1 and man["complete"]
            if (
                not isinstance(rows, int)
                or e["start"] != start
                or not (1 <= rows <= R)
                or (rows != R and not last)
            ):
                raise ValueError(
                    f"gradient store: {mpath}: shard {name} has start {e['start']} and {rows} rows, inconsistent "
                    f"with shard_size {R} and the shards before it (expected start {start})"
                )
            arr, offset = _open_shard(root / name, rows, k, dtype)
            shards.append(_Shard(root / name, start, rows, offset))
            arrays.append(arr)
            start += rows
        if start != man["n"] or (man["complete"] and start == 0):
            raise ValueError(f"gradient store: {mpath}: n = {man['n']} but the shards hold {start} rows")
        store = cls(root, man, shards, arrays)
        store._dist = ctx
        if influence is not None:
            store.check_influence(influence)
        return store

    # -- properties ----------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._root

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (the JSON object of ``manifest.json``)."""
        return copy.deepcopy(self._man)

    @property
    def n(self) -> int:
        """The number of stored rows (training examples)."""
        return int(self._man["n"])

    def __len__(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        """k, the projected dimension (the number of columns)."""
        return int(self._man["dim"])

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of the stored rows."""
        return self._dtype

    @property
    def projection(self) -> Projection:
        """The projection P the rows were made with (rebuilt from the manifest)."""
        return self._projection

    @property
    def layout(self) -> ParamLayout:
        """Names and shapes of the selected parameters θ (p = ``layout.p``)."""
        return self._layout

    @property
    def l2(self) -> float:
        """The L2 coefficient of the influence object the store was built from."""
        return float(self._man["l2"])

    @property
    def damping(self) -> float:
        """The damping λ of the influence object the store was built from."""
        return float(self._man["damping"])

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def distributed(self) -> Any:
        """The process group's context when the store scores on the ranks (each its shards s mod W), else
        None."""
        return self._dist

    @property
    def complete(self) -> bool:
        return bool(self._man["complete"])

    def shard(self, i: int) -> np.ndarray:
        """Shard ``i`` as a read-only memory map, (rows, k): rows ``shard_size·i …`` of the store."""
        i = check_int("i", i, 0, self.n_shards - 1, maximum_what="the last shard")
        arr: np.ndarray = self._arrays[i]
        return arr

    def __repr__(self) -> str:
        return (
            f"GradientStore({str(self._root)!r}, n={self.n}, dim={self.dim}, dtype={self._dtype.name}, "
            f"projection={self._man['projection']}, shards={self.n_shards})"
        )

    # -- reading -------------------------------------------------------------------------------------
    def chunk_rows(self, chunk_rows: int | None = None) -> int:
        """The rows per streamed chunk: ``chunk_rows``, or as many as fit 32 MiB."""
        if chunk_rows is None:
            return max(1, _CHUNK_BYTES // (self.dim * self._dtype.itemsize))
        return check_int("chunk_rows", chunk_rows, 1)

    def chunks(
        self, chunk_rows: int | None = None, *, reuse: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows (r, k)) over the whole store in order, r ≤ ``chunk_rows`` (default: 32 MiB), each
        chunk read from its file (not through the memory maps, so that the resident memory of a pass stays at
        one chunk whatever n). ``reuse=True``: every chunk is read into the same buffer (no allocation per
        chunk; a chunk is then valid only until the next one is read)."""
        yield from self._read_chunks(self._shards, chunk_rows, reuse)

    def local_chunks(
        self, chunk_rows: int | None = None, *, reuse: bool = False
    ) -> Iterator[tuple[int, np.ndarray]]:
        """As :meth:`chunks`, over this rank's shards (s mod W) when the store is distributed; all shards
        otherwise. First rows are global."""
        ctx = self._dist
        if ctx is None:
            return self._read_chunks(self._shards, chunk_rows, reuse)
        mine = [sh for i, sh in enumerate(self._shards) if i % ctx.world_size == ctx.rank]
        return self._read_chunks(mine, chunk_rows, reuse)

    def _read_chunks(
        self, shards: list[_Shard], chunk_rows: int | None, reuse: bool
    ) -> Iterator[tuple[int, np.ndarray]]:
        step = self.chunk_rows(chunk_rows)
        k, dt = self.dim, self._dtype
        buf = (
            np.empty((min(step, max((sh.rows for sh in shards), default=1)), k), dtype=dt) if reuse else None
        )
        for sh in shards:
            with open(sh.file, "rb") as f:
                f.seek(sh.offset)
                for s in range(0, sh.rows, step):
                    r = min(step, sh.rows - s)
                    arr = np.empty((r, k), dtype=dt) if buf is None else buf[:r]
                    view = arr.data.cast("B")
                    got = 0
                    while got < view.nbytes:  # readinto may return less than asked
                        m = f.readinto(view[got:])
                        if not m:
                            raise ValueError(
                                f"gradient store: shard file {sh.file} was truncated while being read"
                            )
                        got += m
                    yield sh.start + s, arr

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start … stop − 1`` (default: all) as an in-memory array (a copy), (stop − start, k)."""
        stop = self.n if stop is None else check_int("stop", stop, 0, self.n, maximum_what="n")
        start = check_int("start", start, 0, stop)
        out = np.empty((stop - start, self.dim), dtype=self._dtype)
        for sh, arr in zip(self._shards, self._arrays):
            lo, hi = max(start, sh.start), min(stop, sh.start + sh.rows)
            if lo < hi:
                out[lo - start : hi - start] = arr[lo - sh.start : hi - sh.start]
        return out

    def verify(self) -> None:
        """Re-read every shard and compare the SHA-256 of its rows with the manifest (ValueError naming a
        corrupted file). Reads the whole store."""
        step = self.chunk_rows(None)
        for sh, arr, entry in zip(self._shards, self._arrays, self._man["shards"]):
            h = hashlib.sha256()
            for s in range(0, sh.rows, step):
                h.update(np.ascontiguousarray(arr[s : s + step]).data)
            if "rows_sha256" in entry and h.hexdigest() != entry["rows_sha256"]:
                raise ValueError(
                    f"gradient store: shard file {sh.file} is corrupted (SHA-256 of its rows differs)"
                )

    # -- the model --------------------------------------------------------------------------------------
    def check_influence(self, influence: Any, name: str = "influence") -> Any:
        """Check that ``influence`` holds the model this store was built from (parameter names and shapes,
        θ̂ and the other parameters and buffers by SHA-256); return its functional model. ValueError otherwise."""
        fm = _functional_model(influence, name)
        layout = ParamLayout.of(fm)
        if layout != self._layout:
            raise ValueError(
                f"{name} selects parameters {list(layout.names)} but the store at {self._root} was built for "
                f"{list(self._layout.names)} (with their shapes); use the same model and params=..."
            )
        theta, fixed = _fingerprints(fm)
        if theta != self._man["theta_sha256"] or fixed != self._man["fixed_sha256"]:
            which = (
                "θ̂ (the selected parameters)"
                if theta != self._man["theta_sha256"]
                else "the model's other parameters or buffers"
            )
            raise ValueError(
                f"{name}'s model differs from the one the store at {self._root} was built from: {which} changed "
                f"(SHA-256 fingerprints differ). The stored gradients belong to the old model: rebuild the store "
                f"(GradientStore.build(..., overwrite=True))"
            )
        return fm

    def project_test(
        self, influence: Any, X_test: Any, y_test: Any = None, batch_size: int | None = None
    ) -> Tensor:
        """φ_test = P ∇θL(z_test, θ̂) for m test points, (m, k) on the influence object's device in its dtype:
        projected by the store's projection (LoGra: through hooks), after checking that ``influence`` holds the
        store's model (:meth:`check_influence`). ``X_test, y_test``: inputs (m, …) with targets (m, …), or one
        ``(inputs, targets)`` pair as ``X_test``."""
        fm = self.check_influence(influence)
        if y_test is None:
            if not _is_pair(X_test):
                raise ValueError("y_test is required unless X_test is an (inputs, targets) pair")
            X_test, y_test = X_test
        X, Y = _convert_batch("X_test/y_test", X_test, y_test, fm)
        m = batch_len(X)
        if m == 0:
            raise ValueError("X_test is empty")
        step = check_int("batch_size", influence.operator.batch_size if batch_size is None else batch_size, 1)
        out = torch.empty((m, self.dim), dtype=fm.dtype, device=fm.device)
        for s in range(0, m, step):
            e = min(m, s + step)
            out[s:e] = _project_batch(self._projection, fm, slice_inputs(X, s, e), Y[s:e], "X_test/y_test")
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError("the projected test gradients contain NaN or infinity", what="φ_test")
        return out

    def project_vectors(self, V: Tensor) -> Tensor:
        """P v for the rows v of ``V`` (m, p) — e.g. ``influence.s_test(X_test, y_test).T`` — (m, k), in V's
        dtype and device: queries for :meth:`scores` and :meth:`top_k`."""
        if (
            isinstance(V, Tensor)
            and V.ndim == 2
            and V.shape[1] != self._layout.p
            and V.shape[0] == self._layout.p
        ):
            raise ValueError(
                f"V has shape {tuple(V.shape)}: pass one vector per row, (m, p = {self._layout.p}) — e.g. "
                f"s_test(...).T, since s_test returns (p, m)"
            )
        return self._projection.project(V, self._layout)

    # -- scoring -------------------------------------------------------------------------------------------
    def scores(
        self,
        queries: Any,
        *,
        out: PathLike | None = None,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> Any:
        """−Φ qᵀ: the scores −qᵀφ_i of every stored row against queries q (m, k) (or one (k,)), (n, m); see
        :func:`pyinfluence.torch.stores.scoring.scores`."""
        from pyinfluence.torch.stores.scoring import scores

        return scores(self, queries, out=out, device=device, chunk_rows=chunk_rows)

    def top_k(
        self,
        queries: Any,
        k: int = 10,
        *,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> TopK[Tensor]:
        """The k most helpful (most negative −qᵀφ_i) and most harmful (most positive) rows per query, streaming;
        see :func:`pyinfluence.torch.stores.scoring.top_k`."""
        from pyinfluence.torch.stores.scoring import top_k

        return top_k(self, queries, k, device=device, chunk_rows=chunk_rows)

    def projected_influence(
        self,
        *,
        l2: float | None = None,
        damping: float | None = None,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> Any:
        """:class:`~pyinfluence.torch.stores.scoring.ProjectedInfluence` over this store (l2 and damping
        default to the influence object's the store was built from)."""
        from pyinfluence.torch.stores.scoring import ProjectedInfluence

        return ProjectedInfluence(self, l2=l2, damping=damping, device=device, chunk_rows=chunk_rows)


def _project_batch(proj: Projection, fm: Any, X: Any, Y: Tensor, name: str) -> Tensor:
    """``proj.project_examples`` with the model's own errors on malformed batches (a RuntimeError from torch:
    wrong shapes or dtypes) turned into a ValueError naming ``name``; out-of-memory errors pass unchanged."""
    try:
        return proj.project_examples(fm, X, Y)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        shape = {k: tuple(v.shape) for k, v in X.items()} if isinstance(X, Mapping) else tuple(X.shape)
        raise ValueError(
            f"computing the gradients of a batch of {name} failed in the model or loss with "
            f"{type(exc).__name__}: {exc}. The inputs (here {shape}) must be a batch the model accepts, examples "
            f"first, with targets the loss accepts (here {tuple(Y.shape)}, {str(Y.dtype).replace('torch.', '')})"
        ) from exc


def _to_store(phi: Tensor, np_dtype: np.dtype, first_row: int) -> np.ndarray:
    """Projected gradients (B, k) → a numpy block in the store's dtype; NonFiniteError for NaN/inf."""
    out = phi.detach().to(
        "cpu", {"float16": torch.float16, "float32": torch.float32}.get(np_dtype.name, torch.float64)
    )
    ok = torch.isfinite(out).all(dim=1)
    if not bool(ok.all()):
        bad = int((~ok).nonzero()[0, 0]) + first_row
        over = bool(torch.isfinite(phi[int((~ok).nonzero()[0, 0])]).all())
        hint = (
            f" (they overflow {np_dtype.name}: use dtype=torch.float32)"
            if over
            else " (standardise the inputs, or compute in float64)"
        )
        raise NonFiniteError(
            f"the projected gradient of training example {bad} is NaN or infinite{hint}",
            what="φ_i",
            where="data",
        )
    return out.numpy()


def _short(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
