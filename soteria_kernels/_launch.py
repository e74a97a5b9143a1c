"""Small launch helpers shared by the kernel launchers."""

from __future__ import annotations

import functools

import torch


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device`` (4 for the CPU interpreter: fewer, longer programs)."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def collapse_rows(
    shape: tuple[int, ...], *strides: tuple[int, ...]
) -> tuple[tuple[int, int], list[tuple[int, int]]] | None:
    """Folds the leading (row) dims of several same-shaped views into at most two dims.

    ``shape`` is the leading shape (the last, head dim excluded); each entry of ``strides``
    gives one tensor's strides for those dims. Adjacent dims merge when they do so in every
    tensor (``stride[i] == stride[i+1] * shape[i+1]``); size-1 dims drop. Returns
    ``((n0, n1), [(s0, s1), ...])`` so that row ``r`` sits at ``(r // n1) * s0 + (r % n1) * s1``,
    or None when more than two dims remain (the caller then copies).
    """
    dims = [(n, [s[i] for s in strides]) for i, n in enumerate(shape) if n != 1]
    merged: list[tuple[int, list[int]]] = []
    for n, st in dims:
        if merged:
            pn, pst = merged[-1]
            if all(ps == s * n for ps, s in zip(pst, st)):
                merged[-1] = (pn * n, st)
                continue
        merged.append((n, st))
    if len(merged) > 2:
        return None
    while len(merged) < 2:
        merged.insert(0, (1, [0] * len(strides)))
    (n0, st0), (n1, st1) = merged
    return (n0, n1), [(a, b) for a, b in zip(st0, st1)]
