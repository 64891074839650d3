"""``Exact``: materialise H, Cholesky-factorise H + λI once, two triangular solves per right-hand side block."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from pyinfluence import _core
from pyinfluence._validation import (
    check_bool,
    check_damping,
    check_int,
)
from pyinfluence.errors import NotPositiveDefiniteError
from pyinfluence.torch.solvers.base import (
    HessianOperatorLike,
    PreparedSolver,
    Solver,
    _check_dtype_option,
    _check_operator,
    _col_norms,
    _dtype_name,
    _fmt,
    _generator,
    _normalise_device,
    _relative,
    _round_up,
    _set,
    _state_field,
    _state_tensor,
)

# (float64 eigvalsh, ~9p³ flops: 0.3 s at p = 2000) to suggest a damping value.
_EIGVALSH_MAX_P = 2000
# LiSSA: power iterations per probed minibatch when choosing the scale automatically.


# ==============================================================================================
# Exact: dense Cholesky
# ==============================================================================================
class _CoreFactor:
    """Cholesky factor of A + λI by the C++ core (CPU). ``solve`` maps torch ↔ numpy zero-copy. The core
    raises NotPositiveDefiniteError with its diagnosis (``pivot``, ``size``, ``min_pivot``,
    ``suggested_damping``) and a message without advice: callers add theirs."""

    backend = "core"

    def __init__(self, A: Tensor, damping: float) -> None:
        self._f = _core.CholeskyFactor(A.contiguous().numpy(), float(damping))

    def solve(self, B: Tensor) -> Tensor:
        out = self._f.solve(B.contiguous().numpy())
        return torch.from_numpy(np.ascontiguousarray(out))


def cholesky_solve(L: Tensor, B: Tensor) -> Tensor:
    """(L Lᵀ)⁻¹ B for a lower-triangular Cholesky factor L (p, p) and B (p,) or (p, k), by two triangular solves.

    Not ``torch.cholesky_solve``: on the CPU it copies L into a column-major buffer on every call, a p × p copy per
    solve that dominates few right-hand sides (p = 9242, one column, 2 cores: 0.23 s against 0.028 s here).
    """
    Y = torch.linalg.solve_triangular(L, B[:, None] if B.ndim == 1 else B, upper=False)
    X = torch.linalg.solve_triangular(L.mT, Y, upper=True)
    return X[:, 0] if B.ndim == 1 else X


class _TorchFactor:
    """Cholesky factor of A + λI by torch.linalg.cholesky_ex (any device)."""

    backend = "torch"

    def __init__(self, A: Tensor, damping: float) -> None:
        M = A.clone()
        if damping:
            M.diagonal().add_(damping)
        L, info = torch.linalg.cholesky_ex(M)
        del M
        bad = int(info)
        if bad:
            raise NotPositiveDefiniteError(
                f"the Cholesky factorisation of H + λI failed at pivot {bad - 1} (0-based): the "
                f"leading {bad}×{bad} block is not positive definite",
                pivot=bad - 1,
                size=int(A.shape[0]),
            )
        self._L = L

    @classmethod
    def from_factor(cls, L: Tensor) -> _TorchFactor:
        """The factor object around a known lower-triangular Cholesky factor L (a restored state)."""
        obj = cls.__new__(cls)
        obj._L = L
        return obj

    def solve(self, B: Tensor) -> Tensor:
        return cholesky_solve(self._L, B)


def _factorise(A: Tensor, damping: float) -> _CoreFactor | _TorchFactor:
    """Cholesky-factorise A + λI (A symmetric, lower triangle used); one place to swap backends.

    CPU tensors use the C++ core's ``CholeskyFactor`` when the installed extension has it, else
    ``torch.linalg.cholesky_ex``; CUDA tensors always factorise on the device. Raises
    NotPositiveDefiniteError (message naming the failing pivot, ``pivot`` and ``size`` set; callers add the
    advice).
    """
    if A.device.type == "cpu" and hasattr(_core, "CholeskyFactor"):
        return _CoreFactor(A, damping)
    return _TorchFactor(A, damping)


def _spectrum_advice(A: Tensor, damping: float) -> tuple[str, float]:
    """Advice on the damping that makes A + λI positive definite, from A's spectrum, and the damping it
    suggests.

    p ≤ 2000: exact extreme eigenvalues (float64 eigvalsh). Larger: λ_max by 30 power iterations
    on the dense matrix, and a relative suggestion.
    """
    p = A.shape[0]
    A64 = A.to(torch.float64)
    if p <= _EIGVALSH_MAX_P:
        ev = torch.linalg.eigvalsh(A64)
        lo, hi = float(ev[0]), float(ev[-1])
        if lo + damping <= 0:
            need = -lo
            suggest = _round_up(max(2.0 * need, need + 1e-4 * abs(hi), 1e-12))
            return (
                f"The smallest eigenvalue of H is {_fmt(lo)} (the largest {_fmt(hi)}): H + λI is "
                f"positive definite only for damping > {_fmt(need)}; pass e.g. damping={suggest:g} "
                f"(damping={damping:g} now).",
                suggest,
            )
        suggest = _round_up(max(1e-6 * abs(hi), damping * 10, 1e-12))
        f64 = " or factor_dtype=torch.float64" if A.dtype != torch.float64 else ""
        return (
            f"H + λI has eigenvalues in [{_fmt(lo + damping)}, {_fmt(hi + damping)}] (condition "
            f"number {_fmt((hi + damping) / max(lo + damping, 1e-300))}): numerically singular "
            f"in {str(A.dtype).replace('torch.', '')}; pass a larger damping (e.g. "
            f"damping={suggest:g}){f64}.",
            suggest,
        )
    u = torch.randn(p, 1, dtype=torch.float64, device=A.device, generator=_generator(A.device, 0))
    lam = 0.0
    for _ in range(30):
        w = A64 @ u
        lam = float(torch.linalg.vector_norm(w))
        if lam == 0:
            break
        u = w / lam
    suggest = _round_up(max(1e-3 * lam, 1e-12))
    return (
        f"The largest eigenvalue magnitude of H is about {_fmt(lam)}; pass damping=λ > 0, e.g. "
        f"damping={suggest:g} (1e-3·λ_max), and increase it tenfold until the factorisation "
        f"succeeds (damping={damping:g} now).",
        suggest,
    )


@dataclass(frozen=True)
class Exact(Solver):
    """Dense Cholesky solve: materialise H, factorise H + λI once, solve many right-hand sides.

    Parameters
    ----------
    max_params : int, default 20 000
        Refuse Hessians with more parameters: the dense (p, p) matrix takes 8p² bytes in float64
        (3.2 GB at p = 20 000; peak memory ≈ 3 such matrices) and the factorisation p³/3 flops.
        Above it, use :class:`CG` or :class:`LiSSA`, or select fewer parameters (``params=``).
    factor_dtype : torch.float64 (default), torch.float32 or None
        The dtype in which H + λI is symmetrised, factorised and solved; None = the operator's
        dtype. float64 by default even for float32 models (as kronfluence does): Hessians of
        neural networks are often so ill-conditioned that a float32 Cholesky fails or loses all
        digits (its error grows like p·κ·ε), while the float64 factorisation only carries the
        float32 rounding of H itself. Solutions are returned in V's dtype. On GPUs with slow
        float64 (consumer cards), ``factor_dtype=None`` is much faster.
    compute_residual : bool, default True
        Report ‖(H + λI)x − v‖/‖v‖ per column, computed with the dense matrix (2p²·r flops,
        as much as the solve itself). Keeps H in memory beside its factor; False frees it.

    ``prepare``: one ``op.dense()``, then the factorisation — with the C++ core's
    ``CholeskyFactor`` on the CPU (when the installed extension has it), with
    ``torch.linalg.cholesky_ex`` otherwise and on CUDA. Raises NotPositiveDefiniteError with a
    suggested damping (from H's eigenvalues when p ≤ 2000) when H + λI is not positive definite.
    ``solve``: two triangular solves per column block, no HVPs.

    Saved state (:meth:`PreparedSolver.state`): the symmetrised H in ``factor_dtype`` (``"A"``) and,
    when torch factorised it (CUDA), its Cholesky factor ``"L"``. The C++ core's factor cannot be
    read back, so :meth:`restore` factorises ``A`` again (p³/3 flops, no HVP: the same factor, bit
    for bit, on the same machine); a state prepared with ``compute_residual=False`` by the C++ core
    holds no ``A`` and cannot be written out (ValueError).
    """

    max_params: int = 20_000
    factor_dtype: torch.dtype | None = torch.float64
    compute_residual: bool = True

    name: ClassVar[str] = "exact"

    def __post_init__(self) -> None:
        _set(self, "max_params", check_int("max_params", self.max_params, 1))
        _set(self, "factor_dtype", _check_dtype_option("factor_dtype", self.factor_dtype))
        _set(self, "compute_residual", check_bool("compute_residual", self.compute_residual))

    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> _PreparedExact:
        _check_operator(op, ("dense",))
        damping = check_damping(damping)
        p = op.n_params
        if p > self.max_params:
            gb = 8.0 * p * p / 1e9
            raise ValueError(
                f"Exact: the Hessian has p = {p} parameters, more than max_params="
                f"{self.max_params} (its dense matrix alone would take {gb:.3g} GB in float64 and "
                f"its factorisation {p**3 / 3e12:.3g} TFLOP). Use solver='cg' (CG) or 'lissa' "
                f"(LiSSA), select fewer parameters with params=..., or raise "
                f"Exact(max_params=...) if the memory is there"
            )
        start = time.perf_counter()
        H = op.dense()
        if not isinstance(H, Tensor) or H.shape != (p, p):
            shape = tuple(H.shape) if isinstance(H, Tensor) else type(H).__name__
            raise RuntimeError(f"op.dense() returned {shape}; expected ({p}, {p})")
        H = H.detach()
        if not bool(torch.isfinite(H).all()):
            raise ValueError(
                "the Hessian contains NaN or infinity (check the model's parameters and loss at "
                "these weights)"
            )
        fdtype = self.factor_dtype or op.dtype
        A = H.to(fdtype)
        del H
        A = (A + A.mT).mul_(0.5)  # exactly symmetric, whatever the operator's rounding
        try:
            factor = _factorise(A, damping)
        except NotPositiveDefiniteError as exc:
            advice, suggest = _spectrum_advice(A, damping)
            raise NotPositiveDefiniteError(
                f"Exact: H + λI is not positive definite: {exc}. {advice} "
                f"Hessians of non-convex models (or of models with more parameters than training "
                f"points, or l2 = 0) often have zero or negative eigenvalues; damping λ adds λI "
                f"(Koh & Liang §4).",
                pivot=exc.pivot,
                size=exc.size,
                min_pivot=exc.min_pivot,
                suggested_damping=suggest,
            ) from None
        info = {
            "backend": factor.backend,
            "factor_dtype": str(fdtype).replace("torch.", ""),
            "n_params": p,
        }
        return _PreparedExact(
            self,
            op,
            damping,
            info,
            time.perf_counter() - start,
            factor,
            A if self.compute_residual else None,
            fdtype,
        )

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> _PreparedExact:
        """The factor from the saved ``L`` (torch), or ``A`` factorised again (the C++ core on the CPU,
        torch on CUDA); ``A`` kept for the residuals when ``compute_residual``."""
        who = "Exact.restore"
        p = int(op.n_params)
        fdtype = self.factor_dtype or op.dtype
        saved = _state_field(state, "factor_dtype", who, str)
        if saved != _dtype_name(fdtype):  # cannot happen after the configuration check, but cheap
            raise ValueError(
                f"{who}: the state was factorised in {saved}, this solver factorises in {_dtype_name(fdtype)}"
            )
        dev = _normalise_device(op.device)
        A = None
        if "A" in tensors:
            A = _state_tensor(tensors, "A", who, (p, p), fdtype, dev)
        if "L" in tensors:
            factor: _CoreFactor | _TorchFactor = _TorchFactor.from_factor(
                _state_tensor(tensors, "L", who, (p, p), fdtype, dev)
            )
        elif A is not None:
            factor = _factorise(A, damping)  # succeeded on these very numbers when it was prepared
        else:
            raise ValueError(f"{who}: the saved state lacks the array 'A' (and the factor 'L')")
        if self.compute_residual and A is None:
            raise ValueError(f"{who}: the saved state lacks the array 'A' needed with compute_residual=True")
        info = {**info, "backend": factor.backend}
        return _PreparedExact(
            self, op, damping, info, 0.0, factor, A if self.compute_residual else None, fdtype
        )


class _PreparedExact(PreparedSolver):
    # solve() makes no Hessian-vector product (two triangular solves with the factor every rank holds), so
    # under torch.distributed each rank may solve its own right-hand sides (TorchInfluence._solve_map)
    local_solve = True

    def __init__(self, solver, op, damping, info, prepare_time_s, factor, A, fdtype) -> None:
        super().__init__(solver, op, damping, info, prepare_time_s)
        self._factor = factor
        self._A = A
        self._fdtype = fdtype

    def _state(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        f = self._factor
        if isinstance(f, _TorchFactor):
            tensors["L"] = f._L
        elif self._A is None:
            raise ValueError(
                "Exact(compute_residual=False) let the C++ core keep the only copy of the factorised H + λI, "
                "and the core's factor cannot be read back: prepare with compute_residual=True (the "
                "default) to save this solver's state"
            )
        if self._A is not None:
            tensors["A"] = self._A
        return {"factor_dtype": _dtype_name(self._fdtype), "backend": f.backend}

    def _solve(self, V: Tensor):
        B = V.to(self._fdtype)
        X = self._factor.solve(B).to(device=V.device)
        X = X.to(V.dtype)
        res = None
        if self._A is not None:
            Xf = X.to(self._fdtype)
            R = torch.addmm(B, self._A, Xf, beta=-1.0)
            if self.damping:
                R.add_(Xf, alpha=self.damping)
            res = _relative(_col_norms(R), _col_norms(B))
        if not bool(torch.isfinite(X).all()):  # cannot happen for a successful factorisation
            raise NotPositiveDefiniteError(
                "Exact: the triangular solves produced NaN or infinity: H + λI is numerically "
                "singular; pass a larger damping"
            )
        return X, None, res, None, {"matvec_calls": 0, "matvec_columns": 0}
