"""The rungs of the scale-ladder study (:mod:`pyinfluence.bench.studies.scale_ladder`): trained models with
their training sets and test points, from 2·10³ to a few 10⁶ parameters and from 10³ to 10⁵ training
examples, plus an independent torch.func reference of the influence on each.

Every rung is a :class:`Rung`: a trained ``nn.Module`` in eval mode (float64), its per-example loss, the
training set, the test points, ``l2`` (the training objective's (l2/2)‖θ‖² over the selected parameters)
and the damping λ; the influence compared is pyinfluence's ``up_loss`` (shape (n_train, m_test))::

    up_loss[i, j] = −∇θL(z_test_j)ᵀ (H + λI)⁻¹ ∇θL(z_i),   H = ∇²[(1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²].

Rungs (``make_rung(name, quick=False, seed=0)``; :data:`RUNGS` lists them in ladder order):

- ``"mlp-2k"``, ``"mlp-10k"``, ``"mlp-85k"``, ``"mlp-1m"``: tanh MLPs 64-32-10 (p = 2410), 64-128-10
  (p = 9610), 64-256-256-10 (p = 85 002) and 64-1024-1024-10 (p = 1 126 410) on scikit-learn's digits
  (pixels / 16, 80/20 stratified split: 1437 training images), cross-entropy, l2 = 1e-3, damping 1e-2,
  m = 10 test points, trained by full-batch L-BFGS in float64 (:func:`pyinfluence.torch.training.lbfgs_fit`).
  ``mlp-85k`` is the setting of the issue that started the study.
- ``"cnn-9k"``: :class:`pyinfluence.torch.training.SmallCNN` (conv 1→4, conv 4→8, fc 128→64, fc 64→10;
  p = 9242) on the same digits as 8×8 images, the ``digits-cnn`` task's model and trainer (L-BFGS, 1000
  iterations), l2 = 1e-3, damping 1e-2, m = 10.
- ``"gpt-3m"``: :class:`TinyGPT`, a GPT-style character language model (token + position embeddings, 3 pre-LN
  blocks of causal self-attention — query, key, value and output projections, each an ``nn.Linear`` — and a
  GELU MLP of two ``nn.Linear``, a final LayerNorm and an ``nn.Linear`` head; d = 256, 4 heads, context 32;
  2.4·10⁶ parameters) trained with Adam for 250 steps of 32 sequences (float32, ~1–2 min on one CPU core) on
  sentences of a synthetic English-like grammar generated here (:func:`grammar_text`). Per-example loss:
  the mean next-token cross-entropy of a sequence (:func:`sequence_cross_entropy`); batches are dicts
  ``{"input_ids", "labels"}`` (:meth:`Rung.train_data`). θ = the weights and biases of the ``nn.Linear``
  layers (2.37·10⁶; embeddings and LayerNorms held fixed), with l2 = 1e-3 on them (in training too). A
  briefly trained network sits far from a minimum and its Hessian has negative eigenvalues that a small
  damping would not cover: the damping is max(0.1, 2 × |the smallest Ritz value of a 20-step Lanczos
  process on H|) (:func:`smallest_curvature`; recorded in ``info``). n = 192 training sequences, m = 10
  held-out ones.
- ``"synthetic-100k"``: a 16-32-4 tanh MLP (p = 676) on 100 000 Gaussian feature vectors labelled by a
  random teacher network (4 classes), cross-entropy, l2 = 1e-3, damping 1e-2, m = 10, L-BFGS in float64.

``quick=True`` shrinks every rung (narrower networks, 120–300 training examples, 3 test points, a
smaller GPT trained for a few steps) for smoke tests; the structure (layer types, losses, batch forms) is
the same.

Rungs are saved without pickling (:meth:`Rung.save`: a JSON description of the architecture, the weights
and data as ``.npz`` arrays) so that a fresh process rebuilds exactly the same model
(:func:`load_rung`) — the study measures every method's time and peak memory in a process of its own.

:func:`reference_up_loss` is the study's ground truth, written with ``torch.func`` only (no pyinfluence
solver or Hessian operator): the exact solve (dense H from Hessian-vector products, Cholesky) where
p ≤ 10⁴, else conjugate gradients to a relative residual of 1e-9 on the same H + λI.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyinfluence.torch.training import SmallCNN, cross_entropy, lbfgs_fit

__all__ = [
    "EXACT_MAX_PARAMS",
    "RUNGS",
    "Rung",
    "TinyGPT",
    "grammar_text",
    "load_rung",
    "make_rung",
    "mlp",
    "reference_up_loss",
    "sequence_cross_entropy",
    "train_gpt",
]

L2 = 1e-3
DAMPING = 1e-2
GPT_DAMPING = 1e-1
#: The exact reference (and pyinfluence's Exact solver in the study) only up to this many parameters.
EXACT_MAX_PARAMS = 10_000

#: name -> one-line description, in ladder order.
RUNGS: dict[str, str] = {
    "mlp-2k": "digits MLP 64-32-10 tanh (p = 2410)",
    "mlp-10k": "digits MLP 64-128-10 tanh (p = 9610)",
    "cnn-9k": "digits SmallCNN, 2 conv + 2 fc (p = 9242)",
    "synthetic-100k": "16-32-4 tanh MLP on 100 000 synthetic examples (p = 676)",
    "mlp-85k": "digits MLP 64-256-256-10 tanh (p = 85 002), the issue's setting",
    "mlp-1m": "digits MLP 64-1024-1024-10 tanh (p = 1 126 410)",
    "gpt-3m": "GPT-style character LM, 3 blocks, d = 256 (2.4M parameters, 2.37M in nn.Linear)",
}


# ==============================================================================================
# models
# ==============================================================================================
def mlp(sizes: Sequence[int], activation: str = "tanh") -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]), act, …, Linear(sizes[-2], sizes[-1])`` (no activation after the last)."""
    acts: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}
    if activation not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {activation!r}")
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"sizes must hold at least two positive layer widths, got {list(sizes)}")
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        layers.append(nn.Linear(int(sizes[k]), int(sizes[k + 1])))
        if k < len(sizes) - 2:
            layers.append(acts[activation]())
    return nn.Sequential(*layers)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention written out from four ``nn.Linear`` projections.

    x (B, T, d) → q, k, v = x W_qᵀ + b_q, … split into h heads of d/h; per head
    softmax(q kᵀ / √(d/h) + causal mask) v; heads concatenated; output projection.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        B, T, d = x.size(0), x.size(1), x.size(2)  # separate calls: torch.fx can trace them
        h = self.n_heads
        q = self.q(x).reshape(B, T, h, d // h).transpose(1, 2)  # (B, h, T, d/h)
        k = self.k(x).reshape(B, T, h, d // h).transpose(1, 2)
        v = self.v(x).reshape(B, T, h, d // h).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // h)
        causal = torch.ones_like(att, dtype=torch.bool).tril()  # key t' ≤ query t (ones_like: fx-traceable)
        att = att.masked_fill(~causal, float("-inf"))
        y = torch.matmul(torch.softmax(att, dim=-1), v)  # (B, h, T, d/h)
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-style decoder: ``input_ids`` (B, T) int64 → next-token logits (B, T, vocab).

    Token and learned position embeddings, ``n_layers`` pre-LayerNorm blocks (causal self-attention,
    :class:`CausalSelfAttention`, then a 4×-wide GELU MLP, each with a residual connection), a final
    LayerNorm and a linear head (not tied to the embedding). Every projection is an ``nn.Linear``, so
    Kronecker-factored curvature (pyinfluence's KFAC/EKFAC, kronfluence) covers all of them; called as
    ``model(input_ids)`` or ``model(input_ids=...)`` (dict batches). T ≤ ``block``.
    """

    def __init__(self, vocab: int, block: int = 64, d_model: int = 256, n_layers: int = 3, n_heads: int = 4):
        super().__init__()
        self.config = {
            "vocab": int(vocab),
            "block": int(block),
            "d_model": int(d_model),
            "n_layers": int(n_layers),
            "n_heads": int(n_heads),
        }
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block, d_model)
        self.blocks = nn.ModuleList([_Block(d_model, n_heads) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        with torch.no_grad():  # GPT-2's initialisation scale
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    m.weight.normal_(0.0, 0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.zero_()

    def forward(self, input_ids: Tensor) -> Tensor:
        T = input_ids.size(1)
        pos = torch.arange(T, device=input_ids.device)
        x = self.tok(input_ids) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def sequence_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sequence loss (B,): the mean over positions of the next-token cross-entropy.

    ``logits`` (B, T, V), ``labels`` (B, T) int64 (the input shifted by one)."""
    return F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1)


# the peer worker's name for this loss (pyinfluence.bench.peers reads it)
sequence_cross_entropy.peer_loss = {"name": "token_cross_entropy"}  # type: ignore[attr-defined]


# ==============================================================================================
# text: a synthetic grammar
# ==============================================================================================
_DET = ["the", "a", "every", "some", "no"]
_ADJ = ["small", "red", "quiet", "old", "happy", "green", "tall", "bright"]
_NOUN_S = ["cat", "dog", "bird", "child", "farmer", "robot", "teacher", "horse"]
_NOUN_P = ["cats", "dogs", "birds", "children", "farmers", "robots", "teachers", "horses"]
_VERB_S = ["sees", "likes", "follows", "feeds", "finds", "helps"]
_VERB_P = ["see", "like", "follow", "feed", "find", "help"]
_PLACE = ["in the garden", "on the hill", "near the river", "at home", "under the tree"]


def grammar_text(n_sentences: int, seed: int = 0) -> str:
    """English-like sentences from a small grammar with number agreement, deterministic in ``seed``.

    S → NP_n V_n NP_m [PLACE] "." with NP_n → DET [ADJ] NOUN_n (singular: "the cat sees …", plural:
    "some dogs follow …", "every"/"a" only singular, "some"/"no" either), so a model must learn words,
    agreement and sentence structure. Lower-case letters, space and "." only.
    """
    if int(n_sentences) < 1:
        raise ValueError(f"n_sentences must be >= 1, got {n_sentences!r}")
    rng = np.random.default_rng(seed)

    def np_(plural: bool) -> str:
        det = rng.choice(["some", "no", "the"]) if plural else rng.choice(_DET)
        adj = f"{rng.choice(_ADJ)} " if rng.random() < 0.4 else ""
        noun = rng.choice(_NOUN_P if plural else _NOUN_S)
        return f"{det} {adj}{noun}"

    out = []
    for _ in range(int(n_sentences)):
        pl = bool(rng.random() < 0.5)
        verb = rng.choice(_VERB_P if pl else _VERB_S)
        place = f" {rng.choice(_PLACE)}" if rng.random() < 0.3 else ""
        out.append(f"{np_(pl)} {verb} {np_(bool(rng.random() < 0.5))}{place}.")
    return " ".join(out)


def _encode(text: str) -> tuple[list[str], np.ndarray]:
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    return vocab, np.fromiter((index[c] for c in text), dtype=np.int64, count=len(text))


def _windows(ids: np.ndarray, n: int, block: int, start: int) -> tuple[Tensor, Tensor]:
    """``n`` non-overlapping windows of block + 1 tokens from ``start``: (inputs, next-token labels)."""
    need = start + n * (block + 1)
    if need > ids.size:
        raise ValueError(f"the text is too short: {ids.size} tokens, {need} needed")
    w = ids[start:need].reshape(n, block + 1)
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())


def train_gpt(
    model: TinyGPT,
    X: Tensor,
    Y: Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    l2: float = L2,
    seed: int = 0,
    params: Optional[Sequence[str]] = None,
) -> list[float]:
    """Adam on mean :func:`sequence_cross_entropy` + (l2/2)‖θ_params‖² (θ_params = ``params``, default all),
    minibatches of ``batch_size`` sequences drawn with replacement, a linear warm-up over the first 10 % of
    the steps and a cosine decay; in the model's dtype, in place. Returns the minibatch objective per step."""
    gen = torch.Generator().manual_seed(seed)
    named = dict(model.named_parameters())
    reg = [named[n] for n in (params if params is not None else named)]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda k: min(1.0, (k + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / max(steps, 1))),
    )
    model.train()
    hist = []
    for _ in range(int(steps)):
        idx = torch.randint(0, X.shape[0], (batch_size,), generator=gen)
        loss = sequence_cross_entropy(model(X[idx]), Y[idx]).mean()
        obj = loss + 0.5 * l2 * sum((p * p).sum() for p in reg)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
        sched.step()
        hist.append(float(obj.detach()))
    model.eval()
    return hist


# ==============================================================================================
# a rung
# ==============================================================================================
@dataclass(eq=False)
class Rung:
    """One trained model with its training set, test points and influence settings.

    - ``model``: the trained ``nn.Module`` in eval mode, float64; ``arch``: the JSON description it is
      rebuilt from (:func:`build_model`).
    - ``loss_fn(outputs, targets)``: per-example loss (batch,).
    - ``X_train`` (n, …), ``y_train`` (n, …), ``X_test`` (m, …), ``y_test`` (m, …): tensors (inputs float64,
      or int64 token ids for the GPT; class-index targets int64).
    - ``l2``, ``damping``: the objective's (l2/2)‖θ‖² coefficient and λ (every solve uses H + λI).
    - ``params``: the parameter names θ covers (None = all), in ``model.named_parameters()`` order.
    - ``dict_batches``: the model takes ``input_ids=`` and its batches are dicts
      ``{"input_ids", "labels"}`` (see :meth:`train_data`).
    - ``info``: sizes and training diagnostics (n_train, m_test, n_params, train_time_s, …).
    """

    name: str
    description: str
    arch: dict
    model: nn.Module
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    l2: float
    damping: float
    params: Optional[list[str]] = None
    dict_batches: bool = False
    info: dict = field(default_factory=dict)

    @property
    def n_params(self) -> int:
        """p: the number of entries of θ (the selected parameters)."""
        sel = self.selected()
        return int(sum(p.numel() for n, p in self.model.named_parameters() if n in sel))

    def selected(self) -> list[str]:
        """The names of θ's parameters, in ``named_parameters()`` order."""
        names = [n for n, _ in self.model.named_parameters()]
        return names if self.params is None else [n for n in names if n in set(self.params)]

    def train_data(self) -> Any:
        """TorchInfluence's ``train_data``: ``(X, y)``, or for the GPT one dict batch
        ``{"input_ids": X, "labels": y}`` (held in memory; TorchInfluence calls ``model(input_ids=…)``)."""
        if self.dict_batches:
            return {"input_ids": self.X_train, "labels": self.y_train}
        return (self.X_train, self.y_train)

    def test_data(self) -> Any:
        """The test points in the form of :meth:`train_data` (pass as ``X_test`` alone)."""
        if self.dict_batches:
            return {"input_ids": self.X_test, "labels": self.y_test}
        return (self.X_test, self.y_test)

    def as_task(self) -> Any:
        """A :class:`pyinfluence.bench.tasks.Task` over the same model and data, for
        :func:`pyinfluence.bench.peers.run_peers` (which takes tensor inputs: token ids for the GPT)."""
        from pyinfluence.bench.tasks import Task

        return Task(
            name=self.name,
            kind="deep",
            description=self.description,
            model=self.model,
            loss_fn=self.loss_fn,
            X_train=self.X_train,
            y_train=self.y_train,
            X_test=self.X_test,
            y_test=self.y_test,
            l2=self.l2,
            damping=self.damping,
            params=self.params,
            info=dict(self.info),
        )

    # -- saving without pickle -----------------------------------------------------------------
    def save(self, folder: str) -> None:
        """``rung.json`` (name, architecture, settings, info) + ``weights.npz`` + ``data.npz`` in ``folder``."""
        os.makedirs(folder, exist_ok=True)
        meta = {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "l2": self.l2,
            "damping": self.damping,
            "params": self.params,
            "dict_batches": self.dict_batches,
            "info": self.info,
        }
        with open(os.path.join(folder, "rung.json"), "w") as f:
            json.dump(meta, f, indent=1)
        state = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}
        np.savez(os.path.join(folder, "weights.npz"), **state)
        np.savez(
            os.path.join(folder, "data.npz"),
            X_train=self.X_train.numpy(),
            y_train=self.y_train.numpy(),
            X_test=self.X_test.numpy(),
            y_test=self.y_test.numpy(),
        )


def build_model(arch: dict) -> nn.Module:
    """An untrained float64 model from its description: ``{"kind": "mlp", "sizes": [...], "activation":
    ...}``, ``{"kind": "small_cnn"}`` or ``{"kind": "gpt", "vocab", "block", "d_model", "n_layers",
    "n_heads"}``."""
    kind = arch.get("kind")
    model: nn.Module
    if kind == "mlp":
        model = mlp(arch["sizes"], arch.get("activation", "tanh"))
    elif kind == "small_cnn":
        model = SmallCNN()
    elif kind == "gpt":
        model = TinyGPT(**{k: int(arch[k]) for k in ("vocab", "block", "d_model", "n_layers", "n_heads")})
    else:
        raise ValueError(f"unknown architecture kind {kind!r} (known: 'mlp', 'small_cnn', 'gpt')")
    return model.double()


def _loss_for(arch: dict) -> Callable[[Tensor, Tensor], Tensor]:
    return sequence_cross_entropy if arch.get("kind") == "gpt" else cross_entropy


def load_rung(folder: str) -> Rung:
    """The rung :meth:`Rung.save` wrote (no pickle: JSON and ``.npz`` read with ``allow_pickle=False``)."""
    with open(os.path.join(folder, "rung.json")) as f:
        meta = json.load(f)
    model = build_model(meta["arch"])
    with np.load(os.path.join(folder, "weights.npz"), allow_pickle=False) as w:
        state = {k: torch.from_numpy(np.array(w[k])) for k in w.files}
    model.load_state_dict(state, strict=True)
    model.eval()
    with np.load(os.path.join(folder, "data.npz"), allow_pickle=False) as d:
        X, y, Xt, yt = (torch.from_numpy(np.array(d[k])) for k in ("X_train", "y_train", "X_test", "y_test"))
    return Rung(
        name=meta["name"],
        description=meta["description"],
        arch=meta["arch"],
        model=model,
        loss_fn=_loss_for(meta["arch"]),
        X_train=X,
        y_train=y,
        X_test=Xt,
        y_test=yt,
        l2=float(meta["l2"]),
        damping=float(meta["damping"]),
        params=meta["params"],
        dict_batches=bool(meta["dict_batches"]),
        info=dict(meta["info"]),
    )


# ==============================================================================================
# the rungs
# ==============================================================================================
def _digits(m: int, n_train: Optional[int], seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, str]:
    from pyinfluence.applications.datasets import load_digits_split

    s = load_digits_split(scale="unit", task="multiclass", seed=seed, n_train=n_train)
    return (
        torch.from_numpy(np.ascontiguousarray(s.X_train, dtype=np.float64)),
        torch.from_numpy(s.y_train.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(s.X_test[:m], dtype=np.float64)),
        torch.from_numpy(s.y_test[:m].astype(np.int64)),
        s.description,
    )


def _accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(X).argmax(-1) == y).double().mean())


def _fitted(
    name: str,
    arch: dict,
    X: Tensor,
    y: Tensor,
    Xt: Tensor,
    yt: Tensor,
    iters: int,
    seed: int,
    data_desc: str,
) -> Rung:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch)
    t0 = time.perf_counter()
    gn = lbfgs_fit(model, X, y, iters, l2=L2)
    train_s = time.perf_counter() - t0
    model.eval()
    p = int(sum(q.numel() for q in model.parameters()))
    info = {
        "n_train": int(X.shape[0]),
        "m_test": int(Xt.shape[0]),
        "n_params": p,
        "train_time_s": train_s,
        "trainer": f"full-batch L-BFGS (strong Wolfe), at most {iters} iterations, float64",
        "grad_norm": gn,
        "train_accuracy": _accuracy(model, X, y),
        "test_accuracy": _accuracy(model, Xt, yt),
        "data": data_desc,
        "loss": "cross-entropy",
    }
    return Rung(name, RUNGS[name], arch, model, cross_entropy, X, y, Xt, yt, L2, DAMPING, None, False, info)


def _m(quick: bool, m_test: Optional[int]) -> int:
    """The number of test points of a rung: ``m_test`` if given, else 3 (quick) or 10."""
    if m_test is None:
        return 3 if quick else 10
    if isinstance(m_test, bool) or not isinstance(m_test, int) or m_test < 1:
        raise ValueError(f"m_test must be a positive int or None, got {m_test!r}")
    return m_test


def _mlp_rung(
    name: str, hidden: Sequence[int], quick_hidden: Sequence[int], quick: bool, seed: int, m: int
) -> Rung:
    X, y, Xt, yt, desc = _digits(m, 150 if quick else None, seed)
    sizes = [64, *(quick_hidden if quick else hidden), 10]
    arch = {"kind": "mlp", "sizes": sizes, "activation": "tanh"}
    return _fitted(name, arch, X, y, Xt, yt, 60 if quick else 500, seed, desc)


def _cnn_rung(quick: bool, seed: int, m: int) -> Rung:
    X, y, Xt, yt, desc = _digits(m, 120 if quick else None, seed)
    X, Xt = X.reshape(-1, 1, 8, 8), Xt.reshape(-1, 1, 8, 8)
    return _fitted("cnn-9k", {"kind": "small_cnn"}, X, y, Xt, yt, 40 if quick else 1000, seed, desc)


def _synthetic_rung(quick: bool, seed: int, m: int) -> Rung:
    n, d, K = (300, 16, 4) if quick else (100_000, 16, 4)
    rng = np.random.default_rng(seed)
    Xall = rng.standard_normal((n + m, d))
    W1 = rng.standard_normal((d, 8)) / math.sqrt(d)
    W2 = rng.standard_normal((8, K)) * 2.0
    logits = np.tanh(Xall @ W1 * 2.0) @ W2
    P = np.exp(logits - logits.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    yall = np.array([rng.choice(K, p=row) for row in P], dtype=np.int64)
    X, y = torch.from_numpy(Xall[:n]), torch.from_numpy(yall[:n])
    Xt, yt = torch.from_numpy(Xall[n:]), torch.from_numpy(yall[n:])
    desc = (
        f"X ~ N(0, 1) of shape ({n} + {m}) x {d} (numpy default_rng({seed})), y ~ softmax(tanh(2 X W1) W2) "
        f"of a random 16-8-{K} teacher"
    )
    arch = {"kind": "mlp", "sizes": [d, 8 if quick else 32, K], "activation": "tanh"}
    rung = _fitted("synthetic-100k", arch, X, y, Xt, yt, 60 if quick else 300, seed, desc)
    rung.info["reference_rows"] = 4096
    return rung


def _gpt_rung(quick: bool, seed: int, m: int) -> Rung:
    cfg: dict[str, int]
    if quick:
        cfg = {"block": 16, "d_model": 32, "n_layers": 1, "n_heads": 2}
        n, steps, batch = 48, 30, 16
    else:
        cfg = {"block": 32, "d_model": 256, "n_layers": 3, "n_heads": 4}
        n, steps, batch = 192, 250, 32
    text = grammar_text(200 if quick else 2500, seed=seed)
    vocab, ids = _encode(text)
    X, y = _windows(ids, n, cfg["block"], 0)
    # the test windows: held-out text right after the training windows
    Xt, yt = _windows(ids, m, cfg["block"], n * (cfg["block"] + 1))
    arch = {"kind": "gpt", "vocab": len(vocab), **cfg}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyGPT(len(vocab), **cfg)
    params = [n_ for n_, _ in model.named_parameters() if _is_linear_param(model, n_)]
    t0 = time.perf_counter()
    hist = train_gpt(model, X, y, steps=steps, batch_size=batch, seed=seed, params=params)  # float32
    train_s = time.perf_counter() - t0
    model = model.double().eval()
    rows = 48 if quick else 16  # sequences per HVP chunk of the reference (~0.1 GB per sequence and column)
    with torch.no_grad():
        tr = float(sequence_cross_entropy(model(X), y).mean())
        te = float(sequence_cross_entropy(model(Xt), yt).mean())
    info = {
        "n_train": n,
        "m_test": m,
        "n_params": int(sum(q.numel() for q in model.parameters())),
        "n_params_selected": int(sum(q.numel() for n_, q in model.named_parameters() if n_ in set(params))),
        "train_time_s": train_s,
        "trainer": f"Adam, {steps} steps of {batch} sequences, lr 3e-3 (warm-up + cosine), float32; "
        f"then cast to float64",
        "loss_first_steps": float(np.mean(hist[: max(1, steps // 10)])),
        "loss_last_steps": float(np.mean(hist[-max(1, steps // 10) :])),
        "train_loss": tr,
        "test_loss": te,
        "uniform_loss": math.log(len(vocab)),
        "vocab": "".join(vocab),
        "data": f"{len(text)} characters of grammar_text(seed={seed}); {n} training windows of "
        f"{cfg['block']} + 1 characters, {m} held-out windows after them",
        "loss": "mean next-token cross-entropy per sequence",
        "reference_rows": rows,
    }
    rung = Rung(
        "gpt-3m",
        RUNGS["gpt-3m"],
        arch,
        model,
        sequence_cross_entropy,
        X,
        y,
        Xt,
        yt,
        L2,
        GPT_DAMPING,
        params,
        True,
        info,
    )
    # A briefly trained network is far from a minimum: H has negative eigenvalues. Damp by twice the most
    # negative curvature a short Lanczos process finds (an inner bound of λ_min), at least GPT_DAMPING.
    t0 = time.perf_counter()
    lo = smallest_curvature(rung, steps=20, seed=seed)
    rung.damping = max(GPT_DAMPING, float(f"{2.0 * max(0.0, -lo):.2g}"))
    info.update(
        hessian_min_ritz=lo,
        damping_probe_s=time.perf_counter() - t0,
        damping_rule=f"max({GPT_DAMPING:g}, 2 x |smallest Ritz value of a 20-step Lanczos on H|), 2 digits",
    )
    return rung


def _is_linear_param(model: nn.Module, name: str) -> bool:
    mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return isinstance(mod, nn.Linear)


def make_rung(name: str, quick: bool = False, seed: int = 0, m_test: Optional[int] = None) -> Rung:
    """Train rung ``name`` (one of :data:`RUNGS`) and return it; ``quick``: tiny sizes for smoke tests;
    ``m_test``: the number of test points (default 10, 3 with ``quick``; the model does not depend on it)."""
    if not isinstance(name, str) or name not in RUNGS:
        raise ValueError(f"name must be one of {', '.join(RUNGS)}, got {name!r}")
    m = _m(quick, m_test)
    if name == "mlp-2k":
        rung = _mlp_rung(name, [32], [8], quick, seed, m)
    elif name == "mlp-10k":
        rung = _mlp_rung(name, [128], [12], quick, seed, m)
    elif name == "mlp-85k":
        rung = _mlp_rung(name, [256, 256], [12, 12], quick, seed, m)
    elif name == "mlp-1m":
        rung = _mlp_rung(name, [1024, 1024], [16, 16], quick, seed, m)
    elif name == "cnn-9k":
        rung = _cnn_rung(quick, seed, m)
    elif name == "synthetic-100k":
        rung = _synthetic_rung(quick, seed, m)
    else:
        rung = _gpt_rung(quick, seed, m)
    if quick:
        rung.description += f" [quick: reduced to p = {rung.n_params}, n = {rung.X_train.shape[0]}]"
    rung.info["quick"] = bool(quick)
    return rung


# ==============================================================================================
# the reference: torch.func only
# ==============================================================================================
class _Functional:
    """R(θ) pieces of a rung as functions of the flat θ (torch.func; no pyinfluence code)."""

    def __init__(self, rung: Rung, rows: int) -> None:
        self.rung = rung
        sel = set(rung.selected())
        named = list(rung.model.named_parameters())
        self.names = [n for n, _ in named if n in sel]
        self.shapes = [p.shape for n, p in named if n in sel]
        self.theta = torch.cat([p.detach().reshape(-1) for n, p in named if n in sel]).to(torch.float64)
        self.fixed = {n: p.detach() for n, p in named if n not in sel}
        self.fixed.update(dict(rung.model.named_buffers()))
        self.rows = max(1, int(rows))
        self.n = int(rung.X_train.shape[0])

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        out, i = {}, 0
        for n, s in zip(self.names, self.shapes):
            k = int(math.prod(s))
            out[n] = flat[i : i + k].reshape(s)
            i += k
        return out

    def losses(self, flat: Tensor, X: Tensor, Y: Tensor) -> Tensor:
        out = torch.func.functional_call(self.rung.model, {**self.params(flat), **self.fixed}, (X,))
        return self.rung.loss_fn(out, Y)

    def chunks(self, X: Tensor, Y: Tensor):
        for s in range(0, int(X.shape[0]), self.rows):
            yield X[s : s + self.rows], Y[s : s + self.rows]

    def matvec(self, V: Tensor, damping: Optional[float] = None) -> Tensor:
        """(H + λI) V for V (p, r): H = (1/n) Σ_i ∇²L_i + l2·I, by forward-over-reverse HVPs (λ: the
        rung's damping unless given)."""
        out = torch.zeros_like(V)
        for Xc, Yc in self.chunks(self.rung.X_train, self.rung.y_train):

            def g(f: Tensor, Xc: Tensor = Xc, Yc: Tensor = Yc) -> Tensor:
                return torch.func.grad(lambda t: self.losses(t, Xc, Yc).sum())(f)

            def hv(v: Tensor, g: Callable[[Tensor], Tensor] = g) -> Tensor:
                return torch.func.jvp(g, (self.theta,), (v,))[1]

            out += torch.func.vmap(hv, in_dims=1, out_dims=1)(V)
        lam = self.rung.damping if damping is None else float(damping)
        return out / self.n + (self.rung.l2 + lam) * V

    def grads(self, X: Tensor, Y: Tensor) -> Tensor:
        """Per-example loss gradients (k, p) (no l2 term)."""

        def one(x: Tensor, y: Tensor) -> Tensor:
            return torch.func.grad(lambda t: self.losses(t, x[None], y[None]).sum())(self.theta)

        return torch.cat([torch.func.vmap(one)(Xc, Yc) for Xc, Yc in self.chunks(X, Y)])


def smallest_curvature(rung: Rung, steps: int = 20, seed: int = 0, rows: Optional[int] = None) -> float:
    """The smallest Ritz value of H = ∇²[(1/n) Σ L_i + (l2/2)‖θ‖²] (no damping) after ``steps`` Lanczos
    steps with full reorthogonalisation from a random start (torch.func HVPs): an upper bound of H's
    smallest eigenvalue that approaches it from inside. Memory: ``steps`` vectors of p."""
    fn = _Functional(rung, rows if rows is not None else int(rung.info.get("reference_rows", 256)))
    p = int(fn.theta.numel())
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(p, generator=gen, dtype=torch.float64)
    q /= q.norm()
    basis: list[Tensor] = []
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    for _ in range(max(1, min(int(steps), p))):
        basis.append(q)
        w = fn.matvec(q[:, None], damping=0.0)[:, 0]
        alphas.append(float(q @ w))
        for b in basis:  # full reorthogonalisation (twice is enough)
            w -= (b @ w) * b
        for b in basis:
            w -= (b @ w) * b
        beta = float(w.norm())
        if beta <= 1e-12 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        q = w / beta
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return float(torch.linalg.eigvalsh(T)[0])


def _cg(matvec: Callable[[Tensor], Tensor], B: Tensor, tol: float, max_iter: int) -> tuple[Tensor, int]:
    """Conjugate gradients per column (batched matvecs) from x = 0 until ‖r_j‖ ≤ tol·‖b_j‖."""
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rr = (R * R).sum(0)
    stop = tol * B.norm(dim=0)
    active = torch.nonzero(rr.sqrt() > stop).flatten()
    it = 0
    while active.numel() and it < max_iter:
        it += 1
        AP = matvec(P[:, active])
        pap = (P[:, active] * AP).sum(0)
        if bool((pap <= 0).any()):
            raise ValueError(
                "the reference CG met non-positive curvature pᵀ(H + λI)p ≤ 0: H + λI is not positive "
                "definite; raise the rung's damping"
            )
        alpha = rr[active] / pap
        X[:, active] += alpha * P[:, active]
        R[:, active] -= alpha * AP
        rr_new = (R[:, active] ** 2).sum(0)
        P[:, active] = R[:, active] + (rr_new / rr[active]) * P[:, active]
        rr[active] = rr_new
        active = active[rr_new.sqrt() > stop[active]]
    return X, it


def reference_up_loss(
    rung: Rung, method: str = "auto", *, tol: float = 1e-9, max_iter: int = 5000, rows: Optional[int] = None
) -> tuple[np.ndarray, dict]:
    """The ground truth ``up_loss`` (n_train, m_test) of ``rung`` and what it cost, from ``torch.func`` only.

    - ``method="exact"`` (``"auto"`` when p ≤ :data:`EXACT_MAX_PARAMS`): H + λI assembled column block by
      column block from Hessian-vector products (``vmap`` of ``jvp`` over ``grad``), symmetrised,
      Cholesky-factorised in float64; S = (H + λI)⁻¹ G_testᵀ.
    - ``method="cg"`` (``"auto"`` above that): conjugate gradients per test column on the same HVPs, from
      0 until ‖r‖ ≤ ``tol``·‖g_test‖ (at most ``max_iter`` iterations).
    - Then up_loss = −G S with the per-example gradients G (``vmap`` of ``grad``), ``rows`` examples at a time
      (default: the rung's ``info["reference_rows"]``, else 256; HVPs are summed over chunks of as many).

    ``info``: method, seconds, iterations, the true relative residuals max_j ‖(H + λI)s_j − g_j‖/‖g_j‖
    (one more batched HVP). Raises ValueError when H + λI is not positive definite.
    """
    if method not in ("auto", "exact", "cg"):
        raise ValueError(f"method must be 'auto', 'exact' or 'cg', got {method!r}")
    t0 = time.perf_counter()
    fn = _Functional(rung, rows if rows is not None else int(rung.info.get("reference_rows", 256)))
    p = int(fn.theta.numel())
    if method == "auto":
        method = "exact" if p <= EXACT_MAX_PARAMS else "cg"
    Gt = fn.grads(rung.X_test, rung.y_test).T.contiguous()  # (p, m)
    iters: Optional[int] = None
    if method == "exact":
        cols = []
        eye_block = 64
        for s in range(0, p, eye_block):
            E = torch.zeros(p, min(eye_block, p - s), dtype=torch.float64)
            E[torch.arange(s, s + E.shape[1]), torch.arange(E.shape[1])] = 1.0
            cols.append(fn.matvec(E))
        A = torch.cat(cols, dim=1)
        A = 0.5 * (A + A.T)
        L, bad = torch.linalg.cholesky_ex(A)
        if int(bad):
            lo = float(torch.linalg.eigvalsh(A)[0])
            raise ValueError(
                f"H + λI is not positive definite (smallest eigenvalue {lo:.3g}); raise the rung's damping"
            )
        S = torch.cholesky_solve(Gt, L)
        del A, L
    else:
        S, iters = _cg(fn.matvec, Gt, tol, max_iter)
    res = (fn.matvec(S) - Gt).norm(dim=0) / Gt.norm(dim=0).clamp_min(1e-300)
    up = torch.cat(
        [-(fn.grads(Xc, Yc) @ S) for Xc, Yc in fn.chunks(rung.X_train, rung.y_train)]
    )  # (n, m), blockwise
    out = up.numpy().astype(np.float64)
    if not np.isfinite(out).all():
        raise ValueError("the reference up_loss has non-finite entries")
    info = {
        "method": method,
        "label": "torch.func exact (dense H, Cholesky)"
        if method == "exact"
        else f"torch.func CG (tol {tol:g})",
        "time_s": time.perf_counter() - t0,
        "iterations": iters,
        "max_residual": float(res.max()),
        "n_params": p,
    }
    return out, info
