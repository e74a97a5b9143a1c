"""Utility measures: does the steered model still work?

- :func:`next_token_kl`: mean ``KL(p_original || p_steered)`` of the next-token distributions
  over every real token position of harmless prompts (fp32), the measure weight-editing tools
  report beside refusal counts. 0 means the edit changed nothing on those prompts.
- :func:`steering_kl`: the same for a model steered in this process, against its own unsteered
  weights (no second copy); what the write guard of :func:`soteria.save_steered` measures.
- :func:`perplexity`: ``exp(total NLL / predicted tokens)`` of held-out text.
- :func:`probe_accuracy`: first-token accuracy on the built-in probe tasks (the clean few-shot
  prompts of :func:`soteria.heads.prompts.build_prompts`): the top-1 next token equals the answer's
  first token.

All run batched and right-padded under ``torch.inference_mode`` and never modify the models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..heads.probes import load_task
from ..heads.probes import tasks as task_names
from ..heads.prompts import build_prompts, encode_batch
from ..models.state import frozen_eval, input_device
from ..steer import SoteriaPatcher

__all__ = ["next_token_kl", "perplexity", "probe_accuracy", "steering_kl", "token_kl"]


def _texts(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{what}: no non-empty texts")
    return texts


def _rows(tokenizer, texts: Sequence[str], max_length: int | None, special: bool = True) -> list[list[int]]:
    rows = [list(r) for r in tokenizer(list(texts), add_special_tokens=special)["input_ids"]]
    if max_length is not None:
        rows = [r[:max_length] for r in rows]
    return rows


def _logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """fp32 logits ``[B, T, V]`` with the model in eval mode (its mode is restored)."""
    device = input_device(model)
    with frozen_eval(model, grad=False):
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.logits.float()


def token_kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per position from log-probabilities ``[..., V]`` (fp32): ``[...]``, clamped at 0."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)


def _mean_kl(logits_pair, tokenizer, texts, *, batch_size: int, max_length: int | None, special: bool) -> dict:
    """Mean ``KL(p || q)`` over all real positions; ``logits_pair(ids, mask) -> (logits_p, logits_q)``."""
    rows = _rows(tokenizer, texts, max_length, special)
    total, count, worst, per_text = 0.0, 0, 0.0, []
    for start in range(0, len(rows), batch_size):
        ids, mask, _ = encode_batch(tokenizer, rows[start : start + batch_size], padding_side="right")
        lo, ls = logits_pair(ids, mask)
        if lo.shape[-1] != ls.shape[-1]:
            raise ValueError(f"the models' vocabularies differ: {lo.shape[-1]} vs {ls.shape[-1]} logits")
        logp_o, logp_s = F.log_softmax(lo, -1), F.log_softmax(ls.to(lo.device), -1)
        kl = token_kl(logp_o, logp_s)  # [B, T]
        m = mask.to(kl.device).bool()
        total += float(kl[m].sum())
        count += int(m.sum())
        worst = max(worst, float(kl[m].max()))
        per_text += [float(kl[i][m[i]].mean()) for i in range(kl.shape[0])]
    return {"mean": total / count, "max": worst, "positions": count, "per_text": per_text}


@torch.inference_mode()
def next_token_kl(
    original: nn.Module,
    steered: nn.Module,
    tokenizer,
    texts: Sequence[str] | str,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """Mean ``KL(original || steered)`` over all real positions of ``texts``.

    Per position ``t``: ``sum_v p_o(v|x<=t) * (log p_o(v|x<=t) - log p_s(v|x<=t))`` in fp32.
    Returns ``{"mean": float, "max": float, "positions": int, "per_text": [float]}`` (``per_text``:
    mean over each text's positions). The models must share the vocabulary size.
    ``add_special_tokens=False`` for texts that carry their own (chat-template output).
    """
    texts = _texts(texts, "next_token_kl")
    pair = lambda ids, mask: (_logits(original, ids, mask), _logits(steered, ids, mask))  # noqa: E731
    return _mean_kl(pair, tokenizer, texts, batch_size=batch_size, max_length=max_length, special=add_special_tokens)


@torch.inference_mode()
def steering_kl(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | str,
    *,
    batch_size: int = 8,
    max_length: int | None = 512,
    add_special_tokens: bool = True,
) -> dict[str, Any]:
    """:func:`next_token_kl` of a model steered in this process against its own unsteered weights,
    with one copy in memory (:meth:`soteria.SoteriaPatcher.unsteered` swaps the head slices, bit-exact)."""
    texts = _texts(texts, "steering_kl")

    def pair(ids, mask):
        with SoteriaPatcher.unsteered(model):
            lo = _logits(model, ids, mask)
        return lo, _logits(model, ids, mask)

    return _mean_kl(pair, tokenizer, texts, batch_size=batch_size, max_length=max_length, special=add_special_tokens)


@torch.inference_mode()
def perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | str,
    *,
    batch_size: int = 8,
    max_length: int | None = 1024,
) -> dict[str, Any]:
    """Token-level perplexity of ``texts``: ``exp(sum NLL / tokens predicted)``, fp32.

    Each text is encoded with the tokenizer's usual special tokens (so the first real token is
    predicted from BOS where the tokenizer adds one) and cut to ``max_length`` tokens.
    Returns ``{"perplexity": float, "nll": float (mean per token), "tokens": int}``.
    """
    texts = _texts(texts, "perplexity")
    rows = _rows(tokenizer, texts, max_length)
    if all(len(r) < 2 for r in rows):
        raise ValueError("perplexity: every text is shorter than two tokens")
    nll, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        ids, mask, _ = encode_batch(tokenizer, rows[start : start + batch_size], padding_side="right")
        logits = _logits(model, ids, mask)
        targets = ids[:, 1:].to(logits.device)
        valid = mask[:, 1:].to(logits.device).bool()
        logp = F.log_softmax(logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll -= float(logp[valid].sum())
        count += int(valid.sum())
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count}


@torch.inference_mode()
def probe_accuracy(
    model: nn.Module,
    tokenizer,
    lang: str,
    *,
    tasks: Sequence[str] | None = None,
    n_shots: int = 5,
    max_prompts: int = 10,
    seed: int = 0,
    batch_size: int = 8,
) -> dict[str, Any]:
    """First-token accuracy on ``lang``'s built-in probe tasks.

    ``max_prompts`` clean prompts per task (``n_shots`` demonstrations each; the same seeded
    prompts for every model, so before/after compare like with like). Returns
    ``{"accuracy": float, "correct": int, "total": int, "per_task": {task: float}}``.
    ValueError when ``lang`` has no built-in probe tasks.
    """
    names = list(tasks) if tasks is not None else task_names(lang)
    correct = total = 0
    per_task = {}
    device = input_device(model)
    for task in names:
        pp = build_prompts(load_task(lang, task), tokenizer, n_shots=n_shots, n_trials=max_prompts, seed=seed)
        hits = 0
        for start in range(0, len(pp.clean), batch_size):
            ids, mask, last = encode_batch(tokenizer, pp.clean[start : start + batch_size], padding_side="right")
            logits = _logits(model, ids, mask)
            pred = logits[torch.arange(ids.shape[0], device=logits.device), last.to(logits.device)].argmax(-1)
            target = torch.tensor(pp.target_ids[start : start + batch_size], device=device)
            hits += int((pred.to(device) == target).sum())
        per_task[task] = hits / len(pp.clean)
        correct += hits
        total += len(pp.clean)
    return {"accuracy": correct / total, "correct": correct, "total": total, "per_task": per_task}
