"""Several languages at once: find_heads_multi, SoteriaPatcher.apply and `soteria heads --langs`.

All languages' tasks share batches (one model traversal per batch, one progress bar); each
language's scores equal a separate find_heads call up to float rounding and use its cache.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

import soteria.heads.attribution as attribution
from soteria import HarmVector, SoteriaPatcher
from soteria.arch import head_sites
from soteria.heads import find_heads, find_heads_multi
from soteria.models.tiny import tiny_model, tiny_tokenizer

LANGS = ["en", "hi", "th"]  # Latin, Devanagari, Thai: prompts of quite different token lengths
SMALL = dict(tasks=["antonym", "country_capital"], n_shots=2, n_trials=3, seed=0)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture
def calls(monkeypatch):
    """Record every indirect_effects call (its corrupted prompts and groups), then run it."""
    seen = []
    real = attribution.indirect_effects

    def spy(model, tokenizer, clean, corrupted, targets, **kw):
        seen.append({"n": len(corrupted), "groups": kw.get("corrupted_groups")})
        return real(model, tokenizer, clean, corrupted, targets, **kw)

    monkeypatch.setattr(attribution, "indirect_effects", spy)
    return seen


def _close(got, want, what, rel):
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert scale > 0, f"{what}: all zero, the comparison cannot fail"
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x max |score| {scale:.3g}"


@pytest.mark.parametrize(
    "method, dtype, rel",
    # AtP on the default backend (the Triton kernel, interpreted on CPU); fp32 batches of other
    # composition differ by ~3e-7 of the largest score. Exact effects are differences of
    # probabilities, so they are compared on a float64 model.
    [("atp", torch.float32, 1e-5), ("exact", torch.float64, 1e-9)],
)
def test_multi_equals_separate_calls(method, dtype, rel, tok, monkeypatch, calls):
    if method == "exact":
        monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama", dtype=dtype)
    multi = find_heads_multi(model, tok, LANGS, method=method, cache=False, progress=False, **SMALL)
    assert list(multi) == LANGS and len(calls) == 1  # every language in one call
    for lang in LANGS:
        alone = find_heads(model, tok, lang, method=method, cache=False, progress=False, **SMALL)
        got = multi[lang]
        assert (got.lang, got.method, got.settings) == (alone.lang, alone.method, alone.settings)
        _close(got.scores, alone.scores, lang, rel)
        assert list(got.per_task) == SMALL["tasks"]
        for task in SMALL["tasks"]:
            _close(got.per_task[task], alone.per_task[task], f"{lang}/{task}", rel)


def test_one_traversal_per_batch_and_one_bar(tok, monkeypatch):
    import tqdm.auto

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=io.StringIO())
            super().__init__(*args, **kwargs)
            bars.append(self)

    import soteria.progress

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    monkeypatch.setattr(soteria.progress, "_is_terminal", lambda stream: True)
    model = tiny_model("llama")
    passes = []
    model.register_forward_pre_hook(lambda *a: passes.append(1))
    bs = 4
    find_heads_multi(model, tok, LANGS, batch_size=bs, cache=False, **SMALL)
    n = 3 * 2 * 3  # languages x tasks x trials (clean and corrupted alike)
    assert len(passes) == 2 * math.ceil(n / bs)  # clean means + AtP batches, all shared
    assert len(bars) == 1 and bars[0].total == n and bars[0].n == pytest.approx(n)
    passes.clear()
    for lang in LANGS:
        find_heads(model, tok, lang, batch_size=bs, cache=False, progress=False, **SMALL)
    assert len(passes) == 3 * 2 * math.ceil(n / 3 / bs)  # one language at a time: more passes
    assert len(bars) == 4


def test_cached_language_is_not_recomputed(tok, monkeypatch, calls):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("gpt2")
    en = find_heads(model, tok, "en", progress=False, **SMALL)
    calls.clear()
    both = find_heads_multi(model, tok, ["en", "hi"], progress=False, **SMALL)
    assert len(calls) == 1 and calls[0]["n"] == 2 * 3  # hi's trials only
    assert torch.equal(both["en"].scores, en.scores)  # read from the cache
    calls.clear()
    hi = find_heads(model, tok, "hi", progress=False, **SMALL)  # cached by the multi call, same key
    assert calls == [] and torch.equal(hi.scores, both["hi"].scores)


def test_apply_finds_all_languages_in_one_pass(tok, monkeypatch, calls):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(3)
    sites = head_sites(model)
    hv = HarmVector(
        {s.layer: torch.randn(s.weight.shape, generator=g) * 0.02 for s in sites},
        kind="tau",
        param_names={s.layer: s.param_name for s in sites},
        model_type="llama",
        source="random",
    )
    SoteriaPatcher.apply(model, LANGS, harm=hv, tokenizer=tok, top_k=3, find_kwargs=SMALL, progress=False)
    assert len(calls) == 1 and sorted(set(calls[0]["groups"])) == list(range(len(LANGS) * 2))
    cfg = model.soteria_config
    SoteriaPatcher.revert(model)
    for lang in LANGS:  # the same heads as one language at a time (its cache entry)
        assert cfg.heads[lang] == find_heads(model, tok, lang, progress=False, **SMALL).top(3)
    assert len(calls) == 1


def test_cli_heads_several_languages_one_pass(tmp_path, capsys, monkeypatch, calls):
    from soteria.cli import main

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    out = tmp_path / "heads"
    argv = ["heads", "tiny:llama", "--langs", "en", "hi,th", "--tasks", "antonym", "--n-shots", "2"]
    assert main([*argv, "--n-trials", "2", "--top-k", "3", "--out", str(out)]) == 0
    assert len(calls) == 1 and calls[0]["n"] == 3 * 2
    text = capsys.readouterr().out
    for lang in LANGS:
        assert f"{lang}: top heads" in text and (out / f"heads_{lang}.json").is_file()


def test_groups_in_one_call_equal_separate_calls(tok, monkeypatch):
    """Two groups with their own clean prompts: each row is patched with its own group's means."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("qwen2", dtype=torch.float64)
    clean_a = ["Q: hot\nA: cold\n\nQ: up\nA:", "Q: big\nA: small\n\nQ: fast\nA:"]
    clean_b = ["Q: France\nA: Paris\n\nQ: Japan\nA:"]
    corr_a, corr_b = ["Q: hot\nA: small\n\nQ: up\nA:"], ["Q: France\nA: Rome\n\nQ: Peru\nA:", "Q: Cuba\nA:"]
    tgt_a, tgt_b = [" down"], [" Tokyo", " Lima"]
    for method in ("atp", "exact"):
        mixed = attribution.indirect_effects(
            model, tok, clean_b + clean_a, corr_a + corr_b, tgt_a + tgt_b, method=method,
            clean_groups=[1, 0, 0], corrupted_groups=[0, 1, 1],
        )  # fmt: skip
        a = attribution.indirect_effects(model, tok, clean_a, corr_a, tgt_a, method=method)
        b = attribution.indirect_effects(model, tok, clean_b, corr_b, tgt_b, method=method)
        _close(mixed, torch.cat([a, b]), method, 1e-9)
        # Everything in one group is another computation: the means differ.
        one = attribution.indirect_effects(model, tok, clean_b + clean_a, corr_a + corr_b, tgt_a + tgt_b, method=method)
        assert (one - mixed).abs().max() > 1e-3 * mixed.abs().max()


def test_bad_groups_and_languages(tok):
    model = tiny_model("llama")
    c, k, t = ["Q: a\nA:", "Q: b\nA:"], ["Q: c\nA:"], [" d"]
    with pytest.raises(ValueError, match=r"corrupted_groups \[2\] have no clean prompts"):
        attribution.indirect_effects(model, tok, c, k, t, clean_groups=[0, 1], corrupted_groups=[2])
    with pytest.raises(ValueError, match="got 1 clean_groups for 2 prompts"):
        attribution.indirect_effects(model, tok, c, k, t, clean_groups=[0])
    with pytest.raises(ValueError, match="non-negative"):
        attribution.indirect_effects(model, tok, c, k, t, clean_groups=[0, -1], corrupted_groups=[0])
    with pytest.raises(ValueError, match="integer group labels"):
        attribution.indirect_effects(model, tok, c, k, t, corrupted_groups=["x"])
    with pytest.raises(ValueError, match="langs repeat: en"):
        find_heads_multi(model, tok, ["en", "fr", "en"], **SMALL)
    with pytest.raises(ValueError, match="non-empty list"):
        find_heads_multi(model, tok, [], **SMALL)
    with pytest.raises(ValueError, match="tasks_by_lang names languages not in langs: de"):
        find_heads_multi(model, tok, ["en"], tasks_by_lang={"de": ["antonym"]})
    with pytest.raises(ValueError, match="xx"):  # unknown language: refused before any work
        find_heads_multi(model, tok, ["en", "xx"], **SMALL)


def test_own_data_for_some_languages(tok, monkeypatch):
    """tasks applies to every language, tasks_by_lang overrides it for some (e.g. a language
    without built-in probes), also through SoteriaPatcher.apply."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    pairs = [{"input": a, "output": b} for a, b in [("hot", "cold"), ("big", "small"), ("up", "down"),
             ("good", "bad"), ("fast", "slow"), ("day", "night"), ("old", "new"), ("high", "low")]]  # fmt: skip
    model = tiny_model("llama")
    kw = dict(tasks=["antonym"], tasks_by_lang={"zz": {"mine": pairs}}, n_shots=2, n_trials=2, progress=False)
    both = find_heads_multi(model, tok, ["en", "zz"], **kw)
    assert list(both["en"].per_task) == ["antonym"] and list(both["zz"].per_task) == ["mine"]
    zz = find_heads(model, tok, "zz", tasks={"mine": pairs}, n_shots=2, n_trials=2, progress=False)
    assert torch.equal(zz.scores, both["zz"].scores)  # the cache entry written by the multi call
    hv = HarmVector(
        {s.layer: torch.full(s.weight.shape, 0.01) for s in head_sites(model)},
        kind="tau",
        param_names={s.layer: s.param_name for s in head_sites(model)},
        model_type="llama",
        source="constant",
    )
    kw.pop("progress")
    SoteriaPatcher.apply(model, ["en", "zz"], harm=hv, tokenizer=tok, top_k=2, find_kwargs=kw, progress=False)
    assert model.soteria_config.heads == {lang: both[lang].top(2) for lang in ("en", "zz")}
