"""`bench/soak.py --fake-student`: the soak's orchestration without an engine, in a minute.

Each replica is the real service (`TriageService`: student consumer, teacher lane, training
log, registry watch, control topic, metrics) configured through the same TRIAGE_* variables,
with a fake classifier instead of vLLM: `FAKE_MS_PER_TICKET` per ticket, a confident answer for
70% of texts (by hash) and an unsure one (escalated) for the rest. The nightly distil is a
stand-in too (`fake_candidate`): a copy of the live adapter under a new content id, promoted
with `triage promote` so the replicas swap as after a real distil. What this checks is the
plumbing (loss, duplicates, lag, swaps, memory of the Python side), not the engine's figures.

    python -m bench._soak_fake        # a replica (bench/soak.py starts it)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

FAKE_MS_PER_TICKET = 20.0


class FakeStudent:
    model_name = "fake-student"

    def __init__(self, task: Any) -> None:
        self.field = task.fields[0]
        self.live_adapter: Any = None

    async def classify(self, texts: list[str], *, adapter: Any = None) -> list[Any]:
        from schemas.classification import FieldPrediction
        from services.student.engine import StudentPrediction

        await asyncio.sleep(FAKE_MS_PER_TICKET / 1000 * len(texts) + 0.05)
        chosen = adapter or self.live_adapter
        out = []
        for text in texts:
            h = int(hashlib.sha256(text.encode()).hexdigest(), 16)
            confidence = 0.9999 if h % 10 < 7 else 0.3
            label = self.field.labels[h % len(self.field.labels)]
            out.append(StudentPrediction(fields={self.field.name: FieldPrediction(label=label, confidence=confidence)},
                                         distribution={self.field.name: [confidence]},
                                         adapter_id=getattr(chosen, "adapter_id", None)))
        return out

    async def use_adapter(self, adapter: Any) -> None:
        self.live_adapter = adapter


def fake_candidate(registry_dir: Path, run_dir: Path) -> Path:
    """A copy of the live adapter with a new content id (its config names this run)."""
    from services.student.registry import AdapterRegistry

    live = AdapterRegistry(registry_dir).current()
    if live is None:
        raise SystemExit(f"{registry_dir}: no current adapter to copy")
    out = run_dir / "adapter"
    shutil.copytree(live.path, out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["soak_fake_candidate"] = run_dir.name  # hashed into the id; never loaded by a real engine
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def main() -> int:
    from schemas.task import TaskSpec
    from services.logs import configure_logging
    from services.settings import Settings
    from services.stream.app import TriageService

    configure_logging("INFO", "text")
    settings = Settings()
    service = TriageService(settings, classifier=FakeStudent(TaskSpec.from_file(settings.task_path)))
    asyncio.run(service.app.run())
    return service.exit_code


if __name__ == "__main__":
    sys.exit(main())
