"""The stand-in as a fallible teacher: wrong on a seeded share of tickets, with confusable labels.

A real LLM teacher on a BANKING77-like label set is right on roughly 85-91% of tickets, and
when it is wrong it picks a *neighbouring* intent (`card_arrival` for `card_delivery_estimate`),
not a random one. `triage standin --error-rate R` imitates that:

- **which tickets**: a (ticket, field) pair is answered wrong when the hash of its content key
  (`schemas.training.hash_unit`, salted with the seed and the field) is below R. So the same
  text always gets the same answer, like a teacher at temperature 0, a re-asked ticket does not
  "fix itself", and the share is R on any large set of distinct texts. A one-field task is
  wrong on R of its tickets;
- **which label**: one of the `top_k` labels most similar to the gold one, chosen by the same
  hash. Similarity is the cosine of TF-IDF word bags, one bag per label built from the label's
  name and the gold texts labelled with it (labels of texts alike are the ones a model mixes
  up); a label without gold texts is compared by its name alone.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Any, Iterable, Mapping, Sequence

from schemas.training import hash_unit

_WORD = re.compile(r"[a-z0-9']+")
TOP_K = 3  # the wrong label is one of the gold label's three nearest neighbours


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower().replace("_", " "))


class ConfusableErrors:
    """Decides, per (text, field), whether the stand-in answers wrong and with which label."""

    def __init__(self, examples: Iterable[tuple[str, Mapping[str, Any]]], *, seed: int = 0,
                 top_k: int = TOP_K) -> None:
        """`examples`: (text, {field: label}) pairs of the gold data (other values ignored)."""
        self.seed, self.top_k = seed, max(1, top_k)
        self._bags: dict[str, Counter[str]] = defaultdict(Counter)
        for text, labels in examples:
            for label in labels.values():
                if isinstance(label, str):
                    self._bags[label].update(_words(text))
        self._neighbours: dict[tuple[str, tuple[str, ...]], list[str]] = {}

    # --- which tickets ------------------------------------------------------------------
    def is_wrong(self, text: str, field: str, rate: float) -> bool:
        return rate > 0 and hash_unit(text, f"standin-wrong:{self.seed}:{field}") < rate

    # --- which label ----------------------------------------------------------------------
    def neighbours(self, label: str, choices: Sequence[str]) -> list[str]:
        """The other labels of `choices`, most similar to `label` first (ties by name)."""
        key = (label, tuple(choices))
        if key not in self._neighbours:
            vectors = self._vectors(set(choices) | {label})
            mine = vectors[label]
            others = [c for c in dict.fromkeys(choices) if c != label]
            self._neighbours[key] = sorted(others, key=lambda c: (-_cosine(mine, vectors[c]), c))
        return self._neighbours[key]

    def confusable(self, label: str, choices: Sequence[str]) -> list[str]:
        """The labels a wrong answer for gold `label` is drawn from."""
        return self.neighbours(label, choices)[: self.top_k]

    def wrong_label(self, text: str, field: str, label: str, choices: Sequence[str]) -> str:
        """A confusable label other than `label` (`label` itself when there is no other)."""
        pool = self.confusable(label, choices)
        if not pool:
            return label
        return pool[int(hash_unit(text, f"standin-pick:{self.seed}:{field}") * len(pool))]

    def _vectors(self, labels: set[str]) -> dict[str, dict[str, float]]:
        """TF-IDF over the labels' bags (each bag: the label's name, weighted like one text,
        plus its gold texts' words), so words every label shares ("card", "my") weigh little."""
        bags = {label: self._bags.get(label, Counter()) + Counter(_words(label)) for label in labels}
        documents = Counter(word for bag in bags.values() for word in bag)
        n = len(bags)
        return {label: {w: c * math.log((1 + n) / (1 + documents[w])) for w, c in bag.items()}
                for label, bag in bags.items()}


def _cosine(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    dot = sum(v * b.get(w, 0.0) for w, v in a.items())
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return dot / norm if norm else 0.0


def gold_examples(gold: Mapping[str, Any], plain_field: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    """The stand-in's gold (dedup key -> plain label or full answer) as (text, labels) pairs;
    a plain label counts under `plain_field`."""
    for text, entry in gold.items():
        yield text, (entry if isinstance(entry, Mapping) else {plain_field: entry})
