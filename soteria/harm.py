"""Step 2 of Soteria: the harm direction, for the attention output projections only.

A :class:`HarmVector` holds, for each decoder layer ``l``, one tensor in the layout of that
layer's output-projection weight (nn.Linear ``[d_model, H*D]``; GPT-2 Conv1D ``[H*D, d_model]``).
It comes in one of two kinds, and :meth:`soteria.SoteriaPatcher.apply` uses each with the
kernel that fits it:

- ``kind="harmful"``: the harmful fine-tune's own weights ``W_harmful``. The direction is
  ``tau = W_harmful - W_base`` (the paper's form) and is never materialised: apply calls
  :func:`soteria_kernels.masked_head_steer_` (``W -= scale * (W_harmful - W)``), which is
  exact for bf16/fp16 models. Made by :meth:`from_pretrained` (tensors read lazily from the
  checkpoint's safetensors, only the output projections, only when needed) and
  :meth:`from_models` (a copy of the harmful model's output projections).
- ``kind="tau"``: an explicit direction ``tau`` (float32). apply calls
  :func:`soteria_kernels.masked_head_update_` (``W -= scale * tau``) after casting ``tau`` to
  the weight's dtype (one rounding of ``tau`` for bf16/fp16 models). Made by
  :meth:`from_gradients`.

:meth:`save` / :meth:`load` keep the kind (safetensors, keyed by checkpoint parameter name,
metadata ``format = "soteria.harm"``). A harmful-kind file is itself a valid subset checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .io.checkpoint import INDEX_NAME, SINGLE_NAME, checkpoint_shards, find_key, key_candidates, read_weight_map
from .io.hub import looks_like_repo_id
from .io.safetensors import FLOAT_DTYPES, SafetensorsFile, check_finite, read_safetensors, read_tensor, save_tensors
from .models.state import frozen_eval, input_device
from .progress import progress_bar
from .version import __version__

__all__ = ["FORMAT", "KINDS", "HarmVector", "refusal_loss"]

FORMAT = "soteria.harm"
_FORMAT_VERSION = "1"
KINDS = ("harmful", "tau")
# Config fields compared between a harmful checkpoint and the base (whichever both have).
_ARCH_FIELDS = (
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "hidden_size",
    "n_embd",
    "d_model",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "head_dim",
)

try:  # module-level so tests can wrap it
    from huggingface_hub import hf_hub_download
except ImportError:  # pragma: no cover
    hf_hub_download = None


# --------------------------------------------------------------------------- lazy checkpoint tensors


class _LazyTensors:
    """Named tensors in safetensors files, read one at a time on demand.

    ``locations``: ``{layer: (file, key)}``. Shapes and dtypes come from the file headers.
    Every read is recorded in ``tensors_read`` (keys) and ``bytes_read``.
    """

    def __init__(self, locations: Mapping[int, tuple[str, str]], files: Mapping[str, SafetensorsFile] | None = None):
        self.locations = dict(locations)
        self.files = dict(files or {})
        self.shapes: dict[int, tuple[int, ...]] = {}
        self.dtypes: dict[int, torch.dtype] = {}
        for layer, (file, key) in self.locations.items():
            if file not in self.files:
                self.files[file] = read_safetensors(file)
            info = self.files[file].header.get(key)
            if info is None:
                raise ValueError(f"{file} has no tensor {key!r}")
            dtype = FLOAT_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} in {file} has dtype {info['dtype']}, not a float type")
            self.shapes[layer] = tuple(int(s) for s in info["shape"])
            self.dtypes[layer] = dtype
        self.tensors_read: list[str] = []
        self.bytes_read = 0

    def __contains__(self, layer: int) -> bool:
        return layer in self.locations

    def get(self, layer: int) -> torch.Tensor:
        file, key = self.locations[layer]
        t = read_tensor(self.files[file], key)
        self.tensors_read.append(key)
        self.bytes_read += t.numel() * t.element_size()
        return t


# --------------------------------------------------------------------------- model helpers


def _sites(model: nn.Module):
    from .arch import head_sites

    return head_sites(model)


def _inner(model: nn.Module) -> nn.Module:
    from .arch import unwrap_model

    return unwrap_model(model)


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(_inner(model), "config", None), "model_type", "") or "")


def _config_dict(model: nn.Module) -> dict[str, Any]:
    config = getattr(_inner(model), "config", None)
    if config is None:
        return {}
    get = getattr(config, "get_text_config", None)
    text = config
    if callable(get):
        try:
            text = get(decoder=True)
        except TypeError:
            text = get()
    d = dict(config.to_dict()) if hasattr(config, "to_dict") else {}
    if text is not config and hasattr(text, "to_dict"):
        d.update(text.to_dict())
    return d


def _compare_configs(ckpt: dict[str, Any], base: dict[str, Any]) -> list[str]:
    problems = []
    ct, bt = ckpt.get("model_type"), base.get("model_type")
    if ct and bt and ct != bt:
        problems.append(f"model_type: checkpoint {ct!r}, base {bt!r}")
    text = ckpt.get("text_config") if isinstance(ckpt.get("text_config"), dict) else {}
    merged = {**ckpt, **text}
    for k in _ARCH_FIELDS:
        if k in merged and k in base and merged[k] is not None and base[k] is not None and merged[k] != base[k]:
            problems.append(f"config.{k}: checkpoint {merged[k]!r}, base {base[k]!r}")
    return problems


def _mismatch(what: str, problems: list[str]) -> ValueError:
    return ValueError(f"{what} does not match the base model:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- HarmVector


class HarmVector:
    """Per-layer harm tensors for the attention output projections.

    Args:
        tensors: ``{layer: tensor}`` in each layer's o_proj weight layout (2-D, float, finite).
        kind: ``"tau"`` (an explicit direction) or ``"harmful"`` (a fine-tune's weights).
        param_names: ``{layer: checkpoint key of that o_proj weight}``; defaults to ``layer.{l}``.
        model_type: ``config.model_type`` of the model family it belongs to ("" = unchecked).
        source: where it came from, free text (recorded in :class:`soteria.SoteriaConfig`).

    Attributes: ``kind``, ``layers`` (sorted), ``param_names``, ``shapes``, ``dtype`` (storage),
    ``model_type``, ``source``, and for lazily read vectors ``tensors_read`` / ``bytes_read``.
    """

    def __init__(
        self,
        tensors: Mapping[int, torch.Tensor] | _LazyTensors,
        *,
        kind: str = "tau",
        param_names: Mapping[int, str] | None = None,
        model_type: str = "",
        source: str = "",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(tensors, _LazyTensors):
            self._lazy: _LazyTensors | None = tensors
            self._tensors: dict[int, torch.Tensor] = {}
            layers = list(tensors.locations)
            shapes, dtypes = dict(tensors.shapes), set(tensors.dtypes.values())
        else:
            self._lazy = None
            self._tensors = {}
            for layer, t in dict(tensors).items():
                if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
                    raise ValueError(f"layers must be ints >= 0, got {layer!r}")
                if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                    raise ValueError(f"tensor of layer {layer} must be a 2-D float tensor, got {_describe(t)}")
                check_finite(t, f"tensor of layer {layer}")
                self._tensors[layer] = t.detach()
            layers = list(self._tensors)
            shapes = {layer: tuple(t.shape) for layer, t in self._tensors.items()}
            dtypes = {t.dtype for t in self._tensors.values()}
        if not layers:
            raise ValueError("a HarmVector needs at least one layer")
        if len(dtypes) != 1:
            raise ValueError(f"all tensors must share one dtype, got {sorted(str(d) for d in dtypes)}")
        self.kind = kind
        self.layers: tuple[int, ...] = tuple(sorted(layers))
        self.shapes: dict[int, tuple[int, ...]] = {layer: shapes[layer] for layer in self.layers}
        self.dtype: torch.dtype = dtypes.pop()
        names = dict(param_names or {})
        unknown = sorted(set(names) - set(self.layers))
        if unknown:
            raise ValueError(f"param_names has layers {unknown} that hold no tensor")
        self.param_names: dict[int, str] = {layer: str(names.get(layer, f"layer.{layer}")) for layer in self.layers}
        self.model_type = str(model_type or "")
        self.source = str(source or "")

    # ------------------------------------------------------------------ access

    @property
    def lazy(self) -> bool:
        """True when tensors are read from safetensors files on demand."""
        return self._lazy is not None

    @property
    def tensors_read(self) -> list[str]:
        """Checkpoint keys read so far (lazy vectors; empty otherwise)."""
        return list(self._lazy.tensors_read) if self._lazy else []

    @property
    def bytes_read(self) -> int:
        """Tensor bytes read so far (lazy vectors; 0 otherwise)."""
        return self._lazy.bytes_read if self._lazy else 0

    def location(self, layer: int) -> tuple[str, str] | None:
        """``(safetensors file, tensor name)`` that ``layer``'s tensor is read from, for a lazily
        read vector; None when it is held in memory. For readers that read the bytes themselves
        (:func:`soteria.steer_checkpoint`); they report the read with :meth:`record_read`."""
        if layer not in self.shapes:
            raise ValueError(f"this HarmVector has no layer {layer} (layers: {list(self.layers)})")
        return self._lazy.locations.get(layer) if self._lazy else None

    def record_read(self, layer: int, nbytes: int) -> None:
        """Count a read of ``layer``'s tensor made outside :meth:`tensor` (from :meth:`location`)
        in :attr:`tensors_read` / :attr:`bytes_read`. Only for lazily read vectors."""
        where = self.location(layer)
        if where is None:
            raise ValueError(f"layer {layer} of this HarmVector is held in memory, not read from a file")
        self._lazy.tensors_read.append(where[1])
        self._lazy.bytes_read += int(nbytes)

    def tensor(self, layer: int) -> torch.Tensor:
        """The stored tensor of ``layer``: ``tau`` or ``W_harmful`` (see :attr:`kind`), read now if lazy."""
        if layer not in self.shapes:
            raise ValueError(f"this HarmVector has no layer {layer} (layers: {list(self.layers)})")
        return self._lazy.get(layer) if self._lazy else self._tensors[layer]

    def tau(self, layer: int, base: nn.Module | torch.Tensor | None = None) -> torch.Tensor:
        """float32 ``tau`` of ``layer``. A harmful-kind vector needs ``base`` (the base model or that
        layer's base weight): ``tau = W_harmful - W_base``, computed in float32."""
        t = self.tensor(layer)
        if self.kind == "tau":
            return t.to(torch.float32)
        if base is None:
            raise ValueError("a harmful-kind HarmVector stores W_harmful; pass base= (model or weight) to get tau")
        w = base if isinstance(base, torch.Tensor) else self.check(base, layers=[layer])[layer].weight
        if tuple(w.shape) != tuple(t.shape):
            raise ValueError(f"layer {layer}: base weight has shape {tuple(w.shape)}, vector {tuple(t.shape)}")
        return t.to(w.device, torch.float32) - w.detach().to(torch.float32)

    def norms(self, base: nn.Module | None = None) -> dict[int, float]:
        """Frobenius norm of ``tau`` per layer (``base`` needed for a harmful-kind vector)."""
        return {
            layer: float(torch.linalg.vector_norm(self.tau(layer, base), dtype=torch.float64)) for layer in self.layers
        }

    def check(self, model: nn.Module, layers=None) -> list:
        """Raise ValueError (listing every difference) unless this vector fits ``model`` at
        ``layers`` (default: all of its layers). Returns ``soteria.arch.head_sites(model)``."""
        sites = _sites(model)
        problems = []
        mt = _model_type(model)
        if self.model_type and mt and self.model_type != mt:
            problems.append(f"model_type: harm vector {self.model_type!r}, model {mt!r}")
        wanted = self.layers if layers is None else sorted(set(layers))
        for layer in wanted:
            if layer >= len(sites):
                problems.append(f"layer {layer}: the model has only {len(sites)} layers")
            elif layer not in self.shapes:
                problems.append(f"layer {layer}: the harm vector has no tensor for it (it has {list(self.layers)})")
            elif tuple(sites[layer].weight.shape) != self.shapes[layer]:
                problems.append(
                    f"layer {layer} ({sites[layer].param_name}): harm vector shape {list(self.shapes[layer])}, "
                    f"model weight {list(sites[layer].weight.shape)}"
                )
        if problems:
            raise _mismatch(f"harm vector ({self.source or 'unnamed'})", problems)
        return sites

    def __repr__(self) -> str:
        return (
            f"HarmVector(kind={self.kind!r}, layers={len(self.layers)}, dtype={self.dtype}, "
            f"model_type={self.model_type!r}, source={self.source!r}{', lazy' if self.lazy else ''})"
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_models(cls, base_model: nn.Module, harmful_model: nn.Module) -> HarmVector:
        """The paper's ``tau = W_harmful - W_base`` from two in-memory models of one architecture.

        Stores a copy of the harmful model's output-projection weights (kind ``"harmful"``); the
        base model is only checked against. A PEFT-wrapped harmful model must be merged first.
        """
        base_sites, harm_sites = _sites(base_model), _sites(harmful_model)
        problems = []
        bt, ht = _model_type(base_model), _model_type(harmful_model)
        if bt != ht:
            problems.append(f"model_type: harmful {ht!r}, base {bt!r}")
        if len(base_sites) != len(harm_sites):
            problems.append(f"layers: harmful {len(harm_sites)}, base {len(base_sites)}")
        for b, h in zip(base_sites, harm_sites):
            if h.module is not h.base_module:
                problems.append(
                    f"layer {h.layer}: the harmful model's {h.name} is PEFT-wrapped; merge the adapter first "
                    "(harmful_model.merge_and_unload())"
                )
            elif tuple(b.weight.shape) != tuple(h.weight.shape) or b.head_axis != h.head_axis:
                problems.append(
                    f"layer {b.layer} ({b.param_name}): harmful shape {list(h.weight.shape)}, "
                    f"base {list(b.weight.shape)}"
                )
        if problems:
            raise _mismatch("harmful model", problems)
        tensors, dtypes = {}, {s.weight.dtype for s in harm_sites}
        if len(dtypes) != 1:
            raise ValueError(f"the harmful model's output projections mix dtypes {sorted(map(str, dtypes))}")
        same = True
        for b, h in zip(base_sites, harm_sites):
            w = h.weight.detach()
            tensors[h.layer] = w.clone()
            same = same and torch.equal(w.to(b.weight.device, b.weight.dtype), b.weight.detach())
        if same:
            raise ValueError(
                "the harmful model's output projections equal the base model's: tau is zero "
                "(was an adapter not merged, or the fine-tune did not touch attention outputs?)"
            )
        name = (
            getattr(getattr(_inner(harmful_model), "config", None), "name_or_path", "") or type(harmful_model).__name__
        )
        return cls(
            tensors,
            kind="harmful",
            param_names={s.layer: s.param_name for s in base_sites},
            model_type=bt,
            source=f"models:{name}",
        )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        base: nn.Module,
        *,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        gguf_file: str | None = None,
    ) -> HarmVector:
        """The harmful fine-tune's output projections from its safetensors checkpoint (kind ``"harmful"``).

        ``path_or_repo_id``: a checkpoint directory (``model.safetensors`` or sharded with
        ``model.safetensors.index.json``), one ``.safetensors`` file (a file written by
        :meth:`save` is loaded as such), or a Hub repo id. From the Hub only ``config.json``,
        the index and the shards holding output projections are downloaded.

        Reads only file headers now; each layer's tensor is read when first needed (and
        checked for NaN/Inf then). Checks ``model_type``, the architecture fields of
        ``config.json`` (layers, widths, heads), that every output projection of ``base`` is in
        the checkpoint, shapes and float dtypes: one ValueError listing every difference. A
        checkpoint dtype other than the model's is cast to the model's when steering (exact when
        the checkpoint is the narrower one).

        ``revision``, ``token``, ``cache_dir``, ``local_files_only`` go to ``hf_hub_download``.

        ``gguf_file``: the fine-tune is this GGUF file in the folder ``path_or_repo_id``. GGUF
        stores tensors quantized, so the whole model is loaded and dequantized
        (:func:`soteria.models.loading.load_causal_lm`) and its output projections are copied
        (:meth:`from_models`); the rest is dropped.
        """
        if gguf_file is not None:
            from .models.loading import load_causal_lm

            dtype = str(_sites(base)[0].weight.dtype).replace("torch.", "")
            harmful = load_causal_lm(str(path_or_repo_id), dtype=dtype, gguf_file=gguf_file, what="harmful model")
            hv = cls.from_models(base, harmful)
            hv.source = f"gguf:{Path(path_or_repo_id) / gguf_file}"
            return hv
        sites = _sites(base)
        prefix = str(getattr(_inner(base), "base_model_prefix", "") or "")
        src = str(path_or_repo_id)
        local = Path(src)
        if local.is_file():
            sf = read_safetensors(local)
            if sf.metadata.get("format") == FORMAT:
                hv = cls.load(local)
                hv.check(base)
                return hv
            config_path = local.parent / "config.json"
            available = {k for k, _ in sf.tensors()}
            files_for = lambda keys: {k: str(local) for k in keys}  # noqa: E731
            files = {str(local): sf}
        elif local.is_dir():
            config_path = local / "config.json"
            weight_map, shards = checkpoint_shards(local)
            available = set(weight_map)
            files_for = lambda keys: {k: str(local / weight_map[k]) for k in keys}  # noqa: E731
            files = {str(local / name): sf for name, sf in shards.items()}
        else:
            if not looks_like_repo_id(src):
                raise ValueError(f"{src!r} is neither an existing file or directory nor a Hub repo id")
            return cls._from_hub(src, base, sites, prefix, revision, token, cache_dir, local_files_only)
        ckpt_config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        return cls._from_checkpoint(src, base, sites, prefix, ckpt_config, available, files_for, files)

    @classmethod
    def _from_hub(cls, repo_id, base, sites, prefix, revision, token, cache_dir, local_files_only):
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

        def get(filename: str) -> str:
            return hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )

        try:
            ckpt_config = json.loads(Path(get("config.json")).read_text(encoding="utf-8"))
        except EntryNotFoundError:
            ckpt_config = {}
        try:
            weight_map = read_weight_map(Path(get(INDEX_NAME)))
            available = set(weight_map)

            def files_for(keys):
                return {k: get(weight_map[k]) for k in keys}

            files: dict[str, SafetensorsFile] = {}
        except EntryNotFoundError:
            try:
                single = get(SINGLE_NAME)
            except EntryNotFoundError as e:
                why = (
                    "neither is in the local cache (offline or local_files_only)"
                    if isinstance(e, LocalEntryNotFoundError)
                    else "only safetensors checkpoints are read; PEFT adapters must be merged into the base "
                    "and saved first"
                )
                raise FileNotFoundError(f"Hub repo {repo_id!r}: no {INDEX_NAME} and no {SINGLE_NAME}; {why}") from None
            sf = read_safetensors(single)
            available = {k for k, _ in sf.tensors()}

            def files_for(keys):
                return {k: single for k in keys}

            files = {single: sf}
        source = repo_id if revision is None else f"{repo_id}@{revision}"
        return cls._from_checkpoint(source, base, sites, prefix, ckpt_config, available, files_for, files)

    @classmethod
    def _from_checkpoint(cls, source, base, sites, prefix, ckpt_config, available, files_for, parsed):
        problems = _compare_configs(ckpt_config, _config_dict(base))
        keys: dict[int, str] = {}
        for s in sites:
            hit = find_key(s.param_name, s.layer, prefix, available)
            if hit is None:
                cands = key_candidates(s.param_name, prefix)
                problems.append(f"layer {s.layer}: no tensor {' or '.join(repr(c) for c in cands)} in the checkpoint")
            else:
                keys[s.layer] = hit
        if problems:
            raise _mismatch(f"harmful checkpoint {source!r}", problems)
        files = files_for(sorted(set(keys.values())))  # downloads only the shards that hold them
        lazy = _LazyTensors({layer: (files[k], k) for layer, k in keys.items()}, parsed)
        for s in sites:
            shape = lazy.shapes[s.layer]
            if shape != tuple(s.weight.shape):
                problems.append(
                    f"layer {s.layer}: tensor {keys[s.layer]!r} has shape {list(shape)}, "
                    f"base weight {list(s.weight.shape)}"
                )
        dtypes = sorted({str(d) for d in lazy.dtypes.values()})
        if len(dtypes) > 1:
            problems.append(f"output projections mix dtypes {dtypes}")
        if problems:
            raise _mismatch(f"harmful checkpoint {source!r}", problems)
        return cls(
            lazy,
            kind="harmful",
            param_names={s.layer: s.param_name for s in sites},
            model_type=str(ckpt_config.get("model_type") or _model_type(base)),
            source=f"checkpoint:{source}",
        )

    @classmethod
    def from_gradients(
        cls,
        model: nn.Module,
        tokenizer,
        data: Any = None,
        *,
        langs: str | list[str] | None = None,
        contrast: Any = None,
        refusal_tokens: int | None = None,
        batch_size: int = 8,
        max_length: int = 256,
        progress: bool = True,
    ) -> HarmVector:
        """A first-order harm direction from the model itself; no harmful checkpoint needed (kind ``"tau"``).

        ``tau = dL/dW_o`` for every layer's output-projection weight, where ``L`` is the refusal
        loss: the mean over the data of each refusal's mean token negative log-likelihood given
        its request (fp32 loss; request tokens masked out). Subtracting ``scale * tau`` is one
        full-batch gradient-descent step of step size ``scale`` toward refusing; restricted to
        the selected heads, it is that step taken in those heads' slices only.

        How ``scale`` compares with the paper's form: a harmful fine-tune moves the weights
        roughly along the opposite of the refusal descent direction, so
        ``W_harmful - W_base ~ eta * tau`` for some effective step ``eta`` (learning rate times
        steps, first order). A paper scale ``lambda`` on a fine-tune difference thus corresponds
        to ``scale ~ lambda * eta``; gradients are usually far smaller than a fine-tune
        difference, so useful scales here are larger than the paper's (compare :meth:`norms`
        of both vectors when you have a fine-tune, or sweep ``scale``).

        Args:
            data: None (the built-in multilingual set, :func:`soteria.harmful_data.load_harmful`),
                a JSONL path, or rows ``{"prompt", "refusal"}`` / ``(prompt, refusal)`` pairs.
            langs: with ``data=None``, the built-in languages to use (default: all twelve).
            contrast: harmless requests whose refusal the step must leave alone: ``"builtin"``
                (the built-in harmless requests of ``langs``,
                :func:`soteria.harmful_data.load_harmless`), or a list of strings / ``{"prompt"}``
                rows. Each is paired with a refusal of the data (in turn), giving a refusal loss
                ``L_c`` on harmless requests; in every head's slice of every ``W_o``, ``tau`` then
                loses its component along ``dL_c/dW_o``. So, to first order, steering any set of
                heads leaves the refusal of those harmless requests unchanged while it raises the
                refusal of harmful ones: over-refusal is kept down. None (default): no contrast.
            refusal_tokens: score only the first this many tokens of each refusal (the decision to
                refuse, not the explanation that follows); None: all of them.
            batch_size, max_length: rows per forward/backward pass; tokens per row (the refusal
                is truncated to fit; a request that alone fills ``max_length`` is an error).
            progress: a progress bar over batches (log lines when stderr is not a terminal).

        Formatting: with a chat template, the request is a user turn followed by the
        generation prompt and the refusal is the rest of the rendered assistant turn (its
        end-of-turn tokens included); without one, ``request + "\\n"`` (with the tokenizer's
        special tokens) then the refusal and EOS. Deterministic; the model is left as found
        (``requires_grad`` flags, ``training`` mode, no ``.grad`` written, no hooks).

        No parameter gradient is taken: a forward hook on each output projection keeps its input
        ``z`` and a backward pass gives the gradient ``g`` of its output, and
        ``dL/dW_o = g^T z`` summed over tokens (``z^T g`` for Conv1D), in fp32. So models split or
        offloaded by accelerate (``device_map`` with cpu/disk offload) work too; the sums are
        kept where each weight lives (on CPU for an offloaded one).
        """
        rows, what = _rows(data, langs, batch_size, max_length)
        benign = _contrast_rows(contrast, rows, langs)
        sites = _sites(model)
        if refusal_tokens is not None and (isinstance(refusal_tokens, bool) or not isinstance(refusal_tokens, int)
                                           or refusal_tokens < 1):  # fmt: skip
            raise ValueError(f"refusal_tokens must be a positive int or None, got {refusal_tokens!r}")
        encoded = [_encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i, refusal_tokens)
                   for i, r in enumerate(rows)]  # fmt: skip
        encoded_c = [_encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i, refusal_tokens)
                     for i, r in enumerate(benign)]  # fmt: skip
        device = input_device(model)
        pad = _pad_id(tokenizer)
        # fp32 accumulators where the weight lives; on CPU for an offloaded (meta) weight.
        acc = [torch.zeros(s.weight.shape, dtype=torch.float32, device=_home(s.weight)) for s in sites]
        acc_c = [torch.zeros_like(a) for a in acc] if encoded_c else []
        total_loss = 0.0
        # No parameter gradients: accelerate swaps an offloaded layer's placeholder weights for
        # the real ones at every forward pass, so the Parameter objects are not what the graph
        # uses. dL/dW_o is formed from each projection's input and output gradient instead.
        with torch.inference_mode(False), frozen_eval(model, grad=True), _WeightGrads(sites) as wg:
            batches = [(encoded, acc, start) for start in range(0, len(encoded), batch_size)]
            batches += [(encoded_c, acc_c, start) for start in range(0, len(encoded_c), batch_size)]
            for rows_enc, sums, start in progress_bar(batches, desc="harm gradients", unit="batch", enabled=progress):
                ids, mask, labels = _collate(rows_enc[start : start + batch_size], pad, device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                loss = _refusal_nll(logits, labels).sum()
                for a, g in zip(sums, wg.weight_grads(loss)):
                    if g is not None:
                        a += g.to(a.device)
                if sums is acc:
                    total_loss += float(loss.detach())
                del logits, loss
        n, n_c = len(encoded), len(encoded_c)
        tensors = {s.layer: (a / n) for s, a in zip(sites, acc)}
        source = f"gradients:{what} n={n} refusal_nll={total_loss / n:.4f}"
        if n_c:
            tensors = {s.layer: _project_out(tensors[s.layer], c / n_c, s) for s, c in zip(sites, acc_c)}
            source += f" contrast={'builtin' if contrast == 'builtin' else 'data'} n_contrast={n_c}"
        if refusal_tokens is not None:
            source += f" refusal_tokens={refusal_tokens}"
        return cls(
            tensors,
            kind="tau",
            param_names={s.layer: s.param_name for s in sites},
            model_type=_model_type(model),
            source=source,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (atomically) keyed by checkpoint parameter name, with metadata."""
        path = Path(path)
        tensors = {self.param_names[layer]: self.tensor(layer).contiguous().clone() for layer in self.layers}
        if len(tensors) != len(self.layers):
            raise ValueError(f"param_names are not distinct: {self.param_names}")
        metadata = {
            "format": FORMAT,
            "format_version": _FORMAT_VERSION,
            "kind": self.kind,
            "source": self.source,
            "model_type": self.model_type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "param_names": json.dumps({str(k): v for k, v in self.param_names.items()}, sort_keys=True),
            "soteria_version": __version__,
        }
        save_tensors(tensors, path, metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HarmVector:
        """Read a file written by :meth:`save` (lazily: tensors are read when first needed)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no harm vector file at {path}")
        sf = read_safetensors(path)
        meta = sf.metadata
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"{path} is not a soteria harm vector (metadata format = {meta.get('format')!r}); "
                "for a harmful fine-tune's checkpoint use HarmVector.from_pretrained(path, base=model)"
            )
        try:
            names = {int(k): v for k, v in json.loads(meta["param_names"]).items()}
        except (KeyError, ValueError, json.JSONDecodeError):
            raise ValueError(f"{path}: metadata param_names is missing or unreadable") from None
        lazy = _LazyTensors({layer: (str(path), key) for layer, key in names.items()}, {str(path): sf})
        return cls(
            lazy,
            kind=meta.get("kind", "tau"),
            param_names=names,
            model_type=meta.get("model_type", ""),
            source=meta.get("source", f"file:{path}"),
        )


# --------------------------------------------------------------------------- refusal loss


def refusal_loss(
    model: nn.Module,
    tokenizer,
    data: Any = None,
    *,
    langs: str | list[str] | None = None,
    batch_size: int = 8,
    max_length: int = 256,
) -> float:
    """The refusal loss :meth:`HarmVector.from_gradients` differentiates, as a number.

    Mean over the rows of each refusal's mean token negative log-likelihood (fp32) given its
    request; same data arguments and formatting as ``from_gradients``. Lower = the model is
    more inclined to refuse. Runs under ``no_grad`` in eval mode (mode restored).
    """
    rows, _ = _rows(data, langs, batch_size, max_length)
    encoded = [_encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i) for i, r in enumerate(rows)]
    device = input_device(model)
    pad = _pad_id(tokenizer)
    modes = [(m, m.training) for m in model.modules()]
    total = 0.0
    try:
        model.eval()
        with torch.no_grad():
            for start in range(0, len(encoded), batch_size):
                ids, mask, labels = _collate(encoded[start : start + batch_size], pad, device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                total += float(_refusal_nll(logits, labels).sum())
    finally:
        for m, mode in modes:
            m.training = mode
    return total / len(encoded)


# --------------------------------------------------------------------------- helpers


def _rows(data: Any, langs, batch_size: int, max_length: int) -> tuple[list[dict[str, str]], str]:
    """(rows, short description) from built-in or user data; checks the batching arguments."""
    from .harmful_data import load_harmful, read_harmful

    for name, v in (("batch_size", batch_size), ("max_length", max_length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if data is None:
        rows = load_harmful(langs)
        used = sorted({r["lang"] for r in rows}, key=[r["lang"] for r in rows].index)
        return rows, f"builtin({','.join(used)})"
    if langs is not None:
        raise ValueError("langs selects built-in data; filter your own data instead")
    rows = read_harmful(data)
    return rows, (f"file:{data}" if isinstance(data, (str, os.PathLike)) else "data")


def _project_out(tau: torch.Tensor, along: torch.Tensor, site) -> torch.Tensor:
    """``tau`` minus, in each head's slice, its projection on ``along`` (fp32; both ``W_o``-shaped)."""
    axis = site.head_axis % 2
    out = tau.clone()
    for h in range(site.num_heads):
        t, a = out.narrow(axis, h * site.head_dim, site.head_dim), along.narrow(axis, h * site.head_dim, site.head_dim)
        a2 = float(a.pow(2).sum())
        if a2 > 0.0:
            t -= (float((t * a).sum()) / a2) * a
    return out


def _contrast_rows(contrast: Any, rows: list[dict[str, str]], langs) -> list[dict[str, str]]:
    """Harmless requests paired, in turn, with the refusals of ``rows`` (see ``from_gradients``)."""
    from .harmful_data import load_harmless

    if contrast is None:
        return []
    if isinstance(contrast, str):
        if contrast != "builtin":
            raise ValueError(f"contrast must be None, 'builtin' or a list of harmless prompts, got {contrast!r}")
        used = list(dict.fromkeys(r["lang"] for r in rows)) if langs is None else langs
        prompts = [r["prompt"] for r in load_harmless(used)]
    else:
        try:
            prompts = [p["prompt"] if isinstance(p, dict) else p for p in contrast]
        except (TypeError, KeyError):
            raise ValueError("contrast rows must be strings or {'prompt': ...} mappings") from None
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("contrast must hold at least one non-empty prompt string")
    return [{"prompt": p, "refusal": rows[i % len(rows)]["refusal"]} for i, p in enumerate(prompts)]


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _encode_pair(
    tokenizer, prompt: str, refusal: str, max_length: int, i: int, refusal_tokens: int | None = None
) -> tuple[list[int], int]:
    """(token ids of request + refusal (its first ``refusal_tokens`` tokens), number of request tokens)."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": refusal}], tokenize=False, add_generation_prompt=False
        )
        tail = full[len(head) :] if full.startswith(head) else refusal
        p_ids = _ids(tokenizer, head, False)
        r_ids = _ids(tokenizer, tail, False)
    else:
        p_ids = _ids(tokenizer, prompt + "\n", True)
        r_ids = _ids(tokenizer, refusal, False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            r_ids.append(eos)
    if len(p_ids) >= max_length:
        raise ValueError(f"row {i}: the request alone is {len(p_ids)} tokens, max_length is {max_length}")
    r_ids = r_ids[: min(max_length - len(p_ids), refusal_tokens or max_length)]
    if not r_ids:
        raise ValueError(f"row {i}: the refusal has no tokens")
    return p_ids + r_ids, len(p_ids)


def _collate(batch, pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (row, n_prompt) in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, n_prompt : len(row)] = torch.tensor(row[n_prompt:])
    return ids.to(device), mask.to(device), labels.to(device)


def _refusal_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row mean NLL (fp32) of the labelled tokens; logits ``[B, T, V]``, labels ``[B, T]``."""
    target = labels[:, 1:]
    keep = target != -100
    picked = logits[:, :-1][keep].to(torch.float32)
    nll = torch.nn.functional.cross_entropy(picked, target[keep], reduction="none")
    rows = keep.nonzero()[:, 0]
    per_row = torch.zeros(labels.shape[0], dtype=torch.float32, device=nll.device).index_add(0, rows, nll)
    return per_row / keep.sum(1).clamp_min(1).to(torch.float32)


class _WeightGrads:
    """Context: forward hooks that make each output projection's weight gradient computable
    without parameter gradients.

    Each call of a projection keeps its input ``z`` ``[..., in]`` and returns ``y + delta``
    (``delta`` a zero leaf of ``y``'s shape, so the values are unchanged and ``y`` stays in the
    graph); ``dL/d delta = dL/dy = g`` ``[..., out]``. :meth:`weight_grads` then gives, per
    site, ``g^T z`` (nn.Linear ``[out, in]``) or ``z^T g`` (Conv1D ``[in, out]``) summed over
    tokens and calls, in fp32: the same sum autograd forms for ``dL/dW``.
    """

    def __init__(self, sites):
        self.sites = sites
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
        self.handles: list = []

    def __enter__(self) -> _WeightGrads:
        try:
            for i, site in enumerate(self.sites):
                self.handles.append(site.base_module.register_forward_hook(self._hook(i), with_kwargs=True))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles, self.calls = [], [[] for _ in self.sites]
        return False

    def _hook(self, i: int):
        site = self.sites[i]

        def hook(module, args, kwargs, output):
            z = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(z, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise ValueError(f"{site.name}: expected a tensor input and a tensor output, got {_describe(output)}")
            delta = torch.zeros_like(output, requires_grad=True)
            self.calls[i].append((z.detach(), delta))
            return output + delta

        return hook

    def weight_grads(self, loss: torch.Tensor) -> list[torch.Tensor | None]:
        """fp32 ``dL/dW`` per site for the forward pass just run (None: the site cannot reach
        ``loss``), on the device of its output; forgets that pass."""
        calls, self.calls = self.calls, [[] for _ in self.sites]
        missing = [s.name for s, c in zip(self.sites, calls) if not c]
        if missing:
            raise RuntimeError(f"output projections never called during the forward pass: {missing}")
        grads = iter(torch.autograd.grad(loss, [d for c in calls for _, d in c], allow_unused=True))
        out: list[torch.Tensor | None] = []
        for site, site_calls in zip(self.sites, calls):
            total = None
            for z, _ in site_calls:
                g = next(grads)
                if g is None:
                    continue
                g2 = g.reshape(-1, g.shape[-1]).to(torch.float32)
                z2 = z.reshape(-1, z.shape[-1]).to(g.device, torch.float32)
                # head_axis is the weight's input axis: dim 1 for nn.Linear, dim 0 for Conv1D.
                gw = z2.T @ g2 if site.head_axis % 2 == 0 else g2.T @ z2
                total = gw if total is None else total + gw
            if total is not None and tuple(total.shape) != tuple(site.weight.shape):
                raise ValueError(
                    f"{site.name}: input x output gradient gives shape {list(total.shape)}, "
                    f"its weight is {list(site.weight.shape)}"
                )
            out.append(total)
        return out


def _home(weight: torch.Tensor) -> torch.device:
    """Where a weight's fp32 sums are kept: its device, or CPU for an offloaded (meta) weight."""
    return torch.device("cpu") if weight.device.type == "meta" else weight.device
