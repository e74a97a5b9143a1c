"""AtP vs exact activation patching (with its prefix KV cache, and the old way without): agreement and cost.

    python -m benchmarks.attribution            # every config (the old exact path alone takes ~15 min on 2 cores)
    python -m benchmarks.attribution --quick    # the small ones only
    python -m benchmarks.attribution --full-runs 0   # skip the old exact path

For each tiny randomly initialised model (several families, up to 32 layers x 32 heads) the
methods score every head on the same English probe prompts (10 shots by default, as
``build_prompts``). Printed and appended to ``benchmarks/results/attribution.csv``: Spearman
correlation of the AtP and exact head rankings (average indirect effect over the prompts),
overlap of the top 10% heads, the largest difference between the exact method and the old
exact path relative to the largest effect, wall times and their ratios. AtP and exact are timed
alike: ``--warmup`` untimed calls, then the median of ``--runs`` calls; the old exact path
(``method="exact_full"``: every patched copy runs the whole prompt) runs ``--full-runs`` times
after them, the model already warm. Every time includes the clean passes for the mean
activations. Counts come from a hook on the model: forward passes and the tokens they take
(``exact_rows`` is the ``L*H + 1`` patched and unpatched copies per prompt, however packed). CPU
time (``time.process_time``) and the 1-minute load average before and after are recorded
beside wall time, because a shared machine inflates wall times unevenly.
``benchmarks/results/attribution.png`` plots the table.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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


@contextlib.contextmanager
def _counting(model):
    """Counts the model's forward passes and the tokens they take (``input_ids.numel()``)."""
    seen = {"passes": 0, "tokens": 0}

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen["passes"] += 1
        seen["tokens"] += int(ids.numel()) if isinstance(ids, torch.Tensor) else 0

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _timed(fn, model, warmup: int, runs: int):
    """``warmup`` untimed calls, then ``runs`` timed ones; the first call of all is counted
    (:func:`_counting`). Returns (median wall s, median CPU s, last result, counts)."""
    times = []

    def call():
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        return out, (time.perf_counter() - t0, time.process_time() - c0)

    with _counting(model) as counts:
        out, t = call()
    if not warmup:
        times.append(t)
    for _ in range(max(0, warmup - 1)):
        fn()
    while len(times) < runs:
        out, t = call()
        times.append(t)
    wall = sorted(t[0] for t in times)[len(times) // 2]  # median: the CPU may be shared
    cpu = sorted(t[1] for t in times)[len(times) // 2]
    return wall, cpu, out, counts


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def run(
    configs,
    *,
    n_shots: int,
    n_trials: int,
    exact_batch: int | None,
    warmup: int,
    runs: int,
    full_runs: int,
    seed: int = 0,
) -> list[dict]:
    tok = tiny_tokenizer()
    clean, corrupted, targets = _prompts(tok, n_shots, n_trials)
    n = len(corrupted)
    mean_tokens = round(sum(len(tok(p)["input_ids"]) for p in corrupted) / n)
    rows = []
    for family, layers, heads, head_dim in configs:
        model = _model(family, layers, heads, head_dim, seed)
        args = (model, tok, clean, corrupted, targets)
        load = _load()
        atp_s, atp_cpu, atp, atp_n = _timed(
            functools.partial(indirect_effects, *args, method="atp", batch_size=n), model, warmup, runs
        )
        exact_s, exact_cpu, exact, exact_n = _timed(
            functools.partial(indirect_effects, *args, method="exact", batch_size=exact_batch), model, warmup, runs
        )
        row_full: dict = {}
        if full_runs:
            full_s, full_cpu, full, full_n = _timed(
                functools.partial(indirect_effects, *args, method="exact_full", batch_size=exact_batch),
                model,
                0,
                full_runs,
            )
            row_full = {
                "full_s": round(full_s, 2),
                "full_over_exact": round(full_s / exact_s, 1),
                "full_over_atp": round(full_s / atp_s, 1),
                "fast_vs_full_rel": float(f"{(exact - full).abs().max().item() / full.abs().max().item():.2g}"),
                "full_passes": full_n["passes"],
                "full_tokens": full_n["tokens"],
                "full_cpu_s": round(full_cpu, 2),
            }
        a, e = atp.mean(0), exact.mean(0)  # average indirect effect per head: the ranking used
        protocol = f"warm {warmup} + median of {runs}" + (f"; old exact: {full_runs} run(s)" if full_runs else "")
        rows.append(
            {
                "family": family,
                "layers": layers,
                "heads": heads,
                "head_dim": head_dim,
                "prompts": n,
                "shots": n_shots,
                "tokens": mean_tokens,
                "atp_s": round(atp_s, 3),
                "exact_s": round(exact_s, 3),
                "exact_over_atp": round(exact_s / atp_s, 2),
                "exact_cpu_over_atp": round(exact_cpu / atp_cpu, 2),
                **{k: row_full.get(k, "") for k in ("full_s", "full_over_exact", "full_over_atp")},
                "settings": (
                    f"{family} {layers}x{heads} D{head_dim}, {n} prompts x {n_shots} shots (~{mean_tokens} tok), "
                    f"bs atp {n} / exact {exact_batch or 'default'}, {torch.get_num_threads()} thread(s), "
                    f"{protocol}, load {load:.2f}"
                ),
                "spearman": round(spearman(a, e), 4),
                "top10_overlap": round(top_overlap(a, e), 4),
                "spearman_per_prompt": round(
                    float(torch.tensor([spearman(atp[i], exact[i]) for i in range(n)]).median()), 4
                ),
                "max_abs_effect": float(f"{e.abs().max().item():.3g}"),
                "fast_vs_full_rel": row_full.get("fast_vs_full_rel", ""),
                "atp_passes": atp_n["passes"],
                "atp_tokens": atp_n["tokens"],
                "exact_passes": exact_n["passes"],
                "exact_tokens": exact_n["tokens"],
                "exact_rows": n * (layers * heads + 1),
                **{k: row_full.get(k, "") for k in ("full_passes", "full_tokens", "full_cpu_s")},
                "atp_cpu_s": round(atp_cpu, 3),
                "exact_cpu_s": round(exact_cpu, 3),
                "threads": torch.get_num_threads(),
                "load1": round(load, 2),
                "load1_after": round(_load(), 2),
                **provenance(),
            }
        )
        print_table(rows[-1:], TABLE)
    return rows


COUNTS = ["atp_passes", "atp_tokens", "exact_passes", "exact_tokens", "exact_rows", "full_passes", "full_tokens"]
TABLE = ["family", "layers", "heads", "atp_s", "exact_s", "exact_over_atp", "full_s", "full_over_exact", "settings"]


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
    ax2.bar([i - w / 2 for i in x], [r["exact_over_atp"] for r in rows], w, color="C2", label="exact / AtP")
    full = [r["full_over_atp"] if r["full_over_atp"] != "" else 0 for r in rows]
    ax2.bar([i + w / 2 for i in x], full, w, color="C3", label="old exact (no cache) / AtP")
    ax2.axhline(3, color="k", ls=":", lw=1, label="3x")
    ax2.set_yscale("log")
    ax2.set_title(f"wall time / AtP's ({rows[0]['shots']} shots; protocol and load: CSV 'settings')", fontsize=9)
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
    p.add_argument("--n-shots", type=int, default=10, help="demonstrations per prompt (build_prompts' default)")
    p.add_argument("--n-trials", type=int, default=2, help="prompts per task (two tasks)")
    p.add_argument(
        "--exact-batch",
        type=int,
        default=None,
        help="batch_size of both exact methods (default: the library's; last-token passes take 8x as many rows)",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing, AtP and exact alike")
    p.add_argument("--runs", type=int, default=5, help="timed calls (median), AtP and exact alike")
    p.add_argument(
        "--full-runs",
        type=int,
        default=1,
        help="timed calls of the old exact path (every patched copy runs the whole prompt); 0 skips it",
    )
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
        QUICK if args.quick else CONFIGS,
        n_shots=args.n_shots,
        n_trials=args.n_trials,
        exact_batch=args.exact_batch,
        warmup=args.warmup,
        runs=args.runs,
        full_runs=args.full_runs,
    )
    print()
    print_table(rows, TABLE)
    print()
    print_table(rows, ["family", "layers", "heads", "spearman", "top10_overlap", "fast_vs_full_rel", *COUNTS])
    if not args.no_csv:
        print(f"\nappended to {append_csv('attribution', rows)}")
        print(f"plot: {plot(rows, RESULTS / 'attribution.png')}")
    return rows


if __name__ == "__main__":
    main()
