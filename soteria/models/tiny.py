"""Tiny, deterministic Hugging Face models and tokenizer for tests and demos (no downloads).

``tiny_tokenizer()`` is a real byte-level BPE ``PreTrainedTokenizerFast`` (<= 512 ids) built
locally; ``tiny_model(model_type)`` is a randomly initialised causal LM of that family whose
vocabulary matches it. Head widths are deliberately varied (8, 12, 16, 24, non-powers of two
included) and most families use grouped-query attention, so nothing can assume ``D = 128``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# Shared sizes. Every family has 4 query heads; hidden sizes stay in 32..64.
_VOCAB = 512
_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")  # ids 0..3
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(4)
_HEADS = 4

# Per-family config keyword arguments (the family's own names, e.g. GPT-2's n_embd).
# A comment gives the head width D that results.
_LLAMA_LIKE = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=_HEADS,
    num_key_value_heads=2,
    max_position_embeddings=512,
)  # D = 12

_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE, hidden_size=64, intermediate_size=128, sliding_window=None),  # D = 16
    "mixtral": dict(
        _LLAMA_LIKE, hidden_size=32, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2
    ),  # D = 8
    "qwen2": dict(_LLAMA_LIKE, num_hidden_layers=3),  # D = 12
    "qwen2_moe": dict(
        _LLAMA_LIKE,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
    ),  # D = 8
    "qwen3": dict(_LLAMA_LIKE, hidden_size=32, head_dim=12),  # explicit D = 12 != 32 / 4
    "qwen3_moe": dict(
        _LLAMA_LIKE, hidden_size=32, head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2
    ),  # D = 16
    "gemma": dict(_LLAMA_LIKE, hidden_size=32, head_dim=24, num_key_value_heads=1),  # D = 24 (MQA)
    "gemma2": dict(_LLAMA_LIKE, hidden_size=32, head_dim=16, sliding_window=16),  # D = 16
    "gemma3_text": dict(_LLAMA_LIKE, hidden_size=48, head_dim=16, sliding_window=16),  # D = 16
    "phi": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        partial_rotary_factor=0.5,
        max_position_embeddings=512,
    ),  # D = 12
    "phi3": dict(_LLAMA_LIKE, hidden_size=96, intermediate_size=64, original_max_position_embeddings=512),  # D=24
    "gpt2": dict(n_embd=48, n_layer=2, n_head=_HEADS, n_positions=512),  # D = 12, Conv1D
    "gpt_neox": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        rotary_pct=0.5,
        max_position_embeddings=512,
    ),  # D = 12
    "gptj": dict(n_embd=64, n_layer=2, n_head=_HEADS, rotary_dim=8, n_positions=512),  # D = 16
    "opt": dict(
        hidden_size=32,
        ffn_dim=64,
        word_embed_proj_dim=32,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        max_position_embeddings=512,
    ),  # D = 8
    "falcon": dict(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        multi_query=True,
        parallel_attn=True,
        bias=False,
        alibi=False,
    ),  # D = 12 (MQA)
    "olmo": dict(_LLAMA_LIKE),  # D = 12
    "olmo2": dict(_LLAMA_LIKE, hidden_size=64, intermediate_size=64),  # D = 16
    "cohere": dict(_LLAMA_LIKE, logit_scale=1.0),  # D = 12
    "stablelm": dict(_LLAMA_LIKE, partial_rotary_factor=0.5),  # D = 12
    "starcoder2": dict(_LLAMA_LIKE, sliding_window=None),  # D = 12
    "granite": dict(_LLAMA_LIKE, hidden_size=32),  # D = 8
    "bloom": dict(hidden_size=48, n_layer=2, n_head=_HEADS),  # D = 12, fused QKV + dense
    "gpt_neo": dict(
        hidden_size=32,
        num_layers=2,
        num_heads=_HEADS,
        attention_types=[[["global", "local"], 1]],
        window_size=16,
        max_position_embeddings=512,
    ),  # D = 8
    "gpt_bigcode": dict(n_embd=48, n_layer=2, n_head=_HEADS, n_positions=512, multi_query=True),  # D = 12
    "codegen": dict(n_embd=64, n_layer=2, n_head=_HEADS, rotary_dim=8, n_positions=512, n_ctx=512),  # D=16
    "persimmon": dict(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=_HEADS,
        partial_rotary_factor=0.5,
        max_position_embeddings=512,
    ),  # D = 12, fused QKV + dense
    "biogpt": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=_HEADS),  # D=12
    "xglm": dict(d_model=48, ffn_dim=96, num_layers=2, attention_heads=_HEADS),  # D = 12
    "mpt": dict(d_model=48, n_layers=2, n_heads=_HEADS, expansion_ratio=2),  # D = 12, fused Wqkv
    "smollm3": dict(_LLAMA_LIKE),  # D = 12
    "helium": dict(_LLAMA_LIKE, head_dim=12),  # D = 12
    "ministral": dict(_LLAMA_LIKE, head_dim=12, sliding_window=16),  # D = 12
    "glm": dict(_LLAMA_LIKE, hidden_size=32, head_dim=24),  # explicit D = 24 != 32 / 4
    "glm4": dict(_LLAMA_LIKE, head_dim=12),  # D = 12
    "nemotron": dict(_LLAMA_LIKE, partial_rotary_factor=0.5),  # D = 12
    "seed_oss": dict(_LLAMA_LIKE, head_dim=12),  # D = 12
    "internlm3": dict(_LLAMA_LIKE, head_dim=12),  # D = 12
    "exaone4": dict(_LLAMA_LIKE, sliding_window=16, sliding_window_pattern=2),  # D = 12
    "cohere2": dict(_LLAMA_LIKE, sliding_window=16),  # D = 12
    "olmo3": dict(_LLAMA_LIKE, sliding_window=16),  # D = 12
    "granitemoe": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),  # D = 12
    "olmoe": dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2),  # D = 12
    "phimoe": dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),  # D = 12
    "gpt_oss": dict(
        _LLAMA_LIKE,
        head_dim=12,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        max_position_embeddings=131072,  # YaRN wants original (4096) < max; costs nothing at this size
    ),  # D = 12
    "deepseek_v3": dict(
        _LLAMA_LIKE,
        num_key_value_heads=_HEADS,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=12,
        moe_intermediate_size=32,
        n_routed_experts=4,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        n_group=1,
        topk_group=1,
    ),  # MLA: o_proj input is H * v_head_dim, D = 12
}

TINY_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)

# Small fixed corpus for the BPE merges: the probe prompt template and everyday text in the
# twelve Soteria languages. Changing it changes token ids; keep it fixed.
_CORPUS = (
    "Q: hot\nA: cold\n\nQ: France\nA: Paris\n\nQ: Japan\nA: yen\n\n",
    "The quick brown fox jumps over the lazy dog. How are you today? I am fine, thank you.",
    "The capital of Germany is Berlin. The opposite of big is small. This movie is good.",
    "这是一个测试。今天天气很好。中国的首都是北京。我喜欢学习语言。",
    "Bonjour, comment allez-vous ? La capitale de la France est Paris. Le contraire de chaud est froid.",
    "Guten Tag, wie geht es Ihnen? Die Hauptstadt von Deutschland ist Berlin. Das Gegenteil von heiß ist kalt.",
    "Hola, ¿cómo estás? La capital de España es Madrid. Lo contrario de caliente es frío.",
    "مرحبا، كيف حالك؟ عاصمة مصر هي القاهرة. عكس حار هو بارد.",
    "Здравейте, как сте? Столицата на България е София. Обратното на горещо е студено.",
    "สวัสดีครับ คุณสบายดีไหม เมืองหลวงของประเทศไทยคือกรุงเทพมหานคร",
    "नमस्ते, आप कैसे हैं? भारत की राजधानी नई दिल्ली है। गर्म का विलोम ठंडा है।",
    "নমস্কার, আপনি কেমন আছেন? বাংলাদেশের রাজধানী ঢাকা। গরমের বিপরীত ঠান্ডা।",
    "வணக்கம், நீங்கள் எப்படி இருக்கிறீர்கள்? இந்தியாவின் தலைநகரம் புது தில்லி.",
    "నమస్కారం, మీరు ఎలా ఉన్నారు? భారతదేశ రాజధాని న్యూ ఢిల్లీ. వేడికి వ్యతిరేకం చల్లని.",
)


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB,
        special_tokens=list(_SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    if [tok.token_to_id(s) for s in _SPECIALS] != [UNK_ID, BOS_ID, EOS_ID, PAD_ID]:
        raise RuntimeError("tiny tokenizer: special token ids moved")  # pragma: no cover
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast``: vocab <= 512, adds ``<s>``, pads with ``<pad>``.

    Every UTF-8 string round-trips through ``encode``/``decode(skip_special_tokens=True)``.
    Ids are the same on every run (fixed corpus, deterministic trainer).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def tiny_config(model_type: str = "llama", **overrides):
    """The ``PretrainedConfig`` of a tiny ``model_type`` model; ``overrides`` replace any field."""
    from transformers import AutoConfig

    if model_type not in _FAMILIES:
        raise ValueError(f"tiny_config: unknown model_type {model_type!r}; choose one of {', '.join(TINY_MODEL_TYPES)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=_VOCAB,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    kwargs.update(_FAMILIES[model_type])
    kwargs.update(overrides)
    config = AutoConfig.for_model(model_type, **kwargs)
    if getattr(config, "_attn_implementation", None) is None and "attn_implementation" not in overrides:
        config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny randomly initialised causal LM of ``model_type`` in eval mode (seeded, CPU).

    The global torch RNG is left untouched. ``overrides`` go to :func:`tiny_config`.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=config._attn_implementation)
    return model.to(dtype).eval()
