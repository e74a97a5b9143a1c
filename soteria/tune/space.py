"""What the tuner searches: per language a head count and a scale, and optionally a layer window.

For a direction (``kind="tau"``, e.g. the gradient direction) the scale is searched as the
relative scale ``||scale * tau_S|| / ||W_S||`` (log-uniform), so its range follows from the harm
vector's and the weights' norms: one range fits every model. For a harmful fine-tune
(``kind="harmful"``) it is the paper's ``lambda`` (log-uniform). Everything is checked when the
space is made, before any work.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["SearchSpace"]


def _pair(value: Any, name: str, *, integer: bool) -> tuple:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}") from None
    for v in (lo, hi):
        ok = isinstance(v, numbers.Integral) if integer else isinstance(v, numbers.Real)
        if isinstance(v, bool) or not ok or not math.isfinite(v) or v <= 0:
            kind = "positive ints" if integer else "positive finite numbers"
            raise ValueError(f"{name} must hold {kind}, got {value!r}")
    if lo > hi:
        raise ValueError(f"{name} must be (low, high) with low <= high, got {value!r}")
    return (int(lo), int(hi)) if integer else (float(lo), float(hi))


@dataclass(frozen=True)
class SearchSpace:
    """The tuner's search space.

    Args:
        top_k: heads per language, an int range (inclusive); default ``(8, 30% of all heads)``
            when None, set by :meth:`resolved` for the model.
        relative_scale: the range of the relative scale of a direction (log-uniform).
        scale: the range of ``lambda`` for a harmful fine-tune (log-uniform).
        shared_top_k: one head count for every language instead of one each.
        layer_window: also search a window ``[first, last]`` of layers the heads may come from.
    """

    top_k: tuple[int, int] | None = None
    relative_scale: tuple[float, float] = (0.001, 0.03)
    scale: tuple[float, float] = (0.1, 2.0)
    shared_top_k: bool = False
    layer_window: bool = False

    def __post_init__(self):
        if self.top_k is not None:
            object.__setattr__(self, "top_k", _pair(self.top_k, "top_k", integer=True))
        object.__setattr__(self, "relative_scale", _pair(self.relative_scale, "relative_scale", integer=False))
        object.__setattr__(self, "scale", _pair(self.scale, "scale", integer=False))
        for name in ("shared_top_k", "layer_window"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    def resolved(self, n_layers: int, n_heads: int) -> SearchSpace:
        """This space with ``top_k`` filled in and checked against a model of ``n_layers x n_heads``."""
        total = n_layers * n_heads
        top_k = self.top_k or (min(8, total), max(min(8, total), round(0.3 * total)))
        if top_k[1] > total:
            raise ValueError(f"top_k range {top_k} goes past the model's {total} heads")
        return SearchSpace(top_k, self.relative_scale, self.scale, self.shared_top_k, self.layer_window)

    def suggest(self, trial, langs: list[str], kind: str, n_layers: int) -> dict[str, Any]:
        """One trial's point: ``{"top_k": {lang: k}, "scale" or "relative_scale": {lang: v},
        "layers": (first, last) | None}``."""
        if self.top_k is None:
            raise ValueError("call resolved(n_layers, n_heads) before suggest")
        if self.shared_top_k:
            k = trial.suggest_int("top_k", *self.top_k)
            top_k = {lang: k for lang in langs}
        else:
            top_k = {lang: trial.suggest_int(f"top_k_{lang}", *self.top_k) for lang in langs}
        name, rng = ("relative_scale", self.relative_scale) if kind == "tau" else ("scale", self.scale)
        scales = {lang: trial.suggest_float(f"{name}_{lang}", *rng, log=True) for lang in langs}
        layers = None
        if self.layer_window:
            first = trial.suggest_int("first_layer", 0, n_layers - 1)
            last = trial.suggest_int("last_layer", first, n_layers - 1)
            layers = (first, last)
        return {"top_k": top_k, name: scales, "layers": layers}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
