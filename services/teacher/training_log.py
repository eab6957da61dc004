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
from schemas.training import TrainingExample, content_hash
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
    created_at    TEXT NOT NULL
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
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forwards (
    ticket_id     TEXT PRIMARY KEY,
    label         TEXT,
    route         TEXT NOT NULL,
    sent          INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
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

_COLUMNS = "text, labels, teacher_model, prompt_hash, source, ticket_id, created_at"
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
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (ex.content_hash, ex.text, _labels_json(ex.labels), ex.teacher_model,
                         ex.prompt_hash, ex.source, ex.ticket_id, created),
                    )
                    written += 1
                    continue
                version, stored = kept[0], json.loads(kept[1])
                if any(k in stored and not _same(stored[k], v) for k, v in ex.labels.items()):
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
    def _grow(conn: sqlite3.Connection, version: int, labels: dict[str, Any]) -> None:
        """The row at `version` with `labels`, under a new version; its old state superseded."""
        conn.execute(
            "INSERT INTO superseded (version, superseded_by, content_hash, " + _COLUMNS + ")"
            " SELECT version, -1, content_hash, " + _COLUMNS + " FROM examples WHERE version = ?",
            (version,),
        )
        conn.execute("DELETE FROM examples WHERE version = ?", (version,))
        new_version = conn.execute(
            "INSERT INTO examples (content_hash, " + _COLUMNS + ")"
            " SELECT content_hash, text, ?, teacher_model, prompt_hash, source, ticket_id, created_at"
            " FROM superseded WHERE version = ?",
            (_labels_json(labels), version),
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
        return [
            TrainingExample(
                text=text, labels=json.loads(labels), teacher_model=model,
                prompt_hash=prompt_hash, source=source, ticket_id=ticket_id,
                created_at=datetime.fromisoformat(created),
            )
            for _, text, labels, model, prompt_hash, source, ticket_id, created in rows
        ]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM examples")[0][0])

    def answer_for(self, text: str) -> TrainingExample | None:
        """The logged teacher answer for this text (same dedup key), or None: asking the
        teacher again would cost money for an answer the log would not even keep."""
        rows = self._read(f"SELECT {_COLUMNS} FROM examples WHERE content_hash = ?", (content_hash(text),))
        if not rows:
            return None
        text_, labels, model, prompt_hash, source, ticket_id, created = rows[0]
        return TrainingExample(text=text_, labels=json.loads(labels), teacher_model=model,
                               prompt_hash=prompt_hash, source=source, ticket_id=ticket_id,
                               created_at=datetime.fromisoformat(created))

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
        }
