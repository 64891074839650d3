"""Data as users hold it (issue 15, item 3): training data streamed from a DataLoader / Dataset / iterable of
batches, dict batches (Hugging Face style), bfloat16 models and the computation dtype.

Every influence value is compared with an independent computation written here: the exact formula
−∇L(z_test)ᵀ (H + λI)⁻¹ ∇L(z_i) with H from ``torch.func.jacrev(jacrev(...))`` of the mean loss + (l2/2)‖θ‖² over the
flattened parameters, and per-example gradients from plain ``torch.autograd``, one example at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev

from pyinfluence import LiSSA, TorchInfluence
from pyinfluence.errors import DataError
from pyinfluence.torch.batches import StreamingData

pytestmark = pytest.mark.usefixtures("one_torch_thread")

L2 = 1e-2
DAMPING = 1e-3
N, D, C = 40, 5, 3


# ----------------------------------------------------------------------------------------------
# an independent reference
# ----------------------------------------------------------------------------------------------
def reference_up_loss(model, per_example_loss, train, test, l2=L2, damping=DAMPING):
    """(k, m) −g_testᵀ (H + λI)⁻¹ g_i, with ``per_example_loss(model_call, example) -> scalar`` where
    ``model_call(params, **inputs)`` evaluates the model at flat parameters; ``train``/``test`` are lists of
    examples (anything per_example_loss understands)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()]).double()

    def call(th, *args, **kwargs):
        parts = torch.split(th, sizes)
        ps = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, ps, args, kwargs)

    def objective(th):
        total = sum(per_example_loss(lambda *a, **k: call(th, *a, **k), ex) for ex in train)
        return total / len(train) + 0.5 * l2 * (th * th).sum()

    H = jacrev(jacrev(objective))(theta) + damping * torch.eye(theta.numel(), dtype=theta.dtype)

    def grads(examples):
        out = []
        for ex in examples:
            th = theta.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(per_example_loss(lambda *a, th=th, **k: call(th, *a, **k), ex), th)
            out.append(g)
        return torch.stack(out)

    Gtr, Gte = grads(train), grads(test)
    return -(Gtr @ torch.linalg.solve(H, Gte.t()))


class GeneratedDataset(torch.utils.data.Dataset):
    """Examples computed on request from their index (the set is never held anywhere); counts reads."""

    def __init__(self, n, seed=0):
        self.n, self.seed, self.reads = n, seed, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(self.seed * 100_003 + int(i))
        x = torch.randn(D, generator=g, dtype=torch.float64)
        y = int((x[0] + 0.5 * x[1] > 0).item()) + int(x[2] > 0.7)
        return x, y


def all_examples(ds):
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(scope="module")
def mlp_problem():
    ds = GeneratedDataset(N)
    X, y = all_examples(ds)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C)).double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, tolerance_grad=1e-12, history_size=30)

    def closure():
        opt.zero_grad()
        loss = ce(model(X), y).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    Xt, yt = all_examples(GeneratedDataset(4, seed=1))
    ref = reference_up_loss(
        model,
        lambda call, ex: ce(call(ex[0].unsqueeze(0)), ex[1].reshape(1))[0],
        list(zip(X, y)),
        list(zip(Xt, yt)),
    )
    return model, ds, X, y, Xt, yt, ref


# ----------------------------------------------------------------------------------------------
# streaming a DataLoader / Dataset / iterable of batches
# ----------------------------------------------------------------------------------------------
def test_streamed_dataloader_matches_reference_and_never_holds_the_set(mlp_problem):
    model, ds, X, y, Xt, yt, ref = mlp_problem
    loader = torch.utils.data.DataLoader(ds, batch_size=7, shuffle=False)
    inf = TorchInfluence(model, ce, loader, l2=L2, damping=DAMPING, solver="exact")
    assert isinstance(inf._data, StreamingData) and inf.n_train == N
    torch.testing.assert_close(inf.up_loss(Xt, yt), ref, rtol=1e-9, atol=1e-12)
    # no tensor with N rows is kept by the influence object or its operator: the set lives in the dataset
    held = [
        v
        for obj in (inf, inf.operator, inf._data)
        for v in vars(obj).values()
        if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == N
    ]
    assert held == []
    # subsets by index are read from the dataset (only those examples), the same numbers
    before = ds.reads
    sub = inf.up_loss(Xt, yt, train_idx=[3, 17, 3])
    assert ds.reads - before == 3
    torch.testing.assert_close(sub, ref[[3, 17, 3]], rtol=1e-9, atol=1e-12)
    top = inf.top_k(Xt, yt, k=3)
    torch.testing.assert_close(
        top.helpful_scores, torch.sort(ref.t(), dim=1).values[:, :3], rtol=1e-9, atol=1e-12
    )
    torch.testing.assert_close(
        inf.self_influence([0, 5]),
        torch.stack([-(inf.gradients([i]) @ inf.s_test(X[i], y[i]))[0, 0] for i in (0, 5)]),
    )


def test_other_stream_forms_give_the_same_numbers(mlp_problem):
    model, ds, X, y, Xt, yt, ref = mlp_problem

    class ExampleStream(torch.utils.data.IterableDataset):  # no random access, no length: counted on a pass
        def __iter__(self):
            yield from zip(X, y)

    class BatchStream(
        torch.utils.data.IterableDataset
    ):  # yields whole batches (a loader with batch_size=None)
        def __iter__(self):
            for s in range(0, N, 9):
                yield X[s : s + 9], y[s : s + 9]

    batches = [(X[s : s + 11], y[s : s + 11]) for s in range(0, N, 11)]
    for source in (ds, ExampleStream(), batches, torch.utils.data.DataLoader(BatchStream(), batch_size=None)):
        inf = TorchInfluence(model, ce, source, l2=L2, damping=DAMPING, solver="block_cg")
        assert inf.n_train == N
        torch.testing.assert_close(inf.up_loss(Xt, yt), ref, rtol=1e-6, atol=1e-9)
        # a subset from a stream without random access: one pass keeps the chosen rows, in the order asked
        torch.testing.assert_close(inf.up_loss(Xt, yt, train_idx=[30, 2]), ref[[30, 2]], rtol=1e-6, atol=1e-9)
    # stream=False materialises the loader once; the pair form is in memory by default
    inf = TorchInfluence(
        model, ce, torch.utils.data.DataLoader(ds, batch_size=8), stream=False, l2=L2, damping=DAMPING
    )
    assert not isinstance(inf._data, StreamingData)
    torch.testing.assert_close(inf.up_loss(Xt, yt), ref, rtol=1e-9, atol=1e-12)


def test_stream_errors(mlp_problem):
    model, ds, X, y, Xt, yt, _ = mlp_problem
    gen = ((X[s : s + 10], y[s : s + 10]) for s in range(0, N, 10))
    with pytest.raises(TypeError, match="one-pass iterator"):
        TorchInfluence(model, ce, gen, l2=L2, damping=DAMPING, optimum_tol=None)

    class Shrinking:  # yields one example fewer on every pass
        def __init__(self):
            self.cut = 0

        def __iter__(self):
            self.cut += 1
            for s in range(0, N - self.cut, 10):
                yield X[s : min(s + 10, N - self.cut)], y[s : min(s + 10, N - self.cut)]

    with pytest.raises(
        DataError, match="same examples in the same order"
    ):  # caught by the passes of __init__
        TorchInfluence(model, ce, Shrinking(), l2=L2, damping=DAMPING, solver="block_cg", optimum_tol=None)

    class NoIndex(torch.utils.data.IterableDataset):  # examples, no random access
        def __iter__(self):
            yield from zip(X, y)

    inf = TorchInfluence(
        model, ce, NoIndex(), l2=L2, damping=DAMPING, solver=LiSSA(batch_size=8), optimum_tol=None
    )
    with pytest.raises(ValueError, match="random access"):
        inf.up_loss(Xt, yt)
    bad = [(X[:10], y[:10] + 5)]  # labels out of range in a streamed batch
    with pytest.raises(ValueError, match="class labels outside 0..2"):
        TorchInfluence(model, ce, bad + [(X[10:], y[10:] + 5)], l2=L2)
    with pytest.raises(ValueError, match="shuffle=False"):
        TorchInfluence(model, ce, torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True), l2=L2)
    with pytest.raises(TypeError, match="stream must be"):
        TorchInfluence(model, ce, (X, y), stream="yes", l2=L2)
    with pytest.raises(ValueError, match="stream=True needs"):
        TorchInfluence(model, ce, (X, y), stream=True, l2=L2)


# ----------------------------------------------------------------------------------------------
# dict batches (Hugging Face style)
# ----------------------------------------------------------------------------------------------
class TinyTokenModel(nn.Module):
    """Embedding → masked mean over tokens → Linear: called as model(input_ids=..., attention_mask=...)."""

    def __init__(self, vocab=7, dim=3, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return self.out(pooled)


@pytest.fixture(scope="module")
def token_problem():
    g = torch.Generator().manual_seed(3)
    n, T = 24, 5
    ids = torch.randint(0, 7, (n, T), generator=g)
    mask = torch.ones(n, T)
    mask[::3, -2:] = 0  # some padded examples
    labels = (ids[:, 0] > 3).long()
    torch.manual_seed(1)
    model = TinyTokenModel().double()
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=300, tolerance_grad=1e-12)
    m64 = mask.double()

    def closure():
        opt.zero_grad()
        out = model(input_ids=ids, attention_mask=m64)
        loss = ce(out, labels).mean() + 0.5 * L2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    test = {"input_ids": ids[:3].flip(1), "attention_mask": torch.ones(3, T), "labels": 1 - labels[:3]}

    def one_loss(call, ex):
        i, msk, lab = ex
        return ce(call(input_ids=i.unsqueeze(0), attention_mask=msk.double().unsqueeze(0)), lab.reshape(1))[0]

    ref = reference_up_loss(
        model,
        one_loss,
        list(zip(ids, mask, labels)),
        list(zip(test["input_ids"], test["attention_mask"], test["labels"])),
    )
    return model, ids, mask, labels, test, ref


def test_dict_batches_match_the_reference(token_problem):
    model, ids, mask, labels, test, ref = token_problem
    loader = torch.utils.data.DataLoader(
        [{"input_ids": i, "attention_mask": m, "labels": lab} for i, m, lab in zip(ids, mask, labels)],
        batch_size=5,
    )
    inf = TorchInfluence(model, ce, loader, l2=L2, damping=DAMPING, solver="exact")
    torch.testing.assert_close(inf.up_loss(test), ref, rtol=1e-9, atol=1e-12)  # a dict batch as test data
    inputs = {k: v for k, v in test.items() if k != "labels"}
    torch.testing.assert_close(inf.up_loss(inputs, test["labels"]), ref, rtol=1e-9, atol=1e-12)
    # in memory: a dict of inputs with the targets, and a custom label key
    mem = TorchInfluence(
        model,
        ce,
        ({"input_ids": ids, "attention_mask": mask}, labels),
        l2=L2,
        damping=DAMPING,
        solver="exact",
    )
    torch.testing.assert_close(mem.up_loss(test), ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        mem.top_k(test, k=2).harmful_scores, torch.sort(ref.t(), 1, descending=True).values[:, :2]
    )
    assert mem.predict(inputs).shape == (3,)
    keyed = [
        {"input_ids": ids[s : s + 6], "attention_mask": mask[s : s + 6], "y": labels[s : s + 6]}
        for s in range(0, 24, 6)
    ]
    alt = TorchInfluence(model, ce, keyed, label_key="y", l2=L2, damping=DAMPING, solver="exact")
    torch.testing.assert_close(alt.up_loss(inputs, test["labels"]), ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(TypeError, match="no 'labels' entry"):
        TorchInfluence(model, ce, keyed, l2=L2)
    with pytest.raises(ValueError, match="keys"):
        inf.up_loss({"input_ids": ids[:2]}, labels[:2])
    with pytest.raises(TypeError, match="one tensor of floating-point inputs"):
        inf.pert_loss(test)


# ----------------------------------------------------------------------------------------------
# bfloat16 models and the computation dtype
# ----------------------------------------------------------------------------------------------
def test_bfloat16_model_is_computed_in_float32(mlp_problem):
    model, _, X, y, Xt, yt, _ = mlp_problem
    bf = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16)
    as_f32 = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, C))
    as_f32.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})  # exact: bf16 ⊂ f32
    kw = dict(l2=L2, damping=DAMPING, solver="exact", optimum_tol=None)
    got = TorchInfluence(bf, ce, (X, y), **kw)
    assert got.dtype == torch.float32 and next(bf.parameters()).dtype == torch.bfloat16
    want = TorchInfluence(as_f32, ce, (X.float(), y), **kw)
    torch.testing.assert_close(got.up_loss(Xt, yt), want.up_loss(Xt, yt), rtol=1e-6, atol=1e-7)
    # float64 computation of a float32 model equals the float64 model with the same weights
    f64 = TorchInfluence(as_f32, ce, (X, y), dtype="float64", **kw)
    ref = TorchInfluence(copy.deepcopy(as_f32).double(), ce, (X, y), **kw)
    torch.testing.assert_close(f64.up_loss(Xt, yt), ref.up_loss(Xt, yt), rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="dtype must be"):
        TorchInfluence(as_f32, ce, (X, y), dtype=torch.float16, **kw)


# ----------------------------------------------------------------------------------------------
# second derivatives through F.scaled_dot_product_attention (its fused kernels' backward is not differentiable)
# ----------------------------------------------------------------------------------------------
class TinyAttention(nn.Module):
    def __init__(self, dim=4, classes=2, fused=True):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, classes)
        self.fused = fused

    def forward(self, x):  # (B, T, dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.fused:
            h = F.scaled_dot_product_attention(q, k, v)
        else:  # the same attention written out: softmax(q kᵀ / √d) v
            h = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v
        return self.out(h.mean(1))


def test_hessian_through_scaled_dot_product_attention():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(12, 3, 4, generator=g, dtype=torch.float64)
    y = (X[:, 0, 0] > 0).long()
    torch.manual_seed(2)
    model = TinyAttention().double()
    manual = TinyAttention(fused=False).double()
    manual.load_state_dict(model.state_dict())
    ref = reference_up_loss(
        manual,
        lambda call, ex: ce(call(ex[0].unsqueeze(0)), ex[1].reshape(1))[0],
        list(zip(X, y)),
        list(zip(X[:2], y[:2])),
        damping=0.5,
    )
    for solver in ("exact", "block_cg"):
        inf = TorchInfluence(model, ce, (X, y), l2=L2, damping=0.5, solver=solver, optimum_tol=None)
        torch.testing.assert_close(inf.up_loss(X[:2], y[:2]), ref, rtol=1e-6, atol=1e-9)
    assert model.fused  # the model itself still uses the fused kernel outside pyinfluence's calls


def test_progress_bars_name_every_pass_over_the_data(mlp_problem, capsys):
    pytest.importorskip("tqdm")
    model, ds, X, y, Xt, yt, ref = mlp_problem
    loader = torch.utils.data.DataLoader(ds, batch_size=8)
    inf = TorchInfluence(
        model, ce, loader, l2=L2, damping=DAMPING, solver="ekfac", progress=True, batch_size=8
    )
    inf.up_loss(Xt, yt)
    err = capsys.readouterr().err
    for desc in ("gradient ∇R(θ̂)", "EKFAC: factors", "EKFAC: eigenvalue correction", "up_loss"):
        assert desc in err, desc
    quiet = TorchInfluence(model, ce, loader, l2=L2, damping=DAMPING, solver="ekfac", batch_size=8)
    quiet.up_loss(Xt, yt)
    assert capsys.readouterr().err == ""
