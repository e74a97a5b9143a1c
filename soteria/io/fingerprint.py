"""A tensor's fingerprint: sha256 of its bytes, with its shape and dtype.

A :class:`soteria.SoteriaPatch` records one for every base tensor it edits, and refuses a
model whose tensors do not match (another base model, revision or dtype). The bytes are the
tensor's values in row-major order and its own dtype, so a tensor loaded from a checkpoint
and the same tensor read straight from the safetensors file hash alike.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["fingerprint", "fingerprint_mismatch"]

_BLOCK = 1 << 24  # bytes hashed at a time (a GPU tensor is copied to the CPU block by block)


def fingerprint(t: torch.Tensor) -> dict[str, Any]:
    """``{"shape": [...], "dtype": "bfloat16", "sha256": hex}`` of ``t`` (any device, any strides)."""
    flat = t.detach().reshape(-1)
    raw = flat.contiguous().view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    h = hashlib.sha256()
    for a in range(0, raw.numel(), _BLOCK):
        h.update(memoryview(raw[a : a + _BLOCK].cpu().numpy()))
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "sha256": h.hexdigest()}


def fingerprint_mismatch(expected: dict[str, Any], t: torch.Tensor) -> str | None:
    """None if ``t`` matches ``expected`` (a :func:`fingerprint`), else what differs, in words."""
    if list(t.shape) != list(expected["shape"]):
        return f"shape {list(t.shape)}, expected {list(expected['shape'])}"
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype != expected["dtype"]:
        return f"dtype {dtype}, expected {expected['dtype']}"
    got = fingerprint(t)["sha256"]
    if got != expected["sha256"]:
        return f"other values (sha256 {got[:12]}..., expected {expected['sha256'][:12]}...)"
    return None
