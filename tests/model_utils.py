"""Helpers for steering tests on tiny models: a random harm direction."""

from __future__ import annotations

import torch

from soteria import HarmVector
from soteria.arch import head_sites


def random_tau(model, *, seed: int = 7) -> HarmVector:
    """A tau-kind HarmVector of N(0, 0.02^2) entries for every layer's output projection."""
    g = torch.Generator().manual_seed(seed)
    sites = head_sites(model)
    return HarmVector(
        {s.layer: torch.randn(s.weight.shape, generator=g) * 0.02 for s in sites},
        kind="tau",
        param_names={s.layer: s.param_name for s in sites},
        model_type=model.config.model_type,
        source="random",
    )
