"""``soteria.tune`` on a real model: the search, its fast proxy checked against full generation, and
the chosen point against soteria's defaults on held-out prompts.

    python -m benchmarks.tune                          # Qwen2.5-Coder-0.5B-Instruct, es fr de, 50 trials
    python -m benchmarks.tune --trials 20 --validate 6

What it runs (one process, CPU threads as set by torch, greedy decoding, the chat template):

1. :func:`soteria.tune` with its defaults (heads found once, cached; the gradient direction;
   per language ``top_k`` and relative scale; the 8-token-prefix proxy on 12 harmful and 8
   harmless tuning prompts per language; choice: the lowest harmfulness with KL <= ``--max-kl``)
   and its held-out verification (22 harmful and 20 harmless prompts per language, full
   generation of ``--verify-tokens`` tokens, refusal-phrase judge) of the base model, the
   defaults (``top_k=0.2``, relative scale 0.004) and the chosen point;
2. the matched point: the study's lowest proxy harmfulness at no more (proxy) KL than the
   defaults' own, verified on the held-out split the same way: the fair comparison with the
   defaults;
3. the proxy's agreement with full generation: for ``--validate`` trials spread over the
   study, the tuning prompts are answered at full length (``--verify-tokens``) and judged:
   Spearman's rho between the proxy's and the judged harmfulness over trials (per language),
   and how often the 8-token verdict equals the full-length verdict per prompt.

Writes ``benchmarks/results/tune.csv`` (settings beside every number), ``tune_pareto.png``
(the front, the chosen point, the defaults) and ``tune_front.csv``; the study itself stays in
``--out`` (default: a folder under the system temp dir).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from benchmarks.common import RESULTS, append_csv, print_table, provenance
from soteria import SoteriaPatcher
from soteria.models.pretrained import load_pretrained
from soteria.tune import choose, load_tune_config, tune
from soteria.tune.proxy import objectives, refusal_verdicts
from soteria.tune.study import apply_point, heldout_check, splits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--langs", nargs="+", default=["es", "fr", "de"])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--max-kl", type=float, default=0.1)
    ap.add_argument("--verify-tokens", type=int, default=32)
    ap.add_argument("--validate", type=int, default=10, help="trials whose proxy is checked by full generation")
    ap.add_argument("--out", default=None, help="the study folder (default: a temp dir)")
    args = ap.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="soteria-tune-")) / "study"
    model, tok = load_pretrained(args.model)

    t0 = time.perf_counter()
    result = tune(model, tok, args.langs, out_dir=out, n_trials=args.trials, max_kl=args.max_kl,
                  verify_tokens=args.verify_tokens)  # fmt: skip
    t_total = time.perf_counter() - t0
    settings = dict(model=args.model, langs=" ".join(args.langs), trials=len(result.trials), max_kl=args.max_kl,
                    verify_tokens=args.verify_tokens, proxy="8-token prefix, refusal-phrase judge",
                    tune_s=round(t_total, 1), **{f"{k}_s": round(v, 1) for k, v in result.times.items() if k != "trials_run"},
                    trials_run=result.times["trials_run"], threads=torch.get_num_threads(), **provenance())  # fmt: skip

    # The proxy against full-length answers on the same tuning prompts, for trials spread over the study.
    data = splits(args.langs)["tune"]["harmful"]
    _, harm = load_tune_config(out / "chosen.json")
    picks = sorted(result.trials, key=lambda r: r["harmfulness"])
    picks = [
        picks[round(i * (len(picks) - 1) / max(1, args.validate - 1))] for i in range(min(args.validate, len(picks)))
    ]
    proxy_h, judged_h, agree, total = {x: [] for x in args.langs}, {x: [] for x in args.langs}, 0, 0
    t1 = time.perf_counter()
    for row in picks:
        apply_point(model, args.langs, harm, result.scores, row["point"])
        try:
            full = {x: refusal_verdicts(model, tok, ps, x, max_new_tokens=args.verify_tokens) for x, ps in data.items()}
            prefix = {x: refusal_verdicts(model, tok, ps, x, max_new_tokens=8) for x, ps in data.items()}
        finally:
            SoteriaPatcher.revert(model)
        for lang in args.langs:
            proxy_h[lang].append(row["per_lang"][lang]["harmfulness"])
            judged_h[lang].append(1 - sum(full[lang]) / len(full[lang]))
            agree += sum(a == b for a, b in zip(full[lang], prefix[lang]))
            total += len(full[lang])
    t_validate = time.perf_counter() - t1

    # The comparison the defaults deserve: the study's best point at no more KL than the defaults' own
    # (on the tuning split), verified on the held-out split like the others.
    dm = result.verify["default_proxy"]
    default_kl = objectives(dm)[1]
    points = [(r["harmfulness"], r["kl"]) for r in result.trials]
    j, _ = choose(points, "budget", max_kl=default_kl)
    matched = result.trials[j]
    apply_point(model, args.langs, harm, result.scores, matched["point"])
    try:
        matched_config = SoteriaPatcher.config(model)
        matched_v = heldout_check(model, tok, args.langs, splits(args.langs)["heldout"],
                                  max_new_tokens=args.verify_tokens, progress=True)  # fmt: skip
    finally:
        SoteriaPatcher.revert(model)

    rows = []
    v = {**result.verify, "matched": matched_v}
    for lang in args.langs:
        rho = spearmanr(proxy_h[lang], judged_h[lang]).statistic if len(set(judged_h[lang])) > 1 else float("nan")
        row = dict(lang=lang)
        for name in ("base", "default", "chosen", "matched"):
            row[f"refusal_{name}"] = round(v[name][lang]["refusal"], 3)
            row[f"over_refusal_{name}"] = round(v[name][lang]["over_refusal"], 3)
            row[f"kl_{name}"] = round(v[name][lang]["kl"], 4)
        row.update(heads_chosen=len(result.config.heads[lang]), scale_chosen=result.config.scale_of(lang),
                   heads_matched=len(matched_config.heads[lang]), scale_matched=matched_config.scale_of(lang),
                   proxy_spearman=round(float(rho), 3))  # fmt: skip
        rows.append(row)
    settings.update(prefix_agreement=round(agree / max(1, total), 3), validated_trials=len(picks),
                    validate_s=round(t_validate, 1), chosen_trial=result.chosen["trial"], why=result.chosen["why"],
                    matched_trial=matched["trial"], matched_max_kl=round(default_kl, 4))  # fmt: skip
    for row in rows:
        row.update(settings)
    print_table(rows, [c for c in rows[0] if c.startswith(("lang", "refusal_", "over_refusal_", "kl_", "proxy_"))])
    print({k: v for k, v in settings.items() if k not in ("torch", "triton", "soteria")})
    append_csv("tune", rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "pareto.png", RESULTS / "tune_pareto.png")
    shutil.copyfile(out / "front.csv", RESULTS / "tune_front.csv")
    print(f"study in {out}")


if __name__ == "__main__":
    main()
