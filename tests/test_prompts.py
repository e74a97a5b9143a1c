"""Probe prompts: template, corruption, targets, determinism, and batch encoding on a tiny model."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from tokenizers import normalizers, processors

from soteria.heads import probes
from soteria.heads.prompts import (
    BOS_RULES,
    REFERENCE_BOS,
    ProbePrompts,
    bos_prefix,
    build_prompts,
    encode_batch,
    first_answer_token,
    format_prompt,
    position_ids,
    split_pairs,
)
from soteria.models.tiny import BOS_ID, EOS_ID, PAD_ID, tiny_model, tiny_tokenizer

CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Spain", "Madrid"),
    ("Italy", "Rome"),
    ("Egypt", "Cairo"),
    ("India", "New Delhi"),
    ("China", "Beijing"),
    ("Bulgaria", "Sofia"),
    ("Thailand", "Bangkok"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
    ("Cuba", "Havana"),
    ("Iran", "Tehran"),
    ("Mali", "Bamako"),
    ("Nepal", "Kathmandu"),
    ("Oman", "Muscat"),
    ("Fiji", "Suva"),
    ("Laos", "Vientiane"),
]
PAIRS = [{"input": x, "output": y} for x, y in CAPITALS]
# Binary labels with repeats: the hard case for "corrupted never equals clean".
SENTIMENT = [{"input": f"review {i}", "output": "positive" if i % 3 else "negative"} for i in range(30)]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def tok_no_bos():
    """The tiny tokenizer with its BOS-adding post-processor removed (like GPT-2's)."""
    t = copy.deepcopy(tiny_tokenizer())
    t.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert t("Q").input_ids[0] != BOS_ID
    return t


def test_format_prompt_exact_text():
    got = format_prompt([("hot", "cold"), ("big", "small")], "up", prefix="<s>")
    assert got == "<s>Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:"
    assert format_prompt([], "up") == "Q: up\nA:"


def test_build_prompts_template_on_a_tiny_example(tok):
    pairs = PAIRS[:6]
    p = build_prompts(pairs, tok, n_shots=2, n_trials=3, seed=1)
    assert isinstance(p, ProbePrompts) and len(p) == 3 and p.prefix == ""
    train, test = split_pairs(pairs, seed=1)
    by_input = {q["input"]: q["output"] for q in pairs}
    for i in range(len(p)):
        (x1, y1), (x2, y2) = p.demonstrations[i]
        xq = p.queries[i]
        assert p.clean[i] == f"Q: {x1}\nA: {y1}\n\nQ: {x2}\nA: {y2}\n\nQ: {xq}\nA:"
        assert p.answers[i] == " " + by_input[xq]
        assert {"input": x1, "output": y1} in train and {"input": x2, "output": y2} in train
        assert {"input": xq, "output": by_input[xq]} in test


def _blocks(prompt):
    *shots, query = prompt.split("\n\n")
    return [tuple(s.split("\n")) for s in shots], query


@pytest.mark.parametrize(("pairs", "n_shots"), [(PAIRS, 2), (PAIRS, 3), (PAIRS, 10), (SENTIMENT, 2), (SENTIMENT, 10)])
def test_corrupted_keeps_demos_and_query_and_permutes_labels(tok, pairs, n_shots):
    for seed in range(20):
        p = build_prompts(pairs, tok, n_shots=n_shots, n_trials=5, seed=seed)
        for i in range(len(p)):
            assert p.corrupted[i] != p.clean[i]
            clean_shots, clean_q = _blocks(p.clean[i])
            bad_shots, bad_q = _blocks(p.corrupted[i])
            assert clean_q == bad_q == f"Q: {p.queries[i]}\nA:"
            assert [q for q, _ in clean_shots] == [q for q, _ in bad_shots]  # same demonstrations
            clean_labels = [a[len("A: ") :] for _, a in clean_shots]
            bad_labels = [a[len("A: ") :] for _, a in bad_shots]
            assert clean_labels == [y for _, y in p.demonstrations[i]]
            assert bad_labels == p.corrupted_labels[i]
            assert Counter(bad_labels) == Counter(clean_labels)  # labels shuffled among themselves
            if pairs is PAIRS:  # distinct labels: a derangement moves every one
                assert all(a != b for a, b in zip(clean_labels, bad_labels))


def test_fewer_than_two_shots_leave_corrupted_equal_to_clean(tok):
    for n_shots in (0, 1):
        p = build_prompts(PAIRS, tok, n_shots=n_shots, n_trials=4)
        assert p.corrupted == p.clean
    assert build_prompts(PAIRS, tok, n_shots=0, n_trials=1).clean[0].startswith("Q: ")


def test_deterministic_by_seed(tok):
    a = build_prompts(PAIRS, tok, n_shots=4, n_trials=8, seed=3)
    b = build_prompts([dict(q) for q in PAIRS], tok, n_shots=4, n_trials=8, seed=3)
    assert a == b
    c = build_prompts(PAIRS, tok, n_shots=4, n_trials=8, seed=4)
    assert c.clean != a.clean


def test_queries_cycle_through_the_held_out_split(tok):
    p = build_prompts(PAIRS, tok, n_shots=3, n_trials=12, seed=0)
    _, test = split_pairs(PAIRS, seed=0)
    assert len(test) == 6
    held_out = {q["input"] for q in test}
    assert set(p.queries[:6]) == held_out and set(p.queries[6:]) == held_out


def test_target_id_is_first_answer_token_after_the_prompt(tok):
    p = build_prompts(PAIRS, tok, n_shots=3, n_trials=10, seed=2)
    for prompt, answer, target in zip(p.clean, p.answers, p.target_ids):
        ids = tok(prompt).input_ids
        full = tok(prompt + answer).input_ids
        assert full[: len(ids)] == ids  # this tokenizer never merges across "A:" + " x"
        assert target == full[len(ids)]
        assert tok.decode([target]).startswith(" ")
        assert answer.startswith(tok.decode([target]))
    assert first_answer_token(tok, "Q: hot\nA:", "") is None


def test_bos_prefix_only_when_the_tokenizer_adds_none(tok, tok_no_bos):
    assert bos_prefix(tok) == ""
    assert bos_prefix(tok_no_bos) == "<s>"
    p = build_prompts(PAIRS, tok_no_bos, n_shots=2, n_trials=2)
    assert all(s.startswith("<s>Q: ") for s in p.clean + p.corrupted)
    for t, prompts in ((tok, build_prompts(PAIRS, tok, n_shots=2, n_trials=2)), (tok_no_bos, p)):
        ids, _, _ = encode_batch(t, prompts.clean)
        assert (ids[:, 0] == BOS_ID).all() and (ids[:, 1] != BOS_ID).all()


def test_answers_without_tokens_are_dropped(tok):
    # A real tokenizer whose normaliser deletes U+200B and trailing spaces: " \u200b" -> no token.
    t = copy.deepcopy(tok)
    t.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Replace("\u200b", ""), normalizers.Strip(False)])
    _, test = split_pairs(PAIRS, seed=0)
    empty = {q["input"] for q in test[:3]}
    pairs = [dict(q, output="\u200b") if q["input"] in empty else q for q in PAIRS]
    p = build_prompts(pairs, t, n_shots=3, n_trials=9, seed=0)
    assert len(p) == 9 and set(p.dropped) == empty
    assert not empty & set(p.queries)
    assert len(set(p.queries)) == len(test) - 3
    all_empty = [dict(q, output="\u200b") if q in test else q for q in PAIRS]
    with pytest.raises(ValueError, match="no held-out query"):
        build_prompts(all_empty, t, n_shots=3, n_trials=2, seed=0)


def test_build_prompts_errors(tok):
    with pytest.raises(ValueError, match=r"n_shots=20 needs at least 20 training pairs.*has 14"):
        build_prompts(PAIRS, tok, n_shots=20)
    same = [{"input": f"x{i}", "output": "same"} for i in range(10)]
    with pytest.raises(ValueError, match="same output"):
        build_prompts(same, tok, n_shots=2)
    with pytest.raises(ValueError, match="n_trials must be an int >= 1"):
        build_prompts(PAIRS, tok, n_trials=0)
    with pytest.raises(ValueError, match="row 1: missing column 'output'"):
        build_prompts([{"input": "a", "output": "b"}, {"input": "c"}], tok)


def test_build_prompts_reads_files(tok, tmp_path):
    path = tmp_path / "caps.jsonl"
    path.write_text("\n".join(json.dumps(q) for q in PAIRS), encoding="utf-8")
    assert build_prompts(path, tok, n_shots=2, n_trials=3) == build_prompts(PAIRS, tok, n_shots=2, n_trials=3)


def test_split_pairs():
    train, test = split_pairs(PAIRS, seed=5)
    assert (len(train), len(test)) == (14, 6)
    assert sorted(q["input"] for q in train + test) == sorted(q["input"] for q in PAIRS)
    assert split_pairs(PAIRS, seed=5) == (train, test)
    assert split_pairs(PAIRS, seed=6) != (train, test)
    assert [len(s) for s in split_pairs(PAIRS[:2], train_frac=0.99)] == [1, 1]
    with pytest.raises(ValueError, match="train_frac"):
        split_pairs(PAIRS, train_frac=1.0)
    with pytest.raises(ValueError, match="at least 2 pairs"):
        split_pairs(PAIRS[:1])


def _builtin_tasks():
    probes._shipped.cache_clear()
    return [(lang, task) for lang in probes.languages() for task in probes.tasks(lang)]


def test_builtin_tasks_give_prompts_with_targets(tok):
    found = _builtin_tasks()
    assert found, "no shipped probe data found under soteria/data/probes (a packaging regression)"
    for lang, task in found:
        p = build_prompts(probes.load_task(lang, task), tok)  # reference defaults: 10 shots, 25 trials
        assert len(p) == 25 and not p.dropped, (lang, task)
        assert all(c != k for c, k in zip(p.clean, p.corrupted)), (lang, task)


# --------------------------------------------------------------------------------------------
# encode_batch

PROMPTS = ["Q: hot\nA:", "Q: France\nA: Paris\n\nQ: Japan\nA:", "नमस्ते", "Q: 北京\nA: 中国\n\nQ: hot\nA: cold"]


def test_encode_batch_padding_and_last_index(tok):
    alone = [tok(s).input_ids for s in PROMPTS]
    width = max(map(len, alone))
    before = tok.padding_side
    for side in ("right", "left"):
        ids, mask, last = encode_batch(tok, PROMPTS, padding_side=side)
        assert ids.shape == mask.shape == (len(PROMPTS), width) and ids.dtype == torch.long
        for i, row in enumerate(alone):
            real = ids[i][mask[i].bool()].tolist()
            assert real == row
            assert ids[i, last[i]].item() == row[-1]
            assert (ids[i][~mask[i].bool()] == PAD_ID).all()
            start = 0 if side == "right" else width - len(row)
            assert mask[i].tolist() == [0] * start + [1] * len(row) + [0] * (width - len(row) - start)
    assert tok.padding_side == before


def test_encode_batch_uses_ids_exactly_as_given(tok):
    rows = [[5, 6, 7], (9,), torch.tensor([300, 2, 1, 0]), torch.tensor([11, 12], dtype=torch.int32)]
    ids, mask, last = encode_batch(tok, rows, padding_side="left", device="cpu")
    assert ids.tolist() == [[PAD_ID, 5, 6, 7], [PAD_ID] * 3 + [9], [300, 2, 1, 0], [PAD_ID, PAD_ID, 11, 12]]
    assert last.tolist() == [3, 3, 3, 3] and mask.sum(1).tolist() == [3, 1, 4, 2]
    ids, _, last = encode_batch(tok, rows)
    assert ids[0].tolist() == [5, 6, 7, PAD_ID] and last.tolist() == [2, 0, 3, 1]  # no BOS added


def test_encode_batch_pad_fallback_and_errors(tok):
    t = copy.deepcopy(tok)
    t.pad_token = None
    ids, _, _ = encode_batch(t, [[4], [4, 5]])
    assert ids[0, 1].item() == EOS_ID
    t.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        encode_batch(t, [[4], [4, 5]])
    with pytest.raises(ValueError, match="mix strings"):
        encode_batch(tok, ["Q: a", [1, 2]])
    with pytest.raises(ValueError, match="wrap a single prompt"):
        encode_batch(tok, "Q: a")
    with pytest.raises(ValueError, match="padding_side"):
        encode_batch(tok, ["Q: a"], padding_side="middle")
    with pytest.raises(ValueError, match="empty"):
        encode_batch(tok, [])
    with pytest.raises(ValueError, match=r"prompts\[1\] is an empty token-id list"):
        encode_batch(tok, [[1], []])
    with pytest.raises(ValueError, match=r"prompts\[0\], position 1: expected an int token id"):
        encode_batch(tok, [[1, 2.0]])
    with pytest.raises(ValueError, match="negative token id"):
        encode_batch(tok, [[1, -3]])
    with pytest.raises(ValueError, match="integer dtype"):
        encode_batch(tok, [torch.tensor([1.0, 2.0])])


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])  # rotary and absolute positions
def test_encode_batch_logits_match_single_prompt_runs(tok, model_type):
    model = tiny_model(model_type)
    with torch.no_grad():
        alone = [model(torch.tensor([tok(s).input_ids])).logits[0, -1] for s in PROMPTS]
        for side in ("right", "left"):
            ids, mask, last = encode_batch(tok, PROMPTS, padding_side=side)
            logits = model(ids, attention_mask=mask, position_ids=position_ids(mask)).logits
            got = logits[torch.arange(len(PROMPTS)), last]
            for i, ref in enumerate(alone):
                torch.testing.assert_close(got[i], ref, atol=1e-5, rtol=1e-5, msg=f"{side} row {i}")
            if side == "right":  # right padding needs no position ids
                plain = model(ids, attention_mask=mask).logits[torch.arange(len(PROMPTS)), last]
                torch.testing.assert_close(plain, got, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- BOS rules per tokenizer family


def _family_tokenizer(family: str):
    """The tiny tokenizer dressed as a family's tokenizer, as far as the BOS rules can see.

    llama: adds ``<s>`` itself. Without that post-processor: gpt2 (BOS ``<|endoftext|>``, not
    added), qwen2 (``<|endoftext|>`` special, no BOS token), phi3 (BOS ``<s>`` not added, and
    ``<|endoftext|>`` special), plain (BOS ``<s>`` not added, no ``<|endoftext|>``).
    """
    t = copy.deepcopy(tiny_tokenizer())
    if family == "llama":
        return t
    t.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if family != "plain":
        t.add_special_tokens({"additional_special_tokens": [REFERENCE_BOS]})
    if family == "gpt2":
        t.bos_token = REFERENCE_BOS
    elif family == "qwen2":
        t.bos_token = None
    return t


ENDOFTEXT_ID = 512  # the id the added <|endoftext|> gets (the tiny vocabulary has 512 tokens)
FAMILY_PREFIX = {  # family: (reference rule, soteria's earlier "tokenizer" rule)
    "llama": ("", ""),
    "gpt2": (REFERENCE_BOS, REFERENCE_BOS),
    "qwen2": (REFERENCE_BOS, ""),
    "phi3": (REFERENCE_BOS, "<s>"),
    "plain": ("<s>", "<s>"),
}


@pytest.mark.parametrize("family", list(FAMILY_PREFIX))
def test_bos_rule_per_tokenizer_family(family):
    t = _family_tokenizer(family)
    ref, old = FAMILY_PREFIX[family]
    assert (bos_prefix(t), bos_prefix(t, "reference"), bos_prefix(t, "tokenizer"), bos_prefix(t, "none")) == (
        ref, ref, old, "")  # fmt: skip
    stripped = {}
    for bos, prefix in (("reference", ref), ("tokenizer", old), ("none", "")):
        p = build_prompts(PAIRS, t, n_shots=3, n_trials=4, bos=bos)
        assert (p.bos, p.prefix) == (bos, prefix)
        assert all(s.startswith(prefix + "Q: ") for s in p.clean + p.corrupted)
        ids, _, _ = encode_batch(t, p.clean + p.corrupted)
        first = {"": None, REFERENCE_BOS: ENDOFTEXT_ID, "<s>": BOS_ID}[prefix]
        if family == "llama":  # the tokenizer's own <s> comes first, whatever the rule
            first = BOS_ID
        if first is None:
            assert not (ids[:, 0] == BOS_ID).any() and not (ids[:, 0] == ENDOFTEXT_ID).any()
        else:
            assert (ids[:, 0] == first).all()
            assert not (ids[:, 1] == BOS_ID).any() and not (ids[:, 1] == ENDOFTEXT_ID).any()
        # The rule changes the text in front only: same draws, same targets.
        stripped[bos] = ([s[len(prefix) :] for s in p.clean + p.corrupted], p.target_ids)
    assert stripped["reference"] == stripped["tokenizer"] == stripped["none"]


def test_reference_bos_is_the_default_and_old_rule_is_kept(tok_no_bos):
    qwen = _family_tokenizer("qwen2")
    assert build_prompts(PAIRS, qwen, n_shots=2, n_trials=2).prefix == REFERENCE_BOS
    assert build_prompts(PAIRS, qwen, n_shots=2, n_trials=2, bos="tokenizer").prefix == ""
    # "<|endoftext|>" split into pieces is never prepended: a tokenizer without it keeps the tokenizer rule.
    assert len(tok_no_bos(REFERENCE_BOS, add_special_tokens=False).input_ids) > 1
    assert bos_prefix(tok_no_bos) == bos_prefix(tok_no_bos, "tokenizer") == "<s>"
    assert set(BOS_RULES) == {"reference", "tokenizer", "none"}


@pytest.mark.parametrize("bad", ["bos", "", None, True, "<|endoftext|>"])
def test_bad_bos_is_refused(tok, bad):
    with pytest.raises(ValueError, match="bos must be one of"):
        build_prompts(PAIRS, tok, n_shots=2, n_trials=2, bos=bad)
    with pytest.raises(ValueError, match="bos must be one of"):
        bos_prefix(tok, bad)


@pytest.mark.parametrize(("model_type", "family"), [("qwen2", "qwen2"), ("llama", "llama"), ("gpt2", "gpt2")])
def test_find_heads_records_prompt_settings_and_caches_by_bos(model_type, family, monkeypatch, tmp_path):
    import soteria.heads.attribution as attribution
    from soteria.heads import find_heads

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    monkeypatch.setenv("SOTERIA_CACHE_DIR", str(tmp_path / "c"))
    t = _family_tokenizer(family)
    model = tiny_model(model_type, vocab_size=ENDOFTEXT_ID + 8)
    small = dict(tasks={"capital": PAIRS}, n_shots=3, n_trials=2, progress=False)
    ref = find_heads(model, t, "xx", **small)
    prompts = ref.settings["prompts"]
    assert prompts["bos"] == "reference" and prompts["bos_text"] == FAMILY_PREFIX[family][0]
    assert {"shuffle", "queries", "means", "precision"} <= set(prompts)
    assert "derangement" in prompts["shuffle"] and "float32" in prompts["precision"]
    old = find_heads(model, t, "xx", **small, bos="tokenizer")
    assert old.settings["prompts"]["bos"] == "tokenizer"
    assert old.settings["prompts"]["bos_text"] == FAMILY_PREFIX[family][1]
    # Each rule has its own cache entry, even where both give the same text (llama, gpt2).
    assert len(list((tmp_path / "c" / "heads").glob("*.json"))) == 2
    if FAMILY_PREFIX[family][0] != FAMILY_PREFIX[family][1]:
        assert not torch.equal(ref.scores, old.scores)

    def boom(*a, **k):
        raise AssertionError("cache miss: indirect_effects was called")

    monkeypatch.setattr(attribution, "indirect_effects", boom)
    for bos, want in (("reference", ref), ("tokenizer", old)):
        assert torch.equal(find_heads(model, t, "xx", **small, bos=bos).scores, want.scores)
    with pytest.raises(AssertionError, match="cache miss"):
        find_heads(model, t, "xx", **small, bos="none")
    with pytest.raises(ValueError, match="bos must be one of"):
        find_heads(model, t, "xx", **small, bos="literal")
