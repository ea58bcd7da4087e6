from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shortgpt_serve.cli import cli
from shortgpt_serve.config import Config, config_from_dict, dump_config, load_config
from shortgpt_serve.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_example_config_loads() -> None:
    config = load_config(REPO / "deploy" / "shortgpt.yaml")
    assert config.selection.budget == 0.75
    assert config.serve.vllm_args == ("--max-model-len", "4096")


def test_yaml_round_trip(tmp_path: Path) -> None:
    config = config_from_dict(
        {"model": "x/y", "selection": {"budget": 0.6}, "serve": {"port": 9000, "vllm_args": ["--a", "1"]}}
    )
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    back = load_config(path)
    assert back == config
    path.write_text(dump_config(back))
    assert load_config(path) == config


def test_defaults() -> None:
    config = Config().validate()
    assert config.selection.budget == 0.75
    assert config.serve.host == "127.0.0.1"
    assert config.model is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"budgett": 0.7}, "unknown config key 'budgett'"),
        ({"selection": {"budgt": 0.7}}, "unknown config key 'selection.budgt'"),
        ({"selection": {"budget": "high"}}, "'selection.budget' must be float"),
        ({"selection": {"budget": 1.5}}, r"--budget must be in \(0, 1\]"),
        ({"serve": {"port": True}}, "'serve.port' must be int"),
        ({"serve": 3}, "'serve' must be a mapping"),
        ({"calibration": {"num_tokens": 10, "seq_len": 512}}, "below --seq-len"),
    ],
)
def test_bad_config_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_bad_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("selection: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


def test_precedence_defaults_yaml_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"selection": {"budget": 0.6}, "serve": {"port": 9000, "host": "0.0.0.0"}}))
    runner = CliRunner()

    def effective(args: list[str], env: dict[str, str] | None = None) -> dict:
        result = runner.invoke(cli, ["show-config", "--config", str(path), *args], env=env)
        assert result.exit_code == 0, result.output
        return yaml.safe_load(result.output)

    from_yaml = effective([])
    assert from_yaml["selection"]["budget"] == 0.6 and from_yaml["serve"]["port"] == 9000
    assert from_yaml["calibration"]["seq_len"] == 512  # default where the file is silent
    from_env = effective([], {"SHORTGPT_SERVE_BUDGET": "0.7"})
    assert from_env["selection"]["budget"] == 0.7 and from_env["serve"]["port"] == 9000
    from_flag = effective(["--budget", "0.8", "--port", "9100"], {"SHORTGPT_SERVE_BUDGET": "0.7"})
    assert from_flag["selection"]["budget"] == 0.8 and from_flag["serve"]["port"] == 9100
    assert from_flag["serve"]["host"] == "0.0.0.0"
    extra = effective(["--", "--max-model-len", "2048"])
    assert extra["serve"]["vllm_args"] == ["--max-model-len", "2048"]


def test_show_config_hides_api_key() -> None:
    result = CliRunner().invoke(cli, ["show-config", "--api-key", "sk-secret"])
    assert result.exit_code == 0
    assert "sk-secret" not in result.output and "<set>" in result.output


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"selection": {"criterion": "random"}}, "'selection.criterion' must be one of bi, angular, iterative-bi"),
        ({"profile": {"dtype": "float64"}}, "'profile.dtype' must be one of auto, float32, bfloat16, float16"),
        ({"quality": {"dtype": 16}}, "'quality.dtype' must be one of auto, float32, bfloat16, float16, got 16"),
        ({"benchmark": {"mode": "always"}}, "'benchmark.mode' must be one of auto, reuse, measure, off, got 'always'"),
    ],
)
def test_literal_values_checked_in_yaml(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)
    assert config_from_dict({"selection": {"criterion": "angular"}}).selection.criterion == "angular"


def test_literal_values_checked_for_library_callers() -> None:
    import dataclasses

    bad = dataclasses.replace(Config(), selection=dataclasses.replace(Config().selection, criterion="random"))
    with pytest.raises(ConfigError, match="--criterion must be one of bi, angular, iterative-bi, got 'random'"):
        bad.validate()
    quality = dataclasses.replace(Config().quality, dtype="float64")  # no flag: the error names the config key
    with pytest.raises(ConfigError, match=r"quality\.dtype must be one of"):
        quality.validate()


def test_options_are_made_from_the_fields() -> None:
    import click

    from shortgpt_serve.config import PROFILE, PRUNE, SERVE
    from shortgpt_serve.options import SETTINGS, build_config, options

    by_key = {s.key: s for s in SETTINGS}
    assert by_key["selection.budget"].flag.decls == ("--budget", "-b")
    assert by_key["selection.budget"].flag.envvar == "SHORTGPT_SERVE_BUDGET"
    assert "serve.health_timeout" not in by_key  # YAML only

    @click.command()
    @options(PROFILE, PRUNE, SERVE)
    def command(**flags: object) -> None:
        pass

    params = {p.name: p for p in command.params}
    assert set(params) == {s.param for s in SETTINGS if s.flag.on & {PROFILE, PRUNE, SERVE}}
    criterion = params["selection_criterion"]
    assert isinstance(criterion.type, click.Choice) and list(criterion.type.choices) == [
        "bi",
        "angular",
        "iterative-bi",
    ]
    assert params["serve_port"].type is click.INT and params["selection_budget"].type is click.FLOAT
    assert all(p.default is None for p in params.values())  # unset flags leave the YAML and the defaults alone
    assert "[default: 0.75]" in (params["selection_budget"].help or "")
    assert "Comma-separated. [default: arc_easy,piqa,hellaswag,winogrande]" in (params["quality_tasks"].help or "")
    config = build_config(None, {"quality_tasks": "piqa, arc_easy", "benchmark_concurrency": "2,8", "json_path": "x"})
    assert config.quality.tasks == ("piqa", "arc_easy") and config.benchmark.concurrency == (2, 8)
    with pytest.raises(ConfigError, match=r"--compare-concurrency must list positive integers, e\.g\. 1,16; got '1,x'"):
        build_config(None, {"benchmark_concurrency": "1,x"})
