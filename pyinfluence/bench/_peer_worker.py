#!/usr/bin/env python3
"""Run ONE other library's influence method on a task payload and normalise it to pyinfluence's
convention. Launched by :mod:`pyinfluence.bench.peers` in a subprocess.

Standalone on purpose: it imports only the standard library, numpy, torch and the peer library
(Captum, pyDVL or kronfluence) — **never pyinfluence** — because it also runs in a separate virtual
environment (pyDVL's ``influence`` extra forces numpy < 2, which pyinfluence's environment does not
have; kronfluence's own requirements would pull a CUDA build of torch).

Usage::

    python _peer_worker.py PAYLOAD_DIR [OUT_DIR]     # run payload.json, write OUT_DIR/result.*
    python _peer_worker.py --probe                    # print JSON: which peers are importable here

Payload directory (written by ``peers._write_payload``):

- ``payload.json``: ``peer`` ("captum" | "pydvl" | "kronfluence"), ``method`` (a class name; for
  kronfluence its factor strategy "ekfac" | "kfac"), ``label`` (unique name of this setting),
  ``settings`` (keyword settings of the method, see below), ``loss``
  (``{"name": "cross_entropy" | "token_cross_entropy" | "logistic" | "smooth_hinge" | "mse_mean" |
  "mse_sum", "temperature": t}``; ``token_cross_entropy``: outputs (B, T, V), targets (B, T), the
  per-example loss is the mean over the T positions), ``l2``, ``damping``, ``params`` (names of the selected parameters, or
  null = all), ``model`` (``{"format": "spec", "spec": ...}``: an architecture description of
  ``nn.Sequential`` / standard layers, weights in ``model.pt`` as a state_dict; or
  ``{"format": "fx"}``: a ``torch.fx.GraphModule`` saved whole in ``model.pt``), ``dtype``,
  ``num_threads``, ``seed``, ``data_dir`` (where ``data.npz`` and ``model.pt`` lie, relative to
  the payload directory; default ".").
- ``data.npz``: ``X_train``, ``y_train``, ``X_test``, ``y_test``.
- ``model.pt``: see ``model``.

Result (always written, also on failure): ``OUT_DIR/result.json`` (``error`` null or a message,
``traceback``, ``time_s`` = the peer's own work: construction/fit + scores (+ the scale estimate
for LiSSA with an estimated scale), ``fit_s``, ``score_s``, ``load_s`` = imports + data/model
loading + a warm-up of torch's one-off first-use costs on a tiny model, ``total_s``,
``peak_mem_mb`` = the process's peak RSS (VmHWM; imports included),
``baseline_mem_mb`` = RSS after loading, before the peer's work, ``warnings`` = Python warnings and
log records at WARNING or above emitted by the peer, ``versions``, ``normalisation``) and, when
the scores are finite, ``OUT_DIR/result.npz`` with ``up_loss`` (n_train × m_test, float64).

Our convention (see :mod:`pyinfluence`): ``up_loss[i, j] = −g_testjᵀ (H + λI)⁻¹ g_train_i`` with
``H = ∇²[(1/n) Σ L(z_i, θ) + (l2/2)‖θ‖²]`` and g the per-example loss gradients WITHOUT the l2
term. Peers see the per-example loss only (their gradients are then exactly ours) and the l2 term
is folded into their regularisation: H + λI = H_mean_loss + (l2 + λ)I exactly.

- Captum ``NaiveInfluenceFunction`` / ``ArnoldiInfluenceFunction``: scores (m, n) =
  g_tᵀ(Σ_i ∇²L_i + reg·I)⁻¹ g_i (a SUM Hessian), so ``hessian_reg = n·(l2 + λ)`` and
  ``up_loss = −n · scoresᵀ``.
- pyDVL ``DirectInfluence`` / ``CgInfluence`` / ``LissaInfluence`` / ``ArnoldiInfluence``:
  ``influences(x_test, y_test, x, y)`` (m, n) = ⟨(H_mean_loss + reg·I)⁻¹ g_t, g_i⟩, so
  ``regularization = l2 + λ`` and ``up_loss = −scoresᵀ``.
- kronfluence 1.0.1 (``Analyzer.fit_all_factors`` + ``compute_pairwise_scores``, ``FactorArguments(
  strategy="ekfac" | "kfac")``): scores (m, n) = g_tᵀ (F̂ + damping_factor·I)⁻¹ g_i, with F̂ its
  block-diagonal (per nn.Linear / nn.Conv2d module) K-FAC or EK-FAC approximation of the MEAN Fisher
  (covariances divided by the number of examples — times positions for sequence/conv layers — and
  EK-FAC's eigenvalues Λ by the number of examples). Its losses must be SUM-reduced so that its hooks
  see per-example gradients: ``compute_train_loss`` / ``compute_measurement`` return Σ_i L(z_i), and
  then g are exactly our per-example gradients. Its Fisher is the true Fisher by SAMPLING
  (``sample=True``: one label per example and pass drawn from the model's predictive distribution,
  scaled so that E[g gᵀ] is the loss's Gauss-Newton matrix; see ``_fisher_sample_loss``). The l2
  term is not in F̂, so ``damping_factor = l2 + λ`` (added to every eigenvalue, as our l2 + λ is
  added to H) and ``up_loss = −scoresᵀ`` — no factor of n. Every dtype argument is set to the task's
  dtype (its defaults are float32), ``covariance_max_examples`` / ``lambda_max_examples`` to None
  (its default 100 000 would subsample larger training sets). Only nn.Linear / nn.Conv2d parameters
  are covered: a selection with any other parameter is refused. A bare nn.Linear model is wrapped in
  nn.Sequential (kronfluence cannot wrap the root module).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import time
import traceback
import warnings

_T_START = time.perf_counter()

PEER_PACKAGES = {
    "captum": ("captum",),
    "pydvl": ("pydvl", "dask", "distributed"),
    "kronfluence": ("kronfluence", "accelerate", "einops", "einconv", "opt_einsum", "safetensors"),
}


# ----------------------------------------------------------------------------------------------
# small helpers (stdlib only)
# ----------------------------------------------------------------------------------------------
def _mem_mb() -> float | None:
    """Peak resident set size of this process so far, MB: VmHWM (the high-water mark of this
    process image), else ru_maxrss. (On Linux ru_maxrss survives fork + exec: a worker started
    by a big parent would report the parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024.0 if sys.platform != "darwin" else kb / (1024.0 * 1024.0)
    except Exception:  # pragma: no cover - non-POSIX
        return None


def _rss_mb() -> float | None:
    """Current resident set size, MB (VmRSS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except Exception:
        pass
    return None


def _version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def probe() -> dict:
    """Which peers are importable by this interpreter (no heavy imports)."""
    import importlib.util

    peers: dict[str, dict] = {}
    out: dict[str, object] = {
        "python": sys.executable,
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "peers": peers,
    }
    for peer, mods in PEER_PACKAGES.items():
        missing = [m for m in mods if importlib.util.find_spec(m) is None]
        peers[peer] = {
            "ok": not missing and out["torch"] is not None and out["numpy"] is not None,
            "missing": missing,
            "version": _version(mods[0]),
        }
    return out


def _write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


class _LogCapture(logging.Handler):
    def __init__(self, sink: list) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - depends on peers
        try:
            msg = record.getMessage()
        except Exception:
            msg = str(record.msg)
        if len(self.sink) < 50:
            self.sink.append(f"log {record.name} {record.levelname}: {msg[:500]}")


# ----------------------------------------------------------------------------------------------
# model and loss (numpy, torch)
# ----------------------------------------------------------------------------------------------
def _build_from_spec(spec: dict):
    """nn.Module from the architecture description written by peers._describe_module."""
    from collections import OrderedDict

    from torch import nn

    t = spec["type"]
    kw = dict(spec.get("kwargs", {}))
    if t == "Sequential":
        return nn.Sequential(OrderedDict((name, _build_from_spec(c)) for name, c in spec["children"]))
    for k, v in list(kw.items()):  # JSON turned tuples into lists
        if isinstance(v, list):
            kw[k] = tuple(v)
    cls = getattr(nn, t, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise ValueError(f"model spec: unknown layer type {t!r}")
    return cls(**kw)


# The SHA-256 of model.pt as the parent process wrote it, passed in the environment rather than in the
# payload folder (whoever could replace the file could also rewrite a digest stored beside it).
MODEL_DIGEST_ENV = "PYINFLUENCE_PEER_MODEL_SHA256"


def _load_model(payload_dir: str, desc: dict, dtype):
    import hashlib
    import io

    import torch

    path = os.path.join(payload_dir, "model.pt")
    with open(path, "rb") as f:
        blob = f.read()  # read once: what is checked is what is loaded
    if desc["format"] == "spec":
        model = _build_from_spec(desc["spec"]).to(dtype)
        state = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
    elif desc["format"] == "fx":
        # A torch.fx GraphModule is a pickle (its generated code): unpickling runs code, so load only the
        # exact bytes that the parent process wrote, as its digest proves.
        expected = os.environ.get(MODEL_DIGEST_ENV, "")
        if not expected or hashlib.sha256(blob).hexdigest() != expected:
            raise ValueError(
                f"refusing to unpickle {path}: its SHA-256 does not match the one the benchmark wrote "
                f"({MODEL_DIGEST_ENV}); the file was replaced or the worker was not started by "
                f"pyinfluence.bench"
            )
        model = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
    else:
        raise ValueError(f"unknown model format {desc['format']!r}")
    model.eval()
    return model


def _per_example_loss(spec: dict):
    """Per-example loss (batch,) for the payload's loss name (vmap-friendly, batch of 1 too)."""
    import torch
    import torch.nn.functional as F

    name = spec["name"]
    if name == "cross_entropy":

        def f(out, y):
            return F.cross_entropy(out, y.long(), reduction="none")
    elif name == "token_cross_entropy":

        def f(out, y):  # (B, T, V), (B, T): the mean over positions of the next-token cross-entropy
            return F.cross_entropy(out.transpose(1, 2), y.long(), reduction="none").mean(dim=1)
    elif name == "logistic":

        def f(out, y):
            return F.binary_cross_entropy_with_logits(
                out.reshape(-1), y.reshape(-1).to(out.dtype), reduction="none"
            )
    elif name == "smooth_hinge":
        t = float(spec["temperature"])

        def f(out, y):  # t·softplus((1 − y·s)/t), linear above 40 (as pyinfluence.losses)
            s = out.reshape(-1)
            u = (1.0 - y.reshape(-1).to(s.dtype) * s) / t
            return t * F.softplus(u, beta=1.0, threshold=40.0)
    elif name in ("mse_mean", "mse_sum"):
        red = torch.mean if name == "mse_mean" else torch.sum

        def f(out, y):
            d = (out - y.to(out.dtype).reshape(out.shape)).reshape(out.shape[0], -1)
            return red(d * d, dim=1)
    else:
        raise ValueError(f"unknown loss {name!r}")
    return f


def _select_params(model, names):
    """Freeze every parameter not in ``names`` (None = all); returns the selected names."""
    allp = [n for n, _ in model.named_parameters()]
    if names is None:
        return allp
    sel = set(names)
    unknown = sel - set(allp)
    if unknown:
        raise ValueError(f"params: unknown parameter names {sorted(unknown)}")
    for n, p in model.named_parameters():
        p.requires_grad_(n in sel)
    return [n for n in allp if n in sel]


def _captum_layers(model, selected):
    """Captum's ``layers`` (module names) for a parameter selection, or None for all."""
    allp = [n for n, _ in model.named_parameters()]
    if selected == allp:
        return None
    mods = []
    for mname, mod in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in mod.named_parameters(recurse=False)]
        if own and all(o in selected for o in own):
            mods.append(mname)
        elif any(o in selected for o in own):
            raise ValueError(f"Captum selects parameters by layer: module {mname!r} is only partly selected")
    return mods


def _power_lambda_max(model, loss, X, Y, reg: float, iters: int, seed: int) -> float:
    """Largest eigenvalue of H_mean_loss + reg·I by power iteration (full-data HVPs)."""
    import torch
    from torch.func import functional_call

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def R(ps):
        out = functional_call(model, {**ps, **fixed}, (X,))
        return loss(out, Y).mean()

    def hvp(v):
        return torch.func.jvp(torch.func.grad(R), (params,), (v,))[1]

    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(params[n].shape, generator=g, dtype=params[n].dtype) for n in names}
    lam = 0.0
    for _ in range(iters):
        nrm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
        v = {n: t / nrm for n, t in v.items()}
        Hv = hvp(v)
        lam = sum(float((Hv[n] * v[n]).sum()) for n in names)
        v = Hv
    return lam + reg


def _warm_up(dtype) -> None:
    """Pay torch's one-off first-use costs (torch.func transforms script some helpers on first
    use: seconds) outside the timed region, on a tiny model; every library, ours included, pays
    them once per process, so they are not the peer's per-task work."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    ps = {k: v.detach() for k, v in m.named_parameters()}
    X = torch.randn(5, 3, dtype=dtype)
    Y = torch.tensor([0, 1, 0, 1, 1])

    def L(p, x, y):
        return F.cross_entropy(functional_call(m, p, (x,)), y)

    vmap(grad(L), in_dims=(None, 0, 0))(ps, X[:, None], Y[:, None])
    jvp(lambda q: grad(L)(q, X, Y), (ps,), ({k: torch.ones_like(v) for k, v in ps.items()},))
    flat = torch.cat([v.reshape(-1) for v in ps.values()])

    def Lf(f):
        out, i = {}, 0
        for k, v in ps.items():
            out[k] = f[i : i + v.numel()].reshape(v.shape)
            i += v.numel()
        return L(out, X, Y)

    hessian(Lf)(flat)
    vjp(Lf, flat)[1](torch.ones((), dtype=dtype))
    torch.autograd.functional.hessian(Lf, flat)
    torch.autograd.functional.hvp(Lf, flat, torch.ones_like(flat))
    torch.linalg.eig(torch.eye(3, dtype=dtype))
    torch.linalg.eigh(torch.eye(3, dtype=dtype))
    torch.linalg.cholesky(torch.eye(3, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# the peers
# ----------------------------------------------------------------------------------------------
def _run_captum(p: dict, model, loss, X, Y, Xt, Yt, selected, work_dir: str, res: dict):
    import torch
    from captum.influence import NaiveInfluenceFunction
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    s = dict(p["settings"])
    n = X.shape[0]
    reg = float(p["l2"]) + float(p["damping"])
    n_sel = sum(q.numel() for name, q in model.named_parameters() if name in selected)

    class PerExampleLoss(nn.Module):  # Captum reads .reduction
        reduction = "none"

        def forward(self, out, y):
            return loss(out, y)

    ckpt = os.path.join(work_dir, "captum_checkpoint.pt")
    torch.save(model.state_dict(), ckpt)  # Captum needs a checkpoint file, even in memory
    bs = int(s.pop("batch_size", n))
    loader = DataLoader(TensorDataset(X, Y), batch_size=bs, shuffle=False)
    layers = _captum_layers(model, selected)
    kw = dict(checkpoint=ckpt, layers=layers, loss_fn=PerExampleLoss(), batch_size=bs)
    proj = s.pop("projection_dim", "p")
    proj = n_sel if proj == "p" else int(proj)
    hreg = n * reg  # Captum's Hessian is a SUM over the training examples
    if p["method"] == "NaiveInfluenceFunction":
        cls = NaiveInfluenceFunction
    elif p["method"] == "ArnoldiInfluenceFunction":  # not exported by captum.influence
        from captum.influence._core.arnoldi_influence_function import ArnoldiInfluenceFunction

        cls = ArnoldiInfluenceFunction
        proj = min(proj, n_sel)
    else:
        raise ValueError(f"unknown Captum method {p['method']!r}")
    res["settings_used"] = dict(
        p["settings"], projection_dim=proj, hessian_reg=hreg, batch_size=bs, layers=layers, **s
    )
    t0 = time.perf_counter()
    inf = cls(model, loader, projection_dim=proj, hessian_reg=hreg, **kw, **s)
    t1 = time.perf_counter()
    scores = inf.influence((Xt, Yt))  # (m, n)
    t2 = time.perf_counter()
    res["fit_s"], res["score_s"] = t1 - t0, t2 - t1
    res["normalisation"] = (
        f"up_loss = -n * scores.T with n = {n}; hessian_reg = n*(l2+damping) "
        f"= {hreg:g}; projection_dim = {proj} (p = {n_sel})"
    )
    return -float(n) * scores.detach().to(torch.float64).T


def _run_pydvl(p: dict, model, loss, X, Y, Xt, Yt, selected, work_dir: str, res: dict):
    import torch
    from pydvl.influence.torch import ArnoldiInfluence, CgInfluence, DirectInfluence, LissaInfluence
    from torch.utils.data import DataLoader, TensorDataset

    s = dict(p["settings"])
    n = X.shape[0]
    reg = float(p["l2"]) + float(p["damping"])
    bs = int(s.pop("batch_size", n))
    loader = DataLoader(TensorDataset(X, Y), batch_size=bs, shuffle=False)

    def mean_loss(out, y):  # pyDVL: a scalar (mean) loss; on one example it is the example's loss
        return loss(out, y).mean()

    t0 = time.perf_counter()
    extra = {}
    if p["method"] == "DirectInfluence":
        inf = DirectInfluence(model, mean_loss, regularization=reg, **s)
    elif p["method"] == "CgInfluence":
        inf = CgInfluence(model, mean_loss, regularization=reg, **s)
    elif p["method"] == "LissaInfluence":
        if s.get("scale") == "lambda_max":
            it = int(s.pop("power_iters", 30))
            margin = float(s.pop("scale_margin", 1.5))
            lam = _power_lambda_max(model, loss, X, Y, reg, it, int(p.get("seed", 0)))
            s["scale"] = margin * lam
            extra = {
                "lambda_max_estimate": lam,
                "power_iters": it,
                "scale_margin": margin,
                "scale_estimate_s": time.perf_counter() - t0,
            }
        inf = LissaInfluence(model, mean_loss, regularization=reg, **s)
    elif p["method"] == "ArnoldiInfluence":  # rank-r Arnoldi/Lanczos of H + reg on the top eigenvectors
        inf = ArnoldiInfluence(model, mean_loss, regularization=reg, **s)
    else:
        raise ValueError(f"unknown pyDVL method {p['method']!r}")
    res["settings_used"] = dict(s, regularization=reg, batch_size=bs, **extra)
    inf = inf.fit(loader)
    t1 = time.perf_counter()
    scores = inf.influences(Xt, Yt, X, Y)  # (m, n), mode "up"
    t2 = time.perf_counter()
    res["fit_s"], res["score_s"] = t1 - t0, t2 - t1
    res["normalisation"] = f"up_loss = -scores.T; regularization = l2+damping = {reg:g}"
    return -scores.detach().to(torch.float64).T


def _fisher_sample_loss(spec: dict):
    """``f(out, generator) -> (B,)``: the per-example loss at targets SAMPLED from the model's predictive
    distribution, scaled so that the sampled gradients' second moment is the loss's Gauss-Newton matrix,
    E[∇f ∇fᵀ] = Jᵀ ∇²_out L J (kronfluence's true Fisher, ``sample=True``); None where no such
    distribution is defined (the smooth hinge).

    - cross-entropy: y ~ softmax(out); ∇_out CE = p − e_y has covariance diag(p) − ppᵀ = ∇²_out CE.
    - token cross-entropy, L = (1/T) Σ_t CE_t: y_t ~ softmax(out_t) independently, f = (1/√T) Σ_t CE_t
      (then E[∇f∇fᵀ] = (1/T) Σ_t J_tᵀ(diag p_t − p_t p_tᵀ)J_t = ∇²L's Gauss-Newton; the unscaled mean
      would give 1/T of it).
    - logistic: y ~ Bernoulli(σ(out)); variance σ(1 − σ) = ∇²_out.
    - squared error Σ_k (out_k − y_k)² (mean over K: divided by K): ỹ = out + ε, ε ~ N(0, s²) with
      s² = 1/2 (K/2 for the mean), so that E[∇∇ᵀ] = 2I (2I/K) = ∇²_out.
    """
    import torch
    import torch.nn.functional as F

    name = spec["name"]
    if name == "cross_entropy":

        def f(out, gen):
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(out.detach(), dim=-1), 1, generator=gen).reshape(-1)
            return F.cross_entropy(out, y, reduction="none")
    elif name == "token_cross_entropy":

        def f(out, gen):
            B, T, V = out.shape
            with torch.no_grad():
                pr = torch.softmax(out.detach().reshape(B * T, V), dim=-1)
                y = torch.multinomial(pr, 1, generator=gen).reshape(B, T)
            return F.cross_entropy(out.transpose(1, 2), y, reduction="none").sum(dim=1) / math.sqrt(T)
    elif name == "logistic":

        def f(out, gen):
            s = out.reshape(-1)
            with torch.no_grad():
                y = torch.bernoulli(torch.sigmoid(s.detach()), generator=gen)
            return F.binary_cross_entropy_with_logits(s, y, reduction="none")
    elif name in ("mse_mean", "mse_sum"):

        def f(out, gen):
            o = out.reshape(out.shape[0], -1)
            K = o.shape[1]
            var = K / 2.0 if name == "mse_mean" else 0.5
            with torch.no_grad():
                y = o.detach() + math.sqrt(var) * torch.randn(o.shape, generator=gen, dtype=o.dtype)
            d = o - y
            return (d * d).sum(dim=1) / (K if name == "mse_mean" else 1)
    else:
        return None
    return f


def _kronfluence_modules(model, selected):
    """The module names kronfluence tracks: every nn.Linear / nn.Conv2d whose parameters are all selected. Raises ValueError for a partly selected module, or a selected parameter
    outside such modules (kronfluence would silently leave it out)."""
    from torch import nn

    sel = set(selected)
    tracked, covered = [], set()
    for mname, mod in model.named_modules():
        own = [f"{mname}.{n}" if mname else n for n, _ in mod.named_parameters(recurse=False)]
        if not own or not any(o in sel for o in own):
            continue
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if not all(o in sel for o in own):
            raise ValueError(f"kronfluence tracks whole modules: module {mname!r} is only partly selected")
        tracked.append(mname)
        covered.update(own)
    missing = [n for n in selected if n not in covered]
    if missing:
        raise ValueError(
            "kronfluence covers the parameters of nn.Linear and nn.Conv2d modules only; selected parameters "
            f"outside them: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} (select fewer "
            "parameters, e.g. TorchInfluence's params=, to compare like with like)"
        )
    return tracked


def _kronfluence_model(model, selected):
    """(model, selected names, tracked module names) as kronfluence needs them: a bare nn.Linear /
    nn.Conv2d model wrapped in nn.Sequential (kronfluence replaces modules through their parent, so it
    cannot wrap the root: RecursionError), its parameter names prefixed with "0."."""
    from torch import nn

    if type(model) in (nn.Linear, nn.Conv2d):
        model = nn.Sequential(model)
        selected = [f"0.{name}" for name in selected]
    return model, selected, _kronfluence_modules(model, selected)


def _run_kronfluence(p: dict, model, loss, X, Y, Xt, Yt, selected, work_dir: str, res: dict):
    import torch
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task
    from torch.utils.data import TensorDataset

    s = dict(p["settings"])
    strategy = p["method"]
    if strategy not in ("ekfac", "kfac"):
        raise ValueError(f"unknown kronfluence strategy {strategy!r} (known: 'ekfac', 'kfac')")
    n, m = int(X.shape[0]), int(Xt.shape[0])
    reg = float(p["l2"]) + float(p["damping"])
    pdt = next(q.dtype for q in model.parameters())
    dtypes = {"model": pdt, "float32": torch.float32, "float64": torch.float64}
    dkey = str(s.pop("dtype", "model"))
    if dkey not in dtypes:
        raise ValueError(f"settings dtype must be 'model', 'float32' or 'float64', got {dkey!r}")
    dt = dtypes[dkey]
    empirical = bool(s.pop("use_empirical_fisher", False))
    model, selected, tracked = _kronfluence_model(model, selected)
    p_sel = sum(q.numel() for name, q in model.named_parameters() if name in set(selected))
    bs = s.pop("batch_size", "auto")  # per-sample gradients of a batch: ~256 MB at most
    bs = max(1, min(n, 512, (1 << 28) // (8 * p_sel))) if bs == "auto" else int(bs)
    sample_loss = None if empirical else _fisher_sample_loss(p["loss"])
    if sample_loss is None and not empirical:
        raise ValueError(
            f"kronfluence's true Fisher samples targets from the model's predictive distribution, which the "
            f"loss {p['loss']['name']!r} does not define; pass settings use_empirical_fisher=True"
        )
    gen = torch.Generator().manual_seed(int(p.get("seed", 0)))

    class _Task(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            out = model(x)
            if sample:
                assert sample_loss is not None  # refused above unless the empirical Fisher is used
                return sample_loss(out, gen).sum()
            return loss(out, y).sum()  # SUM: kronfluence's hooks then see per-example gradients

        def compute_measurement(self, batch, model):
            x, y = batch
            return loss(model(x), y).sum()  # the test loss: g_t = ∇L(z_t)

        def get_influence_tracked_modules(self):
            return tracked

        def get_attention_mask(self, batch):
            return None

    train, query = TensorDataset(X, Y), TensorDataset(Xt, Yt)
    factor_args = FactorArguments(
        strategy=strategy,
        use_empirical_fisher=empirical,
        covariance_max_examples=None,
        lambda_max_examples=None,
        activation_covariance_dtype=dt,
        gradient_covariance_dtype=dt,
        per_sample_gradient_dtype=dt,
        lambda_dtype=dt,
        eigendecomposition_dtype=torch.float64,
    )
    score_args = ScoreArguments(
        damping_factor=reg,
        per_sample_gradient_dtype=dt,
        precondition_dtype=dt,
        score_dtype=dt,
        query_gradient_svd_dtype=torch.float64 if dt == torch.float64 else torch.float32,
    )
    if s:
        raise ValueError(f"unknown kronfluence settings {sorted(s)}")
    res["settings_used"] = dict(
        p["settings"],
        strategy=strategy,
        damping_factor=reg,
        batch_size=bs,
        dtype=str(dt).replace("torch.", ""),
        use_empirical_fisher=empirical,
        tracked_modules=tracked,
    )
    t0 = time.perf_counter()
    task = _Task()
    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name="peer",
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=os.path.join(work_dir, "kronfluence"),
        log_level=logging.WARNING,
    )
    analyzer.fit_all_factors(
        factors_name=strategy,
        dataset=train,
        per_device_batch_size=bs,
        factor_args=factor_args,
        overwrite_output_dir=True,
    )
    t1 = time.perf_counter()
    analyzer.compute_pairwise_scores(
        scores_name="scores",
        factors_name=strategy,
        query_dataset=query,
        train_dataset=train,
        per_device_query_batch_size=m,
        per_device_train_batch_size=bs,
        score_args=score_args,
        overwrite_output_dir=True,
    )
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]  # (m, n)
    t2 = time.perf_counter()
    res["fit_s"], res["score_s"] = t1 - t0, t2 - t1
    res["normalisation"] = (
        f"up_loss = -scores.T (no factor of n: kronfluence's Fisher is a mean over examples and its "
        f"gradients are per-example, from sum-reduced losses); damping_factor = l2+damping = {reg:g}; "
        f"{'empirical' if empirical else 'sampled true'} Fisher"
    )
    return -scores.detach().to(torch.float64).T


def run(payload_dir: str, out_dir: str, res: dict) -> None:
    warns: list = res.setdefault("warnings", [])
    with open(os.path.join(payload_dir, "payload.json")) as f:
        p = json.load(f)
    res.update(
        library=p.get("peer"), method=p.get("method"), label=p.get("label"), settings=p.get("settings", {})
    )
    peer = p["peer"]
    if peer not in PEER_PACKAGES:
        raise ValueError(f"unknown peer {peer!r}")

    data_dir = os.path.join(payload_dir, p.get("data_dir", "."))
    for fname in ("data.npz", "model.pt"):  # fail before the heavy imports
        if not os.path.exists(os.path.join(data_dir, fname)):
            raise FileNotFoundError(f"payload has no {fname} in {data_dir}")

    import numpy as np
    import torch

    if p.get("num_threads"):
        torch.set_num_threads(int(p["num_threads"]))
    torch.manual_seed(int(p.get("seed", 0)))
    if peer == "captum":
        import captum  # noqa: F401  (import time belongs to load_s)
    elif peer == "pydvl":
        import pydvl.influence.torch  # noqa: F401
    else:
        import kronfluence.analyzer  # noqa: F401
    res["versions"] = {
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        peer: _version(PEER_PACKAGES[peer][0]),
    }

    dtype = getattr(torch, p.get("dtype", "float64"))
    with np.load(os.path.join(data_dir, "data.npz"), allow_pickle=False) as d:
        X, Y, Xt, Yt = (
            torch.from_numpy(np.ascontiguousarray(d[k])) for k in ("X_train", "y_train", "X_test", "y_test")
        )
    if X.is_floating_point():  # token ids stay integers
        X, Xt = X.to(dtype), Xt.to(dtype)
    if Y.is_floating_point():
        Y, Yt = Y.to(dtype), Yt.to(dtype)
    model = _load_model(data_dir, p["model"], dtype)
    loss = _per_example_loss(p["loss"])
    selected = _select_params(model, p.get("params"))
    if "pyinfluence" in sys.modules:  # the worker must stay independent of the code under test
        raise RuntimeError("the peer worker imported pyinfluence (it must not)")
    if p.get("warm_up", True):
        _warm_up(dtype)
    res["load_s"] = time.perf_counter() - _T_START
    res["baseline_mem_mb"] = _rss_mb()

    runner = {"captum": _run_captum, "pydvl": _run_pydvl, "kronfluence": _run_kronfluence}[peer]
    logging.captureWarnings(True)
    handler = _LogCapture(warns)
    logging.getLogger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            U = runner(p, model, loss, X, Y, Xt, Yt, selected, out_dir, res)
        for w in caught[:50]:
            warns.append(f"{w.category.__name__}: {str(w.message)[:500]}")
    finally:
        logging.getLogger().removeHandler(handler)
    res["time_s"] = res["fit_s"] + res["score_s"]
    res["peak_mem_mb"] = _mem_mb()

    U = U.detach().cpu().numpy().astype(np.float64)
    n, m = X.shape[0], Xt.shape[0]
    if U.shape != (n, m):
        raise RuntimeError(f"peer returned shape {U.shape}, expected (n_train, m_test) = {(n, m)}")
    finite = np.isfinite(U)
    res["n_nan"], res["n_inf"] = int(np.isnan(U).sum()), int(np.isinf(U).sum())
    res["max_abs"] = float(np.abs(U[finite]).max()) if finite.any() else None
    if not finite.all():
        res["error"] = f"non-finite scores: {res['n_nan']} NaN and {res['n_inf']} inf of {U.size}"
        return
    np.savez(os.path.join(out_dir, "result.npz"), up_loss=U)


def main(argv: list) -> int:
    if len(argv) >= 2 and argv[1] == "--probe":
        print(json.dumps(probe()))
        return 0
    if len(argv) < 2:
        print(__doc__)
        return 2
    payload_dir = argv[1]
    out_dir = argv[2] if len(argv) > 2 else payload_dir
    res: dict = {
        "error": None,
        "traceback": None,
        "time_s": None,
        "peak_mem_mb": None,
        "python": sys.executable,
    }
    try:
        os.makedirs(out_dir, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, "result.npz"))
        run(payload_dir, out_dir, res)
    except BaseException as e:  # every failure becomes a result, never a crash without output
        msg = str(e).strip().splitlines()
        res["error"] = f"{type(e).__name__}: {msg[0][:800] if msg else ''}"
        res["traceback"] = traceback.format_exc()[-6000:]
    finally:
        res["total_s"] = time.perf_counter() - _T_START
        if res.get("peak_mem_mb") is None:
            res["peak_mem_mb"] = _mem_mb()
        try:
            _write_json(os.path.join(out_dir, "result.json"), res)
        except Exception:  # last resort: stdout, which the parent also reads
            print("RESULT_JSON " + json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
