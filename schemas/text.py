"""The one text normaliser: serving, training, dedup and the stand-in all see text through it."""

from __future__ import annotations


def normalise_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def dedup_key(text: str) -> str:
    """Whitespace- and case-normalised text: trivial variants of a ticket compare equal."""
    return normalise_whitespace(text).lower()
