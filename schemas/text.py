"""The one text normaliser: serving, training, dedup and the stand-in all see text through it."""

from __future__ import annotations

import unicodedata

# The version of `dedup_key`: stored content hashes were computed with it (a training log
# re-keys itself when it was written with an older one: services/teacher/log_keys.py).
# 1: whitespace + lower case. 2: NFKC, casefold, punctuation out (`dedup_key`).
DEDUP_KEY_VERSION = 2
_APOSTROPHES = "'\u2019\u02bc"  # ', right single quotation mark, modifier letter apostrophe


def normalise_whitespace(text: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends."""
    return " ".join(text.split())


def dedup_key(text: str) -> str:
    """What makes two texts one ticket, for dedup, the held-out split, the evaluation sample and
    the train/validation split alike: Unicode NFKC (full-width forms, ligatures, composed
    accents), casefold, apostrophes dropped ("don't" = "dont"), every other run of characters
    that are not letters, marks or digits one space. So punctuation, spacing and line breaks do
    not count, and neither does how the subject was joined to the body (`Ticket.full_text`
    puts it on a line of its own; an export that folded it into the body with ": " or " - "
    sends the same words). A ticket sent without its subject, or with other input fields, is
    another input to the student and keeps a key of its own. A text with no letter or digit at
    all keeps its whitespace-normalised form (emoji-only tickets stay apart)."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    kept = "".join(ch if unicodedata.category(ch)[0] in "LMN" else "" if ch in _APOSTROPHES else " "
                   for ch in folded)
    return normalise_whitespace(kept) or normalise_whitespace(folded)

