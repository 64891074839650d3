"""Exceptions and warnings raised by pyinfluence.

All exceptions subclass a builtin so that generic ``except ValueError`` /
``except RuntimeError`` handlers keep working:

- :class:`NotPositiveDefiniteError` (``ValueError``): the Hessian ``H + λI`` could not be
  Cholesky-factorised. The usual cure is damping (``damping=λ > 0``) or more L2 regularisation.
- :class:`ConvergenceError` (``RuntimeError``): an iterative method failed: Newton training, conjugate
  gradients or LiSSA did not reach their tolerance, or LiSSA's recursion diverged.
- :class:`ConvergenceWarning` (``RuntimeWarning``): an iterative solver created with
  ``raise_on_nonconvergence=False`` returns a solution that missed its tolerance.
- :class:`NonFiniteError` (``ArithmeticError``): a result overflowed to inf or became NaN although every
  input was finite (features of very large magnitude, or float32 beyond its range). The message names the
  input and its largest magnitude; standardise the features (or use float64).
- :class:`NotFittedError` (``ValueError``, ``AttributeError``): a model was used before ``fit``.
- :class:`NotAtOptimumWarning` (``UserWarning``): the parameters are not a minimiser of the
  training objective, so influence values (which assume ``∇R(θ̂) = 0``) are approximate.
"""

from __future__ import annotations

__all__ = [
    "PyInfluenceError",
    "NotPositiveDefiniteError",
    "ConvergenceError",
    "ConvergenceWarning",
    "NonFiniteError",
    "NotFittedError",
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
    """


class ConvergenceError(PyInfluenceError, RuntimeError):
    """An iterative method failed: Newton's method or conjugate gradients did not reach the requested
    tolerance within its iteration limit, LiSSA's final relative residual ‖(H + λI)x − v‖/‖v‖ exceeded its
    ``tol``, or the LiSSA recursion diverged (its iterates grew without bound or became NaN/inf — raise
    ``scale`` or ``damping``).

    Solvers attach their partial :class:`~pyinfluence.solvers.SolveResult` as ``.result`` where one exists
    (``None`` otherwise), so the residual reached can be inspected.
    """

    result = None


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
    """


class NotFittedError(PyInfluenceError, ValueError, AttributeError):
    """The model has not been fitted yet (call ``fit(X, y)`` or use ``from_sklearn``)."""


class NotAtOptimumWarning(UserWarning):
    """The model parameters are not at a minimiser of the regularised training objective.

    Influence functions assume ``∇R(θ̂) = 0``; away from the optimum their values are only
    approximate. Refit (or use ``from_sklearn(..., refine=True)``) to fix it.
    """
