"""Probe data: the built-in languages and tasks, and reading the user's own pairs."""

from __future__ import annotations

import csv
import json

import pytest

from soteria.heads import probes

FIVE_TASKS = ("antonym", "country_capital", "country_currency", "sentiment", "news_topic")


def _pairs(n, tag=""):
    return [{"input": f"in{tag}{i}", "output": f"out{tag}{i}"} for i in range(n)]


def _lang_file(code, name, tasks):
    return {
        "language": code,
        "name": name,
        "native_name": name.upper(),
        "tasks": {t: {"description": f"{t} task", "pairs": p} for t, p in tasks.items()},
    }


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """Point the built-in data at a temporary folder with three small languages."""
    folder = tmp_path / "probes"
    folder.mkdir()
    files = {
        "xx": _lang_file("xx", "Extra", {"one": _pairs(3)}),
        "te": _lang_file("te", "Telugu", {"antonym": _pairs(4, "a"), "sentiment": _pairs(5, "s")}),
        "en": _lang_file("en", "English", {"country_capital": _pairs(6, "c"), "antonym": _pairs(4, "e")}),
    }
    for code, data in files.items():
        (folder / f"{code}.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    (folder / "README.txt").write_text("not a language")
    monkeypatch.setattr(probes, "_probe_dir", lambda: folder)
    probes._shipped.cache_clear()
    probes._read_language.cache_clear()
    yield folder
    probes._shipped.cache_clear()
    probes._read_language.cache_clear()


# --------------------------------------------------------------------------------------------
# Built-in API on temporary data


def test_languages_paper_order_then_alphabetical(fake_data):
    assert probes.languages() == ["en", "te", "xx"]
    assert probes.tasks("en") == ["country_capital", "antonym"]  # file order
    assert probes.language_name("te") == "Telugu"
    assert probes.language_name("te", native=True) == "TELUGU"


def test_load_task_returns_fresh_copies(fake_data):
    first = probes.load_task("en", "antonym")
    assert first == _pairs(4, "e")
    first[0]["input"] = "changed"
    first.append({"input": "x", "output": "y"})
    assert probes.load_task("en", "antonym") == _pairs(4, "e")


def test_unknown_language_error_lists_languages_and_how_to_bring_data(fake_data):
    for call in (
        lambda: probes.tasks("sw"),
        lambda: probes.load_task("sw", "antonym"),
        lambda: probes.resolve_tasks("sw"),
    ):
        with pytest.raises(ValueError) as err:
            call()
        msg = str(err.value)
        assert "'sw'" in msg and "en, te, xx" in msg
        assert 'tasks={"my_task": "path.jsonl"}' in msg and "find_heads" in msg


def test_unknown_task_error_lists_the_languages_tasks(fake_data):
    with pytest.raises(ValueError, match=r"unknown task 'synonym' for language 'te'.*antonym, sentiment"):
        probes.load_task("te", "synonym")
    with pytest.raises(ValueError, match="antonym, sentiment"):
        probes.resolve_tasks("te", ["antonym", "synonym"])


def test_resolve_tasks_forms(fake_data, tmp_path):
    assert probes.resolve_tasks("te") == {"antonym": _pairs(4, "a"), "sentiment": _pairs(5, "s")}
    assert list(probes.resolve_tasks("te", ["sentiment", "antonym"])) == ["sentiment", "antonym"]
    assert probes.resolve_tasks("en", "antonym") == {"antonym": _pairs(4, "e")}
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in _pairs(3, "m")), encoding="utf-8")
    # A language we do not ship, with the user's own tasks from a file and from memory.
    got = probes.resolve_tasks("sw", {"mine": str(path), "inline": _pairs(2, "i")})
    assert got == {"mine": _pairs(3, "m"), "inline": _pairs(2, "i")}
    with pytest.raises(ValueError, match="more than once"):
        probes.resolve_tasks("te", ["antonym", "antonym"])
    with pytest.raises(ValueError, match="no tasks"):
        probes.resolve_tasks("te", [])
    with pytest.raises(ValueError, match="no tasks"):
        probes.resolve_tasks("sw", {})
    with pytest.raises(ValueError, match="must be None"):
        probes.resolve_tasks("te", 3)


def test_bad_builtin_file_names_the_file(fake_data):
    bad = _lang_file("yy", "Bad", {"t": [{"input": "a"}]})
    (fake_data / "yy.json").write_text(json.dumps(bad), encoding="utf-8")
    probes._shipped.cache_clear()
    with pytest.raises(ValueError, match=r"yy\.json task 't', row 0: missing column 'output'"):
        probes.tasks("yy")
    (fake_data / "zz.json").write_text(json.dumps(_lang_file("en", "Wrong", {"t": _pairs(2)})))
    probes._shipped.cache_clear()
    with pytest.raises(ValueError, match="zz.json: its language field says 'en'"):
        probes.tasks("zz")


def test_groups_partition_the_paper_languages():
    members = [lang for group in probes.GROUPS.values() for lang in group]
    assert sorted(members) == sorted(probes.PAPER_ORDER) and len(members) == 12
    assert probes.VOTE_THRESHOLDS == {"high": 3, "mid": 3, "low": 2}
    assert set(probes.VOTE_THRESHOLDS) == set(probes.GROUPS)
    assert probes.group_of("hi") == "mid" and probes.group_of("te") == "low" and probes.group_of("sw") is None


# --------------------------------------------------------------------------------------------
# The shipped data (runs once the data files exist)


def _builtin():
    probes._shipped.cache_clear()
    return probes.languages()


def test_builtin_languages_are_the_twelve():
    # The probe data ships in the package: missing is a packaging regression, never a skip.
    assert probes.languages() == list(probes.PAPER_ORDER)


@pytest.mark.parametrize("lang", probes.PAPER_ORDER)
def test_builtin_tasks(lang):
    assert lang in _builtin(), f"shipped probe data for {lang} is missing (has {_builtin()})"
    assert probes.language_name(lang) and probes.language_name(lang, native=True)
    assert set(FIVE_TASKS) <= set(probes.tasks(lang))
    for task in probes.tasks(lang):
        pairs = probes.load_task(lang, task)
        assert len(pairs) >= 60, (lang, task, len(pairs))
        inputs = [p["input"] for p in pairs]
        dupes = sorted({x for x in inputs if inputs.count(x) > 1})
        assert not dupes, f"{lang}/{task}: repeated inputs {dupes[:5]}"
        assert all(set(p) == {"input", "output"} for p in pairs)
        if task in ("sentiment", "news_topic"):
            assert len({p["output"] for p in pairs}) >= 2, (lang, task)


# --------------------------------------------------------------------------------------------
# load_pairs: the user's own data

UNICODE = [{"input": "गर्म", "output": "ठंडा"}, {"input": "北京", "output": "中国"}, {"input": "hot ", "output": " cold"}]
EXPECTED = [{"input": "गर्म", "output": "ठंडा"}, {"input": "北京", "output": "中国"}, {"input": "hot", "output": "cold"}]


def test_load_pairs_json_list_and_object(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(UNICODE, ensure_ascii=False), encoding="utf-8")
    b.write_text(json.dumps({"description": "d", "pairs": [dict(p, extra=1) for p in UNICODE]}), encoding="utf-8")
    assert probes.load_pairs(a) == EXPECTED
    assert probes.load_pairs(str(b)) == EXPECTED


def test_load_pairs_jsonl_and_custom_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps({"q": p["input"], "a": p["output"]}, ensure_ascii=False) for p in UNICODE]
    path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n", encoding="utf-8")
    assert probes.load_pairs(path, input_column="q", output_column="a") == EXPECTED


def test_load_pairs_csv_with_bom(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "input", "output"])
        for i, p in enumerate(UNICODE):
            writer.writerow([i, p["input"], p["output"]])
    assert probes.load_pairs(path) == EXPECTED


def test_load_pairs_in_memory_list_is_validated_copy():
    rows = [dict(p) for p in UNICODE]
    got = probes.load_pairs(rows)
    assert got == EXPECTED and got[0] is not rows[0]


def test_load_pairs_datasets():
    datasets = pytest.importorskip("datasets")
    rows = [{"x": p["input"], "y": p["output"], "label": i} for i, p in enumerate(UNICODE)]
    ds = datasets.Dataset.from_list(rows)
    assert probes.load_pairs(ds, input_column="x", output_column="y") == EXPECTED
    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list(rows[:1])})
    assert probes.load_pairs(dd, input_column="x", output_column="y", split="test") == EXPECTED[:1]
    with pytest.raises(ValueError, match="choose one with split"):
        probes.load_pairs(dd, input_column="x", output_column="y")
    with pytest.raises(ValueError, match="missing column 'input'"):
        probes.load_pairs(ds)


@pytest.mark.parametrize(
    ("name", "content", "pattern"),
    [
        ("m.json", [{"input": "a", "output": "b"}, {"input": "c"}], r"m\.json, row 1: missing column 'output'"),
        ("e.json", [{"input": "a", "output": "  "}], r"e\.json, row 0: column 'output' is empty"),
        ("n.json", [{"input": 3, "output": "b"}], r"n\.json, row 0: column 'input' must be a string, got int"),
        ("o.json", {"rows": []}, r'o\.json: expected a list of objects or an object with a "pairs" list'),
        ("z.json", [], r"z\.json: no pairs"),
        ("s.json", ["a", "b"], r"s\.json, row 0: expected an object"),
    ],
)
def test_load_pairs_bad_json_rows(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError, match=pattern):
        probes.load_pairs(path)


def test_load_pairs_bad_jsonl_and_csv_rows_name_the_line(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"input": "a", "output": "b"}\n\n{"input": "c", "output": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl, row 1 \(line 3\): column 'output' is empty"):
        probes.load_pairs(jl)
    jl.write_text('{"input": "a", "output": "b"}\n{"input": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.jsonl, line 2: not valid JSON"):
        probes.load_pairs(jl)
    cs = tmp_path / "d.csv"
    cs.write_text("input,output\na,b\nc\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv, row 1 \(line 3\): missing column 'output'"):
        probes.load_pairs(cs)
    cs.write_text("question,output\na,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.csv: missing column 'input' \(header: question, output\)"):
        probes.load_pairs(cs)


def test_load_pairs_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope.jsonl' does not exist.*load_dataset"):
        probes.load_pairs("nope.jsonl")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        probes.load_pairs(tmp_path)
    txt = tmp_path / "d.txt"
    txt.write_text("a\tb\n")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'"):
        probes.load_pairs(txt)
    with pytest.raises(ValueError, match="cannot read probe pairs from int"):
        probes.load_pairs(3)
