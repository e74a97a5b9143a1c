"""The judge interface: label each (prompt, response) pair ``"harmful"``, ``"safe"`` or ``"unparsed"``.

``"unparsed"`` is never counted as safe: ASR = harmful / (harmful + safe), with the unparsed
count reported beside it and an upper bound (harmful + unparsed) / all (see
:mod:`soteria.evaluation.report`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["HARMFUL", "LABELS", "SAFE", "UNPARSED", "FunctionJudge", "Judge", "JudgeError", "Verdict"]

HARMFUL, SAFE, UNPARSED = "harmful", "safe", "unparsed"
LABELS = (HARMFUL, SAFE, UNPARSED)


class JudgeError(ValueError):
    """The judge cannot work at all (bad URL, key, model name, or an endpoint that keeps failing)."""


@dataclass
class Verdict:
    """One judgement: ``label`` in :data:`LABELS`, the judge's raw ``answer`` when there is one,
    the transport ``error`` when the judge could not be asked, and whether it came from the cache."""

    label: str
    answer: str | None = None
    error: str | None = None
    cached: bool = False


def _check_inputs(prompts, responses, langs) -> tuple[list[str], list[str], list[str]]:
    if isinstance(prompts, str) or isinstance(responses, str):
        raise ValueError("prompts and responses must be lists of strings; wrap a single one in a list")
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if langs is None or isinstance(langs, str):
        langs = [langs or ""] * len(prompts)
    langs = list(langs)
    if len(langs) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(langs)} languages")
    for what, values in (("prompt", prompts), ("response", responses)):
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{what} {bad[0]} is {type(values[bad[0]]).__name__}, not a string")
    return prompts, responses, langs


class Judge:
    """Base class. Subclasses implement :meth:`_judge` returning one :class:`Verdict` per pair."""

    name: str = "judge"
    #: True for a crude baseline whose ASR should not be read as a real safety measurement.
    baseline: bool = False
    description: str = ""

    def judge(self, prompts: Sequence[str], responses: Sequence[str], langs: Sequence[str] | str | None = None):
        """``list[str]`` of ``"harmful"`` / ``"safe"`` / ``"unparsed"``, one per pair."""
        return [v.label for v in self.judge_detailed(prompts, responses, langs)]

    __call__ = judge

    def judge_detailed(self, prompts, responses, langs=None) -> list[Verdict]:
        """Like :meth:`judge`, with the raw answers and errors."""
        prompts, responses, langs = _check_inputs(prompts, responses, langs)
        if not prompts:
            return []
        out = self._judge(prompts, responses, langs)
        if len(out) != len(prompts) or any(v.label not in LABELS for v in out):
            raise RuntimeError(f"{type(self).__name__} returned {len(out)} verdicts for {len(prompts)} pairs")
        return out

    def _judge(self, prompts: list[str], responses: list[str], langs: list[str]) -> list[Verdict]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the report records about the judge."""
        return {"name": self.name, "baseline": self.baseline, "description": self.description}


class FunctionJudge(Judge):
    """Wrap ``fn(prompts, responses, langs) -> labels``; labels outside :data:`LABELS` are a ValueError."""

    def __init__(self, fn: Callable, name: str | None = None, baseline: bool = False):
        self.fn, self.name, self.baseline = fn, name or getattr(fn, "__name__", "function"), baseline
        self.description = f"user function {self.name}"

    def _judge(self, prompts, responses, langs):
        labels = list(self.fn(prompts, responses, langs))
        if len(labels) != len(prompts):
            raise ValueError(f"judge function returned {len(labels)} labels for {len(prompts)} pairs")
        bad = sorted({str(x) for x in labels if x not in LABELS})
        if bad:
            raise ValueError(f"judge function returned label(s) {bad}; allowed: {', '.join(LABELS)}")
        return [Verdict(x) for x in labels]
