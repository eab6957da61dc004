"""A router task forwards each ticket it answers to the task its answer names. Pure functions,
shared by the student lane (services/stream/pipeline.py) and the teacher worker
(services/teacher/worker.py), so both sit below the stream layer.

A router is an ordinary task (TaskSpec, adapter, thresholds, teacher, flywheel) whose
deployment entry says which of its categorical fields picks the next task (`route.field`) and
which label goes where (`route.to`). The ticket is forwarded, as received plus one
`RouteHop`, to that task's tickets topic; the specialist's result carries the whole chain.

Once per ticket, on its first published answer: a confident answer's forward is published with
its result, before the batch's offsets are committed; an escalated ticket is forwarded by the
teacher worker on its first published answer (the teacher's, or the student's `unverified` one
at the deadline). The worker records that first answer's routing label in the training log
before publishing, so a later correction and a re-delivered escalation forward nothing new and
name the same `forwarded_to`. A crash between the forward and its commit may repeat that same
forward (at least once); specialists key their results by ticket id, so a repeat overwrites.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any, Mapping

from pydantic import ValidationError

from schemas.classification import Classification
from schemas.routing import MAX_ROUTE_HOPS, RouteHop
from schemas.task import TaskSpec
from schemas.ticket import Ticket

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Forward:
    """One forwarded ticket: the record to publish and the task it goes to."""

    task: str
    topic: str
    key: bytes
    payload: bytes


@dataclass(frozen=True)
class Router:
    task: str  # this (router) task's name, recorded in the hop
    field: str  # the categorical field whose label picks the next task
    targets: Mapping[str, str]  # label -> task name; a label not listed stays here
    topics: Mapping[str, str]  # task name -> its tickets topic
    # task name -> the extra ticket fields its TaskSpec declares (its `inputs`); a field the
    # target does not declare would be refused there, so it travels in `metadata` instead.
    inputs: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def check(self, spec: TaskSpec) -> None:
        """Fail fast (ValueError) when the routes do not fit the router's TaskSpec."""
        fields = {f.name: f for f in spec.categorical_fields}
        if self.field not in fields:
            raise ValueError(f"route.field {self.field!r} is not a categorical field of task {spec.name!r}")
        unknown = sorted(set(self.targets) - set(fields[self.field].labels))
        if unknown:
            raise ValueError(f"route.to names labels {unknown[:5]} that field {self.field!r} does not have")
        # Every hop this router can write must fit RouteHop, or each such ticket fails at
        # forwarding time (and its batch, or its escalation record, with it).
        for label, target in self.targets.items():
            try:
                RouteHop(task=self.task, field=self.field, label=label, route="unverified", to=target)
            except ValidationError as exc:
                error = exc.errors()[0]
                raise ValueError(f"task {self.task!r}: route {label[:40]!r} -> {target!r} cannot be forwarded: "
                                 f"the hop's {error['loc'][0]}: {error['msg']}") from None

    def plan(self, ticket: Mapping[str, Any], result: Classification) -> Forward | None:
        """Where `result` sends `ticket` (None: its label routes nowhere, or a loop)."""
        return self.forward(ticket, result.ticket_id, result.fields.get(self.field), result.route.value)

    def forward(self, ticket: Mapping[str, Any], ticket_id: str, label: str | None, route: str) -> Forward | None:
        """`plan` from the routing field's label and the answer's route alone: the same
        forward, byte for byte, whenever it is rebuilt from a recorded first answer."""
        target = self.targets.get(label) if label is not None else None
        if target is None:
            return None
        chain = list(ticket.get("route_chain") or [])
        seen = {hop.get("task") for hop in chain if isinstance(hop, Mapping)} | {self.task}
        if target in seen or len(chain) >= MAX_ROUTE_HOPS:
            log.warning("not forwarding ticket %s to %s: routing loop (chain %s)", ticket_id, target,
                        [h.get("task") for h in chain if isinstance(h, Mapping)])
            return None
        hop = RouteHop(task=self.task, field=self.field, label=label, route=route, to=target)
        forwarded = self._for_target(target, ticket)
        forwarded["route_chain"] = [*chain, hop.model_dump(mode="json")]
        return Forward(target, self.topics[target], ticket_id.encode(),
                       json.dumps(forwarded, ensure_ascii=False).encode())

    def _for_target(self, target: str, ticket: Mapping[str, Any]) -> dict[str, Any]:
        declared = self.inputs.get(target)
        extras = {k: v for k, v in ticket.items() if k not in Ticket.model_fields}
        moved = {k: v for k, v in extras.items() if declared is not None and k not in declared}
        if not moved:
            return dict(ticket)
        kept = {k: v for k, v in ticket.items() if k not in moved}
        metadata = dict(kept.get("metadata") or {})
        metadata["inputs_not_declared_here"] = {**metadata.get("inputs_not_declared_here", {}), **moved}
        return {**kept, "metadata": metadata}


def forwarded_result(result: Classification, forward: Forward | None) -> Classification:
    """The router's own result, naming the task it forwarded the ticket to."""
    return result if forward is None else result.model_copy(update={"forwarded_to": forward.task})
