"""Step 1 of Soteria: rank a language's attention heads by their average indirect effect.

``find_heads(model, tokenizer, "fr")`` runs the language's probe tasks (clean and corrupted
few-shot prompts, :mod:`soteria.heads.prompts`), scores every head with
:func:`soteria.heads.attribution.indirect_effects`, averages over trials and then over tasks,
and returns a :class:`~soteria.heads.scores.HeadScores`. ``find_heads_multi(model, tokenizer,
["en", "fr", ...])`` does several languages in one pass over shared batches. Both shard their
prompts over a ``torch.distributed`` process group when one is initialised
(:mod:`soteria.heads.distributed`); results are cached by a fingerprint of the weights
(:mod:`soteria.heads.cache`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, unwrap_model
from ..langs import lang_list
from ..progress import progress_bar
from ..version import __version__
from . import attribution
from .cache import cache_dir, cache_key, model_fingerprint, prompts_digest
from .distributed import all_gather_object, broadcast_object, resolve
from .probes import resolve_tasks
from .prompts import bos_prefix, build_prompts, check_bos, prompt_settings
from .scores import HeadScores, model_name, resolve_k
from .text import check_text_args, text_head_scores, text_sources

__all__ = ["AUTO_JACCARD", "AUTO_MAX_TRIALS", "AUTO_STEP", "find_heads", "find_heads_multi"]


AUTO_STEP = 5  # trials per task added in each round of n_trials="auto"
AUTO_MAX_TRIALS = 25  # the reference's trial count: the most "auto" uses
AUTO_JACCARD = 0.9  # a round whose top-k set matches the previous one this well ends the search

# Recorded in settings["prompts"] with the prompt rules (README, "Prompts").
MEANS_RULE = (
    "each task's mean clean activation is over its clean prompts of the same round (the clean twins of the "
    f"corrupted prompts scored; rounds of {AUTO_STEP} under n_trials='auto', else all)"
)
# means="leave_one_out" records this one instead (the default's entry, and so its cache key, is unchanged).
LEAVE_ONE_OUT_RULE = MEANS_RULE + ", less the scored prompt's own clean twin (leave one out)"
PRECISION_RULE = "p(target) from a float32 softmax of the logits (float64 for float64 models)"


def _auto_rule(k: int) -> str:
    return (f"rounds of {AUTO_STEP} trials per task, up to {AUTO_MAX_TRIALS}; stop when the top-{k} set has "
            f"Jaccard >= {AUTO_JACCARD} with the previous round's")  # fmt: skip


def _check_trials(n_trials: Any) -> bool:
    """True for ``"auto"``; ValueError unless a positive int."""
    if n_trials == "auto":
        return True
    if isinstance(n_trials, bool) or not isinstance(n_trials, numbers.Integral) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int or 'auto', got {n_trials!r}")
    return False


def _per_task(effects: dict, tasks: dict, lang: str) -> dict[str, torch.Tensor]:
    """``{task: [L, H]}``: each task's mean over the trials gathered so far."""
    return {name: torch.cat(effects[(lang, name)]).mean(0) for name in tasks}


def _mean_scores(per_task: dict[str, torch.Tensor]) -> torch.Tensor:
    """The mean over tasks of :func:`_per_task`: ``[L, H]``."""
    return torch.stack(list(per_task.values())).mean(0)


def _check_rounds(built: dict, means: str, n_build: int, step: int) -> None:
    """ValueError, before any work, when a round of ``means="leave_one_out"`` would give a task one prompt."""
    if means != "leave_one_out":
        return
    for lang, tasks in built.items():
        for name, pp in tasks.items():
            if any(len(pp.corrupted[lo : lo + step]) == 1 for lo in range(0, n_build, step)):
                raise ValueError(f"means='leave_one_out' needs at least 2 trials of each task in each round; "
                                 f"{lang}/{name} has 1 in a round of {step} ({len(pp.corrupted)} prompts)")  # fmt: skip


def _round(attribution, model, tokenizer, built, langs, lo, hi, method, batch_size, bar, distributed, means) -> dict:
    """Effects ``{(lang, task): [n, L, H]}`` of trials ``lo:hi`` of every task of ``langs``, in shared
    batches (each task patched with the mean over its own clean prompts of this round)."""
    clean, corrupted, targets, clean_groups, corrupted_groups, keys = [], [], [], [], [], []
    for lang in langs:
        for name, pp in built[lang].items():
            n = len(pp.corrupted[lo:hi])
            if not n:
                continue
            g = len(keys)
            keys.append((lang, name))
            clean += pp.clean[lo:hi]
            corrupted += pp.corrupted[lo:hi]
            targets += list(pp.target_ids[lo:hi])
            clean_groups += [g] * len(pp.clean[lo:hi])
            corrupted_groups += [g] * n
    if not keys:
        return {}
    effects = attribution.indirect_effects(
        model, tokenizer, clean, corrupted, targets, method=method, batch_size=batch_size, progress=bar.update,
        clean_groups=clean_groups, corrupted_groups=corrupted_groups, distributed=distributed, means=means,
    )  # fmt: skip
    labels = torch.tensor(corrupted_groups)
    return {key: effects[labels == g] for g, key in enumerate(keys)}


# --------------------------------------------------------------------------- find_heads


def _context(model: nn.Module) -> int | None:
    """The model's position limit from its config (None when it has none)."""
    config = getattr(unwrap_model(model), "config", None)
    get = getattr(config, "get_text_config", None)
    config = get() if callable(get) else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        v = getattr(config, name, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def _check_context(model: nn.Module, tokenizer, built: dict[str, dict[str, Any]], n_shots: int) -> None:
    """ValueError naming ``n_shots`` when a prompt is longer than the model's positions, before any work."""
    limit = _context(model)
    if limit is None:
        return
    longest, where = 0, ""
    for lang, tasks in built.items():
        for name, pp in tasks.items():
            rows = [p for p in (*pp.clean, *pp.corrupted) if isinstance(p, str)]
            n = max((len(r) for r in tokenizer(rows, add_special_tokens=True)["input_ids"]), default=0)
            if n > longest:
                longest, where = n, f"{lang}/{name}"
    if longest > limit:
        raise ValueError(f"the {n_shots}-shot prompts reach {longest} tokens ({where}), past this model's {limit} "
                         "positions; use fewer shots (n_shots=, --n-shots)")  # fmt: skip


def find_heads(
    model: nn.Module,
    tokenizer,
    lang: str,
    *,
    method: str = "atp",
    tasks: Any = None,
    n_shots: int = 10,
    n_trials: int | str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    cache: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    stop_k: int | float | None = None,
    bos: str = "reference",
    means: str = "paired",
    source: str = "probes",
    text: Any = None,
    max_sentences: int | None = None,
) -> HeadScores:
    """Score every head of ``model`` by its average indirect effect on ``lang``'s probe tasks.

    With ``source="text"`` it scores them from plain text in the language instead (no probe
    tasks needed): attribution of each head on the language-modelling loss of ``text`` (None:
    the built-in sentences; a .txt/.jsonl file; a list of strings), at most ``max_sentences``
    of them; ``method`` is then ``"atp"`` (against the head's mean output) or ``"grad_x_act"``.
    See :func:`soteria.heads.text.text_head_scores`.

    Args:
        lang: a built-in language code (:func:`soteria.heads.probes.languages`), or any other code
            (:data:`soteria.langs.LANG_CODE`: "pt", "pt-br") when ``tasks`` is a dict of your own data.
        method: ``"atp"`` (attribution patching, default) or ``"exact"`` (activation patching).
        tasks: None (every built-in task), task names, or ``{name: pairs_or_source}``
            (:func:`soteria.probes.resolve_tasks`).
        n_shots, seed: prompt construction (:func:`soteria.prompts.build_prompts`).
        n_trials: trials per task, or ``"auto"`` (default): rounds of :data:`AUTO_STEP` trials per
            task, up to :data:`AUTO_MAX_TRIALS`, until the language's top-``stop_k`` head set is
            the same as one round earlier up to Jaccard :data:`AUTO_JACCARD` (at least two
            rounds). The rule and the trials used are recorded in ``settings``.
        stop_k: the head count the ``"auto"`` rule watches (a count or a fraction of all heads;
            default: 10% of the heads, at least 4); give the ``top_k`` you will steer with.
        bos: what goes in front of each prompt (:data:`soteria.heads.prompts.BOS_RULES`):
            ``"reference"`` (default; a literal ``<|endoftext|>`` for Qwen2, Phi-3, GPT-2...),
            ``"tokenizer"`` (soteria's earlier rule) or ``"none"``. Recorded, with the other
            prompt rules, in ``settings["prompts"]``.
        means: the mean activation each corrupted prompt is patched with: ``"paired"`` (default)
            over its task's clean prompts of the round, its own clean twin included, or
            ``"leave_one_out"``: without it (:func:`soteria.heads.attribution.indirect_effects`).
            Recorded in ``settings["prompts"]["means"]``.
        batch_size: rows per forward pass (see :func:`soteria.attribution.indirect_effects`).
            The tasks share batches.
        cache: read/write ``$SOTERIA_CACHE_DIR/heads/<key>.json``; the key covers a fingerprint
            of the weights (:func:`soteria.cache.model_fingerprint`), the prompts' token ids (and rules),
            ``lang``, ``method``, the settings and the soteria version.
        progress: show a tqdm bar over trials (hidden when stderr is not a terminal).
        distributed: None (default) shards the prompts over the ``torch.distributed`` process
            group when one is initialised; False ignores it; True requires it. Every rank gets
            the same scores; only rank 0 reads and writes the cache and shows the bar.
        source: ``"probes"`` (default) or ``"text"`` (above).

    Returns:
        :class:`HeadScores` with float32 ``[L, H]`` scores (mean over trials, then over tasks)
        and ``per_task`` scores.
    """
    return find_heads_multi(
        model, tokenizer, [lang], method=method, tasks=tasks, n_shots=n_shots, n_trials=n_trials, seed=seed,
        batch_size=batch_size, cache=cache, progress=progress, distributed=distributed, stop_k=stop_k, bos=bos,
        means=means, source=source, text=text, max_sentences=max_sentences,
    )[lang]  # fmt: skip


def find_heads_multi(
    model: nn.Module,
    tokenizer,
    langs: Sequence[str],
    *,
    method: str = "atp",
    tasks: Any = None,
    tasks_by_lang: dict[str, Any] | None = None,
    n_shots: int = 10,
    n_trials: int | str = "auto",
    seed: int = 0,
    batch_size: int | None = None,
    cache: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    stop_k: int | float | None = None,
    bos: str = "reference",
    means: str = "paired",
    source: str = "probes",
    text: Any = None,
    max_sentences: int | None = None,
) -> dict[str, HeadScores]:
    """:func:`find_heads` for several languages at once: ``{lang: HeadScores}`` in ``langs`` order.

    Every task of every language not already in the cache goes through one
    :func:`~soteria.attribution.indirect_effects` call with shared, mixed batches (each
    task keeps its own clean mean activations, prompts run longest first), so the model is
    traversed ``ceil(total trials / batch_size)`` times (AtP) rather than that many per task,
    under one progress bar. Each language's result equals
    ``find_heads(model, tokenizer, lang, ...)`` up to float rounding and is cached under the
    same key, so a language already cached is not recomputed.

    ``tasks`` applies to every language; ``tasks_by_lang`` (``{lang: tasks}``) overrides it per
    language (e.g. your own data for some of them). Other arguments: see :func:`find_heads`.

    ``source="text"`` scores each language from plain text (:func:`find_heads`), one language
    after another; ``text`` is then None (every language's built-in sentences), one language's
    text (with one language only) or ``{lang: text}`` (the languages it leaves out: built-in).
    Every language's text is read and checked before the model runs.
    """
    if source == "text":
        check_text_args(tasks, n_shots, n_trials, stop_k, distributed, bos, tasks_by_lang, means)
        sources = text_sources(lang_list(langs), text, max_sentences, method)
        return {lang: text_head_scores(model, tokenizer, lang, text=t, method=method, max_sentences=max_sentences,
                                       batch_size=batch_size, cache=cache, progress=progress)
                for lang, t in sources.items()}  # fmt: skip
    if source != "probes":
        raise ValueError(f"source must be 'probes' or 'text', got {source!r}")
    if text is not None or max_sentences is not None:
        raise ValueError("text= and max_sentences= need source='text'")
    if method not in attribution.METHODS:
        raise ValueError(f"method must be one of {attribution.METHODS}, got {method!r}")
    check_bos(bos)
    if means not in attribution.MEANS:
        raise ValueError(f"means must be one of {attribution.MEANS}, got {means!r}")
    langs = lang_list(langs)
    adaptive = _check_trials(n_trials)
    n_build = AUTO_MAX_TRIALS if adaptive else n_trials
    tasks_by_lang = dict(tasks_by_lang or {})
    unknown = [x for x in tasks_by_lang if x not in langs]
    if unknown:
        raise ValueError(f"tasks_by_lang names languages not in langs: {', '.join(map(str, unknown))}")
    rank, world = resolve(distributed)

    built: dict[str, dict[str, Any]] = {}
    for lang in langs:
        task_pairs = resolve_tasks(lang, tasks_by_lang.get(lang, tasks))
        built[lang] = {
            name: build_prompts(pairs, tokenizer, n_shots=n_shots, n_trials=n_build, seed=seed, bos=bos)
            for name, pairs in task_pairs.items()
        }
        for name, pp in built[lang].items():
            if not pp.corrupted:
                raise ValueError(f"task {name!r} of {lang!r} gave no usable prompts")
    _check_context(model, tokenizer, built, n_shots)
    _check_rounds(built, means, n_build, AUTO_STEP if adaptive else n_build)

    sites = head_sites(model)
    if cache and any(site.weight.device.type == "meta" for site in sites):
        # Offloaded weights cannot be hashed, so a steered model could read unsteered scores.
        if rank == 0:
            warnings.warn("find_heads: output projections are offloaded (meta); not using the cache", stacklevel=3)
        cache = False
    n_heads_total = len(sites) * sites[0].num_heads
    k_watch = resolve_k(stop_k, n_heads_total) if stop_k is not None else max(4, round(0.1 * n_heads_total))
    fingerprint = model_fingerprint(model)
    if world > 1:
        prints = all_gather_object(fingerprint)
        if len(set(prints)) != 1:
            differ = [r for r, f in enumerate(prints) if f != prints[0]]
            raise ValueError(f"find_heads: ranks {differ} hold other weights than rank 0; load one model everywhere")
    means_rule = MEANS_RULE if means == "paired" else LEAVE_ONE_OUT_RULE
    prompt_rules = {**prompt_settings(bos, bos_prefix(tokenizer, bos)), "means": means_rule}
    prompt_rules["precision"] = PRECISION_RULE
    settings: dict[str, dict[str, Any]] = {}
    paths: dict[str, Path] = {}
    for lang in langs:
        settings[lang] = {
            "tasks": list(built[lang]),
            "trials": {name: len(pp.corrupted) for name, pp in built[lang].items()},
            "n_shots": n_shots,
            "n_trials": n_trials,
            **({"auto_rule": _auto_rule(k_watch)} if adaptive else {}),
            "seed": seed,
            "prompts": prompt_rules,
            "model_fingerprint": fingerprint,
            "soteria_version": __version__,
        }
        key = cache_key(
            {
                "kind": "head_scores",
                "lang": lang,
                "method": method,
                "prompts": prompts_digest(tokenizer, built[lang]),
                **settings[lang],
            }
        )
        paths[lang] = cache_dir() / "heads" / f"{key}.json"

    results: dict[str, HeadScores] = {}
    if cache:
        if rank == 0:  # rank 0 decides, so all ranks agree on what is left to compute
            for lang in langs:
                if paths[lang].is_file():
                    try:
                        results[lang] = HeadScores.load(paths[lang])
                    except ValueError:
                        pass  # unreadable cache entry: recompute and overwrite it
        if world > 1:
            results = broadcast_object(results)
    todo = [lang for lang in langs if lang not in results]
    if not todo:
        return {lang: results[lang] for lang in langs}

    label = todo[0] if len(todo) == 1 else f"{len(todo)} languages"
    desc = f"find_heads {label} ({method})" + (f" [rank 0 of {world}]" if world > 1 else "")
    total = sum(len(pp.corrupted) for lang in todo for pp in built[lang].values())
    step = AUTO_STEP if adaptive else n_build
    effects: dict[tuple[str, str], list[torch.Tensor]] = {(lang, name): [] for lang in todo for name in built[lang]}
    active, previous, stable_at = list(todo), {}, {}
    with progress_bar(total=len(range(rank, total, world)), desc=desc, unit="trial",
                      enabled=progress and rank == 0) as bar:  # fmt: skip
        for lo in range(0, n_build, step):
            part = _round(attribution, model, tokenizer, built, active, lo, lo + step, method, batch_size, bar,
                          distributed, means)  # fmt: skip
            for key, value in part.items():
                effects[key].append(value)
            if not adaptive:
                continue
            for lang in list(active):
                scores = _mean_scores(_per_task(effects, built[lang], lang))
                top = set(scores.flatten().topk(k_watch).indices.tolist())
                if lang in previous and len(top & previous[lang]) / len(top | previous[lang]) >= AUTO_JACCARD:
                    active.remove(lang)
                    stable_at[lang] = lo + step
                previous[lang] = top
            if stable_at:
                bar.set_postfix_str("stable: " + ", ".join(f"{x} after {n}" for x, n in stable_at.items()))
            if not active:
                break
    for lang in todo:
        per_task = _per_task(effects, built[lang], lang)
        used = {name: sum(len(e) for e in effects[(lang, name)]) for name in built[lang]}
        results[lang] = HeadScores(
            scores=_mean_scores(per_task),
            model_name=model_name(model),
            lang=lang,
            method=method,
            settings={**settings[lang], "trials": used, **({"stable": lang in stable_at} if adaptive else {})},
            per_task=per_task,
        )
        if cache and rank == 0:
            results[lang].save(paths[lang])
    return {lang: results[lang] for lang in langs}
