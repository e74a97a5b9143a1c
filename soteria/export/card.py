"""The records a steered model carries: ``soteria_config.json``, the shard metadata key, the model card."""

from __future__ import annotations

import os
from pathlib import Path

from ..steer.config import SoteriaConfig
from ..version import __version__

__all__ = ["CONFIG_NAME", "METADATA_KEY", "TAGS", "model_card", "write_soteria_config"]

#: Key of the JSON-encoded :class:`soteria.SoteriaConfig` in each shard's ``__metadata__``.
METADATA_KEY = "soteria_config"
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
