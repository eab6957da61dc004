"""Does the embedded broker slow down as a topic grows? (issue 27: the soak's latency drift)

Tansu keeps every message in memory. This produces to one partition in rounds, one message
per produce request (as the soak's open-loop producer does: each ticket is its own batch),
and after each round times a consumer fetching the newest 256 messages (seek to end - 256)
and reads the broker's CPU seconds and RSS. A fetch whose cost grows with the topic's size
is CPU the broker takes from the replicas on a 2-core machine, more each minute of a soak.
Real Kafka finds an offset through its index, whatever the log's length.

    .venv/bin/python -m bench.tansu_scaling --rounds 8 --per-round 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time


async def measure(rounds: int, per_round: int, payload_bytes: int, fetches: int) -> list[dict]:
    import psutil
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from services.dev.broker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    proc = psutil.Process(broker.pid)

    def cpu() -> float:
        t = proc.cpu_times()
        return t.user + t.system

    rows: list[dict] = []
    try:
        producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap_servers, linger_ms=0)
        consumer = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
        await producer.start()
        await consumer.start()
        tp = TopicPartition("scaling", 0)
        payload = b"x" * payload_bytes
        for n in range(1, rounds + 1):
            c0, t0 = cpu(), time.perf_counter()
            for _ in range(per_round):
                await (await producer.send("scaling", payload, partition=0))  # one request each
            produce_s, produce_cpu = time.perf_counter() - t0, cpu() - c0
            consumer.assign([tp])
            times, c1 = [], cpu()
            for _ in range(fetches):
                end = (await consumer.end_offsets([tp]))[tp]
                consumer.seek(tp, end - 256)
                started, got = time.perf_counter(), 0
                while got < 256:
                    batch = await consumer.getmany(tp, timeout_ms=1000, max_records=256)
                    got += sum(len(v) for v in batch.values())
                times.append(time.perf_counter() - started)
            rows.append({"messages": n * per_round, "produce_s": round(produce_s, 2),
                         "broker_cpu_per_1k_produced_s": round(1000 * produce_cpu / per_round, 3),
                         "fetch_newest_256_ms": round(1000 * statistics.median(times), 1),
                         "broker_cpu_per_fetch_ms": round(1000 * (cpu() - c1) / fetches, 1),
                         "broker_rss_mib": round(proc.memory_info().rss / 2**20)})
            print(json.dumps(rows[-1]), flush=True)
        await producer.stop()
        await consumer.stop()
    finally:
        broker.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=10_000)
    parser.add_argument("--payload-bytes", type=int, default=400)
    parser.add_argument("--fetches", type=int, default=5, help="timed fetches per round (median)")
    opts = parser.parse_args(argv)
    asyncio.run(measure(opts.rounds, opts.per_round, opts.payload_bytes, opts.fetches))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
