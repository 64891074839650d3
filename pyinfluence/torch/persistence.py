"""Saving and loading a fitted :class:`~pyinfluence.TorchInfluence`: its prepared solver (the curvature) in a
folder of ``.npy`` arrays and a JSON manifest. Nothing is pickled.

What is saved is what the solver's one-off preparation found (Exact: the symmetrised H + its factor; KFAC /
EKFAC: per-layer eigenbases and eigenvalues, diagonal blocks; Arnoldi: the top-r Ritz pairs; LiSSA: its scale
and Lanczos estimates; CG / BlockCG: their preconditioner's factors), through
:meth:`~pyinfluence.torch.solvers.PreparedSolver.state` and :meth:`~pyinfluence.torch.solvers.Solver.restore`,
plus what makes the curvature valid: l2, damping, the solver's configuration, the computation dtype, the
selected parameters' names and shapes, n_train and SHA-256 fingerprints of θ̂ and of every other parameter and
buffer of the model (the curvature depends on all of them). The model, the loss and the training data cannot
be saved: :meth:`TorchInfluence.load` takes them again and checks them against the manifest.

The folder:

- ``manifest.json``: ``format`` (``"pyinfluence-torch-influence"``), ``format_version``, ``library_version``,
  ``created`` (UTC, ISO 8601), ``model_class``, ``loss_fn``, ``solver`` (``name``, ``config``), ``l2``,
  ``damping``, ``dtype`` (the computation dtype), ``param_dtype``, ``param_names``, ``param_shapes``,
  ``n_params``, ``n_train``, ``batch_size``, ``device`` (where it was computed), ``grad_norm`` (‖∇R(θ̂)‖),
  ``theta_sha256`` and ``fixed_sha256`` (the digests a :class:`~pyinfluence.GradientStore` of the same model
  records), ``param_sha256`` and ``fixed_tensor_sha256`` (per tensor, to name what changed),
  ``solver_state`` (the JSON metadata of the prepared solver) and ``arrays``: per array its ``file``,
  ``shape``, ``dtype`` and the ``sha256`` of its data.
- ``NNNN-<array name>.npy``: one array each, written by numpy (``allow_pickle=False``).

Every file is written under a temporary name, flushed and renamed (atomic on POSIX and Windows), the manifest
last; overwriting first removes the old manifest. So a folder whose manifest exists is complete, and a
damaged one (a missing, truncated or altered array, invalid JSON) is refused on load with an error naming the
file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pyinfluence._validation import check_damping, check_nonnegative_float
from pyinfluence._version import __version__
from pyinfluence.errors import PyInfluenceError
from pyinfluence.torch.functional import select_params
from pyinfluence.torch.solvers import solver_from_config
from pyinfluence.torch.stores.store import (
    _check_path,
    _fingerprints,
    _loss_name,
    _model_class,
    _now,
    _sha256_named,
    _write_json_atomic,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "load_influence", "read_manifest", "save_influence"]

#: The ``format`` entry of the manifest, and the version of the layout described in the module docstring.
FORMAT = "pyinfluence-torch-influence"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# the files a save writes (arrays, and the temporary names of arrays and manifest)
_OUR_FILE = re.compile(r"^(\d{4}-[A-Za-z0-9._-]+\.npy(\.tmp)?|manifest\.json\.tmp)$")
_NUMPY_DTYPES = (torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.bool)
_NUMBER = (int, float)
_REQUIRED: dict[str, Any] = {
    "format": str,
    "format_version": int,
    "library_version": str,
    "created": str,
    "solver": dict,
    "l2": _NUMBER,
    "damping": _NUMBER,
    "dtype": str,
    "param_names": list,
    "param_shapes": list,
    "n_params": int,
    "n_train": int,
    "batch_size": int,
    "grad_norm": _NUMBER,
    "theta_sha256": str,
    "fixed_sha256": str,
    "param_sha256": dict,
    "fixed_tensor_sha256": dict,
    "solver_state": dict,
    "arrays": dict,
}
# TorchInfluence.load's keyword options: the constructor's
_LOAD_OPTIONS = (
    "params",
    "l2",
    "damping",
    "solver",
    "dtype",
    "batch_size",
    "device",
    "progress",
    "optimum_tol",
    "stream",
    "label_key",
    "distributed",
)


# ==============================================================================================
# fingerprints
# ==============================================================================================
def fingerprints(fm: Any) -> dict[str, Any]:
    """SHA-256 fingerprints of a functional model: ``theta_sha256`` (θ̂, the selected parameters in order, in
    the computation dtype) and ``fixed_sha256`` (the other parameters and buffers, by name) — the digests
    :class:`~pyinfluence.GradientStore` records — and the same per tensor (``param_sha256``,
    ``fixed_tensor_sha256``), to name what changed."""
    theta, fixed = _fingerprints(fm)
    return {
        "theta_sha256": theta,
        "fixed_sha256": fixed,
        "param_sha256": {n: _sha256_named([(n, fm.params[n])]) for n in fm.names},
        "fixed_tensor_sha256": {n: _sha256_named([(n, t)]) for n, t in sorted(fm.fixed.items())},
    }


# ==============================================================================================
# saving
# ==============================================================================================
def _safe(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80] or "array"


def _to_numpy(key: str, t: Tensor) -> np.ndarray:
    if t.dtype not in _NUMPY_DTYPES:
        raise TypeError(f"the solver's state array {key!r} has dtype {t.dtype}, which numpy cannot store")
    return t.detach().to("cpu").contiguous().numpy()


def _write_npy_atomic(path: Path, arr: np.ndarray) -> str:
    """Write ``arr`` to ``path`` (numpy .npy, no pickle) through a temporary file and ``os.replace``; returns
    the SHA-256 of its data."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.lib.format.write_array(f, arr, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return _data_sha256(arr)


def _data_sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8).data).hexdigest()


def _prepare_folder(root: Path, overwrite: bool) -> set[str]:
    """Create ``root`` or check that it may be written: empty, or an earlier save (``overwrite=True``), or the
    leftovers of an interrupted save (``overwrite=True``). Returns the old files to remove once the new
    manifest is written; removes the old manifest first (a folder without one is incomplete)."""
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"cannot save to {root}: it exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    names = {p.name for p in root.iterdir()}
    if not names:
        return set()
    mpath = root / MANIFEST
    if MANIFEST in names:
        try:
            with open(mpath, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise FileExistsError(
                f"cannot save to {root}: it holds {MANIFEST}, which is not that of a saved TorchInfluence; "
                f"save into a new or empty folder"
            )
        foreign = sorted(n for n in names - {MANIFEST} if not _OUR_FILE.match(n))
    else:
        foreign = sorted(n for n in names if not _OUR_FILE.match(n))
        if not foreign and not overwrite:
            raise FileExistsError(
                f"cannot save to {root}: it holds the files of an interrupted save (no {MANIFEST}); pass "
                f"overwrite=True to replace them"
            )
    if foreign:
        raise FileExistsError(
            f"cannot save to {root}: it holds files that are not part of a saved TorchInfluence "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); save into a new or empty folder"
        )
    if MANIFEST in names and not overwrite:
        raise FileExistsError(
            f"cannot save to {root}: it already holds a saved TorchInfluence; pass overwrite=True to replace it"
        )
    if MANIFEST in names:
        mpath.unlink()
    return names - {MANIFEST}


def save_influence(inf: Any, path: Any, *, overwrite: bool = False) -> Path:
    """Write ``inf`` (a TorchInfluence) to the folder ``path``; see :meth:`TorchInfluence.save`."""
    root = _check_path(path)
    with inf._solve_lock:
        inf.prepare()
        prep = inf._prep
        try:
            tensors, meta = prep.state()
        except NotImplementedError as exc:
            raise TypeError(f"TorchInfluence.save: {exc}") from None
        arrays = {k: _to_numpy(k, t) for k, t in tensors.items()}
    fm = inf._fm
    solver = inf._solver_cfg
    man: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "created": _now(),
        "model_class": _model_class(inf._model),
        "loss_fn": _loss_name(fm.loss_fn),
        "solver": {"name": solver.name, "config": solver.config()},
        "l2": inf.l2,
        "damping": inf.damping,
        "dtype": str(inf.dtype).replace("torch.", ""),
        "param_dtype": str(
            next(p for n, p in inf._model.named_parameters() if n == fm.names[0]).dtype
        ).replace("torch.", ""),
        "param_names": list(fm.names),
        "param_shapes": [list(s) for s in fm.shapes],
        "n_params": int(fm.n_params),
        "n_train": int(inf.n_train),
        "batch_size": int(inf._batch),
        "device": str(inf.device),
        "grad_norm": float(inf.grad_norm_),
        **fingerprints(fm),
        "solver_state": meta,
    }
    try:
        json.dumps(man, allow_nan=False)
    except (TypeError, ValueError) as exc:  # a solver whose state is not JSON-able: refuse before writing
        raise TypeError(
            f"TorchInfluence.save: the solver's state cannot be written to JSON ({exc})"
        ) from None
    old = _prepare_folder(root, overwrite)
    entries: dict[str, Any] = {}
    for i, (key, arr) in enumerate(arrays.items()):
        name = f"{i:04d}-{_safe(key)}.npy"
        sha = _write_npy_atomic(root / name, arr)
        entries[key] = {"file": name, "shape": list(arr.shape), "dtype": arr.dtype.name, "sha256": sha}
    man["arrays"] = entries
    _write_json_atomic(root / MANIFEST, man)
    for name in old - {e["file"] for e in entries.values()}:
        (root / name).unlink(missing_ok=True)
    return root


# ==============================================================================================
# loading
# ==============================================================================================
def read_manifest(path: Any) -> dict[str, Any]:
    """The validated manifest of the saved TorchInfluence in the folder ``path``. FileNotFoundError for a
    missing folder or manifest; ValueError, naming the file, for invalid JSON, another format, a newer
    format version or a missing or mistyped entry."""
    root = _check_path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no saved TorchInfluence at {root}: not a folder")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise FileNotFoundError(
            f"no saved TorchInfluence at {root}: {mpath} is missing (write one with TorchInfluence.save)"
        )
    try:
        with open(mpath, encoding="utf-8") as f:
            man = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{mpath} is not valid JSON ({exc}): the saved TorchInfluence is damaged") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise ValueError(
            f"{mpath} is not the manifest of a saved TorchInfluence (format {fmt!r}, expected {FORMAT!r})"
        )
    version = man.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{mpath}: entry 'format_version' must be a positive int, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{mpath} has format version {version}, newer than this pyinfluence ({__version__}) reads "
            f"({FORMAT_VERSION}); upgrade pyinfluence"
        )
    for key, typ in _REQUIRED.items():
        if key not in man:
            raise ValueError(f"{mpath} lacks the entry {key!r}")
        v = man[key]
        if not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool):
            raise ValueError(f"{mpath}: entry {key!r} has the wrong type ({type(v).__name__})")
    if man["dtype"] not in ("float32", "float64"):
        raise ValueError(f"{mpath}: entry 'dtype' must be 'float32' or 'float64', got {man['dtype']!r}")
    solver = man["solver"]
    if not isinstance(solver.get("name"), str) or not isinstance(solver.get("config"), dict):
        raise ValueError(f"{mpath}: entry 'solver' must hold a 'name' (str) and a 'config' (dict)")
    names, shapes = man["param_names"], man["param_shapes"]
    if (
        not names
        or len(names) != len(shapes)
        or not all(isinstance(n, str) for n in names)
        or not all(
            isinstance(s, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s)
            for s in shapes
        )
    ):
        raise ValueError(f"{mpath}: entries 'param_names' and 'param_shapes' are malformed")
    for key, e in man["arrays"].items():
        if (
            not isinstance(e, dict)
            or not isinstance(e.get("file"), str)
            or Path(e["file"]).name != e["file"]
            or not e["file"].endswith(".npy")
            or not isinstance(e.get("shape"), list)
            or not isinstance(e.get("dtype"), str)
            or not isinstance(e.get("sha256"), str)
        ):
            raise ValueError(f"{mpath}: the entry of array {key!r} is malformed")
    return man


def read_arrays(root: Path, man: Mapping[str, Any]) -> dict[str, Tensor]:
    """The arrays listed in the manifest, as CPU tensors, each checked against its entry (shape, dtype,
    SHA-256). FileNotFoundError for a missing file; ValueError, naming the file, for one numpy cannot read
    (truncated, damaged, or holding a pickled object) or that differs from its entry."""
    out: dict[str, Tensor] = {}
    for key, e in man["arrays"].items():
        file = root / e["file"]
        if not file.is_file():
            raise FileNotFoundError(
                f"saved TorchInfluence at {root}: the array file {file} (array {key!r}) is missing"
            )
        try:
            arr = np.load(file, allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError, EOFError, OSError, ... for a damaged file
            raise ValueError(
                f"saved TorchInfluence at {root}: the array file {file} could not be read ({type(exc).__name__}: "
                f"{exc}); it is truncated or damaged"
            ) from None
        if not isinstance(arr, np.ndarray):
            raise ValueError(f"saved TorchInfluence at {root}: {file} does not hold one array")
        if list(arr.shape) != list(e["shape"]) or arr.dtype.name != e["dtype"]:
            raise ValueError(
                f"saved TorchInfluence at {root}: {file} holds a {arr.dtype.name} array of shape "
                f"{tuple(arr.shape)}, but the manifest lists {e['dtype']} {tuple(e['shape'])}"
            )
        if _data_sha256(arr) != e["sha256"]:
            raise ValueError(
                f"saved TorchInfluence at {root}: the data in {file} does not match its SHA-256 in the "
                f"manifest; the file is damaged"
            )
        out[key] = torch.from_numpy(arr)
    return out


def _conflict(name: str, given: Any, saved: Any, why: str) -> ValueError:
    return ValueError(
        f"TorchInfluence.load: {name}={given!r} conflicts with the saved {name}={saved!r}: {why}. Omit {name} "
        f"to load with the saved value (or build a new TorchInfluence with yours)"
    )


def _constructor_options(
    man: Mapping[str, Any], options: Mapping[str, Any], model: Any, saved_solver: Any, mpath: Path
) -> dict[str, Any]:
    """The constructor's keyword arguments for a load: the saved values, with the user's ``options`` checked
    against them (a conflicting l2, damping, dtype, solver or params raises ValueError)."""
    from pyinfluence.torch.influence import TorchInfluence, _compute_dtype

    unknown = sorted(set(options) - set(_LOAD_OPTIONS))
    if unknown:
        raise TypeError(
            f"TorchInfluence.load got unexpected option(s) {', '.join(map(repr, unknown))}; it takes "
            f"{', '.join(_LOAD_OPTIONS)}"
        )
    l2, damping = float(man["l2"]), float(man["damping"])
    if "l2" in options and check_nonnegative_float("l2", options["l2"]) != l2:
        raise _conflict("l2", options["l2"], l2, "the saved curvature includes the (l2/2)‖θ‖² term")
    if "damping" in options and check_damping(options["damping"]) != damping:
        raise _conflict(
            "damping", options["damping"], damping, "the saved solver state was prepared for H + λI"
        )
    if options.get("dtype") is not None:
        d = str(_compute_dtype(options["dtype"], torch.float64)).replace("torch.", "")
        if d != man["dtype"]:
            raise _conflict(
                "dtype", options["dtype"], man["dtype"], "the curvature was computed in that dtype"
            )
    if options.get("solver") is not None:
        mine = TorchInfluence._pick_solver(options["solver"], int(man["n_params"]))
        if mine.name != saved_solver.name or mine.config() != saved_solver.config():
            raise _conflict("solver", mine, saved_solver, "the saved state is that solver's, so configured")
    names = list(man["param_names"])
    if isinstance(model, nn.Module):
        have = dict(model.named_parameters())
        missing = [n for n in names if n not in have]
        if missing:
            raise ValueError(
                f"TorchInfluence.load: the model ({type(model).__name__}) has no parameter(s) "
                f"{', '.join(map(repr, missing[:5]))}, which the influence saved in {mpath.parent} selected: it "
                f"is not the saved model"
            )
        for n, s in zip(names, man["param_shapes"]):
            if tuple(have[n].shape) != tuple(s):
                raise ValueError(
                    f"TorchInfluence.load: the model's parameter {n!r} has shape {tuple(have[n].shape)}, but it had "
                    f"shape {tuple(s)} in the influence saved in {mpath.parent}: it is not the saved model"
                )
        if options.get("params") is not None:
            chosen = [n for n, _ in select_params(model, options["params"])]
            if chosen != names:
                raise _conflict(
                    "params", options["params"], names, "the curvature is that of those parameters"
                )
    return {
        "params": names,
        "l2": l2,
        "damping": damping,
        "solver": saved_solver,
        "batch_size": options.get("batch_size", man["batch_size"]),
        "device": options.get("device"),
        "progress": options.get("progress", False),
        "optimum_tol": options.get("optimum_tol"),
        "stream": options.get("stream"),
        "label_key": options.get("label_key", "labels"),
        "dtype": man["dtype"],
    }


def _check_model(obj: Any, man: Mapping[str, Any], root: Path) -> None:
    """The rebuilt object's parameters, model and training set are those the manifest describes."""
    fm = obj._fm
    if list(fm.names) != list(man["param_names"]) or [list(s) for s in fm.shapes] != man["param_shapes"]:
        raise ValueError(
            f"TorchInfluence.load: the selected parameters {list(fm.names)} differ from the saved "
            f"{man['param_names']} (in {root})"
        )
    fp = fingerprints(fm)
    if fp["theta_sha256"] != man["theta_sha256"]:
        saved = man["param_sha256"]
        changed = [n for n in fm.names if saved.get(n) != fp["param_sha256"][n]]
        raise ValueError(
            f"TorchInfluence.load: the model's parameters θ̂ differ from those the influence in {root} was "
            f"saved with (SHA-256 fingerprints): {', '.join(map(repr, changed)) or 'their order'} changed. The "
            f"saved curvature is that of the saved parameters: load it with that model, or build a new "
            f"TorchInfluence for this one"
        )
    if fp["fixed_sha256"] != man["fixed_sha256"]:
        saved, here = man["fixed_tensor_sha256"], fp["fixed_tensor_sha256"]
        changed = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
        raise ValueError(
            f"TorchInfluence.load: the model's other parameters and buffers differ from those the influence in "
            f"{root} was saved with (SHA-256 fingerprints): {', '.join(map(repr, changed[:10]))}"
            f"{' ...' if len(changed) > 10 else ''} changed (or were added or removed). The curvature depends on "
            f"them: load it with the saved model, or build a new TorchInfluence"
        )
    if obj.n_train != man["n_train"]:
        raise ValueError(
            f"TorchInfluence.load: train_data has {obj.n_train} examples, but the influence in {root} was saved "
            f"for n_train={man['n_train']}: pass the training data it was saved with"
        )


def load_influence(
    cls: Any, path: Any, model: Any, loss_fn: Any, train_data: Any, options: Mapping[str, Any]
) -> tuple[Any, float | None, float]:
    """(the loaded object, its validated ``optimum_tol``, the saved ‖∇R(θ̂)‖); see :meth:`TorchInfluence.load`
    (which runs the optimum check itself, so that its warning points at the caller)."""
    root = _check_path(path)
    man = read_manifest(root)
    mpath = root / MANIFEST
    try:
        saved_solver = solver_from_config(man["solver"]["name"], man["solver"]["config"])
    except ValueError as exc:
        raise ValueError(f"{mpath}: entry 'solver': {exc}") from None
    kw = _constructor_options(man, options, model, saved_solver, mpath)
    obj = cls.__new__(cls)
    optimum_tol = obj._setup(
        model,
        loss_fn,
        train_data,
        kw["params"],
        kw["l2"],
        kw["damping"],
        kw["solver"],
        kw["batch_size"],
        kw["device"],
        kw["progress"],
        kw["optimum_tol"],
        kw["stream"],
        kw["label_key"],
        kw["dtype"],
    )
    _check_model(obj, man, root)
    tensors = read_arrays(root, man)
    with obj._solve_lock:
        try:
            obj._prep = obj._solver_cfg.restore(obj._op, obj._damping, tensors, man["solver_state"])
        except ValueError as exc:
            if isinstance(exc, PyInfluenceError):  # e.g. NotPositiveDefiniteError: keep its type and fields
                raise
            raise ValueError(
                f"TorchInfluence.load: the solver state in {mpath} does not fit: {exc}"
            ) from None
    return obj, optimum_tol, float(man["grad_norm"])
