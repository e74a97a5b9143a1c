"""Save a model steered in memory: safetensors with the steering record, after the damage check.

:func:`save_steered` runs the model's own ``save_pretrained`` (safetensors) into a temporary
directory; each shard's metadata gains ``soteria_config`` (the :class:`SoteriaConfig` as JSON),
``soteria_config.json`` (sorted keys) and a model card ``README.md`` are added, and the
directory is renamed into place. ``config.json`` carries the record as ``"soteria"``. The
result loads with plain ``AutoModelForCausalLM.from_pretrained``; soteria is not needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import head_sites, unwrap_model
from ..defaults import DEFAULT_MAX_KL
from ..io.atomic import atomic_directory, check_target
from ..io.checkpoint import shard_files
from ..io.hub import hub_repo_id
from ..io.safetensors import add_metadata
from ..models.gguf import dequantized
from ..steer import SoteriaPatcher
from .card import CONFIG_NAME, METADATA_KEY, model_card, write_soteria_config
from .damage import damage_check

__all__ = ["save_steered"]


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
    check_target(out, overwrite, ours=CONFIG_NAME)  # before the KL measurement and the save
    dequantized(inner)  # a GGUF-loaded model holds plain weights; drop its quantization record
    damage = None
    if tokenizer is not None and SoteriaPatcher.has_originals(model):
        damage = damage_check(model, tokenizer, list(config.languages), max_kl=max_kl, force=force)
    meta = {METADATA_KEY: config.to_json(indent=None)}
    with atomic_directory(out, overwrite=overwrite, ours=CONFIG_NAME) as tmp:
        inner.save_pretrained(tmp, max_shard_size=max_shard_size)
        for shard in shard_files(tmp):
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
