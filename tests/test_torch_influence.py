"""TorchInfluence: the torch path of pyinfluence.

- Linear models written in torch (nn.Linear + per-example BCE-with-logits, cross-entropy and the
  smooth hinge), with θ̂ copied from pyinfluence's exactly fitted linear models: Exact and CG give
  LinearInfluence's numbers (the C++ core's closed forms — an independent implementation).
- A 64-32-10 tanh MLP on digits (2410 parameters, weight decay, fitted by L-BFGS): CG matches
  Exact, LiSSA with automatic scale correlates with Exact (Pearson ≥ 0.98), a too-small LiSSA
  scale raises ConvergenceError, top_k agrees with argsort of up_loss.
- Damping on a model with an indefinite Hessian (analytic reference), bad input, caching, test
  data forms, CUDA (skipped without a GPU).
"""

from __future__ import annotations

import functools
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyinfluence
from pyinfluence.errors import ConvergenceError, NotAtOptimumWarning, NotPositiveDefiniteError
from pyinfluence.torch.influence import TorchInfluence
from pyinfluence.torch.losses import smooth_hinge_loss
from pyinfluence.torch.solvers import CG, BlockCG, Exact, LiSSA

from helpers import cross_entropy as ce

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# torch's own forward-mode decompositions call the deprecated torch.jit.script on first use
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
DT = torch.float64


def rel(a, b) -> float:
    a = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    b = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def bce(out, y):
    return F.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction="none")


# ----------------------------------------------------------------------------------------------
# linear models: TorchInfluence == LinearInfluence
# ----------------------------------------------------------------------------------------------
def _linear_problem(kind: str) -> SimpleNamespace:
    """model (pyinfluence, fitted), X, y, Xt, yt (numpy), lin (the nn.Linear with θ̂), loss,
    ty, tyt (torch targets for the loss)."""
    rng = np.random.default_rng({"binary": 0, "multinomial": 1, "svm": 2, "noint": 3}[kind])
    n, d = 120, 5
    X = rng.standard_normal((n, d))
    Xt = rng.standard_normal((6, d))
    if kind == "multinomial":
        W = rng.standard_normal((3, d))
        y = np.argmax(X @ W.T + rng.standard_normal((n, 3)), axis=1)
        yt = np.argmax(Xt @ W.T, axis=1)
        model = pyinfluence.LogisticRegression(l2=1e-2, penalize_intercept=True).fit(X, y)
        loss, ty, tyt = ce, torch.tensor(y), torch.tensor(yt)
    else:
        w = rng.standard_normal(d)
        y = (X @ w + 0.7 * rng.standard_normal(n) > 0.2).astype(int)
        yt = (Xt @ w > 0).astype(int)
        if kind == "svm":
            model = pyinfluence.SmoothHingeSVM(l2=1e-2, temperature=0.1, penalize_intercept=True)
            loss = functools.partial(smooth_hinge_loss, temperature=0.1)
            ty, tyt = torch.tensor(2.0 * y - 1), torch.tensor(2.0 * yt - 1)
        else:
            model = pyinfluence.LogisticRegression(
                l2=1e-2, penalize_intercept=True, fit_intercept=(kind != "noint")
            )
            loss, ty, tyt = bce, torch.tensor(y, dtype=DT), torch.tensor(yt, dtype=DT)
        model.fit(X, y)
    K = model.theta_.shape[0]
    lin = nn.Linear(d, K).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(model.theta_[:, :d]))
        lin.bias.copy_(torch.tensor(model.theta_[:, d]) if model.fit_intercept else torch.zeros(K))
    return SimpleNamespace(model=model, X=X, y=y, Xt=Xt, yt=yt, lin=lin, loss=loss, ty=ty, tyt=tyt)


def _perm(K: int, d: int, intercept: bool = True) -> np.ndarray:
    """Torch θ order [weight (K, d) row-major, bias (K,)] → index into LinearInfluence's θ,
    theta_ (K, d+1) row-major with the intercept last."""
    de = d + 1 if intercept else d
    w = [k * de + j for k in range(K) for j in range(d)]
    b = [k * de + d for k in range(K)] if intercept else []
    return np.array(w + b)


@pytest.fixture(scope="module", params=["binary", "multinomial", "svm"])
def linear_case(request):
    c = _linear_problem(request.param)
    li = pyinfluence.LinearInfluence(c.model, c.X, c.y)
    c.ref = {
        "up_loss": li.up_loss(c.Xt, c.yt),
        "up_params": li.up_params(),
        "pert_loss": li.pert_loss(c.Xt, c.yt),
        "self_influence": li.self_influence(),
        "hessian": li.hessian(),
        "loo": li.loo_change(c.Xt, c.yt, [3, 7, 11]),
        "loo_group": li.loo_change(c.Xt, c.yt, [3, 7, 11], group=True),
        "top_k": li.top_k(c.Xt, c.yt, 5),
    }
    return c


@pytest.mark.parametrize("solver", ["exact", CG(tol=1e-12), BlockCG(tol=1e-12)])
def test_linear_models_match_linear_influence(linear_case, solver):
    c = linear_case
    ref = c.ref
    n, d = c.X.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotAtOptimumWarning)  # θ̂ is the exact optimum
        ti = TorchInfluence(c.lin, c.loss, (torch.tensor(c.X), c.ty), l2=c.model.l2, solver=solver)
    P = _perm(c.model.theta_.shape[0], d)
    Xt = torch.tensor(c.Xt)
    up = ti.up_loss(Xt, c.tyt)
    assert up.shape == (n, len(Xt)) and up.dtype == DT
    assert rel(up, ref["up_loss"]) <= 1e-6
    assert rel(ti.up_params(), ref["up_params"][:, P]) <= 1e-6
    pert = ti.pert_loss(Xt, c.tyt)
    assert pert.shape == (n, len(Xt), d)
    assert rel(pert, ref["pert_loss"]) <= 1e-6
    assert rel(ti.self_influence(), ref["self_influence"]) <= 1e-6
    assert rel(ti.loo_change(Xt, c.tyt, [3, 7, 11]), ref["loo"]) <= 1e-6
    assert rel(ti.loo_change(Xt, c.tyt, [3, 7, 11], group=True), ref["loo_group"]) <= 1e-6
    tk = ti.top_k(Xt, c.tyt, 5)
    np.testing.assert_array_equal(tk.helpful_idx.numpy(), ref["top_k"].helpful_idx)
    np.testing.assert_array_equal(tk.harmful_idx.numpy(), ref["top_k"].harmful_idx)
    assert rel(tk.harmful_scores, ref["top_k"].harmful_scores) <= 1e-6
    if solver == "exact":
        assert rel(ti.hessian(), ref["hessian"][np.ix_(P, P)]) <= 1e-12
        assert ti.last_solve.solver == "exact"
    else:
        assert ti.last_solve.solver == solver.name and ti.last_solve.iterations > 0
    assert float(ti.last_solve.residual.max()) < 1e-8


def test_selected_parameters_only_and_no_intercept():
    """fit_intercept=False ≡ an nn.Linear whose (zero) bias is not selected: θ = weight only,
    the bias held fixed, l2 on the weight only."""
    c = _linear_problem("noint")
    li = pyinfluence.LinearInfluence(c.model, c.X, c.y)
    ti = TorchInfluence(c.lin, c.loss, (torch.tensor(c.X), c.ty), params=["weight"], l2=c.model.l2)
    assert ti.param_names == ["weight"] and ti.n_params == c.X.shape[1]
    assert rel(ti.up_loss(torch.tensor(c.Xt), c.tyt), li.up_loss(c.Xt, c.yt)) <= 1e-10
    assert rel(ti.up_params(), li.up_params()) <= 1e-10
    assert rel(ti.hessian(), li.hessian()) <= 1e-12
    assert rel(ti.params, c.model.theta_.ravel()) == 0


def test_consistency_between_methods():
    c = _linear_problem("multinomial")
    X = torch.tensor(c.X)
    ti = TorchInfluence(c.lin, c.loss, (X, c.ty), l2=c.model.l2)
    idx = [0, 5, 9]
    up = ti.up_loss(X[idx], c.ty[idx], idx)
    torch.testing.assert_close(torch.diagonal(up), ti.self_influence(idx), rtol=1e-12, atol=0)
    # up_loss = ∇L_testᵀ up_params  (with the training points themselves as test points)
    G = ti.gradients(idx)
    torch.testing.assert_close(up, ti.up_params(idx) @ G.T, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ti.up_params(idx), -torch.linalg.solve(ti.hessian(), G.T).T)
    # s_test: up_loss[i, j] = −∇L_iᵀ s_test[:, j]
    S = ti.s_test(X[idx], c.ty[idx])
    torch.testing.assert_close(up, -(G @ S), rtol=1e-12, atol=1e-15)
    assert (ti.self_influence() <= 0).all()


# ----------------------------------------------------------------------------------------------
# the digits MLP
# ----------------------------------------------------------------------------------------------
MLP_L2 = 1e-3
# The MLP is fitted by L-BFGS to ‖∇R‖ ≈ 1e-3, not to a strict minimum: its Hessian has a few
# eigenvalues ≈ −1e-4 (checked below), so every solver gets damping λ = 0.01 (Koh & Liang §4).
MLP_DAMPING = 1e-2


@pytest.fixture(scope="module")
def digits_mlp():
    sk = pytest.importorskip("sklearn.datasets")
    X, y = sk.load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(X))
    X, y = torch.tensor(X[perm] / 16.0), torch.tensor(y[perm])
    Xtr, ytr, Xte, yte = X[:1437], y[:1437], X[1437:], y[1437:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).to(DT)
    ps = list(model.parameters())
    opt = torch.optim.LBFGS(
        ps,
        lr=1,
        max_iter=300,
        tolerance_grad=1e-9,
        tolerance_change=0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        R = ce(model(Xtr), ytr).mean() + 0.5 * MLP_L2 * sum((p**2).sum() for p in ps)
        R.backward()
        return R

    opt.step(closure)
    exact = TorchInfluence(model, ce, (Xtr, ytr), l2=MLP_L2, damping=MLP_DAMPING, solver="exact")
    Xt, yt = Xte[:5], yte[:5]
    up = exact.up_loss(Xt, yt)
    return SimpleNamespace(model=model, Xtr=Xtr, ytr=ytr, Xt=Xt, yt=yt, exact=exact, up=up)


def test_mlp_is_near_stationary_but_not_convex(digits_mlp):
    m = digits_mlp
    assert m.exact.n_params == 2410 and m.exact.grad_norm_ < 1e-2
    H = m.exact.hessian()  # kept from the Exact solve: not rebuilt
    ev = torch.linalg.eigvalsh(H)
    assert ev[0] < 0 < ev[-1]  # a saddle-ish point: damping is needed

    class Cached:  # the same H for the solver, without rebuilding it
        n_params, dtype, device, n_train = H.shape[0], H.dtype, H.device, len(m.Xtr)

        def dense(self):
            return H

    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        Exact().prepare(Cached(), 0.0)
    Exact().prepare(Cached(), MLP_DAMPING)


def _mlp_influence(m, solver):
    return TorchInfluence(m.model, ce, (m.Xtr, m.ytr), l2=MLP_L2, damping=MLP_DAMPING, solver=solver)


def test_mlp_cg_matches_exact(digits_mlp):
    m = digits_mlp
    cg = _mlp_influence(m, CG(tol=1e-10))
    assert rel(cg.up_loss(m.Xt, m.yt), m.up) <= 1e-6
    res = cg.last_solve
    assert res.solver == "cg" and float(res.residual.max()) <= 1e-9
    idx = [0, 100, 1436]
    assert rel(cg.pert_loss(m.Xt, m.yt, idx), m.exact.pert_loss(m.Xt, m.yt, idx)) <= 1e-6
    assert rel(cg.self_influence(idx), m.exact.self_influence(idx)) <= 1e-6
    assert cg.n_solves == 2  # up_loss and pert_loss share s_test; self_influence solves once


def test_mlp_block_cg_matches_exact_with_fewer_hvps_than_cg(digits_mlp):
    m = digits_mlp
    bcg = _mlp_influence(m, BlockCG(tol=1e-10))
    assert rel(bcg.up_loss(m.Xt, m.yt), m.up) <= 1e-6
    res = bcg.last_solve
    assert res.solver == "block_cg" and float(res.residual.max()) <= 1e-9
    cg = _mlp_influence(m, CG(tol=1e-10))
    cg.up_loss(m.Xt, m.yt)
    assert res.info["matvec_columns"] < cg.last_solve.info["matvec_columns"]


def test_mlp_lissa_correlates_with_exact(digits_mlp):
    m = digits_mlp
    lissa = _mlp_influence(m, LiSSA(depth=300, repeats=2, batch_size=128, seed=0))
    upl = lissa.up_loss(m.Xt, m.yt)
    assert torch.isfinite(upl).all()
    r = [np.corrcoef(upl[:, j].numpy(), m.up[:, j].numpy())[0, 1] for j in range(m.up.shape[1])]
    assert min(r) >= 0.98, r
    assert lissa.last_solve.info["scale_source"] == "auto"


def test_mlp_lissa_too_small_scale_raises(digits_mlp):
    m = digits_mlp
    lissa = _mlp_influence(m, LiSSA(depth=200, scale=0.05, repeats=1, batch_size=64))
    with pytest.raises(ConvergenceError, match="diverged"):
        lissa.up_loss(m.Xt, m.yt)


def test_mlp_top_k_agrees_with_argsort(digits_mlp):
    m = digits_mlp
    n_before = m.exact.n_solves
    tk = m.exact.top_k(m.Xt, m.yt, k=7)
    assert m.exact.n_solves == n_before  # s_test reused from the fixture's up_loss
    assert tk.helpful_idx.shape == (5, 7) and tk.helpful_idx.dtype == torch.int64
    order = torch.argsort(m.up, dim=0)  # ascending: most helpful first
    torch.testing.assert_close(tk.helpful_idx, order[:7].T)
    torch.testing.assert_close(tk.harmful_idx, order.flip(0)[:7].T)
    torch.testing.assert_close(tk.helpful_scores, m.up.gather(0, order[:7]).T)
    assert (tk.helpful_scores[:, :-1] <= tk.helpful_scores[:, 1:]).all()
    assert (tk.harmful_scores[:, :-1] >= tk.harmful_scores[:, 1:]).all()


def test_mlp_up_params_and_loo(digits_mlp):
    m = digits_mlp
    idx = [3, 30, 300]
    Ip = m.exact.up_params(idx)
    ps = list(m.model.parameters())
    gt = []
    for j in range(len(m.Xt)):  # independent test gradients by autograd
        li = ce(m.model(m.Xt[j : j + 1]), m.yt[j : j + 1]).sum()
        gt.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, ps)]))
    torch.testing.assert_close(Ip @ torch.stack(gt).T, m.up[idx], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(m.exact.loo_change(m.Xt, m.yt, idx), -m.up[idx] / 1437)
    torch.testing.assert_close(m.exact.loo_change(m.Xt, m.yt, idx, group=True), -m.up[idx].sum(0) / 1437)


# ----------------------------------------------------------------------------------------------
# damping on an indefinite Hessian (analytic)
# ----------------------------------------------------------------------------------------------
def test_damping_on_indefinite_hessian():
    """f(x) = w2·w1·x (two scalar layers, L = ½(f − y)²) at w = (a, 0): the Hessian is
    H = [[0, −c], [−c, a²·mean(x²)]] with c = mean(x·y), indefinite (det = −c²), and the
    per-example gradients are (0, −a·x·y). Exact (and CG) refuse without damping and, with damping
    λ above the negative eigenvalue, solve (H + λI) exactly."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, generator=g, dtype=DT)
    y = 2 * x[:, 0] + 0.1 * torch.randn(40, generator=g, dtype=DT)
    a = 0.5
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)).to(DT)
    with torch.no_grad():
        model[0].weight.fill_(a)
        model[1].weight.zero_()

    def sq(out, t):
        return 0.5 * (out.squeeze(-1) - t) ** 2

    c = float((x[:, 0] * y).mean())
    b = a * a * float((x**2).mean())
    H = torch.tensor([[0.0, -c], [-c, b]], dtype=DT)
    G = torch.stack([torch.zeros(40, dtype=DT), -a * x[:, 0] * y], 1)
    lam_min = float(torch.linalg.eigvalsh(H)[0])
    assert lam_min < 0
    ti = TorchInfluence(model, sq, (x, y), solver="exact", optimum_tol=None)
    torch.testing.assert_close(ti.hessian(), H)
    torch.testing.assert_close(ti.gradients(), G)
    with pytest.raises(NotPositiveDefiniteError, match="damping"):
        ti.up_loss(x[:3], y[:3])
    with pytest.raises(NotPositiveDefiniteError):
        TorchInfluence(model, sq, (x, y), solver=CG(tol=1e-12), optimum_tol=None).up_params([0, 1])
    lam = -2 * lam_min
    ref = -torch.linalg.solve(H + lam * torch.eye(2, dtype=DT), G.T).T
    for solver in ["exact", CG(tol=1e-12)]:
        td = TorchInfluence(model, sq, (x, y), damping=lam, solver=solver, optimum_tol=None)
        torch.testing.assert_close(td.up_params(), ref)


# ----------------------------------------------------------------------------------------------
# data forms, caching, warnings, progress
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    c = _linear_problem("multinomial")
    X, Xt = torch.tensor(c.X), torch.tensor(c.Xt)
    ti = TorchInfluence(c.lin, c.loss, (X, c.ty), l2=c.model.l2)
    return SimpleNamespace(ti=ti, lin=c.lin, loss=c.loss, X=X, y=c.ty, Xt=Xt, yt=c.tyt, model=c.model)


def test_test_data_forms(small):
    s = small
    ref = s.ti.up_loss(s.Xt, s.yt)
    DS = torch.utils.data.TensorDataset
    DL = torch.utils.data.DataLoader
    for form in [(s.Xt, s.yt), [s.Xt, s.yt], DS(s.Xt, s.yt), DL(DS(s.Xt, s.yt), batch_size=4)]:
        torch.testing.assert_close(s.ti.up_loss(form), ref, rtol=0, atol=0)
    torch.testing.assert_close(s.ti.up_loss(s.Xt.numpy(), s.yt.numpy()), ref, rtol=0, atol=0)
    one = s.ti.up_loss(s.Xt[2], s.yt[2])  # a single example without the batch axis: m = 1 kept
    assert one.shape == (len(s.X), 1)
    torch.testing.assert_close(one[:, 0], ref[:, 2], rtol=1e-12, atol=1e-15)
    # a subset of training points: per-example gradients of a smaller vmap batch may round differently
    torch.testing.assert_close(s.ti.up_loss(s.Xt, s.yt, [4, -1])[1], ref[-1], rtol=1e-12, atol=1e-15)
    mask = torch.zeros(len(s.X), dtype=torch.bool)
    mask[[1, 2]] = True
    torch.testing.assert_close(s.ti.up_loss(s.Xt, s.yt, mask), ref[[1, 2]], rtol=1e-12, atol=1e-15)
    assert s.ti.up_loss(s.Xt, s.yt, []).shape == (0, len(s.Xt))
    # training data as a DataLoader: the same influence values
    t2 = TorchInfluence(s.lin, s.loss, DL(DS(s.X, s.y), batch_size=32), l2=s.ti.l2)
    torch.testing.assert_close(t2.up_loss(s.Xt, s.yt), ref)


def test_s_test_is_cached_by_value(small):
    s = small
    ti = s.ti
    ti.clear_cache()
    n0 = ti.n_solves
    up = ti.up_loss(s.Xt, s.yt)
    assert ti.n_solves == n0 + 1
    ti.pert_loss(s.Xt, s.yt)
    ti.top_k(s.Xt, s.yt, 3)
    ti.loo_change(s.Xt, s.yt)
    ti.s_test(s.Xt.clone(), s.yt.clone())  # equal values, other tensors: still cached
    ti.up_loss(torch.utils.data.TensorDataset(s.Xt, s.yt))
    assert ti.n_solves == n0 + 1
    ti.up_loss(s.Xt[:2], s.yt[:2])  # another test set
    assert ti.n_solves == n0 + 2
    ti.clear_cache()
    torch.testing.assert_close(ti.up_loss(s.Xt, s.yt), up, rtol=0, atol=0)
    assert ti.n_solves == n0 + 3


def test_not_at_optimum_warning(small):
    s = small
    moved = nn.Linear(s.lin.in_features, s.lin.out_features).to(DT)
    with torch.no_grad():
        moved.weight.copy_(s.lin.weight + 0.3 * torch.randn(s.lin.weight.shape, dtype=DT))
        moved.bias.copy_(s.lin.bias)
    with pytest.warns(NotAtOptimumWarning, match="not at an optimum"):
        t = TorchInfluence(moved, s.loss, (s.X, s.y), l2=s.model.l2)
    assert t.grad_norm_ > 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotAtOptimumWarning)
        TorchInfluence(moved, s.loss, (s.X, s.y), l2=s.model.l2, optimum_tol=None)
    with pytest.warns(NotAtOptimumWarning):  # a wrong l2 is also "not at the optimum"
        TorchInfluence(s.lin, s.loss, (s.X, s.y), l2=1.0)


def test_progress_bars(small, capsys):
    pytest.importorskip("tqdm")
    s = small
    tp = TorchInfluence(s.lin, s.loss, (s.X, s.y), l2=s.model.l2, progress=True, batch_size=16)
    torch.testing.assert_close(tp.up_loss(s.Xt, s.yt), s.ti.up_loss(s.Xt, s.yt))
    assert "up_loss" in capsys.readouterr().err


def test_repr_and_properties(small):
    s = small
    ti = s.ti
    assert ti.n_train == len(s.X) and ti.n_params == 3 * 6
    assert ti.dtype == DT and ti.device == torch.device("cpu")
    assert ti.param_names == ["weight", "bias"] and ti.params.shape == (18,)
    assert "TorchInfluence(Linear" in repr(ti) and ti.solver.name == "exact"
    assert ti.model is s.lin and ti.operator.n_params == 18


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input(small):
    s = small
    ti, Xt, yt = s.ti, s.Xt, s.yt
    with pytest.raises(ValueError, match="X_test has shape \\(6, 4\\)"):
        ti.up_loss(Xt[:, :4], yt)
    with pytest.raises(ValueError, match="X_test has 6 examples but y_test has 5"):
        ti.up_loss(Xt, yt[:5])
    with pytest.raises(TypeError, match="targets are missing"):
        ti.up_loss(Xt)
    Xn = Xt.clone()
    Xn[1, 1] = float("nan")
    with pytest.raises(ValueError, match="X_test contains NaN"):
        ti.up_loss(Xn, yt)
    with pytest.raises(IndexError, match="train_idx"):
        ti.up_loss(Xt, yt, [len(s.X)])
    with pytest.raises(ValueError, match="k must be <="):
        ti.top_k(Xt, yt, len(s.X) + 1)
    with pytest.raises(ValueError, match="method must be 'influence' or 'newton'"):
        ti.loo_change(Xt, yt, method="newtons")
    with pytest.raises(ValueError, match="train_idx is required"):
        ti.loo_change(Xt, yt, group=True)
    with pytest.raises(ValueError, match="repeated"):
        ti.loo_change(Xt, yt, [1, 1], group=True)


def test_bad_construction(small):
    s = small
    lin, loss, X, y = s.lin, s.loss, s.X, s.y
    with pytest.raises(ValueError, match="neither a parameter name"):
        TorchInfluence(lin, loss, (X, y), params=["fc.weight"])
    with pytest.raises(ValueError, match="selects none"):
        TorchInfluence(lin, loss, (X, y), params=lambda name: False)
    with pytest.raises(ValueError, match="reduction='none'"):
        TorchInfluence(lin, lambda o, t: F.cross_entropy(o, t), (X, y))
    with pytest.raises(ValueError, match="reduction='none'"):
        TorchInfluence(lin, nn.CrossEntropyLoss(), (X, y))
    with pytest.raises(ValueError, match="shape \\(2, 3\\)"):
        TorchInfluence(lin, lambda o, t: o**2, (X, y))
    Xn = X.clone()
    Xn[7, 0] = float("inf")
    with pytest.raises(ValueError, match="train_data inputs contains NaN or infinity.*example 7"):
        TorchInfluence(lin, loss, (Xn, y))
    with pytest.raises(ValueError, match="120 examples but .* has 119"):
        TorchInfluence(lin, loss, (X, y[:-1]))
    with pytest.raises(ValueError, match="solver must be one of 'auto'"):
        TorchInfluence(lin, loss, (X, y), solver="newton")
    with pytest.raises(ValueError, match="damping"):
        TorchInfluence(lin, loss, (X, y), damping=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        TorchInfluence(lambda x: x, loss, (X, y))
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).to(DT)
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        TorchInfluence(bn, loss, (X, y))
    TorchInfluence(bn.eval(), loss, (X, y), optimum_tol=None)  # eval mode is fine
    with pytest.raises(
        ValueError,
        match=r"calling the model on train_data's inputs.*(shapes cannot be "
        r"multiplied|size mismatch|mat1)",
    ):
        TorchInfluence(lin, loss, (X[:, :4], y))


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@CUDA
def test_cuda_matches_cpu(small):
    s = small
    ref = s.ti.up_loss(s.Xt, s.yt)
    for solver in ["exact", CG(tol=1e-12)]:
        tc = TorchInfluence(s.lin, s.loss, (s.X, s.y), l2=s.model.l2, device="cuda", solver=solver)
        up = tc.up_loss(s.Xt, s.yt)
        assert up.device.type == "cuda"
        torch.testing.assert_close(up.cpu(), ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(
            tc.pert_loss(s.Xt, s.yt).cpu(), s.ti.pert_loss(s.Xt, s.yt), rtol=1e-9, atol=1e-12
        )
        assert tc.top_k(s.Xt, s.yt, 3).helpful_idx.device.type == "cuda"
    lc = nn.Linear(s.lin.in_features, s.lin.out_features).to(DT)
    lc.load_state_dict(s.lin.state_dict())
    lc = lc.cuda()
    tg = TorchInfluence(lc, s.loss, (s.X.cuda(), s.y.cuda()), l2=s.model.l2, solver=LiSSA(depth=50))
    assert tg.up_loss(s.Xt.cuda(), s.yt.cuda()).device.type == "cuda"


def test_auto_solver_is_exact_for_small_models_and_block_cg_above():
    from pyinfluence.torch.influence import AUTO_EXACT_MAX_PARAMS

    assert isinstance(TorchInfluence._pick_solver("auto", AUTO_EXACT_MAX_PARAMS), Exact)
    assert type(TorchInfluence._pick_solver("auto", AUTO_EXACT_MAX_PARAMS + 1)) is BlockCG
    assert type(TorchInfluence._pick_solver("block_cg", 10)) is BlockCG
