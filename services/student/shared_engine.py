"""One vLLM engine (one copy of the base weights) shared by every task of a process.

`StudentEngine.started(config)` starts AsyncLLM with multi-LoRA on; `engine.classifier(task)`
gives a `VllmClassifier` for one TaskSpec. Every task's classifier submits its requests to
the same engine with its own adapter (`LoRARequest`), so vLLM's scheduler packs tickets of
different tasks into the same forward passes; each task's live adapter is its own.
`started_classifier(config, task)`: one task on an engine of its own.

This module builds on services/student/engine.py (the classifier), never the reverse.
"""

from __future__ import annotations

import asyncio
import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator

from services.student.engine import EngineConfig, VllmClassifier

if TYPE_CHECKING:
    from schemas.task import TaskSpec
    from services.student.registry import AdapterRef


def engine_environment(config: EngineConfig, cores: int) -> dict[str, str]:
    """The variables vLLM-CPU and oneDNN read at start, as this config wants them."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(config.cpu_kv_cache_gib), "HF_HUB_OFFLINE": "1",
           # vLLM's oneDNN and PyTorch's (ideep's cache): both read at the first matmul
           "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(config.cpu_kernel_cache_entries),
           "LRU_CACHE_CAPACITY": str(config.cpu_kernel_cache_entries)}
    reserved = config.cpu_reserved_cores
    if reserved is None and cores <= 4:
        # vLLM-CPU keeps one core for its scheduler process; on a 2-core machine that halves
        # the model's compute (measured: 12.5 -> 14.5 tickets/s with both cores). The
        # scheduler mostly waits on the worker, so it shares the cores fine.
        reserved = 0
    if reserved is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(reserved)
    return env


class StudentEngine:
    """The AsyncLLM, its tokenizer and the classifiers (one per task) built on it."""

    def __init__(self, llm: Any, tokenizer: Any, config: EngineConfig) -> None:
        self.llm, self.tokenizer, self.config = llm, tokenizer, config
        self._views: list[VllmClassifier] = []

    def classifier(self, task: TaskSpec) -> VllmClassifier:
        """A classifier for `task` on this engine, serving the base model until `use_adapter`."""
        view = VllmClassifier(self.llm, self.tokenizer, task, self.config)
        self._views.append(view)
        return view

    @classmethod
    @asynccontextmanager
    async def started(cls, config: EngineConfig) -> AsyncIterator[StudentEngine]:
        # Before AsyncLLM: its engine processes inherit the environment; what the operator
        # set explicitly wins.
        for name, value in engine_environment(config, os.cpu_count() or 1).items():
            os.environ.setdefault(name, value)
        from vllm.config import StructuredOutputsConfig
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
            # Adapters resident in the engine at once (GPU memory / CPU LoRA slots) and kept
            # loaded in host memory; each task needs its live one + a candidate being swapped in.
            max_loras=config.max_loras,
            max_cpu_loras=max(config.max_cpu_loras or 0, config.max_loras),
            enable_prefix_caching=True,
            max_logprobs=128,
            use_tqdm_on_load=False,  # a progress bar per engine start is noise in logs
            gpu_memory_utilization=config.gpu_memory_utilization,
            seed=config.seed,
            disable_log_stats=True,
            # The entities field's grammar: xgrammar, and no optional whitespace (per request
            # the flag does nothing), so the JSON is written exactly as the trainer's targets.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            **config.extra,
        )
        llm = AsyncLLM.from_engine_args(args)
        engine = None
        try:
            tokenizer = llm.get_tokenizer()
            if asyncio.iscoroutine(tokenizer):
                tokenizer = await tokenizer
            engine = cls(llm, tokenizer, config)
            yield engine
        finally:
            llm.shutdown()
            # AsyncLLM.__del__ calls shutdown() again; if anything still holds the engine at
            # interpreter exit, that runs with vLLM's module globals already None (a noisy
            # TypeError traceback). Shut down once: the instance attribute shadows the method.
            llm.shutdown = lambda *args, **kwargs: None
            if engine is not None:
                for view in engine._views:
                    view._engine = None
                engine.llm = None
            del llm


@asynccontextmanager
async def started_classifier(config: EngineConfig, task: TaskSpec,
                             adapter: AdapterRef | None = None) -> AsyncIterator[VllmClassifier]:
    """An engine of its own serving one task (a multi-task process shares one `StudentEngine`
    between its tasks instead)."""
    async with StudentEngine.started(config) as engine:
        classifier = engine.classifier(task)
        await classifier.use_adapter(adapter)
        yield classifier
