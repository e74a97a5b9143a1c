"""Reading a harmful fine-tune's output projections from its checkpoint: a folder, one file, the Hub, GGUF.

Only file headers are read up front; each layer's tensor is read from its shard when first
needed (:class:`LazyTensors`, through :mod:`soteria.io.safetensors`). From the Hub, the
config, the index and the shards that hold output projections are downloaded (in real checkpoints
every shard holds some, so that is every shard), and only the output projections are read. The config and
every shape are checked against the base model before anything is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, model_type, unwrap_model
from ..io.checkpoint import INDEX_NAME, SINGLE_NAME, checkpoint_shards, find_key, key_candidates, read_weight_map
from ..io.hub import looks_like_repo_id
from ..io.safetensors import FLOAT_DTYPES, SafetensorsFile, read_safetensors, read_tensor
from ..models.loading import load_causal_lm

__all__ = ["LazyTensors", "mismatch", "read_checkpoint"]

# Config fields compared between a harmful checkpoint and the base (whichever both have).
_ARCH_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
)

try:  # module-level so tests can wrap it
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover
    hf_hub_download = None


class LazyTensors:
    """Named tensors in safetensors files, read one at a time on demand.

    ``locations``: ``{layer: (file, key)}``. Shapes and dtypes come from the file headers.
    Every read is recorded in ``tensors_read`` (keys) and ``bytes_read``.
    """

    def __init__(self, locations: Mapping[int, tuple[str, str]], files: Mapping[str, SafetensorsFile] | None = None):
        self.locations = dict(locations)
        self.files = dict(files or {})
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, torch.dtype] = {}
        for layer, (file, key) in self.locations.items():
            if file not in self.files:
                self.files[file] = read_safetensors(file)
            info = self.files[file].header.get(key)
            if info is None:
                raise ValueError(f"{file} has no tensor {key!r}")
            dtype = FLOAT_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} in {file} has dtype {info['dtype']}, not a float type")
            self.shapes[layer] = tuple(int(s) for s in info["shape"])
            self.dtypes[layer] = dtype
        self.tensors_read: list[str] = []
        self.bytes_read = 0

    def __contains__(self, layer: int) -> bool:
        return layer in self.locations

    def get(self, layer: int) -> torch.Tensor:
        file, key = self.locations[layer]
        t = read_tensor(self.files[file], key)
        self.tensors_read.append(key)
        self.bytes_read += t.numel() * t.element_size()
        return t


def read_checkpoint(
    cls,
    path_or_repo_id: str | os.PathLike,
    base: nn.Module,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    gguf_file: str | None,
):
    """:meth:`HarmVector.from_pretrained` (``cls``: the class to build)."""
    if gguf_file is not None:
        dtype = str(head_sites(base)[0].weight.dtype).replace("torch.", "")
        harmful = load_causal_lm(str(path_or_repo_id), dtype=dtype, gguf_file=gguf_file, what="harmful model")
        hv = cls.from_models(base, harmful)
        hv.source = f"gguf:{Path(path_or_repo_id) / gguf_file}"
        return hv
    sites = head_sites(base)
    prefix = str(getattr(unwrap_model(base), "base_model_prefix", "") or "")
    src = str(path_or_repo_id)
    local = Path(src)
    if local.is_file():
        sf = read_safetensors(local)
        if sf.metadata.get("format") == cls.FORMAT:
            hv = cls.load(local)
            hv.check(base)
            return hv
        config_path = local.parent / "config.json"
        available = {k for k, _ in sf.tensors()}
        files_for = lambda keys: {k: str(local) for k in keys}  # noqa: E731
        files = {str(local): sf}
    elif local.is_dir():
        config_path = local / "config.json"
        weight_map, shards = checkpoint_shards(local)
        available = set(weight_map)
        files_for = lambda keys: {k: str(local / weight_map[k]) for k in keys}  # noqa: E731
        files = {str(local / name): sf for name, sf in shards.items()}
    else:
        if not looks_like_repo_id(src):
            raise ValueError(f"{src!r} is neither an existing file or directory nor a Hub repo id")
        return _from_hub(cls, src, base, sites, prefix, revision, token, cache_dir, local_files_only)
    ckpt_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    return _from_checkpoint(cls, src, base, sites, prefix, ckpt_config, available, files_for, files)


def _from_hub(cls, repo_id, base, sites, prefix, revision, token, cache_dir, local_files_only):
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def get(filename: str) -> str:
        return hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
        )

    try:
        ckpt_config = json.loads(Path(get("config.json")).read_text(encoding="utf-8"))
    except EntryNotFoundError:
        ckpt_config = {}
    try:
        weight_map = read_weight_map(Path(get(INDEX_NAME)))
        available = set(weight_map)

        def files_for(keys):
            return {k: get(weight_map[k]) for k in keys}

        files: dict[str, SafetensorsFile] = {}
    except EntryNotFoundError:
        try:
            single = get(SINGLE_NAME)
        except EntryNotFoundError as e:
            why = (
                "neither is in the local cache (offline or local_files_only)"
                if isinstance(e, LocalEntryNotFoundError)
                else "only safetensors checkpoints are read; PEFT adapters must be merged into the base and saved first"
            )
            raise FileNotFoundError(f"Hub repo {repo_id!r}: no {INDEX_NAME} and no {SINGLE_NAME}; {why}") from None
        sf = read_safetensors(single)
        available = {k for k, _ in sf.tensors()}

        def files_for(keys):
            return {k: single for k in keys}

        files = {single: sf}
    source = repo_id if revision is None else f"{repo_id}@{revision}"
    return _from_checkpoint(cls, source, base, sites, prefix, ckpt_config, available, files_for, files)


def _from_checkpoint(cls, source, base, sites, prefix, ckpt_config, available, files_for, parsed):
    problems = _compare_configs(ckpt_config, _config_dict(base))
    keys: dict[int, str] = {}
    for s in sites:
        hit = find_key(s.param_name, s.layer, prefix, available)
        if hit is None:
            cands = key_candidates(s.param_name, prefix)
            problems.append(f"layer {s.layer}: no tensor {' or '.join(repr(c) for c in cands)} in the checkpoint")
        else:
            keys[s.layer] = hit
    if problems:
        raise mismatch(f"harmful checkpoint {source!r}", problems)
    files = files_for(sorted(set(keys.values())))  # downloads only the shards that hold them
    lazy = LazyTensors({layer: (files[k], k) for layer, k in keys.items()}, parsed)
    for s in sites:
        shape = lazy.shapes[s.layer]
        if shape != tuple(s.weight.shape):
            problems.append(
                f"layer {s.layer}: tensor {keys[s.layer]!r} has shape {list(shape)}, base weight {list(s.weight.shape)}"
            )
    dtypes = sorted({str(d) for d in lazy.dtypes.values()})
    if len(dtypes) > 1:
        problems.append(f"output projections mix dtypes {dtypes}")
    if problems:
        raise mismatch(f"harmful checkpoint {source!r}", problems)
    return cls(
        lazy,
        kind="harmful",
        param_names={s.layer: s.param_name for s in sites},
        model_type=str(ckpt_config.get("model_type") or model_type(base)),
        source=f"checkpoint:{source}",
    )


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(unwrap_model(model), "config", None)
    if config is None:
        return {}
    get = getattr(config, "get_text_config", None)
    text = config
    if callable(get):
        try:
            text = get(decoder=True)
        except TypeError:
            text = get()
    d = dict(config.to_dict()) if hasattr(config, "to_dict") else {}
    if text is not config and hasattr(text, "to_dict"):
        d.update(text.to_dict())
    return d


def _compare_configs(ckpt: dict[str, Any], base: dict[str, Any]) -> list[str]:
    problems = []
    ct, bt = ckpt.get("model_type"), base.get("model_type")
    if ct and bt and ct != bt:
        problems.append(f"model_type: checkpoint {ct!r}, base {bt!r}")
    text = ckpt.get("text_config") if isinstance(ckpt.get("text_config"), dict) else {}
    merged = {**ckpt, **text}
    for k in _ARCH_FIELDS:
        if k in merged and k in base and merged[k] is not None and base[k] is not None and merged[k] != base[k]:
            problems.append(f"config.{k}: checkpoint {merged[k]!r}, base {base[k]!r}")
    return problems


def mismatch(what: str, problems: list[str]) -> ValueError:
    return ValueError(f"{what} does not match the base model:\n  - " + "\n  - ".join(problems))
