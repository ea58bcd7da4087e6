from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shortgpt_serve.checkpoint import (
    read_provenance,
    rename_map,
    verify_checkpoint,
    write_checkpoint,
)
from shortgpt_serve.errors import CheckpointError, ModelError
from shortgpt_serve.models.families import FAMILIES
from shortgpt_serve.models.layers import remove_layers_in_memory
from shortgpt_serve.models.source import resolve_model
from shortgpt_serve.models.weights import weight_map
from shortgpt_serve.provenance import CalibrationRecord, build_provenance


def all_keys(folder: Path) -> list[str]:
    keys = []
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            keys.extend(h.keys())
    return keys


def logits(model, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_written_checkpoint_matches_in_memory_removal(
    model_type: str, make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    src = make_tiny_model(model_type)
    source = resolve_model(str(src), tmp_path / "cache")
    removed = [1, 4, 2]
    out = write_checkpoint(source, removed, tmp_path / "short")

    short = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    remove_layers_in_memory(reference, FAMILIES[model_type], removed)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    got, want = logits(short, ids), logits(reference, ids)
    assert torch.equal(got, want)
    # And it is not the full model: removing layers changed the output.
    full = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    assert not torch.allclose(logits(full, ids), got)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    for key in ("layer_types",):
        if key in cfg:
            assert len(cfg[key]) == 3
    AutoConfig.from_pretrained(out)  # the library's own validation accepts it
    layer_ids = {int(k.split(".")[2]) for k in all_keys(out) if k.startswith("model.layers.")}
    assert layer_ids == {0, 1, 2}
    gone = {f"model.layers.{i}." for i in removed}
    assert len(all_keys(out)) == len([k for k in all_keys(src) if not any(k.startswith(g) for g in gone)])


def test_qwen2_sliding_window_layers_follow_their_layers(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = make_tiny_model("qwen2")
    source = resolve_model(str(src), tmp_path / "cache")
    before = source.config["layer_types"]
    assert "sliding_attention" in before and "full_attention" in before
    out = write_checkpoint(source, [0, 4], tmp_path / "short")
    after = json.loads((out / "config.json").read_text())
    assert after["layer_types"] == [before[i] for i in (1, 2, 3, 5)]
    assert after["max_window_layers"] == 2  # layers 1 and 2 were below the original max_window_layers=3


def test_sharded_input_gives_renumbered_sharded_output(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = make_tiny_model("llama", max_shard_size=60_000)
    assert (src / "model.safetensors.index.json").is_file()
    source = resolve_model(str(src), tmp_path / "cache")
    out = write_checkpoint(source, [2, 3], tmp_path / "short")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    mapping = weight_map(out)
    assert set(mapping) == set(all_keys(out)) == set(index["weight_map"])
    assert {int(k.split(".")[2]) for k in mapping if k.startswith("model.layers.")} == {0, 1, 2, 3}
    # No stale shard: every file is in the index.
    assert {f.name for f in out.glob("*.safetensors")} == set(mapping.values())


def test_provenance_side_files_and_verify(tiny_llama: Path, tmp_path: Path) -> None:
    source = resolve_model(str(tiny_llama), tmp_path / "cache")
    built = dataclasses.replace(build_provenance(source, [5]), calibration=CalibrationRecord(source="test"))
    out = write_checkpoint(source, [5], tmp_path / "short", provenance=built)
    record = verify_checkpoint(out)
    assert record.removed_layers == (5,)
    assert record.kept_layers == (0, 1, 2, 3, 4)
    assert record.source.sha256 == source.sha256
    assert record.calibration == CalibrationRecord(source="test")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "README.md"):
        assert (out / name).is_file(), name
        assert name in record.files
    assert "shortened to 5 of 6 layers" in (out / "README.md").read_text()
    with open(out / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(CheckpointError, match="does not match its recorded sha256"):
        verify_checkpoint(out)


@pytest.mark.parametrize(
    ("removed", "message"),
    [
        ([1, 1], "listed more than once"),
        ([6], "do not exist"),
        ([-1], "do not exist"),
        ([0, 1, 2, 3, 4, 5], "cannot remove all 6 layers"),
    ],
)
def test_bad_removals_write_nothing(tiny_llama: Path, tmp_path: Path, removed: list[int], message: str) -> None:
    source = resolve_model(str(tiny_llama), tmp_path / "cache")
    with pytest.raises(CheckpointError, match=message):
        write_checkpoint(source, removed, tmp_path / "out" / "short")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_existing_output_is_kept_unless_overwrite(tiny_llama: Path, tmp_path: Path) -> None:
    source = resolve_model(str(tiny_llama), tmp_path / "cache")
    out = tmp_path / "short"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(source, [1], out)
    assert (out / "mine.txt").read_text() == "keep me"
    write_checkpoint(source, [1], out, overwrite=True)
    assert not (out / "mine.txt").exists()
    assert verify_checkpoint(out).removed_layers == (1,)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_mid_write_leaves_nothing(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from shortgpt_serve import checkpoint

    source = resolve_model(str(tiny_llama), tmp_path / "cache")

    def disk_full(src: Path, renames: list, dst: Path, *args: object, **kwargs: object) -> int:
        dst.write_bytes(b"partial")  # the device fills up part-way through the shard
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "copy_tensors", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        write_checkpoint(source, [1], tmp_path / "out" / "short")
    assert list((tmp_path / "out").iterdir()) == []


def test_streamed_shards_are_byte_identical_tensors(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """The streaming copy writes valid safetensors whose tensors equal the source's, bit for bit."""
    src = make_tiny_model("llama", max_shard_size=60_000)
    source = resolve_model(str(src), tmp_path / "cache")
    out = write_checkpoint(source, [0, 5], tmp_path / "short")
    renamed = {f"model.layers.{new}.": f"model.layers.{old}." for new, old in enumerate([1, 2, 3, 4])}
    src_map, out_map = weight_map(src), weight_map(out)
    for name, file in out_map.items():
        old = name
        for new_prefix, old_prefix in renamed.items():
            if name.startswith(new_prefix):
                old = old_prefix + name[len(new_prefix) :]
        with safe_open(out / file, framework="pt") as a, safe_open(src / src_map[old], framework="pt") as b:
            assert torch.equal(a.get_tensor(name), b.get_tensor(old)), name


def test_rename_map_rejects_layers_beyond_config() -> None:
    names = ["model.layers.0.mlp.weight", "model.layers.7.mlp.weight", "lm_head.weight"]
    with pytest.raises(CheckpointError, match="config and the weights disagree"):
        rename_map(names, "model.layers", 2, [])
    ok = rename_map(names[:1] + names[2:], "model.layers", 2, [0])
    assert ok == {"model.layers.0.mlp.weight": None, "lm_head.weight": "lm_head.weight"}


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_moe_sparse_pattern_survives_renumbering(
    model_type: str, make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    from shortgpt_serve.models.families import sparse_layers

    src = make_tiny_model(model_type)
    source = resolve_model(str(src), tmp_path / "cache")
    before = sparse_layers(source.config)
    assert any(before) and not all(before)  # decoder_sparse_step=2 with mlp_only_layers=[3]: a real mix
    removed = [0, 3]
    out = write_checkpoint(source, removed, tmp_path / "short")
    after = sparse_layers(json.loads((out / "config.json").read_text()))
    assert after == [before[i] for i in range(6) if i not in removed]


def test_gemma3_implicit_layer_types_are_written_explicitly(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    """An older config gives only sliding_window_pattern; renumbering would move the full-attention layers."""
    import shutil

    src = make_tiny_model("gemma3_text")
    implicit = tmp_path / "implicit"
    shutil.copytree(src, implicit)
    cfg = json.loads((implicit / "config.json").read_text())
    expected = cfg.pop("layer_types")
    cfg["sliding_window_pattern"] = 3
    (implicit / "config.json").write_text(json.dumps(cfg))
    assert expected == ["sliding_attention", "sliding_attention", "full_attention"] * 2
    source = resolve_model(str(implicit), tmp_path / "cache")
    out = write_checkpoint(source, [1, 2], tmp_path / "short")
    written = json.loads((out / "config.json").read_text())
    assert written["layer_types"] == [expected[i] for i in (0, 3, 4, 5)]


def test_quantization_config_module_names_are_renumbered() -> None:
    from shortgpt_serve.models.families import shortened_config

    config = {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "ignore": ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.3.self_attn.o_proj", "re:.*gate$"],
            "modules_to_not_convert": ["model.layers.0"],
        },
    }
    q = shortened_config(config, [1, 2])["quantization_config"]
    assert q["ignore"] == ["lm_head", "model.layers.1.self_attn.o_proj", "re:.*gate$"]
    assert q["modules_to_not_convert"] == ["model.layers.0"]
    config["quantization_config"]["ignore"] = ["re:model.layers.3.*"]
    with pytest.raises(ModelError, match="regex naming layers by number"):
        shortened_config(config, [1])


def test_shards_written_in_parallel_equal_one_at_a_time(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from shortgpt_serve.checkpoint import _write_weights
    from shortgpt_serve.fsutil import sha256_file

    source = resolve_model(str(make_tiny_model("llama", max_shard_size=60_000)), tmp_path / "cache")
    outputs = {}
    for threads in (1, 4):
        out = tmp_path / f"threads-{threads}"
        out.mkdir()
        hashes = _write_weights(source, [2, 3], out, threads=threads)
        assert len(hashes) > 2  # several shards, so several at once
        assert hashes == {name: sha256_file(out / name) for name in hashes}
        outputs[threads] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert outputs[1] == outputs[4]


def test_a_shard_failing_among_parallel_ones_leaves_nothing(
    make_tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortgpt_serve import checkpoint

    source = resolve_model(str(make_tiny_model("llama", max_shard_size=60_000)), tmp_path / "cache")
    real_copy = checkpoint.copy_tensors

    def third_disk_full(src: Path, renames: list, dst: Path, *args: object, **kwargs: object) -> tuple[int, str]:
        if dst.name.startswith("model-00003-"):  # the device fills up part-way through this shard
            dst.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(src, renames, dst, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "copy_tensors", third_disk_full)
    with pytest.raises(CheckpointError, match="No space left on device"):
        write_checkpoint(source, [2], tmp_path / "out" / "short")
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("threads", [1, 4])
def test_verify_finds_a_damaged_shard_in_parallel(
    make_tiny_model: Callable[..., Path], tmp_path: Path, threads: int
) -> None:
    source = resolve_model(str(make_tiny_model("llama", max_shard_size=60_000)), tmp_path / "cache")
    out = write_checkpoint(source, [1], tmp_path / "short")
    assert verify_checkpoint(out, threads=threads).removed_layers == (1,)
    shard = sorted(out.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\1\2\3\4")
    with pytest.raises(CheckpointError, match=rf"{shard.name} does not match its recorded sha256"):
        verify_checkpoint(out, threads=threads)


def test_unchanged_shards_are_copied_whole_with_the_memo_hash(
    make_tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shortgpt_serve.cache import FileHashes, hashes

    monkeypatch.setattr(hashes, "RACY_NS", 0)  # the shards were written just now; trust the memo at once
    source = resolve_model(str(make_tiny_model("llama", max_shard_size=60_000)), tmp_path / "cache")
    memo = FileHashes(tmp_path / "cache")
    sources = {memo.sha256(f): f.read_bytes() for f in sorted(source.path.glob("*.safetensors"))}
    plain = write_checkpoint(source, [source.num_layers - 1], tmp_path / "plain")
    out = write_checkpoint(source, [source.num_layers - 1], tmp_path / "short", known=memo.known)

    record = verify_checkpoint(out)  # every recorded sha256 is the file's own
    shards = sorted(out.glob("*.safetensors"))
    verbatim = [f for f in shards if f.read_bytes() == sources.get(record.files[f.name])]
    assert 0 < len(verbatim) < len(shards)  # the shards before the removed layer, and only those
    for f in shards:
        with safe_open(f, framework="pt") as a, safe_open(plain / f.name, framework="pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is not iterable)


def test_a_memo_hash_is_used_only_while_the_source_is_unchanged(
    make_tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    from shortgpt_serve.fsutil import sha256_file

    source = resolve_model(str(make_tiny_model("llama", max_shard_size=60_000)), tmp_path / "cache")
    first = sorted(source.path.glob("*.safetensors"))[0]
    recorded = "0" * 64  # what the memo says: not the file's hash, so a written digest shows where it came from
    out = write_checkpoint(source, [source.num_layers - 1], tmp_path / "trusted", known=lambda p: recorded)
    assert recorded in read_provenance(out).files.values()  # an unchanged shard's digest was not recomputed

    answers = iter([recorded, None] + [None] * 100)  # the memo no longer holds it after the copy: it changed
    out = write_checkpoint(source, [source.num_layers - 1], tmp_path / "changed", known=lambda p: next(answers))
    assert recorded not in read_provenance(out).files.values()
    assert verify_checkpoint(out).files  # hashed from the bytes written instead
    assert sha256_file(first) != recorded
