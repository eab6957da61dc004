"""The held-out slice of the training log: which rows calibrate and gate, and that they are
never trained on; distill runs on teacher labels alone (no calibration file)."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas.task import TaskSpec, default_task_path
from schemas.training import TrainingExample, content_hash, eval_sample_source, is_heldout
from services.teacher.training_log import TrainingLog
from trainer import dataset
from trainer.dataset import Row
from trainer.evaluate import HeldOut, min_heldout

TASK = TaskSpec.from_file(default_task_path())
LABELS = TASK.field("intent").labels


def example(i: int, source: str) -> TrainingExample:
    return TrainingExample(text=f"ticket {source} number {i}", labels={"intent": LABELS[i % len(LABELS)]},
                           teacher_model="t", prompt_hash="p", source=source)


def test_policy_by_source_and_content_hash():
    texts = [f"my card number {i} is blocked" for i in range(4000)]
    share = sum(is_heldout(t, "bootstrap", 0.2) for t in texts) / len(texts)
    assert 0.17 < share < 0.23  # ~ the fraction, by content hash
    assert all(is_heldout(t, "sample") for t in texts[:50])  # the evaluation sample never trains
    assert all(is_heldout(t, "sample-cold") for t in texts[:50])
    assert not any(is_heldout(t, "sample-cold", cold_held=False) for t in texts[:50])
    # escalations teach; legacy audits (confident tickets only: a biased slice) now teach too
    assert not any(is_heldout(t, s) for t in texts[:200] for s in ("live", "backlog", "audit", ""))
    # the same text is on the same side whatever its case or spacing (content hash)
    assert [is_heldout(t, "bootstrap") for t in texts[:300]] == \
           [is_heldout("  " + t.upper() + " ", "bootstrap") for t in texts[:300]]


def test_the_sample_shares_are_nested_and_cold_only_while_cold():
    texts = [f"where is my refund {i}" for i in range(20000)]
    steady = {t for t in texts if eval_sample_source(t, 0.05, 0.2, cold=False)}
    cold = {t: eval_sample_source(t, 0.05, 0.2, cold=True) for t in texts}
    assert 0.04 < len(steady) / len(texts) < 0.06
    assert {t for t, s in cold.items() if s == "sample"} == steady  # a ticket keeps its side
    assert 0.18 < sum(s is not None for s in cold.values()) / len(texts) < 0.22
    assert all(eval_sample_source(t, 0.05, 0.2, cold=False) in (None, "sample") for t in texts[:500])


def test_cold_start_rows_hold_out_until_the_steady_sample_is_large_enough():
    cold = [Row(f"cold ticket {i}", {"intent": LABELS[0]}, "sample-cold") for i in range(50)]
    steady = [Row(f"steady ticket {i}", {"intent": LABELS[0]}, "sample") for i in range(30)]
    live = [Row(f"live ticket {i}", {"intent": LABELS[0]}, "live") for i in range(20)]
    train, held = dataset.split_heldout(cold + steady[:29] + live, cold_rows_until=30)
    assert {r.source for r in held} == {"sample", "sample-cold"} and len(train) == 20
    train, held = dataset.split_heldout(cold + steady + live, cold_rows_until=30)
    assert {r.source for r in held} == {"sample"} and len(held) == 30  # uniform over time again
    assert {r.source for r in train} == {"sample-cold", "live"}  # cold rows now teach


def test_training_rows_exclude_the_slice_and_the_slice_is_the_evaluators(tmp_path):
    log_path = tmp_path / "log.sqlite3"
    with TrainingLog(log_path) as log:
        log.append([example(i, "bootstrap") for i in range(600)])
        log.append([example(i, "live") for i in range(100)])
        log.append([example(i, "sample") for i in range(30)])
        log.append([example(i, "audit") for i in range(20)])  # a log from before the sample
        version = log.version()
    rows, v = dataset.rows_from_log(log_path)
    assert v == version and {r.source for r in rows} == {"bootstrap", "live", "sample", "audit"}
    data = dataset.build(rows, TASK, val_fraction=0.05, data_version=v, heldout_fraction=0.2)
    heldout = HeldOut.from_log(log_path, TASK, fraction=0.2)
    trained = {content_hash(r.text) for r in data.train + data.validation}
    held = {content_hash(r.text) for r in heldout.rows}
    assert held and trained and not trained & held
    assert len(trained) + len(held) == 750  # nothing lost between the two sides
    assert heldout.sources["sample"] == 30 and not {"live", "audit"} & set(heldout.sources)
    assert data.counts["heldout_excluded"] == len(held)
    # grows with the sample; a pinned version reproduces the old slice
    with TrainingLog(log_path) as log:
        log.append([example(i, "sample") for i in range(30, 40)])
    assert len(HeldOut.from_log(log_path, TASK, fraction=0.2).rows) == len(held) + 10
    assert HeldOut.from_log(log_path, TASK, version=version, fraction=0.2).digest == heldout.digest
    # a limit takes a uniform share by content hash, not the newest rows, and keeps its members
    limited = {r.text for r in HeldOut.from_log(log_path, TASK, version=version, fraction=0.2, limit=40).rows}
    grown = {r.text for r in HeldOut.from_log(log_path, TASK, fraction=0.2, limit=41).rows}
    assert len(limited) == 40 and limited <= {r.text for r in heldout.rows}
    assert len(limited & grown) >= 39
    sources = Counter(r.source for r in HeldOut.from_log(log_path, TASK, fraction=0.2, limit=40).rows)
    assert sources["bootstrap"] > sources["sample"]  # ~ the slice's mix (~120:40), not the newest


async def test_distill_gates_on_the_logs_slice_and_refuses_one_too_small(tmp_path):
    from services.student.registry import AdapterRegistry
    from trainer.distill import DistillConfig, run_distill_async

    log_path = tmp_path / "log.sqlite3"
    with TrainingLog(log_path) as log:
        log.append([example(i, "bootstrap") for i in range(300)])  # ~60 held out
    called = []
    cfg = DistillConfig(registry_dir=tmp_path / "reg", log_path=log_path, model_path=tmp_path / "m",
                        task_path=default_task_path(), work_dir=tmp_path / "work")
    with pytest.raises(ValueError, match=r"held-out rows in the training log's held-out slice.*"
                                         r"needs at least \d+.*triage bootstrap"):
        await run_distill_async(cfg, train_fn=lambda *a: called.append(a))
    assert not called and AdapterRegistry(tmp_path / "reg").current_id() is None  # nothing trained
    assert min_heldout(0.03, 0.05) > 60


async def test_distill_without_any_file_trains_off_the_slice_and_gates_on_it(tmp_path):
    from services.student.registry import AdapterRegistry, content_id
    from tests.unit.test_gate import GoldForOne, fake_adapter
    from trainer.distill import DistillConfig, run_distill_async

    log_path = tmp_path / "log.sqlite3"
    # ~400 held out: no adapter live, so all of them certify (the walk starts at 258)
    examples = [example(i, "bootstrap") for i in range(2000)] + [example(i, "live") for i in range(50)]
    with TrainingLog(log_path) as log:
        log.append(examples)
    candidate = fake_adapter(tmp_path / "cand", b"new")
    seen_flags = {}

    def train_fn(out_dir, flags, log_file, timeout):
        seen_flags.update(flags)
        import shutil

        shutil.copytree(candidate, out_dir)

    gold = {e.text: e.labels["intent"] for e in examples}
    cfg = DistillConfig(registry_dir=tmp_path / "reg", log_path=log_path, model_path=tmp_path / "m",
                        task_path=default_task_path(), work_dir=tmp_path / "work", heldout_fraction=0.2)
    summary = await run_distill_async(cfg, train_fn=train_fn, classifier=GoldForOne(gold, content_id(candidate)))
    assert seen_flags["heldout_fraction"] == 0.2 and seen_flags["log_path"] == log_path
    assert str(seen_flags["rows_manifest"]).endswith("trained_rows.txt")
    held = summary["heldout"]
    assert held["sources"] == {"bootstrap": held["n"]} and 340 < held["n"] < 460  # ~20%, no escalations
    assert held["selection"] == held["certification"] == held["n"]  # nothing to select between
    assert held["version"] == summary["data_version"]
    assert summary["promoted"] and AdapterRegistry(tmp_path / "reg").current_id() == content_id(candidate)
    assert summary["candidate"]["calibration"]["data"]["name"] == "heldout"
    assert summary["candidate"]["certification"]["data"]["name"] == "heldout"


async def test_the_gate_scores_each_adapter_once_per_text_across_cycles(tmp_path):
    """The live adapter is re-scored every cycle on a held-out slice that mostly did not
    change: its predictions are cached per text, so only new rows reach the engine."""
    from tests.unit.test_gate import GoldForOne
    from trainer.evaluate import evaluate

    class Counting(GoldForOne):
        texts: list[str] = []

        async def classify(self, texts, *, adapter=None):
            self.texts.extend(texts)
            return await super().classify(texts, adapter=adapter)

    class Ref:
        adapter_id, path, prompt_style = "a-00000000000000aa", tmp_path, "compact"

    rows = [Row(f"ticket number {i}", {"intent": LABELS[i % 5]}, "sample") for i in range(300)]
    gold = {r.text: r.labels["intent"] for r in rows}
    clf = Counting(gold, Ref.adapter_id)
    first = await evaluate(None, TASK, {"live": Ref}, HeldOut("heldout", "log", rows[:250]),
                           classifier=clf, cache_dir=tmp_path / "cache")
    assert len(clf.texts) == 250
    clf.texts.clear()
    second = await evaluate(None, TASK, {"live": Ref}, HeldOut("heldout", "log", rows),
                            classifier=clf, cache_dir=tmp_path / "cache")
    assert clf.texts == [r.text for r in rows[250:]]  # only the 50 new rows
    assert first["live"]["calibration"]["accuracy"] == second["live"]["calibration"]["accuracy"] == 1.0
    assert second["live"]["calibration"]["data"]["n"] == 300


def test_status_says_how_far_the_first_distil_is(tmp_path):
    from math import ceil

    from services.settings import Settings
    from trainer.dataset import CERTIFY_SHARE
    from trainer.distill import heldout_status

    s = Settings(_env_file=None, data_dir=tmp_path / "data", registry_dir=tmp_path / "reg",
                 eval_share=0.05, eval_share_cold=0.2)
    start = min_heldout(0.03, 0.05, len(TASK.fields))  # rows the certification part needs
    need = min_heldout(0.03, 0.05, len(TASK.fields), CERTIFY_SHARE)  # about, in all
    assert need == ceil(start * 1.5)
    empty = heldout_status(s, cold=True)
    assert empty["heldout_rows"] == 0 and empty["needed_to_distil"] == need and not empty["distil_can_run"]
    assert f"about {need * 5} more tickets at the evaluation sample's 20%" in empty["next"]
    assert not s.training_log_path.exists()  # status creates nothing
    # sample-cold rows until the certification part is 10 rows short of the walk's start
    rows, certifying = [], 0
    while certifying < start - 10:
        rows.append(example(len(rows), "sample-cold"))
        certifying = len(dataset.split_gate([Row(e.text, e.labels) for e in rows])[1])
    with TrainingLog(s.training_log_path) as log:
        log.append(rows)
        log.append([example(i, "live") for i in range(500)])
    almost = heldout_status(s, cold=False)
    assert almost["heldout_rows"] == len(rows) and almost["heldout_sources"] == {"sample-cold": len(rows)}
    assert almost["certification_rows"] == start - 10 and not almost["distil_can_run"]
    more = max(need - len(rows), ceil(10 / CERTIFY_SHARE))
    assert f"{more} more held-out rows" in almost["next"]
    assert f"about {ceil(more / 0.05)} more tickets at the evaluation sample's 5%" in almost["next"]
    # no adapter live: nothing to select between, every held-out row certifies the first one
    whole = heldout_status(s, cold=True, selecting=False)
    assert whole["certification_rows"] == len(rows) > start and whole["distil_can_run"]
    assert heldout_status(s, cold=True, selecting=False)["needed_to_distil"] == start
    with TrainingLog(s.training_log_path) as log:
        log.append([example(i, "sample") for i in range(40)])  # ~27 more certify
    assert heldout_status(s, cold=False)["distil_can_run"]
