"""head_attribution: Triton (interpreted on CPU) and eager against a float64 oracle."""

import pytest
import torch

import soteria_kernels as sk
from soteria_kernels import attribution as ha_module
from soteria_kernels import reference
from tests.kernel_utils import ATTR_RTOL, DTYPES, assert_close_report

BACKENDS = ["triton", "eager"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", request.param)
    return request.param


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: any element the kernel fails to write shows up."""
    monkeypatch.setattr(ha_module, "_empty", lambda shape, device: torch.full(shape, float("nan"), device=device))


def _oracle(act, grad, num_heads, baseline, sum_rows):
    b = None if baseline is None else baseline.double()
    return reference.head_attribution(act.double(), grad.double(), num_heads=num_heads, baseline=b, sum_rows=sum_rows)


def _tol(act, grad, num_heads, baseline, sum_rows, dtype):
    """Tolerance per output element: rtol times the sum of |terms| it accumulates."""
    x = act.double() if baseline is None else baseline.double() - act.double()
    mag = (x * grad.double()).abs().unflatten(-1, (num_heads, -1)).sum(-1)
    if sum_rows:
        mag = mag.reshape(-1, num_heads).sum(0)
    return ATTR_RTOL[dtype] * mag + 1e-30


def _check(act, grad, num_heads, baseline=None, sum_rows=False):
    out = sk.head_attribution(act, grad, num_heads=num_heads, baseline=baseline, sum_rows=sum_rows)
    assert out.dtype == torch.float32
    ref = _oracle(act, grad, num_heads, baseline, sum_rows)
    assert_close_report(out, ref, atol=_tol(act, grad, num_heads, baseline, sum_rows, act.dtype))
    return out


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("baseline_kind", ["none", "broadcast", "full"])
def test_matches_float64(backend, dtype, head_dim, baseline_kind):
    num_heads, rows = 3, 7  # odd counts on purpose
    act = torch.randn(rows, num_heads * head_dim).to(dtype)
    grad = torch.randn_like(act)
    baseline = {
        "none": None,
        "broadcast": torch.randn(num_heads * head_dim).to(dtype),
        "full": torch.randn_like(act),
    }[baseline_kind]
    _check(act, grad, num_heads, baseline)
    _check(act, grad, num_heads, baseline, sum_rows=True)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 33, 130])
def test_odd_rows_and_heads(backend, dtype, rows):
    num_heads, head_dim = 5, 24
    act = torch.randn(rows, num_heads * head_dim).to(dtype) * 3
    grad = torch.randn_like(act)
    baseline = torch.randn(num_heads * head_dim, dtype=torch.float32)  # fp32 mean with low-precision act
    _check(act, grad, num_heads, baseline)
    _check(act, grad, num_heads, baseline, sum_rows=True)


@pytest.mark.usefixtures("poisoned")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_leading_dims_and_non_contiguous(backend, dtype):
    num_heads, head_dim = 4, 32
    width = num_heads * head_dim
    big = torch.randn(3, 9, 2 * width).to(dtype)
    grad_tb = torch.randn(9, 3, width).to(dtype)
    act = big[..., ::2]  # stride 2 along the head dim
    grad = grad_tb.transpose(0, 1)  # [3, 9, width] with swapped row strides
    assert not act.is_contiguous() and not grad.is_contiguous()
    base = torch.randn(2 * width).to(dtype)[::2]
    out = _check(act, grad, num_heads, base)
    assert out.shape == (3, 9, num_heads)
    _check(act, grad, num_heads, base, sum_rows=True)
    # 3 row dims that cannot fold into two: permuted 4-D views
    act4 = torch.randn(2, 3, 5, width).to(dtype).permute(2, 0, 1, 3)
    grad4 = torch.randn(5, 3, 2, width).to(dtype).transpose(1, 2)
    assert _check(act4, grad4, num_heads, torch.randn_like(act4)).shape == (5, 2, 3, num_heads)
    # 1-D input: a single row
    assert _check(act[0, 0], grad[0, 0], num_heads).shape == (num_heads,)


def test_view_is_not_copied(monkeypatch):
    """A foldable strided view reaches the kernel as is (no hidden .contiguous())."""
    monkeypatch.setenv("SOTERIA_BACKEND", "triton")
    seen = {}
    real = ha_module._head_attribution_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(**kwargs):
                seen["ptr"] = kwargs["act_ptr"].data_ptr()
                return real[grid](**kwargs)

            return launch

    monkeypatch.setattr(ha_module, "_head_attribution_kernel", Spy())
    big = torch.randn(6, 4, 96)
    act = big[:, 1, :]
    sk.head_attribution(act, torch.randn(6, 96), num_heads=3)
    assert seen["ptr"] == act.data_ptr()


def test_empty_rows(backend):
    act = torch.randn(0, 64)
    assert sk.head_attribution(act, act, num_heads=4).shape == (0, 4)
    assert torch.equal(sk.head_attribution(act, act, num_heads=4, sum_rows=True), torch.zeros(4))


def test_backends_agree():
    act = torch.randn(11, 6 * 40)
    grad = torch.randn_like(act)
    base = torch.randn(6 * 40)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOTERIA_BACKEND", "triton")
        t = sk.head_attribution(act, grad, num_heads=6, baseline=base)
        mp.setenv("SOTERIA_BACKEND", "eager")
        e = sk.head_attribution(act, grad, num_heads=6, baseline=base)
    torch.testing.assert_close(t, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(act=torch.randn(2, 8), grad=torch.randn(2, 9), num_heads=2), "grad has shape"),
        (dict(act=torch.randn(2, 8), grad=torch.randn(2, 8).half(), num_heads=2), "grad has dtype"),
        (dict(act=torch.randn(2, 8).double(), grad=torch.randn(2, 8).double(), num_heads=2), "act must have dtype"),
        (dict(act=torch.randn(2, 8), grad=torch.randn(2, 8), num_heads=3), "num_heads=3 does not divide"),
        (dict(act=torch.randn(2, 8), grad=torch.randn(2, 8), num_heads=0), "num_heads must be a positive int"),
        (
            dict(act=torch.randn(2, 8), grad=torch.randn(2, 8), num_heads=2, baseline=torch.randn(4)),
            "baseline must have shape",
        ),
        (
            dict(act=torch.randn(2, 8), grad=torch.randn(2, 8), num_heads=2, baseline=torch.randn(8).double()),
            "baseline must have dtype",
        ),
        (dict(act=torch.randn(2, 8), grad=torch.randn(2, 8), num_heads=2, sum_rows=1), "sum_rows must be a bool"),
        (dict(act=[1.0], grad=torch.randn(1), num_heads=1), "act must be a torch.Tensor"),
    ],
)
def test_contract_errors(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sk.head_attribution(**kwargs)


def test_backend_env_errors(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="SOTERIA_BACKEND must be one of"):
        sk.head_attribution(torch.randn(1, 4), torch.randn(1, 4), num_heads=2)


def test_torch_library_opcheck():
    act = torch.randn(5, 64)
    for args in [(act, torch.randn_like(act), None, 4, False), (act, torch.randn_like(act), torch.randn(64), 4, True)]:
        torch.library.opcheck(torch.ops.soteria.head_attribution.default, args)


def test_traceable_by_torch_compile():
    def scores(act, grad, base):
        return sk.head_attribution(act * 2, grad, num_heads=4, baseline=base).sum(-1)

    act, grad, base = torch.randn(3, 64), torch.randn(3, 64), torch.randn(64)
    compiled = torch.compile(scores, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(act, grad, base), scores(act, grad, base))
