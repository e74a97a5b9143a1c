"""soteria.arch: head sites of every tiny family, PEFT, offloading, the generic detector, errors."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from soteria import arch
from soteria.arch import ARCHITECTURES, ArchSpec, HeadSite, describe, head_sites, num_layers_heads
from soteria.models.tiny import TINY_MODEL_TYPES, tiny_config, tiny_model

# Where head h's query rows live, for families with a fused QKV projection:
# (module path inside the attention block, weight dim holding the outputs, per-head stride in units of D).
_FUSED_Q = {
    "gpt2": ("c_attn", 1, 1),  # Conv1D [in, 3*H*D], q first, head-major
    "gpt_bigcode": ("c_attn", 0, 1),  # [H*D + 2*D, in] (multi-query)
    "falcon": ("query_key_value", 0, 1),  # [(H + 2)*D, in] (multi-query)
    "phi3": ("qkv_proj", 0, 1),  # [H*D + 2*KV*D, in]
    "mpt": ("Wqkv", 0, 1),  # [3*H*D, in], q first
    "bloom": ("query_key_value", 0, 3),  # [H, 3, D] per head
    "gpt_neox": ("query_key_value", 0, 3),
    "persimmon": ("query_key_value", 0, 3),
    "codegen": ("qkv_proj", 0, 3),  # mp_num = 4 = H blocks of [q, v, k]
}

_X = torch.tensor([[1, 40, 41, 300, 7, 99, 12], [1, 200, 5, 6, 77, 8, 9]])


def _logits(model, x=_X):
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def _o_inputs(model, sites, x=_X):
    """The input z ([B, T, H*D]) of every output projection during one forward pass."""
    seen: dict[int, torch.Tensor] = {}
    handles = [
        s.module.register_forward_pre_hook(lambda m, a, i=s.layer: seen.__setitem__(i, a[0].detach().clone()))
        for s in sites
    ]
    try:
        _logits(model, x)
    finally:
        for h in handles:
            h.remove()
    return [seen[s.layer] for s in sites]


def _query_rows(model_type: str, attn: nn.Module, head: int, num_heads: int, head_dim: int):
    """(parameters, output dim, index) of head ``head``'s query outputs in the attention block."""
    if model_type in _FUSED_Q:
        path, dim, stride = _FUSED_Q[model_type]
        proj, d = attn.get_submodule(path), head_dim
        start = head * stride * d
    else:
        proj, dim = attn.q_proj, 0
        d = proj.weight.shape[0] // num_heads  # query width per head (differs from D under MLA)
        start = head * d
    params = [proj.weight] + ([proj.bias] if getattr(proj, "bias", None) is not None else [])
    return params, dim, torch.arange(start, start + d)


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_sites_of_every_family(model_type):
    model = tiny_model(model_type)
    config = model.config
    sites = head_sites(model)
    n_layers, n_heads = num_layers_heads(model)
    assert n_layers == config.num_hidden_layers == len(sites)
    assert n_heads == config.num_attention_heads == 4
    state = model.state_dict()
    for i, s in enumerate(sites):
        assert isinstance(s, HeadSite) and s.layer == i and s.num_heads == n_heads
        assert model.get_submodule(s.name) is s.module
        w = s.weight
        assert w.shape[s.head_axis] == s.num_heads * s.head_dim
        assert s.head_axis == (0 if type(s.module).__name__ == "Conv1D" else -1)
        assert s.param_name in state and state[s.param_name].data_ptr() == w.data_ptr()
    assert len({(s.head_dim, s.head_axis) for s in sites}) == 1
    expected_d = getattr(config, "v_head_dim", None) or getattr(config, "head_dim", None)
    if expected_d is not None and model_type != "deepseek_v3":
        assert sites[0].head_dim == expected_d
    assert model_type in describe(model)

    # 1. Zeroing head h's input to W_o equals zeroing W_o's head-h slice; other slices differ.
    site, h = sites[-1], 1
    d = site.head_dim
    ref = _logits(model)
    hook = site.module.register_forward_pre_hook(
        lambda m, a: (
            torch.cat(
                [a[0][..., : h * d], torch.zeros_like(a[0][..., h * d : (h + 1) * d]), a[0][..., (h + 1) * d :]], dim=-1
            ),
            *a[1:],
        )  # fmt: skip
    )
    try:
        zero_input = _logits(model)
    finally:
        hook.remove()
    results = {}
    for g in (h, h + 1):
        saved = site.weight.detach().clone()
        with torch.no_grad():
            site.weight.narrow(site.head_axis % 2, g * d, d).zero_()
        results[g] = _logits(model)
        with torch.no_grad():
            site.weight.copy_(saved)
    assert not torch.allclose(zero_input, ref, atol=1e-6), "head 1 has no effect on the logits"
    torch.testing.assert_close(results[h], zero_input, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[h + 1], zero_input, atol=1e-6)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)

    # 2. Perturbing head h's query (a permutation of its rows: preserves any norm over q) changes
    #    exactly input columns [h*D, (h+1)*D) of W_o in that layer.
    attn = model.get_submodule(site.name.rsplit(".", 1)[0])
    params, dim, idx = _query_rows(model_type, attn, h, n_heads, d)
    before = _o_inputs(model, sites)[site.layer]
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            pd = dim if p.dim() == 2 else 0
            p.index_copy_(pd, idx, p.index_select(pd, idx.flip(0)))
    after = _o_inputs(model, sites)[site.layer]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    delta = (after - before).abs()[:, 1:]  # position 0 attends only to itself
    per_head = delta.reshape(*delta.shape[:-1], n_heads, d).amax(dim=(0, 1, 3))
    assert per_head[h] > 1e-4, f"{model_type}: head {h}'s slice did not move ({per_head.tolist()})"
    others = torch.cat([per_head[:h], per_head[h + 1 :]])
    assert others.max() < 1e-6, f"{model_type}: other heads moved: {per_head.tolist()}"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma", "opt", "gpt_neo", "falcon", "phi", "deepseek_v3"])
def test_generic_detector_matches_registry(model_type, monkeypatch):
    model = tiny_model(model_type)
    registered = head_sites(model)
    monkeypatch.delitem(ARCHITECTURES, model_type)
    generic = head_sites(model)
    assert [(s.name, s.head_dim, s.head_axis, s.num_heads) for s in generic] == [
        (s.name, s.head_dim, s.head_axis, s.num_heads) for s in registered
    ]
    assert all(g.module is r.module for g, r in zip(generic, registered))
    assert "generic detector" in describe(model)


def test_wrong_registration_falls_back_to_detector(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.setitem(ARCHITECTURES, "llama", ArchSpec("no.such.path", "self_attn", "o_proj"))
    assert [s.name for s in head_sites(model)] == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_base_model_without_head():
    model = tiny_model("llama").model  # LlamaModel: no "model." prefix
    sites = head_sites(model)
    assert sites[0].name == "layers.0.self_attn.o_proj"
    assert sites[0].param_name in model.state_dict()


def test_torch_compile_wrapper_is_unwrapped():
    model = tiny_model("llama")
    sites = head_sites(torch.compile(model))  # wrapping only: nothing is compiled until called
    assert (
        sites[0].name == "model.layers.0.self_attn.o_proj" and sites[0].module is model.model.layers[0].self_attn.o_proj
    )


def test_image_text_model_uses_text_decoder(monkeypatch):
    from transformers import AutoConfig, AutoModelForImageTextToText

    text = tiny_config("gemma3_text", num_hidden_layers=3).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=28)
    config = AutoConfig.for_model("gemma3", text_config=text, vision_config=dict(vision, patch_size=14))
    model = AutoModelForImageTextToText.from_config(config)
    names = [f"model.language_model.layers.{i}.self_attn.o_proj" for i in range(3)]
    sites = head_sites(model)
    assert [s.name for s in sites] == names and {(s.num_heads, s.head_dim) for s in sites} == {(4, 16)}
    assert all(s.param_name in model.state_dict() for s in sites)
    monkeypatch.delitem(ARCHITECTURES, "gemma3")
    assert [s.name for s in head_sites(model)] == names  # the vision tower's attention is not picked


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "falcon"])
def test_param_name_is_checkpoint_key(model_type, tmp_path):
    model = tiny_model(model_type)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    for s in head_sites(model):
        torch.testing.assert_close(saved[s.param_name], s.weight.detach(), rtol=0, atol=0)


@pytest.mark.parametrize(("model_type", "target"), [("llama", "o_proj"), ("gpt2", "c_proj")])
def test_peft_lora(model_type, target):
    peft = pytest.importorskip("peft")
    model = tiny_model(model_type)
    plain = [(s.name, s.param_name, s.head_dim, s.head_axis) for s in head_sites(model)]
    base_weights = [s.weight for s in head_sites(model)]
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=2, target_modules=[target], fan_in_fan_out=model_type == "gpt2")
    )
    sites = head_sites(lora)
    assert [(s.name, s.param_name, s.head_dim, s.head_axis) for s in sites] == plain
    for s, w in zip(sites, base_weights):
        assert s.module is not s.base_module and hasattr(s.module, "lora_A")
        assert s.weight is w  # the base layer's weight, not a LoRA factor
    assert "PEFT-wrapped" in describe(lora)
    assert num_layers_heads(lora) == (2, 4)
    merged = lora.merge_and_unload()
    assert all(s.param_name in merged.state_dict() for s in sites)


def test_accelerate_cpu_offload():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("llama")
    ref = _logits(model)
    expected = [(s.name, s.param_name, s.head_dim) for s in head_sites(model)]
    accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    sites = head_sites(model)
    assert [(s.name, s.param_name, s.head_dim) for s in sites] == expected
    assert all(s.weight.device.type == "meta" for s in sites)  # found, not moved or materialised
    assert sites[0].weight.shape == (48, 48)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


def test_accelerate_device_map_with_disk_offload(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = tiny_model("gpt2")
    ref = _logits(model)
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    model = accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    sites = head_sites(model)
    assert [s.weight.device.type for s in sites] == ["cpu", "meta"]
    assert [s.param_name for s in sites] == [f"transformer.h.{i}.attn.c_proj.weight" for i in range(2)]
    assert all(s.head_axis == 0 and s.head_dim == 12 for s in sites)
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=0)


# ---- models soteria cannot read, and registration --------------------------------------------


class _Toy(nn.Module):
    """Config-carrying toy whose attention block is called ``mixer`` (no 'attn' in the name)."""

    def __init__(self, widths=(24, 24), attention="mixer"):
        super().__init__()
        self.config = types.SimpleNamespace(model_type="toy_lm", num_attention_heads=4, hidden_size=16)
        self.blocks = nn.ModuleList()
        for w in widths:
            layer = nn.Module()
            setattr(layer, attention, nn.Module())
            getattr(layer, attention).wo = nn.Linear(w, 16, bias=False)
            self.blocks.append(layer)


def test_plain_module_is_rejected():
    with pytest.raises(ValueError, match=r"Sequential.*no \.config.*register_architecture"):
        head_sites(nn.Sequential(nn.Linear(8, 8), nn.ReLU()))
    with pytest.raises(ValueError, match="nn.Module"):
        head_sites("not a model")


def test_unregistered_toy_is_rejected_then_registered(monkeypatch):
    toy = _Toy()
    with pytest.raises(ValueError) as err:
        head_sites(toy)
    msg = str(err.value)
    assert "toy_lm" in msg and "_Toy" in msg and "blocks (2 x Module)" in msg and "register_architecture" in msg
    monkeypatch.setattr(arch, "ARCHITECTURES", dict(ARCHITECTURES))
    arch.register_architecture("toy_lm", layers="blocks", attention="mixer", o_proj="wo")
    sites = head_sites(toy)
    assert [(s.name, s.head_dim, s.head_axis) for s in sites] == [(f"blocks.{i}.mixer.wo", 6, -1) for i in range(2)]
    with pytest.raises(ValueError, match="already registered"):
        arch.register_architecture("toy_lm", layers="blocks", attention="mixer", o_proj="wo")
    with pytest.raises(ValueError, match="non-empty"):
        arch.register_architecture("x", layers="", attention="a", o_proj="o")


def test_non_uniform_widths_and_heads(monkeypatch):
    assert [s.name for s in head_sites(_Toy(attention="attn"))] == ["blocks.0.attn.wo", "blocks.1.attn.wo"]  # generic
    with pytest.raises(ValueError, match=r"same H\*D in every layer.*\[24, 32\]"):
        head_sites(_Toy(widths=(24, 32), attention="attn"))
    monkeypatch.setattr(arch, "ARCHITECTURES", dict(ARCHITECTURES))
    arch.register_architecture("toy_lm", layers="blocks", attention="mixer", o_proj="wo")
    with pytest.raises(ValueError, match=r"same H\*D in every layer.*\[24, 32\]"):
        head_sites(_Toy(widths=(24, 32)))
    toy = _Toy()
    toy.config.num_attention_heads = [4, 2]
    with pytest.raises(ValueError, match=r"same num_attention_heads in every layer.*\[4, 2\]"):
        head_sites(toy)
    toy.config.num_attention_heads = 5  # 24 not divisible by 5
    with pytest.raises(ValueError, match="not divisible by 5"):
        head_sites(toy)


def test_pruned_heads_are_rejected():
    from transformers.pytorch_utils import Conv1D

    model = tiny_model("gpt2")
    attn = model.transformer.h[1].attn  # prune by hand: keep 3 of 4 heads (input 36, divisible by 4)
    attn.c_proj, attn.num_heads = Conv1D(48, 36), 3
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.num_heads = 3 but the config says 4"):
        head_sites(model)


def test_hf_model_without_head_count_is_rejected(monkeypatch):
    model = tiny_model("llama")
    monkeypatch.delitem(ARCHITECTURES, "llama")
    model.config = types.SimpleNamespace(model_type="llama")
    with pytest.raises(ValueError, match="no query-head count"):
        head_sites(model)


def test_tiny_config_head_dim_override_is_seen():
    model = tiny_model("qwen3", head_dim=20)
    assert {s.head_dim for s in head_sites(model)} == {20}
    assert tiny_config("qwen3", head_dim=20).head_dim == 20
