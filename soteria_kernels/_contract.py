"""Input checks shared by the Triton and eager sides. Every check runs before any write."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_float(name: str, t: torch.Tensor, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape=True, dtype=True) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def check_heads_layout(width: int, num_heads: int | None = None, head_dim: int | None = None) -> tuple[int, int]:
    """Returns ``(H, D)`` for a head axis of ``width`` given either H or D."""
    if num_heads is not None:
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if width % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide the last dimension ({width})")
        return num_heads, width // num_heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    if width % head_dim:
        raise ValueError(f"head_dim={head_dim} does not divide the head axis ({width})")
    return width // head_dim, head_dim


def _check_head_values(values: list[int], num_heads: int) -> None:
    for h in values:
        if not 0 <= h < num_heads:
            raise ValueError(f"head index {h} out of range [0, {num_heads})")
    if len(set(values)) != len(values):
        dup = sorted({h for h in values if values.count(h) > 1})
        raise ValueError(f"heads must not repeat, got {dup} more than once")


def normalize_heads(heads, num_heads: int) -> torch.Tensor:
    """``heads`` (ints, or a 1-D integer tensor) -> int64 tensor ``[k]``.

    Python ints are checked here; a tensor's values are checked by :func:`check_tensor_args`
    inside the op, so that torch.compile can trace the call without reading tensor data.
    """
    if isinstance(heads, torch.Tensor):
        if heads.ndim != 1 or heads.dtype.is_floating_point or heads.dtype.is_complex or heads.dtype == torch.bool:
            raise ValueError(f"heads must be a 1-D integer tensor, got {heads.dtype} of shape {tuple(heads.shape)}")
        return heads.detach().to(torch.int64)
    if not isinstance(heads, Sequence):
        raise ValueError(f"heads must be a sequence of ints or a 1-D integer tensor, got {type(heads).__name__}")
    values = list(heads)
    for h in values:
        if isinstance(h, bool) or not isinstance(h, int):
            raise ValueError(f"heads must hold ints, got {h!r}")
    _check_head_values(values, num_heads)
    return torch.tensor(values, dtype=torch.int64)


def normalize_scale(scale, k: int) -> torch.Tensor:
    """``scale`` (a number, or ``k`` numbers as a sequence or 1-D tensor) -> float32 ``[k]``.

    Python numbers are checked here; a tensor's values inside the op (see normalize_heads).
    """
    if isinstance(scale, torch.Tensor):
        if scale.ndim > 1 or not scale.dtype.is_floating_point:
            raise ValueError(
                f"scale must be a number or a 1-D float tensor, got {scale.dtype} of shape {tuple(scale.shape)}"
            )
        s = scale.detach().to(torch.float32)
        s = s.expand(k) if s.ndim == 0 else s
    else:
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            values = [float(scale)] * k
        elif isinstance(scale, Sequence) and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in scale
        ):
            values = [float(x) for x in scale]
        else:
            raise ValueError(f"scale must be a float or a 1-D tensor, got {scale!r}")
        bad = [x for x in values if not math.isfinite(x)]
        if bad:
            raise ValueError(f"scale must be finite, got {bad[0]}")
        s = torch.tensor(values, dtype=torch.float32)
    if s.numel() != k:
        raise ValueError(f"scale has {s.numel()} values but heads has {k} entries")
    return s


def check_tensor_args(heads: torch.Tensor, scales: torch.Tensor, num_heads: int) -> None:
    """Value checks of tensor-valued heads and scales (runs in the op, before any write)."""
    _check_head_values(heads.tolist(), num_heads)
    if not bool(torch.isfinite(scales).all()):
        bad = scales[~torch.isfinite(scales)][0].item()
        raise ValueError(f"scale must be finite, got {bad}")


def check_head_axis(head_axis: int, weight: torch.Tensor) -> int:
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if head_axis not in (-1, 0, 1):
        raise ValueError(f"head_axis must be -1 / 1 (nn.Linear columns) or 0 (Conv1D rows), got {head_axis}")
    return head_axis % 2


def _extent(t: torch.Tensor) -> int:
    """Elements from the first to one past the last that ``t`` addresses in its storage."""
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True if two elements of ``t`` may share memory (an expanded or ``as_strided`` view).

    Dims are laid out by increasing stride; each must step past everything the faster dims
    address. Exact for every layout a slice, transpose or permute can give; conservative
    (True) only for hand-made ``as_strided`` views that interleave dims without overlap.
    """
    reach = 0  # elements spanned by the faster dims, minus one
    for n, s in sorted(((n, s) for n, s in zip(t.shape, t.stride()) if n > 1), key=lambda ns: ns[1]):
        if s <= reach:
            return True
        reach += (n - 1) * s
    return False


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if the bytes ``a`` and ``b`` address (first to last element) intersect in one storage."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    a1, b1 = a0 + _extent(a) * a.element_size(), b0 + _extent(b) * b.element_size()
    return a0 < b1 and b0 < a1


def check_inplace_operands(weight: torch.Tensor, other: torch.Tensor, other_name: str) -> None:
    """The in-place update writes ``weight`` while it reads ``other``: neither may alias ``weight``.

    Run by the Triton launcher and the eager reference alike, before any write, so both sides
    accept and reject the same calls.
    """
    if has_internal_overlap(weight):
        raise ValueError(
            f"weight has overlapping memory (strides {tuple(weight.stride())} for shape {tuple(weight.shape)}, "
            f"e.g. an expanded view): an in-place update would write one element twice; pass weight.clone()"
        )
    if shares_memory(weight, other):
        raise ValueError(
            f"{other_name} shares memory with weight (a view of it, such as weight.t() or a slice): "
            f"the update would read values it has already written; pass {other_name}.clone()"
        )
