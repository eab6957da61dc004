"""Retention (`triage gc`): what goes, what stays and why, on real registries and work dirs."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from services.student.registry import AdapterRegistry, content_id
from services.stream.kafka_io import plan_topics
from services.settings import Settings
from tests.unit import test_gate
from tests.unit.test_registry import make_adapter
from trainer.retention import RUN_MARKER, RetentionPolicy, RunClaim, apply, plan

distill_setup = test_gate.distill_setup  # the distil fixture: a registry with a live adapter
DAY = 86_400.0
OLD = time.time() - 30 * DAY  # far beyond any grace window


def age(path: Path, when: float = OLD) -> Path:
    """Backdate a file or a folder and its direct entries."""
    for p in [path, *(path.iterdir() if path.is_dir() else [])]:
        os.utime(p, (when, when))
    return path


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture
def promoted(tmp_path):
    """A registry after six promotions A..F (F current, stack A..E) plus G, H added, never promoted."""
    reg = AdapterRegistry(tmp_path / "reg")
    ids = {}
    for i, name in enumerate("ABCDEFGH"):
        ids[name] = reg.add(make_adapter(tmp_path / "src" / name, weights=f"w{i}".encode())).adapter_id
        if name in "ABCDEF":
            reg.promote(ids[name], f"night {name}")
    for name in ids:  # folder times say nothing: the history decides who was used last
        age(reg.adapters_dir / ids[name])
    return reg, ids


def policy(**values) -> RetentionPolicy:
    return RetentionPolicy(**{"keep_adapters": 1, "keep_rollbacks": 2, "keep_runs": 2, "grace_hours": 6.0,
                              **values})


def test_current_kept_rollbacks_and_newest_others_kept_rest_deleted(tmp_path, promoted):
    reg, ids = promoted
    work = tmp_path / "work"
    before = tree(tmp_path)
    the_plan = plan(reg, work, policy())
    assert tree(tmp_path) == before  # planning deletes nothing
    gone = {e.adapter_id for e in the_plan.delete if e.kind == "adapter"}
    kept = {e.adapter_id: e.reason for e in the_plan.keep if e.kind == "adapter"}
    assert gone == {ids[n] for n in "ABGH"}
    assert kept == {ids["F"]: "current", ids["E"]: "rollback target #1", ids["D"]: "rollback target #2",
                    ids["C"]: "one of the 1 most recently used others"}
    assert the_plan.forget_rollbacks == [ids[n] for n in "ABC"]
    assert all(e.bytes > 0 for e in the_plan.delete)

    result = apply(the_plan, reg, work)
    assert {e["adapter_id"] for e in result["deleted"]} == gone and not result["skipped"]
    assert sorted(p.name for p in reg.adapters_dir.iterdir()) == sorted(ids[n] for n in "CDEF")
    assert reg.current_id() == ids["F"] and reg.rollback_targets() == [ids["D"], ids["E"]]
    history = reg.history()
    assert sorted(h["adapter_id"] for h in history if h["event"] == "gc" and h["adapter_id"] != ids["F"]) == \
        sorted(gone)
    # rollback after gc: every step lands on an adapter that still loads, then the base model
    assert reg.rollback().adapter_id == ids["E"]
    assert reg.rollback().adapter_id == ids["D"]
    assert reg.rollback() is None and reg.current_id() is None


def test_keep_rollbacks_covers_the_whole_stack_when_large(tmp_path, promoted):
    reg, ids = promoted
    the_plan = plan(reg, tmp_path / "work", policy(keep_rollbacks=10, keep_adapters=0))
    assert {e.adapter_id for e in the_plan.delete} == {ids["G"], ids["H"]}
    assert the_plan.forget_rollbacks == []
    apply(the_plan, reg, tmp_path / "work")
    assert reg.rollback_targets() == [ids[n] for n in "ABCDE"]
    for name in "EDCBA":
        assert reg.rollback().adapter_id == ids[name]


def test_the_registry_refuses_to_delete_current_or_a_rollback_target(tmp_path, promoted):
    reg, ids = promoted
    assert reg.prune([ids["F"], ids["E"], ids["A"], "../../etc", "a-0000000000000000"], "test") == []
    assert (reg.adapters_dir / ids["F"]).is_dir() and (reg.adapters_dir / ids["A"]).is_dir()
    # a trim and a deletion in one lock hold; what the trim forgot is deletable from then on
    assert reg.prune([ids["G"], ids["D"]], "test", keep_rollbacks=1) == [ids["G"], ids["D"]]
    assert reg.rollback_targets() == [ids["E"]] and not (reg.adapters_dir / ids["D"]).exists()


def test_the_adapter_rolled_back_from_counts_as_recently_used(tmp_path, promoted):
    reg, ids = promoted
    reg.rollback("F misbehaves")  # F: neither current nor a rollback target, served until now
    the_plan = plan(reg, tmp_path / "work", policy(keep_adapters=1, keep_rollbacks=1))
    kept = {e.adapter_id: e.reason for e in the_plan.keep if e.kind == "adapter"}
    assert kept == {ids["E"]: "current", ids["D"]: "rollback target #1",
                    ids["F"]: "one of the 1 most recently used others"}


def test_a_promotion_after_planning_protects_its_adapter(tmp_path, promoted):
    reg, ids = promoted
    the_plan = plan(reg, tmp_path / "work", policy(keep_adapters=0))
    assert ids["G"] in {e.adapter_id for e in the_plan.delete}
    reg.promote(ids["G"], "a person promoted it meanwhile")
    result = apply(the_plan, reg, tmp_path / "work")
    assert ids["G"] in {e["adapter_id"] for e in result["skipped"]}
    assert reg.current().adapter_id == ids["G"]


def make_run(work: Path, stamp: str, *, finished: bool = True, when: float = OLD) -> Path:
    run = work / f"run-{stamp}-v1-abcdef"
    (run / "eval").mkdir(parents=True)
    (run / "train.log").write_text("training\n" * 100)
    if finished:
        (run / "summary.json").write_text("{}")
    return age(run, when)


def test_old_runs_pruned_newest_and_in_progress_kept(tmp_path, promoted):
    reg, ids = promoted
    work = tmp_path / "work"
    finished = [make_run(work, f"2025010{i}T020000") for i in range(1, 6)]
    failed = make_run(work, "20250106T020000", finished=False)  # killed long ago: no summary
    young = make_run(work, "20250107T020000", finished=False, when=time.time() - 60)  # no marker yet
    running = make_run(work, "20250100T020000", finished=False)  # old mtimes, but its claim is held
    (running / "adapter").mkdir()
    with RunClaim(running, ids["A"]):
        age(running)
        the_plan = plan(reg, work, policy(keep_adapters=0))
        deleted = {Path(e.path) for e in the_plan.delete if e.kind == "run"}
        assert deleted == set(finished[:4])
        kept = {Path(e.path): e.reason for e in the_plan.keep if e.kind == "run"}
        newest = "one of the 2 newest runs that ended"  # a failed run is kept for inspection too
        assert kept == {failed: newest, finished[4]: newest, young: "in progress", running: "in progress"}
        # the adapter the running distil started from is kept, though nothing else keeps it
        assert ("used by a running distil") in [e.reason for e in the_plan.keep if e.adapter_id == ids["A"]]
        before = tree(tmp_path)
        planned = {p for e in the_plan.delete for p in [Path(e.path), *Path(e.path).rglob("*")]}
        apply(the_plan, reg, work)
        assert before - tree(tmp_path) == planned  # exactly the plan: nothing more, nothing less
        assert running.is_dir() and (reg.adapters_dir / ids["A"]).is_dir()
    assert not (running / RUN_MARKER).exists()  # released: a later gc may prune it by the count
    assert "in progress" in [e.reason for e in plan(reg, work, policy()).keep if Path(e.path) == running]  # just written
    age(running)
    the_plan = plan(reg, work, policy(keep_adapters=0))
    assert running in {Path(e.path) for e in the_plan.delete}  # ended (no claim), older than the 2 newest
    assert ids["A"] in {e.adapter_id for e in the_plan.delete}


def test_prediction_and_frozen_caches(tmp_path, promoted):
    reg, ids = promoted
    work = tmp_path / "work"
    evals, frozen = work / "eval-cache", work / "frozen-cache"
    evals.mkdir(parents=True)
    frozen.mkdir()

    def cache(path: Path, when: float) -> Path:
        path.write_text('{"h": "x", "f": {}}\n')
        os.utime(path, (when, when))
        return path

    orphan = cache(evals / f"{ids['A']}-1111222233334444.jsonl", OLD)  # A goes with the registry plan
    live_new = cache(evals / f"{ids['F']}-aaaaaaaaaaaaaaaa.jsonl", OLD + DAY)
    live_old = cache(evals / f"{ids['F']}-bbbbbbbbbbbbbbbb.jsonl", OLD)  # the engine changed since
    base = cache(evals / "base-cccccccccccccccc.jsonl", OLD)
    fresh_orphan = cache(evals / "a-00000000000000ff-dddddddddddddddd.jsonl", time.time())  # a candidate being scored
    current_pt = cache(frozen / "frozen-1111111111111111.pt", OLD + DAY)
    other_pt = cache(frozen / "frozen-2222222222222222.pt", OLD)  # another base model, cut or dtype
    partial = cache(frozen / "frozen-1111111111111111.123.partial", OLD)

    the_plan = plan(reg, work, policy(keep_adapters=0))
    deleted = {Path(e.path) for e in the_plan.delete if e.kind in ("eval-cache", "frozen-cache")}
    assert deleted == {orphan, live_old, other_pt, partial}
    kept = {Path(e.path) for e in the_plan.keep}
    assert {live_new, base, fresh_orphan, current_pt} <= kept
    apply(the_plan, reg, work)
    assert sorted(p.name for p in evals.iterdir()) == sorted(p.name for p in (live_new, base, fresh_orphan))
    assert [p.name for p in frozen.iterdir()] == [current_pt.name]


def test_symlinks_are_never_followed_out(tmp_path, promoted):
    reg, ids = promoted
    outside = tmp_path / "precious"
    make_run(outside, "20240101T000000")
    (outside / "keep.jsonl").write_text("x")
    (outside / "frozen-9.pt").write_text("x")
    age(outside)
    work = tmp_path / "work"
    for i in range(3):
        make_run(work, f"2025010{i}T000000")
    (work / "run-20230101T000000-v1-linked").symlink_to(outside / "run-20240101T000000-v1-abcdef")
    (work / "eval-cache").mkdir()
    (work / "eval-cache" / f"{ids['A']}-1111222233334444.jsonl").symlink_to(outside / "keep.jsonl")
    (work / "frozen-cache").mkdir()
    (work / "frozen-cache" / "frozen-0.pt").symlink_to(outside / "frozen-9.pt")
    (reg.adapters_dir / "a-ffffffffffffffff").symlink_to(outside, target_is_directory=True)
    before = tree(outside)
    the_plan = plan(reg, work, policy(keep_runs=0, keep_adapters=0))
    assert all(not Path(e.path).is_symlink() for e in the_plan.delete)
    assert all(Path(e.path).resolve().is_relative_to(tmp_path / s) for e in the_plan.delete for s in ["reg", "work"]
               if Path(e.path).is_relative_to(tmp_path / s))
    apply(the_plan, reg, work)
    assert tree(outside) == before
    assert (work / "run-20230101T000000-v1-linked").is_symlink()
    assert not list(work.glob("run-2025*"))  # the real runs did go (keep_runs=0)


def test_dry_run_cli_deletes_nothing_and_apply_deletes_the_plan(tmp_path, promoted, monkeypatch, capsys):
    from services.cli import main

    reg, ids = promoted
    work = tmp_path / "work"
    for i in range(4):
        make_run(work, f"2025010{i}T000000")
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(reg.root))
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_RETENTION_KEEP_RUNS", "1")
    monkeypatch.setenv("TRIAGE_RETENTION_KEEP_ADAPTERS", "0")
    monkeypatch.delenv("TRIAGE_DEPLOYMENT_PATH", raising=False)
    before = tree(tmp_path)
    assert main(["gc", "--work-dir", str(work)]) == 0
    text = capsys.readouterr().out
    assert "would delete" in text and "dry run" in text and "KiB" in text
    assert tree(tmp_path) == before
    assert main(["gc", "--work-dir", str(work), "--json"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert dry["applied"] is False and tree(tmp_path) == before
    planned = {e["path"] for e in dry["plan"]["delete"]}
    adapters = {str(reg.adapters_dir / ids[n]) for n in "ABGH"}  # 3 rollback targets kept by default
    assert len([p for p in planned if "/run-" in p]) == 3 and planned - adapters == {p for p in planned if "/run-" in p}
    assert adapters <= planned
    assert main(["gc", "--work-dir", str(work), "--json", "--apply"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert {e["path"] for e in done["result"]["deleted"]} == planned
    assert not any(Path(p).exists() for p in planned)
    assert reg.current_id() == ids["F"] and len(reg.rollback_targets()) == 3  # the default keeps 3


def test_old_forwards_pruned_labels_kept(tmp_path, promoted):
    from schemas.training import TrainingExample
    from services.teacher.training_log import TrainingLog

    reg, _ = promoted
    path = tmp_path / "data" / "training_log.sqlite3"
    with TrainingLog(path) as log:
        log.append([TrainingExample(text="card lost", labels={"intent": "lost_card"}, teacher_model="m",
                                    prompt_hash="p", source="teacher")])
        log.first_forward("old-ticket", "lost_card", "cards")
        log.first_forward("new-ticket", "lost_card", "cards")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE forwards SET created_at = '2020-01-01T00:00:00.000Z' WHERE ticket_id = 'old-ticket'")
        conn.execute("UPDATE examples SET created_at = '2020-01-01T00:00:00.000Z'")  # labels: never pruned
    the_plan = plan(reg, tmp_path / "work", policy(), log_path=path)
    assert the_plan.forwards_rows == 1
    with TrainingLog(path) as log:
        assert log.first_forward("old-ticket", "x", "y") == ("lost_card", "cards", False)  # dry run: still there
    assert apply(the_plan, reg, tmp_path / "work")["forwards_rows"] == 1
    with TrainingLog(path) as log:
        assert log.count() == 1
        assert log.first_forward("new-ticket", "x", "y") == ("lost_card", "cards", False)
        assert log.first_forward("old-ticket", "x", "y") == ("x", "y", False)  # forgotten: recorded anew


def test_old_answered_escalations_pruned_with_the_forwards(tmp_path, promoted):
    from services.teacher.training_log import TrainingLog

    reg, _ = promoted
    path = tmp_path / "data" / "training_log.sqlite3"
    with TrainingLog(path) as log:
        log.mark_answer_published("old@1")
        log.mark_answer_published("new@2")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE answered SET created_at = '2020-01-01T00:00:00.000Z' WHERE escalation = 'old@1'")
    the_plan = plan(reg, tmp_path / "work", policy(), log_path=path)
    assert the_plan.forwards_rows == 1
    assert apply(the_plan, reg, tmp_path / "work")["forwards_rows"] == 1
    with TrainingLog(path) as log:
        assert log.answer_published("new@2") and not log.answer_published("old@1")


def test_dead_letter_topic_has_a_retention():
    s = Settings(_env_file=None)
    assert dict(plan_topics(s)[s.dead_letter_topic].config) == {"retention.ms": str(30 * 86_400_000)}
    s = Settings(_env_file=None, dead_letter_retention_days=2)
    assert dict(plan_topics(s)[s.dead_letter_topic].config) == {"retention.ms": "172800000"}


async def test_gc_during_a_distil_keeps_its_run_and_the_adapter_it_started_from(tmp_path, distill_setup):
    """The real distil holds its run claim while it trains: a gc then (after a rollback that left
    the live adapter nowhere on the stack) keeps the run and that adapter; the run ends released."""
    from tests.unit.test_gate import GoldForOne, fake_adapter, trains
    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new")
    seen = {}

    def rollback_then_gc():
        registry.rollback("operator")  # `old`: neither current nor a rollback target any more
        the_plan = plan(registry, tmp_path / "work", policy(keep_adapters=0, keep_runs=0))
        seen["runs"] = {e.reason for e in the_plan.keep if e.kind == "run"}
        seen["old"] = [e.reason for e in the_plan.keep if e.adapter_id == old.adapter_id]
        apply(the_plan, registry, tmp_path / "work")

    summary = await run_distill_async(config(), train_fn=trains(candidate, during=rollback_then_gc),
                                      classifier=GoldForOne(gold, content_id(candidate)))
    assert seen == {"runs": {"in progress"}, "old": ["used by a running distil"]}
    assert (registry.adapters_dir / old.adapter_id).is_dir()  # the trainer warm-started from it
    run = Path(summary["run_dir"])
    assert (run / "summary.json").exists() and not (run / RUN_MARKER).exists()
    assert run in {Path(e.path) for e in plan(registry, tmp_path / "work", policy(keep_runs=0)).delete}


def test_distill_ends_with_gc_apply(tmp_path, promoted, capsys):
    from trainer.distill import collect_garbage

    reg, ids = promoted
    work = tmp_path / "work"
    runs = [make_run(work, f"2025010{i}T000000") for i in range(3)]
    s = Settings(_env_file=None, registry_dir=reg.root, data_dir=tmp_path / "data", retention_keep_runs=1,
                 retention_keep_adapters=0)
    collect_garbage(s, work)
    assert "gc: freed" in capsys.readouterr().out
    assert [r.exists() for r in runs] == [False, False, True]
    assert not (reg.adapters_dir / ids["A"]).exists() and reg.rollback_targets() == [ids[n] for n in "CDE"]
