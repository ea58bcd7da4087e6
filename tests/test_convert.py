"""Conversion into the cache: what identifies a source folder (the GGUF and pickle paths run in test_models)."""

from __future__ import annotations

from pathlib import Path

from shortgpt_serve.models.convert import folder_hash


def test_folder_hash_covers_config_and_weights_by_name_and_content(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "a.safetensors").write_bytes(b"one")
    (tmp_path / "tokenizer.json").write_text("not part of the hash")
    base = folder_hash(tmp_path)
    (tmp_path / "tokenizer.json").write_text("changed")
    assert folder_hash(tmp_path) == base
    (tmp_path / "a.safetensors").write_bytes(b"two")
    changed = folder_hash(tmp_path)
    assert changed != base
    (tmp_path / "a.safetensors").rename(tmp_path / "b.safetensors")
    assert folder_hash(tmp_path) != changed  # same bytes under another name
    (tmp_path / "p.bin").write_bytes(b"x")
    assert folder_hash(tmp_path, "*.bin") != folder_hash(tmp_path)
    assert folder_hash(tmp_path, hasher=lambda p: "0") != folder_hash(tmp_path)  # the given hasher is used
