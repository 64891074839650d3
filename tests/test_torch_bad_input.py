"""Bad input to the public API gets pyinfluence's own one-line message naming the argument: torch
labels out of range, integer or wrongly shaped inputs, unknown device strings, and integers too large for the
C++ core (before the fix: raw torch errors from deep inside vmap, torch's device-string parser, or pybind's
"incompatible function arguments").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import pyinfluence

pytestmark = pytest.mark.filterwarnings("ignore::pyinfluence.NotAtOptimumWarning")


@pytest.fixture(scope="module")
def classifier():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    model = nn.Linear(4, 3).double()
    loss = nn.CrossEntropyLoss(reduction="none")
    inf = pyinfluence.TorchInfluence(model, loss, (X, y), l2=1e-1, optimum_tol=None)
    return model, loss, X, y, inf


@pytest.mark.parametrize("labels, bad", [([0, 7], "[7]"), ([0, -1], "[-1]")])
def test_test_labels_outside_the_classes(classifier, labels, bad):
    *_, X, y, inf = classifier
    with pytest.raises(ValueError, match=rf"y_test has class labels outside 0\.\.2 .*3 outputs.*{bad}"):
        inf.up_loss(X[:2], torch.tensor(labels))


def test_training_labels_outside_the_classes(classifier):
    model, loss, X, y, _ = classifier
    with pytest.raises(ValueError, match=r"train_data's targets has class labels outside 0\.\.2.*\[5\]"):
        pyinfluence.TorchInfluence(model, loss, (X, torch.full((40,), 5)), optimum_tol=None)


def test_integer_training_inputs_for_a_real_valued_model(classifier):
    model, loss, X, y, _ = classifier
    with pytest.raises(ValueError, match=r"train_data's inputs.*int64.*X\.float\(\)"):
        pyinfluence.TorchInfluence(model, loss, (X.round().long(), y), optimum_tol=None)


def test_integer_test_inputs_are_converted_like_the_training_inputs(classifier):
    *_, X, y, inf = classifier
    Xi = X[:3].round()
    np.testing.assert_array_equal(inf.up_loss(Xi.long(), y[:3]).numpy(), inf.up_loss(Xi, y[:3]).numpy())


def test_three_dimensional_inputs_that_the_model_cannot_take(classifier):
    model, loss, X, y, inf = classifier
    with pytest.raises(ValueError, match=r"calling the model on train_data's inputs \(shape \(2, 2, 2\)"):
        pyinfluence.TorchInfluence(model, loss, (X.reshape(40, 2, 2), y), optimum_tol=None)
    with pytest.raises(ValueError, match=r"X_test has shape \(2, 2, 2\)"):
        inf.up_loss(X[:2].reshape(2, 2, 2), y[:2])


@pytest.mark.parametrize(
    "device, message",
    [
        ("meta", r"device='meta' is not supported.*hold no values"),
        ("bogus", r"device must be 'cpu', 'cuda' or 'cuda:N'.*'bogus'"),
        (-1, r"device must be a CUDA device index >= 0"),
        (1.5, r"device must be None, a string"),
    ],
)
def test_unknown_devices(classifier, device, message):
    model, loss, X, y, _ = classifier
    with pytest.raises((ValueError, TypeError), match=message):
        pyinfluence.TorchInfluence(model, loss, (X, y), device=device, optimum_tol=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", 0])
def test_cuda_without_a_gpu(classifier, device):
    model, loss, X, y, _ = classifier
    with pytest.raises(ValueError, match="CUDA is not available"):
        pyinfluence.TorchInfluence(model, loss, (X, y), device=device, optimum_tol=None)


# ---------------------------------------------------------------------------------------------------------
# integers the C++ core cannot take never reach pybind ("incompatible function arguments")
# ---------------------------------------------------------------------------------------------------------
HUGE = [2**31, 2**63, 10**30]


@pytest.mark.parametrize("value", HUGE)
def test_huge_max_iter_is_refused_by_name(value):
    X = np.random.default_rng(0).normal(size=(20, 2))
    y = (X[:, 0] > 0).astype(float)
    for cls in (pyinfluence.LogisticRegression, pyinfluence.RidgeRegression, pyinfluence.SmoothHingeSVM):
        with pytest.raises(ValueError, match=r"max_iter must be <= 2147483647"):
            cls(max_iter=value).fit(X, y)
    model = pyinfluence.LogisticRegression(l2=1e-2).fit(X, y)
    inf = pyinfluence.LinearInfluence(model, X, y)
    with pytest.raises(ValueError, match="max_iter must be <= 2147483647"):
        inf.retrain_loo(X[:1], y[:1], [0], max_iter=value)
    with pytest.raises(IndexError, match=r"train_idx is \d+, out of range for 20 training points"):
        inf.up_loss(X[:1], y[:1], train_idx=value)
    with pytest.raises(ValueError, match="n must be at most"):
        pyinfluence.set_num_threads(value)
