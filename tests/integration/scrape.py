"""Test helpers: GET a service's /metrics, /readyz over real HTTP and read the samples."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from typing import Callable

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]


def http_get(port: int, path: str, timeout_s: float = 5.0) -> tuple[int, str]:
    """(status, body) of GET http://127.0.0.1:port/path; (0, error) if nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError as err:  # refused / reset / timed out: the server isn't up (yet)
        return 0, repr(err)


async def aget(port: int, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, port, path)


class Samples(dict[tuple[str, Labels], float]):
    """{(sample name, sorted label pairs): value} from one scrape."""

    @classmethod
    def parse(cls, text: str) -> Samples:
        out = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0.0 if the series is absent (a counter not yet touched)."""
        return self.get((name, tuple(sorted(labels.items()))), 0.0)

    def series(self, name: str) -> dict[Labels, float]:
        return {labels: v for (n, labels), v in self.items() if n == name}

    def lag_partitions(self, topic: str) -> dict[int, float]:
        """partition -> triage_consumer_lag for `topic`."""
        return {
            int(dict(labels)["partition"]): v
            for labels, v in self.series("triage_consumer_lag").items()
            if dict(labels).get("topic") == topic
        }

    def total(self, name: str) -> float:
        return sum(self.series(name).values())


async def scrape(port: int) -> Samples:
    status, body = await aget(port, "/metrics")
    assert status == 200, f"/metrics on {port}: {status} {body[:200]}"
    return Samples.parse(body)


async def wait_for(
    check: Callable[[], object], *, timeout_s: float, interval_s: float = 0.25, what: str = ""
) -> object:
    """Poll an async-or-sync `check` until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what or check} (last: {last!r})")
