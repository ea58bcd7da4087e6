"""Convert inputs vLLM and the checkpoint writer cannot take as they are (a GGUF file, pickle weights) once into
the cache, as a safetensors folder in Hugging Face format that names what it was converted from."""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shortgpt_serve.cache import FileHashes, folder_entry
from shortgpt_serve.errors import ModelError
from shortgpt_serve.fsutil import sha256_file

log = logging.getLogger(__name__)

SOURCE_RECORD = "shortgpt_source.json"
"""Written into folders we convert, naming what they were converted from."""
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def folder_hash(path: Path, weights: str = "*.safetensors", hasher: Callable[[Path], str] = sha256_file) -> str:
    """sha256 over config.json and the weight files, by name and content (``hasher``: each file's sha256)."""
    h = hashlib.sha256()
    for f in sorted([path / "config.json", *path.glob(weights)]):
        h.update(f.name.encode())
        h.update(hasher(f).encode())
    return h.hexdigest()


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
