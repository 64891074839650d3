"""The retraining study (pyinfluence.bench.studies.retraining) and ``pyinfluence bench --retraining``, on a
small run: every measure present for every method, the exact linear path and the torch Exact solver agreeing
(the same model: the same scores), and the leave-one-out Pearson of the first-order estimate recomputed here
from the linear path's up_loss and its exact refits. The primitives (LDS, brittleness, AUC) are tested against
scipy/sklearn and independent refits in tests/test_lds.py; the Newton step and retraining in
tests/test_torch_leave_out.py and tests/test_interface.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

pytest.importorskip("torch")

from pyinfluence.bench.runner import fixed_budget_loo
from pyinfluence.bench.studies import retraining
from pyinfluence.bench.tasks import make_task


@pytest.mark.slow
def test_the_study_on_a_linear_task(tmp_path):
    res = retraining.run_task(
        "digits-logreg",
        n_subsets=8,
        loo_tests=1,
        loo_points=6,
        brittle_tests=1,
        ensemble=0,
        methods=["linear-exact", "exact"],
        cache_dir=str(tmp_path),
        log=None,
    )
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"linear-exact", "exact"}
    for r in rows.values():
        assert "error" not in r
        assert -1.0 <= r["lds"] <= 1.0 and r["lds_se"] >= 0
        assert 0.0 <= r["mislabel_auc"] <= 1.0
        assert r["loo_newton"] == res["loo"]["newton_pearson"]
    # the two exact paths on the same model give the same scores, hence the same measures
    assert rows["exact"]["lds"] == pytest.approx(rows["linear-exact"]["lds"], abs=1e-9)
    assert rows["exact"]["loo_first_order"] == pytest.approx(
        rows["linear-exact"]["loo_first_order"], abs=1e-9
    )
    # independent recomputation of the first-order leave-one-out Pearson
    task = make_task("digits-logreg")
    li = task.linear_influence()
    Xt, yt = task.test_data("numpy")
    up = li.up_loss(Xt[:1], yt[:1])[:, 0]
    top = np.argsort(-np.abs(up), kind="stable")[:6]
    actual = li.retrain_loo(Xt[:1], yt[:1], top)[:, 0]
    r = np.corrcoef(-up[top] / task.n_train, actual)[0, 1]
    assert rows["linear-exact"]["loo_first_order"] == pytest.approx(r, abs=1e-9)
    text = retraining.render([res])
    assert "| digits-logreg | pyinfluence | linear-exact |" in text
    json.dumps(res, default=retraining.json_default)
    # a second run reads every subset model from the cache
    again = retraining.run_task(
        "digits-logreg", n_subsets=8, loo_tests=1, loo_points=6, brittle_tests=0, ensemble=0, mislabel=False,
        methods=["linear-exact"], cache_dir=str(tmp_path), log=None,
    )  # fmt: skip
    assert math.isclose(again["rows"][0]["lds"], rows["linear-exact"]["lds"], abs_tol=1e-12)


def test_fixed_budget_leave_one_out_truth_reaches_exact_refits_on_a_convex_model():
    """The fixed-budget truth (the CNN's: the trainer warm-started from θ̂ for a number of L-BFGS iterations, minus
    the control run) on the torch view of a strictly convex task, where enough iterations reach the unique
    leave-one-out optimum: it must equal the linear path's exact Newton refits."""
    task = make_task("digits-logreg", n_train=300, m=3)
    li = task.linear_influence()
    Xt, yt = task.test_data("numpy")
    removed = np.array([4, 17, 250])
    want = li.retrain_loo(Xt[:2], yt[:2], removed)  # (3, 2), exact refits
    got = fixed_budget_loo(task, [0, 1], removed, 500)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert np.abs(want).max() > 1e-4  # the changes are not all negligible


def test_bench_deep_loo_truth_pairs_each_test_point_with_its_own_top_points():
    """`bench --loo-deep`'s truth (one fixed-budget refit per distinct removal, shared by the test points): on the
    convex task each (test point, removal) value is the linear path's exact refit of that pair, and each test
    point's removals are its own largest |ref|."""
    from pyinfluence.bench.runner import deep_loo_truth

    task = make_task("digits-logreg", n_train=300, m=3)
    li = task.linear_influence()
    Xt, yt = task.test_data("numpy")
    ref = np.asarray(li.up_loss(Xt, yt))
    truth = deep_loo_truth(task, ref, n_tests=2, n_points=3, iters=500)
    assert truth.test_idx == [0, 1]
    for t in range(2):
        want_idx = np.argsort(-np.abs(ref[:, t]), kind="stable")[:3]
        assert list(truth.train_idx[t]) == want_idx.tolist()
        want = li.retrain_loo(Xt[t : t + 1], yt[t : t + 1], want_idx)[:, 0]
        np.testing.assert_allclose(truth.actual[t], want, rtol=1e-5, atol=1e-8)


def test_bench_retraining_says_why_it_skips_the_max_pool_cnn(tmp_path):
    """`pyinfluence bench --retraining --tasks digits-cnn` names the reason instead of failing in the polish."""
    import argparse

    from pyinfluence.cli.commands import _run_retraining

    said: list[str] = []
    args = argparse.Namespace(tasks="digits-cnn", out=str(tmp_path), quick=True, subsets=None, ensemble=None,
                              peers=None, quiet=False)  # fmt: skip
    assert _run_retraining(args, said.append) == {}
    assert any("skipping digits-cnn" in s and "digits-cnn-smooth" in s for s in said)
    assert "digits-cnn-smooth" in retraining.PUBLISHED and "digits-cnn" not in retraining.PUBLISHED


def test_newton_ladder_finds_the_indefinite_leave_out_hessians_and_scores_the_rest():
    """The newton_ladder study's core on a tiny MLP at its optimum where, as on the digits CNN, removing some points
    leaves ∇²R₋ᵢ(θ̂) + λI indefinite at small λ: which removals it says have no Newton step, and every Newton value it
    returns, against the leave-out objective written out with torch.func (eigenvalues and a dense solve); its
    Pearson figures against numpy's on those values. Then the same model short of its optimum, where H itself is
    indefinite."""
    import types

    import torch
    from torch import nn
    from torch.func import functional_call, grad, hessian

    from pyinfluence.bench.studies import newton_ladder
    from pyinfluence.torch.training import cross_entropy, lbfgs_fit

    from helpers import flat_parameters

    l2 = 1e-3
    g = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    Xt, yt = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    assert lbfgs_fit(model, X, y, 200, l2=l2) < 1e-5
    task = types.SimpleNamespace(model=model, loss_fn=cross_entropy, X_train=X, y_train=y, params=None, l2=l2,
                                 test_data=lambda which="torch": (Xt, yt))  # fmt: skip
    theta, unflat = flat_parameters(model)

    def R(t, keep):
        return (
            cross_entropy(functional_call(model, unflat(t), (X[keep],)), y[keep]).mean()
            + 0.5 * l2 * t.square().sum()
        )

    def test_loss(t):
        return cross_entropy(functional_call(model, unflat(t), (Xt,)), yt)

    tests = [0, 1, 2]
    union = np.arange(40)
    idx = [np.arange(40)] * 3
    actual = np.random.default_rng(0).normal(size=(40, 3))  # any truth: the figures are checked against numpy
    ladder = (0.0, 1e-3, 1e-1)
    res = newton_ladder.ladder_rows(task, tests, idx, union, actual, ladder, log=lambda s: None)
    seen_indefinite = 0
    for e in res["ladder"]:
        lam = e["damping"]
        assert not e["h_not_pd"]
        want_indef, want = [], np.full((40, 3), np.nan)
        for i in range(40):
            keep = torch.ones(40, dtype=torch.bool)
            keep[i] = False
            A = hessian(R)(theta, keep) + lam * torch.eye(theta.numel(), dtype=torch.float64)
            if float(torch.linalg.eigvalsh(A)[0]) <= 0:
                want_indef.append(i)
                continue
            step = -torch.linalg.solve(A, grad(R)(theta, keep))
            want[i] = (test_loss(theta + step) - test_loss(theta)).detach().numpy()
        assert e["indefinite"] == want_indef, lam
        np.testing.assert_allclose(e["newton"], want, rtol=1e-6, atol=1e-12)  # NaN exactly where no step
        seen_indefinite += len(want_indef)
        ok = np.isfinite(want[:, 0])
        p, a = want[ok].ravel(order="F"), actual[ok].ravel(order="F")
        assert e["pairs_with_step"] == p.size
        assert math.isclose(e["newton_pearson"], float(np.corrcoef(p, a)[0, 1]), rel_tol=1e-9)
    assert seen_indefinite > 0 and res["ladder"][-1]["indefinite"] == []  # both branches were exercised
    # per removal: each at its least positive-definite damping
    lam_of = [next(e["damping"] for e in res["ladder"] if i not in e["indefinite"]) for i in range(40)]
    assert res["per_removal"]["dampings"] == {f"{v:g}": lam_of.count(v) for v in sorted(set(lam_of))}
    assert res["rule"] is None or res["rule"]["damping"] in (
        0.0,
        1e-3,
    )  # 1e-1 is not on the documented ladder
    text = newton_ladder.render({"task": "tiny", "n_train": 40, "n_params": int(theta.numel()), "tests": tests,
                                 "points": 40, "removals": 40, "truth": "random", "seconds": 1.0, **res})  # fmt: skip
    for e in res["ladder"]:
        assert f"| {e['damping']:g} | {len(e['indefinite'])} | {e['pairs_with_step']}/120 |" in text
    # a few steps from the initial weights: H itself is indefinite, nothing is computed at λ = 0
    model.load_state_dict(init)
    lbfgs_fit(model, X, y, 4, l2=l2)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert float(torch.linalg.eigvalsh(hessian(R)(theta, torch.ones(40, dtype=torch.bool)))[0]) < 0
    res = newton_ladder.ladder_rows(task, tests, idx, union, actual, (0.0,), log=lambda s: None)
    assert res["ladder"][0]["h_not_pd"] and res["rule"] is None and res["per_removal"] is None
