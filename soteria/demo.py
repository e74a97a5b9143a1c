"""``soteria demo``: the whole pipeline on a small model built from a config (no download).

Builds a small Llama-style model and the built-in tokenizer, finds each language's heads
with attribution patching on the built-in probe tasks, derives the default harm direction
(gradients of the built-in multilingual refusal data), steers, saves with provenance,
reloads the saved folder with plain transformers and checks it gives the same logits, then
prints what changed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

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


def run_demo(
    out_dir: str | Path = "soteria-demo",
    *,
    langs=DEMO_LANGS,
    top_k: int = 8,
    scale: float = 1.0,
    n_shots: int = 4,
    n_trials: int = 6,
    overwrite: bool = True,
) -> dict:
    """Runs the demo and returns its summary (printed by ``soteria demo``).

    ``overwrite`` replaces ``out_dir`` only when it is empty or an earlier soteria output
    (it holds ``soteria_config.json``); any other existing path is a FileExistsError, raised
    before any work.
    """
    from transformers import AutoModelForCausalLM

    from soteria import HarmVector, SoteriaPatcher, find_heads, save_steered
    from soteria.arch import head_sites
    from soteria.export import CONFIG_NAME
    from soteria.harm import refusal_loss
    from soteria.harmful_data import load_harmful
    from soteria.tiny import tiny_model, tiny_tokenizer

    out_dir = Path(out_dir)
    replaceable = (out_dir / CONFIG_NAME).is_file() or (out_dir.is_dir() and not any(out_dir.iterdir()))
    if out_dir.exists() and not (overwrite and replaceable):
        raise FileExistsError(f"{out_dir} already exists and is not an earlier soteria output; choose another --out")
    langs = list(langs)
    times: dict[str, float] = {}
    with _stage(times, "build model"):
        tokenizer = tiny_tokenizer()
        model = tiny_model("llama", **DEMO_MODEL)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
    refusals = {lang: load_harmful(lang) for lang in langs}
    with _stage(times, "find heads"):
        scores = {
            lang: find_heads(model, tokenizer, lang, n_shots=n_shots, n_trials=n_trials, cache=False) for lang in langs
        }
        heads = {lang: s.top(top_k) for lang, s in scores.items()}
    with _stage(times, "harm direction"):
        harm = HarmVector.from_gradients(model, tokenizer, langs=langs)
    loss_before = {lang: refusal_loss(model, tokenizer, refusals[lang]) for lang in langs}
    with _stage(times, "steer"):
        SoteriaPatcher.apply(model, langs, heads=heads, harm=harm, scale=scale, tokenizer=tokenizer)
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


def format_summary(s: dict) -> str:
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
