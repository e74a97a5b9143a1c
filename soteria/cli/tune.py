"""``soteria tune``: search the head count and the scale per language; write the front and the chosen point."""

from __future__ import annotations

import json

from ..io.atomic import check_writable
from ..models.loading import load_model
from ..tune import SearchSpace, tune
from .args import add_model_args, harm_arg, load_scores, parse_langs, positive_int


def _floats(values, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in values)
    except ValueError:
        raise ValueError(f"{flag} takes two numbers, LOW HIGH") from None
    return lo, hi


def run(args) -> int:
    langs = parse_langs(args.langs)
    space = SearchSpace(
        top_k=None if args.top_k_range is None else tuple(args.top_k_range),
        relative_scale=_floats(args.relative_scale_range, "--relative-scale-range"),
        scale=_floats(args.scale_range, "--scale-range"),
        shared_top_k=args.shared_top_k,
        layer_window=args.layer_window,
    )  # checked before the model loads
    harm = harm_arg(args.harm)
    scores = load_scores(args.heads_from, langs) if args.heads_from else None
    check_writable(args.out)
    model, tokenizer = load_model(args.model, dtype=args.dtype, device=args.device, gguf_file=args.gguf_file)
    result = tune(
        model, tokenizer, langs, out_dir=args.out, n_trials=args.trials, harm=harm, space=space, max_kl=args.max_kl,
        choose_how=args.choose, seed=args.seed, verify=not args.no_verify, scores=scores,
    )  # fmt: skip
    c, o = result.chosen, result.chosen["objectives"]
    print(f"chosen trial {c['trial']} ({c['why']}): harmfulness {o['harmfulness']:.3f}, KL {o['kl']:.4f}, "
          f"over-refusal {o['over_refusal']:.3f} (tuning split, proxy)")  # fmt: skip
    print(f"  heads per language: {json.dumps({k: len(v) for k, v in result.config.heads.items()})}; "
          f"scale: {json.dumps(result.config.scale)}")  # fmt: skip
    if result.verify:
        print("held-out split, generation + refusal judge (refusal / over-refusal / KL):")
        for lang in langs:
            row = "  ".join(f"{name} {v[lang]['refusal']:.2f} / {v[lang]['over_refusal']:.2f} / {v[lang]['kl']:.3f}"
                            for name, v in (("base", result.verify["base"]), ("defaults", result.verify["default"]),
                                            ("chosen", result.verify["chosen"])))  # fmt: skip
            print(f"  {lang}: {row}")
    print(f"wrote {result.out_dir}/ (chosen.json, harm.safetensors, pareto.png, front.csv, trials.csv, study.db); "
          f"apply it with: soteria steer {args.model} --config {result.out_dir / 'chosen.json'} --out DIR")  # fmt: skip
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="search head counts and scales for the best refusal vs. KL trade-off",
                       description="Find heads once, build the harm vector once, then run an Optuna study with two "
                       "objectives: harmfulness on harmful prompts (the refusal judge on an 8-token greedy "
                       "prefix) and KL on harmless ones. Each trial is applied and reverted in memory. The study "
                       "is kept in OUT/study.db, so a run interrupted and started again resumes. The chosen point "
                       "is verified by generation on held-out prompts.")  # fmt: skip
    add_model_args(p)
    p.add_argument("--langs", nargs="+", required=True, help="language codes with built-in evaluation prompts")
    p.add_argument("--harm", default=None, help="harmful fine-tune or saved HarmVector (default: the gradient "
                   "direction)")  # fmt: skip
    p.add_argument("--heads-from", nargs="+", default=None, help="HeadScores JSON files from `soteria heads` "
                   "(default: find the heads here, cached)")  # fmt: skip
    p.add_argument("--trials", type=positive_int, default=50, help="trials in the study (default 50)")
    p.add_argument("--max-kl", type=float, default=0.1, help="KL budget for choosing a point (default 0.1)")
    p.add_argument("--choose", choices=["budget", "knee"], default="budget", help="budget: lowest harmfulness "
                   "with KL <= --max-kl (default); knee: the knee of the Pareto front")  # fmt: skip
    p.add_argument("--top-k-range", nargs=2, type=positive_int, default=None, metavar=("LOW", "HIGH"),
                   help="heads per language to search (default 8 to 30%% of the heads)")  # fmt: skip
    p.add_argument("--relative-scale-range", nargs=2, default=("0.001", "0.03"), metavar=("LOW", "HIGH"),
                   help="relative scale of a direction, log-uniform (default 0.001 0.03)")  # fmt: skip
    p.add_argument("--scale-range", nargs=2, default=("0.1", "2.0"), metavar=("LOW", "HIGH"),
                   help="lambda of a harmful fine-tune, log-uniform (default 0.1 2.0)")  # fmt: skip
    p.add_argument("--shared-top-k", action="store_true", help="one head count for every language")
    p.add_argument("--layer-window", action="store_true", help="also search a window of layers")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip the held-out generation check")
    p.add_argument("--out", default="soteria-tune", help="output folder, resumed when it holds a study")
    p.set_defaults(func=run)
