"""Heads from plain text vs heads from probe tasks; the fused kernel on the text scorer's real tensors.

    python -m benchmarks.text_heads                       # Qwen2.5-Coder-0.5B-Instruct, es fr de
    python -m benchmarks.text_heads --text-method atp grad_x_act --probe-timing 0
    python -m benchmarks.text_heads --steer 1             # also steer with each head source

1. Agreement, per language: ``find_heads(model, tok, lang, source="text", method=...)`` (the
   built-in sentences) against the probe ranking ``find_heads(model, tok, lang, stop_k=0.2)`` (the
   cached 25-trial "auto" run soteria.tune uses; ``--probe-trials 5`` for a cheaper one): Jaccard
   and overlap (|A & B| / k) of the top-k sets at ``--ks``, Spearman over all heads. For context:
   the probe ranking at 5 trials against 25 (the probe scorer's own noise), the text heads of
   this language against the probe and text heads of the others (is the agreement
   language-specific?), the text scores less the other languages' mean text scores, and what two
   random k-sets share (k / (2N - k)).
2. The kernel: every layer's ``[B*T, H*D]`` activations and gradients of the scorer's first
   (longest) batch are recorded and fed to ``soteria_kernels.head_attribution(...,
   baseline=mean, sum_rows=True)`` (Triton; the interpreter on a CPU: correctness only) and to
   the eager reference, both against float64, as recorded and cast to bf16. Timed: the eager
   reference (median of ``--reps``; one thread on a CPU), and on a GPU the kernel with
   ``triton.testing.do_bench`` and its bandwidth. The text scorer's wall time (eager attribution
   on a CPU) beside the probe scorer's, uncached, at ``--probe-timing`` trials per task (0: skip).
3. ``--steer 1``: soteria's defaults (top_k=0.2, relative scale 0.004, the gradient harm
   direction) with text heads vs probe heads, measured by the tuner's proxy
   (:class:`soteria.tune.proxy.RefusalProxy` on the tuning split): harmfulness, over-refusal, KL.

Appends to ``benchmarks/results/text_heads.csv``, ``text_heads_kernel.csv`` and
``text_heads_steer.csv``, settings and load average beside every row.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # the Triton interpreter for the kernel check; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

from scipy.stats import spearmanr  # noqa: E402

import soteria_kernels  # noqa: E402
from benchmarks.common import append_csv, print_table, provenance  # noqa: E402
from soteria import SoteriaPatcher  # noqa: E402
from soteria.arch import head_sites  # noqa: E402
from soteria.defaults import DEFAULT_CONTRAST, DEFAULT_REFUSAL_TOKENS, DEFAULT_RELATIVE_SCALE, DEFAULT_TOP_K  # noqa: E402
from soteria.harm import HarmVector  # noqa: E402
from soteria.heads import HeadScores, find_heads  # noqa: E402
from soteria.models.pretrained import load_pretrained  # noqa: E402
from soteria.tune.proxy import RefusalProxy  # noqa: E402
from soteria.tune.study import splits  # noqa: E402


@contextlib.contextmanager
def _backend(name: str | None):
    old = os.environ.get("SOTERIA_BACKEND")
    if name is None:
        os.environ.pop("SOTERIA_BACKEND", None)
    else:
        os.environ["SOTERIA_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SOTERIA_BACKEND", None)
        else:
            os.environ["SOTERIA_BACKEND"] = old


@contextlib.contextmanager
def _recording(n_layers: int, calls: list):
    """Record the first ``n_layers`` kernel calls (the first batch: one per layer)."""
    real = soteria_kernels.head_attribution

    def wrapper(act, grad, **kw):
        if len(calls) < n_layers:
            calls.append((act.clone(), grad.clone(), kw))
        return real(act, grad, **kw)

    soteria_kernels.head_attribution = wrapper
    try:
        yield
    finally:
        soteria_kernels.head_attribution = real


def agreement(a, b, ks) -> dict:
    row = {}
    for k in ks:
        sa, sb = set(a.top(k)), set(b.top(k))
        row[f"jaccard@{k}"] = round(len(sa & sb) / len(sa | sb), 3)
        row[f"overlap@{k}"] = round(len(sa & sb) / k, 3)
    row["spearman"] = round(float(spearmanr(a.scores.flatten(), b.scores.flatten()).statistic), 3)
    return row


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def kernel_rows(calls, H: int, reps: int) -> list[dict]:
    """Kernel and eager reference on the recorded tensors, fp32 (as recorded) and bf16."""
    rows, gpu = [], calls[0][0].is_cuda
    for dtype in (calls[0][0].dtype, torch.bfloat16):
        cast = [(a.to(dtype), g.to(dtype), kw["baseline"]) for a, g, kw in calls]
        errs_k, errs_e = [], []
        for a, g, b in cast:
            ref = soteria_kernels.reference.head_attribution(a.double(), g.double(), num_heads=H, baseline=b.double(),
                                                             sum_rows=True)  # fmt: skip
            with _backend("triton"):
                k = soteria_kernels.head_attribution(a, g, num_heads=H, baseline=b, sum_rows=True)
            e = soteria_kernels.reference.head_attribution(a, g, num_heads=H, baseline=b, sum_rows=True)
            errs_k.append(_rel_err(k, ref))
            errs_e.append(_rel_err(e, ref))

        def eager(cast=cast):
            for a, g, b in cast:
                soteria_kernels.reference.head_attribution(a, g, num_heads=H, baseline=b, sum_rows=True)

        def kernel(cast=cast):
            for a, g, b in cast:
                soteria_kernels.head_attribution(a, g, num_heads=H, baseline=b, sum_rows=True)

        R, W = cast[0][0].shape
        nbytes = len(cast) * (2 * R * W * cast[0][0].element_size() + W * 4)
        if gpu:
            import triton.testing

            t_e = triton.testing.do_bench(eager) / 1e3
            with _backend("triton"):
                t_k = triton.testing.do_bench(kernel) / 1e3
        else:  # one thread: on a shared machine two contend with other processes and time their waits
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                eager()  # warm-up
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    eager()
                    times.append(time.perf_counter() - t0)
            finally:
                torch.set_num_threads(threads)
            t_e, t_k = statistics.median(times), float("nan")
        rows.append(dict(input_dtype=str(dtype).replace("torch.", ""), layers=len(cast), rows=R, width=W, heads=H,
                         kernel_max_rel_err=f"{max(errs_k):.2e}", eager_max_rel_err=f"{max(errs_e):.2e}",
                         eager_ms=round(t_e * 1e3, 3), eager_threads=torch.get_num_threads() if gpu else 1, kernel_ms=round(t_k * 1e3, 3) if gpu else "n/a (interpreter)",
                         speedup=round(t_e / t_k, 2) if gpu else "awaits a GPU",
                         kernel_GBps=round(nbytes / t_k / 1e9, 1) if gpu else "", bytes=nbytes))  # fmt: skip
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--langs", nargs="+", default=["es", "fr", "de"])
    ap.add_argument("--ks", nargs="+", type=int, default=[16, 32, 67])
    ap.add_argument("--max-sentences", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--text-method", nargs="+", default=["atp"], choices=["atp", "grad_x_act"])
    ap.add_argument("--probe-trials", default="auto", help="'auto' (cached; stop_k=0.2 as soteria.tune) or an int")
    ap.add_argument(
        "--probe-timing", type=int, default=5, help="trials per task for the uncached probe timing (0: skip)"
    )
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steer", type=int, default=0, help="1: steer with each head source and measure the proxy")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    model, tok = load_pretrained(args.model, dtype=torch.bfloat16 if gpu else None)
    if gpu:
        model = model.cuda()
    sites = head_sites(model)
    L, H = len(sites), sites[0].num_heads
    N = L * H
    prov = provenance()
    load0 = os.getloadavg()[0]
    trials = args.probe_trials if args.probe_trials == "auto" else int(args.probe_trials)

    probe, probe5, texts, t_text, calls = {}, {}, {}, {}, []
    for lang in args.langs:
        probe[lang] = find_heads(model, tok, lang, n_trials=trials, stop_k=0.2, progress=False)
        probe5[lang] = find_heads(model, tok, lang, n_trials=5, progress=False)
        for method in args.text_method:
            with _backend(None if gpu else "eager"), _recording(L if not calls else 0, calls):
                t0 = time.perf_counter()
                texts[method, lang] = find_heads(model, tok, lang, source="text", method=method,
                                                 max_sentences=args.max_sentences, batch_size=args.batch_size,
                                                 cache=False, progress=False)  # fmt: skip
                t_text[method, lang] = time.perf_counter() - t0
    first = args.text_method[0]
    text = {lang: texts[first, lang] for lang in args.langs}  # for the kernel check and the steering
    s = text[args.langs[0]].settings
    settings = dict(model=args.model, dtype=str(next(model.parameters()).dtype).replace("torch.", ""), L=L, H=H,
                    probe_trials=str(trials), text_sentences=s["n_sentences"],
                    batch_size=args.batch_size or "default", threads=torch.get_num_threads(), load_start=round(load0, 2),
                    **prov)  # fmt: skip

    rows = []
    for lang in args.langs:
        others = [x for x in args.langs if x != lang]
        rows.append(dict(lang=lang, method="-", compare="probe@5 vs probe",
                         **agreement(probe5[lang], probe[lang], args.ks)))  # fmt: skip
        for method in args.text_method:
            t = texts[method, lang]
            base = dict(lang=lang, method=method, tokens=t.settings["n_tokens"], text_s=round(t_text[method, lang], 1))
            rows.append(dict(base, compare="text vs probe", **agreement(t, probe[lang], args.ks)))
            for other in others:
                rows.append(dict(base, compare=f"text vs probe[{other}]", **agreement(t, probe[other], args.ks)))
                rows.append(dict(base, compare=f"text vs text[{other}]",
                                 **agreement(t, texts[method, other], args.ks)))  # fmt: skip
            if others:  # what is left of the text scores once the other languages' mean is taken out
                rest = torch.stack([texts[method, x].scores for x in others]).mean(0)
                contrast = HeadScores(scores=t.scores - rest, lang=lang)
                rows.append(dict(base, compare="text - mean(other texts) vs probe",
                                 **agreement(contrast, probe[lang], args.ks)))  # fmt: skip
    rows.append(dict(lang="-", method="-", compare="random k-sets (expected)",
                     **{f"jaccard@{k}": round(k / (2 * N - k), 3) for k in args.ks},
                     **{f"overlap@{k}": round(k / N, 3) for k in args.ks}))  # fmt: skip

    timing = dict.fromkeys(("probe_lang", "probe_uncached_s", "probe_trials_timed", "probe_lang_text_s"), "")
    if args.probe_timing:
        lang = args.langs[0]
        t0 = time.perf_counter()
        p = find_heads(model, tok, lang, n_trials=args.probe_timing, cache=False, progress=False)
        timing = dict(probe_lang=lang, probe_uncached_s=round(time.perf_counter() - t0, 1),
                      probe_trials_timed=sum(p.settings["trials"].values()),
                      probe_lang_text_s=round(t_text[first, lang], 1))  # fmt: skip

    krows = kernel_rows(calls, H, args.reps)
    settings["load_end"] = round(os.getloadavg()[0], 2)

    cols = ["lang", "method", "compare", *[f"{m}@{k}" for k in args.ks for m in ("jaccard", "overlap")], "spearman"]
    print_table(rows, [*cols, "tokens", "text_s"])
    print()
    print_table(krows)
    print({k: v for k, v in {**settings, **timing}.items() if k not in ("torch", "triton", "soteria")})
    append_csv("text_heads", [{c: r.get(c, "") for c in [*cols, "tokens", "text_s"]} | settings | timing for r in rows])
    append_csv("text_heads_kernel", [r | settings for r in krows])
    if args.steer:
        t0 = time.perf_counter()
        srows = steer_rows(model, tok, args.langs, text, probe)
        settings.update(steer_s=round(time.perf_counter() - t0, 1), load_end=round(os.getloadavg()[0], 2))
        print_table(srows)
        append_csv("text_heads_steer", [r | settings for r in srows])


def steer_rows(model, tok, langs, text, probe) -> list[dict]:
    """The defaults with each head source, by the tuner's proxy on the tuning split."""
    data = splits(langs)["tune"]
    proxy = RefusalProxy(model, tok, data["harmful"], data["harmless"])
    harm = HarmVector.from_gradients(model, tok, langs=langs, contrast=DEFAULT_CONTRAST,
                                     refusal_tokens=DEFAULT_REFUSAL_TOKENS, progress=False)  # fmt: skip
    out = []
    for name, scores in (("base", None), ("probe heads", probe), ("text heads", text)):
        if scores is not None:
            heads = {x: scores[x].top(DEFAULT_TOP_K) for x in langs}
            SoteriaPatcher.apply(model, langs, heads=heads, harm=harm, scale="auto", progress=False,
                                 relative_scale=DEFAULT_RELATIVE_SCALE)  # fmt: skip
        try:
            m = proxy.measure(model)
        finally:
            if scores is not None:
                SoteriaPatcher.revert(model)
        for x in langs:
            out.append(dict(lang=x, compare=f"steer: {name}", harmfulness=round(m[x]["harmfulness"], 3),
                            over_refusal=round(m[x]["over_refusal"], 3), kl=round(m[x]["kl"], 4)))  # fmt: skip
    return out


if __name__ == "__main__":
    main()
