"""Language codes: their form, the paper's order of its twelve languages, one check for every caller."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

__all__ = ["LANG_CODE", "PAPER_ORDER", "in_paper_order", "lang_list", "shipped_codes"]

#: The twelve languages of the paper, in its order (high, mid, low resource).
PAPER_ORDER: tuple[str, ...] = ("en", "zh", "fr", "de", "es", "ar", "bg", "th", "hi", "bn", "ta", "te")
#: A language code: ISO 639 (two or three lowercase letters), optionally with subtags ("zh-hans", "pt_br").
LANG_CODE = re.compile(r"[a-z]{2,3}(?:[-_][a-z0-9]{2,8})*")


def in_paper_order(codes: Iterable[str]) -> tuple[str, ...]:
    """``codes`` with the paper's twelve first, in its order, then the rest sorted."""
    codes = set(codes)
    known = [c for c in PAPER_ORDER if c in codes]
    return tuple(known + sorted(codes - set(known)))


def shipped_codes(folder: Any, suffix: str) -> tuple[str, ...]:
    """Language codes of the ``<code><suffix>`` files in a data folder (a path or an
    ``importlib.resources`` traversable), in the paper's order; () when the folder is missing."""
    if not folder.is_dir():
        return ()
    names = (p.name for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file())
    return in_paper_order(name[: -len(suffix)] for name in names)


def lang_list(langs: Any) -> list[str]:
    """``langs`` (one code or a sequence of codes) as a non-empty list of distinct codes; ValueError otherwise."""
    if isinstance(langs, str):
        langs = [langs]
    try:
        out = list(langs)
    except TypeError:
        raise ValueError(f"langs must be a language code or a list of them, got {type(langs).__name__}") from None
    if not out or not all(isinstance(x, str) and x.strip() for x in out):
        raise ValueError(f"langs must be a non-empty list of language codes, got {langs!r}")
    for x in out:
        if not LANG_CODE.fullmatch(x):
            if re.search(r"[\s,;]", x.strip()):
                raise ValueError(f"{x!r} looks like several language codes; pass them as a list, e.g. ['hi', 'bn']")
            if LANG_CODE.fullmatch(x.lower()):
                raise ValueError(f"language codes are lowercase: {x.lower()!r}, not {x!r}")
            raise ValueError(f"{x!r} is not a language code (two or three lowercase letters, as in ISO 639: 'hi')")
    repeated = sorted({x for x in out if out.count(x) > 1})
    if repeated:
        raise ValueError(f"langs repeat: {', '.join(repeated)}")
    return out
