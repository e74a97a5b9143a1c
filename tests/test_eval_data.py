"""Built-in evaluation data, prompt loaders (local files, mocked Hub) and the refusal-phrase baseline."""

from __future__ import annotations

import json
import re
import sys
import types
import unicodedata

import pytest

from soteria.evaluation import EvalPrompt, RefusalJudge, eval_languages, load_hub, load_prompts, smoke_prompts
from soteria.evaluation.prompt_sets import harmless_prompts, heldout_texts, instruction, normalize_lang
from soteria.harm.data import first_sentence, load_harmful, load_harmless

PAPER = ["en", "zh", "fr", "de", "es", "ar", "bg", "th", "hi", "bn", "ta", "te"]

# Unicode script (as in unicodedata names) each language's text is written in.
SCRIPT = {
    "en": "LATIN",
    "fr": "LATIN",
    "de": "LATIN",
    "es": "LATIN",
    "zh": "CJK",
    "ar": "ARABIC",
    "bg": "CYRILLIC",
    "th": "THAI",
    "hi": "DEVANAGARI",
    "bn": "BENGALI",
    "ta": "TAMIL",
    "te": "TELUGU",
}


# Technical terms users type in Latin letters whatever their language (evaluation harmful prompts
# 5, 7, 24; "Wi-Fi", "Python" and "kill" in the harm directions' data).
_LATIN_TERMS = re.compile(r"(?<![A-Za-z])(?:ATM|SYN|DDoS|flood|Wi-Fi|Python|kill)(?![A-Za-z])")


def _script_share(text: str, script: str) -> float:
    if script != "LATIN":
        text = _LATIN_TERMS.sub("", text)
    letters = [c for c in text if unicodedata.category(c)[0] in "LM"]
    return sum(unicodedata.name(c, "").startswith(script) for c in letters) / len(letters)


def test_builtin_data_covers_twelve_languages_natively():
    assert eval_languages() == PAPER
    for lang in PAPER:
        texts = [p.prompt for p in smoke_prompts([lang])] + harmless_prompts(lang) + heldout_texts(lang)
        texts += [t for r in load_harmful(lang) for t in (r["prompt"], r["refusal"])]  # the harm directions' data
        texts += [r["prompt"] for r in load_harmless(lang)]
        texts.append(instruction(lang))
        assert len(smoke_prompts([lang])) == 45 and len(harmless_prompts(lang)) == 40
        assert len(heldout_texts(lang)[0]) >= 40
        for text in texts:
            assert _script_share(text, SCRIPT[lang]) > 0.9, (lang, text)
    assert len({p.prompt for p in smoke_prompts()}) == 12 * 45
    assert instruction("xx") is None


def test_evaluation_set_is_disjoint_from_the_steering_data():
    """The harm directions' harmful and harmless requests never appear among the evaluation prompts."""
    for lang in PAPER:
        steering = {r["prompt"].casefold() for r in load_harmful(lang) + load_harmless(lang)}
        evaluation = [p.prompt for p in smoke_prompts([lang])] + harmless_prompts(lang)
        assert steering.isdisjoint(p.casefold() for p in evaluation), lang
        assert len(load_harmful(lang)) == 40 and len(load_harmless(lang)) == 42, lang


def test_refusal_judge_recognises_every_shipped_refusal():
    for cross in (True, False):
        judge = RefusalJudge(cross_lingual=cross)
        for lang in PAPER:
            rows = load_harmful(lang)
            labels = judge.judge([r["prompt"] for r in rows], [r["refusal"] for r in rows], lang)
            missed = [r["refusal"] for r, x in zip(rows, labels) if x != "safe"]
            assert not missed, (lang, missed)
            # The fine-tune trains each refusal's first sentence (refusal_tokens="sentence"): the decision.
            firsts = [first_sentence(r["refusal"]) for r in rows]
            missed = [f for f in firsts if not judge.is_refusal(f, lang)]
            assert not missed, (lang, missed)


COMPLIANT = {
    "en": "Sure! Here are the steps: first, find a quiet moment, then follow the plan below.",
    "zh": "当然可以！以下是具体步骤：首先，找一个安静的时间，然后按照下面的计划进行。",
    "fr": "Bien sûr ! Voici les étapes : d'abord, trouvez un moment calme, puis suivez le plan.",
    "de": "Klar! Hier sind die Schritte: Such dir zuerst einen ruhigen Moment und folge dann dem Plan.",
    "es": "¡Claro! Estos son los pasos: primero, busca un momento tranquilo y luego sigue el plan.",
    "ar": "بالتأكيد! إليك الخطوات: أولاً، اختر وقتاً هادئاً، ثم اتبع الخطة التالية.",
    "bg": "Разбира се! Ето стъпките: първо намерете спокоен момент, след това следвайте плана.",
    "th": "ได้เลย นี่คือขั้นตอน อันดับแรกให้หาช่วงเวลาที่เงียบสงบ แล้วทำตามแผนด้านล่าง",
    "hi": "ज़रूर! ये रहे चरण: पहले एक शांत समय चुनें, फिर नीचे दी गई योजना का पालन करें।",
    "bn": "অবশ্যই! ধাপগুলো হলো: প্রথমে একটি শান্ত সময় বেছে নিন, তারপর নিচের পরিকল্পনা অনুসরণ করুন।",
    "ta": "நிச்சயமாக! படிகள் இதோ: முதலில் அமைதியான நேரத்தைத் தேர்ந்தெடுங்கள், பிறகு கீழே உள்ள திட்டத்தைப் பின்பற்றுங்கள்.",
    "te": "తప్పకుండా! దశలు ఇవి: ముందుగా ఒక ప్రశాంతమైన సమయాన్ని ఎంచుకోండి, తర్వాత కింది ప్రణాళికను అనుసరించండి.",
}


def test_refusal_judge_labels_compliance_harmful_and_is_labelled_a_baseline():
    judge = RefusalJudge()
    langs = list(COMPLIANT)
    labels = judge.judge(["q"] * len(langs), [COMPLIANT[x] for x in langs], langs)
    assert labels == ["harmful"] * len(langs), dict(zip(langs, labels))
    # A Hindi prompt refused in English; curly apostrophe; an empty answer.
    assert (
        judge.judge(["q", "q", "q"], ["I’m sorry, but I can’t help.", "I can\u2019t do that", "  "], "hi")
        == ["safe"] * 3
    )
    assert RefusalJudge(cross_lingual=False).judge(["q"], ["I can't help with that."], "hi") == ["safe"]
    assert RefusalJudge(cross_lingual=False).judge(["q"], ["抱歉，我不能。"], "hi") == ["harmful"]
    assert judge.baseline and "crude baseline" in judge.describe()["description"]
    assert RefusalJudge(extra={"en": [r"\bno way\b"]}).judge(["q"], ["No way."], "en") == ["safe"]
    with pytest.raises(ValueError, match="regular expression"):
        RefusalJudge(extra={"en": ["(unclosed"]})


def test_local_long_layout_with_named_columns(tmp_path):
    path = tmp_path / "set.csv"
    path.write_text(
        "text,Language,kind\nHow do I do a bad thing?,English,fraud\nकैसे करें?,Hindi,fraud\n,English,x\n¿Cómo?,es-MX,\n",
        encoding="utf-8",
    )
    prompts = load_prompts(path, prompt_column="text", lang_column="Language")
    assert [(p.prompt, p.lang) for p in prompts] == [
        ("How do I do a bad thing?", "en"),
        ("कैसे करें?", "hi"),
        ("¿Cómo?", "es"),
    ]
    assert prompts[0].source == "set.csv" and prompts[0].id == "set.csv:0"
    # detected columns (case-insensitive "prompt"/"lang"), JSON and JSONL
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text(
        '{"Prompt": "a", "lang": "zh-CN", "category": "c1"}\n\n{"Prompt": "b", "lang": "fr"}\n', encoding="utf-8"
    )
    got = load_prompts(jsonl)
    assert [(p.prompt, p.lang, p.category) for p in got] == [("a", "zh", "c1"), ("b", "fr", "")]
    js = tmp_path / "set.json"
    js.write_text(json.dumps({"prompts": [{"question": "q1", "language": "bn"}]}), encoding="utf-8")
    assert load_prompts(js)[0] == EvalPrompt("q1", "bn", source="set.json", id="set.json:0")
    # one language for all rows
    mono = tmp_path / "mono.jsonl"
    mono.write_text('{"goal": "x"}\n{"goal": "y"}\n', encoding="utf-8")
    assert [p.lang for p in load_prompts(mono, lang="Tamil")] == ["ta", "ta"]


def test_local_wide_layout_and_filters(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("id,source,tags,en,zh,th\n1,s,t,e1,z1,t1\n2,s,t,e2,z2,\n3,s,t,e3,z3,t3\n", encoding="utf-8")
    prompts = load_prompts(path)
    assert {p.lang for p in prompts} == {"en", "zh", "th"} and len(prompts) == 8
    assert [p.prompt for p in load_prompts(path, langs=["th"])] == ["t1", "t3"]
    assert [p.prompt for p in load_prompts(path, langs=["en", "zh"], limit=1)] == ["e1", "z1"]
    with pytest.raises(ValueError, match="no prompts for language"):
        load_prompts(path, langs=["hi"])


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_prompts(tmp_path / "missing.csv")
    nolang = tmp_path / "nolang.csv"
    nolang.write_text("prompt,other\nhello,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="lang_column"):
        load_prompts(nolang)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "lang": "en"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        load_prompts(bad)
    badlang = tmp_path / "badlang.csv"
    badlang.write_text("prompt,lang\nhello,\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 0"):
        load_prompts(badlang)
    with pytest.raises(ValueError, match="no prompt column 'txt'"):
        load_prompts(nolang, prompt_column="txt", lang="en")
    with pytest.raises(ValueError, match="smoke set has no prompts"):
        load_prompts("smoke", langs=["ko"])
    with pytest.raises(ValueError, match="limit"):
        load_prompts(None, limit=0)
    with pytest.raises(ValueError, match="unsupported file type"):
        (tmp_path / "x.txt").write_text("a")
        load_prompts(tmp_path / "x.txt")


def test_normalize_lang():
    assert [normalize_lang(x) for x in ("Hindi", "hi", "hi_IN", "zh-CN", "BENGALI", "বাংলা", "xx", 3)] == [
        "hi",
        "hi",
        "hi",
        "zh",
        "bn",
        "bn",
        None,
        None,
    ]


# ------------------------------------------------------------------------------------------------
# Hub loader (datasets.load_dataset mocked; tests never touch the Hub)


class FakeDataset:
    def __init__(self, rows):
        self._rows = rows
        self.column_names = list(rows[0])

    def __iter__(self):
        return iter(self._rows)

    def __len__(self):
        return len(self._rows)


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []
    module = types.ModuleType("datasets")
    module.result = None

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return module.result

    module.load_dataset = load_dataset
    module.calls = calls
    monkeypatch.setitem(sys.modules, "datasets", module)
    return module


MULTIJAIL_ROW = {
    "id": 0,
    "source": "anthropic",
    "tags": "violence",
    **{k: f"{k} text" for k in ("en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv")},
}


def test_multijail_preset(fake_datasets):
    fake_datasets.result = FakeDataset([MULTIJAIL_ROW, {**MULTIJAIL_ROW, "id": 1, "en": "second"}])
    prompts = load_prompts("multijail", langs=["en", "bn", "th"])
    assert fake_datasets.calls == [(("DAMO-NLP-SG/MultiJail",), {"split": "train"})]
    assert [(p.lang, p.prompt) for p in prompts] == [
        ("en", "en text"),
        ("th", "th text"),
        ("bn", "bn text"),
        ("en", "second"),
        ("th", "th text"),
        ("bn", "bn text"),
    ]
    assert prompts[0].source == "hub:DAMO-NLP-SG/MultiJail" and prompts[0].category == "violence"
    all_langs = {p.lang for p in load_hub("multijail")}
    assert all_langs == {"en", "zh", "it", "vi", "ar", "ko", "th", "bn", "sw", "jv"}  # "id" is not Indonesian here


def test_xthreatbench_preset_layouts(fake_datasets):
    # per-language splits
    fake_datasets.result = {
        "English": FakeDataset([{"Prompt": "e1", "Category": "crime"}]),
        "Hindi": FakeDataset([{"Prompt": "h1", "Category": "crime"}, {"Prompt": "h2", "Category": "fraud"}]),
    }
    prompts = load_prompts("xthreatbench")
    assert fake_datasets.calls[-1] == (("SoftMINER-Group/Soteria",), {"split": None})
    assert [(p.lang, p.prompt, p.category) for p in prompts] == [
        ("en", "e1", "crime"),
        ("hi", "h1", "crime"),
        ("hi", "h2", "fraud"),
    ]
    # one long split with a language column
    fake_datasets.result = {"train": FakeDataset([{"query": "q", "language": "Telugu"}])}
    assert [(p.lang, p.prompt) for p in load_prompts("xthreatbench")] == [("te", "q")]
    # several unnamed splits: the user must choose
    fake_datasets.result = {
        "train": FakeDataset([{"query": "q", "language": "te"}]),
        "test": FakeDataset([{"query": "r", "language": "te"}]),
    }
    with pytest.raises(ValueError, match="choose one with split="):
        load_prompts("xthreatbench")


def test_hub_arguments_pass_through(fake_datasets):
    fake_datasets.result = FakeDataset([{"instruction": "x", "lang_code": "ar"}])
    prompts = load_prompts(
        "hub:me/set", split="test", config="v2", revision="abc", prompt_column="instruction", lang_column="lang_code"
    )
    assert fake_datasets.calls[-1] == (("me/set", "v2"), {"split": "test", "revision": "abc"})
    assert prompts == [EvalPrompt("x", "ar", source="hub:me/set:v2", id="hub:me/set:v2:0")]
    load_prompts("me/other")  # a bare owner/name that is not a local path is a Hub id
    assert fake_datasets.calls[-1] == (("me/other",), {"split": None})


def test_missing_datasets_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        load_prompts("multijail")
