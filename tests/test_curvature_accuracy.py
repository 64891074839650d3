"""The curvature-accuracy study (pyinfluence.bench.studies.curvature_accuracy): its dense matrices against
torch.autograd computations written here, its CG counter against CG's exact-arithmetic behaviour, and a
quick end-to-end run of both parts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyinfluence.bench import ladder
from pyinfluence.bench.studies import curvature_accuracy as ca


def _rung(sizes, seed=0, n=25, m=4) -> ladder.Rung:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, sizes[0], generator=g, dtype=torch.float64)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    Xt = torch.randn(m, sizes[0], generator=g, dtype=torch.float64)
    yt = torch.randint(0, sizes[-1], (m,), generator=g)
    arch = {"kind": "mlp", "sizes": list(sizes), "activation": "tanh"}
    torch.manual_seed(seed + 1)
    model = ladder.build_model(arch).eval()
    return ladder.Rung(
        "mlp-2k", "tiny", arch, model, ladder._loss_for(arch), X, y, Xt, yt, 1e-2, 0.1, None, False, {}
    )


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _call(model, flat, X):
    out, i, ps = None, 0, {}
    for name, p in model.named_parameters():
        ps[name] = flat[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    out = torch.func.functional_call(model, ps, (X,))
    return out


def test_hessian_matches_autograd():
    r = _rung([3, 4, 3])
    theta = _flat(r.model)

    def objective(t):
        return F.cross_entropy(_call(r.model, t, r.X_train), r.y_train) + 0.5 * r.l2 * (t @ t)

    H = torch.autograd.functional.hessian(objective, theta)
    assert torch.allclose(ca._Dense(r).hessian(), 0.5 * (H + H.T), atol=1e-12)


def test_ggn_matches_its_formula_and_equals_the_hessian_of_a_linear_model():
    r = _rung([3, 4, 3])
    theta = _flat(r.model)
    d = ca._Dense(r)
    ggn = torch.zeros(d.p, d.p, dtype=torch.float64)
    for i in range(r.X_train.shape[0]):  # J_iᵀ (diag p − p pᵀ) J_i, example by example
        x = r.X_train[i : i + 1]
        J = torch.autograd.functional.jacobian(lambda t, x=x: _call(r.model, t, x)[0], theta)
        prob = torch.softmax(_call(r.model, theta, r.X_train[i : i + 1])[0], -1).detach()
        ggn += J.T @ (torch.diag(prob) - torch.outer(prob, prob)) @ J
    ggn = ggn / r.X_train.shape[0] + r.l2 * torch.eye(d.p, dtype=torch.float64)
    assert torch.allclose(d.ggn(rows=7), ggn, atol=1e-12)
    lin = ca._Dense(_rung([3, 4]))  # softmax regression: outputs linear in θ, so GGN = H exactly
    assert torch.allclose(lin.ggn(), lin.hessian(), atol=1e-12)


def test_module_blocks_group_weight_and_bias():
    d = ca._Dense(_rung([3, 4, 5]))
    assert d.module_blocks() == [(0, 3 * 4 + 4), (16, 16 + 4 * 5 + 5)]
    C = torch.arange(16.0).reshape(4, 4)
    B = ca._blocks(C, [(0, 1), (1, 4)])
    assert B[0, 0] == 0 and B[0, 1] == 0 and torch.equal(B[1:, 1:], C[1:, 1:]) and B[1:, 0].abs().sum() == 0


def test_up_loss_is_minus_g_h_inverse_g():
    r = _rung([3, 4, 3])
    r.damping = 1.0  # an untrained network: H may be indefinite
    d = ca._Dense(r)
    H = d.hessian()
    assert float(torch.linalg.eigvalsh(H)[0]) > -0.5
    up = d.up_loss(H, r.damping)
    theta = _flat(r.model)

    def g(x, y):
        t = theta.clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(_call(r.model, t, x[None]), y[None]), t)[0]

    Gtr = torch.stack([g(x, y) for x, y in zip(r.X_train, r.y_train)])
    Gte = torch.stack([g(x, y) for x, y in zip(r.X_test, r.y_test)])
    ref = -Gtr @ torch.linalg.solve(H + r.damping * torch.eye(d.p, dtype=torch.float64), Gte.T)
    np.testing.assert_allclose(up, ref.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="not positive definite"):
        d.up_loss(-H, 0.0)


def test_pcg_counter_follows_exact_arithmetic():
    # CG on a matrix with k distinct eigenvalues converges in at most k iterations; with M = A⁻¹ in one
    A = torch.diag(torch.tensor([1.0] * 5 + [3.0] * 4 + [10.0] * 3, dtype=torch.float64))
    Q, _ = torch.linalg.qr(
        torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    )
    A = Q @ A @ Q.T
    B = torch.randn(12, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert ca._pcg_iterations(A, B, None, tol=1e-10) == 3
    assert ca._pcg_iterations(A, B, torch.linalg.inv(A), tol=1e-10) == 1
    assert ca._pcg_iterations(A, B, None, tol=1e-10, max_iter=2) == 2  # gave up


@pytest.mark.slow
def test_quick_study_end_to_end():
    dec = ca.decompose("mlp-2k", seeds=[0], test_points=3, quick=True)
    (entry,) = dec
    assert set(entry["rows"]) == {
        "GGN (full)",
        "GGN, per-module blocks",
        "K-FAC (true Fisher)",
        "EK-FAC (true Fisher)",
        "EK-FAC (empirical Fisher)",
    }
    for row in entry["rows"].values():
        assert -1 <= row["pearson"] <= 1 and math.isfinite(row["slope"])
    assert all(1 <= k < 5000 for k in entry["pcg"].values())
    pre = ca.preconditioning("mlp-2k", dampings=[1e-2], tols=[1e-6], test_points=3, quick=True)
    assert [r["preconditioner"] for r in pre] == ["none", "ekfac"]
    for r in pre:
        assert r["pearson"] > 1 - 1e-6 and abs(r["slope"] - 1) < 1e-4 and r["hvp_columns"] > 0
    assert pre[1]["ritz_min"] is not None and pre[1]["ritz_min"] <= pre[1]["ritz_max"]
    text = ca.markdown({"decomposition": dec, "preconditioning": pre, "settings": {"pcg_test_points": 3}})
    assert "Error decomposition" in text and "| mlp-2k | 0.01 | 1e-06 | ekfac |" in text
