"""A model's run-time state: where its inputs go, and running it for measurement while leaving it as found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["frozen_eval", "input_device"]


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


def _hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on ``module``, if any."""
    hook = getattr(module, "_hf_hook", None)
    for h in [hook, *getattr(hook, "hooks", ())]:
        dev = getattr(h, "execution_device", None)
        if dev is not None:
            return torch.device(dev) if not isinstance(dev, int) else torch.device("cuda", dev)
    return None


def input_device(model: nn.Module) -> torch.device:
    """Where input ids go: the embedding's device, or its accelerate execution device when the
    model is offloaded; else the first parameter or buffer not on ``meta``; else CPU."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor) and w.device.type != "meta":
        return w.device
    for m in (emb, model):
        dev = _hook_device(m) if m is not None else None
        if dev is not None:
            return dev
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")
