"""A run's inputs, resolved and checked before any model work: the model, the paths, the text, the tasks.

Each check fails with one line naming the setting and the fix, and writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from shortgpt_serve.cache import FileHashes
from shortgpt_serve.calibration import CalibrationSet, Documents, load_documents, pack
from shortgpt_serve.checkpoint import PROVENANCE_NAME
from shortgpt_serve.config import Config
from shortgpt_serve.errors import ConfigError
from shortgpt_serve.models.loading import load_tokenizer
from shortgpt_serve.models.source import ModelSource, resolve_model

log = logging.getLogger(__name__)


def served_name(config: Config, source: ModelSource) -> str:
    return config.serve.served_model_name or f"{source.name}-short"


def resolve_source(config: Config, hashes: FileHashes | None = None) -> ModelSource:
    """``--model`` as a local safetensors folder, under the config's pickle and remote-code permissions."""
    return resolve_model(
        config.model,
        config.resolved_cache_dir(),
        allow_pickle_weights=config.allow_pickle_weights,
        trust_remote_code=config.trust_remote_code,
        hashes=hashes,
    )


def check_paths(config: Config) -> None:
    """Settings that name paths, checked against the filesystem before any model work; nothing is written."""
    cache_dir = config.resolved_cache_dir()
    if cache_dir.exists() and not cache_dir.is_dir():
        raise ConfigError(
            f"--cache-dir {cache_dir} is a file; pass a folder (it is created if missing).", param="--cache-dir"
        )
    if config.output is None:
        return
    out = Path(config.output).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--output {config.output} is a file; pass a folder path for the checkpoint.", param="--output"
        )
    model = Path(config.model).expanduser() if config.model else None
    if model is not None and model.exists():
        model = model.resolve()
        if out.is_relative_to(model):
            where = "is the model folder" if out == model else "is inside the model folder"
            raise ConfigError(
                f"--output {config.output} {where} {model}; write the checkpoint elsewhere.", param="--output"
            )
        if model.is_relative_to(out):
            raise ConfigError(
                f"--output {config.output} holds the model {model}; choose a folder outside it.", param="--output"
            )
    if out.is_dir() and config.overwrite and any(out.iterdir()) and not (out / PROVENANCE_NAME).is_file():
        raise ConfigError(
            f"--overwrite replaces only a checkpoint written by shortgpt-serve, and {config.output} is not one "
            f"(no {PROVENANCE_NAME}); choose another --output.",
            param="--overwrite",
        )


def read_calibration(config: Config) -> Documents:
    cal = config.calibration
    return load_documents(cal.path, cal.heldout_fraction, cal.seed)


def calibration_set(config: Config, source: ModelSource, docs: Documents) -> CalibrationSet:
    cal = config.calibration
    calib = pack(docs, load_tokenizer(source), cal.num_tokens, cal.seq_len)
    log.info(
        "Calibration: %d sequences, %d tokens of %s (%d documents held out)",
        len(calib.sequences),
        calib.num_tokens,
        calib.source,
        len(docs.heldout),
    )
    return calib


def check_quality_inputs(config: Config) -> None:
    """Fail before any model work on an unknown task or missing evaluation data."""
    from shortgpt_serve.quality.tasks import load_items

    if config.quality.enabled:
        for task in config.quality.tasks:
            load_items(task, config.quality.limit, config.quality.seed)
