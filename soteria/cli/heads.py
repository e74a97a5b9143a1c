"""``soteria heads``: score every head per language; write HeadScores JSON and a heatmap each."""

from __future__ import annotations

import math

import torch.distributed

from ..arch import num_layers_heads
from ..heads import distributed, find_heads_multi
from ..heads.scores import resolve_k
from ..heads.search import AUTO_MAX_TRIALS, AUTO_STEP
from ..heads.text import check_text_args, text_sources
from ..io.atomic import check_writable
from ..models.loading import load_model
from .args import add_find_args, add_model_args, parse_langs, positive_int


def _trials(text: str) -> int | str:
    return text if text == "auto" else positive_int(text)


def _text_arg(values: list[str] | None, langs: list[str]):
    """``--text FILE`` (one language) or ``--text LANG=FILE ...`` -> find_heads_multi's ``text``."""
    if not values:
        return None
    if len(values) == 1 and "=" not in values[0]:
        if len(langs) > 1:
            raise ValueError(f"--text FILE is one language's sentences; for {len(langs)} languages give LANG=FILE "
                             "for each that has its own (e.g. --text es=es.txt fr=fr.txt)")  # fmt: skip
        return values[0]
    out = {}
    for v in values:
        lang, sep, path = v.partition("=")
        if not sep or not lang.strip() or not path.strip():
            raise ValueError(f"bad --text entry {v!r}; give FILE (one language) or LANG=FILE pairs")
        out[lang.strip()] = path.strip()
    return out


def _check_source(args, langs: list[str]):
    """``text`` for find_heads_multi; every --text file read and checked before the model loads."""
    text = _text_arg(args.text, langs)
    if args.source == "text":
        check_text_args(args.tasks, args.n_shots, args.n_trials, None, None, "reference")
        text_sources(langs, text, args.max_sentences, args.method)
    elif text is not None or args.max_sentences is not None:
        raise ValueError("--text and --max-sentences need --source text")
    return text


def run(args) -> int:
    """All languages in shared batches; under torchrun the prompts are sharded over the ranks
    and only rank 0 writes files, prints and shows the progress bar."""
    langs = parse_langs(args.langs)
    out = check_writable(args.out)
    text = _check_source(args, langs)
    owns_group = distributed.init_from_env()
    try:
        device = args.device
        if distributed.world_size() > 1:
            if device in ("auto", "balanced", "balanced_low_0", "sequential"):
                raise ValueError(
                    f"--device {device} splits one model over all GPUs, but under torchrun every rank loads its "
                    "own copy; use --device cuda (one GPU per rank) or run one process with --device auto"
                )
            if device == "cuda":
                device = str(distributed.local_device())
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=device, gguf_file=args.gguf_file)
        resolve_k(args.top_k, math.prod(num_layers_heads(model)))  # --top-k fits the model, before the work
        found = find_heads_multi(
            model, tokenizer, langs, method=args.method, tasks=args.tasks, n_shots=args.n_shots,
            n_trials=args.n_trials, seed=args.seed, batch_size=args.batch_size, cache=not args.no_cache,
            source=args.source, text=text, max_sentences=args.max_sentences,
        )  # fmt: skip
        if not distributed.is_main_process():
            return 0
        for lang in langs:
            scores = found[lang]
            json_path = scores.save(out / f"heads_{lang}.json")
            png_path = scores.plot(out / f"heads_{lang}.png", k=args.top_k)
            top = ", ".join(f"({l},{h})" for l, h in scores.top(args.top_k)[:10])
            print(f"{lang}: top heads {top}{' ...' if len(scores.top(args.top_k)) > 10 else ''}")
            print(f"{lang}: wrote {json_path} and {png_path}")
        return 0
    finally:
        if owns_group:
            torch.distributed.destroy_process_group()


def add_parser(sub) -> None:
    p = sub.add_parser("heads", help="find each language's functional heads", description="Score every attention "
                       "head per language (all languages in shared batches); write HeadScores JSON and a heatmap "
                       "PNG per language. Under torchrun (torchrun --nproc_per_node N -m soteria heads ...) the "
                       "prompts are sharded over the processes and rank 0 writes the files.")  # fmt: skip
    add_model_args(p)
    p.add_argument("--langs", nargs="+", required=True, help="language codes, e.g. hi bn")
    add_find_args(p)
    p.add_argument("--tasks", nargs="+", default=None, help="built-in task names (default: all)")
    p.add_argument("--n-shots", type=positive_int, default=10, help="demonstrations per few-shot prompt (default 10)")
    p.add_argument("--n-trials", type=_trials, default="auto", help="prompts per task, or auto (default): rounds "
                   f"of {AUTO_STEP} until the top-k set is stable, at most {AUTO_MAX_TRIALS}")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt sampling (default 0)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="prompts per forward pass (default: auto)")
    p.add_argument("--source", choices=["probes", "text"], default="probes", help="probes (default): the "
                   "languages' probe tasks; text: plain text in each language (no probe tasks needed)")  # fmt: skip
    p.add_argument("--text", nargs="+", default=None, metavar="[LANG=]FILE", help="with --source text: a .txt "
                   "(one sentence a line) or .jsonl file, or LANG=FILE for each language that has its own "
                   "(default: the built-in sentences)")  # fmt: skip
    p.add_argument("--max-sentences", type=positive_int, default=None, help="with --source text: use the first N")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of using the score cache")
    p.add_argument("--out", default="soteria-heads", help="output directory (default: soteria-heads)")
    p.set_defaults(func=run)
