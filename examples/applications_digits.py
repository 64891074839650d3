"""The paper's applications with pyinfluence.applications, on scikit-learn's bundled digits.

    python examples/applications_digits.py --quick --out /tmp/pyinfluence-apps

Runs, with the measured settings of pyinfluence.applications.presets.DIGITS_PRESETS:
1. influence versus leave-one-out retraining (validate_loo; Figure 2);
2. fixing mislabeled examples (mislabel_experiment; Figure 6) and the ranking (find_mislabeled);
3. training-set attacks (attack_many / training_set_attack; Section 5.2);
4. debugging a domain mismatch (make_readmission_data + debug_prediction; Section 5.3);
5. model behaviour: an RBF model versus logistic regression on pixels (compare_models; Figure 4).
Writes one PNG per figure and results.json (every result's to_dict()) to --out, and prints the key
numbers. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

import pyinfluence
from pyinfluence import applications as app
from pyinfluence.applications.presets import DIGITS_PRESETS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller settings (well under a minute)")
    parser.add_argument("--out", default="pyinfluence-applications", help="output folder")
    args = parser.parse_args(argv)
    P = DIGITS_PRESETS["quick" if args.quick else "default"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, times = {}, {}

    def save(name, fig):
        fig.savefig(out / f"{name}.png", dpi=110)

    # 1. influence versus leave-one-out retraining
    t0 = time.perf_counter()
    p = P["loo"]
    ds = app.load_digits_split(**p["data"])
    model = pyinfluence.LogisticRegression(l2=p["l2"]).fit(ds.X_train, ds.y_train)
    inf = pyinfluence.LinearInfluence(model, ds.X_train, ds.y_train)
    j = app.highest_loss_points(model, ds.X_test, ds.y_test, k=p["n_test_points"])
    loo = app.validate_loo(
        inf,
        ds.X_test[j],
        ds.y_test[j],
        n_top=p["n_top"],
        n_random=p["n_random"],
        label="logistic regression",
    )
    save("loo", loo.plot())
    results["loo"] = loo.to_dict()
    times["loo"] = time.perf_counter() - t0
    print(
        f"1. LOO ({len(j)} test points x {p['n_top']}+{p['n_random']} training points): "
        + ", ".join(f"{m}: R={s['pearson']:.4f} slope={s['slope_origin']:.2f}" for m, s in loo.stats.items())
        + f"  [{times['loo']:.1f} s]"
    )

    # 2. mislabeled examples
    t0 = time.perf_counter()
    p = P["mislabel"]
    ds2 = app.load_digits_split(**p["data"])
    mis = app.mislabel_experiment(
        *ds2.as_tuple(),
        model_factory=lambda: pyinfluence.LogisticRegression(l2=p["l2"]),
        flip_fraction=p["flip_fraction"],
        check_fractions=p["check_fractions"],
        seeds=p["seeds"],
    )
    save("mislabel", mis.plot())
    results["mislabel"] = mis.to_dict()
    m2 = pyinfluence.LogisticRegression(l2=p["l2"]).fit(ds2.X_train, ds2.y_train)
    ranking = app.find_mislabeled(pyinfluence.LinearInfluence(m2, ds2.X_train, ds2.y_train), k=10)
    save("mislabel_top", ranking.plot_top(ds2.images_train, ds2.y_train))
    results["mislabel_ranking"] = ranking.to_dict()
    times["mislabel"] = time.perf_counter() - t0
    print(
        f"2. mislabeled ({mis.n_flipped}/{mis.n_train} flipped, seeds {list(mis.seeds)}): found at "
        + "; ".join(
            f"{int(100 * f)}%: " + ", ".join(f"{m} {v:.2f}" for m, v in mis.at(f).items())
            for f in (0.05, 0.1, 0.2, 0.3)
            if np.isclose(mis.check_fractions, f).any()
        )
        + f"  [{times['mislabel']:.1f} s]"
    )

    # 3. training-set attack
    t0 = time.perf_counter()
    p = P["attack"]
    ds3 = app.load_digits_split(**p["data"])
    model3 = pyinfluence.LogisticRegression(l2=p["l2"]).fit(ds3.X_train, ds3.y_train)
    inf3 = pyinfluence.LinearInfluence(model3, ds3.X_train, ds3.y_train)
    targets = app.pick_targets(inf3, ds3.X_test, ds3.y_test, p["n_targets"])
    att = app.attack_many(
        inf3,
        ds3.X_test[targets],
        ds3.y_test[targets],
        epsilon=p["epsilon"],
        n_poison=p["n_poison"],
        n_steps=p["n_steps"],
        clip=p["clip"],
        image_shape=(8, 8),
        target_index=targets,
    )
    save("attack_summary", att.plot())
    best = max(att.attacks, key=lambda a: (a.flipped, a.loss_change))
    save("attack_example", best.plot())
    results["attack"] = att.to_dict()
    times["attack"] = time.perf_counter() - t0
    print(
        f"3. attack (epsilon={p['epsilon']}, {p['n_poison']} training images, "
        f"{len(targets)} least confident "
        f"targets): {int(att.flipped.sum())}/{len(targets)} flipped, mean loss change "
        f"{att.loss_change.mean():.3f}  [{times['attack']:.1f} s]"
    )

    # 4. domain mismatch
    t0 = time.perf_counter()
    p = P["domain"]
    dm = app.make_readmission_data(**p["data"])
    model4 = pyinfluence.LogisticRegression(l2=p["l2"]).fit(dm.X_train, dm.y_train)
    inf4 = pyinfluence.LinearInfluence(model4, dm.X_train, dm.y_train)
    pred = model4.predict(dm.X_test)
    wrong = np.flatnonzero(dm.group_test & (pred != dm.y_test))
    dbg = app.debug_prediction(
        inf4,
        dm.X_test[wrong[0]],
        dm.y_test[wrong[0]],
        feature_names=dm.feature_names,
        k=p["k"],
        group=dm.group_train,
    )
    save("domain", dbg.plot())
    results["domain"] = {
        "data": dm.to_dict(),
        "debug": dbg.to_dict(),
        "children_test_accuracy": float((pred == dm.y_test)[dm.group_test].mean()),
        "adults_test_accuracy": float((pred == dm.y_test)[~dm.group_test].mean()),
    }
    times["domain"] = time.perf_counter() - t0
    print(
        f"4. domain mismatch: {dm.description}\n   children's test accuracy "
        f"{results['domain']['children_test_accuracy']:.2f}; for a healthy child predicted "
        f"readmitted the top "
        f"{p['k']} training points include {dbg.group_in_top} of the "
        f"{int(dm.group_train.sum())} children "
        f"(|influence| {dbg.ratio:.0f}x the rest); responsible feature: {dbg.responsible_feature} "
        f"({dbg.feature_share.max():.0%})  [{times['domain']:.1f} s]"
    )

    # 5. model behaviour
    t0 = time.perf_counter()
    p = P["behaviour"]
    ds5 = app.load_digits_split(**p["data"])
    centers = ds5.X_train[
        np.sort(np.random.default_rng(0).choice(len(ds5.y_train), p["n_centers"], replace=False))
    ]
    gamma = p["gamma_times_median"] * app.rbf_gamma(centers, "median")
    F, Ft = (
        app.rbf_features(ds5.X_train, centers, gamma),
        app.rbf_features(ds5.X_test, centers, gamma),
    )
    rbf = pyinfluence.LogisticRegression(l2=p["rbf_l2"]).fit(F, ds5.y_train)
    lin = pyinfluence.LogisticRegression(l2=p["l2"]).fit(ds5.X_train, ds5.y_train)
    tj = np.arange(p["n_test_points"])
    cmp = app.compare_models(
        {
            "RBF model": pyinfluence.LinearInfluence(rbf, F, ds5.y_train),
            "logistic (pixels)": pyinfluence.LinearInfluence(lin, ds5.X_train, ds5.y_train),
        },
        ds5.X_train,
        ds5.y_train,
        ds5.X_test[tj],
        ds5.y_test[tj],
        test_inputs={"RBF model": (Ft[tj], ds5.y_test[tj])},
        k=p["k"],
        image_shape=(8, 8),
    )
    save("behaviour", cmp.plot(0))
    results["behaviour"] = cmp.to_dict()
    times["behaviour"] = time.perf_counter() - t0
    ratio = {n: np.mean([s["helpful_distance_ratio"] for s in cmp.stats[n]]) for n in cmp.names}
    print(
        "5. behaviour: mean pixel distance of the most helpful training images / average distance: "
        + ", ".join(f"{n} {r:.2f}" for n, r in ratio.items())
        + f"  [{times['behaviour']:.1f} s]"
    )

    results["times_s"] = times
    (out / "results.json").write_text(json.dumps(results, allow_nan=False, indent=1))
    print(f"total {sum(times.values()):.1f} s; figures and results.json in {out.resolve()}")


if __name__ == "__main__":
    main()
