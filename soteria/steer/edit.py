"""The in-place edits of head slices, each saving the originals first and undone on failure.

``weights[layer]`` is the real weight tensor of layer ``layer``'s output projection (see
:func:`soteria.steer.offload.editable_weight`); every function returns or takes
``{(layer, head): original slice on CPU}``.
"""

from __future__ import annotations

import torch

import soteria_kernels

from ..harm import HarmVector
from .plan import operand_dtype

__all__ = ["copy_slices", "restore_slices", "steer_slices"]


def steer_slices(sites, weights: dict, plan: dict[int, tuple[list[int], list[float]]], harm: HarmVector) -> dict:
    """Run the kernels layer by layer on ``weights[layer]`` (the real weight tensors), saving each
    slice first; on any failure put every slice back."""
    saved: dict[tuple[int, int], torch.Tensor] = {}
    try:
        with torch.no_grad():
            for layer, (hs, ss) in sorted(plan.items()):
                site = sites[layer]
                w = weights[layer]
                operand = harm.tensor(layer).to(device=w.device, dtype=operand_dtype(harm, w))
                for h in hs:
                    saved[(layer, h)] = site.head_slice(w.detach(), h).to("cpu", copy=True)
                fn = (
                    soteria_kernels.masked_head_steer_
                    if harm.kind == "harmful"
                    else soteria_kernels.masked_head_update_
                )
                fn(w, operand, hs, head_dim=site.head_dim, scale=ss, head_axis=site.head_axis)
    except BaseException:
        restore_slices(sites, weights, saved)
        raise
    return saved


def copy_slices(sites, weights: dict, slices: dict[tuple[int, int], torch.Tensor]) -> dict:
    """Copy ``slices`` into ``weights``, saving each original slice first; on failure put them back."""
    saved: dict[tuple[int, int], torch.Tensor] = {}
    try:
        with torch.no_grad():
            for (layer, h), new in sorted(slices.items()):
                view = sites[layer].head_slice(weights[layer].detach(), h)
                saved[(layer, h)] = view.to("cpu", copy=True)
                view.copy_(new)
    except BaseException:
        restore_slices(sites, weights, saved)
        raise
    return saved


def restore_slices(sites, weights: dict, saved: dict[tuple[int, int], torch.Tensor]) -> None:
    with torch.no_grad():
        for (layer, h), orig in saved.items():
            sites[layer].head_slice(weights[layer].detach(), h).copy_(orig)
