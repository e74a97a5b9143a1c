"""Ahead-of-time compile of every kernel for sm_80 / sm_90: no spills, 128-bit loads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_every_kernel_compiles_for_both_targets(report):
    kernels = {r["kernel"] for r in report}
    assert {"head_attribution", "masked_head_update", "masked_head_steer"} <= kernels
    for kernel in kernels:
        assert {r["target"] for r in report if r["kernel"] == kernel} == {"sm_80", "sm_90"}
    for r in report:
        assert set(r) == {"kernel", "target", "regs", "local_bytes", "shared_bytes", "max_load_bits"}


def test_no_spills_and_vector_loads(report):
    for r in report:
        assert r["local_bytes"] == 0, f"{r['kernel']} on {r['target']} spills {r['local_bytes']} bytes"
        assert r["max_load_bits"] == 128, f"{r['kernel']} on {r['target']} loads at most {r['max_load_bits']} bits"
        assert 0 < r["regs"] <= 128, f"{r['kernel']} on {r['target']} uses {r['regs']} registers"


def test_interpreter_refused():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_report"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "unset TRITON_INTERPRET" in proc.stderr
