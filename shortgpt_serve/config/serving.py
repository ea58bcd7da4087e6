"""Settings of serving: the engine and its supervision, and the startup benchmark."""

from __future__ import annotations

import math
import urllib.parse
from dataclasses import dataclass

from shortgpt_serve.config.fields import SERVE, CompareMode, check_choices, not_blank, positive, setting
from shortgpt_serve.errors import ConfigError

SHADOW_API_KEY_ENV = "SHORTGPT_SERVE_SHADOW_API_KEY"
"""Where the shadow endpoint's API key is read from: never a flag (``ps`` shows those) nor a config file."""
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


@dataclass(frozen=True)
class ServeConfig:
    host: str = setting(
        "Address the OpenAI-compatible server binds to.", "--host", on=(SERVE,), env="HOST", default="127.0.0.1"
    )
    port: int = setting("Port of the OpenAI-compatible server.", "--port", "-p", on=(SERVE,), env="PORT", default=8000)
    served_model_name: str | None = setting(
        "Model name clients ask for. Default: '<model>-short'.", "--served-model-name", on=(SERVE,), default=None
    )
    api_key: str | None = setting(
        "API key clients must send (Authorization: Bearer ...). /health and /metrics stay open.",
        "--api-key",
        on=(SERVE,),
        env="API_KEY",
        default=None,
    )
    metrics_port: int = setting(
        "Port of the launcher's own Prometheus /metrics (0 disables it). vLLM's metrics stay on --port.",
        "--metrics-port",
        on=(SERVE,),
        env="METRICS_PORT",
        default=8001,
    )
    health_timeout: float = setting("Seconds to wait for the engine to answer /health.", default=900.0)
    stop_timeout: float = setting("Seconds to wait for the engine to exit after SIGTERM before SIGKILL.", default=20.0)
    max_restarts: int = setting(
        "Times the engine is restarted after it dies (waits 1, 2, 4 ... s between tries; the count resets after "
        "10 minutes of health). 0: the launcher exits non-zero when the engine dies.",
        "--max-restarts",
        on=(SERVE,),
        env="MAX_RESTARTS",
        default=3,
    )
    vllm_args: tuple[str, ...] = setting("Extra arguments passed to vLLM as they are.", default=())
    unhealthy_restarts_after: int = setting(
        "Failed /health checks in a row (one every 2 s, each given 2 s) after which a running engine counts as hung: "
        "it is killed and restarted like one that died, within --max-restarts. 0: never.",
        "--unhealthy-restarts-after",
        on=(SERVE,),
        default=3,
    )
    engine_log: str = setting(
        "Where the serving engine's output goes: '-' (the launcher's terminal) or a file it is appended to. The "
        "private benchmark engines always write to a log file in the cache.",
        "--engine-log",
        on=(SERVE,),
        default="-",
    )
    shadow_url: str | None = setting(
        "A full-model OpenAI-compatible endpoint (e.g. http://full:8000) to compare with on live traffic: vLLM "
        "then also sends a sampled share of completions to this endpoint in the background, from a middleware in "
        "its own server (no extra hop; its API key from SHORTGPT_SERVE_SHADOW_API_KEY).",
        "--shadow-url",
        on=(SERVE,),
        env="SHADOW_URL",
        default=None,
    )
    shadow_fraction: float = setting(
        "Share of completions and chat completions also sent to --shadow-url (0..1).",
        "--shadow-fraction",
        on=(SERVE,),
        env="SHADOW_FRACTION",
        default=0.05,
    )
    shadow_model: str | None = setting(
        "Model name asked of --shadow-url. Default: the first model its /v1/models lists.",
        "--shadow-model",
        on=(SERVE,),
        default=None,
    )
    shadow_timeout: float = setting(
        "Seconds a shadow request may take before it is abandoned (counted as an error).", default=120.0
    )
    shadow_max_in_flight: int = setting(
        "Shadow requests in flight at most; a sampled request beyond that is not shadowed (counted as dropped).",
        default=8,
    )

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
        if self.unhealthy_restarts_after < 0:
            raise ConfigError(
                f"--unhealthy-restarts-after must be >= 0 (0: never), got {self.unhealthy_restarts_after}.",
                param="--unhealthy-restarts-after",
            )
        self._validate_shadow()

    def _validate_shadow(self) -> None:
        f = self.shadow_fraction
        if not (isinstance(f, (int, float)) and 0 <= f <= 1):
            raise ConfigError(
                f"--shadow-fraction must be a share between 0 and 1 (e.g. 0.05 for 5% of requests), got {f}.",
                param="--shadow-fraction",
            )
        url = self.shadow_url
        if url is not None:
            parts = urllib.parse.urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ConfigError(
                    f"--shadow-url must be an http(s) URL of a full-model OpenAI-compatible server, e.g. "
                    f"http://full-model:8000, got {url!r}.",
                    param="--shadow-url",
                )
        not_blank(
            self.shadow_model,
            "--shadow-model",
            "name the shadow's model or leave it unset for the first one its /v1/models lists",
        )
        if not 0 < self.shadow_timeout < math.inf:
            raise ConfigError(
                f"serve.shadow_timeout must be a finite number of seconds > 0, got {self.shadow_timeout}.",
                param="serve.shadow_timeout",
            )
        positive("serve.shadow_max_in_flight", self.shadow_max_in_flight, "serve.shadow_max_in_flight")

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
    mode: CompareMode = setting(  # noqa: RUF009 (a Literal alias: immutable)
        "Side-by-side benchmark of the full and the shortened model on the same engine at startup: auto (reuse "
        "cached results; measure what the cache lacks only for models up to benchmark.auto_max_gb, since each "
        "measurement is a cold engine boot before serving), reuse (measure what the cache lacks), measure "
        "(always), off.",
        "--compare",
        on=(SERVE,),
        env="COMPARE",
        default="auto",
    )
    auto_max_gb: float = setting(
        "With --compare auto: the largest full model (GB of weights) measured before serving; larger ones are "
        "served first and the comparison is skipped with a line saying so.",
        default=20.0,
    )
    concurrency: tuple[int, ...] = setting(
        "Requests kept in flight, one workload per level.",
        "--compare-concurrency",
        on=(SERVE,),
        suffix="Comma-separated, e.g. 1,16.",
        default=(1, 16),
    )
    requests: int = setting("Requests per level; 0: max(8, 4 x concurrency).", default=0)
    prompt_tokens: int = setting("Prompt length of each request, in tokens (fixed seeded token ids).", default=128)
    output_tokens: int = setting("Output tokens of each request (end of sequence ignored).", default=64)
    seed: int = setting("Seed of the prompts.", default=0)

    def validate(self) -> None:
        check_choices(self, "benchmark")
        if not self.concurrency or any(c <= 0 for c in self.concurrency):
            raise ConfigError(
                f"--compare-concurrency must list positive integers, e.g. 1,16; got {list(self.concurrency)}.",
                param="--compare-concurrency",
            )
        if self.requests < 0:
            raise ConfigError(f"benchmark.requests must be >= 0, got {self.requests}.", param="benchmark.requests")
        if self.auto_max_gb < 0:
            raise ConfigError(
                f"benchmark.auto_max_gb must be >= 0, got {self.auto_max_gb}.", param="benchmark.auto_max_gb"
            )
        positive("benchmark.prompt_tokens", self.prompt_tokens, "benchmark.prompt_tokens")
        positive("benchmark.output_tokens", self.output_tokens, "benchmark.output_tokens")

    def requests_at(self, concurrency: int) -> int:
        return self.requests or max(8, 4 * concurrency)
