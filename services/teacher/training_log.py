"""The training log: every teacher answer, durable and deduplicated, in one SQLite file.

- `examples`: one row per distinct text (UNIQUE `content_hash`). `version` is an
  AUTOINCREMENT rowid, so it only grows and is never reused: the trainer records the version
  it trained up to and `examples(up_to_version=v)` reproduces that data set exactly.
  A second answer for a known text keeps the first; a different label is counted in
  `conflicts` (the teacher disagreeing with itself is worth watching).
- `pending`: tickets the teacher could not label (down, over budget, a bad answer); drained
  later by `services.teacher.backlog.drain_backlog`, fewest `attempts` first. `attempts`
  counts teacher tries that failed for the ticket; at the drain's cap the row is `parked`:
  kept (and counted) but never picked again until `unpark`.

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
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Sequence

from schemas.training import TrainingExample, content_hash

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
CREATE TABLE IF NOT EXISTS conflicts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    content_hash  TEXT NOT NULL,
    labels        TEXT NOT NULL,
    teacher_model TEXT NOT NULL,
    source        TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pending (
    ticket_id  TEXT PRIMARY KEY,
    text       TEXT NOT NULL,
    reason     TEXT NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 1,
    first_seen TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_seen  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
"""
# Added after the first release: logs written before it get the column on open.
_PARKED_COLUMN = "ALTER TABLE pending ADD COLUMN parked INTEGER NOT NULL DEFAULT 0"
_PENDING_INDEX = ("CREATE INDEX IF NOT EXISTS pending_pick"
                  " ON pending (parked, attempts, first_seen)")
_NOW = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"

_COLUMNS = "text, labels, teacher_model, prompt_hash, source, ticket_id, created_at"
_CHUNK = 500  # stays far below SQLite's bound-parameter limit


@dataclass(frozen=True)
class ParkedTicket:
    ticket_id: str
    text: str
    reason: str  # of the last failure
    attempts: int
    first_seen: str
    last_seen: str


def _for_ids(conn: sqlite3.Connection, statement: str, ids: list[str]) -> int:
    """`statement IN (...)` over `ids` in chunks (SQLite's bound-parameter limit); rows changed."""
    changed = 0
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        changed += conn.execute(f"{statement} IN ({','.join('?' * len(chunk))})", chunk).rowcount
    return changed


def _labels_json(labels: dict[str, str]) -> str:
    return json.dumps(labels, sort_keys=True, ensure_ascii=False)


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
        self._write(self._migrate)

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(pending)")}
        if "parked" not in columns:
            conn.execute(_PARKED_COLUMN)
        conn.execute(_PENDING_INDEX)

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
        """Insert new texts; returns how many were new. Duplicates keep the first answer."""
        rows = list(examples)
        if not rows:
            return 0

        def insert(conn: sqlite3.Connection) -> int:
            inserted = 0
            for ex in rows:
                labels = _labels_json(ex.labels)
                created = ex.created_at.isoformat()
                # Look before inserting (the IMMEDIATE transaction makes this race-free):
                # INSERT OR IGNORE would burn an AUTOINCREMENT number per duplicate.
                kept = conn.execute(
                    "SELECT labels FROM examples WHERE content_hash = ?", (ex.content_hash,)
                ).fetchone()
                if kept is None:
                    conn.execute(
                        "INSERT INTO examples (content_hash, " + _COLUMNS + ")"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (ex.content_hash, ex.text, labels, ex.teacher_model, ex.prompt_hash,
                         ex.source, ex.ticket_id, created),
                    )
                    inserted += 1
                elif kept[0] != labels:
                    conn.execute(
                        "INSERT INTO conflicts (content_hash, labels, teacher_model, source,"
                        " created_at) VALUES (?, ?, ?, ?, ?)",
                        (ex.content_hash, labels, ex.teacher_model, ex.source, created),
                    )
            return inserted

        return self._write(insert)

    def version(self) -> int:
        """Version of the last inserted example (0 when empty). Never decreases."""
        rows = self._read("SELECT seq FROM sqlite_sequence WHERE name = 'examples'")
        return int(rows[0][0]) if rows else 0

    def examples(
        self, up_to_version: int | None = None, *, after_version: int = 0
    ) -> list[TrainingExample]:
        """Examples with after_version < version <= up_to_version, in version order."""
        upper = up_to_version if up_to_version is not None else 2**63 - 1
        rows = self._read(
            f"SELECT {_COLUMNS} FROM examples WHERE version > ? AND version <= ?"
            " ORDER BY version",
            (after_version, upper),
        )
        return [
            TrainingExample(
                text=text, labels=json.loads(labels), teacher_model=model,
                prompt_hash=prompt_hash, source=source, ticket_id=ticket_id,
                created_at=datetime.fromisoformat(created),
            )
            for text, labels, model, prompt_hash, source, ticket_id, created in rows
        ]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM examples")[0][0])

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
            "pending": self.pending_count(),
            "parked": self.parked_count(),
        }

    # --- backlog of tickets the teacher could not label --------------------------------
    def add_pending(self, ticket_id: str, text: str, reason: str, *, attempted: bool = False) -> None:
        """Queue a ticket for a later teacher pass. `attempted`: the teacher was really asked
        and failed for this ticket (charges one attempt); False for refusals without a request
        (circuit open, over budget, no teacher). Re-adding a known ticket keeps one row."""
        charge = 1 if attempted else 0
        self._write(
            lambda conn: conn.execute(
                "INSERT INTO pending (ticket_id, text, reason, attempts) VALUES (?, ?, ?, ?)"
                " ON CONFLICT(ticket_id) DO UPDATE SET reason = excluded.reason,"
                " attempts = attempts + excluded.attempts, last_seen = excluded.last_seen",
                (ticket_id, text, reason, charge),
            )
        )

    def pending(self, limit: int = 100) -> list[tuple[str, str]]:
        """Tickets to try next, not parked: fewest attempts first, then oldest.
        [(ticket_id, text), ...]. Ordering by attempts keeps a ticket that keeps failing
        from sitting at the head of every pass."""
        rows = self._read(
            "SELECT ticket_id, text FROM pending WHERE parked = 0"
            " ORDER BY attempts, first_seen, rowid LIMIT ?", (limit,)
        )
        return [(r[0], r[1]) for r in rows]

    def record_failure(self, ticket_id: str, reason: str, *, max_attempts: int) -> bool:
        """Charge one failed attempt to a backlog ticket; park it once it has `max_attempts`.
        Returns True when the ticket is parked now (False too when it is not in the backlog)."""

        def charge(conn: sqlite3.Connection) -> bool:
            conn.execute(
                f"UPDATE pending SET attempts = attempts + 1, reason = ?, last_seen = {_NOW},"
                " parked = CASE WHEN attempts + 1 >= ? THEN 1 ELSE parked END"
                " WHERE ticket_id = ?",
                (reason, max_attempts, ticket_id),
            )
            row = conn.execute("SELECT parked FROM pending WHERE ticket_id = ?",
                               (ticket_id,)).fetchone()
            return bool(row and row[0])

        return self._write(charge)

    def parked(self, limit: int = 100) -> list[ParkedTicket]:
        """Tickets the drain gave up on (most recently failed first), for a person to look at."""
        rows = self._read(
            "SELECT ticket_id, text, reason, attempts, first_seen, last_seen FROM pending"
            " WHERE parked = 1 ORDER BY last_seen DESC, rowid DESC LIMIT ?", (limit,)
        )
        return [ParkedTicket(*row) for row in rows]

    def unpark(self, ticket_ids: Iterable[str] | None = None) -> int:
        """Give parked tickets (all when `ticket_ids` is None) a fresh start: back in the
        backlog with zero attempts. Returns how many were unparked."""
        reset = "UPDATE pending SET parked = 0, attempts = 0 WHERE parked = 1"
        if ticket_ids is None:
            return self._write(lambda conn: conn.execute(reset).rowcount)
        ids = list(ticket_ids)
        return self._write(lambda conn: _for_ids(conn, f"{reset} AND ticket_id", ids)) if ids else 0

    def resolve_pending(self, ticket_ids: Iterable[str]) -> int:
        """Drop tickets from the backlog (parked ones too); returns how many were there."""
        ids = list(ticket_ids)
        return self._write(lambda conn: _for_ids(conn, "DELETE FROM pending WHERE ticket_id", ids)) if ids else 0

    def pending_count(self) -> int:
        """Tickets still to be tried (parked ones excluded: see `parked_count`)."""
        return int(self._read("SELECT COUNT(*) FROM pending WHERE parked = 0")[0][0])

    def parked_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM pending WHERE parked = 1")[0][0])
