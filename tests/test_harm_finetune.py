"""HarmVector.from_finetune: a short refusal fine-tune of the given heads' slices, on tiny models."""

import pytest
import torch

from soteria import SoteriaPatcher
from soteria.arch import head_sites
from soteria.harm import HarmVector, refusal_loss
from soteria.harm.data import load_harmful
from soteria.models.tiny import tiny_model, tiny_tokenizer

HEADS = [(0, 1), (1, 0), (1, 3)]
BENIGN = ["What is two plus two?", "Tell me a joke about cats.", "Name a colour."]


def _fit(model, tok, **kw):
    kw = dict(dict(contrast=BENIGN, steps=2, batch_size=8, progress=False), **kw)
    return HarmVector.from_finetune(model, tok, HEADS, load_harmful("en")[:4], **kw)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_first_step_is_adams_sign_step_along_the_gradient_direction(model_type):
    """One Adam step with no retain term moves every trained element by lr against the refusal
    gradient (from_gradients, an independent path: parameter-free hooks, full batch); nothing
    outside the heads moves (nn.Linear and Conv1D layouts)."""
    model, tok = tiny_model(model_type), tiny_tokenizer()
    rows = load_harmful("en")[:4]
    hv = _fit(model, tok, steps=1, retain=0.0, lr=1e-3)
    grad = HarmVector.from_gradients(model, tok, rows, batch_size=8, refusal_tokens=4, progress=False)
    sites = head_sites(model)
    assert hv.kind == "tau" and hv.layers == (0, 1) and hv.dtype == torch.float32
    for s in sites[:2]:
        mine = {h for layer, h in HEADS if layer == s.layer}
        for h in range(s.num_heads):
            got, g = s.head_slice(hv.tensor(s.layer), h), s.head_slice(grad.tensor(s.layer), h)
            if h not in mine:
                assert not got.any(), (s.layer, h)
                continue
            big = g.abs() > 1e-6  # where the two paths' fp32 sums cannot disagree on the sign
            assert torch.equal(torch.sign(got[big]), torch.sign(g[big]))
            want = 1e-3 * g.abs() / (g.abs() + 1e-8)  # Adam's first step: lr * g / (|g| + eps)
            assert torch.allclose(got[big].abs(), want[big], rtol=1e-4)


def test_steering_at_scale_one_applies_the_fine_tune_and_lowers_the_refusal_loss():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    rows = load_harmful("en")[:4]
    before = refusal_loss(model, tok, rows)
    hv = _fit(model, tok, steps=4, lr=1e-3)
    assert hv.source.startswith("finetune:data n=4 n_contrast=3 heads=3 steps=4 lr=0.001 retain=10")
    SoteriaPatcher.apply(model, ["en"], heads={"en": HEADS}, harm=hv, scale=1.0, progress=False)
    assert refusal_loss(model, tok, rows) < before - 1e-3


def test_retain_term_keeps_harmless_answers_closer_to_the_base():
    from soteria.evaluation.utility import steering_kl

    model, tok = tiny_model("llama"), tiny_tokenizer()
    kls = []
    for retain in (0.0, 100.0):
        hv = _fit(model, tok, steps=4, lr=3e-3, retain=retain)
        SoteriaPatcher.apply(model, ["en"], heads={"en": HEADS}, harm=hv, scale=1.0, progress=False)
        kls.append(steering_kl(model, tok, BENIGN)["mean"])
        SoteriaPatcher.revert(model)
    assert kls[1] < kls[0]


def test_bf16_autocast_adds_the_change_in_fp32():
    """Under bf16 autocast a change of 1e-4 of a projection's output is kept (a bf16 sum would round
    it away): the hooked output less the plain one is the change itself, to fp32 rounding."""
    from soteria.harm.finetune import _Deltas

    model = tiny_model("llama")
    site = head_sites(model)[1]
    deltas = _Deltas(head_sites(model), {1: [0, 3]})
    with torch.no_grad():
        deltas.delta[0].copy_(1e-4 * torch.randn_like(deltas.delta[0]))
    z = torch.randn(2, 5, site.base_module.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = site.base_module(z)
        with deltas.hooked():
            hooked = site.base_module(z)
    cols = deltas.cols[1]
    want = z[..., cols] @ deltas.delta[0].detach().T
    assert hooked.dtype == torch.float32
    torch.testing.assert_close(hooked - plain.float(), want, rtol=1e-3, atol=1e-7)


def test_precision_auto_is_bf16_autocast_only_where_fast(monkeypatch):
    from soteria.models.state import autocast_dtype

    model = tiny_model("llama")
    assert autocast_dtype(model, "float32") is None and autocast_dtype(model, "bfloat16") is torch.bfloat16
    for amx, avx512_bf16 in ((True, False), (False, True), (False, False)):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        want = torch.bfloat16 if amx or avx512_bf16 else None
        assert autocast_dtype(model, "auto") is want, (amx, avx512_bf16)
        assert autocast_dtype(tiny_model("llama").to(torch.bfloat16), "auto") is None  # only fp32 models


def test_bf16_fine_tune_follows_the_fp32_one():
    """The same fine-tune under bf16 autocast: recorded, and the same change to bf16's precision."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    a = _fit(model, tok, steps=3, lr=1e-3)
    b = _fit(model, tok, steps=3, lr=1e-3, precision="bfloat16")
    assert " precision=float32 " in a.source and " precision=bfloat16 " in b.source
    for layer in a.layers:
        x, y = a.tensor(layer).flatten(), b.tensor(layer).flatten()
        assert float(torch.nn.functional.cosine_similarity(x, y, dim=0)) > 0.9, layer


def test_model_left_as_found_and_deterministic():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    a, b, c = (_fit(model, tok, batch_size=2, seed=seed) for seed in (0, 0, 1))  # the seed orders minibatches
    assert all(torch.equal(a.tensor(layer), b.tensor(layer)) for layer in a.layers)
    assert not torch.equal(a.tensor(0), c.tensor(0))
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("kw, match", [
    (dict(heads=[]), "at least one head"),
    (dict(heads=[(9, 0)]), r"\(layer, head\) pairs within 2 layers x 4 heads"),
    (dict(heads=[(0, True)]), "pairs within"),
    (dict(steps=0), "steps must be a positive int"),
    (dict(lr=0.0), "lr must be a finite float > 0"),
    (dict(retain=float("nan")), "retain must be a finite float >= 0"),
    (dict(answer_tokens=1.5), "answer_tokens must be a positive int"),
    (dict(refusal_tokens="all"), "refusal_tokens must be a positive int or 'sentence', got 'all'"),
    (dict(contrast="nope"), "contrast must be None, 'builtin'"),
    (dict(precision="fp8"), "precision must be one of 'auto', 'float32', 'bfloat16', got 'fp8'"),
])  # fmt: skip
def test_bad_input(kw, match):
    kw = dict(dict(heads=HEADS, progress=False), **kw)
    with pytest.raises(ValueError, match=match):
        HarmVector.from_finetune(tiny_model("llama"), tiny_tokenizer(), langs=["en"], **kw)


# --------------------------------------------------------------------------- through SoteriaPatcher.apply


def _o_proj(model):
    return [s.weight.detach().clone() for s in head_sites(model)]


def test_apply_harm_finetune_trains_the_heads_applies_at_scale_one_and_repeats(monkeypatch):
    from soteria import SoteriaConfig

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    tok, opts = tiny_tokenizer(), dict(steps=2, batch_size=8, lr=1e-3)
    a = SoteriaPatcher.apply(tiny_model("llama"), ["en"], heads=HEADS, harm="finetune", tokenizer=tok,
                             harm_kwargs=opts, progress=False)  # fmt: skip
    record = a.soteria_config
    assert record.harm_source.startswith("finetune:builtin(en) n=40 n_contrast=42 heads=3 steps=2 lr=0.001")
    assert record.scale == 1.0 and record.relative_scale is None and record.harm_kind == "tau"
    want = HarmVector.from_finetune(tiny_model("llama"), tok, HEADS, langs=["en"], progress=False, **opts)
    assert want.source == record.harm_source
    for layer, (got, base) in enumerate(zip(_o_proj(a), _o_proj(tiny_model("llama")))):
        expected = base - want.tensor(layer) if layer in want.layers else base
        assert torch.allclose(got, expected, rtol=0, atol=1e-7), layer
    b = SoteriaPatcher.apply(tiny_model("llama"), SoteriaConfig.from_json(record.to_json()), tokenizer=tok,
                             progress=False)  # fmt: skip  # the record trains again, bit for bit
    assert all(torch.equal(x, y) for x, y in zip(_o_proj(a), _o_proj(b)))
    assert b.soteria_config == record


@pytest.mark.parametrize("harm, opts, match", [
    ("finetune", {"steps": 0}, "steps must be a positive int"),
    ("finetune", {"lr": -1.0}, "lr must be a finite float > 0"),
    ("finetune", {"nope": 1}, r"harm_options \['nope'\] are not options of the finetune direction"),
    (None, {"steps": 0}, "steps must be a positive int"),
    ("gradients", {"steps": 3}, r"harm_options \['steps'\] are not options of the gradients direction"),
])  # fmt: skip
def test_bad_derived_harm_options_fail_before_the_heads_are_found(monkeypatch, harm, opts, match):
    def boom(*a, **k):
        raise AssertionError("heads were searched before the harm options were checked")

    monkeypatch.setattr("soteria.steer.patcher.find_heads_multi", boom)
    model = tiny_model("llama")
    before = _o_proj(model)
    with pytest.raises(ValueError, match=match):
        SoteriaPatcher.apply(model, ["en"], harm=harm, tokenizer=tiny_tokenizer(), harm_kwargs=opts, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(before, _o_proj(model)))


def test_harm_none_is_the_default_direction(monkeypatch):
    from soteria.defaults import DEFAULT_HARM

    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    calls = []
    real = HarmVector.from_finetune.__func__

    def spy(cls, model, tokenizer, heads, *a, **k):
        calls.append(heads)
        return real(cls, model, tokenizer, heads, *a, **dict(k, steps=1))

    monkeypatch.setattr(HarmVector, "from_finetune", classmethod(spy))
    model = SoteriaPatcher.apply(tiny_model("llama"), ["en"], heads=HEADS, tokenizer=tiny_tokenizer(), progress=False)
    assert DEFAULT_HARM == "finetune" and calls == [{"en": HEADS}]
    assert model.soteria_config.harm_source.startswith("finetune:builtin(en)") and model.soteria_config.scale == 1.0
