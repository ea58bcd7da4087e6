"""One model's run of the fixed benchmark workload, typed, and the full-vs-shortened ratios.

A primitive shared by the comparison (which measures and caches runs) and the metrics (which publish them). The
JSON form is what the ``benchmarks`` cache entries hold; quantile maps are keyed ``"0.5"``, ``"0.9"``, ``"0.99"``
and ``"mean"``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LevelResult:
    """What the client measured at one concurrency level."""

    requests: int = 0
    failed: int
    errors: tuple[str, ...] = ()
    """Up to five distinct error messages of failed requests."""
    duration_s: float = 0.0
    output_tokens: int = 0
    output_tokens_per_s: float
    requests_per_s: float
    ttft_s: dict[str, float]
    tpot_s: dict[str, float]
    itl_s: dict[str, float]
    e2e_s: dict[str, float]
    concurrency: int = 0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> LevelResult:
        names = {f.name for f in dataclasses.fields(cls)}
        known = {k: v for k, v in data.items() if k in names}
        return cls(**{**known, "errors": tuple(data.get("errors") or ())})

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "errors": list(self.errors)}


@dataclass(frozen=True, kw_only=True)
class BenchmarkRun:
    """Every level of the workload on one model, keyed by concurrency (as a string, like the JSON)."""

    model_name: str
    measured_at: float
    """Unix time."""
    levels: dict[str, LevelResult] = field(default_factory=dict)
    how: str | None = None
    """How the two models were kept apart while measured."""
    kv_cache_tokens: int | None = None
    """Tokens the engine's KV cache holds (its blocks x block size, as vLLM reports them), when it said."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BenchmarkRun:
        """Raises KeyError, TypeError or ValueError when ``data`` is not a run."""
        levels = data["levels"]
        if not isinstance(levels, Mapping):
            raise TypeError("levels must be a mapping")
        return cls(
            model_name=str(data["model_name"]),
            measured_at=float(data["measured_at"]),
            levels={str(k): LevelResult.from_json(v) for k, v in levels.items()},
            how=data.get("how"),
            kv_cache_tokens=int(data["kv_cache_tokens"]) if data.get("kv_cache_tokens") is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_name": self.model_name,
            "measured_at": self.measured_at,
            "levels": {k: v.to_json() for k, v in self.levels.items()},
        }
        if self.how is not None:
            out["how"] = self.how
        if self.kv_cache_tokens is not None:
            out["kv_cache_tokens"] = self.kv_cache_tokens
        return out


def ratios(full: BenchmarkRun, short: BenchmarkRun, predicted_cost: float | None) -> dict[str, dict[str, float]]:
    """Per concurrency level: speedup, latency saving, measured cost and speedup efficiency."""
    out: dict[str, dict[str, float]] = {}
    for level, s in short.levels.items():
        f = full.levels.get(level)
        if not f or not f.output_tokens_per_s or not s.output_tokens_per_s:
            continue
        speedup = s.output_tokens_per_s / f.output_tokens_per_s
        row = {
            "speedup": speedup,
            "latency_saving": 1.0 - s.e2e_s["0.5"] / f.e2e_s["0.5"],
            "measured_cost": 1.0 / speedup,
        }
        if predicted_cost:
            row["ideal_speedup"] = 1.0 / predicted_cost
            row["efficiency"] = speedup * predicted_cost
        out[level] = row
    return out
