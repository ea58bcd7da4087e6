"""The one table renderer: text for the terminal, Markdown for reports."""

from __future__ import annotations

import pytest

from shortgpt_serve.tables import markdown_table, text_table


def test_text_table_aligns_columns_without_trailing_spaces() -> None:
    rows = [["1", "x"], ["222", "yyyy"]]
    assert text_table(["a", "bb"], rows) == "  a    bb\n---  ----\n  1     x\n222  yyyy"
    assert text_table(["a", "bb"], rows, align="ll") == "a    bb\n---  ----\n1    x\n222  yyyy"
    assert text_table(["a", "bb"], [], align="lr") == "a  bb\n-  --"


def test_markdown_table_alignment_row() -> None:
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert markdown_table(["a", "b"], [], align="rl") == "| a | b |\n|---:|---|"


def test_bad_alignment_is_refused() -> None:
    with pytest.raises(ValueError, match="align must give l or r"):
        text_table(["a"], [["1"]], align="c")
    with pytest.raises(ValueError, match="align must give l or r"):
        markdown_table(["a"], [["1"]], align="lr")
