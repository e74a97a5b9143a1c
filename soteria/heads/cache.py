"""Where soteria caches results, and the fingerprints that key them.

The cache directory is ``$SOTERIA_CACHE_DIR``, else ``$XDG_CACHE_HOME/soteria``, else
``~/.cache/soteria``. Keys are SHA-256 digests of JSON-serialisable parts, one of which is
:func:`model_fingerprint`: a digest of the model's weights, not of its name, so a steered
model never reads its unsteered scores.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import head_sites
from .prompts import encode_batch

__all__ = ["cache_dir", "cache_key", "model_fingerprint", "prompts_digest"]

# Elements read from each non-output-projection tensor (evenly strided over it).
SAMPLE_ELEMENTS = 4096


def cache_dir() -> Path:
    """The cache root (not created here)."""
    env = os.environ.get("SOTERIA_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "soteria"


def cache_key(parts: dict[str, Any]) -> str:
    """SHA-256 hex digest of ``parts`` as JSON with sorted keys (values must be JSON-serialisable)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def model_fingerprint(model: nn.Module, full: set[str] | None = None) -> str:
    """SHA-256 of a model's weights: the output projections in full, every other tensor sampled.

    ``full``: names (as in ``model.named_parameters()``) hashed byte for byte; default the
    attention output-projection weights from :func:`soteria.arch.head_sites`, which are what
    steering edits. Every other parameter and buffer contributes its name, shape, dtype and
    ``SAMPLE_ELEMENTS`` evenly strided elements. Tradeoff: an edit elsewhere that misses every
    sampled element goes unnoticed, in exchange for reading ~1 GB (Llama-3-8B's o_proj in bf16)
    instead of 16 GB. Tensors on the ``meta`` device contribute their metadata only. PEFT tuner
    layers add their adapter state (active, disabled, merged, scaling).
    """
    if full is None:
        full = set()
        weights = {id(s.weight) for s in head_sites(model)}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in weights:
                full.add(name)
    h = hashlib.sha256()
    # PEFT tuner layers compute with whichever adapters are active (or none, inside
    # ``disable_adapter()``) from the same tensors: their state is part of the model.
    tuner = getattr(sys.modules.get("peft.tuners.tuners_utils"), "BaseTunerLayer", None)
    if tuner is not None:
        for name, m in model.named_modules():
            if isinstance(m, tuner):
                state = [
                    getattr(m, a, None) for a in ("active_adapters", "disable_adapters", "merged_adapters", "scaling")
                ]
                h.update(f"tuner|{name}|{state!r}|".encode())
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, t in sorted(tensors, key=lambda kv: kv[0]):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type == "meta" or t.numel() == 0:
            continue
        if name in full:
            h.update(b"full|")
            h.update(_tensor_bytes(t))
        else:
            flat = t.detach().reshape(-1)
            step = -(-flat.numel() // SAMPLE_ELEMENTS)  # ceil: at most SAMPLE_ELEMENTS, spread over all of it
            h.update(_tensor_bytes(flat[::step]))
    return h.hexdigest()


def prompts_digest(tokenizer, built: dict[str, Any]) -> str:
    """SHA-256 of the token ids every task feeds the model (so data and tokenizer are covered)."""
    h = hashlib.sha256()
    for name in sorted(built):
        pp = built[name]
        h.update(f"task|{name}|".encode())
        for which in (pp.clean, pp.corrupted):
            ids, mask, _ = encode_batch(tokenizer, list(which), padding_side="right")
            for row, m in zip(ids, mask):
                h.update(row[m.bool()].to(torch.int64).numpy().tobytes())
                h.update(b"|")
        h.update(torch.tensor(list(pp.target_ids), dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()
