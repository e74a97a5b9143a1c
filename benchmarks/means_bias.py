"""The paired-means bias: head scores with means="paired" against means="leave_one_out".

    python -m benchmarks.means_bias                          # SmolLM2-135M, en es fr de, 5 trials per task
    python -m benchmarks.means_bias --n-trials auto          # find_heads' default: rounds of 5, up to 25
    python -m benchmarks.means_bias --models qwen2.5-coder-0.5b-instruct --langs es --noise 0

soteria patches corrupted prompt ``i`` with its task's mean clean activation over the clean
prompts of the round, its own clean twin ``clean[i]`` included (1/n of it); the reference takes
its means over separate clean prompts. ``find_heads_multi(..., means="leave_one_out")`` leaves
the twin out. For each real model and language, both runs score the same prompts (every
built-in task, ``--n-trials`` per task or ``auto``, ``--n-shots``, seed, ``cache=False``) with ``--method``.
Under ``auto`` each round of 5 takes its own means, so the twin's share stays 1/5 however many rounds run.
Per (model, lang), printed and appended to ``benchmarks/results/means_bias.csv``:

- ``trials``: trials used per language, paired / leave-one-out (/ the noise run);
- ``spearman``: rank correlation of the two ``[L, H]`` score matrices;
- ``top16``, ``top_default``: ``|A & B| / k`` of the two top-k sets at 16 and at the default k;
- ``rel_diff``: ``max |paired - loo| / max |paired|``;
- ``noise_spearman``, ``noise_top16``, ``noise_top_default``: the same between two paired runs on
  other prompts (seed and seed + 1), the trial noise the bias is to be judged against (``--noise 0``: skip);
- the wall time of each run and the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.atp_fidelity import overlap, spearman
from benchmarks.common import append_csv, print_table, provenance
from soteria.defaults import DEFAULT_TOP_K
from soteria.heads import find_heads_multi
from soteria.heads.scores import resolve_k
from soteria.models.pretrained import MODELS, load_pretrained

COLUMNS = ["model", "lang", "heads", "trials", "spearman", "top16", "k_default", "top_default", "rel_diff",
           "noise_spearman", "noise_top16", "noise_top_default", "paired_s", "loo_s", "load1"]  # fmt: skip


def compare(a: torch.Tensor, b: torch.Tensor, prefix: str = "") -> dict:
    kd = resolve_k(DEFAULT_TOP_K, a.numel())
    return {f"{prefix}spearman": spearman(a, b), f"{prefix}top16": overlap(a, b, 16),
            f"{prefix}top_default": overlap(a, b, kd)}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m-instruct"], choices=sorted(MODELS))
    ap.add_argument("--langs", nargs="+", default=["en", "es", "fr", "de"])
    ap.add_argument("--method", choices=["atp", "exact"], default="atp")
    ap.add_argument("--n-trials", type=lambda x: x if x == "auto" else int(x), default=5,
                    help="trials per task (5: one round of n_trials='auto'), or auto")  # fmt: skip
    ap.add_argument("--n-shots", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=int, default=1, help="1: also a paired run at seed + 1 (the trial noise)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = dict(method=args.method, n_trials=args.n_trials, n_shots=args.n_shots, cache=False, progress=False)
    rows = []
    for name in args.models:
        model, tok = load_pretrained(name)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        paired = find_heads_multi(model, tok, args.langs, seed=args.seed, means="paired", **kw)
        t1 = time.perf_counter()
        loo = find_heads_multi(model, tok, args.langs, seed=args.seed, means="leave_one_out", **kw)
        t2 = time.perf_counter()
        other = find_heads_multi(model, tok, args.langs, seed=args.seed + 1, **kw) if args.noise else None
        load1 = (load0 + os.getloadavg()[0]) / 2
        for lang in args.langs:
            a, b = paired[lang].scores, loo[lang].scores
            row = {"model": name, "lang": lang, "heads": "x".join(map(str, a.shape)),
                   "trials": "/".join(str(sum(r[lang].settings["trials"].values())) for r in (paired, loo, other) if r),
                   **compare(a, b), "k_default": resolve_k(DEFAULT_TOP_K, a.numel()),
                   "rel_diff": float((a - b).abs().max() / a.abs().max())}  # fmt: skip
            nan = float("nan")
            row.update(compare(a, other[lang].scores, "noise_") if other else
                       {"noise_spearman": nan, "noise_top16": nan, "noise_top_default": nan})  # fmt: skip
            row.update(paired_s=round(t1 - t0, 1), loo_s=round(t2 - t1, 1), load1=round(load1, 2))
            rows.append({c: row[c] for c in COLUMNS})
    print(f"settings: method={args.method}, every built-in task x {args.n_trials} trials, {args.n_shots} shots, "
          f"seed {args.seed}, bos='reference', cache off, {args.threads} torch threads")  # fmt: skip
    print_table(rows, COLUMNS)
    settings = {"method": args.method, "n_trials": args.n_trials, "n_shots": args.n_shots, "seed": args.seed,
                "threads": args.threads}  # fmt: skip
    path = append_csv("means_bias", [{**r, **settings, **provenance()} for r in rows])
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
