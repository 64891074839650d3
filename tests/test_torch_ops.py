"""The torch machinery of TorchInfluence (pyinfluence.torch: functional, data, hessian, losses).

References are independent of the code under test: per-example gradients from a slow loop of
``torch.autograd.grad`` on the model itself, Hessians from ``torch.func.hessian`` of the mean
loss (+ L2) written out here, the smooth hinge from the C++ core's SmoothHingeSVM.loss.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian

import pyinfluence
from pyinfluence.torch import data as torch_data
from pyinfluence.torch import functional as torch_functional
from pyinfluence.torch import hessian as torch_hessian
from pyinfluence.torch.losses import smooth_hinge_loss

from helpers import cross_entropy as ce

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# torch's own forward-mode decompositions call the deprecated torch.jit.script on first use
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning"),
    pytest.mark.usefixtures("one_torch_thread"),
]
DT = torch.float64


def mlp(seed=0, d=5, h=4, k=3, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, h)]
    if bn:
        layers.append(nn.BatchNorm1d(h))
    layers += [nn.Tanh(), nn.Linear(h, k)]
    return nn.Sequential(*layers).to(DT)


def data(n=23, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.randint(0, k, (n,), generator=g)
    return X, y


def fm_for(model, params=None, loss=ce):
    return torch_functional.FunctionalModel(
        model, loss, torch_functional.select_params(model, params), torch.device("cpu")
    )


def ref_hessian(model, loss, X, Y, names, l2):
    """torch.func.hessian of (1/n)Σ L + (l2/2)‖θ_sel‖² over the named parameters, as (p, p)."""
    sel = {n: p.detach() for n, p in model.named_parameters() if n in names}
    rest = {n: p.detach() for n, p in model.named_parameters() if n not in names}
    rest.update(dict(model.named_buffers()))

    def R(ps):
        out = functional_call(model, {**rest, **ps}, (X,))
        return loss(out, Y).mean() + 0.5 * l2 * sum((t**2).sum() for t in ps.values())

    Hd = hessian(R)(sel)
    order = [n for n in names]
    return torch.cat(
        [torch.cat([Hd[a][b].reshape(sel[a].numel(), sel[b].numel()) for b in order], 1) for a in order],
        0,
    )


def loop_grads(model, loss, X, Y, names):
    """Per-example gradients by one autograd call per example."""
    ps = [p for n, p in model.named_parameters() if n in names]
    rows = []
    for i in range(X.shape[0]):
        li = loss(model(X[i : i + 1]), Y[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, ps)]))
    return torch.stack(rows)


# ----------------------------------------------------------------------------------------------
# per-example gradients, HVPs, dense Hessian
# ----------------------------------------------------------------------------------------------
def test_per_example_grads_match_autograd_loop():
    model = mlp()
    X, Y = data()
    fm = fm_for(model)
    G = fm.per_example_grads(X, Y)
    ref = loop_grads(model, ce, X, Y, fm.names)
    assert G.shape == (23, fm.n_params) and G.dtype == DT
    torch.testing.assert_close(G, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fm.grad_sum(X, Y), ref.sum(0), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("l2", [0.0, 0.3])
@pytest.mark.parametrize("batch_size", [23, 5])
def test_hvp_and_dense_match_torch_func_hessian(l2, batch_size):
    model = mlp(1)
    X, Y = data(seed=1)
    fm = fm_for(model)
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), l2, batch_size)
    H = ref_hessian(model, ce, X, Y, fm.names, l2)
    V = torch.randn(fm.n_params, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(op.matvec(V), H @ V, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0], rtol=1e-11, atol=1e-12)
    assert op.matvec(V[:, :0]).shape == (fm.n_params, 0)
    W = torch.randn(fm.n_params, 70, dtype=DT, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op.matvec(W), H @ W, rtol=1e-11, atol=1e-12)  # column blocks
    D = op.dense()
    torch.testing.assert_close(D, H, rtol=1e-11, atol=1e-12)
    assert torch.equal(D, D.T)
    for mode in ("fwdrev", "revrev", "autograd", "auto"):  # every HVP mode, 1 and 3 rows
        for W in (V, V[:, :1]):
            hv = fm.hvp_rows(W.T.contiguous(), X, Y, mode) / X.shape[0] + l2 * W.T
            torch.testing.assert_close(hv.T, H @ W, rtol=1e-11, atol=1e-12)
    with pytest.raises(ValueError, match="mode"):
        fm.hvp_rows(V.T, X, Y, "newton")


def test_sample_matvec_is_the_minibatch_hessian():
    model = mlp(2)
    X, Y = data(seed=2)
    fm = fm_for(model)
    l2 = 0.1
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), l2, 4)
    V = torch.randn(fm.n_params, 2, dtype=DT, generator=torch.Generator().manual_seed(3))
    out = op.sample_matvec(V, 9, torch.Generator().manual_seed(7))
    idx = torch.randint(23, (9,), generator=torch.Generator().manual_seed(7))  # same draw
    Hb = ref_hessian(model, ce, X[idx], Y[idx], fm.names, l2)  # mean over the minibatch (+ l2)
    torch.testing.assert_close(out, Hb @ V, rtol=1e-11, atol=1e-12)
    # unbiased: the average over many minibatches approaches the full H V
    g = torch.Generator().manual_seed(0)
    est = torch.stack([op.sample_matvec(V, 23, g) for _ in range(40)]).mean(0)
    full = op.matvec(V)
    assert float((est - full).norm() / full.norm()) < 0.3


def test_gradient_of_objective():
    model = mlp(3)
    X, Y = data(seed=3)
    fm = fm_for(model)
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), 0.2, 7)
    ps = list(model.parameters())
    R = ce(model(X), Y).mean() + 0.1 * sum((p**2).sum() for p in ps)
    ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(R, ps)])
    torch.testing.assert_close(op.gradient(), ref, rtol=1e-12, atol=1e-14)


def test_mixed_input_grad_matches_double_backward():
    """∇x (sᵀ ∇θ L(x_i)) by autograd double backward, one example and one s at a time."""
    model = mlp(4)
    X, Y = data(n=6, seed=4)
    fm = fm_for(model)
    S = torch.randn(2, fm.n_params, dtype=DT, generator=torch.Generator().manual_seed(5))
    J = fm.mixed_input_grad(S, X, Y)
    assert J.shape == (2, 6, 5)
    ps = list(model.parameters())
    for i in range(6):
        for j in range(2):
            x = X[i : i + 1].clone().requires_grad_(True)
            gs = torch.autograd.grad(ce(model(x), Y[i : i + 1]).sum(), ps, create_graph=True)
            dot = sum((g.reshape(-1) * s).sum() for g, s in zip(gs, S[j].split([p.numel() for p in ps])))
            (gx,) = torch.autograd.grad(dot, x)
            torch.testing.assert_close(J[j, i], gx[0], rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------------------------
# parameter selection
# ----------------------------------------------------------------------------------------------
def test_select_params_by_names_prefix_and_predicate():
    model = mlp()
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in torch_functional.select_params(model)] == names
    assert [n for n, _ in torch_functional.select_params(model, "2")] == ["2.weight", "2.bias"]
    assert [n for n, _ in torch_functional.select_params(model, ["2.bias", "0.weight"])] == [
        "0.weight",
        "2.bias",
    ]
    assert [n for n, _ in torch_functional.select_params(model, lambda n: n.endswith("bias"))] == [
        "0.bias",
        "2.bias",
    ]
    assert [n for n, _ in torch_functional.select_params(model, lambda n, p: p.ndim == 2)] == [
        "0.weight",
        "2.weight",
    ]
    model[0].bias.requires_grad_(False)  # None: trainable only; named: also frozen ones
    assert "0.bias" not in [n for n, _ in torch_functional.select_params(model)]
    assert [n for n, _ in torch_functional.select_params(model, ["0.bias"])] == ["0.bias"]


def test_select_params_errors():
    model = mlp()
    with pytest.raises(ValueError, match="neither a parameter name nor a module prefix"):
        torch_functional.select_params(model, ["fc.weight"])
    with pytest.raises(ValueError, match="selects no parameters"):
        torch_functional.select_params(model, [])
    with pytest.raises(ValueError, match="selects none"):
        torch_functional.select_params(model, lambda n: False)
    with pytest.raises(TypeError, match="params must"):
        torch_functional.select_params(model, 3)
    mixed = nn.Sequential(nn.Linear(2, 2).double(), nn.Linear(2, 2))
    with pytest.raises(TypeError, match="different dtypes"):
        torch_functional.select_params(mixed)
    assert len(torch_functional.select_params(mixed, ["0"])) == 2  # one dtype within the selection is fine
    assert len(torch_functional.select_params(nn.Linear(2, 2).half())) == 2  # computed in float32
    with warnings.catch_warnings():  # torch warns that complex modules are experimental
        warnings.simplefilter("ignore", UserWarning)
        cplx = nn.Linear(2, 2).to(torch.complex64)
    with pytest.raises(TypeError, match="real floating point"):
        torch_functional.select_params(cplx)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        torch_functional.select_params(frozen)
    with pytest.raises(TypeError, match="nn.Module"):
        torch_functional.select_params(lambda x: x)


def test_selected_subset_hessian_is_the_sub_block():
    """With the other parameters fixed, H over a selection is the sub-block of the full H."""
    model = mlp(5)
    X, Y = data(seed=5)
    full = ref_hessian(model, ce, X, Y, [n for n, _ in model.named_parameters()], 0.0)
    fm = fm_for(model, ["2"])
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), 0.0, 100)
    p0 = sum(p.numel() for p in model[0].parameters())
    torch.testing.assert_close(op.dense(), full[p0:, p0:], rtol=1e-11, atol=1e-12)
    G = fm.per_example_grads(X, Y)
    torch.testing.assert_close(G, loop_grads(model, ce, X, Y, ["2.weight", "2.bias"]))


# ----------------------------------------------------------------------------------------------
# buffers and model modes
# ----------------------------------------------------------------------------------------------
def test_batchnorm_eval_model_uses_running_statistics():
    model = mlp(6, bn=True)
    X, Y = data(seed=6)
    model.train()
    with torch.no_grad():  # give the running statistics non-trivial values
        for _ in range(3):
            model(X * 2 + 1)
    model.eval()
    torch_functional.check_model_mode(model)
    fm = fm_for(model)
    assert "1.running_mean" in fm.fixed
    torch.testing.assert_close(fm.per_example_grads(X, Y), loop_grads(model, ce, X, Y, fm.names))
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), 0.0, 10)
    torch.testing.assert_close(op.dense(), ref_hessian(model, ce, X, Y, fm.names, 0.0))
    # the running statistics were not touched
    before = model[1].running_mean.clone()
    op.matvec(torch.ones(fm.n_params, 1, dtype=DT))
    assert torch.equal(model[1].running_mean, before)


@pytest.mark.parametrize(
    "layer", [nn.BatchNorm1d(4), nn.Dropout(0.5), nn.InstanceNorm1d(4, track_running_stats=True)]
)
def test_training_mode_layers_are_refused(layer):
    model = nn.Sequential(nn.Linear(3, 4), layer, nn.Linear(4, 2))
    model.train()
    with pytest.raises(ValueError, match=r"model.eval\(\)"):
        torch_functional.check_model_mode(model)
    model.eval()
    torch_functional.check_model_mode(model)
    torch_functional.check_model_mode(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.0)).train())  # p = 0: fine


# ----------------------------------------------------------------------------------------------
# data handling
# ----------------------------------------------------------------------------------------------
class PairDataset(torch.utils.data.Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def _pair(*a, **kw):
    kw.setdefault("device", torch.device("cpu"))
    kw.setdefault("dtype", DT)
    return torch_data.as_tensor_pair(*a, **kw)


def test_data_forms_agree():
    X, y = data(n=11)
    ref, single = _pair("d", (X, y))
    assert not single
    DL = torch.utils.data.DataLoader
    for form in [
        [X, y],
        torch.utils.data.TensorDataset(X, y),
        PairDataset(X, y),
        DL(PairDataset(X, y), batch_size=4),
        DL(torch.utils.data.TensorDataset(X, y), batch_size=3, shuffle=False),
    ]:
        d, _ = _pair("d", form)
        assert torch.equal(d.inputs, ref.inputs) and torch.equal(d.targets, ref.targets)
    d, _ = _pair("d", X.numpy(), y.numpy())  # numpy arrays, inputs and targets apart
    assert torch.equal(d.inputs, X) and torch.equal(d.targets, y)
    d, _ = _pair("d", X.float(), y)  # floating inputs follow the parameters' dtype
    assert d.inputs.dtype == DT


def test_data_errors():
    X, y = data(n=11)
    DL = torch.utils.data.DataLoader
    with pytest.raises(ValueError, match="shuffle=False"):
        _pair("train_data", DL(PairDataset(X, y), batch_size=4, shuffle=True))
    with pytest.raises(ValueError, match="drop_last"):
        _pair("train_data", DL(PairDataset(X, y), batch_size=4, drop_last=True))
    with pytest.raises(ValueError, match="11 examples but .* has 10"):
        _pair("train_data", (X, y[:10]))
    with pytest.raises(TypeError, match="targets are missing"):
        _pair("train_data", X)
    with pytest.raises(TypeError, match="pair"):
        _pair("train_data", (X, y, y))
    Xn = X.clone()
    Xn[4, 2] = float("nan")
    with pytest.raises(ValueError, match="train_data inputs contains NaN.*example 4"):
        _pair("train_data", (Xn, y))
    with pytest.raises(ValueError, match="empty"):
        _pair("train_data", (X[:0], y[:0]))
    with pytest.raises(TypeError, match="complex"):
        _pair("train_data", (X.to(torch.complex128), y))


def test_test_data_against_training_shapes():
    X, y = data(n=11)
    train, _ = _pair("train_data", (X, y))
    d, single = _pair("X_test", X[3], y[3], like=train, names=("X_test", "y_test"))
    assert single and d.inputs.shape == (1, 5) and d.targets.shape == (1,)
    d, _ = _pair("X_test", X[:2], y[:2].double(), like=train, names=("X_test", "y_test"))
    assert d.targets.dtype == torch.int64  # integral float labels cast to the training dtype
    with pytest.raises(TypeError, match="non-integral"):
        _pair("X_test", X[:2], torch.tensor([0.5, 1.0]), like=train, names=("X_test", "y_test"))
    with pytest.raises(ValueError, match="X_test has shape \\(2, 4\\)"):
        _pair("X_test", X[:2, :4], y[:2], like=train, names=("X_test", "y_test"))
    with pytest.raises(ValueError, match="y_test has shape"):
        _pair("X_test", X[:2], y[:2, None], like=train, names=("X_test", "y_test"))
    with pytest.raises(ValueError, match="X_test has 2 examples but y_test has 3"):
        _pair("X_test", X[:2], y[:3], like=train, names=("X_test", "y_test"))
    Xi = X[:2].clone()
    Xi[1, 0] = float("inf")
    with pytest.raises(ValueError, match="X_test contains NaN or infinity"):
        _pair("X_test", Xi, y[:2], like=train, names=("X_test", "y_test"))


# ----------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------
def test_reduced_or_misshapen_loss_is_refused():
    model = mlp()
    X, Y = data()
    fm = fm_for(model, loss=lambda o, y: F.cross_entropy(o, y))
    with pytest.raises(ValueError, match="reduction='none'"):
        fm.losses(fm.params, X, Y)
    fm = fm_for(model, loss=lambda o, y: (o - o.mean()) ** 2)
    with pytest.raises(ValueError, match=r"shape \(23, 3\)"):
        fm.losses(fm.params, X, Y)
    fm = fm_for(model, loss=lambda o, y: ce(o, y)[:, None])  # (B, 1) is accepted
    assert fm.losses(fm.params, X, Y).shape == (23,)


@pytest.mark.parametrize("t", [1.0, 0.1, 0.001])
def test_smooth_hinge_matches_the_core(t):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3)) * 3
    y = (X[:, 0] + rng.standard_normal(60) > 0).astype(int)
    svm = pyinfluence.SmoothHingeSVM(l2=1e-2, temperature=0.1).fit(X, y)
    svm.set_params(temperature=t)  # same θ, the loss at temperature t (large margins included)
    ref = svm.loss(X, y)
    scores = torch.tensor(svm.decision_function(X))
    ypm = torch.tensor(2.0 * y - 1.0)
    got = smooth_hinge_loss(scores, ypm, temperature=t)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(smooth_hinge_loss(scores[:, None], ypm[:, None], t).numpy(), ref, rtol=1e-12)


def test_smooth_hinge_is_stable_and_twice_differentiable():
    s = torch.tensor([-1e4, -50.0, 0.0, 1.0, 50.0, 1e4], dtype=DT)
    y = torch.ones(6, dtype=DT)
    t = 0.01
    L = smooth_hinge_loss(s, y, t)
    assert torch.isfinite(L).all()
    np.testing.assert_allclose(L[0].item(), 1.0 + 1e4, rtol=1e-14)  # ≈ hinge for large margins
    assert L[-1].item() == 0.0 or L[-1].item() < 1e-300
    g = torch.func.vmap(torch.func.grad(lambda si: smooth_hinge_loss(si[None], y[:1], t)[0]))(s)
    h = torch.func.vmap(torch.func.hessian(lambda si: smooth_hinge_loss(si[None], y[:1], t)[0]))(s)
    u = (1 - s) / t
    np.testing.assert_allclose(g.numpy(), (-torch.sigmoid(u)).numpy(), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(
        h.numpy(), (torch.sigmoid(u) * torch.sigmoid(-u) / t).numpy(), rtol=1e-10, atol=1e-15
    )
    assert torch.isfinite(h).all() and torch.isfinite(g).all()
    # forward-over-reverse (as in the HVPs) too
    hf = torch.func.vmap(
        torch.func.jacfwd(torch.func.grad(lambda si: smooth_hinge_loss(si[None], y[:1], t)[0]))
    )(s)
    torch.testing.assert_close(hf, h, rtol=1e-10, atol=1e-15)
    with pytest.raises(ValueError, match="temperature"):
        smooth_hinge_loss(s, y, 0.0)
    with pytest.raises(TypeError, match="temperature"):
        smooth_hinge_loss(s, y, "0.1")
    with pytest.raises(ValueError, match="same length"):
        smooth_hinge_loss(s, y[:3], 0.1)


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
@CUDA
def test_ops_on_cuda_match_cpu():
    model = mlp(7)
    X, Y = data(seed=7)
    fm = fm_for(model)
    op = torch_hessian.HessianOperator(fm, torch_data.TensorData(X, Y), 0.1, 10)
    dev = torch.device("cuda")
    fmc = torch_functional.FunctionalModel(model, ce, torch_functional.select_params(model), dev)
    opc = torch_hessian.HessianOperator(fmc, torch_data.TensorData(X.to(dev), Y.to(dev)), 0.1, 10)
    torch.testing.assert_close(opc.dense().cpu(), op.dense())
    torch.testing.assert_close(fmc.per_example_grads(X.to(dev), Y.to(dev)).cpu(), fm.per_example_grads(X, Y))
    g = torch.Generator(device=dev).manual_seed(0)
    V = torch.randn(fm.n_params, 2, dtype=DT, device=dev)
    assert opc.sample_matvec(V, 5, g).device.type == "cuda"
