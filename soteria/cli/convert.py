"""``soteria convert``: write a GGUF (or any loadable) model as a plain safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path

from ..io.atomic import atomic_directory, check_target
from ..models.loading import load_model


def run(args) -> int:
    out = Path(args.out)
    check_target(out, args.overwrite, ours="config.json")
    model, tokenizer = load_model(args.model, dtype=args.dtype, gguf_file=args.gguf_file)
    with atomic_directory(out, overwrite=args.overwrite, ours="config.json") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({model.config.model_type}, {n:,} parameters, {model.dtype}, safetensors)")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="write a GGUF (or any loadable) model as a plain safetensors checkpoint",
                       description="Load MODEL (e.g. a folder with --gguf-file NAME, dequantized) and save it as a "
                       "safetensors checkpoint with its tokenizer that plain transformers loads.")  # fmt: skip
    p.add_argument("model", help="model directory, Hub id or pretrained:<name>")
    p.add_argument("--gguf-file", default=None, metavar="NAME", help="the GGUF file in the model directory")
    p.add_argument("--dtype", default="auto", help="auto (the file's: float32 for GGUF), float32, bfloat16, float16")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)
