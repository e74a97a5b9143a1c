"""AtP's fidelity on real weights: attribution patching vs exact activation patching, head for head.

    python -m benchmarks.atp_fidelity              # 3 models x en es fr de, 5 tasks x 4 trials, 10 shots (~45 min on 2 cores)
    python -m benchmarks.atp_fidelity --models smollm2-135m-instruct --langs en --n-trials 2  # a quick look
    python -m benchmarks.atp_fidelity --plot-only  # redraw from the saved scores

AtP's agreement with exact patching was measured on random weights only
(``benchmarks/attribution.py``); trained models saturate attention softmaxes, where a first-order
expansion is known to miss heads (Kramar et al. 2024, "AtP*"). For each real model
(:data:`soteria.models.pretrained.MODELS`) and language, ``find_heads(model, tok, lang,
method=...)`` runs twice on the same prompts (same tasks, seed, ``--n-shots``, ``--n-trials``,
``cache=False``: both methods are computed, never read back), first ``"atp"``, then
``"exact"``. Per (model, lang), printed and appended to ``benchmarks/results/atp_fidelity.csv``:

- ``spearman`` / ``pearson``: rank and linear correlation of the two ``[L, H]`` score matrices;
- ``top8`` ``top16`` ``top32`` ``top_default``: ``|A & E| / k``, the share of exact's top-k heads
  that AtP's top-k also holds, at k = 8, 16, 32 and at the default k
  (:data:`soteria.defaults.DEFAULT_TOP_K` of ``L*H``, :func:`soteria.heads.scores.resolve_k`);
- ``worst_rank16``: the lowest AtP rank (1 = best) among exact's top-16 heads (how far AtP
  buries the head it ranks worst);
- ``atp_over_exact_top1``: AtP's estimate over the exact effect at exact's strongest head (under 1:
  the linear estimate falls short where the softmax saturates);
- ``atp_s`` / ``exact_s``: wall time of each ``find_heads`` call, and the 1-minute load average.

Both score matrices are kept in ``benchmarks/results/atp_fidelity_scores.json`` (the latest per
model, language and method), from which ``atp_fidelity.png`` is drawn: AtP against exact per
model (one colour per language, the diagonal is agreement) and the top-k overlaps.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.common import RESULTS, append_csv, print_table, provenance, save_png
from soteria.defaults import DEFAULT_TOP_K
from soteria.heads import find_heads
from soteria.heads.scores import resolve_k
from soteria.io.atomic import atomic_write_text
from soteria.models.pretrained import MODELS, load_pretrained

DEFAULT_MODELS = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct"]
KS = (8, 16, 32)
SCORES = RESULTS / "atp_fidelity_scores.json"
COLUMNS = ["model", "lang", "heads", "prompts", "spearman", "top8", "top16", "top32", "k_default", "top_default",
           "worst_rank16", "atp_over_exact_top1", "atp_s", "exact_s", "load1"]  # fmt: skip


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a.flatten().double().numpy(), b.flatten().double().numpy()).statistic)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


def top_set(x: torch.Tensor, k: int) -> set[int]:
    """Flat indices of the ``k`` highest scores; ties go to the lower index, as ``HeadScores.top``."""
    return set(torch.sort(-x.flatten(), stable=True).indices[:k].tolist())


def overlap(atp: torch.Tensor, exact: torch.Tensor, k: int) -> float:
    """``|top-k(AtP) & top-k(exact)| / k``."""
    return len(top_set(atp, k) & top_set(exact, k)) / k


def worst_rank(atp: torch.Tensor, exact: torch.Tensor, k: int) -> int:
    """The largest AtP rank (1 = AtP's best head) of any of exact's top-``k`` heads."""
    order = torch.sort(-atp.flatten(), stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return int(max(rank[i] for i in top_set(exact, k)))


def fidelity(atp: torch.Tensor, exact: torch.Tensor) -> dict:
    """The agreement columns of one (model, lang) row."""
    n = atp.numel()
    kd = resolve_k(DEFAULT_TOP_K, n)
    row = {"spearman": spearman(atp, exact), "pearson": pearson(atp, exact)}
    row.update({f"top{k}": overlap(atp, exact, k) for k in KS if k <= n})
    row.update({"k_default": kd, "top_default": overlap(atp, exact, kd), "worst_rank16": worst_rank(atp, exact, 16)})
    best = int(exact.flatten().argmax())
    row["atp_over_exact_top1"] = float(atp.flatten()[best] / exact.flatten()[best])
    return row


def _load_scores() -> dict:
    return json.loads(SCORES.read_text()) if SCORES.exists() else {}


def _save_scores(store: dict) -> None:
    SCORES.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(SCORES, json.dumps(store, sort_keys=True) + "\n")


def plot(store: dict):
    """Scatter AtP vs exact per model (top row) and top-k overlap bars per model (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in [*DEFAULT_MODELS, *sorted(store)] if m in store]
    models = list(dict.fromkeys(models))
    fig, axes = plt.subplots(2, len(models), figsize=(4.6 * len(models), 8), squeeze=False)
    for j, name in enumerate(models):
        ax, bx = axes[0][j], axes[1][j]
        order = ["en", "es", "fr", "de"]
        langs = sorted(store[name], key=lambda x: (order.index(x) if x in order else len(order), x))
        lo, hi = 0.0, 0.0
        labels, bars = [], {}
        for lang in langs:
            entry = store[name][lang]
            a, e = torch.tensor(entry["atp"]).flatten(), torch.tensor(entry["exact"]).flatten()
            row = fidelity(a, e)
            ax.scatter(e.numpy(), a.numpy(), s=7, alpha=0.6, label=f"{lang} (rho {row['spearman']:.2f})")
            lo, hi = min(lo, float(e.min()), float(a.min())), max(hi, float(e.max()), float(a.max()))
            labels.append(lang)
            for key in [f"top{k}" for k in KS] + ["top_default"]:
                bars.setdefault(key, []).append(row.get(key, float("nan")))
            kd = row["k_default"]
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        ax.ticklabel_format(style="sci", scilimits=(-2, 2))
        ax.locator_params(nbins=5)
        ax.set_xlabel("exact patching effect (dp)")
        ax.set_ylabel("AtP estimate (dp)")
        first = store[name][langs[0]]
        ax.set_title(f"{name}\n{first['shape'][0]}x{first['shape'][1]} heads, {len(first['tasks'])} tasks x "
                     f"{first['n_trials']} trials, {first['n_shots']} shots", fontsize=9)  # fmt: skip
        ax.legend(fontsize=7)
        width = 0.8 / len(bars)
        for i, (key, vals) in enumerate(bars.items()):
            label = f"top-{kd} (default)" if key == "top_default" else key.replace("top", "top-")
            offset = (i - (len(bars) - 1) / 2) * width
            bx.bar([x + offset for x in range(len(labels))], vals, width=width, label=label)
        bx.axhline(0.7, color="grey", lw=0.8, ls="--")
        bx.set_xticks(range(len(labels)), labels)
        bx.set_ylim(0, 1.25)
        bx.set_ylabel("|top-k AtP & top-k exact| / k")
        bx.set_title(f"{name}: top-k overlap (dashed: 0.7)", fontsize=9)
        bx.legend(fontsize=7, loc="upper center", ncol=len(bars))
    path = save_png(fig, "atp_fidelity")
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, choices=sorted(MODELS))
    ap.add_argument("--langs", nargs="+", default=["en", "es", "fr", "de"])
    ap.add_argument("--tasks", nargs="+", default=None, help="probe tasks (default: every built-in task)")
    ap.add_argument("--n-trials", type=int, default=4, help="trials (prompts) per task")
    ap.add_argument("--n-shots", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--plot-only", action="store_true", help="redraw atp_fidelity.png from the saved scores")
    args = ap.parse_args(argv)
    if args.plot_only:
        print(f"wrote {plot(_load_scores())}")
        return 0
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model, tok = load_pretrained(name)
        for lang in args.langs:
            kw = dict(tasks=args.tasks, n_trials=args.n_trials, n_shots=args.n_shots, seed=args.seed, cache=False,
                      progress=False)  # fmt: skip
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            atp = find_heads(model, tok, lang, method="atp", **kw)
            t1 = time.perf_counter()
            exact = find_heads(model, tok, lang, method="exact", **kw)
            t2 = time.perf_counter()
            load1 = os.getloadavg()[0]
            trials = exact.settings["trials"]
            row = {
                "model": name,
                "lang": lang,
                "heads": f"{exact.num_layers}x{exact.num_heads}",
                "tasks": "+".join(trials),
                "n_shots": args.n_shots,
                "n_trials": args.n_trials,
                "prompts": sum(trials.values()),
                "seed": args.seed,
                "cache": False,
                **fidelity(atp.scores, exact.scores),
                "atp_s": round(t1 - t0, 2),
                "exact_s": round(t2 - t1, 2),
                "threads": torch.get_num_threads(),
                "load1": round((load0 + load1) / 2, 2),
                **provenance(),
            }
            for k in KS:
                row.setdefault(f"top{k}", float("nan"))
            rows.append(row)
            append_csv("atp_fidelity", [row])  # one row at a time: a long run keeps what it finished
            store = _load_scores()
            store.setdefault(name, {})[lang] = {
                "atp": atp.scores.tolist(),
                "exact": exact.scores.tolist(),
                "shape": list(exact.shape),
                "tasks": list(trials),
                "n_trials": args.n_trials,
                "n_shots": args.n_shots,
                "seed": args.seed,
                "date": row["date"],
            }
            _save_scores(store)
            print(f"{name} {lang}: spearman {row['spearman']:.3f} top16 {row['top16']:.2f} "
                  f"(atp {row['atp_s']} s, exact {row['exact_s']} s)", flush=True)  # fmt: skip
        del model
    print()
    print_table(rows, COLUMNS)
    low = [f"{r['model']} {r['lang']} ({r['top16']:.2f})" for r in rows if r["top16"] < 0.7]
    if low:
        print(f"\ntop-16 overlap under 0.7: {', '.join(low)}")
    print(f"wrote {RESULTS / 'atp_fidelity.csv'}, {SCORES} and {plot(_load_scores())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
