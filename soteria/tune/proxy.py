"""The tuner's fast objective: refusal and over-refusal from a short greedy prefix, KL from one pass.

Full generation per trial is too slow on a CPU. :class:`RefusalProxy` measures a model on fixed
tuning prompts (chat-formatted, greedy):

- **harmfulness** of a language: the share of its harmful tuning prompts whose first
  ``prefix_tokens`` answer tokens the refusal-phrase judge does not call a refusal (a refusal
  is decided in its first words: "Lo siento, pero no puedo", "Je ne peux pas");
- **over-refusal**: the share of its harmless tuning prompts whose prefix is a refusal;
- **KL**: the mean KL(base || steered) over every position of the harmless tuning prompts, the
  measure :func:`soteria.evaluation.utility.steering_kl` reports, against base log-probabilities
  computed once (fp32, kept on CPU).

Its agreement with full-length generation is measured by ``python -m benchmarks.tune``; the
tuner's chosen point is always verified by full generation on held-out prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation.generation import format_inputs, generate_texts
from ..evaluation.judges import RefusalJudge
from ..evaluation.prompt_sets import EvalPrompt
from ..evaluation.utility import token_kl
from ..heads.prompts import encode_batch
from ..models.state import frozen_eval, input_device

__all__ = ["RefusalProxy", "objectives", "refusal_verdicts"]


def refusal_verdicts(
    model: nn.Module, tokenizer, prompts: Sequence[str], lang: str, *, max_new_tokens: int, progress: bool = False
) -> list[bool]:
    """Whether the greedy answer (chat template, ``max_new_tokens``) to each prompt is a refusal,
    by the refusal-phrase judge."""
    texts, templated = format_inputs(tokenizer, [EvalPrompt(p, lang) for p in prompts])
    answers = generate_texts(model, tokenizer, texts, add_special_tokens=not templated, batch_size=16,
                             max_new_tokens=max_new_tokens, progress=progress, desc=f"answer {lang}")  # fmt: skip
    judge = RefusalJudge()
    return [judge.is_refusal(a, lang) for a in answers]


def objectives(per_lang: Mapping[str, Mapping[str, float]]) -> tuple[float, float]:
    """The tuner's two objectives from :meth:`RefusalProxy.measure`: mean harmfulness, mean KL."""
    n = len(per_lang)
    return sum(v["harmfulness"] for v in per_lang.values()) / n, sum(v["kl"] for v in per_lang.values()) / n


class RefusalProxy:
    """Measure a model (steered or not) on fixed tuning prompts.

    Args:
        harmful, harmless: ``{lang: [prompt, ...]}`` tuning prompts (chat-formatted here).
        prefix_tokens: greedy answer tokens judged per prompt.
        batch_size: prompts per forward pass (one batch for the default tuning split of three languages).

    ``model`` must be the base (unsteered) model when the proxy is made: its harmless-prompt
    log-probabilities are the KL reference.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        harmful: Mapping[str, Sequence[str]],
        harmless: Mapping[str, Sequence[str]],
        *,
        prefix_tokens: int = 8,
        batch_size: int = 64,
    ):
        self.langs = list(harmful)
        if list(harmless) != self.langs or not all(harmful[x] and harmless[x] for x in self.langs):
            raise ValueError("harmful and harmless need the same languages, each with at least one prompt")
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be a positive int, got {prefix_tokens!r}")
        self.tokenizer, self.prefix_tokens, self.batch_size = tokenizer, prefix_tokens, batch_size
        self.judge = RefusalJudge()
        self._texts = {
            kind: {lang: format_inputs(tokenizer, [EvalPrompt(p, lang) for p in ps]) for lang, ps in prompts.items()}
            for kind, prompts in (("harmful", harmful), ("harmless", harmless))
        }
        self._batches = []
        for lang, (texts, templated) in self._texts["harmless"].items():
            rows = [list(r) for r in tokenizer(texts, add_special_tokens=not templated)["input_ids"]]
            for start in range(0, len(rows), batch_size):
                ids, mask, _ = encode_batch(tokenizer, rows[start : start + batch_size], padding_side="right")
                self._batches.append((lang, ids, mask))
        self._base = list(self._logprobs(model))

    @torch.inference_mode()
    def _logprobs(self, model: nn.Module):
        device = input_device(model)
        with frozen_eval(model, grad=False):
            for _, ids, mask in self._batches:
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                yield F.log_softmax(logits.float(), -1).cpu()

    def measure(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """``{lang: {"harmfulness", "over_refusal", "kl"}}`` of ``model`` on the tuning prompts."""
        # Every prefix in one generate call, so that each decoding step runs once for all of them.
        keys = [(kind, lang) for kind in ("harmful", "harmless") for lang in self.langs]
        texts = [t for kind, lang in keys for t in self._texts[kind][lang][0]]
        templated = self._texts["harmful"][self.langs[0]][1]
        answers = iter(generate_texts(model, self.tokenizer, texts, add_special_tokens=not templated,
                                      batch_size=self.batch_size, max_new_tokens=self.prefix_tokens))  # fmt: skip
        rate = {}
        for kind, lang in keys:
            refused = [self.judge.is_refusal(next(answers), lang) for _ in self._texts[kind][lang][0]]
            rate[kind, lang] = sum(refused) / len(refused)
        out = {lang: {"harmfulness": 1.0 - rate["harmful", lang], "over_refusal": rate["harmless", lang]}
               for lang in self.langs}  # fmt: skip
        kl_sum = dict.fromkeys(self.langs, 0.0)
        kl_n = dict.fromkeys(self.langs, 0)
        for (lang, _, mask), base, logp in zip(self._batches, self._base, self._logprobs(model)):
            kl = token_kl(base, logp)
            m = mask.bool()
            kl_sum[lang] += float(kl[m].sum())
            kl_n[lang] += int(m.sum())
        for lang in self.langs:
            out[lang]["kl"] = kl_sum[lang] / kl_n[lang]
        return out
