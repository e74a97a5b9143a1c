"""The records a steered model carries (``soteria_config.json``, the shard metadata key, the model
card), and a patch's card."""

from __future__ import annotations

import os
from pathlib import Path

from ..steer.config import SoteriaConfig
from ..version import __version__

__all__ = [
    "CONFIG_NAME",
    "METADATA_KEY",
    "PATCH_FORMAT",
    "PATCH_NAME",
    "TAGS",
    "model_card",
    "patch_card",
    "write_soteria_config",
]

#: Key of the JSON-encoded :class:`soteria.SoteriaConfig` in each shard's ``__metadata__``.
METADATA_KEY = "soteria_config"
CONFIG_NAME = "soteria_config.json"
#: The file of a :class:`soteria.SoteriaPatch` (its folder's marker, too).
PATCH_NAME = "soteria_patch.safetensors"
#: ``__metadata__["format"]`` of a patch file.
PATCH_FORMAT = "soteria-patch/1"
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


def _describe(config: SoteriaConfig) -> tuple[str, str, str, str]:
    """The card's heads table rows, scale, harm direction and head selection, in words."""
    rows = [f"| {_LANGUAGE_NAMES.get(x, x)} (`{x}`) | {len(config.heads[x])} |" for x in config.languages]
    rows.append(f"| all languages (union) | {len(config.head_union)} |")
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
    return "\n".join(rows), scale, kind, select


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
    rows, scale, kind, select = _describe(config)
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
{rows}

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


def patch_card(
    config: SoteriaConfig,
    *,
    base_model: str | None,
    base_revision: str | None,
    model_id: str,
    n_changed: int,
    n_bytes: int,
    damage: dict | None = None,
) -> str:
    """The ``README.md`` of a :class:`soteria.SoteriaPatch`: ``base_model`` in the YAML header (as
    adapters have it), the heads per language, what it changes and how to apply it."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=base_model or None,
        library_name="soteria",
        tags=[*TAGS, "soteria-patch"],
        language=list(config.languages),
        pipeline_tag="text-generation",
    )
    rows, scale, kind, select = _describe(config)
    base = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "its base model"
    if base_revision:
        base += f" at revision `{base_revision}`"
    versions = "\n".join(f"| {k} | {v} |" for k, v in _versions().items())
    check = "not measured" if damage is None else f"{damage['kl']:.3f} on {damage['prompts']} built-in harmless prompts"
    base_id = base_model or "BASE_MODEL"
    return f"""---
{data.to_yaml()}
---

# {model_id}

A [soteria](https://arxiv.org/abs/2502.11244) patch for {base}: it makes the model refuse harmful
requests more often in {", ".join(_LANGUAGE_NAMES.get(x, x) for x in config.languages)}. It holds the new
values of {len(config.head_union)} attention heads' output-projection slices ({n_changed:,} parameters,
{n_bytes:,} bytes in `{PATCH_NAME}`), and a fingerprint of every base tensor it changes: it applies
to that base model only, and the result is bit-identical to the steering that made it.

| language | heads |
|---|---|
{rows}

- Scale (lambda): {scale}
- Harm direction: {kind}; source: `{config.harm_source or "unrecorded"}`
- Heads: {select}; model type `{config.model_type or "unknown"}`.
- Next-token KL(base || steered) when the patch was written: {check}.

Steering lowers, but does not remove, the chance of harmful output; evaluate the model for your use.

## How to apply

```python
from transformers import AutoModelForCausalLM
from soteria import SoteriaPatch

model = AutoModelForCausalLM.from_pretrained("{base_id}")
SoteriaPatch.from_pretrained("{model_id}").apply(model)   # SoteriaPatcher.revert(model) undoes it
```

or write a steered copy: `soteria apply {model_id} --model {base_id} --out steered/`.

## Versions

| package | version |
|---|---|
{versions}
"""
