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


# --- "Your own desk": the adoption walkthrough -------------------------------------------------
def desk_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Your own desk")
    return text[start : text.index("\n## ", start + 1)]


def fenced(section: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section, re.M | re.S)


def desk_commands() -> list[list[str]]:
    """Every `triage ...` command of the walkthrough: bash blocks and inline code."""
    import shlex

    section = desk_section()
    lines = [line.split("#", 1)[0].strip() for block in fenced(section, "bash") for line in block.splitlines()]
    inline = re.findall(r"`(triage [^`]+)`", section)
    return [shlex.split(c) for c in lines + inline if c.startswith("triage ")]


def test_the_desk_walkthrough_json_is_what_the_product_accepts():
    from schemas.classification import Classification
    from schemas.task import TaskSpec
    from services.stream.validation import parse_ticket

    ticket, result, task = fenced(desk_section(), "json")
    parsed = parse_ticket(ticket.encode(), max_bytes=64_000, max_text_chars=4_000)
    assert parsed.id == "T-1042", parsed  # a Ticket, not a Rejection
    spec = TaskSpec.model_validate_json(task)
    answer = Classification.model_validate_json(result)
    assert answer.ticket_id == parsed.id
    assert {f.name for f in spec.categorical_fields} == set(answer.fields)
    assert all(v in spec.field(k).labels for k, v in answer.fields.items())
    assert spec.entity_field is not None and answer.entities
    assert {e.type for e in answer.entities} <= {t.name for t in spec.entity_field.entity_types}
    assert all(e.text in parsed.text for e in answer.entities)


def test_the_desk_walkthrough_commands_parse_and_status_says_what_the_readme_says(tmp_path, monkeypatch, capsys):
    import json

    from services.cli import build_parser, main

    commands = desk_commands()
    assert {c[1] for c in commands} >= {"serve", "status", "distill", "bootstrap"}, commands
    parser = build_parser()
    for command in commands:
        parser.parse_args(command[1:])  # exits (fails the test) on an unknown command or flag
    exports = {k: v for block in fenced(desk_section(), "bash") for line in block.splitlines()
               if line.startswith("export ") for k, v in re.findall(r"(\w+)=(\S+)", line)}
    from services.settings import Settings

    assert set(exports) <= {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}, exports
    # `triage status` on an empty log with the README's task prints the README's numbers
    task_path = tmp_path / "my-desk.json"
    task_path.write_text(fenced(desk_section(), "json")[2])
    for key in [k for k in __import__("os").environ if k.startswith("TRIAGE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRIAGE_TASK_PATH", str(task_path))
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(tmp_path / "registry"))
    assert main(["status"]) == 0
    evaluation = json.loads(capsys.readouterr().out)["evaluation"]
    section = desk_section()
    assert f'"needed_to_distil": {evaluation["needed_to_distil"]}`' in section, evaluation
    tickets = re.search(r"about (\d+) more tickets", evaluation["next"]).group(1)
    assert f"about {tickets} more tickets at the cold-start share of 20%" in " ".join(section.split())
