"""Data-parallel attribution: a real 2-process gloo group launched by torchrun vs one process.

The test starts ``python -m torch.distributed.run --standalone --nproc_per_node 2`` on this
file; each rank runs :func:`_worker` (find_heads_multi, the exact method, a call with fewer
prompts than ranks, ranks given different prompts, and ``soteria heads`` through the CLI) and
saves what it got. The test compares that with the same calls made here in one process.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ANTONYMS = [
    {"input": a, "output": b}
    for a, b in [("hot", "cold"), ("big", "small"), ("up", "down"), ("good", "bad"), ("fast", "slow"),
                 ("day", "night"), ("open", "closed"), ("old", "new"), ("high", "low"), ("early", "late")]
]  # fmt: skip
CAPITALS = [
    {"input": a, "output": b}
    for a, b in [("France", "Paris"), ("Japan", "Tokyo"), ("Germany", "Berlin"), ("Spain", "Madrid"),
                 ("Egypt", "Cairo"), ("Italy", "Rome"), ("Peru", "Lima"), ("Kenya", "Nairobi"),
                 ("Cuba", "Havana"), ("Chile", "Santiago")]
]  # fmt: skip
BY_LANG = {"xx": {"antonym": ANTONYMS, "capital": CAPITALS}, "yy": {"capital": CAPITALS}}
MULTI = dict(tasks_by_lang=BY_LANG, n_shots=3, n_trials=5, seed=0)  # 15 trials in 3 groups over 2 ranks
LOO = dict(**MULTI, means="leave_one_out", cache=False, progress=False)
EXACT = dict(tasks={"antonym": ANTONYMS}, n_shots=2, n_trials=3, method="exact", cache=False, progress=False)
CLEAN = ["Q: hot\nA: cold\n\nQ: big\nA: small\n\nQ: up\nA:"]
CORRUPTED = ["Q: hot\nA: small\n\nQ: big\nA: cold\n\nQ: up\nA:"]
TARGETS = [" down"]
CLI = ["heads", "tiny:llama", "--langs", "en", "fr", "--tasks", "antonym", "--n-shots", "2", "--n-trials", "3"]


def _record_bars(log: list):
    """Patch tqdm.auto.tqdm to note what each bar was asked for (and never draw it)."""
    import tqdm.auto

    class Recorder(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            log.append({"disable": kwargs.get("disable"), "total": kwargs.get("total")})
            kwargs.update(disable=True)
            super().__init__(*args, **kwargs)

    tqdm.auto.tqdm = Recorder
    import soteria.progress

    soteria.progress._is_terminal = lambda stream: True  # bars, not log lines, so they are recorded here


def _worker(out: Path) -> None:
    """One rank's share (run under torchrun); writes ``rank<r>.pt``."""
    from soteria.cli import main
    from soteria.heads import distributed, find_heads, find_heads_multi
    from soteria.heads.attribution import indirect_effects
    from soteria.models.tiny import tiny_model, tiny_tokenizer

    torch.set_num_threads(1)
    assert distributed.init_from_env(), "torchrun should have set WORLD_SIZE=2"
    r = distributed.rank()
    os.environ["SOTERIA_CACHE_DIR"] = str(out / f"cache-rank{r}")
    tok, model = tiny_tokenizer(), tiny_model("llama")
    res: dict = {"world": distributed.world_size(), "bars": []}
    _record_bars(res["bars"])
    res["multi"] = {k: v.to_dict() for k, v in find_heads_multi(model, tok, ["xx", "yy"], **MULTI).items()}
    res["loo"] = find_heads_multi(model, tok, ["xx", "yy"], **LOO)["xx"].scores  # each rank holds some twins
    # float64: exact effects are differences of probabilities, too close for fp32 to compare tightly
    res["exact"] = find_heads(tiny_model("llama", dtype=torch.float64), tok, "xx", **EXACT).to_dict()
    res["one_prompt"] = indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS)  # rank 1 has nothing to do
    try:  # rank 1 is given other prompts than rank 0: every rank must refuse
        indirect_effects(model, tok, CLEAN, CORRUPTED if r == 0 else CLEAN, TARGETS)
    except ValueError as e:
        res["mismatch"] = str(e)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        res["cli_code"] = main([*CLI, "--out", str(out / f"cli-rank{r}")])
    res["cli_stdout"] = stdout.getvalue()
    torch.save(res, out / f"rank{r}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Launch the 2-process gloo run once; returns (output dir, [rank 0 results, rank 1 results])."""
    out = tmp_path_factory.mktemp("ddp")
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]),
        SOTERIA_BACKEND="eager",
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # gloo on CPU even where GPUs exist
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run([*cmd, __file__, str(out)], env=env, cwd=repo, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same calls in this one process (no process group)."""
    from soteria.heads import find_heads, find_heads_multi
    from soteria.heads.attribution import indirect_effects
    from soteria.models.tiny import tiny_model, tiny_tokenizer

    mp = pytest.MonkeyPatch()
    mp.setenv("SOTERIA_BACKEND", "eager")
    mp.setenv("SOTERIA_CACHE_DIR", str(tmp_path_factory.mktemp("single-cache")))
    try:
        tok, model = tiny_tokenizer(), tiny_model("llama")
        return {
            "multi": find_heads_multi(model, tok, ["xx", "yy"], progress=False, **MULTI),
            "loo": find_heads_multi(model, tok, ["xx", "yy"], **LOO)["xx"].scores,
            "exact": find_heads(tiny_model("llama", dtype=torch.float64), tok, "xx", **EXACT),
            "one_prompt": indirect_effects(model, tok, CLEAN, CORRUPTED, TARGETS),
        }
    finally:
        mp.undo()


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rel: float = 1e-5):
    """Equal up to float summation order: max error within ``rel`` of the largest score.

    fp32 AtP scores of differently composed batches differ by ~3e-7 of the largest (measured);
    the fp64 model's exact effects and the single-prompt call agree to the last fp32 bit."""
    scale = want.abs().max().item()
    err = (got.double() - want.double()).abs().max().item()
    assert scale > 0, f"{what}: all scores are zero, the comparison cannot fail"
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} x max |score| {scale:.3g}"


def test_two_ranks_equal_one_process(two_ranks, single):
    from soteria.heads import HeadScores

    _, ranks = two_ranks
    assert [r["world"] for r in ranks] == [2, 2]
    for lang in ("xx", "yy"):
        want = single["multi"][lang]
        for r, res in enumerate(ranks):
            got = HeadScores.from_dict(res["multi"][lang])
            _close(got.scores, want.scores, f"rank {r} {lang}")
            assert got.per_task.keys() == want.per_task.keys()
            for task in want.per_task:
                _close(got.per_task[task], want.per_task[task], f"rank {r} {lang}/{task}")
            assert got.settings == want.settings  # same fingerprint, trials, seed, ...
        # Every rank returns the same scores, bit for bit.
        assert ranks[0]["multi"][lang]["scores"] == ranks[1]["multi"][lang]["scores"]
    for r, res in enumerate(ranks):
        _close(HeadScores.from_dict(res["exact"]).scores, single["exact"].scores, f"rank {r} exact", rel=1e-9)
        _close(res["one_prompt"], single["one_prompt"], f"rank {r} one prompt, two ranks")
        _close(res["loo"], single["loo"], f"rank {r} leave-one-out means")


def test_rank_zero_alone_writes_and_shows_progress(two_ranks):
    out, ranks = two_ranks
    assert len(list((out / "cache-rank0" / "heads").glob("*.json"))) == 2 + 2  # xx, yy; then en, fr (CLI)
    assert not (out / "cache-rank1").exists(), "rank 1 wrote to its cache"
    assert sorted(p.name for p in (out / "cli-rank0").iterdir()) == [
        "heads_en.json", "heads_en.png", "heads_fr.json", "heads_fr.png"
    ]  # fmt: skip
    assert not (out / "cli-rank1").exists(), "rank 1 wrote CLI output"
    assert [r["cli_code"] for r in ranks] == [0, 0]
    assert "en: top heads" in ranks[0]["cli_stdout"] and ranks[1]["cli_stdout"] == ""
    # One bar per computing call (multi; the CLI's en+fr); exact and indirect_effects make none here.
    # leave-one-out and exact ran with progress=False
    assert [b["disable"] for b in ranks[0]["bars"]] == [False, True, True, False]
    assert [b["disable"] for b in ranks[1]["bars"]] == [True, True, True, True]
    assert ranks[0]["bars"][0]["total"] == 8  # rank 0's share of 15 trials: 0, 2, ..., 14


def test_ranks_given_other_prompts_all_refuse(two_ranks):
    _, ranks = two_ranks
    for res in ranks:
        assert "ranks [1] were given other prompts" in res.get("mismatch", ""), res.get("mismatch")


# --------------------------------------------------------------------------- helpers, no process group


def test_helpers_outside_a_process_group(monkeypatch):
    from soteria.heads import distributed

    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    assert not distributed.is_initialized() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main_process()
    assert distributed.init_from_env() is False  # no WORLD_SIZE: nothing to join
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() is False
    assert distributed.resolve(None) == (0, 1) and distributed.resolve(False) == (0, 1)
    with pytest.raises(ValueError, match="not initialised"):
        distributed.resolve(True)
    with pytest.raises(ValueError, match="True, False or None"):
        distributed.resolve("yes")
    t = torch.tensor([1.5, 2.0], dtype=torch.float32)
    s = distributed.all_reduce_sum(t, dtype=torch.float64)
    assert s.dtype == torch.float64 and s.tolist() == [1.5, 2.0] and s.data_ptr() != t.data_ptr()
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object([3]) == [3]
    distributed.barrier()


def test_init_from_env_names_missing_variables(monkeypatch):
    from soteria.heads import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT not set; launch with torchrun"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init_from_env()


def test_shards_cover_every_index_once():
    from soteria.heads.distributed import shard

    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            parts = [list(shard(n, r, world)) for r in range(world)]
            assert sorted(i for p in parts for i in p) == list(range(n))
            assert parts == [list(shard(n, r, world)) for r in range(world)]  # deterministic
    assert list(shard(7, 1, 3)) == [1, 4]
    with pytest.raises(ValueError, match="rank 2"):
        shard(4, 2, 2)


if __name__ == "__main__":  # a rank of the torchrun launch in the fixture above
    _worker(Path(sys.argv[1]))
