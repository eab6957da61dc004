"""The teacher: an OpenAI-compatible chat endpoint that labels tickets the student is unsure of.

`Teacher` is the port (one method); `OpenAITeacher` the adapter. The adapter owns its failure
policy so callers see one exception type, `TeacherUnavailable(reason)`:

- retries (exponential backoff, full jitter; Retry-After honoured) on timeouts, connection
  errors, 408/409/429 and 5xx, and on answers that fail validation; never on other 4xx;
- bounded concurrency (a semaphore);
- a circuit breaker over *calls* (after retries): N consecutive calls failing for a
  teacher-side cause (timeout, connection error, 429, 5xx, and the 4xx that no ticket can
  fix: 401/403/404) open it, calls then fail fast with "circuit_open" until `breaker_reset_s`
  passes and one probe is let through (half-open); the probe's outcome closes or re-opens it.
  A failure that belongs to one ticket (an invalid answer, another 4xx such as a 400 for a
  too-long text) does not count: one poison ticket must not cut live traffic off the teacher;
- rolling spend caps (last hour / last 24 h); over a cap, "over_budget" without a request.

The breaker, the spend window and Retry-After parsing are in `services.teacher.limits`.

The API key is held by the openai client only; it never appears in repr, logs or errors.
The prompt builders are pure functions in `services.teacher.prompt`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from pydantic import SecretStr

from schemas.task import TaskSpec
from services.teacher.limits import (  # re-exported: imported from here too
    CircuitBreaker, SpendWindow, _retry_after_s,
)
from services.teacher.prompt import (
    build_teacher_messages, fields_to_ask, parse_answer, prompt_hash, response_format,
)

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)

REASONS = ("circuit_open", "over_budget", "error", "timeout", "rate_limited", "invalid_answer")
# Every outcome of one teacher request: the label values of triage_teacher_requests_total. The
# teacher owns them; the stream layer's metrics read them from here, never the other way round.
TEACHER_OUTCOMES = ("ok", *REASONS)
OnRequest = Callable[[str, float, int, int, float], None]


class TeacherMetrics(Protocol):
    """Where `build_teacher` reports (services.stream.metrics.ServiceMetrics is one)."""

    def teacher_request(self, outcome: str, latency_s: float | None = None, *, prompt_tokens: int = 0,
                        completion_tokens: int = 0, cost_usd: float = 0.0) -> None: ...

    def answer_rejected(self, source: str, reason: str, n: int = 1) -> None: ...


@dataclass(frozen=True)
class TeacherAnswer:
    labels: dict[str, Any]  # the asked fields: label, or a list of {type, text} for entities
    model: str
    prompt_hash: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    latency_s: float


# Who a failure is about (TeacherUnavailable.scope):
#   "ticket":    this ticket (invalid answer, a per-request 4xx); other tickets may well work;
#                never counts toward the breaker;
#   "transient": the teacher, for now (timeout, connection, 408/409/429, 5xx): counts;
#   "teacher":   the teacher as a whole: refused without a request (circuit_open,
#                over_budget) or misconfigured (401/403/404/407, counts toward the breaker).
SCOPES = ("ticket", "transient", "teacher")
_TEACHER_WIDE_REASONS = frozenset({"circuit_open", "over_budget", "no_teacher"})
_RETRIED_STATUS = frozenset({408, 409, 429})  # as the openai SDK's own retry policy
_TEACHER_WIDE_STATUS = frozenset({401, 403, 404, 407})  # wrong key, model or URL: no ticket can fix it


def _default_scope(reason: str) -> str:
    if reason in _TEACHER_WIDE_REASONS:
        return "teacher"
    return "ticket" if reason == "invalid_answer" else "transient"


class TeacherUnavailable(Exception):
    """The teacher gave no usable answer. `reason` is one of REASONS; `detail` is key-free;
    `scope` is one of SCOPES (derived from `reason` when not given)."""

    def __init__(self, reason: str, detail: str = "", scope: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.scope = scope or _default_scope(reason)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {self.scope!r}")
        super().__init__(f"teacher unavailable: {reason}" + (f" ({detail})" if detail else ""))


class Teacher(Protocol):
    model: str

    def fields_for(self, text: str, unsure: Sequence[str]) -> list[str] | None:
        """The fields to ask for when the student is unsure of `unsure`: those alone when that
        is cheaper by the configured share, else None (every field)."""
        return fields_to_ask(self.task, unsure, text, self.few_shot, self._prices, self.partial_max_share)

    async def label(self, text: str, fields: Sequence[str] | None = None) -> TeacherAnswer:
        """The answer to `fields` (None: every field of the task)."""
        ...


class _Attempt(Exception):
    def __init__(self, reason: str, detail: str, retry: bool, wait_s: float | None = None,
                 scope: str | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.retry, self.wait_s = reason, detail, retry, wait_s
        self.scope = scope


# --- the adapter ---------------------------------------------------------------------------
class OpenAITeacher:
    """A `Teacher` over any OpenAI-compatible `/v1/chat/completions` with json_schema output.

    `on_request(outcome, latency_s, prompt_tokens, completion_tokens, cost_usd)` is called once
    per HTTP attempt (outcome "ok" or a failure reason) and once per call refused without a
    request ("circuit_open" / "over_budget", zeros).
    """

    def __init__(
        self, *, base_url: str, api_key: SecretStr, model: str, task: TaskSpec, few_shot: int,
        timeout_s: float, max_retries: int, concurrency: int, input_price_per_mtok: float,
        output_price_per_mtok: float, budget_per_hour_usd: float | None,
        budget_per_day_usd: float | None, breaker_failures: int, breaker_reset_s: float,
        on_request: OnRequest | None = None, clock: Callable[[], float] = time.monotonic,
        backoff_base_s: float = 0.5, backoff_max_s: float = 8.0, temperature: float | None = 0.0,
        rng: random.Random | None = None, partial_max_share: float = 0.0,
    ) -> None:
        import openai  # heavy-ish; imported when a teacher is built, not at module import

        self._openai = openai
        self.model, self.task, self.few_shot = model, task, few_shot
        self.base_url = base_url
        self.timeout_s, self.max_retries = timeout_s, max(0, max_retries)
        self._prices = (input_price_per_mtok / 1e6, output_price_per_mtok / 1e6)
        self._caps = ((3600.0, budget_per_hour_usd), (86_400.0, budget_per_day_usd))
        self._on_request, self._clock = on_request, clock
        self._backoff = (backoff_base_s, backoff_max_s)
        self._temperature, self._rng = temperature, rng or random.Random()
        self.partial_max_share = partial_max_share
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._breaker = CircuitBreaker(breaker_failures, breaker_reset_s, clock)
        self._spend = SpendWindow(clock)
        self._formats: dict[tuple[str, ...] | None, dict[str, Any]] = {}
        from openai.types.chat import ChatCompletion

        self._completion_type = ChatCompletion
        self._client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key.get_secret_value(), max_retries=0,
            timeout=timeout_s,
        )
        self._calls: Counter[str] = Counter()
        self.rejected_answers: Counter[str] = Counter()  # schemas.answer.ANSWER_REASONS
        self.on_rejected_answer: Callable[[str], None] | None = None
        self._attempts: Counter[str] = Counter()
        self._tokens = [0, 0]
        self._cost = 0.0

    def __repr__(self) -> str:
        return (f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r},"
                " api_key='**********')")

    async def aclose(self) -> None:
        await self._client.close()

    def _notify(self, outcome: str, latency: float, p_tok: int, c_tok: int, cost: float) -> None:
        self._attempts[outcome] += 1
        if self._on_request is not None:
            try:
                self._on_request(outcome, latency, p_tok, c_tok, cost)
            except Exception:  # a metrics bug must not fail a ticket
                log.exception("teacher on_request callback failed")

    def _refuse(self, reason: str) -> TeacherUnavailable:
        self._calls[reason] += 1
        self._notify(reason, 0.0, 0, 0, 0.0)
        return TeacherUnavailable(reason)

    def _over_budget(self) -> bool:
        return any(cap is not None and self._spend.spent(w) >= cap for w, cap in self._caps)

    def fields_for(self, text: str, unsure: Sequence[str]) -> list[str] | None:
        """The fields to ask for when the student is unsure of `unsure`: those alone when that
        is cheaper by the configured share, else None (every field)."""
        return fields_to_ask(self.task, unsure, text, self.few_shot, self._prices, self.partial_max_share)

    async def label(self, text: str, fields: Sequence[str] | None = None) -> TeacherAnswer:
        if self._breaker.refusing():
            raise self._refuse("circuit_open")
        if self._over_budget():
            raise self._refuse("over_budget")
        async with self._semaphore:
            if not self._breaker.acquire():
                raise self._refuse("circuit_open")
            if self._over_budget():  # spend may have moved while queued
                self._breaker.abandon()
                raise self._refuse("over_budget")
            try:
                answer = await self._with_retries(text, fields)
            except TeacherUnavailable as exc:
                self._calls[exc.reason] += 1
                if exc.reason == "circuit_open" or exc.scope == "ticket":
                    # opened by another call meanwhile, or this ticket's own problem: the
                    # teacher answered, so neither a failure nor proof that it is healthy
                    self._breaker.abandon()
                else:
                    self._breaker.failure()
                raise
            except BaseException:
                self._breaker.abandon()
                raise
            self._calls["ok"] += 1
            self._breaker.success()
            return answer

    async def _with_retries(self, text: str, fields: Sequence[str] | None) -> TeacherAnswer:
        asked = tuple(fields) if fields is not None else None
        messages = build_teacher_messages(self.task, text, self.few_shot, asked)
        phash = prompt_hash(messages)
        if asked not in self._formats:
            self._formats[asked] = response_format(self.task, asked)
        for attempt in range(self.max_retries + 1):
            try:
                return await self._attempt(messages, phash, text, asked)
            except _Attempt as failed:
                if not failed.retry or attempt == self.max_retries:
                    raise TeacherUnavailable(failed.reason, failed.detail, failed.scope) from None
                if self._breaker.state == "open":  # opened by other calls: stop hammering
                    raise TeacherUnavailable("circuit_open", f"after {failed.reason}") from None
                base, cap = self._backoff
                wait = failed.wait_s
                if wait is None:
                    wait = self._rng.uniform(0.0, min(cap, base * 2**attempt))
                log.debug("teacher attempt %d failed (%s: %s); retry in %.2fs",
                          attempt + 1, failed.reason, failed.detail, wait)
                await asyncio.sleep(min(wait, max(cap, 60.0)))
        raise AssertionError("unreachable")

    async def _attempt(self, messages: list[dict[str, str]], phash: str, text: str,
                       asked: tuple[str, ...] | None) -> TeacherAnswer:
        openai = self._openai
        body: dict[str, Any] = {"model": self.model, "messages": messages,
                                "response_format": self._formats[asked]}
        if self._temperature is not None:
            body["temperature"] = self._temperature
        start = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_s):
                # The client's POST with the body as built, not `chat.completions.create`: its
                # request transform walks every message and the whole JSON schema against the
                # params' type hints (~12 ms of CPU a call with BANKING77's 77-label enum), which
                # starved the student while an outage's backlog drained (bench/soak.py).
                resp = await self._client.post("/chat/completions", body=body,
                                               cast_to=self._completion_type)
        except (TimeoutError, openai.APITimeoutError):
            self._notify("timeout", time.perf_counter() - start, 0, 0, 0.0)
            raise _Attempt("timeout", f"no answer within {self.timeout_s}s", True) from None
        except openai.APIStatusError as exc:
            status = exc.status_code
            reason = "rate_limited" if status == 429 else "error"
            self._notify(reason, time.perf_counter() - start, 0, 0, 0.0)
            retry = status in _RETRIED_STATUS or status >= 500
            wait = _retry_after_s(exc.response.headers) if retry else None
            scope = ("transient" if retry else
                     "teacher" if status in _TEACHER_WIDE_STATUS else "ticket")
            raise _Attempt(reason, f"HTTP {status}", retry, wait, scope) from None
        except openai.APIError as exc:  # connection errors, unreadable responses
            self._notify("error", time.perf_counter() - start, 0, 0, 0.0)
            raise _Attempt("error", type(exc).__name__, True) from None
        latency = time.perf_counter() - start
        usage = getattr(resp, "usage", None)
        p_tok = int(getattr(usage, "prompt_tokens", 0) or 0)
        c_tok = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = p_tok * self._prices[0] + c_tok * self._prices[1]
        self._tokens[0] += p_tok
        self._tokens[1] += c_tok
        self._cost += cost
        self._spend.add(cost)
        try:
            content = resp.choices[0].message.content
            # Spans are checked against the ticket as the teacher saw it: a span that is not in
            # the text, an undeclared entity type, an unknown label or broken JSON is refused
            # (counted by reason, retried), never published or logged.
            labels = parse_answer(self.task, content, text, asked)
        except (ValueError, IndexError, AttributeError, TypeError) as exc:
            reason = getattr(exc, "reason", "malformed_json")
            self.rejected_answers[reason] += 1
            if self.on_rejected_answer is not None:
                self.on_rejected_answer(reason)
            self._notify("invalid_answer", latency, p_tok, c_tok, cost)
            raise _Attempt("invalid_answer", str(exc)[:200], True) from None
        self._notify("ok", latency, p_tok, c_tok, cost)
        return TeacherAnswer(labels, getattr(resp, "model", None) or self.model, phash,
                             p_tok, c_tok, cost, latency)

    def stats(self) -> dict[str, Any]:
        failed = {r: n for r, n in self._calls.items() if r != "ok"}
        return {
            "model": self.model,
            "calls": sum(self._calls.values()),
            "ok": self._calls["ok"],
            "failed": failed,
            "attempts": sum(n for r, n in self._attempts.items()
                            if r not in ("circuit_open", "over_budget")),
            "errors": {r: n for r, n in self._attempts.items() if r != "ok"},
            "prompt_tokens": self._tokens[0],
            "completion_tokens": self._tokens[1],
            "cost_usd": self._cost,
            "spent_last_hour_usd": self._spend.spent(3600.0),
            "spent_last_day_usd": self._spend.spent(86_400.0),
            "rejected_answers": dict(self.rejected_answers),
            "breaker": self._breaker.state,
            "consecutive_failures": self._breaker.consecutive,
        }


# --- the one factory -----------------------------------------------------------------------
def build_teacher(settings: Settings, task: TaskSpec, metrics: TeacherMetrics | None = None) -> OpenAITeacher:
    """The one teacher factory: an `OpenAITeacher` from settings, reporting to `metrics`."""

    def on_request(outcome: str, latency: float, p_tok: int, c_tok: int, cost: float) -> None:
        if metrics is not None:
            metrics.teacher_request(
                outcome if outcome in TEACHER_OUTCOMES else "error", latency or None, prompt_tokens=p_tok, completion_tokens=c_tok, cost_usd=cost
            )

    teacher = OpenAITeacher(
        base_url=settings.teacher_base_url,
        # Servers without auth (the stand-in, a local `vllm serve`) accept any token.
        api_key=settings.teacher_api_key if settings.teacher_api_key.get_secret_value() else SecretStr("unused"),
        model=settings.teacher_model,
        task=task,
        few_shot=settings.teacher_few_shot,
        timeout_s=settings.teacher_timeout_s,
        max_retries=settings.teacher_max_retries,
        concurrency=settings.teacher_concurrency,
        input_price_per_mtok=settings.teacher_input_price_per_mtok,
        output_price_per_mtok=settings.teacher_output_price_per_mtok,
        budget_per_hour_usd=settings.teacher_budget_per_hour_usd,
        budget_per_day_usd=settings.teacher_budget_per_day_usd,
        breaker_failures=settings.teacher_breaker_failures,
        breaker_reset_s=settings.teacher_breaker_reset_s,
        on_request=on_request,
        partial_max_share=settings.teacher_partial_max_share,
    )
    if metrics is not None:
        teacher.on_rejected_answer = lambda reason: metrics.answer_rejected("teacher", reason)
    return teacher
