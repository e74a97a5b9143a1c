"""The tuner's trade-off: the Pareto front of (harmfulness, KL), choosing a point on it, the plot.

A trial is on the front when no other trial is at least as good on both objectives and better
on one. :func:`choose` takes the lowest harmfulness with KL within a budget (``"budget"``), or
the knee: the point nearest the ideal corner once both objectives are scaled to [0, 1] over
the front (``"knee"``).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io.atomic import atomic_write_bytes

__all__ = ["CHOICES", "choose", "front_rows", "pareto_front", "plot_front"]

CHOICES = ("budget", "knee")


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated points (both objectives minimised), by rising first objective."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best_second = [], math.inf
    for i in order:
        if points[i][1] < best_second:
            front.append(i)
            best_second = points[i][1]
    return front


def choose(points: Sequence[tuple[float, float]], how: str = "budget", *, max_kl: float = 0.1) -> tuple[int, str]:
    """``(index of the chosen point, why)``. ``points``: ``(harmfulness, kl)`` per trial.

    ``"budget"``: the lowest harmfulness among points with ``kl <= max_kl`` (ties: lower KL);
    when no point is within the budget, the lowest-KL point, and ``why`` says so. ``"knee"``: the
    front point nearest ``(0, 0)`` after scaling each objective to [0, 1] over the front.
    """
    if how not in CHOICES:
        raise ValueError(f"choose must be one of {CHOICES}, got {how!r}")
    if not points:
        raise ValueError("no finished trial to choose from")
    if how == "budget":
        within = [i for i, (_, kl) in enumerate(points) if kl <= max_kl]
        if not within:
            i = min(range(len(points)), key=lambda j: (points[j][1], points[j][0]))
            return i, f"no trial has KL <= {max_kl:g}; the lowest-KL trial (KL {points[i][1]:.3f})"
        i = min(within, key=lambda j: (points[j][0], points[j][1]))
        return i, f"lowest harmfulness with KL <= {max_kl:g}"
    front = pareto_front(points)
    span = [max(points[i][d] for i in front) - min(points[i][d] for i in front) for d in (0, 1)]
    low = [min(points[i][d] for i in front) for d in (0, 1)]

    def dist(i: int) -> float:
        return math.hypot(*((points[i][d] - low[d]) / span[d] if span[d] > 0 else 0.0 for d in (0, 1)))

    return min(front, key=lambda i: (dist(i), points[i][0])), "the knee of the front (nearest the ideal corner)"


def plot_front(
    points: Sequence[tuple[float, float]],
    chosen: int,
    path: str | Path,
    *,
    reference: dict[str, tuple[float, float]] | None = None,
    title: str = "",
    max_kl: float | None = None,
) -> Path:
    """PNG: every trial (harmfulness vs KL), the front joined and highlighted, the chosen point
    marked, and ``reference`` points (e.g. the defaults) labelled. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    ax.scatter([p[1] for p in points], [p[0] for p in points], s=18, c="#9aa5b1", label="trial")
    ax.plot([points[i][1] for i in front], [points[i][0] for i in front], "-o", c="#1f77b4", ms=5, label="Pareto front")
    ax.scatter([points[chosen][1]], [points[chosen][0]], s=160, marker="*", c="#d62728", zorder=5, label="chosen")
    for name, (harm, kl) in (reference or {}).items():
        ax.scatter([kl], [harm], s=60, marker="D", c="#2ca02c", zorder=4)
        ax.annotate(name, (kl, harm), textcoords="offset points", xytext=(6, 4), fontsize=8)
    if max_kl is not None:
        ax.axvline(max_kl, ls="--", c="#7f7f7f", lw=1, label=f"KL budget {max_kl:g}")
    ax.set_xlabel("KL(base || steered) on harmless prompts")
    ax.set_ylabel("harmfulness (1 - refusal proxy) on harmful prompts")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def front_rows(trials: Sequence[dict[str, Any]], points: Sequence[tuple[float, float]]) -> list[dict[str, Any]]:
    """The front's trials as table rows (rising harmfulness)."""
    return [trials[i] for i in pareto_front(points)]
