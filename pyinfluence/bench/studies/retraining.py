"""Does influence predict retraining? The field's retraining-based measures for every solver, side by side.

For each task (digits logistic regression, the digits MLP, the digits CNN with average pooling) and each attribution method
(pyinfluence's linear exact path, Exact, BlockCG, LiSSA, the curvature approximations, an ensemble over
initial-weight seeds, and the peers where they run), on the same model and the same subsets:

- **LDS** (Park et al. 2023): M random half subsets, a model retrained on each by the task's own trainer
  (cached on disk), per test point the Spearman correlation between Σ_{i∈S} up_loss[i, j] and the retrained
  test loss; mean ± s.e. over the test points (:mod:`pyinfluence.bench.lds`).
- **Leave-one-out**: for the first ``loo_tests`` test points, the ``loo_points`` training points with the
  largest |reference up_loss|, removed one at a time and retrained to ‖∇R₋‖ ≤ 1e-9 (linear: exact Newton
  refits; deep: ``TorchInfluence.retrain_loo``); Pearson R of each method's first-order estimate −up_loss/n
  with the actual change, and of the Newton step (``loo_change(method="newton")``: exact whatever the solver,
  whose inverse only preconditions it — so one figure per task).
- **Brittleness**: for the first ``brittle_tests`` correctly classified test points, the smallest number of
  the method's most helpful training points whose removal (and warm-started retraining) flips the prediction.
- **Mislabel AUC**: 10% of the training labels flipped, the model retrained on them; ROC AUC of
  |self-influence| against the flipped set (methods whose self-influence over all n points is affordable).

The deep models are first polished to ‖∇R(θ̂)‖ ≤ 1e-9 from the task's trained weights (``TorchInfluence.refit``
with nothing changed): influence functions and the leave-one-out retraining both refer to the optimum.
Damping rule (documented, not tuned per test point): the task's damping λ = 1e-2 for deep models, unless
``--damping`` says otherwise; the leave-out Newton steps use the same λ.

Run: ``python -m pyinfluence.bench.studies.retraining [--tasks ...] [--subsets M] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from pyinfluence.bench import lds as L
from pyinfluence.bench import metrics as M
from pyinfluence.bench.runner import fixed_budget_loo
from pyinfluence.bench.tasks import Task, TrainedModel, make_task

__all__ = ["PUBLISHED", "UNSUPPORTED", "json_default", "main", "render", "run_study", "run_task"]

#: Published figures for comparable settings (dattri's benchmark, MNIST; PEERS.md).
PUBLISHED = {
    "digits-logreg": "dattri MNIST logistic regression: LOO ≈ 0.88, LDS ≈ 0.80 (CG 0.767)",
    "digits-mlp": "dattri MNIST MLP: LDS CG 0.26, TRAK (50 models) 0.45",
    "digits-cnn-smooth": "Koh & Liang (2017) Fig. 2, CNN on MNIST: first-order LOO R = 0.86",
}
#: Tasks the study cannot run, and why (``pyinfluence bench --retraining`` says so instead of failing later).
UNSUPPORTED = {
    "digits-cnn": "its max-pooling makes the objective non-smooth: the polish stalls at ‖∇R‖ ≈ 2e-4, so there is no "
    "optimum for influence or a leave-one-out retraining to a tolerance to refer to; the study's CNN is "
    "digits-cnn-smooth (the same network with average pooling)",
}

_METHODS = {
    "digits-logreg": ["linear-exact", "exact", "block_cg", "lissa", "ekfac"],
    "digits-mlp": ["exact", "block_cg", "lissa", "kfac", "ekfac", "arnoldi"],
    "digits-cnn-smooth": ["exact", "block_cg", "lissa", "kfac", "ekfac"],
}
# Up to this many parameters the study's reference solver (polishing, leave-one-out truth, Newton steps, the
# ensemble) is Exact: the digits CNN (p = 9242) factorises its dense H in ~18 s, and only with a dense H does the
# retraining's chord run at the least damping at which H factors (not λ), which its flat directions need.
EXACT_MAX_PARAMS = 10_000
# Tasks whose leave-one-out truth is the trainer run for a fixed number of L-BFGS iterations from θ̂ (minus the
# control run), not ``retrain_loo`` to a gradient-norm tolerance. The digits CNN: removing one of its most
# influential points makes the leave-out Hessian at θ̂ indefinite (curvature below −1e-6 along some direction), and
# retraining to convergence then walks for minutes along a nearly flat valley (‖∇R₋‖ stays ~5e-4 over 40 steps of
# 0.1–0.3 in θ) to a minimum that no local (first-order or Newton) estimate at θ̂ describes; Koh & Liang retrain
# their CNN the same way (warm-started, fixed budget).
FIXED_BUDGET_LOO: Dict[str, int] = {"digits-cnn-smooth": 150}
# methods whose self-influence over every training point is affordable (mislabel AUC)
_SELF_OK = {"linear-exact", "exact", "kfac", "ekfac", "arnoldi"}


def _solver(name: str) -> Any:
    from pyinfluence.torch.solvers import EKFAC, KFAC, Arnoldi, LiSSA

    if name == "lissa":
        return LiSSA(depth=2000, seed=0)
    if name == "kfac":
        return KFAC(lanczos_steps=0)
    if name == "ekfac":
        return EKFAC(lanczos_steps=0)
    if name == "arnoldi":
        return Arnoldi(rank=50, seed=0)
    return name


def _np(a: Any) -> np.ndarray:
    return M.as_matrix(a)


#: ``polish`` runs its Newton stage (``refit``) only where L-BFGS got ‖∇R‖ to this; above it (the digits CNN
#: trained on 10% flipped labels stops at 9e-4 after 3000 iterations) Newton-CG meets indefinite curvature at
#: every step and would run for hours, so the model is used as L-BFGS left it (its ‖∇R‖ is recorded).
REFIT_FROM = 1e-5


def polish(task: Task, log: Callable[[str], None], lbfgs_iter: int = 3000) -> Task:
    """The deep task's model trained on from its weights to ‖∇R‖ ≤ 1e-9 (same data, same objective): full-batch
    L-BFGS to 1e-8 first (the task's trainer stops at ‖∇R‖ ~ 1e-3, where the digits MLP's Hessian still has
    negative eigenvalues: a saddle region that Newton steps leave slowly), then ``TorchInfluence.refit`` (quasi-
    Newton and Newton-CG steps) on a copy."""
    if task.kind == "linear":
        return task
    import copy

    from pyinfluence.torch.training import lbfgs_fit

    t0 = time.perf_counter()
    work = task.with_model(TrainedModel(module=copy.deepcopy(task.model), loss_fn=task.loss_fn, grad_norm=math.nan,
                                        seconds=0.0, warm_start=True))  # fmt: skip
    g1 = lbfgs_fit(
        work.model, work.X_train, work.y_train, lbfgs_iter, l2=work.l2, tol=1e-8, loss=work.loss_fn
    )
    if g1 > REFIT_FROM:
        log(f"  {task.name}: L-BFGS reached ‖∇R‖ {g1:.2g} only (> {REFIT_FROM:g}); no Newton polish")
        work.info["grad_norm"] = g1
        return work
    pre = "exact" if task.n_params <= EXACT_MAX_PARAMS else _solver("ekfac")
    inf = work.torch_influence(pre)
    new = inf.refit()
    rep = inf.last_retrain
    gn = float(rep.grad_norm.max()) if rep is not None else math.nan
    log(f"  polished {task.name}: ‖∇R‖ {task.info.get('grad_norm', float('nan')):.2g} -> {g1:.2g} (L-BFGS) -> "
        f"{gn:.2g} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    trained = TrainedModel(module=new.model, loss_fn=task.loss_fn, grad_norm=gn, seconds=time.perf_counter() - t0,
                           warm_start=True)  # fmt: skip
    out = task.with_model(trained)
    out.info["grad_norm"] = gn
    return out


def _scores(task: Task, method: str) -> tuple[np.ndarray, float, Any]:
    t0 = time.perf_counter()
    inf = task.influence(_solver(method))
    Xt, yt = task.test_data("numpy" if method == "linear-exact" else "torch")
    up = _np(inf.up_loss(Xt, yt))
    return up, time.perf_counter() - t0, inf


def _truth_label(task: Task) -> Optional[str]:
    budget = FIXED_BUDGET_LOO.get(task.name)
    if budget is None:
        return None
    return f"L-BFGS from θ̂ for {budget} iterations minus the control run (Koh & Liang's protocol)"


def loo_selection(
    task: Task, ref_up: np.ndarray, n_tests: int, n_points: int
) -> tuple[List[int], List[np.ndarray], np.ndarray]:
    """The leave-one-out check's pairs: the first ``n_tests`` test points, for each the ``n_points`` training
    points of largest |``ref_up``| (n, m), and the union of those removals (sorted)."""
    tests = list(range(min(n_tests, task.m_test)))
    idx = [np.argsort(-np.abs(ref_up[:, j]), kind="stable")[:n_points] for j in tests]
    return tests, idx, np.unique(np.concatenate(idx))


def _loo_influence(task: Task) -> Any:
    if task.kind == "linear":
        return task.linear_influence()
    return task.torch_influence("exact" if task.n_params <= EXACT_MAX_PARAMS else _solver("ekfac"))


def loo_actual(task: Task, tests: List[int], union: np.ndarray, inf: Any = None) -> np.ndarray:
    """The leave-one-out truth, (|union|, T): the fixed-budget retraining for tasks in :data:`FIXED_BUDGET_LOO`,
    else ``retrain_loo`` to its tolerance (linear: exact Newton refits) with ``inf`` (the task's own if None;
    its ``last_retrain`` then reports the retraining)."""
    budget = FIXED_BUDGET_LOO.get(task.name)
    if budget is not None:
        return fixed_budget_loo(task, tests, union, budget)
    inf = _loo_influence(task) if inf is None else inf
    Xt, yt = task.test_data("numpy" if task.kind == "linear" else "torch")
    return _np(inf.retrain_loo(Xt[tests], yt[tests], union))


def _loo_truth(task: Task, ref_up: np.ndarray, n_tests: int, n_points: int, log: Callable[[str], None]):
    """(test_idx, train_idx per test, actual (T, k), Newton-step prediction (T, k), seconds, ...)."""
    t0 = time.perf_counter()
    tests, idx, union = loo_selection(task, ref_up, n_tests, n_points)
    inf = _loo_influence(task)
    Xt, yt = task.test_data("numpy" if task.kind == "linear" else "torch")
    budget = FIXED_BUDGET_LOO.get(task.name)
    actual_all = loo_actual(task, tests, union, inf)
    newton_all = _np(inf.loo_change(Xt[tests], yt[tests], union, method="newton"))
    pos = {int(i): r for r, i in enumerate(union)}
    actual = [actual_all[[pos[int(i)] for i in ix], t] for t, ix in enumerate(idx)]
    newton = [newton_all[[pos[int(i)] for i in ix], t] for t, ix in enumerate(idx)]
    secs = time.perf_counter() - t0
    rep = getattr(inf, "last_retrain", None) if budget is None else None
    gmax = float(rep.grad_norm.max()) if rep is not None else None
    retrain_info = None
    if rep is not None:  # deep: how the retraining went (saddle points met, lowest curvature found)
        curv = [c for c in rep.info.get("min_curvature", []) if math.isfinite(c)]
        retrain_info = {"steps_max": int(rep.steps.max()), "saddle_escapes": int(sum(rep.info.get("saddle_escapes", []))),
                        "lowest_curvature_found": min(curv) if curv else None}  # fmt: skip
    log(f"  leave-one-out truth: {union.size} refits in {secs:.1f} s (max ‖∇R₋‖ {gmax})")
    ladder = None
    if task.kind == "deep":
        ladder = _damping_ladder(task, tests, union, pos, idx, actual, log)
    return tests, idx, actual, newton, secs, gmax, ladder, retrain_info


#: The documented damping rule of the deep leave-one-out check (the demo's too): the first λ of this ladder at
#: which H + λI and every leave-one-out Hessian of the check are positive definite.
DAMPING_LADDER = (0.0, 1e-4, 1e-3, 1e-2)


def _damping_ladder(task: Task, tests, union, pos, idx, actual, log) -> Dict[str, Any]:
    """First-order and Newton-step LOO Pearson at the first damping of :data:`DAMPING_LADDER` that every solve
    of the check accepts (the same λ for all test points; rejected values and why are recorded)."""
    from pyinfluence.errors import NotPositiveDefiniteError
    from pyinfluence.torch.influence import TorchInfluence

    Xt, yt = task.test_data("torch")
    rejected = []
    for lam in DAMPING_LADDER:
        solver = "exact" if task.n_params <= EXACT_MAX_PARAMS else _solver("ekfac")
        inf = TorchInfluence(task.model, task.loss_fn, (task.X_train, task.y_train), params=task.params, l2=task.l2,
                             damping=lam, solver=solver, optimum_tol=None)  # fmt: skip
        try:
            newton_all = _np(inf.loo_change(Xt[tests], yt[tests], union, method="newton"))
            first_all = _np(inf.loo_change(Xt[tests], yt[tests], union)) if solver == "exact" else None
        except NotPositiveDefiniteError as exc:
            rejected.append({"damping": lam, "train_index": getattr(exc, "train_index", None)})
            continue
        if (
            first_all is None
        ):  # EK-FAC preconditions the Newton step only; the first-order scores need H exactly
            from pyinfluence.torch.solvers import BlockCG

            exact_like = TorchInfluence(task.model, task.loss_fn, (task.X_train, task.y_train), params=task.params,
                                        l2=task.l2, damping=lam, solver=BlockCG(tol=1e-8), optimum_tol=None)  # fmt: skip
            first_all = _np(exact_like.loo_change(Xt[tests], yt[tests], union))
        newton = [newton_all[[pos[int(i)] for i in ix], t] for t, ix in enumerate(idx)]
        first = [first_all[[pos[int(i)] for i in ix], t] for t, ix in enumerate(idx)]
        out = {"damping": lam, "rejected": rejected, "first_order": _pearson_pairs(first, actual),
               "newton": _pearson_pairs(newton, actual),
               "first_order_slope": _slope(first, actual), "newton_slope": _slope(newton, actual)}  # fmt: skip
        log(f"  damping rule: λ = {lam:g} (rejected {rejected}): LOO first order {out['first_order']}, "
            f"Newton {out['newton']}")  # fmt: skip
        return out
    return {"damping": None, "rejected": rejected}


def _slope(pred: List[np.ndarray], actual: List[np.ndarray]) -> Optional[float]:
    """Slope of actual regressed on predicted through the origin (> 1: the estimate under-predicts)."""
    p, a = np.concatenate(pred), np.concatenate(actual)
    den = float(p @ p)
    return float(p @ a) / den if den > 0 else None


def _pearson_pairs(pred: List[np.ndarray], actual: List[np.ndarray]) -> Optional[float]:
    r = M.pearson(np.concatenate(pred), np.concatenate(actual))
    return None if not math.isfinite(r) else float(r)


def _fin(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def run_task(
    name: str,
    *,
    n_subsets: int = 100,
    loo_tests: int = 5,
    loo_points: int = 20,
    brittle_tests: int = 5,
    ensemble: int = 5,
    mislabel: bool = True,
    peers: Sequence[str] = (),
    methods: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
    quick: bool = False,
    damping: Optional[float] = None,
    log: Optional[Callable[[str], None]] = print,
) -> Dict[str, Any]:
    """Every measure for every method on one task; a JSON-able dict (see the module docstring)."""
    if log is None:
        log = _quiet
    base = make_task(name, quick=quick)
    if damping is not None and base.kind == "deep":
        base.damping = float(damping)
    log(f"{name}: n = {base.n_train}, m = {base.m_test}, p = {base.n_params}, damping {base.damping:g}")
    task = polish(base, log)
    masks = L.make_subsets(task.n_train, n_subsets=n_subsets, fraction=0.5, seed=0)
    t0 = time.perf_counter()
    retr = L.retrain_subsets(base, masks, cache_dir=cache_dir, log=None)
    log(f"  {n_subsets} subset models: {retr.n_trained} trained now ({time.perf_counter() - t0:.1f} s; "
        f"{float(np.sum(retr.seconds)):.1f} s of training in all), mean accuracy {float(retr.accuracy().mean()):.3f}")  # fmt: skip
    noisy = None
    flipped = None
    mislabel_grad_norm = None
    if mislabel:
        from pyinfluence.applications.mislabel import flip_labels

        rng = np.random.default_rng(0)
        labels = task.train_label_values()
        y_flip, flipped = flip_labels(labels, 0.1, rng)
        noisy = task.with_labels(y_flip)
        if noisy.kind == "deep":
            noisy = polish(noisy, log)
            mislabel_grad_norm = noisy.info.get("grad_norm")
    rows: List[Dict[str, Any]] = []
    ups: Dict[str, np.ndarray] = {}
    for method in methods or _METHODS[name]:
        row: Dict[str, Any] = {"task": name, "library": "pyinfluence", "method": method}
        try:
            up, secs, _ = _scores(task, method)
            row["time_s"] = secs
            ups[method] = up
        except Exception as exc:  # a method that fails is a row with its error
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            log(f"  {method}: {row['error']}")
            rows.append(row)
            continue
        if noisy is not None and method in _SELF_OK and flipped is not None:
            t1 = time.perf_counter()
            try:
                si = _np(noisy.influence(_solver(method)).self_influence())[:, 0]
                row["mislabel_auc"] = L.mislabel_auc(si, flipped)
                row["mislabel_time_s"] = time.perf_counter() - t1
            except Exception as exc:
                row["mislabel_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
    # ensemble: K models from different initial weights (deep only: the linear objective has one optimum)
    if ensemble and task.kind == "deep":
        t1 = time.perf_counter()
        members = [task] + [task.with_model(base.retrain(seed=1000 + s)) for s in range(ensemble - 1)]
        t_train = time.perf_counter() - t1
        meth = "exact" if task.n_params <= EXACT_MAX_PARAMS else "block_cg"
        t2 = time.perf_counter()
        acc = None
        for mem in members:
            u, _, _ = _scores(mem, meth)
            acc = u if acc is None else acc + u
        assert acc is not None
        ups[f"ensemble-{ensemble}"] = acc / len(members)
        rows.append({"task": name, "library": "pyinfluence", "method": f"ensemble of {ensemble} ({meth})",
                     "key": f"ensemble-{ensemble}", "time_s": time.perf_counter() - t2, "train_time_s": t_train})  # fmt: skip
    for pr in _peer_runs(task, peers, log):
        rows.append(pr[0])
        if pr[1] is not None:
            ups[pr[0]["key"]] = pr[1]
    ref_key = "linear-exact" if "linear-exact" in ups else ("exact" if "exact" in ups else next(iter(ups)))
    tests, idx, actual, newton, loo_s, gmax, ladder, retrain_info = _loo_truth(
        task, ups[ref_key], loo_tests, loo_points, log
    )
    n = task.n_train
    newton_r = _pearson_pairs(newton, actual)
    for row in rows:
        key = row.get("key", row["method"])
        found = ups.get(key)
        if found is None:
            continue
        up = found
        res = L.lds(up, retr)
        row["lds"], row["lds_se"], row["lds_undefined"] = _fin(res.mean), _fin(res.se), res.n_undefined
        first = [-up[ix, t] / n for t, ix in zip(tests, idx)]
        row["loo_first_order"] = _pearson_pairs(first, actual)
        if row["library"] == "pyinfluence" and not key.startswith("ensemble"):
            row["loo_newton"] = newton_r
        if task.kind == "linear" or brittle_tests:
            try:
                br = L.brittleness(task, up, list(range(min(brittle_tests, task.m_test))),
                                   cache_dir=cache_dir, sizes=(5, 10, 20, 40, 80, 160, 320))  # fmt: skip
                row["brittle_flipped"] = br.fraction_flipped
                row["brittle_median_k"] = br.median_k
                row["brittle_k"] = br.k
            except Exception as exc:
                row["brittle_error"] = f"{type(exc).__name__}: {exc}"[:200]
        log(f"  {key}: LDS {row['lds']}, LOO {row['loo_first_order']}, brittle {row.get('brittle_median_k')}, "
            f"mislabel AUC {row.get('mislabel_auc')}")  # fmt: skip
    return {
        "task": name,
        "n_train": task.n_train,
        "m_test": task.m_test,
        "n_params": task.n_params,
        "damping": task.damping,
        "polished_grad_norm": task.info.get("grad_norm"),
        "n_subsets": n_subsets,
        "subset_models_accuracy": float(retr.accuracy().mean()),
        "subset_training_s": float(np.sum(retr.seconds)),
        "mislabel_model_grad_norm": mislabel_grad_norm,
        "loo": {
            "tests": tests,
            "points": loo_points,
            "seconds": loo_s,
            "max_grad_norm": gmax,
            "newton_pearson": newton_r,
            "damping_rule": ladder,
            "retrain": retrain_info,
            "truth": _truth_label(task),
        },  # fmt: skip
        "published": PUBLISHED.get(name),
        "rows": rows,
    }


def _peer_runs(task: Task, peers: Sequence[str], log: Callable[[str], None]) -> List[tuple]:
    if not peers:
        return []
    from pyinfluence.bench.peers import run_peers

    out = []
    for pr in run_peers(task, peers=tuple(peers), timeout_s=1800, log=lambda s: log(f"    {s}")):
        up = None if getattr(pr, "up_loss", None) is None else _np(pr.up_loss)
        err = getattr(pr, "error", None)
        if up is not None and (up.shape != (task.n_train, task.m_test) or not np.isfinite(up).all()):
            err, up = err or f"shape {up.shape} or non-finite values", None
        key = f"{pr.library}:{pr.method}"
        row = {"task": task.name, "library": pr.library, "method": pr.method, "key": key, "time_s": pr.time_s}
        if err:
            row["error"] = str(err)[:300]
        out.append((row, up))
    return out


def _quiet(msg: str) -> None:
    pass


def json_default(o: Any) -> Any:
    """``json.dumps(default=)`` for the study's results: numpy scalars and arrays, non-finite floats as null."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating, float)):
        return float(o) if math.isfinite(float(o)) else None
    return str(o)


def _f(x: Any, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def render(results: List[Dict[str, Any]]) -> str:
    lines = [
        "| task | library | method | LDS (mean ± s.e.) | LOO Pearson, first order | LOO Pearson, Newton step | "
        "brittleness: flipped / median k | mislabel AUC | time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            if "error" in r:
                lines.append(
                    f"| {res['task']} | {r['library']} | {r['method']} | error: {r['error'][:80]} |||||| "
                )
                continue
            lds = "–" if r.get("lds") is None else f"{r['lds']:.3f} ± {_f(r.get('lds_se'))}"
            fl = r.get("brittle_flipped")
            br = "–" if fl is None else f"{fl:.0%} / {_f(r.get('brittle_median_k'), '{:g}')}"
            t = _f(r.get("time_s"), "{:.2f}")
            if r.get("train_time_s") is not None:
                t += f" (+ {r['train_time_s']:.1f} training)"
            lines.append(
                f"| {res['task']} | {r['library']} | {r['method']} | {lds} | {_f(r.get('loo_first_order'))} | "
                f"{_f(r.get('loo_newton'))} | {br} | {_f(r.get('mislabel_auc'))} | {t} |"
            )
    notes = [
        f"- {res['task']}: n = {res['n_train']}, m = {res['m_test']} test points, p = {res['n_params']}, damping "
        f"{res['damping']:g}; {res['n_subsets']} half subsets (subset models' mean test accuracy "
        f"{res['subset_models_accuracy']:.3f}, {res['subset_training_s']:.0f} s of training); leave-one-out on "
        f"{len(res['loo']['tests'])} test points × {res['loo']['points']} training points, "
        + (
            res["loo"]["truth"]
            if res["loo"].get("truth")
            else "exact Newton refits"
            if res["loo"]["max_grad_norm"] is None
            else f"refits to ‖∇R₋‖ ≤ {res['loo']['max_grad_norm']:.1g}"
        )
        + f". Published: {res['published']}."
        + _ladder_note(res["loo"].get("damping_rule"))
        for res in results
    ]
    return "\n".join(lines + [""] + notes)


def _ladder_note(d: Optional[Dict[str, Any]]) -> str:
    if not d:
        return ""
    if d.get("damping") is None:
        return " Damping rule: every λ of the ladder was rejected."
    return (
        f" At the damping rule's λ = {d['damping']:g} (first of {DAMPING_LADDER} with every leave-one-out Hessian of "
        f"the check positive definite; rejected: {[r['damping'] for r in d['rejected']]}): LOO Pearson first order "
        f"{_f(d.get('first_order'))} (slope {_f(d.get('first_order_slope'), '{:.2f}')}), Newton step "
        f"{_f(d.get('newton'))} (slope {_f(d.get('newton_slope'), '{:.2f}')})."
    )


def run_study(tasks: Sequence[str], **kw: Any) -> List[Dict[str, Any]]:
    return [run_task(t, **kw) for t in tasks]


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pyinfluence.bench.studies.retraining", description=__doc__)
    ap.add_argument("--tasks", default="digits-logreg,digits-mlp,digits-cnn-smooth")
    ap.add_argument("--subsets", type=int, default=100)
    ap.add_argument("--loo-tests", type=int, default=5)
    ap.add_argument("--loo-points", type=int, default=20)
    ap.add_argument("--brittle-tests", type=int, default=5)
    ap.add_argument("--ensemble", type=int, default=5)
    ap.add_argument("--no-mislabel", action="store_true")
    ap.add_argument("--peers", default="", help="comma-separated: captum,pydvl,kronfluence")
    ap.add_argument("--damping", type=float, default=None)
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated pyinfluence methods (default: every method of the task)",
    )
    ap.add_argument(
        "--loo-iters",
        type=int,
        default=None,
        help="L-BFGS iterations of the fixed-budget leave-one-out truth (tasks in FIXED_BUDGET_LOO; default 150)",
    )
    ap.add_argument("--cache", default=os.path.join(".cache", "pyinfluence-retraining"))
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--out", default=None, help="RESULTS.md to update (section 'retraining')")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    if a.loo_iters is not None:
        for name in FIXED_BUDGET_LOO:
            FIXED_BUDGET_LOO[name] = a.loo_iters
    res = run_study(
        [t for t in a.tasks.split(",") if t],
        n_subsets=a.subsets,
        loo_tests=a.loo_tests,
        loo_points=a.loo_points,
        brittle_tests=a.brittle_tests,
        ensemble=a.ensemble,
        mislabel=not a.no_mislabel,
        peers=[p for p in a.peers.split(",") if p],
        methods=None if a.methods is None else [m for m in a.methods.split(",") if m],
        cache_dir=a.cache,
        quick=a.quick,
        damping=a.damping,
    )
    text = render(res)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=json_default)
    if a.out:
        from pyinfluence.bench.studies.results_file import write_section

        write_section(a.out, text, "retraining")


if __name__ == "__main__":  # pragma: no cover
    main()
