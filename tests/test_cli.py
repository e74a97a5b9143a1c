"""The ``soteria`` command line: each subcommand's happy path and its user errors (exit 2, one line)."""

import json
import subprocess
import sys

import pytest
import torch

from soteria.cli import main
from soteria.cli.main import COMMANDS, build_parser


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")  # the kernels' own tests cover the interpreter


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [[], ["heads"], ["steer"], ["apply"], ["push"], ["eval"], ["demo"], ["env"]])
def test_help_everywhere(command):
    proc = subprocess.run([sys.executable, "-m", "soteria", *command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "usage: soteria" in proc.stdout


def test_env(capsys):
    code, out, _ = _run(capsys, "env")
    assert code == 0
    for key in ("soteria", "torch", "triton", "transformers", "kernel backend", "cache dir"):
        assert key in out


def test_heads_writes_scores_and_heatmaps(tmp_path, capsys):
    out_dir = tmp_path / "heads"
    code, out, err = _run(
        capsys, "heads", "tiny:llama", "--langs", "hi", "bn", "--tasks", "antonym", "--n-shots", "2",
        "--n-trials", "2", "--top-k", "3", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    for lang in ("hi", "bn"):
        data = json.loads((out_dir / f"heads_{lang}.json").read_text())
        assert data["lang"] == lang
        assert (out_dir / f"heads_{lang}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"{lang}: top heads" in out


def test_heads_from_plain_text(tmp_path, capsys):
    fr = tmp_path / "fr.txt"
    fr.write_text("Le chat dort au soleil.\nIl pleut depuis ce matin.\nNous marchons vers le vieux pont.\n")
    out_dir = tmp_path / "heads"
    code, out, err = _run(
        capsys, "heads", "tiny:llama", "--langs", "en", "fr", "--source", "text", "--text", f"fr={fr}",
        "--max-sentences", "3", "--top-k", "3", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    for lang, where in (("en", "built-in:en"), ("fr", "file:fr.txt")):
        data = json.loads((out_dir / f"heads_{lang}.json").read_text())
        assert data["settings"]["source"] == "text" and data["settings"]["text"] == where
        assert data["settings"]["n_sentences"] == 3 and f"{lang}: top heads" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "text", "--text", "{tmp}/fr.txt"], "for 2 languages give LANG=FILE"),
        (["--source", "text", "--text", "fr:{tmp}/fr.txt", "en={tmp}/fr.txt"], "bad --text entry"),
        (["--source", "text", "--text", "de={tmp}/fr.txt"], "text names de"),
        (["--source", "text", "--text", "fr={tmp}/none.txt"], "text file not found"),
        (["--source", "text", "--n-shots", "3"], "n_shots apply to source='probes' only"),
        (["--source", "text", "--method", "exact"], "for text scores"),
        (["--text", "fr={tmp}/fr.txt"], "need --source text"),
        (["--max-sentences", "3"], "need --source text"),
    ],
)
def test_heads_text_errors_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    import soteria.cli.heads

    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the arguments were checked")

    monkeypatch.setattr(soteria.cli.heads, "load_model", refuse)
    (tmp_path / "fr.txt").write_text("Le chat dort.\n")
    argv = ["heads", "tiny:llama", "--langs", "en", "fr", *extra, "--out", str(tmp_path / "h")]
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err


def test_heads_source_is_a_choice(capsys):
    with pytest.raises(SystemExit) as info:
        main(["heads", "tiny:llama", "--langs", "hi", "--source", "wiki"])
    assert info.value.code == 2 and "invalid choice: 'wiki'" in capsys.readouterr().err


def test_steer_in_memory_with_explicit_heads(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "steered"
    code, out, err = _run(
        capsys, "steer", "tiny:llama", "--langs", "hi", "--heads", "0:1,1:2", "--scale", "0.5", "--out", str(out_dir)
    )
    assert code == 0, err
    assert "steered 2 heads for hi" in out
    config = json.loads((out_dir / "soteria_config.json").read_text())
    assert config["languages"] == ["hi"]
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    assert reloaded.config.soteria["languages"] == ["hi"]


def test_steer_heads_from_scores(tmp_path, capsys):
    heads_dir = tmp_path / "heads"
    code, _, err = _run(
        capsys, "heads", "tiny:gpt2", "--langs", "fr", "--tasks", "antonym", "--n-shots", "2", "--n-trials", "2",
        "--out", str(heads_dir),
    )  # fmt: skip
    assert code == 0, err
    out_dir = tmp_path / "steered"
    code, out, err = _run(
        capsys, "steer", "tiny:gpt2", "--langs", "fr", "--heads-from", str(heads_dir / "heads_fr.json"),
        "--top-k", "2", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    assert "steered 2 heads for fr" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["heads", "tiny:llama", "--langs", "xx", "--out", "{tmp}/h"], "xx"),
        (["steer", "tiny:llama", "--langs", "hi", "--heads", "0-1", "--out", "{tmp}/s"], "bad head '0-1'"),
        (["steer", "tiny:llama", "--langs", "hi", "--heads", "0:9", "--out", "{tmp}/s"], "out of range"),
        (["steer", "tiny:llama", "--langs", "hi", "--heads", "0:1", "--scale", "hi=", "--out", "{tmp}/s"], "--scale"),
        (["steer", "tiny:llama", "--langs", "hi", "--streaming", "--out", "{tmp}/s"], "--heads or --heads-from"),
        (
            [
                "steer",
                "tiny:llama",
                "--langs",
                "hi",
                "--streaming",
                "--heads",
                "0:1",
                "--harm",
                "finetune",
                "--out",
                "{tmp}/s",
            ],
            "a derived direction (gradients, finetune) needs the model loaded",
        ),
        (["steer", "{tmp}/no/such/model", "--langs", "hi", "--heads", "0:1", "--out", "{tmp}/s"], "not found"),
        (["heads", "tiny:nosuchfamily", "--langs", "hi", "--out", "{tmp}/h"], "unknown model_type"),
        (["heads", "tiny:llama", "--langs", "hi", "--dtype", "int8", "--out", "{tmp}/h"], "unknown dtype"),
        (["heads", "tiny:llama", "--langs", "hi", "--device", "nonsense", "--out", "{tmp}/h"], "not a device"),
        (["heads", "tiny:llama", "--langs", "hi", "--device", "cuda:99", "--out", "{tmp}/h"], "--device cuda:99"),
        (
            ["steer", "tiny:llama", "--langs", "hi", "--heads", "0:1", "--scale", "abc", "--out", "{tmp}/s"],
            "bad --scale",
        ),
        (["steer", "tiny:llama", "--langs", "hi", "--heads", "0:1", "--scale", "hi=x", "--out", "{tmp}/s"], "--scale"),
        (
            [
                "steer",
                "tiny:llama",
                "--langs",
                "hi",
                "--heads",
                "0:1",
                "--harm",
                "{tmp}/v.safetensors",
                "--out",
                "{tmp}/s",
            ],
            "no harm vector file",
        ),  # fmt: skip
        (["eval", "{tmp}/no/such/model", "--out", "{tmp}/e"], "not found"),
        (["eval", "tiny:llama", "--device", "nonsense", "--out", "{tmp}/e"], "not a device"),
        (["eval", "tiny:llama", "--judge", "nosuch", "--out", "{tmp}/e"], "judge 'nosuch'"),
        (["eval", "tiny:llama", "--langs", "xx", "--out", "{tmp}/e"], "no prompts for xx"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, message):
    code, _, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("soteria "), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_models_by_hub_id_and_tiny_in_every_command(tmp_path, capsys, monkeypatch):
    """A Hub id loads (served from a local Hub cache: the Hub itself is offline here), and
    ``soteria eval`` takes ``tiny:<model_type>`` like the other commands."""
    from huggingface_hub import constants

    from soteria.models.tiny import tiny_model, tiny_tokenizer

    repo = tmp_path / "hub" / "models--someone--tiny-llama"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model("llama").save_pretrained(snapshot)
    tiny_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))

    code, out, err = _run(
        capsys, "steer", "someone/tiny-llama", "--langs", "hi", "--heads", "0:1", "--out", str(tmp_path / "s")
    )
    assert code == 0, err
    assert "steered 1 head for hi" in out
    code, out, err = _run(
        capsys, "eval", "tiny:llama", "--steered", str(tmp_path / "s"), "--langs", "hi", "--limit", "1",
        "--max-new-tokens", "2", "--no-utility", "--no-progress", "--out", str(tmp_path / "e"),
    )  # fmt: skip
    assert code == 0, err
    assert "ASR before" in out
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["meta"]["prompts"] == "smoke" and report["meta"]["models"]["before"].startswith("llama@")


def test_eval_without_datasets_is_a_user_error(tmp_path, capsys, monkeypatch):
    from soteria.models.tiny import tiny_model, tiny_tokenizer

    tiny_model("gpt2").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    capsys.readouterr()  # drop save_pretrained's progress bar
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code, _, err = _run(capsys, "eval", str(tmp_path / "m"), "--prompts", "multijail", "--out", str(tmp_path / "e"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "pip install datasets" in err


def test_demo_never_replaces_a_folder_it_did_not_write(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "demo", "--out", str(mine))
    assert code == 2 and "not an earlier soteria output" in err
    assert [p.name for p in mine.iterdir()] == ["keep.txt"]


def test_argparse_errors_exit_2(capsys):
    proc = subprocess.run([sys.executable, "-m", "soteria", "steer", "tiny:llama"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--langs" in proc.stderr
    with pytest.raises(SystemExit) as info:
        main(["heads", "tiny:llama", "--langs", "hi", "--batch-size", "0"])
    assert info.value.code == 2 and "--batch-size: expected a positive integer" in capsys.readouterr().err


def test_demo_runs_end_to_end(tmp_path):
    from soteria.cli.demo import format_tiny_summary, run_tiny_demo

    summary = run_tiny_demo(tmp_path / "demo", n_shots=2, n_trials=2, top_k=4)
    assert summary["reload_max_logit_diff"] == 0.0
    assert summary["changed"] > 0 and summary["changed"] < summary["total"]
    for lang in summary["langs"]:
        assert summary["refusal_nll_after"][lang] < summary["refusal_nll_before"][lang]
        assert (tmp_path / "demo" / "heads" / f"{lang}.png").exists()
    text = format_tiny_summary(summary)
    assert "parameters changed" in text and "hi" in text
    assert ", ..." not in text  # 4 heads per language: all of them are listed
    assert ", ..." in format_tiny_summary({**summary, "heads": {k: v * 2 for k, v in summary["heads"].items()}})
    # the folder loads with plain transformers where soteria cannot be imported
    code = (
        "import sys; sys.modules['soteria'] = sys.modules['soteria_kernels'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'demo')!r})\n"
        "print(m.config.soteria['languages'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "['hi', 'bn']" in proc.stdout


def test_steer_streaming_then_push(tmp_path, capsys, monkeypatch):
    import hashlib

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from soteria.models.tiny import tiny_model

    base_dir, harmful_dir, out_dir = tmp_path / "base", tmp_path / "harmful", tmp_path / "out"
    tiny_model("llama").save_pretrained(base_dir, max_shard_size="40KB")
    harmful = tiny_model("llama", seed=1)
    harmful.save_pretrained(harmful_dir)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base_dir.iterdir()}

    code, out, err = _run(
        capsys, "steer", str(base_dir), "--streaming", "--langs", "hi", "bn", "--heads", "0:1,1:2",
        "--harm", str(harmful_dir), "--scale", "hi=0.5,bn=0.25", "--out", str(out_dir),
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((out_dir / "soteria_config.json").read_text())
    assert config["languages"] == ["hi", "bn"]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in base_dir.iterdir()} == digest

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    code, out, err = _run(capsys, "push", str(out_dir), "me/tiny-soteria")
    assert code == 0, err
    assert calls["create"][0] == "me/tiny-soteria" and calls["create"][1]["private"] is True
    assert calls["upload"]["folder_path"] in (str(out_dir), out_dir)

    def refuse(self, repo_id, **kw):
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=mock_response(401))

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    code, _, err = _run(capsys, "push", str(out_dir), "me/tiny-soteria")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def mock_response(status: int):
    from unittest import mock

    response = mock.Mock()
    response.status_code = status
    response.headers = {}
    return response


def test_a_command_imports_its_own_module_only():
    """``soteria steer ...`` builds the steer parser alone: the demo's, tune's and evaluation's
    imports (transformers, optuna, judges) are not paid by a streaming edit."""
    code = (
        "import sys; from soteria.cli.main import COMMANDS, build_parser; "
        "build_parser('steer').parse_args(['steer', 'x', '--langs', 'es', '--out', 'o']); "
        "print(sorted(m for m in COMMANDS.values() if m in sys.modules)); print('transformers' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["['soteria.cli.steer']", "False"]


def test_every_command_is_listed_and_reachable(capsys):
    full = build_parser()
    names = set(full._subparsers._group_actions[0].choices)
    assert names == set(COMMANDS)
    for name in COMMANDS:
        assert set(build_parser(name)._subparsers._group_actions[0].choices) == {name}
    with pytest.raises(SystemExit) as exc:  # an unknown command: the full parser's error lists them all
        main(["bogus"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "invalid choice: 'bogus'" in err
    assert all(repr(name) in err for name in COMMANDS)


def test_steer_config_of_a_saved_model_repeats_it_without_harm(tmp_path, capsys):
    """A steered model's soteria_config.json names its harm source; --config reads it again."""
    from safetensors.torch import load_file

    from soteria.models.tiny import tiny_model

    tiny_model("llama", seed=1).save_pretrained(tmp_path / "harmful")
    first = ["steer", "tiny:llama", "--langs", "hi", "--heads", "0:1,1:2", "--harm", str(tmp_path / "harmful"),
             "--scale", "0.5", "--force", "--out", str(tmp_path / "a")]  # fmt: skip
    assert main(first) == 0
    again = ["steer", "tiny:llama", "--config", str(tmp_path / "a" / "soteria_config.json"), "--force",
             "--out", str(tmp_path / "b")]  # fmt: skip
    assert main(again) == 0, capsys.readouterr().err
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
