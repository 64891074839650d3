"""Side by side with other influence libraries: Captum, pyDVL and kronfluence on a benchmark :class:`Task`.

Each peer method runs in its own subprocess (``_peer_worker.py``, which never imports
pyinfluence), so that

- a peer installed in a *separate* virtual environment can be used: pyDVL 0.10's ``influence``
  extra forces numpy < 2, and a plain install of kronfluence pulls a CUDA build of torch, so they
  live beside torch in their own venv (``PYINFLUENCE_PEER_PYTHON=/path/to/venv/bin/python`` or
  ``peer_python=``; one venv can hold all three peers, see bench/README.md);
- each method's peak memory is its own process's peak RSS;
- a crash, a hang (``timeout_s``) or NaN scores become a :class:`PeerRun` with ``error`` set,
  never an exception here.

Results are normalised to pyinfluence's convention (see :mod:`pyinfluence`)::

    up_loss[i, j] = −g_testjᵀ (H + λI)⁻¹ g_train_i,  shape (n_train, m_test),
    H = ∇²[(1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²],  g = per-example loss gradients (no l2 term).

The peers see the per-example loss only, so their gradients are exactly ours, and the l2 term is
folded into their regularisation (H + λI = H_mean_loss + (l2 + λ)I, exactly):

- Captum 0.9 ``NaiveInfluenceFunction``/``ArnoldiInfluenceFunction`` compute
  g_tᵀ(Σ_i∇²L_i + reg·I)⁻¹g_i (a sum Hessian; (m, n)): ``hessian_reg = n·(l2 + λ)``, result × −n,
  transposed. ``projection_dim`` = p for the naive (exact) method (its default 50 is a silent
  rank-50 truncation); it needs a checkpoint file, written by the worker.
- pyDVL 0.10 ``DirectInfluence``/``CgInfluence``/``LissaInfluence``/``ArnoldiInfluence`` compute
  ⟨(H_mean_loss + reg·I)⁻¹g_t, g_i⟩ ((m, n)): ``regularization = l2 + λ``, result × −1,
  transposed.
- kronfluence 1.0.1 (``"ekfac"`` / ``"kfac"``: ``FactorArguments(strategy=...)``) computes
  g_tᵀ(F̂ + damping_factor·I)⁻¹g_i ((m, n)) with F̂ its K-FAC / EK-FAC approximation of the mean
  Fisher over nn.Linear / nn.Conv2d modules, true Fisher by sampling labels from the model; the
  worker gives it sum-reduced losses (so its gradients are the per-example ones) and
  ``damping_factor = l2 + λ``; result × −1, transposed, no factor of n. Its K-FAC divides the
  gradient covariance by examples × positions, so on Conv2d layers (T output positions per image) its
  K-FAC block is 1/T of the "K-FAC-expand" block of pyinfluence's KFAC (for a loss that is a mean over
  T tokens, the 1/√T scale of the sampled loss makes the expected factors equal ours); the EK-FAC
  eigenvalues are per-example in both.
  Details: :mod:`pyinfluence.bench._peer_worker`.

Install: ``pip install "pyinfluence[compare]"`` (Captum 0.9.0) in this environment; pyDVL and
kronfluence in their own (bench/README.md has the exact commands)::

    python3 -m venv /work/peers-venv
    /work/peers-venv/bin/pip install torch==2.13.0          # first: the CPU build, pinned
    /work/peers-venv/bin/pip install "numpy<2" "pydvl[influence]==0.10.0" captum==0.9.0
    /work/peers-venv/bin/pip install --no-deps kronfluence==1.0.1
    /work/peers-venv/bin/pip install accelerate einops einconv opt-einsum safetensors
    export PYINFLUENCE_PEER_PYTHON=/work/peers-venv/bin/python
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from pyinfluence.bench import _peer_worker as _worker

__all__ = ["PeerRun", "PEERS", "PEER_METHODS", "available_peers", "run_peers", "peer_methods"]

PEERS = ("captum", "pydvl", "kronfluence")
ENV_PEER_PYTHON = "PYINFLUENCE_PEER_PYTHON"
INSTALL_HINT = {
    "captum": 'pip install captum==0.9.0  (or: pip install "pyinfluence[compare]")',
    "pydvl": (
        "pyDVL's influence extra needs numpy<2: create a separate venv "
        "(python3 -m venv peers-venv; peers-venv/bin/pip install torch==2.13.0 "
        '"pydvl[influence]==0.10.0") and set PYINFLUENCE_PEER_PYTHON=peers-venv/bin/python '
        "(or pass peer_python=)"
    ),
    "kronfluence": (
        "a plain pip install of kronfluence pulls a CUDA build of torch: in a separate venv install "
        "torch==2.13.0 first, then pip install --no-deps kronfluence==1.0.1 and pip install accelerate "
        "einops einconv opt-einsum safetensors; set PYINFLUENCE_PEER_PYTHON=peers-venv/bin/python "
        "(or pass peer_python=); see bench/README.md"
    ),
}

# The settings measured by default: (label, class, settings). "p" = the number of parameters.
# Captum: one batch of the whole training set (its Hessian is torch.autograd.functional.hessian
# per batch: p backward passes each, so fewer batches is faster). pyDVL: library defaults
# (rtol/atol/maxiter/scale) unless stated; batch_size is the DataLoader's. kronfluence: the class is
# its factor strategy; damping_factor = l2 + λ, every dtype the task's, batch size "auto" (per-sample
# gradients of a batch ≤ 256 MB), the true Fisher by sampling (settings: "dtype" "model" | "float32",
# "batch_size", "use_empirical_fisher").
PEER_METHODS: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "captum": [
        ("NaiveInfluenceFunction", "NaiveInfluenceFunction", {"projection_dim": "p"}),
        (
            "ArnoldiInfluenceFunction(rank 50)",
            "ArnoldiInfluenceFunction",
            {"projection_dim": 50, "arnoldi_dim": 200},
        ),
    ],
    "pydvl": [
        ("DirectInfluence", "DirectInfluence", {"batch_size": 256}),
        ("CgInfluence(block)", "CgInfluence", {"solve_simultaneously": True, "rtol": 1e-4, "atol": 1e-6}),
        (
            "LissaInfluence(defaults)",
            "LissaInfluence",
            {"batch_size": 128, "maxiter": 1000, "scale": 10.0, "dampen": 0.0, "rtol": 1e-4},
        ),
        (
            "LissaInfluence(scale 1.5·λmax)",
            "LissaInfluence",
            {
                "batch_size": 128,
                "maxiter": 1000,
                "scale": "lambda_max",
                "scale_margin": 1.5,
                "power_iters": 30,
                "dampen": 0.0,
                "rtol": 1e-4,
            },
        ),
        ("ArnoldiInfluence(rank 50)", "ArnoldiInfluence", {"batch_size": 256, "rank": 50}),
    ],
    "kronfluence": [
        ("EK-FAC", "ekfac", {}),
        ("K-FAC", "kfac", {}),
    ],
}


@dataclass
class PeerRun:
    """One peer method on one task.

    ``up_loss``: (n_train, m_test) float64 in pyinfluence's convention, or None when ``error`` is
    set (not installed, timeout, exception, NaN/inf scores). ``time_s``: wall time of the peer's
    own work (construction/fit + scores; excludes imports and data loading, which are in
    ``details['load_s']``). ``peak_mem_mb``: the worker process's peak RSS (imports included;
    ``details['baseline_mem_mb']`` is the RSS before the peer's work). ``details``: fit_s,
    score_s, load_s, total_s, warnings the peer emitted, versions, the normalisation applied,
    the interpreter used.
    """

    library: str
    method: str
    settings: dict
    time_s: Optional[float]
    up_loss: Optional[np.ndarray]
    error: Optional[str]
    peak_mem_mb: Optional[float]
    details: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.up_loss is not None

    def to_dict(self) -> dict:
        """JSON-friendly (no matrix)."""
        return {
            "library": self.library,
            "method": self.method,
            "settings": self.settings,
            "time_s": self.time_s,
            "peak_mem_mb": self.peak_mem_mb,
            "error": self.error,
            "details": self.details,
        }

    def __repr__(self) -> str:
        state = f"error={self.error!r}" if self.error else f"time_s={self.time_s:.3g}"
        return f"PeerRun({self.library!r}, {self.method!r}, {state})"


# ----------------------------------------------------------------------------------------------
# availability
# ----------------------------------------------------------------------------------------------
def _worker_path() -> str:
    return os.path.abspath(_worker.__file__)


def _local_ok(peer: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in _worker.PEER_PACKAGES[peer])


@functools.lru_cache(maxsize=8)
def _probe(python: str) -> dict:
    """The worker's ``--probe`` answer for another interpreter ({} if it cannot run)."""
    try:
        r = subprocess.run(
            [python, _worker_path(), "--probe"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_child_env(python),
        )
        return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {}
    except Exception:
        return {}


def _peer_python(peer_python: Optional[str]) -> Optional[str]:
    py = peer_python or os.environ.get(ENV_PEER_PYTHON) or None
    return os.path.abspath(py) if py and os.sep in py else py


def _resolve(peer: str, peer_python: Optional[str]) -> tuple[Optional[str], Optional[str]]:
    """(interpreter, None) if ``peer`` is usable, else (None, reason)."""
    if peer not in _worker.PEER_PACKAGES:
        return None, f"unknown peer {peer!r} (known: {', '.join(PEERS)})"
    if _local_ok(peer):
        return sys.executable, None
    py = _peer_python(peer_python)
    if py:
        info = _probe(py).get("peers", {}).get(peer)
        if info and info.get("ok"):
            return py, None
        where = f" (nor in {py}" + (
            f": missing {', '.join(info['missing'])})" if info else ": it does not run)"
        )
    else:
        where = ""
    return None, f"not installed{where}: {INSTALL_HINT[peer]}"


def available_peers(peer_python: Optional[str] = None) -> dict[str, Optional[str]]:
    """{peer name: None if usable, else the reason (with the install command)}.

    A peer is usable when it is importable here (``sys.executable``) or by ``peer_python`` /
    ``$PYINFLUENCE_PEER_PYTHON`` (another venv's interpreter).
    """
    return {p: _resolve(p, peer_python)[1] for p in PEERS}


def peer_methods(peer: str) -> list[str]:
    """Labels of the default settings measured for ``peer``."""
    return [label for label, _, _ in PEER_METHODS[peer]]


# ----------------------------------------------------------------------------------------------
# payload: model, loss, data
# ----------------------------------------------------------------------------------------------
_CONV_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
)
_LAYER_ATTRS: dict[str, tuple[str, ...]] = {
    "Linear": ("in_features", "out_features"),
    "Conv1d": _CONV_ATTRS,
    "Conv2d": _CONV_ATTRS,
    "Tanh": (),
    "ReLU": (),
    "Sigmoid": (),
    "Identity": (),
    "SiLU": (),
    "Softplus": ("beta", "threshold"),
    "ELU": ("alpha",),
    "LeakyReLU": ("negative_slope",),
    "GELU": ("approximate",),
    "Flatten": ("start_dim", "end_dim"),
    "Unflatten": ("dim", "unflattened_size"),
    "MaxPool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "AvgPool2d": ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    "Dropout": ("p",),
}


class _NotDescribable(Exception):
    pass


def _describe_module(m: Any) -> dict:
    """An architecture description of nn.Sequential / standard layers (exact types only)."""
    from torch import nn

    if type(m) is nn.Sequential:
        return {
            "type": "Sequential",
            "children": [[name, _describe_module(c)] for name, c in m.named_children()],
        }
    name = type(m).__name__
    if name not in _LAYER_ATTRS or type(m) is not getattr(nn, name, None):
        raise _NotDescribable(name)
    kw = {a: getattr(m, a) for a in _LAYER_ATTRS[name]}
    if name in ("Linear", "Conv1d", "Conv2d"):
        kw["bias"] = m.bias is not None
    return {"type": name, "kwargs": kw}


def _save_model(model: Any, path: str, X: Any) -> dict:
    """Write ``model`` to ``path``; returns the payload's model description."""
    import torch

    try:
        desc = {"format": "spec", "spec": _describe_module(model)}
        torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, path)
        return desc
    except _NotDescribable:
        pass
    # any other module: a torch.fx GraphModule (pickled with its generated code, so the worker
    # needs torch only, not the model's class)
    gm = torch.fx.symbolic_trace(model)
    # type annotations of forward() under `from __future__ import annotations` are strings, which the
    # GraphModule's pickled code cannot import: drop them (they do not change what the graph computes)
    for node in gm.graph.nodes:
        node.type = None
    gm.recompile()
    with torch.no_grad():
        a, b = model(X[:4]), gm(X[:4])
    if not torch.allclose(a, b, rtol=1e-12, atol=1e-12):
        raise ValueError("torch.fx trace of the model does not reproduce its outputs")
    gm = gm.cpu()
    torch.save(gm, path)
    with open(path, "rb") as f:  # the worker unpickles only these exact bytes (see _peer_worker)
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"format": "fx", "sha256": digest}


_HINGE_TEMPERATURES = (0.1, 0.01, 0.001, 1.0, 0.5, 0.05, 0.2, 0.02, 0.005, 2.0)


def _identify_loss(loss_fn: Callable, model: Any, X: Any, Y: Any, explicit: Optional[dict] = None) -> dict:
    """The worker's name for ``loss_fn``, found by matching its values numerically.

    ``explicit`` (a dict such as ``{"name": "smooth_hinge", "temperature": 0.1}``, from a task's
    or a loss function's ``peer_loss`` attribute) is used as is after the same check.
    """
    import torch

    with torch.no_grad():
        xb, yb = X[:64], Y[:64]
        out = model(xb)
        gen = torch.Generator().manual_seed(0)
        outs = [out, out + 0.5 * torch.randn(out.shape, generator=gen, dtype=out.dtype)]
        refs = [loss_fn(o, yb).reshape(-1) for o in outs]
    cands: list[dict] = []
    if explicit:
        cands.append(dict(explicit))
    temps = list(_HINGE_TEMPERATURES)
    t_kw = getattr(loss_fn, "keywords", None) or {}
    if "temperature" in t_kw:
        temps.insert(0, float(t_kw["temperature"]))
    if not Y.is_floating_point() and out.ndim == 2 and out.shape[1] > 1:
        cands.append({"name": "cross_entropy"})
    if not Y.is_floating_point() and out.ndim == 3 and Y.ndim == 2:
        cands.append({"name": "token_cross_entropy"})
    cands += [{"name": "logistic"}] + [{"name": "smooth_hinge", "temperature": t} for t in temps]
    cands += [{"name": "mse_mean"}, {"name": "mse_sum"}]
    for c in cands:
        try:
            f = _worker._per_example_loss(c)
            with torch.no_grad():
                ok = all(
                    torch.allclose(f(o, yb).reshape(-1), r, rtol=1e-9, atol=1e-12) for o, r in zip(outs, refs)
                )
        except Exception:
            ok = False
        if ok:
            return c
    if explicit:
        raise ValueError(f"the loss does not match its peer_loss description {explicit}")
    raise ValueError(
        "cannot tell which loss the task uses (known to the peer worker: cross-entropy, next-token "
        "cross-entropy averaged over positions, binary logistic, smooth hinge, squared error); set "
        "peer_loss = {'name': ...} on the task"
    )


def _resolve_params(model: Any, params: Any) -> Optional[list[str]]:
    """TorchInfluence's ``params=`` selection as explicit parameter names (None = all)."""
    if params is None:
        return None
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if callable(params):

        def pick(n, p):
            try:
                return bool(params(n, p))
            except TypeError:
                return bool(params(n))

        out = [n for n, p in named if pick(n, p)]
    else:
        sel = [params] if isinstance(params, str) else list(params)
        out = [n for n, _ in named if any(n == s or n.startswith(s + ".") for s in sel)]
    if not out:
        raise ValueError(f"params={params!r} selects no parameter")
    return out


def _child_env(python: str, model_sha256: Optional[str] = None) -> dict:
    env = dict(os.environ)
    env.pop(_worker.MODEL_DIGEST_ENV, None)
    if model_sha256:
        env[_worker.MODEL_DIGEST_ENV] = model_sha256
    if os.path.realpath(python) != os.path.realpath(sys.executable):
        env.pop("PYTHONPATH", None)  # another venv: do not leak this environment's packages
        env.pop("PYTHONHOME", None)
    return env


def _np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(t))


def _write_data(task: Any, data_dir: str) -> dict:
    """data.npz, model.pt; returns the payload fields they need."""
    import torch

    model = task.model
    X = task.X_train
    if isinstance(X, torch.Tensor) and X.is_floating_point():
        dtype = str(X.dtype).replace("torch.", "")
    else:  # integer inputs (token ids): the model's floating dtype
        fl = [q.dtype for q in model.parameters() if q.is_floating_point()]
        dtype = str(fl[0]).replace("torch.", "") if fl else "float64"
    np.savez(
        os.path.join(data_dir, "data.npz"),
        X_train=_np(task.X_train),
        y_train=_np(task.y_train),
        X_test=_np(task.X_test),
        y_test=_np(task.y_test),
    )
    Xt = torch.as_tensor(task.X_train)
    Yt = torch.as_tensor(task.y_train)
    desc = _save_model(model, os.path.join(data_dir, "model.pt"), Xt)
    explicit = getattr(task, "peer_loss", None) or getattr(task.loss_fn, "peer_loss", None)
    loss = _identify_loss(task.loss_fn, model, Xt, Yt, explicit)
    return {
        "model": desc,
        "loss": loss,
        "dtype": dtype,
        "params": _resolve_params(model, getattr(task, "params", None)),
        "l2": float(task.l2),
        "damping": float(task.damping),
    }


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------
def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: only what we started
    except (ProcessLookupError, PermissionError, OSError):
        proc.kill()


def _run_one(python: str, worker: str, run_dir: str, payload: dict, timeout_s: float) -> dict:
    with open(os.path.join(run_dir, "payload.json"), "w") as f:
        json.dump(payload, f, indent=1)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [python, worker, run_dir, run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
        env=_child_env(python, payload.get("model", {}).get("sha256")),
        cwd=run_dir,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.communicate()
        return {
            "error": f"timeout: no result after {timeout_s:g} s (killed)",
            "total_s": time.perf_counter() - t0,
        }
    res_path = os.path.join(run_dir, "result.json")
    if os.path.exists(res_path):
        with open(res_path) as f:
            res = json.load(f)
    else:
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("RESULT_JSON ")]
        res = json.loads(lines[-1][12:]) if lines else {"error": _death_message(proc.returncode, out or "")}
    npz = os.path.join(run_dir, "result.npz")
    if res.get("error") is None:
        if os.path.exists(npz):
            with np.load(npz) as d:
                res["up_loss"] = np.array(d["up_loss"], dtype=np.float64)
        else:
            res["error"] = "worker reported success but wrote no scores"
    res["output_tail"] = (out or "")[-2000:]
    return res


def _select_methods(peer: str, methods: Any) -> list[tuple[str, str, dict]]:
    table = PEER_METHODS[peer]
    if methods is None:
        return list(table)
    if isinstance(methods, dict):
        methods = methods.get(peer, [])
    out: list[tuple[str, str, dict]] = []
    for m in methods:
        if isinstance(m, dict):
            if m.get("library", peer) == peer:
                out.append((str(m.get("label", m["method"])), str(m["method"]), dict(m.get("settings", {}))))
        else:
            out += [row for row in table if row[0] == m or row[1] == m]
    return out


def _death_message(returncode: int, output: str) -> str:
    """Why a worker that wrote no result died: the signal in words, then its last non-warning lines."""
    if returncode == -signal.SIGKILL:
        why = (
            "killed by SIGKILL (not by our timeout: most likely the kernel's out-of-memory killer; "
            "the peer's memory use exceeded what the machine had)"
        )
    elif returncode < 0:
        why = f"killed by signal {-returncode}"
    else:
        why = f"exit code {returncode}"
    noise = ("Warning", "warn(", "@deprecated", "warnings.warn")
    tail = [ln for ln in output.strip().splitlines() if ln.strip() and not any(w in ln for w in noise)]
    return f"worker died without a result ({why})" + (f": {' | '.join(tail[-5:])[-600:]}" if tail else "")


def run_peers(
    task: Any,
    peers: Sequence[str] = PEERS,
    *,
    peer_python: Optional[str] = None,
    timeout_s: float = 600,
    methods: Any = None,
    keep_dir: Optional[str] = None,
    num_threads: Optional[int] = None,
    warm_up: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> list[PeerRun]:
    """Run other libraries' influence methods on ``task``; one :class:`PeerRun` per method.

    - ``task``: a :class:`~pyinfluence.bench.tasks.Task` (its torch view: ``model``,
      ``loss_fn``, ``X_train``, ``y_train``, ``X_test``, ``y_test``, ``l2``, ``damping``,
      ``params``). The full n_train × m_test matrix is computed.
    - ``peers``: names among ``PEERS`` ("captum", "pydvl", "kronfluence").
    - ``peer_python``: an interpreter of another venv that has the peer (default:
      ``$PYINFLUENCE_PEER_PYTHON``); used for a peer not importable here.
    - ``timeout_s``: the limit for EACH method's worker process (killed after it: a PeerRun with
      ``error="timeout: ..."``).
    - ``methods``: None = every default setting in ``PEER_METHODS``; or a list of labels /
      class names, or of ``{"library", "method", "label", "settings"}`` dicts, or a dict
      {peer: such a list}.
    - ``keep_dir``: keep payloads and results in a new private folder (mode 0700, ``peers-*``) inside
      ``keep_dir`` instead of a temporary directory.
    - ``num_threads``: torch threads in the worker (default: this process's
      ``torch.get_num_threads()``).
    - ``warm_up``: before the timed work, pay torch's one-off first-use costs (torch.func
      transforms script helpers on first use: seconds) on a tiny model, as a long-running process
      would have; False only to save time in tests.
    - ``log``: called with a progress line before and after each method.

    Never raises for a peer's failure: not installed, unsupported model/loss, exception,
    timeout and NaN/inf scores are PeerRuns with ``error`` set (and ``up_loss=None``).
    """
    import torch

    if isinstance(peers, str):
        peers = (peers,)
    nthreads = int(num_threads or torch.get_num_threads())
    tmp = None
    if keep_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="pyinfluence-peers-")
        base = tmp.name
    else:
        # a new folder that only this user can enter (mkdtemp: mode 0700), so no one else can swap the
        # worker script or the model file that the workers run and load
        os.makedirs(keep_dir, exist_ok=True)
        base = tempfile.mkdtemp(prefix="peers-", dir=keep_dir)
    runs: list[PeerRun] = []
    try:
        plan = []
        for peer in peers:
            python, reason = _resolve(peer, peer_python)
            rows: list[tuple[str, str, dict]]
            if peer not in PEER_METHODS:
                rows = [("-", "-", {})]
            else:
                rows = _select_methods(peer, methods)
                if not rows:  # ``methods`` names none of this peer's settings
                    continue
            for label, cls, settings in rows:
                plan.append((peer, python, reason, label, cls, settings))
        data_fields: dict[str, Any] = {}
        data_error = None
        if any(python for _, python, *_ in plan):
            data_dir = os.path.join(base, "data")
            os.makedirs(data_dir, exist_ok=True)
            try:
                data_fields = _write_data(task, data_dir)
            except Exception as e:  # unsupported model or loss: every peer run reports it
                data_error = f"payload: {type(e).__name__}: {e}"
        worker = os.path.join(base, "_peer_worker.py")  # a copy: no package dir on sys.path
        shutil.copyfile(_worker_path(), worker)
        for k, (peer, python, reason, label, cls, settings) in enumerate(plan):
            if python is None or data_error:
                runs.append(
                    PeerRun(
                        peer, label, dict(settings), None, None, reason or data_error, None, {"class": cls}
                    )
                )
                continue
            run_dir = os.path.join(base, f"run{k:02d}")
            os.makedirs(run_dir, exist_ok=True)
            payload = dict(
                data_fields,
                peer=peer,
                method=cls,
                label=label,
                settings=dict(settings),
                num_threads=nthreads,
                seed=0,
                warm_up=bool(warm_up),
                data_dir=os.path.relpath(os.path.join(base, "data"), run_dir),
            )
            if log:
                log(f"peer {peer} {label} ...")
            res = _run_one(python, worker, run_dir, payload, timeout_s)
            up = res.pop("up_loss", None)
            err = res.get("error")
            n, m = int(task.X_train.shape[0]), int(task.X_test.shape[0])
            if up is not None and up.shape != (n, m):
                err, up = f"scores of shape {up.shape}, expected {(n, m)}", None
            settings_used = res.pop("settings_used", None) or dict(settings)
            details = {
                k2: res.get(k2)
                for k2 in (
                    "fit_s",
                    "score_s",
                    "load_s",
                    "total_s",
                    "baseline_mem_mb",
                    "warnings",
                    "versions",
                    "normalisation",
                    "n_nan",
                    "n_inf",
                    "max_abs",
                    "traceback",
                )
            }
            details.update({"class": cls, "python": python})
            if err and not res.get("traceback"):
                details["output_tail"] = res.get("output_tail")
            t = res.get("time_s")
            runs.append(
                PeerRun(
                    peer,
                    label,
                    settings_used,
                    float(t) if t is not None and math.isfinite(t) else None,
                    up if err is None else None,
                    err,
                    res.get("peak_mem_mb"),
                    details,
                )
            )
            if log:
                log(f"peer {peer} {label}: " + (f"error {err}" if err else f"{runs[-1].time_s:.3g} s"))
    finally:
        if tmp is not None:
            tmp.cleanup()
    return runs
