"""The RoPE-base bound on the usable context (Men et al. 2024) and the launcher's check of the served length."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from shortgpt_serve.models.rope import context_record, first_negative, paper_least_base, rope_bound
from shortgpt_serve.serving.context import max_model_len, parse_length, served_context
from shortgpt_serve.serving.metrics import LauncherMetrics


def llama(theta: float, head_dim: int = 128, scaling: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    config = {
        "model_type": "llama",
        "hidden_size": 32 * head_dim,
        "num_attention_heads": 32,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rope_theta": theta,
        **extra,
    }
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def b(m: int, base: float, dim: int) -> float:
    """B(m) as the paper writes it, term by term."""
    return sum(math.cos(m * base ** (-2 * i / dim)) for i in range(dim // 2))


def test_the_papers_figure_base_10000_head_dim_128_bounds_at_about_1_7k_tokens() -> None:
    bound = rope_bound(llama(10_000.0))
    assert bound is not None and bound.rope_type == "default" and bound.rotary_dims == 128
    assert bound.bound is not None and 1600 <= bound.bound <= 1800
    # The first negative B(m), checked against the sum written out.
    assert all(b(m, 10_000.0, 128) >= 0 for m in range(bound.bound - 50, bound.bound + 1))
    assert b(bound.bound + 1, 10_000.0, 128) < 0
    assert bound.covers(bound.bound + 1) and not bound.covers(bound.bound + 2)


def test_the_bound_grows_with_the_base_as_the_papers_fit_says() -> None:
    bounds = []
    for base in (1e4, 1e5, 1e6, 1e7):
        found = rope_bound(llama(base), 1 << 16)  # searched to 4 x 65,536
        assert found is not None and found.bound is not None
        bounds.append(found.bound)
        # The paper's fit (base >= 0.0424 L^1.628) gives the least base for the bound found, within a factor 3.
        assert 1 / 3 < paper_least_base(found.bound) / base < 3
    assert bounds == sorted(bounds) and bounds[-1] > 10 * bounds[0]


def test_scaling_is_the_models_own_frequencies() -> None:
    plain = rope_bound(llama(10_000.0))
    linear = rope_bound(llama(10_000.0, scaling={"rope_type": "linear", "factor": 2.0}))
    assert plain is not None and linear is not None and plain.bound and linear.bound
    assert abs(linear.bound - 2 * plain.bound) <= 2  # positions divided by 2: B_linear(m) = B(m / 2)
    llama31 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    unscaled = rope_bound(llama(500_000.0))
    scaled = rope_bound(llama(500_000.0, scaling=llama31, max_position_embeddings=131072), 131072)
    assert unscaled is not None and scaled is not None and unscaled.bound and scaled.bound
    assert scaled.rope_type == "llama3" and scaled.bound > 2 * unscaled.bound
    assert not scaled.covers(131072)  # Llama 3.1's 128k context is past its own bound
    # Dynamic NTK raises the base with the length served.
    dynamic = {"rope_type": "dynamic", "factor": 2.0}
    at_trained, at_16k = (
        rope_bound(llama(10_000.0, scaling=dynamic), 4096),
        rope_bound(llama(1e4, scaling=dynamic), 16384),
    )
    assert at_trained is not None and at_16k is not None and at_trained.bound and at_16k.bound
    assert at_trained.bound == plain.bound < at_16k.bound


def test_partial_rotary_counts_only_the_rotated_pairs() -> None:
    half = rope_bound(llama(10_000.0, partial_rotary_factor=0.5))
    assert half is not None and half.rotary_dims == 64
    assert half.bound == (first_negative([10_000.0 ** (-i / 64) for i in range(0, 64, 2)], 1 << 16) or 0) - 1


def test_no_rotary_embedding_and_unknown_configs_have_no_bound() -> None:
    assert rope_bound({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2}) is None
    assert rope_bound({"model_type": "no-such-model"}) is None
    assert context_record({"model_type": "gpt2"})["rope"] is None


def test_a_base_with_no_negative_in_reach_says_how_far_it_looked() -> None:
    found = rope_bound(llama(1e12, head_dim=16))  # the first negative B(m) is at 298,335
    assert found is not None and found.bound is None and found.searched == 1 << 16
    assert "up to 65,536 tokens" in found.describe() and found.covers(4096)
    further = rope_bound(llama(1e12, head_dim=16), 100_000)
    assert further is not None and further.searched == 400_000 and further.bound == 298_334


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("32k", 32_000), ("25.6k", 25_600), ("32K", 32_768), ("1M", 1 << 20), ("auto", None),
     ("-1", None), ("1.5K", None), ("many", None)],
)  # fmt: skip
def test_parse_length_reads_what_vllm_reads(text: str, value: int | None) -> None:
    assert parse_length(text) == value


def test_max_model_len_among_the_vllm_arguments() -> None:
    assert max_model_len(["--dtype", "bfloat16"]) is None
    assert max_model_len(["--max-model-len", "4096"]) == "4096"
    assert max_model_len(["--max_model_len=2k", "--enforce-eager"]) == "2k"
    assert max_model_len(["--max-model-len", "1024", "--max-model-len=2048"]) == "2048"


def test_the_served_length_past_the_bound_is_warned_about_and_exported() -> None:
    default_model = llama(100_000.0, head_dim=64, max_position_embeddings=8192)  # SmolLM2-135M's RoPE
    context = served_context(default_model, ())
    assert context.length == 8192 and context.source == "the model's max_position_embeddings"
    assert context.rope is not None and context.rope.bound is not None and context.rope.bound < 8192
    warning = context.warning()
    assert warning is not None and warning.startswith(
        "The context served, 8,192 tokens (the model's max_position_embeddings), reaches past"
    )
    assert f"-- --max-model-len {context.rope.bound + 1}" in warning
    within = served_context(default_model, ("--max-model-len", "2048"))
    assert within.length == 2048 and within.source == "--max-model-len" and within.warning() is None
    assert served_context(default_model, ("--max-model-len", str(context.rope.bound + 1))).warning() is None
    assert served_context(default_model, ("--max-model-len", str(context.rope.bound + 2))).warning() is not None

    metrics = LauncherMetrics(CollectorRegistry())
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE shortgpt_rope_context_bound_tokens gauge" in text
    assert "\nshortgpt_rope_context_bound_tokens " not in text  # not known yet: no sample
    metrics.record_context(context)
    text = generate_latest(metrics.registry).decode()
    assert f"\nshortgpt_rope_context_bound_tokens {float(context.rope.bound)}\n" in text
    assert "\nshortgpt_served_context_tokens 8192.0\n" in text
    bare = LauncherMetrics(CollectorRegistry())
    bare.record_context(served_context({"model_type": "gpt2", "n_positions": 1024}, ()))
    assert "\nshortgpt_rope_context_bound_tokens " not in generate_latest(bare.registry).decode()


def test_the_report_records_the_bound_at_the_models_own_maximum() -> None:
    record = context_record(llama(100_000.0, head_dim=64, max_position_embeddings=8192))
    assert record["max_position_embeddings"] == 8192 and record["within_bound"] is False
    assert record["rope"]["bound"] < 8192 and "short of the model's own maximum of 8,192 tokens" in record["summary"]
    assert context_record(llama(1e6))["within_bound"] is True


def test_rope_parameters_it_cannot_read_give_no_bound() -> None:
    # YaRN without its factor: transformers refuses the config, so there are no frequencies to read.
    assert rope_bound(llama(1e6, scaling={"rope_type": "yarn"})) is None
