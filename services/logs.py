"""Logging for every triage process: JSON lines when stderr is not a terminal, text otherwise.

Records carry ticket / Kafka context where it applies, from two places:
- `log_context(topic=..., partition=..., adapter_id=...)` around a batch (a contextvar, so
  concurrent batches in one event loop keep theirs apart);
- `extra={"ticket_id": ..., "offset": ...}` on a single call.

    configure_logging("INFO")                 # once, in the entry point
    with log_context(topic=t, partition=p, offsets="10-137"):
        log.warning("dead-letter: %s", reason, extra={"ticket_id": tid, "offset": 12})
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import Any, Iterator

CONTEXT_FIELDS = ("ticket_id", "topic", "partition", "offset", "offsets", "adapter_id", "task",
                  "replica", "reason", "attempt")
NOISY_LOGGERS = ("vllm", "aiokafka", "httpx", "httpx2", "httpcore", "openai", "faststream",
                 "transformers", "aiohttp.access", "urllib3", "filelock", "matplotlib", "torch")
_context: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("triage_log_context", default={})


@contextlib.contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """Add fields to every record logged inside the block (nested blocks merge)."""
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v is not None}})
    try:
        yield
    finally:
        _context.reset(token)


class ContextFilter(logging.Filter):
    """Copies the active `log_context` onto each record (explicit `extra=` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in CONTEXT_FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message [key=value ...]` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={getattr(record, k)}" for k in CONTEXT_FIELDS
                           if getattr(record, k, None) is not None)
        if not context:
            return line
        head, sep, rest = line.partition("\n")  # keep a traceback below the context
        return f"{head} [{context}]{sep}{rest}"


def configure_logging(level: str = "INFO", fmt: str = "auto", *, verbose: bool = False,
                      quiet: bool = False) -> None:
    """Root handler on stderr. fmt: json | text | auto (json unless stderr is a terminal).

    Library loggers stay at WARNING unless `verbose`; vLLM's own logger follows the same rule.
    `quiet` (the demo, which prints its own story): errors only, no Python/torch warnings.
    """
    if quiet and not verbose:
        # The demo narrates what happens (dead letters included); libraries' deprecation notes,
        # torch's C++ notices and progress bars of engine subprocesses are noise there.
        level = logging.getLevelName(max(logging.getLevelName(level.upper()), logging.ERROR))
        import warnings

        warnings.filterwarnings("ignore")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")  # vLLM's engine processes too
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        # torch's Python loggers in vLLM's worker process ("Triton not available" on CPU):
        # only the environment reaches that process. "-all" = ERROR for every torch logger.
        os.environ.setdefault("TORCH_LOGS", "-all")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    floor = logging.ERROR if quiet else logging.WARNING
    library_level = logging.getLevelName(level.upper()) if verbose else max(
        floor, logging.getLevelName(level.upper()))
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if verbose else logging.getLevelName(max(floor, logging.WARNING)))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "1")
