"""A harm direction from a short refusal fine-tune of the steered heads' slices only.

:func:`finetune_direction` is :meth:`HarmVector.from_finetune`. It trains, with Adam, an
additive change ``delta`` of the selected heads' output-projection slices (every other weight
frozen, the model itself never written) on two terms:

- the refusal loss of :meth:`HarmVector.from_gradients` on harmful requests (the first
  ``refusal_tokens`` tokens of each refusal), and
- ``retain`` times KL(base || tuned) of the next-token distributions over the base model's own
  first ``answer_tokens`` greedy answer tokens to harmless requests, so that what the model says
  to harmless requests stays as it was.

The vector is ``tau = -delta``: steering its heads at ``scale=1`` applies the fine-tune, which is
the paper's ``W - lambda * (W_harmful - W)`` with a safety fine-tune in place of the harmful one
and ``lambda = 1``.

``precision="auto"`` (or ``"bfloat16"``) runs the forward and backward passes of an fp32 model
under bf16 autocast where the hardware has fast bf16 matrix units (CUDA with bf16, a CPU with AMX
or AVX512-BF16; :func:`~soteria.models.state.autocast_dtype`): 2-3x faster on a 2-core CPU,
but it flips a borderline prompt or two (README, "Results on a real model"), so the default
is ``"float32"``. The change ``delta`` itself is always fp32 and added in fp32: a bf16 sum would
round a change of ``1e-3`` of the output away.

The gradient direction (:mod:`.gradients`) is this loss's first-order step without the retain term.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import head_sites, model_type
from ..models.state import autocast_dtype, check_precision, frozen_eval, input_device, mixed_precision
from ..progress import progress_bar
from .gradients import _contrast_rows, _home, _pad_id, _rows, check_refusal_tokens, encode_pair, prompt_ids

__all__ = ["FINETUNE_OPTIONS", "check_finetune_options", "finetune_direction"]

#: The fine-tune's options checked by :func:`check_finetune_options`.
FINETUNE_OPTIONS = ("steps", "lr", "retain", "refusal_tokens", "answer_tokens", "batch_size", "precision")

#: KL(base || tuned) is taken over the base model's top this many tokens per position, plus one
#: bucket for the rest of the vocabulary (exact for the rest's total mass; fp32, on CPU).
TOP_TOKENS = 64


def finetune_direction(
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
):
    """:meth:`HarmVector.from_finetune` (``cls``: the class to build)."""
    sites = head_sites(model)
    union = _head_union(heads, len(sites), sites[0].num_heads)
    check_finetune_options(steps=steps, lr=lr, retain=retain, refusal_tokens=refusal_tokens,
                           answer_tokens=answer_tokens, batch_size=batch_size, precision=precision)  # fmt: skip
    rows, what = _rows(data, langs, batch_size, max_length)
    benign = [r["prompt"] for r in _contrast_rows(contrast, rows, langs)]
    harmful = [
        encode_pair(tokenizer, r["prompt"], r["refusal"], max_length, i, refusal_tokens) for i, r in enumerate(rows)
    ]
    pad, device = _pad_id(tokenizer), input_device(model)
    gen = torch.Generator().manual_seed(seed)
    amp = autocast_dtype(model, precision)
    computed_in = str(amp or next(model.parameters()).dtype).removeprefix("torch.")

    with frozen_eval(model, grad=False), mixed_precision(model, amp):
        answered = _base_answers(model, tokenizer, benign, answer_tokens, max_length, batch_size, pad, progress)
        targets = [
            _top_logprobs(model, tokenizer, answered[s : s + batch_size], device)
            for s in range(0, len(answered), batch_size)
        ]
    targets = [t for batch in targets for t in batch]

    deltas = _Deltas(sites, union)
    opt = torch.optim.Adam(deltas.parameters(), lr=float(lr))
    first = last = None
    with torch.inference_mode(False), frozen_eval(model, grad=True), deltas.hooked(), mixed_precision(model, amp):
        order_h, order_b = _Cycle(len(harmful), gen), _Cycle(len(answered), gen)
        for _ in progress_bar(range(steps), desc="harm fine-tune", unit="step", enabled=progress):
            opt.zero_grad(set_to_none=True)
            idx = order_h.take(batch_size)
            nll = _refusal_nll(model, tokenizer, [harmful[i] for i in idx], device)
            loss = nll
            kl = torch.zeros(())
            if benign and retain > 0:
                idx = order_b.take(batch_size)
                kl = _retain_kl(model, tokenizer, [answered[i] for i in idx], [targets[i] for i in idx], device)
                loss = loss + float(retain) * kl.to(loss.device)
            loss.backward()
            opt.step()
            last = (float(nll.detach()), float(kl.detach()))
            first = first or last
    source = (
        f"finetune:{what} n={len(rows)} n_contrast={len(answered)} heads={sum(map(len, union.values()))} "
        f"steps={steps} lr={lr:g} retain={retain:g} refusal_tokens={refusal_tokens} answer_tokens={answer_tokens} "
        f"batch_size={batch_size} seed={seed} precision={computed_in} "
        f"refusal_nll={first[0]:.4f}->{last[0]:.4f} kl={last[1]:.5f}"
    )
    return cls(
        deltas.taus(),
        kind="tau",
        param_names={s.layer: s.param_name for s in sites if s.layer in union},
        model_type=model_type(model),
        source=source,
    )


def check_finetune_options(**options) -> None:
    """ValueError naming the first bad one of :data:`FINETUNE_OPTIONS` given (before any model work)."""
    for name, v in options.items():
        if name == "precision":
            check_precision(v)
        elif name == "refusal_tokens":
            check_refusal_tokens(v)
        elif name in ("lr", "retain"):
            bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0
            if bad or (name == "lr" and v == 0):
                raise ValueError(f"{name} must be a finite float {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def _head_union(heads: Any, n_layers: int, n_heads: int) -> dict[int, list[int]]:
    """``{layer: sorted heads}`` from ``{lang: [(layer, head), ...]}``, ``{layer: [head, ...]}`` or pairs."""
    if isinstance(heads, dict) and all(isinstance(k, str) for k in heads):
        pairs = [p for v in heads.values() for p in v]
    elif isinstance(heads, dict):
        pairs = [(layer, h) for layer, hs in heads.items() for h in hs]
    else:
        pairs = list(heads or [])
    out: dict[int, set[int]] = {}
    for p in pairs:
        ok = (
            isinstance(p, (tuple, list))
            and len(p) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in p)
        )
        if not ok or not (0 <= p[0] < n_layers and 0 <= p[1] < n_heads):
            raise ValueError(f"heads must be (layer, head) pairs within {n_layers} layers x {n_heads} heads, got {p!r}")
        out.setdefault(p[0], set()).add(p[1])
    if not out:
        raise ValueError("the fine-tune direction needs at least one head to train")
    return {layer: sorted(hs) for layer, hs in sorted(out.items())}


class _Cycle:
    """Indices in a fresh random order each pass (minibatches without repeats within a pass)."""

    def __init__(self, n: int, gen: torch.Generator):
        self.n, self.gen, self.queue = n, gen, []

    def take(self, k: int) -> list[int]:
        out: list[int] = []
        while len(out) < min(k, self.n):
            if not self.queue:
                self.queue = torch.randperm(self.n, generator=self.gen).tolist()
            out.append(self.queue.pop())
        return out


def _left_pad(rows: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded ``(input_ids, attention_mask, position_ids)`` ``[B, T]`` (positions count real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device), (mask.cumsum(-1) - 1).clamp_min(0).to(device)


def _answer_logits(model, tokenizer, rows, device) -> list[torch.Tensor]:
    """Per ``(ids, n_prompt)`` row, the fp32 logits ``[len(ids) - n_prompt, V]`` that predict its answer
    tokens (one left-padded batch; logits only for the answer positions)."""
    ids, mask, pos = _left_pad([r for r, _ in rows], _pad_id(tokenizer), device)
    keep = max(len(r) - n for r, n in rows) + 1
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=keep).logits
    return [logits[i, keep - 1 - (len(r) - n) : keep - 1].float() for i, (r, n) in enumerate(rows)]


def _refusal_nll(model, tokenizer, rows, device) -> torch.Tensor:
    """Mean over rows of each refusal's mean token NLL (fp32)."""
    losses = [
        F.cross_entropy(lg, torch.tensor(r[n:], device=lg.device))
        for lg, (r, n) in zip(_answer_logits(model, tokenizer, rows, device), rows)
    ]
    return torch.stack(losses).mean()


def _top_logprobs(model, tokenizer, rows, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: the base's top token ids ``[n, K]`` and log-probs ``[n, K + 1]`` (last: the rest), on CPU."""
    out = []
    for lg in _answer_logits(model, tokenizer, rows, device):
        logp = F.log_softmax(lg, -1)
        top, ids = logp.topk(min(TOP_TOKENS, logp.shape[-1] - 1), -1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        out.append((ids.cpu(), torch.cat([top, rest[:, None]], -1).cpu()))
    return out


def _retain_kl(model, tokenizer, rows, targets, device) -> torch.Tensor:
    """Mean KL(base || tuned) over the answer positions, on the base's top tokens plus the rest."""
    total, n = 0.0, 0
    for lg, (ids, base) in zip(_answer_logits(model, tokenizer, rows, device), targets):
        logq = F.log_softmax(lg, -1)
        top = logq.gather(-1, ids.to(logq.device))
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-6))
        q = torch.cat([top, rest[:, None]], -1)
        p = base.to(q.device)
        total = total + (p.exp() * (p - q)).sum()
        n += p.shape[0]
    return total / n


@torch.no_grad()
def _base_answers(model, tokenizer, prompts, answer_tokens, max_length, batch_size, pad, progress):
    """``(prompt ids + the base model's first greedy answer tokens, n_prompt)`` per harmless prompt."""
    heads = [prompt_ids(tokenizer, p, max_length, i) for i, p in enumerate(prompts)]
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    starts = range(0, len(heads), batch_size)
    for s in progress_bar(starts, desc="harmless answers", unit="batch", enabled=progress and len(starts) > 1):
        chunk = heads[s : s + batch_size]
        ids, mask, _ = _left_pad(chunk, pad, input_device(model))
        new = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=answer_tokens,
                             pad_token_id=pad)[:, ids.shape[1] :].tolist()  # fmt: skip
        for p, a in zip(chunk, new):
            a = a[: a.index(eos) + 1] if isinstance(eos, int) and eos in a else a
            out.append((p + a, len(p)))
    return out


class _Deltas(nn.Module):
    """Trainable fp32 changes of the selected heads' slices, added to each projection's output by hooks."""

    def __init__(self, sites, union: dict[int, list[int]]):
        super().__init__()
        self.sites = [s for s in sites if s.layer in union]
        self.cols = {}
        self.delta = nn.ParameterList()
        for s in self.sites:
            cols = torch.cat([torch.arange(h * s.head_dim, (h + 1) * s.head_dim) for h in union[s.layer]])
            d_model = s.weight.shape[0 if s.head_axis % 2 == 1 else 1]
            self.cols[s.layer] = cols.to(_home(s.weight))
            self.delta.append(nn.Parameter(torch.zeros(d_model, len(cols), device=_home(s.weight))))

    @contextmanager
    def hooked(self):
        """Context: the changes are added to the projections' outputs (hooks removed on exit)."""
        handles = []
        try:
            for s, d in zip(self.sites, self.delta):
                handles.append(s.base_module.register_forward_hook(self._hook(s, d)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _hook(self, site, delta):
        cols = self.cols[site.layer]

        def hook(module, args, output):
            z = args[0].index_select(-1, cols.to(args[0].device))
            kind = output.device.type
            with torch.autocast(kind, enabled=False):
                extra = F.linear(z.float(), delta.to(z.device))
            if torch.is_autocast_enabled(kind):  # keep the sum in fp32; the next ops autocast it again
                return output.float() + extra
            return output + extra.to(output.dtype)

        return hook

    def taus(self) -> dict[int, torch.Tensor]:
        """``{layer: -delta}`` scattered into the weight's layout (fp32, zeros outside the heads)."""
        out = {}
        for s, d in zip(self.sites, self.delta):
            tau = torch.zeros(tuple(s.weight.shape), dtype=torch.float32, device=d.device)
            if s.head_axis % 2 == 1:  # nn.Linear [d_model, H*D]
                tau[:, self.cols[s.layer]] = -d.detach()
            else:  # Conv1D [H*D, d_model]
                tau[self.cols[s.layer], :] = -d.detach().T
            out[s.layer] = tau
        return out
