"""soteria.heads (HeadScores, find_heads) and soteria.heads.cache."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

import soteria
from soteria.arch import head_sites
from soteria.heads import HeadScores, HeadSet, cache, find_heads
from soteria.heads.attribution import indirect_effects
from soteria.heads.prompts import build_prompts
from soteria.models.tiny import tiny_model, tiny_tokenizer

ANTONYMS = [
    {"input": a, "output": b}
    for a, b in [
        ("hot", "cold"),
        ("big", "small"),
        ("up", "down"),
        ("good", "bad"),
        ("fast", "slow"),
        ("day", "night"),
        ("open", "closed"),
        ("old", "new"),
        ("high", "low"),
        ("early", "late"),
    ]
]
CAPITALS = [
    {"input": a, "output": b}
    for a, b in [
        ("France", "Paris"),
        ("Japan", "Tokyo"),
        ("Germany", "Berlin"),
        ("Spain", "Madrid"),
        ("Egypt", "Cairo"),
        ("Italy", "Rome"),
        ("Peru", "Lima"),
        ("Kenya", "Nairobi"),
        ("Cuba", "Havana"),
        ("Chile", "Santiago"),
    ]
]
TASKS = {"antonym": ANTONYMS, "capital": CAPITALS}
SMALL = dict(tasks=TASKS, n_shots=3, n_trials=4, seed=0, progress=False)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _eager(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")


def _scores(values, lang="xx", **kw):
    return HeadScores(torch.tensor(values, dtype=torch.float32), model_name="tiny", lang=lang, **kw)


# --------------------------------------------------------------------------- HeadScores


def test_top_int_fraction_and_ties():
    s = _scores([[0.1, 0.5, -0.2], [0.5, 0.0, 0.3]])
    assert s.top(1) == [(0, 1)]
    assert s.top(3) == [(0, 1), (1, 0), (1, 2)]  # the 0.5 tie goes to the lower (layer, head)
    assert s.top(6)[-1] == (0, 2)
    assert s.top(0.5) == s.top(3)
    assert s.top(1.0) == s.top(6)
    assert s.top(0.01) == [(0, 1)]  # at least one head
    for bad in (0, 7, -1, 0.0, 1.5, True, "3", None):
        with pytest.raises(ValueError, match="k"):
            s.top(bad)


def test_scores_validation():
    with pytest.raises(ValueError, match="layers, heads"):
        HeadScores(torch.zeros(4))
    with pytest.raises(ValueError, match="NaN"):
        HeadScores(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="per_task"):
        HeadScores(torch.zeros(2, 2), per_task={"a": torch.zeros(2, 3)})
    s = HeadScores([[1, 2], [3, 4]])
    assert s.scores.dtype == torch.float32 and s.shape == (2, 2)


def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(1)
    s = HeadScores(
        torch.randn(3, 5, generator=g),
        model_name="org/model",
        lang="fr",
        method="exact",
        settings={"n_shots": 3, "tasks": ["a", "b"]},
        per_task={"a": torch.randn(3, 5, generator=g), "b": torch.randn(3, 5, generator=g)},
    )
    path = s.save(tmp_path / "sub" / "fr.json")
    doc = json.loads(path.read_text())
    assert list(doc) == sorted(doc), "keys must be sorted"
    assert doc["format"] == "soteria.HeadScores" and doc["soteria_version"] == soteria.__version__
    back = HeadScores.load(path)
    assert torch.equal(back.scores, s.scores)  # float32 survives JSON exactly
    assert back.per_task.keys() == s.per_task.keys()
    assert all(torch.equal(back.per_task[n], s.per_task[n]) for n in s.per_task)
    assert (back.model_name, back.lang, back.method, back.settings) == (
        s.model_name,
        s.lang,
        s.method,
        s.settings,
    )
    assert [p.name for p in path.parent.iterdir()] == ["fr.json"], "temp files left behind"


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "a.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HeadScores.load(tmp_path / "a.json")
    (tmp_path / "b.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="not a soteria.HeadScores"):
        HeadScores.load(tmp_path / "b.json")


def test_plot_writes_png(tmp_path):
    s = _scores(torch.randn(4, 6).tolist())
    for k in (None, 5):
        path = s.plot(tmp_path / f"heat{k}.png", k=k)
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heat5.png", "heatNone.png"]


def test_combine_mean():
    a = _scores([[1.0, 0.0], [0.0, 2.0]], lang="en")
    b = _scores([[3.0, 0.0], [2.0, 0.0]], lang="de")
    m = HeadScores.combine([a, b], how="mean")
    assert isinstance(m, HeadScores)
    assert torch.equal(m.scores, torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    assert m.lang == "en+de" and m.top(1) == [(0, 0)]
    with pytest.raises(ValueError, match="majority"):
        HeadScores.combine([a, b], how="mean", k=2)


def test_combine_majority_votes():
    # Five languages over a 2 x 3 grid; each votes for its top 2.
    grids = [
        [[9, 8, 0], [0, 0, 0]],  # (0,0) (0,1)
        [[9, 0, 8], [0, 0, 0]],  # (0,0) (0,2)
        [[0, 8, 0], [9, 0, 0]],  # (1,0) (0,1)
        [[7, 9, 0], [0, 0, 0]],  # (0,1) (0,0)
        [[0, 0, 9], [8, 0, 0]],  # (0,2) (1,0)
    ]
    langs = ["en", "es", "de", "fr", "zh"]
    scores = [_scores(g, lang=lang) for g, lang in zip(grids, langs)]
    hs = HeadScores.combine(scores, how="majority", k=2)  # default: strict majority, 3 of 5
    assert isinstance(hs, HeadSet)
    assert hs.min_votes == 3 and hs.k == 2 and hs.langs == tuple(langs)
    # (0,0) and (0,1): 3 votes each and the same mean score (5.0): (layer, head) decides.
    assert hs.to_list() == [(0, 0), (0, 1)] and hs.votes == (3, 3)
    hs2 = HeadScores.combine(scores, how="majority", k=2, min_votes=2)
    assert hs2.to_list() == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert hs2.votes == (3, 3, 2, 2)
    assert (0, 2) in hs2 and (1, 1) not in hs2 and len(hs2) == 4
    # Equal votes, unequal means: the higher mean goes first, against (layer, head) order.
    scores[4] = _scores([[0, 0, 1], [9, 0, 0]], lang="zh")  # zh still votes (1,0) and (0,2)
    hs3 = HeadScores.combine(scores, how="majority", k=2, min_votes=2)
    assert hs3.to_list() == [(0, 0), (0, 1), (1, 0), (0, 2)]  # means 3.6 > 1.8
    # The reference's low group: 3 languages, 2 votes.
    assert HeadScores.combine(scores[:3], how="majority", k=2).min_votes == 2


def test_combine_errors():
    a, b = _scores([[1.0, 0.0]]), _scores([[1.0], [0.0]])
    with pytest.raises(ValueError, match="differ in shape"):
        HeadScores.combine([a, b])
    with pytest.raises(ValueError, match="at least one"):
        HeadScores.combine([])
    with pytest.raises(ValueError, match="needs k"):
        HeadScores.combine([a, a], how="majority")
    with pytest.raises(ValueError, match="min_votes"):
        HeadScores.combine([a, a], how="majority", k=1, min_votes=3)
    with pytest.raises(ValueError, match="out of range"):
        HeadScores.combine([a, a], how="majority", k=3)
    with pytest.raises(ValueError, match="how"):
        HeadScores.combine([a, a], how="union", k=1)
    with pytest.raises(ValueError, match="not a HeadScores"):
        HeadScores.combine([a, a.scores])


# --------------------------------------------------------------------------- find_heads


def test_find_heads_averages_trials_then_tasks(tok):
    model = tiny_model("llama")
    res = find_heads(model, tok, "xx", cache=False, **SMALL)
    L, H = len(head_sites(model)), head_sites(model)[0].num_heads
    assert res.scores.shape == (L, H) and res.scores.dtype == torch.float32
    assert res.lang == "xx" and res.method == "atp" and set(res.per_task) == set(TASKS)
    assert res.settings["n_shots"] == 3 and res.settings["trials"] == {"antonym": 4, "capital": 4}
    per_task = {}
    for name, pairs in TASKS.items():
        pp = build_prompts(pairs, tok, n_shots=3, n_trials=4, seed=0)
        per_task[name] = indirect_effects(model, tok, pp.clean, pp.corrupted, pp.target_ids).mean(0)
        torch.testing.assert_close(res.per_task[name], per_task[name])
    torch.testing.assert_close(res.scores, (per_task["antonym"] + per_task["capital"]) / 2)
    assert res.scores.abs().max() > 0


def test_find_heads_exact_agrees_with_atp(tok):
    model = tiny_model("gpt2")
    atp = find_heads(model, tok, "xx", cache=False, **SMALL)
    exact = find_heads(model, tok, "xx", method="exact", cache=False, **SMALL)
    assert exact.method == "exact"
    corr = torch.corrcoef(torch.stack([atp.scores.flatten(), exact.scores.flatten()]))[0, 1]
    assert corr > 0.95, corr


def test_find_heads_builtin_language(tok):
    res = find_heads(tiny_model("qwen2"), tok, "en", tasks=["antonym"], n_shots=2, n_trials=2, progress=False)
    assert res.lang == "en" and list(res.per_task) == ["antonym"] and res.settings["tasks"] == ["antonym"]


def test_find_heads_cache(tok, monkeypatch, tmp_path):
    monkeypatch.setenv("SOTERIA_CACHE_DIR", str(tmp_path / "c"))
    model = tiny_model("llama")
    first = find_heads(model, tok, "xx", **SMALL)
    files = list((tmp_path / "c" / "heads").glob("*.json"))
    assert len(files) == 1

    import soteria.heads.attribution as attribution

    def boom(*a, **k):
        raise AssertionError("cache miss: indirect_effects was called")

    monkeypatch.setattr(attribution, "indirect_effects", boom)
    hit = find_heads(model, tok, "xx", **SMALL)
    assert torch.equal(hit.scores, first.scores)
    with pytest.raises(AssertionError, match="cache miss"):
        find_heads(model, tok, "xx", **SMALL, cache=False)
    with pytest.raises(AssertionError, match="cache miss"):  # other settings -> other key
        find_heads(model, tok, "xx", **{**SMALL, "seed": 1})
    with pytest.raises(AssertionError, match="cache miss"):
        find_heads(model, tok, "xx", method="exact", **SMALL)
    # A steered model (one o_proj element changed) must not read the unsteered scores.
    with torch.no_grad():
        head_sites(model)[1].weight[3, 5] += 1e-3
    with pytest.raises(AssertionError, match="cache miss"):
        find_heads(model, tok, "xx", **SMALL)


def test_fingerprint(tok):
    a, b = tiny_model("gpt2"), tiny_model("gpt2")
    fa = cache.model_fingerprint(a)
    assert fa == cache.model_fingerprint(b)
    site = head_sites(a)[0]
    assert site.head_axis == 0  # Conv1D: hashed in full whatever the layout
    with torch.no_grad():
        site.weight[-1, -1] += 1e-6  # an element a strided sample would likely miss
    assert cache.model_fingerprint(a) != fa
    with torch.no_grad():
        site.weight[-1, -1] -= 1e-6
        assert cache.model_fingerprint(a) == fa
        a.lm_head.weight[0, 0] += 1.0  # sampled tensors: element 0 is always in the sample
    assert cache.model_fingerprint(a) != fa
    assert cache.model_fingerprint(tiny_model("gpt2", seed=1)) != fa
    assert cache.model_fingerprint(tiny_model("gpt2", dtype=torch.bfloat16)) != fa


def test_fingerprint_samples_span_the_whole_tensor():
    """A sampled tensor's sample reaches its end, not only its first SAMPLE_ELEMENTS elements."""
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.randn(int(1.5 * cache.SAMPLE_ELEMENTS)))  # stride 2 covers it
    before = cache.model_fingerprint(m, full=set())
    with torch.no_grad():
        m.w[-2] += 1.0  # in the last quarter, at an even index
    assert cache.model_fingerprint(m, full=set()) != before


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_fingerprint_follows_peft_adapter_state():
    """Same tensors, other active adapter (or adapters disabled): another model, another key."""
    peft = pytest.importorskip("peft")
    lora = dict(r=2, target_modules=["o_proj"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(**lora))
    model.add_adapter("other", peft.LoraConfig(**lora))
    first = cache.model_fingerprint(model)
    model.set_adapter("other")
    assert cache.model_fingerprint(model) != first
    model.set_adapter("default")
    assert cache.model_fingerprint(model) == first
    with model.disable_adapter():
        assert cache.model_fingerprint(model) != first


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SOTERIA_CACHE_DIR", str(tmp_path / "x"))
    assert cache.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SOTERIA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "soteria"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "soteria"
    assert cache.cache_key({"a": 1, "b": [2]}) == cache.cache_key({"b": [2], "a": 1})


@pytest.mark.parametrize("method", ["atp", "exact"])
def test_find_heads_progress_bar_counts_trials(tok, monkeypatch, method):
    import tqdm.auto

    bars = []

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            self.asked_disable = kwargs.get("disable")
            self.out = io.StringIO()
            kwargs.update(disable=False, file=self.out)
            super().__init__(*args, **kwargs)
            bars.append(self)

    import soteria.progress

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    monkeypatch.setattr(soteria.progress, "_is_terminal", lambda stream: True)
    model = tiny_model("gpt2")
    find_heads(model, tok, "xx", method=method, cache=False, **{**SMALL, "progress": True})
    find_heads(model, tok, "xx", method=method, cache=False, **SMALL)
    assert [b.asked_disable for b in bars] == [False, True]
    assert bars[0].total == 8 and bars[0].n == pytest.approx(8)
    counts = re.findall(r"\| ([\d.]+)/8 \[", bars[0].out.getvalue())  # fractions of a trial: one decimal at most
    assert counts[-1] == "8" and all(re.fullmatch(r"\d+(\.\d)?", c) for c in counts), counts


def test_find_heads_progress_shows_in_logs_when_stderr_is_not_a_terminal(tok, capsys):
    model = tiny_model("gpt2")
    find_heads(model, tok, "xx", cache=False, **{**SMALL, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("find_heads xx (atp): ") for line in lines)
    assert "8/8 trial (100%)" in lines[-1]
    find_heads(model, tok, "xx", cache=False, **SMALL)
    assert capsys.readouterr().err == ""


def test_find_heads_log_lines_move_during_the_clean_mean_pass(tok, capsys):
    """The 8 clean prompts' mean pass (one batch) counts for a quarter of each AtP trial, so a log
    shows 2/8 before the attribution batch brings it to 8/8."""
    find_heads(tiny_model("gpt2"), tok, "xx", cache=False, **{**SMALL, "progress": True})
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 1)[1].split(",")[0] for line in lines] == [
        "0/8 trial",
        "2/8 trial (25%)",
        "8/8 trial (100%)",
    ]


def test_find_heads_bad_input(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        find_heads(model, tok, "xx", method="fast", **SMALL)
    with pytest.raises(ValueError, match="language|lang"):
        find_heads(model, tok, "xx-unknown", n_shots=2, n_trials=2, progress=False)
    with pytest.raises(ValueError, match="n_trials"):
        find_heads(model, tok, "xx", **{**SMALL, "n_trials": 0})


def test_auto_trials_stop_once_the_top_set_is_stable_and_record_the_rule(tok):
    from soteria.heads.search import AUTO_MAX_TRIALS, AUTO_STEP

    model = tiny_model("llama")
    scores = find_heads(
        model, tok, "xx", tasks=TASKS, n_shots=3, n_trials="auto", stop_k=4, cache=False, progress=False
    )
    used = scores.settings["trials"]
    assert scores.settings["n_trials"] == "auto" and "top-4 set has Jaccard >= 0.9" in scores.settings["auto_rule"]
    assert all(n % AUTO_STEP == 0 and 2 * AUTO_STEP <= n <= AUTO_MAX_TRIALS for n in used.values())
    assert scores.settings["stable"] or max(used.values()) == AUTO_MAX_TRIALS  # stopped early only when stable
    # the same rounds again give the same scores (deterministic), and a fixed count stays one round
    again = find_heads(model, tok, "xx", tasks=TASKS, n_shots=3, n_trials="auto", stop_k=4, cache=False, progress=False)
    assert torch.equal(scores.scores, again.scores)
    fixed = find_heads(model, tok, "xx", tasks=TASKS, n_shots=3, n_trials=4, cache=False, progress=False)
    assert fixed.settings["trials"] == dict.fromkeys(TASKS, 4) and "auto_rule" not in fixed.settings


@pytest.mark.parametrize("bad", [0, -1, 2.5, "many", True])
def test_bad_n_trials_is_refused_before_any_work(tok, bad):
    with pytest.raises(ValueError, match="n_trials must be a positive int or 'auto'"):
        find_heads(tiny_model("llama"), tok, "xx", tasks=TASKS, n_trials=bad, cache=False, progress=False)


def test_means_option_keeps_the_default_cache_key(tok, monkeypatch, tmp_path):
    """means="paired" is the default: its settings and cache key are today's; leave_one_out is another key."""
    from soteria.heads.search import LEAVE_ONE_OUT_RULE, MEANS_RULE

    monkeypatch.setenv("SOTERIA_CACHE_DIR", str(tmp_path / "c"))
    model = tiny_model("llama")
    first = find_heads(model, tok, "xx", **SMALL)
    assert first.settings["prompts"]["means"] == MEANS_RULE
    loo = find_heads(model, tok, "xx", means="leave_one_out", **SMALL)
    assert loo.settings["prompts"]["means"] == LEAVE_ONE_OUT_RULE
    assert not torch.equal(loo.scores, first.scores)
    assert len(list((tmp_path / "c" / "heads").glob("*.json"))) == 2

    import soteria.heads.attribution as attribution

    def boom(*a, **k):
        raise AssertionError("cache miss: indirect_effects was called")

    monkeypatch.setattr(attribution, "indirect_effects", boom)
    assert torch.equal(find_heads(model, tok, "xx", means="paired", **SMALL).scores, first.scores)
    assert torch.equal(find_heads(model, tok, "xx", means="leave_one_out", **SMALL).scores, loo.scores)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means="mine"), "means must be one of"),
        (dict(means="leave_one_out", n_trials=1), "at least 2 trials of each task in each round"),
    ],
)
def test_bad_means_refused_before_any_work(tok, kwargs, match):
    model = tiny_model("llama")
    for site in head_sites(model):
        site.module.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("the model ran")))
    with pytest.raises(ValueError, match=match) as info:
        find_heads(model, tok, "xx", **{**SMALL, **kwargs})
    assert "\n" not in str(info.value)
