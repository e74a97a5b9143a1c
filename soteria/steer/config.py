"""What :meth:`soteria.SoteriaPatcher.apply` did to a model, as a small JSON-able record.

A :class:`SoteriaConfig` lives at ``model.soteria_config`` and, as ``config.to_dict()``, at
``model.config.soteria``, so ``model.save_pretrained`` writes it into ``config.json``::

    "soteria": {"harm_source": "...", "heads": {"fr": [[0, 3], [1, 0]]}, "languages": ["fr"],
                "method": "atp", "model_type": "llama", "scale": 1.0, "soteria_version": "0.1.0", ...}
"""

from __future__ import annotations

import json
import math
import numbers
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..version import __version__

__all__ = ["METHODS", "SoteriaConfig"]

#: How the heads were chosen: attribution patching, exact activation patching, or given by the user.
METHODS = ("atp", "exact", "explicit")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


@dataclass
class SoteriaConfig:
    """The record of one steering edit.

    ``heads[lang]`` lists ``(layer, head)`` pairs (0-based); the edit touched their union,
    :attr:`head_union`. A head shared by several languages was steered once, with the largest
    of those languages' scales (:meth:`head_scales`).
    """

    languages: list[str] = field(metadata={"help": "Language codes the model was steered for, in order."})
    heads: dict[str, list[tuple[int, int]]] = field(
        metadata={"help": "Per language, the (layer, head) pairs selected for it (0-based)."}
    )
    scale: float | dict[str, float] = field(
        default=1.0,
        metadata={"help": "lambda: one float, or one per language (a shared head takes the largest)."},
    )
    relative_scale: float | dict[str, float] | None = field(
        default=None,
        metadata={"help": "When scale was calibrated (scale='auto'): ||scale * tau_S|| / ||W_S|| per language."},
    )
    harm_source: str = field(default="", metadata={"help": "Where the harm direction came from (HarmVector.source)."})
    harm_kind: str = field(
        default="tau",
        metadata={
            "help": "'harmful': W -= scale * (W_harmful - W) from a fine-tune's weights; "
            "'tau': W -= scale * tau with an explicit direction (gradients, a saved vector)."
        },
    )
    method: str = field(
        default="atp",
        metadata={"help": "How heads were chosen: 'atp', 'exact' (soteria.find_heads) or 'explicit'."},
    )
    top_k: int | float | None = field(
        default=None, metadata={"help": "Heads kept per language when they were found (count or fraction)."}
    )
    model_type: str = field(default="", metadata={"help": "config.model_type of the steered model."})
    soteria_version: str = field(default=__version__, metadata={"help": "Version of soteria that made the edit."})

    def __post_init__(self):
        if isinstance(self.languages, str):
            self.languages = [self.languages]
        langs = list(self.languages) if isinstance(self.languages, (list, tuple)) else None
        if not langs or not all(isinstance(x, str) and x for x in langs):
            raise ValueError(f"languages must be a non-empty list of non-empty str, got {self.languages!r}")
        if len(set(langs)) != len(langs):
            raise ValueError(f"languages repeat: {langs}")
        self.languages = langs

        if not isinstance(self.heads, dict):
            raise ValueError(
                f"heads must be a dict from language to (layer, head) pairs, got {type(self.heads).__name__}"
            )
        missing = [x for x in langs if x not in self.heads]
        extra = [x for x in self.heads if x not in langs]
        if missing or extra:
            raise ValueError(f"heads must have one entry per language: missing {missing}, unexpected {extra}")
        heads: dict[str, list[tuple[int, int]]] = {}
        for lang in langs:
            pairs = []
            for p in self.heads[lang]:
                if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)):
                    raise ValueError(f"heads[{lang!r}] must hold (layer, head) pairs of ints >= 0, got {p!r}")
                pairs.append((int(p[0]), int(p[1])))
            if not pairs:
                raise ValueError(f"heads[{lang!r}] is empty")
            heads[lang] = pairs
        self.heads = heads

        if isinstance(self.scale, dict):
            missing = [x for x in langs if x not in self.scale]
            extra = [x for x in self.scale if x not in langs]
            if missing or extra:
                raise ValueError(f"scale must have one value per language: missing {missing}, unexpected {extra}")
            for lang, s in self.scale.items():
                if not (_is_real(s) and math.isfinite(s)):
                    raise ValueError(f"scale[{lang!r}] must be a finite float, got {s!r}")
            self.scale = {lang: float(self.scale[lang]) for lang in langs}
        elif _is_real(self.scale) and math.isfinite(self.scale):
            self.scale = float(self.scale)
        else:
            raise ValueError(f"scale must be a finite float or a dict from language to float, got {self.scale!r}")

        rel = self.relative_scale
        if rel is not None:
            values = rel.values() if isinstance(rel, dict) else [rel]
            if not all(_is_real(v) and math.isfinite(v) and v > 0 for v in values):
                raise ValueError(f"relative_scale must be a positive float or a dict of them, got {rel!r}")
            self.relative_scale = {k: float(v) for k, v in rel.items()} if isinstance(rel, dict) else float(rel)

        if self.harm_kind not in ("harmful", "tau"):
            raise ValueError(f"harm_kind must be 'harmful' or 'tau', got {self.harm_kind!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.top_k is not None and not (_is_real(self.top_k) and self.top_k > 0):
            raise ValueError(f"top_k must be a positive count or fraction, got {self.top_k!r}")
        for name in ("harm_source", "model_type", "soteria_version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------ derived views

    def scale_of(self, lang: str) -> float:
        """The scale of one language."""
        if lang not in self.languages:
            raise ValueError(f"{lang!r} is not one of the steered languages {self.languages}")
        return self.scale[lang] if isinstance(self.scale, dict) else self.scale

    def head_scales(self) -> dict[tuple[int, int], float]:
        """``{(layer, head): scale}`` over the union; a shared head takes the largest scale."""
        out: dict[tuple[int, int], float] = {}
        for lang in self.languages:
            s = self.scale_of(lang)
            for p in self.heads[lang]:
                out[p] = max(out.get(p, s), s)
        return dict(sorted(out.items()))

    @property
    def head_union(self) -> list[tuple[int, int]]:
        """Sorted union of every language's heads."""
        return sorted({p for pairs in self.heads.values() for p in pairs})

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (pairs become 2-lists), keys sorted."""
        d = asdict(self)
        d["heads"] = {lang: [list(p) for p in pairs] for lang, pairs in self.heads.items()}
        d["scale"] = dict(self.scale) if isinstance(self.scale, dict) else self.scale
        return dict(sorted(d.items()))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SoteriaConfig:
        """Inverse of :meth:`to_dict`. Unknown keys (from a newer soteria) are dropped with a warning."""
        if not isinstance(d, dict):
            raise ValueError(f"SoteriaConfig.from_dict needs a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            warnings.warn(f"SoteriaConfig: ignoring unknown keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> SoteriaConfig:
        return cls.from_dict(json.loads(text))
