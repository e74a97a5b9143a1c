"""soteria.io: the safetensors layer, checkpoint folders and Hub ids."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from soteria.io.checkpoint import checkpoint_shards, find_key, key_candidates
from soteria.io.hub import hub_repo_id, looks_like_repo_id
from soteria.io.safetensors import (
    add_metadata,
    encode_header,
    read_safetensors,
    read_tensor,
    save_tensors,
    write_safetensors,
)


def test_header_roundtrip_and_corrupt_files(tmp_path):
    t = {"b": torch.randn(3, 5), "a": torch.randn(4).to(torch.bfloat16), "c": torch.arange(3)}
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt"})
    sf = read_safetensors(tmp_path / "x.safetensors")
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert encode_header(sf.header) == raw[: sf.data_start]  # same bytes as the library writes
    add_metadata(tmp_path / "x.safetensors", {"soteria_config": '{"é": 1}'})
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt", "soteria_config": '{"é": 1}'}
        assert all(torch.equal(f.get_tensor(k), v) for k, v in t.items())
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than 8 bytes"):
        read_safetensors(tmp_path / "short.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(raw[:-4])
    with pytest.raises(ValueError, match="data section"):
        read_safetensors(tmp_path / "cut.safetensors")
    bad = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(bad)) + bad + b"\0" * 4)
    with pytest.raises(ValueError, match="inconsistent"):
        read_safetensors(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_read_tensor_equals_the_library_and_finds_nan(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    t = {"w": torch.randn(7, 13, generator=g).to(dtype), "i": torch.arange(5), "v": torch.randn(3, generator=g)}
    path = save_tensors(t, tmp_path / "t.safetensors", {"k": "v"})
    assert read_safetensors(path).metadata == {"k": "v"}
    assert torch.equal(read_tensor(path, "w"), t["w"]) and read_tensor(path, "w").dtype == dtype
    with pytest.raises(ValueError, match="not a float type"):
        read_tensor(path, "i")
    with pytest.raises(ValueError, match="has no tensor 'x'"):
        read_tensor(path, "x")
    bad = t["w"].clone()
    bad[4, 2] = float("nan")
    save_tensors({"w": bad}, tmp_path / "nan.safetensors", {})
    with pytest.raises(ValueError, match=r"1 NaN/Inf values \(first at index \(4, 2\)"):
        read_tensor(tmp_path / "nan.safetensors", "w")


def test_checkpoint_shards_and_keys(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="PEFT adapter"):
        checkpoint_shards(tmp_path / "adapter")
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"model.layers.0.o.weight": torch.zeros(2, 2)}, folder / "a.safetensors")
    save_file({"model.layers.1.o.weight": torch.ones(2, 2)}, folder / "b.safetensors")
    wm = {"model.layers.0.o.weight": "a.safetensors", "model.layers.1.o.weight": "b.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    weight_map, shards = checkpoint_shards(folder)
    assert weight_map == wm and set(shards) == {"a.safetensors", "b.safetensors"}
    assert set(checkpoint_shards(folder, only=["model.layers.1.o.weight"])[1]) == {"b.safetensors"}
    assert key_candidates("model.layers.1.o.weight", "model") == ["model.layers.1.o.weight", "layers.1.o.weight"]
    assert find_key("layers.1.o.weight", 1, "model", weight_map) == "model.layers.1.o.weight"
    assert find_key("base.model.layers.0.o.weight", 0, "", weight_map) == "model.layers.0.o.weight"
    assert find_key("model.layers.2.o.weight", 2, "model", weight_map) is None


def test_repo_ids(tmp_path):
    assert looks_like_repo_id("gpt2") and looks_like_repo_id("org/model-1.5B")
    assert not looks_like_repo_id("gpt2", namespaced=True)
    for bad in ("/abs/path", "a/b/c", "../x", "has space/x", "", None, ".hidden/x"):
        assert not looks_like_repo_id(bad), bad
    assert hub_repo_id("org/model") == "org/model"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "model").mkdir()
    assert hub_repo_id(str(tmp_path / "org" / "model")) is None


def _raw_file(path, header: dict, data_len: int):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)
    return path


OK = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
MALFORMED = [
    ({"data_offsets": [8, 16], "dtype": "F32"}, 16, "without shape"),  # was a KeyError in the sort
    ({"dtype": "F32", "shape": [2], "data_offsets": None}, 16, "data_offsets None"),  # was a TypeError
    ([1, 2], 8, "expected an object"),  # was a TypeError
    ({"dtype": ["F32"], "shape": [2], "data_offsets": [8, 16]}, 16, "unknown dtype"),  # unhashable dtype
    ({"dtype": 7, "shape": [2], "data_offsets": [8, 16]}, 16, "unknown dtype"),
    ({"dtype": "F32", "shape": [0, -3], "data_offsets": [8, 8]}, 8, "shape"),  # 0 * -3 bytes: was accepted
    ({"dtype": "F32", "shape": [True, 2], "data_offsets": [8, 16]}, 16, "shape"),  # bool as 1: was accepted
    ({"dtype": "F32", "shape": "2", "data_offsets": [8, 16]}, 16, "shape"),  # string shape: was accepted
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [8, 16]}, 16, "shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8.0, 16.0]}, 16, "data_offsets"),  # floats: were accepted
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, False]}, 8, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 16, 24]}, 24, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [16, 8]}, 16, "data_offsets"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}, 8, "data_offsets"),
]


@pytest.mark.parametrize("entry, data_len, match", MALFORMED)
def test_malformed_header_entries_raise_value_error_naming_the_tensor(tmp_path, entry, data_len, match):
    path = _raw_file(tmp_path / "m.safetensors", {"ok": OK, "bad.weight": entry}, data_len)
    with pytest.raises(ValueError, match=f"tensor 'bad.weight'.*{match}"):
        read_safetensors(path)


def test_well_formed_crafted_header_is_accepted(tmp_path):
    path = _raw_file(
        tmp_path / "g.safetensors", {"ok": OK, "z": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [8, 8]}}, 8
    )
    assert [name for name, _ in read_safetensors(path).tensors()] == ["ok", "z"]


def test_unchanged_bytes_are_copied_in_the_kernel_in_few_coalesced_ranges(tmp_path, monkeypatch):
    """write_safetensors copies every run of untouched tensors with one copy_file_range range (not
    one call per tensor, not through Python buffers) and rewrites only the edited tensors."""
    tensors = {f"t{i:02d}": torch.randn(64, 3) for i in range(40)}
    save_file(tensors, tmp_path / "src.safetensors")
    src = read_safetensors(tmp_path / "src.safetensors")
    calls, real = [], os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    monkeypatch.setattr(os, "pread", lambda *a: pytest.fail("bulk bytes went through os.pread"))
    edits = {"t10": lambda w: w.mul_(2), "t11": lambda w: w.mul_(2), "t30": lambda w: w.neg_()}
    write_safetensors(src, tmp_path / "dst.safetensors", edits=edits)
    item = 64 * 3 * 4
    assert calls == [10 * item, 18 * item, 9 * item]  # t00-t09, t12-t29, t31-t39
    with safe_open(tmp_path / "dst.safetensors", framework="pt") as f:
        for name, t in tensors.items():
            want = t * 2 if name in ("t10", "t11") else -t if name == "t30" else t
            assert torch.equal(f.get_tensor(name), want), name
