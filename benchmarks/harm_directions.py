"""Harm directions side by side on one real model: the same heads, the tuner's proxy on held-out prompts.

    python -m benchmarks.harm_directions                       # Qwen2.5-Coder-0.5B-Instruct, es fr de
    python -m benchmarks.harm_directions --directions gradients finetune

Heads: soteria's defaults for the languages (``find_heads_multi`` with ``n_trials="auto"``, the
top 20% per language; cached). Each direction is derived on the base model, applied to those
heads with its default scale, measured, and reverted bit-exactly:

- ``gradients``: :meth:`HarmVector.from_gradients` on the built-in refusal data of the languages
  with the harmless contrast set and the first 4 refusal tokens, ``scale="auto"`` (relative 0.004);
- ``own_english``: the same, but each refusal target is the model's own greedy English answer to
  the English version of the request (kept where the refusal judge calls it a refusal), the
  "model's own English refusals" idea;
- ``finetune``: :meth:`HarmVector.from_finetune` with its defaults, steered at 1.0.

The measure is :class:`soteria.tune.proxy.RefusalProxy` on the tuner's held-out split (the odd
positions of the evaluation set: 22 harmful and 20 harmless prompts per language, disjoint from
the refusal data): harmfulness (the share of harmful prompts whose first ``--prefix-tokens`` greedy
answer tokens are not a refusal), over-refusal, and KL(base || steered) over the harmless prompts.
English is measured beside the steered languages. Rows go to
``benchmarks/results/harm_directions.csv``, a chart to ``harm_directions.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from benchmarks.common import append_csv, print_table, provenance, save_png
from soteria import HarmVector, SoteriaPatcher, find_heads_multi
from soteria.defaults import DEFAULT_CONTRAST, DEFAULT_REFUSAL_TOKENS, DEFAULT_TOP_K
from soteria.evaluation.generation import format_inputs, generate_texts
from soteria.evaluation.judges import RefusalJudge
from soteria.evaluation.prompt_sets import EvalPrompt
from soteria.harm.data import load_harmful, load_harmless
from soteria.models.pretrained import load_pretrained
from soteria.tune.proxy import RefusalProxy
from soteria.tune.study import splits

DIRECTIONS = ("gradients", "own_english", "finetune")


def _own_english_rows(model, tok, langs: list[str]) -> list[dict]:
    """The built-in requests of ``langs``, each paired with the model's own English refusal of its
    English twin (the data are parallel: row i is the same request in every language)."""
    english = load_harmful("en")
    texts, templated = format_inputs(tok, [EvalPrompt(r["prompt"], "en") for r in english])
    answers = generate_texts(model, tok, texts, add_special_tokens=not templated, batch_size=20, max_new_tokens=24)
    judge = RefusalJudge()
    keep = [judge.is_refusal(a, "en") for a in answers]
    return [dict(r, refusal=answers[i]) for lang in langs for i, r in enumerate(load_harmful(lang)) if keep[i]]


def _derive(name: str, model, tok, langs, heads):
    if name == "finetune":
        return HarmVector.from_finetune(model, tok, heads, langs=langs)
    if name == "gradients":
        return HarmVector.from_gradients(model, tok, langs=langs, contrast=DEFAULT_CONTRAST,
                                         refusal_tokens=DEFAULT_REFUSAL_TOKENS)  # fmt: skip
    rows = _own_english_rows(model, tok, langs)
    contrast = [r["prompt"] for r in load_harmless(langs)]
    return HarmVector.from_gradients(model, tok, rows, contrast=contrast, refusal_tokens=DEFAULT_REFUSAL_TOKENS)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--langs", nargs="+", default=["es", "fr", "de"])
    ap.add_argument("--directions", nargs="+", default=list(DIRECTIONS), choices=DIRECTIONS)
    ap.add_argument("--prefix-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    model, tok = load_pretrained(args.model)
    found = find_heads_multi(model, tok, args.langs, stop_k=DEFAULT_TOP_K)
    heads = {lang: [tuple(p) for p in found[lang].top(DEFAULT_TOP_K)] for lang in args.langs}
    measured = [*args.langs, "en"]
    split = splits(measured)["heldout"]
    proxy = RefusalProxy(model, tok, split["harmful"], split["harmless"], prefix_tokens=args.prefix_tokens,
                         batch_size=32)  # fmt: skip
    settings = dict(model=args.model, steered_langs=" ".join(args.langs), heads_union=len({p for v in heads.values()
                    for p in v}), prefix_tokens=args.prefix_tokens, threads=torch.get_num_threads(),
                    load=round(os.getloadavg()[0], 1), **provenance())  # fmt: skip
    rows = []
    results = {"base": proxy.measure(model)}
    times = {"base": 0.0}
    for name in args.directions:
        t0 = time.perf_counter()
        harm = _derive(name, model, tok, args.langs, heads)
        times[name] = time.perf_counter() - t0
        SoteriaPatcher.apply(model, args.langs, heads=heads, harm=harm, progress=False)
        scale = SoteriaPatcher.config(model).scale
        results[name] = proxy.measure(model)
        SoteriaPatcher.revert(model)
        settings[f"scale_{name}"] = str(scale)
        settings[f"source_{name}"] = harm.source
    for name, per_lang in results.items():
        for lang, m in per_lang.items():
            rows.append(dict(direction=name, lang=lang, steered=lang in args.langs, refusal=round(1 - m["harmfulness"], 3),
                             over_refusal=round(m["over_refusal"], 3), kl=round(m["kl"], 4),
                             derive_s=round(times[name], 1)))  # fmt: skip
    print_table(rows, ["direction", "lang", "steered", "refusal", "over_refusal", "kl", "derive_s"])
    print({k: v for k, v in settings.items() if not k.startswith("source_") and k not in ("torch", "triton")})
    append_csv("harm_directions", [dict(r, **settings) for r in rows])
    _plot(rows, args)


def _plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["direction"] for r in rows))
    langs = list(dict.fromkeys(r["lang"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    width = 0.8 / len(names)
    for ax, key, title in ((axes[0], "refusal", "refusal on harmful"), (axes[1], "over_refusal", "over-refusal")):
        for j, name in enumerate(names):
            vals = [next(r[key] for r in rows if r["direction"] == name and r["lang"] == lang) for lang in langs]
            ax.bar([i + j * width for i in range(len(langs))], vals, width, label=name)
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(langs))], langs)
        ax.set_title(f"{title} (first {args.prefix_tokens} tokens)")
        ax.set_ylim(0, 1)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{args.model}: harm directions on the same heads, held-out prompts", fontsize=10)
    fig.tight_layout()
    print(f"wrote {save_png(fig, 'harm_directions')}")


if __name__ == "__main__":
    main()
