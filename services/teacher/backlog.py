"""Drain the teacher backlog: label tickets the teacher missed, without letting one starve the rest.

The backlog is the training log's `pending` table. One pass:

- picks up to `limit` tickets that are not parked, fewest attempts first, then oldest;
- asks the teacher with at most `concurrency` calls in flight (small, so live escalations
  keep most of the teacher's slots after an outage);
- a failure that is the ticket's own (invalid answer, a per-request 4xx) or a transient one
  (timeout, 5xx, after the client's retries) charges that ticket one attempt and the pass
  goes on; at `max_attempts` the ticket is parked (kept, counted, never picked again until
  `TrainingLog.unpark`). Transient failures also feed the client's circuit breaker, so a
  teacher that is really down soon answers "circuit_open" and stops the pass;
- a teacher-wide refusal (circuit_open, over_budget, a misconfigured key or model) stops the
  pass: tickets not yet asked are not charged, the refused ones neither;
- each labelled ticket goes to `on_labelled(ticket_id, text, answer)` (the caller logs the
  training example) and then leaves the backlog.

TrainingLog calls are synchronous SQLite: they run in a worker thread, and so does
`on_labelled` (it usually appends to the training log; it must be thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from services.teacher.client import TeacherUnavailable

if TYPE_CHECKING:
    from services.teacher.client import Teacher, TeacherAnswer
    from services.teacher.training_log import TrainingLog

log = logging.getLogger(__name__)

OnLabelled = Callable[[str, str, "TeacherAnswer"], None]


@dataclass
class BacklogPass:
    labelled: int = 0  # answered, handed to on_labelled, removed from the backlog
    failed: int = 0  # charged one attempt (parked ones included)
    parked: int = 0  # reached max_attempts in this pass
    stopped: str | None = None  # the teacher-wide reason that ended the pass early


async def drain_backlog(
    teacher: Teacher, training_log: TrainingLog, *, limit: int = 64, concurrency: int = 4,
    max_attempts: int = 5, on_labelled: OnLabelled | None = None,
) -> BacklogPass:
    """One pass over the backlog; see the module docstring for the policy."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    result = BacklogPass()
    todo = iter(await asyncio.to_thread(training_log.pending, limit))

    async def worker() -> None:
        for ticket_id, text in todo:  # shared iterator: each ticket goes to one worker
            if result.stopped is not None:
                return
            try:
                answer = await teacher.label(text)
            except TeacherUnavailable as exc:
                if exc.scope == "teacher":
                    result.stopped = result.stopped or exc.reason
                    return
                result.failed += 1
                parked = await asyncio.to_thread(
                    training_log.record_failure, ticket_id, exc.reason, max_attempts=max_attempts)
                if parked:
                    result.parked += 1
                    log.warning("backlog ticket %s parked after %d failed attempts (last: %s)",
                                ticket_id, max_attempts, exc)
                continue
            if on_labelled is not None:
                # In a worker thread (it usually writes the training log: SQLite + fsync);
                # before resolving: a crash re-asks, never loses.
                await asyncio.to_thread(on_labelled, ticket_id, text, answer)
            await asyncio.to_thread(training_log.resolve_pending, [ticket_id])
            result.labelled += 1

    # A bug (anything but TeacherUnavailable) cancels the other workers and propagates;
    # what was labelled until then is already resolved.
    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, concurrency)):
                group.create_task(worker())
    except BaseExceptionGroup as errors:
        raise errors.exceptions[0] from None
    if result.labelled or result.failed or result.stopped:
        log.info("backlog pass: %s", result)
    return result
