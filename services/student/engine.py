"""The student: one in-process vLLM AsyncLLM, a LoRA adapter, one token per field.

`Classifier` is the port the service depends on; `VllmClassifier` is the vLLM backend.
Every ticket x field is its own request, all submitted at once, so vLLM's continuous
batching packs them into as few forward passes as the scheduler allows.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

from schemas.answer import entity_list_schema, span_candidates
from schemas.classification import EntityPrediction, FieldPrediction
from schemas.task import TaskSpec
from services.student.calibration_record import as_served, record_mismatch
from services.student.outputs import (  # re-exported: imported from here too
    distribution_from_logprobs,
    field_prediction,
    parse_entity_output,
)
from services.student.prompting import (
    PromptStyle,
    build_all_codes,
    check_adapter_servable,
    entity_max_tokens,
    fit_prompt,
    prompt_budget,
)

if TYPE_CHECKING:
    from services.student.registry import AdapterRef
    from services.settings import Settings

log = logging.getLogger(__name__)
LIVE: Any = object()  # sentinel: "use whatever adapter is live right now"


@dataclass(frozen=True)
class StudentPrediction:
    fields: dict[str, FieldPrediction]  # the categorical fields
    distribution: dict[str, list[float]]  # field -> probabilities over the field's labels
    adapter_id: str | None
    engine_ms: float = 0.0
    truncated: bool = False  # the ticket was cut (by tokens, head + tail) to fit the model
    entities: EntityPrediction | None = None  # tasks with an entities field
    entity_field: str | None = None

    def scores(self) -> dict[str, Any]:
        """Every field's prediction (each has `.confidence`): what escalation judges."""
        if self.entities is None or self.entity_field is None:
            return dict(self.fields)
        return {**self.fields, self.entity_field: self.entities}

    @property
    def confidence(self) -> float:
        return min(p.confidence for p in self.scores().values())


@dataclass(frozen=True)
class EngineRejection:
    """One ticket the engine could not classify; its own outcome, never its batch's failure.

    reason: machine-readable (`too_many_tokens`, `engine_rejected`, ...); detail: for humans.
    """

    reason: str
    detail: str
    adapter_id: str | None = None


class Classifier(Protocol):
    """What the service needs from a student model."""

    model_name: str

    @property
    def live_adapter(self) -> AdapterRef | None: ...

    async def classify(
        self, texts: Sequence[str], *, adapter: Any = LIVE
    ) -> list[StudentPrediction | EngineRejection]:
        """One outcome per text, in order. Raises only for batch-level failures (engine dead)."""
        ...

    async def use_adapter(self, adapter: AdapterRef | None) -> None: ...


@dataclass(frozen=True)
class EngineConfig:
    model_path: Path
    dtype: str = "auto"  # resolved at construction (services/student/hardware.py); dtype_why says how
    block_size: int = 32
    enforce_eager: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_lora_rank: int = 16
    max_loras: int = 2  # adapters in one engine step: per task, its live one + one being swapped in
    max_cpu_loras: int | None = None  # adapters kept loaded in host memory; None: max_loras
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1
    cpu_reserved_cores: int | None = None  # None: 0 on machines with <= 4 cores, else vLLM's
    cpu_kernel_cache_entries: int = 64  # oneDNN's primitive cache (Settings.cpu_kernel_cache_entries)
    entity_span_grammar: str = "free"  # "free" | "ticket" (Settings.entity_span_grammar)
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    dtype_why: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        # Resolved once, here: the engine, the prediction cache key and the calibration record
        # all see the concrete dtype, never "auto".
        from services.student.hardware import resolve_dtype

        dtype, why = resolve_dtype(self.dtype)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "dtype_why", self.dtype_why or why)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        """Every engine field that Settings defines (same names), nothing else."""
        names = [f.name for f in fields(cls) if f.name in type(settings).model_fields]
        values = {name: getattr(settings, name) for name in names}
        for name in ("max_loras", "max_cpu_loras"):  # None in Settings: this class's default
            if values.get(name) is None:
                values.pop(name, None)
        return cls(**values)


LOGPROB_IDS_PER_REQUEST = 128  # vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS in 0.32


def _is_engine_level(exc: BaseException, engine: Any = None) -> bool:
    """A failure of the engine (or of this process), not of one request: the batch fails.

    vLLM raises EngineDeadError once the core is gone; its EngineGenerateError is
    "recoverable" (one request aborted) unless the engine has meanwhile errored."""
    if isinstance(exc, (asyncio.CancelledError, KeyboardInterrupt, SystemExit, MemoryError)):
        return True
    if any(t.__name__ == "EngineDeadError" for t in type(exc).__mro__):  # no vLLM import needed
        return True
    return bool(getattr(engine, "errored", False))


async def _gather_or_cancel(coros: Sequence[Any]) -> list[Any]:
    """asyncio.gather that, when one awaitable fails, cancels the others (a cancelled vLLM
    generate() aborts its request) and waits for them before re-raising: nothing of the
    batch is left running in the engine."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


_LORA_INT_IDS: dict[str, int] = {}  # adapter id -> vLLM LoRA int id, for the process's lifetime
_LORA_INT_IDS_LOCK = threading.Lock()


def _lora_int_id(adapter_id: str) -> int:
    # vLLM keys its LoRA (and prefix) caches by this int: two adapters sharing one would be
    # served each other's weights (a hash cut to fit an int collides). Adapter ids are content
    # hashes (same id, same weights), so each gets the next int on first use and keeps it;
    # an int is never handed to another id.
    with _LORA_INT_IDS_LOCK:
        return _LORA_INT_IDS.setdefault(adapter_id, len(_LORA_INT_IDS) + 1)


class VllmClassifier:
    """Classifier backed by vLLM's AsyncLLM: a view of one task on a `StudentEngine`
    (services/student/shared_engine.py: `started_classifier` for an engine of its own)."""

    def __init__(self, engine: Any, tokenizer: Any, task: TaskSpec, config: EngineConfig) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self.task = task
        self.config = config
        self.codes = build_all_codes(task, tokenizer)
        self.model_name = Path(config.model_path).name
        self._live: AdapterRef | None = None
        self._prefix_cache: dict[tuple[str, str, str], list[int]] = {}

    @property
    def live_adapter(self) -> AdapterRef | None:
        return self._live

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def use_adapter(self, adapter: AdapterRef | None) -> None:
        """Hot-swap: new requests use `adapter`; requests already in flight finish on theirs.

        Refuses (ValueError) an adapter this engine cannot serve as it was trained: another
        prompt fingerprint (task, label codes or style) or a rank above max_lora_rank."""
        if adapter is not None:
            check_adapter_servable(adapter, self.task, self.codes, self.config.max_lora_rank)
            refused = record_mismatch(adapter, self.config)
            if refused:  # a threshold certified on another engine: served, trusting nothing
                log.warning("%s", refused)
                adapter = as_served(adapter, self.config)
            # Load before switching so the first live request doesn't pay the load, and a
            # broken adapter fails here instead of in the stream.
            warm = await self._classify_one("warm-up", adapter)
            if isinstance(warm, EngineRejection):
                raise ValueError(f"adapter {adapter.adapter_id} failed to load: {warm.detail}")
        self._live = adapter

    async def classify(
        self, texts: Sequence[str], *, adapter: Any = LIVE
    ) -> list[StudentPrediction | EngineRejection]:
        """One outcome per text, in order; raises only when the engine itself is dead."""
        if self._engine is None:
            raise RuntimeError("the student engine is shut down")
        chosen = self._live if adapter is LIVE else adapter  # pinned for the whole batch
        # Per-ticket failures come back as EngineRejection; only engine-level ones raise here.
        return await _gather_or_cancel([self._classify_one(t, chosen) for t in texts])

    async def _classify_one(self, text: str, adapter: AdapterRef | None) -> StudentPrediction | EngineRejection:
        started = time.perf_counter()
        adapter_id = adapter.adapter_id if adapter else None
        style = adapter.prompt_style if adapter else PromptStyle.instruct
        prompts: dict[str, list[int]] = {}
        truncated = False
        entity = self.task.entity_field
        fields = list(self.codes) + ([entity.name] if entity is not None else [])
        for name in fields:
            # the cut the adapter was trained with, within max_model_len less the output's room
            budget = prompt_budget(self.task, name, self.config.max_model_len, adapter)
            fitted = fit_prompt(self.task, name, text, style, self.codes.get(name), self._tokenizer, budget)
            if fitted is None:
                return EngineRejection("too_many_tokens", f"the {name!r} prompt does not fit "
                                       f"max_model_len {self.config.max_model_len} even with an empty ticket",
                                       adapter_id)
            prompts[name], cut = fitted
            truncated = truncated or cut
        requests = [self._field_distribution(ids, name, adapter) if name in self.codes
                    else self._entities(ids, text, adapter) for name, ids in prompts.items()]
        # A request vLLM refuses is this ticket's outcome (its other requests are cancelled,
        # i.e. aborted in the engine); a dead engine is everyone's.
        try:
            results = await _gather_or_cancel(requests)
        except Exception as exc:
            if _is_engine_level(exc, self._engine):
                raise
            cause = exc.__cause__ or exc  # EngineGenerateError wraps the real reason
            return EngineRejection("engine_rejected", f"{type(cause).__name__}: {str(cause)[:300]}",
                                   adapter_id)
        outputs = dict(zip(prompts, results))
        entities = outputs.pop(entity.name) if entity is not None else None
        fields = {name: field_prediction(self.codes[name], p) for name, p in outputs.items()}
        return StudentPrediction(
            fields=fields,
            distribution=outputs,
            adapter_id=adapter_id,
            engine_ms=(time.perf_counter() - started) * 1000,
            truncated=truncated,
            entities=entities,
            entity_field=entity.name if entity is not None else None,
        )

    async def _entities(self, prompt_ids: list[int], text: str, adapter: AdapterRef | None) -> EntityPrediction:
        """The entities field: JSON generated under the field's schema (xgrammar), greedy.
        Confidence = probability of the whole generated list (product over its tokens; the
        tokens the grammar forces count 1). Spans not in the ticket (up to case) or of an
        undeclared type are dropped and counted, and make the confidence 0; unparsable output
        (cut by max_tokens) is confidence 0 too."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import StructuredOutputsParams

        spec = self.task.entity_field
        assert spec is not None
        # "ticket": spans restricted to the ticket's own word runs (a grammar per ticket; a very
        # long ticket gets the generic one). "free": the generic grammar; either way the spans
        # are checked after decoding (parse_entity_output).
        spans = (span_candidates(text, spec.max_span_chars)
                 if self.config.entity_span_grammar == "ticket" else None)
        params = SamplingParams(
            max_tokens=entity_max_tokens(spec), temperature=0.0, logprobs=0,
            structured_outputs=StructuredOutputsParams(json=entity_list_schema(spec, spans)),
        )
        final = None
        async for output in self._engine.generate(
            TokensPrompt(prompt_token_ids=prompt_ids), params, request_id=uuid.uuid4().hex,
            lora_request=self._lora_request(adapter),
        ):
            final = output
        if final is None or not final.outputs:
            raise RuntimeError("engine returned no output")
        return parse_entity_output(spec, final.outputs[0], text)

    async def _field_distribution(self, prompt_ids: list[int], field_name: str, adapter: AdapterRef | None) -> list[float]:
        codes = self.codes[field_name]
        # vLLM caps logprob_token_ids at 128 per request: a field with more labels asks for
        # its codes in chunks on the same prompt (the prefix cache makes the repeats cheap).
        # The values are raw log-probabilities of the same forward pass, so the merged set
        # renormalises to exactly what one request would give.
        chunks = [codes.token_ids[i : i + LOGPROB_IDS_PER_REQUEST]
                  for i in range(0, len(codes.token_ids), LOGPROB_IDS_PER_REQUEST)]
        parts = await _gather_or_cancel([self._logprobs(prompt_ids, codes.token_ids, chunk, adapter)
                                         for chunk in chunks])
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return distribution_from_logprobs(codes, merged)

    async def _logprobs(self, prompt_ids: list[int], allowed: Sequence[int], wanted: Sequence[int],
                        adapter: AdapterRef | None) -> dict[int, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=list(allowed),
            logprob_token_ids=list(wanted),
            detokenize=False,
        )
        final = None
        async for output in self._engine.generate(
            TokensPrompt(prompt_token_ids=prompt_ids),
            params,
            request_id=uuid.uuid4().hex,
            lora_request=self._lora_request(adapter),
        ):
            final = output
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise RuntimeError("engine returned no logprobs")
        return final.outputs[0].logprobs[0]

    @staticmethod
    def _lora_request(adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.adapter_id, _lora_int_id(adapter.adapter_id), str(adapter.path))
