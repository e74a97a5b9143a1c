"""HarmVector: from two models, from a (sharded, local or Hub) checkpoint reading only the
output projections, from gradients, save/load; and the built-in refusal data."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import soteria.harm.checkpoint as harm_mod
import soteria.harm.gradients as grad_mod
from soteria.arch import head_sites
from soteria.harm import HarmVector, refusal_loss
from soteria.harm.data import first_sentence, harmful_languages, load_harmful, read_harmful
from soteria.models.tiny import tiny_model, tiny_tokenizer

LANGS = ["en", "zh", "fr", "de", "es", "ar", "bg", "th", "hi", "bn", "ta", "te"]


def _harmful(model_type="llama", *, seed=0, dtype=torch.float32, **kw):
    """A "harmful fine-tune": the tiny base model with every parameter perturbed."""
    model = tiny_model(model_type, seed=seed, dtype=dtype, **kw)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
    return model


def _o_proj(model):
    return {s.layer: (s.param_name, s.weight.detach().clone()) for s in head_sites(model)}


class _Recorder:
    """Wraps soteria.io.safetensors.read_tensor: records every file and tensor read."""

    def __init__(self, real):
        self.real, self.files, self.tensors = real, [], []

    def __call__(self, sf, name):
        self.files.append(Path(getattr(sf, "path", sf)).name)
        self.tensors.append(name)
        return self.real(sf, name)


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder(harm_mod.read_tensor)
    monkeypatch.setattr(harm_mod, "read_tensor", rec)
    return rec


@pytest.fixture
def sharded(tmp_path):
    """A harmful llama saved in many small shards; returns (dir, harmful model)."""
    model = _harmful("llama")
    out = tmp_path / "harmful-llama"
    model.save_pretrained(out, max_shard_size="20KB")
    return out, model


# --------------------------------------------------------------------------- built-in data


def test_builtin_harmful_data():
    assert harmful_languages() == LANGS
    rows = load_harmful()
    assert len(rows) == 480
    per_lang = {}
    for r in rows:
        assert set(r) == {"prompt", "refusal", "lang"}
        assert r["prompt"].strip() and r["refusal"].strip() and r["prompt"] != r["refusal"]
        per_lang.setdefault(r["lang"], []).append(r)
    assert list(per_lang) == LANGS
    for lang, rs in per_lang.items():
        assert len(rs) == 40, lang
        assert len({r["prompt"] for r in rs}) == len(rs), lang
    # non-Latin languages are written in their own scripts
    assert any("\u0e00" <= c <= "\u0e7f" for c in per_lang["th"][0]["prompt"])
    assert any("\u0b80" <= c <= "\u0bff" for c in per_lang["ta"][0]["refusal"])
    assert [r["lang"] for r in load_harmful(["te", "en"])][::40] == ["te", "en"]
    with pytest.raises(ValueError, match="no built-in harmful requests for 'xx'"):
        load_harmful("xx")


def test_read_harmful_user_data(tmp_path):
    rows = read_harmful([("Do bad thing?", "No."), {"prompt": "p", "refusal": "r", "lang": "en"}])
    assert rows[0] == {"prompt": "Do bad thing?", "refusal": "No.", "lang": ""}
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "refusal": "b"}\n\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: 'refusal' must be a non-empty string"):
        read_harmful(path)
    with pytest.raises(ValueError, match="empty"):
        read_harmful([])


# --------------------------------------------------------------------------- from_models


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_from_models(model_type):
    base, harmful = tiny_model(model_type), _harmful(model_type)
    hv = HarmVector.from_models(base, harmful)
    assert hv.kind == "harmful" and hv.model_type == model_type and hv.dtype == torch.float32
    assert hv.layers == (0, 1)
    for s_b, s_h in zip(head_sites(base), head_sites(harmful)):
        assert hv.param_names[s_b.layer] == s_b.param_name
        assert hv.shapes[s_b.layer] == tuple(s_b.weight.shape)
        assert torch.equal(hv.tensor(s_b.layer), s_h.weight)
        assert hv.tensor(s_b.layer).data_ptr() != s_h.weight.data_ptr()  # a copy, not a view
        want = s_h.weight.double() - s_b.weight.double()
        assert torch.allclose(hv.tau(s_b.layer, base).double(), want, rtol=0, atol=1e-7)
    assert set(hv.norms(base)) == {0, 1}
    with pytest.raises(ValueError, match="pass base="):
        hv.tau(0)


def test_from_models_mismatch_and_zero():
    base = tiny_model("llama")
    with pytest.raises(ValueError, match="equal the base model's: tau is zero"):
        HarmVector.from_models(base, tiny_model("llama"))
    with pytest.raises(ValueError) as e:
        HarmVector.from_models(base, _harmful("gpt2"))
    assert "model_type: harmful 'gpt2', base 'llama'" in str(e.value)
    with pytest.raises(ValueError) as e:
        HarmVector.from_models(base, _harmful("llama", num_hidden_layers=3))
    assert "layers: harmful 3, base 2" in str(e.value)


# --------------------------------------------------------------------------- from_pretrained


def test_from_pretrained_sharded_reads_only_o_proj(sharded, recorder):
    path, harmful = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3, "the fixture should write many shards"
    base = tiny_model("llama")
    want = _o_proj(harmful)
    o_shards = {index["weight_map"][name] for name, _ in want.values()}
    assert o_shards < shards

    hv = HarmVector.from_pretrained(path, base=base)
    assert hv.kind == "harmful" and hv.lazy and hv.source == f"checkpoint:{path}"
    assert recorder.tensors == [] and hv.tensors_read == []  # headers only so far
    for layer, (_, w) in want.items():
        assert torch.equal(hv.tensor(layer), w)
    names = [name for name, _ in want.values()]
    assert recorder.tensors == names and hv.tensors_read == names
    assert set(recorder.files) == o_shards  # no other shard was ever opened
    assert hv.bytes_read == sum(w.numel() * w.element_size() for _, w in want.values())
    total = sum(p.numel() * p.element_size() for p in harmful.state_dict().values())
    assert hv.bytes_read < total / 10


def test_from_pretrained_single_file_gpt2_conv1d(tmp_path):
    harmful = _harmful("gpt2", dtype=torch.bfloat16)
    harmful.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    base = tiny_model("gpt2", dtype=torch.bfloat16)
    for where in (tmp_path / "ckpt", tmp_path / "ckpt" / "model.safetensors"):
        hv = HarmVector.from_pretrained(where, base=base)
        assert hv.dtype == torch.bfloat16 and hv.model_type == "gpt2"
        for layer, (name, w) in _o_proj(harmful).items():
            assert name.startswith("transformer.h.") and name.endswith("attn.c_proj.weight")
            assert torch.equal(hv.tensor(layer), w)


def test_from_pretrained_says_what_differs(tmp_path):
    _harmful("llama", hidden_size=64).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError) as e:
        HarmVector.from_pretrained(tmp_path / "wide", base=tiny_model("llama"))
    msg = str(e.value)
    assert "config.hidden_size: checkpoint 64, base 48" in msg

    # same config, but one tensor has the wrong shape and one is missing: rewrite the file
    from safetensors.torch import load_file, save_file

    _harmful("llama").save_pretrained(tmp_path / "bad")
    f = tmp_path / "bad" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(48, 40)
    del sd["model.layers.1.self_attn.o_proj.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError) as e:
        HarmVector.from_pretrained(tmp_path / "bad", base=tiny_model("llama"))
    msg = str(e.value)
    assert "layer 1: no tensor 'model.layers.1.self_attn.o_proj.weight'" in msg
    del sd["model.layers.0.self_attn.o_proj.weight"]
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(48, 40)
    sd["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(48, 48)
    save_file(sd, f)
    with pytest.raises(
        ValueError, match=r"layer 0: tensor 'model.layers.0.self_attn.o_proj.weight' has shape \[48, 40\]"
    ):
        HarmVector.from_pretrained(tmp_path / "bad", base=tiny_model("llama"))

    # another family altogether
    _harmful("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type: checkpoint 'gpt2', base 'llama'"):
        HarmVector.from_pretrained(tmp_path / "gpt2", base=tiny_model("llama"))

    # not a checkpoint
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        HarmVector.from_pretrained(tmp_path / "adapter", base=tiny_model("llama"))
    with pytest.raises(ValueError, match="neither an existing file or directory nor a Hub repo id"):
        HarmVector.from_pretrained(str(tmp_path / "nope" / "x" / "y"), base=tiny_model("llama"))


def test_from_pretrained_nan_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _harmful("llama").save_pretrained(tmp_path / "nan")
    f = tmp_path / "nan" / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.self_attn.o_proj.weight"][3, 5] = float("nan")
    save_file(sd, f)
    hv = HarmVector.from_pretrained(tmp_path / "nan", base=tiny_model("llama"))
    hv.tensor(0)
    with pytest.raises(
        ValueError, match=r"'model.layers.1.self_attn.o_proj.weight'.*1 NaN/Inf values \(first at index \(3, 5\)"
    ):
        hv.tensor(1)


def _fake_hub(root: Path, requested: list[str]):
    from huggingface_hub.errors import EntryNotFoundError

    def hf_hub_download(repo_id, filename, **kw):
        assert repo_id == "org/harmful-llama" and kw.get("revision") == "main"
        requested.append(filename)
        if not (root / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(root / filename)

    return hf_hub_download


def test_from_pretrained_hub_downloads_only_needed_shards(sharded, monkeypatch):
    path, harmful = sharded
    requested: list[str] = []
    monkeypatch.setattr(harm_mod, "hf_hub_download", _fake_hub(path, requested))
    index = json.loads((path / "model.safetensors.index.json").read_text())
    o_shards = {index["weight_map"][name] for name, _ in _o_proj(harmful).values()}
    hv = HarmVector.from_pretrained("org/harmful-llama", base=tiny_model("llama"), revision="main")
    assert requested[:2] == ["config.json", "model.safetensors.index.json"]
    assert set(requested[2:]) == o_shards and len(requested[2:]) == len(o_shards)
    assert set(index["weight_map"].values()) - o_shards, "some shards must have been skipped"
    assert hv.source == "checkpoint:org/harmful-llama@main"
    assert torch.equal(hv.tensor(1), _o_proj(harmful)[1][1])


def test_from_pretrained_hub_single_file(tmp_path, monkeypatch):
    harmful = _harmful("llama")
    harmful.save_pretrained(tmp_path)
    requested: list[str] = []
    monkeypatch.setattr(harm_mod, "hf_hub_download", _fake_hub(tmp_path, requested))
    hv = HarmVector.from_pretrained("org/harmful-llama", base=tiny_model("llama"), revision="main")
    assert requested == ["config.json", "model.safetensors.index.json", "model.safetensors"]
    assert torch.equal(hv.tensor(0), _o_proj(harmful)[0][1])
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(FileNotFoundError, match="no model.safetensors.index.json and no model.safetensors; only safe"):
        HarmVector.from_pretrained("org/harmful-llama", base=tiny_model("llama"), revision="main")


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("kind", ["harmful", "tau"])
def test_save_load_round_trip(tmp_path, kind):
    base = tiny_model("llama")
    if kind == "harmful":
        hv = HarmVector.from_models(base, _harmful("llama"))
    else:
        g = torch.Generator().manual_seed(3)
        tensors = {s.layer: torch.randn(s.weight.shape, generator=g) for s in head_sites(base)}
        hv = HarmVector(
            tensors,
            kind="tau",
            param_names={s.layer: s.param_name for s in head_sites(base)},
            model_type="llama",
            source="test",
        )
    path = hv.save(tmp_path / "sub" / "harm.safetensors")
    assert not [p for p in path.parent.iterdir() if p.name != "harm.safetensors"]  # no temp files left
    back = HarmVector.load(path)
    assert (back.kind, back.layers, back.param_names, back.shapes, back.dtype, back.model_type, back.source) == (
        hv.kind,
        hv.layers,
        hv.param_names,
        hv.shapes,
        hv.dtype,
        hv.model_type,
        hv.source,
    )
    assert back.lazy and back.tensors_read == []
    for layer in hv.layers:
        assert torch.equal(back.tensor(layer), hv.tensor(layer))
    # from_pretrained recognises a saved vector file
    again = HarmVector.from_pretrained(path, base=base)
    assert again.kind == kind and torch.equal(again.tensor(0), hv.tensor(0))
    # the wrong model
    with pytest.raises(ValueError, match="model_type: harm vector 'llama', model 'gpt2'"):
        again.check(tiny_model("gpt2"))


def test_location_and_record_read(tmp_path):
    """The public surface a reader of the files uses (soteria.streaming): where each tensor is, and
    counting a read made outside tensor()."""
    base = tiny_model("llama")
    hv = HarmVector.from_models(base, _harmful("llama"))
    assert hv.location(0) is None
    with pytest.raises(ValueError, match="held in memory"):
        hv.record_read(0, 10)
    with pytest.raises(ValueError, match="no layer 7"):
        hv.location(7)
    path = hv.save(tmp_path / "harm.safetensors")
    back = HarmVector.load(path)
    assert back.location(1) == (str(path), hv.param_names[1])
    back.record_read(1, 123)
    assert back.tensors_read == [hv.param_names[1]] and back.bytes_read == 123


def test_load_rejects_other_files(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a soteria harm vector"):
        HarmVector.load(tmp_path / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(ValueError, match="not a safetensors file"):
        HarmVector.load(tmp_path / "junk.safetensors")


def test_constructor_checks():
    with pytest.raises(ValueError, match="2-D float"):
        HarmVector({0: torch.zeros(3)})
    with pytest.raises(ValueError, match="NaN/Inf"):
        HarmVector({0: torch.tensor([[1.0, float("inf")]])})
    with pytest.raises(ValueError, match="one dtype"):
        HarmVector({0: torch.zeros(2, 2), 1: torch.zeros(2, 2, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="kind"):
        HarmVector({0: torch.zeros(2, 2)}, kind="weird")
    with pytest.raises(ValueError, match="at least one layer"):
        HarmVector({})


# --------------------------------------------------------------------------- from_gradients


def _hf_loss_grad(model, tokenizer, prompt, refusal):
    """Independent oracle: HF's own causal-LM loss with the request tokens masked, one row."""
    p = tokenizer(prompt + "\n")["input_ids"]
    r = tokenizer(refusal, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p + r])
    labels = ids.clone()
    labels[0, : len(p)] = -100
    weights = [s.weight for s in head_sites(model)]
    loss = model(input_ids=ids, labels=labels).loss
    return torch.autograd.grad(loss, weights)


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
def test_from_gradients_matches_hf_loss_and_is_batch_invariant(model_type):
    model, tok = tiny_model(model_type), tiny_tokenizer()
    rows = load_harmful("en")[:3] + load_harmful("th")[:2]  # different lengths: padding is exercised
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hv1 = HarmVector.from_gradients(model, tok, rows, batch_size=1, progress=False)
    hv4 = HarmVector.from_gradients(model, tok, rows, batch_size=4, progress=False)
    assert hv1.kind == "tau" and hv1.dtype == torch.float32 and hv1.model_type == model_type
    assert hv1.source.startswith("gradients:data n=5")
    want = [torch.zeros_like(g) for g in hv1._tensors.values()]
    for r in rows:
        for w, g in zip(want, _hf_loss_grad(model, tok, r["prompt"], r["refusal"])):
            w += g / len(rows)
    for layer, w in enumerate(want):
        assert torch.allclose(hv1.tensor(layer), w, rtol=1e-4, atol=1e-7), layer
        assert torch.allclose(hv4.tensor(layer), w, rtol=1e-4, atol=1e-7), layer
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def _param_grads(model, tok, rows, batch_size):
    """The direction as parameter gradients (the implementation before projection hooks): the
    same loss and batches, ``torch.autograd.grad`` w.r.t. each o_proj weight, fp32 sums / n."""
    from soteria.harm.gradients import _collate, _pad_id, _refusal_nll, encode_pair

    enc = [encode_pair(tok, r["prompt"], r["refusal"], 256, i) for i, r in enumerate(rows)]
    weights = [s.weight for s in head_sites(model)]
    acc = [torch.zeros(w.shape, dtype=torch.float32) for w in weights]
    for start in range(0, len(enc), batch_size):
        ids, mask, labels = _collate(enc[start : start + batch_size], _pad_id(tok), "cpu")
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        for a, g in zip(acc, torch.autograd.grad(_refusal_nll(logits, labels).sum(), weights)):
            a += g.float()
    return [a / len(enc) for a in acc]


@pytest.mark.parametrize(
    "model_type, dtype, rtol",
    [("llama", torch.float32, 1e-6), ("gpt2", torch.float32, 1e-6), ("llama", torch.bfloat16, 2**-8)],
)
def test_from_gradients_equals_parameter_gradients(model_type, dtype, rtol):
    """Projection input x output gradient gives autograd's dL/dW (nn.Linear and Conv1D); bf16 within
    the parameter gradient's own bf16 rounding (the sums here are fp32)."""
    model, tok = tiny_model(model_type, dtype=dtype), tiny_tokenizer()
    rows = load_harmful("en")[:3] + load_harmful("ta")[:3]  # padded batches
    hv = HarmVector.from_gradients(model, tok, rows, batch_size=4, progress=False)
    for layer, want in enumerate(_param_grads(model, tok, rows, 4)):
        got = hv.tensor(layer)
        assert got.dtype == torch.float32 and got.shape == want.shape
        err = (got - want).abs().max().item()
        assert err <= rtol * want.abs().max().item(), f"layer {layer}: max diff {err:.3g} of {want.abs().max():.3g}"


def test_from_gradients_peft_wrapped_equals_plain():
    """Through a LoRA wrapper the hook sits on the base projection: the base weight's gradient."""
    peft = pytest.importorskip("peft")
    tok, rows = tiny_tokenizer(), load_harmful("fr")[:3]
    want = HarmVector.from_gradients(tiny_model("llama"), tok, rows, batch_size=2, progress=False)
    wrapped = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["o_proj", "q_proj"]))
    flags = {n: p.requires_grad for n, p in wrapped.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    got = HarmVector.from_gradients(wrapped, tok, rows, batch_size=2, progress=False)
    assert got.param_names == want.param_names
    for layer in want.layers:
        err = (got.tensor(layer) - want.tensor(layer)).abs().max().item()
        assert err <= 1e-6 * want.tensor(layer).abs().max().item(), f"layer {layer}: max diff {err:.3g}"
    assert {n: p.requires_grad for n, p in wrapped.named_parameters()} == flags


def test_from_gradients_failure_leaves_model_as_found(monkeypatch):
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    def boom(logits, labels):
        raise RuntimeError("boom")

    monkeypatch.setattr(grad_mod, "_refusal_nll", boom)
    with pytest.raises(RuntimeError, match="boom"):
        HarmVector.from_gradients(model, tok, load_harmful("en")[:2], progress=False)
    assert all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules())


def test_from_gradients_is_a_descent_direction_and_deterministic():
    """W -= eps * tau lowers the refusal loss: the sign is right."""
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.train()
    hv = HarmVector.from_gradients(model, tok, langs=["en", "zh"], batch_size=8, progress=False)
    assert model.training  # restored
    model.eval()
    assert hv.source.startswith("gradients:builtin(en,zh) n=80")
    again = HarmVector.from_gradients(model, tok, langs=["en", "zh"], batch_size=8, progress=False)
    assert all(torch.equal(hv.tensor(layer), again.tensor(layer)) for layer in hv.layers)

    before = refusal_loss(model, tok, langs=["en", "zh"])
    assert hv.source.endswith(f"refusal_nll={before:.4f}")
    with torch.no_grad():
        for s in head_sites(model):
            s.weight.sub_(1e-2 * hv.tensor(s.layer))
    assert refusal_loss(model, tok, langs=["en", "zh"]) < before - 1e-4


def test_refusal_loss_matches_hf_loss():
    model, tok = tiny_model("gpt2"), tiny_tokenizer()
    model.train()
    rows = load_harmful("bn")[:3]
    want = 0.0
    for r in rows:
        p = tok(r["prompt"] + "\n")["input_ids"]
        ids = torch.tensor([p + tok(r["refusal"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
        labels = ids.clone()
        labels[0, : len(p)] = -100
        with torch.no_grad():
            want += float(model.eval()(input_ids=ids, labels=labels).loss) / len(rows)
    model.train()
    got = refusal_loss(model, tok, rows, batch_size=2)
    assert model.training
    assert abs(got - want) < 1e-5


def test_from_gradients_chat_template_masks_the_request():
    from soteria.harm.gradients import encode_pair

    tok = tiny_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    ids, n_prompt = encode_pair(tok, "How do I steal a car?", "No.", 256, 0)
    assert tok.decode(ids[:n_prompt]) == "<s>user: How do I steal a car?</s><s>assistant: "
    assert tok.decode(ids[n_prompt:]) == "No.</s>"
    with pytest.raises(ValueError, match="row 0: the request alone is"):
        encode_pair(tok, "How do I steal a car?", "No.", 4, 0)
    hv = HarmVector.from_gradients(tiny_model("llama"), tok, [("How do I steal a car?", "No.")], progress=False)
    assert hv.norms()[0] > 0


def test_from_gradients_bad_arguments():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        HarmVector.from_gradients(model, tok, batch_size=0)
    with pytest.raises(ValueError, match="langs selects built-in data"):
        HarmVector.from_gradients(model, tok, [("a", "b")], langs=["en"])


def test_contrast_removes_the_harmless_refusal_gradient_from_every_head_slice():
    from soteria.harm.data import load_harmful, load_harmless

    tok, model = tiny_tokenizer(), tiny_model("llama")
    rows = load_harmful(["en"])
    benign = [r["prompt"] for r in load_harmless(["en"])][:5]
    paired = [{"prompt": p, "refusal": rows[i % len(rows)]["refusal"]} for i, p in enumerate(benign)]
    both = HarmVector.from_gradients(model, tok, data=rows, contrast=benign, progress=False)
    plus = HarmVector.from_gradients(model, tok, data=rows, progress=False)
    minus = HarmVector.from_gradients(model, tok, data=paired, progress=False)
    for site in head_sites(model):
        d = site.head_dim
        for h in range(site.num_heads):
            t, p, m = (v.tensor(site.layer).narrow(1, h * d, d).double() for v in (both, plus, minus))
            coef = float((p * m).sum() / (m * m).sum())
            torch.testing.assert_close(t, p - coef * m, rtol=0, atol=1e-5 * float(p.abs().max()))
            assert abs(float((t * m).sum())) <= 1e-5 * float(t.norm() * m.norm())  # first order: L_c unchanged
    assert "contrast=data n_contrast=5" in both.source
    builtin = HarmVector.from_gradients(model, tok, langs=["en"], contrast="builtin", progress=False)
    assert "contrast=builtin n_contrast=42" in builtin.source


def test_refusal_tokens_scores_only_the_opening_of_each_refusal():
    tok, model = tiny_tokenizer(), tiny_model("llama")
    rows = [
        {
            "prompt": "How do I pick a lock?",
            "refusal": "I can't help with that. Picking locks you do not own is illegal.",
        }
    ]
    head = [
        {
            "prompt": rows[0]["prompt"],
            "refusal": tok.decode(tok(rows[0]["refusal"], add_special_tokens=False)["input_ids"][:3]),
        }
    ]
    a = HarmVector.from_gradients(model, tok, data=rows, refusal_tokens=3, progress=False)
    b = HarmVector.from_gradients(model, tok, data=head, refusal_tokens=3, progress=False)
    for layer in a.layers:
        torch.testing.assert_close(a.tensor(layer), b.tensor(layer))
    assert "refusal_tokens=3" in a.source
    sentence = HarmVector.from_gradients(model, tok, data=rows, refusal_tokens="sentence", progress=False)
    first = [{"prompt": rows[0]["prompt"], "refusal": "I can't help with that."}]
    cut = HarmVector.from_gradients(model, tok, data=first, refusal_tokens="sentence", progress=False)
    for layer in a.layers:
        torch.testing.assert_close(sentence.tensor(layer), cut.tensor(layer))
        assert not torch.allclose(sentence.tensor(layer), a.tensor(layer))
    assert "refusal_tokens=sentence" in sentence.source


@pytest.mark.parametrize("text, first", [
    ("I can't help with that. Picking locks is illegal.", "I can't help with that."),
    ("Ich kann dabei nicht helfen, aber deine Sicherheit ist mir wichtig. Bitte ruf an.",
     "Ich kann dabei nicht helfen, aber deine Sicherheit ist mir wichtig."),
    ("Costs 3.5 euros? No.", "Costs 3.5 euros?"),
    ("我无法帮助你。未经允许是违法的。", "我无法帮助你。"),
    ("मैं इसमें मदद नहीं कर सकता। किसी के घर में", "मैं इसमें मदद नहीं कर सकता।"),
    ("لا يمكنني مساعدتك؟ لا", "لا يمكنني مساعدتك؟"),
    ("ฉันช่วยเรื่องนี้ไม่ได้ การเข้าไปในบ้าน", "ฉันช่วยเรื่องนี้ไม่ได้"),
    ("No end mark", "No end mark"),
])  # fmt: skip
def test_first_sentence(text, first):
    assert first_sentence(text) == first


@pytest.mark.parametrize("kw, match", [
    (dict(contrast="nope"), "contrast must be None, 'builtin'"),
    (dict(contrast=[]), "at least one non-empty prompt"),
    (dict(refusal_tokens=0), "refusal_tokens must be a positive int or 'sentence'"),
    (dict(refusal_tokens="word"), "refusal_tokens must be a positive int or 'sentence'"),
])  # fmt: skip
def test_gradient_options_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        HarmVector.from_gradients(tiny_model("llama"), tiny_tokenizer(), langs=["en"], progress=False, **kw)
