"""Shipping a steered model: save it, steer a checkpoint on disk, push it, and the records it carries.

- :mod:`.save`: :func:`save_steered` (a model steered in memory), after :mod:`.damage`'s KL check;
- :mod:`.streaming`: :func:`steer_checkpoint` (a checkpoint on disk, one tensor at a time);
- :mod:`.patch`: :class:`SoteriaPatch`, a steering as a small file applied to a base model;
- :mod:`.push`: :func:`push_to_hub`;
- :mod:`.card`: ``soteria_config.json``, the shard metadata key, the model card.
"""

from .card import CONFIG_NAME, METADATA_KEY, PATCH_NAME, model_card, write_soteria_config
from .damage import SteeringDamageError, damage_check
from .patch import SoteriaPatch
from .push import SoteriaHubError, push_to_hub
from .save import save_steered
from .streaming import steer_checkpoint

__all__ = [
    "CONFIG_NAME",
    "METADATA_KEY",
    "PATCH_NAME",
    "SoteriaHubError",
    "SoteriaPatch",
    "SteeringDamageError",
    "damage_check",
    "model_card",
    "push_to_hub",
    "save_steered",
    "steer_checkpoint",
    "write_soteria_config",
]
