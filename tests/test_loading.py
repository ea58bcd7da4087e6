"""Loading a resolved model: device and dtype chosen as documented, and trust_remote_code always passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shortgpt_serve.errors import ModelError
from shortgpt_serve.models.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
from shortgpt_serve.models.source import resolve_model


def test_resolve_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match=r"--device cuda:1 asked for, but no CUDA GPU is visible"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cuda:1") == "cuda:1"


@pytest.mark.parametrize(
    ("dtype", "device", "avx512_bf16", "amx", "expected"),
    [
        ("float16", "cpu", True, True, "float16"),
        ("auto", "cuda:0", False, False, "bfloat16"),
        ("auto", "cpu", True, False, "bfloat16"),
        ("auto", "cpu", False, True, "bfloat16"),
        ("auto", "cpu", False, False, "float32"),
    ],
)
def test_resolve_dtype(
    monkeypatch: pytest.MonkeyPatch, dtype: str, device: str, avx512_bf16: bool, amx: bool, expected: str
) -> None:
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_dtype(dtype, device) == expected


def test_load_model_is_in_eval_mode_with_the_dtype_asked(tiny_llama: Path, tmp_path: Path) -> None:
    import torch

    model = load_model(resolve_model(str(tiny_llama), tmp_path / "cache"), "cpu", "bfloat16")
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16


def test_every_load_passes_trust_remote_code(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers is never left to decide: each config, tokenizer and model load says trust_remote_code."""
    import dataclasses

    import transformers

    calls: list[tuple[str, Any]] = []

    def recording(cls: Any) -> Any:
        original = cls.from_pretrained.__func__

        def from_pretrained(klass: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((cls.__name__, kwargs.get("trust_remote_code", "missing")))
            return original(klass, *args, **{**kwargs, "trust_remote_code": False})

        return classmethod(from_pretrained)

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", recording(cls))
    source = resolve_model(str(tiny_llama), tmp_path / "cache")
    load_tokenizer(source)
    load_model(source, "cpu", "float32")
    trusted = dataclasses.replace(source, trust_remote_code=True)
    load_tokenizer(trusted)
    load_model(trusted, "cpu", "float32")
    assert calls == [
        ("AutoTokenizer", False),
        ("AutoModelForCausalLM", False),
        ("AutoTokenizer", True),
        ("AutoModelForCausalLM", True),
    ]
