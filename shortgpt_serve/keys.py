"""Cache keys of the stages' results: each keyed by exactly what determines it (see the README's "Cache").

The profile by the model, the calibration text and the compute settings; the full model's scores by the model,
the task sample, the dtype and the held-out text; the checkpoint by both and every selection setting. Batch
sizes, ports and names are in no key: they change nothing a result holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

from shortgpt_serve.checkpoint import side_files
from shortgpt_serve.models.loading import resolve_device, resolve_dtype

if TYPE_CHECKING:
    from shortgpt_serve import cache
    from shortgpt_serve.calibration import Documents
    from shortgpt_serve.config import Config
    from shortgpt_serve.models.source import ModelSource


def model_key(source: ModelSource, hashes: cache.FileHashes) -> dict[str, Any]:
    """The model as results depend on it: config and weights (``source.sha256``) and the files copied beside them
    (tokenizer, chat template, generation config), whose content changes calibration tokens and scores."""
    return {"sha256": source.sha256, "files": {f.name: hashes.sha256(f) for f in side_files(source.path)}}


def _device_and_dtype(config: Config, dtype: str) -> tuple[str, str]:
    device = resolve_device(config.profile.device)
    return device.split(":")[0], resolve_dtype(dtype, device)


def profile_key(config: Config, source: ModelSource, docs: Documents, hashes: cache.FileHashes) -> dict[str, Any]:
    """What a BI profile depends on (not the batch size: it changes only the order of float sums)."""
    cal = config.calibration
    device, dtype = _device_and_dtype(config, config.profile.dtype)
    return {
        "model": model_key(source, hashes),
        "calibration": {
            "source": docs.source,
            "documents_sha256": docs.sha256,
            "num_tokens": cal.num_tokens,
            "seq_len": cal.seq_len,
        },
        "device": device,
        "dtype": dtype,
        "angular": config.selection.criterion == "angular",
    }


def quality_key(config: Config, source: ModelSource, heldout: list[str], hashes: cache.FileHashes) -> dict[str, Any]:
    """What the full model's scores depend on: the model, the task sample, the dtype and the held-out text."""
    q = config.quality
    device, dtype = _device_and_dtype(config, q.dtype)
    return {
        "model": model_key(source, hashes),
        "tasks": list(q.tasks),
        "limit": q.limit,
        "seed": q.seed,
        "lambada": {"limit": q.lambada_limit, "excluded": "calibration documents"},
        "device": device,
        "dtype": dtype,
        "perplexity": {
            "tokens": q.perplexity_tokens,
            "heldout_sha256": hashlib.sha256("\0".join(heldout).encode()).hexdigest(),
            "seq_len": config.calibration.seq_len,
        },
    }


def checkpoint_key(config: Config, profile: dict[str, Any], quality: dict[str, Any] | None) -> dict[str, Any]:
    """What the chosen depth and the written checkpoint depend on: the profile's inputs, every selection setting
    (criterion, latency budget, accuracy floors, strictness, kept ends, cost context), the quality settings and
    the healing (its method and settings; its calibration text is the profile's)."""
    return {
        "profile": profile,
        "selection": dataclasses.asdict(config.selection),
        "quality": quality,
        "heal": dataclasses.asdict(config.heal),
    }
