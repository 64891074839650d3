"""The exact linear path: estimators fitted to their exact optimum and :class:`LinearInfluence` over the
C++/Eigen core (``pyinfluence._core``), with optional CUDA kernels.

- :mod:`pyinfluence.linear.models`: ``LogisticRegression``, ``SmoothHingeSVM``, ``RidgeRegression`` (Newton
  fits in the core) and ``from_sklearn``.
- :mod:`pyinfluence.linear.influence`: :class:`LinearInfluence`, the influence engine's Python face.
- :mod:`pyinfluence.linear.cuda`: the CUDA engine behind ``LinearInfluence(..., device="cuda")``.
- :mod:`pyinfluence.linear.dask`: the Dask engine behind ``LinearInfluence`` and ``fit`` on a ``dask.array``
  chunked by rows, and readers (``read_parquet``, ``read_npy``) whose loading errors name the file. Dask is
  imported only when such data is used (the ``dask`` extra).
- :mod:`pyinfluence.linear.diagnostics`: leverage, Cook's distance, DFBETA(S), DFFITS of unpenalised models
  (statsmodels' definitions, from the core's factor, no refits).
"""

from pyinfluence.linear.diagnostics import RegressionDiagnostics, regression_diagnostics
from pyinfluence.linear.influence import LinearInfluence, TopK
from pyinfluence.linear.models import LogisticRegression, RidgeRegression, SmoothHingeSVM, from_sklearn

__all__ = [
    "LinearInfluence",
    "LogisticRegression",
    "RegressionDiagnostics",
    "RidgeRegression",
    "SmoothHingeSVM",
    "TopK",
    "from_sklearn",
    "regression_diagnostics",
]
