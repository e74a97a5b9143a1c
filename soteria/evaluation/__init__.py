"""Safety evaluation: attack success rate (ASR) per language and utility, before and after steering.

``evaluate(model, tokenizer, steered=steered_model, judge=...)`` generates responses to harmful
prompts in each language (built-in smoke set, XThreatBench, MultiJail or your own file), labels
them with a judge (an LLM over any OpenAI-compatible endpoint, a local classifier or guard model,
or the refusal-phrase baseline), measures utility (KL on harmless prompts, held-out perplexity,
probe accuracy) and returns an :class:`EvalReport` (table, JSON, bar chart).
"""

from .generation import GenerationStore, generate_responses, model_id
from .judges import (
    HARMFUL,
    SAFE,
    UNPARSED,
    ClassifierJudge,
    FunctionJudge,
    GuardJudge,
    Judge,
    JudgeError,
    LLMJudge,
    RefusalJudge,
    Verdict,
    make_judge,
    parse_guard,
    parse_verdict,
)
from .prompt_sets import HUB_PRESETS, EvalPrompt, eval_languages, load_hub, load_prompts, smoke_prompts
from .report import ASR_FORMULA, Counts, EvalReport, LangResult
from .runner import evaluate
from .utility import next_token_kl, perplexity, probe_accuracy

__all__ = [
    "ASR_FORMULA",
    "HARMFUL",
    "HUB_PRESETS",
    "SAFE",
    "UNPARSED",
    "ClassifierJudge",
    "Counts",
    "EvalPrompt",
    "EvalReport",
    "FunctionJudge",
    "GenerationStore",
    "GuardJudge",
    "Judge",
    "JudgeError",
    "LLMJudge",
    "LangResult",
    "RefusalJudge",
    "Verdict",
    "eval_languages",
    "evaluate",
    "generate_responses",
    "load_hub",
    "load_prompts",
    "make_judge",
    "model_id",
    "next_token_kl",
    "parse_guard",
    "parse_verdict",
    "perplexity",
    "probe_accuracy",
    "smoke_prompts",
]
