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
        states = {name: self.task_readiness(name) for name in self.metrics}
        loaded = [ok for name, (ok, _) in states.items() if name not in self.failed]  # type: ignore[misc]
        ready = bool(loaded) and all(loaded)
        reasons = "; ".join(f"{name}: {'FAILED' if name in self.failed else 'ready' if ok else 'not ready'} ({why})"
                            for name, (ok, why) in states.items())  # type: ignore[misc]
        return ready, reasons
