"""The built-in harmful requests paired with refusals, and harmless requests, of the harm directions.

``soteria/data/harmful/<lang>.jsonl``: for each of the twelve Soteria languages, forty short,
non-graphic harmful requests (break into a house, phishing, stalking, hate speech, ...) each
with a natural refusal in the same language whose first sentence is the refusal itself
("No puedo ayudarte con eso."), mostly followed by a short reason. One JSON object a line:
``{"prompt": ..., "refusal": ..., "lang": ...}``. The same forty requests in every language.

``soteria/data/harmless/<lang>.jsonl``: forty-two harmless requests per language (``{"prompt",
"lang"}``), the same in every language, many of them worded like risky ones ("kill a Python
process", "get rid of mice"): the contrast set of the gradient direction, the retain set of the
fine-tune direction. Neither set shares a prompt with the evaluation set (``soteria/data/eval``).
"""

from __future__ import annotations

import functools
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from ..io.jsonl import json_lines
from ..langs import shipped_codes

__all__ = ["first_sentence", "harmful_languages", "load_harmful", "load_harmless", "read_harmful"]

_FIELDS = ("prompt", "refusal")

#: Where a sentence ends: ``. ! ? ; ؟`` before a space or the end, a CJK or Indic full stop, or
#: a space between Thai letters (Thai writes no full stop; a space ends the phrase).
_SENTENCE_END = re.compile(r"[.!?;؟](?=\s|$)|[。！？।॥]|(?<=[\u0e00-\u0e7f])\s+(?=[\u0e00-\u0e7f])")


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, its end mark kept: a refusal's decision ("No puedo ayudarte
    con eso."), wherever the language puts its negation (last, in Hindi or Tamil)."""
    m = _SENTENCE_END.search(text)
    if m is None:
        return text
    return text[: m.start() if m.group().isspace() else m.end()]


def _data_dir():
    return resources.files("soteria").joinpath("data").joinpath("harmful")


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    return shipped_codes(_data_dir(), ".jsonl")


def harmful_languages() -> list[str]:
    """Language codes with built-in harmful requests, in the paper's order."""
    return list(_shipped())


def _parse(lines, where: str, lang: str | None) -> list[dict[str, str]]:
    rows = [_check_row(row, f"{where}:{i}", lang) for i, row in json_lines(lines, where)]
    if not rows:
        raise ValueError(f"{where}: no rows")
    return rows


def _check_row(row: Any, where: str, lang: str | None) -> dict[str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' and 'refusal', got {type(row).__name__}")
    for k in _FIELDS:
        if not isinstance(row.get(k), str) or not row[k].strip():
            raise ValueError(f"{where}: {k!r} must be a non-empty string, got {row.get(k)!r}")
    out = {"prompt": row["prompt"], "refusal": row["refusal"], "lang": str(row.get("lang", lang or ""))}
    if lang is not None and out["lang"] != lang:
        raise ValueError(f"{where}: lang is {out['lang']!r}, expected {lang!r}")
    return out


@functools.cache
def _read_lang(lang: str) -> tuple[tuple[tuple[str, str], ...], ...]:
    text = _data_dir().joinpath(f"{lang}.jsonl").read_text(encoding="utf-8")
    rows = _parse(text.splitlines(), f"soteria/data/harmful/{lang}.jsonl", lang)
    return tuple(tuple(r.items()) for r in rows)


def load_harmful(langs: str | list[str] | None = None) -> list[dict[str, str]]:
    """Built-in ``{"prompt", "refusal", "lang"}`` rows for ``langs`` (all when None), in that order."""
    shipped = _shipped()
    if langs is None:
        langs = list(shipped)
    elif isinstance(langs, str):
        langs = [langs]
    out = []
    for lang in langs:
        if lang not in shipped:
            raise ValueError(
                f"no built-in harmful requests for {lang!r}; built-in: {', '.join(shipped)}. "
                "Pass your own data=[{'prompt': ..., 'refusal': ...}, ...] or a JSONL path."
            )
        out.extend(dict(r) for r in _read_lang(lang))
    return out


@functools.cache
def _read_harmless(lang: str) -> tuple[str, ...]:
    where = f"soteria/data/harmless/{lang}.jsonl"
    path = resources.files("soteria").joinpath("data").joinpath("harmless").joinpath(f"{lang}.jsonl")
    if not path.is_file():
        raise ValueError(f"no built-in harmless requests for {lang!r}; pass your own contrast=[...] prompts")
    out = []
    for i, row in json_lines(path.read_text(encoding="utf-8").splitlines(), where):
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"{where}:{i}: expected {{'prompt': non-empty string}}")
        out.append(row["prompt"])
    return tuple(out)


def load_harmless(langs: str | list[str] | None = None) -> list[dict[str, str]]:
    """Built-in harmless ``{"prompt", "lang"}`` requests (``soteria/data/harmless/<lang>.jsonl``: forty-two
    per language, everyday ones and ones that merely sound sensitive; disjoint from the evaluation
    set): the contrast set of :meth:`HarmVector.from_gradients`, the retain set of the fine-tune."""
    langs = list(_shipped()) if langs is None else [langs] if isinstance(langs, str) else list(langs)
    return [{"prompt": p, "lang": lang} for lang in langs for p in _read_harmless(lang)]


def read_harmful(data: Any) -> list[dict[str, str]]:
    """User data as rows: a JSONL path, or a list of ``{"prompt", "refusal"}`` dicts or
    ``(prompt, refusal)`` pairs. ValueError naming the bad row."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise ValueError(f"harmful data file not found: {path}")
        return _parse(path.read_text(encoding="utf-8").splitlines(), str(path), None)
    try:
        items = list(data)
    except TypeError:
        raise ValueError(f"data must be a JSONL path or a list of rows, got {type(data).__name__}") from None
    if not items:
        raise ValueError("data is empty")
    rows = []
    for i, row in enumerate(items):
        if isinstance(row, (list, tuple)) and len(row) == 2:
            row = {"prompt": row[0], "refusal": row[1]}
        rows.append(_check_row(row, f"data[{i}]", None))
    return rows
