"""Chain the stages: model -> calibration -> profile -> selection -> checkpoint.

Library callers and the CLI share this; serving is a separate step on the folder it returns.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve import __version__
from shortgpt_serve.calibration import Documents, load_documents, pack
from shortgpt_serve.checkpoint import PROVENANCE_NAME, verify_checkpoint, write_checkpoint
from shortgpt_serve.config import Config
from shortgpt_serve.errors import CheckpointError
from shortgpt_serve.models import ModelSource, load_model, load_tokenizer, resolve_model
from shortgpt_serve.profile import LayerProfile, profile_model
from shortgpt_serve.selection import CostModel, Selection, select_depth

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    source: ModelSource
    profile: LayerProfile
    selection: Selection
    checkpoint: Path
    served_model_name: str
    provenance: dict[str, Any]
    reused: bool


def served_name(config: Config, source: ModelSource) -> str:
    return config.serve.served_model_name or f"{source.name}-short"


def read_calibration(config: Config) -> Documents:
    cal = config.calibration
    return load_documents(cal.path, cal.heldout_fraction, cal.seed)


def run_profile(config: Config, source: ModelSource, docs: Documents, progress: bool = True) -> LayerProfile:
    """Load the model and measure every layer's Block Influence on the calibration documents."""
    cal = config.calibration
    calib = pack(docs, load_tokenizer(source), cal.num_tokens, cal.seq_len)
    log.info(
        "Calibration: %d sequences, %d tokens of %s (%d documents held out)",
        len(calib.sequences),
        calib.num_tokens,
        calib.source,
        len(docs.heldout),
    )
    log.info("Loading %s for profiling", source.origin)
    model = load_model(source, config.profile.device, config.profile.dtype)
    try:
        return profile_model(
            model,
            source.family,
            calib,
            batch_size=config.profile.batch_size,
            model_sha256=source.sha256,
            progress=progress,
        )
    finally:
        del model
        gc.collect()


def default_output(config: Config, source: ModelSource, profile: LayerProfile, selection: Selection) -> Path:
    key = hashlib.sha256(
        json.dumps(
            [
                source.sha256,
                selection.removed,
                profile.calibration_sha256,
                profile.num_tokens,
                selection.budget,
                __version__,
            ]
        ).encode()
    ).hexdigest()[:12]
    n_kept = selection.num_layers - len(selection.removed)
    return config.resolved_cache_dir() / "checkpoints" / f"{source.name}-{n_kept}of{selection.num_layers}-{key}"


def prepare(config: Config, progress: bool = True) -> Prepared:
    """Profile, select the depth and write (or reuse) the shortened checkpoint."""
    if config.output and Path(config.output).expanduser().exists() and not config.overwrite:
        raise CheckpointError(
            f"output folder {config.output} already exists; pass --overwrite or choose another --output."
        )
    docs = read_calibration(config)  # cheap, and fails before any model work if the text is unusable
    source = resolve_model(config.model, config.resolved_cache_dir())
    profile = run_profile(config, source, docs, progress)
    cost = CostModel.from_checkpoint(
        source.path, source.config, source.family.layers_module, config.selection.cost_context_tokens
    )
    sel = config.selection
    selection = select_depth(profile.bi, cost, sel.budget, sel.keep_first, sel.keep_last)
    name = served_name(config, source)
    record = {
        "served_model_name": name,
        "block_influence": profile.bi,
        "calibration": {
            "source": profile.calibration_source,
            "sha256": profile.calibration_sha256,
            "num_tokens": profile.num_tokens,
            "num_sequences": profile.num_sequences,
            "seq_len": profile.seq_len,
            "heldout_fraction": config.calibration.heldout_fraction,
            "seed": config.calibration.seed,
        },
        "selection": {
            "criterion": "bi",
            "budget": selection.budget,
            "cost_ratio": selection.cost_ratio,
            "cost_context_tokens": config.selection.cost_context_tokens,
            "params_full": selection.params_full,
            "params_short": selection.params_short,
            "reason": selection.reason,
        },
    }
    output = Path(config.output).expanduser() if config.output else default_output(config, source, profile, selection)
    reused = False
    if config.output is None and (output / PROVENANCE_NAME).is_file():
        try:
            verify_checkpoint(output)
            reused = True
            log.info("Reusing the verified checkpoint %s", output)
        except CheckpointError as exc:
            log.warning("Rewriting %s: %s", output, exc)
    if not reused:
        log.info("Writing the shortened checkpoint to %s", output)
        write_checkpoint(
            source, selection.removed, output, provenance=record, overwrite=config.overwrite or config.output is None
        )
    provenance = json.loads((output / PROVENANCE_NAME).read_text())
    return Prepared(source, profile, selection, output, name, provenance, reused)
