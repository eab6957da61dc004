"""GOLD-LABEL TEACHER STAND-IN: an OpenAI-compatible server that answers from dataset labels.

This is NOT a model. It exists so the service, the bootstrap and the tests can exercise the
real teacher path (HTTP, retries, breaker, budget, cost accounting) without an LLM or the
internet. It looks the last user message up in labelled data and answers every property of the
request's json_schema, in order. Gold: BANKING77 train+dev+test by default, `text<TAB>label`
TSVs (a plain label answers the first categorical field asked), or JSONL records `{"text",
"labels": {field: label}, "entities": [{"type", "text"}]}`: each categorical field its gold
label, the entities field (any name) the gold spans of the types the schema allows. Unknown
texts get the categoricals of the most similar known text (token overlap), or deterministic
labels; their entities come from the optional `entity_rules(text)` callable (default: none),
never from the neighbour, whose spans are not in this text (a known text without gold spans
gets the rules' too). Unknown texts and fields without a gold label (left out) are counted.

Faults, changeable at run time (`set_faults(...)` or `POST /admin/faults` with JSON):
latency_ms (added to every answer), error_rate (HTTP 500), rate_limit_rate (HTTP 429,
Retry-After: 0), timeout_rate (hang for `hang_s`, default 30 s), noise_rate (every categorical
a random wrong label), invalid_rate (a label outside the label set on the first categorical),
bad_entity_type_rate (an entity of type "not_a_type", its text in the ticket), bad_span_rate
(an entity of a valid type, its text not in the ticket), malformed_rate (the JSON cut in half),
and `script`: a list of OUTCOMES forced on the next requests.

A fallible teacher: `label_error_rate` (`--error-rate` on the command line) answers a
confusable wrong label on a seeded share of (ticket, field) pairs, the same wrong label every
time a text is asked (services/dev/standin_errors.py); the banner says so. It is a property of
the teacher, not a fault of a request: it applies whatever the other faults draw.

    python -m services.dev.standin --port 8099 --latency-ms 20 --http-error-rate 0.1 \\
        --rate-limit-rate 0.05 --timeout-rate 0.0 --noise-rate 0.0 --data gold.jsonl
    triage standin --error-rate 0.10        # a teacher wrong on 10% of tickets

Programmatic: `async with run_standin(port=0, error_rate=0.1) as server: server.base_url`.
Needs aiohttp only (not the openai package).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import random
import re
import signal
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Sequence, Union

from aiohttp import web

from schemas.text import dedup_key
from services.dev.standin_errors import ConfusableErrors, gold_examples
from services.dev.standin_faults import OUTCOMES, Faults
from services.dev.standin_gold import (  # re-exported: imported from here too
    ENTITIES_KEY, GoldEntry, _plain_label, gold_entry, load_gold,
)
from services.dev.standin_http import (
    content_text, entity_types, error_reply, is_array, last_user_text, schema_properties,
)

__all__ = [  # the gold-data names are re-exported from services.dev.standin_gold
    "BAD_SPAN", "BAD_TYPE", "ENTITIES_KEY", "OUTCOMES", "STANDIN_MODEL", "EntityRules", "Faults",
    "Gold", "GoldEntry", "GoldLabelStandin", "gold_entry", "load_gold", "main", "run_standin",
]

log = logging.getLogger(__name__)

STANDIN_MODEL = "gold-label-standin"
BAD_TYPE, BAD_SPAN = "not_a_type", "zzz-not-in-ticket"
_TOKEN = re.compile(r"[a-z0-9']+")
_STATS = (("hangs", "timeout"), ("noisy", "noise"), ("invalid", "invalid"),  # (stat, counter)
          *((o, o) for o in ("bad_entity_type", "bad_span", "malformed")),
          ("unknown_texts", "unknown"), ("unknown_no_overlap", "unknown_no_overlap"),
          ("missing_gold_fields", "missing_gold_field"), ("rule_entities", "rule_entities"),
          ("wrong_labels", "wrong_label"))

Gold = Mapping[str, Union[str, GoldEntry]]  # dedup_key(text) -> a plain label or a full answer
EntityRules = Callable[[str], Iterable[Mapping[str, Any]]]


class GoldLabelStandin:
    """State and handlers of the stand-in; serve it with `run_standin` or `main()`."""

    def __init__(
        self, gold: Gold, *, model: str = STANDIN_MODEL, api_key: str | None = None,
        seed: int = 0, hang_s: float = 30.0, default_field: str = "label",
        entity_rules: EntityRules | None = None, **faults: Any,
    ) -> None:
        if not gold:
            raise ValueError("the stand-in needs at least one labelled text")
        self.gold = gold
        self.model, self.hang_s, self.default_field = model, hang_s, default_field
        self.entity_rules = entity_rules
        self._api_key = api_key
        self._rng = random.Random(seed)
        self.faults = Faults()
        self.set_faults(**faults)
        # plain labels (legacy answers, noise without an enum) and the labels seen per field
        self.labels = sorted({p for p in map(_plain_label, gold.values()) if p is not None})
        by_field: dict[str, set[str]] = defaultdict(set)
        for entry in (e for e in gold.values() if isinstance(e, dict)):
            for name in entry.keys() - {ENTITIES_KEY}:
                by_field[name].add(entry[name])
        self.field_labels = {name: sorted(labels) for name, labels in by_field.items()}
        self.errors = ConfusableErrors(gold_examples(gold, default_field), seed=seed)
        self._texts: list[str] | None = None
        self._index: dict[str, list[int]] = {}
        self._closing = asyncio.Event()
        self.base_url = ""
        self.reset_stats()

    def __repr__(self) -> str:
        return f"GoldLabelStandin(model={self.model!r}, texts={len(self.gold)}, {self.faults})"

    @property
    def banner(self) -> str:
        """What it is, said at start: never mistaken for a model, nor for an infallible one."""
        rate = self.faults.label_error_rate
        if not rate:
            return f"gold-label teacher STAND-IN (not a model; {len(self.gold)} labelled texts)"
        return (f"FALLIBLE gold-label teacher STAND-IN (not a model; {len(self.gold)} labelled texts): "
                f"answers a confusable WRONG label on {rate:.1%} of tickets per field "
                f"(seed {self.errors.seed}, deterministic per text)")

    # --- control -----------------------------------------------------------------------
    def set_faults(self, **changes: Any) -> Faults:
        return self.faults.update(**changes)

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
            **{name: self._counters[counter] for name, counter in _STATS},
            "inflight": self._inflight,
            "max_inflight": self._max_inflight,
        }

    # --- labelling ---------------------------------------------------------------------
    def lookup(self, text: str) -> tuple[str | None, bool]:
        """(plain label, known): lookup_entry's label for a one-field answer."""
        entry, known = self.lookup_entry(text)
        return _plain_label(entry), known

    def lookup_entry(self, text: str) -> tuple[str | GoldEntry, bool]:
        """(gold entry, known). Unknown: the entry of the nearest known text by token Jaccard,
        ties by file order; no overlap: deterministic labels (one per field for full answers)."""
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
            if self.field_labels or not self.labels:
                return {f: labels[digest % len(labels)]
                        for f, labels in self.field_labels.items()}, False
            return self.labels[digest % len(self.labels)], False

        def jaccard(i: int) -> float:
            return overlap[i] / len(query | set(_TOKEN.findall(self._texts[i])))

        best = max(overlap, key=lambda i: (jaccard(i), -i))
        return self.gold[self._texts[best]], False

    def _compose(self, text: str, props: list[tuple[str, dict[str, Any]]],
                 outcome: str) -> dict[str, Any]:
        """The answer to the asked properties (schema order), with the outcome's fault."""
        entry, known = self.lookup_entry(text)
        labels = entry if isinstance(entry, dict) else {}
        categorical = [name for name, prop in props if not is_array(prop)]
        # A plain label (or a full answer naming none of the asked fields) answers the first.
        plain = None if any(n in labels for n in categorical) else _plain_label(entry)
        answer: dict[str, Any] = {}
        for name, prop in props:
            if is_array(prop):
                answer[name] = self._entities(entry if known else None, text, prop)
            elif isinstance(labels.get(name), str):
                answer[name] = labels[name]
            elif plain is not None and name == categorical[0]:
                answer[name] = plain
            else:
                self._counters["missing_gold_field"] += 1
        for name, prop in props:  # the fallible teacher: a neighbouring label, every time asked
            if name in answer and not is_array(prop) and self.errors.is_wrong(text, name, self.faults.label_error_rate):
                choices = prop.get("enum") or self.field_labels.get(name) or self.labels
                answer[name] = self.errors.wrong_label(text, name, answer[name], choices)
                self._counters["wrong_label"] += 1
        if outcome == "noise":
            for name, prop in props:
                if name in answer and not is_array(prop):
                    choices = prop.get("enum") or self.field_labels.get(name) or self.labels
                    wrong = [lab for lab in choices if lab != answer[name]]
                    answer[name] = self._rng.choice(wrong) if wrong else answer[name]
        elif outcome == "invalid" and categorical:
            answer[categorical[0]] = "not_a_label"
        elif outcome in ("bad_entity_type", "bad_span"):  # on the (first) entities field
            for name, prop in (p for p in props if is_array(p[1])):
                bad = ({"type": BAD_TYPE, "text": text.split()[0][:40]} if outcome == "bad_entity_type"
                       else {"type": (entity_types(prop) or ["entity"])[0], "text": BAD_SPAN})
                keep = max(0, int(prop.get("maxItems") or len(answer[name]) + 1) - 1)
                answer[name] = answer[name][:keep] + [bad]  # within maxItems: the bad one is seen
                break
        return answer

    def _entities(self, entry: str | GoldEntry | None, text: str,
                  prop: dict[str, Any]) -> list[dict[str, str]]:
        """A known text's gold spans, else the rules' spans of `text`; of allowed types only."""
        if isinstance(entry, dict) and ENTITIES_KEY in entry:
            spans: Iterable[Mapping[str, Any]] = entry[ENTITIES_KEY]
        else:
            spans = list(self.entity_rules(text)) if self.entity_rules is not None else []
            self._counters["rule_entities"] += len(spans)
        types, out = entity_types(prop), []
        for item in ({"type": str(e["type"]), "text": str(e["text"])} for e in spans):
            if (types is None or item["type"] in types) and item not in out:
                out.append(item)
        return out[: prop["maxItems"]] if isinstance(prop.get("maxItems"), int) else out

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
                return error_reply(401, "invalid api key", "invalid_request_error")
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
            return error_reply(400, str(exc), "invalid_request_error")
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
            text = last_user_text(messages)
        except (ValueError, KeyError, TypeError):
            return error_reply(400, "expected {'messages': [...]} with a user message",
                          "invalid_request_error")
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        outcome = self.faults.draw(self._rng)
        self._counters[outcome] += 1
        if outcome == "timeout":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self.hang_s)
            return error_reply(504, "stand-in hung on purpose (timeout_rate)", "timeout")
        if outcome == "error":
            return error_reply(500, "stand-in injected server error", "server_error")
        if outcome == "rate_limit":
            return error_reply(429, "stand-in injected rate limit", "rate_limit_exceeded",
                          headers={"Retry-After": "0"})
        answer = self._compose(text, schema_properties(body, self.default_field), outcome)
        if outcome == "ok":
            self._answered[dedup_key(text)] += 1
        content = json.dumps(answer)
        if outcome == "malformed":
            content = content[: len(content) // 2]
        chars = sum(len(content_text(m.get("content"))) for m in messages)
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


@contextlib.asynccontextmanager
async def run_standin(
    host: str = "127.0.0.1", port: int = 0, *, data_paths: Sequence[str | Path] | None = None,
    gold: Gold | None = None, **options: Any,
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
        log.info("%s at %s", server.banner, server.base_url)
        yield server
    finally:
        server._closing.set()  # release hung handlers
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> None:
    """`triage standin` / `python -m services.dev.standin` (options: services/dev/standin_args.py)."""
    from services.dev.standin_args import parse_options

    host, port, data, options = parse_options(argv, model=STANDIN_MODEL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(host, port, data, options))


async def _serve(host: str, port: int, data: list[str] | None, options: dict[str, Any]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with run_standin(host, port, data_paths=data, **options) as server:
        print(f"{server.banner} at {server.base_url} (TRIAGE_TEACHER_MODEL={server.model})", flush=True)
        await stop.wait()
        log.info("stand-in stopping; stats: %s", {k: v for k, v in server.stats.items() if k != "answered"})


if __name__ == "__main__":
    main()
