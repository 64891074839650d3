"""Helpers shared by several test modules, imported by name (tests/ is on sys.path through pytest's
``pythonpath`` setting in pyproject.toml). Fixtures live in conftest.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (``reduction="none"``): the loss the torch-path tests hand to TorchInfluence."""
    return F.cross_entropy(out, y, reduction="none")
