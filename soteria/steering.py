"""Step 3 of Soteria: subtract the harm direction from the selected heads, in place, reversibly.

For every selected head ``(l, h)`` (the union over languages of each language's heads)::

    W_o^l[:, h*D:(h+1)*D] -= scale_h * tau^l[:, h*D:(h+1)*D]      (rows for GPT-2 Conv1D)

and every other parameter stays bit-identical. ``tau`` is ``W_harmful - W`` for a harmful-kind
:class:`~soteria.harm.HarmVector` (fused, :func:`soteria_kernels.masked_head_steer_`) or an
explicit direction (:func:`soteria_kernels.masked_head_update_`). Both kernels compute in fp32
and round once to the weight's dtype.

``apply`` mirrors ``peft.get_peft_model``: it edits and returns the given model, records a
:class:`~soteria.config.SoteriaConfig` at ``model.soteria_config`` and in ``model.config.soteria``
(so ``save_pretrained`` writes it to ``config.json``), and keeps a copy of the original head
slices (``k * D * d_model`` elements, on CPU) so :meth:`SoteriaPatcher.revert` restores the
weights bit-exactly.

Models split over devices by accelerate (``device_map``, ``cpu_offload``, disk offload) are
edited where their real weights live: an offloaded layer's weight is a ``meta`` placeholder,
so the edit goes to the tensor in its offload hook's ``weights_map`` (in place when that map
holds it in memory; when it is read from disk or from the checkpoint's safetensors, an edited
in-memory copy is put in front of it and the files are never written). ``revert`` restores
the slices and drops those copies.

Shared with :mod:`soteria.streaming` (the on-disk edit must check and plan exactly as
:meth:`SoteriaPatcher.apply` does, to give the same bytes): :func:`check_plan`,
:func:`layer_plan` and :func:`operand_dtype`.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import SoteriaConfig
from .defaults import DEFAULT_CONTRAST, DEFAULT_REFUSAL_TOKENS, DEFAULT_RELATIVE_SCALE, DEFAULT_TOP_K
from .harm import HarmVector
from .heads.probes import lang_list

__all__ = [
    "SoteriaPatcher",
    "calibrated_scale",
    "check_plan",
    "layer_plan",
    "operand_dtype",
]

_STATE = "_soteria_state"  # attribute on the unwrapped model: {"slices": {(layer, head): tensor}, ...}


def _kernels():
    import soteria_kernels

    return soteria_kernels


def _inner(model: nn.Module) -> nn.Module:
    from .arch import unwrap_model

    return unwrap_model(model)


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


class SoteriaPatcher:
    """Apply and revert Soteria's masked head steering on a Hugging Face causal LM (PEFT wrappers allowed)."""

    @staticmethod
    def apply(
        model: nn.Module,
        langs: str | list[str],
        *,
        harm: HarmVector | str | os.PathLike | None = None,
        scale: float | dict[str, float] | str = "auto",
        relative_scale: float | dict[str, float] | None = None,
        top_k: int | float = DEFAULT_TOP_K,
        heads: list | dict | None = None,
        tokenizer=None,
        method: str = "atp",
        find_kwargs: dict[str, Any] | None = None,
        harm_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> nn.Module:
        """Steer ``model`` in place for ``langs`` and return it.

        Args:
            langs: one language code or a list of them.
            harm: a :class:`HarmVector`; a path or Hub id of a harmful fine-tune (or of a saved
                vector), read with :meth:`HarmVector.from_pretrained` (``harm_kwargs`` passed on);
                or None: :meth:`HarmVector.from_gradients` on the built-in refusal data of the
                steered languages (all twelve if none of them is built in), by default with the
                built-in harmless contrast set and the first 4 refusal tokens
                (:mod:`soteria.defaults`; ``harm_kwargs`` override). None needs ``tokenizer``.
            scale: ``lambda``, one float or ``{lang: float}``; or ``"auto"`` (default): 1.0 for a
                harmful fine-tune (the paper's form), and for a direction (``harm=None``: the
                gradient direction, whose raw size means nothing) the scale that makes the edit
                ``relative_scale`` of the steered slices' size (below). A head selected for
                several languages is steered once, with the largest of their scales.
            relative_scale: with ``scale="auto"``, per language the scale with
                ``||scale * tau_S|| = relative_scale * ||W_S||`` (Frobenius norms over the slices
                of that language's heads ``S``); one float or ``{lang: float}``; default
                :data:`soteria.defaults.DEFAULT_RELATIVE_SCALE` for a direction, none (scale 1.0) for a fine-tune.
            top_k: heads kept per language when they are found: a count, or a fraction of all
                ``L*H`` heads (default :data:`soteria.defaults.DEFAULT_TOP_K`; the reference kept half, ``0.5``).
            heads: None (find every language's heads with :func:`soteria.heads.find_heads_multi`,
                i.e. :func:`soteria.find_heads` for all of them in shared batches, with ``method``
                and ``find_kwargs``; keep each language's ``top_k``, steer the union); a list of
                ``(layer, head)`` pairs for every language; or ``{lang: pairs}``. Explicit heads
                skip attribution (recorded as method ``"explicit"``).
            tokenizer: needed when heads are found or ``harm`` is None.
            method: ``"atp"`` or ``"exact"`` (see :func:`soteria.find_heads`).
            progress: tqdm bars for attribution and gradients.

        Every argument and the harm vector's fit to the model (model_type, layers, shapes) are
        checked before anything is changed; a ValueError names the problem. If an edit fails
        half-way the touched slices are restored, so the model is unchanged. A model that is
        already steered is refused (``SoteriaPatcher.revert(model)`` first).
        """
        from .arch import head_sites

        inner = _inner(model)
        if SoteriaPatcher.is_steered(model):
            raise ValueError(
                "this model is already steered by soteria (config.soteria is set); "
                "call SoteriaPatcher.revert(model) first, or start from the base model"
            )
        sites = head_sites(model)
        n_layers, n_heads = len(sites), sites[0].num_heads
        langs, per_lang, scales = check_plan(langs, heads, scale, n_layers, n_heads)
        if relative_scale is not None:
            if scales != "auto":
                raise ValueError("give scale= or relative_scale=, not both (relative_scale needs scale='auto')")
            _check_relative(relative_scale, langs)
        find_kwargs = dict(find_kwargs or {})
        harm_kwargs = dict(harm_kwargs or {})
        if heads is None:
            _check_find(langs, method, top_k, n_layers * n_heads, tokenizer, find_kwargs)

        if harm is None:
            if tokenizer is None:
                raise ValueError("harm=None derives the harm direction from gradients and needs tokenizer=")
        elif isinstance(harm, (str, os.PathLike)):
            harm = HarmVector.from_pretrained(harm, base=model, **harm_kwargs)
        elif not isinstance(harm, HarmVector):
            raise ValueError(f"harm must be a HarmVector, a path or Hub id, or None; got {type(harm).__name__}")
        if isinstance(harm, HarmVector):
            harm.check(model)

        if per_lang is None:
            from .heads import find_heads_multi

            # All languages in shared batches: one pass over the model per batch, one progress bar.
            find_kwargs.setdefault("stop_k", top_k)  # n_trials="auto" watches the set that will be steered
            found = find_heads_multi(model, tokenizer, langs, method=method, progress=progress, **find_kwargs)
            per_lang = {lang: [tuple(p) for p in found[lang].top(top_k)] for lang in langs}
            recorded_method, recorded_k = method, top_k
        else:
            recorded_method, recorded_k = "explicit", None

        if harm is None:
            from .harm.data import harmful_languages

            if "data" not in harm_kwargs and "langs" not in harm_kwargs:
                built_in = [x for x in langs if x in harmful_languages()]
                harm_kwargs["langs"] = built_in or None
            if harm_kwargs.get("data") is None:
                harm_kwargs.setdefault("contrast", DEFAULT_CONTRAST)
            harm_kwargs.setdefault("refusal_tokens", DEFAULT_REFUSAL_TOKENS)
            harm = HarmVector.from_gradients(model, tokenizer, progress=progress, **harm_kwargs)
        harm.check(model, layers=sorted({layer for pairs in per_lang.values() for layer, _ in pairs}))
        if scales == "auto" and (relative_scale is not None or harm.kind == "tau"):
            relative = _check_relative(DEFAULT_RELATIVE_SCALE if relative_scale is None else relative_scale, langs)
            scales = {lang: calibrated_scale(model, harm, per_lang[lang], _of(relative, lang)) for lang in langs}
        else:
            relative = None
            scales = 1.0 if scales == "auto" else scales

        config = SoteriaConfig(
            languages=langs,
            heads=per_lang,
            scale=scales,
            relative_scale=relative,
            harm_source=harm.source,
            harm_kind=harm.kind,
            method=recorded_method,
            top_k=recorded_k,
            model_type=str(getattr(getattr(inner, "config", None), "model_type", "") or ""),
        )
        plan = layer_plan(config)

        overlays: list[tuple[dict, str, torch.Tensor | None]] = []
        try:
            weights = {layer: _editable_weight(inner, sites[layer], overlays) for layer in sorted(plan)}
            slices = _edit(sites, weights, plan, harm)
        except BaseException:
            _drop_overlays(overlays)
            raise
        inner.__dict__[_STATE] = {
            "slices": slices,
            "dtypes": {layer: sites[layer].weight.dtype for layer in plan},
            "overlays": overlays,
        }
        inner.soteria_config = config
        if getattr(inner, "config", None) is not None:
            inner.config.soteria = config.to_dict()
        return model

    @staticmethod
    def revert(model: nn.Module) -> nn.Module:
        """Restore the original weights of a model steered by :meth:`apply` (bit-exact) and drop the record."""
        from .arch import head_sites

        inner = _inner(model)
        state = inner.__dict__.get(_STATE)
        if state is None:
            if SoteriaPatcher.is_steered(model):
                raise ValueError(
                    "this model was loaded already steered (config.soteria is set) and its original weights "
                    "are not known; load the base model instead"
                )
            raise ValueError("this model is not steered by soteria; nothing to revert")
        sites = head_sites(model)
        for layer, dtype in state["dtypes"].items():
            if sites[layer].weight.dtype != dtype:
                raise ValueError(
                    f"layer {layer}'s output projection is {sites[layer].weight.dtype} now but was {dtype} when "
                    "steered; convert the model back to that dtype before reverting"
                )
        overlays = state.get("overlays", [])
        layers = sorted({layer for layer, _ in state["slices"]})
        weights = {layer: _editable_weight(inner, sites[layer], []) for layer in layers}
        _restore(sites, weights, state["slices"])
        _drop_overlays(overlays)
        del inner.__dict__[_STATE]
        inner.__dict__.pop("soteria_config", None)
        config = getattr(inner, "config", None)
        if config is not None and hasattr(config, "soteria"):
            delattr(config, "soteria")
        return model

    @staticmethod
    @contextlib.contextmanager
    def unsteered(model: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``model`` has its original head slices (bit-exact), afterwards its
        steered ones again (bit-exact): compare base and steered outputs with one copy in memory.
        Needs a model steered by :meth:`apply` in this process (the original slices are kept)."""
        from .arch import head_sites

        inner = _inner(model)
        state = inner.__dict__.get(_STATE)
        if state is None:
            raise ValueError("unsteered() needs a model steered by SoteriaPatcher.apply in this process")
        sites = head_sites(model)
        layers = sorted({layer for layer, _ in state["slices"]})
        weights = {layer: _editable_weight(inner, sites[layer], []) for layer in layers}
        steered = {key: _slice(weights[key[0]].detach(), sites[key[0]], key[1]).to("cpu", copy=True)
                   for key in state["slices"]}  # fmt: skip
        _restore(sites, weights, state["slices"])
        try:
            yield model
        finally:
            _restore(sites, weights, steered)

    @staticmethod
    def has_originals(model: nn.Module) -> bool:
        """True if ``model`` was steered by :meth:`apply` in this process (its original slices are kept)."""
        return _STATE in _inner(model).__dict__

    @staticmethod
    def is_steered(model: nn.Module) -> bool:
        """True if ``model`` carries a soteria edit (applied here, or loaded with ``config.soteria``)."""
        inner = _inner(model)
        return _STATE in inner.__dict__ or getattr(getattr(inner, "config", None), "soteria", None) is not None

    @staticmethod
    def config(model: nn.Module) -> SoteriaConfig | None:
        """The :class:`SoteriaConfig` of a steered model (also one loaded from disk), else None."""
        inner = _inner(model)
        cfg = inner.__dict__.get("soteria_config")
        if cfg is not None:
            return cfg
        d = getattr(getattr(inner, "config", None), "soteria", None)
        return SoteriaConfig.from_dict(d) if d is not None else None


# --------------------------------------------------------------------------- the edit


def _slice(weight: torch.Tensor, site, head: int) -> torch.Tensor:
    return weight.narrow(site.head_axis % 2, head * site.head_dim, site.head_dim)


def operand_dtype(harm: HarmVector, weight: torch.Tensor) -> torch.dtype:
    """The dtype ``harm``'s tensor is cast to before the kernel edits ``weight`` (shared with
    :mod:`soteria.streaming`): the harmful weights in the weight's dtype; a tau direction in fp32
    for half-precision weights (the update kernel takes it as is and rounds the weight once)."""
    if harm.kind == "tau" and weight.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return weight.dtype


def _edit(sites, weights: dict, plan: dict[int, tuple[list[int], list[float]]], harm: HarmVector) -> dict:
    """Run the kernels layer by layer on ``weights[layer]`` (the real weight tensors), saving each
    slice first; on any failure put every slice back."""
    k = _kernels()
    saved: dict[tuple[int, int], torch.Tensor] = {}
    try:
        with torch.no_grad():
            for layer, (hs, ss) in sorted(plan.items()):
                site = sites[layer]
                w = weights[layer]
                operand = harm.tensor(layer).to(device=w.device, dtype=operand_dtype(harm, w))
                for h in hs:
                    saved[(layer, h)] = _slice(w.detach(), site, h).to("cpu", copy=True)
                fn = k.masked_head_steer_ if harm.kind == "harmful" else k.masked_head_update_
                fn(w, operand, hs, head_dim=site.head_dim, scale=ss, head_axis=site.head_axis)
    except BaseException:
        _restore(sites, weights, saved)
        raise
    return saved


def _restore(sites, weights: dict, saved: dict[tuple[int, int], torch.Tensor]) -> None:
    with torch.no_grad():
        for (layer, h), orig in saved.items():
            _slice(weights[layer].detach(), sites[layer], h).copy_(orig)


# --------------------------------------------------------------------------- offloaded layers


def _align_hooks(module: nn.Module) -> list:
    """accelerate hooks on ``module`` that offload its weights (a SequentialHook unpacked)."""
    hook = getattr(module, "_hf_hook", None)
    hooks = [hook, *getattr(hook, "hooks", ())] if hook is not None else []
    return [h for h in hooks if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None]


def _editable_weight(inner: nn.Module, site, overlays: list) -> torch.Tensor:
    """The tensor holding ``site``'s real weight values, to edit in place.

    A loaded weight is itself. An offloaded one (``meta`` placeholder) is looked up in the
    ``weights_map`` of the accelerate hook on its module or on the nearest ancestor that carries
    one. When the map reads the weight from disk or a checkpoint (a fresh tensor every time),
    or holds it in another dtype, an in-memory copy in the placeholder's dtype is put into the
    loader's state dict, which accelerate reads first, and ``(state_dict, key, previous)`` is
    appended to ``overlays`` so it can be dropped again.
    """
    base = site.base_module
    w = base.weight
    if w.device.type != "meta":
        return w
    names = {id(m): n for n, m in inner.named_modules()}
    qual = names.get(id(base))
    if qual is None:
        raise ValueError(f"{site.name}: its projection module is not part of the model")
    parts = qual.split(".") if qual else []
    for cut in range(len(parts), -1, -1):
        owner = inner.get_submodule(".".join(parts[:cut]))
        for hook in _align_hooks(owner):
            key = ".".join([*parts[cut:], "weight"])
            return _offloaded_tensor(hook.weights_map, key, w, site, overlays)
    raise ValueError(
        f"{site.param_name} is on the meta device and no accelerate offload hook holds its values; "
        "load the weights (or dispatch the model with accelerate) before steering it"
    )


def _offloaded_tensor(mapping, key: str, placeholder: torch.Tensor, site, overlays: list) -> torch.Tensor:
    while hasattr(mapping, "dataset") and hasattr(mapping, "prefix"):  # accelerate PrefixedDataset
        key, mapping = mapping.prefix + key, mapping.dataset
    store = getattr(mapping, "state_dict", None)  # accelerate OffloadedWeightsLoader: RAM first, then disk
    if not isinstance(store, dict):
        store = mapping if isinstance(mapping, dict) else None
    if store is None:
        raise ValueError(
            f"{site.param_name} is offloaded to a {type(mapping).__name__} soteria cannot edit; "
            "load the model without offloading that layer"
        )
    held = store.get(key)
    if isinstance(held, torch.Tensor) and held.dtype == placeholder.dtype:
        real = held
    else:
        try:
            value = mapping[key]
        except KeyError:
            raise ValueError(f"{site.param_name}: its offload hook has no weight {key!r}") from None
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        real = value.to(dtype=placeholder.dtype, copy=True).contiguous()
        overlays.append((store, key, held))
        store[key] = real
    if tuple(real.shape) != tuple(placeholder.shape):
        raise ValueError(
            f"{site.param_name}: the offloaded weight has shape {list(real.shape)}, the model expects "
            f"{list(placeholder.shape)}"
        )
    return real


def _drop_overlays(overlays: list) -> None:
    """Undo :func:`_editable_weight`'s in-memory copies, newest first (the files were never written)."""
    for store, key, previous in reversed(overlays):
        if previous is None:
            store.pop(key, None)
        else:
            store[key] = previous


# --------------------------------------------------------------------------- argument checks


def check_plan(
    langs: Any, heads: Any, scale: Any, n_layers: int, n_heads: int
) -> tuple[list[str], dict[str, list[tuple[int, int]]] | None, float | dict[str, float]]:
    """Check the steering request for a model of ``n_layers`` x ``n_heads`` heads (shared with
    :mod:`soteria.streaming`); ValueError names the first problem, checked in the order langs,
    heads, scale.

    Args:
        langs: a language code or a list of them (non-empty, no repeats).
        heads: None (to be found), a list of ``(layer, head)`` pairs for every language, or
            ``{lang: pairs}`` with exactly the languages of ``langs``.
        scale: one finite float or ``{lang: float}`` with exactly the languages of ``langs``.

    Returns ``(langs as a list, {lang: pairs deduplicated in order} or None, scale as float or
    {lang: float} in the order of langs)``.
    """
    langs = lang_list(langs)
    per_lang = None if heads is None else _check_heads(heads, langs, n_layers, n_heads)
    return langs, per_lang, _check_scale(scale, langs)


def layer_plan(config: SoteriaConfig) -> dict[int, tuple[list[int], list[float]]]:
    """``{layer: (heads, scales)}`` of ``config.head_scales()`` (each head once, with its largest
    scale), in the order the kernels take them (shared with :mod:`soteria.streaming`)."""
    plan: dict[int, tuple[list[int], list[float]]] = {}
    for (layer, head), s in config.head_scales().items():
        plan.setdefault(layer, ([], []))
        plan[layer][0].append(head)
        plan[layer][1].append(s)
    return plan


def _check_scale(scale: Any, langs: list[str]) -> float | dict[str, float] | str:
    import math

    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale must be a finite float, {{lang: float}} or 'auto', got {scale!r}")
        return scale

    def one(v, what):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise ValueError(f"{what} must be a finite float, got {v!r}")
        return float(v)

    if isinstance(scale, dict):
        missing = [x for x in langs if x not in scale]
        extra = [x for x in scale if x not in langs]
        if missing or extra:
            raise ValueError(f"scale must give one value per language: missing {missing}, unexpected {extra}")
        return {lang: one(scale[lang], f"scale[{lang!r}]") for lang in langs}
    return one(scale, "scale")


def _check_relative(relative: Any, langs: list[str]) -> float | dict[str, float]:
    """A positive relative scale, one or per language; ValueError otherwise."""
    checked = _check_scale(relative, langs)
    values = checked.values() if isinstance(checked, dict) else [checked]
    if isinstance(checked, str) or not all(v > 0 for v in values):
        raise ValueError(f"relative_scale must be a positive float or {{lang: positive float}}, got {relative!r}")
    return checked


def _of(value: float | dict[str, float], lang: str) -> float:
    return value[lang] if isinstance(value, dict) else value


def calibrated_scale(model: nn.Module, harm: HarmVector, heads: list[tuple[int, int]], relative: float) -> float:
    """The scale with ``||scale * tau_S||_F = relative * ||W_S||_F`` over the slices of ``heads``
    (``tau = W_harmful - W`` for a fine-tune); offloaded layers are read where their values live.
    ValueError when the direction is zero there."""
    from .arch import head_sites

    inner, sites = _inner(model), head_sites(model)
    w2 = t2 = 0.0
    with torch.no_grad():
        for layer in sorted({layer for layer, _ in heads}):
            site, reads = sites[layer], []
            try:
                weight = _editable_weight(inner, site, reads).detach()
                tau = harm.tau(layer, weight).to(device=weight.device, dtype=torch.float32)
                for h in (h for lyr, h in heads if lyr == layer):
                    w2 += float(_slice(weight, site, h).to(torch.float32).pow(2).sum())
                    t2 += float(_slice(tau, site, h).pow(2).sum())
            finally:
                _drop_overlays(reads)  # a copy read from disk is not kept
    if t2 == 0.0:
        raise ValueError("the harm direction is zero on the selected heads; scale='auto' cannot calibrate it")
    return relative * (w2 / t2) ** 0.5


def _check_find(langs, method, top_k, total: int, tokenizer, find_kwargs) -> None:
    from .heads.attribution import METHODS

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if tokenizer is None:
        raise ValueError("finding heads (heads=None) needs tokenizer=; or pass heads= explicitly")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Real):
        raise ValueError(f"top_k must be an int in [1, {total}] or a fraction in (0, 1], got {top_k!r}")
    if _is_int(top_k):
        if not 1 <= top_k <= total:
            raise ValueError(f"top_k = {top_k} is out of range: the model has {total} heads")
    elif not 0.0 < float(top_k) <= 1.0:
        raise ValueError(f"a fractional top_k must be in (0, 1], got {top_k}")
    if "tasks" not in find_kwargs:
        from .heads.probes import languages

        known = languages()
        own = find_kwargs.get("tasks_by_lang") or {}  # find_heads_multi: per-language data
        unknown = [x for x in langs if x not in known and x not in own]
        if unknown:
            raise ValueError(
                f"no built-in probe tasks for {unknown}; built-in languages: {', '.join(known)}. "
                "Pass heads= explicitly or find_kwargs={'tasks': ...} (or {'tasks_by_lang': {lang: ...}}) "
                "with your own probe data"
            )


def _check_pairs(pairs: Any, what: str, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
        raise ValueError(f"{what} must be a list of (layer, head) pairs, got {pairs!r}")
    out: list[tuple[int, int]] = []
    for p in pairs:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) for v in p)):
            raise ValueError(f"{what} must hold (layer, head) pairs of ints, got {p!r}")
        layer, head = int(p[0]), int(p[1])
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise ValueError(
                f"{what}: head ({layer}, {head}) is out of range: the model has {n_layers} layers x {n_heads} heads"
            )
        if (layer, head) not in out:
            out.append((layer, head))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def _check_heads(heads: Any, langs: list[str], n_layers: int, n_heads: int) -> dict[str, list[tuple[int, int]]]:
    if isinstance(heads, dict):
        missing = [x for x in langs if x not in heads]
        extra = [x for x in heads if x not in langs]
        if missing or extra:
            raise ValueError(f"heads must give one list per language: missing {missing}, unexpected {extra}")
        return {lang: _check_pairs(heads[lang], f"heads[{lang!r}]", n_layers, n_heads) for lang in langs}
    pairs = _check_pairs(heads, "heads", n_layers, n_heads)
    return {lang: list(pairs) for lang in langs}
