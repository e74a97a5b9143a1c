"""A Hugging Face safetensors checkpoint folder: its shards, and which key holds a parameter.

:func:`checkpoint_shards` reads a folder's index (or its single ``model.safetensors``) and
every shard's header; :func:`find_key` maps a model parameter name to the checkpoint key that
holds it (with or without the base-model prefix). Used by the harm reader and the streaming edit.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

from .safetensors import SafetensorsFile, read_safetensors

__all__ = [
    "INDEX_NAME",
    "SINGLE_NAME",
    "checkpoint_shards",
    "find_key",
    "key_candidates",
    "no_weights_message",
    "read_weight_map",
    "shard_files",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weights in other formats: a folder holding only these is not a safetensors checkpoint.
OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".tflite", ".ot", ".npz")


def no_weights_message(folder: Path) -> str:
    """One line: ``folder`` has no safetensors checkpoint, and what to do about what it has."""
    names = sorted(p.name for p in folder.iterdir())
    if "adapter_config.json" in names:
        hint = "it holds a PEFT adapter: merge it into the base (merge_and_unload()) and save_pretrained the result"
    elif any(n.endswith(OTHER_WEIGHTS) for n in names):
        hint = "only safetensors checkpoints are read: re-save it with save_pretrained (safetensors is the default)"
    else:
        hint = f"files found: {', '.join(names) or 'none'}"
    return f"{folder} has neither {INDEX_NAME} nor {SINGLE_NAME}; {hint}"


def read_weight_map(index: Path) -> dict[str, str]:
    """``{checkpoint key: shard file name}`` of a ``model.safetensors.index.json``."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ValueError(f"{index} is unreadable or has no weight_map") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has an empty or malformed weight_map")
    return weight_map


def shard_files(folder: Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (from its index, or the single file)
    without parsing them; RuntimeError when there is none."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        return [folder / name for name in sorted(set(read_weight_map(index).values()))]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    raise RuntimeError(f"no safetensors weights in {folder}: {sorted(p.name for p in folder.iterdir())}")


def checkpoint_shards(
    folder: Path, only: Collection[str] | None = None
) -> tuple[dict[str, str], dict[str, SafetensorsFile]]:
    """``(weight_map, {file name: parsed file})`` of a safetensors checkpoint directory.

    ``only``: parse just the shards holding these keys (the others are not opened)."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = read_weight_map(index)
    elif (folder / SINGLE_NAME).is_file():
        weight_map = None
    else:
        raise FileNotFoundError(no_weights_message(folder))
    if weight_map is None:
        files = [SINGLE_NAME]
    elif only is None:
        files = sorted(set(weight_map.values()))
    else:
        files = sorted({weight_map[k] for k in only if k in weight_map})
    shards = {}
    for name in files:
        p = folder / name
        if not p.is_file():
            raise FileNotFoundError(f"{folder}: the index lists shard {name!r}, which is missing")
        shards[name] = read_safetensors(p)
    if weight_map is None:
        weight_map = {k: SINGLE_NAME for k, _ in shards[SINGLE_NAME].tensors()}
    for key, name in weight_map.items():
        if name in shards and key not in shards[name].header:
            raise ValueError(f"{folder}: the index puts {key!r} in {name}, which does not hold it")
    return weight_map, shards


def key_candidates(param_name: str, prefix: str) -> list[str]:
    """Checkpoint keys that may hold parameter ``param_name``: itself, and with / without the
    base-model ``prefix`` (``model.layers.3...`` <-> ``layers.3...``)."""
    out = [param_name]
    if prefix:
        if param_name.startswith(prefix + "."):
            out.append(param_name[len(prefix) + 1 :])
        else:
            out.append(f"{prefix}.{param_name}")
    return out


def find_key(param_name: str, layer: int, prefix: str, available: Collection[str]) -> str | None:
    """The checkpoint key of a model parameter: one of :func:`key_candidates`, else the one key
    ending in ``.layers.{layer}...`` as the parameter does (a wrapper's extra prefix); None if none."""
    for c in key_candidates(param_name, prefix):
        if c in available:
            return c
    tail = _layers_tail(param_name, layer)
    hits = [k for k in available if k == tail or k.endswith("." + tail)]
    return hits[0] if len(hits) == 1 else None


def _layers_tail(param_name: str, layer: int) -> str:
    """``"layers.3.self_attn.o_proj.weight"`` from ``"model.layers.3.self_attn.o_proj.weight"``."""
    parts = param_name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == str(layer):
            return ".".join(parts[i - 1 :])
    return param_name
