"""Where the Newton step of a leave-one-out objective exists, and how well it predicts retraining there.

For a non-convex model the trained θ̂ is a minimum of the full objective R but need not be one of the leave-one-out
objective R₋ᵢ: removing a training point subtracts its own curvature, and A_i = ∇²R₋ᵢ(θ̂) + λI (equation (2) of
:mod:`pyinfluence.torch.leave_out`) can be indefinite. Then θ̂ is a saddle of the damped leave-out objective, its
quadratic model has no minimiser, and ``loo_change(method="newton")`` raises ``NotPositiveDefiniteError`` for that
removal rather than return a step (any damping that makes A_i positive definite is a trust-region choice, not a
Newton step).

This study takes the retraining study's leave-one-out check (the same task, polished θ̂, test points, training points
of largest |exact up_loss| and truth: :mod:`pyinfluence.bench.studies.retraining`) and, for each damping λ of a
ladder, removal by removal:

- which removals have an indefinite A_i (no Newton step at that λ);
- the Pearson R (and the slope of actual on predicted, through the origin) of the Newton step against the truth on
  the (test, removal) pairs where it exists, and of the first-order estimate −up_loss/n on those same pairs and on
  all pairs;
- the retraining study's documented rule (the first λ with every A_i positive definite: the Newton step over all
  pairs) and a per-removal rule (each removal at the least damping of the ladder whose A_i is positive definite).

Exact solver only (the dense Hessian; tasks up to :data:`~pyinfluence.bench.studies.retraining.EXACT_MAX_PARAMS`
parameters). Run: ``python -m pyinfluence.bench.studies.newton_ladder [--task digits-cnn-smooth] [--tests 5]
[--points 20] [--ladder 0,1e-5,1e-4,3e-4,1e-3,1e-2] [--recheck-iters 1000 --recheck-removals 12] [--json F]
[--out bench/RESULTS.md]``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from pyinfluence.bench.studies import retraining as RT

__all__ = ["DEFAULT_LADDER", "ladder_rows", "main", "render", "run"]

#: Dampings examined by default: the retraining study's documented ladder with three values between its steps.
DEFAULT_LADDER = (0.0, 1e-5, 1e-4, 3e-4, 1e-3, 1e-2)


def _pairs(M: np.ndarray, row: Dict[int, int], idx: Sequence[np.ndarray]) -> np.ndarray:
    """The (test t, removal i) entries of an (|union|, T) matrix, pooled test by test in ``idx`` order."""
    return np.concatenate([M[[row[int(i)] for i in ix], t] for t, ix in enumerate(idx)])


def _pearson(p: np.ndarray, a: np.ndarray) -> Optional[float]:
    if p.size < 3 or float(np.std(p)) == 0.0 or float(np.std(a)) == 0.0:
        return None
    return float(np.corrcoef(p, a)[0, 1])


def _slope(p: np.ndarray, a: np.ndarray) -> Optional[float]:
    den = float(p @ p)
    return float(p @ a) / den if den > 0 else None


def ladder_rows(
    task: Any,
    tests: Sequence[int],
    idx: Sequence[np.ndarray],
    union: np.ndarray,
    actual: np.ndarray,
    ladder: Sequence[float] = DEFAULT_LADDER,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Per damping of ``ladder``, the removals of ``union`` without a Newton step and the LOO Pearson figures.

    ``task`` needs ``model``, ``loss_fn``, ``X_train``, ``y_train``, ``params``, ``l2`` and ``test_data("torch")``
    (a bench :class:`~pyinfluence.bench.tasks.Task`); ``idx[t]`` are the removals checked for test point
    ``tests[t]`` (all in ``union``); ``actual`` (|union|, T) the true change of each test loss per removal.
    Returns {"ladder": one dict per λ, "rule": the first λ of the retraining study's
    :data:`~pyinfluence.bench.studies.retraining.DAMPING_LADDER` (among those of ``ladder``) with every A_i
    positive definite and its figures over all pairs (None if none), "per_removal": each removal at its least
    positive-definite λ (None if some removal has none)}. The Newton values are in each λ's dict under
    ``newton`` ((|union|, T), NaN where no step exists), the first-order ones under ``first``.
    """
    from pyinfluence.errors import NotPositiveDefiniteError
    from pyinfluence.torch.influence import TorchInfluence

    Xt, yt = task.test_data("torch")
    X, y = Xt[list(tests)], yt[list(tests)]
    row = {int(i): r for r, i in enumerate(union)}
    a = _pairs(actual, row, idx)
    out: List[Dict[str, Any]] = []
    for lam in ladder:
        t0 = time.perf_counter()
        inf = TorchInfluence(task.model, task.loss_fn, (task.X_train, task.y_train), params=task.params, l2=task.l2,
                             damping=float(lam), solver="exact", optimum_tol=None)  # fmt: skip
        entry: Dict[str, Any] = {"damping": float(lam)}
        try:
            first = RT._np(inf.loo_change(X, y, union))
        except NotPositiveDefiniteError as exc:  # H + λI itself is not positive definite: nothing at this λ
            entry.update(h_not_pd=True, error=str(exc)[:200], seconds=time.perf_counter() - t0)
            out.append(entry)
            log(f"  λ = {lam:g}: H + λI not positive definite")
            continue
        newton = np.full((union.size, len(tests)), np.nan)
        indefinite: List[int] = []
        # one removal at a time: a block solve stops at its first indefinite A_i
        for r, i in enumerate(union):
            try:
                newton[r] = RT._np(inf.loo_change(X, y, [int(i)], method="newton"))[0]
            except NotPositiveDefiniteError:
                indefinite.append(int(i))
        f, n = _pairs(first, row, idx), _pairs(newton, row, idx)
        ok = np.isfinite(n)
        entry.update(
            h_not_pd=False,
            indefinite=indefinite,
            pairs=int(a.size),
            pairs_with_step=int(ok.sum()),
            newton_pearson=_pearson(n[ok], a[ok]),
            newton_slope=_slope(n[ok], a[ok]),
            first_order_pearson_same_pairs=_pearson(f[ok], a[ok]),
            first_order_pearson=_pearson(f, a),
            first_order_slope=_slope(f, a),
            seconds=time.perf_counter() - t0,
            newton=newton,
            first=first,
        )
        out.append(entry)
        log(f"  λ = {lam:g}: {len(indefinite)} of {union.size} removals without a Newton step; Newton R "
            f"{entry['newton_pearson']} on {entry['pairs_with_step']}/{a.size} pairs; first order "
            f"{entry['first_order_pearson']} ({entry['seconds']:.0f} s)")  # fmt: skip
    # the retraining study's rule, on the values of its ladder that were examined here
    rule = next((e for e in out if e["damping"] in RT.DAMPING_LADDER and not e["h_not_pd"] and not e["indefinite"]),
                None)  # fmt: skip
    rule_out = None
    if rule is not None:
        rule_out = {"damping": rule["damping"], "newton_pearson": rule["newton_pearson"],
                    "first_order_pearson": rule["first_order_pearson"]}  # fmt: skip
    # per removal: the least damping of the ladder at which its A_i is positive definite
    chosen = np.full((union.size, len(tests)), np.nan)
    lam_of = np.full(union.size, np.nan)
    for e in out:
        if e["h_not_pd"]:
            continue
        todo = np.isnan(lam_of) & np.isfinite(e["newton"]).all(axis=1)
        chosen[todo] = e["newton"][todo]
        lam_of[todo] = e["damping"]
    per_removal = None
    if np.isfinite(lam_of).all():
        n = _pairs(chosen, row, idx)
        per_removal = {"newton_pearson": _pearson(n, a), "newton_slope": _slope(n, a),
                       "dampings": {f"{v:g}": int(np.sum(lam_of == v)) for v in sorted(set(lam_of.tolist()))}}  # fmt: skip
    return {"ladder": out, "rule": rule_out, "per_removal": per_removal}


def _recheck(
    task: Any,
    tests: Sequence[int],
    union: np.ndarray,
    actual: np.ndarray,
    ladder: List[Dict[str, Any]],
    iters: int,
    k: int,
    log: Callable[[str], None],
) -> Dict[str, Any]:
    """The fixed-budget truth of the ``k`` removals of largest max |truth| again with ``iters`` iterations, split by
    whether A_i is positive definite at the smallest damping examined."""
    from pyinfluence.bench.runner import fixed_budget_loo

    first = next((e for e in ladder if not e["h_not_pd"]), None)
    indefinite = set(first["indefinite"]) if first is not None else set()
    rows = np.argsort(-np.abs(actual).max(axis=1), kind="stable")[:k]
    t0 = time.perf_counter()
    again = fixed_budget_loo(task, tests, union[rows], iters)
    out: Dict[str, Any] = {"iters": int(iters), "base_iters": RT.FIXED_BUDGET_LOO.get(task.name),
                           "damping": first["damping"] if first else None, "seconds": time.perf_counter() - t0}  # fmt: skip
    for name, want in (("with_step", False), ("without_step", True)):
        sel = np.array([(int(union[r]) in indefinite) == want for r in rows], dtype=bool)
        a, b = actual[rows[sel]].ravel(), again[sel].ravel()
        out[name] = {"removals": [int(i) for i in union[rows[sel]]], "pearson": _pearson(a, b),
                     "max_abs_change": float(np.abs(b - a).max()) if a.size else None,
                     "max_abs_truth": float(np.abs(a).max()) if a.size else None}  # fmt: skip
    log(f"  truth with {iters} iterations: {out}")
    return out


def run(
    task_name: str = "digits-cnn-smooth",
    n_tests: int = 5,
    n_points: int = 20,
    ladder: Sequence[float] = DEFAULT_LADDER,
    log: Callable[[str], None] = print,
    recheck_iters: int = 0,
    recheck_removals: int = 0,
) -> Dict[str, Any]:
    """The retraining study's leave-one-out check of ``task_name`` (polish, exact scores, top-|up_loss| removals,
    its truth), examined along ``ladder``; a JSON-able dict. With a fixed-budget truth, ``recheck_iters`` > 0
    recomputes it for the ``recheck_removals`` removals of largest |truth| with that many L-BFGS iterations (how
    much the truth itself depends on the budget, for removals with and without a Newton step at the smallest λ)."""
    from pyinfluence.bench.tasks import make_task

    t0 = time.perf_counter()
    task = RT.polish(make_task(task_name), log)
    if task.kind != "deep" or task.n_params > RT.EXACT_MAX_PARAMS:
        raise ValueError(
            f"task_name: {task_name!r} is not a deep task with at most {RT.EXACT_MAX_PARAMS} parameters "
            "(the study needs the Exact solver's dense Hessian)"
        )
    up, _, _ = RT._scores(task, "exact")
    tests, idx, union = RT.loo_selection(task, up, n_tests, n_points)
    t1 = time.perf_counter()
    actual = RT.loo_actual(task, tests, union)
    log(
        f"  truth: {union.size} removals in {time.perf_counter() - t1:.0f} s ({RT._truth_label(task) or 'retrain_loo'})"
    )
    res = ladder_rows(task, tests, idx, union, actual, ladder, log)
    if recheck_iters and recheck_removals and RT.FIXED_BUDGET_LOO.get(task.name) is not None:
        res["recheck"] = _recheck(
            task, tests, union, actual, res["ladder"], recheck_iters, recheck_removals, log
        )
    for e in res["ladder"]:
        e.pop("newton", None)
        e.pop("first", None)
    return {"task": task_name, "n_train": task.n_train, "n_params": task.n_params, "tests": tests,
            "points": n_points, "removals": int(union.size), "truth": RT._truth_label(task) or "retrain_loo",
            "polished_grad_norm": task.info.get("grad_norm"), "seconds": time.perf_counter() - t0, **res}  # fmt: skip


def render(res: Dict[str, Any]) -> str:
    f = RT._f
    lines = [
        "## Where the leave-one-out Newton step exists (newton-ladder)",
        "",
        f"`python -m pyinfluence.bench.studies.newton_ladder --task {res['task']}"
        + (
            f" --recheck-iters {res['recheck']['iters']} --recheck-removals "
            f"{len(res['recheck']['with_step']['removals']) + len(res['recheck']['without_step']['removals'])}"
            if res.get("recheck")
            else ""
        )
        + f"` ({res['seconds']:.0f} s). "
        f"{res['task']} (n = {res['n_train']}, p = {res['n_params']}): {len(res['tests'])} test points × "
        f"{res['points']} training points ({res['removals']} distinct removals); truth: {res['truth']}.",
        "",
        "| λ | removals without a Newton step (A_i indefinite) | pairs with a step | Newton R (slope) on those "
        "| first order R on those | first order R, all pairs (slope) |",
        "|---|---|---|---|---|---|",
    ]
    for e in res["ladder"]:
        if e["h_not_pd"]:
            lines.append(f"| {e['damping']:g} | H + λI not positive definite | – | – | – | – |")
            continue
        lines.append(
            f"| {e['damping']:g} | {len(e['indefinite'])} | {e['pairs_with_step']}/{e['pairs']} | "
            f"{f(e['newton_pearson'])} ({f(e['newton_slope'], '{:.2f}')}) | {f(e['first_order_pearson_same_pairs'])} | "
            f"{f(e['first_order_pearson'])} ({f(e['first_order_slope'], '{:.2f}')}) |"
        )
    rc = res.get("recheck")
    if rc:
        lines.append("")
        lines.append(
            f"The truth itself, {rc['base_iters']} against {rc['iters']} L-BFGS iterations, for the removals of largest "
            f"|truth| ({rc['seconds']:.0f} s), split by whether A_i is positive definite at λ = {rc['damping']:g}:"
        )
        for name, what in (("with_step", "with a Newton step"), ("without_step", "without one")):
            d = rc[name]
            lines.append(
                f"- {what}: {len(d['removals'])} removals, R between the two truths {f(d['pearson'])}, largest change "
                f"{f(d['max_abs_change'], '{:.2g}')} (largest |truth| {f(d['max_abs_truth'], '{:.2g}')})."
            )
    r, p = res["rule"], res["per_removal"]
    lines.append("")
    lines.append(
        f"- Documented rule (the retraining study's: first λ of {RT.DAMPING_LADDER} with every A_i positive "
        "definite): "
        + (
            f"λ = {r['damping']:g}, Newton R {f(r['newton_pearson'])}, first order R {f(r['first_order_pearson'])}, all pairs."
            if r
            else "no λ of the ladder qualifies."
        )  # fmt: skip
    )
    lines.append(
        "- Per removal (each at the least λ of the ladder whose A_i is positive definite): "
        + (
            f"Newton R {f(p['newton_pearson'])} (slope {f(p['newton_slope'], '{:.2f}')}), all pairs; removals per λ "
            f"{p['dampings']}."
            if p
            else "some removal has no positive definite A_i on the ladder."
        )  # fmt: skip
    )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m pyinfluence.bench.studies.newton_ladder", description=__doc__
    )
    ap.add_argument("--task", default="digits-cnn-smooth")
    ap.add_argument("--tests", type=int, default=5)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--ladder", default=",".join(f"{v:g}" for v in DEFAULT_LADDER))
    ap.add_argument(
        "--recheck-iters", type=int, default=0, help="recompute a fixed-budget truth with this budget"
    )
    ap.add_argument("--recheck-removals", type=int, default=12, help="... for this many removals")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--out", default=None, help="RESULTS.md to update (section 'newton-ladder')")
    a = ap.parse_args(argv)
    res = run(a.task, a.tests, a.points, [float(v) for v in a.ladder.split(",")], print, a.recheck_iters,
              a.recheck_removals)  # fmt: skip
    text = render(res)
    print(text)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=RT.json_default)
    if a.out:
        from pyinfluence.bench.studies.results_file import write_section

        write_section(a.out, text, "newton-ladder")


if __name__ == "__main__":  # pragma: no cover
    main()
