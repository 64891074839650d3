"""Exceptions and warnings raised by pyinfluence.

Every exception derives from :class:`PyInfluenceError` and from a builtin, so that both ``except
PyInfluenceError`` and generic ``except ValueError`` / ``except RuntimeError`` handlers keep working. They carry
their diagnosis as attributes (``None`` where unknown), so code reads fields instead of parsing messages:

- :class:`NotPositiveDefiniteError` (``ValueError``): the Hessian ``H + λI`` could not be
  Cholesky-factorised. The usual cure is damping (``damping=λ > 0``) or more L2 regularisation. Fields:
  ``pivot``, ``size``, ``min_pivot``, ``suggested_damping``, ``train_index``.
- :class:`ConvergenceError` (``RuntimeError``): an iterative method failed: Newton training, conjugate
  gradients or LiSSA did not reach their tolerance, or LiSSA's recursion diverged. Fields: ``iterations``,
  ``grad_norm``, ``residual``, ``tol``, ``result``.
- :class:`ConvergenceWarning` (``RuntimeWarning``): an iterative solver created with
  ``raise_on_nonconvergence=False`` returns a solution that missed its tolerance.
- :class:`NonFiniteError` (``ArithmeticError``): a result overflowed to inf or became NaN although every
  input was finite (features of very large magnitude, or float32 beyond its range). The message names the
  input and its largest magnitude; standardise the features (or use float64). Fields: ``what``, ``where``.
- :class:`NotFittedError` (``ValueError``, ``AttributeError``): a model was used before ``fit``.
- :class:`DataError` (``ValueError``): the user's data is inconsistent: a data file the command line reads,
  or a stream of training batches that yields different examples from one pass to the next.
- :class:`NotAtOptimumWarning` (``UserWarning``): the parameters are not a minimiser of the
  training objective, so influence values (which assume ``∇R(θ̂) = 0``) are approximate.

The C++ core (``pyinfluence._core``) raises these same classes, with the same fields.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "PyInfluenceError",
    "NotPositiveDefiniteError",
    "ConvergenceError",
    "ConvergenceWarning",
    "NonFiniteError",
    "NotFittedError",
    "DataError",
    "NotAtOptimumWarning",
]


class PyInfluenceError(Exception):
    """Base class of every exception raised by pyinfluence itself."""


class NotPositiveDefiniteError(PyInfluenceError, ValueError):
    """``H + λI`` is not (numerically) positive definite: its Cholesky factorisation failed.

    Typical causes: no L2 regularisation together with collinear/duplicated or constant
    features, more parameters than training points, or a multinomial model with ``l2 = 0``
    (its softmax parameters are only defined up to a shift). Pass ``damping=λ > 0`` to the
    influence object (or fit with ``l2 > 0``).

    Attributes (``None`` where unknown):

    - ``pivot``: 0-based index of the failing Cholesky pivot.
    - ``size``: order p of the matrix.
    - ``min_pivot``: the failing pivot's value d_j (the diagonal of the Schur complement the factorisation
      met, L_jj² when it is positive): ≤ 0 for an indefinite matrix, or below the numerical-singularity
      threshold p·ε·max|diag|.
    - ``suggested_damping``: a damping λ (the total, not an increment) that makes that pivot pass: adding δ
      to the diagonal raises every pivot by at least δ. Later pivots may still need more.
    - ``train_index``: the training point whose removal left the Hessian singular (leave-one-out queries).
    """

    def __init__(
        self,
        message: str = "",
        *,
        pivot: Optional[int] = None,
        size: Optional[int] = None,
        min_pivot: Optional[float] = None,
        suggested_damping: Optional[float] = None,
        train_index: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.pivot = pivot
        self.size = size
        self.min_pivot = min_pivot
        self.suggested_damping = suggested_damping
        self.train_index = train_index


class ConvergenceError(PyInfluenceError, RuntimeError):
    """An iterative method failed: Newton's method or conjugate gradients did not reach the requested
    tolerance within its iteration limit, LiSSA's final relative residual ‖(H + λI)x − v‖/‖v‖ exceeded its
    ``tol``, or the LiSSA recursion diverged (its iterates grew without bound or became NaN/inf — raise
    ``scale`` or ``damping``).

    Attributes (``None`` where unknown or not applicable): ``iterations`` done, ``grad_norm`` (‖∇R‖ where
    Newton's method stopped), ``residual`` (the relative residual an iterative solver reached), ``tol`` (the
    tolerance it missed), and ``result``: solvers attach their partial
    :class:`~pyinfluence.solvers.SolveResult` there, so the residual reached can be inspected.
    """

    def __init__(
        self,
        message: str = "",
        *,
        iterations: Optional[int] = None,
        grad_norm: Optional[float] = None,
        residual: Optional[float] = None,
        tol: Optional[float] = None,
        result: Any = None,
    ) -> None:
        super().__init__(message)
        self.iterations = iterations
        self.grad_norm = grad_norm
        self.residual = residual
        self.tol = tol
        self.result: Any = result


class ConvergenceWarning(RuntimeWarning):
    """An iterative solver (CG, block CG, LiSSA) created with ``raise_on_nonconvergence=False`` did not reach
    its tolerance; the solution is returned anyway, with its per-column relative residual in
    ``SolveResult.residual`` and ``info["converged"]`` marking the columns that made it. (A
    ``RuntimeWarning``, so filters on that keep working.)
    """


class NonFiniteError(PyInfluenceError, ArithmeticError):
    """A computed quantity (a Hessian, test gradients, s_test vectors, influence scores) overflowed to inf or
    became NaN from finite inputs. pyinfluence never returns or ranks such values: the message names the
    overflowing input with its largest magnitude and suggests standardising it (zero mean, unit variance per
    feature), or float64 for a float32 computation.

    Attributes (``None`` where unknown): ``what`` overflowed (e.g. ``"the influence scores up_loss"``) and
    ``where``: the input that is the likely cause (``"X_test"`` or ``"X_train"``, the larger in magnitude).
    """

    def __init__(self, message: str = "", *, what: Optional[str] = None, where: Optional[str] = None) -> None:
        super().__init__(message)
        self.what = what
        self.where = where


class NotFittedError(PyInfluenceError, ValueError, AttributeError):
    """The model has not been fitted yet (call ``fit(X, y)`` or use ``from_sklearn``)."""


class DataError(PyInfluenceError, ValueError):
    """The user's data is inconsistent (a data file's content; a training stream that changes between passes);
    the message says what and where."""


class NotAtOptimumWarning(UserWarning):
    """The model parameters are not at a minimiser of the regularised training objective.

    Influence functions assume ``∇R(θ̂) = 0``; away from the optimum their values are only
    approximate. Refit (or use ``from_sklearn(..., refine=True)``) to fix it.
    """
