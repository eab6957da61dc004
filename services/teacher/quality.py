"""Quality measured by people: what the feedback in the training log says about the student and
the teacher, each figure with its n and a Wilson 95% interval.

Three agreements, per ticket (a ticket agrees when every field both sides name is equal;
entities as sets of (type, span)):
- `student_vs_people`: the student's accepted answers (published on route `student`, as the
  feedback record quotes them in `published`: the service keeps no copy of them) against the
  person's labels;
- `teacher_vs_people`: the teacher's answer in the log (the row's last teacher-labelled state,
  before a person replaced it) against the person's labels;
- `student_vs_teacher`: accepted student answers against the teacher where both exist; on the
  sample this is what the threshold certifies (≥ 1 − ε), the other two are what it does not.

Two scopes: `sample`, tickets of the evaluation sample (a content-hash share of all traffic,
so the figures estimate the whole stream), and `all` feedback. Agents mostly report mistakes,
so `all` is not a random sample: read it as a floor on accuracy, the sample as the estimate.
Only `human` feedback counts; a ticket's later records override its earlier ones per field.

`corrections`: per judged party, the labels people corrected most ("people said X where the
student said Y, n times"), with how often that label was judged at all.

Pure parts (`Judged`, `measure`) take no I/O; `read_judged` reads a log file read-only, so
`triage status` and the feedback lane (services/stream/feedback_lane.py) share one figure.
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from schemas.answer import entity_set
from services.teacher.escalation import wilson_interval

MEASURES = ("student_vs_people", "teacher_vs_people", "student_vs_teacher")
SCOPES = ("sample", "all")
SAMPLE_SOURCES = ("sample", "sample-cold")  # schemas/training.py: the evaluation sample's rows


@dataclass(frozen=True)
class Judged:
    """One ticket a person labelled, and what the others had said about it (None: unknown)."""

    people: Mapping[str, Any]
    student: Mapping[str, Any] | None = None  # the accepted answer (route student) only
    teacher: Mapping[str, Any] | None = None
    in_sample: bool = False


@dataclass(frozen=True)
class Agreement:
    agree: int
    n: int

    def as_dict(self) -> dict[str, Any]:
        low, high = wilson_interval(self.agree, self.n)
        return {"agree": self.agree, "n": self.n, "rate": self.agree / self.n if self.n else None,
                "low": low, "high": high}


def agree(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool | None:
    """Whether two answers agree on every field both name; None when they share none."""
    shared = [name for name in a if name in b]
    if not shared:
        return None
    return all(_same(a[name], b[name]) for name in shared)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):  # the entities field
        return entity_set(a) == entity_set(b)
    return a == b


def measure(judged: Iterable[Judged], *, top: int = 5) -> dict[str, Any]:
    """The three agreements per scope, and the `top` most corrected labels per judged party."""
    judged = list(judged)
    pairs = {"student_vs_people": lambda j: (j.student, j.people),
             "teacher_vs_people": lambda j: (j.teacher, j.people),
             "student_vs_teacher": lambda j: (j.student, j.teacher)}
    scopes: dict[str, Any] = {}
    for scope in SCOPES:
        chosen = [j for j in judged if j.in_sample or scope == "all"]
        figures = {}
        for name, sides in pairs.items():
            votes = [agree(a, b) for a, b in map(sides, chosen) if a is not None and b is not None]
            votes = [v for v in votes if v is not None]
            figures[name] = Agreement(sum(votes), len(votes)).as_dict()
        scopes[scope] = {"tickets": len(chosen), **figures}
    return {**scopes, "corrections": {who: corrections(judged, who, top=top) for who in ("student", "teacher")}}


def corrections(judged: Iterable[Judged], who: str, *, top: int = 5) -> list[dict[str, Any]]:
    """The `top` (field, label) pairs people corrected `who` on most: the label people gave,
    how often `who` was judged on it, and what `who` said instead (most frequent first)."""
    judged_on: Counter[tuple[str, str]] = Counter()
    said: dict[tuple[str, str], Counter[str]] = {}
    for j in judged:
        other = j.student if who == "student" else j.teacher
        for name, label in j.people.items():
            if other is None or not isinstance(label, str) or not isinstance(other.get(name), str):
                continue  # categorical fields only; entities have no label to confuse
            judged_on[name, label] += 1
            if other[name] != label:
                said.setdefault((name, label), Counter())[other[name]] += 1
    ranked = sorted(said, key=lambda k: (-sum(said[k].values()), k))[:top]
    return [{"field": name, "label": label, "corrected": sum(said[name, label].values()),
             "judged": judged_on[name, label], "said": dict(said[name, label].most_common())}
            for name, label in ranked]


# --- the training log (read-only) -----------------------------------------------------------
def read_judged(path: str | Path, entity_field: str | None = None) -> list[Judged]:
    """One `Judged` per ticket with human feedback in the log at `path` (none: no log yet);
    `entity_field`: the task's entities field, under which a published answer's entities count."""
    path = Path(path)
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "feedback" not in tables:  # a log from before feedback
            return []
        columns = {r[1] for r in conn.execute("PRAGMA table_info(feedback)")}
        quoted = "f.published" if "published" in columns else "NULL"  # not yet migrated: no quotes
        rows = conn.execute(
            f"SELECT f.ticket_id, f.content_hash, f.labels, {quoted}, e.source FROM feedback f"
            " LEFT JOIN examples e ON e.content_hash = f.content_hash WHERE f.source = 'human' ORDER BY f.id"
        ).fetchall()
        # The teacher's answer: the text's last state labelled by the teacher (the row itself,
        # or the superseded state a person's label replaced), highest version last.
        teacher = {h: json.loads(labels) for h, labels in conn.execute(
            "SELECT content_hash, labels FROM (SELECT version, content_hash, labels, labelled_by FROM examples"
            " UNION ALL SELECT version, content_hash, labels, labelled_by FROM superseded)"
            " WHERE labelled_by = 'teacher' AND content_hash IN"
            " (SELECT content_hash FROM feedback WHERE source = 'human') ORDER BY version")}
    finally:
        conn.close()
    tickets: dict[str, dict[str, Any]] = {}
    for ticket_id, key, labels, published, source in rows:
        t = tickets.setdefault(ticket_id, {"people": {}, "published": None})
        t.update(key=key, source=source)
        t["people"].update(json.loads(labels))
        t["published"] = json.loads(published) if published else t["published"]
    return [Judged(people=t["people"], student=_accepted(t["published"], entity_field), teacher=teacher.get(t["key"]),
                   in_sample=t["source"] in SAMPLE_SOURCES) for t in tickets.values()]


def _accepted(published: Mapping[str, Any] | None, entity_field: str | None) -> dict[str, Any] | None:
    """The student's answer when the published one was the student's alone (accepted)."""
    if not published or published.get("route") != "student":
        return None
    answer = dict(published.get("fields") or {})
    if entity_field and published.get("entities") is not None:
        answer[entity_field] = published["entities"]
    return answer


def quality_from_log(path: str | Path, entity_field: str | None = None, *, top: int = 5) -> dict[str, Any]:
    """`measure` over the log at `path` (`triage status`'s `quality`, the feedback lane's gauges)."""
    return measure(read_judged(path, entity_field), top=top)
