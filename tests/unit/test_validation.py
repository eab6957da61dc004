import json

import pytest

from schemas.ticket import Ticket
from services.stream.validation import Rejection, parse_ticket

LIMITS = dict(max_bytes=1000, max_text_chars=50)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (None, "empty_message"),
        (b"", "empty_message"),
        (b"x" * 1001, "too_large"),
        (b"\xff\xfe{}", "not_utf8"),
        (b'{"id": 1,', "not_json"),
        (b"[1, 2]", "invalid_schema"),
        (json.dumps({"text": "no id"}).encode(), "invalid_schema"),
        (json.dumps({"id": "a", "text": "hi", "surprise": 1}).encode(), "invalid_schema"),
        (json.dumps({"id": "a", "text": "   "}).encode(), "empty_text"),
        (json.dumps({"id": "a", "text": ""}).encode(), "empty_text"),
        (json.dumps({"id": "a", "text": "y" * 51}).encode(), "text_too_long"),
    ],
)
def test_rejections_carry_a_precise_reason(raw, reason):
    result = parse_ticket(raw, **LIMITS)
    assert isinstance(result, Rejection)
    assert result.reason == reason
    assert result.detail


def test_valid_ticket_parses_with_metadata_and_subject():
    raw = json.dumps({"id": "t1", "text": " card lost ", "subject": "Help", "metadata": {"k": 1}}).encode()
    ticket = parse_ticket(raw, **LIMITS)
    assert isinstance(ticket, Ticket)
    assert ticket.text == "card lost"
    assert ticket.full_text() == "Help\ncard lost"
    assert ticket.metadata == {"k": 1}
