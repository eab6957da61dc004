"""One /metrics and /readyz for a process that serves several tasks (services/stream/swarm.py).

Each task keeps its own `ServiceMetrics` (its own registry, the same metric names); the hub
exposes them as one exposition in which every series gains a `task` label, each metric family
once. A single-task process does not use the hub: its series have no `task` label, and the
dashboard's `task=~"$task"` selector (".*" for All) matches them too.

Readiness: the process is ready when every task that loaded is ready. A task that failed to
load (`failed`: task -> reason) does not hold the others back; it shows as
`triage_ready{task="..."} 0` (pass a ServiceMetrics for it too) and on `/readyz/<task>`.
"""

from __future__ import annotations

from typing import Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from services.stream.metrics import ServiceMetrics


class _TaskLabelled:
    """A collector yielding every task's families, merged by name, with the `task` label."""

    def __init__(self, metrics: Mapping[str, ServiceMetrics]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for task, m in self.metrics.items():
            for family in m.registry.collect():
                out = merged.get(family.name)
                if out is None:
                    out = merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                out.samples.extend(Sample(s.name, {**s.labels, "task": task}, s.value, s.timestamp, s.exemplar)
                                   for s in family.samples)
        yield from merged.values()


class TaskMetricsHub:
    def __init__(self, metrics_by_task: Mapping[str, ServiceMetrics], failed: Mapping[str, str] | None = None) -> None:
        self.metrics = metrics_by_task
        self.failed = dict(failed or {})
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_TaskLabelled(self.metrics))  # type: ignore[arg-type]

    def exposition(self) -> bytes:
        return generate_latest(self._registry)

    def task_readiness(self, name: str) -> tuple[bool, str] | None:
        """(ready, reason) of one task; None for a task this process does not have."""
        if name in self.failed:
            return False, f"task failed to load: {self.failed[name]}"
        m = self.metrics.get(name)
        return None if m is None else m.readiness()

    def readiness(self) -> tuple[bool, str]:
        """Ready when every task that loaded is ready (and at least one did); the reason lists
        every task, a failed one too even without a ServiceMetrics of its own."""
        names = [*self.metrics, *(n for n in self.failed if n not in self.metrics)]
        loaded: list[bool] = []
        parts: list[str] = []
        for name in names:
            ok, why = self.task_readiness(name) or (False, "unknown task")
            if name not in self.failed:
                loaded.append(ok)
            state = "FAILED" if name in self.failed else "ready" if ok else "not ready"
            parts.append(f"{name}: {state} ({why})")
        return bool(loaded) and all(loaded), "; ".join(parts)
