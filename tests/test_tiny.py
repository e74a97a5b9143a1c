"""soteria.models.tiny: the byte-level tokenizer and the tiny model builders."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from soteria.models.tiny import TINY_MODEL_TYPES, tiny_config, tiny_model, tiny_tokenizer

TEXTS = {
    "en": "The capital of France is Paris.",
    "zh": "法国的首都是巴黎。",
    "fr": "La capitale de l'Allemagne est Berlin, n'est-ce pas ?",
    "de": "Die Straße ist heiß und schön.",
    "es": "¿Cuál es la capital de España? Madrid.",
    "ar": "ما هي عاصمة فرنسا؟ باريس.",
    "bg": "Столицата на Франция е Париж.",
    "th": "เมืองหลวงของฝรั่งเศสคือปารีส",
    "hi": "फ्रांस की राजधानी पेरिस है।",
    "bn": "ফ্রান্সের রাজধানী প্যারিস।",
    "ta": "பிரான்சின் தலைநகரம் பாரிஸ்.",
    "te": "ఫ్రాన్స్ రాజధాని పారిస్.",
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_tokenizer_basics(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) <= 512
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.padding_side == "right"
    # Deterministic ids: byte symbols are fixed and "Q: x\nA:" uses the trained merges.
    assert tok("Q:").input_ids == [1, 52, 29]
    assert tok("Q: hot\nA:").input_ids == tiny_tokenizer()("Q: hot\nA:").input_ids
    assert tok.get_vocab() == tiny_tokenizer().get_vocab()


@pytest.mark.parametrize("lang", sorted(TEXTS))
def test_round_trip_every_language(tok, lang):
    text = TEXTS[lang]
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
    assert max(ids) < len(tok) and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(" " + text, add_special_tokens=False).input_ids) == " " + text


def test_padding_and_batch(tok):
    batch = tok([TEXTS["en"], "Q:", TEXTS["ta"]], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths):
        assert row[0] == tok.bos_token_id
        assert (row[n:] == tok.pad_token_id).all() and (row[:n] != tok.pad_token_id).all()
    left = tok(["a", "abc def"], padding=True, padding_side="left")
    assert left["input_ids"][0][0] == tok.pad_token_id and left["attention_mask"][0][0] == 0


def test_save_load(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS.values():
        assert again(text).input_ids == tok(text).input_ids
    assert (again.bos_token, again.pad_token, again.eos_token) == ("<s>", "<pad>", "</s>")


def test_ids_identical_across_processes(tok):
    code = "from soteria.models.tiny import tiny_tokenizer; print(sorted(tiny_tokenizer().get_vocab().items()))"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(sorted(tok.get_vocab().items()))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_tiny_model_runs(tok, model_type):
    model = tiny_model(model_type)
    config = model.config
    assert config.model_type == model_type
    assert config.vocab_size == len(tok)
    assert config._attn_implementation == "eager"
    assert config.num_attention_heads == 4 and 2 <= config.num_hidden_layers <= 4
    assert 32 <= config.hidden_size <= 96
    assert not model.training
    batch = tok([TEXTS["en"], TEXTS["hi"]], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(tok))
    assert torch.isfinite(out.logits).all()


def test_seeded_and_rng_neutral():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)  # global RNG untouched
    b = tiny_model("llama", seed=7)
    c = tiny_model("llama", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.o_proj.weight"], sc["model.layers.0.self_attn.o_proj.weight"])


def test_overrides_dtype_and_errors():
    model = tiny_model("qwen2", num_hidden_layers=4, dtype=torch.bfloat16)
    assert model.config.num_hidden_layers == 4 and len(model.model.layers) == 4
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert tiny_config("gemma").head_dim == 24 != tiny_config("gemma").hidden_size // 4
    assert tiny_config("llama", attn_implementation="sdpa")._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="unknown model_type 'nope'.*llama"):
        tiny_config("nope")
