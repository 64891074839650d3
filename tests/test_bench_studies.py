"""The benchmark studies (pyinfluence.bench.studies), the shared trainer (pyinfluence.torch.training) and
the one number/table formatter (pyinfluence._formatting): small, fast checks; the studies' full runs are
measurements, not tests."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import pyinfluence
from pyinfluence import _core
from pyinfluence._formatting import (
    format_bytes,
    format_seconds,
    format_value,
    markdown_table,
    text_table,
)
from pyinfluence.bench.studies import linear_core
from pyinfluence.bench.studies.results_file import write_section
from pyinfluence.torch.training import DigitsCNN, Objective, SmallCNN, digits_mlp, lbfgs_fit, lbfgs_refit


# ------------------------------------------------------------------------------------------------
# formatting
# ------------------------------------------------------------------------------------------------
def test_format_value_cells():
    assert format_value(None) == format_value(float("nan")) == format_value(float("inf")) == "–"
    assert format_value(True) == "yes" and format_value(np.bool_(False)) == "no"
    assert format_value(np.int64(7)) == "7" and format_value(12345.0) == "12345"
    assert format_value(1.23456789) == "1.235" and format_value(1.23456789, 6) == "1.23457"
    assert format_value(2.5e-5) == "2.5e-05" and format_value(0.0) == "0"
    assert format_value("x < y") == "x < y"


def test_format_seconds_and_bytes():
    assert [format_seconds(s) for s in (None, 5.234e-6, 5.234e-4, 0.0009997, 0.0123, 1.234, 1234.5)] == [
        "–",
        "5.23 µs",
        "523 µs",
        "1.00 ms",
        "12.3 ms",
        "1.23 s",
        "1234 s",
    ]
    assert format_seconds(-0.0021) == "-2.10 ms"
    assert [format_bytes(b) for b in (None, 300, 2048, 1.4 * 2**30)] == ["–", "300 bytes", "2 KiB", "1.4 GiB"]


def test_tables():
    md = markdown_table(["name", "a|b", "n"], [["x|y", 0.123456, 3], ["z", None, 10]], align="lr")
    assert md.splitlines() == [
        "| name | a\\|b | n |",
        "|---|---:|---:|",
        "| x\\|y | 0.1235 | 3 |",
        "| z | – | 10 |",
    ]
    txt = text_table(["name", "value"], [["a", 1.5], ["long name", 1e-7]], align="lr", rule=True)
    assert txt.splitlines() == [
        "  name       value",
        "  ---------  -----",
        "  a            1.5",
        "  long name  1e-07",
    ]
    with pytest.raises(ValueError, match="2 cells but there are 3 columns"):
        markdown_table(["a", "b", "c"], [[1, 2]])


# ------------------------------------------------------------------------------------------------
# sections of RESULTS.md
# ------------------------------------------------------------------------------------------------
def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    write_section(path, "first", "linear")  # a new file
    assert path.read_text() == "<!-- linear:start -->\n\nfirst\n\n<!-- linear:end -->\n"
    path.write_text(path.read_text() + "\nhand-written notes\n")
    write_section(path, "# Deep\n", "deep")  # appended after the rest
    write_section(path, "second", "linear")  # replaced in place
    text = path.read_text()
    assert text.index("second") < text.index("hand-written notes") < text.index("# Deep")
    assert "first" not in text and text.count("<!-- linear:start -->") == 1
    # a text that carries its own markers (the deep-path study's) is written as it is
    write_section(path, "<!-- deep:start -->\nnew deep\n<!-- deep:end -->\n", "deep")
    assert "# Deep" not in path.read_text() and "new deep" in path.read_text()


def test_linear_core_case_on_a_tiny_task():
    """One task × dtype of the linear study end to end (timings of 1 repeat): numpy agrees with
    the core, every step has a row, and the section renders."""
    task = linear_core.make_synthetic(pyinfluence, 300, 5)
    log: list[str] = []
    R = linear_core.run_case(task, "float64", 1, pyinfluence, _core, 4, mem_scaling=True, log=log.append)
    assert R["checks"]["max relative error vs numpy"].split(" (")[1].startswith("ok")
    steps = [row.step for row in R["rows"]]
    assert steps[:3] == ["Hessian assembly", "Cholesky factorisation", "Hessian + factorisation"]
    assert len(steps) == 8 and all(row.pyi is not None and row.pyi > 0 for row in R["rows"])
    assert set(R["percall"]) == {"public", "engine", "numpy query", "bare matvec", "bare solve"}
    text, _ = linear_core.render_section([R], {"float64": (1.0, 2.0)}, 10, "1 thread", "threads=1")
    assert "### synthetic binary n=300 d=5 — float64" in text and "| Hessian assembly |" in text


# ------------------------------------------------------------------------------------------------
# the shared trainer
# ------------------------------------------------------------------------------------------------
def _digits(n: int = 200):
    sk = pytest.importorskip("sklearn.datasets")
    X, y = sk.load_digits(return_X_y=True)
    return torch.tensor(X[:n] / 16.0), torch.tensor(y[:n])


def test_models_keep_their_published_sizes():
    torch.manual_seed(0)
    assert sum(p.numel() for p in SmallCNN().parameters()) == 9242
    assert sum(p.numel() for p in digits_mlp().parameters()) == 2410
    assert sum(p.numel() for p in DigitsCNN().parameters()) == 610
    assert (
        DigitsCNN(6, 2).describe() == "conv 3x3 (1->6, no padding) -> tanh -> avg-pool 2x2 -> linear (54->2)"
    )


def test_small_cnn_pooling_variants_against_a_hand_written_forward():
    """SmallCNN(pool="avg") is the same network as the max-pool default with 2×2 average pooling: both
    checked against the forward pass written out with conv2d and a reshape-and-reduce pooling."""
    torch.manual_seed(0)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    for pool, reduce in (("max", lambda t: t.amax(dim=(3, 5))), ("avg", lambda t: t.mean(dim=(3, 5)))):
        torch.manual_seed(1)
        cnn = SmallCNN(pool=pool).double()
        h = torch.tanh(torch.nn.functional.conv2d(x, cnn.c1.weight, cnn.c1.bias, padding=1))  # (5, 4, 8, 8)
        h = reduce(h.reshape(5, 4, 4, 2, 4, 2))
        h = torch.tanh(torch.nn.functional.conv2d(h, cnn.c2.weight, cnn.c2.bias, padding=1)).reshape(5, -1)
        h = torch.tanh(h @ cnn.f1.weight.t() + cnn.f1.bias)
        want = h @ cnn.f2.weight.t() + cnn.f2.bias
        assert torch.allclose(cnn(x), want, atol=1e-13, rtol=0), pool
    torch.manual_seed(1)
    a = SmallCNN(pool="avg").double()
    torch.manual_seed(1)
    b = SmallCNN().double()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # same weights, same seed
    assert not torch.allclose(a(x), b(x))
    with pytest.raises(ValueError, match="pool"):
        SmallCNN(pool="min")


def test_lbfgs_fit_is_one_torch_lbfgs_call():
    """lbfgs_fit reproduces a hand-written torch.optim.LBFGS call bit for bit (the published
    benchmark numbers were trained that way)."""
    X, y = _digits()

    def fresh() -> nn.Module:
        torch.manual_seed(0)
        return digits_mlp().double()

    ref = fresh()
    ps = list(ref.parameters())
    opt = torch.optim.LBFGS(
        ps,
        lr=1,
        max_iter=40,
        tolerance_grad=1e-10,
        tolerance_change=0,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        R = nn.functional.cross_entropy(ref(X), y, reduction="none").mean() + 0.5 * 1e-3 * sum(
            (p**2).sum() for p in ps
        )
        R.backward()
        return R

    opt.step(closure)
    model = fresh()
    gn = lbfgs_fit(model, X, y, 40, l2=1e-3)
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert gn == pytest.approx(float(Objective(model, X, y, 1e-3).grad().norm()), rel=0, abs=0)


def test_refit_leaves_the_model_alone_and_drops_one_point():
    X, y = _digits(120)
    torch.manual_seed(0)
    model = digits_mlp().double()
    lbfgs_fit(model, X, y, 30)
    before = copy.deepcopy(model.state_dict())
    control = lbfgs_refit(model, X, y, 10)
    dropped = lbfgs_refit(model, X, y, 10, drop=3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    manual = copy.deepcopy(model)
    keep = torch.arange(len(y)) != 3
    lbfgs_fit(manual, X[keep], y[keep], 10)
    for a, b in zip(manual.parameters(), dropped.parameters()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(control.parameters(), dropped.parameters()))


def test_weighted_objective_leaves_a_point_out():
    X, y = _digits(50)
    torch.manual_seed(0)
    model = DigitsCNN(2, 10).double()
    w = torch.ones(len(y), dtype=torch.float64)
    w[7] = 0.0
    keep = torch.arange(len(y)) != 7
    full, loo = Objective(model, X, y, 1e-2), Objective(model, X[keep], y[keep], 1e-2)
    assert full.value(w) == pytest.approx(loo.value(), rel=1e-14)
    torch.testing.assert_close(full.grad(w), loo.grad(), rtol=1e-12, atol=1e-14)
