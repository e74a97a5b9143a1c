"""The write guard: what a steering did to harmless prompts, measured before it is written.

A steering with too large a scale or too many heads can break a model outright (every answer
``"....."``) while every file is still well-formed. :func:`damage_check` measures the mean
next-token KL(base || steered) on a handful of built-in harmless prompts in the steered
languages (chat-formatted when the tokenizer has a template), on the one model in memory
(:func:`soteria.evaluation.steering_kl`); :func:`soteria.save_steered` and ``soteria steer``
refuse to write above ``max_kl`` (default :data:`soteria.defaults.DEFAULT_MAX_KL`) unless forced.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

from ..defaults import DEFAULT_MAX_KL
from ..evaluation.generation import format_inputs
from ..evaluation.prompt_sets import EvalPrompt, eval_languages, harmless_prompts
from ..evaluation.utility import steering_kl

__all__ = ["SteeringDamageError", "damage_check", "harmless_kl"]


class SteeringDamageError(ValueError):
    """The steered model's harmless-prompt KL is above the bound; nothing was written."""


def harmless_kl(model: nn.Module, tokenizer, lang: str, prompts: list[str]) -> float:
    """KL(base || steered) of a model steered in this process on ``prompts``, formatted as they
    are answered (the chat template when the tokenizer has one)."""
    texts, templated = format_inputs(tokenizer, [EvalPrompt(p, lang) for p in prompts])
    return steering_kl(model, tokenizer, texts, add_special_tokens=not templated)["mean"]


def damage_check(
    model: nn.Module,
    tokenizer,
    langs: list[str],
    *,
    max_kl: float | None = DEFAULT_MAX_KL,
    force: bool = False,
    n_prompts: int = 8,
    verbose: bool = True,
) -> dict[str, Any]:
    """``{"kl": mean, "per_lang": {lang: kl}, "max_kl", "prompts", "forced"}`` for a model steered
    by :meth:`soteria.SoteriaPatcher.apply` in this process; prints one line when ``verbose``.

    Raises :class:`SteeringDamageError` when ``kl > max_kl`` and not ``force`` (``max_kl=None``:
    measure only). Languages without built-in harmless prompts are measured on English ones.
    """
    used = [x for x in langs if x in eval_languages()] or ["en"]
    per_lang = {lang: harmless_kl(model, tokenizer, lang, harmless_prompts(lang)[:n_prompts]) for lang in used}
    kl = sum(per_lang.values()) / len(per_lang)
    n = sum(len(harmless_prompts(lang)[:n_prompts]) for lang in used)
    record = {"kl": kl, "per_lang": per_lang, "max_kl": max_kl, "prompts": n, "forced": False}
    if verbose:
        detail = ", ".join(f"{k} {v:.3f}" for k, v in per_lang.items())
        bound = f"; bound {max_kl:g}" if max_kl is not None else ""
        print(f"soteria: harmless-prompt KL(base || steered) = {kl:.3f} ({detail}{bound})", file=sys.stderr)
    if max_kl is not None and kl > max_kl:
        if not force:
            raise SteeringDamageError(
                f"the steered model's KL on {n} harmless prompts ({', '.join(used)}) is {kl:.2f}, above "
                f"the bound {max_kl:g}: it is likely broken (scale too large, or too many heads); lower the scale "
                "or the head count, or force the write (force=True, --force)"
            )
        record["forced"] = True
    return record
