"""How fast the top-k head set settles with trials, and what ``n_trials="auto"`` costs, on a real model.

    python -m benchmarks.heads_convergence                       # Qwen2.5-Coder-0.5B, es fr de
    python -m benchmarks.heads_convergence --model smollm2-135m-instruct --langs en --top-k 16

Two runs on the same prompts (built-in probe tasks, ``--n-shots`` shots, seed 0), one after the
other in one process, same thread count:

1. ``find_heads_multi(..., n_trials="auto")``: rounds of 5 trials per task, stopping per
   language once its top-k set matches the previous round's at Jaccard >= 0.9. Wall time.
2. ``find_heads_multi(..., n_trials=25)``: the reference's count, one round. Wall time.

Printed and appended to ``benchmarks/results/heads_convergence.csv`` per language: trials the
auto rule used, the Jaccard of its top-k with the 25-trial top-k, both wall times. A second table
gives the top-k Jaccard against the 25-trial set after each round of the auto run (the trials it
would have used had it stopped there); ``heads_convergence.png`` plots it.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import append_csv, print_table, provenance, save_png
from soteria import heads as heads_mod
from soteria.heads import find_heads_multi
from soteria.heads.search import AUTO_STEP
from soteria.models.pretrained import load_pretrained


def _jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--langs", nargs="+", default=["es", "fr", "de"])
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--n-shots", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reference", choices=["full", "rounds"], default="full",
                    help="full: a separate one-round 25-trial run (means over all 25 clean prompts); rounds: the "
                    "auto run's own 25 trials when it used them all (half the time)")  # fmt: skip
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained(args.model)

    # Record every round of the auto run: wrap the round function, keep each language's running scores.
    rounds: list[dict] = []
    original = heads_mod._round

    def recording_round(*a, **kw):
        out = original(*a, **kw)
        rounds.append({key: value.clone() for key, value in out.items()})
        return out

    heads_mod._round = recording_round
    try:
        t0 = time.perf_counter()
        auto = find_heads_multi(model, tok, args.langs, n_shots=args.n_shots, n_trials="auto", stop_k=args.top_k,
                                cache=False)  # fmt: skip
        t_auto = time.perf_counter() - t0
    finally:
        heads_mod._round = original
    t0 = time.perf_counter()
    if args.reference == "full":
        full = find_heads_multi(model, tok, args.langs, n_shots=args.n_shots, n_trials=25, cache=False)
    else:
        if any(max(auto[x].settings["trials"].values()) < 25 for x in args.langs):
            raise SystemExit("--reference rounds needs an auto run that used all 25 trials; use --reference full")
        full = auto
    t_full = time.perf_counter() - t0 if args.reference == "full" else float("nan")

    settings = dict(model=args.model, top_k=args.top_k, n_shots=args.n_shots, threads=args.threads,
                    reference=args.reference, **provenance())  # fmt: skip
    rows, curve = [], []
    for lang in args.langs:
        ref = full[lang].top(args.top_k)
        rows.append(dict(lang=lang, trials_auto=max(auto[lang].settings["trials"].values()),
                         stable=auto[lang].settings["stable"], jaccard_vs_25=_jaccard(auto[lang].top(args.top_k), ref),
                         auto_s=t_auto, full25_s=t_full, **settings))  # fmt: skip
        gathered: dict[str, list[torch.Tensor]] = {}
        for i, part in enumerate(rounds):
            for (lg, task), eff in part.items():
                if lg == lang:
                    gathered.setdefault(task, []).append(eff)
            if not any(lg == lang for lg, _ in part):
                break
            score = torch.stack([torch.cat(v).mean(0) for v in gathered.values()]).mean(0)
            top = [tuple(divmod(int(j), score.shape[1])) for j in score.flatten().topk(args.top_k).indices]
            curve.append(dict(lang=lang, trials=(i + 1) * AUTO_STEP, jaccard_vs_25=_jaccard(top, ref)))
    print_table(rows, ["lang", "trials_auto", "stable", "jaccard_vs_25", "auto_s", "full25_s"])
    print_table(curve)
    print({k: settings[k] for k in ("model", "top_k", "n_shots", "threads", "reference", "device")})
    append_csv("heads_convergence", rows)
    _plot(curve, args)


def _plot(curve, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for lang in dict.fromkeys(r["lang"] for r in curve):
        pts = [r for r in curve if r["lang"] == lang]
        ax.plot([r["trials"] for r in pts], [r["jaccard_vs_25"] for r in pts], marker="o", label=lang)
    ax.axhline(0.8, color="grey", ls="--", lw=1)
    ax.set(xlabel="trials per task (auto rounds)", ylabel=f"top-{args.top_k} Jaccard vs 25 trials", ylim=(0, 1.02),
           title=f"{args.model}: head set vs trials ({args.n_shots} shots)")  # fmt: skip
    ax.legend()
    save_png(fig, "heads_convergence")


if __name__ == "__main__":
    main()
