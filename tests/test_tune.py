"""soteria.tune on tiny models: resuming, bit-exact reverts, the chosen JSON through `soteria steer --config`,
bad arguments refused before any work, the Pareto front and the choice rule."""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

import soteria.tune.study as study_mod
from soteria import SoteriaPatcher
from soteria.arch import head_sites
from soteria.cli import main
from soteria.heads import find_heads_multi
from soteria.models.tiny import tiny_model, tiny_tokenizer
from soteria.tune import SearchSpace, choose, load_tune_config, pareto_front, tune
from soteria.tune.proxy import RefusalProxy

LANGS = ["es", "fr"]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def scores(tok):
    return find_heads_multi(tiny_model("llama"), tok, LANGS, n_trials=1, n_shots=2, cache=False, progress=False)


def _weights(model) -> dict[int, torch.Tensor]:
    return {s.layer: s.weight.detach().clone() for s in head_sites(model)}


def _tune(model, tok, scores, out, **kw):
    kw.setdefault("verify", False)
    return tune(model, tok, LANGS, out_dir=out, scores=scores, progress=False, **kw)


def test_trials_leave_the_model_bit_identical_and_write_the_results(tok, scores, tmp_path, monkeypatch):
    model = tiny_model("llama")
    before = _weights(model)
    seen = []
    real = RefusalProxy.measure

    def spy(self, m):
        seen.append({layer: w.clone() for layer, w in _weights(m).items()})
        return real(self, m)

    monkeypatch.setattr(RefusalProxy, "measure", spy)
    result = _tune(model, tok, scores, tmp_path / "t", n_trials=4, verify=True, verify_tokens=4)
    after = _weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before) and not SoteriaPatcher.is_steered(model)
    assert any(not torch.equal(w[k], before[k]) for w in seen[:4] for k in before)  # the trials did steer
    names = {p.name for p in (tmp_path / "t").iterdir()}
    assert names == {
        "study.db",
        "chosen.json",
        "harm.safetensors",
        "trials.csv",
        "front.csv",
        "pareto.png",
        "verify.json",
    }
    assert len(result.trials) == 4 and 1 <= len(result.front) <= 4
    assert result.times["trials_run"] == 4 and result.times["trials"] > 0
    assert set(result.verify) >= {"base", "default", "chosen"} and set(result.verify["chosen"]) == set(LANGS)
    chosen = json.loads((tmp_path / "t" / "chosen.json").read_text())
    assert chosen["format"] == "soteria.tune" and chosen["config"]["languages"] == LANGS


def test_an_interrupted_tune_resumes(tok, scores, tmp_path, monkeypatch):
    model = tiny_model("llama")
    before = _weights(model)
    real, calls = RefusalProxy.measure, []

    def flaky(self, m):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, m)

    monkeypatch.setattr(RefusalProxy, "measure", flaky)
    with pytest.raises(KeyboardInterrupt):
        _tune(model, tok, scores, tmp_path / "t", n_trials=5)
    assert all(torch.equal(before[k], w) for k, w in _weights(model).items())  # reverted on the way out
    monkeypatch.setattr(RefusalProxy, "measure", real)
    result = _tune(model, tok, scores, tmp_path / "t", n_trials=5)
    assert len(result.trials) == 5  # 2 kept from the first run, 3 run now
    again = _tune(model, tok, scores, tmp_path / "t", n_trials=5)  # nothing left to run
    assert [r["trial"] for r in again.trials] == [r["trial"] for r in result.trials]


def test_chosen_json_reproduces_the_weights_through_steer_config(tok, scores, tmp_path, capsys):
    result = _tune(tiny_model("llama"), tok, scores, tmp_path / "t", n_trials=3)
    config, harm = load_tune_config(tmp_path / "t" / "chosen.json")
    assert config.heads == result.config.heads and harm is not None
    expected = SoteriaPatcher.apply(tiny_model("llama"), config=config, harm=harm)
    assert main(["steer", "tiny:llama", "--config", str(tmp_path / "t" / "chosen.json"), "--out", str(tmp_path / "s"),
                 "--force"]) == 0  # fmt: skip
    saved = load_file(tmp_path / "s" / "model.safetensors")
    base = _weights(tiny_model("llama"))
    changed = 0
    for s in head_sites(expected):
        assert torch.equal(saved[s.param_name], s.weight.detach())
        changed += not torch.equal(saved[s.param_name], base[s.layer])
    assert changed > 0
    assert json.loads((tmp_path / "s" / "soteria_config.json").read_text())["heads"] == {
        k: [list(p) for p in v] for k, v in config.heads.items()
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(n_trials=0), "n_trials must be a positive int"),
        (dict(max_kl=-1.0), "max_kl must be a number > 0"),
        (dict(choose_how="best"), "choose must be 'budget' or 'knee'"),
        (dict(space=SearchSpace(top_k=(4, 10_000))), "goes past the model's"),
        (dict(langs=["xx"]), "no built-in tuning prompts for xx"),
    ],
)
def test_bad_arguments_fail_before_any_work(tok, tmp_path, monkeypatch, kwargs, match):
    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(study_mod, "find_heads_multi", no_work)
    monkeypatch.setattr(study_mod, "RefusalProxy", no_work)
    langs = kwargs.pop("langs", LANGS)
    with pytest.raises(ValueError, match=match):
        tune(tiny_model("llama"), tok, langs, out_dir=tmp_path / "t", progress=False, **kwargs)
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("space", "match"),
    [
        (dict(top_k=(0, 5)), "top_k must hold positive ints"),
        (dict(top_k=(9, 3)), "low <= high"),
        (dict(relative_scale=(0.0, 0.1)), "relative_scale must hold positive finite numbers"),
        (dict(scale=(1.0, float("inf"))), "scale must hold positive finite numbers"),
        (dict(top_k=5), "top_k must be a \\(low, high\\) pair"),
        (dict(shared_top_k="yes"), "shared_top_k must be True or False"),
    ],
)
def test_bad_search_space(space, match):
    with pytest.raises(ValueError, match=match):
        SearchSpace(**space)


def test_a_folder_of_other_files_is_refused(tok, tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        tune(tiny_model("llama"), tok, LANGS, out_dir=tmp_path / "t", progress=False)
    assert (tmp_path / "t" / "notes.txt").read_text() == "mine"


def test_cli_tune_with_heads_from(tok, scores, tmp_path, capsys):
    files = [str(scores[lang].save(tmp_path / f"heads_{lang}.json")) for lang in LANGS]
    code = main(["tune", "tiny:llama", "--langs", *LANGS, "--heads-from", *files, "--trials", "2", "--no-verify",
                 "--out", str(tmp_path / "t"), "--top-k-range", "2", "6"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "chosen trial" in out and "--config" in out
    rows = list(csv.DictReader((tmp_path / "t" / "trials.csv").open()))
    assert len(rows) == 2 and all(2 <= k <= 6 for r in rows for k in json.loads(r["top_k"]).values())


def test_pareto_front_and_choice():
    points = [(0.9, 0.01), (0.5, 0.05), (0.6, 0.2), (0.2, 0.3), (0.5, 0.08), (0.1, 1.0)]
    assert pareto_front(points) == [5, 3, 1, 0]
    assert choose(points, "budget", max_kl=0.1) == (1, "lowest harmfulness with KL <= 0.1")
    i, why = choose(points, "budget", max_kl=0.0001)
    assert i == 0 and "no trial has KL <= 0.0001" in why
    assert choose(points, "knee")[0] in pareto_front(points)
    with pytest.raises(ValueError, match="choose must be one of"):
        choose(points, "nearest")
