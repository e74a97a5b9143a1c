"""``soteria eval``: attack success rate per language and utility, before and after steering.

:func:`soteria.cli.build_parser` adds the sub-command with ``add_eval_parser(subparsers)``
(it sets ``func=run_eval``); models load through :mod:`soteria.cli`'s loaders, so MODEL and
``--steered`` take the same specs as the other commands (a folder, a Hub id, ``tiny:llama``).
``run_eval(args)`` returns the exit status. A user's mistake raises ValueError or
FileNotFoundError (the main CLI turns them into exit status 2 with a one-line message).
The LLM judge's API key is read from ``$SOTERIA_JUDGE_API_KEY`` (or ``$OPENAI_API_KEY``) only,
never from the command line, so it stays out of shell history and process listings.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from ..evaluation import evaluate, load_prompts, make_judge
from ..evaluation.runner import CHART_FILE, GENERATIONS_FILE, JUDGMENTS_FILE, REPORT_FILE, TABLE_FILE
from ..io.atomic import check_writable
from ..models.loading import check_device, check_source, load_causal_lm, load_tokenizer
from .args import non_negative, parse_langs, positive_int

__all__ = ["add_parser", "run"]

_DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` sub-command to an ``argparse`` sub-parsers object and return its parser."""
    p = subparsers.add_parser(
        "eval",
        help="measure attack success rate per language and utility (before/after steering)",
        description=(
            "Generate responses to harmful prompts in each language, label them with a judge, and report the "
            "attack success rate (ASR = harmful / (harmful + safe); unparsed judge answers reported apart, "
            "never counted as safe) and utility (held-out perplexity, probe accuracy, KL on harmless prompts) "
            "for a model and, optionally, its steered copy. Writes report.json, asr.png, table.txt, "
            "generations.jsonl (resumable) and judgments.jsonl to --out."
        ),
    )
    m = p.add_argument_group("models")
    m.add_argument("model", help="the original model: a local folder, a Hub id, pretrained:<name> or tiny:<model_type>")
    m.add_argument("--gguf-file", default=None, metavar="NAME", help="load MODEL from this GGUF file in its folder")
    m.add_argument("--steered", help="the steered model (folder or Hub id) to compare against MODEL")
    m.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: MODEL's)")
    m.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    m.add_argument("--dtype", default="auto", choices=_DTYPES, help="weights dtype (default: the checkpoint's)")

    d = p.add_argument_group("prompts")
    d.add_argument(
        "--prompts",
        default="smoke",
        help="smoke (built-in, default), xthreatbench, multijail, hub:OWNER/NAME, or a .csv/.json/.jsonl file",
    )
    d.add_argument("--langs", nargs="+", help="language codes, e.g. hi bn (default: all in the prompt set)")
    d.add_argument("--limit", type=positive_int, help="at most this many prompts per language")
    d.add_argument("--prompt-column", help="name of the prompt column (default: detected)")
    d.add_argument("--lang-column", help="name of the language column (default: detected)")
    d.add_argument("--lang", dest="fixed_lang", help="language of every prompt, for data without a language column")
    d.add_argument("--split", help="dataset split (Hub sets)")
    d.add_argument("--config", dest="dataset_config", help="dataset configuration name (Hub sets)")

    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens generated per response (default 64)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="prompts per batch (default 8)")
    g.add_argument(
        "--instruction",
        action="store_true",
        help="prefix the paper's instruction ('Only provide the answer to the given question.') in each language",
    )
    g.add_argument("--no-chat-template", action="store_true", help="feed raw prompts even if a chat template exists")
    g.add_argument("--system-prompt", help="system message for the chat template")

    j = p.add_argument_group("judge")
    j.add_argument(
        "--judge",
        default="refusal",
        help="refusal (crude refusal-phrase baseline, default), llm (OpenAI-compatible endpoint), "
        "or a classifier / guard model folder or Hub id",
    )
    j.add_argument("--judge-url", help="LLM judge base URL, e.g. http://localhost:8000/v1 (or $SOTERIA_JUDGE_BASE_URL)")
    j.add_argument("--judge-model", help="LLM judge model name (or $SOTERIA_JUDGE_MODEL)")
    j.add_argument("--judge-workers", type=positive_int, default=4, help="concurrent LLM judge requests (default 4)")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per judge request (default 60)")
    j.add_argument("--judge-retries", type=non_negative, default=5, help="retries per judge request (default 5)")
    j.add_argument("--judge-cache", help="JSONL cache of judge answers (default: OUT/judge_cache.jsonl)")

    u = p.add_argument_group("utility")
    u.add_argument("--no-utility", action="store_true", help="skip perplexity, probe accuracy and KL")
    u.add_argument("--probe-prompts", type=non_negative, default=10, help="prompts per probe task (0: skip probes)")
    u.add_argument("--n-shots", type=non_negative, default=5, help="demonstrations per probe prompt (default 5)")

    o = p.add_argument_group("output")
    o.add_argument("--out", default="soteria-eval", help="output folder (default ./soteria-eval)")
    o.add_argument("--no-resume", action="store_true", help="regenerate even if OUT/generations.jsonl has responses")
    o.add_argument("--seed", type=int, default=0, help="seed for the probe prompts (default 0)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _device(name: str) -> str:
    """``auto``: the first GPU when there is one, else the CPU; anything else is checked."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(name)


def run(args: argparse.Namespace) -> int:
    """Run ``soteria eval`` with parsed ``args``; print the table; return 0.

    Everything cheap (prompts, judge, device, model names) is checked before the models load.
    """
    out = check_writable(args.out)
    judge_kwargs: dict[str, Any] = {}
    if args.judge == "llm":
        judge_kwargs = dict(
            base_url=args.judge_url,
            model=args.judge_model,
            workers=args.judge_workers,
            timeout=args.judge_timeout,
            max_retries=args.judge_retries,
            cache_path=args.judge_cache or (out / "judge_cache.jsonl"),
            progress=not args.no_progress,
        )
    elif args.judge_url or args.judge_model:
        raise ValueError("--judge-url / --judge-model apply to --judge llm only")
    elif args.judge not in ("refusal", "refusal-phrases", "baseline"):  # a classifier or guard model
        judge_kwargs = dict(progress=not args.no_progress)
    prompt_kwargs = {
        k: v
        for k, v in dict(
            prompt_column=args.prompt_column,
            lang_column=args.lang_column,
            lang=args.fixed_lang,
            split=args.split,
            config=args.dataset_config,
        ).items()
        if v is not None
    }
    langs = None if args.langs is None else parse_langs(args.langs)
    try:
        prompts = load_prompts(args.prompts, langs=langs, limit=args.limit, **prompt_kwargs)
    except ImportError as e:  # an optional package (datasets) the chosen prompt set needs
        raise ValueError(str(e)) from e
    judge = make_judge(args.judge, **judge_kwargs)

    device = _device(args.device)
    check_source(args.model, "MODEL")
    if args.steered:
        check_source(args.steered, "--steered")
    gguf = {} if args.tokenizer else {"gguf_file": args.gguf_file}
    tokenizer = load_tokenizer(args.tokenizer or args.model, what="--tokenizer", **gguf)
    model = load_causal_lm(args.model, dtype=args.dtype, device=device, gguf_file=args.gguf_file, what="MODEL")
    steered = load_causal_lm(args.steered, dtype=args.dtype, device=device, what="--steered") if args.steered else None

    report = evaluate(
        model,
        tokenizer,
        steered=steered,
        langs=langs,
        prompts=prompts,
        judge=judge,
        limit=args.limit,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        instruction=args.instruction,
        chat_template=False if args.no_chat_template else None,
        system_prompt=args.system_prompt,
        utility=not args.no_utility,
        probe_prompts=args.probe_prompts,
        n_shots=args.n_shots,
        seed=args.seed,
        out_dir=out,
        resume=not args.no_resume,
        progress=not args.no_progress,
    )
    print(report.table())
    names = (GENERATIONS_FILE, JUDGMENTS_FILE, REPORT_FILE, CHART_FILE, TABLE_FILE)
    print(f"\nwrote {', '.join(str(out / n) for n in names)}")
    pooled = report.overall()
    counts = [c for c in (pooled.before, pooled.after) if c is not None]
    if any(c.n and c.unparsed == c.n for c in counts):
        print(f"soteria eval: warning: the judge labelled no answer ({judge.name}); every verdict is 'unparsed'. "
              f"The errors are in {out / JUDGMENTS_FILE}", file=sys.stderr)  # fmt: skip
        return 1
    return 0
