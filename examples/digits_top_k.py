"""Which training images made the model say this? (pyinfluence on scikit-learn's bundled digits)

Trains a 10-class (multinomial) logistic regression on standardised 8x8 digit images, picks a test
image (by default the first one the model gets wrong), and prints the 5 most helpful and the 5 most
harmful training images for it, with their influence scores and small ASCII renderings.

    python examples/digits_top_k.py            # first misclassified test image
    python examples/digits_top_k.py --index 7  # a test image of your choice (index into the test split)

Reading the numbers (signs exactly as in Koh & Liang 2017):
    up_loss   = I_up,loss(z, z_test) = -grad L(z_test)^T H^-1 grad L(z): the derivative of the test loss
                with respect to upweighting training point z. Negative = helpful (more weight on z
                lowers the test loss), positive = harmful.
    loo       = -up_loss / n: the predicted change of the test loss if z were removed and the model
                retrained. Removing a helpful point raises the test loss (loo > 0).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import pyinfluence

SHADES = " .:-=+*#%@"  # 10 levels for pixel values 0..16


def render(images, titles, width=2):
    """ASCII-render a row of 8x8 images (values 0..16) side by side, each pixel `width` chars wide."""
    cell = 8 * width
    lines = ["  ".join(t[:cell].ljust(cell) for t in titles)]
    for r in range(8):
        row = []
        for img in images:
            px = img.reshape(8, 8)[r]
            row.append("".join(SHADES[min(int(v * len(SHADES) / 17.0), len(SHADES) - 1)] * width for v in px))
        lines.append("  ".join(row))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--index",
        type=int,
        default=None,
        help="test image to explain (index into the test split); default: first misclassified",
    )
    parser.add_argument("-k", type=int, default=5, help="how many helpful and harmful points to show")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    images, labels = load_digits(return_X_y=True)  # bundled with scikit-learn: no download
    idx_train, idx_test = train_test_split(
        np.arange(len(labels)), test_size=0.2, random_state=0, stratify=labels
    )
    mean = images[idx_train].mean(axis=0)
    std = images[idx_train].std(axis=0)
    std[std == 0] = 1.0  # a few border pixels are always 0
    X = (images - mean) / std  # standardised with the training set's statistics
    X_train, y_train = X[idx_train], labels[idx_train]
    X_test, y_test = X[idx_test], labels[idx_test]
    n = len(y_train)

    model = pyinfluence.LogisticRegression(l2=1e-3).fit(X_train, y_train)  # exact optimum (Newton)
    pred = model.predict(X_test)
    print(
        f"multinomial logistic regression on digits: n_train={n}, n_test={len(y_test)}, "
        f"l2=1e-3, test accuracy {np.mean(pred == y_test):.3f}"
    )

    if args.index is None:
        wrong = np.flatnonzero(pred != y_test)
        j = int(wrong[0]) if wrong.size else 0
    else:
        j = args.index
        if not 0 <= j < len(y_test):
            parser.error(f"--index must be in [0, {len(y_test) - 1}]")

    infl = pyinfluence.LinearInfluence(model, X_train, y_train)  # Hessian assembled and factorised once
    top = infl.top_k(X_test[j], y_test[j], k=args.k)  # one test point: arrays of shape (1, k)
    proba = model.predict_proba(X_test[j : j + 1])[0]
    loss = model.loss(X_test[j : j + 1], y_test[j : j + 1])[0]

    print(
        f"\ntest image #{j}: true label {y_test[j]}, predicted {pred[j]} "
        f"(p={proba.max():.3f}; p(true)={proba[list(model.classes_).index(y_test[j])]:.3f}), "
        f"test loss {loss:.3f}"
    )
    print(render([images[idx_test[j]]], [f"test #{j} y={y_test[j]}"]))

    header = f"{'rank':>4}  {'train idx':>9}  {'label':>5}  {'up_loss':>10}  {'loo = -up_loss/n':>16}"
    for name, ids, scores, note in (
        (
            "helpful",
            top.helpful_idx[0],
            top.helpful_scores[0],
            "upweighting lowers the test loss; removing raises it",
        ),
        (
            "harmful",
            top.harmful_idx[0],
            top.harmful_scores[0],
            "upweighting raises the test loss; removing lowers it",
        ),
    ):
        print(f"\nmost {name} training points ({note}):")
        print(header)
        for r, (i, s) in enumerate(zip(ids, scores), 1):
            print(f"{r:>4}  {i:>9}  {y_train[i]:>5}  {s:>10.4f}  {-s / n:>+16.6f}")
        print(render(images[idx_train[ids]], [f"#{i} y={y_train[i]}" for i in ids]))

    print(f"\n({time.perf_counter() - t0:.2f} s)")


if __name__ == "__main__":
    main()
