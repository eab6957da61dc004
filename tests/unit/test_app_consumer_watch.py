"""TriageService's consumer watcher: readiness and per-partition lag follow the assignment.

No broker: the subscriber's aiokafka consumer is replaced by a fake with a settable assignment.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiokafka.structs import TopicPartition

from services.stream.app import TriageService
from services.settings import Settings


@dataclass
class FakeConsumer:
    high: dict[TopicPartition, int]
    pos: dict[TopicPartition, int]
    assigned: set[TopicPartition] = field(default_factory=set)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.high.get(tp)

    async def position(self, tp: TopicPartition) -> int:
        return self.pos[tp]


@dataclass
class FakeSubscriber:
    consumer: FakeConsumer | None = None


def _lag_series(service: TriageService) -> dict[int, float]:
    out = {}
    for metric in service.metrics.consumer_lag.collect():
        for s in metric.samples:
            out[int(s.labels["partition"])] = s.value
    return out


async def test_watcher_reports_lag_per_owned_partition_and_drops_revoked_ones(tmp_path):
    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", metrics_port=0,
                        registry_dir=tmp_path / "registry", data_dir=tmp_path / "data")
    service = TriageService(settings)
    tps = [TopicPartition(settings.tickets_topic, p) for p in range(4)]
    consumer = FakeConsumer(high={tp: 10 for tp in tps}, pos={tp: 7 for tp in tps})
    service.subscriber = FakeSubscriber()  # not started: no consumer yet
    watcher = asyncio.create_task(service._watch_consumer())
    try:
        await asyncio.sleep(0.1)
        assert service.metrics.readiness() == (False, "waiting for partition assignment")

        service.subscriber.consumer = consumer
        consumer.assigned = set(tps)  # first member: owns everything
        await asyncio.sleep(1.1)
        ready, reason = service.metrics.readiness()
        assert ready and "4 partitions assigned" in reason
        assert _lag_series(service) == {0: 3.0, 1: 3.0, 2: 3.0, 3: 3.0}

        consumer.assigned = {tps[1], tps[3]}  # a second replica joined: half revoked
        consumer.pos[tps[1]] = 10
        await asyncio.sleep(1.1)
        assert _lag_series(service) == {1: 0.0, 3: 3.0}
        assert "2 partitions assigned" in service.metrics.readiness()[1]

        consumer.assigned = set()  # everything revoked (rebalance in progress)
        await asyncio.sleep(1.1)
        assert _lag_series(service) == {}
        assert service.metrics.readiness()[0] is False
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def test_replica_id_names_host_and_process(tmp_path):
    import os
    import socket

    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", metrics_port=0,
                        registry_dir=tmp_path / "registry", data_dir=tmp_path / "data")
    assert TriageService(settings).replica_id == f"{socket.gethostname()}:{os.getpid()}"


# ---- failure policy: bounded retries, then crash-only; readiness stays false ------------------
class FakeMessage:
    def __init__(self):
        self.nacks = 0

    async def nack(self):
        self.nacks += 1


def _service(tmp_path, **overrides):
    values = dict(bootstrap_servers="127.0.0.1:9", metrics_port=0, registry_dir=tmp_path / "registry",
                  data_dir=tmp_path / "data", batch_retry_base_s=0.01, batch_retry_max_s=0.02,
                  batch_max_attempts=3)
    values.update(overrides)
    return TriageService(Settings(_env_file=None, **values))


def _value(metric, **labels):
    for family in metric.collect():
        for s in family.samples:
            if s.labels == labels and not s.name.endswith("_created"):
                return s.value
    return None


async def test_batch_failures_back_off_then_stop_the_replica_for_a_restart(tmp_path, monkeypatch):
    import os
    import signal
    import time

    service = _service(tmp_path)
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append((pid, sig)))
    msg = FakeMessage()
    started = time.monotonic()
    await service._batch_failed(msg, 8, ConnectionError("broker unreachable"))
    await service._batch_failed(msg, 8, ConnectionError("broker unreachable"))
    assert time.monotonic() - started >= 0.03  # 0.01 s, then 0.02 s (doubling, capped)
    assert killed == [] and service.exit_code == 0
    assert _value(service.metrics.batch_retry_streak) == 2
    await service._batch_failed(msg, 8, ConnectionError("broker unreachable"))  # the cap
    assert killed == [(os.getpid(), signal.SIGTERM)] and service.exit_code == 1
    assert msg.nacks == 3  # every attempt rewound: nothing skipped, nothing committed
    assert _value(service.metrics.batch_failures, reason="ConnectionError") == 3
    assert service.metrics.readiness()[0] is False


async def test_readiness_stays_false_after_the_engine_died(tmp_path, monkeypatch):
    import os

    service = _service(tmp_path)
    monkeypatch.setattr(os, "kill", lambda pid, sig: None)
    tps = [TopicPartition(service.settings.tickets_topic, 0)]
    service.subscriber = FakeSubscriber(FakeConsumer(high={tps[0]: 5}, pos={tps[0]: 5}, assigned=set(tps)))

    class EngineDeadError(Exception):
        pass

    await service._batch_failed(FakeMessage(), 4, EngineDeadError("engine core died"))
    assert service.exit_code == 1
    await asyncio.wait_for(service._watch_consumer(), 3)  # returns: the replica is dead
    ready, reason = service.metrics.readiness()
    assert ready is False and "engine is dead" in reason  # partitions assigned, still not ready


async def test_an_engine_dead_cause_or_subclass_stops_at_once(tmp_path, monkeypatch):
    import os

    class EngineDeadError(Exception):
        pass

    class CoreGone(EngineDeadError):
        pass

    wrapped = RuntimeError("generate failed")
    wrapped.__cause__ = EngineDeadError("engine core died")
    for exc in (CoreGone("subclass"), wrapped):
        service = _service(tmp_path, batch_max_attempts=10)
        killed = []
        monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
        await service._batch_failed(FakeMessage(), 4, exc)  # first attempt: no backoff, no retry
        assert killed and service.exit_code == 1, exc
