"""Drift, noticed and absorbed: a launch of intents the training log never saw (issue 26, item 4).

    .venv/bin/python -m bench.drift --quick                     # ~15 min on 2 CPU cores: does it work
    .venv/bin/python -m bench.drift --out var/bench/drift.json  # the full scenario

Embedded Tansu, the gold-label stand-in as teacher, the service with the real vLLM student,
in one process (as `triage demo`). K BANKING77 intents are held back: the bootstrap labels a
sample of the train split without them, distil #1 learns the rest. Then windows of tickets
(each TRIAGE_DRIFT_WINDOW long) stream: `before` windows of known intents only; `during`
windows where a share of the tickets are the held-back intents (the launch); the nightly
distil #2 (warm start) learns them from their escalations; `after` windows with the same mix.
Streamed tickets were never bootstrapped (the test split, the rest of train).

Per window: escalation rate, accepted error vs gold (the student's answers published alone)
with its Wilson 95% interval against epsilon, the share of tickets whose gold label the live
adapter never trained on, and the service's own drift window (services/stream/drift.py):
the teacher-measured novel share, audited accuracy and alerts. Gold is used for the report
only; the loop sees the stand-in's answers (which are gold: the teacher is never wrong here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from contextlib import AsyncExitStack
from typing import Any

from bench._common import machine, say, setup
from bench._loop import add_sizes, apply_sizes, finish, fresh_workdir, start_loop

QUICK = dict(bootstrap=2400, hold_out=6, window=200, before=1, during=2, after=2, epochs=2.0,
             epochs_warm=1.0, train_minutes=8.0, new_share=0.3)
FULL = dict(bootstrap=6000, hold_out=8, window=1000, before=1, during=2, after=2, epochs=3.0,
            epochs_warm=2.0, train_minutes=20.0, new_share=0.25)


def plan(data: Any, field: str, args: argparse.Namespace) -> dict[str, Any]:
    """Held-back intents, the bootstrap sample and each window's tickets (text, gold), seeded."""
    rng = random.Random(args.seed)
    labels = sorted({gold[field] for _, gold in data.train})
    held = set(rng.sample(labels, args.hold_out))
    known_train = [(t, g) for t, g in data.train if g[field] not in held]
    boot_idx = set(rng.sample(range(len(known_train)), min(args.bootstrap, len(known_train))))
    old = [r for r in data.test if r[1][field] not in held] + \
          [r for i, r in enumerate(known_train) if i not in boot_idx]
    new = [r for r in data.test + data.train if r[1][field] in held]
    rng.shuffle(old)
    rng.shuffle(new)
    windows = []
    phases = ["before"] * args.before + ["during"] * args.during + ["after"] * args.after
    for i, phase in enumerate(phases):
        n_new = 0 if phase == "before" else round(args.new_share * args.window)
        if len(new) < n_new or len(old) < args.window - n_new:
            raise SystemExit(f"window {i}: not enough tickets left ({len(new)} new, {len(old)} known)")
        rows = [new.pop() for _ in range(n_new)] + [old.pop() for _ in range(args.window - n_new)]
        rng.shuffle(rows)
        windows.append((phase, rows))
    return {"held": sorted(held), "bootstrap": [known_train[i][0] for i in sorted(boot_idx)], "windows": windows}


def wilson(k: int, n: int) -> list[float]:
    from services.teacher.escalation import wilson_interval

    return [round(x, 4) for x in wilson_interval(k, n)]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from schemas.task import TaskSpec
    from services.dev.demo_data import banking77
    from services.dev.demo_stream import stream_tickets
    from services.settings import Settings
    from services.student.registry import AdapterRegistry

    workdir = fresh_workdir(args.workdir, {"data", "registry", "distill", "drift-report.json"})
    data = banking77()
    task = TaskSpec.from_file(data.task_path)
    field = task.fields[0].name
    scenario = plan(data, field, args)
    say(f"held back {len(scenario['held'])} intents: {', '.join(scenario['held'])}")
    report: dict[str, Any] = {"args": vars(args), "held_back": scenario["held"], "machine": machine(),
                              "windows": [], "distil": []}
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        guard = Settings(_env_file=None).novelty_guard_min_novel if args.guard_min_novel is None else args.guard_min_novel
        loop = await start_loop(stack, workdir, data, report, train_minutes=args.train_minutes, settings={
            "drift_window": args.window, "eval_share": args.eval_share, "novelty_guard_min_novel": guard})
        settings, service, worker, pipeline = loop.settings, loop.service, loop.worker, loop.pipeline
        say(f"bootstrap: the teacher labels {len(scenario['bootstrap'])} train tickets of the known intents")
        await loop.bootstrap(scenario["bootstrap"], report)

        async def distil(name: str, epochs: float) -> None:
            after = len(report["windows"]) - 1
            report["distil"].append({**await loop.distil(name, epochs=epochs), "after_window": after})

        await distil("distil #1 (without the held-back intents)", args.epochs)
        registry = AdapterRegistry(settings.registry_dir)
        for i, (phase, rows) in enumerate(scenario["windows"]):
            if phase == "after" and scenario["windows"][i - 1][0] != "after":
                await distil("distil #2 (nightly: learns the launch from its escalations)", args.epochs_warm)
            live = pipeline.classifier.live_adapter
            trained = ((live.meta.get("data") or {}).get("labels") or {}).get(field, {}) if live else {}
            say(f"window {i} ({phase}): {len(rows)} tickets, adapter {getattr(live, 'adapter_id', None)}")
            stream = await stream_tickets(name=f"w{i}", bootstrap=settings.bootstrap_servers,
                                          tickets_topic=settings.tickets_topic, results_topic=settings.results_topic,
                                          dead_letter_topic=settings.dead_letter_topic, rows=rows, id_prefix=f"w{i}",
                                          task=task)
            await worker.idle()  # the audits' teacher answers belong to this window too
            service.drift.flush()
            d = stream.as_dict()
            never = sum(gold[field] not in trained for _, gold in rows)
            own = service.drift.closed[-1] if service.drift.closed else {}
            row = {
                "window": i, "phase": phase, "adapter_id": getattr(live, "adapter_id", None),
                "tickets": len(rows), "results": d["results"],
                "held_back_tickets": sum(gold[field] in scenario["held"] for _, gold in rows),
                "escalation_rate": d["escalation_rate"],
                "accepted": stream.student_answered, "accepted_wrong": stream.student_answered_wrong,
                "accepted_error": d["error_of_student_answered"],
                "accepted_error_ci95": wilson(stream.student_answered_wrong, stream.student_answered),
                "never_trained_share": round(never / len(rows), 4),
                "student_accuracy": d["student_accuracy"],
                "service_window": {k: own.get(k) for k in ("index", "tickets", "escalation_rate", "accuracy",
                                                            "novel_share", "alerts", "teacher_answers_missing", "guarded")},
            }
            # consistent with epsilon: its interval reaches down to it (None: the student answered none)
            row["within_epsilon"] = row["accepted_error_ci95"][0] <= args.epsilon if stream.student_answered else None
            report["windows"].append(row)
            print(line(row), flush=True)
        report["adapters"] = [a.adapter_id for a in registry.list()]
    report["minutes"] = round((time.monotonic() - started) / 60, 1)
    (workdir / "drift-report.json").write_text(json.dumps(report, indent=1, default=str))
    return report


HEADER = ("window phase   tickets launch escalated  accepted error vs gold [95%]   never-trained "
          "teacher-novel [95%]     audited acc    guarded  alerts")


def line(r: dict[str, Any]) -> str:
    own = r["service_window"]
    err = "-" if r["accepted_error"] is None else \
        f"{r['accepted_error']:.1%} of {r['accepted']} [{r['accepted_error_ci95'][0]:.1%}, {r['accepted_error_ci95'][1]:.1%}]"
    nov = own.get("novel_share") or {}
    novel = "-" if nov.get("value") is None else f"{nov['value']:.1%} [{nov['low']:.1%}, {nov['high']:.1%}]"
    acc = own.get("accuracy") or {}
    audited = "-" if acc.get("value") is None else f"{acc['value']:.1%} of {acc['n']}"
    alerts = ",".join(a["reason"] for a in own.get("alerts") or []) or "-"
    guarded = len(own.get("guarded") or [])
    return (f"{r['window']:<7}{r['phase']:<8}{r['tickets']:>7}{r['held_back_tickets']:>7}{r['escalation_rate']:>10.1%}  "
            f"{err:<31}{r['never_trained_share']:>13.1%}  {novel:<23} {audited:<14} {guarded:>7}  {alerts}")


def main(argv: list[str] | None = None) -> int:
    setup()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sizes(parser, FULL, QUICK, {"new_share": "of a launch window's tickets, the held-back intents'"})
    parser.add_argument("--eval-share", type=float, default=0.05, help="TRIAGE_EVAL_SHARE while streaming")
    parser.add_argument("--guard-min-novel", type=int, default=None, help="TRIAGE_NOVELTY_GUARD_MIN_NOVEL "
                        "(services/stream/novelty_guard.py); 0: the launch without the guard")
    parser.add_argument("--epsilon", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="var/bench/drift")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    apply_sizes(args, FULL, QUICK)
    report = asyncio.run(run(args))
    say(f"\n{HEADER}")
    for row in report["windows"]:
        print(line(row))
    for d in report["distil"]:
        say(f"{d['name']} after window {d['after_window']}: {'promoted' if d['promoted'] else 'rejected'}, "
            f"{d['total_minutes']} min; {d['reason']}")
    return finish(report, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
