"""``evaluate``: attack success rate per language and utility, for one model or an original/steered pair."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..heads.probes import languages as probe_languages
from ..io.atomic import atomic_write_text
from ..progress import progress_bar
from .generation import GenerationStore, format_inputs, generate_responses, model_id
from .judges import Judge, make_judge
from .prompt_sets import (
    EvalPrompt,
    eval_languages,
    harmless_prompts,
    heldout_texts,
    languages_of,
    load_prompts,
    normalize_lang,
)
from .report import Counts, EvalReport, LangResult, run_metadata
from .utility import next_token_kl, perplexity, probe_accuracy

__all__ = ["evaluate"]

GENERATIONS_FILE = "generations.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
REPORT_FILE = "report.json"
CHART_FILE = "asr.png"
TABLE_FILE = "table.txt"


def _texts_for(lang: str, given: Mapping[str, Any] | None, builtin) -> list[str] | None:
    if given is not None:
        value = given.get(lang)
        if value is None:
            return None
        return [value] if isinstance(value, str) else list(value)
    return builtin(lang) if lang in eval_languages() else None


def _utility(model, tokenizer, lang, *, heldout, probe_prompts, n_shots, seed, batch_size) -> dict[str, Any]:
    out: dict[str, Any] = {"perplexity": None, "probe_accuracy": None, "probe_n": 0}
    if heldout:
        out["perplexity"] = perplexity(model, tokenizer, heldout, batch_size=batch_size)["perplexity"]
    if probe_prompts and lang in probe_languages():
        acc = probe_accuracy(
            model, tokenizer, lang, n_shots=n_shots, max_prompts=probe_prompts, seed=seed, batch_size=batch_size
        )
        out["probe_accuracy"], out["probe_n"] = acc["accuracy"], acc["total"]
    return out


def _source_name(prompts: Any) -> str:
    if prompts is None:
        return "smoke"
    if isinstance(prompts, (str, os.PathLike)):
        return os.fspath(prompts)
    if isinstance(prompts, Sequence) and prompts and all(isinstance(p, EvalPrompt) for p in prompts):
        return ", ".join(dict.fromkeys(p.source or "prompts" for p in prompts))  # e.g. "smoke", "hub:owner/name"
    return type(prompts).__name__


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    steered: nn.Module | None = None,
    langs: Sequence[str] | None = None,
    prompts: Any = None,
    judge: Judge | str | Any = "refusal",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    instruction: bool | str | Mapping[str, str] = False,
    chat_template: bool | None = None,
    system_prompt: str | None = None,
    limit: int | None = None,
    utility: bool = True,
    harmless: Mapping[str, Sequence[str] | str] | None = None,
    heldout: Mapping[str, Sequence[str] | str] | None = None,
    probe_prompts: int = 10,
    n_shots: int = 5,
    seed: int = 0,
    out_dir: str | os.PathLike | None = None,
    resume: bool = True,
    model_name: str | None = None,
    steered_name: str | None = None,
    judge_kwargs: Mapping[str, Any] | None = None,
    prompt_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    **gen_kwargs,
) -> EvalReport:
    """Measure the attack success rate per language (and utility) of ``model``, and of ``steered``.

    Args:
        model: the original model; ``steered``: the steered copy (optional; same tokenizer).
        langs: languages to evaluate (default: every language in the prompt set).
        prompts: a prompt source for :func:`~soteria.evaluation.load_prompts` (default the
            built-in smoke set; ``"xthreatbench"``, ``"multijail"``, a Hub id, a file, rows) or a
            list of :class:`EvalPrompt`; ``prompt_kwargs`` (``prompt_column``, ``lang_column``,
            ``split``, ...) go to the loader; ``limit`` caps prompts per language.
        judge: ``"refusal"`` (crude baseline), ``"llm"`` (``judge_kwargs`` to :class:`LLMJudge`),
            a classifier / guard model path, a :class:`Judge` or a function.
        max_new_tokens, batch_size, instruction, chat_template, system_prompt, gen_kwargs: see
            :func:`~soteria.evaluation.generate_responses` (greedy by default).
        utility: also measure perplexity on held-out text and probe-task accuracy per language
            for each model, and KL(original || steered) on harmless prompts (formatted as for
            generation: with the chat template when one is used). ``heldout`` /
            ``harmless``: ``{lang: texts}`` replacing the built-in texts (a language without
            texts gets no value). ``probe_prompts``: prompts per probe task (0 skips probes).
        out_dir: folder for ``generations.jsonl`` (resumable, see ``resume``), ``judgments.jsonl``
            (every response with its label), ``report.json``, ``asr.png`` and ``table.txt``.
        resume: reuse the responses already in ``out_dir/generations.jsonl`` (False starts over).
        model_name / steered_name: ids for the rows (default a digest of each model's weights).

    Returns:
        :class:`EvalReport`; ``report.table()`` prints it, ``report.responses`` holds the rows.
    """
    if steered is not None and steered is model:
        raise ValueError("steered is the same object as model; pass a separate steered copy (or steered=None)")
    for name, value, low in (("probe_prompts", probe_prompts, 0), ("n_shots", n_shots, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(langs, str):
        langs = [langs]
    items = load_prompts(prompts, langs=langs, limit=limit, **dict(prompt_kwargs or {}))
    order = languages_of(items) if langs is None else list(dict.fromkeys(normalize_lang(x) or x for x in langs))
    judge_obj = make_judge(judge, **dict(judge_kwargs or {}))

    out = Path(out_dir) if out_dir is not None else None
    store_path = None
    if out is not None:
        if out.exists() and not out.is_dir():
            raise ValueError(f"out_dir {out} exists and is not a folder")
        out.mkdir(parents=True, exist_ok=True)
        store_path = out / GENERATIONS_FILE
        if not resume and store_path.exists():
            store_path.unlink()
    store = GenerationStore(store_path)

    names = {"before": model_name or model_id(model)}
    models = {"before": model}
    if steered is not None:
        names["after"] = steered_name or model_id(steered)
        models["after"] = steered
        if names["after"] == names["before"]:
            warnings.warn(
                f"the steered model has the same id as the original ({names['before']}): identical weights, or "
                "the same model_name; its responses are shared with the original's",
                UserWarning,
                stacklevel=2,
            )

    gen = dict(
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        instruction=instruction,
        chat_template=chat_template,
        system_prompt=system_prompt,
        store=store,
        progress=progress,
        **gen_kwargs,
    )
    responses: list[dict[str, Any]] = []
    for role, m in models.items():
        rows = generate_responses(m, tokenizer, items, model_name=names[role], desc=f"generate ({role})", **gen)
        for r in rows:
            r["role"] = role
        responses += rows

    verdicts = judge_obj.judge_detailed(
        [r["prompt"] for r in responses], [r["response"] for r in responses], [r["lang"] for r in responses]
    )
    for r, v in zip(responses, verdicts):
        r.update(judge=judge_obj.name, label=v.label, judge_answer=v.answer, judge_error=v.error)

    results = []
    for lang in order:
        per_role = {
            role: Counts.from_labels(r["label"] for r in responses if r["role"] == role and r["lang"] == lang)
            for role in models
        }
        results.append(LangResult(lang, per_role["before"], per_role.get("after")))

    if utility:
        for res in progress_bar(results, desc="utility", enabled=progress, leave=False):
            held = _texts_for(res.lang, heldout, heldout_texts)
            kw = dict(heldout=held, probe_prompts=probe_prompts, n_shots=n_shots, seed=seed, batch_size=batch_size)
            res.utility_before = _utility(model, tokenizer, res.lang, **kw)
            if steered is not None:
                res.utility_after = _utility(steered, tokenizer, res.lang, **kw)
                texts = _texts_for(res.lang, harmless, harmless_prompts)
                if texts:  # formatted as the prompts were for generation (the chat template, if used)
                    benign = [EvalPrompt(t, res.lang) for t in texts]
                    texts, templ = format_inputs(
                        tokenizer, benign, chat_template=chat_template, system_prompt=system_prompt
                    )
                    res.kl = next_token_kl(model, steered, tokenizer, texts, batch_size=batch_size,
                                           add_special_tokens=not templ)["mean"]  # fmt: skip

    meta = run_metadata(
        judge=judge_obj.describe(),
        prompts=_source_name(prompts),
        n_prompts=len(items),
        langs=order,
        models=names,
        max_new_tokens=max_new_tokens,
        instruction=instruction if isinstance(instruction, (bool, str)) else dict(instruction),
        chat_template=bool(responses[0]["chat_template"]),
        utility=bool(utility),
        probe_prompts=probe_prompts,
        n_shots=n_shots,
        seed=seed,
    )
    stats = getattr(judge_obj, "stats", None)
    if isinstance(stats, dict):
        meta["judge_stats"] = dict(stats)
    report = EvalReport(results, meta, responses=responses)
    if out is not None:
        meta["files"] = {
            "generations": GENERATIONS_FILE,
            "judgments": JUDGMENTS_FILE,
            "chart": CHART_FILE,
            "table": TABLE_FILE,
        }
        atomic_write_text(out / JUDGMENTS_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in responses))
        report.to_json(out / REPORT_FILE)
        report.plot(out / CHART_FILE)
        atomic_write_text(out / TABLE_FILE, report.table() + "\n")
    return report
