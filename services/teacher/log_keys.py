"""Re-keying a training log written under an older content-hash normaliser.

The log's `content_hash` column (UNIQUE) is what `append` dedups on and `answer_for` looks up,
so it must be the hash of today's `schemas.text.dedup_key`. A log records the normaliser
version its keys were computed with in SQLite's `user_version`; opening one written with an
older version re-keys it once, in one transaction (idempotent: a second process that opens it
meanwhile finds it done):
- every row gets today's key; rows that now share a key (punctuation or Unicode variants of one
  ticket) stay, nothing is deleted: the first (lowest version) keeps the key, a later one gets
  `<key>#<version>`, so `examples(up_to_version=v)` returns exactly the rows it returned before
  and the dataset's own dedup (first answer wins, on recomputed keys) drops the later ones; a
  later one whose answer differs is also recorded in `conflicts`;
- `conflicts` rows and other tables that keep a content hash (`superseded`) follow.
The held-out split is recomputed from the text everywhere (trainer/dataset.py), so it follows
the new normaliser without any stored state. Writers of an older release still running against
the log would write old keys again: upgrade every writer of a log together.
"""

from __future__ import annotations

import sqlite3

from schemas.text import DEDUP_KEY_VERSION
from schemas.training import content_hash


def stale_keys(conn: sqlite3.Connection) -> bool:
    """The log's keys are older than DEDUP_KEY_VERSION (0: from before versions were recorded,
    or a new log that records none yet)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0]) < DEDUP_KEY_VERSION


def rekey(conn: sqlite3.Connection) -> int:
    """Bring the keys to DEDUP_KEY_VERSION inside the caller's write transaction; returns the
    rows whose key changed (0 when the log is current)."""
    if not stale_keys(conn):
        return 0
    rows = conn.execute("SELECT version, content_hash, text, labels, teacher_model, source, created_at"
                        " FROM examples ORDER BY version").fetchall()
    conflicts = conn.execute("SELECT id, content_hash FROM conflicts").fetchall()  # before ours
    # Temporary keys first: a row's new key may be another row's old one (UNIQUE column).
    conn.execute("UPDATE examples SET content_hash = '~' || version")
    first: dict[str, str] = {}  # new key -> the kept row's labels
    renamed: dict[str, str] = {}  # old key -> new key
    changed = 0
    for version, old, text, labels, model, source, created in rows:
        new = content_hash(text)
        renamed[old] = new
        changed += new != old
        if new not in first:
            first[new] = labels
            conn.execute("UPDATE examples SET content_hash = ? WHERE version = ?", (new, version))
            continue
        conn.execute("UPDATE examples SET content_hash = ? WHERE version = ?", (f"{new}#{version}", version))
        if labels != first[new]:
            conn.execute("INSERT INTO conflicts (content_hash, labels, teacher_model, source, created_at)"
                         " VALUES (?, ?, ?, ?, ?)", (new, labels, model, source, created))
    for cid, old in conflicts:
        if renamed.get(old, old) != old:  # by id: an old key may equal another text's new one
            conn.execute("UPDATE conflicts SET content_hash = ? WHERE id = ?", (renamed[old], cid))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "superseded" in tables:  # earlier states of grown rows: keyed like their row
        for version, text in conn.execute("SELECT version, text FROM superseded").fetchall():
            conn.execute("UPDATE superseded SET content_hash = ? WHERE version = ?", (content_hash(text), version))
    conn.execute(f"PRAGMA user_version = {int(DEDUP_KEY_VERSION)}")
    return changed
