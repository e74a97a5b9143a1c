"""One config object for a steering: the request :meth:`soteria.SoteriaPatcher.apply` takes, and the
record of what it did, in the way of ``peft.LoraConfig`` and ``get_peft_model(model, config)``.

A request names the languages and, optionally, the heads (or how to find them: ``method``,
``top_k``, ``find_options``), the harm direction (``harm_source``, ``harm_options``) and the
scale (``"auto"`` by default)::

    config = SoteriaConfig(["es", "fr"], harm_source="org/harmful-finetune", top_k=48)
    model = SoteriaPatcher.apply(model, config)

Everything is validated in ``__post_init__``. ``apply`` resolves the request (heads found,
scale calibrated, the harm vector's source recorded) into a config of the same class, kept at
``model.soteria_config`` and, as ``config.to_dict()``, at ``model.config.soteria``, so
``model.save_pretrained`` writes it into ``config.json``; applying that record to the base
model again repeats the steering::

    "soteria": {"harm_source": "...", "heads": {"fr": [[0, 3], [1, 0]]}, "languages": ["fr"],
                "method": "atp", "model_type": "llama", "scale": 1.0, "soteria_version": "0.1.0", ...}
"""

from __future__ import annotations

import json
import math
import numbers
import os
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..langs import lang_list
from ..version import __version__

__all__ = ["METHODS", "SoteriaConfig", "check_relative", "check_scale"]

#: How the heads were chosen: attribution patching, exact activation patching, or given by the user.
METHODS = ("atp", "exact", "explicit")


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_scale(scale: Any, langs: list[str]) -> float | dict[str, float] | str:
    """``scale`` checked: ``"auto"``, or finite floats >= 0 (a negative scale would add the harm direction)."""
    if isinstance(scale, str):
        if scale != "auto":
            raise ValueError(f"scale must be a finite float, {{lang: float}} or 'auto', got {scale!r}")
        return scale

    def one(v, what):
        if not _is_real(v) or not math.isfinite(float(v)):
            raise ValueError(f"{what} must be a finite float, got {v!r}")
        if v < 0:
            raise ValueError(f"{what} is {v}: a negative scale adds the harm direction instead of removing it")
        return float(v)

    if isinstance(scale, dict):
        missing = [x for x in langs if x not in scale]
        extra = [x for x in scale if x not in langs]
        if missing or extra:
            raise ValueError(f"scale must give one value per language: missing {missing}, unexpected {extra}")
        return {lang: one(scale[lang], f"scale[{lang!r}]") for lang in langs}
    return one(scale, "scale")


def check_relative(relative: Any, langs: list[str]) -> float | dict[str, float]:
    """A positive relative scale, one or per language; ValueError otherwise."""
    values = relative.values() if isinstance(relative, dict) else [relative]
    if any(_is_real(v) and v <= 0 for v in values):
        raise ValueError(f"relative_scale must be a positive float or {{lang: positive float}}, got {relative!r}")
    checked = check_scale(relative, langs)
    values = checked.values() if isinstance(checked, dict) else [checked]
    if isinstance(checked, str) or not all(v > 0 for v in values):
        raise ValueError(f"relative_scale must be a positive float or {{lang: positive float}}, got {relative!r}")
    return checked


def _json_default(x: Any) -> str:
    """Paths in options are saved as strings; anything else that JSON cannot hold is refused."""
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"{type(x).__name__} is not JSON")


def _json_options(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"{name} must be a dict of keyword arguments, got {value!r}")
    try:
        json.dumps(value, default=_json_default)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold JSON values only (it is saved with the result), got {value!r}") from None
    return dict(value)


@dataclass
class SoteriaConfig:
    """A steering: the request, and (after :meth:`soteria.SoteriaPatcher.apply`) the record.

    ``heads[lang]`` lists ``(layer, head)`` pairs (0-based); the edit touches their union,
    :attr:`head_union`. A head shared by several languages is steered once, with the largest of
    those languages' scales (:meth:`head_scales`), and a warning when their scales differ.
    """

    languages: list[str] = field(metadata={"help": "Language codes to steer for, in order."})
    heads: dict[str, list[tuple[int, int]]] | None = field(
        default=None,
        metadata={
            "help": "Per language, the (layer, head) pairs to steer (0-based); one list for every language; "
            "or None: find them (method, top_k, find_options)."
        },
    )
    scale: float | dict[str, float] | str = field(
        default="auto",
        metadata={
            "help": "lambda, >= 0: one float, or one per language (a shared head takes the largest); 'auto': "
            "1.0 for a harmful fine-tune, calibrated by relative_scale for a direction. Recorded as numbers."
        },
    )
    relative_scale: float | dict[str, float] | None = field(
        default=None,
        metadata={"help": "With scale='auto': ||scale * tau_S|| / ||W_S|| per language (recorded when calibrated)."},
    )
    harm_source: str = field(
        default="",
        metadata={
            "help": "The harm direction: a harmful fine-tune's path or Hub id, a saved vector, or a direction "
            "derived from the model: 'finetune' or 'gradients' ('' for the default, 'finetune'). Recorded as "
            "HarmVector.source ('checkpoint:...', 'file:...', 'finetune:...', 'gradients:...'), which apply "
            "reads or derives again."
        },
    )
    harm_kind: str = field(
        default="tau",
        metadata={
            "help": "Recorded: 'harmful': W -= scale * (W_harmful - W) from a fine-tune's weights; "
            "'tau': W -= scale * tau with an explicit direction (gradients, a saved vector)."
        },
    )
    method: str | None = field(
        default=None,
        metadata={
            "help": "How heads are chosen: 'atp' (default) or 'exact' (soteria.find_heads); 'explicit' "
            "when heads are given (the default then)."
        },
    )
    top_k: int | float | None = field(
        default=None,
        metadata={"help": "Heads kept per language when they are found: a count or a fraction (default 0.2)."},
    )
    find_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Further keyword arguments of soteria.find_heads_multi (n_shots, n_trials, seed, ...)."},
    )
    harm_options: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Further keyword arguments for the harm direction: HarmVector.from_pretrained "
            "(gguf_file, ...), HarmVector.from_finetune (steps, lr, retain, ...) or HarmVector.from_gradients "
            "(langs, data, contrast, refusal_tokens)."
        },
    )
    model_type: str = field(default="", metadata={"help": "config.model_type of the steered model."})
    soteria_version: str = field(default=__version__, metadata={"help": "Version of soteria that made the edit."})

    def __post_init__(self):
        if isinstance(self.languages, (list, tuple)) and not self.languages:
            raise ValueError("languages must be a non-empty list of language codes, got []")
        langs = lang_list(self.languages)
        if len(set(langs)) != len(langs):
            raise ValueError(f"languages repeat: {langs}")
        self.languages = langs

        if self.heads is not None:
            self.heads = self._checked_heads(langs)
        self.scale = check_scale(self.scale, langs)
        if self.relative_scale is not None:
            self.relative_scale = check_relative(self.relative_scale, langs)

        if self.harm_kind not in ("harmful", "tau"):
            raise ValueError(f"harm_kind must be 'harmful' or 'tau', got {self.harm_kind!r}")
        if self.method is not None and self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.method == "explicit" and self.heads is None:
            raise ValueError("method='explicit' needs heads")
        if self.top_k is not None and not (_is_real(self.top_k) and self.top_k > 0):
            raise ValueError(f"top_k must be a positive count or fraction, got {self.top_k!r}")
        self.find_options = _json_options(self.find_options, "find_options")
        self.harm_options = _json_options(self.harm_options, "harm_options")
        for name in ("harm_source", "model_type", "soteria_version"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a str, got {getattr(self, name)!r}")

    def _checked_heads(self, langs: list[str]) -> dict[str, list[tuple[int, int]]]:
        heads = self.heads
        if not isinstance(heads, dict):  # one list of pairs for every language
            heads = {lang: heads for lang in langs}
        missing = [x for x in langs if x not in heads]
        extra = [x for x in heads if x not in langs]
        if missing or extra:
            raise ValueError(f"heads must have one entry per language: missing {missing}, unexpected {extra}")
        out: dict[str, list[tuple[int, int]]] = {}
        for lang in langs:
            if isinstance(heads[lang], (str, bytes)) or not hasattr(heads[lang], "__iter__"):
                raise ValueError(f"heads[{lang!r}] must be a list of (layer, head) pairs, got {heads[lang]!r}")
            pairs: list[tuple[int, int]] = []
            for p in heads[lang]:
                if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_int(v) and v >= 0 for v in p)):
                    raise ValueError(f"heads[{lang!r}] must hold (layer, head) pairs of ints >= 0, got {p!r}")
                if (int(p[0]), int(p[1])) not in pairs:
                    pairs.append((int(p[0]), int(p[1])))
            if not pairs:
                raise ValueError(f"heads[{lang!r}] is empty")
            out[lang] = pairs
        return out

    @property
    def is_resolved(self) -> bool:
        """True for a record: heads and numeric scales known (what :meth:`SoteriaPatcher.apply` made)."""
        return self.heads is not None and self.scale != "auto" and self.method is not None

    # ------------------------------------------------------------------ derived views

    def scale_of(self, lang: str) -> float | str:
        """The scale of one language (``"auto"`` in an unresolved request)."""
        if lang not in self.languages:
            raise ValueError(f"{lang!r} is not one of the steered languages {self.languages}")
        return self.scale[lang] if isinstance(self.scale, dict) else self.scale

    def head_scales(self) -> dict[tuple[int, int], float]:
        """``{(layer, head): scale}`` over the union; a shared head takes the largest scale."""
        self._need_resolved("head_scales()")
        out: dict[tuple[int, int], float] = {}
        for lang in self.languages:
            s = self.scale_of(lang)
            for p in self.heads[lang]:
                out[p] = max(out.get(p, s), s)
        return dict(sorted(out.items()))

    @property
    def head_union(self) -> list[tuple[int, int]]:
        """Sorted union of every language's heads."""
        self._need_resolved("head_union")
        return sorted({p for pairs in self.heads.values() for p in pairs})

    def _need_resolved(self, what: str) -> None:
        if self.heads is None or (what == "head_scales()" and self.scale == "auto"):
            raise ValueError(f"{what} needs a resolved config (heads and scales known): apply it to a model first")

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (pairs become 2-lists), keys sorted."""
        d = asdict(self)
        if self.heads is not None:
            d["heads"] = {lang: [list(p) for p in pairs] for lang, pairs in self.heads.items()}
        d["scale"] = dict(self.scale) if isinstance(self.scale, dict) else self.scale
        for name in ("find_options", "harm_options"):  # paths become strings, tuples lists
            d[name] = json.loads(json.dumps(getattr(self, name), default=_json_default))
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
