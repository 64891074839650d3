"""KFAC / EKFAC for nn.Conv2d, for nn.Linear on sequences, and the diagonal fallback, against an
independent reference.

The reference is computed here one example at a time with plain ``torch.autograd`` (no pyinfluence
code): each supported module's input and output are captured with a torch forward hook, the patches
ā_it of a convolution are cut out by a manual loop over the output pixels (and checked to reproduce
the module's output, W ā_it + b = s_it, and the autograd weight gradient, Σ_t δ_it ā_itᵀ = ∇_W L);
the output gradients δ_it come from ``torch.autograd.grad`` (at the observed label, or for every
class with weight p(k|x_i) for the true Fisher of the cross-entropy). The factors are assembled as
the module docstring of pyinfluence.torch.solvers.kfac states them (KFC, Grosse & Martens 2016):

    A = (1/(nT)) Σ_i Σ_t ā_it ā_itᵀ,   G = (1/n) Σ_i Σ_t E[δ_it δ_itᵀ],
    EK-FAC: S = (1/n) Σ_i E[(Q_Gᵀ g_i Q_A)²] with g_i the autograd per-example gradient,
    diagonal fallback: D = (1/n) Σ_i E[g_i²] (autograd per-example gradients),

the dense block-diagonal matrix is assembled with ``torch.kron`` in the flat parameter order
(W row-major, then b) plus (l2 + λ)I and solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pyinfluence import TorchInfluence
from pyinfluence.torch.solvers import EKFAC, KFAC

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L2 = 1e-2
DAMPING = 1e-3
F64 = torch.float64


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _fit(model, X, y, iters=200):
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=iters, tolerance_grad=1e-12, history_size=30)

    def closure():
        opt.zero_grad()
        loss = ce(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


@pytest.fixture(scope="module")
def cnn():
    """Conv2d(2→3, k3, stride 2, padding 1, bias) – tanh – Conv2d(3→2, k2, padding 1, dilation 2,
    no bias) – tanh – Linear(18→3): 138 parameters, fitted to 40 examples (L-BFGS)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, 6, 6, generator=g, dtype=F64)
    y = (X[:, 0, :3].mean((1, 2)) - X[:, 1, 3:].mean((1, 2)) > 0).long() + (X[:, 0, 2, 2] > 1).long()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, padding=1, dilation=2, bias=False),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(18, 3),
    ).double()
    return _fit(model, X, y, iters=80), X, y


@pytest.fixture(scope="module")
def seq():
    """Per-token Linear(3→5) – tanh – Linear(5→4) over (B, 2, 3, d=3) inputs (T = 6 positions), mean
    over the positions, Linear(4→3): 59 parameters, fitted to 30 examples."""

    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 5)
            self.fc2 = nn.Linear(5, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.fc2(torch.tanh(self.fc1(x))).mean(dim=(1, 2)))

    g = torch.Generator().manual_seed(1)
    X = torch.randn(30, 2, 3, 3, generator=g, dtype=F64)
    y = (X[..., 0].mean((1, 2)) > 0).long() + (X[..., 1].amax((1, 2)) > 1.2).long()
    torch.manual_seed(1)
    return _fit(Seq().double(), X, y), X, y


class EmbNorm(nn.Module):
    """Embedding(7, 4) – LayerNorm(4) – per-token Linear(4→5) – tanh – mean – Linear(5→3)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(torch.tanh(self.fc(self.norm(self.emb(idx)))).mean(1))


@pytest.fixture(scope="module")
def emb():
    g = torch.Generator().manual_seed(2)
    X = torch.randint(7, (30, 3), generator=g)
    y = (X[:, 0] % 3 + (X[:, 1] > 3).long()) % 3
    torch.manual_seed(2)
    return _fit(EmbNorm().double(), X, y, iters=150), X, y


# ----------------------------------------------------------------------------------------------
# the independent reference
# ----------------------------------------------------------------------------------------------
def manual_patches(m: nn.Conv2d, x):
    """(T, C·kh·kw): the receptive field of every output pixel (row-major over (oh, ow)), cut out of
    the zero-padded input x (C, H, W) by slicing (torch's padding="same" puts an odd extra pad at the
    end; the caller checks the patches against the module's output)."""
    kh, kw = m.kernel_size
    sh, sw = m.stride
    dh, dw = m.dilation
    if isinstance(m.padding, str):
        th, tw = (0, 0) if m.padding == "valid" else (dh * (kh - 1), dw * (kw - 1))
        pt, pb, pl, pr = th // 2, th - th // 2, tw // 2, tw - tw // 2
    else:
        pt = pb = m.padding[0]
        pl = pr = m.padding[1]
    xp = torch.zeros(x.shape[0], x.shape[1] + pt + pb, x.shape[2] + pl + pr, dtype=x.dtype)
    xp[:, pt : pt + x.shape[1], pl : pl + x.shape[2]] = x
    oh = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
    rows = []
    for r in range(oh):
        for c in range(ow):
            rows.append(
                xp[:, r * sh : r * sh + dh * (kh - 1) + 1 : dh, c * sw : c * sw + dw * (kw - 1) + 1 : dw]
            )
    return torch.stack([p.reshape(-1) for p in rows])


def reference_stats(model, X, y, fisher, kron, selected):
    """Per example: ({path: (ā (T, in'), [δ^(k) (T, out)])}, [(weight_k, {name: g^(k)})]) for the
    Kronecker modules ``kron`` (paths) and all parameters, by plain autograd one example at a time."""
    params = dict(model.named_parameters())
    mods = {p: model.get_submodule(p) for p in kron}
    out = []
    for i in range(len(y)):
        caps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        hooks = [
            m.register_forward_hook(lambda _m, inp, o, p=p, c=caps: c.__setitem__(p, (inp[0].detach(), o)))
            for p, m in mods.items()
        ]
        try:
            z = model(X[i : i + 1])[0]
        finally:
            for h in hooks:
                h.remove()
        logp = torch.log_softmax(z, 0)
        if fisher == "empirical":
            terms = [(1.0, -logp[y[i]])]
        else:
            prob = logp.detach().exp()
            terms = [(float(prob[k]), -logp[k]) for k in range(z.numel())]
        names = list(params)
        grads = []
        deltas: dict[str, list[torch.Tensor]] = {p: [] for p in kron}
        for w, loss in terms:
            gs = torch.autograd.grad(
                loss, [params[n] for n in names] + [caps[p][1] for p in kron], retain_graph=True
            )
            grads.append((w, dict(zip(names, gs[: len(names)]))))
            for p, d in zip(kron, gs[len(names) :]):
                m = mods[p]
                deltas[p].append(
                    d[0].reshape(m.out_channels, -1).T
                    if isinstance(m, nn.Conv2d)
                    else d[0].reshape(-1, m.out_features)
                )
        layer = {}
        for p, m in mods.items():
            a, s = caps[p]
            a = manual_patches(m, a[0]) if isinstance(m, nn.Conv2d) else a[0].reshape(-1, m.in_features)
            W = m.weight.detach().reshape(m.weight.shape[0], -1)
            b = m.bias.detach() if m.bias is not None else 0
            s_ref = (
                s.detach()[0].reshape(W.shape[0], -1).T
                if isinstance(m, nn.Conv2d)
                else s.detach()[0].reshape(-1, W.shape[0])
            )
            assert torch.allclose(a @ W.T + b, s_ref, atol=1e-12)  # the patches reproduce the layer's output
            for (_, g), d in zip(grads, deltas[p]):  # Σ_t δ_t ā_tᵀ is the autograd weight gradient
                assert torch.allclose(d.T @ a, g[f"{p}.weight"].reshape(W.shape), atol=1e-12)
            cols = []
            if f"{p}.weight" in selected:
                cols.append(a)
            if f"{p}.bias" in selected:
                cols.append(torch.ones(a.shape[0], 1, dtype=a.dtype))
            layer[p] = (torch.cat(cols, 1), deltas[p])
        out.append((layer, grads))
    return out


def flat_offsets(model, selected):
    offs, o = {}, 0
    for name, p in model.named_parameters():
        if name in selected:
            offs[name] = o
            o += p.numel()
    return offs, o


def reference_matrix(model, X, y, fisher, kron, selected, ekfac, damping, diag=()):
    """The dense approximation blockdiag(G ⊗ A or the EK-FAC block, diag(D)) + (l2 + λ)I, and per
    Kronecker layer its (A, G)."""
    stats = reference_stats(model, X, y, fisher, kron, selected)
    offs, p = flat_offsets(model, selected)
    n = len(stats)
    M = torch.zeros(p, p, dtype=F64)
    factors = {}
    for path in kron:
        m = model.get_submodule(path)
        out = m.weight.shape[0]
        n_in = m.weight[0].numel()
        wn, bn = f"{path}.weight", f"{path}.bias"
        if wn not in selected and bn not in selected:
            continue
        T = stats[0][0][path][0].shape[0]
        A = sum(a.T @ a for (lay, _) in stats for a in [lay[path][0]]) / (n * T)
        G = sum(w * d.T @ d for (lay, grads) in stats for (w, _), d in zip(grads, lay[path][1])) / n
        factors[path] = (A, G)
        pos = []
        if wn in selected:
            pos.append(offs[wn] + torch.arange(out * n_in).reshape(out, n_in))
        if bn in selected:
            pos.append(offs[bn] + torch.arange(out).reshape(out, 1))
        P = torch.cat(pos, 1).reshape(-1)
        if not ekfac:
            block = torch.kron(G, A)
        else:
            _, QA = torch.linalg.eigh(A)
            _, QG = torch.linalg.eigh(G)
            S = torch.zeros(out, QA.shape[0], dtype=F64)
            for _, grads in stats:
                for w, g in grads:
                    parts = []
                    if wn in selected:
                        parts.append(g[wn].reshape(out, n_in))
                    if bn in selected:
                        parts.append(g[bn].reshape(out, 1))
                    S = S + w * (QG.T @ torch.cat(parts, 1) @ QA) ** 2
            Q = torch.kron(QG, QA)
            block = Q @ torch.diag((S / n).reshape(-1)) @ Q.T
        M[P.unsqueeze(1), P.unsqueeze(0)] = block
    for name in diag:
        D = sum(w * g[name] ** 2 for _, grads in stats for w, g in grads) / n
        P = offs[name] + torch.arange(D.numel())
        M[P, P] = D.reshape(-1)
    return M + (L2 + damping) * torch.eye(p, dtype=F64), factors


def dense_hessian(model, X, y, selected):
    named = [(n, p.detach()) for n, p in model.named_parameters() if n in selected]
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in selected}
    theta = torch.cat([p.reshape(-1) for _, p in named])

    def R(t):
        ps, o = {}, 0
        for n, p in named:
            ps[n] = t[o : o + p.numel()].reshape(p.shape)
            o += p.numel()
        return ce(functional_call(model, {**fixed, **ps}, (X,)), y).mean() + 0.5 * L2 * (t * t).sum()

    return torch.func.hessian(R)(theta)


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def _rhs(p, r=3, seed=1):
    return torch.randn(p, r, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _op(model, X, y, damping=DAMPING, params=None, batch_size=16):
    return TorchInfluence(
        model, ce, (X, y), l2=L2, damping=damping, params=params, batch_size=batch_size, optimum_tol=None
    ).operator


CNN_LAYERS = ["0", "2", "5"]
SEQ_LAYERS = ["fc1", "fc2", "head"]


# ----------------------------------------------------------------------------------------------
# Conv2d
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_cnn_matches_dense_reference(cnn, cls, fisher):
    model, X, y = cnn
    op = _op(model, X, y)
    prep = cls(fisher=fisher).prepare(op, DAMPING)
    selected = {n for n, _ in model.named_parameters()}
    M, factors = reference_matrix(model, X, y, fisher, CNN_LAYERS, selected, cls is EKFAC, DAMPING)
    V = _rhs(op.n_params)
    res = prep.solve(V)
    assert rel_err(res.solution, torch.linalg.solve(M, V)) < 1e-9
    kinds = [(b["path"], b["kind"]) for b in prep.info["blocks"]]
    assert kinds == [("0", "conv2d"), ("2", "conv2d"), ("5", "linear")]
    blk = prep.info["blocks"][0]
    assert blk["positions"] == 9 and blk["shape"] == (3, 2 * 9 + 1) and blk["n_params"] == 57
    A, G = factors["0"]
    ea, eg = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(G)
    assert blk["A_eigenvalue_range"] == pytest.approx((float(ea[0]), float(ea[-1])), rel=1e-9, abs=1e-12)
    assert blk["G_eigenvalue_range"] == pytest.approx((float(eg[0]), float(eg[-1])), rel=1e-9, abs=1e-12)
    assert prep.info["coverage"]["kronecker"] == 1.0
    assert prep.info["coverage"]["conv2d"] == pytest.approx(81 / 138)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_conv_same_valid_padding_and_partial_selection(cls):
    """padding="same" with an even kernel (asymmetric zero padding), padding="valid" with an
    anisotropic stride, an untrained model (large damping, no Lanczos check), and a selection of a
    conv weight without its bias plus a bias alone."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2, padding="same"),
        nn.Tanh(),
        nn.Conv2d(2, 2, 3, padding="valid", stride=(1, 2)),
        nn.Flatten(),
        nn.Linear(12, 3),
    ).double()
    X = torch.randn(20, 1, 5, 5, dtype=F64)
    y = torch.randint(3, (20,), generator=torch.Generator().manual_seed(4))
    damping = 1.0
    for params, selected in [
        (None, {n for n, _ in model.named_parameters()}),
        (["0.weight", "2.bias", "4"], {"0.weight", "2.bias", "4.weight", "4.bias"}),
    ]:
        op = _op(model, X, y, damping=damping, params=params, batch_size=7)
        prep = cls(lanczos_steps=0).prepare(op, damping)
        M, _ = reference_matrix(model, X, y, "true", ["0", "2", "4"], selected, cls is EKFAC, damping)
        V = _rhs(op.n_params)
        assert rel_err(prep.solve(V).solution, torch.linalg.solve(M, V)) < 1e-9


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_cnn_residual_is_true_residual(cnn, cls):
    """The reported residual is ‖(H + λI)x − v‖/‖v‖ with H from torch.func.hessian."""
    model, X, y = cnn
    op = _op(model, X, y)
    V = _rhs(op.n_params)
    res = cls().prepare(op, DAMPING).solve(V)
    H = dense_hessian(model, X, y, {n for n, _ in model.named_parameters()})
    R = (H + DAMPING * torch.eye(op.n_params, dtype=F64)) @ res.solution - V
    expect = torch.linalg.vector_norm(R, dim=0) / torch.linalg.vector_norm(V, dim=0)
    assert torch.allclose(res.residual, expect, rtol=1e-9, atol=1e-14)
    assert 1e-3 < res.max_residual < 10  # an approximation: reported, not small


# ----------------------------------------------------------------------------------------------
# Linear over sequences
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_sequence_linear_matches_dense_reference(seq, cls, fisher):
    model, X, y = seq
    op = _op(model, X, y, batch_size=11)
    prep = cls(fisher=fisher).prepare(op, DAMPING)
    selected = {n for n, _ in model.named_parameters()}
    M, _ = reference_matrix(model, X, y, fisher, SEQ_LAYERS, selected, cls is EKFAC, DAMPING)
    V = _rhs(op.n_params)
    assert rel_err(prep.solve(V).solution, torch.linalg.solve(M, V)) < 1e-9
    kinds = [(b["kind"], b["positions"]) for b in prep.info["blocks"]]
    assert kinds == [("linear-sequence", 6), ("linear-sequence", 6), ("linear", 1)]
    assert prep.info["coverage"]["linear-sequence"] == pytest.approx(44 / 59)


def test_ekfac_beats_kfac_on_sequence_fisher_block(seq):
    """The mean-pooled positions violate KFC's spatially-uncorrelated-derivatives assumption; EK-FAC's
    eigenvalues come from the exact per-example gradients, so its fc1 block is closer (Frobenius) to
    the exact Fisher block (1/n) Σ_i E[vec(g_i) vec(g_i)ᵀ] built here from autograd gradients (as it
    must be: both are diagonal in the same eigenbasis and EK-FAC's diagonal is the exact one there).
    Measured relative Frobenius errors: K-FAC 0.814, EK-FAC 0.717."""
    model, X, y = seq
    selected = {"fc1.weight", "fc1.bias"}
    stats = reference_stats(model, X, y, "true", ["fc1"], selected)
    F_exact = sum(
        w * torch.outer(v, v)
        for _, grads in stats
        for w, g in grads
        for v in [torch.cat([g["fc1.weight"].reshape(-1), g["fc1.bias"]])]  # the flat order: W, then b
    ) / len(stats)
    shift = (L2 + DAMPING) * torch.eye(F_exact.shape[0], dtype=F64)
    errs = {}
    for cls in (KFAC, EKFAC):
        op = _op(model, X, y, params=["fc1"])
        prep = cls().prepare(op, DAMPING)
        approx = torch.linalg.inv(prep._apply(torch.eye(op.n_params, dtype=F64))) - shift
        errs[cls.name] = rel_err(approx, F_exact)
    assert errs["ekfac"] < errs["kfac"], errs


# ----------------------------------------------------------------------------------------------
# the diagonal fallback
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["true", "empirical"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_diagonal_fallback_matches_dense_reference(emb, cls, fisher):
    model, X, y = emb
    op = _op(model, X, y, batch_size=8)
    # this checks the approximation itself; the untrained model's true H + λI is indefinite (the default
    # 40-step Lanczos check finds it), so the search for negative curvature is off
    prep = cls(fisher=fisher, unsupported="diagonal", lanczos_steps=0).prepare(op, DAMPING)
    selected = {n for n, _ in model.named_parameters()}
    diag = ["emb.weight", "norm.weight", "norm.bias"]
    M, _ = reference_matrix(model, X, y, fisher, ["fc", "head"], selected, cls is EKFAC, DAMPING, diag)
    V = _rhs(op.n_params)
    assert rel_err(prep.solve(V).solution, torch.linalg.solve(M, V)) < 1e-9
    info = prep.info
    assert info["diagonal_params"] == diag
    blocks = {b["path"]: b for b in info["blocks"]}
    assert blocks["emb"]["kind"] == "diagonal" and blocks["emb"]["module"] == "Embedding"
    assert (
        blocks["norm"]["params"] == ["norm.weight", "norm.bias"] and "LayerNorm" in blocks["norm"]["reason"]
    )
    assert blocks["fc"]["kind"] == "linear-sequence" and blocks["head"]["kind"] == "linear"
    p = op.n_params  # 28 + 8 + 25 + 18 = 79
    assert info["coverage"]["diagonal"] == pytest.approx(36 / p)
    assert info["coverage"]["kronecker"] == pytest.approx(43 / p)
    D_emb = torch.diagonal(M)[:28] - (L2 + DAMPING)
    assert blocks["emb"]["curvature_range"] == pytest.approx(
        (float(D_emb.min()), float(D_emb.max())), abs=1e-12
    )


def test_diagonal_fallback_for_unsupported_layers():
    """unsupported="diagonal" also takes a grouped convolution, a reflect-padded one and a shared
    Linear (called twice): their parameters get the exact Fisher diagonal, the rest K-FAC."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.grouped = nn.Conv2d(2, 2, 3, groups=2)
            self.reflect = nn.Conv2d(2, 2, 2, padding=1, padding_mode="reflect")
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.reflect(torch.tanh(self.grouped(x)))).mean((2, 3))  # (B, 2)
            h = torch.cat([h, h], 1)
            return self.head(self.shared(torch.tanh(self.shared(h))))

    torch.manual_seed(5)
    model = Net().double()
    X = torch.randn(16, 2, 4, 4, dtype=F64)
    y = torch.randint(3, (16,), generator=torch.Generator().manual_seed(5))
    op = _op(model, X, y, damping=1.0, batch_size=5)
    prep = KFAC(unsupported="diagonal", lanczos_steps=0).prepare(op, 1.0)
    selected = {n for n, _ in model.named_parameters()}
    diag = [n for n in selected if not n.startswith("head")]
    M, _ = reference_matrix(model, X, y, "true", ["head"], selected, False, 1.0, sorted(diag))
    V = _rhs(op.n_params)
    assert rel_err(prep.solve(V).solution, torch.linalg.solve(M, V)) < 1e-9
    reasons = {b["path"]: b.get("reason", "") for b in prep.info["blocks"]}
    assert "groups=2" in reasons["grouped"] and "padding_mode='reflect'" in reasons["reflect"]
    assert "called 2 times" in reasons["shared"] and reasons["head"] == ""
    for m in list(model.modules()) + list(op.fm._thread_module().modules()):  # the hooks are gone
        assert not m._forward_hooks and not m._forward_pre_hooks


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def _prepare(model, X, y, params=None, **kw):
    return KFAC(lanczos_steps=0, **kw).prepare(_op(model, X, y, damping=1.0, params=params), 1.0)


def test_errors_name_the_layer_and_setting():
    X = torch.randn(6, 2, 5, 5, dtype=F64)
    y = torch.randint(3, (6,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    grouped = nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(18, 3)).double()
    with pytest.raises(
        ValueError, match=r"Conv2d layer '0' \(parameter '0\.weight'\) has groups=2.*unsupported='diagonal'"
    ):
        _prepare(grouped, X, y)
    reflect = nn.Sequential(
        nn.Conv2d(2, 1, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(25, 3)
    )
    with pytest.raises(ValueError, match=r"Conv2d layer '0' .*padding_mode='reflect'"):
        _prepare(reflect.double(), X, y)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    Xs = torch.randn(6, 3, dtype=F64)
    with pytest.raises(
        ValueError, match=r"Linear layer 'fc' cannot be Kronecker-factored: it was called 2 times"
    ):
        _prepare(Shared().double(), Xs, y)
    idx = torch.randint(7, (6, 3))
    with pytest.raises(
        ValueError, match=r"parameter 'emb\.weight' belongs to Embedding.*unsupported='diagonal'"
    ):
        _prepare(EmbNorm().double(), idx, y)
    with pytest.raises(
        ValueError, match=r"parameter 'norm\.bias' belongs to LayerNorm.*unsupported='diagonal'"
    ):
        _prepare(EmbNorm().double(), idx, y, params=["fc", "norm.bias"])
    with pytest.raises(ValueError, match="unsupported must be 'error' or 'diagonal'"):
        KFAC(unsupported="diag")
    assert EKFAC(unsupported=" Diagonal").unsupported == "diagonal"


def test_batch_folded_into_positions_rejected():
    """A Linear whose input has the examples and positions merged into one dimension cannot be
    attributed to examples: a clear error, never a silent wrong factor."""

    class Folded(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            B = x.shape[0]
            return self.fc(x.reshape(-1, 3)).reshape(B, -1)

    X = torch.randn(6, 2, 3, dtype=F64)
    y = torch.randint(4, (6,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"input of shape \(4, 3\) for a batch of 2 examples"):
        _prepare(Folded().double(), X, y)


# ----------------------------------------------------------------------------------------------
# the square root of the approximate inverse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_apply_sqrt_inverse_with_conv_and_diagonal(emb, cnn, cls):
    for model, X, y, kw in [(*cnn, {}), (*emb, {"unsupported": "diagonal"})]:
        op = _op(model, X, y)
        prep = cls(lanczos_steps=0, **kw).prepare(op, DAMPING)  # the approximation only (see above)
        V = _rhs(op.n_params)
        half = prep._apply_sqrt_inverse(V)
        assert rel_err(prep._apply_sqrt_inverse(half), prep._apply(V)) < 1e-12
        S = prep._apply_sqrt_inverse(torch.eye(op.n_params, dtype=F64))
        assert torch.allclose(S, S.T, atol=1e-12)
        assert bool(torch.linalg.eigvalsh(S).min() > 0)
