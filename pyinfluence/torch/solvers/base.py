"""The solver contract: the Hessian operator protocol, ``SolveResult``, ``Solver`` and ``PreparedSolver``, and
the helpers every solver shares (right-hand-side checks, residuals, the not-positive-definite error)."""

from __future__ import annotations

import abc
import dataclasses
import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from pyinfluence._validation import (
    check_bool,
    check_damping,
    check_int,
    check_nonnegative_float,
    check_positive_float,
)
from pyinfluence.errors import ConvergenceError, ConvergenceWarning, NotPositiveDefiniteError

_FLOAT_DTYPES = (torch.float32, torch.float64)
# Exact: below this many parameters a failed factorisation computes all eigenvalues of H


# ==============================================================================================
# The Hessian operator the solvers consume
# ==============================================================================================
@runtime_checkable
class HessianOperatorLike(Protocol):
    """What a solver needs from a Hessian: ``H = ∇²R(θ̂)`` for the selected parameters.

    ``R(θ) = (1/n) Σ_i L(z_i, θ) + (l2/2)‖θ‖²``; H includes the L2 term and never the damping
    (solvers add λI themselves). Implemented for torch models by
    ``pyinfluence.torch.hessian.HessianOperator``; any object with these members works.

    - ``n_params`` p, ``dtype`` (float32/float64), ``device``, ``n_train`` n.
    - ``matvec(V)``: V (p, r) → H V (p, r) over the full training set.
    - ``sample_matvec(V, batch_size, generator)``: an unbiased estimate of H V from one uniform
      minibatch of ``batch_size`` training points drawn with ``generator`` (the same minibatch
      for all r columns). Used by LiSSA only.
    - ``dense()``: H as a (p, p) tensor. Used by Exact only.
    """

    n_params: int
    dtype: torch.dtype
    device: torch.device
    n_train: int

    def matvec(self, V: Tensor) -> Tensor: ...

    def sample_matvec(self, V: Tensor, batch_size: int, generator: torch.Generator) -> Tensor: ...

    def dense(self) -> Tensor: ...


# ==============================================================================================
# Results
# ==============================================================================================
@dataclass(repr=False)
class SolveResult:
    """The solution of (H + λI) X = V for a block of right-hand sides, with diagnostics.

    - ``solution``: X, shape (p, r) (or (p,) for a 1-D V), same dtype and device as V.
    - ``solver``: the solver's name: ``"exact"``, ``"cg"``, ``"block_cg"``, ``"lissa"``, ``"kfac"``, ``"ekfac"`` or
      ``"arnoldi"``.
    - ``iterations``: CG: iterations of the slowest column (one batched HVP each); LiSSA: the
      recursion depth; Exact, KFAC, EKFAC: None.
    - ``residual``: (r,) relative residual ‖(H + λI)x − v‖ / ‖v‖ of each returned column (0 for a
      zero column), computed once at the end from the true operator (not a recursively updated
      estimate). Exact: against the dense matrix it factorised; CG and LiSSA: one extra batched
      full-training-set HVP. Same dtype as the solution; None if the solver was told not to
      compute it.
    - ``spread``: LiSSA with ``repeats ≥ 2``: (r,) relative standard deviation across repeats,
      sqrt(Σ_k ‖x_k − x̄‖² / (repeats − 1)) / ‖x̄‖ per column — the Monte-Carlo noise of one
      repeat (the returned mean has about 1/sqrt(repeats) of it). Otherwise None.
    - ``time_s``: wall-clock seconds of this solve (device work included; preparation excluded).
    - ``info``: everything else, e.g. ``damping``, ``converged`` (CG, block CG, LiSSA: per column,
      residual within ``tol``), ``scale``, ``lambda_max_estimate`` and ``lambda_min_estimate``
      (LiSSA: the extreme Ritz values of its Lanczos process, bounds from inside of the extreme
      eigenvalues of H + λI), ``matvec_calls`` / ``matvec_columns`` (operator calls and the
      total number of column HVPs they computed: the cost of the solve); with a preconditioner
      (CG, BlockCG, LiSSA): ``preconditioner``, ``preconditioner_columns`` (columns M or M^{1/2} was
      applied to) and ``preconditioned_lambda_min/max_estimate`` (extreme Ritz values of
      M(H + λI)).
    """

    solution: Tensor
    solver: str
    iterations: int | None
    residual: Tensor | None
    spread: Tensor | None
    time_s: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def max_residual(self) -> float | None:
        """The largest relative residual over the columns (0.0 for no columns), or None."""
        if self.residual is None:
            return None
        return float(self.residual.max()) if self.residual.numel() else 0.0

    def __repr__(self) -> str:
        sol = self.solution
        parts = [
            f"solver={self.solver!r}",
            f"solution={tuple(sol.shape)} {str(sol.dtype).replace('torch.', '')} {sol.device}",
        ]
        if self.iterations is not None:
            parts.append(f"iterations={self.iterations}")
        if self.residual is not None:
            parts.append(f"max_residual={self.max_residual:.3g}")
        if self.spread is not None and self.spread.numel():
            parts.append(f"max_spread={float(self.spread.max()):.3g}")
        if "scale" in self.info:
            parts.append(f"scale={self.info['scale']:.4g}")
        parts.append(f"time_s={self.time_s:.4g}")
        return f"SolveResult({', '.join(parts)})"

    def summary(self) -> str:
        """A multi-line, human-readable account of the solve and all its diagnostics."""
        lines = [repr(self)]

        def stats(name: str, t: Tensor | None) -> None:
            if t is None or t.numel() == 0:
                return
            tf = t.detach().double().cpu()
            lines.append(
                f"  {name}: max {float(tf.max()):.3g}, median {float(tf.median()):.3g}, "
                f"min {float(tf.min()):.3g} over {tf.numel()} column(s)"
            )

        stats("residual ‖(H+λI)x−v‖/‖v‖", self.residual)
        stats("spread (relative std across repeats)", self.spread)
        for key, value in self.info.items():
            if isinstance(value, Tensor):
                if value.numel() <= 8:
                    value = value.tolist()
                else:
                    value = f"tensor of shape {tuple(value.shape)}"
            elif isinstance(value, float):
                value = f"{value:.6g}"
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)


# ==============================================================================================
# Solver base classes
# ==============================================================================================
class Solver(abc.ABC):
    """Configuration of a linear solver for (H + λI) X = V. Immutable; validated on creation.

    ``prepare(op, damping)`` does the one-off work for one Hessian and returns a
    :class:`PreparedSolver`, whose ``solve(V)`` can be called many times. A prepared solver's
    :meth:`PreparedSolver.state` (arrays plus JSON-able metadata) is turned back into an equal
    prepared solver by :meth:`restore`, without the one-off work.
    """

    name: ClassVar[str] = "solver"
    # what restore() needs of the operator besides n_params, dtype and device (solve-time needs only)
    _restore_needs: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def prepare(self, op: HessianOperatorLike, damping: float = 0.0) -> PreparedSolver:
        """One-off work for the Hessian behind ``op`` and damping λ; returns the prepared solver."""

    def solve(self, op: HessianOperatorLike, V: Tensor, damping: float = 0.0) -> SolveResult:
        """``prepare(op, damping).solve(V)`` in one call (prepares anew on every call)."""
        return self.prepare(op, damping).solve(V)

    def config(self) -> dict[str, Any]:
        """The configuration as a JSON-able dict: every dataclass field by name, torch dtypes by name
        (``"float64"``), a nested solver (a ``preconditioner`` object) as ``{"solver": name, "config":
        {...}}``. :func:`pyinfluence.torch.solvers.solver_from_config` rebuilds the solver from it.
        Raises TypeError for a solver that is not a dataclass or holds a value JSON cannot represent."""
        if not dataclasses.is_dataclass(self):
            raise TypeError(
                f"{type(self).__name__} is not a dataclass, so its configuration cannot be written out; "
                f"define it as a @dataclass(frozen=True) like the built-in solvers"
            )
        return {
            f.name: _config_value(type(self).__name__, f.name, getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        meta: Mapping[str, Any],
    ) -> PreparedSolver:
        """The prepared solver whose :meth:`PreparedSolver.state` returned ``(tensors, meta)``, rebuilt
        for ``op`` and ``damping`` WITHOUT the one-off work of :meth:`prepare` (no Hessian-vector
        product, no pass over the training data): its ``solve`` returns what the saved one returned
        (bit for bit on the same device and thread count; on another device up to that device's rounding).

        ``tensors`` may be on any device (they are moved to ``op.device``); ``meta`` is the JSON-able
        dict (it may have gone through ``json.dumps`` / ``json.loads``). Raises ValueError, naming what
        differs, when the state does not belong to this configuration (another solver, another field
        value), to this operator (another n_params, dtype, parameter layout, n_train or l2) or to this
        damping, or when an array is missing, misshapen or not finite; TypeError for arguments of the
        wrong kind. ``prepare_time_s`` of the result is the time the restoration took; ``info`` is the
        saved one (Exact: ``info["backend"]`` is the factorisation now in use).
        """
        start = time.perf_counter()
        _check_operator(op, self._restore_needs)
        damping = check_damping(damping)
        info, own = _check_state(self, op, damping, tensors, meta)
        prepared = self._restore(op, damping, tensors, own, info)
        prepared.prepare_time_s = time.perf_counter() - start
        return prepared

    def _restore(
        self,
        op: HessianOperatorLike,
        damping: float,
        tensors: Mapping[str, Tensor],
        state: Any,
        info: dict[str, Any],
    ) -> PreparedSolver:
        """The solver-specific part of :meth:`restore`: ``state`` is what ``_state`` returned (after a JSON
        round trip), ``info`` the decoded ``info``; the common checks have passed."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot restore a saved state: implement _state() on its prepared solver "
            f"and _restore() on the solver"
        )


class PreparedSolver(abc.ABC):
    """A solver bound to one Hessian operator and damping; ``solve(V)`` for any number of V.

    Attributes: ``solver`` (the configuration), ``op``, ``damping`` λ, ``n_params`` p,
    ``prepare_time_s`` and ``info`` (what preparation found, e.g. LiSSA's scale).
    """

    def __init__(
        self,
        solver: Solver,
        op: HessianOperatorLike,
        damping: float,
        info: dict[str, Any],
        prepare_time_s: float,
    ) -> None:
        self.solver = solver
        self.op = op
        self.damping = damping
        self.n_params = int(op.n_params)
        self.dtype: torch.dtype = op.dtype
        self.device = _normalise_device(op.device)
        self.info = info
        self.prepare_time_s = prepare_time_s
        self._started = 0.0

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """What the one-off work found, as ``(tensors, meta)``: named arrays (detached, on this solver's
        device) and JSON-able metadata (``json.dumps(meta, allow_nan=False)`` works). The solver's
        :meth:`Solver.restore` turns them back into an equal prepared solver without preparing again.

        ``meta`` holds ``state_version``, the solver's ``name`` and ``config`` (:meth:`Solver.config`),
        what the state is valid for (``n_params``, ``dtype``, ``damping``, the operator's ``l2`` and
        ``n_train`` when it has them, the parameter ``layout`` — names and shapes — of a
        :class:`~pyinfluence.torch.hessian.HessianOperator`), the ``device`` it was prepared on,
        ``prepare_time_s``, the ``info`` dict (tuples, non-finite floats and tensors encoded; a
        tensor in ``info`` is stored as the array ``"info.<key>"``) and the solver's own ``state``.
        The arrays per solver: Exact the symmetrised H in ``factor_dtype`` (``"A"``; the C++ core's
        factor cannot be read back, so it is factorised again on restore, p³/3 flops and no HVP) and,
        when torch factorised it, the Cholesky factor ``"L"``; KFAC / EKFAC per layer the eigenbases
        ``"layers.<i>.QA"``, ``"layers.<i>.QG"`` and the eigenvalues ``"layers.<i>.eigenvalues"``
        (out, in') (K-FAC: the Kronecker products g aᵀ; EK-FAC: the refitted second moments S), per
        diagonal-fallback parameter ``"diagonal.<name>"`` its Fisher diagonal; Arnoldi ``"U"`` (p, r)
        and ``"sigma"`` (r,); CG, BlockCG and LiSSA their preconditioner's arrays (``"preconditioner.*"``),
        if any (LiSSA's scale and Lanczos estimates are in ``meta``).
        """
        tensors: dict[str, Tensor] = {}
        own = self._state(tensors)
        meta: dict[str, Any] = {
            "state_version": STATE_VERSION,
            "solver": self.solver.name,
            "config": self.solver.config(),
            "n_params": self.n_params,
            "dtype": _dtype_name(self.dtype),
            "device": str(self.device),
            "damping": self.damping,
            "l2": _op_l2(self.op),
            "n_train": _op_n_train(self.op),
            "layout": _op_layout(self.op),
            "prepare_time_s": self.prepare_time_s,
            "info": _to_json(self.info, tensors, "info"),
            "state": own,
        }
        return {k: v.detach() for k, v in tensors.items()}, meta

    def _state(self, tensors: dict[str, Tensor]) -> Any:
        """The solver-specific part of :meth:`state`: add the arrays to ``tensors`` (keys not starting
        with ``"info"``) and return JSON-able metadata for :meth:`Solver._restore`."""
        raise NotImplementedError(
            f"{type(self.solver).__name__}'s prepared solver cannot write out its state (no _state() method)"
        )

    def __repr__(self) -> str:
        return (
            f"Prepared{type(self.solver).__name__}(n_params={self.n_params}, "
            f"damping={self.damping:g}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"device={self.device}, solver={self.solver!r})"
        )

    def solve(self, V: Tensor) -> SolveResult:
        """Solve (H + λI) X = V.

        ``V``: a (p, r) tensor of r right-hand sides (r may be 0), or a (p,) tensor for one; on the
        operator's device, any floating dtype (the computation runs in the operator's dtype and
        the solution is returned in V's dtype). Zero columns give zero solutions.
        """
        V2, one_d = _check_rhs(V, self.n_params, self.device)
        start = self._started = time.perf_counter()
        work = V2.to(self.dtype) if V2.dtype != self.dtype else V2
        r = work.shape[1]
        if r == 0:
            sol, iters, res, spread, info = _empty_solution(work, self.solver.name)
        else:
            sol, iters, res, spread, info = self._solve(work)
        info = {"damping": self.damping, **info}
        sol = sol.to(V.dtype) if sol.dtype != V.dtype else sol
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        return SolveResult(
            solution=sol.reshape(-1) if one_d else sol,
            solver=self.solver.name,
            iterations=iters,
            residual=None if res is None else res.to(sol.dtype),
            spread=None if spread is None else spread.to(sol.dtype),
            time_s=elapsed,
            info=info,
        )

    @abc.abstractmethod
    def _solve(self, V: Tensor) -> tuple[Tensor, int | None, Tensor | None, Tensor | None, dict[str, Any]]:
        """V (p, r ≥ 1) in the operator's dtype → (X, iterations, residual, spread, info)."""

    def _not_converged(
        self,
        what: str,
        X: Tensor,
        n_iter: int,
        res: Tensor,
        spread: Tensor | None,
        converged: Tensor,
        info: dict[str, Any],
        budget: str,
        advice: str,
    ) -> None:
        """The ending every iterative solver shares when some columns' final relative residual
        missed the configuration's ``tol``: raise ConvergenceError, carrying the unconverged
        SolveResult as ``.result``, or — with ``raise_on_nonconvergence=False`` — warn
        (ConvergenceWarning) and let ``_solve`` return it. To be called from ``_solve`` (the
        warning's stack level points at the caller of ``solve``).

        ``budget`` completes "did not converge ... {budget}" (e.g. "in max_iter=50 iterations");
        ``advice`` is what to change.
        """
        n_bad = int((~converged).sum())
        msg = (
            f"{what} did not converge for {n_bad} of {converged.numel()} right-hand side(s) "
            f"{budget}: relative residual reached {_fmt(float(res[~converged].max()))} "
            f"(tol={self.solver.tol:g}). {advice}"  # type: ignore[attr-defined]
        )
        if self.solver.raise_on_nonconvergence:  # type: ignore[attr-defined]
            err = ConvergenceError(msg)
            err.result = SolveResult(
                X,
                self.solver.name,
                n_iter,
                res,
                spread,
                time.perf_counter() - self._started,
                {"damping": self.damping, **info},
            )
            raise err
        warnings.warn(msg, ConvergenceWarning, stacklevel=4)


def _empty_solution(V: Tensor, name: str):
    z = V.new_zeros((0,))
    return V.clone(), (None if name == "exact" else 0), z, (z if name == "lissa" else None), {}


# ==============================================================================================
# Saved state (PreparedSolver.state / Solver.restore)
# ==============================================================================================
#: Version of the ``meta`` layout written by :meth:`PreparedSolver.state`; restore refuses newer ones.
STATE_VERSION = 1
_META_KEYS = ("state_version", "solver", "config", "n_params", "dtype", "damping", "info", "state")
_MISSING = object()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _op_l2(op: Any) -> float | None:
    l2 = getattr(op, "l2", None)
    return float(l2) if isinstance(l2, (int, float)) and not isinstance(l2, bool) else None


def _op_n_train(op: Any) -> int | None:
    n = getattr(op, "n_train", None)
    return int(n) if isinstance(n, int) and not isinstance(n, bool) else None


def _op_layout(op: Any) -> dict[str, Any] | None:
    """The selected parameters' names and shapes of a HessianOperator's functional model (None for an
    operator without one)."""
    fm = getattr(op, "fm", None)
    names, shapes = getattr(fm, "names", None), getattr(fm, "shapes", None)
    if names is None or shapes is None:
        return None
    return {"names": [str(n) for n in names], "shapes": [[int(d) for d in s] for s in shapes]}


def _config_value(who: str, name: str, v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            raise TypeError(f"{who}.{name} = {v} cannot be written to JSON")
        return v
    if isinstance(v, torch.dtype):
        return _dtype_name(v)
    if isinstance(v, Solver):
        return {"solver": v.name, "config": v.config()}
    raise TypeError(f"{who}.{name} = {v!r} ({type(v).__name__}) cannot be written to JSON")


def _to_json(obj: Any, tensors: dict[str, Tensor], key: str) -> Any:
    """``obj`` as JSON-able data; tensors go to ``tensors[key...]`` and are referenced by key. Tuples,
    non-finite floats and torch dtypes are tagged, so that :func:`_from_json` gives ``obj`` back exactly
    (floats are written by ``repr``, which round-trips)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return _to_json(obj.item(), tensors, key)
    if isinstance(obj, torch.dtype):
        return {"__dtype__": _dtype_name(obj)}
    if isinstance(obj, Tensor):
        if key in tensors:
            raise ValueError(f"two arrays of the saved state are named {key!r}")
        tensors[key] = obj.detach()
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_to_json(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_to_json(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise TypeError(
                    f"{key}: key {k!r} cannot be written to JSON (str keys not starting with '__')"
                )
            out[k] = _to_json(v, tensors, f"{key}.{k}")
        return out
    raise TypeError(f"{key} = {obj!r} ({type(obj).__name__}) cannot be written to JSON")


def _from_json(obj: Any, tensors: Mapping[str, Tensor], where: str = "meta") -> Any:
    """The inverse of :func:`_to_json` (tensors looked up in ``tensors``, returned on the CPU)."""
    if isinstance(obj, list):
        return [_from_json(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((tag, v),) = obj.items()
        if tag == "__tuple__" and isinstance(v, list):
            return tuple(_from_json(x, tensors, where) for x in v)
        if tag == "__float__" and v in ("inf", "-inf", "nan"):
            return float(v)
        if tag == "__dtype__" and v in ("float32", "float64", "float16", "bfloat16", "int64"):
            return getattr(torch, v)
        if tag == "__tensor__" and isinstance(v, str):
            if v not in tensors:
                raise ValueError(f"{where} refers to the array {v!r}, which the state lacks")
            t = tensors[v]
            if not isinstance(t, Tensor):
                raise TypeError(f"the array {v!r} must be a torch.Tensor, got {type(t).__name__}")
            return t.detach().cpu()
    return {k: _from_json(v, tensors, where) for k, v in obj.items()}


def _check_state(
    solver: Solver, op: Any, damping: float, tensors: Any, meta: Any
) -> tuple[dict[str, Any], Any]:
    """The checks every restore shares: ``meta`` is a state of this configuration, operator and damping.
    Returns (the decoded info, the solver's own state)."""
    who = f"{type(solver).__name__}.restore"
    if not isinstance(meta, Mapping):
        raise TypeError(
            f"{who}: meta must be the dict returned by PreparedSolver.state(), got {type(meta).__name__}"
        )
    if not isinstance(tensors, Mapping):
        raise TypeError(
            f"{who}: tensors must be the dict of named tensors returned by PreparedSolver.state(), got "
            f"{type(tensors).__name__}"
        )
    for k, v in tensors.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise TypeError(
                f"{who}: tensors must map names (str) to torch tensors; {k!r} is {type(v).__name__}"
            )
    missing = [k for k in _META_KEYS if k not in meta]
    if missing:
        raise ValueError(
            f"{who}: meta lacks {', '.join(map(repr, missing))}: it is not a PreparedSolver.state()"
        )
    version = meta["state_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{who}: meta['state_version'] must be a positive int, got {version!r}")
    if version > STATE_VERSION:
        raise ValueError(
            f"{who}: the state has version {version}, newer than this pyinfluence reads ({STATE_VERSION}); "
            f"upgrade pyinfluence"
        )
    if meta["solver"] != solver.name:
        raise ValueError(
            f"{who}: the state is that of a prepared {meta['solver']!r} solver, not of {solver.name!r}"
        )
    cfg, saved = solver.config(), meta["config"]
    if not isinstance(saved, Mapping):
        raise ValueError(f"{who}: meta['config'] must be a dict, got {type(saved).__name__}")
    diffs = [
        f"{k} (saved {saved.get(k, '<absent>')!r}, here {cfg.get(k, '<absent>')!r})"
        for k in sorted(set(cfg) | set(saved))
        if cfg.get(k, _MISSING) != saved.get(k, _MISSING)
    ]
    if diffs:
        raise ValueError(
            f"{who}: the state was prepared with another configuration: {'; '.join(diffs)}; restore it with "
            f"the saved configuration (pyinfluence.torch.solvers.solver_from_config)"
        )
    p = int(op.n_params)
    if meta["n_params"] != p:
        raise ValueError(
            f"{who}: the state is for n_params={meta['n_params']}, but the operator has n_params={p}"
        )
    if meta["dtype"] != _dtype_name(op.dtype):
        raise ValueError(
            f"{who}: the state was prepared in {meta['dtype']}, but the operator computes in "
            f"{_dtype_name(op.dtype)}"
        )
    layout, here = meta.get("layout"), _op_layout(op)
    if layout is not None and here is not None and layout != here:
        _raise_layout(who, layout, here)
    if float(meta["damping"]) != damping:
        raise ValueError(
            f"{who}: the state was prepared with damping={float(meta['damping']):g}, restore got "
            f"damping={damping:g}: the curvature it holds includes the damping; pass the saved damping"
        )
    l2, l2_here = meta.get("l2"), _op_l2(op)
    if l2 is not None and l2_here is not None and float(l2) != l2_here:
        raise ValueError(
            f"{who}: the state was prepared for l2={float(l2):g}, but the operator has l2={l2_here:g} (H "
            f"includes the L2 term)"
        )
    n, n_here = meta.get("n_train"), _op_n_train(op)
    if n is not None and n_here is not None and n != n_here:
        raise ValueError(
            f"{who}: the state was prepared on n_train={n} training points, but the operator has {n_here}"
        )
    info = _from_json(meta["info"], tensors, "meta['info']")
    if not isinstance(info, dict):
        raise ValueError(f"{who}: meta['info'] must be a dict, got {type(info).__name__}")
    return info, meta["state"]


def _raise_layout(who: str, saved: Mapping[str, Any], here: Mapping[str, Any]) -> None:
    names, shapes = list(saved.get("names", [])), [list(s) for s in saved.get("shapes", [])]
    hn, hs = here["names"], here["shapes"]
    for i in range(max(len(names), len(hn))):
        a = (names[i], shapes[i] if i < len(shapes) else None) if i < len(names) else None
        b = (hn[i], hs[i]) if i < len(hn) else None
        if a != b:
            fa = f"{a[0]!r} of shape {tuple(a[1] or ())}" if a else "nothing"
            fb = f"{b[0]!r} of shape {tuple(b[1])}" if b else "nothing"
            raise ValueError(
                f"{who}: the state was prepared for other parameters: selected parameter {i} was {fa}, the "
                f"operator's is {fb}"
            )
    raise ValueError(f"{who}: the state's parameter layout differs from the operator's")


def _state_tensor(
    tensors: Mapping[str, Tensor],
    key: str,
    who: str,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """``tensors[key]`` checked (present, of ``shape`` and ``dtype``, finite) and moved to ``device``;
    ValueError naming the array otherwise."""
    if key not in tensors:
        raise ValueError(f"{who}: the saved state lacks the array {key!r}")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{who}: the array {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{who}: the array {key!r} is {_dtype_name(t.dtype)}, expected {_dtype_name(dtype)}")
    if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{who}: the array {key!r} contains NaN or infinity")
    t = t.detach()
    return t if device is None else t.to(device)


def _state_field(state: Any, key: str, who: str, kinds: Any) -> Any:
    """``state[key]``, checked to be of ``kinds`` (ValueError naming the field otherwise)."""
    if not isinstance(state, Mapping) or key not in state:
        raise ValueError(f"{who}: the saved state lacks the field {key!r}")
    v = state[key]
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in _as_tuple(kinds)):
        raise ValueError(f"{who}: the saved state's field {key!r} = {v!r} has the wrong type")
    return v


def _as_tuple(kinds: Any) -> tuple[Any, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


# ==============================================================================================
# Input checks
# ==============================================================================================
def _normalise_device(device: Any) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _check_operator(op: Any, needs: tuple[str, ...]) -> None:
    missing = [m for m in ("n_params", "dtype", "device") + needs if not hasattr(op, m)]
    if missing:
        raise TypeError(
            f"op must be a Hessian operator with n_params, dtype, device and {', '.join(needs)} "
            f"(see pyinfluence.solvers.HessianOperatorLike); {type(op).__name__} lacks "
            f"{', '.join(missing)}"
        )
    p = op.n_params
    if isinstance(p, bool) or not isinstance(p, int) or p < 1:
        raise ValueError(f"op.n_params must be a positive int, got {p!r}")
    if op.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"op.dtype must be torch.float32 or torch.float64, got {op.dtype}")


def _check_rhs(V: Any, p: int, device: torch.device) -> tuple[Tensor, bool]:
    """V → (a (p, r) tensor, whether V was 1-D). Raises naming ``V``."""
    if not isinstance(V, Tensor):
        raise TypeError(f"V must be a torch.Tensor of shape (p, r) = ({p}, r), got {type(V).__name__}")
    if V.is_complex() or not V.is_floating_point():
        raise TypeError(f"V must be a real floating-point tensor, got dtype {V.dtype}")
    if V.ndim not in (1, 2) or V.shape[0] != p:
        raise ValueError(
            f"V must have shape (p, r) = ({p}, r) (or ({p},) for one right-hand side), got "
            f"{tuple(V.shape)}; columns are right-hand sides"
        )
    if _normalise_device(V.device) != device:
        raise ValueError(
            f"V is on device '{V.device}' but the Hessian operator is on '{device}'; pass V.to('{device}')"
        )
    V = V.detach()
    one_d = V.ndim == 1
    if one_d:
        V = V.unsqueeze(1)
    if V.numel() and not bool(torch.isfinite(V).all()):
        bad = (~torch.isfinite(V)).any(dim=0).nonzero().flatten().tolist()
        raise ValueError(
            f"V contains NaN or infinity (in column(s) {bad[:10]}{'…' if len(bad) > 10 else ''})"
        )
    return V, one_d


def _matvec(op: HessianOperatorLike, X: Tensor, damping: float) -> Tensor:
    """(H + λI) X with one operator call; checks the operator's output shape."""
    out = op.matvec(X)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"op.matvec returned {shape} for an input of shape {tuple(X.shape)}")
    out = out.detach()
    if damping:
        out = out.add(X, alpha=damping)
    return out


def _sample_matvec(
    op: HessianOperatorLike, X: Tensor, damping: float, batch_size: int | None, gen: torch.Generator
) -> Tensor:
    """(H_B + λI) X for one minibatch B drawn with ``gen`` (full H when batch_size is None)."""
    if batch_size is None:
        return _matvec(op, X, damping)
    out = op.sample_matvec(X, batch_size, gen)
    if not isinstance(out, Tensor) or out.shape != X.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise RuntimeError(f"op.sample_matvec returned {shape} for an input of shape {tuple(X.shape)}")
    out = out.detach()
    if damping:
        out = out.add(X, alpha=damping)
    return out


def _col_norms(X: Tensor) -> Tensor:
    return torch.linalg.vector_norm(X, dim=0)


def _relative(num: Tensor, den: Tensor) -> Tensor:
    """num / den per column, with 0 where den == 0 (a zero right-hand side, solved exactly)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), num)


def _true_residual(op: HessianOperatorLike, X: Tensor, V: Tensor, damping: float) -> tuple[Tensor, int]:
    """(‖(H + λI)x − v‖ / ‖v‖ per column, columns multiplied): one batched full HVP.

    Zero columns of V, whose solution is exactly zero, are not multiplied (residual 0).
    """
    res, _, k = _residual_and_curvature(op, X, V, damping)
    return res, k


def _residual_and_curvature(
    op: HessianOperatorLike, X: Tensor, V: Tensor, damping: float
) -> tuple[Tensor, Tensor, int]:
    """(relative residual ‖Ax − v‖/‖v‖, Rayleigh quotient xᵀAx/xᵀx, columns multiplied) per column
    of X, A = H + λI, from one batched full HVP.

    The Rayleigh quotient comes free with the residual: xᵀAx ≤ 0 for any x ≠ 0 proves that A is
    not positive definite. Zero columns of V (solution exactly zero) are not multiplied: residual
    0, curvature +inf (nothing observed); so is a zero x.
    """
    vn = _col_norms(V)
    nz = torch.nonzero(vn > 0).flatten()
    k = int(nz.numel())
    res = torch.zeros_like(vn)
    curv = torch.full_like(vn, math.inf)
    if k:
        Xs, Vs = (X, V) if k == V.shape[1] else (X.index_select(1, nz), V.index_select(1, nz))
        AX = _matvec(op, Xs, damping)
        xx = (Xs * Xs).sum(0)
        rq = torch.where(xx > 0, (Xs * AX).sum(0) / torch.where(xx > 0, xx, 1.0), math.inf)
        res.index_copy_(0, nz, _relative(_col_norms(AX - Vs), vn[nz]))
        curv.index_copy_(0, nz, rq)
    return res, curv, k


def _check_residual_columns(obj: Any) -> None:
    """Validate an approximation's ``residual_columns`` (None or an int ≥ 1); it is incompatible with a
    ``tol``, which is checked on every column."""
    value = obj.residual_columns
    if value is None:
        return
    _set(obj, "residual_columns", check_int("residual_columns", value, 1))
    if obj.tol is not None:
        raise ValueError(
            f"residual_columns={value!r} measures the residual of a sample of the columns, but tol={obj.tol!r} "
            f"is checked on every column; pass residual_columns=None with tol, or tol=None"
        )


def _sampled_residual_and_curvature(
    op: HessianOperatorLike, X: Tensor, V: Tensor, damping: float, max_columns: int | None
) -> tuple[Tensor, Tensor, int, Tensor | None]:
    """:func:`_residual_and_curvature` of every column (``max_columns`` None, or r ≤ ``max_columns``), or of
    at most ``max_columns`` columns evenly spaced over the block, first and last included (the rest are
    not multiplied: the check then costs ``max_columns`` HVP columns instead of r). Returns (residual,
    curvature, columns multiplied, the measured columns' indices or None when all were measured)."""
    r = int(V.shape[1])
    if max_columns is None or r <= max_columns:
        res, curv, k = _residual_and_curvature(op, X, V, damping)
        return res, curv, k, None
    idx = torch.linspace(0, r - 1, max_columns, device=V.device).round().long().unique()
    res, curv, k = _residual_and_curvature(op, X.index_select(1, idx), V.index_select(1, idx), damping)
    return res, curv, k, idx


def _npd_error(
    what: str, evidence: str, curvature: float, damping: float, largest: float
) -> NotPositiveDefiniteError:
    """The NotPositiveDefiniteError of the iterative solvers (CG, block CG, LiSSA).

    ``curvature`` c = uᵀ(H + λI)u / uᵀu ≤ 0 was observed for some vector u (``evidence`` says
    which, e.g. "a search direction p at iteration 3 has curvature pᵀ(H + λI)p / pᵀp"). Since
    λ_min(H) + λ ≤ c, H has an eigenvalue ≤ c − λ and the damping must exceed λ − c; the suggestion
    doubles the observed deficit (c is only an upper bound of λ_min(H + λI)). ``largest``: the
    largest curvature seen, a lower estimate of λ_max(H + λI), sets a floor relative to the scale
    of H when c ≈ 0.
    """
    c, lam = float(curvature), float(damping)
    need = lam - c  # λ_min(H) ≤ c − λ, so damping must exceed λ − c
    suggest = _round_up(max(lam + 2.0 * (-c), lam + 1e-4 * abs(largest), need * 1.5, 1e-12))
    return NotPositiveDefiniteError(
        f"{what}: H + λI is not positive definite: {evidence} = {_fmt(c)} ≤ 0 (the largest seen "
        f"is {_fmt(largest)}). The Hessian has an eigenvalue ≤ {_fmt(c - lam)}, so damping must "
        f"exceed {_fmt(max(need, 0.0))}: pass e.g. damping={suggest:g} (damping={lam:g} now), "
        f"larger if this recurs. Non-convex models (Koh & Liang §4) need damping; see also "
        f"Exact, which reports the exact smallest eigenvalue for small models.",
        suggested_damping=suggest,
    )


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _round_up(x: float) -> float:
    """A value ≥ x with two significant digits (for suggested damping values)."""
    if not x > 0:
        return x
    e = 10.0 ** (math.floor(math.log10(x)) - 1)
    return math.ceil(x / e) * e


def _check_dtype_option(name: str, value: Any) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"float32": torch.float32, "float64": torch.float64}.get(value, value)
    if value not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be torch.float64, torch.float32 or None, got {value!r}")
    return value


def _check_seed(name: str, value: Any) -> int | None:
    if value is None:
        return None
    return check_int(name, value, 0, 2**63 - 1)


def _as_fraction(name: str, value: Any) -> float:
    v = check_nonnegative_float(name, value)
    if v > 1:
        raise ValueError(f"{name} must be between 0 and 1, got {v}")
    return v


def _check_stopping_fields(obj: Any, optional_tol: bool = False) -> None:
    """Validate a solver configuration's ``raise_on_nonconvergence`` (a bool) and, with ``optional_tol``,
    its ``tol`` (None: never fail on the residual, else a positive float) — the fields every solver that
    checks its residual has; solvers with a required ``tol`` check it themselves."""
    if optional_tol and obj.tol is not None:
        _set(obj, "tol", check_positive_float("tol", obj.tol))
    _set(obj, "raise_on_nonconvergence", check_bool("raise_on_nonconvergence", obj.raise_on_nonconvergence))


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)  # frozen dataclass: normalise fields in __post_init__
