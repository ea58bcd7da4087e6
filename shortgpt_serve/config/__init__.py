"""Typed configuration, one frozen dataclass per concern.

Precedence, lowest first: the defaults here < the YAML file (``--config``) < environment variables < flags.
Each setting is declared once, here: its field's metadata holds the help text and, for settings that have one,
the flag (names, environment variable, the commands that take it); ``shortgpt_serve.options`` makes the click
options from them (type from the annotation, choices from ``Literal``), so the CLI and the config cannot drift.

The parts: ``fields`` (how a setting is declared), ``stages`` and ``serving`` (the sections), ``root`` (the whole
config) and ``files`` (YAML).
"""

from shortgpt_serve.config.fields import (
    CACHE,
    COMPARE_MODES,
    CRITERIA,
    DTYPES,
    ENV_PREFIX,
    PROFILE,
    PRUNE,
    SERVE,
    CompareMode,
    Criterion,
    Dtype,
    Flag,
    flag_name,
)
from shortgpt_serve.config.files import config_from_dict, dump_config, load_config, override
from shortgpt_serve.config.root import DEFAULT_MODEL_NAME, SECTIONS, Config, default_cache_dir
from shortgpt_serve.config.serving import OWN_VLLM_FLAGS, BenchmarkConfig, ServeConfig
from shortgpt_serve.config.stages import (
    MIN_ITEMS,
    CalibrationConfig,
    HealConfig,
    ProfileConfig,
    QualityConfig,
    SelectionConfig,
)

__all__ = [
    "CACHE",
    "COMPARE_MODES",
    "CRITERIA",
    "DEFAULT_MODEL_NAME",
    "DTYPES",
    "ENV_PREFIX",
    "MIN_ITEMS",
    "OWN_VLLM_FLAGS",
    "PROFILE",
    "PRUNE",
    "SECTIONS",
    "SERVE",
    "BenchmarkConfig",
    "CalibrationConfig",
    "CompareMode",
    "Config",
    "Criterion",
    "Dtype",
    "Flag",
    "HealConfig",
    "ProfileConfig",
    "QualityConfig",
    "SelectionConfig",
    "ServeConfig",
    "config_from_dict",
    "default_cache_dir",
    "dump_config",
    "flag_name",
    "load_config",
    "override",
]
