"""Masked in-place update of selected heads' slices of an output-projection weight.

Soteria steers only the attention heads it selected: for each head ``h`` in ``heads``

    W[:, h*D:(h+1)*D] -= scale_h * delta[:, h*D:(h+1)*D]                (update)
    W[:, h*D:(h+1)*D] -= scale_h * (W_harmful[...] - W[...])            (steer, fused)

(``head_axis=0``, GPT-2's Conv1D, holds the heads on rows instead). The reference
implementation built a dense float64 mask the size of the weight and computed
``W - scale * (mask * (W_harmful - W))`` over every element: 8 bytes of mask plus three
full-size temporaries per weight element. The kernel touches only the selected slices:
bytes = ``k*D * d_model * elem * 3`` (read W, read delta or W_harmful, write W), one
program per (selected head, block of the other axis), fp32 arithmetic rounded once.
"""

from __future__ import annotations

import torch

from . import reference
from ._backend import use_triton
from ._contract import (
    check_float,
    check_head_axis,
    check_heads_layout,
    check_inplace_operands,
    check_same,
    check_tensor_args,
    normalize_heads,
    normalize_scale,
)
from ._launch import next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["masked_head_steer_", "masked_head_update_"]

if triton is not None:

    @triton.jit
    def _to_bf16_rne(x):
        """fp32 -> bf16, round to nearest even, in integer ops.

        The GPU's ``cvt.rn.bf16.f32`` does this already; Triton's CPU interpreter truncates,
        so spelling it out makes both sides round the same way (NaN stays NaN).
        """
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _masked_head_update_kernel(
        w_ptr,
        x_ptr,
        heads_ptr,
        scale_ptr,
        n_other,
        # strides along the head axis (the H*D one) and the other axis, for weight and
        # delta/harmful; nn.Linear has s_wh == 1, Conv1D s_wo == 1 (Triton specialises 1s)
        s_wh,
        s_wo,
        s_xh,
        s_xo,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= D
        BLOCK_O: tl.constexpr,
        FUSED: tl.constexpr,  # x is W_harmful: subtract scale * (x - w), no tau in memory
    ):
        i = tl.program_id(0)
        pid_o = tl.program_id(1).to(tl.int64)
        h = tl.load(heads_ptr + i).to(tl.int64)
        s = tl.load(scale_ptr + i)

        d = tl.arange(0, BLOCK_D)
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O).to(tl.int64)
        j = h * D + d  # positions along the head axis
        mask = (o[:, None] < n_other) & (d[None, :] < D)
        w_off = o[:, None] * s_wo + j[None, :] * s_wh
        x_off = o[:, None] * s_xo + j[None, :] * s_xh
        w = tl.load(w_ptr + w_off, mask=mask, other=0.0)
        x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
        wf = w.to(tl.float32)
        if FUSED:
            x = x - wf
        new = wf - s * x
        if w.dtype == tl.bfloat16:
            new = _to_bf16_rne(new)
        tl.store(w_ptr + w_off, new.to(w.dtype), mask=mask)


NUM_WARPS = 4


def _plan(weight, other, heads, scales, head_dim: int, axis: int, fused: bool):
    """Grid and kernel arguments for one launch (shared with ``benchmarks.kernel_report``)."""
    other_axis = 1 - axis
    n_other = weight.shape[other_axis]
    block_d = next_pow2(head_dim)
    block_o = min(next_pow2(n_other), max(1, 4096 // block_d))
    grid = (heads.numel(), triton.cdiv(n_other, block_o))
    kwargs = dict(
        w_ptr=weight, x_ptr=other, heads_ptr=heads, scale_ptr=scales,
        n_other=n_other,
        s_wh=weight.stride(axis), s_wo=weight.stride(other_axis),
        s_xh=other.stride(axis), s_xo=other.stride(other_axis),
        D=head_dim, BLOCK_D=block_d, BLOCK_O=block_o, FUSED=fused,
    )  # fmt: skip
    return grid, kwargs


def _launch(weight, other, heads, scales, head_dim: int, axis: int, fused: bool) -> None:
    check_inplace_operands(weight, other, "harmful" if fused else "delta")  # as the eager reference does
    grid, kwargs = _plan(weight, other, heads, scales, head_dim, axis, fused)
    # fp fusion: ``w - s * x`` is one fma, so the fp32 result is rounded once
    _masked_head_update_kernel[grid](**kwargs, num_warps=NUM_WARPS, enable_fp_fusion=True)


@torch.library.custom_op("soteria::masked_head_update_", mutates_args=("weight",))
def _masked_head_update_op(
    weight: torch.Tensor,
    other: torch.Tensor,
    heads: torch.Tensor,
    scales: torch.Tensor,
    head_dim: int,
    head_axis: int,
    fused: bool,
) -> None:
    if heads.numel() == 0:
        return
    check_tensor_args(heads, scales, weight.shape[head_axis] // head_dim)
    if use_triton(weight):
        # The kernel reads heads[i] and scales[i] at unit stride: a strided view or an expanded
        # 0-d scale (stride 0) would otherwise be read past its storage.
        heads = heads.to(weight.device, non_blocking=True).contiguous()
        scales = scales.to(weight.device, torch.float32, non_blocking=True).contiguous()
        _launch(weight, other, heads, scales, head_dim, head_axis, fused)
    else:
        fn = reference.masked_head_steer_ if fused else reference.masked_head_update_
        fn(weight, other, heads, head_dim=head_dim, scale=scales, head_axis=head_axis)


@_masked_head_update_op.register_fake
def _(weight, other, heads, scales, head_dim, head_axis, fused):
    return None


def _checked_call(weight, other, other_name, heads, head_dim, scale, head_axis, fused):
    check_float("weight", weight)
    # A direction may be wider than a half-precision weight (an fp32 tau for a bf16 model): the
    # kernel computes in fp32 anyway, so the weight is rounded once, not tau first.
    wider = not fused and other.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16)
    check_same(other_name, other, "weight", weight, dtype=not wider)
    axis = check_head_axis(head_axis, weight)
    num_heads, _ = check_heads_layout(weight.shape[axis], head_dim=head_dim)
    heads_t = normalize_heads(heads, num_heads)
    scales = normalize_scale(scale, heads_t.numel())
    if heads_t.numel():
        with torch.no_grad():
            _masked_head_update_op(weight, other.detach(), heads_t, scales, head_dim, axis, fused)
    return weight


def masked_head_update_(
    weight: torch.Tensor,
    delta: torch.Tensor,
    heads,
    *,
    head_dim: int,
    scale: float | torch.Tensor = 1.0,
    head_axis: int = -1,
) -> torch.Tensor:
    """In place: ``weight[slice_h] -= scale_h * delta[slice_h]`` for each head ``h`` in ``heads``.

    Args:
        weight: 2-D weight (fp32/bf16/fp16, any strides), e.g. an o_proj ``[d_model, H*D]``.
        delta: same shape and device (the harm direction ``tau``); same dtype, or float32 for a
            bf16/fp16 weight (then ``tau`` is not rounded to the weight's precision first).
        heads: distinct head indices (ints or a 1-D integer tensor); empty is a no-op.
        head_dim: ``D``; must divide ``weight.shape[head_axis]``.
        scale: a float, or one value per entry of ``heads``; finite.
        head_axis: ``-1`` for nn.Linear (heads own columns), ``0`` for Conv1D (rows).

    Returns ``weight``. Elements outside the selected slices are not touched. On bad input
    a ValueError names the argument and nothing is modified.
    """
    return _checked_call(weight, delta, "delta", heads, head_dim, scale, head_axis, fused=False)


def masked_head_steer_(
    weight: torch.Tensor,
    harmful: torch.Tensor,
    heads,
    *,
    head_dim: int,
    scale: float | torch.Tensor = 1.0,
    head_axis: int = -1,
) -> torch.Tensor:
    """In place: ``weight[slice_h] -= scale_h * (harmful[slice_h] - weight[slice_h])``.

    The fused form of :func:`masked_head_update_` with ``delta = harmful - weight``: the
    difference is never materialised. Arguments as there, ``harmful`` in place of ``delta``.
    """
    return _checked_call(weight, harmful, "harmful", heads, head_dim, scale, head_axis, fused=True)
