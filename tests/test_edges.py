"""The edges a new user hits: mistakes caught before any work, in one whole line with exit 2;
language codes checked alike everywhere; nothing replaced that soteria did not write; no
silent fallback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import soteria.cli.apply as apply_cmd
import soteria.cli.demo as demo_cmd
import soteria.cli.evaluate as evaluate_cmd
import soteria.cli.heads as heads_cmd
import soteria.cli.steer as steer_cmd
import soteria.cli.tune as tune_cmd
from soteria import SoteriaPatcher
from soteria.cli import main
from soteria.langs import lang_list
from soteria.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command loads a model: its mistakes must be caught before that."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")

    for module in (steer_cmd, heads_cmd, tune_cmd, apply_cmd):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr(apply_cmd.SoteriaPatch, "from_pretrained", refuse)
    for name in ("load_causal_lm", "load_tokenizer"):
        monkeypatch.setattr(evaluate_cmd, name, refuse)
    for name in ("load_pretrained", "tiny_model"):
        monkeypatch.setattr(demo_cmd, name, refuse)


def _err(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--scale", "-1"], "not a number >= 0"),
        (["--scale", "nan"], "not a number >= 0"),
        (["--scale", "xx=1"], "--scale names xx"),
        (["--heads", ""], "--heads is empty"),
        (["--heads", "99:0"], "head (99, 0) is out of range"),
        (["--langs", "HI"], "lowercase: 'hi'"),
    ],
)
def test_steer_mistakes_before_the_model_loads(tmp_path, capsys, no_load, argv, match):
    base = ["steer", "tiny:llama", "--out", str(tmp_path / "o")]
    if "--langs" not in argv:
        base += ["--langs", "hi"]
    assert match in _err(capsys, *base, *argv)


def test_an_existing_out_is_refused_before_the_model_loads(tmp_path, capsys, no_load):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert "already exists" in _err(capsys, "steer", "tiny:llama", "--langs", "hi", "--out", str(tmp_path / "o"))
    msg = _err(capsys, "steer", "tiny:llama", "--langs", "hi", "--out", str(tmp_path / "o"), "--overwrite")
    assert "holds files this did not write (notes.txt" in msg
    assert (tmp_path / "o" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "command",
    [
        ["heads", "tiny:llama", "--langs", "hi"],
        ["steer", "tiny:llama", "--langs", "hi"],
        ["eval", "tiny:llama", "--langs", "hi"],
        ["demo", "--tiny"],
        ["demo"],
        ["tune", "tiny:llama", "--langs", "hi"],
        ["apply", "some/patch", "--model", "tiny:llama"],
        ["steer", "tiny:llama", "--langs", "hi", "--patch-only"],
    ],
    ids=" ".join,
)
@pytest.mark.parametrize("how", ["under a file", "read-only"])
def test_an_unwritable_out_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, no_load, command, how):
    """Root writes through any chmod, so both cases hold for root: an --out whose nearest existing
    ancestor is a file (executable, which root's os.access passes), and a folder the write check
    is told is read-only."""
    if how == "under a file":
        (tmp_path / "file").write_text("not a folder")
        (tmp_path / "file").chmod(0o755)
        out, match = tmp_path / "file" / "out", "is a file, not a folder"
    else:
        (tmp_path / "ro").mkdir()
        access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode, **kw: not (mode & os.W_OK and Path(p) == tmp_path / "ro") and access(p, mode, **kw),
        )
        out, match = tmp_path / "ro" / "out", f"cannot write to {tmp_path / 'ro'}"
    msg = _err(capsys, *command, "--out", str(out))
    assert msg.startswith(f"soteria {command[0]}: error: --out {out}") and match in msg, msg
    assert not out.exists()


def test_prompts_longer_than_the_context_name_n_shots(tmp_path, capsys):
    msg = _err(capsys, "heads", "tiny:gpt2", "--langs", "en", "--tasks", "news_topic", "--out", str(tmp_path / "h"))
    assert "past this model's 512 positions" in msg and "--n-shots" in msg


def test_top_k_beyond_the_heads_fails_before_the_work(tmp_path, capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("heads were searched before --top-k was checked")

    monkeypatch.setattr(heads_cmd, "find_heads_multi", refuse)
    msg = _err(capsys, "heads", "tiny:llama", "--langs", "hi", "--top-k", "100000", "--out", str(tmp_path / "h"))
    assert "out of range" in msg and not (tmp_path / "h").exists()


def test_a_multi_line_error_is_shown_whole_on_one_line(tmp_path, capsys, monkeypatch):
    def mismatch(*a, **k):
        raise ValueError(
            "harm vector (x) does not match the base model:\n  - layer 0: shape [4, 4]\n  - layer 1: shape [2]"
        )

    monkeypatch.setattr(steer_cmd, "steer_checkpoint", mismatch)
    msg = _err(capsys, "steer", str(tmp_path), "--streaming", "--langs", "hi", "--heads", "0:0", "--harm", str(tmp_path),
               "--out", str(tmp_path / "o"))  # fmt: skip
    assert msg.endswith("does not match the base model: layer 0: shape [4, 4]; layer 1: shape [2]")


@pytest.mark.parametrize(
    ("langs", "match"),
    [("hi,bn", "several language codes"), ("HI", "lowercase"), ("hindi!", "not a language code"), ([], "non-empty")],
)
def test_language_codes_are_checked_alike(langs, match):
    with pytest.raises(ValueError, match=match):
        lang_list(langs)
    with pytest.raises(ValueError, match=match):
        SoteriaPatcher.apply(tiny_model("llama"), langs, heads=[(0, 0)], harm=None)
    assert lang_list("zh-hans") == ["zh-hans"] and lang_list(["hi", "bn"]) == ["hi", "bn"]


def test_a_language_without_refusal_data_needs_a_harm_source():
    with pytest.raises(ValueError, match="no built-in refusal data for pt"):
        SoteriaPatcher.apply(tiny_model("llama"), ["pt"], heads=[(0, 0)], tokenizer=object())


def test_a_negative_scale_is_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="negative scale adds the harm direction"):
        SoteriaPatcher.apply(model, ["hi"], heads=[(0, 0)], harm="unused", scale=-0.5)
    assert not SoteriaPatcher.is_steered(model)


def test_an_unreachable_llm_judge_is_loud_and_exits_non_zero(tmp_path, capsys):
    code = main(["eval", "tiny:llama", "--langs", "hi", "--limit", "1", "--no-utility", "--judge", "llm",
                 "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-retries", "0",
                 "--max-new-tokens", "2", "--out", str(tmp_path / "e"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "every verdict is 'unparsed'" in err


def test_a_corrupt_safetensors_file_is_one_line(tmp_path, capsys):
    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    weights = folder / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 3)
    capsys.readouterr()  # the save's own progress bars
    msg = _err(capsys, "heads", str(folder), "--langs", "hi", "--out", str(tmp_path / "h"))
    assert "corrupt or cut short" in msg
