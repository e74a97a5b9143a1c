"""Which side runs a call: the Triton kernel or the eager PyTorch reference.

- CUDA tensors: Triton.
- CPU tensors: eager, unless ``TRITON_INTERPRET=1`` (Triton's interpreter runs the kernels
  on CPU; the tests use this).
- ``SOTERIA_BACKEND=triton|eager`` forces a side (read at every call).
"""

from __future__ import annotations

import os

import torch

try:  # Triton wheels exist for Linux only.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised on platforms without triton
    HAS_TRITON = False

BACKENDS = ("triton", "eager")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")


# ``triton.jit`` picks the interpreter when a kernel is decorated, i.e. when this package is
# imported, so the flag is read once, here, with the kernels.
INTERPRET = _env_flag("TRITON_INTERPRET")


def use_triton(t: torch.Tensor) -> bool:
    """True if the Triton kernel should run for a call whose data lives where ``t`` does."""
    forced = os.environ.get("SOTERIA_BACKEND", "").strip().lower()
    if forced and forced not in BACKENDS:
        raise ValueError(f"SOTERIA_BACKEND must be one of {BACKENDS} or unset, got {forced!r}")
    on_triton_device = t.is_cuda or (t.device.type == "cpu" and INTERPRET)
    if forced == "eager":
        return False
    if forced == "triton":
        if not HAS_TRITON:
            raise RuntimeError("SOTERIA_BACKEND=triton but triton is not installed")
        if not on_triton_device:
            raise RuntimeError(
                f"SOTERIA_BACKEND=triton needs CUDA tensors, or TRITON_INTERPRET=1 (set before import) for CPU tensors; "
                f"got a tensor on {t.device}"
            )
        return True
    return HAS_TRITON and on_triton_device
