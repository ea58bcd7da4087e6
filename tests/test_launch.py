"""Serving orchestration without vLLM: the engine start is stubbed (the real engine runs in tests/test_serve.py)."""

from __future__ import annotations

import dataclasses
import importlib
import urllib.request
from pathlib import Path

import pytest

from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError, ServeError
from shortgpt_serve.provenance import Provenance
from shortgpt_serve.serving.launch import full_model_of, launch, serve_checkpoint
from shortgpt_serve.serving.serve import check_port_free
from tests.conftest import free_port


@pytest.fixture
def checkpoint(tiny_llama: Path, tmp_path: Path) -> tuple[Path, Provenance]:
    from shortgpt_serve.checkpoint import verify_checkpoint, write_checkpoint
    from shortgpt_serve.models.source import resolve_model

    out = write_checkpoint(resolve_model(str(tiny_llama), tmp_path / "cache"), [2], tmp_path / "short")
    return out, verify_checkpoint(out)


def config(tmp_path: Path, **serve: object) -> Config:
    base = Config(cache_dir=str(tmp_path / "cache"))
    fields = {"port": free_port(), "metrics_port": free_port(), **serve}
    return dataclasses.replace(
        base,
        serve=dataclasses.replace(base.serve, **fields),  # type: ignore[arg-type]
        benchmark=dataclasses.replace(base.benchmark, mode="off"),
    ).validate()


def test_full_model_is_found_only_while_unchanged(
    checkpoint: tuple[Path, Provenance], tiny_llama: Path, tmp_path: Path
) -> None:
    _, provenance = checkpoint
    cfg = config(tmp_path)
    assert full_model_of(provenance, cfg) == tiny_llama
    changed = dataclasses.replace(provenance.source, sha256="00" * 32)
    assert full_model_of(dataclasses.replace(provenance, source=changed), cfg) is None
    gone = dataclasses.replace(provenance.source, origin=str(tmp_path / "nowhere"))
    assert full_model_of(dataclasses.replace(provenance, source=gone), cfg) is None


def test_launch_publishes_metrics_and_stops_them_when_the_engine_fails(
    checkpoint: tuple[Path, Provenance], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, provenance = checkpoint
    cfg = config(tmp_path)
    seen: list[str] = []

    def start_engine(model_dir: Path, serve_cfg: object, name: str, *, trust_remote_code: bool = False) -> None:
        # The launcher's metrics are up before the engine starts, and say what is served.
        with urllib.request.urlopen(f"http://127.0.0.1:{cfg.serve.metrics_port}/metrics") as r:
            seen.append(r.read().decode())
        raise ServeError("engine not started in this test")

    monkeypatch.setattr(importlib.import_module("shortgpt_serve.serving.serve"), "start_engine", start_engine)
    said: list[str] = []
    with pytest.raises(ServeError, match="engine not started in this test"):
        launch(out, cfg, "tiny-short", provenance, None, said.append)
    [text] = seen
    assert 'shortgpt_model_layers{model="shortened"} 5.0' in text
    assert 'served_model_name="tiny-short"' in text
    assert said == []  # never ready, so no "Serving ..." line
    check_port_free("127.0.0.1", cfg.serve.metrics_port)  # the metrics server was shut down


def test_serve_checkpoint_refuses_a_missing_folder_and_busy_ports(
    checkpoint: tuple[Path, Provenance], tmp_path: Path
) -> None:
    import socket

    with pytest.raises(CheckpointError, match="does not exist; pass a folder written by `prune`"):
        serve_checkpoint(tmp_path / "none", config(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = config(tmp_path, metrics_port=s.getsockname()[1])
        with pytest.raises(ServeError, match="pass another --metrics-port"):
            serve_checkpoint(checkpoint[0], busy)
