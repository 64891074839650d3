"""Helpers shared by several test modules, imported by name (tests/ is on sys.path through pytest's
``pythonpath`` setting in pyproject.toml). Fixtures live in conftest.py."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy (``reduction="none"``): the loss the torch-path tests hand to TorchInfluence."""
    return F.cross_entropy(out, y, reduction="none")


def flat_parameters(
    model: torch.nn.Module, names: Sequence[str] | None = None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], dict[str, torch.Tensor]]]:
    """(θ, unflat): the named parameters (all, or ``names`` in that order) concatenated into one detached vector
    θ (p,), and the map from a vector of that layout back to ``{name: tensor}`` views (for functional_call), so
    test references can differentiate a model's loss as a function of θ with torch.func."""
    named = dict(model.named_parameters())
    chosen = list(named) if names is None else list(names)
    shapes = [named[n].shape for n in chosen]
    theta = torch.cat([named[n].detach().reshape(-1) for n in chosen])

    def unflat(t: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 0
        for n, s in zip(chosen, shapes):
            k = s.numel()
            out[n] = t[at : at + k].reshape(s)
            at += k
        return out

    return theta, unflat
