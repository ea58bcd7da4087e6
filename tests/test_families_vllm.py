"""Shortened checkpoints of several families load and generate in the real vLLM engine (slow)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shortgpt_serve.checkpoint import write_checkpoint
from shortgpt_serve.models import resolve_model

# Shapes vLLM's CPU attention kernels accept (head_dim 64), still tiny.
VLLM_TINY = {
    "hidden_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "intermediate_size": 256,
    "head_dim": 64,
}
FAMILIES_ON_VLLM_CPU = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "qwen2_moe"]


@pytest.mark.slow
def test_shortened_families_load_in_vllm(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    folders = []
    for model_type in FAMILIES_ON_VLLM_CPU:
        extra = dict(VLLM_TINY)
        if model_type == "gemma2":
            extra["query_pre_attn_scalar"] = 64
        if model_type in ("qwen2_moe",):
            extra.update(moe_intermediate_size=128, shared_expert_intermediate_size=128)
        src = make_tiny_model(model_type, **extra)
        out = write_checkpoint(resolve_model(str(src), tmp_path / "cache"), [1, 4], tmp_path / model_type)
        folders.append(str(out))
    script = Path(__file__).with_name("vllm_families.py")
    proc = subprocess.run([sys.executable, str(script), *folders], capture_output=True, text=True, timeout=1200)
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(folders), proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = {Path(r["path"]).name: r["error"] for r in results if not r["ok"]}
    assert not failed, failed
    assert all(r["tokens"] == 6 for r in results)
