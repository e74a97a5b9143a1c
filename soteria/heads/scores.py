"""The result of step 1: a language's ``[layers, heads]`` head scores, ranked, saved, plotted, combined.

:class:`HeadScores` holds the scores and the settings that produced them (JSON round trip,
a layer x head heatmap); :meth:`HeadScores.combine` averages languages or builds a resource
group's head set by the reference's majority vote (:class:`HeadSet`, thresholds
:data:`soteria.heads.probes.VOTE_THRESHOLDS`).
"""

from __future__ import annotations

import io
import json
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..arch import unwrap_model
from ..io.atomic import atomic_write_bytes, atomic_write_text
from ..version import __version__
from .probes import GROUPS, VOTE_THRESHOLDS

__all__ = ["HeadScores", "HeadSet", "model_name", "resolve_k"]

_FORMAT = "soteria.HeadScores"
_FORMAT_VERSION = 1


def resolve_k(k: Any, total: int) -> int:
    """An int in ``[1, total]``, or a fraction in ``(0, 1]`` of ``total`` (rounded, at least 1)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Real):
        raise ValueError(f"k must be an int in [1, {total}] or a fraction in (0, 1], got {k!r}")
    if isinstance(k, numbers.Integral):
        if not 1 <= int(k) <= total:
            raise ValueError(f"k = {k} is out of range: there are {total} heads")
        return int(k)
    k = float(k)
    if not (0.0 < k <= 1.0):
        raise ValueError(f"a fractional k must be in (0, 1], got {k}; pass an int for a head count")
    return max(1, min(total, round(k * total)))


def _as_scores(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float32).clone()
    if t.ndim != 2 or t.numel() == 0:
        raise ValueError(f"{what} must be a non-empty [layers, heads] matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} holds NaN or Inf")
    return t


@dataclass(frozen=True)
class HeadSet:
    """A group head set from :meth:`HeadScores.combine` with ``how="majority"``.

    ``heads`` holds every head with at least ``min_votes`` votes (one vote per language whose
    top-``k`` holds it), ordered by votes, then by mean score over the languages (both
    descending), then by ``(layer, head)``; ``votes[i]`` belongs to ``heads[i]``.
    """

    heads: tuple[tuple[int, int], ...]
    votes: tuple[int, ...]
    langs: tuple[str, ...]
    k: int
    min_votes: int

    def __iter__(self):
        return iter(self.heads)

    def __len__(self) -> int:
        return len(self.heads)

    def __contains__(self, item) -> bool:
        return tuple(item) in self.heads

    def to_list(self) -> list[tuple[int, int]]:
        return list(self.heads)


@dataclass
class HeadScores:
    """Average indirect effect of every head of one model in one language.

    scores: float32 ``[L, H]`` (signed; higher = the head carries more of the task).
    settings: how the scores were made (tasks, n_shots, n_trials, seed, model fingerprint, ...).
    per_task: optional ``{task: float32 [L, H]}`` before averaging over tasks.
    """

    scores: torch.Tensor
    model_name: str = ""
    lang: str = ""
    method: str = "atp"
    settings: dict[str, Any] = field(default_factory=dict)
    per_task: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        self.scores = _as_scores(self.scores, "scores")
        if self.per_task is not None:
            self.per_task = {str(n): _as_scores(s, f"per_task[{n!r}]") for n, s in self.per_task.items()}
            for n, s in self.per_task.items():
                if s.shape != self.scores.shape:
                    raise ValueError(f"per_task[{n!r}] has shape {tuple(s.shape)}, scores {tuple(self.scores.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.scores.shape)  # type: ignore[return-value]

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    @property
    def num_heads(self) -> int:
        return self.scores.shape[1]

    def top(self, k: int | float) -> list[tuple[int, int]]:
        """The ``k`` best ``(layer, head)`` pairs, highest score first.

        ``k``: a count, or a fraction in ``(0, 1]`` of all heads (``0.5`` = half). Ties go to the
        lower ``(layer, head)``.
        """
        n = resolve_k(k, self.scores.numel())
        order = torch.sort(-self.scores.reshape(-1), stable=True).indices[:n]
        H = self.num_heads
        return [(int(i) // H, int(i) % H) for i in order]

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "soteria_version": __version__,
            "model_name": self.model_name,
            "lang": self.lang,
            "method": self.method,
            "settings": self.settings,
            "shape": list(self.shape),
            "scores": self.scores.tolist(),
            "per_task": None if self.per_task is None else {n: s.tolist() for n, s in self.per_task.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HeadScores:
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} document (format = {d.get('format') if isinstance(d, dict) else d!r})")
        if d.get("format_version") != _FORMAT_VERSION:
            raise ValueError(f"unsupported {_FORMAT} format_version {d.get('format_version')!r}")
        out = cls(
            scores=torch.tensor(d["scores"], dtype=torch.float32),
            model_name=d.get("model_name", ""),
            lang=d.get("lang", ""),
            method=d.get("method", ""),
            settings=dict(d.get("settings") or {}),
            per_task=None
            if d.get("per_task") is None
            else {n: torch.tensor(s, dtype=torch.float32) for n, s in d["per_task"].items()},
        )
        if list(out.shape) != list(d.get("shape", out.shape)):
            raise ValueError(f"scores have shape {list(out.shape)} but the file says {d['shape']}")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (sorted keys) atomically; returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), sort_keys=True, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadScores:
        path = Path(path)
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None

    def plot(self, path: str | os.PathLike, *, k: int | float | None = None, title: str | None = None) -> Path:
        """Write a layer x head heatmap (diverging colours centred at 0); ``k`` marks the top-k."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        path = Path(path)
        L, H = self.shape
        s = self.scores.numpy()
        vmax = float(abs(s).max()) or 1.0
        fig = Figure(figsize=(min(16.0, 2.5 + 0.28 * H), min(16.0, 1.5 + 0.24 * L)), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        im = ax.imshow(s, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto", interpolation="nearest")
        # Plain tick labels ("2.5e-05"): an offset exponent above the bar would overlap the title.
        fig.colorbar(im, ax=ax, label=f"indirect effect ({self.method})", format="%.2g")
        if k is not None:
            top = self.top(k)
            ax.scatter(
                [h for _, h in top], [layer for layer, _ in top], s=12, marker="o", facecolors="none", edgecolors="k"
            )
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        if title is None:
            title = f"{self.model_name or 'model'}: {self.lang or '?'} heads ({self.method})"
            if k is not None:
                title += f", top {len(self.top(k))} circled"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
        return path

    # ------------------------------------------------------------------ groups

    @staticmethod
    def combine(
        scores: Sequence[HeadScores],
        how: str = "mean",
        *,
        k: int | float | None = None,
        min_votes: int | None = None,
    ) -> HeadScores | HeadSet:
        """Combine several languages' scores (same model, same ``[L, H]``).

        ``how="mean"``: a :class:`HeadScores` of the element-wise mean (rank it with ``.top(k)``).
        ``how="majority"``: a :class:`HeadSet`: each head gets one vote per language whose
        ``top(k)`` holds it; heads with at least ``min_votes`` votes are kept (default: a
        resource group's threshold, :data:`~soteria.heads.probes.VOTE_THRESHOLDS`, when the
        languages are exactly a group of :data:`~soteria.heads.probes.GROUPS`, else a strict
        majority, ``len(scores) // 2 + 1``).
        """
        scores = list(scores)
        if not scores:
            raise ValueError("combine needs at least one HeadScores")
        for i, s in enumerate(scores):
            if not isinstance(s, HeadScores):
                raise ValueError(f"combine: item {i} is a {type(s).__name__}, not a HeadScores")
        shapes = {s.shape for s in scores}
        if len(shapes) != 1:
            raise ValueError(
                "combine: score matrices differ in shape "
                + ", ".join(f"{s.lang or i}: {list(s.shape)}" for i, s in enumerate(scores))
            )
        stacked = torch.stack([s.scores for s in scores])
        mean = stacked.mean(0)
        langs = tuple(s.lang for s in scores)
        if how == "mean":
            if k is not None or min_votes is not None:
                raise ValueError("k and min_votes are for how='majority'; rank a mean with .top(k)")
            names = sorted({s.model_name for s in scores})
            methods = sorted({s.method for s in scores})
            return HeadScores(
                scores=mean,
                model_name="+".join(names),
                lang="+".join(langs),
                method=methods[0] if len(methods) == 1 else "+".join(methods),
                settings={"combined": {"how": "mean", "langs": list(langs)}},
            )
        if how != "majority":
            raise ValueError(f"how must be 'mean' or 'majority', got {how!r}")
        if k is None:
            raise ValueError("how='majority' needs k: each language votes for its top-k heads")
        kk = resolve_k(k, mean.numel())
        n = len(scores)
        mv = _default_votes(langs) if min_votes is None else min_votes
        if isinstance(mv, bool) or not isinstance(mv, numbers.Integral) or not 1 <= mv <= n:
            raise ValueError(f"min_votes must be an int in [1, {n}], got {min_votes!r}")
        votes = torch.zeros(mean.shape, dtype=torch.long)
        for s in scores:
            for layer, h in s.top(kk):
                votes[layer, h] += 1
        H = mean.shape[1]
        kept = [(int(i) // H, int(i) % H) for i in torch.nonzero(votes.reshape(-1) >= mv).reshape(-1)]
        kept.sort(key=lambda lh: (-int(votes[lh]), -float(mean[lh]), lh))
        return HeadSet(
            heads=tuple(kept),
            votes=tuple(int(votes[lh]) for lh in kept),
            langs=langs,
            k=kk,
            min_votes=int(mv),
        )


def _default_votes(langs: Sequence[str]) -> int:
    """The reference's vote threshold of the resource group ``langs`` is, else a strict majority."""
    for group, members in GROUPS.items():
        if sorted(langs) == sorted(members):
            return VOTE_THRESHOLDS[group]
    return len(langs) // 2 + 1


def model_name(model) -> str:
    """The model's Hub id or path from its config, else its ``model_type`` or class name."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    for attr in ("name_or_path", "_name_or_path"):
        name = getattr(config, attr, None)
        if name:
            return str(name)
    return str(getattr(config, "model_type", "") or type(inner).__name__)
