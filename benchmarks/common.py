"""Shared benchmark plumbing: result rows with provenance, CSV append, table printing."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def provenance() -> dict:
    """Columns every benchmark row carries: where, with what, when."""
    from soteria.version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "none"
    return {
        "device": device_name(),
        "soteria": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def append_csv(name: str, rows: list[dict]) -> Path:
    """Appends ``rows`` to ``benchmarks/results/<name>.csv`` (header written once)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.csv"
    if not rows:
        return path
    fields = list(rows[0])
    exists = path.exists() and path.stat().st_size > 0
    if exists:
        with path.open(newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:  # schema changed: start a new file, keep the old one
            path.rename(path.with_suffix(f".{_dt.datetime.now():%Y%m%d%H%M%S}.csv"))
            exists = False
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of ``rows`` (printed and returned)."""
    if not rows:
        return ""
    columns = columns or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text)
    return text


def save_png(fig, name: str, dpi: int = 120) -> Path:
    """Writes a matplotlib figure to ``benchmarks/results/<name>.png`` atomically (tight layout)."""
    import io

    from soteria.io.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    path = RESULTS / f"{name}.png"
    atomic_write_bytes(path, buf.getvalue())
    return path
