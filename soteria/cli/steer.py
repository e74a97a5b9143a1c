"""``soteria steer``: steer a model (in memory, or a checkpoint on disk) and save it."""

from __future__ import annotations

import os
from pathlib import Path

from ..defaults import DEFAULT_RELATIVE_SCALE
from ..export import CONFIG_NAME, PATCH_NAME, SoteriaPatch, damage_check, save_steered, steer_checkpoint
from ..io.atomic import check_target, check_writable
from ..models.loading import load_model, model_shape
from ..steer import SoteriaPatcher
from ..steer.plan import check_plan, derived_kind, harm_path
from ..tune import load_tune_config
from .args import (
    add_find_args,
    add_model_args,
    add_write_args,
    check_scale_arg,
    harm_arg,
    heads_arg,
    parse_langs,
    parse_scale,
    push_written,
)


def _config_arg(args):
    """``(config, harm)`` from ``--config`` (None, None without it); the flags it replaces are refused."""
    if args.config is None:
        if not args.langs:
            raise ValueError("give --langs (or --config FILE from `soteria tune`)")
        return None, None
    flags = (("--heads", args.heads), ("--heads-from", args.heads_from), ("--relative-scale", args.relative_scale))
    given = [flag for flag, v in flags if v] + (["--scale"] if args.scale != "auto" else [])
    if given:
        raise ValueError(f"--config gives the heads and scales; drop {', '.join(given)}")
    config, harm = load_tune_config(args.config)
    if args.langs and parse_langs(args.langs) != list(config.languages):
        raise ValueError(f"--langs {' '.join(args.langs)} differ from the config's languages {config.languages}")
    if args.harm is not None:
        harm = harm_arg(args.harm)
    if harm is None and args.streaming and config.harm_source:  # in memory, apply reads it again
        harm = harm_arg(harm_path(config.harm_source))
    return config, harm


def _heads(n: int) -> str:
    return f"{n} head{'s' if n != 1 else ''}"


def _save(model, tokenizer, args) -> Path:
    """The steered model as a full checkpoint, or with ``--patch-only`` as a patch; both after the KL check."""
    if not args.patch_only:
        return save_steered(
            model, args.out, tokenizer=tokenizer, overwrite=args.overwrite, max_kl=args.max_kl, force=args.force
        )
    langs = list(SoteriaPatcher.config(model).languages)
    damage = damage_check(model, tokenizer, langs, max_kl=args.max_kl, force=args.force)
    return SoteriaPatch.from_model(model, damage=damage).save(args.out, overwrite=args.overwrite)


def run(args) -> int:
    config, config_harm = _config_arg(args)
    langs = list(config.languages) if config else parse_langs(args.langs)
    scale = config.scale if config else parse_scale(args.scale)
    relative = None if args.relative_scale is None else parse_scale(args.relative_scale)
    if relative is not None and (scale != "auto" or relative == "auto"):
        raise ValueError("--relative-scale takes a number (or LANG=VALUE pairs) and goes with --scale auto")
    heads = config.heads if config else heads_arg(args, langs)
    check_scale_arg(scale, langs)
    if args.patch_only and args.streaming:
        raise ValueError("--patch-only writes the edit of a model steered in memory; drop --streaming")
    ours = PATCH_NAME if args.patch_only else CONFIG_NAME
    check_target(Path(os.path.abspath(args.out)), args.overwrite, ours=ours)  # before the model loads
    check_writable(args.out)
    if heads is not None:  # explicit heads against the model's shape, read from its config alone
        shape = model_shape(args.model, gguf_file=args.gguf_file)
        if shape is not None:
            check_plan(langs, heads, "auto" if scale == "auto" else scale, *shape)
    if args.harm_gguf_file and (args.harm is None or args.harm.endswith(".safetensors")):
        raise ValueError("--harm-gguf-file names a GGUF file inside the --harm folder; give --harm FOLDER")
    if args.streaming:
        if args.gguf_file:
            raise ValueError("--streaming edits safetensors shards on disk; convert the GGUF file first with "
                             "`soteria convert MODEL --gguf-file NAME --out DIR`, or drop --streaming")  # fmt: skip
        if heads is None:
            raise ValueError("--streaming edits a checkpoint without loading it: give --heads or --heads-from")
        if (args.harm is None or derived_kind(args.harm)) and config_harm is None:
            raise ValueError("--streaming needs --harm (a harmful fine-tune directory or a saved HarmVector); "
                             "a derived direction (gradients, finetune) needs the model loaded")  # fmt: skip
        if isinstance(heads, list):
            heads = {lang: heads for lang in langs}
        harm = config_harm if config_harm is not None else harm_arg(args.harm)
        out = steer_checkpoint(args.model, args.out, heads=heads, harm=harm, scale=scale, overwrite=args.overwrite)
        print(f"steered {_heads(len({tuple(p) for pairs in heads.values() for p in pairs}))} for {', '.join(langs)}")
    elif config is not None:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
        SoteriaPatcher.apply(model, config, harm=config_harm, tokenizer=tokenizer)
        out = _save(model, tokenizer, args)
        n = len(SoteriaPatcher.config(model).head_union)
        print(f"steered {_heads(n)} for {', '.join(langs)} (from {args.config})")
    else:
        harm = harm_arg(args.harm)
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
        SoteriaPatcher.apply(
            model, langs, harm=harm, scale=scale, relative_scale=relative, top_k=args.top_k, heads=heads,
            tokenizer=tokenizer, method=args.method,
            harm_kwargs={"gguf_file": args.harm_gguf_file} if args.harm_gguf_file else None,
        )  # fmt: skip
        config = SoteriaPatcher.config(model)
        out = _save(model, tokenizer, args)
        print(f"steered {_heads(len(config.head_union))} for {', '.join(langs)}")
    print(f"wrote {out}")
    push_written(out, args)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="steer a model and save it", description="Steer the selected heads' output "
                       "projections away from the harm direction; save as safetensors with a model card.")  # fmt: skip
    add_model_args(p)
    p.add_argument("--langs", nargs="+", default=None, help="language codes, e.g. hi bn (optional with --config)")
    p.add_argument("--config", default=None, metavar="FILE", help="the chosen.json of `soteria tune` (heads, "
                   "scales and harm vector), or a steered model's soteria_config.json with --harm")  # fmt: skip
    p.add_argument("--harm", default=None, help="harmful fine-tune (directory or Hub id), a saved HarmVector "
                   "(.safetensors), or a direction derived from the model on the built-in refusal data: "
                   "'finetune' (default: a short refusal fine-tune of the found heads, steered at 1.0) or "
                   "'gradients'")  # fmt: skip
    p.add_argument("--harm-gguf-file", default=None, metavar="NAME", help="the harmful fine-tune is this GGUF file "
                   "in the --harm folder")  # fmt: skip
    p.add_argument("--scale", default="auto", help="lambda: a float, or per language, e.g. hi=1.0,bn=0.5; auto "
                   "(default): 1.0 for a harmful fine-tune and for finetune, calibrated by --relative-scale for "
                   "the gradient direction")  # fmt: skip
    p.add_argument("--relative-scale", default=None, help="with --scale auto: the edit's size relative to the "
                   "steered slices' weights, a float or per language (default "
                   f"{DEFAULT_RELATIVE_SCALE:g} for a direction)")  # fmt: skip
    add_find_args(p)
    p.add_argument("--heads", default=None, help="explicit heads LAYER:HEAD,... (skips head finding)")
    p.add_argument("--heads-from", nargs="+", default=None, help="HeadScores JSON files from `soteria heads`")
    p.add_argument("--streaming", action="store_true", help="edit a checkpoint directory on disk without loading it")
    p.add_argument("--patch-only", action="store_true", help="write only the edit, a small patch file that "
                   "`soteria apply` or SoteriaPatch.from_pretrained(DIR).apply(base) puts on the base")  # fmt: skip
    add_write_args(p)
    p.set_defaults(func=run)
