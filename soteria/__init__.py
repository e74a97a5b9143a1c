"""soteria: language-specific functional parameter steering for multilingual safety.

Public names are imported lazily so that ``import soteria`` stays cheap (no transformers
import until a model-facing name is used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_LAZY = {
    "SoteriaPatcher": "soteria.steer",
    "SoteriaConfig": "soteria.steer",
    "HarmVector": "soteria.harm",
    "HeadScores": "soteria.heads",
    "find_heads": "soteria.heads",
    "find_heads_multi": "soteria.heads",
    "SoteriaPatch": "soteria.export",
    "save_steered": "soteria.export",
    "steer_checkpoint": "soteria.export",
    "push_to_hub": "soteria.export",
    "evaluate": "soteria.evaluation",
    "EvalReport": "soteria.evaluation",
    "tune": "soteria.tune",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'soteria' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - re-exports for type checkers
    from .evaluation import EvalReport, evaluate  # noqa: F401
    from .export import SoteriaPatch, push_to_hub, save_steered, steer_checkpoint  # noqa: F401
    from .harm import HarmVector  # noqa: F401
    from .heads import HeadScores, find_heads, find_heads_multi  # noqa: F401
    from .steer import (
        SoteriaConfig,  # noqa: F401
        SoteriaPatcher,  # noqa: F401
    )
