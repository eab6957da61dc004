import sqlite3
import threading
from datetime import datetime, timezone

import pytest

from schemas.training import TrainingExample
from services.teacher.training_log import TrainingLog


def ex(text: str, label: str = "a", **kw) -> TrainingExample:
    return TrainingExample(text=text, labels={"intent": label}, teacher_model="t",
                           prompt_hash="p", **kw)


@pytest.fixture
def log(tmp_path):
    with TrainingLog(tmp_path / "log.sqlite3") as training_log:
        yield training_log


def test_wal_mode(log):
    conn = sqlite3.connect(log.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_append_counts_new_and_dedups_normalised_text(log):
    assert log.append([ex("Hello world"), ex("second")]) == 2
    assert log.append([ex("  hello   WORLD "), ex("third")]) == 1
    assert log.append([]) == 0
    assert log.count() == 3
    assert [e.text for e in log.examples()] == ["Hello world", "second", "third"]


def test_duplicate_within_one_batch(log):
    assert log.append([ex("same"), ex("same")]) == 1
    assert log.count() == 1


def test_conflicting_duplicate_keeps_first_and_counts(log):
    log.append([ex("card lost", "lost_or_stolen_card")])
    assert log.append([ex("card lost", "card_arrival")]) == 0
    assert log.append([ex("card lost", "lost_or_stolen_card")]) == 0  # same label: no conflict
    assert log.examples()[0].labels == {"intent": "lost_or_stolen_card"}
    assert log.stats()["conflicts"] == 1


def test_versions_monotonic_and_up_to_version(log):
    assert log.version() == 0
    log.append([ex("one"), ex("two")])
    v2 = log.version()
    assert v2 == 2
    log.append([ex("one")])  # duplicate: version unchanged
    assert log.version() == v2
    log.append([ex("three")])
    assert log.version() == 3
    assert [e.text for e in log.examples(up_to_version=v2)] == ["one", "two"]
    assert [e.text for e in log.examples(up_to_version=0)] == []
    assert [e.text for e in log.examples(after_version=v2)] == ["three"]
    assert [e.text for e in log.examples()] == ["one", "two", "three"]


def test_round_trip_fields(log):
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    original = TrainingExample(text="t", labels={"intent": "x", "priority": "high"},
                               teacher_model="gpt", prompt_hash="abc", source="audit",
                               ticket_id="T-1", created_at=created)
    log.append([original])
    assert log.examples() == [original]


def test_reopen_after_close_keeps_data(tmp_path):
    path = tmp_path / "sub" / "log.sqlite3"
    with TrainingLog(path) as first:
        first.append([ex("one"), ex("two")])
        first.add_pending("T-9", "later", "timeout")
    with TrainingLog(path) as second:
        assert second.count() == 2 and second.version() == 2
        assert second.pending(10) == [("T-9", "later")]
        second.append([ex("three"), ex("one")])
        assert second.version() == 3


def test_contains_and_existing_hashes(log):
    log.append([ex("Known text")])
    assert log.contains("known   text")
    assert not log.contains("unknown")
    hashes = [ex(f"t{i}").content_hash for i in range(1200)]  # more than one SQL chunk
    log.append([ex(f"t{i}") for i in range(0, 1200, 2)])
    assert log.existing_hashes(hashes) == set(hashes[::2])


def test_concurrent_appends_from_threads_and_connections(tmp_path):
    path = tmp_path / "log.sqlite3"
    logs = [TrainingLog(path), TrainingLog(path)]  # two connections, like two processes
    inserted = []
    errors = []

    def writer(worker: int) -> None:
        try:
            total = 0
            for i in range(40):
                # overlapping texts across workers: every text written by two workers
                total += logs[worker % 2].append([ex(f"text {(worker // 2) * 40 + i}")])
            inserted.append(total)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(inserted) == 160
    assert logs[0].count() == 160 == logs[1].count()
    assert len({e.text for e in logs[0].examples()}) == 160
    assert logs[0].version() == 160  # duplicates burn no version numbers
    for training_log in logs:
        training_log.close()


def test_pending_backlog(log):
    log.add_pending("T-1", "first", "timeout")
    log.add_pending("T-2", "second", "circuit_open")
    log.add_pending("T-1", "first", "over_budget")  # re-added: not duplicated
    assert log.pending_count() == 2
    assert log.pending(10) == [("T-1", "first"), ("T-2", "second")]
    assert log.pending(1) == [("T-1", "first")]
    assert log.resolve_pending(["T-1", "nope"]) == 1
    assert log.pending(10) == [("T-2", "second")]
    assert log.resolve_pending([]) == 0
    assert log.pending_count() == 1


def test_stats(log):
    log.append([ex("a", source="bootstrap"), ex("b"), ex("c", source="bootstrap")])
    stats = log.stats()
    assert stats["examples"] == 3 and stats["version"] == 3
    assert stats["by_source"] == {"bootstrap": 2, "live": 1}
    assert stats["pending"] == 0 and stats["conflicts"] == 0


def test_pending_fewest_attempts_first_and_attempted_adds(log):
    log.add_pending("T-1", "first", "invalid_answer", attempted=True)
    log.add_pending("T-2", "second", "circuit_open")  # refused without a request: no attempt
    assert log.pending(10) == [("T-2", "second"), ("T-1", "first")]
    log.add_pending("T-2", "second", "invalid_answer", attempted=True)
    log.add_pending("T-2", "second", "invalid_answer", attempted=True)
    assert log.pending(10) == [("T-1", "first"), ("T-2", "second")]


def test_record_failure_parks_at_the_cap(log):
    log.add_pending("T-1", "first", "timeout")
    assert log.record_failure("T-1", "invalid_answer", max_attempts=2) is False
    assert log.record_failure("T-1", "invalid_answer", max_attempts=2) is True
    assert log.record_failure("nope", "timeout", max_attempts=2) is False
    assert log.pending(10) == [] and log.pending_count() == 0 and log.parked_count() == 1
    assert [(p.ticket_id, p.reason, p.attempts) for p in log.parked()] == [("T-1", "invalid_answer", 2)]
    log.add_pending("T-1", "first", "timeout")  # seen again: stays parked, one row
    assert log.parked_count() == 1 and log.pending_count() == 0
    assert log.resolve_pending(["T-1"]) == 1  # labelled another way: leaves for good
    assert log.parked_count() == 0


def test_log_from_before_parking_is_migrated(tmp_path):
    """A training log written by the previous release (no `parked` column) opens and drains."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE pending (ticket_id TEXT PRIMARY KEY, text TEXT NOT NULL,"
        " reason TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,"
        " first_seen TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),"
        " last_seen TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')));"
        "INSERT INTO pending (ticket_id, text, reason) VALUES ('T-old', 'old text', 'timeout');"
    )
    conn.commit()
    conn.close()
    with TrainingLog(path) as first:
        assert first.pending(10) == [("T-old", "old text")] and first.parked_count() == 0
        assert first.record_failure("T-old", "timeout", max_attempts=2) is True  # 1 + 1
    with TrainingLog(path) as again:  # migrating twice is a no-op
        assert again.stats()["parked"] == 1 and again.stats()["pending"] == 0
