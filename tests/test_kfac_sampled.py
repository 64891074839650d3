"""KFAC / EKFAC with ``fisher="sampled"`` (the true Fisher by Monte Carlo) against independent references.

Everything here is rebuilt from plain ``torch.autograd`` one example at a time (forward hooks capture
each Linear layer's input ā and output s; the Jacobian of the model's outputs z with respect to s is
taken column by column) and from the closed forms of the likelihoods — no pyinfluence code:

- the exact target: the Gauss-Newton output Hessian of the loss per example, for a weighted sum of
  cross-entropies L = Σ_t w_t CE(z_t, y_t) the block-diagonal blockdiag_t(w_t (diag p_t − p_t p_tᵀ)),
  for the weighted squared error Σ_k c_k (z_k − y_k)² the diagonal diag(2c);
- the sampled draws, re-implemented in numpy from their documented definition (lowbias32 counter
  hash of (seed, example index, sample, position); inverse-CDF categorical draws and Box-Muller
  normals), so that the solver's factors can be compared with a reference built on the SAME draws
  to rounding (the scaling √w_t of each token's cotangent included);
- the statistical test: with the exact distribution of the draws (every label combination
  enumerated, or the Gaussian's fourth moments in closed form) the standard error of the sampled
  G factor is computed here, and the solver's G (read from its saved eigenbasis and eigenvalues)
  must lie within 5 standard errors of the exact G for 1, 16 and 256 samples.
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyinfluence import TorchInfluence
from pyinfluence.torch.solvers import EKFAC, KFAC, solver_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

F64 = torch.float64
L2 = 1e-2
DAMPING = 1e-3
IGNORE = -100
C_GAUSS = (1.0, 0.25)  # the squared error's per-output weights c_k: 2c = (2, 0.5)


# ----------------------------------------------------------------------------------------------
# models, losses, data
# ----------------------------------------------------------------------------------------------
def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def token_ce(out, y):
    """Mean next-token cross-entropy over each sequence's non-ignored tokens: (B, T, V), (B, T) → (B,);
    a per-example weight w_t = 1/T_i on its T_i valid tokens."""
    per = F.cross_entropy(out.transpose(1, 2), y, reduction="none", ignore_index=IGNORE)
    return per.sum(1) / (y != IGNORE).sum(1).clamp_min(1)


def weighted_sse(out, y):
    return ((out - y) ** 2 * torch.tensor(C_GAUSS, dtype=out.dtype)).sum(1)


class CausalMean(nn.Module):
    """Per-token Linear(3→5) – tanh – causal running mean over positions – per-token Linear(5→3): logits
    (B, T, 3) whose position t depends on tokens ≤ t (so a layer's output gradient at one position mixes
    the losses of several tokens)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        steps = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).reshape(1, -1, 1)
        return self.head(h.cumsum(1) / steps)


def _mlp(seed, n_out):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, n_out)).double()


@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 5, generator=g, dtype=F64)
    y = torch.randint(3, (40,), generator=g)
    return _mlp(0, 3), ce, X, y, ["0", "2"]


@pytest.fixture(scope="module")
def sequence():
    """24 sequences of T = 4 tokens, 3 classes; about a fifth of the labels ignored (-100), at least one
    valid per sequence."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 4, 3, generator=g, dtype=F64)
    y = torch.randint(3, (24, 4), generator=g)
    drop = torch.rand(24, 4, generator=g) < 0.2
    drop[:, 0] = False
    y[drop] = IGNORE
    torch.manual_seed(1)
    return CausalMean().double(), token_ce, X, y, ["fc1", "head"]


@pytest.fixture(scope="module")
def regression():
    g = torch.Generator().manual_seed(2)
    X = torch.randn(40, 5, generator=g, dtype=F64)
    Y = torch.randn(40, 2, generator=g, dtype=F64)
    return _mlp(2, 2), weighted_sse, X, Y, ["0", "2"]


def _op(prob, batch_size=7):
    model, loss, X, y, _ = prob
    return TorchInfluence(
        model, loss, (X, y), l2=L2, damping=DAMPING, batch_size=batch_size, optimum_tol=None
    ).operator


# ----------------------------------------------------------------------------------------------
# the draws, re-implemented in numpy (uint32 arithmetic wraps mod 2³²)
# ----------------------------------------------------------------------------------------------
def _h(x):
    x = np.atleast_1d(np.asarray(x, dtype=np.uint32))  # arrays: uint32 products wrap silently
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def np_key(seed, i, s):
    base = _h(_h(seed & 0xFFFFFFFF) ^ np.uint32(seed >> 32))
    x = _h(np.uint32(i & 0xFFFFFFFF) ^ base)
    x = _h(x ^ np.uint32(i >> 32))
    return _h(x ^ np.uint32(s))


def np_uniforms(key, n):
    c = np.arange(n, dtype=np.uint32) * np.uint32(2)
    k2 = _h(key ^ np.uint32(0x9E3779B9))
    hi = (_h(_h(key ^ c) ^ k2) >> np.uint32(5)).astype(np.float64)
    lo = (_h(_h(key ^ (c + np.uint32(1))) ^ k2) >> np.uint32(6)).astype(np.float64)
    return (hi * 2.0**26 + lo + 0.5) / 2.0**53


def np_normals(key, n):
    u = np_uniforms(key, 2 * n).reshape(n, 2)
    return np.sqrt(-2.0 * np.log(u[:, 0])) * np.cos(2.0 * np.pi * u[:, 1])


# ----------------------------------------------------------------------------------------------
# the independent reference
# ----------------------------------------------------------------------------------------------
def per_example(model, X, paths):
    """Per example: z (K,) detached, and per layer path (ā (T, in + 1), M (T, out, K)) with
    M[t, :, k] = ∂z_k / ∂s_t, from one forward pass with hooks and K backward passes."""
    mods = {p: model.get_submodule(p) for p in paths}
    out = []
    for i in range(X.shape[0]):
        caps: dict[str, Any] = {}
        hooks = [
            m.register_forward_hook(lambda _m, inp, o, p=p, c=caps: c.__setitem__(p, (inp[0].detach(), o)))
            for p, m in mods.items()
        ]
        try:
            z = model(X[i : i + 1])[0].reshape(-1)
        finally:
            for h in hooks:
                h.remove()
        K = z.numel()
        cols: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
        for k in range(K):
            gs = torch.autograd.grad(z[k], [caps[p][1] for p in paths], retain_graph=True)
            for p, g in zip(paths, gs):
                cols[p].append(g[0].reshape(-1, mods[p].out_features))
        layers = {}
        for p in paths:
            a = caps[p][0][0].reshape(-1, mods[p].in_features)
            layers[p] = (torch.cat([a, torch.ones(a.shape[0], 1, dtype=F64)], 1), torch.stack(cols[p], -1))
        out.append((z.detach(), layers))
    return out


def ce_weights(y):
    """Per example the per-position weights w_t of token_ce / ce: 1/T_i on valid positions, 0 on ignored."""
    y = y.reshape(y.shape[0], -1)
    valid = (y != IGNORE).to(F64)
    return valid / valid.sum(1, keepdim=True)


def exact_output_hessians(stats, y, likelihood):
    """Per example the K × K Gauss-Newton output Hessian of the loss, in closed form."""
    out = []
    if likelihood == "gaussian":
        return [torch.diag(2 * torch.tensor(C_GAUSS, dtype=F64)) for _ in stats]
    W = ce_weights(y)
    for (z, _), w in zip(stats, W):
        P = torch.softmax(z.reshape(w.numel(), -1), -1)
        blocks = [w[t] * (torch.diag(p) - torch.outer(p, p)) for t, p in enumerate(P)]
        out.append(torch.block_diag(*blocks))
    return out


def sampled_cotangents(stats, y, likelihood, seed, samples):
    """Per example the list of the sampled cotangents ε_s / √samples (K,) from the numpy draws: categorical
    √w_t (p_t − e_ŷt) with ŷ_t the inverse-CDF draw; gaussian −√(2c) ⊙ ξ (the gradient of Σ c (z − ŷ)² at
    ŷ = z + ξ / √(2c))."""
    out = []
    W = ce_weights(y)
    for i, (z, _) in enumerate(stats):
        cots = []
        for s in range(samples):
            key = np_key(seed, i, s)
            if likelihood == "gaussian":
                xi = torch.from_numpy(np_normals(key, z.numel()))
                eps = -torch.sqrt(2 * torch.tensor(C_GAUSS, dtype=F64)) * xi
            else:
                w = W[i]
                P = torch.softmax(z.reshape(w.numel(), -1), -1)
                u = np_uniforms(key, w.numel())
                rows = []
                for t, p in enumerate(P):
                    cdf = torch.cumsum(p, 0)
                    yt = int(np.searchsorted((cdf / cdf[-1]).numpy(), u[t], side="right"))
                    yt = min(yt, p.numel() - 1)
                    rows.append(w[t].sqrt() * (p - F.one_hot(torch.tensor(yt), p.numel()).to(F64)))
                eps = torch.cat(rows)
            cots.append(eps / math.sqrt(samples))
        out.append(cots)
    return out


def g_factor(stats, path, cov):
    """G = (1/n) Σ_i Σ_t M_it C_i M_itᵀ for per-example output covariances C_i (K × K)."""
    n = len(stats)
    return sum(torch.einsum("tok,kl,tpl->op", L[path][1], C, L[path][1]) for (_, L), C in zip(stats, cov)) / n


def reference_matrix(model, stats, paths, cots, ekfac):
    """The dense block-diagonal K-FAC / EK-FAC matrix (flat parameter order) + (l2 + λ)I built from the
    per-example cotangent lists ``cots``."""
    n = len(stats)
    offs, o = {}, 0
    for name, prm in model.named_parameters():
        offs[name] = o
        o += prm.numel()
    D = torch.zeros(o, o, dtype=F64)
    for path in paths:
        m = model.get_submodule(path)
        acts = [L[path][0] for _, L in stats]
        A = sum(a.T @ a for a in acts) / sum(a.shape[0] for a in acts)
        deltas = [[torch.einsum("tok,k->to", L[path][1], e) for e in c] for (_, L), c in zip(stats, cots)]
        G: Any = sum(d.T @ d for ds in deltas for d in ds) / n
        if ekfac:
            _, QA = torch.linalg.eigh(A)
            _, QG = torch.linalg.eigh(G)
            S = sum((QG.T @ (d.T @ a) @ QA) ** 2 for a, ds in zip(acts, deltas) for d in ds) / n
            Q = torch.kron(QG, QA)
            block = Q @ torch.diag(S.reshape(-1)) @ Q.T
        else:
            block = torch.kron(G, A)
        out, inn = m.weight.shape
        P = torch.cat(
            [offs[f"{path}.weight"] + torch.arange(out * inn).reshape(out, inn),
             offs[f"{path}.bias"] + torch.arange(out).reshape(out, 1)], 1,
        ).reshape(-1)  # fmt: skip
        D[P.unsqueeze(1), P.unsqueeze(0)] = block
    return D + (L2 + DAMPING) * torch.eye(o, dtype=F64)


def rel_err(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def solver_g(prep, layer, A_ref):
    """The G factor of a prepared K-FAC solver, from its saved state: eigenvalues (out, in') = g aᵀ in the
    eigenbasis Q_G ⊗ Q_A; a = diag(Q_Aᵀ A Q_A) from the reference A; G = Q_G diag(g) Q_Gᵀ."""
    tensors, _ = prep.state()
    QA, QG, ev = (tensors[f"layers.{layer}.{k}"] for k in ("QA", "QG", "eigenvalues"))
    a = torch.diagonal(QA.T @ A_ref @ QA)
    k = int(a.argmax())
    return QG @ torch.diag(ev[:, k] / a[k]) @ QG.T


# ----------------------------------------------------------------------------------------------
# the same draws: the solver against the reference to rounding
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize(
    "name, likelihood",
    [("classifier", "categorical"), ("sequence", "categorical"), ("regression", "gaussian")],
)
def test_matches_reference_on_the_same_draws(request, name, likelihood, cls):
    """The factors from ``samples=3`` draws (seed 11, blocks of 7 examples) equal the reference built from
    the numpy re-implementation of the draws: categorical labels per position (the sequence model's
    mean over valid tokens scaled by √w_t = 1/√T_i, ignored tokens left out), Gaussian targets with
    variance 1/(2c_k) per output."""
    prob = request.getfixturevalue(name)
    model, _, X, y, paths = prob
    op = _op(prob)
    prep = cls(fisher="sampled", samples=3, seed=11, lanczos_steps=0).prepare(op, DAMPING)
    assert prep.info["fisher"] == "sampled" and prep.info["likelihood"] == likelihood
    assert prep.info["samples"] == 3 and prep.info["sampling_seed"] == 11
    stats = per_example(model, X, paths)
    cots = sampled_cotangents(stats, y, likelihood, 11, 3)
    D = reference_matrix(model, stats, paths, cots, cls is EKFAC)
    V = torch.randn(op.n_params, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert rel_err(prep._apply(V), torch.linalg.solve(D, V)) < 1e-10


def test_draws_do_not_depend_on_the_block_size(sequence):
    """The draws are keyed by the example's index in the pass: blocks of 5 or of all 24 examples give the
    same factors (to float64 summation order)."""
    a = EKFAC(fisher="sampled", samples=2, lanczos_steps=0).prepare(_op(sequence, 5), DAMPING)
    b = EKFAC(fisher="sampled", samples=2, lanczos_steps=0).prepare(_op(sequence, 24), DAMPING)
    ta, tb = a.state()[0], b.state()[0]
    for k in ta:
        assert torch.allclose(ta[k], tb[k], rtol=1e-12, atol=1e-14), k


# ----------------------------------------------------------------------------------------------
# convergence to the exact true Fisher
# ----------------------------------------------------------------------------------------------
def _exact_and_spread(stats, y, path, likelihood):
    """(G_exact, per-example Var_i = E‖X_i‖²_F − ‖E X_i‖²_F, G_naive) for X_i = Σ_t δ_t δ_tᵀ of ONE draw.

    Categorical: every label combination of the valid positions enumerated with its probability
    Π_t p_t(ŷ_t); δ_t = Σ_t' √w_t' M_tt' (p_t' − e_ŷt'). G_naive: the same with the weight w_t instead of
    √w_t (the plain gradient of the mean loss at the sampled labels; (1/T_i)× too small).
    Gaussian: δ ~ N(0, Σ) with Σ = M diag(2c) Mᵀ (T = 1): Var = (tr Σ)² + tr(Σ²)."""
    H = exact_output_hessians(stats, y, likelihood)
    G = g_factor(stats, path, H)
    var = []
    G_naive = torch.zeros_like(G)
    for i, (z, L) in enumerate(stats):
        M = L[path][1]  # (T, out, K)
        if likelihood == "gaussian":
            Sig = M[0] @ H[i] @ M[0].T
            var.append(float(torch.trace(Sig) ** 2 + torch.trace(Sig @ Sig)))
            continue
        w = ce_weights(y)[i]
        P = torch.softmax(z.reshape(w.numel(), -1), -1)
        Vn = P.shape[1]
        valid = [t for t in range(w.numel()) if w[t] > 0]
        EX = torch.zeros(M.shape[1], M.shape[1], dtype=F64)
        EX_naive = torch.zeros_like(EX)
        EX2 = 0.0
        for combo in itertools.product(range(Vn), repeat=len(valid)):
            prob = 1.0
            eps = torch.zeros(w.numel(), Vn, dtype=F64)
            for t, c in zip(valid, combo):
                prob *= float(P[t, c])
                eps[t] = P[t] - F.one_hot(torch.tensor(c), Vn).to(F64)
            for scale, acc in ((w.sqrt(), EX), (w, EX_naive)):
                d = torch.einsum("tok,k->to", M, (scale.unsqueeze(1) * eps).reshape(-1))
                X_ = d.T @ d
                acc += prob * X_
                if acc is EX:
                    EX2 += prob * float((X_ * X_).sum())
        var.append(EX2 - float((EX * EX).sum()))
        G_naive += EX_naive
    return G, torch.tensor(var), G_naive / len(stats)


@pytest.mark.parametrize(
    "name, likelihood",
    [("classifier", "categorical"), ("sequence", "categorical"), ("regression", "gaussian")],
)
def test_converges_to_the_exact_true_fisher(request, name, likelihood):
    """‖G_sampled − G_exact‖_F ≤ 5 standard errors for 1, 16 and 256 samples, every layer.

    E[G_sampled] = G_exact and E‖G_sampled − G_exact‖²_F = Σ_i Var_i / (n² samples) (the examples' draws
    are independent), both computed here from the exact distribution of one draw; 5 standard errors
    is a Chebyshev bound (a fixed seed makes the test deterministic; over seeds it would fail with
    probability < 4 %, in practice far less: the squared error is a sum of many independent terms).
    The exact G itself equals KFAC(fisher="true")'s to rounding, and the bound is tight enough to
    reject the unscaled mean-loss gradient (G/T for the sequence model)."""
    prob = request.getfixturevalue(name)
    model, _, X, y, paths = prob
    op = _op(prob)
    n = X.shape[0]
    stats = per_example(model, X, paths)
    true = KFAC(fisher="true", lanczos_steps=0).prepare(op, DAMPING)
    preps = {S: KFAC(fisher="sampled", samples=S, lanczos_steps=0).prepare(op, DAMPING) for S in (1, 16, 256)}
    for layer, path in enumerate(paths):
        acts = [L[path][0] for _, L in stats]
        A = sum(a.T @ a for a in acts) / sum(a.shape[0] for a in acts)
        G, var, G_naive = _exact_and_spread(stats, y, path, likelihood)
        assert rel_err(solver_g(true, layer, A), G) < 1e-10  # "true" is the exact target
        se1 = math.sqrt(float(var.sum())) / n  # the standard error of one sample
        for S, prep in preps.items():
            err = float(torch.linalg.norm(solver_g(prep, layer, A) - G))
            assert err <= 5 * se1 / math.sqrt(S), (path, S, err, se1 / math.sqrt(S))
        assert 5 * se1 / 16 < 0.25 * float(torch.linalg.norm(G))  # 256 samples: a sharp test
        if name == "sequence":  # the 1/T scaling matters and the test sees it
            assert float(torch.linalg.norm(G_naive - G)) > 5 * se1 / 16


# ----------------------------------------------------------------------------------------------
# seeds
# ----------------------------------------------------------------------------------------------
def test_seeded_and_deterministic(classifier):
    op = _op(classifier)
    a = KFAC(fisher="sampled", seed=5, lanczos_steps=0).prepare(op, DAMPING).state()[0]
    b = KFAC(fisher="sampled", seed=5, lanczos_steps=0).prepare(op, DAMPING).state()[0]
    c = KFAC(fisher="sampled", seed=6, lanczos_steps=0).prepare(op, DAMPING).state()[0]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a["layers.1.QG"].abs(), c["layers.1.QG"].abs())
    fresh = [KFAC(fisher="sampled", seed=None, lanczos_steps=0).prepare(op, DAMPING) for _ in range(2)]
    assert fresh[0].info["sampling_seed"] != fresh[1].info["sampling_seed"]


# ----------------------------------------------------------------------------------------------
# options and refusals
# ----------------------------------------------------------------------------------------------
def test_options_validated():
    assert KFAC(fisher="Sampled", samples=4, likelihood="Categorical").likelihood == "categorical"
    with pytest.raises(ValueError, match="samples must be"):
        KFAC(fisher="sampled", samples=0)
    with pytest.raises(TypeError, match="samples must be an integer"):
        KFAC(fisher="sampled", samples=2.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"samples=4 is used only with fisher='sampled'"):
        EKFAC(samples=4)
    with pytest.raises(ValueError, match=r"likelihood='gaussian' is used only with fisher='sampled'"):
        KFAC(fisher="empirical", likelihood="gaussian")
    with pytest.raises(ValueError, match="likelihood must be 'auto', 'categorical' or 'gaussian'"):
        KFAC(fisher="sampled", likelihood="poisson")
    with pytest.raises(ValueError, match="max_outputs must be"):
        KFAC(max_outputs=0)
    with pytest.raises(ValueError, match="fisher must be 'true', 'sampled' or 'empirical'"):
        KFAC(fisher="monte-carlo")


def test_exact_true_fisher_refuses_large_output_spaces(sequence):
    """K = T·V = 12 outputs per example: max_outputs=11 refuses with the advice, 12 works."""
    op = _op(sequence)
    with pytest.raises(ValueError, match=r"K = 12 outputs per example.*max_outputs=11.*fisher='sampled'"):
        KFAC(max_outputs=11, lanczos_steps=0).prepare(op, DAMPING)
    KFAC(max_outputs=12, lanczos_steps=0).prepare(op, DAMPING)
    KFAC(fisher="sampled", max_outputs=11, lanczos_steps=0).prepare(op, DAMPING)  # no limit for sampling


def _prepare(model, loss, X, y, **kw):
    op = TorchInfluence(model, loss, (X, y), l2=L2, damping=DAMPING, optimum_tol=None).operator
    return KFAC(fisher="sampled", lanczos_steps=0, **kw).prepare(op, DAMPING)


def test_losses_that_do_not_fit_the_likelihood_are_refused(classifier, regression):
    model, _, X, y, _ = classifier
    misfit = r"fisher='sampled', likelihood='categorical'\): the loss does not fit a categorical likelihood"
    with pytest.raises(ValueError, match=misfit + r".*label smoothing"):
        _prepare(model, lambda o, t: F.cross_entropy(o, t, reduction="none", label_smoothing=0.1), X, y)
    weight = torch.tensor([1.0, 2.0, 1.0], dtype=F64)
    with pytest.raises(ValueError, match=misfit + r".*at example \d+ it misfits"):
        _prepare(model, lambda o, t: F.cross_entropy(o, t, weight=weight, reduction="none"), X, y)
    with pytest.raises(ValueError, match=misfit):  # a concave loss: a negative weight
        _prepare(model, lambda o, t: -F.cross_entropy(o, t, reduction="none"), X, y)
    # squared error on logits with integer labels: not a cross-entropy
    with pytest.raises(ValueError, match=misfit):
        _prepare(model, lambda o, t: ((o - torch.eye(3, dtype=F64)[t]) ** 2).sum(1), X, y)
    rmodel, _, RX, RY, _ = regression
    gmisfit = r"likelihood='gaussian'\): the loss does not fit a gaussian likelihood"
    with pytest.raises(ValueError, match=gmisfit + r".*Huber"):
        _prepare(rmodel, lambda o, t: F.smooth_l1_loss(o, t, reduction="none").sum(1), RX, RY)
    with pytest.raises(ValueError, match=gmisfit):  # outputs coupled in the loss
        _prepare(rmodel, lambda o, t: ((o - t).sum(1)) ** 2 + ((o - t) ** 2).sum(1), RX, RY)
    with pytest.raises(ValueError, match=gmisfit):  # logistic loss on floating targets
        _prepare(rmodel, lambda o, t: F.binary_cross_entropy_with_logits(o, t.sigmoid(), reduction="none").sum(1),
                 RX, RY)  # fmt: skip


def test_targets_that_fit_no_likelihood_are_refused(classifier, regression):
    model, _, X, y, _ = classifier
    with pytest.raises(ValueError, match=r"likelihood='auto'\): cannot tell the likelihood.*fisher='true'"):
        _prepare(model, lambda o, t: ((o - t.unsqueeze(1)) ** 2).sum(1), X, y.to(F64))
    with pytest.raises(ValueError, match=r"likelihood='categorical'\) needs integer class targets"):
        _prepare(model, lambda o, t: (o[:, 0] - t) ** 2, X, y.to(F64), likelihood="categorical")
    rmodel, loss, RX, RY, _ = regression
    with pytest.raises(ValueError, match=r"likelihood='gaussian'\) needs targets of the outputs' shape"):
        _prepare(rmodel, lambda o, t: (o[:, 0] - t) ** 2, RX, RY[:, 0], likelihood="gaussian")
    # an explicit likelihood that fits works as "auto"
    a = _prepare(rmodel, loss, RX, RY, likelihood="gaussian", seed=3).state()[0]
    b = _prepare(rmodel, loss, RX, RY, seed=3).state()[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# saving and restoring
# ----------------------------------------------------------------------------------------------
def test_state_round_trip_keeps_the_sampling_fields(sequence):
    op = _op(sequence)
    solver = EKFAC(fisher="sampled", samples=2, seed=4, lanczos_steps=0)
    prep = solver.prepare(op, DAMPING)
    tensors, meta = prep.state()
    meta = json.loads(json.dumps(meta, allow_nan=False))
    cfg = meta["config"]
    assert (cfg["fisher"], cfg["samples"], cfg["likelihood"]) == ("sampled", 2, "auto")
    assert "max_outputs" not in cfg  # at its default: configurations written before it read back the same
    assert solver_from_config("ekfac", cfg) == solver
    V = torch.randn(op.n_params, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    again: Any = solver.restore(op, DAMPING, tensors, meta)
    assert torch.equal(again._apply(V), prep._apply(V))
    with pytest.raises(ValueError, match=r"another configuration: samples \(saved 2, here 3\)"):
        EKFAC(fisher="sampled", samples=3, seed=4, lanczos_steps=0).restore(op, DAMPING, tensors, meta)
    assert "samples" not in EKFAC().config() and "likelihood" not in EKFAC().config()
    assert KFAC(max_outputs=1000).config()["max_outputs"] == 1000
    assert solver_from_config("kfac", KFAC(max_outputs=1000).config()) == KFAC(max_outputs=1000)
