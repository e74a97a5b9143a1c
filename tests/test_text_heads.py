"""find_heads(source="text"): heads from plain text, against an independent eager computation.

The reference shares nothing with the code under test but ``head_sites``: one sentence at a time
(no padding), ``retain_grad`` on the o_proj input itself, float64 sums.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
import torch

import soteria_kernels
from soteria.arch import head_sites
from soteria.heads import find_heads, find_heads_multi, text_head_scores, text_languages
from soteria.heads.text import load_text
from soteria.langs import PAPER_ORDER
from soteria.models.tiny import tiny_model, tiny_tokenizer

SENTENCES = [
    "The cat sleeps on the warm windowsill.",
    "Rain fell all night.",
    "We walked to the old bridge by the river and watched the boats go by.",
    "Bread.",
    "My sister plays the violin in the school orchestra every Friday.",
    "It is cold today.",
]
FAMILIES = ["llama", "gpt2"]  # GQA nn.Linear, Conv1D


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _reference(model, tok, sentences, baseline: str) -> torch.Tensor:
    """float64 ``[L, H]``: sum over real positions of ``(b - z) . dNLL/dz``, over predicted tokens."""
    sites = head_sites(model)
    L, H, D = len(sites), sites[0].num_heads, sites[0].head_dim
    acts, grads = [[] for _ in sites], [[] for _ in sites]
    n_pred = 0
    for s in sentences:
        ids = torch.tensor([tok(s)["input_ids"]])
        seen, handles = [None] * L, []
        for layer, site in enumerate(sites):

            def hook(mod, args, layer=layer, seen=seen):
                args[0].retain_grad()
                seen[layer] = args[0]

            handles.append(site.module.register_forward_pre_hook(hook))
        try:
            logits = model(input_ids=ids).logits[0].double()
        finally:
            for h in handles:
                h.remove()
        nll = -logits[:-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum()
        nll.backward()
        n_pred += ids.shape[1] - 1
        for layer, z in enumerate(seen):
            acts[layer].append(z[0].detach().double())
            grads[layer].append(z.grad[0].double())
    out = torch.zeros(L, H, dtype=torch.float64)
    for layer in range(L):
        z, g = torch.cat(acts[layer]), torch.cat(grads[layer])
        b = z.mean(0) if baseline == "mean" else torch.zeros_like(z[0])
        out[layer] = ((b - z) * g).view(-1, H, D).sum((0, 2))
    model.zero_grad(set_to_none=True)
    return out / n_pred


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["atp", "grad_x_act"])
def test_matches_eager_reference(family, method, tok):
    model = tiny_model(family)
    got = find_heads(model, tok, "en", source="text", text=SENTENCES, method=method, batch_size=4, cache=False,
                     progress=False)  # fmt: skip
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no gradients left, flags restored
    ref = _reference(model, tok, SENTENCES, "mean" if method == "atp" else "zero")
    err = (got.scores.double() - ref).abs()
    worst = divmod(int(err.argmax()), ref.shape[1])
    assert err.max() <= 1e-4 * ref.abs().max(), f"worst head {worst}: {got.scores[worst]} vs {ref[worst]}"
    assert got.method == method and got.lang == "en"
    s = got.settings
    assert s["source"] == "text" and s["n_sentences"] == len(SENTENCES) and s["text"] == "list"
    assert s["n_tokens"] == sum(len(tok(x)["input_ids"]) for x in SENTENCES)
    assert s["n_predicted"] == s["n_tokens"] - len(SENTENCES)


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_does_not_change_scores(family, tok):
    model = tiny_model(family)
    one = text_head_scores(model, tok, "en", text=SENTENCES, batch_size=1, cache=False, progress=False)
    padded = text_head_scores(model, tok, "en", text=SENTENCES, batch_size=len(SENTENCES), cache=False, progress=False)
    torch.testing.assert_close(padded.scores, one.scores, rtol=1e-4, atol=1e-6 * float(one.scores.abs().max()))


def test_files_and_cache(tok, tmp_path, monkeypatch):
    model = tiny_model("llama")
    txt = tmp_path / "fr.txt"
    txt.write_text("\n".join(SENTENCES) + "\n\n", encoding="utf-8")
    jsonl = tmp_path / "fr.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": s}) for s in SENTENCES), encoding="utf-8")
    a = text_head_scores(model, tok, "fr", text=txt, progress=False)
    b = text_head_scores(model, tok, "fr", text=str(jsonl), cache=False, progress=False)
    torch.testing.assert_close(a.scores, b.scores)
    assert a.settings["text"] == "file:fr.txt"

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(soteria_kernels, "head_attribution", boom)
    again = text_head_scores(model, tok, "fr", text=SENTENCES, progress=False)  # same tokens: a cache hit
    torch.testing.assert_close(again.scores, a.scores)
    assert again.settings == a.settings | {"text": again.settings["text"]}


def _no_model_work(model):
    def refuse(*args, **kwargs):
        raise AssertionError("the model ran before the input was checked")

    for site in head_sites(model):
        site.module.register_forward_pre_hook(refuse)
    return model


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text=[]), "no sentences"),
        (dict(text=["  ", ""]), "no sentences"),
        (dict(text=["fine", 3]), r"text\[1\] is a int"),
        (dict(text=42), "file path or a list"),
        (dict(lang="pt"), "no built-in sentences for 'pt'"),
        (dict(lang="Fr"), "lowercase"),
        (dict(method="exact"), "method must be one of"),
        (dict(max_sentences=0), "max_sentences"),
        (dict(tasks=["antonym"]), "source='probes' only"),
        (dict(n_trials=5), "source='probes' only"),
        (dict(bos="none"), "source='probes' only"),
        (dict(source="wiki"), "source must be"),
        (dict(source="probes", text=["x y"]), "need source='text'"),
        (dict(text=["a b\nc"], lang="en"), None),  # a list entry may hold a newline: fine
    ],
)
def test_bad_input_fails_before_model_work(kwargs, match, tok):
    model = _no_model_work(tiny_model("llama"))
    kwargs = {"lang": "en", "source": "text", **kwargs}
    lang = kwargs.pop("lang")
    if match is None:
        with pytest.raises(AssertionError, match="the model ran"):
            find_heads(model, tok, lang, cache=False, progress=False, **kwargs)
        return
    with pytest.raises(ValueError, match=match) as info:
        find_heads(model, tok, lang, cache=False, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_multi_takes_text_per_language(tok):
    """find_heads_multi(source="text"): each language as find_heads scores it alone; text= one or {lang: text}."""
    model = tiny_model("llama")
    kw = dict(source="text", max_sentences=4, batch_size=2, cache=False, progress=False)
    got = find_heads_multi(model, tok, ["en", "fr"], text={"fr": SENTENCES}, **kw)
    assert list(got) == ["en", "fr"]
    assert got["en"].settings["text"] == "built-in:en" and got["fr"].settings["text"] == "list"
    assert got["fr"].settings["source"] == "text" and got["fr"].settings["n_sentences"] == 4
    for lang, text in (("en", None), ("fr", SENTENCES)):
        alone = find_heads(model, tok, lang, text=text, **kw)
        assert torch.equal(got[lang].scores, alone.scores) and got[lang].settings == alone.settings
    one = find_heads_multi(model, tok, ["fr"], text=SENTENCES, **kw)["fr"]
    assert torch.equal(one.scores, got["fr"].scores)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text=SENTENCES), "one language's sentences"),
        (dict(text={"de": SENTENCES}), "text names de"),
        (dict(text={"fr": []}), "the text for 'fr'"),  # the second language's text is checked before the first runs
        (dict(text={"fr": SENTENCES}, max_sentences=0), "max_sentences"),
        (dict(method="exact"), "method must be one of"),
        (dict(tasks_by_lang={"en": ["antonym"]}), "tasks_by_lang apply to source='probes' only"),
        (dict(means="leave_one_out"), "means apply to source='probes' only"),
        (dict(source="probes", text={"fr": SENTENCES}), "need source='text'"),
        (dict(text={"fr": SENTENCES}, source="wiki"), "source must be"),
    ],
)
def test_multi_bad_text_input_fails_before_model_work(kwargs, match, tok):
    model = _no_model_work(tiny_model("llama"))
    kwargs = {"source": "text", **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        find_heads_multi(model, tok, ["en", "fr"], cache=False, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_a_dict_is_not_a_list_of_sentences():
    with pytest.raises(ValueError, match="got dict"):
        load_text("en", {"en": SENTENCES})


def test_missing_file(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="text file not found"):
        find_heads(tiny_model("llama"), tok, "en", source="text", text=tmp_path / "nope.txt", progress=False)


# Characters of the script each language's sentences must be written in (letters only).
SCRIPTS = {
    "en": "LATIN", "fr": "LATIN", "de": "LATIN", "es": "LATIN", "zh": "CJK", "ar": "ARABIC",
    "bg": "CYRILLIC", "th": "THAI", "hi": "DEVANAGARI", "bn": "BENGALI", "ta": "TAMIL", "te": "TELUGU",
}  # fmt: skip


@pytest.mark.parametrize("lang", PAPER_ORDER)
def test_builtin_sentences_for_every_paper_language(lang):
    assert lang in text_languages()
    sentences, where = load_text(lang)
    assert where == f"built-in:{lang}"
    assert len(sentences) >= 100
    assert len(set(sentences)) == len(sentences), "a built-in sentence is repeated"
    for s in sentences:
        letters = [c for c in s if c.isalpha()]
        native = [c for c in letters if unicodedata.name(c, "").startswith(SCRIPTS[lang])]
        assert len(native) >= 0.8 * len(letters), f"{lang}: not in its script: {s!r}"
    assert load_text(lang, max_sentences=7)[0] == sentences[:7]


def test_apply_finds_text_heads_for_a_language_without_probe_tasks(tok, monkeypatch):
    """SoteriaPatcher.apply(find_kwargs={"source": "text", ...}): a language with no probe tasks
    (pt) is steered on heads from its plain text; the record repeats them."""
    from model_utils import random_tau

    from soteria import SoteriaConfig, SoteriaPatcher

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    kw = dict(source="text", text={"pt": SENTENCES}, max_sentences=4, batch_size=2, cache=False)
    model = tiny_model("llama")
    SoteriaPatcher.apply(model, ["pt"], harm=random_tau(model), tokenizer=tok, top_k=3, find_kwargs=kw,
                         progress=False)  # fmt: skip
    record = model.soteria_config
    want = find_heads(tiny_model("llama"), tok, "pt", progress=False, **{**kw, "text": SENTENCES}).top(3)
    assert record.heads["pt"] == want and record.find_options["source"] == "text"
    again = tiny_model("llama")
    SoteriaPatcher.apply(again, SoteriaConfig.from_json(record.to_json()), harm=random_tau(again), tokenizer=tok,
                         progress=False)  # fmt: skip
    assert again.soteria_config.heads == record.heads
