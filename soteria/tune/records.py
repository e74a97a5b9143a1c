"""The files a tune writes and reads: the trials as rows and CSV, ``chosen.json`` read back."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from ..harm import HarmVector
from ..io.atomic import atomic_write_text
from ..steer import SoteriaConfig

__all__ = ["TUNE_FORMAT", "best_line", "load_tune_config", "trial_rows", "write_trials_csv"]

#: ``format`` of a ``chosen.json``.
TUNE_FORMAT = "soteria.tune"


def trial_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        if t.state.name != "COMPLETE":
            continue
        point = t.user_attrs["point"]
        rows.append({"trial": t.number, "harmfulness": t.values[0], "kl": t.values[1],
                     "over_refusal": t.user_attrs["over_refusal"], "point": point,
                     "scale": t.user_attrs["scale"], "per_lang": t.user_attrs["per_lang"]})  # fmt: skip
    return rows


def best_line(study, max_kl: float) -> str:
    rows = trial_rows(study)
    ok = [r for r in rows if r["kl"] <= max_kl]
    if not ok:
        return f"no trial within KL {max_kl:g} yet"
    b = min(ok, key=lambda r: (r["harmfulness"], r["kl"]))
    return f"best within KL {max_kl:g}: trial {b['trial']}, harmfulness {b['harmfulness']:.3f}, KL {b['kl']:.3f}"


def write_trials_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    cols = ["trial", "harmfulness", "kl", "over_refusal", "top_k", "scale", "layers"]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        p = r["point"]
        w.writerow({
            "trial": r["trial"], "harmfulness": f"{r['harmfulness']:.4f}", "kl": f"{r['kl']:.4f}",
            "over_refusal": f"{r['over_refusal']:.4f}", "top_k": json.dumps(p["top_k"], sort_keys=True),
            "scale": json.dumps(r["scale"], sort_keys=True), "layers": json.dumps(p.get("layers")),
        })  # fmt: skip
    atomic_write_text(path, buf.getvalue())


def load_tune_config(path: str | os.PathLike) -> tuple[SoteriaConfig, HarmVector | None]:
    """``(config, harm)`` from a ``chosen.json`` written by :func:`tune` (harm read from the file
    beside it), or ``(config, None)`` from a ``soteria_config.json`` written by ``save_steered``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from None
    if isinstance(data, dict) and data.get("format") == TUNE_FORMAT:
        harm_path = path.parent / data.get("harm", "harm.safetensors")
        return SoteriaConfig.from_dict(data["config"]), HarmVector.load(harm_path) if harm_path.is_file() else None
    return SoteriaConfig.from_dict(data), None
