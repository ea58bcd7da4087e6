"""Column-aligned tables, as plain text for the terminal and as Markdown for reports.

``align`` holds one letter per column, ``l`` (left) or ``r`` (right); columns without a letter are right-aligned
in text and left-aligned (a plain ``---``) in Markdown.
"""

from __future__ import annotations

from collections.abc import Sequence


def _aligns(align: str | None, n: int, default: str) -> str:
    letters = (align or "").ljust(n, default)
    if len(letters) != n or set(letters) - {"l", "r"}:
        raise ValueError(f"align must give l or r for each of the {n} columns, got {align!r}")
    return letters


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """Columns two spaces apart, a dashed rule under the header, no trailing spaces."""
    letters = _aligns(align, len(header), "r")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        parts = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, letters, strict=True))
        return "  ".join(parts).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub-flavoured Markdown table; ``r`` columns are right-aligned (``---:``)."""
    letters = _aligns(align, len(header), "l")
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in letters)
    return "\n".join(["| " + " | ".join(header) + " |", rule, *("| " + " | ".join(r) + " |" for r in rows)])
