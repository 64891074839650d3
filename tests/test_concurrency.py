"""One TorchInfluence shared by many threads gives, bit for bit, what serial calls give.

``torch.func.functional_call`` swaps tensors into the module while it runs; before the fix, eight
threads on one object swapped each other's parameters in and out and returned wrong scores (relative
errors up to 0.77, changed top-k sets) or autograd errors. The references here are serial calls of
the same object, run before any thread starts; every solver's contract is exercised (Exact's shared
factor, CG's and BlockCG's iterations, LiSSA's seeded minibatches) and the s_test cache is cleared
while other threads use it.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pyinfluence

from helpers import cross_entropy as _ce

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

N_THREADS = 8
CALLS_PER_THREAD = 3


def _trained_mlp(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, d, h, c = 160, 6, 12, 3
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, c)).double()
    opt = torch.optim.LBFGS(model.parameters(), max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(X), y) + 0.5e-2 * sum((p * p).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    X_test = torch.randn(4 * N_THREADS, d, generator=g, dtype=torch.float64)
    y_test = torch.randint(0, c, (4 * N_THREADS,), generator=g)
    return model, (X, y), (X_test, y_test)


def _hammer(inf, test_sets, reference) -> list[str]:
    """Run up_loss and top_k from N_THREADS threads at once; return a description of every mismatch."""
    problems: list[str] = []
    start = threading.Barrier(N_THREADS)

    def work(t: int) -> None:
        try:
            start.wait()
            for r in range(CALLS_PER_THREAD):
                i = (t + r) % len(test_sets)
                up = inf.up_loss(*test_sets[i])
                top = inf.top_k(*test_sets[i], k=5)
                ref_up, ref_top = reference[i]
                if not torch.equal(up, ref_up):
                    err = float((up - ref_up).abs().max() / ref_up.abs().max())
                    problems.append(f"thread {t} call {r}: up_loss differs (max rel {err:.3g})")
                for name in ("helpful_idx", "helpful_scores", "harmful_idx", "harmful_scores"):
                    if not torch.equal(getattr(top, name), getattr(ref_top, name)):
                        problems.append(f"thread {t} call {r}: top_k.{name} differs")
                if r == 0 and t % 4 == 0:
                    inf.clear_cache()  # the cache changes under the other threads' feet
        except Exception as exc:
            problems.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return problems


@pytest.fixture(scope="module")
def problem():
    return _trained_mlp()


@pytest.mark.parametrize(
    "solver",
    [
        pyinfluence.Exact(),
        pyinfluence.CG(tol=1e-6),
        pyinfluence.BlockCG(tol=1e-6),
        pyinfluence.LiSSA(depth=100, repeats=1),
    ],
    ids=["exact", "cg", "block_cg", "lissa"],
)
def test_shared_object_matches_serial_bit_for_bit(problem, solver):
    model, train, (X_test, y_test) = problem
    # one torch thread per call: the eight Python threads (torch releases the GIL) fill the cores
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inf = pyinfluence.TorchInfluence(
            model, _ce, train, l2=1e-2, damping=5e-2, solver=solver, optimum_tol=None
        )
        test_sets = [(X_test[i::N_THREADS], y_test[i::N_THREADS]) for i in range(N_THREADS)]
        reference = [(inf.up_loss(*s).clone(), inf.top_k(*s, k=5)) for s in test_sets]
        inf.clear_cache()
        problems = _hammer(inf, test_sets, reference)
    finally:
        torch.set_num_threads(before)
    assert not problems, f"{len(problems)} wrong results, e.g. {problems[:3]}"


def test_users_module_is_never_modified_while_influence_runs(problem):
    """functional_call runs on private copies of the module tree: the user's own forward passes in
    another thread see the model's real parameters throughout."""
    model, train, (X_test, y_test) = problem
    inf = pyinfluence.TorchInfluence(model, _ce, train, l2=1e-2, damping=5e-2, optimum_tol=None)
    with torch.no_grad():
        expected = model(X_test)
    originals = {name: (module, dict(module._parameters)) for name, module in model.named_modules()}
    stop = threading.Event()
    wrong: list[str] = []

    def user_forward() -> None:
        try:
            while not stop.is_set():
                for name, (module, params) in originals.items():
                    for key, tensor in params.items():
                        if module._parameters[key] is not tensor:
                            wrong.append(f"{name}.{key} was swapped")
                with torch.no_grad():
                    out = model(X_test)
                if not torch.equal(out, expected):
                    wrong.append(f"forward differs by {float((out - expected).abs().max()):.3g}")
        except Exception as exc:
            wrong.append(f"{type(exc).__name__}: {exc}")

    user = threading.Thread(target=user_forward)
    user.start()
    try:
        for _ in range(3):
            inf.clear_cache()
            inf.up_loss(X_test, y_test)
            inf.self_influence(torch.arange(20))
    finally:
        stop.set()
        user.join()
    assert not wrong, f"{len(wrong)} user forward passes saw foreign tensors, e.g. {wrong[:3]}"
    assert dict(model.named_parameters()).keys() == {k for k, _ in inf.model.named_parameters()}


class _Uncopyable(nn.Module):
    """A module that refuses copy.copy: TorchInfluence falls back to a lock around the model calls."""

    def __init__(self, d: int, c: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, c).double()

    def forward(self, x):
        return self.lin(x)

    def __copy__(self):
        raise TypeError("this module cannot be copied")


def test_module_that_cannot_be_copied_is_serialised_and_still_correct():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(120, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=g)
    model = _Uncopyable(5, 3)
    inf = pyinfluence.TorchInfluence(model, _ce, (X, y), l2=1e-1, damping=1e-2, optimum_tol=None)
    assert inf._fm._shared_module_lock is not None  # the fallback is the one under test
    X_test = torch.randn(4 * N_THREADS, 5, generator=g, dtype=torch.float64)
    y_test = torch.randint(0, 3, (4 * N_THREADS,), generator=g)
    test_sets = [(X_test[i::N_THREADS], y_test[i::N_THREADS]) for i in range(N_THREADS)]
    reference = [(inf.up_loss(*s).clone(), inf.top_k(*s, k=5)) for s in test_sets]
    inf.clear_cache()
    problems = _hammer(inf, test_sets, reference)
    assert not problems, f"{len(problems)} wrong results, e.g. {problems[:3]}"
