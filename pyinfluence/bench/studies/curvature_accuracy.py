"""Where the Kronecker approximations lose accuracy, and when EK-FAC preconditioning pays (issue 15, item 1).

Two measurements on trained rungs of :mod:`pyinfluence.bench.ladder` (digits MLPs / CNN, float64):

1. **Error decomposition**, per training seed. The influence matrix up_loss (n_train × m_test) under a chain
   of curvature matrices, each compared with the exact one (Pearson and Spearman over the whole matrix,
   least-squares slope through the origin; 1 = right scale):

   - ``GGN``: the full Gauss–Newton matrix (1/n) Σ_i J_iᵀ H_out,i J_i + l2·I (J_i the Jacobian of example
     i's outputs, H_out,i the Hessian of its loss in the outputs), which K-FAC's true Fisher approximates
     (they coincide for cross-entropy on logits);
   - ``block GGN``: its diagonal blocks, one per module (weights and bias together), zero elsewhere: what any
     per-layer approximation can reach at best;
   - pyinfluence's ``KFAC`` / ``EKFAC`` (true Fisher) and ``EKFAC(fisher="empirical")``: the Kronecker
     factorisation of those blocks, with EK-FAC's eigenvalue correction.

   All but the last three rows are computed here with ``torch.func`` (dense matrices, Cholesky), independently
   of pyinfluence's solvers; every matrix is damped by the same λ. The exact influence is
   −∇L(z_i)ᵀ(H + λI)⁻¹∇L(z_test) with H the Hessian of (1/n)Σ L + (l2/2)‖θ‖².
2. **Preconditioned block CG**: HVP columns that :class:`~pyinfluence.BlockCG` spends on the s_test solve of
   the m test points, without and with ``preconditioner="ekfac"``, at several tolerances and dampings, with
   the agreement of each solution with the exact one (``pyinfluence.bench.ladder.reference_up_loss``, dense
   Cholesky on torch.func HVPs) and the extreme Ritz values of the preconditioned operator M(H + λI) that
   BlockCG reports. EK-FAC's preparation costs data passes (factors, eigenvalue correction), not HVPs; it is
   reported apart (seconds).

Run: ``python -m pyinfluence.bench.studies.curvature_accuracy [--rungs mlp-2k] [--seeds 0 1 2 3 4]
[--test-points 50] [--pcg-rungs mlp-2k,mlp-10k] [--dampings 1e-2 1e-3 1e-4] [--out FILE.json]``; prints
markdown. Nothing here is timed for comparison; the study runs with the process's torch threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, grad, hessian, jacrev, vmap

__all__ = ["decompose", "preconditioning", "markdown", "main"]

MODULE = "pyinfluence.bench.studies.curvature_accuracy"


def _agreement(est: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from pyinfluence.bench.studies.scale_ladder import agreement

    a = agreement(est, ref)
    return {k: float(a[k]) for k in ("pearson", "spearman", "slope")}


class _Dense:
    """The rung's objective as functions of the flat θ (all parameters), with torch.func only."""

    def __init__(self, rung: Any) -> None:
        if rung.params is not None or rung.dict_batches:
            raise ValueError("curvature_accuracy takes rungs over all parameters with tensor inputs")
        self.rung = rung
        self.model = rung.model
        named = list(self.model.named_parameters())
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
        self.p = int(self.theta.numel())

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.reshape(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes)}

    def outputs(self, flat: Tensor, x: Tensor) -> Tensor:
        return functional_call(self.model, self.params(flat), (x[None],))[0]

    def example_loss(self, flat: Tensor, x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(self.model, self.params(flat), (x[None],))
        return self.rung.loss_fn(out, y[None]).sum()

    def grads(self, X: Tensor, Y: Tensor) -> Tensor:
        """(N, p) per-example gradients of the loss (without the l2 term)."""
        return vmap(grad(self.example_loss), in_dims=(None, 0, 0))(self.theta, X, Y)

    def hessian(self) -> Tensor:
        """(p, p) Hessian of (1/n) Σ L + (l2/2)‖θ‖²."""
        X, Y, l2 = self.rung.X_train, self.rung.y_train, self.rung.l2

        def objective(f: Tensor) -> Tensor:
            out = functional_call(self.model, self.params(f), (X,))
            return self.rung.loss_fn(out, Y).mean() + 0.5 * l2 * (f * f).sum()

        H = hessian(objective)(self.theta)
        return 0.5 * (H + H.T)

    def ggn(self, rows: int = 256) -> Tensor:
        """(p, p) (1/n) Σ_i J_iᵀ H_out,i J_i + l2·I, in chunks of ``rows`` examples."""
        X, Y = self.rung.X_train, self.rung.y_train
        n = int(X.shape[0])
        G = torch.zeros(self.p, self.p, dtype=torch.float64)
        with torch.no_grad():
            outs = self.model(X)

        def out_hessian(o: Tensor, y: Tensor) -> Tensor:
            return hessian(lambda z: self.rung.loss_fn(z[None], y[None]).sum())(o)

        for s in range(0, n, rows):
            xc, yc = X[s : s + rows], Y[s : s + rows]
            J = vmap(jacrev(self.outputs), in_dims=(None, 0))(self.theta, xc)  # (r, K, p)
            Ho = vmap(out_hessian)(outs[s : s + rows], yc)  # (r, K, K)
            HJ = torch.einsum("rkl,rlp->rkp", Ho, J)
            G += torch.einsum("rkp,rkq->pq", J, HJ)
        G /= n
        G += self.rung.l2 * torch.eye(self.p, dtype=torch.float64)
        return 0.5 * (G + G.T)

    def module_blocks(self) -> list[tuple[int, int]]:
        """[start, stop) ranges of θ, one per module (its parameters are contiguous in named order)."""
        owners = [n.rsplit(".", 1)[0] if "." in n else "" for n in self.names]
        out: list[tuple[int, int]] = []
        start = 0
        for k, size in enumerate(self.sizes):
            stop = start + size
            if out and owners[k] == owners[k - 1]:
                out[-1] = (out[-1][0], stop)
            else:
                out.append((start, stop))
            start = stop
        return out

    def up_loss(self, A: Tensor, damping: float) -> np.ndarray:
        """(n, m) −g_iᵀ (A + λI)⁻¹ g_test by Cholesky (ValueError if A + λI is not positive definite)."""
        M = A + damping * torch.eye(self.p, dtype=torch.float64)
        L, bad = torch.linalg.cholesky_ex(M)
        if int(bad):
            raise ValueError("the damped matrix is not positive definite")
        Gt = self.grads(self.rung.X_test, self.rung.y_test).T
        S = torch.cholesky_solve(Gt, L)
        return (-(self.grads(self.rung.X_train, self.rung.y_train) @ S)).numpy()


def _pyinfluence_up_loss(rung: Any, solver: Any) -> tuple[np.ndarray, Any, float, float]:
    """(up_loss (n, m), the TorchInfluence object, seconds of prepare(), seconds of the scoring)."""
    from pyinfluence.torch.influence import TorchInfluence

    inf = TorchInfluence(
        rung.model, rung.loss_fn, rung.train_data(), l2=rung.l2, damping=rung.damping, solver=solver
    )
    t0 = time.perf_counter()
    inf.prepare()
    t1 = time.perf_counter()
    up = inf.up_loss(rung.test_data()).detach().double().numpy()
    return up, inf, t1 - t0, time.perf_counter() - t1


def _pcg_iterations(
    A: Tensor, B: Tensor, Minv: Optional[Tensor], tol: float = 1e-8, max_iter: int = 5000
) -> int:
    """Iterations of textbook preconditioned CG (Hestenes–Stiefel; one recursion per column of B, run
    together) on A X = B from 0 until every column's ‖r‖ ≤ tol·‖b‖; ``Minv``: the dense M ≈ A⁻¹, None =
    plain CG. Written here, independent of pyinfluence's solvers."""
    X = torch.zeros_like(B)
    R = B.clone()
    Z = R if Minv is None else Minv @ R
    P = Z.clone()
    rz = (R * Z).sum(0)
    bn = B.norm(dim=0)
    for it in range(1, max_iter + 1):
        AP = A @ P
        alpha = rz / (P * AP).sum(0)
        X += P * alpha
        R -= AP * alpha
        if bool((R.norm(dim=0) <= tol * bn).all()):
            return it
        Z = R if Minv is None else Minv @ R
        rz_new = (R * Z).sum(0)
        P = Z + P * (rz_new / rz)
        rz = rz_new
    return max_iter


def _kronecker_inverse(rung: Any, solver: Any, p: int) -> Tensor:
    """The dense (p, p) M = (K + (l2 + λ)I)⁻¹ of a K-FAC / EK-FAC solver prepared on the rung: its
    approximate inverse applied to the identity (the same product the solvers' preconditioner uses)."""
    from pyinfluence.torch.influence import TorchInfluence

    inf = TorchInfluence(
        rung.model, rung.loss_fn, rung.train_data(), l2=rung.l2, damping=rung.damping, solver=solver
    )
    prepared: Any = inf.prepare()._prep  # the prepared KFAC/EKFAC object (package-internal use)
    M = prepared._apply(torch.eye(p, dtype=torch.float64))
    return 0.5 * (M + M.T)


def _damped_inverse(C: Tensor, damping: float) -> Tensor:
    """(C + λI)⁻¹, dense, by Cholesky."""
    eye = torch.eye(C.shape[0], dtype=C.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(C + damping * eye))


def _blocks(C: Tensor, ranges: Sequence[tuple[int, int]]) -> Tensor:
    """C's diagonal blocks [a:b, a:b] for the given ranges; zero elsewhere."""
    out = torch.zeros_like(C)
    for a, b in ranges:
        out[a:b, a:b] = C[a:b, a:b]
    return out


def decompose(
    rung_name: str = "mlp-2k",
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    test_points: int = 50,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Part 1: one entry per seed: ``seed``, ``n_params``, ``train_accuracy``, ``test_accuracy``,
    ``rows``: {curvature: {pearson, spearman, slope}} against the exact influence, and ``pcg``:
    {preconditioner: iterations} of :func:`_pcg_iterations` on (H + λI) S = G_test to 1e-8 with
    M = (C + λI)⁻¹ for each curvature C (``"none"``: plain CG) — the most any preconditioner built from
    C can save, measured one column at a time."""
    from pyinfluence.bench.ladder import make_rung
    from pyinfluence.torch.solvers import EKFAC, KFAC

    out = []
    for seed in seeds:
        rung = make_rung(rung_name, quick=quick, seed=int(seed), m_test=int(test_points))
        d = _Dense(rung)
        lam = rung.damping
        eye = torch.eye(d.p, dtype=torch.float64)
        H = d.hessian()
        A = H + lam * eye
        rhs = d.grads(rung.X_test, rung.y_test).T.contiguous()
        ref = d.up_loss(H, lam)

        pcg: dict[str, int] = {"none": _pcg_iterations(A, rhs, None)}
        G = d.ggn()
        rows: dict[str, dict[str, float]] = {"GGN (full)": _agreement(d.up_loss(G, lam), ref)}
        pcg["GGN (full)"] = _pcg_iterations(A, rhs, _damped_inverse(G, lam))
        B = _blocks(G, d.module_blocks())
        rows["GGN, per-module blocks"] = _agreement(d.up_loss(B, lam), ref)
        pcg["GGN, per-module blocks"] = _pcg_iterations(A, rhs, _damped_inverse(B, lam))
        pcg["H, per-module blocks"] = _pcg_iterations(
            A, rhs, _damped_inverse(_blocks(H, d.module_blocks()), lam)
        )
        del G, B
        for label, solver in (
            ("K-FAC (true Fisher)", KFAC(raise_on_nonconvergence=False)),
            ("EK-FAC (true Fisher)", EKFAC(raise_on_nonconvergence=False)),
            ("EK-FAC (empirical Fisher)", EKFAC(fisher="empirical", raise_on_nonconvergence=False)),
        ):
            up, _, _, _ = _pyinfluence_up_loss(rung, solver)
            rows[label] = _agreement(up, ref)
            pcg[label] = _pcg_iterations(
                A,
                rhs,
                _kronecker_inverse(
                    rung,
                    type(solver)(fisher=solver.fisher, lanczos_steps=0, raise_on_nonconvergence=False),
                    d.p,
                ),
            )
        out.append(
            {
                "rung": rung_name,
                "seed": int(seed),
                "n_params": d.p,
                "m_test": int(test_points),
                "train_accuracy": rung.info.get("train_accuracy"),
                "test_accuracy": rung.info.get("test_accuracy"),
                "rows": rows,
                "pcg": pcg,
            }
        )
    return out


def preconditioning(
    rung_name: str,
    dampings: Sequence[float] = (1e-2, 1e-3, 1e-4),
    tols: Sequence[float] = (1e-4, 1e-6, 1e-8),
    test_points: int = 10,
    seed: int = 0,
    quick: bool = False,
) -> list[dict[str, Any]]:
    """Part 2: one row per (damping, tol, preconditioner): HVP columns, iterations, the Ritz range of the
    preconditioned operator, agreement with the exact solution, EK-FAC's preparation seconds."""
    from pyinfluence.bench.ladder import make_rung, reference_up_loss
    from pyinfluence.torch.solvers import BlockCG

    base = make_rung(rung_name, quick=quick, seed=seed, m_test=test_points)
    out = []
    for lam in dampings:
        base.damping = float(lam)
        ref, _ = reference_up_loss(base, "exact")
        for pre in (None, "ekfac"):
            for tol in tols:
                up, inf, prep_s, solve_s = _pyinfluence_up_loss(base, BlockCG(tol=tol, preconditioner=pre))
                info = inf.last_solve.info
                out.append(
                    {
                        "rung": rung_name,
                        "n_params": base.n_params,
                        "damping": float(lam),
                        "tol": float(tol),
                        "preconditioner": pre or "none",
                        "hvp_columns": int(info["matvec_columns"]),
                        "iterations": int(inf.last_solve.iterations),
                        "ritz_min": info.get("preconditioned_lambda_min_estimate"),
                        "ritz_max": info.get("preconditioned_lambda_max_estimate"),
                        "lambda_max": info.get("lambda_max_estimate"),
                        "max_residual": float(inf.last_solve.max_residual),
                        "prepare_s": prep_s,
                        "solve_s": solve_s,
                        **_agreement(up, ref),
                    }
                )
    return out


def _f(v: Any, digits: int = 4) -> str:
    return "–" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def markdown(doc: dict[str, Any]) -> str:
    from pyinfluence._formatting import markdown_table

    parts: list[str] = []
    dec = doc.get("decomposition") or []
    if dec:
        labels = list(dec[0]["rows"])
        head = ["seed", "test acc."] + [f"{lab}: Pearson / slope" for lab in labels]
        rows = [
            [str(e["seed"]), _f(e["test_accuracy"], 3)]
            + [f"{_f(e['rows'][lab]['pearson'], 3)} / {_f(e['rows'][lab]['slope'], 3)}" for lab in labels]
            for e in dec
        ]
        means = ["mean", ""] + [
            f"{np.mean([e['rows'][lab]['pearson'] for e in dec]):.3f} / "
            f"{np.mean([e['rows'][lab]['slope'] for e in dec]):.3f}"
            for lab in labels
        ]
        e0 = dec[0]
        parts.append(
            f"#### Error decomposition: {e0['rung']} (p = {e0['n_params']}, m = {e0['m_test']} test points), "
            f"one row per training seed (seed = data split + initialisation)\n\n"
            + markdown_table(head, rows + [means], align="lr" + "r" * len(labels))
        )
        plabels = list(dec[0]["pcg"])
        prow = [[str(e["seed"])] + [str(e["pcg"][lab]) for lab in plabels] for e in dec]
        parts.append(
            "#### Preconditioned CG iterations to 1e-8 (one recursion per test column, dense matrices), by "
            "preconditioner M = (C + λI)⁻¹\n\n"
            + markdown_table(["seed", *plabels], prow, align="r" * (1 + len(plabels)))
        )
    pcg = doc.get("preconditioning") or []
    if pcg:
        rows = [
            [
                r["rung"],
                _f(r["damping"], 2),
                _f(r["tol"], 2),
                r["preconditioner"],
                str(r["hvp_columns"]),
                str(r["iterations"]),
                "–" if r["ritz_min"] is None else f"{r['ritz_min']:.3g} – {r['ritz_max']:.3g}",
                f"{1.0 - r['pearson']:.1e}",
                f"{r['slope']:.6f}",
            ]
            for r in pcg
        ]
        parts.append(
            "#### BlockCG with and without the EK-FAC preconditioner: HVP columns for the m = "
            f"{doc.get('settings', {}).get('pcg_test_points', 10)} test points\n\n"
            + markdown_table(
                [
                    "rung",
                    "damping",
                    "tol",
                    "preconditioner",
                    "HVP columns",
                    "iterations",
                    "Ritz range of M(H+λI)",
                    "1 − Pearson",
                    "slope",
                ],
                rows,
                align="lrrlrrrrr",
            )
        )
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n")[0])
    ap.add_argument("--rungs", default="mlp-2k", help="rungs of the decomposition ('' = skip)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--test-points", type=int, default=50)
    ap.add_argument("--pcg-rungs", default="mlp-2k,mlp-10k", help="rungs of the preconditioning part")
    ap.add_argument("--dampings", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--pcg-test-points", type=int, default=10)
    ap.add_argument("--out", default=None, help="JSON file")
    a = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    doc: dict[str, Any] = {
        "schema": "pyinfluence.curvature_accuracy/1",
        "settings": {**vars(a)},
        "decomposition": [],
        "preconditioning": [],
    }
    for name in [r for r in a.rungs.split(",") if r]:
        doc["decomposition"] += decompose(name, a.seeds, a.test_points)
    for name in [r for r in a.pcg_rungs.split(",") if r]:
        doc["preconditioning"] += preconditioning(name, a.dampings, test_points=a.pcg_test_points)
    if a.out:
        from pyinfluence._json import jsonable

        with open(a.out, "w") as f:
            json.dump(jsonable(doc), f, indent=1)
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
