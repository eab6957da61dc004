"""All process settings, read once from the environment (prefix TRIAGE_) or a .env file.

Inner components take explicit arguments; only the CLI / app factory reads Settings.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.task import default_task_path
from schemas.training import (
    DEFAULT_COLD_EVAL_SHARE, DEFAULT_COLD_ROWS_UNTIL, DEFAULT_EVAL_SHARE, DEFAULT_HELDOUT_FRACTION,
)
from services.student.model_store import default_cache_dir, default_model_dir


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="TRIAGE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- Kafka -------------------------------------------------------------------------
    # Comma-separated bootstrap servers. Empty = start the embedded Tansu broker (dev only).
    bootstrap_servers: str = ""
    # Topics: input tickets, published results (a changelog keyed by ticket id: latest record
    # wins, compacted in production), rejected input, adapter hot-swap commands, and tickets
    # waiting for the teacher (escalations + audits, read by the teacher worker).
    tickets_topic: str = "triage.tickets"
    results_topic: str = "triage.results"
    dead_letter_topic: str = "triage.dead-letter"
    control_topic: str = "triage.control"
    escalations_topic: str = "triage.escalations"
    # People's corrections and confirmations of published answers (schemas/feedback.py), read
    # beside the teacher worker into the training log.
    feedback_topic: str = "triage.feedback"
    # Consumer group shared by all student replicas; partitions are split between them.
    consumer_group: str = "triage"
    # The teacher worker's own group: it scales on the escalations topic's lag.
    teacher_consumer_group: str = "triage-teacher"
    # The feedback consumer's group (with the teacher worker: it writes the training log).
    feedback_consumer_group: str = "triage-feedback"
    # What `triage serve` runs: the student consumer, the teacher worker, or both (one process).
    role: str = Field(default="all", pattern="^(all|student|teacher)$")
    # Tansu joins a group in ~session_timeout/2, so dev uses 3000; real Kafka wants >= 6000.
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    # On a rebalance the student consumer first lets the batch in flight publish and commit
    # (the group waits meanwhile), else its records come again and are answered twice.
    rebalance_batch_wait_s: float = Field(default=30.0, ge=0)
    # Largest batch handed to the engine at once, and how long to wait to fill it. 0 = by the
    # served dtype (`engine_max_batch`): 2 CPU cores, 900 tickets through Kafka, bench.throughput:
    # bf16 256 ~10% faster than 128 (42.8-43.3 vs 38.8-39.1 tickets/s); float32 on AVX2 256
    # no faster than 128 (21.5-22.1 vs 21.5-22.8), so 128 as before issue 25; a GPU wants 256+.
    max_batch: int = Field(default=0, ge=0, le=4096)
    batch_timeout_ms: int = Field(default=50, ge=0)
    # Longest a fetch waits at the broker for new records. Real Kafka answers as soon as data
    # arrives; Tansu holds the whole wait, so a hop (tickets -> escalations -> results) could
    # cost 500 ms (the client default) each. Lower = more empty fetches when idle.
    fetch_max_wait_ms: int = Field(default=100, ge=0, le=5_000)
    # Partitions created for the topics when we create them (`serve --create-topics`, demo);
    # the control topic always gets one (swap commands stay ordered).
    topic_partitions: int = Field(default=4, ge=1)
    # Replication factor of topics we create: 1 fits a single broker (dev, compose); production
    # uses 3 (deploy/k8s/kafka-topics.yaml) so a broker can be lost without losing results.
    topic_replication: int = Field(default=1, ge=1)

    # --- Input validation --------------------------------------------------------------
    # Tickets longer than this (characters) are dead-lettered, not truncated silently.
    max_text_chars: int = Field(default=4_000, ge=1)
    # Raw message size limit (bytes), checked before JSON parsing.
    max_message_bytes: int = Field(default=64_000, ge=1)
    # Dead-letter records keep the original's size + sha256 and at most this many of its bytes
    # (the record itself must stay under the producer's 1 MiB request limit).
    dead_letter_copy_bytes: int = Field(default=64_000, ge=0, le=512_000)

    # --- Failure policy ----------------------------------------------------------------
    # A batch that fails as a whole (broker, engine) is retried from its first offset with
    # exponential backoff (base, max); after max_attempts in a row the replica stops itself
    # (crash-only: uncommitted, readiness false, exit 1) for the orchestrator to restart.
    batch_retry_base_s: float = Field(default=0.5, gt=0)
    batch_retry_max_s: float = Field(default=30.0, gt=0)
    batch_max_attempts: int = Field(default=8, ge=1)

    # --- Student engine (vLLM) ----------------------------------------------------------
    # HF model folder of the student. Default: SmolLM2-135M converted from the packaged GGUF
    # (only that default folder is ever written; another path must already hold a model).
    model_path: Path = Field(default_factory=default_model_dir)
    # Task definition (fields, labels, instructions, teacher few-shot examples).
    task_path: Path = Field(default_factory=default_task_path)
    # Several tasks in one process (one engine, one adapter per task): a JSON file naming them
    # (services/deployment.py; example deploy/tasks.json). Empty = the one task above.
    deployment_path: Path | None = None
    # The student's number format. auto: bfloat16 on a GPU or a CPU with AVX512-BF16 / AMX
    # (1.6x float32 there), float32 elsewhere (bf16 is several times slower on AVX2).
    # An adapter's threshold is certified in one dtype: served in another, it trusts nothing
    # until the next distil re-certifies it (services/student/calibration_record.py).
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 32 lets short shared prompt prefixes hit the prefix cache (128 never does on CPU).
    block_size: int = 32
    # Skips torch.compile / CUDA graphs: faster start, slower steady state. Off in production.
    enforce_eager: bool = True
    max_model_len: int = 2048
    max_num_seqs: int = 256
    # Largest LoRA rank served; vLLM sizes its LoRA buffers (and CPU LoRA cost) by it, so keep
    # it at the trainer's rank (trainer/train.py --lora-r, default 16).
    max_lora_rank: int = 16
    # Adapters batched in one engine step (vLLM max_loras; GPU memory is reserved for each)
    # and kept loaded in host memory (max_cpu_loras). None: two per task (live + a swap).
    max_loras: int | None = Field(default=None, ge=1)
    max_cpu_loras: int | None = Field(default=None, ge=1)
    # GPU memory share for vLLM (ignored on CPU, where VLLM_CPU_KVCACHE_SPACE applies).
    gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    # KV cache size on CPU in GiB (sets VLLM_CPU_KVCACHE_SPACE if unset).
    cpu_kv_cache_gib: int = Field(default=1, ge=1)
    # Cores vLLM-CPU keeps for its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU if unset); None:
    # 0 on machines with <= 4 cores (the model gets both of a laptop's/CI's 2), else vLLM's 1.
    cpu_reserved_cores: int | None = Field(default=None, ge=0)
    # Compiled matmul kernels each oneDNN in the engine process keeps, one per batch shape:
    # vLLM's (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and PyTorch's, which runs the LoRA deltas
    # (LRU_CACHE_CAPACITY); each only if unset. Nearly every engine step has a new shape, so
    # the default of 1024 each grew the engine worker by ~1.2 GiB over 9,000 fresh tickets;
    # bounded, it levels off within ~2,500 at the same speed (bench/README, "Engine memory").
    cpu_kernel_cache_entries: int = Field(default=64, ge=1)
    # How the student writes entity spans. "free": any text under the JSON schema, then checked
    # against the ticket (case repaired; a span not in it is dropped and the field escalates).
    # "ticket": a grammar per ticket enumerating its word runs, so every span occurs by
    # construction, but a span the model did not mean is cut to a prefix that occurs ("a" for
    # an imagined "a few days ago"): measured on the example task, entity precision 0.85
    # ("ticket") vs 0.98 ("free") on the same adapter (README).
    entity_span_grammar: Literal["free", "ticket"] = "free"
    seed: int = 0

    # --- Adapters ----------------------------------------------------------------------
    # Adapter registry (content-hashed adapters + `current` pointer); trainer promotes here.
    registry_dir: Path = Field(default_factory=lambda: default_cache_dir() / "registry")
    # Poll interval for registry changes (hot-swap also listens on control_topic).
    registry_poll_s: float = Field(default=5.0, gt=0)

    # --- Escalation --------------------------------------------------------------------
    # Escalate when any field's confidence is below this; 1.0 escalates every ticket (confidence
    # exactly 1.0 too). None = the live adapter's own calibrated threshold (stored with it);
    # uncalibrated (base model) or infeasibly calibrated escalates everything.
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    # The evaluation sample: this content-hash share of every consumed ticket, whatever the
    # student's confidence. An escalated one's teacher label is held out (calibration, gate,
    # never training); a confident one is also sent to the teacher (an audit: live accuracy).
    # It grows with traffic from the first ticket and estimates live error without the
    # easy-ticket bias of auditing confident tickets only. (TRIAGE_AUDIT_RATE: its old name.)
    eval_share: float = Field(default=DEFAULT_EVAL_SHARE, ge=0.0, le=1.0, validation_alias=AliasChoices(
        "TRIAGE_EVAL_SHARE", "TRIAGE_AUDIT_RATE", "eval_share", "audit_rate"))
    # The share while no calibrated adapter is live (cold start): every ticket escalates then,
    # so the larger sample costs no extra teacher call and the first distil comes sooner.
    eval_share_cold: float = Field(default=DEFAULT_COLD_EVAL_SHARE, ge=0.0, le=1.0)
    # Seconds from a ticket's arrival until an escalated ticket gets the student's answer as
    # `unverified` if the teacher has not answered; the teacher's answer follows under the same
    # key. 30 s: a frontier call takes 1-3 s, so normally users only ever see the teacher's
    # answer; when the teacher is down, no ticket sits unrouted for more than half a minute.
    escalation_deadline_s: float = Field(default=30.0, ge=0.0)

    # --- Teacher (any OpenAI-compatible endpoint) ---------------------------------------
    # Empty = no teacher: the teacher worker publishes escalated answers as `unverified`,
    # labels nothing, and /readyz says so; `triage bootstrap` refuses. Only the demo and the
    # tests start the gold-label stand-in (`triage standin`). OPENAI_* work as fallbacks.
    teacher_base_url: str = Field(
        default="", validation_alias=AliasChoices("TRIAGE_TEACHER_BASE_URL", "OPENAI_BASE_URL", "teacher_base_url")
    )
    # The model the teacher endpoint serves. Required with a URL (no default: a default name
    # sent to a real provider fails or, worse, picks a model nobody chose); the stand-in's is
    # "gold-label-standin".
    teacher_model: str = ""
    teacher_api_key: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("TRIAGE_TEACHER_API_KEY", "OPENAI_API_KEY", "teacher_api_key"),
    )
    teacher_timeout_s: float = Field(default=20.0, gt=0)
    teacher_max_retries: int = Field(default=4, ge=0)
    # Teacher calls in flight per worker; audits get at most a quarter, escalations go first.
    teacher_concurrency: int = Field(default=64, ge=1)
    # USD per 1M tokens, for cost accounting.
    teacher_input_price_per_mtok: float = Field(default=0.15, ge=0)
    teacher_output_price_per_mtok: float = Field(default=0.60, ge=0)
    # Optional spend caps in USD; over a cap escalations wait in Kafka (unverified answers at
    # the deadline) until the window has room again.
    teacher_budget_per_hour_usd: float | None = Field(default=None, ge=0)
    teacher_budget_per_day_usd: float | None = Field(default=None, ge=0)
    # Circuit breaker: open after this many consecutive failures, probe again after reset_s.
    teacher_breaker_failures: int = Field(default=5, ge=1)
    teacher_breaker_reset_s: float = Field(default=15.0, gt=0)
    # While the teacher is down, each waiting escalation retries with backoff capped here.
    teacher_retry_max_s: float = Field(default=10.0, gt=0)
    # Escalations the teacher worker holds at once; past it, it stops reading (they wait in Kafka).
    teacher_max_waiting: int = Field(default=5000, ge=1)
    # Few-shot examples put in the teacher prompt.
    teacher_few_shot: int = Field(default=8, ge=0)
    # Per-field escalation: ask the teacher for only the fields the student is unsure of when
    # that request costs at most this share of asking for all of them (estimated from the
    # prompt's length at the prices above); otherwise ask for all (a complete training example
    # for a little more). 0 = always ask for every field.
    teacher_partial_max_share: float = Field(default=0.7, ge=0.0, le=1.0)

    # --- Training log ------------------------------------------------------------------
    data_dir: Path = Field(default_factory=lambda: default_cache_dir() / "data")

    # Calibration + promotion gate run on the training log's held-out slice (teacher labels;
    # schemas.training.is_heldout): this share of bootstrap rows and the evaluation sample,
    # never trained on. Changing it moves rows between training and held-out: keep it fixed.
    heldout_fraction: float = Field(default=DEFAULT_HELDOUT_FRACTION, gt=0.0, lt=1.0)
    # Cold-start sample rows (4x the steady share) stay held out until the steady-state sample
    # holds this many rows; then they train and the slice is uniform over time again.
    heldout_cold_rows_until: int = Field(default=DEFAULT_COLD_ROWS_UNTIL, ge=0)
    # Optional files (TSV/JSONL with the task's labels) for `triage distill` / `triage eval`:
    # calibration = a curated set used INSTEAD of the held-out slice; report = an extra report
    # (e.g. a gold set), never used for a decision.
    calibration_path: str = ""
    report_path: str = ""

    # --- Retention (`triage gc`, trainer/retention.py) ----------------------------------
    # Adapters kept beyond the current one and the kept rollback targets, most recently used first.
    retention_keep_adapters: int = Field(default=5, ge=0)
    # Rollback targets kept (the most recent promotions): `triage gc` trims the registry's
    # stack to them, so rollback past them reaches the base model, never a deleted adapter.
    retention_keep_rollbacks: int = Field(default=3, ge=0)
    # Distil run folders kept that ended (finished, rejected or failed), newest first; runs in
    # progress are always kept.
    retention_keep_runs: int = Field(default=7, ge=0)
    # Anything written to more recently than this may belong to a running writer: kept. Above
    # the CronJob's 4 h activeDeadlineSeconds, so a run without its lock marker is still safe.
    retention_grace_hours: float = Field(default=6.0, gt=0)
    # A router task's training-log `forwards` rows older than this are pruned: the escalations
    # topic keeps records 7 days, so no re-delivery can ask for them (labels are kept forever).
    retention_forwards_days: float = Field(default=30.0, ge=8.0)
    # `triage distill` ends with `triage gc --apply` for its task (the nightly job's retention).
    retention_after_distill: bool = True
    # Dead-letter records (with their bounded copy of the original) live only in Kafka: the
    # dead-letter topic's retention.ms when `--create-topics` creates it (and in deploy/).
    dead_letter_retention_days: float = Field(default=30.0, gt=0)

    # --- Drift (services/stream/drift.py) ----------------------------------------------
    # Consumed tickets per drift window: its escalation rate, audited accuracy and share of
    # teacher labels the adapter never trained on are compared with the adapter's distil.
    drift_window: int = Field(default=1_000, ge=10)
    # A window alerts on new labels when that share's lower 95% bound passes this floor.
    drift_novel_floor: float = Field(default=0.01, ge=0.0, lt=1.0)
    # Novelty guard (services/stream/novelty_guard.py): a student label escalates while at least
    # `min_novel` of the teacher's last `history` answers on tickets given it were labels the
    # adapter never trained on (a launch the threshold never certified). 0 turns it off.
    novelty_guard_min_novel: int = Field(default=1, ge=0)
    novelty_guard_history: int = Field(default=50, ge=1)

    # --- Observability -----------------------------------------------------------------
    # Port for /metrics, /healthz, /readyz. 0 = disabled.
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    # Address it binds. 0.0.0.0 (every interface) because Kubernetes probes and Prometheus reach
    # the pod on its IP; 127.0.0.1 keeps it to the host (a laptop, a shared machine).
    metrics_host: str = "0.0.0.0"
    log_level: str = "INFO"
    # json | text | auto (JSON lines unless stderr is a terminal).
    log_format: str = Field(default="auto", pattern="^(auto|json|text)$")

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be <= session_timeout_ms / 3")
        if self.teacher_base_url.strip() and not self.teacher_model.strip():
            raise ValueError("TRIAGE_TEACHER_BASE_URL is set but TRIAGE_TEACHER_MODEL is not: set it "
                             "to the model that endpoint serves")
        return self

    @property
    def embedded_broker(self) -> bool:
        return not self.bootstrap_servers.strip()

    @property
    def training_log_path(self) -> Path:
        return self.data_dir / "training_log.sqlite3"

    @property
    def drift_log_path(self) -> Path:
        """One JSON line per closed drift window (`triage status` reads the last ones)."""
        return self.data_dir / "drift.jsonl"

    @property
    def engine_max_batch(self) -> int:
        """Records per engine batch: `max_batch`, or for 0 what suits the served dtype."""
        from services.student.hardware import batch_for, resolve_dtype

        return self.max_batch or batch_for(resolve_dtype(self.dtype)[0])
