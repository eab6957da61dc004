"""Three tasks live in one process through Kafka: a router in front of two specialists.

    .venv/bin/python -m bench.swarm --registry intents=var/recipe/registry \\
        --registry cards=var/tickets-demo/registry --tickets 300 --out var/bench/swarm.json

deploy/tasks.json as `triage serve` runs it (SwarmService: one broker connection, one
StudentEngine, one adapter per task), on an embedded broker. `--registry TASK=DIR` gives a
task the current adapter of a registry (e.g. the recipe's BANKING77 adapter for `intents`,
the ticket demo's for `cards`); a task without one serves the base model. No teacher: what a
task escalates is published `unverified` at once (an escalated router ticket is forwarded by
the teacher worker). T BANKING77 test tickets are produced to the router's topic; the run ends
when every ticket has its router result and its specialist result, and prints per task the
tickets, the routes, the adapter and what the router forwarded where, plus the scrape of the
process's /metrics (every series labelled by task).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from bench import _common as c

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deploy" / "tasks.json"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.swarm", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", action="append", default=[], metavar="TASK=DIR")
    p.add_argument("--tickets", type=int, default=300)
    p.add_argument("--out", help="write the JSON report here")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.deployment import Deployment
    from prometheus_client.parser import text_string_to_metric_families

    from services.dev.broker import EmbeddedBroker, free_port
    from services.stream.kafka_io import ensure_topics, read_topic
    from services.stream.swarm import SwarmService, all_task_topics

    spec = json.loads(DEPLOYMENT.read_text())
    registries = dict(item.split("=", 1) for item in args.registry)
    for task in spec["tasks"]:
        task["task_path"] = str((DEPLOYMENT.parent / task["task_path"]).resolve())  # the file's folder's
        if task["name"] in registries:
            task["registry_dir"] = str(Path(registries[task["name"]]).resolve())
        task.setdefault("settings", {})["eval_share"] = 0.0
    deployment = Deployment.model_validate(spec)
    texts = c.texts(args.tickets)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        settings = c.base_settings(
            bootstrap_servers=broker.bootstrap_servers, session_timeout_ms=3000, heartbeat_interval_ms=500,
            metrics_port=free_port(), teacher_base_url="",
            escalation_deadline_s=0.0, registry_dir=Path(tmp) / "registry", data_dir=Path(tmp) / "data")
        await ensure_topics(settings.bootstrap_servers, all_task_topics(settings, deployment), 4)
        per_task = {t.name: deployment.task_settings(settings, t.name) for t in deployment.tasks}
        router = deployment.tasks[0].name
        swarm = SwarmService(settings, deployment)
        async with swarm.running():
            hub = swarm.hub()
            deadline = time.monotonic() + 120
            while not hub.readiness()[0]:
                if time.monotonic() > deadline:
                    raise TimeoutError(hub.readiness()[1])
                await asyncio.sleep(0.2)
            adapters = {n: getattr(s.pipeline.classifier.live_adapter, "adapter_id", None)
                        for n, s in swarm.services.items()}
            started = time.monotonic()
            await c.produce_burst(settings.bootstrap_servers, per_task[router].tickets_topic,
                                  c.ticket_messages("t", texts))
            want = {f"t-{i}" for i in range(len(texts))}
            got = await read_topic(settings.bootstrap_servers, per_task[router].results_topic, timeout_s=900,
                                   until=lambda rs: want <= {r.key.decode() for r in rs})
            results: dict[str, dict[str, Any]] = {router: {r.key.decode(): json.loads(r.value) for r in got}}
            forwarded = Counter(r["forwarded_to"] for r in results[router].values())
            for name, n in forwarded.items():
                if name is None:
                    continue
                got = await read_topic(settings.bootstrap_servers, per_task[name].results_topic, timeout_s=900,
                                       until=lambda rs, n=n: len({r.key for r in rs}) >= n)
                results[name] = {r.key.decode(): json.loads(r.value) for r in got}
            elapsed = time.monotonic() - started
            text = await asyncio.to_thread(_get, f"http://127.0.0.1:{swarm.metrics_port}/metrics")
    per_task_results = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "triage_results_total":
                per_task_results[sample.labels.get("task")] += sample.value
    report: dict[str, Any] = {"tickets": len(texts), "seconds": round(elapsed, 1),
                              "tickets_per_s_end_to_end": round(len(texts) / elapsed, 2), "tasks": {}}
    for name, rows in results.items():
        report["tasks"][name] = {
            "adapter": adapters.get(name) or "base model", "results": len(rows),
            "routes": dict(Counter(r["route"] for r in rows.values())),
            "came_through": dict(Counter("→".join(h["task"] for h in r["route_chain"]) or "-" for r in rows.values())),
            "results_total_metric": per_task_results[name],
        }
    report["tasks"][router]["forwarded_to"] = {str(k): v for k, v in forwarded.items()}
    report["machine"] = c.machine()
    return report


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    report = asyncio.run(run(args))
    c.say(f"{report['tickets']} tickets to the router, every one answered by it and by its specialist in "
          f"{report['seconds']} s ({report['tickets_per_s_end_to_end']} tickets/s, one engine):")
    c.say(f"  {'task':<9} {'adapter':<20} {'results':>7}  routes / came through / forwarded")
    for name, t in report["tasks"].items():
        extra = f"  forwarded {t['forwarded_to']}" if "forwarded_to" in t else f"  via {t['came_through']}"
        c.say(f"  {name:<9} {t['adapter']:<20} {t['results']:>7}  {t['routes']}{extra}"
              f"  (/metrics task={name}: {t['results_total_metric']:.0f})")
    c.write_json(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
