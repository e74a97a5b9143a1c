"""soteria's default settings, in one light module (no torch import) the CLI and the steps share.

How they were chosen, with the numbers: README.md, "Results on a real model", and
``python -m benchmarks.safety``.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_CONTRAST",
    "DEFAULT_HARM",
    "DEFAULT_MAX_KL",
    "DEFAULT_REFUSAL_TOKENS",
    "DEFAULT_RELATIVE_SCALE",
    "DEFAULT_TOP_K",
]

#: Heads kept per language when they are found: a fraction of all ``L*H`` heads (64 of
#: Qwen2.5-0.5B's 336 per language; more heads at a smaller step changed refusal more per unit
#: of KL than fewer heads at a larger one).
DEFAULT_TOP_K = 0.2
#: The harm direction when none is given (``harm=None``): ``"finetune"``
#: (:meth:`HarmVector.from_finetune`, a short refusal fine-tune of the found heads with a retain
#: term, steered at 1.0). On Qwen2.5-0.5B, with the same refusal data and heads, it refused more
#: in es, fr and de than ``"gradients"`` (:meth:`HarmVector.from_gradients`) at lower KL and no
#: more over-refusal, for about 16 times the gradient's cost (minutes on a CPU); README.md has
#: the full-evaluation numbers.
DEFAULT_HARM = "finetune"
#: ``scale="auto"`` for a direction: the edit's size relative to the steered slices',
#: ``||scale * tau_S||_F / ||W_S||_F``. Twice this already doubled over-refusal on Qwen2.5-0.5B.
DEFAULT_RELATIVE_SCALE = 0.004
#: The gradient direction's contrast set (``HarmVector.from_gradients(contrast=...)``): built-in
#: harmless requests whose refusal the step leaves unchanged to first order.
DEFAULT_CONTRAST = "builtin"
#: The gradient direction scores the first this many tokens of each refusal: the decision to
#: refuse, not the explanation after it.
DEFAULT_REFUSAL_TOKENS = 4
#: The write guard: the largest harmless-prompt KL(base || steered) a steered model is saved with.
DEFAULT_MAX_KL = 1.0
