"""soteria_kernels: fused Triton kernels for Soteria's hot paths, with eager references.

- :func:`head_attribution`: per-head ``sum_d (baseline - act) * grad`` in one pass.
- :func:`masked_head_update_` / :func:`masked_head_steer_`: in-place edits of selected heads'
  slices of an output-projection weight.

CUDA tensors run the Triton kernels; CPU tensors the eager references in
:mod:`soteria_kernels.reference` (or the Triton interpreter with ``TRITON_INTERPRET=1``);
``SOTERIA_BACKEND=triton|eager`` forces a side. This package never imports transformers.
"""

from . import reference
from ._backend import HAS_TRITON, use_triton
from .attribution import head_attribution
from .head_update import masked_head_steer_, masked_head_update_

__all__ = ["HAS_TRITON", "head_attribution", "masked_head_steer_", "masked_head_update_", "reference", "use_triton"]
