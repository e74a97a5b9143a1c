"""Running a model for measurement while leaving it as it was found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["frozen_eval"]


@contextlib.contextmanager
def frozen_eval(model: nn.Module, *, grad: bool) -> Iterator[None]:
    """Eval mode (dropout off) for the duration; with ``grad``, autograd on but every parameter
    frozen (gradients flow only to tensors the caller adds), else ``no_grad``. Training modes and
    ``requires_grad`` flags are restored on exit, whatever happens.

    Flags are kept by (module, name), not by tensor: accelerate's offload hooks replace an
    offloaded layer's meta placeholders on every forward pass, so the objects seen here do not
    survive it.
    """
    training = [(m, m.training) for m in model.modules()]
    frozen = (
        [(m, n) for m in model.modules() for n, p in m._parameters.items() if p is not None and p.requires_grad]
        if grad
        else []
    )
    try:
        model.eval()
        for m, n in frozen:
            m._parameters[n].requires_grad_(False)
        with torch.enable_grad() if grad else torch.no_grad():
            yield
    finally:
        for m, n in frozen:
            p = m._parameters.get(n)
            if p is not None and p.is_leaf:
                p.requires_grad_(True)
        for m, mode in training:
            m.training = mode
