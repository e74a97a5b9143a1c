"""``soteria apply``: put a patch (``soteria steer --patch-only``) on its base model and save the result."""

from __future__ import annotations

import os
from pathlib import Path

from ..export import CONFIG_NAME, SoteriaPatch, save_steered, steer_checkpoint
from ..io.atomic import check_target, check_writable
from ..models.loading import load_model
from .args import add_write_args, push_written


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
    push_written(out, args)
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
    add_write_args(p, "replace --out if it exists (only a soteria output)")
    p.set_defaults(func=run)
