"""`triage demo`: the whole loop on the embedded defaults, with figures at the end.

Embedded Tansu broker + gold-label teacher stand-in + the service (real vLLM student) in
one process; BANKING77 test tickets are streamed through and scored against gold labels.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from schemas.classification import Classification
from schemas.answer import entity_set
from services.stream.kafka_io import Received, produce, read_topic, ticket_message


@dataclass
class StreamReport:
    """Figures for one batch of tickets streamed through the running service."""

    name: str
    produced: int
    malformed: int
    results: int
    dead_lettered: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)  # produce -> result read back
    service_ms: list[float] = field(default_factory=list)  # student answers: consume -> published
    published_correct: int = 0
    student_correct: int = 0
    student_answered: int = 0  # route "student": published without the teacher
    student_answered_wrong: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def valid(self) -> int:
        return self.produced - self.malformed

    student_e2e_ms: list[float] = field(default_factory=list)  # student answers: produce -> read back

    @property
    def queueing_ms(self) -> list[float]:
        """Waiting in Kafka before the service took the ticket (and after, for the reader)."""
        return [max(0.0, e2e - svc) for e2e, svc in zip(self.student_e2e_ms, self.service_ms)]

    def percentile(self, q: float, values: Sequence[float] | None = None) -> float:
        values = self.latencies_ms if values is None else values
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def as_dict(self) -> dict[str, Any]:
        n = max(1, self.results)
        escalated = self.routes.get("teacher", 0) + self.routes.get("unverified", 0)
        return {
            "stage": self.name,
            "tickets_in": self.produced,
            "results": self.results,
            "dead_lettered": self.dead_lettered,
            "accounted_for": self.results + self.dead_lettered == self.produced,
            "throughput_per_s": round(self.results / self.seconds, 2) if self.seconds else None,
            "p50_ms": round(self.percentile(0.50), 1),
            "p99_ms": round(self.percentile(0.99), 1),
            "service_p50_ms": round(self.percentile(0.50, self.service_ms), 1),
            "service_p99_ms": round(self.percentile(0.99, self.service_ms), 1),
            "queueing_p50_ms": round(self.percentile(0.50, self.queueing_ms), 1),
            "student_answered": self.student_answered,
            "error_of_student_answered": (round(self.student_answered_wrong / self.student_answered, 4)
                                          if self.student_answered else None),
            "published_accuracy": round(self.published_correct / n, 4),
            "student_accuracy": round(self.student_correct / n, 4),
            "escalation_rate": round(escalated / n, 4),
            "routes": self.routes,
            "adapters": self.adapters,
            **self.extra,
        }

    def render(self) -> str:
        d = self.as_dict()
        if d["student_answered"]:
            alone = (f"student answered {d['student_answered']} alone, wrong on "
                     f"{d['error_of_student_answered']:.1%} of them (vs gold)")
        else:
            alone = "student answered none alone"
        timing = ("" if not d["student_answered"] else
                  f"\n  student answers: consume → publish p50 {d['service_p50_ms']:.0f} ms / p99 "
                  f"{d['service_p99_ms']:.0f} ms; queueing p50 {d['queueing_p50_ms'] / 1000:.1f} s "
                  f"(the burst waits in Kafka)")
        per_field = ""
        for name, f in (d.get("fields") or {}).items():
            per_field += (f"\n  {name}: published {f['published_accuracy']:.1%} right, student alone "
                          f"{f['student_accuracy']:.1%}")
            if "published_f1" in f:
                detail = (f"precision {f['student_precision']:.3f}, recall {f['student_recall']:.3f}"
                          if f.get("student_entities", 1) else "it extracted none")
                per_field += (f"; entity F1 published {f['published_f1']:.3f}, student "
                              f"{f['student_f1']:.3f} ({detail})")
        return (
            f"  {d['tickets_in']} in: {d['results']} answered + {d['dead_lettered']} dead-lettered "
            f"(all accounted for: {'yes' if d['accounted_for'] else 'NO'}); "
            f"{d['throughput_per_s']} tickets/s\n"
            f"  {alone}; escalated {d['escalation_rate']:.1%}; student accuracy on all "
            f"{d['student_accuracy']:.1%}{timing}{per_field}"
        )


def say(message: str) -> None:
    """A demo stage heading."""
    print(f"\n== {message}", flush=True)


MALFORMED_SAMPLES: list[bytes] = [
    b"\xff\xfe not utf-8",
    b'{"id": "broken", "text": ',
    json.dumps({"text": "ticket without an id"}).encode(),
    json.dumps({"id": "blank", "text": "   "}).encode(),
    b"[]",
]


async def stream_tickets(
    *,
    name: str,
    bootstrap: str,
    tickets_topic: str,
    results_topic: str,
    dead_letter_topic: str,
    rows: Sequence[tuple[str, dict[str, Any]]],
    id_prefix: str,
    task: Any,
    malformed: int = 0,
    timeout_s: float = 900.0,
    correction_timeout_s: float = 120.0,
    progress: bool = False,
) -> StreamReport:
    """Produce `rows` ((text, gold answer) pairs; + `malformed` bad messages), wait for every
    outcome, score the published and the student's answers vs gold, per field and per ticket."""
    gold = {f"{id_prefix}-{i}": answer for i, (_, answer) in enumerate(rows)}
    messages = [ticket_message(tid, text) for tid, (text, _) in zip(gold, rows)]
    rng = random.Random(len(rows))
    bad_keys = []
    for j in range(malformed):
        key = f"{id_prefix}-bad-{j}".encode()
        bad_keys.append(key)
        messages.insert(rng.randrange(len(messages) + 1), (key, MALFORMED_SAMPLES[j % len(MALFORMED_SAMPLES)]))
    wanted = {tid.encode() for tid in gold}
    seen: set[bytes] = set()
    bar = _bar(len(gold), f"{name}: results", progress)

    def on_result(item: Received) -> None:
        if item.key in wanted and item.key not in seen:
            seen.add(item.key)
            bar.update(1)

    started = time.time()
    reader = asyncio.create_task(
        read_topic(bootstrap, results_topic, until=lambda _: seen >= wanted, timeout_s=timeout_s,
                   on_message=on_result)
    )
    sent_at = await produce(bootstrap, tickets_topic, messages)
    received = await reader
    bar.close()
    if _unverified(received, wanted):
        # A ticket past the deadline got the student's answer as `unverified` first; the
        # teacher's correction follows under the same key: score the final answers.
        # (a re-read from the start: records already seen keep the time they first arrived)
        first_read = {(r.partition, r.offset): r for r in received}
        again = await read_topic(bootstrap, results_topic, timeout_s=correction_timeout_s,
                                 until=lambda r: wanted <= {x.key for x in r} and not _unverified(r, wanted))
        received = [first_read.get((r.partition, r.offset), r) for r in again]
    dead = await read_topic(
        bootstrap, dead_letter_topic,
        until=lambda r: {x.key for x in r} >= set(bad_keys), timeout_s=60 if bad_keys else 0.5,
    )
    report = StreamReport(
        name=name, produced=len(messages), malformed=malformed, results=0,
        dead_lettered=len({d.key for d in dead} & set(bad_keys)), seconds=0.0,
    )
    last = started
    firsts: dict[bytes, Received] = {}
    latest: dict[bytes, Received] = {}
    for item in received:
        if item.key in wanted:
            firsts.setdefault(item.key, item)  # when the ticket first had an answer
            latest[item.key] = item  # the results topic is a changelog: the latest record wins
    scores = FieldTally(task)
    for key, item in latest.items():
        result = Classification.model_validate_json(item.value)
        truth = gold[key.decode()]
        report.results += 1
        published_ok, student_ok = scores.add(truth, result)
        report.published_correct += published_ok
        report.student_correct += student_ok
        if result.route.value == "student":
            report.student_answered += 1
            report.student_answered_wrong += not published_ok
        report.routes[result.route.value] = report.routes.get(result.route.value, 0) + 1
        adapter = result.adapter_id or "base"
        report.adapters[adapter] = report.adapters.get(adapter, 0) + 1
        report.latencies_ms.append((firsts[key].received_at - sent_at[key]) * 1000)
        if result.route.value == "student":
            report.service_ms.append(result.latency_ms)
            report.student_e2e_ms.append((item.received_at - sent_at[key]) * 1000)
        last = max(last, item.received_at)
    report.seconds = max(1e-6, last - started)
    if len(task.fields) > 1:
        report.extra["fields"] = scores.summary()
    return report


class FieldTally:
    """Per-field scores of the published answers and the student's own, vs gold."""

    def __init__(self, task: Any) -> None:
        self.task = task
        self.right: dict[str, list[int]] = {f.name: [0, 0] for f in task.fields}  # published, student
        self.n = 0
        self.entities: dict[str, list[list[Any]]] = {"gold": [], "published": [], "student": []}

    def add(self, truth: dict[str, Any], result: Classification) -> tuple[bool, bool]:
        """(published answer all right, student answer all right)."""
        self.n += 1
        student_fields = {n: p.label for n, p in result.student.items()}
        entity = self.task.entity_field
        ok = [True, True]
        for spec in self.task.fields:
            if spec is entity:
                mine = [result.entities or [], result.student_entities.entities if result.student_entities else []]
                hits = [entity_set(truth.get(spec.name, [])) == entity_set(m) for m in mine]
                self.entities["gold"].append(truth.get(spec.name, []))
                self.entities["published"].append(mine[0])
                self.entities["student"].append(mine[1])
            else:
                hits = [result.fields.get(spec.name) == truth.get(spec.name),
                        student_fields.get(spec.name) == truth.get(spec.name)]
            for i, hit in enumerate(hits):
                self.right[spec.name][i] += hit
                ok[i] = ok[i] and hit
        return ok[0], ok[1]

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (published, student) in self.right.items():
            out[name] = {"published_accuracy": round(published / max(1, self.n), 4),
                         "student_accuracy": round(student / max(1, self.n), 4)}
        if self.task.entity_field is not None:
            from trainer.scoring import entity_prf

            name = self.task.entity_field.name
            for who in ("published", "student"):
                prf = entity_prf(self.entities["gold"], self.entities[who])
                out[name][f"{who}_f1"] = round(prf["f1"], 4)
                out[name][f"{who}_precision"] = round(prf["precision"], 4)
                out[name][f"{who}_recall"] = round(prf["recall"], 4)
                out[name][f"{who}_entities"] = prf["predicted_entities"]
        return out


def _unverified(received: Sequence[Received], wanted: set[bytes]) -> set[bytes]:
    """Keys whose latest record is a provisional `unverified` answer."""
    latest: dict[bytes, bytes] = {}
    for item in received:
        if item.key in wanted:
            latest[item.key] = item.value
    return {k for k, v in latest.items() if json.loads(v).get("route") == "unverified"}


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="ticket", leave=False)
