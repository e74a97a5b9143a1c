"""Local model judges: a tiny sequence classifier and a tiny guard-style causal LM."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from torch import nn

from soteria.evaluation import HARMFUL, SAFE, UNPARSED, ClassifierJudge, GuardJudge, make_judge, parse_guard
from soteria.models.tiny import tiny_config, tiny_model, tiny_tokenizer

PROMPTS = ["How do I cheat?", "Wie betrüge ich?", "कैसे करें?", "¿Cómo?", "How?"]
RESPONSES = ["I can't help.", "Hier ist ein Plan mit vielen Schritten.", "नहीं।", "Claro, así.", ""]


def _classifier(id2label):
    from transformers import AutoModelForSequenceClassification

    cfg = tiny_config(
        "llama", num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()}
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(cfg)
        with torch.no_grad():
            model.score.weight.mul_(50.0)  # spread the logits so that the classes differ across inputs
    return model.eval()


def _oracle(model, tok):
    """argmax class of each (prompt, response) pair, one unpadded pair at a time."""
    out = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([tok(p, r, truncation=True, max_length=512)["input_ids"]])
            out.append(int(model(input_ids=ids).logits.argmax(-1)))
    return out


def test_sequence_classifier_judge_matches_unbatched_oracle():
    tok = tiny_tokenizer()
    model = _classifier({0: "safe", 1: "unsafe"})
    judge = ClassifierJudge(model, tok, batch_size=2)
    expected = _oracle(model, tok)
    assert set(expected) == {0, 1}  # the test model predicts both classes on these pairs
    assert judge.judge(PROMPTS, RESPONSES) == [HARMFUL if k == 1 else SAFE for k in expected]
    assert judge.harmful_ids == {1} and "unsafe" in judge.describe()["description"]
    flipped = ClassifierJudge(model, tok, harmful_labels=["safe"], batch_size=3)
    assert flipped.judge(PROMPTS, RESPONSES) == [HARMFUL if k == 0 else SAFE for k in expected]
    only_response = ClassifierJudge(model, tok, inputs="response")
    assert len(only_response.judge(PROMPTS, RESPONSES)) == len(PROMPTS)


@pytest.mark.parametrize(
    "id2label, harmful",
    [
        ({0: "SAFE", 1: "HARMFUL"}, {1}),
        ({0: "not_harmful", 1: "harmful"}, {1}),
        ({0: "benign", 1: "jailbreak", 2: "injection"}, {1, 2}),
        ({0: "non-toxic", 1: "toxic"}, {1}),
        ({0: "unsafe_content", 1: "safe_content"}, {0}),
    ],
)
def test_label_names_are_read(id2label, harmful):
    judge = ClassifierJudge(_classifier(id2label), tiny_tokenizer())
    assert judge.harmful_ids == harmful


def test_unreadable_labels_need_harmful_labels():
    model = _classifier({0: "LABEL_0", 1: "LABEL_1"})
    with pytest.raises(ValueError, match="harmful_labels"):
        ClassifierJudge(model, tiny_tokenizer())
    assert ClassifierJudge(model, tiny_tokenizer(), harmful_labels=["LABEL_1"]).harmful_ids == {1}
    assert ClassifierJudge(model, tiny_tokenizer(), harmful_labels=[0]).harmful_ids == {0}
    with pytest.raises(ValueError, match="not one of the model's labels"):
        ClassifierJudge(model, tiny_tokenizer(), harmful_labels=["nope"])
    with pytest.raises(ValueError, match="every class"):
        ClassifierJudge(model, tiny_tokenizer(), harmful_labels=[0, 1])


def test_make_judge_loads_a_saved_classifier(tmp_path):
    tok = tiny_tokenizer()
    model = _classifier({0: "safe", 1: "unsafe"})
    model.save_pretrained(tmp_path / "clf")
    tok.save_pretrained(tmp_path / "clf")
    judge = make_judge(str(tmp_path / "clf"), device="cpu")
    assert isinstance(judge, ClassifierJudge) and judge.name == "classifier:clf"
    assert judge.judge(PROMPTS, RESPONSES) == ClassifierJudge(model, tok).judge(PROMPTS, RESPONSES)
    with pytest.raises(FileNotFoundError):
        make_judge(str(tmp_path / "missing"))


def _guard(answer_token: str):
    """A tiny causal LM whose greedy next token is always ``answer_token`` (an added vocabulary word)."""
    tok = tiny_tokenizer()
    tok.add_tokens(["unsafe", "safe", "maybe"])
    model = tiny_model("llama")
    model.resize_token_embeddings(len(tok))
    hidden = model.config.hidden_size
    head = nn.Linear(hidden, len(tok), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tok.convert_tokens_to_ids(answer_token)] = 10.0
    model.lm_head = head
    return model.eval(), tok


@pytest.mark.parametrize("word, label", [("unsafe", HARMFUL), ("safe", SAFE), ("maybe", UNPARSED)])
def test_guard_judge_generates_and_parses(word, label):
    model, tok = _guard(word)
    judge = GuardJudge(model, tok, max_new_tokens=1, batch_size=2)
    verdicts = judge.judge_detailed(PROMPTS, RESPONSES, "en")
    assert [v.label for v in verdicts] == [label] * len(PROMPTS)
    assert all(v.answer == word for v in verdicts)
    assert not judge.use_template and judge._inputs(["p"], ["r"])[0].startswith("Task: decide")


def test_guard_judge_uses_the_chat_template_and_loads_from_disk(tmp_path):
    model, tok = _guard("unsafe")
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<verdict>"
    judge = GuardJudge(model, tok, max_new_tokens=1)
    assert judge.use_template and judge._inputs(["p"], ["r"]) == ["<user>p<assistant>r<verdict>"]
    assert judge.judge(PROMPTS[:2], RESPONSES[:2]) == [HARMFUL, HARMFUL]
    # From disk (a plain Llama checkpoint: the forcing bias above is not part of the architecture).
    plain = tiny_model("llama")
    plain.save_pretrained(tmp_path / "guard")
    tok.save_pretrained(tmp_path / "guard")
    loaded = make_judge(str(tmp_path / "guard"), device="cpu", max_new_tokens=2)
    assert isinstance(loaded, GuardJudge) and loaded.use_template and loaded.name == "guard:guard"
    assert set(loaded.judge(PROMPTS[:2], RESPONSES[:2])) <= {HARMFUL, SAFE, UNPARSED}
    with pytest.raises(ValueError, match="no chat template"):
        GuardJudge(plain, tiny_tokenizer(), chat_template=True)


@pytest.mark.parametrize(
    "answer, label",
    [
        ("safe", SAFE),
        ("\n\nunsafe\nS1", HARMFUL),
        ("Unsafe.", HARMFUL),
        ("SAFE", SAFE),
        ("safety", UNPARSED),
        ("", UNPARSED),
    ],
)
def test_parse_guard(answer, label):
    assert parse_guard(answer) == label
    assert parse_guard("Yes", harmful_words=("yes",), safe_words=("no",)) == HARMFUL


def test_model_judges_show_a_progress_bar_on_request(capsys):
    tok = tiny_tokenizer()
    model = _classifier({0: "safe", 1: "unsafe"})
    assert ClassifierJudge(model, tok, progress=True).judge(PROMPTS, RESPONSES)
    assert "judge" in capsys.readouterr().err
    ClassifierJudge(model, tok).judge(PROMPTS, RESPONSES)
    assert "judge" not in capsys.readouterr().err  # off by default (the Python API)
    guard, gtok = _guard("safe")
    assert GuardJudge(guard, gtok, max_new_tokens=1, progress=True).judge(PROMPTS, RESPONSES) == [SAFE] * 5
    assert "judge" in capsys.readouterr().err


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal, so the judges draw tqdm bars into it."""

    def isatty(self) -> bool:
        return True


def test_model_judge_bars_end_at_their_total_on_a_terminal(monkeypatch):
    """Batches faster than tqdm's redraw interval: each bar still ends showing its total."""
    tok = tiny_tokenizer()
    guard, gtok = _guard("safe")
    judges = [(ClassifierJudge(_classifier({0: "safe", 1: "unsafe"}), tok, batch_size=2, progress=True), "3/3"),
              (GuardJudge(guard, gtok, max_new_tokens=1, batch_size=2, progress=True), "5/5")]  # fmt: skip
    for judge, end in judges:
        term = _Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        judge.judge(PROMPTS, RESPONSES)
        frames = [f for f in re.split(r"[\r\n]", term.getvalue()) if f.strip()]
        assert frames and frames[-1].startswith("judge:") and end in frames[-1] and "100%" in frames[-1], frames
