from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from shortgpt_serve.calibration import batches, default_documents, load_documents, pack
from shortgpt_serve.errors import CalibrationError
from tests.conftest import CORPUS, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):  # type: ignore[no-untyped-def]
    """The same vocabulary, but a tokenizer that adds BOS on every call, as Llama's do."""
    import copy

    from tokenizers import processors

    tok = copy.deepcopy(tokenizer)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)]
    )
    assert tok("hello").input_ids[0] == bos
    return tok


def test_folder_of_txt_and_jsonl_and_split(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n\n\nThird.")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        for i in range(7):
            f.write(json.dumps({"text": f"record {i}"}) + "\n")
    (tmp_path / "ignored.csv").write_text("x,y")
    docs = load_documents(str(tmp_path), heldout_fraction=0.2, seed=0)
    everything = docs.calibration + docs.heldout
    assert sorted(everything) == sorted(
        ["First paragraph.", "Second paragraph.", "Third."] + [f"record {i}" for i in range(7)]
    )
    assert len(docs.heldout) == 2 and not set(docs.heldout) & set(docs.calibration)
    again = load_documents(str(tmp_path), heldout_fraction=0.2, seed=0)
    assert again == docs and again.sha256 == docs.sha256
    other = load_documents(str(tmp_path), heldout_fraction=0.2, seed=1)
    assert other.heldout != docs.heldout


def test_default_text_is_real_prose_with_a_heldout_part() -> None:
    docs, source = default_documents()
    assert len(docs) == 5153 and "LAMBADA" in source
    split = load_documents(None, 0.2, 0)
    unique = len(set(docs))
    assert unique > 5000  # a few passages repeat; they are kept once
    assert len(split.calibration) + len(split.heldout) == unique
    assert len(split.heldout) == round(unique * 0.2)
    assert not set(split.heldout) & set(split.calibration)


def test_pack_without_bos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import Documents

    cal = pack(Documents([CORPUS] * 5, [], "test"), tokenizer, num_tokens=200, seq_len=64)
    assert cal.num_tokens <= 200
    assert all(len(s) <= 64 for s in cal.sequences) and len(cal.sequences[0]) == 64
    stream = tokenizer(CORPUS + "\n\n", add_special_tokens=False).input_ids
    assert cal.sequences[0] == stream[:64]  # no prefix for a tokenizer that adds none


def test_pack_with_bos_puts_it_only_at_sequence_starts(bos_tokenizer) -> None:  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import Documents

    bos = bos_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    cal = pack(Documents([CORPUS] * 5, [], "test"), bos_tokenizer, num_tokens=300, seq_len=50)
    for seq in cal.sequences:
        assert seq[0] == bos
        assert bos not in seq[1:]


def test_too_short_text(tokenizer) -> None:  # type: ignore[no-untyped-def]
    from shortgpt_serve.calibration import Documents

    with pytest.raises(CalibrationError, match="shorter than one sequence of --seq-len 512"):
        pack(Documents(["a few words"], [], "test"), tokenizer, num_tokens=1024, seq_len=512)


def test_batches_pad_and_mask() -> None:
    ids, mask = next(batches([[5, 6, 7], [8]], 2, pad_id=0))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("x.csv", "a,b", "unsupported file type"),
        ("x.jsonl", "{not json\n", "x.jsonl:1 is not valid JSON"),
        ("x.txt", b"\xff\xfe\x00bad", "is not UTF-8 text"),
        ("empty.txt", "   \n\n  ", "no text found"),
    ],
)
def test_bad_calibration_files(tmp_path: Path, name: str, content: str | bytes, message: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(CalibrationError, match=message):
        load_documents(str(path))
