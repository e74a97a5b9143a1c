"""Step 3 of Soteria: subtract the harm direction from the selected heads, in place, reversibly.

For every selected head ``(l, h)`` (the union over languages of each language's heads)::

    W_o^l[:, h*D:(h+1)*D] -= scale_h * tau^l[:, h*D:(h+1)*D]      (rows for GPT-2 Conv1D)

and every other parameter stays bit-identical. ``tau`` is ``W_harmful - W`` for a harmful-kind
:class:`~soteria.harm.HarmVector` (fused, :func:`soteria_kernels.masked_head_steer_`) or an
explicit direction (:func:`soteria_kernels.masked_head_update_`). Both kernels compute in fp32
and round once to the weight's dtype.

``apply`` mirrors ``peft.get_peft_model``: it edits and returns the given model, records a
:class:`~soteria.steer.config.SoteriaConfig` at ``model.soteria_config`` and in ``model.config.soteria``
(so ``save_pretrained`` writes it to ``config.json``), and keeps a copy of the original head
slices (``k * D * d_model`` elements, on CPU) so :meth:`SoteriaPatcher.revert` restores the
weights bit-exactly.

Models split over devices by accelerate (``device_map``, ``cpu_offload``, disk offload) are
edited where their real weights live: an offloaded layer's weight is a ``meta`` placeholder,
so the edit goes to the tensor in its offload hook's ``weights_map`` (in place when that map
holds it in memory; when it is read from disk or from the checkpoint's safetensors, an edited
in-memory copy is put in front of it and the files are never written). ``revert`` restores
the slices and drops those copies.

The request is checked and planned in :mod:`soteria.steer.plan` (shared with the on-disk edit,
:func:`soteria.steer_checkpoint`); offloaded weights are reached through :mod:`soteria.steer.offload`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, unwrap_model
from ..defaults import DEFAULT_RELATIVE_SCALE, DEFAULT_TOP_K
from ..harm import HarmVector
from ..heads import find_heads_multi
from ..io.fingerprint import fingerprint_mismatch
from ..langs import lang_list
from .config import SoteriaConfig
from .edit import copy_slices, restore_slices, steer_slices
from .offload import drop_overlays, editable_weight
from .plan import (
    calibrated_scale,
    check_config_call,
    check_find,
    check_plan,
    check_relative,
    derive_harm,
    layer_plan,
    natural_scale,
    resolve_harm,
    scale_of,
    warn_shared,
)

__all__ = ["SoteriaPatcher"]

_STATE = "_soteria_state"  # attribute on the unwrapped model: {"slices": {(layer, head): tensor}, ...}


class SoteriaPatcher:
    """Apply and revert Soteria's masked head steering on a Hugging Face causal LM (PEFT wrappers allowed)."""

    @staticmethod
    def apply(
        model: nn.Module,
        langs: SoteriaConfig | str | list[str] | None = None,
        *,
        config: SoteriaConfig | None = None,
        harm: HarmVector | str | os.PathLike | None = None,
        scale: float | dict[str, float] | str = "auto",
        relative_scale: float | dict[str, float] | None = None,
        top_k: int | float | None = None,
        heads: list | dict | None = None,
        tokenizer=None,
        method: str | None = None,
        find_kwargs: dict[str, Any] | None = None,
        harm_kwargs: dict[str, Any] | None = None,
        progress: bool = True,
    ) -> nn.Module:
        """Steer ``model`` in place as a :class:`SoteriaConfig` asks, and return it.

        ``apply(model, config)`` mirrors ``peft.get_peft_model(model, config)``; the keyword form
        ``apply(model, langs, heads=..., scale=..., ...)`` builds that config from its arguments
        (``find_kwargs`` and ``harm_kwargs`` become ``find_options`` and ``harm_options``).

        Args:
            langs: a :class:`SoteriaConfig`, or one language code or a list of them.
            config: the request as a keyword (the same as passing it as ``langs``). A recorded
                config (a steered model's ``soteria_config.json``, the ``chosen.json`` of
                :func:`soteria.tune` read with :func:`soteria.tune.load_tune_config`) repeats that
                steering: the same heads and scales, and its ``harm_source`` read again (or give
                ``harm``: the same vector gives bit-identical weights). With a config, the
                arguments it holds (heads, scale, relative_scale, top_k, method, find_kwargs,
                harm_kwargs) must not be given too.
            harm: a :class:`HarmVector`, or a path or Hub id of a harmful fine-tune (or of a saved
                vector), read with :meth:`HarmVector.from_pretrained` (``harm_options`` passed on);
                or a direction derived from the model once the heads are known, on the built-in
                refusal data of the steered languages (a language without it needs ``harm`` or
                ``harm_kwargs={"data": ...}``; ``harm_kwargs`` are that method's options; both need
                ``tokenizer``): ``"finetune"`` (:meth:`HarmVector.from_finetune`: a short refusal
                fine-tune of the found heads' slices with a retain term, steered at 1.0) or
                ``"gradients"`` (:meth:`HarmVector.from_gradients`, by default with the built-in
                harmless contrast set and the first 4 refusal tokens). None: the config's
                ``harm_source``, and when that is empty :data:`soteria.defaults.DEFAULT_HARM`
                (``"finetune"``).
            scale: ``lambda`` >= 0, one float or ``{lang: float}``; or ``"auto"`` (default): 1.0 for
                a harmful fine-tune (the paper's form) and for ``"finetune"`` (the fine-tune
                itself), and for a direction whose raw size means nothing (the gradient
                direction, a saved vector) the scale that makes the edit
                ``relative_scale`` of the steered slices' size. A head selected for several
                languages is steered once, with the largest of their scales (a warning says so
                when per-language scales you gave differ on it).
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
            tokenizer: needed when heads are found or the harm direction comes from gradients.
            method: ``"atp"`` (default) or ``"exact"`` (see :func:`soteria.find_heads`).
            progress: tqdm bars for attribution and gradients.

        Every argument and the harm vector's fit to the model (model_type, layers, shapes) are
        checked before anything is changed; a ValueError names the problem. If an edit fails
        half-way the touched slices are restored, so the model is unchanged. A model that is
        already steered is refused (``SoteriaPatcher.revert(model)`` first).
        """
        if isinstance(langs, SoteriaConfig):
            if config is not None:
                raise ValueError("give the config once (as the second argument or as config=)")
            config, langs = langs, None
        if config is None:
            if langs is None:
                raise ValueError("give the languages to steer (langs=) or a SoteriaConfig")
            config = SoteriaConfig(
                languages=lang_list(langs),
                heads=heads,
                scale=scale,
                relative_scale=relative_scale,
                harm_source=os.fspath(harm) if isinstance(harm, (str, os.PathLike)) else "",
                method=method,
                top_k=top_k,
                find_options=find_kwargs,
                harm_options=harm_kwargs,
            )
        else:
            check_config_call(config, langs, heads, scale, relative_scale, top_k, method, find_kwargs, harm_kwargs)
        return _steer(model, config, harm, tokenizer, progress)

    @staticmethod
    def write_slices(
        model: nn.Module,
        config: SoteriaConfig,
        slices: dict[tuple[int, int], torch.Tensor],
        fingerprints: dict[int, dict[str, Any]] | None = None,
    ) -> nn.Module:
        """Steer ``model`` by writing the given head slices verbatim (:meth:`soteria.SoteriaPatch.apply`).

        ``slices[(layer, head)]`` is the new value of :meth:`HeadSite.head_slice` of that layer's
        output projection (``[d_model, D]``, or ``[D, d_model]`` for Conv1D), in the weight's
        dtype, for every head of ``config.head_union``. ``fingerprints[layer]`` (from
        :func:`soteria.io.fingerprint.fingerprint`) must match the base weight, else the model
        is refused. Everything is checked before any weight is written; the result is recorded
        like :meth:`apply`'s (``revert`` restores the original slices bit-exactly).
        """
        if not isinstance(config, SoteriaConfig) or not config.is_resolved:
            raise ValueError("write_slices needs the record of a steering (a SoteriaConfig made by apply)")
        if SoteriaPatcher.is_steered(model):
            raise ValueError(
                "this model is already steered by soteria (config.soteria is set); "
                "start from the base model (in Python, SoteriaPatcher.revert(model) restores it)"
            )
        inner = unwrap_model(model)
        sites = head_sites(model)
        model_type = str(getattr(getattr(inner, "config", None), "model_type", "") or "")
        if config.model_type and model_type and config.model_type != model_type:
            raise ValueError(f"the steering was made for a {config.model_type} model; this one is {model_type}")
        check_plan(list(config.languages), config.heads, config.scale, len(sites), sites[0].num_heads)
        union = set(config.head_union)
        if set(slices) != union:
            extra, missing = sorted(set(slices) - union), sorted(union - set(slices))
            raise ValueError(f"the slices do not cover the config's heads (extra {extra}, missing {missing})")
        overlays: list[tuple[dict, str, torch.Tensor | None]] = []
        try:
            weights = {layer: editable_weight(inner, sites[layer], overlays) for layer in sorted({k[0] for k in union})}
            for layer, w in weights.items():
                if fingerprints is not None:
                    if layer not in fingerprints:
                        raise ValueError(f"no fingerprint of layer {layer}'s base weight was given")
                    why = fingerprint_mismatch(fingerprints[layer], w)
                    if why is not None:
                        raise ValueError(
                            f"layer {layer}'s {sites[layer].param_name} is not the base tensor this steering "
                            f"was made for ({why}): another base model, revision or dtype?"
                        )
            for (layer, h), new in sorted(slices.items()):
                old = sites[layer].head_slice(weights[layer].detach(), h)
                if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
                    raise ValueError(
                        f"head ({layer}, {h}): slice is {new.dtype} {list(new.shape)}, "
                        f"the model's is {old.dtype} {list(old.shape)}"
                    )
            saved = copy_slices(sites, weights, slices)
        except BaseException:
            drop_overlays(overlays)
            raise
        _record(inner, sites, config, saved, overlays)
        return model

    @staticmethod
    def revert(model: nn.Module) -> nn.Module:
        """Restore the original weights of a model steered by :meth:`apply` (bit-exact) and drop the record."""
        inner = unwrap_model(model)
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
        weights = {layer: editable_weight(inner, sites[layer], []) for layer in layers}
        restore_slices(sites, weights, state["slices"])
        drop_overlays(overlays)
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
        inner = unwrap_model(model)
        state = inner.__dict__.get(_STATE)
        if state is None:
            raise ValueError("unsteered() needs a model steered by SoteriaPatcher.apply in this process")
        sites = head_sites(model)
        layers = sorted({layer for layer, _ in state["slices"]})
        weights = {layer: editable_weight(inner, sites[layer], []) for layer in layers}
        steered = {key: sites[key[0]].head_slice(weights[key[0]].detach(), key[1]).to("cpu", copy=True)
                   for key in state["slices"]}  # fmt: skip
        restore_slices(sites, weights, state["slices"])
        try:
            yield model
        finally:
            restore_slices(sites, weights, steered)

    @staticmethod
    def has_originals(model: nn.Module) -> bool:
        """True if ``model`` was steered by :meth:`apply` in this process (its original slices are kept)."""
        return _STATE in unwrap_model(model).__dict__

    @staticmethod
    def is_steered(model: nn.Module) -> bool:
        """True if ``model`` carries a soteria edit (applied here, or loaded with ``config.soteria``)."""
        inner = unwrap_model(model)
        return _STATE in inner.__dict__ or getattr(getattr(inner, "config", None), "soteria", None) is not None

    @staticmethod
    def config(model: nn.Module) -> SoteriaConfig | None:
        """The :class:`SoteriaConfig` of a steered model (also one loaded from disk), else None."""
        inner = unwrap_model(model)
        cfg = inner.__dict__.get("soteria_config")
        if cfg is not None:
            return cfg
        d = getattr(getattr(inner, "config", None), "soteria", None)
        return SoteriaConfig.from_dict(d) if d is not None else None


# --------------------------------------------------------------------------- the record


def _record(inner: nn.Module, sites, config: SoteriaConfig, saved: dict, overlays: list) -> None:
    """Keep the original slices for revert and set ``soteria_config`` / ``config.soteria``."""
    inner.__dict__[_STATE] = {
        "slices": saved,
        "dtypes": {layer: sites[layer].weight.dtype for layer, _ in saved},
        "overlays": overlays,
    }
    inner.soteria_config = config
    if getattr(inner, "config", None) is not None:
        inner.config.soteria = config.to_dict()


def _steer(model: nn.Module, request: SoteriaConfig, harm, tokenizer, progress: bool) -> nn.Module:
    """Resolve ``request`` (find heads, read or derive the harm vector, calibrate the scale), edit, record."""
    inner = unwrap_model(model)
    if SoteriaPatcher.is_steered(model):
        raise ValueError(
            "this model is already steered by soteria (config.soteria is set); "
            "start from the base model (in Python, SoteriaPatcher.revert(model) restores it)"
        )
    sites = head_sites(model)
    n_layers, n_heads = len(sites), sites[0].num_heads
    langs, per_lang, scales = check_plan(request.languages, request.heads, request.scale, n_layers, n_heads)
    relative_scale = request.relative_scale
    if relative_scale is not None and scales != "auto" and not request.is_resolved:  # a record keeps both
        raise ValueError("give scale= or relative_scale=, not both (relative_scale needs scale='auto')")
    find_kwargs, harm_kwargs = dict(request.find_options), dict(request.harm_options)
    top_k = DEFAULT_TOP_K if request.top_k is None else request.top_k
    method = request.method or "atp"
    if per_lang is None:
        check_find(langs, method, top_k, n_layers * n_heads, tokenizer, find_kwargs)

    harm = resolve_harm(model, request, harm, tokenizer, harm_kwargs)
    if isinstance(harm, HarmVector):
        harm.check(model)

    if per_lang is None:
        # All languages in shared batches: one pass over the model per batch, one progress bar.
        if find_kwargs.get("source", "probes") == "probes":  # n_trials="auto" watches the set to be steered
            find_kwargs.setdefault("stop_k", top_k)
        found = find_heads_multi(model, tokenizer, langs, method=method, progress=progress, **find_kwargs)
        per_lang = {lang: [tuple(p) for p in found[lang].top(top_k)] for lang in langs}
        recorded_method, recorded_k, find_options = method, top_k, dict(request.find_options)
    elif request.method in ("atp", "exact"):  # a record of found heads, repeated
        recorded_method, recorded_k, find_options = request.method, request.top_k, dict(request.find_options)
    else:
        recorded_method, recorded_k, find_options = "explicit", None, {}

    if isinstance(harm, str):  # derived from the model, now that the heads are known
        harm = derive_harm(model, tokenizer, harm, langs, per_lang, harm_kwargs, progress)
    harm.check(model, layers=sorted({layer for pairs in per_lang.values() for layer, _ in pairs}))
    if scales == "auto" and (relative_scale is not None or not natural_scale(harm)):
        relative = check_relative(DEFAULT_RELATIVE_SCALE if relative_scale is None else relative_scale, langs)
        scales = {lang: calibrated_scale(model, harm, per_lang[lang], scale_of(relative, lang)) for lang in langs}
    else:
        relative = relative_scale if request.is_resolved else None
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
        find_options=find_options,
        harm_options=request.harm_options,
        model_type=str(getattr(getattr(inner, "config", None), "model_type", "") or ""),
    )
    if isinstance(request.scale, dict) and not request.is_resolved:  # scales given now, not calibrated or replayed
        warn_shared(config)
    plan = layer_plan(config)
    overlays: list[tuple[dict, str, torch.Tensor | None]] = []
    try:
        weights = {layer: editable_weight(inner, sites[layer], overlays) for layer in sorted(plan)}
        slices = steer_slices(sites, weights, plan, harm)
    except BaseException:
        drop_overlays(overlays)
        raise
    _record(inner, sites, config, slices, overlays)
    return model
