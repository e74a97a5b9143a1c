"""masked_head_update_ / masked_head_steer_: Triton (interpreted) and eager vs a float64 oracle."""

import math

import pytest
import torch

import soteria_kernels as sk
from soteria_kernels._contract import has_internal_overlap
from tests.kernel_utils import DTYPES, assert_bit_identical, assert_close_report


@pytest.fixture(params=["triton", "eager"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", request.param)
    return request.param


def _oracle(weight, other, heads, head_dim, scales, head_axis, fused):
    """Dense float64 formula of the paper: ``W - scale * (M * tau)``, rounded once."""
    w = weight.double()
    tau = other.double() - w if fused else other.double()
    axis = head_axis % 2
    m = torch.zeros(weight.shape[axis], dtype=torch.float64)
    for h, s in zip(heads, scales):
        m[h * head_dim : (h + 1) * head_dim] = s
    m = m[None, :] if axis == 1 else m[:, None]
    return (w - m * tau).to(weight.dtype)


def _selected(weight, heads, head_dim, head_axis):
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    for h in heads:
        if head_axis % 2 == 1:
            mask[:, h * head_dim : (h + 1) * head_dim] = True
        else:
            mask[h * head_dim : (h + 1) * head_dim, :] = True
    return mask


def _tolerance(weight, other, expected, scales_dense, fused):
    """One ulp of the result in the weight dtype, plus fp32 rounding of the operands
    (``scale`` and ``scale * tau`` are rounded to fp32 before the subtraction)."""
    w = weight.double()
    tau = other.double() - w if fused else other.double()
    f32 = torch.finfo(torch.float32).eps
    return torch.finfo(weight.dtype).eps * expected.double().abs() + 2 * f32 * (w.abs() + (scales_dense * tau).abs())


def _dense_scales(weight, heads, head_dim, scales, head_axis):
    axis = head_axis % 2
    m = torch.zeros(weight.shape[axis], dtype=torch.float64)
    for h, s in zip(heads, scales):
        m[h * head_dim : (h + 1) * head_dim] = abs(s)
    return m[None, :] if axis == 1 else m[:, None]


def _run_and_check(weight, other, heads, head_dim, scale, head_axis, fused):
    k = len(heads)
    scales = [float(scale)] * k if not isinstance(scale, (list, torch.Tensor)) else [float(s) for s in scale]
    before = weight.clone()
    expected = _oracle(weight, other, heads, head_dim, scales, head_axis, fused)
    tol = _tolerance(weight, other, expected, _dense_scales(weight, heads, head_dim, scales, head_axis), fused)
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    out = fn(weight, other, heads, head_dim=head_dim, scale=scale, head_axis=head_axis)
    assert out is weight
    sel = _selected(weight, heads, head_dim, head_axis)
    assert_bit_identical(weight[~sel], before[~sel], what="unselected elements")
    assert_close_report(weight[sel], expected[sel], atol=tol[sel], what="selected")
    if weight.dtype != torch.float32:  # fp32 rounding is far below a bf16/fp16 ulp
        frac_exact = (weight[sel] == expected[sel]).double().mean().item() if sel.any() else 1.0
        assert frac_exact > 0.95, f"only {frac_exact:.3f} of the edited elements round like the float64 formula"


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("head_axis", [-1, 0], ids=["linear", "conv1d"])
def test_matches_float64(backend, fused, dtype, head_dim, head_axis):
    num_heads, d_model = 5, 37
    shape = (d_model, num_heads * head_dim) if head_axis == -1 else (num_heads * head_dim, d_model)
    weight = torch.randn(shape).to(dtype)
    other = (weight.float() + 0.1 * torch.randn(shape)).to(dtype) if fused else torch.randn(shape).to(dtype)
    _run_and_check(weight, other, [4, 0, 2], head_dim, 0.7, head_axis, fused)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_head_scales_and_tensor_heads(backend, fused, dtype):
    weight = torch.randn(19, 6 * 24).to(dtype)
    other = torch.randn_like(weight)
    heads = torch.tensor([5, 1, 3])
    before = weight.clone()
    scales = torch.tensor([0.25, -1.5, 2.0])
    expected = _oracle(before, other, heads.tolist(), 24, scales.tolist(), -1, fused)
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    fn(weight, other, heads, head_dim=24, scale=scales)
    sel = _selected(weight, heads.tolist(), 24, -1)
    tol = _tolerance(before, other, expected, _dense_scales(before, heads.tolist(), 24, scales.tolist(), -1), fused)
    assert_close_report(weight[sel], expected[sel], atol=tol[sel])
    assert_bit_identical(weight[~sel], before[~sel])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_axis", [-1, 0], ids=["linear", "conv1d"])
def test_non_contiguous(backend, dtype, head_axis):
    head_dim, num_heads, d_model = 16, 4, 21
    shape = (d_model, num_heads * head_dim) if head_axis == -1 else (num_heads * head_dim, d_model)
    storage = torch.randn(shape[1], shape[0]).to(dtype)
    weight = storage.t()  # transposed view: the "other" layout
    other = torch.randn(shape[0], 2 * shape[1]).to(dtype)[:, ::2]  # strided columns
    storage_before = storage.clone()
    _run_and_check(weight, other, [1, 3], head_dim, 0.5, head_axis, fused=False)
    assert weight.data_ptr() == storage.data_ptr()  # edited in place through the view
    assert not torch.equal(storage, storage_before)


def test_large_scale_exact_binary_fraction(backend):
    """With exact scales (binary fractions) and fp32, the edit equals the float64 formula bit for bit."""
    weight = torch.randn(33, 4 * 32)
    delta = torch.randn_like(weight)
    expected = _oracle(weight, delta, [0, 3], 32, [0.5, 0.5], -1, False)
    sk.masked_head_update_(weight, delta, [0, 3], head_dim=32, scale=0.5)
    assert_bit_identical(weight, expected)


def test_empty_heads_is_noop(backend):
    weight = torch.randn(8, 16)
    before = weight.clone()
    sk.masked_head_update_(weight, torch.randn(8, 16), [], head_dim=4, scale=2.0)
    sk.masked_head_steer_(weight, torch.randn(8, 16), torch.tensor([], dtype=torch.long), head_dim=4)
    assert_bit_identical(weight, before)


def test_parameter_with_requires_grad(backend):
    param = torch.nn.Parameter(torch.randn(8, 16))
    sk.masked_head_update_(param, torch.ones(8, 16), [1], head_dim=4, scale=1.0)
    assert param.requires_grad


BAD = [
    (dict(delta=torch.randn(8, 12)), ValueError, "delta has shape"),
    (dict(delta=torch.randn(8, 16).half()), ValueError, "delta has dtype"),
    (dict(heads=[4]), ValueError, r"head index 4 out of range \[0, 4\)"),
    (dict(heads=[-1]), ValueError, "head index -1 out of range"),
    (dict(heads=[1, 1]), ValueError, "must not repeat"),
    (dict(heads=[1.0]), ValueError, "heads must hold ints"),
    (dict(heads=torch.tensor([0.0])), ValueError, "1-D integer tensor"),
    (dict(head_dim=5), ValueError, "head_dim=5 does not divide"),
    (dict(head_dim=0), ValueError, "head_dim must be a positive int"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("inf")), ValueError, "scale must be finite"),
    (dict(scale=torch.tensor([1.0, math.inf])), ValueError, "scale must be finite"),
    (dict(scale=torch.tensor([1.0, 2.0, 3.0])), ValueError, "scale has 3 values but heads has 2"),
    (dict(head_axis=2), ValueError, "head_axis must be"),
    (dict(weight=torch.randn(2, 8, 16), delta=torch.randn(2, 8, 16)), ValueError, "weight must be 2-D"),
    (dict(weight=torch.randn(8, 16).double(), delta=torch.randn(8, 16).double()), ValueError, "weight must have dtype"),
]


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
@pytest.mark.parametrize("bad, exc, match", BAD)
def test_contract_errors_leave_weight_unchanged(backend, fused, bad, exc, match):
    args = dict(weight=torch.randn(8, 16), delta=torch.randn(8, 16), heads=[0, 2], head_dim=4, scale=0.5, head_axis=-1)
    args.update(bad)
    before = args["weight"].clone()
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    other = args.pop("delta")
    weight = args.pop("weight")
    if fused:
        match = match.replace("delta", "harmful")
    with pytest.raises(exc, match=match):
        fn(weight, other, **args)
    assert_bit_identical(weight, before)


def test_torch_library_opcheck():
    w = torch.randn(8, 16)
    for fused in (False, True):
        args = (w.clone(), torch.randn(8, 16), torch.tensor([0, 3]), torch.tensor([0.5, 1.0]), 4, 1, fused)
        torch.library.opcheck(torch.ops.soteria.masked_head_update_.default, args)


def test_traceable_by_torch_compile():
    def steer(w, h):
        return sk.masked_head_steer_(w, h, [0, 2], head_dim=4, scale=0.5) * 1.0

    w, h = torch.randn(8, 16), torch.randn(8, 16)
    expected = steer(w.clone(), h)
    compiled = torch.compile(steer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w.clone(), h), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_delta_for_half_weight_rounds_once(backend, dtype):
    """An fp32 tau for a half-precision weight is not rounded first: the weight is rounded once."""
    weight = torch.randn(13, 4 * 24).to(dtype)
    delta = torch.randn(13, 4 * 24)  # fp32
    expected = _oracle(weight, delta, [1, 2], 24, [0.5, 0.5], -1, False)
    before = weight.clone()
    sk.masked_head_update_(weight, delta, [1, 2], head_dim=24, scale=0.5)
    sel = _selected(weight, [1, 2], 24, -1)
    assert_bit_identical(weight[~sel], before[~sel])
    tol = _tolerance(before, delta, expected, _dense_scales(before, [1, 2], 24, [0.5, 0.5], -1), False)
    assert_close_report(weight[sel], expected[sel], atol=tol[sel])
    assert (weight[sel] == expected[sel]).double().mean() > 0.99
    with pytest.raises(ValueError, match="harmful has dtype"):  # the fused form reads weights: same dtype
        sk.masked_head_steer_(weight, delta, [1], head_dim=24)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
def test_strided_heads_and_scale_tensors(backend, fused):
    """Heads and scales given as strided views or a 0-d tensor are read by value, not by storage."""
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    heads = [4, 0, 2]
    cases = [
        (torch.tensor([4, 9, 0, 9, 2])[::2], 0.5, [0.5] * 3),  # heads as a stride-2 view
        (heads, torch.tensor([0.25, 9.0, -1.5, 9.0, 2.0])[::2], [0.25, -1.5, 2.0]),  # scales, stride 2
        (heads, torch.tensor(0.75), [0.75] * 3),  # 0-d scale: expanded to one value per head
    ]
    for given_heads, given_scale, scales in cases:
        weight = torch.randn(7, 5 * 16)
        other = torch.randn_like(weight)
        before = weight.clone()
        expected = _oracle(before, other, heads, 16, scales, -1, fused)
        tol = _tolerance(before, other, expected, _dense_scales(before, heads, 16, scales, -1), fused)
        fn(weight, other, given_heads, head_dim=16, scale=given_scale)
        sel = _selected(weight, heads, 16, -1)
        assert_bit_identical(weight[~sel], before[~sel], what="unselected elements")
        assert_close_report(weight[sel], expected[sel], atol=tol[sel], what=f"selected ({given_heads}, {given_scale})")


def _aliasing_cases():
    w = torch.randn(16, 16)
    return {
        "itself": (w, w),
        "transpose": (w, w.t()),
        "overlapping slice": (w[:8], w[4:12]),
        "shifted view": (w[:, :8], w[:, 4:12]),
    }


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
@pytest.mark.parametrize("case", ["itself", "transpose", "overlapping slice", "shifted view"])
def test_operand_aliasing_weight_is_rejected(backend, fused, case):
    """tau / W_harmful sharing memory with the weight would be read after it is written: rejected."""
    weight, other = _aliasing_cases()[case]
    before = weight.clone()
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    name = "harmful" if fused else "delta"
    with pytest.raises(ValueError, match=f"{name} shares memory with weight"):
        fn(weight, other, [0, 1], head_dim=4, scale=0.5)
    assert_bit_identical(weight, before)


@pytest.mark.parametrize("fused", [False, True], ids=["update", "steer"])
def test_internally_overlapping_weight_is_rejected(backend, fused):
    """An expanded weight has many elements per memory location: both sides refuse to write it."""
    base = torch.randn(8)
    weight = base.expand(4, 8)
    before = base.clone()
    fn = sk.masked_head_steer_ if fused else sk.masked_head_update_
    with pytest.raises(ValueError, match="weight has overlapping memory"):
        fn(weight, torch.randn(4, 8), [1], head_dim=4, scale=0.5)
    assert_bit_identical(base, before)


def test_disjoint_views_of_one_buffer_are_accepted(backend):
    """Weight and tau side by side in one buffer (a stacked tensor) do not overlap: allowed."""
    buf = torch.randn(2, 8, 16)
    weight, delta = buf[0], buf[1]
    before = weight.clone()
    expected = _oracle(before, delta, [1, 3], 4, [0.5, 0.5], -1, False)
    sk.masked_head_update_(weight, delta, [1, 3], head_dim=4, scale=0.5)
    sel = _selected(weight, [1, 3], 4, -1)
    tol = _tolerance(before, delta, expected, _dense_scales(before, [1, 3], 4, [0.5, 0.5], -1), False)
    assert_bit_identical(weight[~sel], before[~sel])
    assert_close_report(weight[sel], expected[sel], atol=tol[sel])


def test_internal_overlap_check_is_exact_for_views():
    """Slices, transposes and permutes never trip the overlap check; expanded / as_strided ones do."""
    w = torch.randn(6, 8, 10)
    for view in (w, w[:, ::2], w.transpose(0, 2), w.permute(1, 2, 0)[1:, ::3], w[0, :, 3:], w[:, :1, :]):
        assert not has_internal_overlap(view), tuple(view.stride())
        assert torch._debug_has_internal_overlap(view) != 1
    for view in (w[0, 0].expand(4, 10), torch.randn(40).as_strided((4, 8), (1, 1)), w.as_strided((5, 5), (4, 3))):
        assert has_internal_overlap(view), tuple(view.stride())
