"""Print a benchmark's result and append it to benchmarks/results/<name>.md, the record kept beside the scripts."""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def record(name: str, lines: list[str]) -> None:
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f"{name}.md", "a") as f:
        f.write(text + "\n")
