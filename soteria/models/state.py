"""A model's run-time state: where its inputs go, and running it for measurement while leaving it as found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["PRECISIONS", "autocast_dtype", "check_precision", "frozen_eval", "input_device", "mixed_precision"]

#: ``precision=`` of the fine-tune direction: ``"auto"`` (bf16 autocast of an fp32 model where
#: bf16 matrix products are fast, see :func:`autocast_dtype`), or fixed.
PRECISIONS = ("auto", "float32", "bfloat16")
#: ``torch.cpu`` checks for the instructions that make bf16 matrix products fast on a CPU.
_CPU_BF16_PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")


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


def check_precision(precision) -> None:
    """ValueError unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")


def autocast_dtype(model: nn.Module, precision: str) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (:data:`PRECISIONS`; None: the model's own dtype).

    Only an fp32 model is autocast. ``"auto"`` picks bf16 on CUDA with bf16 support and on a CPU
    with AMX tiles or AVX512-BF16, where bf16 matrix products are 2-3.5x faster than fp32.
    """
    check_precision(precision)
    if precision == "float32" or next(model.parameters()).dtype != torch.float32:
        return None
    if precision == "bfloat16":
        return torch.bfloat16
    device = input_device(model)
    if device.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = device.type == "cpu" and any(
            bool(getattr(torch.cpu, probe, lambda: False)()) for probe in _CPU_BF16_PROBES
        )
    return torch.bfloat16 if fast else None


def mixed_precision(model: nn.Module, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Context: autocast to ``dtype`` on the model's input device (nothing for None)."""
    return torch.autocast(input_device(model).type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
