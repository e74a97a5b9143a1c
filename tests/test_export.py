"""soteria.save_steered: round trip through plain transformers, metadata, model card, atomicity."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open

import soteria.export.save as export
from soteria import HarmVector, SoteriaConfig, SoteriaPatcher, save_steered
from soteria.arch import head_sites
from soteria.models.tiny import tiny_model, tiny_tokenizer

HEADS = {"fr": [(0, 1), (2, 3), (1, 0)], "de": [(0, 1), (2, 0)]}
SCALE = {"fr": 0.75, "de": 1.5}


def _steered(model_type="llama", dtype=torch.float32):
    base = tiny_model(model_type, seed=0, dtype=dtype, num_hidden_layers=3)
    harmful = tiny_model(model_type, seed=1, dtype=dtype, num_hidden_layers=3)
    original = copy.deepcopy(base)
    SoteriaPatcher.apply(base, ["fr", "de"], heads=HEADS, harm=HarmVector.from_models(base, harmful), scale=SCALE,
                         progress=False)  # fmt: skip
    return base, original


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


_PLAIN_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["soteria"] = None  # a machine without soteria: importing it would fail
    sys.modules["soteria_kernels"] = None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["Bonjour, comment allez-vous ?", "Guten Tag, wie geht es Ihnen?"], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"logits": logits, "batch": dict(batch), "soteria": model.config.soteria,
                "dtype": str(model.dtype)}, out)
    """
)


def test_round_trip_plain_transformers(tmp_path):
    """Kernels on the Triton (interpreted) path; reload in a subprocess where soteria cannot be imported."""
    model, original = _steered()
    config = SoteriaPatcher.config(model)
    out = save_steered(model, tmp_path / "steered", tokenizer=tiny_tokenizer(), max_shard_size="40KB")
    assert out == tmp_path / "steered" and _leftovers(tmp_path) == []

    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.endswith(".safetensors")]
    assert len(shards) > 3 and "model.safetensors.index.json" in names
    for n in ("README.md", "config.json", "generation_config.json", "soteria_config.json", "tokenizer.json"):
        assert n in names

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(out), str(tmp_path / "res.pt")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(tmp_path / "res.pt")
    with torch.no_grad():
        want = model(**res["batch"]).logits
    assert torch.equal(res["logits"], want)
    assert res["soteria"] == config.to_dict() and res["dtype"] == "torch.float32"

    # Metadata in every shard, soteria_config.json (sorted keys) and config.json.
    for n in shards:
        with safe_open(out / n, framework="pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt"
        assert SoteriaConfig.from_json(meta["soteria_config"]) == config
    text = (out / "soteria_config.json").read_text()
    assert text == config.to_json(indent=2) + "\n" and list(json.loads(text)) == sorted(json.loads(text))
    assert json.loads((out / "config.json").read_text())["soteria"] == config.to_dict()

    # Saved tensors: the steered model's; only the selected layers' o_proj differ from the base.
    saved = {}
    for n in shards:
        with safe_open(out / n, framework="pt") as f:
            saved.update({k: f.get_tensor(k) for k in f.keys()})
    base_sd = original.state_dict()
    assert saved.keys() == base_sd.keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    changed = {k for k in saved if not torch.equal(saved[k], base_sd[k])}
    assert changed == {s.param_name for s in head_sites(model)}

    # Model card: YAML header and the numbers in the body.
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.tags == ["soteria", "safety", "multilingual"] and card.data.language == ["fr", "de"]
    assert card.data.base_model is None  # built from a config: no Hub id to name
    site = head_sites(model)[0]
    n_changed = len(config.head_union) * site.head_dim * site.weight.shape[0]
    n_total = sum(p.numel() for p in model.parameters())
    body = card.text
    assert (
        "| French (`fr`) | 3 |" in body and "| German (`de`) | 2 |" in body and "| all languages (union) | 4 |" in body
    )
    assert f"{n_changed:,} of {n_total:,} ({100 * n_changed / n_total:.4f}%)" in body
    assert "fr: 0.75, de: 1.5" in body and "models:" in body and 'from_pretrained("steered")' in body
    for pkg in ("soteria", "transformers", "torch", "safetensors", "huggingface_hub"):
        assert f"| {pkg} |" in body


@pytest.mark.parametrize("model_type, dtype", [("llama", torch.bfloat16), ("gpt2", torch.float32)])
def test_save_keeps_dtype_and_layout(tmp_path, monkeypatch, model_type, dtype):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    from transformers import AutoModelForCausalLM

    model, _ = _steered(model_type, dtype)
    out = save_steered(model, tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.dtype == dtype
    sd = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k].view(torch.uint8) if v.dtype == torch.bfloat16 else sd[k],
                           v.view(torch.uint8) if v.dtype == torch.bfloat16 else v), k  # fmt: skip
    assert SoteriaPatcher.is_steered(loaded) and SoteriaPatcher.config(loaded) == SoteriaPatcher.config(model)


def test_card_names_base_model_and_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model, _ = _steered()
    model.config.name_or_path = "meta-llama/Llama-3.1-8B-Instruct"
    out = save_steered(model, tmp_path / "a")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "meta-llama/Llama-3.1-8B-Instruct"
    assert "[meta-llama/Llama-3.1-8B-Instruct](https://huggingface.co/meta-llama/Llama-3.1-8B-Instruct)" in card.text
    out = save_steered(model, tmp_path / "b", base_model="org/base", repo_id="me/base-soteria")
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "org/base" and 'from_pretrained("me/base-soteria")' in card.text


def test_refusals(tmp_path, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    plain = tiny_model("llama")
    with pytest.raises(ValueError, match="not steered"):
        save_steered(plain, tmp_path / "x")
    with pytest.raises(ValueError, match="needs a transformers model"):
        save_steered(torch.nn.Linear(2, 2), tmp_path / "x")
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="merge_and_unload"):
        save_steered(wrapped, tmp_path / "x")
    assert not (tmp_path / "x").exists()

    model, _ = _steered()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        save_steered(model, tmp_path / "taken")
    with pytest.raises(FileExistsError, match="holds files this did not write"):  # not ours: never replaced
        save_steered(model, tmp_path / "taken", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == ["keep.txt"]
    save_steered(model, tmp_path / "ours")
    save_steered(model, tmp_path / "ours", overwrite=True)  # an earlier soteria output is replaced
    assert (tmp_path / "ours" / "soteria_config.json").is_file()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_failure_midway_leaves_nothing(tmp_path, monkeypatch, overwrite):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model, _ = _steered()
    out = tmp_path / "out"
    if overwrite:
        save_steered(model, out)
    before = sorted(p.name for p in out.iterdir()) if overwrite else None

    def boom(path, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(export, "add_metadata", boom)
    with pytest.raises(OSError, match="disk full"):
        save_steered(model, out, overwrite=overwrite, max_shard_size="40KB")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    assert _leftovers(tmp_path) == []
