"""Ahead-of-time check of every Triton kernel for real GPU targets, no GPU needed.

Compiles each kernel with ``triton.compile`` for sm_80 (A100) and sm_90 (H100) exactly as
the launchers would call it on an 8B model's shapes (bf16, head_dim 128, 32 heads, hidden
4096), then reads the cubin with the tools shipped in the Triton wheel:

- ``cuobjdump --dump-resource-usage``: registers, local memory (spill) bytes, shared memory;
- ``nvdisasm``: the widest global load (``LDG.E.128`` = 128-bit vector loads).

    python -m benchmarks.kernel_report [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TARGETS = {"sm_80": 80, "sm_90": 90}
HIDDEN, HEADS, HEAD_DIM, ROWS = 4096, 32, 128, 4096  # Llama-3-8B o_proj; 4096 prompt rows


def _tools() -> tuple[str, str]:
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return str(bin_dir / "cuobjdump"), str(bin_dir / "nvdisasm")


def _cases():
    """(name, jit kernel, grid-less kwargs, num_warps) as the launchers build them."""
    from soteria_kernels import attribution, head_update

    meta = dict(device="meta", dtype=torch.bfloat16)
    act = torch.empty(ROWS, HEADS * HEAD_DIM, **meta)
    grad = torch.empty_like(act)
    mean = torch.empty(HEADS * HEAD_DIM, **meta)
    for name, base, sum_rows in [
        ("head_attribution", None, False),
        ("head_attribution[baseline]", mean, False),
        ("head_attribution[baseline,sum_rows]", mean, True),
        ("head_attribution[full_baseline]", torch.empty_like(act), False),
    ]:
        _, kwargs, _ = attribution._plan(act, grad, base, HEADS, sum_rows, sms=132)
        kwargs["out_ptr"] = torch.empty(1, device="meta", dtype=torch.float32)
        yield name, attribution._head_attribution_kernel, kwargs, attribution.NUM_WARPS

    heads = torch.empty(HEADS // 10, device="meta", dtype=torch.int64)
    scales = torch.empty(HEADS // 10, device="meta", dtype=torch.float32)
    linear = torch.empty(HIDDEN, HEADS * HEAD_DIM, **meta)  # nn.Linear [d_model, H*D]
    conv1d = torch.empty(HEADS * HEAD_DIM, HIDDEN, **meta)  # GPT-2 Conv1D [H*D, d_model]
    for name, w, axis, fused in [
        ("masked_head_update", linear, 1, False),
        ("masked_head_steer", linear, 1, True),
        ("masked_head_update[conv1d]", conv1d, 0, False),
    ]:
        _, kwargs = head_update._plan(w, torch.empty_like(w), heads, scales, HEAD_DIM, axis, fused)
        yield name, head_update._masked_head_update_kernel, kwargs, head_update.NUM_WARPS


def _source(kernel, kwargs):
    """An ASTSource specialised the way Triton's runtime specialises a real launch:
    ints equal to 1 become constants, 16-divisible ints and 16-byte-aligned pointers get
    ``tt.divisibility`` (allocator pointers are 256-byte aligned)."""
    import triton
    from triton.backends.compiler import BaseBackend
    from triton.compiler import ASTSource

    type_names = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int64: "*i64"}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        value = kwargs[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = value
        elif isinstance(value, torch.Tensor):
            signature[p.name] = type_names[value.dtype]
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif isinstance(value, bool):
            signature[p.name] = "i1"
        else:
            ty, spec = triton._C.libtriton.native_specialize_impl(BaseBackend, value, False, True, True)
            signature[p.name] = ty
            if ty == "constexpr":
                constexprs[p.name] = spec
            elif spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
    return ASTSource(kernel, signature, constexprs=constexprs, attrs=attrs)


def _load_bits(sass: str) -> int:
    widths = []
    for m in re.finditer(r"\bLDG\.E((?:\.[A-Z0-9_]+)*)", sass):
        mods = m.group(1).split(".")
        if "128" in mods:
            widths.append(128)
        elif "64" in mods:
            widths.append(64)
        elif any(x in mods for x in ("U16", "S16")):
            widths.append(16)
        elif any(x in mods for x in ("U8", "S8")):
            widths.append(8)
        else:
            widths.append(32)
    return max(widths, default=0)


def report() -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    cuobjdump, nvdisasm = _tools()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kernel, kwargs, num_warps in _cases():
            src = _source(kernel, kwargs)
            for target, cap in TARGETS.items():
                options = {"num_warps": num_warps, "enable_fp_fusion": True}  # as the launchers pass them
                compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
                cubin = Path(tmp) / f"{re.sub(r'[^A-Za-z0-9_]', '_', name)}_{target}.cubin"
                cubin.write_bytes(compiled.asm["cubin"])
                usage = subprocess.run(
                    [cuobjdump, "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True
                ).stdout
                sass = subprocess.run([nvdisasm, str(cubin)], capture_output=True, text=True, check=True).stdout
                res = dict(re.findall(r"(REG|SHARED|LOCAL|STACK):(\d+)", usage))
                rows.append(
                    {
                        "kernel": name,
                        "target": target,
                        "regs": int(res["REG"]),
                        "local_bytes": int(res["LOCAL"]) + int(res.get("STACK", 0)),
                        "shared_bytes": int(res["SHARED"]),
                        "max_load_bits": _load_bits(sass),
                        "num_warps": num_warps,
                    }
                )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the report compiles the real (not interpreted) kernels")
    rows = report()
    if args.json:
        keys = ("kernel", "target", "regs", "local_bytes", "shared_bytes", "max_load_bits")
        print(json.dumps([{k: r[k] for k in keys} for r in rows], indent=1))
    else:
        from benchmarks.common import print_table

        print(f"bf16, head_dim {HEAD_DIM}, {HEADS} heads, hidden {HIDDEN}, {ROWS} rows; cubins from triton.compile")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
