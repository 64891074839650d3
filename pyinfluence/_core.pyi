"""Type stub of ``pyinfluence._core``, the compiled C++ core (csrc/python/bindings.cpp).

Arrays are float32 or float64, C-contiguous, of one dtype per call (no silent conversion: a wrong dtype, a wrong
number of dimensions or a non-contiguous array raises ValueError); results have the dtype of the inputs.
Numerical failures raise the classes of ``pyinfluence.errors`` with their fields set:
``NotPositiveDefiniteError`` (``pivot``, ``size``, ``min_pivot``, ``suggested_damping``, ``train_index``) and
``NonFiniteError`` (``what``).

The ``cuda_*`` functions exist only in a build with the CUDA kernels (``has_cuda``); they take raw device
pointers and a stream as integers.
"""

from typing import Any, ClassVar, Optional, Tuple

import numpy as np
from numpy.typing import NDArray

# float32 or float64 (one dtype per call; a result has the dtype of the call's arrays)
_FloatArray = NDArray[np.floating[Any]]
_IndexArray = NDArray[np.int64]

__version__: str
has_openmp: bool
has_cuda: bool
blas: str

# -- threads -------------------------------------------------------------------------------------------------------
def partition_threads(rows: int, work_flops: float) -> int: ...
def parallel_min_flops() -> float: ...
def set_parallel_min_flops(flops: float) -> None: ...
def max_threads() -> int: ...
def blas_threads() -> int: ...
def set_max_threads(n: int) -> None: ...

# -- enums ---------------------------------------------------------------------------------------------------------
class Status:
    """pyinfluence::Status (values tied to the C++ enum by static_asserts in bindings.cpp)."""

    ok: ClassVar[Status]
    not_positive_definite: ClassVar[Status]
    not_converged: ClassVar[Status]
    non_finite: ClassVar[Status]
    __members__: ClassVar[dict[str, Status]]
    def __init__(self, value: int) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

class Family:
    """pyinfluence::Family (values tied to the C++ enum by static_asserts in bindings.cpp)."""

    logistic: ClassVar[Family]
    multinomial: ClassVar[Family]
    smooth_hinge: ClassVar[Family]
    squared: ClassVar[Family]
    __members__: ClassVar[dict[str, Family]]
    def __init__(self, value: int) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...
    def __int__(self) -> int: ...
    def __index__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...

# -- model and objective -------------------------------------------------------------------------------------------
class ModelSpec:
    def __init__(
        self,
        family: str,
        n_outputs: int,
        fit_intercept: bool,
        penalize_intercept: bool,
        l2: float,
        temperature: float = 1.0,
    ) -> None: ...
    @property
    def family(self) -> str: ...
    @property
    def n_outputs(self) -> int: ...
    @property
    def fit_intercept(self) -> bool: ...
    @property
    def penalize_intercept(self) -> bool: ...
    @property
    def l2(self) -> float: ...
    @property
    def temperature(self) -> float: ...

def per_example(
    spec: ModelSpec, X: _FloatArray, y: _FloatArray, theta: _FloatArray
) -> Tuple[_FloatArray, _FloatArray, _FloatArray]:
    """(loss (n,), residual dL/ds (n, K), scores (n, K))."""

def objective(
    spec: ModelSpec,
    X: _FloatArray,
    y: _FloatArray,
    theta: _FloatArray,
    sample_weight: Optional[_FloatArray] = None,
) -> Tuple[float, _FloatArray]:
    """(R(theta), grad R (K, d_eff))."""

def hessian(
    spec: ModelSpec,
    X: _FloatArray,
    y: _FloatArray,
    theta: _FloatArray,
    sample_weight: Optional[_FloatArray] = None,
) -> _FloatArray:
    """The Hessian of R (p, p), l2 included."""

def fit_newton(
    spec: ModelSpec,
    X: _FloatArray,
    y: _FloatArray,
    theta0: _FloatArray,
    sample_weight: Optional[_FloatArray] = None,
    tol: float = 1e-10,
    max_iter: int = 100,
) -> Tuple[_FloatArray, int, float, bool]:
    """(theta (K, d_eff), n_iter, grad_norm, converged); NotPositiveDefiniteError for a singular Hessian."""

# -- factorisation and the influence engine ------------------------------------------------------------------------
class CholeskyFactor:
    """L Lᵀ = A + damping·I of a symmetric (p, p) matrix (its lower triangle is read)."""

    def __init__(self, A: _FloatArray, damping: float = 0.0) -> None: ...
    @property
    def size(self) -> int: ...
    @property
    def dtype(self) -> np.dtype[Any]: ...
    def solve(self, B: _FloatArray) -> _FloatArray:
        """(A + damping·I)⁻¹ B for B of shape (p,) or (p, r), of the factor's dtype."""

class LinearEngine:
    """Exact influence of a fitted linear model; construction factorises H + damping·I (or raises)."""

    def __init__(
        self,
        spec: ModelSpec,
        X_train: _FloatArray,
        y_train: _FloatArray,
        theta: _FloatArray,
        damping: float = 0.0,
    ) -> None: ...
    @staticmethod
    def block(
        spec: ModelSpec,
        X_block: _FloatArray,
        y_block: _FloatArray,
        theta: _FloatArray,
        damping: float,
        H: _FloatArray,
        n_total: int,
        grad_sum: _FloatArray,
    ) -> LinearEngine:
        """The engine of a block of the training rows (e.g. one Dask chunk; it may have no rows), from the whole
        training set's Hessian ``H`` (p, p; l2 included, no damping), its size ``n_total`` and
        ``grad_sum`` = Σ_i ∇θL(z_i) over all of it (K, d_eff). Only H + damping·I is factorised. Queries answer as
        the whole set's engine would (indices of ``top_k`` / ``loo_newton`` local to the block);
        ``loo_newton_group`` and ``refit_without`` raise ValueError."""
    @property
    def dtype(self) -> str: ...
    @property
    def n_train(self) -> int:
        """Rows held by this engine (a block engine: the block's rows)."""
    @property
    def n_total(self) -> int:
        """n of the training objective R = (1/n) Σ L + …: n_train except for a block engine."""
    @property
    def n_params(self) -> int: ...
    @property
    def grad_norm(self) -> float: ...
    def grad_sum(self) -> _FloatArray:
        """Σ_i ∇θL(z_i, θ̂) over all n_total training points, (K, d_eff)."""
    def hessian(self) -> _FloatArray: ...
    def gradients(self, X: _FloatArray, y: _FloatArray) -> _FloatArray: ...
    def solve(self, B: _FloatArray) -> _FloatArray: ...
    def up_params(self, X: _FloatArray, y: _FloatArray) -> _FloatArray: ...
    def up_loss(
        self,
        X_test: _FloatArray,
        y_test: _FloatArray,
        X: Optional[_FloatArray] = None,
        y: Optional[_FloatArray] = None,
    ) -> _FloatArray: ...
    def pert_loss(
        self,
        X_test: _FloatArray,
        y_test: _FloatArray,
        X: Optional[_FloatArray] = None,
        y: Optional[_FloatArray] = None,
    ) -> _FloatArray: ...
    def self_influence(
        self, X: Optional[_FloatArray] = None, y: Optional[_FloatArray] = None
    ) -> _FloatArray: ...
    def top_k(
        self, X_test: _FloatArray, y_test: _FloatArray, k: int
    ) -> Tuple[_IndexArray, _FloatArray, _IndexArray, _FloatArray]:
        """(helpful_idx, helpful_val, harmful_idx, harmful_val), each (m, k)."""
    def loo_newton(self, X_test: _FloatArray, y_test: _FloatArray, train_idx: _IndexArray) -> _FloatArray: ...
    def refit_without(
        self, train_idx: _IndexArray, tol: float = 1e-10, max_iter: int = 100
    ) -> Tuple[_FloatArray, int, float, bool]: ...
    def loo_newton_group(
        self, X_test: _FloatArray, y_test: _FloatArray, train_idx: _IndexArray
    ) -> _FloatArray: ...

# -- CUDA kernels (only when has_cuda) -----------------------------------------------------------------------------
def cuda_device_count() -> int: ...
def cuda_version() -> str: ...
def cuda_per_example(
    spec: ModelSpec,
    dtype: str,
    device: int,
    stream: int,
    X: int,
    y: int,
    W: int,
    n: int,
    d: int,
    loss: int,
    residual: int,
    curvature: int,
) -> None: ...
def cuda_hessian(
    spec: ModelSpec, dtype: str, device: int, stream: int, X: int, curvature: int, n: int, d: int, H: int
) -> None: ...
def cuda_up_loss(
    spec: ModelSpec,
    dtype: str,
    device: int,
    stream: int,
    X: int,
    residual: int,
    n: int,
    d: int,
    S: int,
    m: int,
    out: int,
) -> None: ...
def cuda_top_k(
    spec: ModelSpec,
    dtype: str,
    device: int,
    stream: int,
    X: int,
    residual: int,
    n: int,
    d: int,
    S: int,
    m: int,
    k: int,
    helpful_idx: int,
    helpful_val: int,
    harmful_idx: int,
    harmful_val: int,
) -> None: ...
