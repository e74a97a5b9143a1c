"""A harm direction from the model itself: the gradient of its refusal loss on harmful requests.

:func:`gradient_direction` is :meth:`HarmVector.from_gradients`: ``dL/dW_o`` for every
layer's output projection, formed from each projection's input and output gradient (no
parameter gradients, so offloaded models work), optionally with a harmless contrast projected
out per head. :func:`refusal_loss` is the loss itself, as a number.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..arch import head_sites, model_type
from ..models.state import frozen_eval, input_device
from ..progress import progress_bar
from .data import first_sentence, load_harmful, load_harmless, read_harmful

__all__ = ["check_refusal_tokens", "encode_pair", "gradient_direction", "prompt_ids", "refusal_loss"]


def gradient_direction(
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
):
    """:meth:`HarmVector.from_gradients` (``cls``: the class to build)."""
    rows, what = _rows(data, langs, batch_size, max_length)
    benign = _contrast_rows(contrast, rows, langs)
    sites = head_sites(model)
    if refusal_tokens is not None:
        check_refusal_tokens(refusal_tokens)
    encoded = [encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i, refusal_tokens)
               for i, r in enumerate(rows)]  # fmt: skip
    encoded_c = [encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i, refusal_tokens)
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
        model_type=model_type(model),
        source=source,
    )


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
    encoded = [encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i) for i, r in enumerate(rows)]
    device = input_device(model)
    pad = _pad_id(tokenizer)
    total = 0.0
    with frozen_eval(model, grad=False):
        for start in range(0, len(encoded), batch_size):
            ids, mask, labels = _collate(encoded[start : start + batch_size], pad, device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            total += float(_refusal_nll(logits, labels).sum())
    return total / len(encoded)


def _rows(data: Any, langs, batch_size: int, max_length: int) -> tuple[list[dict[str, str]], str]:
    """(rows, short description) from built-in or user data; checks the batching arguments."""
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
    out = tau.clone()
    for h in range(site.num_heads):
        t, a = site.head_slice(out, h), site.head_slice(along, h)
        a2 = float(a.pow(2).sum())
        if a2 > 0.0:
            t -= (float((t * a).sum()) / a2) * a
    return out


def _contrast_rows(contrast: Any, rows: list[dict[str, str]], langs) -> list[dict[str, str]]:
    """Harmless requests paired, in turn, with the refusals of ``rows`` (see ``from_gradients``)."""
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


def prompt_ids(tokenizer, prompt: str, max_length: int, i: int) -> list[int]:
    """Token ids of a request as the model sees it before its answer: the chat template's user turn
    and generation prompt, or ``request + "\\n"`` with the tokenizer's special tokens."""
    if getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)  # fmt: skip
        ids = _ids(tokenizer, head, False)
    else:
        ids = _ids(tokenizer, prompt + "\n", True)
    if len(ids) >= max_length:
        raise ValueError(f"row {i}: the request alone is {len(ids)} tokens, max_length is {max_length}")
    return ids


def check_refusal_tokens(refusal_tokens: Any) -> None:
    """ValueError unless a positive int or ``"sentence"`` (None, all tokens, is the caller's to allow)."""
    if refusal_tokens == "sentence":
        return
    if isinstance(refusal_tokens, bool) or not isinstance(refusal_tokens, int) or refusal_tokens < 1:
        raise ValueError(f"refusal_tokens must be a positive int or 'sentence', got {refusal_tokens!r}")


def encode_pair(
    tokenizer, prompt: str, refusal: str, max_length: int, i: int, refusal_tokens: int | str | None = None
) -> tuple[list[int], int]:
    """(token ids of request + refusal, number of request tokens). The refusal is cut to its first
    ``refusal_tokens`` tokens, or with ``"sentence"`` to the tokens of its first sentence
    (:func:`~soteria.harm.data.first_sentence`); None keeps all of it."""
    p_ids = prompt_ids(tokenizer, prompt, max_length, i)
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": refusal}], tokenize=False, add_generation_prompt=False
        )
        r_ids = _ids(tokenizer, full[len(head) :] if full.startswith(head) else refusal, False)
    else:
        r_ids = _ids(tokenizer, refusal, False)
        eos = getattr(tokenizer, "eos_token_id", None)
        if isinstance(eos, int):
            r_ids.append(eos)
    if refusal_tokens == "sentence":
        refusal_tokens = len(_ids(tokenizer, first_sentence(refusal), False))
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
