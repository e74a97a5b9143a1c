"""Comparison helpers for kernel tests: float64 oracles, per-dtype tolerances, exact-bit checks."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Attribution: inputs are rounded to the dtype before the oracle sees them, so the only error
# is fp32 accumulation over D terms; scaled by the sum of |terms|.
ATTR_RTOL = {torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def assert_close_report(actual: torch.Tensor, expected: torch.Tensor, *, atol, rtol=0.0, what="output"):
    """``|a - e| <= atol + rtol * |e|`` elementwise (atol may be a tensor); names the worst element."""
    actual = actual.double()
    expected = expected.double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), (
        f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    )
    err = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    excess = err - bound
    if (excess > 0).any():
        i = int(torch.argmax(excess.flatten()))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), actual.shape))
        raise AssertionError(
            f"{what}: {int((excess > 0).sum())} of {err.numel()} elements out of tolerance; worst at {idx}: "
            f"got {actual[idx].item():.9g}, expected {expected[idx].item():.9g}, err {err[idx].item():.3g} "
            f"> bound {bound.flatten()[i].item() if torch.is_tensor(bound) else bound:.3g}"
        )


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, for exact (NaN-safe, -0.0-aware) comparisons."""
    int_dtype = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(int_dtype)


def assert_bit_identical(actual: torch.Tensor, expected: torch.Tensor, what="tensor"):
    diff = bits(actual) != bits(expected)
    if diff.any():
        where = torch.nonzero(diff)[:5].tolist()
        raise AssertionError(f"{what}: {int(diff.sum())} elements changed that must be bit-identical, e.g. at {where}")
