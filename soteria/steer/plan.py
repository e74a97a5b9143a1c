"""Checking a steering request and planning it per layer, shared by the in-memory and on-disk edits.

:meth:`soteria.SoteriaPatcher.apply` and :func:`soteria.steer_checkpoint` must check, plan and
cast exactly alike to give the same bytes: :func:`check_plan`, :func:`layer_plan`,
:func:`operand_dtype`. :func:`calibrated_scale` sizes a direction's edit to the weights.
"""

from __future__ import annotations

import inspect
import numbers
import os
import warnings
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, unwrap_model
from ..defaults import DEFAULT_CONTRAST, DEFAULT_HARM, DEFAULT_REFUSAL_TOKENS
from ..harm import HarmVector
from ..harm.data import harmful_languages
from ..harm.finetune import FINETUNE_OPTIONS, check_finetune_options
from ..heads.attribution import METHODS
from ..heads.probes import languages
from ..langs import lang_list
from .config import SoteriaConfig, check_relative, check_scale
from .offload import drop_overlays, editable_weight

__all__ = [
    "DERIVED",
    "calibrated_scale",
    "derive_harm",
    "derived_kind",
    "harm_path",
    "check_config_call",
    "check_find",
    "check_heads",
    "check_plan",
    "check_relative",
    "check_scale",
    "layer_plan",
    "natural_scale",
    "operand_dtype",
    "resolve_harm",
    "scale_of",
    "warn_shared",
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
    if "tasks" not in find_kwargs and find_kwargs.get("source", "probes") == "probes":  # text: checked by the finder
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


def check_config_call(config, langs, heads, scale, relative_scale, top_k, method, find_kwargs, harm_kwargs) -> None:
    """With ``apply(model, config)``: nothing else of the request given, and the same languages."""
    if not isinstance(config, SoteriaConfig):
        raise ValueError(f"config must be a SoteriaConfig, got {type(config).__name__}")
    given = [
        name
        for name, value, default in (
            ("heads", heads, None),
            ("scale", scale, "auto"),
            ("relative_scale", relative_scale, None),
            ("top_k", top_k, None),
            ("method", method, None),
            ("find_kwargs", find_kwargs, None),
            ("harm_kwargs", harm_kwargs, None),
        )
        if value != default
    ]
    if given:
        raise ValueError(f"the config holds the request; do not pass {', '.join(given)} as well")
    if langs is not None and lang_list(langs) != list(config.languages):
        raise ValueError(f"langs {langs!r} differ from the config's languages {config.languages}")


#: ``harm_source`` words for a direction derived from the model itself once the heads are known:
#: :meth:`HarmVector.from_gradients` and :meth:`HarmVector.from_finetune` (``""``: the default,
#: :data:`soteria.defaults.DEFAULT_HARM`). A record's source (``"gradients:..."``,
#: ``"finetune:..."``) names it the same way and is derived again.
DERIVED = ("gradients", "finetune")


def derived_kind(source: str) -> str | None:
    """The derived direction ``source`` names (the default for ``""``), or None for a path or Hub id."""
    if not source:
        return DEFAULT_HARM
    kind, sep, _ = source.partition(":")
    return kind if kind in DERIVED and (sep or source == kind) else None


def harm_path(source: str) -> str:
    """The path or Hub id to read a harm vector from, given a request's or a record's ``harm_source``
    (:attr:`HarmVector.source`: ``"checkpoint:PATH"``, ``"file:PATH"``, or a plain path or Hub id)."""
    kind, _, rest = source.partition(":")
    if kind in ("checkpoint", "file") and rest:
        return rest
    if kind == "models" or derived_kind(source):
        raise ValueError(f"the harm direction {source!r} cannot be read from a file; give it (harm=, --harm)")
    return source


def resolve_harm(model, request: SoteriaConfig, harm, tokenizer, harm_kwargs: dict) -> HarmVector | str:
    """The harm vector to use: ``harm`` itself, or read from a path; or the kind of direction to
    derive once the heads are known (:data:`DERIVED`), its options checked now."""
    if isinstance(harm, HarmVector):
        return harm
    if harm is not None and not isinstance(harm, (str, os.PathLike)):
        raise ValueError(
            f"harm must be a HarmVector, a path or Hub id, 'finetune', 'gradients' or None; got {type(harm).__name__}"
        )
    source = os.fspath(harm) if harm is not None else request.harm_source
    kind = derived_kind(source)
    if kind is None:
        return HarmVector.from_pretrained(harm_path(source), base=model, **harm_kwargs)
    if tokenizer is None:
        given = "None" if harm is None else repr(source)
        raise ValueError(f"harm={given} derives the {kind} harm direction from the model itself and needs tokenizer=")
    derive = HarmVector.from_finetune if kind == "finetune" else HarmVector.from_gradients
    allowed = set(inspect.signature(derive).parameters) - {"model", "tokenizer", "heads", "progress"}
    unknown = sorted(set(harm_kwargs) - allowed)
    if unknown:
        raise ValueError(f"harm_options {unknown} are not options of the {kind} direction (it takes {sorted(allowed)})")
    if kind == "finetune":
        check_finetune_options(**{k: v for k, v in harm_kwargs.items() if k in FINETUNE_OPTIONS})
    missing = [x for x in request.languages if x not in harmful_languages()]
    if missing and "data" not in harm_kwargs and "langs" not in harm_kwargs:
        raise ValueError(
            f"no built-in refusal data for {', '.join(missing)} (built in: {', '.join(harmful_languages())}); "
            "give harm= (a harmful fine-tune or a HarmVector) or your own refusal pairs "
            "(harm_kwargs={'data': ...})"
        )
    return kind


def derive_harm(model, tokenizer, kind: str, langs: list[str], heads, harm_kwargs: dict, progress: bool) -> HarmVector:
    """The ``kind`` direction (:data:`DERIVED`) for ``heads`` ``{lang: [(layer, head), ...]}``, with
    soteria's defaults (:mod:`soteria.defaults`) where ``harm_kwargs`` says nothing."""
    kw = dict(harm_kwargs)
    if "data" not in kw and "langs" not in kw:
        kw["langs"] = langs
    if kind == "finetune":
        return HarmVector.from_finetune(model, tokenizer, heads, progress=progress, **kw)
    if kw.get("data") is None:
        kw.setdefault("contrast", DEFAULT_CONTRAST)
    kw.setdefault("refusal_tokens", DEFAULT_REFUSAL_TOKENS)
    return HarmVector.from_gradients(model, tokenizer, progress=progress, **kw)


def natural_scale(harm: HarmVector) -> bool:
    """Whether ``harm`` is steered at 1.0 by default (a fine-tune's weights or difference), not
    calibrated like a direction whose size means nothing (gradients, a saved direction)."""
    return harm.kind == "harmful" or harm.source.startswith("finetune:")


def warn_shared(config: SoteriaConfig) -> None:
    """Warn once when a head is shared by languages with different scales (it takes the largest)."""
    if not isinstance(config.scale, dict):
        return
    owners: dict[tuple[int, int], set[float]] = {}
    for lang in config.languages:
        for p in config.heads[lang]:
            owners.setdefault(p, set()).add(config.scale[lang])
    shared = sorted(p for p, values in owners.items() if len(values) > 1)
    if shared:
        warnings.warn(
            f"{len(shared)} head(s) are selected for languages with different scales, e.g. {shared[0]}; "
            "each is steered once, with the largest of those scales",
            stacklevel=4,
        )
