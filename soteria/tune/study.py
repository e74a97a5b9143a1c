"""``soteria.tune``: search the head count and the scale per language with Optuna, then verify.

The heads are found once (their scores are cached and every ``top_k`` reuses them) and the
harm vector is built once. Each trial applies a point of the :class:`SearchSpace`, measures
it with the fast :class:`RefusalProxy` (an 8-token greedy prefix, one pass for the KL) on a
tuning split of the built-in prompts, and reverts (bit-exact), so the model never reloads.
Two objectives are minimised with Optuna's multi-objective TPE sampler: mean harmfulness over
the languages and mean KL on harmless prompts; over-refusal is recorded beside them. The study
lives in ``out_dir/study.db`` (SQLite), so an interrupted tune resumes where it stopped.

The chosen point (:func:`soteria.tune.front.choose`) is then verified by full generation and
the refusal-phrase judge on the held-out split the search never saw, next to the base model
and soteria's defaults. Written to ``out_dir``: ``chosen.json`` (``soteria steer --config`` and
``SoteriaPatcher.apply(config=...)`` take it), ``harm.safetensors``, ``trials.csv``,
``front.csv``, ``pareto.png`` and ``verify.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..arch import head_sites
from ..defaults import DEFAULT_CONTRAST, DEFAULT_REFUSAL_TOKENS, DEFAULT_RELATIVE_SCALE, DEFAULT_TOP_K
from ..evaluation.generation import format_inputs, model_id
from ..evaluation.prompt_sets import EvalPrompt, eval_languages, harmless_prompts, smoke_prompts
from ..evaluation.utility import steering_kl
from ..harm import HarmVector
from ..harm.data import harmful_languages
from ..heads import HeadScores, find_heads_multi
from ..io.atomic import atomic_write_text, check_writable
from ..langs import lang_list
from ..progress import progress_bar
from ..steer import SoteriaConfig, SoteriaPatcher
from ..version import __version__
from .front import choose, front_rows, plot_front
from .proxy import RefusalProxy, objectives, refusal_verdicts
from .records import TUNE_FORMAT, best_line, trial_rows, write_trials_csv
from .space import SearchSpace

try:  # the 'tune' extra: pip install 'soteria[tune]'
    import optuna
except ImportError:  # pragma: no cover - checked before any work
    optuna = None

__all__ = ["TuneResult", "apply_point", "heldout_check", "splits", "tune"]

STUDY_NAME = "soteria-tune"
_OUR_FILES = {"study.db", "chosen.json", "harm.safetensors", "trials.csv", "front.csv", "pareto.png", "verify.json"}


@dataclass
class TuneResult:
    """What :func:`tune` found: the chosen point, the front, and the held-out verification."""

    chosen: dict[str, Any]
    config: SoteriaConfig
    front: list[dict[str, Any]]
    verify: dict[str, Any] | None
    out_dir: Path
    trials: list[dict[str, Any]] = field(repr=False, default_factory=list)
    scores: dict[str, HeadScores] = field(repr=False, default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)  # seconds: heads, harm, trials (this run), verify


def _check_out(out: Path) -> None:
    """``out`` must be new, empty, or an earlier tune's folder (resumed); nothing else is touched."""
    check_writable(out, "out_dir")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in _OUR_FILES)
        if others:
            raise FileExistsError(
                f"out_dir {out} holds files a tune did not write ({', '.join(others[:4])}); choose a new folder"
            )


#: Tuning prompts per language: at most this many of the even-position built-in prompts.
TUNE_PROMPTS = {"harmful": 12, "harmless": 8}


def splits(
    langs: Sequence[str], tune_prompts: Mapping[str, int] = TUNE_PROMPTS
) -> dict[str, dict[str, dict[str, list[str]]]]:
    """Built-in prompts split in two by position: ``{"tune"|"heldout": {"harmful"|"harmless": {lang: [...]}}}``.

    Odd positions are held out (22 harmful, 20 harmless per language); the tuning prompts are
    the first ``tune_prompts[kind]`` even ones, spread over the list so that every source mixes in."""
    out: dict[str, dict[str, dict[str, list[str]]]] = {s: {"harmful": {}, "harmless": {}} for s in ("tune", "heldout")}
    for lang in langs:
        harmful = [p.prompt for p in smoke_prompts([lang])]
        harmless = harmless_prompts(lang)
        for kind, ps in (("harmful", harmful), ("harmless", harmless)):
            even = ps[0::2]
            n = min(len(even), tune_prompts[kind])
            out["tune"][kind][lang] = [even[round(i * len(even) / n)] for i in range(n)]
            out["heldout"][kind][lang] = ps[1::2]
    return out


def _ranked(scores: HeadScores, k: int, layers: tuple[int, int] | None) -> list[tuple[int, int]]:
    """The ``k`` best heads, within the layer window when one is given."""
    ranked = scores.top(scores.scores.numel())
    if layers is not None:
        ranked = [(lyr, h) for lyr, h in ranked if layers[0] <= lyr <= layers[1]]
    return ranked[:k]


def apply_point(model, langs, harm, scores, point) -> SoteriaConfig:
    """Steer ``model`` at a trial's ``point`` (``{"top_k", "relative_scale" or "scale", "layers"}``); its record."""
    heads = {lang: _ranked(scores[lang], point["top_k"][lang], point.get("layers")) for lang in langs}
    if "relative_scale" in point:
        kw = dict(scale="auto", relative_scale=point["relative_scale"])
    else:
        kw = dict(scale=point["scale"])
    SoteriaPatcher.apply(model, langs, heads=heads, harm=harm, progress=False, **kw)
    return SoteriaPatcher.config(model)


def heldout_check(
    model, tokenizer, langs, prompts, *, max_new_tokens: int, progress: bool
) -> dict[str, dict[str, float]]:
    """Refusal (harmful) and over-refusal (harmless) by generation and the refusal judge, and
    KL on the harmless prompts (0 for an unsteered model), per language."""
    out = {}
    steered = SoteriaPatcher.is_steered(model)
    for lang in langs:
        row = {}
        for kind, name in (("harmful", "refusal"), ("harmless", "over_refusal")):
            refused = refusal_verdicts(model, tokenizer, prompts[kind][lang], lang, max_new_tokens=max_new_tokens,
                                       progress=progress)  # fmt: skip
            row[name] = sum(refused) / len(refused)
        texts, templated = format_inputs(tokenizer, [EvalPrompt(p, lang) for p in prompts["harmless"][lang]])
        row["kl"] = steering_kl(model, tokenizer, texts, add_special_tokens=not templated)["mean"] if steered else 0.0
        out[lang] = row
    return out


def _check_args(langs, n_trials, max_kl, choose_how, harm, tokenizer) -> list[str]:
    langs = lang_list(langs)
    missing = [x for x in langs if x not in eval_languages()]
    if missing:
        raise ValueError(
            f"no built-in tuning prompts for {', '.join(missing)} (built in: {', '.join(eval_languages())})"
        )
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not max_kl > 0:
        raise ValueError(f"max_kl must be a number > 0, got {max_kl!r}")
    if choose_how not in ("budget", "knee"):
        raise ValueError(f"choose must be 'budget' or 'knee', got {choose_how!r}")
    if harm is not None and not isinstance(harm, (HarmVector, str, os.PathLike)):
        raise ValueError(f"harm must be a HarmVector, a path or Hub id, or None; got {type(harm).__name__}")
    if tokenizer is None:
        raise ValueError("tune needs the model's tokenizer")
    if optuna is None:
        raise ImportError("soteria tune needs Optuna: pip install 'soteria[tune]'")
    return langs


def tune(
    model: nn.Module,
    tokenizer,
    langs: str | Sequence[str],
    *,
    out_dir: str | os.PathLike = "soteria-tune",
    n_trials: int = 50,
    harm: HarmVector | str | os.PathLike | None = None,
    space: SearchSpace | None = None,
    max_kl: float = 0.1,
    choose_how: str = "budget",
    seed: int = 0,
    verify: bool = True,
    verify_tokens: int = 24,
    scores: dict[str, HeadScores] | None = None,
    find_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> TuneResult:
    """Search ``top_k`` and the scale per language for ``model`` and write the results to ``out_dir``.

    Args:
        langs: languages with built-in evaluation prompts (their even-position prompts tune,
            the odd ones verify).
        n_trials: trials the study should hold in all; a resumed study runs only the rest.
        harm: None (the gradient direction with soteria's defaults), a :class:`HarmVector`, or a
            harmful fine-tune's path / Hub id.
        space: the :class:`SearchSpace` (default: per language ``top_k`` in 8..30% of the heads
            and relative scale 0.001..0.03 log-uniform).
        max_kl, choose_how: how the point is chosen (:func:`soteria.tune.front.choose`).
        verify: generate on the held-out split for the base model, the defaults and the chosen
            point (``verify_tokens`` new tokens, greedy).
        scores: ``{lang: HeadScores}`` already found (e.g. by ``soteria heads``); default: found
            here with :func:`soteria.find_heads_multi` (``find_kwargs`` passed on; cached).

    The model is left as found (every trial is reverted). Raises ValueError for bad arguments
    and FileExistsError for an ``out_dir`` holding other files, before any work.
    """
    langs = _check_args(langs, n_trials, max_kl, choose_how, harm, tokenizer)
    space = space if space is not None else SearchSpace()
    if not isinstance(space, SearchSpace):
        raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
    sites = head_sites(model)
    space = space.resolved(len(sites), sites[0].num_heads)
    if scores is not None:
        missing = [x for x in langs if not isinstance(scores.get(x), HeadScores)]
        shapes = {tuple(v.shape) for v in scores.values() if isinstance(v, HeadScores)}
        if missing or shapes != {(len(sites), sites[0].num_heads)}:
            raise ValueError(f"scores must hold a HeadScores of this model's shape for every language "
                             f"(missing: {', '.join(missing) or 'none'}; shapes {sorted(shapes)})")  # fmt: skip
    out = Path(out_dir)
    _check_out(out)
    if SoteriaPatcher.is_steered(model):
        raise ValueError("tune needs the base model, not a steered one (SoteriaPatcher.revert(model) restores it)")

    times, t0 = {}, time.perf_counter()
    if scores is None:
        # The same head search as SoteriaPatcher.apply's (and its cache entries), whatever top_k a trial takes.
        find_kwargs = {"stop_k": DEFAULT_TOP_K, **dict(find_kwargs or {})}
        scores = find_heads_multi(model, tokenizer, langs, progress=progress, **find_kwargs)
    times["heads"], t0 = time.perf_counter() - t0, time.perf_counter()
    if harm is None:
        used = [x for x in langs if x in harmful_languages()] or None
        harm = HarmVector.from_gradients(model, tokenizer, langs=used, contrast=DEFAULT_CONTRAST,
                                         refusal_tokens=DEFAULT_REFUSAL_TOKENS, progress=progress)  # fmt: skip
    elif not isinstance(harm, HarmVector):
        harm = HarmVector.from_pretrained(harm, base=model)
    harm.check(model)
    data = splits(langs)
    proxy = RefusalProxy(model, tokenizer, data["tune"]["harmful"], data["tune"]["harmless"])
    times["harm"], t0 = time.perf_counter() - t0, time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study, todo, finished = _open_study(out, model, langs, harm, space, seed, n_trials)
        with progress_bar(total=n_trials, desc="tune", unit="trial", enabled=progress) as bar:
            bar.update(len(finished))
            for _ in range(todo):
                study.optimize(lambda trial: _objective(trial, model, langs, harm, scores, space, proxy, len(sites)),
                               n_trials=1, catch=())  # fmt: skip
                bar.set_postfix_str(best_line(study, max_kl))
                bar.update(1)
    finally:
        optuna.logging.set_verbosity(verbosity)
    times["trials"], times["trials_run"], t0 = time.perf_counter() - t0, todo, time.perf_counter()
    trials = trial_rows(study)
    settings = study.user_attrs["settings"]
    points = [(r["harmfulness"], r["kl"]) for r in trials]
    i, why = choose(points, choose_how, max_kl=max_kl)
    chosen_row = trials[i]
    config = apply_point(model, langs, harm, scores, chosen_row["point"])
    try:
        verified = None
        if verify:
            heldout = data["heldout"]
            chosen_v = heldout_check(model, tokenizer, langs, heldout, max_new_tokens=verify_tokens, progress=progress)
            SoteriaPatcher.revert(model)
            base_v = heldout_check(model, tokenizer, langs, heldout, max_new_tokens=verify_tokens, progress=progress)
            default = {lang: scores[lang].top(DEFAULT_TOP_K) for lang in langs}
            SoteriaPatcher.apply(model, langs, heads=default, harm=harm, scale="auto", progress=False,
                                 relative_scale=DEFAULT_RELATIVE_SCALE if harm.kind == "tau" else None)  # fmt: skip
            default_v = heldout_check(model, tokenizer, langs, heldout, max_new_tokens=verify_tokens, progress=progress)
            default_m = proxy.measure(model)
            verified = {"base": base_v, "default": default_v, "chosen": chosen_v, "tokens": verify_tokens,
                        "default_proxy": default_m, "prompts": {k: {x: len(v) for x, v in d.items()}
                                                                 for k, d in heldout.items()}}  # fmt: skip
    finally:
        if SoteriaPatcher.is_steered(model):
            SoteriaPatcher.revert(model)

    times["verify"] = time.perf_counter() - t0
    chosen = {"format": TUNE_FORMAT, "soteria_version": __version__, "trial": chosen_row["trial"], "why": why,
              "objectives": {"harmfulness": chosen_row["harmfulness"], "kl": chosen_row["kl"],
                             "over_refusal": chosen_row["over_refusal"]},
              "config": config.to_dict(), "harm": "harm.safetensors", "settings": settings,
              "max_kl": max_kl, "choose": choose_how}  # fmt: skip
    harm.save(out / "harm.safetensors")
    atomic_write_text(out / "chosen.json", json.dumps(chosen, indent=2, sort_keys=True, default=str) + "\n")
    write_trials_csv(out / "trials.csv", trials)
    front = front_rows(trials, points)
    write_trials_csv(out / "front.csv", front)
    reference = None
    if verified is not None:
        dm = verified["default_proxy"]
        reference = {"defaults": objectives(dm)}
    plot_front(points, i, out / "pareto.png", reference=reference, max_kl=max_kl if choose_how == "budget" else None,
               title=f"soteria tune: {', '.join(langs)}, {len(trials)} trials ({why})")  # fmt: skip
    if verified is not None:
        atomic_write_text(out / "verify.json", json.dumps(verified, indent=2, sort_keys=True) + "\n")
    return TuneResult(
        chosen=chosen,
        config=config,
        front=front,
        verify=verified,
        out_dir=out,
        trials=trials,
        scores=scores,
        times=times,
    )


def _open_study(out: Path, model, langs, harm, space, seed: int, n_trials: int):
    """``(study, trials still to run, finished trials)``; a study with other settings is refused."""
    settings = {"langs": langs, "model": model_id(model), "harm": harm.source, "space": space.to_dict(), "seed": seed}
    storage = f"sqlite:///{(out / 'study.db').resolve()}"
    finished = _done(storage)
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["minimize", "minimize"],
        sampler=optuna.samplers.TPESampler(seed=seed + len(finished), multivariate=True),
        load_if_exists=True,
    )
    before = study.user_attrs.get("settings")
    if before is not None and json.dumps(before, sort_keys=True) != json.dumps(settings, sort_keys=True):
        raise ValueError(f"{out / 'study.db'} holds a study with other settings ({before}); use a new out_dir")
    study.set_user_attr("settings", settings)
    return study, max(0, n_trials - len(finished)), finished


def _objective(trial, model, langs, harm, scores, space, proxy, n_layers: int) -> tuple[float, float]:
    """Apply the trial's point, measure it with the proxy, revert; ``(harmfulness, kl)`` means."""
    point = space.suggest(trial, langs, harm.kind, n_layers)
    try:
        config = apply_point(model, langs, harm, scores, point)
        m = proxy.measure(model)
    finally:
        if SoteriaPatcher.is_steered(model):
            SoteriaPatcher.revert(model)
    trial.set_user_attr("per_lang", m)
    trial.set_user_attr("scale", config.scale)
    trial.set_user_attr("point", {k: v for k, v in point.items() if v is not None})
    trial.set_user_attr("over_refusal", sum(v["over_refusal"] for v in m.values()) / len(m))
    return objectives(m)


def _done(storage: str) -> list[Any]:
    """Finished trials of an earlier run (they offset the sampler's seed on resume)."""
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    except KeyError:
        return []
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
