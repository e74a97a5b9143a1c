"""Probe tasks: the built-in per-language data and the user's own ``{"input", "output"}`` pairs.

Built-in data is one JSON file per language, ``soteria/data/probes/<lang>.json``::

    {"language": "hi", "name": "Hindi", "native_name": "हिन्दी",
     "tasks": {"antonym": {"description": "...", "pairs": [{"input": "...", "output": "..."}]}, ...}}

It is read with :mod:`importlib.resources` (works from a wheel or a zip) and cached; every
accessor hands out fresh lists, so callers may mutate what they get.

Users bring their own tasks (also for languages we do not ship) through :func:`load_pairs`
(JSON, JSONL, CSV, a ``datasets.Dataset``/``DatasetDict`` or an in-memory list) and
``find_heads(..., tasks={"my_task": "path.jsonl"})``, which calls :func:`resolve_tasks`.
"""

from __future__ import annotations

import csv
import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from ..langs import PAPER_ORDER, shipped_codes

__all__ = [
    "GROUPS",
    "PAPER_ORDER",
    "VOTE_THRESHOLDS",
    "group_of",
    "language_name",
    "languages",
    "load_pairs",
    "load_task",
    "resolve_tasks",
    "tasks",
]


# Resource groups and the reference's vote thresholds: a head enters a group's set when it is
# in at least ``VOTE_THRESHOLDS[group]`` of the group's language sets (METHOD.md, Step 1).
GROUPS: dict[str, list[str]] = {
    "high": ["en", "es", "de", "fr", "zh"],
    "mid": ["ar", "bg", "th", "hi"],
    "low": ["bn", "ta", "te"],
}
VOTE_THRESHOLDS: dict[str, int] = {"high": 3, "mid": 3, "low": 2}

_DATA_PACKAGE = "soteria"
_DATA_DIR = ("data", "probes")

Pair = dict[str, str]


# --------------------------------------------------------------------------------------------
# Built-in data


def _probe_dir():
    root = resources.files(_DATA_PACKAGE)
    for part in _DATA_DIR:
        root = root.joinpath(part)
    return root


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[str, ...]:
    """Language codes with a data file, paper order first, then any others alphabetically."""
    return shipped_codes(_probe_dir(), ".json")


def languages() -> list[str]:
    """The built-in language codes: the paper's order (en zh fr de es ar bg th hi bn ta te),
    then any other shipped language alphabetically."""
    return list(_shipped())


def _unknown_language(lang: Any) -> ValueError:
    shipped = ", ".join(_shipped()) or "(none installed)"
    return ValueError(
        f"unknown probe language {lang!r}. Built-in languages: {shipped}. "
        "Another language (or your own tasks) needs your own probe data, given in Python: "
        'find_heads(model, tok, lang, tasks={"my_task": "path.jsonl"}) (JSON, JSONL, CSV or a datasets.Dataset '
        'with "input" and "output" columns).'
    )


def _language_data(lang: str) -> dict[str, Any]:
    """The parsed and validated data file of ``lang`` (cached; never hand it out directly)."""
    if not isinstance(lang, str) or lang not in _shipped():
        raise _unknown_language(lang)
    return _read_language(lang)


@functools.cache
def _read_language(lang: str) -> dict[str, Any]:
    name = f"soteria/{'/'.join(_DATA_DIR)}/{lang}.json"
    try:
        data = json.loads(_probe_dir().joinpath(f"{lang}.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict) or not data["tasks"]:
        raise ValueError(f'{name}: expected an object with a non-empty "tasks" object')
    if data.get("language", lang) != lang:
        raise ValueError(f"{name}: its language field says {data['language']!r}, not {lang!r}")
    for task, spec in data["tasks"].items():
        if not isinstance(spec, dict) or "pairs" not in spec:
            raise ValueError(f'{name}: task {task!r} has no "pairs" list')
        spec["pairs"] = _validate_rows(spec["pairs"], f"{name} task {task!r}", "input", "output")
    return data


def language_name(lang: str, *, native: bool = False) -> str:
    """English name of a built-in language (``"Hindi"``), or its own name with ``native=True``."""
    data = _language_data(lang)
    key = "native_name" if native else "name"
    return str(data.get(key) or data.get("name") or lang)


def tasks(lang: str) -> list[str]:
    """Names of ``lang``'s built-in tasks, in the data file's order."""
    return _task_names(lang)


def _task_names(lang: str) -> list[str]:
    return list(_language_data(lang)["tasks"])


def load_task(lang: str, task: str) -> list[Pair]:
    """The ``[{"input", "output"}, ...]`` pairs of a built-in task (a fresh list each call)."""
    spec = _language_data(lang)["tasks"].get(task) if isinstance(task, str) else None
    if spec is None:
        raise ValueError(f"unknown task {task!r} for language {lang!r}; its tasks are: {', '.join(tasks(lang))}")
    return [dict(p) for p in spec["pairs"]]


def group_of(lang: str) -> str | None:
    """The resource group (``"high"``, ``"mid"``, ``"low"``) of ``lang``, or None."""
    for group, members in GROUPS.items():
        if lang in members:
            return group
    return None


# --------------------------------------------------------------------------------------------
# The user's own data


def _validate_rows(
    rows: Iterable[Any],
    where: str,
    input_column: str,
    output_column: str,
    lines: Sequence[int] | None = None,
) -> list[Pair]:
    """``rows`` (mappings) -> ``[{"input", "output"}]`` (stripped), or a ValueError naming
    ``where``, the 0-based row and, for line-based files, its line number in ``lines``."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Iterable):
        raise ValueError(f"{where}: expected a list of objects, got {type(rows).__name__}")
    pairs: list[Pair] = []
    for i, row in enumerate(rows):
        at = f"{where}, row {i}" + (f" (line {lines[i]})" if lines is not None else "")
        if not isinstance(row, Mapping):
            raise ValueError(f"{at}: expected an object with {input_column!r} and {output_column!r}")
        pair = {}
        for key, col in (("input", input_column), ("output", output_column)):
            if col not in row:
                raise ValueError(f"{at}: missing column {col!r} (has {', '.join(map(repr, row)) or 'none'})")
            value = row[col]
            if not isinstance(value, str):
                raise ValueError(f"{at}: column {col!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"{at}: column {col!r} is empty")
            pair[key] = value.strip()
        pairs.append(pair)
    if not pairs:
        raise ValueError(f"{where}: no pairs")
    return pairs


def _is_dataset(obj: Any) -> bool:
    """Duck-typed ``datasets.Dataset`` (``column_names`` list, indexable by column name)."""
    return isinstance(getattr(obj, "column_names", None), list) and hasattr(obj, "__getitem__")


def _from_dataset(ds: Any, where: str, input_column: str, output_column: str) -> list[Pair]:
    for col in (input_column, output_column):
        if col not in ds.column_names:
            raise ValueError(f"{where}: missing column {col!r} (columns: {', '.join(ds.column_names)})")
    rows = ({input_column: x, output_column: y} for x, y in zip(ds[input_column], ds[output_column]))
    return _validate_rows(rows, where, input_column, output_column)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _read_jsonl(path: Path) -> tuple[list[Any], list[int]]:
    rows, lines = [], []
    with path.open(encoding="utf-8-sig") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                rows.append(json.loads(text))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: not valid JSON ({exc})") from exc
            lines.append(n)
    return rows, lines


def _read_csv(path: Path, input_column: str, output_column: str) -> tuple[list[Any], list[int]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for col in (input_column, output_column):
            if col not in header:
                raise ValueError(f"{path}: missing column {col!r} (header: {', '.join(header) or 'empty'})")
        rows, lines = [], []
        for row in reader:
            # DictReader fills absent cells with None; reader.line_num is the row's last line.
            rows.append({k: v for k, v in row.items() if k is not None and v is not None})
            lines.append(reader.line_num)
    return rows, lines


def load_pairs(
    source: Any,
    *,
    input_column: str = "input",
    output_column: str = "output",
    split: str | None = None,
) -> list[Pair]:
    """Read the user's ``[{"input": str, "output": str}, ...]`` pairs.

    ``source``: a path to ``.json`` (a list of objects, or ``{"pairs": [...]}``), ``.jsonl``
    (one object a line) or ``.csv`` (with a header); a ``datasets.Dataset``; a
    ``datasets.DatasetDict`` (``split`` picks one; optional when it holds one split); or an
    in-memory list of mappings. ``input_column``/``output_column`` name the fields to read;
    other fields are ignored. Values must be non-empty strings and are stripped of
    surrounding whitespace (the prompt template supplies the spaces). Raises ValueError
    naming the source, the row and the column for a bad row; FileNotFoundError for a path
    that does not exist (Hub dataset names are not fetched: load them with
    ``datasets.load_dataset`` and pass the result).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            what = "is not a file" if path.exists() else "does not exist"
            raise FileNotFoundError(
                f"probe data {str(source)!r} {what}. Pass a .json, .jsonl or .csv file, a list of "
                '{"input", "output"} objects, or a datasets.Dataset (for a Hub dataset, call '
                "datasets.load_dataset(...) yourself and pass the result)."
            )
        suffix = path.suffix.lower()
        lines = None
        if suffix == ".json":
            data = _read_json(path)
            if isinstance(data, dict):
                if "pairs" not in data:
                    raise ValueError(f'{path}: expected a list of objects or an object with a "pairs" list')
                data = data["pairs"]
            rows: Iterable[Any] = data
        elif suffix == ".jsonl":
            rows, lines = _read_jsonl(path)
        elif suffix == ".csv":
            rows, lines = _read_csv(path, input_column, output_column)
        else:
            raise ValueError(f"{path}: unsupported file type {suffix or '(none)'!r}; use .json, .jsonl or .csv")
        return _validate_rows(rows, str(path), input_column, output_column, lines)

    if _is_dataset(source):
        if split is not None:
            raise ValueError(f"split={split!r} was given but the source is a single Dataset, not a DatasetDict")
        return _from_dataset(source, "dataset", input_column, output_column)
    if isinstance(source, Mapping) and source and all(_is_dataset(v) for v in source.values()):
        splits = list(source)
        if split is None:
            if len(splits) != 1:
                raise ValueError(f"the DatasetDict has splits {', '.join(splits)}; choose one with split=...")
            split = splits[0]
        if split not in source:
            raise ValueError(f"the DatasetDict has no split {split!r}; its splits are: {', '.join(splits)}")
        return _from_dataset(source[split], f"dataset split {split!r}", input_column, output_column)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return _validate_rows(source, "pairs", input_column, output_column)
    raise ValueError(
        f"cannot read probe pairs from {type(source).__name__}; pass a path (.json/.jsonl/.csv), "
        'a list of {"input", "output"} objects or a datasets.Dataset'
    )


def resolve_tasks(lang: str, tasks: Any = None) -> dict[str, list[Pair]]:
    """The probe tasks ``find_heads`` runs, as ``{task_name: pairs}``.

    ``tasks=None``: every built-in task of ``lang``. A task name or a list of names: those
    built-in tasks. A dict ``{name: pairs_or_source}``: the user's own data, each value read
    with :func:`load_pairs` (``lang`` is then only a label and need not be built in).
    """
    if isinstance(tasks, Mapping):
        if not tasks:
            raise ValueError("tasks={} has no tasks; give at least one {name: pairs_or_source}")
        out = {}
        for name, source in tasks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
            out[name] = load_pairs(source)
        return out
    if isinstance(tasks, str):
        tasks = [tasks]
    available = _task_names(lang)  # raises the unknown-language error
    if tasks is None:
        names = available
    elif isinstance(tasks, Sequence):
        names = list(tasks)
        if not names:
            raise ValueError(f"tasks=[] has no tasks; {lang!r} has: {', '.join(available)}")
        repeated = sorted({n for n in names if names.count(n) > 1}, key=str)
        if repeated:
            raise ValueError(f"task(s) listed more than once: {', '.join(map(repr, repeated))}")
    else:
        raise ValueError(
            f"tasks must be None, a list of built-in task names or a dict {{name: pairs_or_source}}, "
            f"got {type(tasks).__name__}"
        )
    return {name: load_task(lang, name) for name in names}
