"""AtP vs exact activation patching: agreement and cost, side by side on the same prompts.

    python -m benchmarks.attribution            # every config (a few minutes on 2 CPU cores)
    python -m benchmarks.attribution --quick    # the small ones only

For each tiny randomly initialised model (several families, up to 32 layers x 32 heads) both
methods score every head on the same English probe prompts. Printed and appended to
``benchmarks/results/attribution.csv``: Spearman correlation of the head rankings (average
indirect effect over the prompts), overlap of the top 10% heads, each method's wall time and
their ratio (AtP: one forward + one backward pass per batch, median of 5 runs; exact:
``L*H + 1`` forward passes per prompt, one run). Both include the clean forward passes for the
mean activations. CPU time (``time.process_time``) is recorded beside wall time because a
shared machine inflates wall times unevenly. ``benchmarks/results/attribution.png`` plots the
table.
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_csv, print_table, provenance
from soteria.heads.attribution import indirect_effects
from soteria.heads.probes import load_task
from soteria.heads.prompts import build_prompts
from soteria.io.atomic import atomic_write_bytes
from soteria.models.tiny import tiny_model, tiny_tokenizer

# (family, layers, heads, head_dim). Families: llama (GQA, RMSNorm, RoPE), gpt2 (Conv1D,
# LayerNorm, absolute positions), qwen2 (GQA with q/k/v biases), gemma (MQA, D = 16).
CONFIGS = [
    ("gpt2", 2, 4, 12),
    ("llama", 2, 4, 12),
    ("qwen2", 4, 8, 8),
    ("gemma", 4, 8, 16),
    ("gpt2", 12, 12, 8),
    ("llama", 8, 16, 8),
    ("llama", 16, 16, 8),
    ("llama", 32, 32, 8),  # Llama-3-8B's head grid (1,024 heads), at a CPU-sized width
]
QUICK = CONFIGS[:4]
TASKS = ("antonym", "country_capital")


def _model(family: str, layers: int, heads: int, head_dim: int, seed: int):
    hidden = heads * head_dim
    if family == "gpt2":
        kw = dict(n_layer=layers, n_head=heads, n_embd=hidden)
    else:
        kw = dict(
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=1 if family == "gemma" else max(1, heads // 4),
            hidden_size=hidden,
            intermediate_size=hidden,
            head_dim=head_dim,
        )
    return tiny_model(family, seed=seed, attn_implementation="sdpa", **kw)


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share their mean rank), as float64."""
    order = torch.argsort(x, stable=True)
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    xs = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        if j > i:
            ranks[order[i : j + 1]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two flat tensors (scipy's when installed)."""
    a, b = a.flatten().double(), b.flatten().double()
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a.numpy(), b.numpy()).statistic)
    except ImportError:
        ra, rb = _ranks(a), _ranks(b)
        return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def top_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.1) -> float:
    """|top-k(a) & top-k(b)| / k with k = max(1, round(frac * n))."""
    k = max(1, round(frac * a.numel()))
    ta = set(torch.topk(a.flatten(), k).indices.tolist())
    tb = set(torch.topk(b.flatten(), k).indices.tolist())
    return len(ta & tb) / k


def _prompts(tok, n_shots: int, n_trials: int):
    clean, corrupted, targets = [], [], []
    for task in TASKS:
        pp = build_prompts(load_task("en", task), tok, n_shots=n_shots, n_trials=n_trials, seed=0)
        clean += pp.clean
        corrupted += pp.corrupted
        targets += pp.target_ids
    return clean, corrupted, targets


def run(configs, *, n_shots: int, n_trials: int, exact_batch: int, seed: int = 0) -> list[dict]:
    tok = tiny_tokenizer()
    clean, corrupted, targets = _prompts(tok, n_shots, n_trials)
    n = len(corrupted)
    rows = []
    for family, layers, heads, head_dim in configs:
        model = _model(family, layers, heads, head_dim, seed)
        args = (model, tok, clean, corrupted, targets)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        for _ in range(3):  # warm-up: the first few CPU backward passes run several times slower
            indirect_effects(*args, method="atp", batch_size=n)
        times = []
        for _ in range(5):
            t0, c0 = time.perf_counter(), time.process_time()
            atp = indirect_effects(*args, method="atp", batch_size=n)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        atp_s, atp_cpu = sorted(times)[len(times) // 2]  # median: the CPU may be shared
        t0, c0 = time.perf_counter(), time.process_time()
        exact = indirect_effects(*args, method="exact", batch_size=exact_batch)
        exact_s, exact_cpu = time.perf_counter() - t0, time.process_time() - c0
        a, e = atp.mean(0), exact.mean(0)  # average indirect effect per head: the ranking used
        rows.append(
            {
                "family": family,
                "layers": layers,
                "heads": heads,
                "head_dim": head_dim,
                "prompts": n,
                "spearman": round(spearman(a, e), 4),
                "top10_overlap": round(top_overlap(a, e), 4),
                "spearman_per_prompt": round(
                    float(torch.tensor([spearman(atp[i], exact[i]) for i in range(n)]).median()), 4
                ),
                "max_abs_effect": float(f"{e.abs().max().item():.3g}"),
                "atp_s": round(atp_s, 4),
                "exact_s": round(exact_s, 3),
                "ratio": round(exact_s / atp_s, 1),
                "cpu_ratio": round(exact_cpu / atp_cpu, 1),
                "exact_forwards": n * (layers * heads + 1),
                "atp_cpu_s": round(atp_cpu, 4),
                "exact_cpu_s": round(exact_cpu, 3),
                "threads": torch.get_num_threads(),
                "load1": round(load, 2),
                **provenance(),
            }
        )
        print_table(rows[-1:], list(rows[-1])[:14])
    return rows


def plot(rows: list[dict], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = [f"{r['family']}\n{r['layers']}x{r['heads']}" for r in rows]
    x = range(len(rows))
    fig = Figure(figsize=(min(14.0, 3.0 + 1.4 * len(rows)), 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    w = 0.38
    ax1.bar([i - w / 2 for i in x], [r["spearman"] for r in rows], w, label="Spearman (AIE)")
    ax1.bar([i + w / 2 for i in x], [r["top10_overlap"] for r in rows], w, label="top-10% overlap")
    ax1.axhline(0.9, color="C0", ls=":", lw=1)
    ax1.axhline(0.8, color="C1", ls=":", lw=1)
    ax1.set_ylim(min(0.0, *(r["spearman"] for r in rows)), 1.3)
    ax1.set_title("AtP vs exact: agreement", fontsize=9)
    ax2.bar([i - w / 2 for i in x], [r["ratio"] for r in rows], w, color="C2", label="wall time")
    ax2.bar([i + w / 2 for i in x], [r["cpu_ratio"] for r in rows], w, color="C3", label="CPU time")
    ax2.axhline(100, color="k", ls=":", lw=1, label="100x")
    ax2.set_yscale("log")
    ax2.set_title("exact time / AtP time", fontsize=9)
    for ax in (ax1, ax2):
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, fontsize=7)
        ax.legend(fontsize=7, loc="upper left", ncol=3)
    fig.suptitle(f"attribution patching on {rows[0]['device']}", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the small configs")
    p.add_argument("--n-shots", type=int, default=2)
    p.add_argument("--n-trials", type=int, default=2, help="prompts per task (two tasks)")
    p.add_argument("--exact-batch", type=int, default=256, help="rows per forward pass of the exact method")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core box two threads make timings swing 10x)",
    )
    p.add_argument("--no-csv", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(
        QUICK if args.quick else CONFIGS, n_shots=args.n_shots, n_trials=args.n_trials, exact_batch=args.exact_batch
    )
    print()
    print_table(rows, list(rows[0])[:14])
    if not args.no_csv:
        print(f"\nappended to {append_csv('attribution', rows)}")
        print(f"plot: {plot(rows, RESULTS / 'attribution.png')}")
    return rows


if __name__ == "__main__":
    main()
