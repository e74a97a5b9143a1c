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
  :func:`soteria_kernels.masked_head_update_` (``W -= scale * tau``) with ``tau`` in float32
  whatever the weight's dtype: the kernel computes in fp32 and rounds the weight once, so
  ``tau`` is not rounded to a bf16/fp16 weight's precision first. Made by
  :meth:`from_gradients`.

:meth:`save` / :meth:`load` keep the kind (safetensors, keyed by checkpoint parameter name,
metadata ``format = "soteria.harm"``). A harmful-kind file is itself a valid subset checkpoint.

Over 400 lines: the public :class:`HarmVector` with the full documentation of its constructors;
the reading and the gradients themselves are in :mod:`.checkpoint` and :mod:`.gradients`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, model_type, unwrap_model
from ..io.safetensors import check_finite, read_safetensors, save_tensors
from ..version import __version__
from .checkpoint import LazyTensors, mismatch, read_checkpoint
from .finetune import finetune_direction
from .gradients import gradient_direction

__all__ = ["FORMAT", "KINDS", "HarmVector"]

FORMAT = "soteria.harm"
_FORMAT_VERSION = "1"
KINDS = ("harmful", "tau")


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

    FORMAT = FORMAT  # the ``format`` metadata of a file written by :meth:`save`

    def __init__(
        self,
        tensors: Mapping[int, torch.Tensor] | LazyTensors,
        *,
        kind: str = "tau",
        param_names: Mapping[int, str] | None = None,
        model_type: str = "",
        source: str = "",
    ):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if isinstance(tensors, LazyTensors):
            self._lazy: LazyTensors | None = tensors
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
        ``layers`` (default: all of its layers). Returns ``soteria.arch.headhead_sites(model)``."""
        sites = head_sites(model)
        problems = []
        mt = model_type(model)
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
            raise mismatch(f"harm vector ({self.source or 'unnamed'})", problems)
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
        base_sites, harm_sites = head_sites(base_model), head_sites(harmful_model)
        problems = []
        bt, ht = model_type(base_model), model_type(harmful_model)
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
            raise mismatch("harmful model", problems)
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
            getattr(getattr(unwrap_model(harmful_model), "config", None), "name_or_path", "")
            or type(harmful_model).__name__
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
        the index and the shards holding output projections are downloaded (in real checkpoints
        every shard holds some, so that is every shard); of those, only the output projections are read.

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
        return read_checkpoint(
            cls,
            path_or_repo_id,
            base,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            gguf_file=gguf_file,
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
        refusal_tokens: int | str | None = None,
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
            data: None (the built-in multilingual set, :func:`soteria.harm.data.load_harmful`),
                a JSONL path, or rows ``{"prompt", "refusal"}`` / ``(prompt, refusal)`` pairs.
            langs: with ``data=None``, the built-in languages to use (default: all twelve).
            contrast: harmless requests whose refusal the step must leave alone: ``"builtin"``
                (the built-in harmless requests of ``langs``,
                :func:`soteria.harm.data.load_harmless`), or a list of strings / ``{"prompt"}``
                rows. Each is paired with a refusal of the data (in turn), giving a refusal loss
                ``L_c`` on harmless requests; in every head's slice of every ``W_o``, ``tau`` then
                loses its component along ``dL_c/dW_o``. So, to first order, steering any set of
                heads leaves the refusal of those harmless requests unchanged while it raises the
                refusal of harmful ones: over-refusal is kept down. None (default): no contrast.
            refusal_tokens: score only the first this many tokens of each refusal (the decision to
                refuse, not the explanation that follows); ``"sentence"``: the tokens of its first
                sentence (:func:`~soteria.harm.data.first_sentence`), which holds the decision in every
                language, verb-final ones too; None: all of them.
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
        return gradient_direction(
            cls,
            model,
            tokenizer,
            data,
            langs=langs,
            contrast=contrast,
            refusal_tokens=refusal_tokens,
            batch_size=batch_size,
            max_length=max_length,
            progress=progress,
        )

    @classmethod
    def from_finetune(
        cls,
        model: nn.Module,
        tokenizer,
        heads,
        data: Any = None,
        *,
        langs: str | list[str] | None = None,
        contrast: Any = "builtin",
        steps: int = 16,
        lr: float = 3e-5,
        retain: float = 10.0,
        refusal_tokens: int | str = 4,
        answer_tokens: int = 8,
        batch_size: int = 32,
        seed: int = 0,
        max_length: int = 256,
        precision: str = "float32",
        progress: bool = True,
    ) -> HarmVector:
        """A direction from a short refusal fine-tune of ``heads``' slices only (kind ``"tau"``; steer at ``scale=1``).

        Adam (``lr``, ``steps`` minibatches of ``batch_size`` rows of each kind, order from ``seed``)
        trains an additive fp32 change ``delta`` of the given heads' output-projection slices, every
        other weight frozen, on ``L_refuse + retain * KL``: ``L_refuse`` is the refusal loss of
        :meth:`from_gradients` on the first ``refusal_tokens`` tokens of each refusal, ``KL`` the
        mean KL(base || tuned) over the base model's own first ``answer_tokens`` greedy answer
        tokens to the harmless ``contrast`` requests (on the base's top 64 tokens plus the rest).
        Returns ``tau = -delta`` on the layers holding heads: steering those heads at ``scale=1``
        applies the fine-tune. The model is left as found (no weight written; hooks removed).

        Args:
            heads: the heads to train: ``{lang: [(layer, head), ...]}`` (a config's heads),
                ``{layer: [head, ...]}`` or ``(layer, head)`` pairs; the vector is meant for them.
            data, langs: the refusal data, as in :meth:`from_gradients`.
            contrast: ``"builtin"`` (the built-in harmless requests of the data's languages), a
                list of harmless prompts, or None (no retain term).
            steps, lr, retain, answer_tokens, batch_size, seed: as above.
            refusal_tokens: as in :meth:`from_gradients`. Under Qwen's tokenizer the default 4
                holds the "no" of the built-in en/es/fr refusals but of few German ones ("Dabei
                kann ich | nicht") and of none in hi, bn, ta, te or th; ``"sentence"`` always holds
                it, though on Qwen2.5-0.5B (es, fr, de) it refused less in es and fr than 4.
            precision: ``"float32"`` (the model's dtype), ``"bfloat16"`` (bf16 autocast of an fp32
                model), or ``"auto"`` (bf16 autocast on CUDA with bf16 or a CPU with AMX or
                AVX512-BF16, faster there); ``delta`` stays fp32.
            max_length, progress: as in :meth:`from_gradients`.

        Chosen on Qwen2.5-Coder-0.5B-Instruct: README.md, "Results on a real model".
        """
        return finetune_direction(
            cls,
            model,
            tokenizer,
            heads,
            data,
            langs=langs,
            contrast=contrast,
            steps=steps,
            lr=lr,
            retain=retain,
            refusal_tokens=refusal_tokens,
            answer_tokens=answer_tokens,
            batch_size=batch_size,
            seed=seed,
            max_length=max_length,
            precision=precision,
            progress=progress,
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
        lazy = LazyTensors({layer: (str(path), key) for layer, key in names.items()}, {str(path): sf})
        return cls(
            lazy,
            kind=meta.get("kind", "tau"),
            param_names=names,
            model_type=meta.get("model_type", ""),
            source=meta.get("source", f"file:{path}"),
        )


def _describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {list(t.shape)}"
    return type(t).__name__
