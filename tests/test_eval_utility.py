"""Utility measures against direct computations: KL, perplexity, probe accuracy."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from soteria.evaluation import next_token_kl, perplexity, probe_accuracy
from soteria.heads.probes import load_task
from soteria.heads.prompts import build_prompts
from soteria.models.tiny import tiny_model, tiny_tokenizer

TEXTS = ["The market opens at seven every morning.", "हर सुबह बाज़ार खुलता है।", "Hi"]


def _logp(model, tok, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        return F.log_softmax(model(input_ids=ids).logits.double(), -1)[0], ids[0]


def test_kl_zero_for_identical_models_and_matches_direct_computation():
    tok = tiny_tokenizer()
    base, twin, other = tiny_model("llama"), tiny_model("llama"), tiny_model("llama", seed=3)
    same = next_token_kl(base, twin, tok, TEXTS, batch_size=2)
    assert same["mean"] == 0.0 and same["max"] == 0.0
    got = next_token_kl(base, other, tok, TEXTS, batch_size=2)
    # float64, one unpadded text at a time: sum over positions of KL(p_base || p_other)
    total, count, per_text = 0.0, 0, []
    for text in TEXTS:
        lp, _ = _logp(base, tok, text)
        lq, _ = _logp(other, tok, text)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total, count = total + float(kl.sum()), count + kl.numel()
        per_text.append(float(kl.mean()))
    assert got["positions"] == count
    assert got["mean"] == pytest.approx(total / count, rel=1e-4)
    assert got["per_text"] == pytest.approx(per_text, rel=1e-4)
    assert got["mean"] > 0


def test_kl_rejects_different_vocabularies():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="vocabularies differ"):
        next_token_kl(tiny_model("llama"), tiny_model("llama", vocab_size=500), tok, ["hello"])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_perplexity_matches_hf_loss(family):
    tok = tiny_tokenizer()
    model = tiny_model(family)
    single = perplexity(model, tok, TEXTS[0])
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    assert single["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)
    assert single["tokens"] == ids.shape[1] - 1
    # padded batch == pooled direct computation
    nll, count = 0.0, 0
    for text in TEXTS:
        lp, t = _logp(model, tok, text)
        nll -= float(lp[:-1].gather(-1, t[1:, None]).sum())
        count += len(t) - 1
    batched = perplexity(model, tok, TEXTS, batch_size=3)
    assert batched["tokens"] == count
    assert batched["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    with pytest.raises(ValueError, match="no non-empty texts"):
        perplexity(model, tok, ["  "])


def test_probe_accuracy_matches_direct_count():
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    with torch.no_grad():  # a zero head gives equal logits: argmax is token 0 (<unk>), never a target
        model.lm_head.weight.zero_()
    res = probe_accuracy(model, tok, "en", tasks=["antonym"], n_shots=3, max_prompts=4, seed=1, batch_size=3)
    assert res == {"accuracy": 0.0, "correct": 0, "total": 4, "per_task": {"antonym": 0.0}}

    fresh = tiny_model("llama")
    res = probe_accuracy(
        fresh, tok, "en", tasks=["antonym", "country_capital"], n_shots=3, max_prompts=3, seed=1, batch_size=2
    )
    hits = 0
    for task in ("antonym", "country_capital"):
        pp = build_prompts(load_task("en", task), tok, n_shots=3, n_trials=3, seed=1)
        for prompt, tgt in zip(pp.clean, pp.target_ids):
            lp, _ = _logp(fresh, tok, prompt)
            hits += int(int(lp[-1].argmax()) == tgt)
    assert res["total"] == 6 and res["correct"] == hits and res["accuracy"] == hits / 6
    with pytest.raises(ValueError, match="unknown probe language"):
        probe_accuracy(fresh, tok, "xx")


def test_probe_accuracy_reads_each_rows_last_real_token():
    """A model that answers right only at the exact end of chosen prompts (an oracle hook on the
    logits): accuracy must count exactly those, so the padded batch is read at each row's last
    real token and compared with that row's target. (A random tiny model scores 0 either way.)"""
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    tasks = ["antonym", "country_capital"]
    oracle, expected = {}, {}
    for task in tasks:
        pp = build_prompts(load_task("en", task), tok, n_shots=3, n_trials=4, seed=1)
        chosen = [(p, t) for i, (p, t) in enumerate(zip(pp.clean, pp.target_ids)) if i % 2 == 0]
        oracle.update({tuple(tok(p)["input_ids"]): t for p, t in chosen})
        expected[task] = len(chosen) / len(pp.clean)

    def answer(module, args, kwargs, output):
        ids = kwargs["input_ids"]
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):  # the prefix includes any padding: only the real end matches
                target = oracle.get(tuple(ids[b, : t + 1].tolist()))
                if target is not None:
                    output.logits[b, t, target] += 1e4
        return output

    handle = model.register_forward_hook(answer, with_kwargs=True)
    try:
        res = probe_accuracy(model, tok, "en", tasks=tasks, n_shots=3, max_prompts=4, seed=1, batch_size=3)
    finally:
        handle.remove()
    assert res["per_task"] == expected and res["total"] == 8
    assert res["correct"] == len(oracle) == 4 and res["accuracy"] == 0.5
