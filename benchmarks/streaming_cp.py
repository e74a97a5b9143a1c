"""``soteria steer --streaming`` as a whole process against ``cp -r``: time per GB on growing checkpoints.

    python -m benchmarks.streaming_cp                     # bf16 ~0.35, ~1.4, ~4.2 GB + the real 0.5B model
    python -m benchmarks.streaming_cp --sizes 1024x16     # one synthetic size
    python -m benchmarks.streaming_cp --no-real           # synthetic checkpoints only

Every timing is the wall time of one whole process started from the shell, the median of
``--repeats`` (3) runs, the four commands interleaved in each round:

- ``cp``: ``cp -r BASE OUT`` (the written pages are left dirty in the page cache);
- ``cp+sync``: ``cp -r BASE OUT && sync OUT/*`` (written to disk, as the steered output is:
  ``steer_checkpoint`` fsyncs every file before its output folder appears);
- ``env``: ``soteria env``, the cost of starting Python with torch, transformers and triton;
- ``steer``: ``soteria steer BASE --streaming --langs es --heads L:H,... --harm HARM.safetensors
  --scale 1.0 --out OUT``: 3 heads of 3 layers (the layers at 1/8, 5/12 and 17/24 of the depth),
  the harm a saved HarmVector of those layers' output projections.

The source checkpoint is read once before the rounds (page cache warm, as for ``cp``), the
output folders are removed and ``sync`` run between commands (outside the timings). The 1-minute
load average is recorded before and after each checkpoint (the machine may be shared).
Synthetic checkpoints are random bf16 Llama-shaped ones (8 heads, 2 key/value heads); the real one
is the 0.5B model cached by ``soteria.models.pretrained`` (fp32 on disk) and its bf16 copy.
Printed (with a least-squares fit ``fixed + per GB`` of each command over the checkpoints) and
appended to ``benchmarks/results/streaming_cp.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import append_csv, print_table, provenance
from benchmarks.streaming import HEADS, _config, write_checkpoint
from soteria.harm import HarmVector
from soteria.io.checkpoint import checkpoint_shards
from soteria.io.safetensors import read_tensor, save_tensors

SIZES = [(1024, 16), (2048, 16), (2048, 48)]  # bf16: ~0.35, ~1.4, ~4.2 GB
REAL = Path.home() / ".cache" / "soteria" / "models" / "qwen2.5-coder-0.5b-instruct" / "hf"
REPO = Path(__file__).resolve().parents[1]


def _sites(layers: int, heads: int) -> list[tuple[int, int]]:
    return sorted({(layers // 8, 1 % heads), ((5 * layers) // 12, 5 % heads), ((17 * layers) // 24, 12 % heads)})


def _o_proj(layer: int) -> str:
    return f"model.layers.{layer}.self_attn.o_proj.weight"


def write_harm(base: Path, pairs: list[tuple[int, int]], out: Path) -> Path:
    """A saved harmful-kind HarmVector: the base's output projections of ``pairs``' layers plus noise."""
    weight_map, _ = checkpoint_shards(base)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in sorted({lay for lay, _ in pairs}):
        w = read_tensor(base / weight_map[_o_proj(layer)], _o_proj(layer))
        tensors[layer] = (w.float() + 0.01 * torch.randn(w.shape, generator=gen)).to(w.dtype)
    names = {layer: _o_proj(layer) for layer in tensors}
    return HarmVector(tensors, kind="harmful", param_names=names, source="benchmark:random").save(out)


def bf16_copy(src: Path, dst: Path) -> Path:
    """``src`` (a single-file checkpoint) with every float tensor stored as bf16."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copyfile(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "dtype": "bfloat16", "torch_dtype": "bfloat16"}, indent=2))
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}  # noqa: SIM118
    save_tensors(tensors, dst / "model.safetensors", meta)
    return dst


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return seconds


def bench(name: str, base: Path, harm: Path, pairs, work: Path, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    out = work / "out"
    soteria = [sys.executable, "-m", "soteria"]
    heads = ",".join(f"{layer}:{h}" for layer, h in pairs)
    commands = {
        "cp": ["cp", "-r", str(base), str(out)],
        "cp_sync": ["sh", "-c", f'cp -r "{base}" "{out}" && sync "{out}"/*'],
        "env": [*soteria, "env"],
        "steer": [*soteria, "steer", str(base), "--streaming", "--langs", "es", "--heads", heads,
                  "--harm", str(harm), "--scale", "1.0", "--out", str(out)],
    }  # fmt: skip
    size = sum(f.stat().st_size for f in base.rglob("*") if f.is_file())
    for f in base.rglob("*.safetensors"):  # page cache warm, as for every later round
        subprocess.run(["cat", str(f)], stdout=subprocess.DEVNULL, check=True)
    load0 = os.getloadavg()[0]
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeats):
        for key, cmd in commands.items():
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            times[key].append(_timed(cmd, env))
    shutil.rmtree(out, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    gb = size / 1e9
    return {
        "checkpoint": name,
        "gb": round(gb, 3),
        "heads": heads,
        **{f"{k}_s": round(v, 3) for k, v in med.items()},
        "steer_s_per_gb": round(med["steer"] / gb, 3),
        "cp_s_per_gb": round(med["cp"] / gb, 3),
        "x_cp": round(med["steer"] / med["cp"], 2),
        "x_cp_sync": round(med["steer"] / med["cp_sync"], 2),
        "steer_runs": " ".join(f"{t:.2f}" for t in times["steer"]),
        "load_before": round(load0, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "repeats": repeats,
    }


def fit(rows: list[dict], key: str) -> tuple[float, float]:
    """Least-squares ``seconds = fixed + per_gb * gb`` over ``rows`` (start-up cost and cost per GB)."""
    xs, ys = [r["gb"] for r in rows], [r[key] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    per_gb = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - per_gb * mx, per_gb


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", metavar="HIDDENxLAYERS", help="synthetic sizes (default: three)")
    parser.add_argument("--no-real", action="store_true", help="skip the cached real 0.5B model")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="where checkpoints and outputs go (temp)")
    args = parser.parse_args(argv)
    sizes = SIZES if args.sizes is None else [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    print(f"settings: median of {args.repeats} whole-process runs; page cache warm; python {sys.executable}; "
          f"load average {os.getloadavg()[0]:.2f} at start; {os.cpu_count()} CPUs")  # fmt: skip
    rows = []
    root = Path(tempfile.mkdtemp(prefix="soteria-stream-cp-", dir=args.workdir))
    try:
        cases = []
        for hidden, layers in sizes:
            base = root / f"llama-{hidden}x{layers}"
            write_checkpoint(base, _config(hidden, layers), seed=0, dtype=torch.bfloat16)
            cases.append((f"synthetic {hidden}x{layers} bf16", base, _sites(layers, HEADS)))
        if not args.no_real and (REAL / "model.safetensors").is_file():
            pairs = _sites(24, 14)  # Qwen2.5-0.5B: 24 layers of 14 heads
            cases.append(("qwen2.5-0.5b bf16", bf16_copy(REAL, root / "qwen-bf16"), pairs))
            cases.append(("qwen2.5-0.5b fp32 (cached)", REAL, pairs))
        for name, base, pairs in cases:
            harm = write_harm(base, pairs, root / f"harm-{base.name}.safetensors")
            rows.append(bench(name, base, harm, pairs, root, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
            if base.parent == root:
                shutil.rmtree(base)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_table(rows, ["checkpoint", "gb", "cp_s", "cp_sync_s", "env_s", "steer_s", "steer_s_per_gb",
                       "cp_s_per_gb", "x_cp", "x_cp_sync", "load_before", "load_after"])  # fmt: skip
    if len({r["gb"] for r in rows}) > 1:
        for key in ("steer_s", "cp_s", "cp_sync_s"):
            fixed, per_gb = fit(rows, key)
            print(f"fit over these checkpoints, {key[:-2]}: {fixed:.2f} s + {per_gb:.3f} s/GB")
    path = append_csv("streaming_cp", [{**r, **provenance()} for r in rows])
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
