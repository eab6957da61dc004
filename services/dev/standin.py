"""GOLD-LABEL TEACHER STAND-IN: an OpenAI-compatible server that answers from dataset labels.

This is NOT a model. It exists so the service, the bootstrap and the tests can exercise the
real teacher path (HTTP, retries, breaker, budget, cost accounting) without an LLM or the
internet. It looks the last user message up in a labelled dataset (BANKING77 train+dev+test by
default, or any `text<TAB>label` TSVs) and answers `{"<field>": "<gold label>"}`, the field
name taken from the request's json_schema. Unknown texts get the label of the most similar
known text (token overlap), or a deterministic label; both are counted in `stats`.

Faults, changeable at run time (`set_faults(...)` or `POST /admin/faults` with JSON):
latency_ms (added to every answer), error_rate (HTTP 500), rate_limit_rate (HTTP 429,
Retry-After: 0), timeout_rate (hang for `hang_s`, default 30 s), noise_rate (a random wrong
label), invalid_rate (a label outside the label set), and `script`: a list of outcomes
("error", "rate_limit", "timeout", "noise", "invalid", "ok") forced on the next requests.

    python -m services.dev.standin --port 8099 --latency-ms 20 --error-rate 0.1 \\
        --rate-limit-rate 0.05 --timeout-rate 0.0 --noise-rate 0.0

Programmatic: `async with run_standin(port=0, error_rate=0.1) as server: server.base_url`.
Needs aiohttp only (not the openai package).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, AsyncIterator, Iterable, Sequence

from aiohttp import web

from schemas.text import dedup_key
from services.dev.datasets import BANKING77_SPLITS, banking77_dir, load_tsv

log = logging.getLogger(__name__)

STANDIN_MODEL = "gold-label-standin"
OUTCOMES = ("ok", "error", "rate_limit", "timeout", "noise", "invalid")
_TOKEN = re.compile(r"[a-z0-9']+")


def load_gold(paths: Iterable[str | Path] | None = None) -> dict[str, str]:
    """normalised text -> label; the first label wins for a repeated text."""
    if paths is None:
        paths = [banking77_dir() / f"{split}.tsv" for split in BANKING77_SPLITS]
    gold: dict[str, str] = {}
    for path in paths:
        for row in load_tsv(path):
            gold.setdefault(dedup_key(row.text), row.label)
    return gold


@dataclasses.dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    noise_rate: float = 0.0
    invalid_rate: float = 0.0
    script: list[str] = dataclasses.field(default_factory=list)


class GoldLabelStandin:
    """State and handlers of the stand-in; serve it with `run_standin` or `main()`."""

    def __init__(
        self, gold: dict[str, str], *, model: str = STANDIN_MODEL, api_key: str | None = None,
        seed: int = 0, hang_s: float = 30.0, default_field: str = "label", **faults: Any,
    ) -> None:
        if not gold:
            raise ValueError("the stand-in needs at least one labelled text")
        self.gold = gold
        self.model, self.hang_s, self.default_field = model, hang_s, default_field
        self._api_key = api_key
        self._rng = random.Random(seed)
        self.faults = Faults()
        self.set_faults(**faults)
        self.labels = sorted(set(gold.values()))
        self._texts: list[str] | None = None
        self._index: dict[str, list[int]] = {}
        self._closing = asyncio.Event()
        self.base_url = ""
        self.reset_stats()

    def __repr__(self) -> str:
        return f"GoldLabelStandin(model={self.model!r}, texts={len(self.gold)}, {self.faults})"

    # --- control -----------------------------------------------------------------------
    def set_faults(self, **changes: Any) -> Faults:
        for name, value in changes.items():
            if name not in {f.name for f in dataclasses.fields(Faults)}:
                raise ValueError(f"unknown fault {name!r}")
            if name == "script":
                bad = [o for o in value if o not in OUTCOMES]
                if bad:
                    raise ValueError(f"unknown outcomes {bad}; expected {OUTCOMES}")
                value = list(value)
            else:
                value = float(value)
                if value < 0 or (name != "latency_ms" and value > 1):
                    raise ValueError(f"{name} out of range")
            setattr(self.faults, name, value)
        return self.faults

    def reset_stats(self) -> None:
        self._requests = 0
        self._by_status: Counter[int] = Counter()
        self._chat = 0
        self._answered: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._inflight = 0
        self._max_inflight = 0

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot: requests, by_status, chat_requests, answered (text -> 200s), ..."""
        return {
            "requests": self._requests,
            "by_status": dict(self._by_status),
            "chat_requests": self._chat,
            "answered": dict(self._answered),
            "answered_total": sum(self._answered.values()),
            "hangs": self._counters["timeout"],
            "noisy": self._counters["noise"],
            "invalid": self._counters["invalid"],
            "unknown_texts": self._counters["unknown"],
            "unknown_no_overlap": self._counters["unknown_no_overlap"],
            "inflight": self._inflight,
            "max_inflight": self._max_inflight,
        }

    # --- labelling ---------------------------------------------------------------------
    def lookup(self, text: str) -> tuple[str, bool]:
        """(label, known). Unknown: nearest known text by token Jaccard, ties by file order."""
        key = dedup_key(text)
        if key in self.gold:
            return self.gold[key], True
        self._counters["unknown"] += 1
        if self._texts is None:
            self._texts = list(self.gold)
            index: dict[str, list[int]] = defaultdict(list)
            for i, known in enumerate(self._texts):
                for tok in set(_TOKEN.findall(known)):
                    index[tok].append(i)
            self._index = dict(index)
        query = set(_TOKEN.findall(key))
        overlap: Counter[int] = Counter()
        for tok in query:
            overlap.update(self._index.get(tok, ()))
        if not overlap:
            self._counters["unknown_no_overlap"] += 1
            digest = int(hashlib.sha256(key.encode()).hexdigest(), 16)
            return self.labels[digest % len(self.labels)], False

        def jaccard(i: int) -> float:
            return overlap[i] / len(query | set(_TOKEN.findall(self._texts[i])))

        best = max(overlap, key=lambda i: (jaccard(i), -i))
        return self.gold[self._texts[best]], False

    def _outcome(self) -> str:
        f = self.faults
        if f.script:
            return f.script.pop(0)
        r = self._rng.random()
        for outcome, rate in (("timeout", f.timeout_rate), ("error", f.error_rate),
                              ("rate_limit", f.rate_limit_rate)):
            if r < rate:
                return outcome
            r -= rate
        r = self._rng.random()
        if r < f.invalid_rate:
            return "invalid"
        return "noise" if r < f.invalid_rate + f.noise_rate else "ok"

    # --- HTTP --------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_post("/admin/faults", self._admin_faults)
        app.router.add_get("/admin/stats", self._admin_stats)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self._requests += 1
        if request.path != "/healthz" and self._api_key is not None:
            given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
            if not hmac.compare_digest(given.encode(), self._api_key.encode()):
                self._by_status[401] += 1
                return _error(401, "invalid api key", "invalid_request_error")
        response = await handler(request)
        self._by_status[response.status] += 1
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "standin": True, "model": self.model})

    async def _models(self, request: web.Request) -> web.Response:
        model = {"id": self.model, "object": "model", "created": 0, "owned_by": "triage-standin"}
        return web.json_response({"object": "list", "data": [model]})

    async def _admin_faults(self, request: web.Request) -> web.Response:
        try:
            faults = self.set_faults(**(await request.json()))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        return web.json_response(dataclasses.asdict(faults))

    async def _admin_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats)

    async def _chat_completions(self, request: web.Request) -> web.Response:
        self._chat += 1
        self._inflight += 1
        self._max_inflight = max(self._max_inflight, self._inflight)
        try:
            return await self._answer(request)
        finally:
            self._inflight -= 1

    async def _answer(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
            messages = body["messages"]
            text = _last_user_text(messages)
        except (ValueError, KeyError, TypeError):
            return _error(400, "expected {'messages': [...]} with a user message",
                          "invalid_request_error")
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        outcome = self._outcome()
        self._counters[outcome] += 1
        if outcome == "timeout":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.hang_s)
            return _error(504, "stand-in hung on purpose (timeout_rate)", "timeout")
        if outcome == "error":
            return _error(500, "stand-in injected server error", "server_error")
        if outcome == "rate_limit":
            return _error(429, "stand-in injected rate limit", "rate_limit_exceeded",
                          headers={"Retry-After": "0"})
        field, enum = _schema_field(body, self.default_field)
        label, _known = self.lookup(text)
        choices = enum or self.labels
        if outcome == "noise":
            wrong = [lab for lab in choices if lab != label]
            label = self._rng.choice(wrong) if wrong else label
        elif outcome == "invalid":
            label = "not_a_label"
        else:
            self._answered[dedup_key(text)] += 1
        content = json.dumps({field: label})
        chars = sum(len(_content_text(m.get("content"))) for m in messages)
        return web.json_response({
            "id": f"chatcmpl-standin-{self._chat}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": max(1, round(chars / 4)),
                      "completion_tokens": max(1, round(len(content) / 4)),
                      "total_tokens": max(1, round(chars / 4)) + max(1, round(len(content) / 4))},
        })


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            text = _content_text(message.get("content"))
            if text.strip():
                return text
    raise ValueError("no user message")


def _schema_field(body: dict[str, Any], default: str) -> tuple[str, list[str]]:
    """The first field of the requested json_schema and its enum (if any)."""
    try:
        props = body["response_format"]["json_schema"]["schema"]["properties"]
        name = next(iter(props))
        return name, list(props[name].get("enum") or [])
    except (KeyError, TypeError, StopIteration):
        return default, []


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None):
    payload = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return web.json_response(payload, status=status, headers=headers)


@contextlib.asynccontextmanager
async def run_standin(
    host: str = "127.0.0.1", port: int = 0, *, data_paths: Sequence[str | Path] | None = None,
    gold: dict[str, str] | None = None, **options: Any,
) -> AsyncIterator[GoldLabelStandin]:
    """Serve a stand-in on (host, port); port 0 picks a free one. Yields the server object."""
    server = GoldLabelStandin(gold if gold is not None else load_gold(data_paths), **options)
    runner = web.AppRunner(server.app(), access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        server.base_url = f"http://{bound_host}:{bound_port}/v1"
        log.info("GOLD-LABEL TEACHER STAND-IN (not a model) serving %d labelled texts at %s",
                 len(server.gold), server.base_url)
        yield server
    finally:
        server._closing.set()  # release hung handlers
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m services.dev.standin",
        description="Gold-label teacher STAND-IN (OpenAI-compatible; answers dataset labels).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--data", action="append", metavar="TSV",
                        help="text<TAB>label file (repeatable); default BANKING77 train+dev+test")
    parser.add_argument("--model", default=STANDIN_MODEL)
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require `Authorization: Bearer $VAR` (the key is read from env)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang-s", type=float, default=30.0)
    for name in ("latency-ms", "error-rate", "rate-limit-rate", "timeout-rate", "noise-rate",
                 "invalid-rate"):
        parser.add_argument(f"--{name}", type=float, default=0.0)
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is empty")
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = dict(
        model=args.model, api_key=api_key, seed=args.seed, hang_s=args.hang_s,
        latency_ms=args.latency_ms, error_rate=args.error_rate,
        rate_limit_rate=args.rate_limit_rate, timeout_rate=args.timeout_rate,
        noise_rate=args.noise_rate, invalid_rate=args.invalid_rate,
    )
    asyncio.run(_serve(args.host, args.port, args.data, options))


async def _serve(host: str, port: int, data: list[str] | None, options: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_standin(host, port, data_paths=data, **options) as server:
        print(f"gold-label teacher STAND-IN (not a model) at {server.base_url}", flush=True)
        await stop.wait()
        log.info("stand-in stopping; stats: %s", {k: v for k, v in server.stats.items()
                                                  if k != "answered"})


if __name__ == "__main__":
    main()
