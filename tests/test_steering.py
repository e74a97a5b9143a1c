"""SoteriaPatcher.apply / revert on tiny models of several families.

Exactness: the result is compared with the paper's dense formula ``theta - (M * tau)``, with
``M`` holding each selected head's scale on its slice and 0 elsewhere, computed in float64 and
rounded once to the weight dtype. The kernels compute in fp32 and round once, so:

- scales that are binary fractions (0.5, 0.25): bit-equal (0 ulp), except a harmful-kind
  vector on an fp32 model, where the kernel's fp32 ``W_harmful - W`` is itself rounded: then
  at most 1 ulp, and bit-equal to the formula with that fp32-rounded ``tau``.
- other scales (0.3): fp32 at most 2 ulp (the kernel rounds ``scale`` to fp32, the product
  and the result, each by at most half an ulp, and the reference is itself rounded); bf16 at
  most 1 ulp (the final rounding to bf16 dominates; measured 0 here).
  "ulp" is the spacing at ``max(|theta|, |scale * tau|, |result|)``, the size of the kernel's
  operands: where they cancel, an error relative to the tiny result would be meaningless.

A tau-kind vector reaches the kernel in fp32 even for a bf16 model (the update kernel accepts a
wider direction), so the reference uses the unrounded ``tau``; a harmful-kind vector needs no cast.
"""

import json

import pytest
import torch

import soteria_kernels
from soteria import HarmVector, SoteriaConfig, SoteriaPatcher
from soteria.arch import head_sites
from soteria.models.tiny import tiny_model, tiny_tokenizer
from tests.model_utils import random_tau

FAMILIES = ["llama", "gpt2", "gemma"]  # GQA nn.Linear D=12, Conv1D D=12, MQA nn.Linear D=24
HEADS = {"en": [(0, 1), (1, 3)], "fr": [(1, 3), (1, 0), (0, 2)]}  # (1, 3) is shared
SCALES = {"en": 0.5, "fr": 0.25}


def _harmful(model_type="llama", *, dtype=torch.float32, **kw):
    model = tiny_model(model_type, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


def _snapshot(model):
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _assert_identical(model, snap, skip=()):
    now = model.state_dict()
    assert set(now) == set(snap)
    for n, t in now.items():
        if n not in skip:
            assert torch.equal(t, snap[n]), f"{n} changed"


def _scale_mask(site, head_scales, like):
    """float64 M: each selected head's scale on its slice of this layer, 0 elsewhere."""
    m = torch.zeros(like.shape, dtype=torch.float64)
    axis = site.head_axis % 2
    for (layer, h), s in head_scales.items():
        if layer == site.layer:
            m.narrow(axis, h * site.head_dim, site.head_dim).fill_(s)
    return m


def _ulp(x64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bits = {torch.float32: 24, torch.bfloat16: 8}[dtype]
    _, e = torch.frexp(x64.abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.pow(2.0, (e - bits).to(torch.float64))


def _check_against_dense(model, snap, taus64, head_scales, *, max_ulp):
    """Compare every o_proj with the dense float64 formula; everything else bit-identical.

    ``max_ulp=0``: bit-equal. Otherwise the error is measured in ulps (of the weight dtype) of
    ``max(|theta|, |scale * tau|, |result|)``: the fp32 kernel's rounding errors scale with its
    operands, so where they cancel an error relative to the (tiny) result would be meaningless.
    """
    sites = head_sites(model)
    for site in sites:
        theta = snap[site.param_name]
        got = site.weight.detach()
        m = _scale_mask(site, head_scales, theta)
        step = m * taus64[site.layer]
        ref = (theta.double() - step).to(theta.dtype)
        outside = m == 0
        assert torch.equal(got[outside], theta[outside]), f"layer {site.layer}: unselected elements changed"
        if max_ulp == 0:
            bad = (got != ref).nonzero()
            assert bad.numel() == 0, (
                f"layer {site.layer}: {bad.shape[0]} elements differ, first at {tuple(bad[0].tolist())}: "
                f"got {got[tuple(bad[0])].item()}, want {ref[tuple(bad[0])].item()}"
            )
            continue
        size = torch.maximum(torch.maximum(theta.double().abs(), step.abs()), ref.double().abs())
        err = ((got.double() - ref.double()).abs() / _ulp(size, theta.dtype))[~outside].detach()
        worst = int(err.argmax())
        assert float(err.max()) <= max_ulp, (
            f"layer {site.layer}: {float(err.max())} ulp > {max_ulp} at selected element {worst} "
            f"(got {got[~outside][worst].item()}, want {ref[~outside][worst].item()})"
        )
    _assert_identical(model, snap, skip={s.param_name for s in sites})


@pytest.mark.parametrize("backend", ["triton", "eager"])
@pytest.mark.parametrize("kind", ["harmful", "tau"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_apply_equals_dense_formula_and_reverts(model_type, dtype, kind, backend, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", backend)  # triton: the interpreter (conftest sets TRITON_INTERPRET)
    model = tiny_model(model_type, dtype=dtype)
    snap = _snapshot(model)
    if kind == "harmful":
        harmful = _harmful(model_type, dtype=dtype)
        hv = HarmVector.from_models(model, harmful)
        taus64 = {s.layer: s.weight.double() - snap[s.param_name].double() for s in head_sites(harmful)}
    else:
        hv = random_tau(model)
        taus64 = {layer: hv.tensor(layer).double() for layer in hv.layers}

    out = SoteriaPatcher.apply(model, ["en", "fr"], harm=hv, heads=HEADS, scale=SCALES)
    assert out is model
    cfg = model.soteria_config
    assert cfg.head_scales() == {(0, 1): 0.5, (0, 2): 0.25, (1, 0): 0.25, (1, 3): 0.5}  # shared head: max
    if kind == "harmful" and dtype == torch.float32:
        # the kernel forms W_harmful - W in fp32 (rounded): within 1 ulp of the exact tau's result,
        # and bit-equal to the dense formula with that fp32 tau
        _check_against_dense(model, snap, taus64, cfg.head_scales(), max_ulp=1)
        tau32 = {s.layer: (s.weight.float() - snap[s.param_name].float()).double() for s in head_sites(harmful)}
        _check_against_dense(model, snap, tau32, cfg.head_scales(), max_ulp=0)
    else:
        _check_against_dense(model, snap, taus64, cfg.head_scales(), max_ulp=0)

    SoteriaPatcher.revert(model)
    _assert_identical(model, snap)
    assert not SoteriaPatcher.is_steered(model)
    assert not hasattr(model.config, "soteria") and "soteria_config" not in model.__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_non_binary_scale_within_two_ulp(dtype):
    model = tiny_model("llama", dtype=dtype)
    snap = _snapshot(model)
    hv = random_tau(model)
    taus64 = {layer: hv.tensor(layer).double() for layer in hv.layers}
    SoteriaPatcher.apply(model, "de", harm=hv, heads=[(0, 0), (0, 3), (1, 1)], scale=0.3)
    max_ulp = 2 if dtype == torch.float32 else 1
    _check_against_dense(model, snap, taus64, model.soteria_config.head_scales(), max_ulp=max_ulp)


def test_config_recorded_and_saved_with_the_model(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    hv = random_tau(model)
    SoteriaPatcher.apply(model, ["en", "fr"], harm=hv, heads=HEADS, scale=SCALES)
    cfg = model.soteria_config
    assert isinstance(cfg, SoteriaConfig)
    assert (cfg.languages, cfg.method, cfg.top_k, cfg.harm_source, cfg.harm_kind, cfg.model_type) == (
        ["en", "fr"],
        "explicit",
        None,
        "random",
        "tau",
        "llama",
    )
    assert cfg.heads == HEADS and cfg.scale == SCALES
    assert model.config.soteria == cfg.to_dict()
    assert SoteriaPatcher.config(model) is cfg

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["soteria"] == cfg.to_dict()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert SoteriaPatcher.is_steered(loaded)
    assert SoteriaPatcher.config(loaded) == cfg
    for a, b in zip(head_sites(loaded), head_sites(model)):
        assert torch.equal(a.weight, b.weight)
    with pytest.raises(ValueError, match="already steered"):
        SoteriaPatcher.apply(loaded, "en", harm=hv, heads=[(0, 0)])
    with pytest.raises(ValueError, match="loaded already steered"):
        SoteriaPatcher.revert(loaded)


def _must_fail(model, match, **kw):
    snap = _snapshot(model)
    steered = SoteriaPatcher.is_steered(model)
    with pytest.raises(ValueError, match=match):
        SoteriaPatcher.apply(model, **kw)
    _assert_identical(model, snap)
    assert SoteriaPatcher.is_steered(model) == steered


def test_bad_input_is_refused_and_the_model_unchanged():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    hv = random_tau(model)
    ok = dict(harm=hv, heads=[(0, 0)])
    _must_fail(
        model, r"head \(2, 0\) is out of range: the model has 2 layers x 4 heads", langs="en", harm=hv, heads=[(2, 0)]
    )
    _must_fail(model, r"head \(0, 4\) is out of range", langs="en", harm=hv, heads={"en": [(0, 4)]})
    _must_fail(model, "pairs of ints", langs="en", harm=hv, heads=[(0, 1.0)])
    _must_fail(model, r"missing \['fr'\]", langs=["en", "fr"], harm=hv, heads={"en": [(0, 0)]})
    _must_fail(model, "no built-in probe tasks for \\['xx'\\]", langs=["en", "xx"], harm=hv, tokenizer=tok)
    _must_fail(model, "needs tokenizer", langs="en", harm=hv)
    _must_fail(model, "top_k = 9 is out of range: the model has 8 heads", langs="en", harm=hv, tokenizer=tok, top_k=9)
    _must_fail(model, "method must be one of", langs="en", harm=hv, tokenizer=tok, method="magic")
    _must_fail(model, "harm=None .* needs tokenizer", langs="en", heads=[(0, 0)])
    _must_fail(model, "langs must be a non-empty list", langs=[], **ok)
    _must_fail(model, "langs repeat", langs=["en", "en"], **ok)
    _must_fail(model, "scale must be a finite float", langs="en", scale=float("nan"), **ok)
    _must_fail(model, r"scale\['fr'\] must be a finite float", langs=["en", "fr"], scale={"en": 1, "fr": "x"}, **ok)
    _must_fail(model, "harm must be a HarmVector", langs="en", harm=3, heads=[(0, 0)])
    # a harm vector for another architecture
    _must_fail(
        model,
        "model_type: harm vector 'gpt2', model 'llama'",
        langs="en",
        harm=random_tau(tiny_model("gpt2")),
        heads=[(0, 0)],
    )
    wide = random_tau(tiny_model("llama", hidden_size=64))
    wide.model_type = ""
    _must_fail(
        model,
        r"layer 0 \(model.layers.0.self_attn.o_proj.weight\): harm vector shape \[64, 64\]",
        langs="en",
        harm=wide,
        heads=[(0, 0)],
    )
    partial = HarmVector({1: hv.tensor(1)}, param_names={1: hv.param_names[1]}, model_type="llama")
    _must_fail(model, "layer 0: the harm vector has no tensor for it", langs="en", harm=partial, heads=[(0, 0)])
    # already steered
    SoteriaPatcher.apply(model, "en", **ok)
    _must_fail(model, "already steered", langs="fr", **ok)
    SoteriaPatcher.revert(model)
    with pytest.raises(ValueError, match="not steered"):
        SoteriaPatcher.revert(model)


def test_failure_midway_restores_every_slice(monkeypatch):
    model = tiny_model("gpt2")
    snap = _snapshot(model)
    hv = HarmVector.from_models(model, _harmful("gpt2"))
    real, calls = soteria_kernels.masked_head_steer_, []

    def flaky(weight, *a, **kw):
        calls.append(weight.shape)
        real(weight, *a, **kw)  # the second layer's edit is done, then the failure
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return weight

    monkeypatch.setattr(soteria_kernels, "masked_head_steer_", flaky)
    with pytest.raises(RuntimeError, match="injected"):
        SoteriaPatcher.apply(model, ["en", "fr"], harm=hv, heads=HEADS, scale=SCALES)
    assert len(calls) == 2
    _assert_identical(model, snap)
    assert not SoteriaPatcher.is_steered(model)


def test_nan_in_checkpoint_midway_leaves_model_unchanged(tmp_path):
    from safetensors.torch import load_file, save_file

    _harmful("llama").save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("inf")
    save_file(sd, f)
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="'model.layers.1.self_attn.o_proj.weight'.*NaN/Inf"):
        SoteriaPatcher.apply(model, "en", harm=str(tmp_path), heads=[(0, 1), (1, 1)])
    _assert_identical(model, snap)
    assert not SoteriaPatcher.is_steered(model)


def test_harm_from_sharded_checkpoint_path_equals_from_models(tmp_path, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    harmful = _harmful("llama", dtype=torch.bfloat16)
    harmful.save_pretrained(tmp_path, max_shard_size="20KB")
    a, b = tiny_model("llama", dtype=torch.bfloat16), tiny_model("llama", dtype=torch.bfloat16)
    SoteriaPatcher.apply(a, ["en", "fr"], harm=str(tmp_path), heads=HEADS, scale=SCALES)
    SoteriaPatcher.apply(b, ["en", "fr"], harm=HarmVector.from_models(b, harmful), heads=HEADS, scale=SCALES)
    assert a.soteria_config.harm_source == f"checkpoint:{tmp_path}"
    assert a.soteria_config.harm_kind == "harmful"
    for sa, sb in zip(head_sites(a), head_sites(b)):
        assert torch.equal(sa.weight, sb.weight)


def test_harm_gradients_uses_gradients_of_the_steered_languages(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    snap = _snapshot(model)
    expected = HarmVector.from_gradients(
        tiny_model("llama"), tok, langs=["en", "fr"], contrast="builtin", refusal_tokens=4, progress=False
    )
    SoteriaPatcher.apply(model, ["en", "fr"], heads=[(0, 2), (1, 1)], harm="gradients", tokenizer=tok, scale=0.5,
                         progress=False)  # fmt: skip
    cfg = model.soteria_config
    assert cfg.harm_kind == "tau" and cfg.harm_source == expected.source
    assert (
        cfg.harm_source.startswith("gradients:builtin(en,fr) n=80")
        and "contrast=builtin n_contrast=84 refusal_tokens=4" in cfg.harm_source
    )
    taus64 = {layer: expected.tensor(layer).double() for layer in expected.layers}
    _check_against_dense(model, snap, taus64, cfg.head_scales(), max_ulp=0)


def test_heads_found_per_language_union(monkeypatch):
    from soteria.heads import find_heads
    from soteria.heads.probes import languages

    # The probe data ships in the package: missing is a packaging regression, never a skip.
    assert {"en", "fr"} <= set(languages()), f"shipped probe data lacks en/fr (has {languages()})"
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    tok = tiny_tokenizer()
    model = tiny_model("llama")
    snap = _snapshot(model)
    hv = random_tau(model)
    fk = dict(n_shots=2, n_trials=2, tasks=["antonym", "country_capital"])
    SoteriaPatcher.apply(model, ["en", "fr"], harm=hv, tokenizer=tok, top_k=3, find_kwargs=fk, progress=False)
    cfg = model.soteria_config
    assert cfg.method == "atp" and cfg.top_k == 3
    SoteriaPatcher.revert(model)
    for lang in ("en", "fr"):  # the same scores again (from the cache), on the reverted model
        want = find_heads(model, tok, lang, progress=False, **fk).top(3)
        assert cfg.heads[lang] == want
    union = sorted(set(cfg.heads["en"]) | set(cfg.heads["fr"]))
    assert cfg.head_union == union
    SoteriaPatcher.apply(model, ["en", "fr"], harm=hv, heads=cfg.heads, scale=1.0)
    taus64 = {layer: hv.tensor(layer).double() for layer in hv.layers}
    _check_against_dense(model, snap, taus64, {p: 1.0 for p in union}, max_ulp=0)


# --------------------------------------------------------------------------- one config object


def _weights(model):
    return [s.weight.detach().clone() for s in head_sites(model)]


def test_apply_with_a_config_equals_the_keyword_call(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    a, b = tiny_model("llama"), tiny_model("llama")
    hv = random_tau(a)
    SoteriaPatcher.apply(a, ["en", "fr"], harm=hv, heads=HEADS, scale=0.5)
    request = SoteriaConfig(["en", "fr"], heads=HEADS, scale=0.5)
    assert SoteriaPatcher.apply(b, request, harm=hv) is b
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))
    assert a.soteria_config == b.soteria_config and b.soteria_config.is_resolved
    assert b.soteria_config.method == "explicit" and request.method is None  # the request is not changed


def test_a_record_repeats_its_steering_and_reads_its_harm_again(tmp_path, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    _harmful("llama").save_pretrained(tmp_path / "harmful")
    a = SoteriaPatcher.apply(tiny_model("llama"), ["en", "fr"], harm=str(tmp_path / "harmful"), heads=HEADS)
    record = SoteriaConfig.from_json(a.soteria_config.to_json())  # as read from soteria_config.json
    b = SoteriaPatcher.apply(tiny_model("llama"), record)  # harm_source "checkpoint:..." is read again
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))
    assert b.soteria_config == a.soteria_config


def test_a_gradient_record_repeats_with_the_tokenizer(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    tok = tiny_tokenizer()
    a = SoteriaPatcher.apply(tiny_model("llama"), ["en"], heads=[(0, 2)], harm="gradients", tokenizer=tok,
                             progress=False)  # fmt: skip
    record = a.soteria_config
    assert record.harm_source.startswith("gradients:") and record.relative_scale is not None
    with pytest.raises(ValueError, match="needs tokenizer="):
        SoteriaPatcher.apply(tiny_model("llama"), record)
    b = SoteriaPatcher.apply(tiny_model("llama"), record, tokenizer=tok, progress=False)
    assert all(torch.equal(x, y) for x, y in zip(_weights(a), _weights(b)))
    assert b.soteria_config == record


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(heads=[(0, 1)]), "do not pass heads as well"),
        (dict(scale=0.5, top_k=3), "do not pass scale, top_k as well"),
        (dict(langs=["de"]), "differ from the config's languages"),
        (dict(config=SoteriaConfig(["en"], heads=[(0, 1)])), "give the config once"),
    ],
)
def test_a_config_call_refuses_other_request_arguments(kw, match):
    model = tiny_model("llama")
    snap = _snapshot(model)
    request = SoteriaConfig(["en"], heads=[(0, 1)], scale=0.5)
    langs = kw.pop("langs", None)
    with pytest.raises(ValueError, match=match):
        if "config" in kw:
            SoteriaPatcher.apply(model, request, harm=random_tau(model), **kw)
        elif langs is not None:
            SoteriaPatcher.apply(model, langs, config=request, harm=random_tau(model))
        else:
            SoteriaPatcher.apply(model, request, harm=random_tau(model), **kw)
    _assert_identical(model, snap)


def test_shared_head_with_different_scales_warns_and_takes_the_largest():
    model = tiny_model("llama")
    with pytest.warns(UserWarning, match="different scales, e.g. \\(1, 3\\).*largest"):
        SoteriaPatcher.apply(model, ["en", "fr"], harm=random_tau(model), heads=HEADS, scale={"en": 0.1, "fr": 0.4})
    assert model.soteria_config.head_scales()[(1, 3)] == 0.4


def test_peft_wrapped_model(monkeypatch):
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    snap = _snapshot(model)
    hv = random_tau(model)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["o_proj", "q_proj"]))
    base_o = {s.layer: s.weight for s in head_sites(wrapped)}
    out = SoteriaPatcher.apply(wrapped, "en", harm=hv, heads=[(0, 1), (1, 2)], scale=0.5)
    assert out is wrapped and SoteriaPatcher.is_steered(wrapped) and SoteriaPatcher.is_steered(model)
    assert wrapped.soteria_config is model.soteria_config
    for layer, w in base_o.items():
        d = (w.detach() - snap[f"model.layers.{layer}.self_attn.o_proj.weight"]).abs().sum()
        assert float(d) > 0
    SoteriaPatcher.revert(wrapped)
    for layer, w in base_o.items():
        assert torch.equal(w, snap[f"model.layers.{layer}.self_attn.o_proj.weight"])


def test_scale_auto_calibrates_a_direction_to_the_relative_size(monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    tok, model = tiny_tokenizer(), tiny_model("llama")
    harm = HarmVector.from_gradients(model, tok, langs=["en"], progress=False)
    before = {s.layer: s.weight.detach().clone() for s in head_sites(model)}
    heads = {"en": [(0, 2), (1, 1)], "fr": [(1, 0)]}
    SoteriaPatcher.apply(model, ["en", "fr"], heads=heads, harm=harm, relative_scale={"en": 0.05, "fr": 0.1})
    cfg = model.soteria_config
    assert cfg.relative_scale == {"en": 0.05, "fr": 0.1}
    sites = head_sites(model)
    for lang, rho in cfg.relative_scale.items():
        w2 = d2 = 0.0
        for layer, h in heads[lang]:
            d = sites[layer].head_dim
            w2 += float(before[layer].narrow(1, h * d, d).double().pow(2).sum())
            d2 += float((cfg.scale_of(lang) * harm.tensor(layer).narrow(1, h * d, d).double()).pow(2).sum())
        assert (d2 / w2) ** 0.5 == pytest.approx(rho, rel=1e-6)
    SoteriaPatcher.revert(model)
    SoteriaPatcher.apply(model, ["en"], heads=heads["en"], harm=harm)  # the default relative scale
    from soteria.defaults import DEFAULT_RELATIVE_SCALE

    assert model.soteria_config.relative_scale == DEFAULT_RELATIVE_SCALE


def test_scale_auto_is_one_for_a_harmful_fine_tune():
    model = tiny_model("llama")
    SoteriaPatcher.apply(model, ["en"], heads=[(0, 1)], harm=HarmVector.from_models(model, _harmful("llama")))
    assert model.soteria_config.scale == 1.0 and model.soteria_config.relative_scale is None


@pytest.mark.parametrize("kw, match", [
    (dict(scale=0.5, relative_scale=0.1), "give scale= or relative_scale=, not both"),
    (dict(relative_scale=-0.1), "relative_scale must be a positive float"),
    (dict(relative_scale={"xx": 0.1}), "one value per language"),
    (dict(scale="big"), "or 'auto'"),
])  # fmt: skip
def test_scale_arguments_bad_input_leave_the_model_unchanged(kw, match):
    model = tiny_model("llama")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        SoteriaPatcher.apply(model, ["en"], heads=[(0, 1)], harm=HarmVector.from_models(model, _harmful("llama")), **kw)
    _assert_identical(model, snap)
