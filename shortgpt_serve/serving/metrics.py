"""The launcher's Prometheus metrics, declared in one place.

Names carry the ``shortgpt_`` prefix and their unit; gauges that describe a model carry
``model="full"|"shortened"`` so comparison metrics (throughput, latency, quality) can join them under the same
label. Live request traffic is vLLM's own ``vllm:*`` metrics on the engine's port.

A figure that was not measured has no sample at all, never a number that reads as measured (an unlabelled
prometheus_client gauge would export 0 from the start, so those are registered only once set:
:class:`OptionalGauge`). Quality and benchmark figures may be reused from the cache; their
``*_timestamp_seconds`` gauges say when they were measured.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from shortgpt_serve.provenance import Provenance
from shortgpt_serve.serving.benchrun import BenchmarkRun, ratios
from shortgpt_serve.serving.context import ServedContext
from shortgpt_serve.serving.gauges import OptionalGauge, unix_time
from shortgpt_serve.version import __version__

MODEL_LABEL = "model"
FULL = "full"
SHORTENED = "shortened"
# Labels of the side-by-side benchmark gauges: which model, its name as served (the source's name for the full
# model), and the number of requests kept in flight by the fixed workload.
BENCH_LABELS = [MODEL_LABEL, "model_name", "concurrency"]
QUANTILES = ("0.5", "0.9", "0.99")


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
        self.latency_budget = OptionalGauge(
            "shortgpt_latency_budget_ratio",
            "Configured latency budget: the most the shortened model may cost, as a fraction of the full model.",
            r,
        )
        self.predicted_cost = OptionalGauge(
            "shortgpt_predicted_cost_ratio",
            "Predicted per-token cost of the shortened model as a fraction of the full model (from its shapes).",
            r,
        )
        self.min_quality = OptionalGauge(
            "shortgpt_min_quality_ratio",
            "Configured accuracy floor: the least quality the shortened model must retain vs the full model "
            "(absent when quality is not measured).",
            r,
        )
        self.quality_retained = OptionalGauge(
            "shortgpt_quality_retained_ratio",
            "Measured quality retained by the shortened model: mean over tasks of (acc_short - chance) / "
            "(acc_full - chance); 1 when no layer was removed, absent when not measured.",
            r,
        )
        self.quality_timestamp = OptionalGauge(
            "shortgpt_quality_timestamp_seconds",
            "Unix time the checkpoint was written with its quality figures (its provenance's creation time): the "
            "shortened model's were measured then, the full model's then or before (reused from the cache); older "
            "than the launcher when the checkpoint is reused.",
            r,
        )
        self.budget_met = Gauge(
            "shortgpt_budget_met",
            "1 if the budget was met by the served model, else 0; budget='latency' or 'quality' (the accuracy "
            "floor: held by the full model itself when no layer was removed, absent when quality is not measured).",
            ["budget"],
            registry=r,
        )
        self.task_accuracy = Gauge(
            "shortgpt_task_accuracy_ratio",
            "Benchmark accuracy (0-shot log-likelihood) on the task's primary metric, measured when the checkpoint "
            "was chosen (shortgpt_quality_timestamp_seconds).",
            [MODEL_LABEL, "task", "metric"],
            registry=r,
        )
        self.perplexity = Gauge(
            "shortgpt_heldout_perplexity",
            "Perplexity on held-out text disjoint from the calibration text, measured when the checkpoint was chosen "
            "(shortgpt_quality_timestamp_seconds).",
            [MODEL_LABEL],
            registry=r,
        )
        self.kl = Gauge(
            "shortgpt_heldout_kl_divergence_nats",
            "Mean KL(full || model) per held-out token, in nats (0 for the full model), measured when the checkpoint "
            "was chosen; absent when not measured.",
            [MODEL_LABEL],
            registry=r,
        )
        self.agreement = Gauge(
            "shortgpt_heldout_top1_agreement_ratio",
            "Share of held-out tokens where the model's top next token is the full model's (1 for the full model).",
            [MODEL_LABEL],
            registry=r,
        )
        self.lambada = Gauge(
            "shortgpt_lambada_accuracy_ratio",
            "LAMBADA last-word greedy accuracy on held-out passages (a generative measure).",
            [MODEL_LABEL],
            registry=r,
        )
        self.quality_retained_bound = Gauge(
            "shortgpt_quality_retained_interval_ratio",
            "95% paired bootstrap interval of quality retained by the shortened model; bound='low' or 'high'.",
            ["bound"],
            registry=r,
        )
        self.healing = Gauge(
            "shortgpt_healing_info",
            "1, labelled with how the kept layers were healed (method='none' for plain removal).",
            ["method"],
            registry=r,
        )
        self.rope_bound = OptionalGauge(
            "shortgpt_rope_context_bound_tokens",
            "The context the model's RoPE base supports (Men et al. 2024): the last distance before "
            "sum_i cos(m theta_i) turns negative; absent without RoPE or with no such distance within 4x the served "
            "length. Layer removal leaves it unchanged.",
            r,
        )
        self.served_context = OptionalGauge(
            "shortgpt_served_context_tokens",
            "Tokens per sequence vLLM serves (--max-model-len, else the model's max_position_embeddings); above "
            "shortgpt_rope_context_bound_tokens, retrieval past the bound is superficial.",
            r,
        )
        self.engine_up = Gauge("shortgpt_engine_up", "1 while the vLLM engine answers /health, else 0.", registry=r)
        self.engine_restarts = Counter(
            "shortgpt_engine_restarts",
            "Times the launcher restarted the vLLM engine after it died.",
            registry=r,
        )
        # Side-by-side benchmark: one fixed workload on the full and the shortened model, same engine settings.
        self.bench_output_tps = Gauge(
            "shortgpt_benchmark_output_tokens_per_second",
            "Output tokens per second of the fixed startup workload.",
            BENCH_LABELS,
            registry=r,
        )
        self.bench_rps = Gauge(
            "shortgpt_benchmark_requests_per_second",
            "Completed requests per second of the fixed startup workload.",
            BENCH_LABELS,
            registry=r,
        )
        self.bench_ttft = Gauge(
            "shortgpt_benchmark_ttft_seconds",
            "Time to first token of the fixed startup workload, by quantile.",
            [*BENCH_LABELS, "quantile"],
            registry=r,
        )
        self.bench_tpot = Gauge(
            "shortgpt_benchmark_tpot_seconds",
            "Time per output token after the first (per request), by quantile.",
            [*BENCH_LABELS, "quantile"],
            registry=r,
        )
        self.bench_itl = Gauge(
            "shortgpt_benchmark_itl_seconds",
            "Inter-token latency (gap between streamed chunks), by quantile.",
            [*BENCH_LABELS, "quantile"],
            registry=r,
        )
        self.bench_e2e = Gauge(
            "shortgpt_benchmark_e2e_latency_seconds",
            "End-to-end request latency of the fixed startup workload, by quantile.",
            [*BENCH_LABELS, "quantile"],
            registry=r,
        )
        self.bench_failed = Gauge(
            "shortgpt_benchmark_failed_requests",
            "Requests of the fixed startup workload that failed.",
            BENCH_LABELS,
            registry=r,
        )
        self.kv_cache_tokens = Gauge(
            "shortgpt_kv_cache_capacity_tokens",
            "Tokens the engine's KV cache holds (vLLM's blocks x block size) in the benchmark engine of each model, "
            "same settings: a shortened model holds about L / (L - removed) times more in the same memory.",
            [MODEL_LABEL, "model_name"],
            registry=r,
        )
        self.bench_timestamp = Gauge(
            "shortgpt_benchmark_timestamp_seconds",
            "Unix time the model's benchmark workload finished, kept with the cached result: older than the "
            "launcher when reused from the cache.",
            [MODEL_LABEL, "model_name"],
            registry=r,
        )
        self.speedup = Gauge(
            "shortgpt_speedup_ratio",
            "Output tokens/s of the shortened model divided by the full model's, same workload and engine.",
            ["concurrency"],
            registry=r,
        )
        self.latency_saving = Gauge(
            "shortgpt_latency_saving_ratio",
            "1 - median end-to-end latency of the shortened model / the full model's (0.2 = 20% faster).",
            ["concurrency"],
            registry=r,
        )
        self.measured_cost = Gauge(
            "shortgpt_measured_cost_ratio",
            "Measured cost of the shortened model as a fraction of the full model (1 / speedup); compare with "
            "shortgpt_predicted_cost_ratio.",
            ["concurrency"],
            registry=r,
        )
        self.speedup_efficiency = Gauge(
            "shortgpt_speedup_efficiency_ratio",
            "Measured speedup divided by the FLOP-ideal speedup (1 / predicted cost); 1 = all predicted saving "
            "realised.",
            ["concurrency"],
            registry=r,
        )
        self.build_info = Gauge(
            "shortgpt_build_info",
            "Always 1; labels name the tool, the engine and the models: the source model and the first 12 hex "
            "digits of its content hash, the served name and the checkpoint's content hash.",
            [
                "version",
                "engine",
                "engine_version",
                "source_model",
                "source_sha256",
                "served_model_name",
                "checkpoint_sha256",
            ],
            registry=r,
        )

    def record_checkpoint(self, provenance: Provenance) -> None:
        """Fill the model gauges from a checkpoint's provenance record."""
        n_full = provenance.source.num_layers
        removed = set(provenance.removed_layers)
        self.layers.labels(FULL).set(n_full)
        self.layers.labels(SHORTENED).set(provenance.num_kept)
        self.layers_removed.set(len(removed))
        sel = provenance.selection
        if sel is not None:
            self.parameters.labels(FULL).set(sel.params_full)
            self.parameters.labels(SHORTENED).set(sel.params_short)
            self.latency_budget.set(sel.budget)
            self.predicted_cost.set(sel.cost_ratio)
            if sel.latency_met is not None:
                self.budget_met.labels("latency").set(1 if sel.latency_met else 0)
            if sel.min_quality is not None:
                self.min_quality.set(sel.min_quality)
                if sel.quality_met is not None:
                    self.budget_met.labels("quality").set(1 if sel.quality_met else 0)
                elif not removed:  # the full model, served as it is, holds any floor on its own quality
                    self.budget_met.labels("quality").set(1)
        for i, bi in enumerate(provenance.block_influence or ()):
            self.block_influence.labels(str(i), "true" if i in removed else "false").set(bi)
        self.healing.labels(provenance.healing.method).set(1)
        quality = provenance.quality
        if quality is None:
            return
        measured_at = unix_time(provenance.created)
        if measured_at is not None:
            self.quality_timestamp.set(measured_at)
        short = provenance.shortened_quality
        for label, record in ((FULL, quality.full), (SHORTENED, short)):
            if record is None:
                continue
            for task, t in record.tasks.items():
                self.task_accuracy.labels(label, task, t.metric).set(t.score)
            if record.perplexity is not None:
                self.perplexity.labels(label).set(record.perplexity)
            if record.lambada is not None:
                self.lambada.labels(label).set(record.lambada)
        # KL and agreement compare with the full model: its own values (0, 1) hold by definition, so they are
        # published beside the shortened model's, and only when those were measured (or nothing was removed).
        for gauge, measured, itself in (
            (self.kl, None if short is None else short.kl, 0.0),
            (self.agreement, None if short is None else short.agreement, 1.0),
        ):
            value = itself if not removed else measured
            if value is not None:
                gauge.labels(FULL).set(itself)
                gauge.labels(SHORTENED).set(value)
        if short is None:
            return
        if removed and short.retained_ci is not None:
            self.quality_retained_bound.labels("low").set(short.retained_ci[0])
            self.quality_retained_bound.labels("high").set(short.retained_ci[1])
        retained = 1.0 if not removed else short.retained
        if retained is not None:
            self.quality_retained.set(retained)

    def record_benchmark(
        self, full: BenchmarkRun | None, short: BenchmarkRun | None, predicted_cost: float | None
    ) -> None:
        """Fill the side-by-side benchmark gauges from the two models' runs of the startup workload."""
        for label, run in ((FULL, full), (SHORTENED, short)):
            if run is None:
                continue
            self.bench_timestamp.labels(label, run.model_name).set(run.measured_at)
            if run.kv_cache_tokens is not None:
                self.kv_cache_tokens.labels(label, run.model_name).set(run.kv_cache_tokens)
            for level, r in run.levels.items():
                labels = (label, run.model_name, level)
                self.bench_output_tps.labels(*labels).set(r.output_tokens_per_s)
                self.bench_rps.labels(*labels).set(r.requests_per_s)
                self.bench_failed.labels(*labels).set(r.failed)
                for gauge, quantiles in (
                    (self.bench_ttft, r.ttft_s),
                    (self.bench_tpot, r.tpot_s),
                    (self.bench_itl, r.itl_s),
                    (self.bench_e2e, r.e2e_s),
                ):
                    for q in QUANTILES:
                        if q in quantiles:
                            gauge.labels(*labels, q).set(quantiles[q])
        if full is not None and short is not None:
            for level, row in ratios(full, short, predicted_cost).items():
                self.speedup.labels(level).set(row["speedup"])
                self.latency_saving.labels(level).set(row["latency_saving"])
                self.measured_cost.labels(level).set(row["measured_cost"])
                if "efficiency" in row:
                    self.speedup_efficiency.labels(level).set(row["efficiency"])

    def record_context(self, context: ServedContext) -> None:
        if context.length is not None:
            self.served_context.set(context.length)
        if context.rope is not None and context.rope.bound is not None:
            self.rope_bound.set(context.rope.bound)

    def record_build(self, engine: str, engine_version: str, provenance: Provenance, served_model_name: str) -> None:
        src = provenance.source
        self.build_info.labels(
            __version__,
            engine,
            engine_version,
            src.origin,
            src.sha256[:12],
            served_model_name,
            provenance.checkpoint_sha256()[:12],
        ).set(1)


def start_metrics_server(metrics: LauncherMetrics, host: str, port: int) -> Any:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the server (call ``shutdown()``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return server
