"""What the entities field costs: one engine, one adapter, the same tickets, entities on vs off.

    .venv/bin/python -m bench.entities --registry var/tickets/registry          # 600 test tickets
    .venv/bin/python -m bench.entities --registry DIR --tickets 300 --out var/bench/entities.json

The example ticket task (schemas/tasks/banking77_tickets.json: category + priority + entities)
served by its distilled adapter (a registry `triage distill` promoted, trained on that task). Two
raw-engine passes over the same BANKING77 test tickets, prefix cache reset before each:
  (a) categorical only: the engine answers category and priority (one token each) and skips
      the entities request (the task with its entities field taken off, same adapter);
  (b) with entities: the same plus the entities JSON, generated under the structured-output
      grammar.
Ratio (b)/(a) is the issue's target (>= 0.5). Also printed: output tokens per entities answer,
entity F1 of (b) against the rule-made gold (services/dev/ticket_dataset.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/x.py`): find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

TARGET_RATIO = 0.5


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.entities", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", required=True, help="registry whose current adapter serves the ticket task")
    p.add_argument("--tickets", type=int, default=600)
    p.add_argument("--warmup", type=int, default=32, help="warm-up tickets (train split, not timed)")
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.dev.ticket_dataset import TICKET_TASK_PATH, write_ticket_dataset
    from services.teacher.corpus import read_records
    from trainer.scoring import entity_prf

    paths = write_ticket_dataset(Path(tempfile.mkdtemp(prefix="bench-entities-")))
    rows = read_records(paths["test"])[: args.tickets]
    warm = [r["text"] for r in read_records(paths["train"])[: args.warmup]]
    texts = c.model_texts([r["text"] for r in rows])
    settings = c.base_settings(task_path=TICKET_TASK_PATH)
    report: dict[str, Any] = {"machine": c.machine(), "tickets": len(texts), "passes": {}}
    async with c.engine(settings, args.registry) as clf:
        full_task = clf.task
        categorical = full_task.model_copy(update={"fields": full_task.categorical_fields})
        await clf.classify(warm)
        for name, task in (("categorical_only", categorical), ("with_entities", full_task)):
            clf.task = task  # the same engine and adapter; only the entities request differs
            await c.reset_prefix_cache(clf)
            started = time.perf_counter()
            predictions = await clf.classify(texts)
            seconds = time.perf_counter() - started
            answered = [p for p in predictions if hasattr(p, "fields")]
            report["passes"][name] = {"tickets_per_s": round(len(texts) / seconds, 2),
                                      "seconds": round(seconds, 1), "rejected": len(texts) - len(answered)}
            c.say(f"{name}: {len(texts)} tickets in {seconds:.1f} s = {len(texts) / seconds:.2f} tickets/s")
        clf.task = full_task
        entity = full_task.entity_field.name
        prf = entity_prf([r["entities"] for r in rows],
                         [p.entities.entities if hasattr(p, "entities") and p.entities else [] for p in predictions])
        dropped: dict[str, int] = {}
        for p in answered:
            for reason, n in (p.entities.dropped if p.entities else {}).items():
                dropped[reason] = dropped.get(reason, 0) + n
        report[entity] = {"f1_vs_rule_gold": round(prf["f1"], 4), "precision": round(prf["precision"], 4),
                          "recall": round(prf["recall"], 4), "spans_dropped": dropped}
    a, b = (report["passes"][k]["tickets_per_s"] for k in ("categorical_only", "with_entities"))
    report["ratio"] = round(b / a, 3)
    report["target_ratio"] = TARGET_RATIO
    c.say(f"with entities / categorical only = {report['ratio']:.2f} (target >= {TARGET_RATIO}); "
          f"entity F1 vs the rule-made gold {prf['f1']:.3f}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    c.setup()
    args = parse_args(argv)
    report = asyncio.run(run(args))
    c.write_json(args.out, report)


if __name__ == "__main__":
    main()
