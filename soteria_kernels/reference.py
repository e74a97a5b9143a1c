"""Eager PyTorch references for every kernel: the test oracle and the CPU path.

They follow the kernels' contracts exactly but make no attempt at fusion. Arithmetic runs in
``promote_types(dtype, float32)``: float32 for fp16/bf16/fp32 inputs, float64 for float64
inputs (which is how the tests build their float64 oracle).
"""

from __future__ import annotations

import torch

from ._contract import check_inplace_operands

__all__ = ["head_attribution", "masked_head_steer_", "masked_head_update_"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def head_attribution(
    act: torch.Tensor,
    grad: torch.Tensor,
    *,
    num_heads: int,
    baseline: torch.Tensor | None = None,
    sum_rows: bool = False,
) -> torch.Tensor:
    """Per-head ``sum_d (baseline - act) * grad`` (or ``act * grad`` without a baseline).

    act, grad: ``[..., H*D]``; baseline: ``[H*D]`` or act's shape.
    Returns ``[..., H]`` (or ``[H]`` with ``sum_rows``) in the accumulation dtype.

    Bytes: reads act, grad (and baseline) once, 2-3 x R x H*D x elem; writes R x H x 4.
    Materialises fp32 copies of its inputs: fine as a reference, not as a kernel.
    """
    acc = _acc_dtype(act.dtype)
    x = act.to(acc)
    if baseline is not None:
        x = baseline.to(acc) - x
    prod = x * grad.to(acc)
    out = prod.unflatten(-1, (num_heads, -1)).sum(-1)
    if sum_rows:
        out = out.reshape(-1, num_heads).sum(0)
    return out


def _column_index(heads: torch.Tensor, head_dim: int, device) -> torch.Tensor:
    """Indices ``[k*D]`` of the selected heads' slices along the head axis."""
    offs = torch.arange(head_dim, device=device)
    return (heads.to(device=device, dtype=torch.long)[:, None] * head_dim + offs).reshape(-1)


def _update_(weight, other, heads, head_dim, scale, head_axis, fused: bool) -> torch.Tensor:
    if heads.numel() == 0:
        return weight
    check_inplace_operands(weight, other, "harmful" if fused else "delta")
    axis = head_axis % weight.ndim
    acc = _acc_dtype(weight.dtype)
    idx = _column_index(heads, head_dim, weight.device)
    scales = scale.to(device=weight.device, dtype=acc).repeat_interleave(head_dim)
    shape = [1] * weight.ndim
    shape[axis] = -1
    scales = scales.view(shape)
    w = weight.index_select(axis, idx).to(acc)
    o = other.index_select(axis, idx).to(acc)
    d = o - w if fused else o
    weight.index_copy_(axis, idx, (w - scales * d).to(weight.dtype))
    return weight


def masked_head_update_(
    weight: torch.Tensor,
    delta: torch.Tensor,
    heads: torch.Tensor,
    *,
    head_dim: int,
    scale: torch.Tensor,
    head_axis: int = -1,
) -> torch.Tensor:
    """In place: ``weight[slice_h] -= scale[i] * delta[slice_h]`` for ``h = heads[i]``.

    weight, delta: 2-D, same shape; heads: int ``[k]``; scale: ``[k]``. Slices run along
    ``head_axis`` (``-1``: nn.Linear ``[out, H*D]``; ``0``: Conv1D ``[H*D, out]``).
    Bytes: reads 2 x k*D x out x elem, writes k*D x out x elem.
    """
    return _update_(weight, delta, heads, head_dim, scale, head_axis, fused=False)


def masked_head_steer_(
    weight: torch.Tensor,
    harmful: torch.Tensor,
    heads: torch.Tensor,
    *,
    head_dim: int,
    scale: torch.Tensor,
    head_axis: int = -1,
) -> torch.Tensor:
    """In place: ``weight[slice_h] -= scale[i] * (harmful[slice_h] - weight[slice_h])``."""
    return _update_(weight, harmful, heads, head_dim, scale, head_axis, fused=True)
