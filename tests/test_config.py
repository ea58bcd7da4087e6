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
