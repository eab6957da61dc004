"""What the dead-letter topic carries: the reason, and the original bytes up to a bound.

The record must itself fit the producer's request limit (a ~1 MB original re-encoded as base64
would not), so it keeps the original's size and sha256 always and a copy of its first
`original_copy_limit` bytes; `original_truncated` says whether that copy is whole."""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone

from pydantic import BaseModel, Field


class DeadLetter(BaseModel):
    reason: str = Field(description="machine-readable: not_utf8, not_json, invalid_schema, ...")
    detail: str = Field(description="human-readable explanation")
    source_topic: str
    partition: int
    offset: int
    key_b64: str | None = None
    original_b64: str = Field(description="the message value as consumed (a prefix when truncated), base64")
    original_size: int = Field(default=0, ge=0, description="bytes of the original message value")
    original_sha256: str = Field(default="", description="sha256 of the whole original value (hex)")
    original_truncated: bool = Field(default=False, description="original_b64 holds only a prefix")
    ticket_id: str | None = Field(default=None, description="when the message parsed as a ticket")
    dead_lettered_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @staticmethod
    def encode(raw: bytes | None) -> str:
        return base64.b64encode(raw or b"").decode("ascii")

    @classmethod
    def of(cls, raw: bytes | None, *, copy_limit: int, **fields: object) -> DeadLetter:
        """A record for `raw`: size + sha256 always, the bytes themselves up to `copy_limit`."""
        raw = raw or b""
        return cls(
            original_b64=cls.encode(raw[:copy_limit]), original_size=len(raw),
            original_sha256=hashlib.sha256(raw).hexdigest(), original_truncated=len(raw) > copy_limit,
            **fields,
        )

    @classmethod
    def of_record(cls, record: object, *, copy_limit: int, reason: str, detail: str,
                  ticket_id: str | None = None) -> DeadLetter:
        """The envelope of a consumed record (anything with value, key, topic, partition and
        offset: an aiokafka record or the pipeline's InboundRecord), as every lane writes it."""
        key = getattr(record, "key", None)
        return cls.of(
            getattr(record, "value", None), copy_limit=copy_limit, reason=reason, detail=detail[:1000],
            source_topic=getattr(record, "topic"), partition=getattr(record, "partition"),
            offset=getattr(record, "offset"), ticket_id=ticket_id,
            key_b64=cls.encode(key[:1024]) if key is not None else None,
        )

    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)
