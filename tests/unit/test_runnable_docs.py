"""Runnable docs (DESIGN convention 10): the README's quick-start commands are real.

The first fenced bash block of README.md holds exactly two commands (`make demo`, `make test`);
each names a Makefile target, and CI (`.ci/run`) runs the README's test command verbatim.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"^```bash\n(.*?)^```", text, re.M | re.S)
    assert block, "README.md has no ```bash block"
    lines = (line.split("#", 1)[0].strip() for line in block.group(1).splitlines())
    return [line for line in lines if line]


def makefile_targets() -> dict[str, list[str]]:
    """target -> recipe lines (tab-indented lines after `target: deps`)."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (REPO / "Makefile").read_text().splitlines():
        if line.startswith("\t") and current is not None:
            targets[current].append(line.strip())
            continue
        match = re.match(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", line)  # a rule, not `X := value`
        current = match.group(1) if match else None
        if current is not None:
            targets.setdefault(current, [])
    return targets


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_readme_quick_start_is_two_make_targets():
    commands = readme_commands()
    assert commands == ["make demo", "make test"], commands
    targets = makefile_targets()
    for command in commands:
        program, target = command.split()
        assert program == "make"
        assert target in targets, f"README's `{command}`: no such Makefile target"


def test_make_targets_run_what_the_readme_says():
    targets = makefile_targets()
    assert any("triage demo" in line for line in targets["demo"]), targets["demo"]
    assert any("pytest" in line for line in targets["test"]), targets["test"]


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if c.split()[-1] == "test")
    assert test_command in ci_commands(), ci_commands()
