"""soteria.steer_checkpoint: streaming edit of a safetensors checkpoint on disk.

Covers: bit-identity with the in-memory path (apply + save_steered) on multi-shard and
single-file checkpoints, fp32/bf16, nn.Linear and Conv1D, harmful checkpoints and tau vectors;
files carried over; the source untouched; refusals before anything is written; interrupted
runs leaving nothing; peak memory of a subprocess on a checkpoint several times its bound.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import soteria
import soteria.export.streaming as streaming
from soteria import HarmVector, SoteriaPatcher, save_steered, steer_checkpoint
from soteria.arch import head_sites
from soteria.models.tiny import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
HEADS = {"fr": [(0, 1), (2, 3), (1, 0)], "de": [(0, 1), (2, 0)]}
SCALE = {"fr": 0.75, "de": 1.5}
SHARD = "60KB"


def _hashes(folder: Path) -> dict[str, str]:
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as sf:
            for k in sf.keys():
                out[k] = sf.get_tensor(k)
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _models(model_type: str, dtype: torch.dtype):
    kw = dict(num_hidden_layers=3, dtype=dtype)
    if model_type == "llama":
        kw["hidden_size"] = 64  # D = 16
    return tiny_model(model_type, seed=0, **kw), tiny_model(model_type, seed=1, **kw)


@pytest.fixture
def ckpt(tmp_path):
    """A sharded fp32 llama base checkpoint (with tokenizer) and a harmful fine-tune of it."""
    base, harmful = _models("llama", torch.float32)
    base.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    harmful.save_pretrained(tmp_path / "harm", max_shard_size=SHARD)
    return tmp_path / "base", tmp_path / "harm", base


# --------------------------------------------------------------------------- bit identity


@pytest.mark.parametrize(
    "model_type, dtype, sharded, backend, blocked",
    [
        ("llama", torch.float32, True, None, False),  # Triton kernel (interpreted)
        ("llama", torch.bfloat16, True, "eager", True),
        ("llama", torch.float32, False, "eager", False),  # single model.safetensors
        ("gpt2", torch.float32, True, "eager", True),  # Conv1D: heads own rows
        ("gpt2", torch.bfloat16, True, None, True),
    ],
)
def test_streaming_equals_in_memory(tmp_path, monkeypatch, model_type, dtype, sharded, backend, blocked):
    if backend:
        monkeypatch.setenv("SOTERIA_BACKEND", backend)
    if blocked:  # the streaming edit runs one row (column for Conv1D) of the non-head axis at a time
        monkeypatch.setattr(streaming, "_CHUNK_BYTES", 1)
    base, harmful = _models(model_type, dtype)
    shard = SHARD if sharded else "50GB"
    base.save_pretrained(tmp_path / "base", max_shard_size=shard)
    harmful.save_pretrained(tmp_path / "harm", max_shard_size=shard)
    n_files = len(list((tmp_path / "base").glob("*.safetensors")))
    assert (n_files > 3) == sharded
    before = _hashes(tmp_path / "base") | {f"harm/{k}": v for k, v in _hashes(tmp_path / "harm").items()}

    out = steer_checkpoint(tmp_path / "base", tmp_path / "streamed", heads=HEADS, harm=str(tmp_path / "harm"),
                           scale=SCALE, progress=False)  # fmt: skip
    assert out == tmp_path / "streamed"

    hv = HarmVector.from_pretrained(str(tmp_path / "harm"), base=base)
    SoteriaPatcher.apply(base, ["fr", "de"], heads=HEADS, harm=hv, scale=SCALE, progress=False)
    save_steered(base, tmp_path / "memory", max_shard_size=shard)

    streamed, memory = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "memory")
    assert streamed.keys() == memory.keys()
    for k in streamed:
        assert streamed[k].dtype == memory[k].dtype == dtype
        assert torch.equal(_raw(streamed[k]), _raw(memory[k])), f"{k} differs"
    # Same header layout and metadata too: whole shard files are byte-identical.
    s_hash, m_hash = _hashes(tmp_path / "streamed"), _hashes(tmp_path / "memory")
    shards = [k for k in s_hash if k.endswith(".safetensors")]
    assert len(shards) == n_files
    assert all(s_hash[k] == m_hash[k] for k in shards)

    # Only the selected heads' slices changed, everything else is the base's bytes.
    original = _tensors(tmp_path / "base")
    sites = head_sites(base)
    changed = {k for k in original if not torch.equal(_raw(original[k]), _raw(streamed[k]))}
    assert changed == {sites[layer].param_name for layer in (0, 1, 2)}
    for layer in range(3):
        site = sites[layer]
        axis = site.head_axis % 2
        diff = (original[site.param_name] != streamed[site.param_name]).any(dim=1 - axis)
        heads_hit = sorted({int(i) // site.head_dim for i in diff.nonzero().flatten()})
        want = sorted({h for pairs in HEADS.values() for (lay, h) in pairs if lay == layer})
        assert heads_hit == want

    assert _hashes(tmp_path / "base") | {f"harm/{k}": v for k, v in _hashes(tmp_path / "harm").items()} == before


def test_tau_vector_and_list_heads(tmp_path, monkeypatch):
    """A HarmVector of kind tau (masked_head_update_) and heads given as one list + langs."""
    monkeypatch.setenv("SOTERIA_BACKEND", "eager")
    base, _ = _models("llama", torch.bfloat16)
    base.save_pretrained(tmp_path / "base", max_shard_size=SHARD)
    sites = head_sites(base)
    tau = {s.layer: torch.randn(s.weight.shape) * 0.1 for s in sites}
    hv = HarmVector(tau, kind="tau", param_names={s.layer: s.param_name for s in sites}, model_type="llama",
                    source="test:tau")  # fmt: skip
    pairs = [(1, 2), (0, 0)]
    steer_checkpoint(tmp_path / "base", tmp_path / "s", heads=pairs, langs=["th"], harm=hv, scale=2.0, progress=False)
    SoteriaPatcher.apply(base, "th", heads=pairs, harm=hv, scale=2.0, progress=False)
    save_steered(base, tmp_path / "m", max_shard_size=SHARD)
    s, m = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert all(torch.equal(_raw(s[k]), _raw(m[k])) for k in s)
    record = json.loads((tmp_path / "s" / "soteria_config.json").read_text())
    assert record["harm_kind"] == "tau" and record["harm_source"] == "test:tau" and record["languages"] == ["th"]


# --------------------------------------------------------------------------- carried files, records


def test_files_carried_over_and_records(ckpt, tmp_path):
    base_dir, harm_dir, base = ckpt
    (base_dir / "README.md").write_text("# the base model's card\n")
    (base_dir / "extra").mkdir()
    (base_dir / "extra" / "notes.txt").write_text("keep me\n")
    (base_dir / "original").mkdir()
    (base_dir / "original" / "consolidated.00.pth").write_bytes(b"unsteered weights")
    (base_dir / "consolidated.safetensors").write_bytes(b"unsteered weights too")
    # A Hub-cache-like snapshot: every file a symlink.
    snap = tmp_path / "snapshot"
    for p in base_dir.rglob("*"):
        if p.is_file():
            link = snap / p.relative_to(base_dir)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(p)
    before = _hashes(base_dir)

    with pytest.warns(UserWarning, match=r"left out 2 weight file\(s\).*consolidated"):
        out = steer_checkpoint(snap, tmp_path / "out", heads=HEADS, harm=harm_dir, scale=SCALE, progress=False,
                               base_model="org/base-model", repo_id="org/base-model-soteria")  # fmt: skip
    assert _hashes(base_dir) == before
    files = _hashes(out)
    assert not any(p.is_symlink() for p in out.rglob("*"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "extra/notes.txt",
                 "model.safetensors.index.json"):  # fmt: skip
        assert files[name] == before[name], name
    assert "original/consolidated.00.pth" not in files and "consolidated.safetensors" not in files
    assert {k for k in files if k.endswith(".safetensors")} == {k for k in before if k.startswith("model-")}

    record = json.loads((out / "soteria_config.json").read_text())
    assert list(record) == sorted(record)
    assert record["heads"] == {k: [list(p) for p in v] for k, v in HEADS.items()}
    assert record["scale"] == SCALE and record["method"] == "explicit" and record["harm_kind"] == "harmful"
    assert record["harm_source"] == f"checkpoint:{harm_dir}"
    config = json.loads((out / "config.json").read_text())
    base_config = json.loads((base_dir / "config.json").read_text())
    assert config.pop("soteria") == record and config == base_config
    for f in out.glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            meta = sf.metadata()
        assert meta["format"] == "pt" and json.loads(meta["soteria_config"]) == record

    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "the base model's card" not in card
    assert "base_model: org/base-model" in card and 'from_pretrained("org/base-model-soteria")' in card
    assert "| all languages (union) | 4 |" in card and "Written by streaming" in card

    # Loads with plain transformers and equals the in-memory steered model.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert loaded.config.soteria == record
    hv = HarmVector.from_pretrained(harm_dir, base=base)
    SoteriaPatcher.apply(base, ["fr", "de"], heads=HEADS, harm=hv, scale=SCALE, progress=False)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, base(ids).logits)


def test_lazy_harm_vector_reads_counted(ckpt, tmp_path):
    """A HarmVector read lazily: streaming reads each needed tensor's bytes itself, once, from the
    file ``HarmVector.location`` names, and counts it in ``tensors_read`` / ``bytes_read``."""
    base_dir, harm_dir, base = ckpt
    hv = HarmVector.from_pretrained(str(harm_dir), base=base)
    heads = {"fr": [(0, 1), (2, 3)]}  # layer 1 is not steered: never read
    steer_checkpoint(base_dir, tmp_path / "s", heads=heads, harm=hv, scale=0.5, progress=False)
    sites = head_sites(base)
    assert sorted(hv.tensors_read) == sorted([sites[0].param_name, sites[2].param_name])
    assert hv.bytes_read == sum(sites[i].weight.numel() * 4 for i in (0, 2))
    file, key = hv.location(2)
    assert Path(file).parent == harm_dir and key == sites[2].param_name


def test_lazy_export_names():
    assert soteria.steer_checkpoint is steer_checkpoint is streaming.steer_checkpoint
    from soteria import export

    assert export.steer_checkpoint is steer_checkpoint


# --------------------------------------------------------------------------- refusals


def _wrong_harm(tmp_path) -> Path:
    other = tiny_model("llama", seed=3, num_hidden_layers=3, hidden_size=48)
    other.save_pretrained(tmp_path / "wrong")
    return tmp_path / "wrong"


@pytest.mark.parametrize(
    "case, kwargs, error, match",
    [
        ("inside", dict(out="base/steered"), ValueError, "must be outside base_dir"),
        ("same", dict(out="base"), ValueError, "must be outside base_dir"),
        ("exists", dict(out="taken"), FileExistsError, "already exists"),
        ("range", dict(heads={"fr": [(3, 0)]}), ValueError, r"out of range.*3 layers x 4 heads"),
        ("list", dict(heads=[(0, 1)]), ValueError, "pass langs="),
        ("scale", dict(scale=float("nan")), ValueError, "finite"),
        ("harm", dict(harm="wrong"), ValueError, r"does not match the base model"),
        ("harm_type", dict(harm=3), ValueError, "harm must be a HarmVector"),
        ("steered", dict(base="steered_base"), ValueError, "already steered"),
        ("bin", dict(base="bin_only"), FileNotFoundError, "only safetensors checkpoints"),
    ],
)
def test_refusals_write_nothing(ckpt, tmp_path, case, kwargs, error, match):
    base_dir, harm_dir, _ = ckpt
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    if case == "harm":
        kwargs = dict(harm=_wrong_harm(tmp_path))
    if case == "steered":
        steer_checkpoint(base_dir, tmp_path / "steered_base", heads=HEADS, harm=harm_dir, scale=SCALE, progress=False)
    if case == "bin":
        (tmp_path / "bin_only").mkdir()
        (tmp_path / "bin_only" / "config.json").write_bytes((base_dir / "config.json").read_bytes())
        (tmp_path / "bin_only" / "pytorch_model.bin").write_bytes(b"\0")
    src = tmp_path / kwargs.get("base", "base")
    out = tmp_path / kwargs.get("out", "out")
    before = _hashes(tmp_path)
    args = dict(heads=kwargs.get("heads", HEADS), harm=kwargs.get("harm", harm_dir), scale=kwargs.get("scale", SCALE))
    with pytest.raises(error, match=match):
        steer_checkpoint(src, out, progress=False, **args)
    assert _hashes(tmp_path) == before
    assert _leftovers(tmp_path) == [] and _leftovers(base_dir) == []


def test_nan_in_harmful_tensor_aborts_cleanly(ckpt, tmp_path):
    base_dir, harm_dir, base = ckpt
    key = head_sites(base)[2].param_name
    index = json.loads((harm_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shard = harm_dir / index[key]
    with safe_open(shard, framework="pt") as sf:
        tensors, meta = {k: sf.get_tensor(k) for k in sf.keys()}, sf.metadata()
    tensors[key][3, 5] = float("nan")
    save_file(tensors, shard, metadata=meta)
    with pytest.raises(ValueError, match="NaN/Inf"):
        steer_checkpoint(base_dir, tmp_path / "out", heads=HEADS, harm=harm_dir, scale=SCALE, progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- interruption


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_run_leaves_nothing(ckpt, tmp_path, monkeypatch, exc):
    base_dir, harm_dir, _ = ckpt
    before = _hashes(base_dir)
    real, calls = streaming._edit_tensor, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "_edit_tensor", flaky)
    with pytest.raises(type(exc)):
        steer_checkpoint(base_dir, tmp_path / "out", heads=HEADS, harm=harm_dir, scale=SCALE, progress=False)
    assert len(calls) == 2
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == [] and _hashes(base_dir) == before


def test_interrupted_overwrite_keeps_old_output(ckpt, tmp_path, monkeypatch):
    base_dir, harm_dir, _ = ckpt
    out = steer_checkpoint(base_dir, tmp_path / "out", heads=HEADS, harm=harm_dir, scale=SCALE, progress=False)
    old = _hashes(out)

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(streaming, "write_safetensors", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        steer_checkpoint(base_dir, out, heads={"fr": [(1, 1)]}, harm=harm_dir, progress=False, overwrite=True)
    assert _hashes(out) == old and _leftovers(tmp_path) == []
    monkeypatch.undo()
    steer_checkpoint(base_dir, out, heads={"fr": [(1, 1)]}, harm=harm_dir, progress=False, overwrite=True)
    assert json.loads((out / "soteria_config.json").read_text())["heads"] == {"fr": [[1, 1]]}
    assert _leftovers(tmp_path) == []


# --------------------------------------------------------------------------- peak memory

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, re, sys
    from soteria import steer_checkpoint

    def status(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\\s+(\\d+) kB", text).group(1)) * 1024

    warm_base, warm_harm, warm_out, base, harm, out, heads = sys.argv[1:8]
    heads = json.loads(heads)
    # Warm-up on a tiny checkpoint of the same family: imports and lazy initialisation happen here.
    steer_checkpoint(warm_base, warm_out, heads={"fr": [[0, 0]]}, harm=warm_harm, progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss0 = status("VmRSS")
    steer_checkpoint(base, out, heads=heads, harm=harm, scale=0.5, progress=False)
    print(json.dumps({"rss0": rss0, "hwm": status("VmHWM")}))
    """
)


def _write_checkpoint(folder: Path, config, shard_bytes: int, seed: int = 0) -> dict[str, tuple]:
    """A random sharded checkpoint written tensor by tensor (no model is built); returns shapes."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    shards, cur, size = [], {}, 0
    for k, shape in shapes.items():
        cur[k] = shape
        size += 4 * torch.Size(shape).numel()
        if size >= shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
    if cur:
        shards.append(cur)
    folder.mkdir(parents=True)
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: torch.randn(s, generator=gen) for k, s in names.items()}, folder / fname,
                  metadata={"format": "pt"})  # fmt: skip
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config.to_json_file(folder / "config.json")
    return shapes


def test_peak_memory_stays_under_bound(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    from soteria.models.tiny import tiny_config

    config = tiny_config("llama", hidden_size=2048, intermediate_size=4096, num_attention_heads=8,
                         num_key_value_heads=2, num_hidden_layers=2)  # fmt: skip
    shapes = _write_checkpoint(tmp_path / "big", config, shard_bytes=60 << 20)
    o_proj = {k: s for k, s in shapes.items() if k.endswith("o_proj.weight")}
    largest = max(4 * torch.Size(s).numel() for s in o_proj.values())  # 16 MiB
    gen = torch.Generator().manual_seed(1)
    layer_of = {k: int(k.split(".")[2]) for k in o_proj}
    HarmVector({layer_of[k]: torch.randn(s, generator=gen) for k, s in o_proj.items()}, kind="harmful",
               param_names={layer_of[k]: k for k in o_proj}, model_type="llama").save(tmp_path / "harm.safetensors")  # fmt: skip
    ckpt_bytes = sum(p.stat().st_size for p in (tmp_path / "big").glob("*.safetensors"))

    small = tiny_model("llama", num_hidden_layers=1)
    small.save_pretrained(tmp_path / "warm")
    tiny_model("llama", seed=1, num_hidden_layers=1).save_pretrained(tmp_path / "warm_harm")

    heads = {"fr": [[layer, h] for layer in range(2) for h in range(8)]}  # every head: the largest edit
    env = {**os.environ, "PYTHONPATH": str(REPO), "SOTERIA_BACKEND": "eager"}
    argv = [tmp_path / "warm", tmp_path / "warm_harm", tmp_path / "warm_out", tmp_path / "big",
            tmp_path / "harm.safetensors", tmp_path / "out", json.dumps(heads)]  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, *map(str, argv)], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    growth = res["hwm"] - res["rss0"]
    # The base tensor and its harmful counterpart; fixed: the 4 MiB kernel block and allocator slack.
    bound = 2 * largest + (16 << 20)
    assert ckpt_bytes > 5 * bound, (ckpt_bytes, bound)
    assert growth < bound, f"peak RSS grew {growth / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB"
    # And the output is right: the blocked edit equals one whole-tensor kernel call, bit for bit.
    import soteria_kernels

    weight_map = json.loads((tmp_path / "big" / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.self_attn.o_proj.weight"
    with safe_open(tmp_path / "big" / weight_map[key], framework="pt") as f:
        want = f.get_tensor(key)
    with safe_open(tmp_path / "out" / weight_map[key], framework="pt") as f:
        got = f.get_tensor(key)
    hv = HarmVector.load(tmp_path / "harm.safetensors")
    soteria_kernels.masked_head_steer_(want, hv.tensor(1), list(range(8)), head_dim=256, scale=0.5)
    assert torch.equal(got, want)
