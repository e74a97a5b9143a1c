"""Ship a steered model: save it, steer a checkpoint on disk, push it to the Hub.

- :func:`save_steered`: the model's own ``save_pretrained`` (safetensors) into a temporary
  directory, then each shard's metadata gains ``soteria_config`` (the :class:`SoteriaConfig`
  as JSON), ``soteria_config.json`` (sorted keys) and a model card ``README.md`` are added, and
  the directory is renamed into place. ``config.json`` carries the record as ``"soteria"``.
  The result loads with plain ``AutoModelForCausalLM.from_pretrained``; soteria is not needed.
- :func:`steer_checkpoint` (from :mod:`soteria.streaming`): the same output from a checkpoint
  on disk, one output projection at a time.
- :func:`push_to_hub`: ``create_repo(exist_ok=True)`` + ``upload_folder`` through
  huggingface_hub, with Hub failures reported in plain words (:class:`SoteriaHubError`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from .defaults import DEFAULT_MAX_KL
from .io.checkpoint import INDEX_NAME, SINGLE_NAME
from .io.hub import hub_repo_id, plain_hub_error
from .io.safetensors import add_metadata
from .steer.config import SoteriaConfig
from .streaming import METADATA_KEY, steer_checkpoint
from .version import __version__

__all__ = [
    "CONFIG_NAME",
    "METADATA_KEY",
    "SoteriaHubError",
    "model_card",
    "push_to_hub",
    "save_steered",
    "steer_checkpoint",
    "write_soteria_config",
]

#: The edit record beside the weights (``SoteriaConfig.to_json``, sorted keys).
CONFIG_NAME = "soteria_config.json"
TAGS = ("soteria", "safety", "multilingual")
_LANGUAGE_NAMES = {
    "en": "English", "zh": "Chinese", "fr": "French", "de": "German", "es": "Spanish",
    "ar": "Arabic", "bg": "Bulgarian", "th": "Thai", "hi": "Hindi",
    "bn": "Bengali", "ta": "Tamil", "te": "Telugu",
}  # fmt: skip


# --------------------------------------------------------------------------- records


def write_soteria_config(folder: str | os.PathLike, config: SoteriaConfig) -> Path:
    """Write ``folder/soteria_config.json`` (sorted keys, indented, trailing newline)."""
    path = Path(folder) / CONFIG_NAME
    path.write_text(config.to_json(indent=2) + "\n", encoding="utf-8")
    return path


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"soteria": __version__}
    for pkg in ("transformers", "torch", "safetensors", "huggingface_hub", "triton"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def model_card(
    config: SoteriaConfig,
    *,
    base_model: str | None,
    model_id: str,
    n_changed: int,
    n_total: int,
    how: str = "from a model in memory (soteria.save_steered)",
    damage: dict | None = None,
) -> str:
    """The ``README.md`` of a steered model: YAML header (``base_model``, ``library_name``,
    ``tags``, ``language``) and a body with the method, heads per language, the fraction of
    parameters changed, scale, harm source, how to load it and the package versions."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model or None,
        library_name="transformers",
        tags=list(TAGS),
        language=list(config.languages),
        pipeline_tag="text-generation",
    )
    union = config.head_union
    rows = [f"| {_LANGUAGE_NAMES.get(x, x)} (`{x}`) | {len(config.heads[x])} |" for x in config.languages]
    rows.append(f"| all languages (union) | {len(union)} |")
    if isinstance(config.scale, dict):
        scale = ", ".join(f"{k}: {v:g}" for k, v in config.scale.items()) + " (a shared head takes the largest)"
    else:
        scale = f"{config.scale:g}"
    kind = (
        "the harmful fine-tune's weights, `tau = W_harmful - W_base`"
        if config.harm_kind == "harmful"
        else "an explicit direction `tau`"
    )
    select = {
        "atp": "attribution patching (soteria.find_heads, method='atp')",
        "exact": "exact activation patching (soteria.find_heads, method='exact')",
        "explicit": "given explicitly",
    }[config.method]
    if config.top_k is not None:
        select += f", top {config.top_k:g} per language"
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "A causal language model"
    versions = "\n".join(f"| {k} | {v} |" for k, v in _versions().items())
    pct = 100.0 * n_changed / n_total if n_total else 0.0
    if damage is None:
        check = "not measured"
    else:
        check = f"{damage['kl']:.3f} on {damage['prompts']} built-in harmless prompts"
        if damage.get("forced"):
            check += f" (**above the bound {damage['max_kl']:g}; written with force: the model may be broken**)"
    return f"""---
{data.to_yaml()}
---

# {model_id}

{base} steered for safety in {", ".join(_LANGUAGE_NAMES.get(x, x) for x in config.languages)} with
[soteria](https://arxiv.org/abs/2502.11244) (language-specific functional parameter steering).

## Method

Soteria finds, for each language, the attention heads that matter most for that language's
in-context tasks, and subtracts a harm direction (the weight change that fine-tuning on harmful
data makes, or a first-order stand-in for it) from those heads' slices of the attention output
projections, scaled by lambda.
Every other parameter is bit-identical to the base model.

| language | heads |
|---|---|
{chr(10).join(rows)}

- Parameters changed: {n_changed:,} of {n_total:,} ({pct:.4f}%), in {len(union)} heads' output-projection slices.
- Scale (lambda): {scale}
- Harm direction: {kind}; source: `{config.harm_source or "unrecorded"}`
- Heads: {select}
- Written {how}; model type `{config.model_type or "unknown"}`.
- Next-token KL(base || steered) at save time: {check}.

Steering lowers, but does not remove, the chance of harmful output; evaluate the model for your use.

## How to load

No soteria needed:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{model_id}")
tokenizer = AutoTokenizer.from_pretrained("{model_id}")
```

The edit record is in `soteria_config.json`, in `config.json` (`"soteria"`) and in each
safetensors file's metadata (`{METADATA_KEY}`).

## Versions

| package | version |
|---|---|
{versions}
"""


# --------------------------------------------------------------------------- save


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SINGLE_NAME
    if single.is_file():
        return [single]
    raise RuntimeError(f"save_pretrained wrote no safetensors weights into {folder}: {sorted(os.listdir(folder))}")


def save_steered(
    model: nn.Module,
    out_dir: str | os.PathLike,
    *,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
    overwrite: bool = False,
    base_model: str | None = None,
    repo_id: str | None = None,
    max_kl: float | None = DEFAULT_MAX_KL,
    force: bool = False,
) -> Path:
    """Save a model steered by :meth:`soteria.SoteriaPatcher.apply` to ``out_dir``; return its path.

    Args:
        model: the steered model (a PEFT wrapper must be merged first: ``merge_and_unload()``).
        tokenizer: saved beside it when given.
        max_shard_size: passed to ``save_pretrained`` (shards of at most this size).
        overwrite: replace an existing ``out_dir`` (kept as it was if saving fails).
        base_model: Hub id of the base model for the card (default: ``config.name_or_path`` if
            it is a Hub id). repo_id: id used in the card's loading snippet (default: the folder name).
        max_kl, force: the write guard (:func:`soteria.damage.damage_check`). With ``tokenizer``
            and a model steered in this process, the harmless-prompt KL is measured first and
            printed; above ``max_kl`` nothing is written (:class:`SteeringDamageError`) unless
            ``force``. ``max_kl=None`` measures without a bound. The card records the value.

    Writes ``config.json`` (with ``"soteria"``), safetensors weights whose metadata holds
    ``soteria_config``, ``soteria_config.json``, ``README.md``, the generation config and the
    tokenizer files, all into a temporary directory renamed to ``out_dir`` at the end.
    """
    from .arch import head_sites, unwrap_model
    from .damage import damage_check
    from .io.atomic import atomic_directory, check_target
    from .models.gguf import dequantized
    from .steer import SoteriaPatcher

    if not isinstance(model, nn.Module) or not callable(getattr(model, "save_pretrained", None)):
        raise ValueError(f"save_steered needs a transformers model, got {type(model).__name__}")
    inner = unwrap_model(model)
    if any(type(m).__module__.startswith("peft.") for m in inner.modules()):
        raise ValueError(
            "the model has PEFT adapter layers: merge them first (model = model.merge_and_unload()), "
            "so that the saved checkpoint is a plain transformers model"
        )
    config = SoteriaPatcher.config(model)
    if config is None:
        raise ValueError("the model is not steered: call soteria.SoteriaPatcher.apply(model, ...) first")
    sites = head_sites(inner)
    # One head's slice of an output projection: d_model x D, in either weight layout.
    n_changed = sum(sites[layer].weight.numel() // sites[layer].num_heads for layer, _ in config.head_union)
    n_total = sum(p.numel() for p in inner.parameters())
    if base_model is None:
        base_model = hub_repo_id(getattr(inner.config, "name_or_path", None))
    out = Path(os.path.abspath(out_dir))
    check_target(out, overwrite)  # before the KL measurement and the save
    dequantized(inner)  # a GGUF-loaded model holds plain weights; drop its quantization record
    damage = None
    if tokenizer is not None and SoteriaPatcher.has_originals(model):
        damage = damage_check(model, tokenizer, list(config.languages), max_kl=max_kl, force=force)
    meta = {METADATA_KEY: config.to_json(indent=None)}
    with atomic_directory(out, overwrite=overwrite) as tmp:
        inner.save_pretrained(tmp, max_shard_size=max_shard_size)
        for shard in _shard_files(tmp):
            add_metadata(shard, meta)
        saved = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        if saved.get("soteria") != config.to_dict():  # apply sets config.soteria; restore it if it was dropped
            saved["soteria"] = config.to_dict()
            (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_soteria_config(tmp, config)
        card = model_card(
            config,
            base_model=base_model,
            model_id=repo_id or out.name,
            n_changed=n_changed,
            n_total=n_total,
            damage=damage,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


# --------------------------------------------------------------------------- push


class SoteriaHubError(RuntimeError):
    """A Hub operation failed; the message says why in plain words (the original is ``__cause__``)."""


def _check_folder(folder: Path) -> SoteriaConfig:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    missing = [n for n in ("config.json", CONFIG_NAME) if not (folder / n).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not a soteria output (missing {', '.join(missing)}); "
            "write it with soteria.save_steered or soteria.steer_checkpoint"
        )
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name)]
    if leftovers:
        raise ValueError(f"{folder} holds unfinished temporary files {leftovers}; rewrite the folder")
    try:
        shards = _shard_files(folder)
    except RuntimeError:
        raise ValueError(f"{folder} has no safetensors weights ({SINGLE_NAME} or {INDEX_NAME})") from None
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise ValueError(f"{folder}: shards listed in the index are missing: {absent}")
    return SoteriaConfig.from_json((folder / CONFIG_NAME).read_text(encoding="utf-8"))


def push_to_hub(
    out_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str | None = None,
):
    """Upload a folder written by :func:`save_steered` or :func:`steer_checkpoint` to the Hub.

    Creates ``repo_id`` if needed (``private`` by default; an existing repo keeps its
    visibility), then uploads the folder in one commit. Returns huggingface_hub's
    ``CommitInfo`` (``.commit_url``). Checks the folder first (config, weights,
    ``soteria_config.json``); a Hub failure raises :class:`SoteriaHubError` saying what went wrong.
    """
    from huggingface_hub import HfApi

    folder = Path(out_dir)
    config = _check_folder(folder)
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty str like 'your-name/model-soteria', got {repo_id!r}")
    if commit_message is None:
        commit_message = f"Upload soteria-steered model ({', '.join(config.languages)})"
    api = HfApi()
    try:
        url = api.create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    except Exception as e:
        raise SoteriaHubError(plain_hub_error(e, f"create the repository {repo_id!r}", repo_id)) from e
    target = getattr(url, "repo_id", None) or repo_id
    try:
        return api.upload_folder(
            repo_id=target,
            folder_path=folder,
            commit_message=commit_message,
            token=token,
            repo_type="model",
        )
    except Exception as e:
        raise SoteriaHubError(plain_hub_error(e, f"upload {folder} to {target!r}", target)) from e
