"""Steer a safetensors checkpoint on disk, one output projection at a time, without building the model.

:func:`steer_checkpoint` reads the architecture from ``config.json`` (the model skeleton is
built on the ``meta`` device, so no weight is allocated, and :func:`soteria.arch.head_sites`
names each layer's output projection, ``H``, ``D`` and the head axis), then writes every shard
anew: the original header with ``soteria_config`` added to its metadata, the untouched tensor
bytes copied through by the kernel (``os.copy_file_range``), and each edited output projection
read, steered with the same kernel as :meth:`soteria.SoteriaPatcher.apply`, and written back.

Memory: one edited tensor, its harmful counterpart (or fp32 ``tau``) and a fixed-size block of
kernel temporaries (``_CHUNK_BYTES``, 4 MiB); untouched bytes never enter the process. A
Llama-70B o_proj is 8192 x 8192 bf16 = 128 MiB, so a 70B checkpoint is steered in well under
1 GiB (``tests/test_streaming.py`` measures the peak in a subprocess).

Output: the tensors are bit-identical to loading the model, applying the same edit in memory
on the same kind of device (the eager CPU path rounds twice in fp32, the Triton kernel once,
with an FMA) and saving it with :func:`soteria.save_steered`; when the base checkpoint was itself written by
``save_pretrained`` with the same ``max_shard_size``, whole shard files are byte-identical too.
The output directory appears atomically (:func:`soteria.io.atomic.atomic_directory`); the source
is opened read-only and never modified.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import soteria_kernels

from ..arch import head_sites
from ..harm import HarmVector
from ..io.atomic import atomic_directory, check_target
from ..io.checkpoint import OTHER_WEIGHTS, checkpoint_shards, find_key
from ..io.fingerprint import fingerprint_mismatch
from ..io.hub import hub_repo_id
from ..io.safetensors import EDITABLE, SafetensorsFile, read_tensor, write_safetensors
from ..models.loading import meta_model
from ..progress import progress_bar
from ..steer.config import SoteriaConfig
from ..steer.plan import check_plan, layer_plan, operand_dtype, warn_shared
from .card import CONFIG_NAME, METADATA_KEY, model_card, write_soteria_config
from .patch import SoteriaPatch

__all__ = ["steer_checkpoint"]

#: Bytes of fp32 kernel temporaries per block: the edit runs over blocks of the non-head axis.
_CHUNK_BYTES = 4 << 20
_SKIP_DIRS = {".git", ".cache"}


# --------------------------------------------------------------------------- the edit


def _edit_tensor(fn, w: torch.Tensor, operand: torch.Tensor, heads, scales, site, device: torch.device) -> None:
    """``fn`` (a soteria_kernels masked head op) on ``w`` in place, over blocks of the non-head axis
    on CPU (elementwise, so blocking changes no bit); whole-tensor on an accelerator."""
    kw = dict(head_dim=site.head_dim, scale=scales, head_axis=site.head_axis)
    if device.type != "cpu":
        wd = w.to(device)
        fn(wd, operand.to(device), heads, **kw)
        w.copy_(wd.cpu())
        return
    other = 0 if site.head_axis % 2 == 1 else 1
    n_other = w.shape[other]
    step = max(1, _CHUNK_BYTES // (len(heads) * site.head_dim * 4 * 5))  # ~5 fp32 temporaries per element
    for a in range(0, n_other, step):
        n = min(step, n_other - a)
        fn(w.narrow(other, a, n), operand.narrow(other, a, n), heads, **kw)


@dataclass
class _Plan:
    base: Path
    out: Path
    config_json: dict[str, Any]
    record: Any  # SoteriaConfig
    shards: dict[str, SafetensorsFile]
    edits: dict[str, dict[str, int]]  # shard file -> {checkpoint key: layer}
    layers: dict[int, tuple[list[int], list[float]]]
    sites: list
    harm: Any  # HarmVector, or None with a patch
    patch: Any  # SoteriaPatch, or None
    n_changed: int
    n_total: int


def _check_paths(base: Path, out: Path, harm, overwrite: bool) -> None:
    base_r, out_r = base.resolve(), out.resolve()
    if out_r == base_r or base_r in out_r.parents:
        raise ValueError(f"out_dir {out} must be outside base_dir {base}: the source is never written to")
    if os.path.lexists(out):
        if overwrite and out_r in base_r.parents:
            raise ValueError(f"replacing {out} would delete base_dir {base}, which it contains")
        check_target(out, overwrite, ours=CONFIG_NAME)
    if isinstance(harm, (str, os.PathLike)) and Path(harm).exists():
        harm_r = Path(harm).resolve()
        if harm_r == out_r or (overwrite and out_r in harm_r.parents):
            raise ValueError(f"out_dir {out} would replace the harmful checkpoint {harm}")


def _prepare(base_dir, out_dir, heads, harm, scale, langs, patch, overwrite, trust_remote_code) -> _Plan:

    base = Path(base_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"base_dir {base} is not a directory")
    out = Path(os.path.abspath(out_dir))
    _check_paths(base, out, harm, overwrite)
    config_path = base / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{base} has no config.json")
    config_json = json.loads(config_path.read_text(encoding="utf-8"))
    if config_json.get("soteria") is not None:
        raise ValueError(f"{base} is already steered by soteria (config.json has 'soteria'); start from the base model")
    if config_json.get("quantization_config") is not None:
        raise ValueError(f"{base} is quantized ({config_json['quantization_config'].get('quant_method')}); "
                         "soteria edits float checkpoints only")  # fmt: skip
    weight_map, shards = checkpoint_shards(base)

    model = meta_model(str(base), trust_remote_code=trust_remote_code)
    sites = head_sites(model)
    n_layers, n_heads = len(sites), sites[0].num_heads

    if isinstance(heads, Mapping) and langs is None:
        langs = list(heads)
    elif langs is None and patch is None:
        raise ValueError(
            "heads is a list of (layer, head) pairs: pass langs= naming the languages they were chosen for, "
            "or heads={lang: pairs}"
        )
    model_type = str(getattr(model.config, "model_type", "") or "")
    if patch is not None:  # the patch's record, checked against this model's shape
        record, auto = patch.config, False
        if record.model_type and model_type and record.model_type != model_type:
            raise ValueError(f"the patch was made for a {record.model_type} model; {base} is {model_type}")
        check_plan(list(record.languages), record.heads, record.scale, n_layers, n_heads)
    else:
        langs, per_lang, scales = check_plan(langs, heads, scale, n_layers, n_heads)
        auto = scales == "auto"  # a fine-tune's scale is 1.0; a direction's cannot be calibrated on disk
        record = SoteriaConfig(
            languages=langs,
            heads=per_lang,
            scale=1.0 if auto else scales,
            method="explicit",
            top_k=None,
            model_type=model_type,
        )
        warn_shared(record)
    plan = layer_plan(record)

    # Every checkpoint key, shape and dtype, before anything is written.
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    problems, edits, n_changed = [], {}, 0
    for layer, (hs, _) in sorted(plan.items()):
        site = sites[layer]
        shared = names_of.get(id(site.weight), [])
        if len(shared) > 1:
            problems.append(
                f"layer {layer}: {site.param_name} is shared with {shared[1:]}; editing it would change both"
            )
            continue
        key = find_key(site.param_name, layer, prefix, weight_map)
        if key is None:
            problems.append(f"layer {layer}: no checkpoint tensor for {site.param_name}")
            continue
        info = shards[weight_map[key]].header[key]
        shape = tuple(int(s) for s in info["shape"])
        if shape != tuple(site.weight.shape):
            problems.append(f"layer {layer}: {key} has shape {list(shape)}, config implies {list(site.weight.shape)}")
        elif info["dtype"] not in EDITABLE:
            problems.append(f"layer {layer}: {key} is stored as {info['dtype']}; only F32/F16/BF16 can be steered")
        edits.setdefault(weight_map[key], {})[key] = layer
        other = site.weight.shape[0 if site.head_axis % 2 == 1 else 1]
        n_changed += len(hs) * site.head_dim * int(other)
    if problems:
        raise ValueError(f"cannot steer {base}:\n  - " + "\n  - ".join(problems))
    if patch is not None:
        _check_fingerprints(patch, shards, edits, base)
    else:
        if isinstance(harm, (str, os.PathLike)):
            harm = HarmVector.from_pretrained(harm, base=model)
        elif not isinstance(harm, HarmVector):
            raise ValueError(f"harm must be a HarmVector or a harmful checkpoint's path, got {type(harm).__name__}")
        harm.check(model, layers=sorted(plan))
        if auto and harm.kind == "tau":
            raise ValueError(
                "scale='auto' calibrates a direction against weights in memory; give the streaming "
                "edit an explicit scale (--scale), e.g. the one recorded by an in-memory steering"
            )
        record.harm_source, record.harm_kind = harm.source, harm.kind
    return _Plan(
        base=base,
        out=out,
        config_json=config_json,
        record=record,
        shards=shards,
        edits=edits,
        layers=plan,
        sites=sites,
        harm=harm,
        patch=patch,
        n_changed=n_changed,
        n_total=sum(sf.numel() for sf in shards.values()),
    )


def steer_checkpoint(
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    heads: Mapping[str, list] | list | None = None,
    harm=None,
    scale: float | dict[str, float] = 1.0,
    langs: str | list[str] | None = None,
    patch: SoteriaPatch | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
    repo_id: str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    progress: bool = True,
) -> Path:
    """Write a steered copy of the safetensors checkpoint ``base_dir`` to ``out_dir``; return ``out_dir``.

    Args:
        heads: ``{lang: [(layer, head), ...]}``, or one list of pairs for every language in ``langs``.
        harm: a harmful fine-tune's directory / safetensors file / saved vector (read with
            :meth:`soteria.HarmVector.from_pretrained`, output projections only), or a HarmVector.
        scale: ``lambda``, one float or ``{lang: float}`` (a shared head takes the largest).
        langs: the languages, needed when ``heads`` is a list.
        patch: instead of ``heads``, ``harm`` and ``scale``: a :class:`soteria.SoteriaPatch`, whose
            slices are written as they are (its fingerprints are checked against the checkpoint's
            tensors first); the tensors are bit-identical to ``patch.apply`` on the loaded model.
        overwrite: replace an existing ``out_dir`` (the old one is kept if this run fails).
        base_model, repo_id: Hub ids for the model card (``base_model`` in its YAML header; the
            id in its loading snippet). Default: ``config.json``'s ``_name_or_path`` if it looks
            like a Hub id; ``out_dir``'s name.
        device: where the kernel runs (``"cuda"``: Triton); tensors are read and written on CPU.
            The result is bit-identical to ``SoteriaPatcher.apply`` on a model on the same kind of
            device (CPU and GPU kernels may round a few elements differently).
        progress: a progress bar over shards (log lines when stderr is not a terminal).

    Every file of ``base_dir`` is carried over (shards rewritten as described in the module
    docstring; ``config.json`` gains ``"soteria"``; ``README.md`` is replaced by the model card;
    ``soteria_config.json`` is added), except weights in other formats (``*.bin``, ``*.pth``,
    safetensors files outside the index...), which would hold the unsteered weights: they are
    left out with a warning. Everything (heads, keys, shapes, dtypes, the harm vector's fit) is
    checked before anything is written; NaN/Inf in a harmful tensor is found when it is read
    and aborts the run. No output appears unless the whole run succeeds.
    """

    device = torch.device(device)
    if patch is not None and (heads is not None or harm is not None):
        raise ValueError("give patch= alone, or heads= and harm=: a patch holds the heads and their new values")
    if patch is None and (heads is None or harm is None):
        raise ValueError("steer_checkpoint needs heads= and harm= (or a patch=)")
    plan = _prepare(base_dir, out_dir, heads, harm, scale, langs, patch, overwrite, trust_remote_code)
    meta = {METADATA_KEY: plan.record.to_json(indent=None)}
    shard_names = set(plan.shards)
    skipped: list[str] = []
    with atomic_directory(plan.out, overwrite=overwrite, ours=CONFIG_NAME) as tmp:
        _carry_files(plan.base, tmp, shard_names, skipped)
        for name in progress_bar(sorted(shard_names), desc="steer shards", unit="shard", enabled=progress):
            dst = tmp / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            edits = {key: _editor(plan, layer, device) for key, layer in plan.edits.get(name, {}).items()}
            write_safetensors(plan.shards[name], dst, metadata={**plan.shards[name].metadata, **meta}, edits=edits)
        _write_records(plan, tmp, base_model, repo_id)
    if skipped:
        warnings.warn(
            f"steer_checkpoint left out {len(skipped)} weight file(s) in other formats, which would hold the "
            f"unsteered weights: {', '.join(skipped)}",
            stacklevel=2,
        )
    return plan.out


def _editor(plan: _Plan, layer: int, device: torch.device) -> Callable[[torch.Tensor], None]:

    hs, ss = plan.layers[layer]
    site = plan.sites[layer]
    if plan.patch is not None:
        slices = {h: plan.patch.slices[(layer, h)] for h in hs}

        def write(w: torch.Tensor) -> None:
            for h, new in slices.items():
                site.head_slice(w, h).copy_(new)

        return write
    fn = getattr(soteria_kernels, "masked_head_steer_" if plan.harm.kind == "harmful" else "masked_head_update_")

    def edit(w: torch.Tensor) -> None:
        # The operand exactly as SoteriaPatcher.apply prepares it, so the result is bit-identical.
        operand = _harm_tensor(plan.harm, layer).to(dtype=operand_dtype(plan.harm, w))
        _edit_tensor(fn, w, operand, hs, ss, site, device)

    return edit


def _check_fingerprints(patch, shards: dict, edits: dict, base: Path) -> None:
    """Each tensor the patch edits, read from the checkpoint, against the patch's fingerprint of it."""
    for shard, keys in edits.items():
        for key, layer in keys.items():
            why = fingerprint_mismatch(patch.fingerprints[layer], read_tensor(shards[shard], key))
            if why is not None:
                raise ValueError(
                    f"{base}: {key} is not the base tensor the patch was made for ({why}): "
                    "another base model, revision or dtype?"
                )


def _harm_tensor(harm, layer: int) -> torch.Tensor:
    """``harm.tensor(layer)``; for a vector read lazily from safetensors, the bytes are read here
    straight into one tensor (:func:`soteria.io.safetensors.read_tensor`), so reading costs one
    tensor of memory (safetensors' reader and a whole-tensor isfinite would take about three)."""
    where = harm.location(layer)
    if where is None:
        return harm.tensor(layer)
    t = read_tensor(*where)
    harm.record_read(layer, t.numel() * t.element_size())
    return t


def _carry_files(base: Path, tmp: Path, shard_names: set[str], skipped: list[str]) -> None:
    """Copy every file of ``base`` except shards, config.json and README.md (written separately);
    weights in other formats go to ``skipped``."""
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        rel_dir = Path(dirpath).relative_to(base)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for fname in sorted(filenames):
            rel = (rel_dir / fname).as_posix()
            if rel in shard_names or rel in ("config.json", "README.md"):
                continue
            if fname.endswith(OTHER_WEIGHTS) or fname.endswith(".safetensors"):
                skipped.append(rel)
                continue
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(dirpath) / fname, dst)  # follows symlinks (Hub cache snapshots)


def _write_records(plan: _Plan, tmp: Path, base_model: str | None, repo_id: str | None) -> None:
    config_json = dict(plan.config_json)
    config_json["soteria"] = plan.record.to_dict()
    (tmp / "config.json").write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_soteria_config(tmp, plan.record)
    if base_model is None:
        base_model = hub_repo_id(config_json.get("_name_or_path"))
    card = model_card(
        plan.record,
        base_model=base_model,
        model_id=repo_id or plan.out.name,
        n_changed=plan.n_changed,
        n_total=plan.n_total,
        how="by streaming the checkpoint (soteria.steer_checkpoint)",
    )
    (tmp / "README.md").write_text(card, encoding="utf-8")
