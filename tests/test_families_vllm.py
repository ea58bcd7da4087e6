"""Shortened (and healed) checkpoints of several families load in the real vLLM engine, and vLLM scores them as
transformers does: the served model is the measured model (slow)."""

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
HEALED = {"llama", "mistral", "qwen2", "qwen3", "phi3"}
"""Families whose checkpoints here are linear-healed (the others cannot take the folded maps: Gemma 2's norm after
the MLP, Qwen2-MoE's experts)."""
LOGPROB_TOLERANCE = 1e-4
"""Nats per token between vLLM's prompt log-probabilities and transformers' on the same checkpoint, both in
float32. The two sum in different orders (vLLM's CPU kernels vs PyTorch's): measured here at most 6e-6 (Gemma 2;
1e-6 for the others), so 1e-4 leaves a margin of 17; a removed layer misnumbered, a map left out or a mask
differing moves a log-probability by 0.1 or more."""


def heal(src: Path, out_dir: Path, removed: list[int]) -> Path:
    """A linear-healed checkpoint of ``src`` (maps fitted on random token sequences: 2,560 tokens, enough for
    the hidden size 576)."""
    import torch
    from transformers import AutoModelForCausalLM

    from shortgpt_serve.healing.linear import fit_linear
    from shortgpt_serve.healing.tensors import folded_tensors
    from shortgpt_serve.passes import Batch, PassEngine

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (4, 640), generator=torch.Generator().manual_seed(0))
    healing = fit_linear(PassEngine.of(model), [Batch(ids, torch.ones_like(ids))], removed, progress=False)
    source = resolve_model(str(src), out_dir.parent / "cache")
    return write_checkpoint(source, removed, out_dir, overrides=folded_tensors(src, "model.layers", healing.maps))


def transformers_logprobs(folder: Path, ids: list[int]) -> list[float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids))]


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
        if model_type in HEALED:
            out = heal(src, tmp_path / model_type, [1, 4])
        else:
            out = write_checkpoint(resolve_model(str(src), tmp_path / "cache"), [1, 4], tmp_path / model_type)
        folders.append(str(out))
    quantized = write_checkpoint(resolve_model(str(w8a8_model), tmp_path / "cache"), [1, 4], tmp_path / "w8a8")
    script = Path(__file__).with_name("vllm_families.py")
    proc = subprocess.run(
        [sys.executable, str(script), *folders, f"{quantized}=bfloat16"], capture_output=True, text=True, timeout=1200
    )
    results = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(folders) + 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    failed = {Path(r["path"]).name: r["error"] for r in results if not r["ok"]}
    assert not failed, failed
    assert all(r["tokens"] == 6 for r in results)
    from tests.vllm_families import PROMPT_IDS

    worst = {}
    for r in results[:-1]:  # the float32 ones: the W8A8 checkpoint runs int8 kernels transformers does not have
        want = transformers_logprobs(Path(r["path"]), PROMPT_IDS)
        got = r["prompt_logprobs"][1:]
        assert r["prompt_logprobs"][0] is None and len(got) == len(want)
        worst[Path(r["path"]).name] = max(abs(a - b) for a, b in zip(got, want, strict=True))
    print("largest |vLLM - transformers| prompt log-probability per family:", worst)
    assert all(w <= LOGPROB_TOLERANCE for w in worst.values()), worst
