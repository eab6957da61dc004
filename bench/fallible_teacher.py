"""A fallible teacher and 2% human feedback: what the loop certifies, what gold says (issue 26).

    .venv/bin/python -m bench.fallible_teacher --quick                       # does it work (~15 min)
    .venv/bin/python -m bench.fallible_teacher --out var/bench/fallible.json  # the issue's sizes

Embedded Tansu, `triage standin --error-rate R` as the teacher (a confusable wrong label on a
seeded share R of texts, deterministic per text: services/dev/standin_errors.py), the service
with the real vLLM student, in one process (as `triage demo`):

1. bootstrap: the fallible teacher labels `--bootstrap` train texts; distil #1 (defaults);
2. phase A: `--stream` tickets (test split); people review a seeded `--feedback-share` of the
   published answers and send the gold label on the feedback topic (confirmation or correction,
   quoting the published answer), as agents on a desk would;
3. distil #2 (nightly, warm start): the log now holds the people's labels, which outrank the
   teacher's rows they contradict (trainer/dataset.py, `LABEL_RANK`);
4. phase B: `--stream` other tickets (the rest of test, then train texts never bootstrapped).

Per phase: the certified bound (vs the teacher: the only truth the loop has), accepted error vs
the teacher and vs gold with Wilson 95% intervals, the teacher's accuracy vs gold (on every
streamed ticket: what it would answer, computed from its seeded error rule and checked against
the answers it logged), and what the service measures from the people (services/teacher/quality.py).
Gold is used for the report and as the people's answers only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from bench._common import machine, say, setup
from bench._loop import add_sizes, apply_sizes, finish, fresh_workdir, start_loop
from bench.drift import wilson

QUICK = dict(bootstrap=2400, stream=300, feedback_share=0.10, train_minutes=4.0)
FULL = dict(bootstrap=8000, stream=2000, feedback_share=0.02, train_minutes=28.0)
FOLDER = {"data", "registry", "distill", "fallible-report.json"}


def plan(data: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The bootstrap texts and the two phases' (text, gold) rows, seeded; never overlapping."""
    rng = random.Random(args.seed)
    train = list(data.train)
    rng.shuffle(train)
    boot, rest = train[:args.bootstrap], train[args.bootstrap:]
    test = list(data.test)
    rng.shuffle(test)
    streamable = test + rest  # texts the bootstrap never showed the teacher
    if len(streamable) < 2 * args.stream:
        raise SystemExit(f"only {len(streamable)} texts left to stream; lower --stream or --bootstrap")
    return {"bootstrap": [t for t, _ in boot], "A": streamable[:args.stream],
            "B": streamable[args.stream:2 * args.stream]}


def teacher_label_rule(standin: Any, task: Any, rate: float) -> Any:
    """The fallible stand-in's answer for (text, gold label): its own seeded rule."""
    field = task.fields[0]

    def label(text: str, gold: str) -> str:
        if standin.errors.is_wrong(text, field.name, rate):
            return standin.errors.wrong_label(text, field.name, gold, field.labels)
        return gold
    return label


def reviewed(ticket_id: str, share: float, seed: int) -> bool:
    """Whether people review this ticket's published answer: a seeded hash share."""
    from schemas.training import hash_unit

    return hash_unit(ticket_id, f"bench-feedback:{seed}") < share


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from schemas.classification import Classification
    from schemas.task import TaskSpec
    from services.dev.demo_data import banking77
    from services.dev.demo_stream import stream_tickets
    from services.stream.kafka_io import produce, read_topic
    from services.teacher.quality import quality_from_log

    workdir = fresh_workdir(args.workdir, FOLDER)
    data = banking77()
    task = TaskSpec.from_file(data.task_path)
    field = task.fields[0].name
    scenario = plan(data, args)
    report: dict[str, Any] = {"args": vars(args), "machine": machine(), "phases": [], "distil": []}
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        loop = await start_loop(stack, workdir, data, report, train_minutes=args.train_minutes,
                                standin={"label_error_rate": args.error_rate, "seed": args.seed},
                                settings={"eval_share": args.eval_share}, epsilon=args.epsilon)
        settings, service, worker, pipeline = loop.settings, loop.service, loop.worker, loop.pipeline
        teacher_says = teacher_label_rule(loop.standin, task, args.error_rate)
        say(f"bootstrap: the fallible teacher labels {len(scenario['bootstrap'])} train texts")
        await loop.bootstrap(scenario["bootstrap"], report)

        async def distil(name: str) -> None:
            report["distil"].append(await loop.distil(name))

        async def phase(name: str, rows: list[tuple[str, dict[str, Any]]], *, feedback: bool) -> None:
            live = pipeline.classifier.live_adapter
            threshold = (live.meta.get("threshold") or {}) if live else {}
            say(f"phase {name}: {len(rows)} tickets, adapter {getattr(live, 'adapter_id', None)}")
            stream = await stream_tickets(name=name, bootstrap=settings.bootstrap_servers,
                                          tickets_topic=settings.tickets_topic, results_topic=settings.results_topic,
                                          dead_letter_topic=settings.dead_letter_topic, rows=rows, id_prefix=name,
                                          task=task)
            await worker.idle()
            ids = {f"{name}-{i}": row for i, row in enumerate(rows)}
            records = await read_topic(settings.bootstrap_servers, settings.results_topic, timeout_s=60,
                                       until=lambda r: set(ids) <= {x.key.decode() for x in r if x.key})
            latest = {r.key.decode(): r for r in records if r.key and r.key.decode() in ids}
            tally = dict(accepted=0, wrong_vs_teacher=0, wrong_vs_gold=0, teacher_right=0, reviewed=0,
                         corrected=0, student_agrees_teacher=0)
            sent = []
            for tid, (text, gold) in ids.items():
                result = Classification.model_validate_json(latest[tid].value)
                said = result.fields.get(field)
                tally["teacher_right"] += teacher_says(text, gold[field]) == gold[field]
                own = result.student.get(field) if result.student else None  # its answer, escalated or not
                tally["student_agrees_teacher"] += own is not None and own.label == teacher_says(text, gold[field])
                if result.route.value == "student":
                    tally["accepted"] += 1
                    tally["wrong_vs_teacher"] += said != teacher_says(text, gold[field])
                    tally["wrong_vs_gold"] += said != gold[field]
                if feedback and reviewed(tid, args.feedback_share, args.seed):
                    tally["reviewed"] += 1
                    tally["corrected"] += said != gold[field]
                    sent.append((tid.encode(), json.dumps({
                        "ticket_id": tid, "fields": {field: gold[field]}, "source": "human", "author": "bench",
                        "text": text, "published": json.loads(latest[tid].value)}).encode()))
            if sent:
                await produce(settings.bootstrap_servers, settings.feedback_topic, sent)
                await feedback_stored(service, len(sent))
            n, acc = len(rows), tally["accepted"]
            row = {
                "phase": name, "adapter_id": getattr(live, "adapter_id", None), "tickets": n,
                "escalation_rate": stream.as_dict()["escalation_rate"],
                "certified_upper_bound": threshold.get("upper_bound"), "threshold": threshold.get("value"),
                "accepted": acc,
                "accepted_error_vs_teacher": round(tally["wrong_vs_teacher"] / acc, 4) if acc else None,
                "accepted_error_vs_teacher_ci95": wilson(tally["wrong_vs_teacher"], acc),
                "accepted_error_vs_gold": round(tally["wrong_vs_gold"] / acc, 4) if acc else None,
                "accepted_error_vs_gold_ci95": wilson(tally["wrong_vs_gold"], acc),
                "teacher_accuracy_vs_gold": round(tally["teacher_right"] / n, 4),
                "teacher_accuracy_vs_gold_ci95": wilson(tally["teacher_right"], n),
                "published_accuracy_vs_gold": stream.as_dict()["published_accuracy"],
                "student_accuracy_vs_gold": stream.as_dict()["student_accuracy"],  # every ticket's own answer
                "student_agreement_with_teacher": round(tally["student_agrees_teacher"] / n, 4),
                "feedback_sent": len(sent), "feedback_corrections": tally["corrected"],
                "people_say": quality_from_log(settings.training_log_path),
            }
            report["phases"].append(row)
            print(line(row), flush=True)

        await distil("distil #1 (fallible teacher's bootstrap labels)")
        await phase("A", scenario["A"], feedback=True)
        await distil("distil #2 (nightly: the people's labels outrank the teacher's)")
        await phase("B", scenario["B"], feedback=False)
        report["teacher_rule_check"] = teacher_rule_check(settings.training_log_path, data, field, teacher_says)
    report["minutes"] = round((time.monotonic() - started) / 60, 1)
    (workdir / "fallible-report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


async def feedback_stored(service: Any, expected: int, timeout_s: float = 120.0) -> None:
    """Wait until the service's feedback lane has an outcome for `expected` more records."""
    def total() -> float:
        from services.teacher.feedback import OUTCOMES

        return sum(service.metrics.registry.get_sample_value("triage_feedback_total", {"outcome": o}) or 0
                   for o in OUTCOMES)
    deadline = time.monotonic() + timeout_s
    start = getattr(service, "_bench_feedback_seen", 0)
    while total() < start + expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"feedback: {total() - start:.0f} of {expected} records have an outcome")
        await asyncio.sleep(0.5)
    service._bench_feedback_seen = start + expected


def teacher_rule_check(log_path: Path, data: Any, field: str, teacher_says: Any) -> dict[str, int]:
    """The report's teacher figures use the stand-in's rule offline: check it against every
    answer the teacher logged (same text, same label) so the figures are the teacher's own."""
    from services.teacher.training_log import TrainingLog

    gold = {text: g[field] for text, g in data.train + data.test}
    same = checked = 0
    with TrainingLog(log_path) as log:
        for ex in log.examples():
            if ex.labelled_by == "teacher" and ex.text in gold:
                checked += 1
                same += ex.labels.get(field) == teacher_says(ex.text, gold[ex.text])
    return {"checked": checked, "same": same}


def heldout_curve(workdir: Path, coverages: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)) -> list[dict[str, Any]]:
    """What a threshold would certify and what gold says, from a finished run's files: each
    adapter's cached predictions on the held-out slice (`distill/eval-cache`), most confident
    first, against the log's label (the teacher's, or a person's) and against gold."""
    from schemas.task import TaskSpec
    from schemas.training import content_hash
    from services.dev.demo_data import banking77
    from services.teacher.training_log import TrainingLog

    data = banking77()
    field = TaskSpec.from_file(data.task_path).fields[0].name
    gold = {content_hash(text): g[field] for text, g in data.train + data.test}
    with TrainingLog(workdir / "data" / "training_log.sqlite3") as log:
        logged = {ex.content_hash: ex.labels.get(field) for ex in log.examples()}
    out = []
    for cache in sorted((workdir / "distill" / "eval-cache").glob("a-*.jsonl")):
        rows = []
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            label, confidence = row["f"][field]
            if row["h"] in logged and row["h"] in gold:
                rows.append((confidence, label, logged[row["h"]], gold[row["h"]]))
        rows.sort(key=lambda r: -r[0])
        for share in coverages:
            top = rows[:max(1, round(share * len(rows)))]
            vs_teacher = sum(label != said for _, label, said, _ in top)
            vs_gold = sum(label != right for _, label, _, right in top)
            out.append({"adapter": "-".join(cache.stem.split("-")[:2]), "rows": len(rows), "coverage": share,
                        "accepted": len(top), "min_confidence": round(top[-1][0], 4),
                        "error_vs_teacher": round(vs_teacher / len(top), 4),
                        "error_vs_teacher_ci95": wilson(vs_teacher, len(top)),
                        "error_vs_gold": round(vs_gold / len(top), 4), "error_vs_gold_ci95": wilson(vs_gold, len(top)),
                        "teacher_wrong": round(sum(s != r for _, _, s, r in top) / len(top), 4)})
    return out


HEADER = ("phase tickets escalated  certified  accepted  error vs teacher [95%]     error vs gold [95%]"
          "        teacher vs gold   feedback (corrections)")


def line(r: dict[str, Any]) -> str:
    def pct(value: Any, ci: list[float]) -> str:
        return "-" if value is None else f"{value:.1%} [{ci[0]:.1%}, {ci[1]:.1%}]"
    bound = "none" if r["certified_upper_bound"] is None or r["certified_upper_bound"] >= 1 else \
        f"<= {r['certified_upper_bound']:.1%}"
    return (f"{r['phase']:<6}{r['tickets']:>7}{r['escalation_rate']:>10.1%}  {bound:>9}  {r['accepted']:>8}  "
            f"{pct(r['accepted_error_vs_teacher'], r['accepted_error_vs_teacher_ci95']):<25}"
            f"{pct(r['accepted_error_vs_gold'], r['accepted_error_vs_gold_ci95']):<25}"
            f"{r['teacher_accuracy_vs_gold']:>8.1%}          {r['feedback_sent']} ({r['feedback_corrections']})")


def people_line(r: dict[str, Any]) -> str:
    q = r["people_say"].get("all") or {}

    def one(name: str) -> str:
        a = q.get(name) or {}
        return "-" if not a.get("n") else f"{a['rate']:.1%} of {a['n']} [{a['low']:.1%}, {a['high']:.1%}]"
    return (f"after phase {r['phase']}, from people (all feedback): student {one('student_vs_people')}, "
            f"teacher {one('teacher_vs_people')}, student vs teacher {one('student_vs_teacher')}")


def main(argv: list[str] | None = None) -> int:
    setup()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sizes(parser, FULL, QUICK)
    parser.add_argument("--error-rate", type=float, default=0.10, help="the stand-in's wrong-label share")
    parser.add_argument("--eval-share", type=float, default=0.05, help="TRIAGE_EVAL_SHARE while streaming")
    parser.add_argument("--epsilon", type=float, default=0.03, help="the distils' target error (vs the "
                        "teacher); below the teacher's own error rate nothing certifies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="var/bench/fallible")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    parser.add_argument("--curve-from", default=None, metavar="WORKDIR", help="no run: from a finished "
                        "run's folder, each adapter's held-out predictions by confidence vs teacher and gold")
    args = parser.parse_args(argv)
    if args.curve_from:
        print("adapter              held-out coverage accepted  min conf  error vs teacher [95%]    "
              "error vs gold [95%]       teacher wrong")
        for c in heldout_curve(Path(args.curve_from)):
            vt, vg = c["error_vs_teacher_ci95"], c["error_vs_gold_ci95"]
            print(f"{c['adapter']:<21}{c['rows']:>8}{c['coverage']:>9.0%}{c['accepted']:>9}{c['min_confidence']:>10.3f}  "
                  f"{c['error_vs_teacher']:>5.1%} [{vt[0]:.1%}, {vt[1]:.1%}]     {c['error_vs_gold']:>5.1%} "
                  f"[{vg[0]:.1%}, {vg[1]:.1%}]    {c['teacher_wrong']:>6.1%}")
        return 0
    apply_sizes(args, FULL, QUICK)
    report = asyncio.run(run(args))
    say(f"\n{HEADER}")
    for row in report["phases"]:
        print(line(row))
    for row in report["phases"]:
        print(f"phase {row['phase']}: the student's own answer on every ticket (escalated or not): "
              f"{row['student_accuracy_vs_gold']:.1%} vs gold, {row['student_agreement_with_teacher']:.1%} "
              f"agreement with the teacher; published {row['published_accuracy_vs_gold']:.1%} vs gold")
    for row in report["phases"]:
        print(people_line(row))
    for d in report["distil"]:
        say(f"{d['name']}: {'promoted' if d['promoted'] else 'rejected'}, {d['total_minutes']} min; {d['reason']}")
    check = report["teacher_rule_check"]
    say(f"teacher rule vs its logged answers: {check['same']} / {check['checked']} the same")
    return finish(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
