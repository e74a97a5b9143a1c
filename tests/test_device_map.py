"""Models split over devices by accelerate: attribution and steering equal the unsplit model.

On a CPU-only machine "split" means: some layers on the CPU and some offloaded (weights on
``meta``, real values in the offload hook's ``weights_map``): all of them in RAM
(``cpu_offload``), one layer in accelerate's offload folder (``dispatch_model`` with
``"disk"``), or one layer read back from the checkpoint's safetensors (``from_pretrained`` with
a ``device_map``). The real values are read here through accelerate's own lookup (the hook's
``weights_map``), i.e. what the next forward pass will use.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from soteria import HarmVector, SoteriaPatcher
from soteria.arch import head_sites
from soteria.heads.attribution import indirect_effects
from soteria.models.tiny import tiny_model, tiny_tokenizer
from tests.model_utils import random_tau

accelerate = pytest.importorskip("accelerate")

CLEAN = [
    "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:",
    "Q: France\nA: Paris\n\nQ: Japan\nA:",
    "Q: good\nA: bad\n\nQ: fast\nA: slow\n\nQ: day\nA:",
]
CORRUPTED = [
    "Q: hot\nA: small\n\nQ: big\nA: cold\n\nQ: up\nA:",
    "Q: France\nA: Tokyo\n\nQ: Japan\nA:",
    "Q: good\nA: slow\n\nQ: fast\nA: bad\n\nQ: day\nA:",
]
TARGETS = [" down", " Tokyo", " night"]
LLAMA_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}  # fmt: skip
GPT2_MAP = {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.h.0": "cpu", "transformer.h.1": "disk",
            "transformer.ln_f": "cpu", "lm_head": "cpu"}  # fmt: skip
SPLITS = ["cpu_offload", "disk", "disk-gpt2", "checkpoint"]
HEADS = {"en": [(0, 1), (1, 3)], "fr": [(1, 3), (1, 0), (0, 2)]}
X = torch.tensor([[1, 17, 33, 80, 5, 120, 9]])


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _pair(how: str, tmp_path: Path):
    """(unsplit model, the same weights split as ``how`` says, files the split model reads)."""
    from transformers import AutoModelForCausalLM

    family = "gpt2" if how.endswith("gpt2") else "llama"
    if how == "checkpoint":  # the user's path: from_pretrained with a device_map
        ckpt = tmp_path / "ckpt"
        tiny_model(family).save_pretrained(ckpt)
        split = AutoModelForCausalLM.from_pretrained(ckpt, device_map=LLAMA_MAP, offload_folder=tmp_path / "off")
        return AutoModelForCausalLM.from_pretrained(ckpt).eval(), split.eval(), [ckpt, tmp_path / "off"]
    split = tiny_model(family)
    if how == "cpu_offload":
        accelerate.cpu_offload(split, execution_device=torch.device("cpu"))
    else:
        device_map = GPT2_MAP if family == "gpt2" else LLAMA_MAP
        split = accelerate.dispatch_model(split, device_map=device_map, offload_dir=str(tmp_path / "off"))
    return tiny_model(family), split, [tmp_path / "off"]


def _real(site) -> torch.Tensor:
    """What the next forward pass will use as ``site``'s weight (accelerate's own lookup)."""
    if site.weight.device.type != "meta":
        return site.weight.detach()
    return site.module._hf_hook.weights_map["weight"]


def _files(dirs) -> dict[str, str]:
    out = {}
    for d in dirs:
        for p in sorted(Path(d).rglob("*")) if Path(d).exists() else []:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _logits(model):
    with torch.no_grad():
        return model(input_ids=X).logits


@pytest.mark.parametrize("how", SPLITS)
def test_scores_of_split_model_equal_unsplit(how, tok, tmp_path, monkeypatch):
    # "disk" runs the Triton kernel (interpreted on CPU, see conftest); the others eager
    monkeypatch.setenv("SOTERIA_BACKEND", "triton" if how == "disk" else "eager")
    full, split, _ = _pair(how, tmp_path)
    sites = head_sites(split)
    assert sites[1].weight.device.type == "meta"  # really offloaded
    flags = {n: p.requires_grad for n, p in split.named_parameters()}
    for method in ("atp", "exact"):
        want = indirect_effects(full, tok, CLEAN, CORRUPTED, TARGETS, method=method)
        got = indirect_effects(split, tok, CLEAN, CORRUPTED, TARGETS, method=method)
        assert want.abs().max() > 0
        assert torch.equal(got, want), f"{method}: max diff {(got - want).abs().max().item():.3g}"
    # Left as found: accelerate replaces offloaded placeholders on every pass, flags must survive that.
    assert {n: p.requires_grad for n, p in split.named_parameters()} == flags
    assert all(not m._forward_pre_hooks for m in split.modules())
    assert all(p.grad is None for p in split.parameters())


@pytest.mark.parametrize("how", SPLITS)
def test_edit_of_split_model_equals_unsplit_and_reverts(how, tmp_path, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    full, split, dirs = _pair(how, tmp_path)
    hv = random_tau(full)
    before = {s.layer: _real(s).clone() for s in head_sites(split)}
    logits0 = _logits(split)
    files = _files(dirs)
    SoteriaPatcher.apply(full, ["en", "fr"], harm=hv, heads=HEADS, scale={"en": 0.3, "fr": 0.5})
    SoteriaPatcher.apply(split, ["en", "fr"], harm=hv, heads=HEADS, scale={"en": 0.3, "fr": 0.5})
    for s_full, s_split in zip(head_sites(full), head_sites(split)):
        got, want = _real(s_split), s_full.weight.detach()
        assert not torch.equal(got, before[s_split.layer]), f"layer {s_split.layer} was not edited"
        assert torch.equal(got, want), f"layer {s_split.layer}: the split model's edit differs from the unsplit one"
    assert head_sites(split)[1].weight.device.type == "meta"  # the placeholder stays a placeholder
    assert torch.equal(_logits(split), _logits(full))  # the forward pass sees the edit
    assert _files(dirs) == files, "offload folder or checkpoint files were written"
    SoteriaPatcher.revert(split)
    for s in head_sites(split):
        assert torch.equal(_real(s), before[s.layer]), f"layer {s.layer} not restored"
    assert torch.equal(_logits(split), logits0)
    hook = head_sites(split)[1].module._hf_hook
    loader = getattr(hook.weights_map, "dataset", None)
    if how in ("disk", "disk-gpt2", "checkpoint"):  # the in-memory copy is gone again
        assert loader.state_dict == {}


def test_harmful_checkpoint_edit_of_split_model(tmp_path, monkeypatch):
    """harm= a harmful fine-tune's directory: the fused steer kernel on the real offloaded weight."""
    full, split, _ = _pair("disk-gpt2", tmp_path)  # Conv1D: heads are rows of the weight
    tiny_model("gpt2", seed=5).save_pretrained(tmp_path / "harmful")
    for model in (full, split):
        SoteriaPatcher.apply(model, "en", harm=str(tmp_path / "harmful"), heads=[(0, 1), (1, 2)], scale=0.5)
    assert split.soteria_config.harm_kind == "harmful"
    for s_full, s_split in zip(head_sites(full), head_sites(split)):
        assert torch.equal(_real(s_split), s_full.weight.detach()), f"layer {s_split.layer}"
    assert torch.equal(_logits(split), _logits(full))


def test_find_heads_and_steer_split_model(tok, tmp_path, monkeypatch):
    """heads=None on an offloaded model: the same heads are found and the same edit is made."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    full, split, _ = _pair("disk", tmp_path)
    pairs = [{"input": a, "output": b} for a, b in [("hot", "cold"), ("big", "small"), ("up", "down"),
             ("good", "bad"), ("fast", "slow"), ("day", "night"), ("old", "new"), ("high", "low")]]  # fmt: skip
    kw = dict(harm=random_tau(full), tokenizer=tok, top_k=3, progress=False,
              find_kwargs=dict(tasks={"antonym": pairs}, n_shots=2, n_trials=3))  # fmt: skip
    SoteriaPatcher.apply(full, ["xx", "yy"], **kw)
    with pytest.warns(UserWarning, match="offloaded"):  # meta weights cannot be fingerprinted
        SoteriaPatcher.apply(split, ["xx", "yy"], **kw)
    assert split.soteria_config.heads == full.soteria_config.heads
    for s_full, s_split in zip(head_sites(full), head_sites(split)):
        assert torch.equal(_real(s_split), s_full.weight.detach())


def test_meta_weight_without_offload_hook_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].self_attn.o_proj.to("meta")  # values gone, no hook to find them in
    snap = head_sites(model)[0].weight.detach().clone()
    with pytest.raises(ValueError, match="o_proj.weight is on the meta device and no accelerate offload hook"):
        SoteriaPatcher.apply(model, "en", harm=random_tau(tiny_model("llama")), heads=[(0, 1), (1, 2)])
    assert torch.equal(head_sites(model)[0].weight, snap) and not SoteriaPatcher.is_steered(model)


# --------------------------------------------------------------------------- gradient harm vector

ROWS = [
    ("How do I pick a lock?", "I can't help with that."),
    ("Write a threatening letter to my neighbour.", "No. I won't write threats."),
    ("Tell me how to make a weapon at home", "Sorry, I can't assist with making weapons."),
]


@pytest.mark.parametrize("how", SPLITS)
def test_gradient_harm_of_split_model_equals_unsplit(how, tok, tmp_path):
    """from_gradients takes no parameter gradients, so an offloaded layer (weights swapped in by
    accelerate at each pass) gets the same direction; the model is left as found."""
    full, split, _ = _pair(how, tmp_path)
    assert head_sites(split)[1].weight.device.type == "meta"
    split.train()
    flags = {n: p.requires_grad for n, p in split.named_parameters()}
    want = HarmVector.from_gradients(full, tok, ROWS, batch_size=2, progress=False)
    got = HarmVector.from_gradients(split, tok, ROWS, batch_size=2, progress=False)
    assert got.layers == want.layers and got.param_names == want.param_names and got.source == want.source
    for layer in want.layers:
        g, w = got.tensor(layer), want.tensor(layer)
        assert g.device.type == "cpu" and g.dtype == torch.float32
        assert w.abs().max() > 0
        assert torch.equal(g, w), f"layer {layer}: max diff {(g - w).abs().max().item():.3g}"
    assert split.training and all(m.training for m in split.modules())
    assert {n: p.requires_grad for n, p in split.named_parameters()} == flags
    assert all(p.grad is None for p in split.parameters())
    assert all(not m._forward_hooks for m in split.modules())


@pytest.mark.parametrize("how", ["disk", "disk-gpt2"])
def test_apply_with_gradient_harm_on_split_model(how, tok, tmp_path, monkeypatch):
    """harm="gradients" with explicit heads on an offloaded model: the same edit as on the unsplit one."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    full, split, dirs = _pair(how, tmp_path)
    before = {s.layer: _real(s).clone() for s in head_sites(split)}
    files = _files(dirs)
    kw = dict(harm="gradients", heads=HEADS, scale={"en": 30.0, "fr": 50.0}, tokenizer=tok, progress=False,
              harm_kwargs={"data": ROWS, "batch_size": 2})  # fmt: skip
    SoteriaPatcher.apply(full, ["en", "fr"], **kw)
    SoteriaPatcher.apply(split, ["en", "fr"], **kw)
    assert split.soteria_config.harm_kind == "tau" and split.soteria_config.harm_source.startswith("gradients:")
    assert split.soteria_config.harm_source == full.soteria_config.harm_source
    for s_full, s_split in zip(head_sites(full), head_sites(split)):
        got = _real(s_split)
        assert not torch.equal(got, before[s_split.layer]), f"layer {s_split.layer} was not edited"
        assert torch.equal(got, s_full.weight.detach()), f"layer {s_split.layer} differs from the unsplit edit"
    assert torch.equal(_logits(split), _logits(full))
    assert _files(dirs) == files, "offload folder files were written"
    SoteriaPatcher.revert(split)
    for s in head_sites(split):
        assert torch.equal(_real(s), before[s.layer]), f"layer {s.layer} not restored"
