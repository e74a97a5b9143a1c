"""Fused per-head gradient x activation attribution.

For activations ``z`` and gradients ``g`` at an attention output projection's input
(``[..., H*D]``, head ``h`` owns ``[h*D, (h+1)*D)``), attribution patching scores each head as

    score[..., h] = sum_d (baseline[h*D + d] - z[..., h*D + d]) * g[..., h*D + d]

and plain gradient x activation (no baseline) as ``sum_d z * g``. Eager PyTorch
(``reference.head_attribution``) upcasts both inputs to fp32 copies, subtracts, multiplies
and reduces: about 5 passes over ``R x H*D`` elements. The kernel reads ``act`` and ``grad``
once (the broadcast baseline once per program), accumulates in fp32 registers and writes
``R x H`` floats: bytes = ``2 * R * H*D * elem + R * H * 4``. With ``sum_rows`` each program
also reduces its rows, writing one ``[H]`` partial per program (summed afterwards: a few KB),
so the ``[R, H]`` matrix never reaches memory.
"""

from __future__ import annotations

import math

import torch

from . import reference
from ._backend import use_triton
from ._contract import check_float, check_heads_layout, check_same
from ._launch import collapse_rows, next_pow2, num_sms

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

__all__ = ["head_attribution"]

if triton is not None:

    @triton.jit
    def _head_attribution_kernel(
        act_ptr,
        grad_ptr,
        base_ptr,
        out_ptr,
        n_rows,
        n1,
        H,
        # strides of the (at most two) row dims and of the head dim, per tensor; a
        # broadcast [H*D] baseline has zero row strides
        s_a0,
        s_a1,
        s_ac,
        s_g0,
        s_g1,
        s_gc,
        s_b0,
        s_b1,
        s_bc,
        s_out,
        D: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= D (head dims 80, 96 are not powers of two)
        BLOCK_H: tl.constexpr,
        BLOCK_R: tl.constexpr,
        HAS_BASELINE: tl.constexpr,  # (baseline - act) * grad, else act * grad
        BASELINE_ROWS: tl.constexpr,  # baseline has act's shape; else it is [H*D], loaded once
        SUM_ROWS: tl.constexpr,  # reduce over rows in registers and write one [H] partial
    ):
        pid_h = tl.program_id(0)
        pid_r = tl.program_id(1)
        n_prog_r = tl.num_programs(1)

        h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        col = (h[:, None] * D + d[None, :]).to(tl.int64)  # [BLOCK_H, BLOCK_D]
        cmask = (h[:, None] < H) & (d[None, :] < D)

        if HAS_BASELINE and not BASELINE_ROWS:
            b_bcast = tl.load(base_ptr + col * s_bc, mask=cmask, other=0.0).to(tl.float32)

        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for r0 in range(pid_r * BLOCK_R, n_rows, n_prog_r * BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = r < n_rows
            i0 = r // n1
            i1 = r % n1
            mask = rmask[:, None, None] & cmask[None, :, :]
            a_off = (i0 * s_a0 + i1 * s_a1)[:, None, None] + (col * s_ac)[None, :, :]
            g_off = (i0 * s_g0 + i1 * s_g1)[:, None, None] + (col * s_gc)[None, :, :]
            x = tl.load(act_ptr + a_off, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
            if HAS_BASELINE:
                if BASELINE_ROWS:
                    b_off = (i0 * s_b0 + i1 * s_b1)[:, None, None] + (col * s_bc)[None, :, :]
                    b = tl.load(base_ptr + b_off, mask=mask, other=0.0).to(tl.float32)
                else:
                    b = b_bcast[None, :, :]
                x = b - x
            s = tl.sum(x * g, axis=2)  # [BLOCK_R, BLOCK_H]
            if SUM_ROWS:
                acc += tl.sum(s, axis=0)  # masked rows loaded as zeros
            else:
                o_off = r[:, None] * s_out + h[None, :]
                tl.store(out_ptr + o_off, s, mask=rmask[:, None] & (h[None, :] < H))
        if SUM_ROWS:
            tl.store(out_ptr + pid_r * s_out + h, acc, mask=h < H)


def _empty(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Output allocation (tests swap in a NaN-filled one to prove every element is written)."""
    return torch.empty(shape, device=device, dtype=torch.float32)


def _tile(head_dim: int, num_heads: int, n_rows: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_H, BLOCK_R): about 4K elements of each input per tile."""
    block_d = next_pow2(head_dim)
    block_h = min(next_pow2(num_heads), max(1, 1024 // block_d))
    block_r = min(next_pow2(max(n_rows, 1)), max(1, 4096 // (block_h * block_d)))
    return block_d, block_h, block_r


NUM_WARPS = 4


def _plan(act, grad, baseline, num_heads: int, sum_rows: bool, sms: int):
    """Grid, kernel arguments (all but ``out_ptr``) and output rows for one launch.

    Shared by the launcher and ``benchmarks.kernel_report`` (which compiles exactly this).
    Returns None when the row dims do not fold into two (the caller copies, then re-plans).
    """
    lead = tuple(act.shape[:-1])
    head_dim = act.shape[-1] // num_heads
    n_rows = math.prod(lead)
    base_rows = baseline is not None and baseline.ndim > 1
    tensors = [act, grad] + ([baseline] if base_rows else [])
    folded = collapse_rows(lead, *[t.stride()[:-1] for t in tensors])
    if folded is None:
        return None
    (_, n1), row_strides = folded
    (s_a0, s_a1), (s_g0, s_g1) = row_strides[0], row_strides[1]
    s_b0, s_b1 = row_strides[2] if base_rows else (0, 0)

    block_d, block_h, block_r = _tile(head_dim, num_heads, n_rows)
    grid_h = triton.cdiv(num_heads, block_h)
    # Persistent over rows: about four programs per SM, each looping over row blocks.
    grid_r = max(1, min(triton.cdiv(max(n_rows, 1), block_r), (4 * sms) // grid_h))
    kwargs = dict(
        act_ptr=act, grad_ptr=grad, base_ptr=baseline if baseline is not None else act,
        n_rows=n_rows, n1=n1, H=num_heads,
        s_a0=s_a0, s_a1=s_a1, s_ac=act.stride(-1),
        s_g0=s_g0, s_g1=s_g1, s_gc=grad.stride(-1),
        s_b0=s_b0, s_b1=s_b1, s_bc=baseline.stride(-1) if baseline is not None else 0,
        s_out=num_heads,
        D=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_R=block_r,
        HAS_BASELINE=baseline is not None, BASELINE_ROWS=base_rows, SUM_ROWS=sum_rows,
    )  # fmt: skip
    return (grid_h, grid_r), kwargs, (grid_r if sum_rows else n_rows)


def _head_attribution_triton(act, grad, baseline, num_heads: int, sum_rows: bool) -> torch.Tensor:
    lead = tuple(act.shape[:-1])
    if math.prod(lead) == 0:
        return torch.zeros((num_heads,) if sum_rows else (*lead, num_heads), device=act.device)
    plan = _plan(act, grad, baseline, num_heads, sum_rows, num_sms(act.device))
    if plan is None:  # more than two row dims that do not fold: rare, copy once
        width = act.shape[-1]
        act, grad = act.reshape(-1, width), grad.reshape(-1, width)
        if baseline is not None and baseline.ndim > 1:
            baseline = baseline.reshape(-1, width)
        plan = _plan(act, grad, baseline, num_heads, sum_rows, num_sms(act.device))
    grid, kwargs, out_rows = plan
    out = _empty((out_rows, num_heads), act.device)
    _head_attribution_kernel[grid](out_ptr=out, **kwargs, num_warps=NUM_WARPS, enable_fp_fusion=True)
    return out.sum(0) if sum_rows else out.view(*lead, num_heads)


@torch.library.custom_op("soteria::head_attribution", mutates_args=())
def _head_attribution_op(
    act: torch.Tensor, grad: torch.Tensor, baseline: torch.Tensor | None, num_heads: int, sum_rows: bool
) -> torch.Tensor:
    if use_triton(act):
        return _head_attribution_triton(act, grad, baseline, num_heads, sum_rows)
    return reference.head_attribution(act, grad, num_heads=num_heads, baseline=baseline, sum_rows=sum_rows).float()


@_head_attribution_op.register_fake
def _(act, grad, baseline, num_heads, sum_rows):
    shape = (num_heads,) if sum_rows else (*act.shape[:-1], num_heads)
    return act.new_empty(shape, dtype=torch.float32)


def head_attribution(
    act: torch.Tensor,
    grad: torch.Tensor,
    *,
    num_heads: int,
    baseline: torch.Tensor | None = None,
    sum_rows: bool = False,
) -> torch.Tensor:
    """Per-head attribution scores from activations and gradients in one fused pass.

    Args:
        act: ``[..., H*D]`` activations at the output projection's input (fp32/bf16/fp16,
            any strides: no copy is made for views whose row dims fold into two).
        grad: gradients of the metric w.r.t. ``act``, same shape, dtype and device.
        num_heads: ``H``; ``D = act.shape[-1] // H``.
        baseline: None, ``[H*D]`` (broadcast, e.g. the mean clean activation) or act's shape;
            any of the three float dtypes (an fp32 mean may go with bf16 activations).
        sum_rows: also sum over every leading (row) dim, inside the kernel.

    Returns:
        float32 ``[..., H]`` (``[H]`` with ``sum_rows``): ``sum_d (baseline - act) * grad``
        per head, or ``sum_d act * grad`` when ``baseline`` is None. Not differentiable.
    """
    check_float("act", act)
    check_same("grad", grad, "act", act)
    if act.ndim < 1:
        raise ValueError("act must have at least one dimension ([..., H*D])")
    check_heads_layout(act.shape[-1], num_heads=num_heads)
    if not isinstance(sum_rows, bool):
        raise ValueError(f"sum_rows must be a bool, got {sum_rows!r}")
    if baseline is not None:
        check_float("baseline", baseline)
        if baseline.device != act.device:
            raise ValueError(f"baseline is on {baseline.device} but act is on {act.device}")
        if tuple(baseline.shape) not in ((act.shape[-1],), tuple(act.shape)):
            raise ValueError(
                f"baseline must have shape [{act.shape[-1]}] or act's shape {tuple(act.shape)}, "
                f"got {tuple(baseline.shape)}"
            )
        baseline = baseline.detach()
    return _head_attribution_op(act.detach(), grad.detach(), baseline, num_heads, sum_rows)
