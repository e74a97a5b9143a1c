"""SoteriaPatch: a steering saved as a small file and applied to a fresh base, bit-identically.

Families: llama (GQA, nn.Linear), gpt2 (Conv1D: head slices are rows), gemma (MQA). Every
round trip goes through the file on disk (save -> from_pretrained) onto a freshly built base.
"""

import json
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi

from soteria import SoteriaPatch, SoteriaPatcher
from soteria.arch import head_sites
from soteria.export.card import PATCH_NAME
from soteria.io.safetensors import read_safetensors
from soteria.models.tiny import tiny_model
from tests.model_utils import random_tau

FAMILIES = ["llama", "gpt2", "gemma"]
HEADS = {"en": [(0, 1), (1, 3)], "fr": [(1, 3), (1, 0), (0, 2)]}


def _state(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _bit_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(-1), b[k].view(-1)), k


def _steered(model_type, dtype=torch.float32, scale=0.3):
    model = tiny_model(model_type, dtype=dtype)
    SoteriaPatcher.apply(model, ["en", "fr"], heads=HEADS, harm=random_tau(model), scale=scale)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_round_trip_is_bit_identical_and_reverts(model_type, dtype, tmp_path):
    steered = _steered(model_type, dtype)
    SoteriaPatch.from_model(steered).save(tmp_path / "p")
    patch = SoteriaPatch.from_pretrained(tmp_path / "p")
    base = tiny_model(model_type, dtype=dtype)  # a fresh copy of the same base
    before = _state(base)
    assert patch.apply(base) is base
    _bit_equal(_state(base), _state(steered))
    assert SoteriaPatcher.config(base).to_dict() == SoteriaPatcher.config(steered).to_dict()
    SoteriaPatcher.revert(base)
    _bit_equal(_state(base), before)


def test_patch_of_fp32_steering_is_exact_even_for_scales_that_round(tmp_path):
    # Scale 0.3 is not a binary fraction: the kernel rounds; the patch stores the rounded result.
    steered = _steered("llama", scale=0.3)
    base = tiny_model("llama")
    SoteriaPatch.from_model(steered).apply(base)
    _bit_equal(_state(base), _state(steered))


def test_size_bound_and_contents(tmp_path):
    steered = _steered("llama")
    patch = SoteriaPatch.from_model(steered)
    out = patch.save(tmp_path / "p")
    sites = head_sites(steered)
    union = SoteriaPatcher.config(steered).head_union
    slice_bytes = sum(sites[layer].weight.numel() // sites[layer].num_heads * 4 for layer, _ in union)
    assert patch.nbytes == slice_bytes
    size = (out / PATCH_NAME).stat().st_size
    assert slice_bytes < size <= slice_bytes + 64 * 1024
    assert sorted(p.name for p in out.iterdir()) == ["README.md", PATCH_NAME]
    sf = read_safetensors(out / PATCH_NAME)
    assert {n for n, _ in sf.tensors()} == {f"layers.{l}.heads.{h}" for l, h in union}  # noqa: E741
    prints = json.loads(sf.metadata["fingerprints"])
    assert sorted(prints) == ["0", "1"] and all(len(fp["sha256"]) == 64 for fp in prints.values())
    card = (out / "README.md").read_text()
    assert "soteria-patch" in card and "SoteriaPatch.from_pretrained" in card


def test_card_names_base_model(tmp_path):
    steered = _steered("llama")
    out = SoteriaPatch.from_model(steered, base_model="org/base", base_revision="abc123").save(tmp_path / "p")
    card = (out / "README.md").read_text()
    assert "base_model: org/base" in card and "abc123" in card
    back = SoteriaPatch.from_pretrained(out)
    assert (back.base_model, back.base_revision) == ("org/base", "abc123")


@pytest.mark.parametrize(
    "make_base, match",
    [
        (lambda: tiny_model("llama", seed=1), "not the base tensor"),  # another base model
        (lambda: tiny_model("llama", dtype=torch.bfloat16), "dtype bfloat16, expected float32"),
        (lambda: tiny_model("gpt2"), "made for a llama model"),
    ],
)
def test_wrong_base_refused_model_unchanged(make_base, match, tmp_path):
    patch = SoteriaPatch.from_model(_steered("llama"))
    base = make_base()
    before = _state(base)
    with pytest.raises(ValueError, match=match):
        patch.apply(base)
    _bit_equal(_state(base), before)
    assert not SoteriaPatcher.is_steered(base)


def test_one_changed_tensor_is_enough_to_refuse():
    patch = SoteriaPatch.from_model(_steered("llama"))
    base = tiny_model("llama")
    with torch.no_grad():
        head_sites(base)[1].weight[0, 0] += 1e-3  # a revision that touched one element
    before = _state(base)
    with pytest.raises(ValueError, match="layer 1's .* not the base tensor"):
        patch.apply(base)
    _bit_equal(_state(base), before)


def test_already_steered_refused():
    patch = SoteriaPatch.from_model(_steered("llama"))
    with pytest.raises(ValueError, match="already steered"):
        patch.apply(_steered("llama"))


def test_from_model_needs_a_model_steered_here():
    with pytest.raises(ValueError, match="steered by SoteriaPatcher.apply in this process"):
        SoteriaPatch.from_model(tiny_model("llama"))


def test_from_pretrained_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a soteria patch folder"):
        SoteriaPatch.from_pretrained(tmp_path / "empty")
    with pytest.raises(ValueError, match="neither a patch folder or file nor a Hub repo id"):
        SoteriaPatch.from_pretrained(str(tmp_path / "no" / "such" / "dir"))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="is not a soteria patch"):
        SoteriaPatch.from_pretrained(tmp_path / "other.safetensors")


def test_save_refuses_folder_of_other_files(tmp_path):
    patch = SoteriaPatch.from_model(_steered("llama"))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        patch.save(tmp_path / "p", overwrite=True)
    assert (tmp_path / "p" / "notes.txt").read_text() == "mine"
    patch.save(tmp_path / "q")
    patch.save(tmp_path / "q", overwrite=True)  # an earlier patch may be replaced


def test_push_to_hub_mocked(tmp_path):
    patch = SoteriaPatch.from_model(_steered("llama"), base_model="org/base")
    seen = {}

    def upload(self, *, repo_id, folder_path, commit_message, token, repo_type):
        seen["files"] = sorted(p.name for p in folder_path.iterdir())
        seen["card"] = (folder_path / "README.md").read_text()
        seen["message"] = commit_message
        return mock.Mock(commit_url=f"https://huggingface.co/{repo_id}/commit/1")

    with (
        mock.patch.object(HfApi, "create_repo", autospec=True) as create,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=upload),
    ):
        create.return_value = mock.Mock(repo_id="me/patch")
        info = patch.push_to_hub("me/patch")
    assert create.call_args.kwargs["private"] is True
    assert seen["files"] == ["README.md", PATCH_NAME]
    assert "# me/patch" in seen["card"] and "base_model: org/base" in seen["card"]
    assert seen["message"] == "Upload soteria patch (en, fr)"
    assert info.commit_url.endswith("/commit/1")


# --------------------------------------------------------------------------- on disk and in the CLI


def _folders(tmp_path):
    from soteria.models.tiny import tiny_tokenizer

    base_dir, harmful_dir, other_dir = tmp_path / "base", tmp_path / "harmful", tmp_path / "other"
    for folder, seed in ((base_dir, 0), (other_dir, 2)):
        tiny_model("llama", seed=seed).save_pretrained(folder, max_shard_size="40KB")
        tiny_tokenizer().save_pretrained(folder)
    tiny_model("llama", seed=1).save_pretrained(harmful_dir)
    return base_dir, harmful_dir, other_dir


def _loaded(folder):
    from transformers import AutoModelForCausalLM

    return _state(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))


def test_streaming_takes_a_patch(tmp_path):
    from soteria import steer_checkpoint

    base_dir, harmful_dir, other_dir = _folders(tmp_path)
    from transformers import AutoModelForCausalLM

    steered = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    SoteriaPatcher.apply(steered, ["en", "fr"], heads=HEADS, harm=str(harmful_dir), scale={"en": 0.5, "fr": 0.3})
    patch = SoteriaPatch.from_model(steered)
    out = steer_checkpoint(base_dir, tmp_path / "out", patch=patch, progress=False)
    got = _loaded(out)
    want = _state(steered)
    _bit_equal(got, want)
    assert json.loads((out / "soteria_config.json").read_text()) == patch.config.to_dict()
    with pytest.raises(ValueError, match="not the base tensor the patch was made for"):
        steer_checkpoint(other_dir, tmp_path / "out2", patch=patch, progress=False)
    assert not (tmp_path / "out2").exists()
    with pytest.raises(ValueError, match="give patch= alone"):
        steer_checkpoint(base_dir, tmp_path / "out3", patch=patch, heads=HEADS, progress=False)


def test_cli_patch_only_apply_and_push(tmp_path, capsys, monkeypatch):
    from soteria.cli.main import main

    base_dir, harmful_dir, other_dir = _folders(tmp_path)
    steer = ["steer", str(base_dir), "--langs", "hi", "--heads", "0:1,1:2", "--harm", str(harmful_dir),
             "--scale", "0.3", "--max-kl", "100"]  # fmt: skip
    assert main([*steer, "--out", str(tmp_path / "full")]) == 0
    assert main([*steer, "--patch-only", "--out", str(tmp_path / "p")]) == 0
    out, err = capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["README.md", PATCH_NAME]
    assert "harmless-prompt KL" in err
    assert SoteriaPatch.from_pretrained(tmp_path / "p").damage["kl"] >= 0

    want = _loaded(tmp_path / "full")
    assert main(["apply", str(tmp_path / "p"), "--model", str(base_dir), "--out", str(tmp_path / "a")]) == 0
    assert "applied 2 heads for hi" in capsys.readouterr().out
    _bit_equal(_loaded(tmp_path / "a"), want)
    assert (
        main(["apply", str(tmp_path / "p"), "--model", str(base_dir), "--streaming", "--out", str(tmp_path / "b")]) == 0
    )
    _bit_equal(_loaded(tmp_path / "b"), want)

    capsys.readouterr()
    assert main(["apply", str(tmp_path / "p"), "--model", str(other_dir), "--out", str(tmp_path / "c")]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("soteria apply: error: layer 0's") and "not the base tensor" in last
    assert not (tmp_path / "c").exists()
    assert main(["steer", str(base_dir), "--langs", "hi", "--heads", "0:1", "--harm", str(harmful_dir),
                 "--streaming", "--patch-only", "--out", str(tmp_path / "d")]) == 2  # fmt: skip
    assert "drop --streaming" in capsys.readouterr().err

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.setdefault("upload", kw))
    assert main(["push", str(tmp_path / "p"), "me/tiny-patch"]) == 0
    assert calls["upload"]["commit_message"] == "Upload soteria patch (hi)"


def test_from_pretrained_hub_id_downloads_the_file(tmp_path, monkeypatch):
    from soteria.export.push import SoteriaHubError

    out = SoteriaPatch.from_model(_steered("llama")).save(tmp_path / "p")
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw["revision"]))
        return str(out / filename)

    with mock.patch("huggingface_hub.hf_hub_download", side_effect=download):
        patch = SoteriaPatch.from_pretrained("me/tiny-patch", revision="v1")
    assert calls == [("me/tiny-patch", PATCH_NAME, "v1")] and len(patch.slices) == 4
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SoteriaHubError, match="me/absent-patch"):
        SoteriaPatch.from_pretrained("me/absent-patch")
