"""Last-token forward passes over a prefix KV cache: the plumbing of fast exact patching.

Patching head ``h`` of layer ``l`` at a prompt's last position changes nothing at the earlier
positions, nor anything below layer ``l`` at the last one. So :class:`LastToken` runs a batch of
prompts' prefixes (every token but the last) once with a ``DynamicCache``, and each later pass
runs only the last token of ``reps`` copies of the batch against that cache:

- each prefix runs alone, unpadded; the caches are then padded on the **left** (zero keys and
  values, masked out), so every last token sits in the same cache slot and slot distances are
  true distances (sliding-window masks stay right); ``position_ids`` are passed explicitly
  (absolute and rotary positions stay right);
- a pass of ``reps`` copies puts them either as ``reps`` query positions of each prompt's
  batch row (the ``"copies"`` layout: a 4-D mask lets each see the prefix and itself only,
  the cache keeps ``B`` rows) or as ``reps * B`` batch rows (the ``"rows"`` layout: each
  layer's cache is the prefix repeated ``reps`` times, set just before that layer runs). Either
  way every layer's cache is put back to the prefix just after the layer runs, so the prefix is
  never changed and at most one layer's grown keys and values exist at a time;
- with ``skip_below=l`` the decoder layers below ``l`` do not run: each returns the output it
  gave in the unpatched pass (recorded by :meth:`LastToken.run` with ``record=True``), repeated.
  This needs decoder layers that return a plain tensor; :attr:`LastToken.can_skip` says whether
  they did (Falcon, BLOOM and MPT return tuples: their passes run every layer).

:meth:`LastToken.prefill` returns None where this cannot be done honestly (a cache other than
``DynamicCache`` with plain or sliding-window layers, cache layers that do not match the
decoder layers, a transformers that returns no ``cache`` field, as 4.x names it
``past_key_values``); the caller then runs whole prompts. The model is left as it was found.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..arch import unwrap_model

__all__ = ["LastToken", "decoder_layers"]


@functools.lru_cache(maxsize=1)
def _cache_types() -> tuple | None:
    """``(DynamicCache, DynamicLayer, DynamicSlidingWindowLayer)``, the layered cache of transformers
    >= 4.56 / 5, imported on first use (importing soteria does not import transformers); None for
    an older transformers, where exact patching runs whole prompts."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
    except ImportError:  # pragma: no cover
        return None
    return DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


def _sliding(layer) -> bool:
    return isinstance(layer, _cache_types()[2])


_ABSENT = object()


def decoder_layers(model: nn.Module, sites) -> list[nn.Module] | None:
    """The decoder layer holding each head site (the element of the layers ``ModuleList``
    whose index is the site's layer), or None where the site names do not show one."""
    root = unwrap_model(model)
    out = []
    for site in sites:
        parts = site.name.split(".")
        found = None
        for k, part in enumerate(parts):
            if part != str(site.layer):
                continue
            parent = root.get_submodule(".".join(parts[:k])) if k else root
            if isinstance(parent, (nn.ModuleList, nn.Sequential)):
                found = parent[site.layer]
                break
        if found is None:
            return None
        out.append(found)
    return out


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[1, kv, n, D]`` keys or values -> ``[1, kv, width, D]``: the last ``width`` slots, zeros before."""
    t = t[:, :, -width:]
    return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))


def _stub(output: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return output


class LastToken:
    """A batch of prompts' prefix cache, and last-token passes of ``reps`` copies of the batch.

    Two layouts of a pass, chosen once by :meth:`run` with ``record=True``:

    - ``"copies"``: the ``reps`` copies of prompt ``i`` are ``reps`` query positions of batch
      row ``i``, all at the last token's position, each attending to the prefix and to itself
      only (a 4-D mask, per layer kind where sliding and full layers mix). The cache keeps ``B``
      rows: nothing is copied per copy, and attention runs as a matrix product. Used where a
      probe shows the copies cannot see each other (copy 1's logits bitwise unchanged when
      copy 0's token changes) and match the unpatched pass.
    - ``"rows"``: copy ``j`` of prompt ``i`` is batch row ``j * B + i`` with the prefix cache
      repeated ``reps`` times, one layer at a time (every family whose cache this class takes).

    :meth:`at` maps (copy, prompt) to the (row, position) of the o_proj input to patch.
    """

    def __init__(self, model, layers, cache, snapshot, last_ids, last_pos, prefix_mask, call_kwargs):
        self.model, self.layers, self.cache, self.snapshot = model, layers, cache, snapshot
        self.last_ids, self.last_pos, self.prefix_mask = last_ids, last_pos, prefix_mask
        self.call_kwargs = call_kwargs
        self.B = len(last_ids)
        self.outputs: list[torch.Tensor] | None = None  # each layer's unpatched output [B, 1, d]
        self.can_skip = False
        self.layout = "rows"

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], layers, device, call_kwargs: dict):
        """Run the prefixes of ``prompts`` (token-id lists of 2+ tokens) with a cache; None where
        the model's cache is not one this class can repeat and restore.

        Each prefix runs alone (no padding, so no query row is fully masked: fp64 eager attention
        turns such rows into NaNs that would reach the cache), then the caches are padded on the
        left with zero keys and values, masked out, into one batch cache."""
        types = _cache_types()
        if types is None or layers is None or any(len(p) < 2 for p in prompts):
            return None
        caches = []
        for p in prompts:
            ids = torch.tensor([p[:-1]], dtype=torch.long, device=device)
            cache = getattr(model(input_ids=ids, use_cache=True, **call_kwargs), "cache", None)
            if not isinstance(cache, types[0]) or len(cache.layers) != len(layers):
                return None
            if not all(type(c) in types[1:] and c.is_initialized for c in cache.layers):
                return None
            caches.append(cache)
        P = max(len(p) - 1 for p in prompts)
        snapshot = []
        for j, c in enumerate(caches[0].layers):
            sliding = _sliding(c)
            width = min(P, c.sliding_window - 1) if sliding else P  # slots a layer keeps
            parts = [(cache.layers[j].keys, cache.layers[j].values) for cache in caches]
            keys, values = (torch.cat([_left_pad(t[i], width) for t in parts], 0) for i in (0, 1))
            snapshot.append((keys, values, P if sliding else None))
        mask = torch.zeros(len(prompts), P, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            mask[i, P + 1 - len(p) :] = 1
        last_ids = torch.tensor([p[-1] for p in prompts], dtype=torch.long, device=device)
        last_pos = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long, device=device)
        return cls(model, layers, caches[0], snapshot, last_ids, last_pos, mask, call_kwargs)

    def at(self, copy: torch.Tensor, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, position) in the o_proj input of copy ``copy`` of prompt ``prompt``."""
        if self.layout == "copies":
            return prompt, copy
        return copy * self.B + prompt, torch.zeros_like(copy)

    def batch(self, reps: int) -> int:
        """Batch rows of a pass of ``reps`` copies."""
        return self.B if self.layout == "copies" and reps > 1 else reps * self.B

    def _restore(self, j: int) -> None:
        c, (k, v, n) = self.cache.layers[j], self.snapshot[j]
        c.keys, c.values = k, v
        if n is not None:
            c.cumulative_length = n

    def _copies_mask(self, reps: int):
        """Additive ``[B, 1, reps, kept + reps]`` mask(s): each copy sees the prefix and itself."""
        dtype = self.snapshot[0][0].dtype
        masks = {}
        for c, (k, _, _) in zip(self.cache.layers, self.snapshot):
            kind = "sliding_attention" if _sliding(c) else "full_attention"
            kept = k.shape[-2]
            if kind in masks:
                if masks[kind].shape[-1] != kept + reps:
                    raise RuntimeError("cache layers of one kind keep different lengths")
                continue
            seen = self.prefix_mask[:, self.prefix_mask.shape[1] - kept :].bool()[:, None].expand(-1, reps, -1)
            own = torch.eye(reps, dtype=torch.bool, device=seen.device)[None].expand(self.B, -1, -1)
            allowed = torch.cat([seen, own], -1)[:, None]
            masks[kind] = torch.zeros(allowed.shape, dtype=dtype, device=seen.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min
            )
        return next(iter(masks.values())) if len(masks) == 1 else masks

    @contextlib.contextmanager
    def _plumbing(self, reps: int, copies: bool, skip_below: int, record: bool) -> Iterator[dict]:
        handles, stubbed = [], []
        seen: dict[str, Any] = {"ran": set(), "tensor_out": True}
        grow = reps if copies else 1

        def pre(j):
            def hook(module, args, kwargs):
                k, v, n = self.snapshot[j]
                c = self.cache.layers[j]
                c.keys, c.values = (k, v) if copies or reps == 1 else (k.repeat(reps, 1, 1, 1), v.repeat(reps, 1, 1, 1))
                if n is not None:
                    c.cumulative_length = n

            return hook

        def post(j):
            def hook(module, args, output):
                c, (k, _, n) = self.cache.layers[j], self.snapshot[j]
                grown = c.cumulative_length - n if n is not None else c.keys.shape[-2] - k.shape[-2]
                if grown != grow:
                    raise RuntimeError(f"decoder layer {j} did not append {grow} token(s) to cache layer {j}")
                seen["ran"].add(j)
                if record:
                    ok = isinstance(output, torch.Tensor) and output.shape[:2] == (self.B, 1)
                    seen["tensor_out"] &= ok
                    seen.setdefault("outputs", {})[j] = output.detach().clone() if ok else None
                self._restore(j)

            return hook

        try:
            for j in range(len(self.layers)):  # the mask is sized from the cache before any layer runs
                self._restore(j)
            for j, layer in enumerate(self.layers):
                if j < skip_below:
                    out = self.outputs[j]
                    out = out.expand(-1, reps, -1) if copies else out.repeat(reps, 1, 1)
                    stubbed.append((layer, layer.__dict__.get("forward", _ABSENT)))
                    layer.forward = functools.partial(_stub, out)
                    continue
                handles.append(layer.register_forward_pre_hook(pre(j), with_kwargs=True))
                handles.append(layer.register_forward_hook(post(j)))
            yield seen
        finally:
            for h in handles:
                h.remove()
            for layer, fwd in stubbed:
                if fwd is _ABSENT:
                    del layer.forward
                else:
                    layer.forward = fwd
            for j in range(len(self.layers)):
                self._restore(j)

    def run(self, reps: int = 1, *, skip_below: int = 0, record: bool = False, ids=None) -> torch.Tensor:
        """``[reps * B, V]`` logits of the last token, row ``j * B + i`` for copy ``j`` of prompt
        ``i`` in either layout. ``record`` (unpatched, ``reps=1``, once, first) keeps each
        layer's output for ``skip_below`` and chooses the layout. ``ids``: ``[B, reps]`` tokens
        in place of the last ones (the layout probe)."""
        if skip_below and not self.can_skip:
            raise RuntimeError("skip_below needs a recorded unpatched pass whose layers returned tensors")
        copies = self.layout == "copies" and reps > 1
        B = self.B
        if copies:
            kwargs = dict(
                input_ids=ids if ids is not None else self.last_ids[:, None].expand(-1, reps),
                attention_mask=self._copies_mask(reps),
                position_ids=self.last_pos[:, None].expand(-1, reps),
            )  # every copy's logits are needed: no logits_to_keep
        else:
            kwargs = dict(
                input_ids=(ids.t().reshape(-1) if ids is not None else self.last_ids.repeat(reps))[:, None],
                attention_mask=torch.cat([self.prefix_mask, self.prefix_mask.new_ones(B, 1)], 1).repeat(reps, 1),
                position_ids=self.last_pos.repeat(reps)[:, None],
                **self.call_kwargs,
            )
        with self._plumbing(reps, copies, skip_below, record) as seen:
            logits = self.model(**kwargs, cache=self.cache, use_cache=True).logits
        if seen["ran"] != set(range(skip_below, len(self.layers))):
            raise RuntimeError("not every decoder layer ran in the last-token pass")
        logits = logits.transpose(0, 1).reshape(reps * B, -1) if copies else logits[:, -1]
        if record:
            outs = seen.get("outputs", {})
            self.can_skip = seen["tensor_out"] and len(outs) == len(self.layers)
            self.outputs = [outs[j] for j in range(len(self.layers))] if self.can_skip else None
            self.layout = "copies" if self.can_skip and self._copies_work(logits) else "rows"
        return logits

    def _copies_work(self, base: torch.Tensor) -> bool:
        """Two probe passes of 2 copies that differ only in copy 0's token: copy 1 must come out
        bitwise the same in both (it cannot see copy 0) and match the unpatched pass."""
        self.layout = "copies"
        try:
            a, b = (
                self.run(2, ids=torch.stack([torch.where(self.last_ids == t, t + 1, t), self.last_ids], 1))[self.B :]
                for t in (0, 2)
            )
        except Exception:  # a family that takes no 4-D mask, or a mask dict; the rows layout serves it
            return False
        finally:
            self.layout = "rows"
        wide = self.snapshot[0][0].dtype.itemsize >= 4  # fp32 / fp64 model, else 16-bit rounding
        a, b, base = (t.to(torch.promote_types(t.dtype, torch.float32)) for t in (a, b, base))
        tol = (1e-3 if wide else 5e-2) * base.abs().max()
        return bool(torch.equal(a, b) and (a - base).abs().max() <= tol)
