"""The tree shows the architecture: the dependency directions are enforced, not hoped for.

- schemas/ (message contracts) imports nothing from services/ or trainer/;
- nothing in the product (services/ outside services/dev/, trainer/) imports the dev package
  (embedded broker, teacher stand-in, demo, dataset locators); only the composition root
  `services/cli.py` may, to register the dev subcommands when that package is installed;
- services/ does not import trainer/ (the trainer builds on the service's prompt and engine,
  not the other way round), again except the CLI that runs both;
- the teacher and student layers (services/teacher/, services/student/) do not import the
  stream layer (services/stream/: Kafka, the hot path, Prometheus) that wires them, not even
  for a type: what both lanes share sits below them (the router in schemas/forwarding.py, the
  teacher's outcome names in services/teacher/client.py) or is passed in (a Protocol);
- no import cycles among the modules of schemas/, services/ and trainer/ (lazy imports in a
  function count: a cycle is one design, not two modules);
- importing the service's modules loads neither the dev package nor vLLM, torch or
  transformers (nothing heavy at import time).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMPOSITION_ROOT = REPO / "services" / "cli.py"


def module_name(path: Path, root: Path = REPO) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in the file names (at any depth)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def offenders(files: list[Path], forbidden: str) -> dict[str, list[str]]:
    found = {}
    for path in files:
        bad = sorted(m for m in imported_modules(path) if m == forbidden or m.startswith(forbidden + "."))
        if bad:
            found[str(path)] = bad
    return found


def test_schemas_import_nothing_from_services_or_trainer():
    files = python_files("schemas")
    assert files
    assert offenders(files, "services") == {}
    assert offenders(files, "trainer") == {}


def test_product_never_imports_the_dev_package():
    product = [p for p in python_files("services", "trainer")
               if not p.is_relative_to(REPO / "services" / "dev") and p != COMPOSITION_ROOT]
    assert len(product) > 15
    assert offenders(product, "services.dev") == {}


def test_services_do_not_import_the_trainer():
    services = [p for p in python_files("services")
                if not p.is_relative_to(REPO / "services" / "dev") and p != COMPOSITION_ROOT]
    assert offenders(services, "trainer") == {}


def test_teacher_and_student_layers_do_not_reach_up_into_the_stream_layer():
    lower = python_files("services/teacher", "services/student")
    assert len(lower) > 10
    assert offenders(lower, "services.stream") == {}


def import_cycles(files: list[Path], root: Path = REPO) -> list[list[str]]:
    """The import graph's cycles among `files` (strongly connected components of 2+ modules,
    or a module importing itself)."""
    names = {module_name(p, root): p for p in files}
    graph = {name: {m if m in names else m.rsplit(".", 1)[0] for m in imported_modules(path)} & set(names)
             for name, path in names.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return cycles


def test_no_import_cycles():
    files = python_files("schemas", "services", "trainer")
    assert len(files) > 40
    assert import_cycles(files) == []


def test_the_checker_sees_a_violation(tmp_path):
    """The AST check is not vacuous: a planted import is found, nested or not."""
    planted = tmp_path / "bad.py"
    planted.write_text("def f():\n    from services.dev.standin import run_standin\n    import services.dev\n")
    found = imported_modules(planted)
    assert {"services.dev", "services.dev.standin"} <= found
    assert offenders([REPO / "services" / "cli.py"], "services.dev")  # the one allowed place
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.c import g\n")  # lazy: still an edge
    (pkg / "c.py").write_text("import pkg.a\nfrom typing import TYPE_CHECKING\n")
    (pkg / "d.py").write_text("from pkg.a import something\n")  # into the cycle, not part of it
    assert import_cycles(sorted(pkg.glob("*.py")), tmp_path) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_importing_the_service_loads_no_dev_module_and_nothing_heavy():
    code = (
        "import sys\n"
        "import services.stream.app, services.stream.pipeline, services.student.engine, "
        "services.student.registry, services.teacher.client, services.teacher.bootstrap, "
        "services.teacher.training_log, services.settings, trainer.distill, trainer.evaluate\n"
        "print(sorted(m for m in sys.modules if m.startswith('services.dev') or "
        "m.split('.')[0] in ('vllm', 'torch', 'transformers')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
