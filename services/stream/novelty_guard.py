"""A launch is never certified: escalate the tickets the student gives a label that the teacher
keeps replacing with one the adapter never learned.

The threshold certifies ε on traffic like the adapter's held-out slice. Tickets of an intent
the adapter never trained on (a product launch) are not like it: the student files them under
its nearest known label, often confidently, and every such answer is wrong (bench/drift.py
measured 6-8% accepted error against ε = 3% in the launch windows before this guard). The
evidence arrives with the launch's first escalations and audits: a teacher label the adapter
never trained on ("novel", services/stream/drift.py) on a ticket the student called P.

Rule, per (adapter, field, student label P): P is *guarded* while at least `min_novel` of the
last `history` teacher answers on tickets the student called P were novel; a guarded P's
tickets escalate whatever their confidence. Without drift a novel teacher label cannot occur
(the adapter trained on every label its training log held; a fallible teacher still answers
from the task's labels), so one is evidence, not noise (`min_novel` 1, the default; bench/drift.py
could not tell 1 from 2). Escalating P sends every P ticket to the teacher, so P's history
refreshes fast: the guard lifts itself once P's tickets stop being novel, and a new adapter
(the distil that learns the launch) starts unguarded. What it cannot see: the launch tickets a
label takes before the teacher has answered anything novel on it (the first launch window
stays above ε, bench/README.md).

Pure: no I/O. The drift tracker feeds it teacher answers (`observe`); the pipeline asks it
(`guarded`). It sees what its own replica's teacher worker sees: a student-only replica
(`--role student`) has no teacher answers and guards nothing (README, "8. Drift and launches").
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Mapping

# on_change(adapter_id, field, label, guarded, novel, seen): a label turned guarded or lifted
OnChange = Callable[[str | None, str, str, bool, int, int], None]


class NoveltyGuard:
    def __init__(self, history: int = 50, min_novel: int = 1, on_change: OnChange | None = None) -> None:
        if history < 1 or not 1 <= min_novel <= history:
            raise ValueError("need history >= 1 and 1 <= min_novel <= history")
        self.history, self.min_novel, self.on_change = history, min_novel, on_change
        # adapter -> (field, student label) -> novel flags of its last teacher answers; the two
        # newest adapters only (late answers for the one before a swap still land)
        self._seen: dict[str, dict[tuple[str, str], deque[bool]]] = {}
        self._guarded: dict[str, set[tuple[str, str]]] = {}

    def observe(self, adapter_id: str | None, student: Mapping[str, object],
                novel: Mapping[str, bool]) -> None:
        """A teacher answer on a ticket `adapter_id` labelled `student` (field -> label);
        `novel`: per field, whether the teacher's label is one the adapter never trained on."""
        if adapter_id is None:
            return  # no adapter: everything escalates anyway
        if adapter_id not in self._seen:
            self._seen[adapter_id], self._guarded[adapter_id] = {}, set()  # a new adapter starts unguarded
            for old in list(self._seen)[:-2]:
                del self._seen[old], self._guarded[old]
        seen, guarded = self._seen[adapter_id], self._guarded[adapter_id]
        for name, fresh in novel.items():
            label = student.get(name)
            if not isinstance(label, str):
                continue
            key = (name, label)
            flags = seen.setdefault(key, deque(maxlen=self.history))
            flags.append(bool(fresh))
            now = sum(flags) >= self.min_novel
            if now != (key in guarded):
                (guarded.add if now else guarded.discard)(key)
                if self.on_change is not None:
                    self.on_change(adapter_id, name, label, now, sum(flags), len(flags))

    def guarded(self, adapter_id: str | None, labels: Mapping[str, object]) -> list[str]:
        """The fields of an answer of `adapter_id` whose label is guarded (escalate them)."""
        guarded = self._guarded.get(adapter_id) if adapter_id is not None else None
        if not guarded:
            return []
        return [name for name, label in labels.items() if (name, label) in guarded]

    def active(self, adapter_id: str | None) -> list[str]:
        """`adapter_id`'s guarded labels, as `label` or `field=label` (for status and logs)."""
        keys = self._guarded.get(adapter_id, set()) if adapter_id is not None else set()
        one_field = len({name for name, _ in self._seen.get(adapter_id or "", {})}) <= 1
        return sorted(label if one_field else f"{name}={label}" for name, label in keys)
