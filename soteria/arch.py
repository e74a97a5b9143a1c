"""Where each decoder layer's attention output projection lives, and how heads map onto it.

For layer ``l`` the output projection ``W_o`` takes the concatenated head outputs ``z``
(``[..., H*D]``) as input: head ``h`` owns input columns ``[h*D, (h+1)*D)`` of an
``nn.Linear`` weight (``[d_model, H*D]``, ``head_axis=-1``), or rows of a GPT-2 ``Conv1D``
weight (``[H*D, d_model]``, ``head_axis=0``). ``H`` is the number of *query* heads, also for
grouped-query models, and ``D = projection input width // H`` (never assumed to be 128).

Lookup order: the registry keyed by ``config.model_type`` (:data:`ARCHITECTURES`, extend it
with :func:`register_architecture`), then a generic detector. A model neither can read gets a
``ValueError`` saying what was found and how to register it.

Over 400 lines: the registry, the generic detector and the PEFT/compile unwrapping are one lookup
(every caller needs all three to find a head); the rest is the registry table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "HeadSite",
    "describe",
    "head_sites",
    "num_layers_heads",
    "register_architecture",
    "unwrap_model",
]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one family, relative to the base model (``model.base_model``).

    layers: dotted path to the ``nn.ModuleList`` of decoder layers (``"layers"``, ``"h"``,
    ``"decoder.layers"``); a path from the top-level model (``"model.layers"``) works too.
    attention: path of the attention block inside one layer (``"self_attn"``, ``"attn.attention"``).
    o_proj: path of the output projection inside the attention block (``"o_proj"``, ``"dense"``).
    num_heads_attr: config attribute holding the query-head count (default: the usual aliases).
    """

    layers: str
    attention: str
    o_proj: str
    num_heads_attr: str | None = None


@dataclass(frozen=True)
class HeadSite:
    """The attention output projection of one decoder layer.

    ``name`` is relative to the unwrapped model (:func:`unwrap_model`: PEFT removed), so
    ``param_name`` is the key of the weight in that model's checkpoint.
    """

    layer: int  # 0-based decoder layer
    name: str  # qualified module name, e.g. "model.layers.3.self_attn.o_proj"
    module: nn.Module = field(repr=False)  # as found in the model (may be a PEFT LoRA wrapper)
    num_heads: int  # H: query heads
    head_dim: int  # D = projection input width // H
    head_axis: int  # -1: nn.Linear weight [d_model, H*D]; 0: Conv1D weight [H*D, d_model]

    @property
    def base_module(self) -> nn.Module:
        """The projection itself, with any PEFT tuner wrappers removed."""
        return _base_layer(self.module)

    @property
    def weight(self) -> nn.Parameter:
        """The real base weight (``[d_model, H*D]`` or ``[H*D, d_model]``); may be on meta if offloaded."""
        return self.base_module.weight

    def head_slice(self, tensor: torch.Tensor, head: int) -> torch.Tensor:
        """The view of head ``head``'s columns (rows for Conv1D) of a tensor in :attr:`weight`'s layout."""
        return tensor.narrow(self.head_axis % 2, head * self.head_dim, self.head_dim)

    @property
    def param_name(self) -> str:
        """Checkpoint key of :attr:`weight`, e.g. ``"model.layers.3.self_attn.o_proj.weight"``.

        For a PEFT LoRA wrapper this is the base model's key (the wrapper's live state_dict
        key has ``.base_layer`` inserted).
        """
        return f"{self.name}.weight"


_LLAMA = ArchSpec("layers", "self_attn", "o_proj")

#: Registry keyed by ``config.model_type``. Paths are relative to ``model.base_model``.
ARCHITECTURES: dict[str, ArchSpec] = {
    **{
        t: _LLAMA
        for t in (
            "llama",
            "mistral",
            "ministral",
            "mixtral",
            "qwen2",
            "qwen2_moe",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "phimoe",
            "olmo",
            "olmo2",
            "olmo3",
            "olmoe",
            "cohere",
            "cohere2",
            "stablelm",
            "starcoder2",
            "granite",
            "granitemoe",
            "helium",
            "smollm3",
            "glm",
            "glm4",
            "nemotron",
            "seed_oss",
            "exaone4",
            "internlm3",
            "deepseek_v2",
            "deepseek_v3",
            "gpt_oss",
            "arcee",
            "apertus",
            "bitnet",
            "hunyuan_v1_dense",
            "ernie4_5",
        )
    },
    "phi": ArchSpec("layers", "self_attn", "dense"),
    "persimmon": ArchSpec("layers", "self_attn", "dense"),
    "gpt2": ArchSpec("h", "attn", "c_proj"),
    "gpt_bigcode": ArchSpec("h", "attn", "c_proj"),
    "gpt_neox": ArchSpec("layers", "attention", "dense"),
    "gptj": ArchSpec("h", "attn", "out_proj"),
    "codegen": ArchSpec("h", "attn", "out_proj"),
    "gpt_neo": ArchSpec("h", "attn.attention", "out_proj"),
    "opt": ArchSpec("decoder.layers", "self_attn", "out_proj"),
    "biogpt": ArchSpec("layers", "self_attn", "out_proj"),
    "xglm": ArchSpec("layers", "self_attn", "out_proj"),
    "mpt": ArchSpec("blocks", "attn", "out_proj"),
    "falcon": ArchSpec("h", "self_attention", "dense"),
    "bloom": ArchSpec("h", "self_attention", "dense"),
    # Image-text models: the text decoder only (heads come from config.text_config).
    "gemma3": ArchSpec("language_model.layers", "self_attn", "o_proj"),
}


def register_architecture(
    model_type: str,
    *,
    layers: str,
    attention: str,
    o_proj: str,
    num_heads_attr: str | None = None,
    overwrite: bool = False,
) -> ArchSpec:
    """Teach soteria a family: ``register_architecture("my_lm", layers="blocks", attention="attn", o_proj="wo")``.

    Paths are dotted attribute paths (see :class:`ArchSpec`). Returns the stored spec.
    """
    if not all(isinstance(p, str) and p for p in (model_type, layers, attention, o_proj)):
        raise ValueError("register_architecture: model_type, layers, attention and o_proj must be non-empty str")
    if model_type in ARCHITECTURES and not overwrite:
        raise ValueError(
            f"register_architecture: {model_type!r} is already registered as {ARCHITECTURES[model_type]}; "
            "pass overwrite=True to replace it"
        )
    spec = ArchSpec(layers, attention, o_proj, num_heads_attr)
    ARCHITECTURES[model_type] = spec
    return spec


# Output-projection names tried by the generic detector, in order of preference.
_OUT_NAMES = ("o_proj", "out_proj", "dense", "c_proj", "wo", "proj_out", "o", "output_proj", "out")
_HEAD_ATTRS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "num_query_heads")
_LAYER_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def unwrap_model(model: nn.Module) -> nn.Module:
    """``model`` without wrappers: PEFT (``get_base_model()``, a bare tuner's ``.model``) and
    ``torch.compile`` (``._orig_mod``). Head-site names are relative to what this returns."""
    for _ in range(8):  # wrappers nest at most a few deep
        if callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif type(model).__module__.startswith("peft.") and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def head_sites(model: nn.Module) -> list[HeadSite]:
    """One :class:`HeadSite` per decoder layer, in order.

    Accepts a transformers causal LM, its base model, or a PEFT wrapper of either. Moves and
    modifies nothing (works for offloaded / ``device_map`` models). ``ValueError`` if unreadable.
    """
    return _resolve(model)[0]


def num_layers_heads(model: nn.Module) -> tuple[int, int]:
    """``(L, H)``: decoder layers and query heads per layer."""
    sites = head_sites(model)
    return len(sites), sites[0].num_heads


def describe(model: nn.Module) -> str:
    """One-line summary, e.g. ``"llama: 2 layers x 4 heads x head_dim 12, nn.Linear [48, 48] at
    model.layers.{i}.self_attn.o_proj (registry)"``."""
    sites, how = _resolve(model)
    s = sites[0]
    parts = s.name.split(".")
    last = sites[-1].name.split(".")
    i = next((j for j, (a, b) in enumerate(zip(parts, last)) if a != b), None)
    if i is None:  # one layer: the index is the first "0" segment
        i = parts.index("0")
    pattern = ".".join([*parts[:i], "{i}", *parts[i + 1 :]])
    kind = "Conv1D" if s.head_axis == 0 else "nn.Linear"
    lora = ", PEFT-wrapped" if s.module is not s.base_module else ""
    return (
        f"{_model_type(unwrap_model(model))}: {len(sites)} layers x {s.num_heads} heads x head_dim {s.head_dim}, "
        f"{kind} {list(s.weight.shape)} at {pattern} ({how}{lora})"
    )


# --------------------------------------------------------------------------------------------
# Resolution


def _resolve(model: nn.Module) -> tuple[list[HeadSite], str]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"soteria.arch: expected a torch nn.Module, got {type(model).__name__}")
    inner = unwrap_model(model)
    config = _text_config(inner)
    model_type = _model_type(inner)
    spec = ARCHITECTURES.get(model_type)
    notes: list[str] = []
    if spec is not None:
        try:
            return _from_spec(inner, config, spec), "registry"
        except _Miss as e:
            notes.append(f"registered spec {spec} did not match: {e}")
    else:
        notes.append(f"model_type {model_type!r} is not in the registry")
    try:
        return _detect(inner, config), "generic detector"
    except _Miss as e:
        notes.append(f"generic detector: {e}")
    raise ValueError(
        f"soteria cannot find the attention output projections of {type(inner).__name__} "
        f"(model_type={model_type!r}). " + "; ".join(notes) + ". "
        "Register the family, e.g. soteria.arch.register_architecture("
        f"{model_type or 'MODEL_TYPE'!r}, layers='model.layers', attention='self_attn', o_proj='o_proj') "
        "with the dotted paths of the decoder-layer ModuleList, the attention block inside a layer and its "
        "output projection (an nn.Linear or Conv1D whose input is the H*D concatenated head outputs)."
    )


class _Miss(Exception):
    """Internal: a lookup strategy did not match (message says why)."""


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:  # older / remote configs
            return get()
    return config


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", "") or "")


def _config_int(config, names: tuple[str, ...]) -> int | None:
    """First integer among config attributes ``names``; uniform lists collapse, others raise."""
    if config is None:
        return None
    for name in names:
        value = getattr(config, name, None)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            if not value:
                continue
            if len(set(value)) != 1:
                raise ValueError(f"soteria needs the same {name} in every layer; config.{name} = {list(value)}")
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def _num_heads(config, spec: ArchSpec | None) -> int:
    names = ((spec.num_heads_attr,) if spec and spec.num_heads_attr else ()) + _HEAD_ATTRS
    h = _config_int(config, names)
    if h is None or h <= 0:
        raise _Miss(f"no query-head count in the config (looked at {', '.join(names)})")
    return h


def _base_layer(module: nn.Module) -> nn.Module:
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def _layout(module: nn.Module) -> tuple[int, int, int] | None:
    """(in_width, out_width, head_axis) of a projection (PEFT wrapper allowed), or None if not one."""
    base = _base_layer(module)
    weight = getattr(base, "weight", None)
    if weight is None or not hasattr(weight, "shape"):
        return None
    if type(base).__name__ == "Conv1D" and weight.dim() == 2:  # GPT-2 style, weight [in, out]
        return int(weight.shape[0]), int(weight.shape[1]), 0
    if isinstance(base, nn.Linear) or (hasattr(base, "in_features") and hasattr(base, "out_features")):
        return int(base.in_features), int(base.out_features), -1
    return None


def _base_and_prefix(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, qualified-name prefix) to resolve spec paths from: the base model, then the model."""
    out = []
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, nn.Module) and base is not model:
        out.append((base, prefix + "."))
    out.append((model, ""))
    return out


def _get(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _sites_for(layers_name: str, layers, attn_path: str, proj_path: str, h: int) -> list[HeadSite]:
    sites = []
    widths = set()
    for i, layer in enumerate(layers):
        proj_rel = f"{attn_path}.{proj_path}"
        proj = _get(layer, proj_rel)
        if proj is None:
            raise _Miss(f"layer {i} ({type(layer).__name__}) has no submodule {proj_rel!r}")
        lay = _layout(proj)
        if lay is None:
            raise _Miss(f"{layers_name}.{i}.{proj_rel} is a {type(proj).__name__}, not a Linear or Conv1D")
        in_w, _, axis = lay
        if in_w % h:
            raise _Miss(f"{layers_name}.{i}.{proj_rel} input width {in_w} is not divisible by {h} query heads")
        _check_attention(layer.get_submodule(attn_path), f"{layers_name}.{i}.{attn_path}", h, in_w)
        widths.add(in_w)
        sites.append(
            HeadSite(
                layer=i,
                name=f"{layers_name}.{i}.{proj_rel}",
                module=proj,
                num_heads=h,
                head_dim=in_w // h,
                head_axis=axis,
            )
        )
    if not sites:
        raise _Miss(f"{layers_name} is empty")
    if len(widths) != 1:
        raise ValueError(
            f"soteria needs the same H*D in every layer; output-projection input widths differ: {sorted(widths)}"
        )
    return sites


def _int_attr(module: nn.Module, names: tuple[str, ...]) -> tuple[str, int] | None:
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return name, value
    return None


def _check_attention(attn: nn.Module, name: str, h: int, in_w: int) -> None:
    """Cross-check H and D against what the attention module says (catches pruned heads)."""
    heads = _int_attr(attn, ("num_heads", "num_attention_heads", "n_head"))
    if heads is not None and heads[1] != h:
        raise ValueError(
            f"{name}.{heads[0]} = {heads[1]} but the config says {h} query heads (pruned heads?); "
            "soteria needs the same number of heads in every layer"
        )
    dim = _int_attr(attn, ("v_head_dim", "head_dim", "head_size"))  # v_head_dim first: MLA
    if dim is not None and dim[1] * h != in_w:
        raise ValueError(
            f"{name}.{dim[0]} = {dim[1]} but its output projection takes {in_w} = {h} heads x {in_w / h:g}"
        )


def _from_spec(model: nn.Module, config, spec: ArchSpec) -> list[HeadSite]:
    h = _num_heads(config, spec)
    for root, prefix in _base_and_prefix(model):
        layers = _get(root, spec.layers)
        if isinstance(layers, (nn.ModuleList, nn.Sequential)):
            return _sites_for(prefix + spec.layers, layers, spec.attention, spec.o_proj, h)
    raise _Miss(f"no nn.ModuleList at {spec.layers!r} under {type(model).__name__}")


def _detect(model: nn.Module, config) -> list[HeadSite]:
    """Find the decoder ModuleList and each layer's attention output projection by shape and name."""
    if config is None:
        raise _Miss(f"{type(model).__name__} has no .config (not a transformers model?)")
    h = _num_heads(config, None)
    head_dim = _config_int(config, ("v_head_dim", "head_dim"))  # v_head_dim: MLA (DeepSeek)
    hidden = _config_int(config, ("hidden_size", "n_embd", "d_model"))
    n_layers = _config_int(config, _LAYER_ATTRS)
    looked: list[str] = []
    found: list[list[HeadSite]] = []
    uneven: ValueError | None = None
    for list_name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        looked.append(f"{list_name} ({len(mod)} x {type(mod[0]).__name__})")
        paths = _find_proj(mod[0], h, head_dim, hidden)
        if paths is None:
            continue
        attn_path, proj_path = paths
        try:
            found.append(_sites_for(list_name, mod, attn_path, proj_path, h))
        except _Miss:
            continue
        except ValueError as e:  # a readable but non-uniform stack: report it if nothing else fits
            uneven = e
    if n_layers is not None:
        exact = [s for s in found if len(s) == n_layers]
        found = exact or found
    if len(found) == 1:
        return found[0]
    if found:
        names = [s[0].name for s in found]
        raise _Miss(f"several candidate decoder stacks, cannot choose: {names}")
    if uneven is not None:
        raise uneven
    want = f"{h} x {head_dim}" if head_dim else f"a multiple of {h}"
    raise _Miss(
        f"no ModuleList whose layers hold an attention block with an output projection "
        f"(named one of {', '.join(_OUT_NAMES)}) of input width {want} "
        f"(config: num_heads={h}, head_dim={head_dim}, hidden={hidden}); "
        f"ModuleLists seen: {', '.join(looked) or 'none'}"
    )


def _find_proj(layer: nn.Module, h: int, head_dim: int | None, hidden: int | None) -> tuple[str, str] | None:
    """(attention path, projection name) inside one layer, or None."""
    cands: list[tuple[int, str, str]] = []
    for name, mod in layer.named_modules():
        parts = name.split(".")
        if not name or "base_layer" in parts or any(p.startswith("lora_") for p in parts):
            continue
        leaf, parents = parts[-1], parts[:-1]
        if leaf not in _OUT_NAMES or not any("attn" in p or "attention" in p for p in parents):
            continue
        lay = _layout(mod)
        if lay is None:
            continue
        in_w, out_w, _ = lay
        if in_w % h or (head_dim is not None and in_w != h * head_dim):
            continue
        if hidden is not None and out_w != hidden:
            continue
        cands.append((_OUT_NAMES.index(leaf), ".".join(parents), leaf))
    if not cands:
        return None
    cands.sort()
    return cands[0][1], cands[0][2]


def model_type(model: nn.Module) -> str:
    """``config.model_type`` of ``model`` under any PEFT / compile wrapper ("" when it has none)."""
    return _model_type(unwrap_model(model))
