"""Streaming checkpoint edit vs the reference's in-memory way: time and peak memory, side by side.

    python -m benchmarks.streaming                 # ~50 MB, ~190 MB, ~740 MB checkpoints (a few minutes)
    python -m benchmarks.streaming --quick         # the smallest only
    python -m benchmarks.streaming --plot-only     # redraw the plot from the CSV
    python -m benchmarks.streaming --vs-cp         # `soteria steer --streaming` vs `cp -r`, per GB
                                                   # (benchmarks/streaming_cp.py; its options follow)

For each size, random fp32 Llama-shaped base and "harmful" checkpoints are written (sharded,
tensor by tensor, no model built) and a quarter of all heads is steered two ways, each in its
own subprocess:

- streaming: :func:`soteria.steer_checkpoint` (one output projection at a time);
- reference: the original implementation's way: load the base and harmful models, take the
  full difference of every parameter, build a dense float64 mask for every parameter, compute
  ``base - scale * mask * tau`` and ``save_pretrained``.

Time is the operation alone (imports done before); the streaming time includes fsyncing its
output, the reference's ``save_pretrained`` does not fsync. Peak memory is the subprocess's
VmHWM, also given as growth above its RSS once imports are done (this includes first-use costs,
about 15 MiB for streaming, besides the tensors). Both read from the page cache (the checkpoints
were just written). ``max_abs_diff`` compares the two outputs (the reference computes in
float64, the kernel in float32; every other tensor is identical). Printed, appended to
``benchmarks/results/streaming.csv`` and plotted to ``benchmarks/results/streaming.png``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_csv, print_table, provenance

# (hidden, layers): ~43 * hidden^2 bytes per layer in fp32 (q, k, v, o, gate/up/down at 2.75x).
SIZES = [(512, 4), (1024, 4), (1024, 16)]
HEADS = 8  # query heads per layer; 2 key/value heads
SCALE = 0.7


# --------------------------------------------------------------------------- checkpoints


def _config(hidden: int, layers: int):
    from soteria.models.tiny import tiny_config

    return tiny_config(
        "llama",
        hidden_size=hidden,
        intermediate_size=int(2.75 * hidden),
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
    )


def write_checkpoint(
    folder: Path, config, seed: int, shard_bytes: int = 200 << 20, dtype: torch.dtype = torch.float32
) -> dict[str, tuple]:
    """Random sharded checkpoint of ``config`` (``dtype``) written shard by shard; returns the shapes."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    groups, cur, size = [], [], 0
    itemsize = torch.empty((), dtype=dtype).element_size()
    for k, shape in shapes.items():
        cur.append(k)
        size += itemsize * torch.Size(shape).numel()
        if size >= shard_bytes:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shapes[k], generator=gen) * 0.02).to(dtype) for k in names}
        save_file(tensors, folder / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    total = sum(itemsize * torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.to_json_file(folder / "config.json")
    return shapes


def _heads(layers: int) -> list[list[int]]:
    """A quarter of all heads, spread over layers and head indices."""
    return [[layer, h] for layer in range(layers) for h in range(HEADS) if (layer + h) % 4 == 0]


# --------------------------------------------------------------------------- workers (subprocesses)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def _reference(base: str, harm: str, out: str, heads: list[list[int]], scale: float) -> None:
    """The original implementation's way: everything in memory, a dense float64 mask per parameter."""
    from transformers import AutoModelForCausalLM

    from soteria.arch import head_sites

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    harmful = AutoModelForCausalLM.from_pretrained(harm, dtype=torch.float32)
    base_sd, harm_sd = model.state_dict(), harmful.state_dict()
    tau = {k: harm_sd[k] - v for k, v in base_sd.items()}
    mask = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in base_sd.items()}
    sites = head_sites(model)
    for layer, h in heads:
        d = sites[layer].head_dim
        mask[sites[layer].param_name][:, h * d : (h + 1) * d] = 1.0
    with torch.no_grad():
        for k, p in base_sd.items():
            p.copy_((p.double() - scale * mask[k] * tau[k]).to(p.dtype))
    model.save_pretrained(out)


def _worker(argv: list[str]) -> None:
    method, base, harm, out, heads, scale = argv
    heads, scale = json.loads(heads), float(scale)
    # Every import before the baseline, for both methods alike.
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from huggingface_hub import ModelCardData  # noqa: F401
    from tqdm.auto import tqdm  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM  # noqa: F401

    import soteria.arch  # noqa: F401
    import soteria.export  # noqa: F401
    import soteria.harm  # noqa: F401
    import soteria.steer  # noqa: F401
    import soteria_kernels  # noqa: F401
    from soteria import steer_checkpoint

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
    except OSError:
        pass
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    if method == "streaming":
        steer_checkpoint(base, out, heads={"en": heads}, harm=harm, scale=scale, progress=False)
    else:
        _reference(base, harm, out, heads, scale)
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "hwm": _status("VmHWM"), "rss0": rss0}))


def _run(method: str, base: Path, harm: Path, out: Path, heads, scale: float) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [sys.executable, "-m", "benchmarks.streaming", "--worker", method, str(base), str(harm), str(out),
           json.dumps(heads), str(scale)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{method} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors import safe_open

    from soteria.io.checkpoint import checkpoint_shards

    weight_map, other = checkpoint_shards(a)[0], checkpoint_shards(b)[0]
    worst = 0.0
    for key, fname in weight_map.items():
        with safe_open(a / fname, framework="pt") as fa, safe_open(b / other[key], framework="pt") as fb:
            x, y = fa.get_tensor(key), fb.get_tensor(key)
        worst = max(worst, float((x.double() - y.double()).abs().max()))
    return worst


# --------------------------------------------------------------------------- driver


def bench_size(hidden: int, layers: int, workdir: Path) -> dict:
    config = _config(hidden, layers)
    root = Path(tempfile.mkdtemp(prefix=f"soteria-stream-{hidden}x{layers}-", dir=workdir))
    try:
        shapes = write_checkpoint(root / "base", config, seed=0)
        write_checkpoint(root / "harm", config, seed=1)
        ckpt = sum(p.stat().st_size for p in (root / "base").glob("*.safetensors"))
        o_proj = max(4 * torch.Size(s).numel() for k, s in shapes.items() if k.endswith("o_proj.weight"))
        heads = _heads(layers)
        res = {m: _run(m, root / "base", root / "harm", root / m, heads, SCALE) for m in ("streaming", "reference")}
        diff = _max_abs_diff(root / "streaming", root / "reference")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mb = 1 << 20
    s, r = res["streaming"], res["reference"]
    return {
        "checkpoint_mb": round(ckpt / mb, 1),
        "layers": layers,
        "hidden": hidden,
        "o_proj_mb": round(o_proj / mb, 1),
        "heads": f"{len(heads)}/{layers * HEADS}",
        "stream_s": round(s["seconds"], 3),
        "ref_s": round(r["seconds"], 3),
        "speedup": round(r["seconds"] / s["seconds"], 1),
        "stream_peak_mb": round(s["hwm"] / mb, 1),
        "ref_peak_mb": round(r["hwm"] / mb, 1),
        "stream_growth_mb": round((s["hwm"] - s["rss0"]) / mb, 1),
        "ref_growth_mb": round((r["hwm"] - r["rss0"]) / mb, 1),
        "max_abs_diff": diff,
    }


def latest_rows(path: Path) -> list[dict]:
    """The most recent row per (device, checkpoint size)."""
    rows: dict[tuple, dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows[(row["device"], row["hidden"], row["layers"])] = row
    return sorted(rows.values(), key=lambda r: float(r["checkpoint_mb"]))


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from soteria.io.atomic import atomic_write_bytes

    x = [float(r["checkpoint_mb"]) for r in rows]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for col, label, style in (
        ("stream", "streaming (soteria)", "o-"),
        ("ref", "reference (in memory, dense mask)", "s--"),
    ):
        ax_t.plot(x, [float(r[f"{col}_s"]) for r in rows], style, label=label)
        ax_m.plot(x, [float(r[f"{col}_growth_mb"]) for r in rows], style, label=label)
    ax_m.plot(x, x, ":", color="gray", label="checkpoint size")
    ax_m.plot(x, [float(r["o_proj_mb"]) for r in rows], ":", color="green", label="largest o_proj")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    for ax, ylabel in ((ax_t, "seconds"), (ax_m, "peak RSS growth (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(x)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("checkpoint size (MiB, fp32)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    ax_t.set_title("time to steer and write", fontsize=9)
    ax_m.set_title(f"memory above the interpreter's baseline ({rows[0]['device']})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_bytes(out, buf.getvalue())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    if argv[:1] == ["--vs-cp"]:  # the whole CLI process against cp -r, time per GB
        from benchmarks import streaming_cp

        return streaming_cp.main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smallest checkpoint only")
    parser.add_argument("--sizes", nargs="+", metavar="HIDDENxLAYERS", help="e.g. 512x4 2048x8")
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints are written (temp)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV")
    args = parser.parse_args(argv)
    csv_path, png = RESULTS / "streaming.csv", RESULTS / "streaming.png"
    if args.plot_only:
        if not csv_path.exists():
            parser.error(f"{csv_path} not found: run `python -m benchmarks.streaming` first")
        print(f"wrote {plot(latest_rows(csv_path), png)}")
        return 0
    sizes = SIZES[:1] if args.quick else SIZES
    if args.sizes:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
    rows = [bench_size(h, n, args.workdir) for h, n in sizes]
    print_table(rows)
    append_csv("streaming", [{**r, **provenance()} for r in rows])
    print(f"appended {len(rows)} rows to {csv_path}; wrote {plot(latest_rows(csv_path), png)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
