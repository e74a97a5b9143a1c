"""``soteria apply``: put a patch (``soteria steer --patch-only``) on its base model and save the result."""

from __future__ import annotations

import os
from pathlib import Path

from ..defaults import DEFAULT_MAX_KL
from ..export import CONFIG_NAME, SoteriaPatch, push_to_hub, save_steered, steer_checkpoint
from ..io.atomic import check_target, check_writable
from ..models.loading import load_model


def run(args) -> int:
    out = Path(os.path.abspath(args.out))
    check_target(out, args.overwrite, ours=CONFIG_NAME)  # before the patch and the model are read
    check_writable(out)
    patch = SoteriaPatch.from_pretrained(args.patch)
    n = len(patch.slices)
    if args.streaming:
        if args.gguf_file:
            raise ValueError("--streaming edits safetensors shards on disk; convert the GGUF file first with "
                             "`soteria convert`, or drop --streaming")  # fmt: skip
        steer_checkpoint(args.model, out, patch=patch, overwrite=args.overwrite)
    else:
        dtype = args.dtype or next(iter(patch.fingerprints.values()))["dtype"]  # the weights the patch was made on
        model, tokenizer = load_model(args.model, dtype=dtype, device=args.device, gguf_file=args.gguf_file)
        patch.apply(model)
        save_steered(model, out, tokenizer=tokenizer, overwrite=args.overwrite, max_kl=args.max_kl, force=args.force)
    print(f"applied {n} head{'s' if n != 1 else ''} for {', '.join(patch.config.languages)} from {args.patch}")
    print(f"wrote {out}")
    if args.push:
        info = push_to_hub(out, args.push, private=not args.public, token=args.token)
        print(f"pushed to {getattr(info, 'commit_url', None) or args.push}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("apply", help="apply a patch to its base model and save the steered model",
                       description="Write a full steered checkpoint from a soteria patch (a folder or Hub id "
                       "written by `soteria steer --patch-only`) and the base model it was made for; another "
                       "base (or revision, or dtype) is refused.")  # fmt: skip
    p.add_argument("patch", help="patch folder, its soteria_patch.safetensors, or a Hub id")
    p.add_argument("--model", required=True, help="the base model: directory, Hub id, pretrained:<name> or tiny:<type>")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="load this GGUF file from the model directory")
    p.add_argument("--dtype", default=None, help="load the base in this dtype (default: the patch's dtype)")
    p.add_argument("--device", default=None, help="device or device_map for loading, e.g. cuda, auto")
    p.add_argument("--streaming", action="store_true", help="edit the base checkpoint directory on disk without "
                   "loading it (the same tensors as the in-memory path)")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only a soteria output)")
    p.add_argument("--max-kl", type=float, default=DEFAULT_MAX_KL, help="refuse to write a model whose next-token "
                   f"KL on built-in harmless prompts exceeds this (default {DEFAULT_MAX_KL:g})")  # fmt: skip
    p.add_argument("--force", action="store_true", help="write even when the KL check fails (the card says so)")
    p.add_argument("--push", metavar="REPO_ID", default=None, help="push the result to this Hub repo afterwards")
    p.add_argument("--public", action="store_true", help="make a pushed repo public (default: private)")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.set_defaults(func=run)
