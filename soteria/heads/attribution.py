"""Per-head causal indirect effects: exact activation patching and attribution patching (AtP).

For head ``h`` of layer ``l`` (input columns ``[h*D, (h+1)*D)`` of that layer's attention
output projection, activation ``z^l_h``) and a corrupted prompt with target token ``t``:

- exact: ``p(t | corrupted, z^l_h[last] := a_bar^l_h) - p(t | corrupted)``, where
  ``a_bar^l_h`` is the mean of ``z^l_h`` at the last token over the clean prompts (or, with
  ``means="leave_one_out"``, over all but the corrupted prompt's own clean twin). Each
  prompt's prefix runs once with a KV cache; the patched copies run the last token only, many
  to a pass, from the patched layer up (:mod:`.lastpos`). ``method="exact_full"`` runs every
  patched copy through the whole prompt and every layer instead: the reference it must equal;
- AtP: ``sum_d (a_bar^l_h - z^l_h[last])[d] * dp(t)/dz^l_h[last, d]``, its first-order Taylor
  expansion, from one forward and one backward pass per batch for all ``L*H`` heads.

Probabilities are softmaxes of fp32 logits at each row's last real token. Batches are padded
on the right. The model is left as it was found: hooks removed, ``training`` flags and
``requires_grad`` flags restored, whatever happens.

Scale-out: prompts are scheduled longest first (less padding when several tasks or languages
share batches: ``clean_groups`` / ``corrupted_groups`` give each corrupted prompt the mean of its
own group's clean prompts); under ``torch.distributed`` each rank takes every ``world``-th of
them and the results are all-reduced (:mod:`soteria.distributed`); hooks, baselines and kernels
run on each layer's own device, so models split over devices by accelerate's ``device_map``
(offloaded layers included) work as they are.

Over 400 lines: exact patching and AtP share the hooks, batching and group means that make them
comparable head for head; splitting them would put one algorithm in two places.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

import soteria_kernels

from ..arch import head_sites, unwrap_model
from ..models.state import frozen_eval, input_device
from .distributed import all_gather_object, all_reduce_sum, resolve, shard
from .lastpos import LastToken, decoder_layers
from .prompts import encode_batch, prompt_list

__all__ = ["DEFAULT_BATCH_SIZE", "MEANS", "METHODS", "indirect_effects", "mean_activations"]

METHODS = ("atp", "exact")
# What each corrupted prompt's heads are patched with: its group's mean over all clean prompts
# ("paired"), or over all but its own clean twin (``clean_prompts[i]``; "leave_one_out").
MEANS = ("paired", "leave_one_out")
# Rows per forward pass when ``batch_size`` is None. AtP keeps activations for the backward
# pass, so it takes fewer rows; the exact method runs under no_grad and packs several patched
# copies of the prompts into one pass.
DEFAULT_BATCH_SIZE = {"atp": 8, "exact": 32}
# The exact method's last-token passes (one token per row, over a prefix cache) pack this many
# times ``batch_size`` rows: a row is one token, not a prompt.
LAST_TOKEN_ROWS = 8

Prompt = str | Sequence[int] | torch.Tensor
Progress = Callable[[int], Any] | None


# --------------------------------------------------------------------------- input checks


def _target_ids(tokenizer, targets: Any, n: int) -> torch.Tensor:
    if isinstance(targets, (str, int)) or (isinstance(targets, torch.Tensor) and targets.ndim == 0):
        raise ValueError("targets must be a list with one target per corrupted prompt")
    targets = targets.tolist() if isinstance(targets, torch.Tensor) else list(targets)
    if len(targets) != n:
        raise ValueError(f"got {len(targets)} targets for {n} corrupted prompts; they must match one to one")
    ids = []
    for i, t in enumerate(targets):
        if isinstance(t, str):
            toks = tokenizer(t, add_special_tokens=False)["input_ids"]
            if not toks:
                raise ValueError(f"targets[{i}] = {t!r} tokenises to nothing")
            ids.append(int(toks[0]))
        elif isinstance(t, (int,)) or (isinstance(t, torch.Tensor) and t.ndim == 0):
            ids.append(int(t))
        else:
            seq = t.tolist() if isinstance(t, torch.Tensor) else list(t)
            if not seq:
                raise ValueError(f"targets[{i}] is an empty token-id sequence")
            ids.append(int(seq[0]))
    return torch.tensor(ids, dtype=torch.long)


def _groups(groups: Any, n: int, what: str) -> torch.Tensor:
    """``[n]`` long group labels (all 0 when None)."""
    if groups is None:
        return torch.zeros(n, dtype=torch.long)
    if isinstance(groups, (str, bytes, int)):
        raise ValueError(f"{what} must be a list with one group label per prompt")
    try:
        labels = [int(g) for g in (groups.tolist() if isinstance(groups, torch.Tensor) else groups)]
    except (TypeError, ValueError):
        raise ValueError(f"{what} must hold integer group labels") from None
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} {what} for {n} prompts; they must match one to one")
    if any(g < 0 for g in labels):
        raise ValueError(f"{what} must be non-negative integers, got {min(labels)}")
    return torch.tensor(labels, dtype=torch.long)


def _tokenize(tokenizer, prompts: list, what: str) -> list[list[int]]:
    """Token ids of every prompt: strings with the tokenizer's usual special tokens (as
    :func:`soteria.prompts.encode_batch` does), token-id lists as given."""
    where = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    out = list(prompts)
    if where:
        rows = tokenizer([prompts[i] for i in where], add_special_tokens=True)["input_ids"]
        for i, row in zip(where, rows):
            if not len(row):
                raise ValueError(f"{what}[{i}] = {prompts[i]!r} tokenises to nothing")
            out[i] = [int(t) for t in row]
    return out


def _schedule(ids: list[list[int]], rank: int, world: int) -> list[int]:
    """Indices of the prompts this rank runs, in order: longest first (stable), every
    ``world``-th from position ``rank`` (batches of similar lengths pad little)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    return [order[j] for j in shard(len(order), rank, world)]


def _check_same_everywhere(parts: list) -> None:
    """Every rank must have been given the same prompts, targets and settings."""
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.to(torch.int64).numpy().tobytes())
        elif isinstance(part, list):  # token-id rows
            for row in part:
                h.update(torch.tensor(row, dtype=torch.int64).numpy().tobytes())
                h.update(b"|")
        else:
            h.update(repr(part).encode())
        h.update(b"#")
    digests = all_gather_object(h.hexdigest())
    if len(set(digests)) != 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(
            f"distributed indirect_effects: ranks {differ} were given other prompts, targets, model shape or "
            "settings than rank 0; every rank must call it with the same arguments (it shards them itself), "
            "or pass distributed=False to have each rank run only its own prompts"
        )


def _sites(model: nn.Module):
    sites = head_sites(model)
    if len({s.num_heads for s in sites}) != 1:
        raise ValueError(
            f"indirect_effects needs the same number of heads in every layer; got {[s.num_heads for s in sites]}"
        )
    return sites


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


# --------------------------------------------------------------------------- model plumbing


def _refuse_prompt_learning(model: nn.Module) -> None:
    """Prompt/prefix/p-tuning PEFT adapters put virtual tokens before the input: positions (and
    the last real token) then no longer match the prompts, so such models are refused."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return
    active = getattr(model, "active_adapter", None)
    names = [active] if isinstance(active, str) else list(active or configs)
    for name in names:
        cfg = configs.get(name)
        if getattr(cfg, "is_prompt_learning", False):
            kind = getattr(getattr(cfg, "peft_type", None), "value", type(cfg).__name__)
            raise ValueError(
                f"adapter {name!r} is a prompt-learning adapter ({kind}): its virtual tokens shift every position, "
                "so head attribution cannot be read at the prompts' last token; merge or remove it, or score the base "
                "model (model.get_base_model())"
            )


@contextlib.contextmanager
def _pre_hooks(sites, make_hook: Callable[[int, Any], Callable]):
    handles = []
    try:
        for layer, site in enumerate(sites):
            handles.append(site.module.register_forward_pre_hook(make_hook(layer, site), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _projection_input(args: tuple, kwargs: dict, site, batch: int) -> torch.Tensor:
    if not args or not isinstance(args[0], torch.Tensor):
        raise ValueError(f"{site.name}: expected its input as the first positional argument")
    z = args[0]
    width = site.num_heads * site.head_dim
    if z.ndim != 3 or z.shape[0] != batch or z.shape[-1] != width:
        raise ValueError(f"{site.name}: expected an input [batch={batch}, seq, {width}], got {tuple(z.shape)}")
    return z


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the causal LM under any PEFT / torch.compile wrapper (which pass keyword
    arguments through) takes ``logits_to_keep``."""
    try:
        return "logits_to_keep" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic forward
        return False


def _encode(tokenizer, prompts: list[list[int]], device: torch.device):
    ids, mask, last = encode_batch(tokenizer, prompts, padding_side="right")
    return ids.to(device), mask.to(device), last.to(torch.long).cpu()


def _target_probs(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, last: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """``[B]``: p(target) at each row's last real token (softmax of fp32 or fp64 logits)."""
    kwargs: dict[str, Any] = dict(input_ids=ids, attention_mask=mask, use_cache=False)
    col = last
    if _accepts_logits_to_keep(model):
        keep = torch.unique(last)  # sorted positions shared by the batch: no [B, T, V] logits
        kwargs["logits_to_keep"] = keep.to(ids.device)
        col = torch.searchsorted(keep, last)
    logits = model(**kwargs).logits
    rows = torch.arange(len(last), device=logits.device)
    return _probs(logits[rows, col.to(logits.device)], targets)


def _probs(sel: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: p(target) from ``[B, V]`` logits (softmax in fp32, fp64 for fp64 models)."""
    sel = sel.to(torch.promote_types(sel.dtype, torch.float32))
    tgt = targets.to(sel.device)
    if int(tgt.max()) >= sel.shape[-1] or int(tgt.min()) < 0:
        raise ValueError(f"target token id out of range for the model's {sel.shape[-1]} logits")
    return sel.log_softmax(-1).gather(1, tgt[:, None]).squeeze(1).exp()


# --------------------------------------------------------------------------- the three passes


def _group_means(model, tokenizer, ids, groups, n_groups, bs, sites, rank, world, progress=None) -> list[torch.Tensor]:
    """``[G, H*D]`` per layer: mean over each group's prompts of the o_proj input at the last
    real token (fp32; fp64 for fp64 models), on that layer's device. Sharded and all-reduced
    (in fp64) when ``world > 1``. ``progress`` gets the share of this rank's pass each batch
    finished (the shares add up to 1)."""
    mine = _schedule(ids, rank, world)
    sums: list[torch.Tensor | None] = [None] * len(sites)
    device = input_device(model)
    state: dict[str, Any] = {}

    def make_hook(layer, site):
        def hook(module, args, kwargs):
            z = _projection_input(args, kwargs, site, state["B"])
            last = state["last"].to(z.device)
            rows = torch.arange(z.shape[0], device=z.device)
            s = z[rows, last].to(torch.promote_types(z.dtype, torch.float32))  # [B, H*D]
            if n_groups == 1:
                acc = s.sum(0, keepdim=True)
            else:
                acc = s.new_zeros(n_groups, s.shape[-1]).index_add_(0, state["groups"].to(z.device), s)
            sums[layer] = acc if sums[layer] is None else sums[layer] + acc.to(sums[layer].device)

        return hook

    with frozen_eval(model, grad=False), _pre_hooks(sites, make_hook):
        for a, b in _batches(len(mine), bs):
            rows = mine[a:b]
            batch_ids, mask, last = _encode(tokenizer, [ids[i] for i in rows], device)
            state.update(B=b - a, last=last, groups=groups[rows])
            model(input_ids=batch_ids, attention_mask=mask, use_cache=False, **_one_logit(model))
            if progress is not None:
                progress((b - a) / len(mine))
    if progress is not None and not mine:  # a rank without clean prompts: its pass is done at once
        progress(1.0)
    if mine and any(s is None for s in sums):
        raise RuntimeError("an output projection was never called during the forward pass")
    counts = torch.bincount(groups, minlength=n_groups).clamp_min(1)  # every rank knows all prompts
    width = sites[0].num_heads * sites[0].head_dim
    out = []
    for layer, s in enumerate(sums):
        dtype = s.dtype if s is not None else torch.promote_types(sites[layer].weight.dtype, torch.float32)
        if world > 1:  # a rank with no prompts adds zeros; the sum runs in fp64
            s = all_reduce_sum(s if s is not None else torch.zeros(n_groups, width, dtype=dtype), dtype=torch.float64)
        out.append((s / counts[:, None].to(s.device, s.dtype)).to(dtype))
    return out


def mean_activations(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    batch_size: int | None = None,
    sites=None,
    distributed: bool | None = None,
) -> list[torch.Tensor]:
    """Mean over ``prompts`` of each layer's output-projection input at the last real token.

    Returns one ``[H*D]`` tensor per layer (fp32; fp64 for fp64 models), on the device that
    layer's input lives on. ``distributed``: see :func:`indirect_effects`.
    """
    prompts = prompt_list(prompts, "clean_prompts")
    rank, world = resolve(distributed)
    sites = sites if sites is not None else _sites(model)
    ids = _tokenize(tokenizer, prompts, "clean_prompts")
    groups = torch.zeros(len(ids), dtype=torch.long)
    bs = batch_size or DEFAULT_BATCH_SIZE["exact"]
    with torch.inference_mode(False):
        return [m[0] for m in _group_means(model, tokenizer, ids, groups, 1, bs, sites, rank, world)]


def _leave_one_out(own: list[torch.Tensor], groups: torch.Tensor) -> list[torch.Tensor]:
    """``[N, H*D]`` per layer: row ``i`` is the mean of ``own`` (``[N, H*D]``, one row per clean
    prompt) over the other rows of group ``groups[i]``; summed in fp64, cast back."""
    counts = torch.bincount(groups)
    out = []
    for z in own:
        g = groups.to(z.device)
        z64 = z.double()
        sums = z64.new_zeros(len(counts), z.shape[-1]).index_add_(0, g, z64)
        out.append(((sums[g] - z64) / (counts.to(z.device)[g, None] - 1)).to(z.dtype))
    return out


def _check_means(means: str, clean: list, corrupted: list, cg: torch.Tensor, kg: torch.Tensor) -> None:
    if means not in MEANS:
        raise ValueError(f"means must be one of {MEANS}, got {means!r}")
    if means == "paired":
        return
    if len(clean) != len(corrupted) or not torch.equal(cg, kg):
        raise ValueError(f"means='leave_one_out' needs clean_prompts[i] to be the clean twin of corrupted_prompts[i]"
                         f" (as many, same groups); got {len(clean)} clean, {len(corrupted)} corrupted")  # fmt: skip
    small = [g for g, c in enumerate(torch.bincount(cg).tolist()) if c == 1]
    if small:
        raise ValueError(f"means='leave_one_out' needs at least 2 clean prompts per group; group {small[0]} has 1")


def _mean_share(method: str, sites) -> float:
    """The clean mean pass's share of a trial's work, for progress: one forward pass per clean
    prompt against a corrupted prompt's forward and backward pass (AtP, about three forwards)
    or its ``L*H + 1`` patched and unpatched rows (exact)."""
    return 0.25 if method == "atp" else 1.0 / (len(sites) * sites[0].num_heads + 2)


def _scaled(progress: Progress, factor: float) -> Progress:
    return None if progress is None else (lambda n: progress(n * factor))


def _one_logit(model) -> dict:
    return {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}


def _baseline(means: torch.Tensor, groups: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[H*D]`` for one group (the kernel broadcasts it), else ``[B, H*D]``: each row's group mean."""
    means = means.to(device, torch.float32)
    return means[0] if means.shape[0] == 1 else means[groups.to(device)]


def _atp(model, tokenizer, sites, means, prompts, groups, targets, bs, progress) -> torch.Tensor:
    n, L, H = len(prompts), len(sites), sites[0].num_heads
    out = torch.empty(n, L, H, dtype=torch.float32)
    device = input_device(model)
    state: dict[str, Any] = {}

    def make_hook(layer, site):
        def hook(module, args, kwargs):
            z = _projection_input(args, kwargs, site, state["B"])
            if state["deltas"][layer] is not None:
                raise RuntimeError(f"{site.name} was called twice in one forward pass")
            last = state["last"].to(z.device)
            rows = torch.arange(z.shape[0], device=z.device)
            # A zero leaf added at the last real token only, on this layer's device; z itself
            # stays in the graph so the gradient also flows through later layers.
            delta = torch.zeros(z.shape[0], z.shape[-1], dtype=torch.float32, device=z.device, requires_grad=True)
            state["deltas"][layer] = delta
            state["acts"][layer] = z[rows, last].detach().float()  # [B, H*D], fp32 like the grads
            return (z.index_put((rows, last), delta.to(z.dtype), accumulate=True), *args[1:]), kwargs

        return hook

    with frozen_eval(model, grad=True), _pre_hooks(sites, make_hook):
        for a, b in _batches(n, bs):
            ids, mask, last = _encode(tokenizer, prompts[a:b], device)
            state.update(B=b - a, last=last, deltas=[None] * L, acts=[None] * L)
            metric = _target_probs(model, ids, mask, last, targets[a:b]).sum()
            if any(d is None for d in state["deltas"]):
                raise RuntimeError("an output projection was never called during the forward pass")
            grads = torch.autograd.grad(metric, state["deltas"], allow_unused=True)
            for layer, (act, g) in enumerate(zip(state["acts"], grads)):
                if g is None:  # this layer cannot reach the metric
                    out[a:b, layer] = 0.0
                    continue
                scores = soteria_kernels.head_attribution(
                    act, g, num_heads=H, baseline=_baseline(means[layer], groups[a:b], act.device)
                )
                out[a:b, layer] = scores.float().cpu()
            state.update(deltas=None, acts=None)
            del metric, grads
            if progress is not None:
                progress(b - a)
    return out


def _patch_hooks(sites, means, state: dict) -> Callable:
    """o_proj pre-hooks for ``_pre_hooks``: ``state["plan"][layer] = (rows, positions, heads, groups)``
    sets head ``heads[k]`` of row ``rows[k]`` at ``positions[k]`` to its group's mean."""

    def make_hook(layer, site):
        D = site.head_dim

        def hook(module, args, kwargs):
            z = _projection_input(args, kwargs, site, state["B"])
            plan = state["plan"].get(layer)
            if plan is None:
                return None
            rows, pos, heads, grp = (t.to(z.device) for t in plan)
            cols = heads[:, None] * D + torch.arange(D, device=z.device)  # [k, D]
            z = z.clone()
            z[rows[:, None], pos[:, None], cols] = means[layer].to(z.device)[grp[:, None], cols].to(z.dtype)
            return (z, *args[1:]), kwargs

        return hook

    return make_hook


def _plans(pairs, B: int, reps: int, at: Callable, groups: torch.Tensor):
    """Passes of up to ``reps`` patched copies of a ``B``-prompt batch: ``(pairs of the pass,
    plan)``; copy ``j`` of every prompt patches ``pairs[j]`` where ``at(copies, prompts)`` says
    (``(rows, positions)`` of the o_proj input)."""
    prompt = torch.arange(B)
    for p0 in range(0, len(pairs), reps):
        group = pairs[p0 : p0 + reps]
        plan: dict[int, list[list[int]]] = {}
        for j, (layer, h) in enumerate(group):
            entry = plan.setdefault(layer, [[], []])
            entry[0].append(j)
            entry[1].append(h)
        out = {}
        for layer, (copies, heads) in plan.items():
            copy = torch.tensor(copies).repeat_interleave(B)
            rows, pos = at(copy, prompt.repeat(len(copies)))
            out[layer] = (rows, pos, torch.tensor(heads).repeat_interleave(B), groups.repeat(len(copies)))
        yield group, out


def _full_batch(model, state, pairs, ids, mask, last, groups, tgt, bs, record, progress) -> None:
    """Every patched copy runs the whole prompt (the reference path: nothing cached)."""
    B = len(last)
    state.update(B=B, plan={})
    base = _target_probs(model, ids, mask, last, tgt).cpu()
    for group, plan in _plans(pairs, B, max(1, bs // B), lambda j, i: (j * B + i, last[i]), groups):
        r = len(group)
        state.update(B=r * B, plan=plan)
        p = _target_probs(model, ids.repeat(r, 1), mask.repeat(r, 1), last.repeat(r), tgt.repeat(r)).cpu()
        record(group, p.view(r, B) - base)
        if progress is not None:  # fractions of prompts, so a bar moves between batches
            progress(B * r / len(pairs))
    state["plan"] = {}


def _kv_batch(runner: LastToken, state, pairs, groups, tgt, rows, record, progress) -> None:
    """Every patched copy runs the last token only, over the prefix cache, from the patched
    layer up (the layers below it return their unpatched outputs where the family allows)."""
    B = runner.B
    state.update(B=B, plan={})
    base = _probs(runner.run(1, record=True), tgt).cpu()  # also picks the layout (runner.at)
    for group, plan in _plans(pairs, B, max(1, rows // B), runner.at, groups):
        r = len(group)
        state.update(B=runner.batch(r), plan=plan)
        below = group[0][0] if runner.can_skip else 0  # pairs go layer by layer: the lowest
        p = _probs(runner.run(r, skip_below=below), tgt.repeat(r)).cpu()
        record(group, p.view(r, B) - base)
        if progress is not None:
            progress(B * r / len(pairs))
    state["plan"] = {}


def _exact(model, tokenizer, sites, means, prompts, groups, targets, bs, progress, *, kv=True) -> torch.Tensor:
    n, L, H = len(prompts), len(sites), sites[0].num_heads
    out = torch.empty(n, L, H, dtype=torch.float32)
    device = input_device(model)
    pairs = [(layer, h) for layer in range(L) for h in range(H)]  # layer by layer (skip_below)
    state: dict[str, Any] = {"plan": {}}
    layers = decoder_layers(model, sites) if kv else None
    rows = bs * LAST_TOKEN_ROWS
    with frozen_eval(model, grad=False), _pre_hooks(sites, _patch_hooks(sites, means, state)):
        for a, b in _batches(n, bs):

            def record(group, effects, a=a, b=b):
                for j, (layer, h) in enumerate(group):
                    out[a:b, layer, h] = effects[j]

            state.update(B=1, plan={})  # the prefill runs one prompt at a time
            runner = kv and LastToken.prefill(model, prompts[a:b], layers, device, _one_logit(model))
            if runner:
                _kv_batch(runner, state, pairs, groups[a:b], targets[a:b], rows, record, progress)
            else:
                ids, mask, last = _encode(tokenizer, prompts[a:b], device)
                _full_batch(model, state, pairs, ids, mask, last, groups[a:b], targets[a:b], bs, record, progress)
    return out


def indirect_effects(
    model: nn.Module,
    tokenizer,
    clean_prompts: Sequence[Prompt],
    corrupted_prompts: Sequence[Prompt],
    targets: Sequence[str | int | Sequence[int]],
    *,
    method: str = "atp",
    batch_size: int | None = None,
    progress: Progress = None,
    clean_groups: Sequence[int] | None = None,
    corrupted_groups: Sequence[int] | None = None,
    distributed: bool | None = None,
    means: str = "paired",
) -> torch.Tensor:
    """Each head's indirect effect on ``p(target)`` for each corrupted prompt.

    Args:
        clean_prompts: strings or token-id sequences (ids are used exactly as given); the mean
            head activations ``a_bar`` are taken over their last real tokens.
        corrupted_prompts: ``N`` prompts on which the heads are patched.
        targets: ``N`` targets, strings (tokenised without special tokens; include the leading
            space yourself) or token ids; only the first token counts.
        method: ``"atp"`` (attribution patching, one forward + one backward pass per batch) or
            ``"exact"`` (activation patching, equal to patching one head at a time: each
            prompt's prefix runs once with a KV cache, then ``L*H + 1`` last-token rows per
            prompt, many per pass, each from its patched layer up; see :mod:`.lastpos`).
            ``"exact_full"`` is the same method without the cache (every patched copy runs the
            whole prompt through every layer): the slow reference for tests and benchmarks.
        batch_size: rows per forward pass (default ``DEFAULT_BATCH_SIZE[method]``); the exact
            method's last-token passes take ``LAST_TOKEN_ROWS`` times as many one-token rows.
        progress: called with the number of corrupted prompts finished (a fraction of one with
            the exact method) after each forward pass; e.g. a ``tqdm`` bar's ``update``. The
            clean mean pass, which runs first, counts for a share of each (:func:`_mean_share`),
            so a bar moves from the start; the calls add up to the number of corrupted prompts
            (this rank's, under ``torch.distributed``).
        clean_groups, corrupted_groups: optional integer labels (one per prompt) for running
            several tasks or languages in shared batches: corrupted prompt ``i`` is patched with
            the mean over the clean prompts of group ``corrupted_groups[i]`` (each row's result
            equals a separate call with that group alone, up to float rounding). Default: one group.
        distributed: None (default) shards the prompts over the ``torch.distributed`` process
            group when one is initialised; False ignores it; True requires it. Every rank must
            pass the same arguments (checked) and gets the same result; prompt ``j`` of the
            longest-first order runs on rank ``j % world_size``, clean sums are all-reduced in
            fp64, and each row of the result is computed by exactly one rank.
        means: ``"paired"`` (default): corrupted prompt ``i`` is patched with its group's mean
            over all its clean prompts, its own clean twin included; ``"leave_one_out"``: over
            all but ``clean_prompts[i]``, which must then be its twin (``N`` clean prompts, the
            same groups, at least 2 per group). The same forward passes either way.

    Returns:
        float32 ``[N, L, H]`` on the CPU.
    """
    if method not in (*METHODS, "exact_full"):
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    _refuse_prompt_learning(model)
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    clean = prompt_list(clean_prompts, "clean_prompts")
    corrupted = prompt_list(corrupted_prompts, "corrupted_prompts")
    cg = _groups(clean_groups, len(clean), "clean_groups")
    kg = _groups(corrupted_groups, len(corrupted), "corrupted_groups")
    orphans = sorted(set(kg.tolist()) - set(cg.tolist()))
    if orphans:
        raise ValueError(f"corrupted_groups {orphans} have no clean prompts to take the mean activations from")
    _check_means(means, clean, corrupted, cg, kg)
    n_groups = int(max(cg.max(), kg.max())) + 1
    rank, world = resolve(distributed)
    bs = int(batch_size or DEFAULT_BATCH_SIZE["exact" if method == "exact_full" else method])
    sites = _sites(model)
    run = {"atp": _atp, "exact": _exact, "exact_full": functools.partial(_exact, kv=False)}[method]
    # Under a caller's inference_mode every new tensor would be an inference tensor, which
    # autograd refuses to save; leave it for the duration (a no-op otherwise).
    with torch.inference_mode(False):
        tgt = _target_ids(tokenizer, targets, len(corrupted))
        clean_ids = _tokenize(tokenizer, clean, "clean_prompts")
        corrupted_ids = _tokenize(tokenizer, corrupted, "corrupted_prompts")
        if world > 1:
            shape = (len(sites), sites[0].num_heads, sites[0].head_dim)
            _check_same_everywhere([clean_ids, corrupted_ids, tgt, cg, kg, method, bs, shape, means])
        mine = torch.tensor(_schedule(corrupted_ids, rank, world), dtype=torch.long)
        share = _mean_share(method, sites)  # of each corrupted prompt's count, for the clean mean pass
        mean_progress = _scaled(progress, share * len(mine))
        if means == "paired":
            baselines = _group_means(model, tokenizer, clean_ids, cg, n_groups, bs, sites, rank, world, mean_progress)
            index = kg  # row i takes its group's mean
        else:  # each clean prompt as its own group: its activation; then the others' mean
            own = _group_means(model, tokenizer, clean_ids, torch.arange(len(clean)), len(clean), bs, sites, rank,
                               world, mean_progress)  # fmt: skip
            baselines, index = _leave_one_out(own, cg), torch.arange(len(clean))  # row i takes its own
        rows = [corrupted_ids[i] for i in mine.tolist()]
        part = run(model, tokenizer, sites, baselines, rows, index[mine], tgt[mine], bs, _scaled(progress, 1 - share))
        out = torch.zeros(len(corrupted), len(sites), sites[0].num_heads, dtype=torch.float32)
        out[mine] = part
        if world > 1:  # each row is non-zero on one rank only, so the sum is exact
            out = all_reduce_sum(out)
        return out
