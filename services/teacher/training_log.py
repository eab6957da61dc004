"""The training log: every teacher answer, durable and deduplicated, in one SQLite file.

- `examples`: one row per distinct text (UNIQUE `content_hash`). `version` is an
  AUTOINCREMENT rowid, so it only grows and is never reused: the trainer records the version
  it trained up to and `examples(up_to_version=v)` reproduces that data set exactly.
- A second answer for a known text: a field the row already has keeps its first value (a
  different value is recorded in `conflicts`: the teacher disagreeing with itself is worth
  watching); a field the row lacks (the first answer was partial: the teacher was asked for
  the student's unsure fields only) is merged in. A row whose labels grew gets a **new
  version**, like a new row: `version()` moves, so the next training run sees that the data
  changed and an incremental read (`after_version`) finds it. Its previous state moves to
  `superseded` (with the version that replaced it), so `examples(up_to_version=v)` still
  returns every row as it was at `v` and a run's data set stays reproducible. The merged row
  keeps the first answer's source (its held-out side never changes), model and ticket.
- `forwards`: for a router task, the routing label and route of each escalated ticket's first
  published answer, and whether its forward was sent. It is the teacher worker's memory across
  re-deliveries (services/teacher/worker.py): a correction or a re-delivered escalation
  forwards nothing new and names the same `forwarded_to`.
- `answered`: the escalations (ticket id @ ticket time) whose teacher result the broker
  acknowledged. An answered record stays uncommitted while an older one of its partition is
  still in flight; a re-delivery (kill, rebalance) finds it here and publishes nothing again.
  Pruned with `forwards` (`triage gc`): a re-delivery older than that cannot happen.
- People outrank the teacher (`record_feedback`, services/teacher/feedback.py): a correction or
  confirmation replaces the row's fields it names, under a new version, and marks the row
  `labelled_by` human (or system); the row keeps its source, so an evaluation-sample row stays
  held out and its label is now the gold. A text the log lacks becomes a new row. A teacher
  answer arriving later keeps the person's fields (a different value goes to `conflicts`), and
  a system's label never replaces a person's. Every accepted feedback record is kept in
  `feedback` with the labels it replaced (what the teacher said, for measuring the teacher)
  and the published answer it was about, when it names one (services/teacher/quality.py).
- Tickets the teacher has not answered yet wait in Kafka (the escalations topic), not here:
  the training log holds teacher answers only. (Logs written by older releases may still
  hold a `pending` table; it is left alone.)

Durability: WAL journal, one transaction per call. `synchronous=FULL` by default: in WAL mode
that is one fsync per commit, and a commit here follows a paid teacher call (~1 s), so the
fsync is noise while NORMAL could lose the last paid answers on power loss (NORMAL already
survives a killed process). Pass `synchronous="NORMAL"` for bulk loads.

Thread-safe: one connection guarded by a lock; calls are short, so asyncio code may call them
directly or through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

from schemas.answer import entity_set
from schemas.training import LABEL_RANK, TrainingExample, content_hash
from services.teacher.log_keys import rekey, stale_keys

_SCHEMA = """
CREATE TABLE IF NOT EXISTS examples (
    version       INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash  TEXT NOT NULL UNIQUE,
    text          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    teacher_model TEXT NOT NULL,
    prompt_hash   TEXT NOT NULL,
    source        TEXT NOT NULL,
    ticket_id     TEXT,
    created_at    TEXT NOT NULL,
    labelled_by   TEXT NOT NULL DEFAULT 'teacher'
);
CREATE TABLE IF NOT EXISTS superseded (
    version       INTEGER PRIMARY KEY,
    superseded_by INTEGER NOT NULL,
    content_hash  TEXT NOT NULL,
    text          TEXT NOT NULL,
    labels        TEXT NOT NULL,
    teacher_model TEXT NOT NULL,
    prompt_hash   TEXT NOT NULL,
    source        TEXT NOT NULL,
    ticket_id     TEXT,
    created_at    TEXT NOT NULL,
    labelled_by   TEXT NOT NULL DEFAULT 'teacher'
);
CREATE TABLE IF NOT EXISTS forwards (
    ticket_id     TEXT PRIMARY KEY,
    label         TEXT,
    route         TEXT NOT NULL,
    sent          INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS answered (
    escalation    TEXT PRIMARY KEY,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    record_key    TEXT NOT NULL UNIQUE,
    ticket_id     TEXT NOT NULL,
    content_hash  TEXT NOT NULL,
    labels        TEXT NOT NULL,
    replaced      TEXT,
    source        TEXT NOT NULL,
    author        TEXT,
    at            TEXT,
    outcome       TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    published     TEXT
);
CREATE TABLE IF NOT EXISTS conflicts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash  TEXT NOT NULL,
    labels        TEXT NOT NULL,
    teacher_model TEXT NOT NULL,
    source        TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
"""
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

_COLUMNS = "text, labels, teacher_model, prompt_hash, source, ticket_id, created_at, labelled_by"
_CHUNK = 500  # stays far below SQLite's bound-parameter limit


def _labels_json(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, ensure_ascii=False)


def _same(a: Any, b: Any) -> bool:
    """One field's two values agree (entities as sets of (type, span): order is no answer)."""
    if isinstance(a, list) and isinstance(b, list):
        return entity_set(a) == entity_set(b)
    return a == b


class TrainingLog:
    def __init__(self, path: str | Path, *, synchronous: str = "FULL") -> None:
        if synchronous.upper() not in {"NORMAL", "FULL", "EXTRA"}:
            raise ValueError("synchronous must be NORMAL, FULL or EXTRA")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._conn.execute("PRAGMA busy_timeout=30000")
        self._conn.executescript(_SCHEMA)
        if _lacks_labelled_by(self._conn):  # a log from before people could label
            self._write(_add_labelled_by)
        if "published" not in _columns(self._conn, "feedback"):  # feedback from before quality.py
            self._write(_add_published)
        self._conn.execute("CREATE INDEX IF NOT EXISTS examples_ticket_id ON examples (ticket_id)")
        # The teacher's answer behind a person's label is a superseded row (quality.py reads it).
        self._conn.execute("CREATE INDEX IF NOT EXISTS superseded_hash ON superseded (content_hash)")
        if stale_keys(self._conn):  # written under an older normaliser: services/teacher/log_keys.py
            self._write(rekey)

    def __repr__(self) -> str:
        return f"TrainingLog({str(self.path)!r})"

    # --- lifecycle ---------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, fn):  # one IMMEDIATE transaction, rolled back on error
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    # --- examples ----------------------------------------------------------------------
    def append(self, examples: Iterable[TrainingExample]) -> int:
        """Insert new texts and merge new fields into known ones (see the module docstring);
        returns how many rows were inserted or grew."""
        rows = list(examples)
        if not rows:
            return 0

        def insert(conn: sqlite3.Connection) -> int:
            written = 0
            for ex in rows:
                created = ex.created_at.isoformat()
                # Look before inserting (the IMMEDIATE transaction makes this race-free):
                # INSERT OR IGNORE would burn an AUTOINCREMENT number per duplicate.
                kept = conn.execute(
                    "SELECT version, labels FROM examples WHERE content_hash = ?", (ex.content_hash,)
                ).fetchone()
                if kept is None:
                    conn.execute(
                        "INSERT INTO examples (content_hash, " + _COLUMNS + ")"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (ex.content_hash, ex.text, _labels_json(ex.labels), ex.teacher_model,
                         ex.prompt_hash, ex.source, ex.ticket_id, created, ex.labelled_by),
                    )
                    written += 1
                    continue
                version, stored = kept[0], json.loads(kept[1])
                if any(k in stored and not _same(stored[k], v) for k, v in ex.labels.items()):  # a person's too
                    conn.execute(
                        "INSERT INTO conflicts (content_hash, labels, teacher_model, source,"
                        " created_at) VALUES (?, ?, ?, ?, ?)",
                        (ex.content_hash, _labels_json(ex.labels), ex.teacher_model, ex.source, created),
                    )
                added = {k: v for k, v in ex.labels.items() if k not in stored}
                if added:
                    self._grow(conn, version, {**stored, **added})
                    written += 1
            return written

        return self._write(insert)

    @staticmethod
    def _grow(conn: sqlite3.Connection, version: int, labels: dict[str, Any],
              labelled_by: str | None = None) -> None:
        """The row at `version` with `labels` (and `labelled_by`, when given), under a new
        version; its old state superseded."""
        conn.execute(
            "INSERT INTO superseded (version, superseded_by, content_hash, " + _COLUMNS + ")"
            " SELECT version, -1, content_hash, " + _COLUMNS + " FROM examples WHERE version = ?",
            (version,),
        )
        conn.execute("DELETE FROM examples WHERE version = ?", (version,))
        new_version = conn.execute(
            "INSERT INTO examples (content_hash, " + _COLUMNS + ")"
            " SELECT content_hash, text, ?, teacher_model, prompt_hash, source, ticket_id, created_at,"
            " COALESCE(?, labelled_by) FROM superseded WHERE version = ?",
            (_labels_json(labels), labelled_by, version),
        ).lastrowid
        conn.execute("UPDATE superseded SET superseded_by = ? WHERE version = ?", (new_version, version))

    def version(self) -> int:
        """Version of the last inserted example (0 when empty). Never decreases."""
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'examples'")
        return int(rows[0][0]) if rows else 0

    def examples(
        self, up_to_version: int | None = None, *, after_version: int = 0
    ) -> list[TrainingExample]:
        """Examples with after_version < version <= up_to_version, in version order."""
        upper = up_to_version if up_to_version is not None else 2**63 - 1
        # A row that grew after `upper` is read as it was then (its superseded state).
        rows = self._read(
            f"SELECT version, {_COLUMNS} FROM examples WHERE version > ? AND version <= ?"
            f" UNION ALL SELECT version, {_COLUMNS} FROM superseded"
            " WHERE version > ? AND version <= ? AND superseded_by > ? ORDER BY version",
            (after_version, upper, after_version, upper, upper),
        )
        return [_example(row[1:]) for row in rows]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM examples")[0][0])

    def answer_for(self, text: str) -> TrainingExample | None:
        """The logged teacher answer for this text (same dedup key), or None: asking the
        teacher again would cost money for an answer the log would not even keep."""
        rows = self._read(f"SELECT {_COLUMNS} FROM examples WHERE content_hash = ?", (content_hash(text),))
        return _example(rows[0]) if rows else None

    # --- people's labels (services/teacher/feedback.py) ------------------------------------
    def ticket_text(self, ticket_id: str) -> str | None:
        """The text the log holds for a ticket (the first ticket of its text: a later ticket
        with the same text was answered from the log and is not recorded here)."""
        rows = self._read("SELECT text FROM examples WHERE ticket_id = ? ORDER BY version DESC LIMIT 1",
                          (ticket_id,))
        return rows[0][0] if rows else None

    def record_feedback(self, text: str, labels: dict[str, Any], *, ticket_id: str, labelled_by: str,
                        record_key: str, new_row_source: str, author: str | None = None,
                        at: str | None = None, published: str | None = None) -> str:
        """Store a person's (`labelled_by` "human") or a system's labels for `text`; returns
        "added" (a new row, source `new_row_source`), "corrected", "confirmed" (the row already
        said so) or "outranked" (a system's label on a person's row: kept in `feedback` only).
        Idempotent per `record_key`: a re-delivered record returns its first outcome.
        `published`: the answer the feedback is about (JSON), kept beside it."""
        rank = LABEL_RANK[labelled_by]

        def record(conn: sqlite3.Connection) -> str:
            done = conn.execute("SELECT outcome FROM feedback WHERE record_key = ?", (record_key,)).fetchone()
            if done is not None:
                return str(done[0])
            key = content_hash(text)
            kept = conn.execute("SELECT version, labels, labelled_by FROM examples WHERE content_hash = ?",
                                (key,)).fetchone()
            replaced = None
            if kept is None:
                conn.execute(
                    "INSERT INTO examples (content_hash, " + _COLUMNS + f") VALUES (?, ?, ?, ?, '', ?, ?, {_NOW}, ?)",
                    (key, text, _labels_json(labels), f"{labelled_by}-feedback", new_row_source, ticket_id,
                     labelled_by))
                outcome = "added"
            else:
                version, stored, by = kept[0], json.loads(kept[1]), kept[2]
                replaced = _labels_json({k: stored[k] for k in labels if k in stored})
                agree = all(k in stored and _same(stored[k], v) for k, v in labels.items())
                if LABEL_RANK.get(by, 0) > rank:
                    outcome = "outranked"
                else:
                    outcome = "confirmed" if agree else "corrected"
                    if not agree or by != labelled_by:
                        self._grow(conn, version, {**stored, **labels}, labelled_by)
            conn.execute(
                "INSERT INTO feedback (record_key, ticket_id, content_hash, labels, replaced, source, author,"
                f" at, outcome, created_at, published) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, {_NOW}, ?)",
                (record_key, ticket_id, key, _labels_json(labels), replaced, labelled_by, author, at, outcome,
                 published))
            return outcome

        return self._write(record)

    # --- a router task's forwards ------------------------------------------------------
    def first_forward(self, ticket_id: str, label: str | None, route: str) -> tuple[str | None, str, bool]:
        """(label, route, sent) of this ticket's first published answer: `label` and `route`,
        recorded now, when there was none; else the recorded ones (a correction, a
        re-delivery): the forward is decided once, by the first answer users saw."""

        def first(conn: sqlite3.Connection) -> tuple[str | None, str, bool]:
            conn.execute(f"INSERT OR IGNORE INTO forwards (ticket_id, label, route, created_at)"
                         f" VALUES (?, ?, ?, {_NOW})", (ticket_id, label, route))
            got = conn.execute("SELECT label, route, sent FROM forwards WHERE ticket_id = ?",
                               (ticket_id,)).fetchone()
            return got[0], got[1], bool(got[2])

        return self._write(first)

    def forward_sent(self, ticket_id: str) -> None:
        """The ticket's forward was acknowledged by the broker: a re-delivery sends it no more."""
        self._write(lambda conn: conn.execute("UPDATE forwards SET sent = 1 WHERE ticket_id = ?", (ticket_id,)))

    # --- escalations whose teacher result was published ------------------------------------
    def answer_published(self, escalation: str) -> bool:
        return bool(self._read("SELECT 1 FROM answered WHERE escalation = ?", (escalation,)))

    def mark_answer_published(self, escalation: str) -> None:
        self._write(lambda conn: conn.execute(
            f"INSERT OR IGNORE INTO answered (escalation, created_at) VALUES (?, {_NOW})", (escalation,)))

    def contains(self, text: str) -> bool:
        return bool(self.existing_hashes([content_hash(text)]))

    def existing_hashes(self, hashes: Iterable[str]) -> set[str]:
        """The subset of `hashes` (see schemas.training.content_hash) already in the log."""
        wanted = list(dict.fromkeys(hashes))
        found: set[str] = set()
        for i in range(0, len(wanted), _CHUNK):
            chunk = wanted[i : i + _CHUNK]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                f"SELECT content_hash FROM examples WHERE content_hash IN ({marks})", chunk
            )
            found.update(r[0] for r in rows)
        return found

    def stats(self) -> dict[str, object]:
        by_source = dict(self._read("SELECT source, COUNT(*) FROM examples GROUP BY source"))
        return {
            "path": str(self.path),
            "examples": self.count(),
            "version": self.version(),
            "by_source": by_source,
            "conflicts": int(self._read("SELECT COUNT(*) FROM conflicts")[0][0]),
            "labelled_by": dict(self._read("SELECT labelled_by, COUNT(*) FROM examples GROUP BY labelled_by")),
        }


def _example(row: Sequence[Any]) -> TrainingExample:
    """A TrainingExample from the `_COLUMNS` of a row."""
    text, labels, model, prompt_hash, source, ticket_id, created, labelled_by = row
    return TrainingExample(text=text, labels=json.loads(labels), teacher_model=model, prompt_hash=prompt_hash,
                           source=source, ticket_id=ticket_id, created_at=datetime.fromisoformat(created),
                           labelled_by=labelled_by)


def _columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}


def _lacks_labelled_by(conn: sqlite3.Connection, table: str = "examples") -> bool:
    return "labelled_by" not in _columns(conn, table)


def _add_labelled_by(conn: sqlite3.Connection) -> None:
    """A log written before feedback existed gets the `labelled_by` column (every row: teacher);
    checked again inside the write transaction, so two processes opening it at once add it once."""
    for table in ("examples", "superseded"):
        if _lacks_labelled_by(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN labelled_by TEXT NOT NULL DEFAULT 'teacher'")


def _add_published(conn: sqlite3.Connection) -> None:
    if "published" not in _columns(conn, "feedback"):  # checked again inside the transaction
        conn.execute("ALTER TABLE feedback ADD COLUMN published TEXT")
