"""The router example: which desk a BANKING77 ticket goes to, by a RULE on its intent.

`desk` is not BANKING77 gold: it is a fixed function of the intent (DESK_BY_INTENT below):
cards = anything about a card (ordering, using, losing it, its PIN); payments = money moving
(transfers, top-ups, cash, exchange, refunds, direct debits); account = the rest (identity,
personal details, the app, closing the account). The router task
(schemas/tasks/banking77_desk.json) forwards `cards` tickets to the ticket specialist
(category + priority + entities) and the others to the intent specialist (deploy/tasks.json).

Run: `python -m services.dev.desk_dataset OUT_DIR` (train/test JSONL the stand-in answers from).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from services.dev.datasets import load_split

DESKS = ("cards", "payments", "account")
_PAYMENT_WORDS = ("transfer", "top_up", "topping_up", "cash", "exchange", "refund", "direct_debit",
                  "beneficiary", "receiving_money", "transaction", "charge", "statement", "fiat")


def desk_for(intent: str) -> str:
    """The rule: card words first (a declined card payment is the card desk's), then money."""
    name = intent.lower()
    if "card" in name or "pin" in name.split("_") or name in ("apple_pay_or_google_pay", "atm_support",
                                                              "contactless_not_working"):
        return "cards"
    if any(word in name for word in _PAYMENT_WORDS):
        return "payments"
    return "account"


def write_desk_dataset(out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "test"):
        path = paths[split] = out_dir / f"{split}.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for row in load_split(split):
                f.write(json.dumps({"text": row.text, "labels": {"desk": desk_for(row.label)}},
                                   ensure_ascii=False) + "\n")
    return paths


if __name__ == "__main__":
    for split, path in write_desk_dataset(Path(sys.argv[1] if len(sys.argv) > 1 else "var/desk")).items():
        print(split, path)
