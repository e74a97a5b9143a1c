"""A real steering shared as a patch vs as a full copy: bytes on disk, and the time to write and apply each.

Steers Qwen2.5-Coder-0.5B-Instruct (fetched through pip) with soteria's defaults for ``--langs``
(heads from the cache when ``soteria.find_heads`` has run before), then writes it both ways:

- ``SoteriaPatch.from_model(model).save(dir)``: the new head slices plus a header;
- ``save_steered(model, dir)``: the whole checkpoint (the KL check skipped, ``max_kl=None`` and no
  tokenizer, so both sides time only the writing);

and reads and applies the patch to the loaded base (``SoteriaPatch.from_pretrained(dir).apply(base)``,
the fingerprints checked; then reverted). Each time is the median of ``--repeats`` runs in this one
process. Loading a checkpoint is not timed: transformers maps safetensors lazily, so the time depends on
the page cache more than on the format. Rows go to ``benchmarks/results/patch.csv``.

    python -m benchmarks.patch [--langs es fr de] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from soteria import SoteriaPatch, SoteriaPatcher, save_steered
from soteria.models.pretrained import load_pretrained

from .common import append_csv, print_table, provenance


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--langs", nargs="+", default=["es", "fr", "de"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    model, tok = load_pretrained(args.model)
    SoteriaPatcher.apply(model, args.langs, tokenizer=tok)
    config = SoteriaPatcher.config(model)
    with tempfile.TemporaryDirectory(prefix="soteria-bench-patch-") as tmp:
        tmp = Path(tmp)
        patch = SoteriaPatch.from_model(model)
        t_patch_write = _median(lambda: patch.save(tmp / "patch", overwrite=True), args.repeats)
        t_full_write = _median(lambda: save_steered(model, tmp / "full", overwrite=True, max_kl=None), args.repeats)
        patch_bytes, full_bytes = _bytes(tmp / "patch"), _bytes(tmp / "full")
        file_bytes = (tmp / "patch" / "soteria_patch.safetensors").stat().st_size

        SoteriaPatcher.revert(model)

        def apply_patch():
            SoteriaPatch.from_pretrained(tmp / "patch").apply(model)
            SoteriaPatcher.revert(model)

        t_patch_apply = _median(apply_patch, args.repeats)
    settings = f"{args.model}, defaults for {' '.join(args.langs)}, fp32, median of {args.repeats}"
    row = {
        "model": args.model,
        "langs": " ".join(args.langs),
        "heads": len(config.head_union),
        "slice_bytes": patch.nbytes,
        "patch_file_bytes": file_bytes,
        "header_bytes": file_bytes - patch.nbytes,
        "patch_folder_bytes": patch_bytes,
        "full_folder_bytes": full_bytes,
        "size_ratio": round(full_bytes / patch_bytes, 1),
        "patch_write_s": round(t_patch_write, 3),
        "full_write_s": round(t_full_write, 3),
        "read_and_apply_patch_s": round(t_patch_apply, 3),
        "settings": settings,
        **provenance(),
    }
    print_table([row], list(row)[:12])
    print(f"settings: {settings}; device {row['device']}")
    print(f"wrote {append_csv('patch', [row])}")


if __name__ == "__main__":
    main()
