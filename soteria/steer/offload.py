"""Editing the weights of layers that accelerate offloads (``device_map`` with cpu/disk offload).

An offloaded layer's weight is a ``meta`` placeholder: the real tensor is in its offload hook's
``weights_map``. It is edited there in place when that map holds it in memory; when it is read
from disk or from the checkpoint's safetensors, an edited in-memory copy is put in front of it
(an overlay) and the files are never written. :func:`drop_overlays` removes the copies.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["drop_overlays", "editable_weight"]


def _align_hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` that offload its weights (a SequentialHook unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = [hook, *getattr(hook, "hooks", ())] if hook is not None else []
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def editable_weight(inner: nn.Module, site, overlays: list) -> torch.Tensor:
    """The tensor holding ``site``'s real weight values, to edit in place.

    A loaded weight is itself. An offloaded one (``meta`` placeholder) is looked up in the
    ``weights_map`` of the accelerate hook on its module or on the nearest ancestor that carries
    one. When the map reads the weight from disk or a checkpoint (a fresh tensor every time),
    or holds it in another dtype, an in-memory copy in the placeholder's dtype is put into the
    loader's state dict, which accelerate reads first, and ``(state_dict, key, previous)`` is
    appended to ``overlays`` so it can be dropped again.
    """
    base = site.base_module
    w = base.weight
    if w.device.type != "meta":
        return w
    names = {id(m): n for n, m in inner.named_modules()}
    qual = names.get(id(base))
    if qual is None:
        raise ValueError(f"{site.name}: its projection module is not part of the model")
    parts = qual.split(".") if qual else []
    for cut in range(len(parts), -1, -1):
        owner = inner.get_submodule(".".join(parts[:cut]))
        for hook in _align_hooks(owner):
            key = ".".join([*parts[cut:], "weight"])
            return _offloaded_tensor(hook.weights_map, key, w, site, overlays)
    raise ValueError(
        f"{site.param_name} is on the meta device and no accelerate offload hook holds its values; "
        "load the weights (or dispatch the model with accelerate) before steering it"
    )


def _offloaded_tensor(mapping, key: str, placeholder: torch.Tensor, site, overlays: list) -> torch.Tensor:
    while hasattr(mapping, "dataset") and hasattr(mapping, "prefix"):  # accelerate PrefixedDataset
        key, mapping = mapping.prefix + key, mapping.dataset
    store = getattr(mapping, "state_dict", None)  # accelerate OffloadedWeightsLoader: RAM first, then disk
    if not isinstance(store, dict):
        store = mapping if isinstance(mapping, dict) else None
    if store is None:
        raise ValueError(
            f"{site.param_name} is offloaded to a {type(mapping).__name__} soteria cannot edit; "
            "load the model without offloading that layer"
        )
    held = store.get(key)
    if isinstance(held, torch.Tensor) and held.dtype == placeholder.dtype:
        real = held
    else:
        try:
            value = mapping[key]
        except KeyError:
            raise ValueError(f"{site.param_name}: its offload hook has no weight {key!r}") from None
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        real = value.to(dtype=placeholder.dtype, copy=True).contiguous()
        overlays.append((store, key, held))
        store[key] = real
    if tuple(real.shape) != tuple(placeholder.shape):
        raise ValueError(
            f"{site.param_name}: the offloaded weight has shape {list(real.shape)}, the model expects "
            f"{list(placeholder.shape)}"
        )
    return real


def drop_overlays(overlays: list) -> None:
    """Undo :func:`_editable_weight`'s in-memory copies, newest first (the files were never written)."""
    for store, key, previous in reversed(overlays):
        if previous is None:
            store.pop(key, None)
        else:
            store[key] = previous
