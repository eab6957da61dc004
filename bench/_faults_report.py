"""The figures of bench/faults.py, from what was produced and what came back: pure functions
over (key -> partition, send time) and the outcome records, plus the table.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any, Sequence

from bench._common import percentile
from bench._faults_infra import OutcomeReader, OutcomeRecord, Produced, progress


def first_outcomes(records: Sequence[OutcomeRecord], keys: set[bytes]) -> dict[bytes, float]:
    first: dict[bytes, float] = {}
    for r in records:
        if r.key in keys and (r.key not in first or r.at < first[r.key]):
            first[r.key] = r.at
    return first


def max_stall(sent: dict[bytes, tuple[int, float]], first: dict[bytes, float],
              end: float) -> tuple[float, int | None]:
    """Longest time any partition had produced-but-unanswered keys and no outcome arrived.

    Per partition, a stall starts when work becomes pending (a produce onto an idle
    partition) or at the last outcome while more is pending; keys still unanswered at the
    end stall until `end`. Returns (seconds, partition).
    """
    events: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for key, (partition, t_sent) in sent.items():
        events[partition].append((t_sent, +1))
        if key in first:
            events[partition].append((max(first[key], t_sent), -1))
    worst, worst_p = 0.0, None
    for partition, evs in events.items():
        evs.sort(key=lambda e: (e[0], -e[1]))  # a produce before an outcome at the same instant
        pending, mark = 0, 0.0
        for t, delta in evs:
            if pending > 0 and t - mark > worst:
                worst, worst_p = t - mark, partition
            if delta < 0 or pending == 0:
                mark = t  # progress, or work arriving on an idle partition
            pending += delta
        if pending > 0 and end - mark > worst:
            worst, worst_p = end - mark, partition
    return worst, worst_p


def first_after(records: Sequence[OutcomeRecord], t: float, *, keys: set[bytes] | None = None,
                route: str | None = None, partitions: set[int] | None = None) -> float | None:
    """Seconds from `t` to the first matching outcome received after it (None if none)."""
    times = [r.at for r in records if r.at >= t and (keys is None or r.key in keys)
             and (route is None or r.route == route)
             and (partitions is None or r.partition in partitions)]
    return round(min(times) - t, 2) if times else None


def summarise(produced: Produced, records: Sequence[OutcomeRecord], end: float) -> dict[str, Any]:
    """produced / results / dead-lettered / lost / duplicated / max stall for one key set."""
    keys = set(produced.sent)
    mine = [r for r in records if r.key in keys]
    results = [r for r in mine if r.kind == "result"]
    dlq = [r for r in mine if r.kind == "dlq"]
    per_key = Counter(r.key for r in results if r.route != "unverified")  # unverified, then the
    # teacher's correction under the same key is the contract, not a duplicate
    answered = {r.key for r in mine}
    stall, stall_p = max_stall(produced.sent, first_outcomes(mine, keys), end)
    confidences = [r.confidence for r in results if r.confidence is not None]
    return {
        "produced": len(keys),
        "results": len(per_key),
        "result_records": len(results),
        "dead_lettered": len({r.key for r in dlq}),
        "dead_letter_records": len(dlq),
        "lost": len(keys - answered),
        "lost_keys": sorted(k.decode(errors="replace") for k in keys - answered)[:50],
        "duplicated": sum(1 for n in per_key.values() if n > 1),
        "max_stall_s": round(stall, 2),
        "max_stall_partition": stall_p,
        # Per key (a batch retried after a failure republishes its dead-letter records).
        "dlq_reasons": dict(Counter(r.reason or "<none>" for r in {r.key: r for r in dlq}.values())),
        "routes": dict(Counter(r.route or "<none>" for r in {r.key: r for r in results}.values())),
        "truncated_results": len({r.key for r in results if r.truncated}),
        "student_confidence": {q: percentile(confidences, q / 100) for q in (10, 50, 90)},
        "refused_at_produce": {k.decode(errors="replace"): v for k, v in produced.refused.items()},
    }


def row(fault: str, produced: Produced, reader: OutcomeReader, *, recovery: float | None,
        notes: list[str], stall_cap: float, labels: set[str],
        expect: dict[str, set[bytes]] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Figures + verdict. `labels`: the task's label set (a published label outside it is a
    wrong answer); `expect`: {"result": keys that must be answered, "dlq": keys that must be
    dead-lettered with a reason}; by default every produced key must be answered."""
    s = summarise(produced, reader.records, time.time())
    bad = sorted({r.key.decode(errors="replace") for r in reader.records if r.kind == "result"
                  and r.key in produced.sent and (not r.labels or set(r.labels) - labels)})
    s["results_outside_label_set"] = bad[:50]
    keys = set(produced.sent)
    expect = expect if expect is not None else {"result": keys, "dlq": set()}
    results = {r.key for r in reader.records if r.kind == "result"}
    dlq = {r.key for r in reader.records if r.kind == "dlq" and r.reason}
    missed = []
    if s["lost"]:
        missed.append(f"{s['lost']} lost")
    if unanswered := (expect["result"] & keys) - results:
        missed.append(f"{len(unanswered)} good tickets without a result")
    if not_dlq := (expect["dlq"] & keys) - dlq:
        missed.append(f"{len(not_dlq)} bad inputs not dead-lettered with a reason")
    if s["max_stall_s"] > stall_cap:
        missed.append(f"stall {s['max_stall_s']} s > cap {stall_cap:g} s")
    if bad:
        missed.append(f"{len(bad)} results with a label outside the task")
    if not keys:
        missed.append("nothing produced")
    notes = list(notes)
    if s["dlq_reasons"]:
        notes.insert(0, "DLQ " + ", ".join(f"{k}={v}" for k, v in sorted(s["dlq_reasons"].items())))
    if s["routes"]:
        notes.append("routes " + ", ".join(f"{k}={v}" for k, v in sorted(s["routes"].items())))
    if s["result_records"] > s["results"] or s["dead_letter_records"] > s["dead_lettered"]:
        notes.append(f"records published: {s['result_records']} results for {s['results']} keys, "
                     f"{s['dead_letter_records']} DLQ for {s['dead_lettered']} keys")
    if s["refused_at_produce"]:
        notes.append("refused at produce: " + ", ".join(f"{k} ({v})" for k, v in s["refused_at_produce"].items()))
    if reader.errors:
        notes.append(f"reader errors {dict(reader.errors)}")
    verdict = "target met" if not missed else "NOT met: " + ", ".join(missed)
    return {"fault": fault, **s, "recovery_s": recovery, "target_met": not missed,
            "notes": [verdict, *notes], **(extra or {})}


def skipped(fault: str, why: str) -> dict[str, Any]:
    progress(f"{fault}: not run ({why})")
    return {"fault": fault, "produced": 0, "results": 0, "dead_lettered": 0, "lost": 0, "duplicated": 0,
            "max_stall_s": None, "recovery_s": None, "target_met": False, "notes": [f"NOT run: {why}"]}


COLUMNS = (("fault", "fault"), ("produced", "produced"), ("results", "results"),
           ("dead_lettered", "dead-lettered"), ("lost", "lost"), ("duplicated", "duplicated result keys"),
           ("max_stall_s", "max stall s"), ("recovery_s", "recovery s"), ("notes", "notes"))


def table(rows: Sequence[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any], k: str) -> str:
        v = r.get(k)
        return "; ".join(v) if isinstance(v, list) else ("–" if v is None else str(v))

    lines = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k).replace("|", "/") for k, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
