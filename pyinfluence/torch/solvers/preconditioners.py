"""Preconditioners of the iterative solvers (CG, BlockCG, LiSSA): K-FAC / EK-FAC approximate inverses.

A preconditioner is a symmetric positive definite M ≈ (H + λI)⁻¹ that is cheap to apply. The iterative
solvers use it to solve the same system (H + λI) X = V in fewer Hessian-vector products: CG and BlockCG
iterate on the preconditioned system (their Krylov spaces are those of M(H + λI), whose spectrum is
clustered near 1 when M is good), LiSSA runs the preconditioned Richardson / Neumann recursion. The
answer is still that of the exact system — only the path to it changes.

The one kind implemented is the block-diagonal Kronecker-factored inverse of :class:`~.kfac.KFAC` /
:class:`~.kfac.EKFAC`, prepared from the same Hessian operator and damping (so it sees the same l2 and
λ): per layer M_l = Q_G [· ⊘ (eigenvalues + l2 + λ)] Q_Aᵀ, positive definite since the denominators
are ≥ l2 + λ > 0 (``prepare`` refuses otherwise). From the prepared K-FAC object only two methods are
used: ``_apply(V)`` = M V and ``_apply_sqrt_inverse(V)`` = M^{1/2} V (the symmetric square root, in
the same eigenbasis), both (p, r) → (p, r) in V's dtype.

Values of a solver's ``preconditioner`` field:

- ``None``: no preconditioning (the solver's plain iteration, bit for bit).
- ``"ekfac"`` / ``"kfac"`` (case-insensitive): ``EKFAC(lanczos_steps=0)`` / ``KFAC(lanczos_steps=0)``
  prepared in the solver's ``prepare``. Its own search for negative curvature is skipped: the
  iterations detect non-positive curvature of the true H + λI themselves.
- a configured :class:`~.kfac.KFAC` or :class:`~.kfac.EKFAC` object (e.g. ``EKFAC(fisher="empirical")``),
  prepared as configured.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

from pyinfluence.errors import PyInfluenceError
from pyinfluence.torch.solvers.base import HessianOperatorLike, _from_json, _matvec, _sample_matvec, _to_json
from pyinfluence.torch.solvers.kfac import EKFAC, KFAC

__all__ = ["PreconditionerLike", "check_preconditioner"]

#: What a solver's ``preconditioner`` field accepts.
PreconditionerLike = Union[None, str, KFAC]

_NAMES: dict[str, type[KFAC]] = {"ekfac": EKFAC, "kfac": KFAC}


def check_preconditioner(value: Any, name: str = "preconditioner") -> PreconditionerLike:
    """Validate a ``preconditioner`` field: None, ``"kfac"``/``"ekfac"`` (returned lower-cased, stripped) or
    a KFAC/EKFAC object (returned as is). Raises ValueError (unknown name) or TypeError (anything else),
    naming ``name``."""
    if value is None or isinstance(value, KFAC):
        return value
    if isinstance(value, str):
        key = value.strip().lower()
        if key in _NAMES:
            return key
        raise ValueError(
            f"{name} must be None, 'ekfac', 'kfac' or a configured pyinfluence KFAC/EKFAC object, "
            f"got {value!r}"
        )
    raise TypeError(
        f"{name} must be None, 'ekfac', 'kfac' or a configured pyinfluence KFAC/EKFAC object, got "
        f"{type(value).__name__} {value!r}"
    )


@dataclass(frozen=True, eq=False)
class _Preconditioner:
    """A prepared preconditioner M ≈ (H + λI)⁻¹ (symmetric positive definite) for one operator and damping.

    ``apply(V)`` = M V and ``sqrt(V)`` = M^{1/2} V, for V (p, r), in V's dtype. ``info``: what its
    preparation cost (for the solver's ``prepared.info``). Immutable; applying it from several threads at
    once is safe as far as the underlying K-FAC object's (read-only) factors are.
    """

    name: str  # "ekfac" or "kfac"
    prepared: Any  # the prepared KFAC / EKFAC object
    info: dict[str, Any]

    def apply(self, V: Tensor) -> Tensor:
        """M V, V (p, r) → (p, r)."""
        return self.prepared._apply(V)

    def sqrt(self, V: Tensor) -> Tensor:
        """M^{1/2} V, V (p, r) → (p, r); M^{1/2} M^{1/2} = M."""
        return self.prepared._apply_sqrt_inverse(V)


class _CountingOperator:
    """The operator seen by the preconditioner's ``prepare``: forwards every attribute to ``op`` and counts
    the columns of the full-training-set HVPs made through it (a configured KFAC object with
    ``lanczos_steps > 0`` makes some), so that ``prepared.info`` reports them. Used only during
    ``prepare``; not meant to be shared between threads."""

    def __init__(self, op: HessianOperatorLike) -> None:
        self._op = op
        self.columns = 0

    def __getattr__(self, name: str) -> Any:  # only called for names not set on self
        if name == "_op":
            raise AttributeError(name)
        return getattr(self._op, name)

    def matvec(self, V: Tensor) -> Tensor:
        self.columns += int(V.shape[1]) if V.ndim == 2 else 1
        return self._op.matvec(V)


def _prepare_preconditioner(
    spec: PreconditionerLike, op: HessianOperatorLike, damping: float, who: str
) -> _Preconditioner | None:
    """Prepare the preconditioner named by a validated ``spec`` for ``op`` and ``damping`` (None → None).

    Errors of the K-FAC preparation that concern the input (an operator without the model behind it, a
    layer type K-FAC does not support) are re-raised as the same builtin type with ``who`` and the field
    named; NotPositiveDefiniteError (the approximation needs l2 + λ > 0) and other pyinfluence errors pass
    through unchanged.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        cfg: KFAC = _NAMES[spec](lanczos_steps=0)
        label = spec
    else:
        cfg = spec
        label = cfg.name
    counter = _CountingOperator(op)
    start = time.perf_counter()
    try:
        prepared = cfg.prepare(counter, damping)
    except (TypeError, ValueError) as e:
        if isinstance(e, PyInfluenceError) or type(e) not in (TypeError, ValueError):
            raise
        raise type(e)(f"{who}(preconditioner={label!r}): {e}") from e
    for method in ("_apply", "_apply_sqrt_inverse"):
        if not callable(getattr(prepared, method, None)):  # pragma: no cover - a KFAC object always has them
            raise TypeError(f"{who}: the prepared preconditioner {type(prepared).__name__} lacks {method}()")
    elapsed = time.perf_counter() - start
    pinfo = prepared.info
    info = {
        "preconditioner": label,
        "preconditioner_fisher": cfg.fisher,
        "preconditioner_prepare_time_s": elapsed,
        # passes over the training data for the factors (K-FAC: one, EK-FAC: two) ...
        "preconditioner_data_passes": int(pinfo.get("passes", 0)),
        # ... and full-training-set HVP columns (only for a configured object with lanczos_steps > 0)
        "preconditioner_matvec_columns": counter.columns,
    }
    return _Preconditioner(label, prepared, info)


_PREFIX = "preconditioner."


def _preconditioner_state(pre: _Preconditioner | None, tensors: dict[str, Tensor]) -> dict[str, Any] | None:
    """The state of a prepared preconditioner (None for none) as JSON-able metadata; its arrays are added
    to ``tensors`` under ``"preconditioner.<key>"``."""
    if pre is None:
        return None
    sub, meta = pre.prepared.state()
    for k, v in sub.items():
        tensors[_PREFIX + k] = v
    return {"name": pre.name, "info": _to_json(pre.info, tensors, "preconditioner_info"), "state": meta}


def _restore_preconditioner(
    spec: PreconditionerLike,
    op: HessianOperatorLike,
    damping: float,
    tensors: Mapping[str, Tensor],
    state: Any,
    who: str,
) -> _Preconditioner | None:
    """The preconditioner named by ``spec`` rebuilt from :func:`_preconditioner_state`'s output (its K-FAC
    object restored for ``op`` and ``damping``, no pass over the data). ValueError when the state does not
    match ``spec``."""
    if spec is None:
        if state is not None:
            raise ValueError(f"{who}: the saved state has a preconditioner, but preconditioner=None here")
        return None
    label = spec if isinstance(spec, str) else spec.name
    if not isinstance(state, Mapping) or not {"name", "info", "state"} <= set(state):
        raise ValueError(f"{who}: the saved state lacks the state of preconditioner={label!r}")
    if state["name"] != label:
        raise ValueError(
            f"{who}: the saved preconditioner is {state['name']!r}, here preconditioner={label!r}"
        )
    cfg: KFAC = _NAMES[spec](lanczos_steps=0) if isinstance(spec, str) else spec
    sub = {k[len(_PREFIX) :]: v for k, v in tensors.items() if k.startswith(_PREFIX)}
    prepared = cfg.restore(op, damping, sub, state["state"])
    info = _from_json(state["info"], tensors, "the preconditioner's info")
    if not isinstance(info, dict):
        raise ValueError(f"{who}: the saved preconditioner's info must be a dict")
    return _Preconditioner(label, prepared, info)


class _SplitOperator:
    """The symmetrically preconditioned operator Â = M^{1/2} (H + λI) M^{1/2} as a Hessian operator
    (damping 0: λ is inside), for Lanczos and power iterations on it (LiSSA's scale).

    Â is similar to M(H + λI) (Â = M^{−1/2} · M(H + λI) · M^{1/2}): same, real eigenvalues, positive iff
    H + λI is positive definite (Sylvester), so a Ritz value of Â ≤ 0 proves that H + λI is not.
    ``matvec`` also records ``rq_max``, the largest Rayleigh quotient uᵀ(H + λI)u / uᵀu of the vectors
    u = M^{1/2} x it multiplied: a lower bound of λ_max(H + λI). Not thread-safe (it records that);
    made and used within one ``prepare``.
    """

    def __init__(self, op: HessianOperatorLike, damping: float, pre: _Preconditioner) -> None:
        self._op, self._damping, self._pre = op, damping, pre
        self.n_params = op.n_params
        self.dtype = op.dtype
        self.device = op.device
        self.n_train = getattr(op, "n_train", None)
        self.rq_max = 0.0

    def matvec(self, X: Tensor) -> Tensor:
        """Â X = M^{1/2} (H + λI) M^{1/2} X, X (p, r)."""
        U = self._pre.sqrt(X)
        AU = _matvec(self._op, U, self._damping)
        uu = (U * U).sum(0)
        rq = (U * AU).sum(0) / torch.where(uu > 0, uu, torch.ones_like(uu))
        rq = rq[torch.isfinite(rq)]
        if rq.numel():
            self.rq_max = max(self.rq_max, float(rq.max()))
        return self._pre.sqrt(AU)

    def sample_matvec(self, X: Tensor, batch_size: int, generator: torch.Generator) -> Tensor:
        """M^{1/2} (H_B + λI) M^{1/2} X for one minibatch B drawn with ``generator``."""
        U = self._pre.sqrt(X)
        return self._pre.sqrt(_sample_matvec(self._op, U, self._damping, batch_size, generator))

    def dense(self) -> Tensor:  # pragma: no cover - not used by the solvers that take this operator
        raise NotImplementedError("the preconditioned operator has no dense form")
