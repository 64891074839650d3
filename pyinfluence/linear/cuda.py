"""GPU path of :class:`~pyinfluence.LinearInfluence` (``device="cuda"``, or CUDA tensors as training data).

The C++ core's CUDA kernels (``csrc/cuda``, compiled into ``pyinfluence._core`` when the package is built with
``PYINFLUENCE_CUDA=1``; ``pyinfluence.runtime.has_cuda()`` tells) run on torch CUDA tensors, passed as raw device pointers together
with torch's current stream, so nothing here depends on torch's C++ API:

- the per-example pass: residuals r_i = ∂L/∂s and curvatures D_i at θ̂,
- the Hessian H = (1/n) Σ_i D_i ⊗ x̃_i x̃_iᵀ + l2·P,
- up_loss scores −∇θL(z_i)ᵀ s_t fused with the residual contraction, and the streaming top-k (the n×m score
  matrix is never stored).

torch supplies the memory, the stream and the p×p Cholesky factorisation L Lᵀ = H + λI (plus the multinomial
intercept gauge of families.hpp when λ = 0, exactly as the CPU engine). Queries without a kernel (``pert_loss``,
``loo_change(method="newton")``, ``retrain_loo``) run on the CPU engine, built on first use.

:class:`CudaLinearEngine` answers the same methods with the same shapes, dtypes and signs as ``_core.LinearEngine``,
so ``LinearInfluence`` uses either without knowing which.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional, Tuple

import numpy as np

from pyinfluence import _core
from pyinfluence.errors import NonFiniteError, NotPositiveDefiniteError

__all__ = ["CudaLinearEngine", "resolve_device", "to_host"]


def _round_up(x: float) -> float:
    """x rounded up to two significant digits (as cholesky.cpp does for its suggested damping)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    e = math.floor(math.log10(x)) - 1
    digits = math.ceil(x / 10.0**e)
    return digits * 10.0**e if e >= 0 else digits / 10.0 ** (-e)


def _torch():
    try:  # the GPU path keeps its arrays in torch's CUDA memory
        import torch
    except ImportError as exc:
        from pyinfluence._optional import torch_missing_message

        raise ImportError(torch_missing_message("LinearInfluence(device='cuda')", exc), name="torch") from exc
    return torch


def _is_cuda_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and x.device.type == "cuda"


def to_host(x: Any) -> Any:
    """A CUDA torch tensor copied to the CPU (for validation); anything else unchanged."""
    return x.detach().cpu() if _is_cuda_tensor(x) else x


def resolve_device(device: Any, X_train: Any = None) -> Optional[Any]:
    """The torch CUDA device to run on, or None for the CPU path.

    ``device``: None (the CPU, unless ``X_train`` is a CUDA tensor: then its device), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or a ``torch.device``. Raises ValueError for anything else and RuntimeError, saying why, when a
    GPU is asked for but cannot be used.
    """
    if device is None:
        if not _is_cuda_tensor(X_train):
            return None
        device = X_train.device
    name = str(device)
    if name == "cpu":
        return None
    if not (name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if not _core.has_cuda:
        raise RuntimeError(
            f"device={name!r}: this pyinfluence was built without its CUDA kernels "
            f"(pyinfluence.runtime.has_cuda() is False). Reinstall from source with a CUDA compiler (nvcc) "
            f"available: PYINFLUENCE_CUDA=1 pip install --no-binary pyinfluence pyinfluence (or, in a checkout, "
            f"PYINFLUENCE_CUDA=1 pip install .); or use device='cpu'."
        )
    torch = _torch()
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"device={name!r}: torch sees no CUDA GPU (torch {torch.__version__}, built for CUDA "
            f"{torch.version.cuda or 'none: a CPU-only build'}). Install a CUDA build of torch on a machine with "
            f"an NVIDIA GPU and driver, or use device='cpu'."
        )
    dev = torch.device(name)
    if dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={name!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if _core.cuda_device_count() <= dev.index:
        raise RuntimeError(
            f"device={name!r}: pyinfluence's CUDA kernels see {_core.cuda_device_count()} device(s) "
            f"({_core.cuda_version()}); the driver may be too old for the CUDA version they were built with"
        )
    return dev


class CudaLinearEngine:
    """The influence engine of one fitted linear model, on a CUDA device (see the module docstring).

    ``CudaLinearEngine(spec, X, y, theta, damping, device)``: ``X`` (n, d), ``y`` (n,), ``theta`` (K, d_eff) are
    validated, C-contiguous numpy arrays of one dtype (float32 or float64), as ``LinearInfluence`` passes them.
    """

    def __init__(self, spec, X: np.ndarray, y: np.ndarray, theta: np.ndarray, damping: float, device) -> None:
        torch = _torch()
        self._torch = torch
        self._spec = spec
        self._damping = float(damping)
        self._device = device
        self._np_dtype = X.dtype
        self._dtype_name = str(X.dtype)
        self._tdtype = torch.float64 if X.dtype == np.float64 else torch.float32
        self._host = (X, y, theta)  # the CPU engine's inputs, should a query need it
        self._cpu_engine: Optional[_core.LinearEngine] = None
        self._train_bound: Optional[float] = None  # see _score_bound
        self._n, self._d = X.shape
        self._K = int(spec.n_outputs)
        self._de = self._d + (1 if spec.fit_intercept else 0)
        self._p = self._K * self._de
        with self._on_device():
            self._X = self._upload(X)
            self._y = self._upload(y)
            self._W = self._upload(theta)
            self._R, self._C = self._per_example(self._X, self._y)
            self._grad_norm = self._gradient_norm()
            self._H = torch.empty((self._p, self._p), dtype=self._tdtype, device=device)
            _core.cuda_hessian(
                spec,
                self._dtype_name,
                device.index,
                self._stream(),
                self._X.data_ptr(),
                self._C.data_ptr(),
                self._n,
                self._d,
                self._H.data_ptr(),
            )
            self._factorize()

    # -- helpers ----------------------------------------------------------------------------------
    def _upload(self, a: np.ndarray):
        return self._torch.from_numpy(np.ascontiguousarray(a)).to(self._device)

    def _on_device(self):
        """Makes the engine's GPU torch's current device (for allocations and the current stream)."""
        return self._torch.cuda.device(self._device)

    def _stream(self) -> int:
        """torch's current stream on the engine's device, as the integer the kernels take."""
        return int(self._torch.cuda.current_stream(self._device).cuda_stream)

    def _per_example(self, X, y):
        """Residuals and curvatures (k, K) of the rows of X (device tensors); validates the labels."""
        k = X.shape[0]
        R = self._torch.empty((k, self._K), dtype=self._tdtype, device=self._device)
        C = self._torch.empty_like(R)
        _core.cuda_per_example(
            self._spec,
            self._dtype_name,
            self._device.index,
            self._stream(),
            X.data_ptr(),
            y.data_ptr(),
            self._W.data_ptr(),
            k,
            self._d,
            0,
            R.data_ptr(),
            C.data_ptr(),
        )
        return R, C

    def _points(self, X: np.ndarray, y: Optional[np.ndarray]):
        """Device copies of points (X, y) and their residuals."""
        if y is None:  # as _core.LinearEngine: X and y come together
            raise TypeError("y is required when X is given")
        Xd, yd = self._upload(X), self._upload(y)
        R, _ = self._per_example(Xd, yd)
        return Xd, R

    def _gradients(self, X, R):
        """Per-example gradients r_i ⊗ x̃_i (k, p): θ[a·d_eff + j] = W[a, j]."""
        torch = self._torch
        if self._spec.fit_intercept:
            X = torch.cat([X, torch.ones((X.shape[0], 1), dtype=X.dtype, device=X.device)], dim=1)
        return (R[:, :, None] * X[:, None, :]).reshape(X.shape[0], self._p)

    def _penalty(self):
        """Diagonal of l2·P as a (K, d_eff) tensor (the unpenalised intercept column is 0)."""
        pen = self._torch.full(
            (self._K, self._de), float(self._spec.l2), dtype=self._tdtype, device=self._device
        )
        if self._spec.fit_intercept and not self._spec.penalize_intercept:
            pen[:, self._d] = 0.0
        return pen

    def _gradient_norm(self) -> float:
        """‖∇R(θ̂)‖₂ with ∇R = Rᵀ X̃ / n + l2 P θ̂ from the cached residuals."""
        g = self._R.T @ self._X
        if self._spec.fit_intercept:
            g = self._torch.cat([g, self._R.sum(dim=0)[:, None]], dim=1)
        g = g / self._n + self._penalty() * self._W
        return float(self._torch.linalg.vector_norm(g))

    def _factorize(self) -> None:
        """L Lᵀ = H + λI (+ the intercept gauge when λ = 0), with the CPU engine's singularity test. Raises, as the
        CPU engine's constructor: NonFiniteError when H or the residuals overflowed, NotPositiveDefiniteError
        (with the fields of cholesky.hpp's FactorFailure) when a pivot fails."""
        torch = self._torch
        A = self._H.clone()
        A.diagonal().add_(self._damping)
        spec = self._spec
        if (
            self._damping == 0.0
            and spec.family == "multinomial"
            and spec.fit_intercept
            and not spec.penalize_intercept
        ):
            idx = torch.arange(self._K, device=self._device) * self._de + self._d
            A[idx[:, None], idx[None, :]] += 1.0  # (γ/2)(Σ_k b_k)², γ = 1: see families.hpp
        if not bool(torch.isfinite(A).all()) or not bool(torch.isfinite(self._R).all()):
            # an overflow of X_train's magnitude, not an indefinite H: damping would not help
            what = "the training Hessian H (or the training residuals)"
            raise NonFiniteError(
                f"{what} overflowed to inf or NaN (X_train's values are too large in magnitude for this "
                f"floating-point type)",
                what=what,
            )
        L, info = torch.linalg.cholesky_ex(A)
        failed = int(info) - 1
        if failed >= 0:
            # d_j = A_jj − a_jᵀ A₁₁⁻¹ a_j from the leading j×j block of L, the part every backend completed
            z = torch.linalg.solve_triangular(
                L[:failed, :failed], A[:failed, failed : failed + 1], upper=False
            )
            raise self._not_positive_definite(A, failed, float(A[failed, failed] - (z * z).sum()))
        pivots = L.diagonal()
        j = int(torch.argmin(pivots))
        value = float(pivots[j]) ** 2
        if not value > self._threshold(A):  # numerically singular (cholesky.hpp)
            raise self._not_positive_definite(A, j, value)
        self._L = L

    def _threshold(self, A) -> float:
        """The pivot test of cholesky.hpp: a pivot d_j ≤ p·ε·max_i |A_ii| is numerically zero."""
        eps = float(self._torch.finfo(self._tdtype).eps)
        return self._p * eps * float(A.diagonal().abs().max())

    def _not_positive_definite(self, A, pivot: int, value: float) -> NotPositiveDefiniteError:
        """The CPU engine's NotPositiveDefiniteError for pivot ``pivot`` of value d_j (CholeskyFactor::fail)."""
        eps = float(self._torch.finfo(self._tdtype).eps)
        max_diag = float(A.diagonal().abs().max())
        threshold = self._threshold(A)
        suggested = None
        if math.isfinite(value) and max_diag > 0:
            deficit = max(0.0, threshold - value) / max(0.5, 1.0 - self._p * eps)
            suggested = _round_up(self._damping + max(2.0 * deficit, math.sqrt(eps) * max_diag))
        return NotPositiveDefiniteError(
            f"the Hessian H + damping*I ({self._p} x {self._p}) is not positive definite (Cholesky failed at "
            f"pivot {pivot}, whose value is {value:.3g}). Pass damping > 0 or increase l2.",
            pivot=pivot,
            size=self._p,
            min_pivot=value,
            suggested_damping=suggested,
        )

    def _s_test(self, Xt: np.ndarray, yt: np.ndarray):
        """s_t = (H + λI)⁻¹ ∇θL(z_t) as the rows of an (m, p) device tensor."""
        Xd, R = self._points(Xt, yt)
        G = self._finite(self._gradients(Xd, R), "the per-example gradients")
        S = self._torch.cholesky_solve(G.T, self._L).T.contiguous()
        return self._finite(S, "s_test = (H + damping*I)^-1 grad L(z_test)")

    def _finite(self, t, what: str):
        """t itself, after checking that it holds no inf or NaN (as the CPU engine checks its results)."""
        if not bool(self._torch.isfinite(t).all()):
            raise NonFiniteError(
                f"{what} overflowed to inf or NaN (the inputs are finite, but too large in magnitude for this "
                f"floating-point type)",
                what=what,
            )
        return t

    def _score_bound(self, S) -> float:
        """An upper bound on |up_loss| over the whole training set for the s_test rows S (m, p):
        |Σ_a r_ia (x̃_i · S_t,a)| ≤ (Σ_a |r_ia|)·‖x̃_i‖·max_a ‖S_t,a‖ (Cauchy–Schwarz), which also bounds every
        partial sum of the kernel, so a finite bound below the dtype's maximum means no score can overflow."""
        torch = self._torch
        if self._train_bound is None:
            norms = torch.linalg.vector_norm(self._X.double(), dim=1)
            if self._spec.fit_intercept:
                norms = torch.sqrt(norms * norms + 1.0)
            self._train_bound = float((self._R.double().abs().sum(dim=1) * norms).max()) if self._n else 0.0
        s_max = float(
            torch.linalg.vector_norm(S.double().reshape(S.shape[0], self._K, self._de), dim=2).max()
        )
        return self._train_bound * s_max

    def _cpu(self):
        if self._cpu_engine is None:
            X, y, theta = self._host
            self._cpu_engine = _core.LinearEngine(self._spec, X, y, theta, self._damping)
        return self._cpu_engine

    @staticmethod
    def _numpy(t) -> np.ndarray:
        return t.cpu().numpy()

    # -- the interface of _core.LinearEngine -------------------------------------------------------
    @property
    def dtype(self) -> str:
        return self._dtype_name

    @property
    def n_train(self) -> int:
        return self._n

    @property
    def n_params(self) -> int:
        return self._p

    @property
    def grad_norm(self) -> float:
        return self._grad_norm

    @property
    def device(self):
        return self._device

    def hessian(self) -> np.ndarray:
        return self._numpy(self._H)

    def gradients(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        with self._on_device():
            return self._numpy(
                self._finite(self._gradients(*self._points(X, y)), "the per-example gradients")
            )

    def solve(self, B: np.ndarray) -> np.ndarray:
        with self._on_device():
            return self._numpy(self._torch.cholesky_solve(self._upload(B), self._L))

    def up_params(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        with self._on_device():
            G = self._finite(self._gradients(*self._points(X, y)), "the per-example gradients")
            return self._numpy(self._finite(-self._torch.cholesky_solve(G.T, self._L).T, "up_params"))

    def up_loss(
        self, Xt: np.ndarray, yt: np.ndarray, X: Optional[np.ndarray] = None, y: Optional[np.ndarray] = None
    ) -> np.ndarray:
        with self._on_device():
            S = self._s_test(Xt, yt)
            Xd, R = (self._X, self._R) if X is None else self._points(X, y)
            m, k = S.shape[0], Xd.shape[0]
            out = self._torch.empty((k, m), dtype=self._tdtype, device=self._device)
            _core.cuda_up_loss(
                self._spec,
                self._dtype_name,
                self._device.index,
                self._stream(),
                Xd.data_ptr(),
                R.data_ptr(),
                k,
                self._d,
                S.data_ptr(),
                m,
                out.data_ptr(),
            )
            return self._numpy(self._finite(out, "the influence scores up_loss"))

    def top_k(self, Xt: np.ndarray, yt: np.ndarray, k: int) -> Tuple[np.ndarray, ...]:
        torch = self._torch
        with self._on_device():
            S = self._s_test(Xt, yt)
            m = S.shape[0]
            # The kernel streams the scores without storing them: rule out an overflow (a NaN that it would
            # rank) beforehand, from a bound, rather than afterwards.
            if not self._score_bound(S) < float(torch.finfo(self._tdtype).max):
                raise NonFiniteError(
                    "the influence scores ranked by top_k could overflow to inf or NaN (the inputs are finite, but "
                    "too large in magnitude for this floating-point type)",
                    what="the influence scores ranked by top_k",
                )
            hi = torch.empty((m, k), dtype=torch.int64, device=self._device)
            ri = torch.empty_like(hi)
            hv = torch.empty((m, k), dtype=self._tdtype, device=self._device)
            rv = torch.empty_like(hv)
            _core.cuda_top_k(
                self._spec,
                self._dtype_name,
                self._device.index,
                self._stream(),
                self._X.data_ptr(),
                self._R.data_ptr(),
                self._n,
                self._d,
                S.data_ptr(),
                m,
                int(k),
                hi.data_ptr(),
                hv.data_ptr(),
                ri.data_ptr(),
                rv.data_ptr(),
            )
            return self._numpy(hi), self._numpy(hv), self._numpy(ri), self._numpy(rv)

    def self_influence(self, X: Optional[np.ndarray] = None, y: Optional[np.ndarray] = None) -> np.ndarray:
        """−g_iᵀ(LLᵀ)⁻¹g_i = −‖L⁻¹g_i‖², in blocks of rows (a triangular solve per block)."""
        torch = self._torch
        with self._on_device():
            Xd, R = (self._X, self._R) if X is None else self._points(X, y)
            k = Xd.shape[0]
            out = torch.empty(k, dtype=self._tdtype, device=self._device)
            block = max(1, (1 << 24) // max(1, self._p))
            for s in range(0, k, block):
                G = self._gradients(Xd[s : s + block], R[s : s + block])
                Z = torch.linalg.solve_triangular(self._L, G.T, upper=False)
                out[s : s + block] = -(Z * Z).sum(dim=0)
            return self._numpy(self._finite(out, "self_influence"))

    # Queries without a CUDA kernel: the CPU engine (same inputs, same results).
    def pert_loss(self, Xt, yt, X=None, y=None):
        return self._cpu().pert_loss(Xt, yt, X, y)

    def loo_newton(self, Xt, yt, idx):
        return self._cpu().loo_newton(Xt, yt, idx)

    def loo_newton_group(self, Xt, yt, idx):
        return self._cpu().loo_newton_group(Xt, yt, idx)

    def refit_without(self, idx, tol=1e-10, max_iter=100):
        return self._cpu().refit_without(idx, tol, max_iter)
