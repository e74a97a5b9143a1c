"""ASR arithmetic, the report (table, JSON, chart), evaluate() end to end, and the eval CLI."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from soteria.cli.evaluate import add_parser as add_eval_parser
from soteria.cli.evaluate import run as run_eval
from soteria.evaluation import Counts, EvalReport, LangResult, evaluate
from soteria.models.tiny import tiny_model, tiny_tokenizer

PNG = b"\x89PNG\r\n\x1a\n"


def test_counts_arithmetic():
    c = Counts.from_labels(["harmful"] * 3 + ["safe"] + ["unparsed"] * 2)
    assert (c.harmful, c.safe, c.unparsed, c.n, c.judged) == (3, 1, 2, 6, 4)
    assert c.asr == 0.75  # unparsed excluded from the denominator
    assert c.asr_upper == 5 / 6  # unparsed counted as harmful
    only_unparsed = Counts.from_labels(["unparsed"] * 2)
    assert only_unparsed.asr is None and only_unparsed.asr_upper == 1.0
    assert Counts().asr is None and Counts().asr_upper is None
    assert (c + Counts(1, 1, 0)).to_dict() == {
        "harmful": 4,
        "safe": 2,
        "unparsed": 2,
        "n": 8,
        "asr": 4 / 6,
        "asr_upper": 6 / 8,
    }
    with pytest.raises(ValueError, match="unknown label"):
        Counts.from_labels(["harmful", "Harmful"])


def _report(paired=True):
    rows = [
        LangResult(
            "en",
            Counts(8, 2, 0),
            Counts(2, 7, 1) if paired else None,
            {"perplexity": 12.5, "probe_accuracy": 0.8},
            {"perplexity": 13.0, "probe_accuracy": 0.7} if paired else None,
            0.0123 if paired else None,
        ),
        LangResult(
            "bn",
            Counts(5, 5, 2),
            Counts(0, 0, 4) if paired else None,
            {"perplexity": float("inf"), "probe_accuracy": None},
            {"perplexity": 40.0, "probe_accuracy": None} if paired else None,
            None,
        ),
    ]
    return EvalReport(rows, {"judge": {"name": "refusal-phrases", "baseline": True}})


def test_change_and_overall():
    r = _report()
    assert r.row("en").change == pytest.approx(2 / 9 - 0.8)
    assert r.row("bn").change is None  # nothing judged after steering
    overall = r.overall()
    assert (overall.before.harmful, overall.before.safe, overall.before.unparsed) == (13, 7, 2)
    assert overall.after.asr == pytest.approx(2 / 9) and overall.after.unparsed == 5
    assert overall.utility_before["perplexity"] == 12.5  # the infinite value is left out of the mean
    assert overall.kl == 0.0123
    with pytest.raises(KeyError, match="no language 'fr'"):
        r.row("fr")


def test_table_json_and_chart(tmp_path):
    r = _report()
    table = r.table()
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["lang", "n", "ASR", "before"]
    en = next(x for x in lines if x.startswith("en "))
    assert "80.0%" in en and "22.2%" in en and "-57.8 pp" in en and "0/1" in en and "12.50" in en and "0.0123" in en
    bn = next(x for x in lines if x.startswith("bn "))
    assert "n/a" in bn and "2/4" in bn
    assert any(x.startswith("all ") for x in lines)
    assert "CRUDE BASELINE" in table and "harmful / (harmful + safe)" in table

    path = r.to_json(tmp_path / "sub" / "report.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "soteria.eval/1" and data["languages"][1]["utility_before"]["perplexity"] is None
    assert data["languages"][0]["before"]["asr"] == 0.8 and "unparsed" in data["asr_formula"]
    back = EvalReport.from_json(path)
    assert back.table() == EvalReport.from_dict(r.to_dict()).table()
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["report.json"]  # no temporary files left

    png = r.plot(tmp_path / "asr.png")
    assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000
    single = _report(paired=False)
    assert "ASR upper" in single.table() and "after" not in single.table()
    assert single.plot(tmp_path / "single.png").read_bytes()[:8] == PNG
    with pytest.raises(FileNotFoundError):
        EvalReport.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a soteria evaluation report"):
        EvalReport.from_json(tmp_path / "bad.json")


def _steered_pair():
    """A tiny Llama and a copy steered by Soteria on two heads (the Triton kernel, interpreted on CPU)."""
    from soteria import HarmVector, SoteriaPatcher

    base = tiny_model("llama")
    harmful = tiny_model("llama", seed=7)
    steered = tiny_model("llama")
    SoteriaPatcher.apply(
        steered,
        ["en", "hi"],
        harm=HarmVector.from_models(base, harmful),
        heads=[(0, 1), (1, 2)],
        scale=1.0,
        progress=False,
    )
    return base, steered


def test_evaluate_pair_end_to_end(tmp_path):
    tok = tiny_tokenizer()
    base, steered = _steered_pair()
    assert not torch.equal(
        base.model.layers[0].self_attn.o_proj.weight, steered.model.layers[0].self_attn.o_proj.weight
    )

    def judge(prompts, responses, langs):  # deterministic labels of every kind
        return [("harmful", "safe", "unparsed")[len(r) % 3] for r in responses]

    out = tmp_path / "eval"
    report = evaluate(
        base,
        tok,
        steered=steered,
        langs=["hi", "en"],
        judge=judge,
        limit=5,
        max_new_tokens=6,
        batch_size=4,
        probe_prompts=2,
        n_shots=2,
        out_dir=out,
        progress=False,
    )
    assert [r.lang for r in report.rows] == ["hi", "en"]
    assert len(report.responses) == 20 and {r["role"] for r in report.responses} == {"before", "after"}
    for res in report.rows:
        for role, counts in (("before", res.before), ("after", res.after)):
            labels = [r["label"] for r in report.responses if r["lang"] == res.lang and r["role"] == role]
            assert counts == Counts.from_labels(labels) and counts.n == 5
        assert (
            res.kl > 0
            and math.isfinite(res.utility_before["perplexity"])
            and res.utility_after["probe_accuracy"] is not None
        )
        assert res.utility_before["probe_n"] == 10  # 5 tasks x 2 prompts
    assert report.meta["models"]["before"] != report.meta["models"]["after"]
    assert report.meta["judge"]["name"] == "judge" and report.meta["n_prompts"] == 10

    for name in ("generations.jsonl", "judgments.jsonl", "report.json", "asr.png", "table.txt"):
        assert (out / name).is_file(), name
    judged = [json.loads(x) for x in (out / "judgments.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(j["lang"], j["role"], j["label"]) for j in judged] == [
        (r["lang"], r["role"], r["label"]) for r in report.responses
    ]
    assert EvalReport.from_json(out / "report.json").table() == report.table()
    assert (out / "table.txt").read_text(encoding="utf-8").strip() == report.table()

    # resume: nothing is generated again
    calls = []
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in (base, steered)]
    again = evaluate(
        base,
        tok,
        steered=steered,
        langs=["hi", "en"],
        judge=judge,
        limit=5,
        max_new_tokens=6,
        utility=False,
        out_dir=out,
        progress=False,
    )
    for h in hooks:
        h.remove()
    assert calls == [] and [r["response"] for r in again.responses] == [r["response"] for r in report.responses]


def test_evaluate_single_model_with_refusal_baseline(tmp_path):
    tok = tiny_tokenizer()
    model = tiny_model("gpt2")
    report = evaluate(model, tok, langs="fr", max_new_tokens=4, probe_prompts=0, progress=False, limit=2)
    assert not report.paired and report.row("fr").before.n == 2
    assert report.meta["judge"]["baseline"] is True and "crude" in report.meta["judge"]["description"]
    assert (
        report.row("fr").utility_before["probe_accuracy"] is None and report.row("fr").utility_before["perplexity"] > 1
    )
    with pytest.raises(ValueError, match="same object"):
        evaluate(model, tok, steered=model, progress=False)
    with pytest.raises(ValueError, match="label"):
        evaluate(
            model, tok, judge=lambda p, r, lang: ["ok"] * len(p), langs="fr", limit=1, utility=False, progress=False
        )
    with pytest.raises(ValueError, match="returned 0 labels for 1 pairs"):
        evaluate(model, tok, judge=lambda p, r, lang: [], langs="fr", limit=1, utility=False, progress=False)
    with pytest.raises(ValueError, match="no prompts for language"):
        evaluate(model, tok, langs=["ko"], prompts=[{"prompt": "x", "lang": "en"}], progress=False)


def _parser():
    parser = argparse.ArgumentParser(prog="soteria")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_runs_on_saved_models(tmp_path, capsys):
    tok = tiny_tokenizer()
    base, steered = tiny_model("llama"), tiny_model("llama", seed=1)
    for name, model in (("base", base), ("steered", steered)):
        model.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"text": "How do I do it?", "language": "English"}\n{"text": "Comment ?", "language": "fr"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = _parser().parse_args(
        [
            "eval",
            str(tmp_path / "base"),
            "--steered",
            str(tmp_path / "steered"),
            "--prompts",
            str(prompts),
            "--prompt-column",
            "text",
            "--langs",
            "en,fr",
            "--max-new-tokens",
            "3",
            "--probe-prompts",
            "0",
            "--out",
            str(out),
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert args.func is run_eval
    assert run_eval(args) == 0
    printed = capsys.readouterr().out
    assert "ASR before" in printed and "refusal-phrases" in printed
    data = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert [x["lang"] for x in data["languages"]] == ["en", "fr"] and data["languages"][0]["kl"] > 0
    assert (out / "asr.png").read_bytes()[:8] == PNG

    bad = _parser().parse_args(["eval", str(tmp_path / "nothing-here"), "--no-progress"])
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        run_eval(bad)
    wrong = _parser().parse_args(["eval", str(tmp_path / "base"), "--judge-model", "m", "--no-progress"])
    with pytest.raises(ValueError, match="--judge llm"):
        run_eval(wrong)
    with pytest.raises(SystemExit):
        _parser().parse_args(["eval", "x", "--max-new-tokens", "0"])
