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
    with TrainingLog(path) as second:
        assert second.count() == 2 and second.version() == 2
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


def test_answer_for_finds_the_logged_answer_by_dedup_key(log):
    assert log.answer_for("Where is my card?") is None
    log.append([ex("Where is my card?", ticket_id="T-1")])
    found = log.answer_for("  where IS my card?")  # same dedup key as the logged text
    assert found is not None and found.ticket_id == "T-1" and found.labels == ex("x").labels
    assert log.answer_for("where is my parcel?") is None


def test_stats(log):
    log.append([ex("a", source="bootstrap"), ex("b"), ex("c", source="bootstrap")])
    stats = log.stats()
    assert stats["examples"] == 3 and stats["version"] == 3
    assert stats["by_source"] == {"bootstrap": 2, "live": 1}
    assert stats["conflicts"] == 0


def test_log_from_an_older_release_with_a_backlog_table_still_opens(tmp_path):
    """Logs written before the backlog moved to Kafka keep their `pending` table untouched."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE pending (ticket_id TEXT PRIMARY KEY, text TEXT NOT NULL, reason TEXT NOT NULL);"
        "INSERT INTO pending (ticket_id, text, reason) VALUES ('T-old', 'old text', 'timeout');"
    )
    conn.commit()
    conn.close()
    with TrainingLog(path) as log:
        log.append([ex("one")])
        assert log.count() == 1 and log.stats()["examples"] == 1


def test_a_later_answer_merges_the_fields_a_partial_row_lacks_under_a_new_version(log):
    """A partial answer (the teacher was asked for the unsure fields only) does not block the
    rest: later fields merge in, a disagreeing stored field stays a conflict, and the grown
    row is a new version while reads pinned to an older one still see the row as it was."""
    def answer(**labels) -> TrainingExample:
        return TrainingExample(text="Card lost in Spain", labels=labels, teacher_model="t", prompt_hash="p")

    spain = [{"type": "country", "text": "Spain"}, {"type": "city", "text": "Madrid"}]
    log.append([answer(intent="lost_or_stolen_card"), ex("other")])
    assert log.version() == 2
    assert log.append([answer(intent="lost_or_stolen_card", entities=spain)]) == 1  # grew
    assert log.version() == 3 and log.count() == 2 and log.stats()["conflicts"] == 0
    assert log.answer_for("card lost in spain").labels == {"intent": "lost_or_stolen_card", "entities": spain}
    assert [e.labels for e in log.examples(after_version=2)] == [{"intent": "lost_or_stolen_card", "entities": spain}]
    assert [e.labels for e in log.examples(up_to_version=2)] == [{"intent": "lost_or_stolen_card"}, {"intent": "a"}]

    # a disagreeing intent is a conflict, never stored; the new priority still merges in
    assert log.append([answer(intent="card_arrival", priority="high", entities=spain[::-1])]) == 1
    grown = log.answer_for("Card lost in Spain")
    assert grown.labels == {"intent": "lost_or_stolen_card", "entities": spain, "priority": "high"}
    assert grown.source == "live" and log.stats()["conflicts"] == 1  # entity order is no conflict
    assert log.version() == 4
    assert [e.labels for e in log.examples(up_to_version=3)][1] == {"intent": "lost_or_stolen_card", "entities": spain}
    assert [e.labels for e in log.examples(up_to_version=1)] == [{"intent": "lost_or_stolen_card"}]
    assert [e.text for e in log.examples()] == ["other", "Card lost in Spain"]

    assert log.append([answer(intent="lost_or_stolen_card", priority="high")]) == 0  # nothing new
    assert log.version() == 4 and log.stats()["conflicts"] == 1


def test_a_forward_decision_is_the_first_answers_and_survives_a_reopen(tmp_path):
    path = tmp_path / "log.sqlite3"
    with TrainingLog(path) as first:
        assert first.first_forward("T-1", "card_arrival", "unverified") == ("card_arrival", "unverified", False)
        assert first.first_forward("T-1", "lost_or_stolen_card", "teacher") == ("card_arrival", "unverified", False)
        first.forward_sent("T-1")
        assert first.first_forward("T-2", None, "teacher") == (None, "teacher", False)
    with TrainingLog(path) as second:  # a restarted worker (a re-delivery) sees the same decision
        assert second.first_forward("T-1", "lost_or_stolen_card", "teacher") == ("card_arrival", "unverified", True)
        assert second.count() == 0 and second.version() == 0  # not training data
