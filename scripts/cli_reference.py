"""Write docs/cli.md from the commands' own --help, so the reference cannot drift (tests check it).

.venv/bin/python scripts/cli_reference.py          # rewrite docs/cli.md
.venv/bin/python scripts/cli_reference.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from click.testing import CliRunner

from shortgpt_serve.cli import cli

OUT = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    runner = CliRunner()
    parts = ["# CLI reference", "", "Generated from `--help` by `scripts/cli_reference.py`; do not edit by hand.", ""]
    commands: list[list[str]] = [[]]
    for name, command in cli.commands.items():
        commands.append([name])
        if isinstance(command, click.Group):  # e.g. `cache list`, `cache clear`
            commands += [[name, sub] for sub in command.commands]
    for args in commands:
        title = " ".join(["shortgpt-serve", *args])
        text = runner.invoke(cli, [*args, "--help"], prog_name="shortgpt-serve", terminal_width=100).output
        parts += [f"## `{title}`", "", "```", text.rstrip(), "```", ""]
    return "\n".join(parts)


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is stale; run: .venv/bin/python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
