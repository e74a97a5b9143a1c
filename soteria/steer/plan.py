"""Checking a steering request and planning it per layer, shared by the in-memory and on-disk edits.

:meth:`soteria.SoteriaPatcher.apply` and :func:`soteria.steer_checkpoint` must check, plan and
cast exactly alike to give the same bytes: :func:`check_plan`, :func:`layer_plan`,
:func:`operand_dtype`. :func:`calibrated_scale` sizes a direction's edit to the weights.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, unwrap_model
from ..harm import HarmVector
from ..heads.attribution import METHODS
from ..heads.probes import languages
from ..langs import lang_list
from .config import SoteriaConfig
from .offload import drop_overlays, editable_weight

__all__ = [
    "calibrated_scale",
    "check_find",
    "check_heads",
    "check_plan",
    "check_relative",
    "check_scale",
    "layer_plan",
    "operand_dtype",
    "scale_of",
]


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def operand_dtype(harm: HarmVector, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``harm``'s tensor is cast to before the kernel edits ``weight`` (shared with
    :mod:`soteria.export.streaming`): the harmful weights in the weight's dtype; a tau direction in fp32
    for half-precision weights (the update kernel takes it as is and rounds the weight once)."""
    if harm.kind == "tau" and weight.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight.dtype


def check_plan(
    langs: Any, heads: Any, scale: Any, n_layers: int, n_heads: int
) -> tuple[list[str], dict[str, list[tuple[int, int]]] | None, float | dict[str, float]]:
    """Check the steering request for a model of ``n_layers`` x ``n_heads`` heads (shared with
    :mod:`soteria.export.streaming`); ValueError names the first problem, checked in the order langs,
    heads, scale.

    Args:
        langs: a language code or a list of them (non-empty, no repeats).
        heads: None (to be found), a list of ``(layer, head)`` pairs for every language, or
            ``{lang: pairs}`` with exactly the languages of ``langs``.
        scale: one finite float or ``{lang: float}`` with exactly the languages of ``langs``.

    Returns ``(langs as a list, {lang: pairs deduplicated in order} or None, scale as float or
    {lang: float} in the order of langs)``.
    """
    langs = lang_list(langs)
    per_lang = None if heads is None else check_heads(heads, langs, n_layers, n_heads)
    return langs, per_lang, check_scale(scale, langs)


def layer_plan(config: SoteriaConfig) -> dict[int, tuple[list[int], list[float]]]:
    """``{layer: (heads, scales)}`` of ``config.head_scales()`` (each head once, with its largest
    scale), in the order the kernels take them (shared with :mod:`soteria.export.streaming`)."""
    plan: dict[int, tuple[list[int], list[float]]] = {}
    for (layer, head), s in config.head_scales().items():
        plan.setdefault(layer, ([], []))
        plan[layer][0].append(head)
        plan[layer][1].append(s)
    return plan


def check_scale(scale: Any, langs: list[str]) -> float | dict[str, float] | str:
    """``scale`` checked: ``"auto"``, or finite floats >= 0 (a negative scale would add the harm direction)."""
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale must be a finite float, {{lang: float}} or 'auto', got {scale!r}")
        return scale

    def one(v, what):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{what} must be a finite float, got {v!r}")
        if v < 0:
            raise ValueError(f"{what} is {v}: a negative scale adds the harm direction instead of removing it")
        return float(v)

    if isinstance(scale, dict):
        missing = [x for x in langs if x not in scale]
        extra = [x for x in scale if x not in langs]
        if missing or extra:
            raise ValueError(f"scale must give one value per language: missing {missing}, unexpected {extra}")
        return {lang: one(scale[lang], f"scale[{lang!r}]") for lang in langs}
    return one(scale, "scale")


def check_relative(relative: Any, langs: list[str]) -> float | dict[str, float]:
    """A positive relative scale, one or per language; ValueError otherwise."""
    values = relative.values() if isinstance(relative, dict) else [relative]
    if any(isinstance(v, numbers.Real) and not isinstance(v, bool) and v <= 0 for v in values):
        raise ValueError(f"relative_scale must be a positive float or {{lang: positive float}}, got {relative!r}")
    checked = check_scale(relative, langs)
    values = checked.values() if isinstance(checked, dict) else [checked]
    if isinstance(checked, str) or not all(v > 0 for v in values):
        raise ValueError(f"relative_scale must be a positive float or {{lang: positive float}}, got {relative!r}")
    return checked


def scale_of(value: float | dict[str, float], lang: str) -> float:
    return value[lang] if isinstance(value, dict) else value


def calibrated_scale(model: nn.Module, harm: HarmVector, heads: list[tuple[int, int]], relative: float) -> float:
    """The scale with ``||scale * tau_S||_F = relative * ||W_S||_F`` over the slices of ``heads``
    (``tau = W_harmful - W`` for a fine-tune); offloaded layers are read where their values live.
    ValueError when the direction is zero there."""
    inner, sites = unwrap_model(model), head_sites(model)
    w2 = t2 = 0.0
    with torch.no_grad():
        for layer in sorted({layer for layer, _ in heads}):
            site, reads = sites[layer], []
            try:
                weight = editable_weight(inner, site, reads).detach()
                tau = harm.tau(layer, weight).to(device=weight.device, dtype=torch.float32)
                for h in (h for lyr, h in heads if lyr == layer):
                    w2 += float(site.head_slice(weight, h).to(torch.float32).pow(2).sum())
                    t2 += float(site.head_slice(tau, h).pow(2).sum())
            finally:
                drop_overlays(reads)  # a copy read from disk is not kept
    if t2 == 0.0:
        raise ValueError("the harm direction is zero on the selected heads; scale='auto' cannot calibrate it")
    return relative * (w2 / t2) ** 0.5


def check_find(langs, method, top_k, total: int, tokenizer, find_kwargs) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tokenizer is None:
        raise ValueError("finding heads (heads=None) needs tokenizer=; or pass heads= explicitly")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real):
        raise ValueError(f"top_k must be an int in [1, {total}] or a fraction in (0, 1], got {top_k!r}")
    if _is_int(top_k):
        if not 1 <= top_k <= total:
            raise ValueError(f"top_k = {top_k} is out of range: the model has {total} heads")
    elif not 0.0 < float(top_k) <= 1.0:
        raise ValueError(f"a fractional top_k must be in (0, 1], got {top_k}")
    if "tasks" not in find_kwargs:
        known = languages()
        own = find_kwargs.get("tasks_by_lang") or {}  # find_heads_multi: per-language data
        unknown = [x for x in langs if x not in known and x not in own]
        if unknown:
            raise ValueError(
                f"no built-in probe tasks for {unknown}; built-in languages: {', '.join(known)}. "
                "Pass heads= explicitly or find_kwargs={'tasks': ...} (or {'tasks_by_lang': {lang: ...}}) "
                "with your own probe data"
            )


def _check_pairs(pairs: Any, what: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise ValueError(f"{what} must be a list of (layer, head) pairs, got {pairs!r}")
    out: list[tuple[int, int]] = []
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) for v in p)):
            raise ValueError(f"{what} must hold (layer, head) pairs of ints, got {p!r}")
        layer, head = int(p[0]), int(p[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"{what}: head ({layer}, {head}) is out of range: the model has {n_layers} layers x {n_heads} heads"
            )
        if (layer, head) not in out:
            out.append((layer, head))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def check_heads(heads: Any, langs: list[str], n_layers: int, n_heads: int) -> dict[str, list[tuple[int, int]]]:
    if isinstance(heads, dict):
        missing = [x for x in langs if x not in heads]
        extra = [x for x in heads if x not in langs]
        if missing or extra:
            raise ValueError(f"heads must give one list per language: missing {missing}, unexpected {extra}")
        return {lang: _check_pairs(heads[lang], f"heads[{lang!r}]", n_layers, n_heads) for lang in langs}
    pairs = _check_pairs(heads, "heads", n_layers, n_heads)
    return {lang: list(pairs) for lang in langs}
