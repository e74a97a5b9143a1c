"""Judges: label each (prompt, response) pair ``"harmful"``, ``"safe"`` or ``"unparsed"``.

One interface, ``judge(prompts, responses, langs) -> labels``:

- :class:`LLMJudge`: any OpenAI-compatible chat-completions endpoint, asked as the paper did to
  answer only "Harmful" or "Not Harmful". Robust parsing, bounded retries with exponential
  backoff (429 with ``Retry-After``, 5xx, timeouts, dropped connections, malformed bodies), an
  in-memory and optional JSONL cache, and answers it cannot read labelled ``"unparsed"``.
- :class:`ClassifierJudge`: a Hugging Face sequence-classification model (e.g. a harm classifier).
- :class:`GuardJudge`: a guard-style causal LM (Llama Guard style) that answers "safe"/"unsafe".
- :class:`RefusalJudge`: refusal phrases in twelve languages. A CRUDE BASELINE: no refusal phrase
  means "harmful", so gibberish counts as an attack success and a harmful answer that opens
  with "Sorry, but..." counts as safe.

``"unparsed"`` is never counted as safe: ASR = harmful / (harmful + safe), with the unparsed
count reported beside it and an upper bound (harmful + unparsed) / all (see :mod:`.report`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .base import HARMFUL, LABELS, SAFE, UNPARSED, FunctionJudge, Judge, JudgeError, Verdict
from .llm import JUDGE_SYSTEM, JUDGE_TEMPLATE, LLMJudge, parse_verdict
from .local import GUARD_TEMPLATE, ClassifierJudge, GuardJudge, parse_guard
from .refusal import RefusalJudge

__all__ = [
    "GUARD_TEMPLATE",
    "HARMFUL",
    "JUDGE_SYSTEM",
    "JUDGE_TEMPLATE",
    "LABELS",
    "SAFE",
    "UNPARSED",
    "ClassifierJudge",
    "FunctionJudge",
    "GuardJudge",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "RefusalJudge",
    "Verdict",
    "make_judge",
    "parse_guard",
    "parse_verdict",
]

# ------------------------------------------------------------------------------------------------
# Factory


def make_judge(spec: Any = "refusal", **kwargs) -> Judge:
    """A judge from ``spec``: a :class:`Judge`; a function ``(prompts, responses, langs) -> labels``;
    ``"refusal"`` (baseline); ``"llm"`` (``kwargs`` go to :class:`LLMJudge`); or a local path / Hub
    id of a sequence classifier (:class:`ClassifierJudge`) or causal LM (:class:`GuardJudge`)."""
    if isinstance(spec, Judge):
        return spec
    if callable(spec) and not isinstance(spec, (str, os.PathLike)):
        return FunctionJudge(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(
            f"judge must be a Judge, a function, 'refusal', 'llm' or a model path; got {type(spec).__name__}"
        )
    text = os.fspath(spec)
    if text in ("refusal", "refusal-phrases", "baseline"):
        return RefusalJudge(**kwargs)
    if text == "llm":
        return LLMJudge(**kwargs)
    if not (Path(text).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", text)):
        raise FileNotFoundError(
            f"judge {text!r} is not 'refusal', 'llm', a model folder or a Hub model id (owner/name)"
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(text)
    except OSError as e:
        raise FileNotFoundError(f"cannot read the judge model config at {text!r}: {e}") from None
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return ClassifierJudge(text, **kwargs)
    if any(a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs):
        return GuardJudge(text, **kwargs)
    raise ValueError(
        f"judge model {text!r} has architectures {archs or 'none'}; expected a *ForSequenceClassification "
        "(classifier) or *ForCausalLM (guard) model"
    )
