"""Plots of ``benchmarks/results/kernels.csv``: achieved bandwidth per case, kernel vs eager.

    python -m benchmarks.plot [--csv benchmarks/results/kernels.csv] [--out benchmarks/results/kernels.png]

Uses each (device, op, model, case)'s most recent row.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from benchmarks.common import RESULTS


def latest_rows(path: Path) -> list[dict]:
    rows: dict[tuple, dict] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            rows[(row["device"], row["op"], row["model"], row["case"])] = row
    return list(rows.values())


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = sorted({r["op"] for r in rows})
    fig, axes = plt.subplots(1, len(ops), figsize=(6 * len(ops), 4), squeeze=False)
    for ax, op in zip(axes[0], ops):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"{r['model']} {r['case']}" for r in sel]
        x = range(len(sel))

        def gbps(r, col):
            ms = r[col]
            return float(r["bytes"]) / float(ms) / 1e6 if ms else 0.0

        series = [("eager_ms", "eager PyTorch"), ("triton_ms", "Triton")]
        if any(r.get("dense_mask_ms") for r in sel):
            series.insert(0, ("dense_mask_ms", "reference: dense fp64 mask"))
        width = 0.8 / len(series)
        for j, (col, label) in enumerate(series):
            offset = (j - (len(series) - 1) / 2) * width
            ax.bar([i + offset for i in x], [gbps(r, col) for r in sel], width=width, label=label)
        ax.set_xticks(list(x), labels, fontsize=7, rotation=45, ha="right")
        ax.set_ylabel("GB/s (bytes that must move / time)")
        ax.set_title(f"{op} on {sel[0]['device']}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, default=RESULTS / "kernels.csv")
    parser.add_argument("--out", type=Path, default=RESULTS / "kernels.png")
    args = parser.parse_args(argv)
    if not args.csv.exists():
        parser.error(f"{args.csv} not found: run `python -m benchmarks.kernels` first")
    print(f"wrote {plot(latest_rows(args.csv), args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
