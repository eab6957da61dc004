"""Request parsing and error replies of the gold-label stand-in (services/dev/standin.py):
the OpenAI chat-completions shapes it reads and writes."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from aiohttp import web


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def last_user_text(messages: Sequence[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            text = content_text(message.get("content"))
            if text.strip():
                return text
    raise ValueError("no user message")


def schema_properties(body: dict[str, Any], default: str) -> list[tuple[str, dict[str, Any]]]:
    """The requested json_schema's properties in order; none: one categorical `default`."""
    try:
        props = body["response_format"]["json_schema"]["schema"]["properties"]
        if isinstance(props, dict) and props:
            return [(name, p if isinstance(p, dict) else {}) for name, p in props.items()]
    except (KeyError, TypeError):
        pass
    return [(default, {})]


def is_array(prop: Mapping[str, Any]) -> bool:
    return prop.get("type") == "array"


def entity_types(prop: Mapping[str, Any]) -> list[str] | None:
    """The entity types an entities property allows (its items' `type` enum), None: any."""
    try:
        enum = prop["items"]["properties"]["type"]["enum"]
    except (KeyError, TypeError):
        return None
    return list(enum) if isinstance(enum, list) else None


def error_reply(status: int, message: str, kind: str, headers: dict[str, str] | None = None):
    payload = {"error": {"message": message, "type": kind, "code": None, "param": None}}
    return web.json_response(payload, status=status, headers=headers)
