"""Write the shortened checkpoint: weights renumbered, config cut, tokenizer copied, provenance beside them.

Tensors are streamed shard by shard (peak memory about one shard, the model is never built). Removed layers'
tensors are dropped entirely, kept layers are renumbered 0..N-1, and nothing else is renamed. The folder is
written under a temp name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

from shortgpt_serve.errors import CheckpointError, ModelError
from shortgpt_serve.fsutil import atomic_dir, check_output_free, cores, map_threads, sha256_file
from shortgpt_serve.models.convert import SOURCE_RECORD
from shortgpt_serve.models.families import shortened_config
from shortgpt_serve.models.source import ModelSource
from shortgpt_serve.models.weights import (
    INDEX_NAME,
    copy_tensors,
    copy_verbatim,
    layer_pattern,
    read_header,
    weight_map,
)
from shortgpt_serve.provenance import HealingRecord, Provenance, build_provenance

PROVENANCE_NAME = "shortgpt.json"
MODEL_CARD_NAME = "README.md"
# Files of the source folder that we write ourselves or must not carry over.
NOT_COPIED = {"config.json", INDEX_NAME, SOURCE_RECORD, PROVENANCE_NAME, MODEL_CARD_NAME}
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


def check_removed(removed: list[int], num_layers: int) -> list[int]:
    if len(set(removed)) != len(removed):
        dup = sorted({i for i in removed if removed.count(i) > 1})
        raise CheckpointError(f"layer(s) {dup} listed more than once for removal; list each layer once.")
    bad = [i for i in removed if not 0 <= i < num_layers]
    if bad:
        raise CheckpointError(f"layer(s) {bad} do not exist; the model has layers 0..{num_layers - 1}.")
    if len(removed) >= num_layers:
        raise CheckpointError(f"cannot remove all {num_layers} layers; keep at least one.")
    return sorted(removed)


def rename_map(names: list[str], prefix: str, num_layers: int, removed: list[int]) -> dict[str, str | None]:
    """Old tensor name -> new name, or None where the tensor is dropped with its layer."""
    pattern = layer_pattern(prefix)
    gone = set(removed)
    new_index = {old: new for new, old in enumerate(i for i in range(num_layers) if i not in gone)}
    out: dict[str, str | None] = {}
    for name in names:
        m = pattern.match(name)
        if m is None:
            out[name] = name
            continue
        i = int(m.group(1))
        if i >= num_layers:
            raise CheckpointError(
                f"weight {name} belongs to layer {i}, but config.json says num_hidden_layers={num_layers}; "
                "the config and the weights disagree."
            )
        out[name] = None if i in gone else f"{prefix}.{new_index[i]}.{m.group(2)}"
    return out


def _write_weights(
    source: ModelSource,
    removed: list[int],
    out: Path,
    overrides: Mapping[str, bytes] | None = None,
    threads: int | None = None,
    known: Callable[[Path], str | None] | None = None,
) -> dict[str, str]:
    """Stream the kept tensors, renamed, shard by shard into ``out`` (``overrides``: new data for some, by source
    name); returns each written shard's sha256.

    sha256 is sequential within a file and costs more than the copy, so shards are written ``threads`` at a time
    (default: one per core), the largest first; each holds about one copy window in memory. A shard that comes
    out unchanged (every tensor kept under its own name, none replaced) is copied whole, and when ``known`` (the
    cache's hash memo) already holds the source file's sha256 it is not hashed again."""
    mapping = weight_map(source.path)
    renames = rename_map(list(mapping), source.family.layers_module, source.num_layers, removed)
    given: Mapping[str, bytes] = overrides or {}  # read per shard as it is written: values may be computed when asked
    stray = sorted(n for n in given if renames.get(n) is None)
    if stray:
        raise CheckpointError(f"new data given for tensors that are not kept: {stray[:3]}.")
    shards = sorted(set(mapping.values()))
    kept_by_shard: dict[str, list[tuple[str, str]]] = {s: [] for s in shards}
    for old, file in mapping.items():
        new = renames[old]
        if new is not None:
            kept_by_shard[file].append((old, new))
    nonempty = [s for s in shards if kept_by_shard[s]]
    single = len(nonempty) == 1
    jobs: list[tuple[str, str, dict[str, str], int]] = []
    unchanged: set[str] = set()  # shards whose every tensor is kept as it is: the output file equals the source
    for k, shard in enumerate(nonempty, 1):
        out_name = "model.safetensors" if single else f"model-{k:05d}-of-{len(nonempty):05d}.safetensors"
        header, _ = read_header(source.path / shard)
        metadata = {
            **(header.get("__metadata__") or {}),
            "format": (header.get("__metadata__") or {}).get("format", "pt"),
        }
        kept_bytes = sum(
            int(header[old]["data_offsets"][1]) - int(header[old]["data_offsets"][0]) for old, _ in kept_by_shard[shard]
        )
        jobs.append((shard, out_name, metadata, kept_bytes))
        names = {k for k in header if k != "__metadata__"}
        if (
            names == {old for old, new in kept_by_shard[shard] if old == new}
            and metadata == header.get("__metadata__")
            and not any(mapping.get(old) == shard for old in given)
        ):
            unchanged.add(shard)

    def write(job: tuple[str, str, dict[str, str], int]) -> tuple[int, str]:
        shard, out_name, metadata, kept_bytes = job
        src = source.path / shard
        digest = known(src) if known is not None and shard in unchanged else None
        if digest is not None:
            copy_verbatim(src, out / out_name)
            if known is not None and known(src) == digest:  # the file did not change while it was copied
                return kept_bytes, digest
        try:
            return copy_tensors(
                source.path / shard,
                kept_by_shard[shard],
                out / out_name,
                metadata,
                overrides={old: given[old] for old in given if mapping.get(old) == shard},
            )
        except ModelError as exc:
            raise CheckpointError(exc.message) from exc

    jobs.sort(key=lambda job: -job[3])  # the largest first: the last shard to finish is a small one
    threads = cores() if threads is None else threads
    if given and not isinstance(given, dict):
        threads = _threads_for(source.path, mapping, given, threads)
    written = map_threads(write, jobs, threads)
    new_map: dict[str, str] = {}
    hashes: dict[str, str] = {}
    total_size = 0
    for (shard, out_name, _, _), (size, digest) in zip(jobs, written, strict=True):
        hashes[out_name] = digest
        total_size += size
        for _old, new in kept_by_shard[shard]:
            new_map[new] = out_name
    if not single:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(new_map.items()))}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return hashes


def _threads_for(folder: Path, mapping: dict[str, str], computed: Mapping[str, bytes], most: int) -> int:
    """Shards written at once when the new data is computed as the writer asks (merged adapters): each shard in
    progress holds its new tensors' bytes and one tensor's float64 working set, so no more at a time than fit
    in half the available memory."""
    import psutil

    sizes: dict[str, int] = {}
    largest = 0
    headers: dict[str, dict[str, object]] = {}
    for name in computed:
        shard = mapping[name]
        if shard not in headers:
            headers[shard] = read_header(folder / shard)[0]
        info = headers[shard][name]
        assert isinstance(info, dict)
        start, end = info["data_offsets"]
        sizes[shard] = sizes.get(shard, 0) + end - start
        largest = max(largest, end - start)
    per_shard = max(sizes.values(), default=0) + 12 * largest  # float64 copies of a half-precision tensor: 4x each
    available = int(psutil.virtual_memory().available)
    return max(1, min(most, available // 2 // max(1, per_shard)))


def side_files(src: Path) -> list[Path]:
    """The source folder's files copied into the checkpoint as they are: tokenizer, templates, generation config."""
    return [
        f
        for f in sorted(src.iterdir())
        if f.is_file()
        and f.name not in NOT_COPIED
        and not f.name.endswith(NOT_COPIED_SUFFIXES)
        and not f.name.startswith(".")
    ]


def _copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for f in side_files(src):
        shutil.copy2(f, out / f.name)
        copied.append(f.name)
    return copied


def _healing_text(heal: HealingRecord) -> str:
    if heal.method == "none":
        return "the rest are unchanged."
    text = (
        "each run of removed layers was healed by a least-squares linear map, fitted on calibration text and folded "
        "into the down-projection of the kept layer before it (ReplaceMe-style)"
    )
    if heal.method == "distill":
        trained = f"rank-{heal.rank} adapters merged into their weights" if heal.rank else "the layers themselves"
        text += (
            "; then the kept layers were trained briefly toward the full model's next-token distribution on "
            f"calibration text (KL distillation; {trained})"
        )
    return text + "; the architecture is the standard one, with fewer layers."


def model_card(provenance: Provenance) -> str:
    src = provenance.source
    removed = list(provenance.removed_layers)
    n_full = src.num_layers
    sel = provenance.selection
    cal = provenance.calibration
    lines = [
        "---",
        "tags: [shortgpt, layer-pruning, shortgpt-serve]",
        f"base_model_origin: {json.dumps(src.origin)}",
        "---",
        "",
        f"# {provenance.served_model_name or src.name}: {src.name} shortened to "
        f"{provenance.num_kept} of {n_full} layers",
        "",
        f"Written by shortgpt-serve {provenance.tool_version} on {provenance.created}.",
        "",
        "Decoder layers with the lowest Block Influence (ShortGPT, Men et al. 2024: one minus the mean cosine between "
        "a layer's input and output hidden states over calibration text) were removed; "
        + _healing_text(provenance.healing),
        "",
        f"- Source: {src.origin} (sha256 {src.sha256[:16]}...)",
        f"- Removed layers (original indices): {removed}",
        f"- Calibration: {cal.source} ({cal.num_tokens} tokens)",
    ]
    heal = provenance.healing
    if heal.method == "distill":
        how = f"rank-{heal.rank} adapters merged" if heal.rank else "the kept layers trained"
        lines.append(
            f"- Healing: distill ({heal.steps} steps, {heal.tokens} calibration tokens, {how}; training KL "
            f"{heal.kl_first} -> {heal.kl_last} nats/token)"
        )
    elif heal.method != "none":
        folded = ", ".join(f"{r['removed']} -> layer {r['kept_layer']}" for r in heal.runs)
        lines.append(f"- Healing: {heal.method} ({folded}; {heal.calibration_tokens} calibration tokens)")
    if sel is not None:
        lines += [
            f"- Latency budget: {sel.budget}; predicted cost: {sel.cost_ratio} of the full model",
            f"- Parameters: {sel.params_short:,} of {sel.params_full:,}",
        ]
    short = provenance.shortened_quality
    if short is not None:
        tasks = ", ".join(f"{t} {v.score:.3f} ({v.metric})" for t, v in short.tasks.items())
        retained = 1.0 if short.retained is None else short.retained
        lines += [
            f"- Quality retained: {retained:.3f} of the full model's (floor {sel and sel.min_quality}); "
            f"measured 0-shot: {tasks}; see `report.md`",
            f"- Latency budget met: {sel and sel.latency_met}; accuracy floor met: {sel and sel.quality_met}",
        ]
    else:
        lines += ["- Quality: not measured; check this checkpoint on your own tasks before use"]
    lines += [
        "",
        f"Everything needed to reproduce this folder is in `{PROVENANCE_NAME}`.",
        "",
    ]
    return "\n".join(lines)


def write_checkpoint(
    source: ModelSource,
    removed: list[int],
    output: Path,
    *,
    provenance: Provenance | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
    seal: Callable[[Path], None] | None = None,
    overrides: Mapping[str, bytes] | None = None,
    known: Callable[[Path], str | None] | None = None,
) -> Path:
    """Write ``source`` without the ``removed`` layers to ``output`` (a folder that must not exist unless
    ``overwrite``). ``provenance``: the record written beside the weights (default: the bare record of the cut,
    :func:`~shortgpt_serve.provenance.build_provenance`); the files' sha256 are added to it. ``extra_files``
    (name -> bytes, e.g. the report) are written into the folder too. ``seal(folder)`` runs on the complete temp
    folder just before it is renamed into place (the cache writes its manifest there). ``overrides``: new raw data
    for some kept tensors, by source name (healed weights: same dtype and shape). ``known(path)``: a source file's
    sha256 if already known (the cache's memo), else None; shards written unchanged are then not hashed again."""
    removed = check_removed(list(removed), source.num_layers)
    check_output_free(output, overwrite=overwrite)
    if output.exists() and not output.is_dir():
        raise CheckpointError(f"output {output} exists and is not a folder; choose another --output.")
    if output.resolve() == source.path.resolve():
        raise CheckpointError("--output is the source model's own folder; choose another folder.")
    record = provenance or build_provenance(source, removed)
    if list(record.removed_layers) != removed:
        raise CheckpointError(
            f"the provenance record lists layers {list(record.removed_layers)} removed, not {removed}; "
            "build it with the same layers."
        )
    try:
        with atomic_dir(output, overwrite=overwrite) as tmp:
            hashes = _write_weights(source, removed, tmp, overrides, known=known)
            config = shortened_config(source.config, removed)
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            _copy_side_files(source.path, tmp)
            (tmp / MODEL_CARD_NAME).write_text(model_card(record))
            for name, data in (extra_files or {}).items():
                (tmp / name).write_bytes(data)
            files = {f.name: hashes.get(f.name) or sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
            (tmp / PROVENANCE_NAME).write_text(dataclasses.replace(record, files=files).dumps())
            if seal is not None:
                seal(tmp)
    except OSError as exc:
        raise CheckpointError(
            f"cannot write {output} ({exc.strerror or exc}); check free space and permissions."
        ) from exc
    return output


def read_provenance(folder: Path) -> Provenance:
    path = folder / PROVENANCE_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {PROVENANCE_NAME}; it was not written by shortgpt-serve.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not readable JSON ({exc}); the checkpoint is damaged, rewrite it.") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged, rewrite it.")
    try:
        return Provenance.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path} is not a provenance record ({type(exc).__name__}: {exc}); the checkpoint is damaged, rewrite it."
        ) from exc


def verify_checkpoint(
    folder: Path, hasher: Callable[[Path], str] = sha256_file, *, threads: int | None = None
) -> Provenance:
    """Check every file listed in the provenance record against its sha256; returns the record.

    ``hasher``: how a file's sha256 is found (the cache passes its memo, so unchanged files are not read again).
    ``threads``: how many files are hashed at once; by default one per core with the plain ``sha256_file``, and
    one at a time with any other hasher, which may keep state that is not safe to share between threads."""
    record = read_provenance(folder)
    if not record.files:
        raise CheckpointError(f"{folder}/{PROVENANCE_NAME} lists no files to verify; rewrite the checkpoint.")
    for name in record.files:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, rewrite it.")
    if threads is None:
        threads = cores() if hasher is sha256_file else 1
    names = sorted(record.files, key=lambda n: -(folder / n).stat().st_size)  # the largest first
    digests = map_threads(lambda n: hasher(folder / n), names, threads)
    for name, digest in zip(names, digests, strict=True):
        if digest != record.files[name]:
            raise CheckpointError(
                f"{folder / name} does not match its recorded sha256; the checkpoint is damaged, rewrite it."
            )
    return record
