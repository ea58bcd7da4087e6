"""Models in: pickle weights only when allowed (converted once, same logits), model code only when trusted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.convert import SOURCE_RECORD
from shortgpt_serve.models.loading import load_model
from shortgpt_serve.models.source import resolve_model
from tests.conftest import save_tiny_llama


def test_pickle_weights_refused_by_default_and_converted_once_when_allowed(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    src = save_tiny_llama(tmp_path / "pickled", pickle_weights=True)
    assert [f.name for f in src.glob("*.bin")] == ["pytorch_model.bin"] and not list(src.glob("*.safetensors"))
    cache = tmp_path / "cache"
    untouched = sorted((f.name, f.stat().st_mtime_ns) for f in src.iterdir())
    with pytest.raises(ModelError, match=r"only pickle weights.*pass --allow-pickle-weights"):
        resolve_model(str(src), cache)
    assert not cache.exists()

    source = resolve_model(str(src), cache, allow_pickle_weights=True)
    assert source.path.parent == cache / "models"
    assert (source.path / "model.safetensors").is_file() and not list(source.path.glob("*.bin"))
    assert (source.path / "tokenizer.json").is_file()
    assert source.origin == str(src.resolve()) and source.num_layers == 6
    assert json.loads((source.path / SOURCE_RECORD).read_text())["sha256"] == source.sha256
    assert sorted((f.name, f.stat().st_mtime_ns) for f in src.iterdir()) == untouched  # read, never changed
    assert sorted(p.name for p in (cache / "models").iterdir()) == [source.path.name]  # no temp folder left

    ids = torch.tensor([[1, 5, 9, 42, 7, 100]])
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()(ids).logits
        converted = load_model(source, "cpu", "float32")(ids).logits
    assert torch.equal(converted, reference)

    stamp = (source.path / "model.safetensors").stat().st_mtime_ns
    again = resolve_model(str(src), cache, allow_pickle_weights=True)
    assert again.path == source.path and again.sha256 == source.sha256
    assert (again.path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again


def test_safetensors_preferred_when_both_are_present(tiny_llama: Path, tmp_path: Path) -> None:
    src = tmp_path / "both"
    shutil.copytree(tiny_llama, src)
    (src / "pytorch_model.bin").write_bytes(b"never read")
    source = resolve_model(str(src), tmp_path / "cache", allow_pickle_weights=True)
    assert source.path == src.resolve()
    assert not (tmp_path / "cache" / "models").exists()  # nothing converted


def with_auto_map(tiny_llama: Path, folder: Path) -> Path:
    shutil.copytree(tiny_llama, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_model_code_refused_unless_trusted(tiny_llama: Path, tmp_path: Path) -> None:
    src = with_auto_map(tiny_llama, tmp_path / "custom")
    with pytest.raises(ModelError, match=r"ships its own code \('auto_map' in config.json\).*--trust-remote-code"):
        resolve_model(str(src), tmp_path / "cache")
    trusted = resolve_model(str(src), tmp_path / "cache", trust_remote_code=True)
    assert trusted.trust_remote_code is True
    assert resolve_model(str(tiny_llama), tmp_path / "cache").trust_remote_code is False
