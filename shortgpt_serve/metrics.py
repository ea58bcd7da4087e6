"""The launcher's Prometheus metrics, declared in one place.

Names carry the ``shortgpt_`` prefix and their unit; gauges that describe a model carry
``model="full"|"shortened"`` so comparison metrics (throughput, latency, quality) can join them under the same
label. Live request traffic is vLLM's own ``vllm:*`` metrics on the engine's port.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from shortgpt_serve import __version__

MODEL_LABEL = "model"
FULL = "full"
SHORTENED = "shortened"


class LauncherMetrics:
    """Gauges describing the served shortened model and the full model it came from."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.layers = Gauge("shortgpt_model_layers", "Decoder layers in the model.", [MODEL_LABEL], registry=r)
        self.layers_removed = Gauge(
            "shortgpt_layers_removed", "Decoder layers removed from the full model.", registry=r
        )
        self.parameters = Gauge(
            "shortgpt_model_parameters",
            "Parameters of the model (tied embeddings counted once).",
            [MODEL_LABEL],
            registry=r,
        )
        self.block_influence = Gauge(
            "shortgpt_block_influence_ratio",
            "Block Influence of each decoder layer of the full model (1 - mean cosine between the layer's "
            "input and output hidden states on calibration text); removed='true' marks removed layers.",
            ["layer", "removed"],
            registry=r,
        )
        self.latency_budget = Gauge(
            "shortgpt_latency_budget_ratio",
            "Configured latency budget: the most the shortened model may cost, as a fraction of the full model.",
            registry=r,
        )
        self.predicted_cost = Gauge(
            "shortgpt_predicted_cost_ratio",
            "Predicted per-token cost of the shortened model as a fraction of the full model (from its shapes).",
            registry=r,
        )
        self.engine_up = Gauge("shortgpt_engine_up", "1 while the vLLM engine answers /health, else 0.", registry=r)
        self.build_info = Gauge(
            "shortgpt_build_info",
            "Always 1; labels name the tool, engine and models.",
            ["version", "engine", "engine_version", "source_model", "served_model_name"],
            registry=r,
        )

    def record_checkpoint(self, provenance: dict[str, Any]) -> None:
        """Fill the model gauges from a checkpoint's provenance record."""
        n_full = int(provenance["source"]["num_layers"])
        removed = set(provenance["removed_layers"])
        self.layers.labels(FULL).set(n_full)
        self.layers.labels(SHORTENED).set(n_full - len(removed))
        self.layers_removed.set(len(removed))
        sel = provenance.get("selection") or {}
        if "params_full" in sel:
            self.parameters.labels(FULL).set(sel["params_full"])
            self.parameters.labels(SHORTENED).set(sel["params_short"])
        if "budget" in sel:
            self.latency_budget.set(sel["budget"])
        if "cost_ratio" in sel:
            self.predicted_cost.set(sel["cost_ratio"])
        for i, bi in enumerate(provenance.get("block_influence") or []):
            self.block_influence.labels(str(i), "true" if i in removed else "false").set(bi)

    def record_build(self, engine: str, engine_version: str, source_model: str, served_model_name: str) -> None:
        self.build_info.labels(__version__, engine, engine_version, source_model, served_model_name).set(1)


def start_metrics_server(metrics: LauncherMetrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the server (call ``shutdown()``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
