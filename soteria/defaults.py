"""soteria's default settings, in one light module (no torch import) the CLI and the steps share.

How they were chosen, with the numbers: README.md, "Results on a real model", and
``python -m benchmarks.safety``.
"""

from __future__ import annotations

__all__ = ["DEFAULT_CONTRAST", "DEFAULT_MAX_KL", "DEFAULT_RELATIVE_SCALE", "DEFAULT_TOP_K"]

#: Heads kept per language when they are found: a fraction of all ``L*H`` heads.
DEFAULT_TOP_K = 0.1
#: ``scale="auto"`` for a direction: the edit's size relative to the steered slices',
#: ``||scale * tau_S||_F / ||W_S||_F``.
DEFAULT_RELATIVE_SCALE = 0.02
#: The gradient direction's default contrast set: harmless requests whose refusal it lowers.
DEFAULT_CONTRAST = "builtin"
#: The write guard: the largest harmless-prompt KL(base || steered) a steered model is saved with.
DEFAULT_MAX_KL = 1.0
