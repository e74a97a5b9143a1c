"""soteria.heads.attribution: AtP and exact activation patching against independent references.

The references here share nothing with the code under test but ``head_sites``: one prompt at a
time (no padding), plain hooks, float64 arithmetic for the per-head sums.
"""

from __future__ import annotations

import pytest
import torch

from soteria.arch import head_sites
from soteria.heads.attribution import LAST_TOKEN_ROWS, indirect_effects, mean_activations
from soteria.heads.lastpos import LastToken
from soteria.models.tiny import tiny_model, tiny_tokenizer

CLEAN = [
    "Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:",
    "Q: France\nA: Paris\n\nQ: Japan\nA:",
    "Q: good\nA: bad\n\nQ: fast\nA: slow\n\nQ: quick brown fox\nA: lazy dog\n\nQ: day\nA:",
]
CORRUPTED = [
    "Q: hot\nA: small\n\nQ: big\nA: cold\n\nQ: up\nA:",
    "Q: France\nA: Tokyo\n\nQ: Japan\nA:",
    "Q: good\nA: lazy dog\n\nQ: fast\nA: bad\n\nQ: quick brown fox\nA: slow\n\nQ: day\nA:",
]
TARGETS = [" down", " Tokyo", " night"]
FAMILIES = ["llama", "gpt2", "qwen2"]  # GQA nn.Linear, Conv1D, GQA with q/k/v biases


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _ids(tok, text):
    return list(tok(text)["input_ids"])


def _first(tok, target):
    return tok(target, add_special_tokens=False)["input_ids"][0]


def _forward_p(model, ids, target, layer=None, patch=None):
    """p(target) at the last token of one unpadded prompt; ``patch(z)`` rewrites layer's o_proj input."""
    handle = None
    if patch is not None:
        site = head_sites(model)[layer]
        handle = site.module.register_forward_pre_hook(lambda mod, args: (patch(args[0]), *args[1:]))
    try:
        logits = model(input_ids=torch.tensor([ids])).logits
    finally:
        if handle is not None:
            handle.remove()
    return torch.softmax(logits[0, -1].double(), -1)[target]


def _ref_means(model, tok, prompts):
    """float64 [L, H*D]: mean over prompts of each o_proj input at the last token."""
    sites = head_sites(model)
    acc = torch.zeros(len(sites), sites[0].num_heads * sites[0].head_dim, dtype=torch.float64)
    for p in prompts:
        for layer in range(len(sites)):

            def grab(z, layer=layer):
                acc[layer] += z[0, -1].double()
                return z

            with torch.no_grad():
                _forward_p(model, _ids(tok, p), 0, layer, grab)
    return acc / len(prompts)


def _ref_atp(model, tok, clean, corrupted, targets):
    """float64 [N, L, H] by plain autograd: replace one layer's o_proj input by a leaf, differentiate."""
    sites = head_sites(model)
    L, H, D = len(sites), sites[0].num_heads, sites[0].head_dim
    means = _ref_means(model, tok, clean)
    out = torch.zeros(len(corrupted), L, H, dtype=torch.float64)
    for i, (p, t) in enumerate(zip(corrupted, targets)):
        for layer in range(L):
            leaf = {}

            def swap(z, leaf=leaf):
                leaf["z"] = z.detach().clone().requires_grad_(True)
                return leaf["z"]

            prob = _forward_p(model, _ids(tok, p), _first(tok, t), layer, swap)
            (g,) = torch.autograd.grad(prob, leaf["z"])
            z_last, g_last = leaf["z"][0, -1].detach().double(), g[0, -1].double()
            out[i, layer] = ((means[layer] - z_last) * g_last).view(H, D).sum(-1)
    return out


def _ref_exact(model, tok, clean, corrupted, targets, eps=1.0):
    """float64 [N, L, H]: patch one head at a time, z_h[last] += eps * (mean_h - z_h[last])."""
    sites = head_sites(model)
    L, H, D = len(sites), sites[0].num_heads, sites[0].head_dim
    means = _ref_means(model, tok, clean)
    out = torch.zeros(len(corrupted), L, H, dtype=torch.float64)
    with torch.no_grad():
        for i, (p, t) in enumerate(zip(corrupted, targets)):
            ids, tgt = _ids(tok, p), _first(tok, t)
            base = _forward_p(model, ids, tgt)
            for layer in range(L):
                for h in range(H):
                    sl = slice(h * D, (h + 1) * D)

                    def patch(z, layer=layer, sl=sl):
                        z = z.clone()
                        cur = z[0, -1, sl].double()
                        z[0, -1, sl] = (cur + eps * (means[layer, sl] - cur)).to(z.dtype)
                        return z

                    out[i, layer, h] = _forward_p(model, ids, tgt, layer, patch) - base
    return out


def _close(got, want, rel):
    scale = want.abs().max().item()
    err = (got.double() - want).abs().max().item()
    assert scale > 0, "reference effects are all zero: the test cannot fail"
    assert err <= rel * scale, f"max abs error {err:.3g} > {rel} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("family", [*FAMILIES, "gemma"])  # gemma: multi-query, D = 24
def test_atp_equals_plain_autograd(family, tok):
    # Default backend: the Triton kernel (interpreted on CPU under the test suite).
    model = tiny_model(family)
    got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="atp", batch_size=3)
    assert got.dtype == torch.float32 and got.shape == (3, *_lh(model))
    _close(got, _ref_atp(model, tok, CLEAN, CORRUPTED, TARGETS), rel=1e-4)


def _lh(model):
    sites = head_sites(model)
    return len(sites), sites[0].num_heads


# Exact patching runs each prompt's prefix once with a KV cache and only the last token per
# patched head (heads.lastpos); method="exact_full" runs every patched copy through the whole
# prompt. Both must equal one head at a time. Families: GQA nn.Linear, Conv1D, q/k/v biases, a
# sliding window of 16 on every layer (the prompts are 30-60 tokens, so it bites), the same
# natively (ministral), and Falcon, whose decoder layers return tuples (so its passes keep the
# batch-row layout and run every layer).
KV_FAMILIES = [
    ("llama", {}),
    ("gpt2", {}),
    ("qwen2", {}),
    ("mistral", {"sliding_window": 16}),
    ("ministral", {}),
    ("falcon", {}),
]


@pytest.mark.parametrize("family, overrides", KV_FAMILIES)
def test_exact_batched_equals_one_head_at_a_time(family, overrides, tok):
    # float64 with sdpa attention keeps every op in float64 (eager attention softmaxes in fp32),
    # so the only rounding left is the returned float32 tensor: ~6e-8 of each value.
    model = tiny_model(family, dtype=torch.float64, attn_implementation="sdpa", **overrides)
    want = _ref_exact(model, tok, CLEAN, CORRUPTED, TARGETS)
    full = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="exact_full", batch_size=64)
    _close(full, want, rel=1e-6)
    # 64 rows per pass packs all three prompts (three lengths: padded) into one batch; 5 splits a
    # batch's heads across passes; 1 runs one prompt per batch.
    for bs in (64, 5, 1):
        got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="exact", batch_size=bs)
        _close(got, want, rel=1e-6)
        _close(got, full.double(), rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2"])  # gemma2: sliding and full layers mix
def test_exact_eager_float64(family, tok):
    # Eager attention softmaxes in fp32 even for fp64 models; an effect is a difference of
    # probabilities ~2e-3 that differ by ~1e-5, so fp32 softmax rounding is ~1e-6 of it. One
    # clean prompt: a padded fp64 eager pass of a sliding-window model turns pad rows into NaNs.
    model = tiny_model(family, dtype=torch.float64)
    want = _ref_exact(model, tok, CLEAN[:1], CORRUPTED, TARGETS)
    got = indirect_effects(model, tok, CLEAN[:1], CORRUPTED, TARGETS, method="exact", batch_size=64)
    _close(got, want, rel=1e-5)


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("gpt2", {}), ("gemma2", {})])
def test_exact_float32_equals_whole_prompts(family, overrides, tok):
    # fp32 effects (~1e-5 differences of ~2e-3 probabilities) carry rounding of ~1e-4 of the
    # largest effect in any batching: the whole-prompt path moves that much between batch sizes.
    model = tiny_model(family, **overrides)
    full = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="exact_full", batch_size=64)
    got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="exact", batch_size=64)
    _close(got, full.double(), rel=3e-4)


def test_exact_runs_last_tokens_from_the_patched_layer_up(tok):
    """Fewer tokens reach every o_proj than with whole prompts, and fewer the lower the layer
    (layers below the patched one are skipped); the model is left as it was found."""
    model = tiny_model("llama", num_hidden_layers=4)
    sites = head_sites(model)
    tokens = {}

    def count(method):
        seen = [0] * len(sites)
        handles = [
            s.module.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, seen[i] + a[0].shape[:2].numel()))
            for i, s in enumerate(sites)
        ]
        try:
            indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method=method, batch_size=2)
        finally:
            for h in handles:
                h.remove()
        tokens[method] = seen

    count("exact")
    count("exact_full")
    fast, full = tokens["exact"], tokens["exact_full"]
    assert all(f * 5 < w for f, w in zip(fast, full)), (fast, full)
    assert fast[0] < fast[-1], fast
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_exact_one_token_prompt_falls_back_to_whole_prompts(tok):
    # A one-token prompt has no prefix to cache: its batch runs whole prompts, others the cache.
    model = tiny_model("llama", dtype=torch.float64, attn_implementation="sdpa")
    corrupted = [_ids(tok, CORRUPTED[0]), [_ids(tok, CORRUPTED[1])[1]]]
    want = indirect_effects(model, tok, CLEAN, corrupted, TARGETS[:2], method="exact_full", batch_size=64)
    for bs in (64, 1):
        got = indirect_effects(model, tok, CLEAN, corrupted, TARGETS[:2], method="exact", batch_size=bs)
        _close(got, want.double(), rel=1e-6)


def test_finite_difference_approaches_atp(tok, monkeypatch):
    """Scale the patch by eps: exact effect / eps -> AtP score, with an error shrinking like eps.

    GPT-2 in float64 keeps every op in float64 (Llama's RMSNorm upcasts to fp32 only, which
    floors the finite differences near eps = 1e-2).
    """
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("gpt2", dtype=torch.float64)
    atp = indirect_effects(model, tok, CLEAN[:2], CORRUPTED[:2], TARGETS[:2]).double()
    errs = []
    for eps in (1e-1, 1e-2, 1e-3):
        fd = _ref_exact(model, tok, CLEAN[:2], CORRUPTED[:2], TARGETS[:2], eps=eps) / eps
        errs.append((fd - atp).abs().max().item())
    scale = atp.abs().max().item()
    assert errs[-1] < 1e-4 * scale, (errs, scale)
    assert errs[0] / errs[1] > 5 and errs[1] / errs[2] > 5, f"error does not shrink like eps: {errs}"


@pytest.mark.parametrize("method", ["atp", "exact"])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-6), (torch.float32, 1e-3)])
def test_padded_batches_equal_singletons(method, dtype, rel, tok, monkeypatch):
    # fp32 effects are differences of probabilities ~2e-3 that differ by ~1e-5, so batch-shape
    # rounding (~1e-9) is ~1e-4 of them; float64 shows the padding itself changes nothing.
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("gpt2", dtype=dtype)  # absolute positions: right padding must not shift anything
    batched = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method=method, batch_size=64)
    lengths = {len(_ids(tok, p)) for p in CORRUPTED}
    assert len(lengths) == 3, "prompts must differ in length for this test to pad"
    single = torch.cat(
        [indirect_effects(model, tok, CLEAN, [p], [t], method=method, batch_size=1) for p, t in zip(CORRUPTED, TARGETS)]
    )
    _close(batched, single.double(), rel=rel)


def test_token_ids_are_used_as_given(tok, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    by_text = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)
    clean_ids = [_ids(tok, p) for p in CLEAN]
    corr_ids = [torch.tensor(_ids(tok, p)) for p in CORRUPTED]
    target_ids = [[_first(tok, t), 7] for t in TARGETS]  # only the first token counts
    by_ids = indirect_effects(model, tok, clean_ids, corr_ids, target_ids)
    torch.testing.assert_close(by_ids, by_text, rtol=1e-5, atol=1e-9)
    # Dropping the BOS changes the input, so the scores must change too.
    no_bos = indirect_effects(model, tok, [c[1:] for c in clean_ids], [c[1:] for c in corr_ids], target_ids)
    assert (no_bos - by_text).abs().max() > 1e-4 * by_text.abs().max()


def test_mean_activations_match_reference(tok):
    model = tiny_model("qwen2")
    got = mean_activations(model, tok, CLEAN, batch_size=2)
    want = _ref_means(model, tok, CLEAN)
    torch.testing.assert_close(torch.stack(got).double(), want, rtol=1e-5, atol=1e-6)


def test_model_state_is_restored(tok, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    model.lm_head.weight.requires_grad_(False)
    training = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    for method in ("atp", "exact", "exact_full"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method=method)
    assert not any("forward" in m.__dict__ for m in model.modules())  # no layer left stubbed out
    assert {n: m.training for n, m in model.named_modules()} == training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n]), n


def test_hooks_removed_after_an_error(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="out of range"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, [10**6] * 3)
    assert all(not m._forward_pre_hooks for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_atp_under_callers_no_grad_and_inference_mode(tok, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    want = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)
    with torch.no_grad():
        got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)
    torch.testing.assert_close(got, want)
    with torch.inference_mode():
        got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)
    torch.testing.assert_close(got, want)


def test_bf16_model_scores_follow_fp32(tok, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    fp32 = indirect_effects(tiny_model("llama"), tok, CLEAN, CORRUPTED, TARGETS)
    bf16 = indirect_effects(tiny_model("llama", dtype=torch.bfloat16), tok, CLEAN, CORRUPTED, TARGETS)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    corr = torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1]
    assert corr > 0.99, corr


def test_bad_inputs(tok):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="method"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="fast")
    with pytest.raises(ValueError, match="clean_prompts is empty"):
        indirect_effects(model, tok, [], CORRUPTED, TARGETS)
    with pytest.raises(ValueError, match="corrupted_prompts is empty"):
        indirect_effects(model, tok, CLEAN, [], [])
    with pytest.raises(ValueError, match="2 targets for 3 corrupted"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS[:2])
    with pytest.raises(ValueError, match="single prompt"):
        indirect_effects(model, tok, CLEAN[0], CORRUPTED, TARGETS)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, ["", " a", " b"])
    with pytest.raises(ValueError, match="empty token-id list"):
        indirect_effects(model, tok, [[]], CORRUPTED, TARGETS)
    with pytest.raises(ValueError, match="batch_size"):
        indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, batch_size=0)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_wrapped_model(tok, monkeypatch):
    """Hooks sit on the LoRA wrapper of o_proj; a fresh adapter (B = 0) leaves every score as is."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    base = tiny_model("llama")
    want = {m: indirect_effects(base, tok, CLEAN, CORRUPTED, TARGETS, method=m) for m in ("atp", "exact")}
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["o_proj", "q_proj"]))
    for m in ("atp", "exact"):
        got = indirect_effects(wrapped, tok, CLEAN, CORRUPTED, TARGETS, method=m)
        torch.testing.assert_close(got, want[m], rtol=1e-4, atol=1e-9)
    assert all(not mod._forward_pre_hooks for mod in wrapped.modules())
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_peft_wrapped_model_keeps_only_needed_logits(tok, monkeypatch):
    """The PEFT wrapper passes logits_to_keep through: no [B, T, V] logits for the whole prompt."""
    peft = pytest.importorskip("peft")
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    base = tiny_model("llama")
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["o_proj"]))
    widths = []
    base.lm_head.register_forward_hook(lambda m, a, out: widths.append(out.shape[1]))
    indirect_effects(wrapped, tok, CLEAN, CORRUPTED, TARGETS, method="atp", batch_size=3)
    lengths = {len(_ids(tok, p)) for p in CORRUPTED}  # the distinct last positions of a batch
    assert widths and max(widths) <= len(lengths), widths
    # Exact: prefixes and whole-prompt passes keep one logit; a last-token pass of 8 patched
    # copies per prompt (3 * LAST_TOKEN_ROWS rows) has 8 positions, all needed (2: the probe
    # that picks the layout).
    widths.clear()
    indirect_effects(wrapped, tok, CLEAN, CORRUPTED, TARGETS, method="exact", batch_size=3)
    assert widths and set(widths) <= {1, 2, LAST_TOKEN_ROWS}, widths


def test_prompt_learning_adapters_are_refused():
    """Virtual tokens shift positions: the last-token read would be wrong, so refuse clearly."""
    peft = pytest.importorskip("peft")
    from soteria.models.tiny import tiny_model, tiny_tokenizer

    model = peft.get_peft_model(
        tiny_model("llama"), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="prompt-learning adapter"):
        indirect_effects(model, tok, ["Q: a\nA: b"], ["Q: a\nA: c"], [" b"])


@pytest.mark.parametrize("method", ["atp", "exact"])
def test_progress_counts_the_clean_mean_pass(method, tok, monkeypatch):
    """The clean mean pass runs first and moves the count after each of its batches (a bar no
    longer sits at 0 through it); all calls add up to the number of corrupted prompts."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    events: list = []
    model.register_forward_pre_hook(lambda *a: events.append("pass"))
    indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method=method, batch_size=1, progress=events.append)
    mean_pass = events[: 2 * len(CLEAN)]  # one clean prompt per batch, each followed by a count
    assert mean_pass[0::2] == ["pass"] * len(CLEAN) and all(c != "pass" and c > 0 for c in mean_pass[1::2])
    assert sum(e for e in events if e != "pass") == pytest.approx(len(CORRUPTED))


def test_exact_batch_row_layout_equals_one_head_at_a_time(tok, monkeypatch):
    # Families whose copies cannot share a batch row as query positions (the probe fails) put
    # each patched copy in its own batch row over a repeated cache; layers are still skipped.
    monkeypatch.setattr(LastToken, "_copies_work", lambda self, base: False)
    model = tiny_model("qwen2", dtype=torch.float64, attn_implementation="sdpa")
    want = _ref_exact(model, tok, CLEAN, CORRUPTED, TARGETS)
    for bs in (64, 5):
        got = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, method="exact", batch_size=bs)
        _close(got, want, rel=1e-6)


# --------------------------------------------------------------------------- means="leave_one_out"

# Two groups of twins: row i is patched with the mean over its group's other clean prompts.
LOO_CLEAN, LOO_CORRUPTED, LOO_TARGETS = CLEAN + [CLEAN[1]], CORRUPTED + [CORRUPTED[1]], TARGETS + [TARGETS[1]]
LOO_GROUPS = [0, 0, 1, 1]


def test_leave_one_out_means_equal_hand_computed():
    from soteria.heads.attribution import _leave_one_out

    groups = torch.tensor([0, 1, 0, 0, 2, 1, 2])
    own = [torch.randn(7, 12, dtype=torch.float64) for _ in range(2)]
    got = _leave_one_out(own, groups)
    for z, m in zip(own, got):
        for i in range(7):
            others = [j for j in range(7) if groups[j] == groups[i] and j != i]
            torch.testing.assert_close(m[i], z[others].mean(0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method, rel", [("atp", 1e-4), ("exact", 1e-6)])
def test_leave_one_out_equals_the_others_clean_mean(method, rel, tok, monkeypatch):
    """Row i equals the float64 reference patched with the mean over the other clean prompts of its group."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("gpt2", dtype=torch.float64, attn_implementation="sdpa")
    got = indirect_effects(model, tok, LOO_CLEAN, LOO_CORRUPTED, LOO_TARGETS, method=method, batch_size=3,
                           clean_groups=LOO_GROUPS, corrupted_groups=LOO_GROUPS, means="leave_one_out")  # fmt: skip
    ref = {"atp": _ref_atp, "exact": _ref_exact}[method]
    for i, g in enumerate(LOO_GROUPS):
        others = [LOO_CLEAN[j] for j, h in enumerate(LOO_GROUPS) if h == g and j != i]
        _close(got[i : i + 1], ref(model, tok, others, [LOO_CORRUPTED[i]], [LOO_TARGETS[i]]), rel=rel)
    paired = indirect_effects(model, tok, LOO_CLEAN, LOO_CORRUPTED, LOO_TARGETS, method=method, batch_size=3,
                              clean_groups=LOO_GROUPS, corrupted_groups=LOO_GROUPS)  # fmt: skip
    assert (got - paired).abs().max() > 1e-3 * paired.abs().max()  # the two means differ


def test_paired_means_are_the_default(tok, monkeypatch):
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    model = tiny_model("llama")
    default = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)
    assert torch.equal(indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS, means="paired"), default)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means="separate"), "means must be one of"),
        (dict(means="leave_one_out", clean_prompts=CLEAN[:2]), "clean twin of corrupted_prompts"),
        (dict(means="leave_one_out", clean_groups=[0, 0, 1], corrupted_groups=[0, 1, 1]), "clean twin"),
        (dict(means="leave_one_out", clean_groups=[0, 0, 1], corrupted_groups=[0, 0, 1]), "group 1 has 1"),
    ],
)
def test_bad_means_fail_before_model_work(kwargs, match, tok):
    model = tiny_model("llama")
    for site in head_sites(model):
        site.module.register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(AssertionError("the model ran")))
    args = {"clean_prompts": CLEAN, "corrupted_prompts": CORRUPTED, "targets": TARGETS, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        indirect_effects(model, tok, **args)
    assert "\n" not in str(info.value)
