"""Optional dependencies: one message for a missing PyTorch.

PyTorch is needed only by the deep path (:mod:`pyinfluence.torch`), the demo and ``pyinfluence bench``; the
exact linear path and ``pyinfluence explain`` / ``mislabels`` run without it. It comes with the ``torch``
extra: ``pip install 'pyinfluence[torch]'``.
"""

from __future__ import annotations

TORCH_EXTRA = "pip install 'pyinfluence[torch]'"


def torch_missing_message(feature: str, exc: BaseException) -> str:
    """The message for ``feature`` (e.g. ``"the demo"``) when ``import torch`` raised ``exc``."""
    if getattr(exc, "name", None) in ("torch", None):
        return f"{feature} needs PyTorch, which is not installed: {TORCH_EXTRA}"
    return f"{feature} needs PyTorch, which is installed but fails to import ({exc}); reinstall it: {TORCH_EXTRA}"


def require_torch(feature: str) -> None:
    """Import torch, or raise an ImportError naming the ``torch`` extra (``feature`` says what needs it)."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(torch_missing_message(feature, exc), name="torch") from exc
