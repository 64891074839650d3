"""Loss functions for the torch path that have no torch built-in.

:func:`smooth_hinge_loss` is the smooth hinge of Koh & Liang (2017, §4.1), the loss of
:class:`pyinfluence.SmoothHingeSVM`, so the paper's SVM runs on :class:`~pyinfluence.TorchInfluence`
with the same numbers as on :class:`~pyinfluence.LinearInfluence`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["smooth_hinge_loss"]

# softplus(u) = u to double precision above this (e^-40 ≈ 4e-18); exp(40) does not overflow float32.
_SOFTPLUS_LINEAR = 40.0


def smooth_hinge_loss(scores: Tensor, targets: Tensor, temperature: float = 0.1) -> Tensor:
    """Per-example smooth hinge loss ``t·log(1 + exp((1 − y·s)/t))``, shape (batch,).

    - ``scores`` s: (batch,) or (batch, 1) decision values (e.g. the output of ``nn.Linear(d, 1)``).
    - ``targets`` y: (batch,) or (batch, 1) labels in {−1, +1} (as floats; not checked, so that the
      function stays usable under ``torch.func`` transforms and on the GPU without host syncs).
    - ``temperature`` t > 0: t → 0 recovers the hinge max(0, 1 − y·s); the same ``temperature`` as
      :class:`pyinfluence.SmoothHingeSVM` (default 0.1) gives the same loss.

    Evaluated as ``t·softplus((1 − y·s)/t)`` with softplus switching to the identity above 40
    (where log(1 + eᵘ) = u to double precision): no overflow for large margins, exact to rounding
    for any t, and finite first and second derivatives everywhere (forward and reverse mode), as
    influence functions need. (``logaddexp`` would give NaN second derivatives for large margins.)
    No reduction: pass it directly as ``loss_fn`` to TorchInfluence, e.g.
    ``TorchInfluence(model, smooth_hinge_loss, (X, y_pm1), l2=...)``, or wrap it with
    ``functools.partial(smooth_hinge_loss, temperature=0.001)``.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    t = float(temperature)
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(scores, Tensor) or not isinstance(targets, Tensor):
        raise TypeError("scores and targets must be torch tensors")
    s = scores.reshape(scores.shape[0]) if scores.ndim == 2 and scores.shape[1] == 1 else scores
    y = targets.reshape(targets.shape[0]) if targets.ndim == 2 and targets.shape[1] == 1 else targets
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(
            f"smooth_hinge_loss expects scores of shape (batch,) or (batch, 1) and targets of the "
            f"same length; got scores {tuple(scores.shape)} and targets {tuple(targets.shape)}"
        )
    if not s.is_floating_point():
        raise TypeError(f"scores must be floating point, got {s.dtype}")
    y = y.to(s.dtype)
    u = (1.0 - y * s) / t
    return t * torch.nn.functional.softplus(u, beta=1.0, threshold=_SOFTPLUS_LINEAR)
