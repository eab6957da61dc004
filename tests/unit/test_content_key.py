"""Issue 23 item 9: one normaliser for dedup and every content-hash split, so variants of one
ticket never land on both sides of the held-out split; a calibration file's texts are never
trained on; a training log written under the old normaliser is re-keyed when opened."""

from __future__ import annotations

import hashlib
import json
import sqlite3

from schemas.task import TaskSpec, default_task_path
from schemas.text import DEDUP_KEY_VERSION, dedup_key
from schemas.training import TrainingExample, content_hash, is_heldout
from services.teacher.training_log import TrainingLog
from trainer import dataset
from trainer.dataset import Row

TASK = TaskSpec.from_file(default_task_path())
LABELS = TASK.field("intent").labels

VARIANTS = [  # one ticket each: punctuation, Unicode forms, case, spacing, subject joined to body
    ("Card not arrived\nI ordered it 2 weeks ago, where is it?", "card not arrived: I ordered it 2 weeks ago where is it"),
    ("Refund – please!!", "refund please"),
    ("Ｃａｆé payment don't show", "CAFE\u0301 payment dont show"),
    ("Straße  card", "strasse card"),
]


def test_variants_of_one_ticket_share_one_key_and_one_side_of_every_split():
    for a, b in VARIANTS:
        assert dedup_key(a) == dedup_key(b) and content_hash(a) == content_hash(b), (a, b)
        assert is_heldout(a, "bootstrap", 0.5) == is_heldout(b, "bootstrap", 0.5)
        assert dataset.in_validation(a, 0.5) == dataset.in_validation(b, 0.5)
    # other words, numbers or a missing subject are other tickets
    assert dedup_key("order 123") != dedup_key("order 124")
    assert dedup_key("Card not arrived\nwhere is it") != dedup_key("where is it")
    assert dedup_key("🙏") != dedup_key("👍")  # no letters at all: the text itself
    # over many texts, a variant is held out exactly when its original is (20% share)
    texts = [f"My card #{i} was charged twice, why?" for i in range(2000)]
    held = [is_heldout(t, "bootstrap") for t in texts]
    assert 300 < sum(held) < 500
    assert held == [is_heldout(t.upper().replace("#", "# ").replace(",", " -").replace("?", " ??"), "bootstrap") for t in texts]


def test_a_calibration_file_is_never_trained_on(tmp_path):
    calib = tmp_path / "calib.tsv"
    calib.write_text("text\tlabel\n" + "".join(f"ticket number {i}\t{LABELS[0]}\n" for i in range(50)))
    rows = [Row(f"Ticket number {i}!", {"intent": LABELS[1]}, "live") for i in range(100)]  # variants
    data = dataset.build(rows, TASK, val_fraction=0.1, heldout_fraction=0.2, exclude=dataset.file_keys(calib))
    trained = {content_hash(r.text) for r in data.train + data.validation}
    assert len(trained) == 50 and not trained & dataset.file_keys(calib)
    assert data.counts["heldout_excluded"] == 50


def old_hash(text: str) -> str:  # schemas.training.content_hash before DEDUP_KEY_VERSION 2
    return hashlib.sha256(" ".join(text.split()).lower().encode()).hexdigest()


def write_old_log(path, rows) -> None:
    """A log as the previous release wrote it: its schema, its keys, no key version."""
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE examples (version INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT NOT NULL UNIQUE,
            text TEXT NOT NULL, labels TEXT NOT NULL, teacher_model TEXT NOT NULL, prompt_hash TEXT NOT NULL,
            source TEXT NOT NULL, ticket_id TEXT, created_at TEXT NOT NULL);
        CREATE TABLE conflicts (id INTEGER PRIMARY KEY AUTOINCREMENT, content_hash TEXT NOT NULL,
            labels TEXT NOT NULL, teacher_model TEXT NOT NULL, source TEXT NOT NULL, created_at TEXT NOT NULL);""")
    for text, label in rows:
        conn.execute("INSERT INTO examples (content_hash, text, labels, teacher_model, prompt_hash, source,"
                     " created_at) VALUES (?, ?, ?, 't', 'p', 'bootstrap', '2025-01-01T00:00:00+00:00')",
                     (old_hash(text), text, json.dumps({"intent": label})))
    conn.execute("INSERT INTO conflicts (content_hash, labels, teacher_model, source, created_at)"
                 " VALUES (?, '{}', 't', 'live', 'x')", (old_hash("Where is my card?"),))
    conn.commit()
    conn.close()


def test_a_log_written_with_the_old_keys_is_rekeyed_on_open(tmp_path):
    path = tmp_path / "log.sqlite3"
    rows = [("Where is my card?", LABELS[0]), ("where is my card", LABELS[0]),  # one ticket now
            ("Refund, please!", LABELS[1]), ("refund please", LABELS[2]),  # ... answered twice
            ("Something else", LABELS[3])]
    write_old_log(path, rows)
    with TrainingLog(path) as log:
        before = [(e.text, e.labels) for e in log.examples()]
        assert before == [(t, {"intent": lab}) for t, lab in rows]  # nothing lost, same versions
        assert log.version() == 5
        # the new key finds every variant: no new row, the teacher is not asked again
        assert log.answer_for("WHERE is my card").labels == {"intent": LABELS[0]}
        assert log.existing_hashes([content_hash("refund... please")]) == {content_hash("refund please")}
        assert log.append([TrainingExample(text="Where is my card!!", labels={"intent": LABELS[0]},
                                           teacher_model="t", prompt_hash="p", source="live")]) == 0
        assert log.version() == 5
        stats = log.stats()
    assert stats["conflicts"] == 2  # the old one (re-keyed) + the refund answered two ways
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == DEDUP_KEY_VERSION
    keys = [k for (k,) in conn.execute("SELECT content_hash FROM examples ORDER BY version")]
    assert keys[0] == content_hash("Where is my card?") and keys[1] == f"{keys[0]}#2"
    assert set(conn.execute("SELECT content_hash FROM conflicts")) == {(keys[0],), (content_hash("refund please"),)}
    conn.close()
    # the dataset keeps the first answer of each ticket, and a second open changes nothing
    assert [r.text for r in dataset.dedup(dataset.rows_from_log(path)[0])] == \
        ["Where is my card?", "Refund, please!", "Something else"]
    with TrainingLog(path) as log:
        assert [(e.text, e.labels) for e in log.examples()] == before
