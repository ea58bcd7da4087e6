"""Shortened checkpoints of several families load and generate in the real vLLM engine (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shortgpt_serve.checkpoint import write_checkpoint
from shortgpt_serve.models.source import resolve_model
from tests.conftest import VLLM_TINY

FAMILIES_ON_VLLM_CPU = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "qwen2_moe"]


@pytest.mark.slow
def test_shortened_families_load_in_vllm(
    make_tiny_model: Callable[..., Path], w8a8_model: Path, tmp_path: Path
) -> None:
    """One engine process loads each shortened family in turn, and a shortened W8A8 (int8) checkpoint."""
    folders = []
    for model_type in FAMILIES_ON_VLLM_CPU:
        extra = dict(VLLM_TINY)
        if model_type == "qwen2":
            # vLLM refuses Qwen2 with sliding window on some layers only ("not supported"), shortened or not;
            # released Qwen2 checkpoints ship use_sliding_window: false.
            extra["use_sliding_window"] = False
        if model_type == "gemma2":
            extra["query_pre_attn_scalar"] = 64
        if model_type in ("qwen2_moe",):
            extra.update(moe_intermediate_size=576, shared_expert_intermediate_size=576, num_experts=4)
        src = make_tiny_model(model_type, **extra)
        out = write_checkpoint(resolve_model(str(src), tmp_path / "cache"), [1, 4], tmp_path / model_type)
        folders.append(str(out))
    quantized = write_checkpoint(resolve_model(str(w8a8_model), tmp_path / "cache"), [1, 4], tmp_path / "w8a8")
    folders.append(str(quantized))
    script = Path(__file__).with_name("vllm_families.py")
    proc = subprocess.run([sys.executable, str(script), *folders], capture_output=True, text=True, timeout=1200)
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(folders), proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = {Path(r["path"]).name: r["error"] for r in results if not r["ok"]}
    assert not failed, failed
    assert all(r["tokens"] == 6 for r in results)
