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
    got = retraining._fixed_budget_loo(task, [0, 1], removed, 500)
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
    assert np.abs(want).max() > 1e-4  # the changes are not all negligible


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
