"""Batched, resumable generation of responses to the harmful prompts.

Each prompt becomes the user turn of the tokenizer's chat template when it has one (else the raw
text), optionally prefixed by the paper's answer-only instruction in the prompt's language.
Batches are left-padded (built with :func:`soteria.heads.prompts.encode_batch`, so the caller's
tokenizer is never modified), sorted by length to waste little padding, and decoded greedily by
default (``model.generate(..., do_sample=False, max_new_tokens=...)``).

Resume: with ``out_path`` every finished batch is appended to a JSONL file (flushed and synced),
one row per prompt::

    {"model": id, "lang": "hi", "prompt_hash": sha256, "prompt": ..., "response": ..., ...}

keyed by ``(model, lang, prompt_hash)``. ``model`` is :func:`model_id` (a digest of the weights,
so a steered model never reuses its base model's answers) unless given. ``prompt_hash`` covers
the exact model input text (template and instruction included) and the generation settings, so
changing either regenerates. A rerun skips the rows already in the file; a torn last line (a run
killed mid-write) is dropped and rewritten on the next run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..heads.cache import model_fingerprint
from ..heads.prompts import encode_batch
from ..io.atomic import atomic_write_text
from ..models.state import frozen_eval, input_device
from ..progress import progress_bar
from ..steer import SoteriaPatcher
from .prompt_sets import EvalPrompt
from .prompt_sets import instruction as builtin_instruction

__all__ = ["GenerationStore", "format_inputs", "generate_responses", "generate_texts", "model_id"]

log = logging.getLogger(__name__)


def model_id(model: nn.Module) -> str:
    """A short stable id of ``model``'s weights: ``"<name>@<digest16>"``.

    The digest is :func:`soteria.heads.cache.model_fingerprint` (output projections hashed in full,
    the rest sampled); for an architecture soteria cannot read, every tensor is hashed in full.
    A steered model's :class:`~soteria.SoteriaConfig` is hashed too, so it never shares an id with
    its original even where the weights cannot be read (offloaded to ``meta``).
    """
    try:
        digest = model_fingerprint(model)
    except ValueError:
        digest = model_fingerprint(model, full={n for n, _ in model.named_parameters(remove_duplicate=False)})
    config = SoteriaPatcher.config(model)
    if config is not None:
        digest = hashlib.sha256(f"{digest}:{config.to_json(indent=None)}".encode()).hexdigest()
    config = getattr(model, "config", None)
    name = getattr(config, "name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__
    return f"{os.path.basename(str(name).rstrip('/')) or type(model).__name__}@{digest[:16]}"


def _resolve_instruction(instruction: Any, lang: str) -> str | None:
    """``False``/None: none; ``True``: built-in text of ``lang`` (English when not built in);
    a string: that text; a mapping: ``instruction[lang]`` (None when absent)."""
    if instruction is None or instruction is False:
        return None
    if instruction is True:
        text = builtin_instruction(lang)
        if text is None:
            warnings.warn(
                f"no built-in instruction for language {lang!r}; using the English one", UserWarning, stacklevel=3
            )
            text = builtin_instruction("en")
        return text
    if isinstance(instruction, str):
        return instruction
    if isinstance(instruction, Mapping):
        return instruction.get(lang)
    raise ValueError(
        f"instruction must be a bool, a string or a {{lang: text}} mapping, got {type(instruction).__name__}"
    )


def _use_template(tokenizer, chat_template: bool | None) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat_template is None:
        return has
    if chat_template and not has:
        raise ValueError("chat_template=True but the tokenizer has no chat template (tokenizer.chat_template is unset)")
    return bool(chat_template)


def format_inputs(
    tokenizer,
    prompts: Sequence[EvalPrompt],
    *,
    instruction: Any = False,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
) -> tuple[list[str], bool]:
    """The model input text of each prompt and whether it came from the chat template.

    Content is ``instruction + "\\n" + prompt`` when an instruction applies, else the prompt. With
    the template: ``apply_chat_template([system?, user], add_generation_prompt=True)``; the text
    then carries its own special tokens (encode it with ``add_special_tokens=False``).
    """
    templ = _use_template(tokenizer, chat_template)
    out = []
    for p in prompts:
        instr = _resolve_instruction(instruction, p.lang)
        content = f"{instr}\n{p.prompt}" if instr else p.prompt
        if templ:
            messages = [{"role": "user", "content": content}]
            if system_prompt:
                messages.insert(0, {"role": "system", "content": system_prompt})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if not isinstance(text, str):  # pragma: no cover - defensive across transformers versions
                raise ValueError(f"apply_chat_template returned {type(text).__name__}, expected str")
            out.append(text)
        else:
            out.append(f"{system_prompt}\n\n{content}" if system_prompt else content)
    return out, templ


def _tokenize(tokenizer, texts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    ids = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        raise ValueError(f"input(s) {empty} tokenise to no tokens")
    return [list(r) for r in ids]


def _pad_id(tokenizer) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
    return int(pad)


def _batches(order: list[int], batch_size: int):
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _generate_ids(model, tokenizer, rows: list[list[int]], *, max_new_tokens: int, do_sample: bool, gen_kwargs):
    input_ids, attention_mask, _ = encode_batch(tokenizer, rows, padding_side="left", device=input_device(model))
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=do_sample,
        max_new_tokens=max_new_tokens,
        pad_token_id=_pad_id(tokenizer),
        **gen_kwargs,
    )
    new = out[:, input_ids.shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _check_positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _progress(total: int, desc: str, enabled: bool, leave: bool):
    return progress_bar(total=total, desc=desc, unit="prompt", enabled=enabled, leave=leave)


def generate_texts(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    add_special_tokens: bool = True,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    progress: bool = False,
    desc: str = "generate",
    leave: bool = False,
    **gen_kwargs,
) -> list[str]:
    """Generate a continuation for each ready-made input text (no template applied); batched and
    left-padded, returned in input order. ``leave``: the bar stays on screen at its last count."""
    _check_positive("batch_size", batch_size)
    _check_positive("max_new_tokens", max_new_tokens)
    rows = _tokenize(tokenizer, texts, add_special_tokens)
    out: list[str] = [""] * len(rows)
    batches = _generate_batches(
        model, tokenizer, dict(enumerate(rows)), batch_size=batch_size, max_new_tokens=max_new_tokens,
        do_sample=do_sample, gen_kwargs=gen_kwargs, desc=desc, progress=progress, leave=leave,
    )  # fmt: skip
    for idx, texts_out in batches:
        for i, t in zip(idx, texts_out):
            out[i] = t
    return out


def _generate_batches(model, tokenizer, ids: dict[int, list[int]], *, batch_size, max_new_tokens, do_sample,
                      gen_kwargs, desc, progress, leave=False):  # fmt: skip
    """Yields ``(keys, responses)`` batch by batch for ``{key: input ids}``, longest inputs first
    (less padding), in eval and inference mode, under one progress bar."""
    order = sorted(ids, key=lambda i: -len(ids[i]))
    with frozen_eval(model, grad=False), torch.inference_mode(), _progress(len(ids), desc, progress, leave) as bar:
        for idx in _batches(order, batch_size):
            responses = _generate_ids(
                model, tokenizer, [ids[i] for i in idx], max_new_tokens=max_new_tokens, do_sample=do_sample,
                gen_kwargs=gen_kwargs,
            )  # fmt: skip
            yield idx, responses
            bar.update(len(idx))


class GenerationStore:
    """The resume file: JSONL rows keyed by ``(model, lang, prompt_hash)``.

    Reading drops unreadable lines (a torn last line from a killed run) and, if there were any,
    rewrites the file atomically without them, so appends never continue a broken line.
    """

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path is not None else None
        self.rows: dict[tuple[str, str, str], dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self._load()

    @staticmethod
    def key(row: Mapping[str, Any]) -> tuple[str, str, str]:
        return (str(row["model"]), str(row["lang"]), str(row["prompt_hash"]))

    def _load(self) -> None:
        good, bad = [], 0
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.rows[self.key(row)] = row
                    good.append(row)
                except (json.JSONDecodeError, KeyError, TypeError):
                    bad += 1
        if bad:
            log.warning("%s: dropped %d unreadable line(s) (an interrupted run?)", self.path, bad)
            atomic_write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in good))

    def get(self, key: tuple[str, str, str]) -> dict[str, Any] | None:
        return self.rows.get(key)

    def append(self, rows: Sequence[Mapping[str, Any]]) -> None:
        for row in rows:
            self.rows[self.key(row)] = dict(row)
        if self.path is None or not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _as_prompts(prompts: Sequence[Any], langs: Any) -> list[EvalPrompt]:
    if isinstance(prompts, (str, EvalPrompt)):
        raise ValueError("prompts must be a list; wrap a single prompt in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if all(isinstance(p, EvalPrompt) for p in prompts):
        return prompts
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be all strings or all EvalPrompt objects")
    if langs is None or isinstance(langs, str):
        langs = [langs or "unknown"] * len(prompts)
    langs = list(langs)
    if len(langs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(langs)} languages")
    return [EvalPrompt(p, lang, source="prompts", id=f"prompts:{i}") for i, (p, lang) in enumerate(zip(prompts, langs))]


def generate_responses(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[EvalPrompt] | Sequence[str],
    *,
    langs: str | Sequence[str] | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    instruction: Any = False,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    out_path: str | os.PathLike | None = None,
    store: GenerationStore | None = None,
    model_name: str | None = None,
    progress: bool = True,
    desc: str | None = None,
    **gen_kwargs,
) -> list[dict[str, Any]]:
    """Responses of ``model`` to ``prompts``, one row dict per prompt, in prompt order.

    Args:
        prompts: :class:`EvalPrompt` s, or strings with ``langs`` (one code or one per prompt).
        max_new_tokens, do_sample, gen_kwargs: passed to ``model.generate`` (greedy by default).
        instruction: False, True (the paper's answer-only instruction in each prompt's language),
            a string, or ``{lang: text}``.
        chat_template: None uses the tokenizer's chat template when it has one; True requires
            it; False feeds the raw text (with the tokenizer's usual special tokens).
        out_path / store: the resume file (see the module docstring); rows already there are
            returned without generating.
        model_name: the ``model`` field of the rows (default :func:`model_id`).

    Row keys: ``model, lang, prompt_hash, prompt, input, response, id, source, category,
    max_new_tokens, do_sample, chat_template``.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("max_new_tokens", max_new_tokens)
    items = _as_prompts(prompts, langs)
    if store is None:
        store = GenerationStore(out_path)
    name = model_name or model_id(model)
    texts, templ = format_inputs(
        tokenizer, items, instruction=instruction, chat_template=chat_template, system_prompt=system_prompt
    )
    settings = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, **{k: repr(v) for k, v in gen_kwargs.items()}}
    hashes = [
        hashlib.sha256(json.dumps({"input": t, **settings}, sort_keys=True, ensure_ascii=True).encode()).hexdigest()
        for t in texts
    ]
    results: list[dict[str, Any] | None] = [store.get((name, p.lang, h)) for p, h in zip(items, hashes)]
    pending = [i for i, r in enumerate(results) if r is None]
    if pending:
        rows = _tokenize(tokenizer, [texts[i] for i in pending], add_special_tokens=not templ)
        ids = dict(zip(pending, rows))
        label = desc or f"generate ({name.split('@')[0]})"
        batches = _generate_batches(
            model, tokenizer, ids, batch_size=batch_size, max_new_tokens=max_new_tokens, do_sample=do_sample,
            gen_kwargs=gen_kwargs, desc=label, progress=progress,
        )  # fmt: skip
        for idx, responses in batches:
            new_rows = []
            for i, response in zip(idx, responses):
                p = items[i]
                row = {
                    "model": name,
                    "lang": p.lang,
                    "prompt_hash": hashes[i],
                    "prompt": p.prompt,
                    "input": texts[i],
                    "response": response,
                    "id": p.id,
                    "source": p.source,
                    "category": p.category,
                    "max_new_tokens": max_new_tokens,
                    "do_sample": do_sample,
                    "chat_template": templ,
                }
                results[i] = row
                new_rows.append(row)
            store.append(new_rows)
    return [dict(r) for r in results]  # type: ignore[arg-type]
