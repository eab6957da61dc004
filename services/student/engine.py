"""The student: one in-process vLLM AsyncLLM, a LoRA adapter, one token per field.

`Classifier` is the port the service depends on; `VllmClassifier` is the vLLM backend.
Every ticket x field is its own request, all submitted at once, so vLLM's continuous
batching packs them into as few forward passes as the scheduler allows.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, Sequence

from schemas.classification import FieldPrediction, LabelScore
from schemas.task import TaskSpec
from services.student.prompting import LabelCodes, PromptStyle, build_all_codes, render_prompt

if TYPE_CHECKING:
    from services.student.registry import AdapterRef
    from services.settings import Settings

LIVE: Any = object()  # sentinel: "use whatever adapter is live right now"


@dataclass(frozen=True)
class StudentPrediction:
    fields: dict[str, FieldPrediction]
    distribution: dict[str, list[float]]  # field -> probabilities over the field's labels
    adapter_id: str | None
    engine_ms: float = 0.0
    truncated: bool = False  # the ticket was cut (by tokens, head + tail) to fit the model

    @property
    def confidence(self) -> float:
        return min(p.confidence for p in self.fields.values())


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
    dtype: str = "float32"
    block_size: int = 32
    enforce_eager: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 256
    max_lora_rank: int = 16
    max_loras: int = 2  # live + a candidate under evaluation
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_gib: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> EngineConfig:
        return cls(
            model_path=Path(settings.model_path),
            dtype=settings.dtype,
            block_size=settings.block_size,
            enforce_eager=settings.enforce_eager,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_lora_rank=settings.max_lora_rank,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            cpu_kv_cache_gib=settings.cpu_kv_cache_gib,
            seed=settings.seed,
        )


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt -> token ids, identically in serving and training (no implicit BOS)."""
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def distribution_from_logprobs(codes: LabelCodes, logprobs: dict[int, Any]) -> list[float]:
    """Renormalise the code tokens' log-probabilities into a distribution over labels.

    Raw logprobs are over the whole vocabulary; restricted to the field's codes and
    renormalised they equal what the sampler saw after the allowed-token mask.
    """
    values = []
    for token_id in codes.token_ids:
        entry = logprobs.get(token_id)
        lp = getattr(entry, "logprob", entry)
        values.append(-math.inf if lp is None or math.isnan(lp) else float(lp))
    top = max(values)
    if top == -math.inf:
        return [1.0 / len(values)] * len(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def field_prediction(codes: LabelCodes, probs: list[float], top_k: int = 3) -> FieldPrediction:
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
    best = order[0]
    return FieldPrediction(
        label=codes.labels[best],
        confidence=min(1.0, max(0.0, probs[best])),
        alternatives=[
            LabelScore(label=codes.labels[i], probability=min(1.0, probs[i])) for i in order[1 : top_k + 1]
        ],
    )


def _lora_int_id(adapter_id: str) -> int:
    # vLLM keys its LoRA (and prefix) caches by this int: derive it from the content hash,
    # so new weights always get a new id and never hit a stale cache entry.
    digits = "".join(ch for ch in adapter_id if ch in "0123456789abcdef")
    return int(digits[:7] or "1", 16) + 1


class VllmClassifier:
    """Classifier backed by vLLM's AsyncLLM. Start it with `VllmClassifier.started(...)`."""

    def __init__(self, engine: Any, tokenizer: Any, task: TaskSpec, config: EngineConfig) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self.task = task
        self.config = config
        self.codes = build_all_codes(task, tokenizer)
        self.model_name = Path(config.model_path).name
        self._live: AdapterRef | None = None
        self._prefix_cache: dict[tuple[str, str, str], list[int]] = {}

    @classmethod
    @asynccontextmanager
    async def started(
        cls, config: EngineConfig, task: TaskSpec, adapter: AdapterRef | None = None
    ) -> AsyncIterator[VllmClassifier]:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kv_cache_gib))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from vllm.engine.arg_utils import AsyncEngineArgs  # heavy: only when starting
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(config.model_path),
            dtype=config.dtype,
            block_size=config.block_size,
            enforce_eager=config.enforce_eager,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_lora=True,
            max_lora_rank=config.max_lora_rank,
            max_loras=config.max_loras,
            enable_prefix_caching=True,
            max_logprobs=128,
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
            disable_log_stats=True,
            **config.extra,
        )
        engine = AsyncLLM.from_engine_args(args)
        try:
            tokenizer = engine.get_tokenizer()
            if asyncio.iscoroutine(tokenizer):
                tokenizer = await tokenizer
            classifier = cls(engine, tokenizer, task, config)
            await classifier.use_adapter(adapter)
            yield classifier
        finally:
            engine.shutdown()
            # Drop the last reference now: AsyncLLM.__del__ at interpreter exit would call
            # shutdown again with module globals already torn down (a noisy TypeError).
            if "classifier" in locals():
                classifier._engine = None
            del engine
            import gc

            gc.collect()

    @property
    def live_adapter(self) -> AdapterRef | None:
        return self._live

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    async def use_adapter(self, adapter: AdapterRef | None) -> None:
        """Hot-swap: new requests use `adapter`; requests already in flight finish on theirs."""
        if adapter is not None:
            # Load before switching so the first live request doesn't pay the load, and a
            # broken adapter fails here instead of in the stream.
            await self._classify_one("warm-up", adapter)
        self._live = adapter

    async def classify(self, texts: Sequence[str], *, adapter: Any = LIVE) -> list[StudentPrediction]:
        chosen = self._live if adapter is LIVE else adapter  # pinned for the whole batch
        return list(await asyncio.gather(*(self._classify_one(t, chosen) for t in texts)))

    async def _classify_one(self, text: str, adapter: AdapterRef | None) -> StudentPrediction:
        started = time.perf_counter()
        probs = await asyncio.gather(*(self._field_distribution(text, name, adapter) for name in self.codes))
        distribution = dict(zip(self.codes, probs))
        fields = {name: field_prediction(self.codes[name], p) for name, p in distribution.items()}
        return StudentPrediction(
            fields=fields,
            distribution=distribution,
            adapter_id=adapter.adapter_id if adapter else None,
            engine_ms=(time.perf_counter() - started) * 1000,
        )

    async def _field_distribution(self, text: str, field_name: str, adapter: AdapterRef | None) -> list[float]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        codes = self.codes[field_name]
        style = adapter.prompt_style if adapter else PromptStyle.instruct
        prompt = render_prompt(self.task, field_name, text, style, codes)
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            allowed_token_ids=list(codes.token_ids),
            logprob_token_ids=list(codes.token_ids),
            detokenize=False,
        )
        final = None
        async for output in self._engine.generate(
            TokensPrompt(prompt_token_ids=encode_prompt(self._tokenizer, prompt)),
            params,
            request_id=uuid.uuid4().hex,
            lora_request=self._lora_request(adapter),
        ):
            final = output
        if final is None or not final.outputs or not final.outputs[0].logprobs:
            raise RuntimeError("engine returned no logprobs")
        return distribution_from_logprobs(codes, final.outputs[0].logprobs[0])

    @staticmethod
    def _lora_request(adapter: AdapterRef | None) -> Any:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(adapter.adapter_id, _lora_int_id(adapter.adapter_id), str(adapter.path))
