"""Data-parallel find_heads: the same work on 1 and 2 processes (and 1..N GPUs), launched by torchrun.

    python -m benchmarks.scaling                # CPU: 1 and 2 gloo processes; GPUs: 1..N with NCCL
    python -m benchmarks.scaling --cpu-procs 1 2 4 --repeat 5

Each configuration is one ``torchrun --standalone --nproc_per_node K`` launch of this file in
worker mode: every rank builds the same seeded model, runs one small warm-up, then times
``find_heads_multi`` (AtP, cache off) over several languages' probe tasks, between barriers, so
the time is that of the slowest rank and excludes start-up and model building. On the CPU the
machine's cores are split evenly between the processes (``torch.set_num_threads``), so 1
process x 2 threads is compared with 2 processes x 1 thread on the same cores: a speedup there
comes only from the data-parallel split, and a 2-core machine caps it at 2x. A 1 process x 1
thread row is the per-core reference: ``core_efficiency`` = its time / (time x cores used).
Each row also reports how far the scores are from the first row's (max |diff| / max |score|),
to show the split changes only float summation order.

Printed as a table and appended to ``benchmarks/results/scaling.csv``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import append_csv, print_table, provenance

REPO = Path(__file__).resolve().parents[1]

# name -> (model overrides, languages, n_trials, n_shots, batch size)
WORKLOADS = {
    # CPU: 8 layers x 8 heads (hidden 128), 3 languages x 5 tasks x 8 trials = 120 prompts.
    "cpu": (
        dict(num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
             intermediate_size=256, head_dim=16),
        ["en", "hi", "th"], 8, 5, 8,
    ),
    # GPU: 16 layers x 16 heads (hidden 1024), all twelve languages x 5 tasks x 25 trials = 1,500 prompts.
    "gpu": (
        dict(num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4, hidden_size=1024,
             intermediate_size=2816, head_dim=64),
        None, 25, 10, 32,
    ),
}  # fmt: skip


def _work(name: str):
    from soteria.heads.probes import languages

    overrides, langs, n_trials, n_shots, bs = WORKLOADS[name]
    return overrides, langs or languages(), n_trials, n_shots, bs


# --------------------------------------------------------------------------- one rank


def worker(out: Path, workload: str, repeat: int, threads: int) -> None:
    from soteria.heads import distributed, find_heads_multi
    from soteria.models.tiny import tiny_model, tiny_tokenizer

    distributed.init_from_env()
    torch.set_num_threads(threads)
    overrides, langs, n_trials, n_shots, bs = _work(workload)
    device = distributed.local_device() if workload == "gpu" else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tok = tiny_tokenizer()
    model = tiny_model("llama", dtype=dtype, attn_implementation="sdpa", **overrides).to(device)
    kw = dict(n_shots=n_shots, batch_size=bs, cache=False, progress=False)
    find_heads_multi(model, tok, langs[:1], tasks=["antonym"], n_trials=2, **kw)  # warm-up

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        distributed.barrier()

    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        found = find_heads_multi(model, tok, langs, n_trials=n_trials, **kw)
        sync()
        times.append(time.perf_counter() - t0)
    if distributed.is_main_process():
        scores = torch.stack([found[lang].scores for lang in langs])
        trials = sum(sum(s.settings["trials"].values()) for s in found.values())
        doc = {"times": times, "trials": trials, "langs": len(langs), "scores": scores.tolist()}
        out.write_text(json.dumps(doc))
    if distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- the launcher


def launch(procs: int, workload: str, repeat: int, threads: int, backend: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        env["OMP_NUM_THREADS"] = str(threads)
        if backend == "gloo":
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks: gloo
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               "-m", "benchmarks.scaling", "--worker", str(out), "--workload", workload,
               "--repeat", str(repeat), "--threads", str(threads)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"torchrun with {procs} processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def run(cpu_procs: list[int], gpu_procs: list[int], repeat: int) -> list[dict]:
    cores = os.cpu_count() or 1
    plan = [("cpu", "gloo", k, max(1, cores // k)) for k in cpu_procs]
    if cpu_procs and cores > 1:
        plan.insert(1, ("cpu", "gloo", 1, 1))  # the per-core reference
    plan += [("gpu", "nccl", k, max(1, cores // k)) for k in gpu_procs]
    rows: list[dict] = []
    base: dict[str, dict] = {}
    one_core: float | None = None
    for workload, backend, k, threads in plan:
        res = launch(k, workload, repeat, threads, backend)
        t = sorted(res["times"])[len(res["times"]) // 2]
        scores = torch.tensor(res["scores"])
        ref = base.setdefault(workload, {"t": t, "scores": scores, "k": k})
        diff = (scores - ref["scores"]).abs().max().item() / ref["scores"].abs().max().item()
        if backend == "gloo" and k == 1 and threads == 1:
            one_core = t
        rows.append(
            {
                "workload": workload,
                "backend": backend,
                "processes": k,
                "threads_per_proc": threads if backend == "gloo" else "-",
                "langs": res["langs"],
                "trials": res["trials"],
                "time_s": round(t, 3),
                "trials_per_s": round(res["trials"] / t, 1),
                "speedup": round(ref["t"] / t, 2),
                "efficiency": round(ref["t"] / t / (k / ref["k"]), 2) if backend == "nccl" else "-",
                "core_efficiency": "-",  # filled in below, once the 1 x 1 reference has run
                "score_rel_diff": float(f"{diff:.2g}"),
                "repeats": len(res["times"]),
                "cores": cores,
                **provenance(),
            }
        )
        print_table(rows[-1:], list(rows[-1])[:12])
    for row in rows:
        if row["backend"] == "gloo" and one_core:
            used = row["processes"] * row["threads_per_proc"]
            row["core_efficiency"] = round(one_core / (row["time_s"] * used), 2)
    return rows


def main(argv=None) -> list[dict] | None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-procs", type=int, nargs="+", default=[1, 2], help="CPU process counts (default 1 2)")
    p.add_argument("--gpu-procs", type=int, nargs="*", default=None, help="GPU counts (default 1..all GPUs)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per configuration (median reported)")
    p.add_argument("--no-csv", action="store_true", help="print only")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--workload", default="cpu", choices=sorted(WORKLOADS), help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.workload, args.repeat, args.threads)
        return None
    gpus = torch.cuda.device_count()
    gpu_procs = list(range(1, gpus + 1)) if args.gpu_procs is None else args.gpu_procs
    rows = run(args.cpu_procs, gpu_procs if gpus else [], args.repeat)
    print()
    print_table(rows, list(rows[0])[:12])
    print(
        f"\nCPU rows: the {rows[0]['cores']} cores are split between the processes "
        "(threads_per_proc), so the CPU speedup is bounded by the core count, not by soteria; on a "
        "2-core machine shared with other work it is at most 2x and noisy."
    )
    if not args.no_csv:
        print(f"appended to {append_csv('scaling', rows)}")
    return rows


if __name__ == "__main__":
    main()
