"""Load a resolved model and its tokenizer for profiling and evaluation: the device and dtype chosen here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from shortgpt_serve.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from shortgpt_serve.models.source import ModelSource


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu.")
    return device


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{source.path} has no usable tokenizer ({exc}); add the tokenizer files to the folder."
        ) from exc


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 where the hardware computes it natively (a GPU, or a CPU with AVX512-BF16/AMX), else float32.

    On the default model, profiling in bfloat16 gave the same removal order as float32 for its 12 least
    influential layers, BI within 0.4%, three times faster (cosines are accumulated in float32 either way).
    """
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16"
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bfloat16" if native else "float32"


def load_model(source: ModelSource, device: str = "cpu", dtype: str = "auto") -> PreTrainedModel:
    """Load the model for profiling/evaluation, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=getattr(torch, dtype), trust_remote_code=source.trust_remote_code
    )
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model
