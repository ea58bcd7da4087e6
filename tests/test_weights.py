"""Safetensors primitives: shard maps, headers (damaged files refused), layer counts and byte-range copies."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from shortgpt_serve.errors import ModelError
from shortgpt_serve.fsutil import sha256_file
from shortgpt_serve.models.weights import (
    INDEX_NAME,
    check_layer_count,
    check_readable,
    copy_tensors,
    layer_of,
    layer_pattern,
    params_by_layer,
    read_header,
    tensor_shapes,
    weight_map,
)

TENSORS = {
    "model.embed_tokens.weight": torch.arange(12, dtype=torch.float32).reshape(4, 3),
    "model.layers.0.mlp.weight": torch.full((2, 3), 1.5),
    "model.layers.1.mlp.weight": torch.arange(6, dtype=torch.int32).reshape(3, 2),
    "model.layers.1.norm.weight": torch.ones(3, dtype=torch.bfloat16),
}


@pytest.fixture
def shard(tmp_path: Path) -> Path:
    path = tmp_path / "model" / "model.safetensors"
    path.parent.mkdir()
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def test_read_header_gives_every_tensor_and_where_data_starts(shard: Path) -> None:
    header, data_start = read_header(shard)
    assert header["__metadata__"] == {"format": "pt"}
    assert set(header) - {"__metadata__"} == set(TENSORS)
    assert header["model.layers.1.mlp.weight"]["dtype"] == "I32"
    assert header["model.layers.1.mlp.weight"]["shape"] == [3, 2]
    (header_len,) = struct.unpack("<Q", shard.read_bytes()[:8])
    assert data_start == 8 + header_len
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert data_start + end == shard.stat().st_size


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda raw: raw[:5], id="shorter than the length field"),
        pytest.param(lambda raw: raw[:20], id="cut inside the header"),
        pytest.param(lambda raw: struct.pack("<Q", 1 << 62) + raw[8:], id="absurd header length"),
        pytest.param(lambda raw: struct.pack("<Q", 4) + b"[1] " + raw[12:], id="header not an object"),
        pytest.param(lambda raw: raw[:8] + b"\xff" * (len(raw) - 8), id="header not JSON"),
    ],
)
def test_damaged_headers_are_refused_by_both_readers(shard: Path, damage: Callable[[bytes], bytes]) -> None:
    shard.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        read_header(shard)
    with pytest.raises(ModelError, match="is not a readable safetensors file"):
        check_readable(shard.parent, {"x": shard.name})


@pytest.mark.parametrize("change", [lambda raw: raw[:-4], lambda raw: raw + b"\0" * 8], ids=["truncated", "padded"])
def test_check_readable_refuses_data_of_the_wrong_length(shard: Path, change: Callable[[bytes], bytes]) -> None:
    check_readable(shard.parent, weight_map(shard.parent))  # intact: passes
    size = shard.stat().st_size
    shard.write_bytes(change(shard.read_bytes()))
    with pytest.raises(ModelError, match=rf"is {shard.stat().st_size} bytes but its header describes {size}"):
        check_readable(shard.parent, {"x": shard.name})


def test_weight_map_single_shard_and_index(shard: Path) -> None:
    folder = shard.parent
    assert weight_map(folder) == dict.fromkeys(TENSORS, "model.safetensors")
    assert tensor_shapes(folder) == {name: tuple(t.shape) for name, t in TENSORS.items()}
    index = {"metadata": {}, "weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}
    (folder / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelError, match="names missing shard"):
        weight_map(folder)
    (folder / INDEX_NAME).write_text("{}")
    with pytest.raises(ModelError, match="is not a valid safetensors index"):
        weight_map(folder)


def test_weight_map_needs_an_index_for_several_shards(shard: Path) -> None:
    save_file({"x": torch.zeros(1)}, str(shard.parent / "other.safetensors"))
    with pytest.raises(ModelError, match=r"has 2 safetensors files and no model\.safetensors\.index\.json"):
        weight_map(shard.parent)


def test_layer_pattern_and_parameter_counts() -> None:
    pattern = layer_pattern("model.layers")
    assert layer_of("model.layers.12.self_attn.q_proj.weight", pattern) == 12
    assert layer_of("model.layersX.1.w", pattern) is None and layer_of("lm_head.weight", pattern) is None
    shapes = {name: tuple(t.shape) for name, t in TENSORS.items()}
    assert params_by_layer(shapes, "model.layers", 2) == ([6, 9], 12)
    with pytest.raises(ModelError, match=r"belongs to layer 1, but config\.json says num_hidden_layers=1"):
        params_by_layer(shapes, "model.layers", 1)


def test_check_layer_count() -> None:
    check_layer_count(list(TENSORS), "model.layers", 2, "m")
    with pytest.raises(ModelError, match=r"num_hidden_layers=3 but the weights hold layers 0\.\.1 \(2 of them\)"):
        check_layer_count(list(TENSORS), "model.layers", 3, "m")


@pytest.mark.parametrize("chunk", [1 << 24, 5], ids=["one block", "small blocks"])
def test_copy_tensors_renames_and_hashes_what_it_writes(shard: Path, tmp_path: Path, chunk: int) -> None:
    renames = [("model.layers.1.mlp.weight", "model.layers.0.mlp.weight"), ("model.embed_tokens.weight", "emb")]
    dst = tmp_path / "out.safetensors"
    written, sha = copy_tensors(shard, renames, dst, metadata={"format": "pt"}, chunk=chunk)
    assert sha == sha256_file(dst)
    out = load_file(str(dst))
    assert set(out) == {"model.layers.0.mlp.weight", "emb"}
    assert torch.equal(out["model.layers.0.mlp.weight"], TENSORS["model.layers.1.mlp.weight"])
    assert torch.equal(out["emb"], TENSORS["model.embed_tokens.weight"])
    assert written == 6 * 4 + 12 * 4
    header, data_start = read_header(dst)
    assert data_start % 8 == 0 and header["__metadata__"] == {"format": "pt"}


def test_copy_tensors_refuses_a_truncated_source(shard: Path, tmp_path: Path) -> None:
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ModelError, match="ends early"):
        copy_tensors(shard, [(name, name) for name in TENSORS], tmp_path / "out.safetensors")


def test_tensor_infos_read_dtypes_and_shapes_from_headers(shard: Path) -> None:
    from shortgpt_serve.models.weights import tensor_infos

    dtypes = {torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16"}
    assert tensor_infos(shard.parent) == {name: (dtypes[t.dtype], tuple(t.shape)) for name, t in TENSORS.items()}
    counts = {name: t.numel() for name, t in TENSORS.items()}
    assert params_by_layer(counts, "model.layers", 2) == params_by_layer(tensor_shapes(shard.parent), "model.layers", 2)


def test_sha256_file_and_map_threads(tmp_path: Path) -> None:
    import hashlib

    from shortgpt_serve.fsutil import map_threads

    files = []
    for k, size in enumerate([0, 5, (1 << 22) + 3]):
        f = tmp_path / f"f{k}"
        f.write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
        files.append(f)
    expected = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    assert map_threads(sha256_file, files, 3) == map_threads(sha256_file, files, 1) == expected

    def fail_on_empty(path: Path) -> str:
        if path.stat().st_size == 0:
            raise ModelError(f"{path.name} is empty")
        return sha256_file(path)

    with pytest.raises(ModelError, match="f0 is empty"):
        map_threads(fail_on_empty, files, 3)


def test_copy_tensors_raises_what_the_hashing_thread_hit(
    shard: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortgpt_serve.models import weights

    def unmap_fails(*args: object) -> None:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(weights, "_drop_pages", unmap_fails)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        copy_tensors(shard, [(name, name) for name in TENSORS], tmp_path / "out.safetensors")
