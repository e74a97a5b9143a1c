"""Batched left-padded generation, chat template / instruction formatting, and resume."""

from __future__ import annotations

import json

import pytest
import torch

from soteria.evaluation import EvalPrompt, GenerationStore, generate_responses, model_id, smoke_prompts
from soteria.models.tiny import BOS_ID, tiny_model, tiny_tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _prompts():
    return smoke_prompts(["en", "hi"])[:3] + smoke_prompts(["hi"])[:2]


def _reference(model, tok, text, max_new_tokens):
    """Unbatched, unpadded greedy generation of one raw prompt."""
    ids = torch.tensor([tok(text)["input_ids"]])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


class _Calls:
    """Forward pre-hook recording each forward call's batch (input_ids as given to the model)."""

    def __init__(self, model, fail_at: int | None = None):
        self.inputs: list[torch.Tensor] = []
        self.fail_at = fail_at
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.inputs.append(kwargs["input_ids"].clone())
        if self.fail_at is not None and len(self.inputs) >= self.fail_at:
            raise RuntimeError("simulated crash")

    @property
    def prefill_batches(self) -> list[int]:
        return [x.shape[0] for x in self.inputs if x.shape[1] > 1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_batched_left_padded_equals_unbatched(family):
    tok = tiny_tokenizer()
    model = tiny_model(family)
    prompts = _prompts()
    rows = generate_responses(model, tok, prompts, batch_size=3, max_new_tokens=5, progress=False)
    assert [r["prompt"] for r in rows] == [p.prompt for p in prompts]  # input order kept
    for p, r in zip(prompts, rows):
        assert r["response"] == _reference(model, tok, p.prompt, 5), p.prompt
        assert r["lang"] == p.lang and r["input"] == p.prompt and r["chat_template"] is False
    assert tok.padding_side == "right" and tok.pad_token == "<pad>"  # the caller's tokenizer is untouched
    assert not model.training


def test_batches_are_left_padded_and_sorted_by_length():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    calls = _Calls(model)
    generate_responses(model, tok, _prompts(), batch_size=2, max_new_tokens=2, progress=False)
    calls.handle.remove()
    prefills = [x for x in calls.inputs if x.shape[1] > 1]
    assert [x.shape[0] for x in prefills] == [2, 2, 1]
    widths = [x.shape[1] for x in prefills]
    assert widths == sorted(widths, reverse=True)
    for x in prefills:
        assert (x[:, -1] != tok.pad_token_id).all()  # real tokens end every row: padding is on the left
    assert any((x[:, 0] == tok.pad_token_id).any() for x in prefills)


def test_chat_template_and_instruction():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    model = tiny_model("llama")
    prompts = [EvalPrompt("कैसे करें?", "hi"), EvalPrompt("How?", "en"), EvalPrompt("Wie?", "xx")]
    calls = _Calls(model)
    with pytest.warns(UserWarning, match="no built-in instruction for language 'xx'"):
        rows = generate_responses(model, tok, prompts, instruction=True, max_new_tokens=2, progress=False, batch_size=1)
    calls.handle.remove()
    assert rows[0]["input"] == "<s>[user] केवल पूछे गए प्रश्न का उत्तर दें।\nकैसे करें?\n[assistant] "
    assert rows[1]["input"] == "<s>[user] Only provide the answer to the given question.\nHow?\n[assistant] "
    assert "Only provide the answer" in rows[2]["input"]  # English fallback
    assert all(r["chat_template"] for r in rows)
    for x in calls.inputs:
        if x.shape[1] > 1:
            assert int((x == BOS_ID).sum()) == 1  # the template's BOS only, none added by the tokenizer
    raw = generate_responses(
        model, tok, prompts[:1], chat_template=False, instruction={"hi": "X"}, max_new_tokens=2, progress=False
    )
    assert raw[0]["input"] == "X\nकैसे करें?"
    with pytest.raises(ValueError, match="no chat template"):
        generate_responses(model, tiny_tokenizer(), prompts[:1], chat_template=True, progress=False)


def test_resume_after_interruption(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    prompts = _prompts()
    expected = generate_responses(model, tok, prompts, batch_size=2, max_new_tokens=4, progress=False)
    path = tmp_path / "gen.jsonl"

    crash = _Calls(model, fail_at=5)  # 4 forward calls finish the first batch of 2; the 5th crashes
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_responses(model, tok, prompts, batch_size=2, max_new_tokens=4, out_path=path, progress=False)
    crash.handle.remove()
    saved = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(saved) == 2  # the finished batch was written before the crash

    calls = _Calls(model)
    rows = generate_responses(model, tok, prompts, batch_size=2, max_new_tokens=4, out_path=path, progress=False)
    calls.handle.remove()
    assert sum(calls.prefill_batches) == 3  # only the missing prompts were generated
    assert [r["response"] for r in rows] == [r["response"] for r in expected]
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and {json.loads(x)["prompt"] for x in lines} == {p.prompt for p in prompts}

    calls = _Calls(model)
    again = generate_responses(model, tok, prompts, batch_size=2, max_new_tokens=4, out_path=path, progress=False)
    calls.handle.remove()
    assert calls.inputs == [] and again == rows

    # other settings, another model: new keys, so they are generated
    calls = _Calls(model)
    generate_responses(model, tok, prompts[:1], max_new_tokens=3, out_path=path, progress=False)
    other = tiny_model("llama", seed=1)
    generate_responses(other, tok, prompts[:1], max_new_tokens=4, out_path=path, progress=False)
    calls.handle.remove()
    assert sum(calls.prefill_batches) == 1
    assert len(path.read_text().splitlines()) == 7


def test_torn_last_line_is_dropped_and_file_repaired(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    path = tmp_path / "gen.jsonl"
    prompts = _prompts()[:2]
    generate_responses(model, tok, prompts[:1], max_new_tokens=2, out_path=path, progress=False)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"model": "x", "lang": "en", "prom')
    store = GenerationStore(path)
    assert len(store.rows) == 1
    generate_responses(model, tok, prompts, max_new_tokens=2, store=store, progress=False)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and all(json.loads(x)["model"] == model_id(model) for x in lines)


def test_model_id_tracks_weights():
    a, b = tiny_model("llama"), tiny_model("llama")
    assert model_id(a) == model_id(b) and model_id(a).startswith("llama@")
    with torch.no_grad():
        b.model.layers[1].self_attn.o_proj.weight[0, 0] += 1e-3
    assert model_id(a) != model_id(b)


def test_string_prompts_and_validation():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    rows = generate_responses(model, tok, ["hello", "bonjour"], langs=["en", "fr"], max_new_tokens=2, progress=False)
    assert [r["lang"] for r in rows] == ["en", "fr"]
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(model, tok, ["a"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="list"):
        generate_responses(model, tok, "a", progress=False)
    with pytest.raises(ValueError, match="2 prompts but 1 languages"):
        generate_responses(model, tok, ["a", "b"], langs=["en"], progress=False)


def test_model_id_separates_a_steered_model_even_when_weights_cannot_be_read(monkeypatch):
    """Offloaded (meta) output projections fingerprint by shape only; the steering record still
    keeps a steered model's stored responses apart from its original's."""
    from soteria import SoteriaPatcher
    from soteria.evaluation import generation
    from soteria.evaluation.generation import model_id
    from soteria.harm import HarmVector
    from soteria.models.tiny import tiny_model

    monkeypatch.setattr(generation, "model_fingerprint", lambda model, full=None: "0" * 64)  # unreadable weights
    base = tiny_model("llama")
    harm = HarmVector.from_models(base, tiny_model("llama", seed=1))
    steered = SoteriaPatcher.apply(tiny_model("llama"), ["hi"], heads=[(0, 1)], harm=harm, scale=0.5)
    assert model_id(base) != model_id(steered)
    assert model_id(base) == model_id(tiny_model("llama"))
