"""Microbenchmarks: Triton kernels vs eager PyTorch, side by side in one run.

Geometries of 1B / 8B / 70B models (hidden 2048 / 4096 / 8192):

- ``head_attribution``: ``R x H*D`` activations and gradients (bf16) with a broadcast mean
  baseline, R from 512 to 65,536 rows; eager = ``soteria_kernels.reference``.
- ``masked_head_steer_``: one o_proj weight, 10% to 100% of heads selected; eager =
  the reference's index_select path, plus the original implementation's way (a dense float64
  mask the size of the weight, then ``W - scale * (mask * (W_harmful - W))``) as a baseline.

Reports median time, achieved GB/s (bytes that must move / time), the fraction of the
device's measured copy bandwidth, and speedups; appends rows to
``benchmarks/results/kernels.csv``. Without CUDA it times the eager side only (on smaller
shapes) and says that Triton timings need a GPU.

    python -m benchmarks.kernels [--quick]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import append_csv, print_table, provenance

MODELS = {"1B": (2048, 32, 64), "8B": (4096, 32, 128), "70B": (8192, 64, 128)}  # hidden, H, D
ROWS = [512, 4096, 16384, 65536]
FRACTIONS = [0.1, 0.25, 0.5, 1.0]


def bench(fn, cuda: bool, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_bandwidth(device: str, cuda: bool) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write)."""
    n = (1 << 28) if cuda else (1 << 25)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), cuda)
    return 2 * n / ms / 1e6


def dense_mask_steer(weight, harmful, heads, head_dim, scale):
    """The original implementation: a float64 mask the size of the weight, full-size math."""
    mask = torch.zeros_like(weight, dtype=torch.float64)
    for h in heads:
        mask[:, h * head_dim : (h + 1) * head_dim] = 1.0
    tau = harmful.double() - weight.double()
    weight.copy_((weight.double() - scale * (mask * tau)).to(weight.dtype))


def run(quick: bool) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16
    elem = torch.finfo(dtype).bits // 8
    peak = peak_bandwidth(device, cuda)
    prov = provenance()
    max_elements = None if cuda and not quick else (1 << 22 if quick else 1 << 24)
    print(f"device: {prov['device']}; measured copy bandwidth {peak:.1f} GB/s")
    if not cuda:
        print("No CUDA device: timing the eager PyTorch side only. Triton timings need a GPU.")
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for model, (hidden, heads, head_dim) in MODELS.items():
        width = heads * head_dim
        for r in ROWS:
            if max_elements is None or r * width <= max_elements:
                timings = _bench_attribution(r, heads, head_dim, device, dtype, gen, cuda)
                nbytes = 2 * r * width * elem + width * elem + r * heads * 4
                rows.append(_row(prov, "head_attribution", model, f"rows={r}", r * width, nbytes, peak, *timings))
        for frac in FRACTIONS:
            k = max(1, round(frac * heads))
            eager_ms, triton_ms, dense_ms = _bench_steer(hidden, heads, head_dim, k, device, dtype, gen, cuda)
            nbytes = 3 * k * head_dim * hidden * elem
            row = _row(
                prov,
                "masked_head_steer_",
                model,
                f"heads={frac:.0%}",
                hidden * width,
                nbytes,
                peak,
                eager_ms,
                triton_ms,
            )
            row["dense_mask_ms"] = dense_ms
            row["speedup_vs_dense"] = dense_ms / (triton_ms or eager_ms)
            rows.append(row)
    for row in rows:
        row.setdefault("dense_mask_ms", "")
        row.setdefault("speedup_vs_dense", "")
    return rows


def _bench_attribution(rows, heads, head_dim, device, dtype, gen, cuda):
    """(eager ms, Triton ms or None) for ``rows x heads*head_dim`` activations and gradients."""
    import soteria_kernels as sk
    from soteria_kernels import reference

    act = torch.randn(rows, heads * head_dim, device=device, dtype=dtype, generator=gen)
    grad = torch.randn(rows, heads * head_dim, device=device, dtype=dtype, generator=gen)
    mean = torch.randn(heads * head_dim, device=device, dtype=dtype, generator=gen)
    eager_ms = bench(lambda: reference.head_attribution(act, grad, num_heads=heads, baseline=mean), cuda)
    triton_ms = bench(lambda: sk.head_attribution(act, grad, num_heads=heads, baseline=mean), cuda) if cuda else None
    return eager_ms, triton_ms


def _bench_steer(hidden, heads, head_dim, k, device, dtype, gen, cuda):
    """(eager ms, Triton ms or None, dense-mask ms) for steering ``k`` heads of one o_proj."""
    import soteria_kernels as sk
    from soteria_kernels import reference

    width = heads * head_dim
    weight = torch.randn(hidden, width, device=device, dtype=dtype, generator=gen)
    harmful = weight + 0.01 * torch.randn(hidden, width, device=device, dtype=dtype, generator=gen)
    sel = torch.randperm(heads, generator=torch.Generator().manual_seed(k))[:k].tolist()
    sel_t, scales = torch.tensor(sel), torch.full((k,), 0.5)
    eager_ms = bench(
        lambda: reference.masked_head_steer_(weight, harmful, sel_t, head_dim=head_dim, scale=scales), cuda
    )
    dense_ms = bench(lambda: dense_mask_steer(weight, harmful, sel, head_dim, 0.5), cuda, reps=5)
    triton_ms = (
        bench(lambda: sk.masked_head_steer_(weight, harmful, sel, head_dim=head_dim, scale=0.5), cuda) if cuda else None
    )
    return eager_ms, triton_ms, dense_ms


def _row(prov, op, model, case, elements, nbytes, peak, eager_ms, triton_ms):
    best = triton_ms if triton_ms is not None else eager_ms
    return {
        "op": op,
        "model": model,
        "case": case,
        "elements": elements,
        "bytes": nbytes,
        "eager_ms": eager_ms,
        "triton_ms": triton_ms if triton_ms is not None else "",
        "gbps": nbytes / best / 1e6,
        "frac_of_peak": nbytes / best / 1e6 / peak,
        "speedup_vs_eager": eager_ms / triton_ms if triton_ms is not None else "",
        **prov,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Triton kernels vs eager PyTorch.")
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    args = parser.parse_args(argv)
    rows = run(args.quick)
    cols = [
        "op",
        "model",
        "case",
        "eager_ms",
        "triton_ms",
        "gbps",
        "frac_of_peak",
        "speedup_vs_eager",
        "dense_mask_ms",
        "speedup_vs_dense",
    ]
    print_table(rows, cols)
    path = append_csv("kernels", rows)
    print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
