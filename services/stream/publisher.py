"""Publishing a batch's outcomes: every record acknowledged by the broker, or a clear failure.

A record the producer refuses for a reason of its own (too large for the request limit) is
that ticket's problem, not the batch's: it is replaced by a bounded dead-letter record
(`publish_rejected`) and the rest of the batch goes through. Anything else (broker down,
timeouts) fails the batch, which is retried from its first offset.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence

from services.stream.pipeline import Outcome
from services.stream.validation import Rejection

log = logging.getLogger(__name__)

HEADERS = {"content-type": "application/json"}


def _per_record_errors() -> tuple[type[BaseException], ...]:
    from aiokafka import errors

    return tuple(getattr(errors, name) for name in ("MessageSizeTooLargeError", "RecordTooLargeError")
                 if hasattr(errors, name))


async def publish_outcomes(
    broker: Any, outcomes: Sequence[Outcome], *, topics: dict[str, str],
    replica_id: str, dead_letter: Callable[[Any, Rejection], Outcome],
) -> list[Outcome]:
    """Publish every outcome and wait for the broker's acks; returns what was published
    (refused records replaced by their dead-letter). `topics`: outcome kind -> topic.
    Raises for batch-level failures."""
    per_record = _per_record_errors()
    headers = {**HEADERS, "triage-replica": replica_id}

    async def send(outcome: Outcome) -> Any:
        topic = outcome.topic or topics[outcome.kind]
        try:
            future = await broker.publish(outcome.payload, topic, key=outcome.key, headers=headers,
                                          no_confirm=True)
            return await future
        except per_record as exc:
            return exc

    published = list(outcomes)
    sent = await asyncio.gather(*(send(o) for o in published))
    refused = [i for i, r in enumerate(sent) if isinstance(r, BaseException)]
    if refused:
        replacements = []
        for i in refused:
            original = published[i]
            log.warning("producer refused the %s of this ticket (%s); dead-lettering it", original.kind,
                        sent[i], extra={"offset": original.record.offset, "partition": original.record.partition})
            replacements.append(dead_letter(original.record, Rejection("publish_rejected", str(sent[i])[:300])))
        again = await asyncio.gather(*(send(o) for o in replacements))
        for i, outcome, result in zip(refused, replacements, again):
            if isinstance(result, BaseException):  # even the bounded record: a real problem
                raise result
            published[i] = outcome
    return published
