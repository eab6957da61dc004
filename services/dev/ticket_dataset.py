"""The shipped "category + priority + entities" example task, on BANKING77 texts.

BANKING77 gives each text an intent (`category`) and nothing else. The `priority` label and the
`entities` spans in these files are RULE-MADE here, not human gold:

- priority: a fixed map from the intent (PRIORITY_BY_INTENT), so priority is a function of
  category. urgent = card, phone or money possibly in someone else's hands (fraud, loss, a
  swallowed card); high = the customer's money is stuck, failed, declined, missing or wrongly
  taken, or they cannot use their card/app; normal = a how-to or an explanation about their own
  card, account, top-up or fee; low = general information (limits, prices, countries, brands).
- entities: deterministic regex/keyword rules (extract_entities), five types: amount, currency,
  country, card_brand, date. Spans are copied from the text in its original case, in order of
  appearance, without duplicates, at most 8. Where candidates overlap, the longest wins
  ("American Express" is a card brand, not a country; "US dollars" is a currency; "3 March" is a
  date, not an amount). What each type covers is documented at its patterns below.

A student scored against these files is scored against the rules, not against people.
Run: `python -m services.dev.ticket_dataset OUT_DIR` (writes train/dev/test.jsonl);
`--write-task` also regenerates schemas/tasks/banking77_tickets.json from the same rules.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from services.dev.datasets import BANKING77_SPLITS, load_split

TICKET_TASK_PATH = Path(__file__).resolve().parents[2] / "schemas" / "tasks" / "banking77_tickets.json"
PRIORITIES = ("urgent", "high", "normal", "low")
MAX_ENTITIES = 8

_BY_LEVEL = {
    # Fraud or loss of control: someone else may be spending the customer's money right now.
    "urgent": """lost_or_stolen_card compromised_card card_swallowed lost_or_stolen_phone
        card_payment_not_recognised cash_withdrawal_not_recognised direct_debit_payment_not_recognised""",
    # The customer's own money is stuck, failed, declined, missing or wrongly taken, or they are
    # locked out of the card/app: a real loss or blockage, but no third party involved.
    "high": """Refund_not_showing_up balance_not_updated_after_bank_transfer
        balance_not_updated_after_cheque_or_cash_deposit beneficiary_not_allowed cancel_transfer
        card_not_working contactless_not_working virtual_card_not_working declined_card_payment
        declined_cash_withdrawal declined_transfer failed_transfer top_up_failed top_up_reverted
        reverted_card_payment? pending_card_payment pending_cash_withdrawal pending_top_up
        pending_transfer transfer_not_received_by_recipient transaction_charged_twice
        extra_charge_on_statement wrong_amount_of_cash_received card_payment_wrong_exchange_rate
        wrong_exchange_rate_for_cash_withdrawal pin_blocked passcode_forgotten unable_to_verify_identity""",
    # How-to or "why this fee" about the customer's own card, account or transaction.
    "normal": """activate_my_card apple_pay_or_google_pay automatic_top_up card_about_to_expire
        card_arrival card_delivery_estimate card_linking change_pin edit_personal_details
        exchange_via_app get_disposable_virtual_card get_physical_card getting_spare_card
        getting_virtual_card order_physical_card request_refund terminate_account
        top_up_by_cash_or_cheque topping_up_by_card transfer_into_account receiving_money
        verify_my_identity verify_source_of_funds verify_top_up card_payment_fee_charged
        cash_withdrawal_charge transfer_fee_charged""",
    # General information, no transaction of the customer's at stake (price list, limits, scope).
    "low": """age_limit atm_support card_acceptance country_support disposable_card_limits
        exchange_charge exchange_rate fiat_currency_support supported_cards_and_currencies
        top_up_by_bank_transfer_charge top_up_by_card_charge top_up_limits transfer_timing
        visa_or_mastercard why_verify_identity""",
}
PRIORITY_BY_INTENT: dict[str, str] = {i: level for level, names in _BY_LEVEL.items() for i in names.split()}
PRIORITY_RULE = ("urgent = possible fraud or a lost, stolen or swallowed card or phone; high = the "
                 "customer's money is stuck, failed, declined, missing or wrongly charged, or they "
                 "cannot use their card or app; normal = a how-to or fee question about their own "
                 "card, account or transaction; low = general information (prices, limits, countries, "
                 "supported cards).")


def _words(text: str) -> str:
    """An alternation of phrases, longest first, spaces matching any whitespace run."""
    items = sorted(set(text.split("|")), key=len, reverse=True)
    return "|".join(r"\s+".join(map(re.escape, i.split())) for i in items)


# ---- currency: ISO codes (upper case only, so "try"/"all" are words) and currency words. A
# currency SYMBOL is part of the amount ("£20", "500£") and never a currency entity of its own;
# a currency word or code next to a number is its own span ("30" amount + "pounds" currency).
_ISO = "USD|EUR|GBP|AUD|CAD|NZD|JPY|CNY|HKD|SGD|CHF|SEK|NOK|DKK|PLN|CZK|HUF|RON|RUB|INR|MXN|BRL|ZAR|TRY|AED|THB|ILS|KRW|BTC|ETH"
_CUR_WORD = _words("dollar|dollars|euro|euros|pound|pounds|pound sterling|sterling|yen|yuan|renminbi|"
                   "rupee|rupees|ruble|rubles|rouble|roubles|peso|pesos|franc|francs|krona|kronor|krone|"
                   "zloty|lira|rand|dirham|dirhams|baht|bitcoin|bitcoins|ethereum|crypto|cryptocurrency|"
                   "cryptocurrencies")
_CUR_QUAL = _words("US|U.S.|American|Australian|Canadian|New Zealand|Hong Kong|Singapore|Swiss|"
                   "Russian|Japanese|Chinese|Mexican|Indian|British|Swedish|Norwegian|Danish|Polish")
_CURRENCY = re.compile(rf"\b(?:(?:{_CUR_QUAL})\s+)?(?i:{_CUR_WORD})\b|\b(?:{_ISO})\b")

# ---- amount: digits only ("a hundred" is not extracted). Always an amount: a number with a
# currency symbol before or after it, or next to a currency word/code. A bare number counts when
# it looks like money (decimals "20.00", thousands "7,000") or follows a money verb ("withdraw 30",
# "charged for 100"), and never when a unit follows ("2 days", "5 times", "18 years old").
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_SYM = r"[£$€¥₹]"
_AMOUNT_SYM = re.compile(rf"(?<![\w.,]){_SYM}\s?(?:{_NUM})(?![\d%])|(?<![\w.,$£€])(?:{_NUM})\s?{_SYM}")
_AMOUNT_BARE = re.compile(rf"(?<![\w.,/:$£€¥₹-])(?:{_NUM})(?![\w%/:£$€¥₹-]|[.,]\d)")
_AMOUNT_BEFORE_CUR = re.compile(rf"\s*(?:(?:{_CUR_QUAL})\s+)?(?:(?i:{_CUR_WORD})|{_ISO})\b")
_AMOUNT_AFTER_CUR = re.compile(rf"\b(?:{_ISO})\s?$")
_MONEY_CUES = set("""for of withdraw withdrew withdrawing withdrawn withdrawal out gave give given got get
    getting me received receive charged charge paid pay sent send transfer transferred transferring
    deposited deposit requested request asked wanted entered input only spent spend cost costs
    costed refund refunded exchanged bought buy topped up balance allowed limit""".split())
_UNITS = set("""day days week weeks month months year years yr yrs old hour hours hr hrs minute minutes
    min mins second seconds time times attempt attempts try tries mile miles km card cards
    transaction transactions transfer transfers payment payments people person digit digits
    number numbers account accounts other different percent""".split())
_AGE_CUES = {"am", "aged", "age", "turned", "under", "over", "is", "are"}  # "I am only 17"

# ---- country: country names (any case, except names that are also common words), the
# abbreviations UK/US/USA/UAE/EU/EEA (exact case: "us" is a pronoun), the EU/EEA/Europe as a
# country group, and capitalised demonyms ("Spanish", "British"), which name a country too.
_COUNTRY_NAMES = _words(
    "Afghanistan|Argentina|Australia|Austria|Belgium|Brazil|Bulgaria|Canada|China|Colombia|Croatia|"
    "Cyprus|Czech Republic|Czechia|Denmark|Egypt|England|Estonia|Finland|France|Germany|Great Britain|"
    "Britain|Greece|Hong Kong|Hungary|Iceland|India|Indonesia|Ireland|Israel|Italy|Japan|Latvia|"
    "Liechtenstein|Lithuania|Luxembourg|Malaysia|Malta|Mexico|Morocco|Netherlands|Holland|New Zealand|"
    "Nigeria|Norway|Pakistan|Philippines|Poland|Portugal|Romania|Russia|Saudi Arabia|Scotland|Singapore|"
    "Slovakia|Slovenia|South Africa|South Korea|Korea|Spain|Sweden|Switzerland|Thailand|Ukraine|"
    "United Arab Emirates|United Kingdom|United States|United States of America|America|Vietnam|Wales|"
    "Europe|European Union|European Economic Area")
_COUNTRY_CASED = _words("Turkey|Chile|Jordan|Georgia|Peru|UK|U.K.|US|U.S.|USA|U.S.A.|UAE|EU|EEA")
_DEMONYMS = _words(
    "American|Americans|Australian|Austrian|Belgian|Brazilian|British|Canadian|Chinese|Danish|Dutch|"
    "English|European|Finnish|French|German|Greek|Indian|Irish|Italian|Japanese|Mexican|Norwegian|"
    "Polish|Portuguese|Russian|Scottish|Spanish|Swedish|Swiss|Turkish|Welsh")
# Not followed by a letter or ".letter" ("U.S" inside "U.S.A"), but a full stop may end the
# sentence: "I live in the EU." names the EU (it was missed before, so the gold disagreed with itself).
_COUNTRY = re.compile(rf"\b(?:(?i:{_COUNTRY_NAMES})|{_COUNTRY_CASED}|{_DEMONYMS})(?!\w|\.\w)")

# ---- card_brand: card networks only, any case ("visa" in a bank ticket is the card). Apple Pay
# and Google Pay are wallets, not brands, and are not extracted.
_CARD_BRAND = re.compile(
    r"\b(?i:visa|master\s?card|maestro|american\s+express|amex|union\s?pay|jcb|diners\s+club)(?!\w)|\bDiscover\b")

# ---- date: weekdays; "last"/"this"/"next" + weekday/week/month/year/night/weekend; today,
# yesterday, tomorrow, tonight, this morning/afternoon/evening; "<n|a|a few> days/weeks/months/
# years ago"; a month name with an optional day ("3 March", "March 3rd", "5th of May"; "May"
# alone is a verb, so only with a day); numeric dates d/m/y, d-m-y, d.m.yyyy, yyyy-mm-dd; years
# 1990-2039. Clock times ("2 hours ago") are not dates.
_WEEKDAY = "monday|tuesday|wednesday|thursday|friday|saturday|sunday"
_MONTH = "january|february|march|april|june|july|august|september|october|november|december"
_DAY = r"\d{1,2}(?:st|nd|rd|th)?"
_COUNT = r"\d+|an?|one|two|three|four|five|six|seven|eight|nine|ten|a\s+few|a\s+couple(?:\s+of)?|few|several"
_DATE = re.compile(
    rf"\b(?i:(?:last|this|next|past)\s+(?:{_WEEKDAY}|week|month|year|night|weekend)"
    rf"|(?:{_WEEKDAY})|today|yesterday|tomorrow|tonight|this\s+(?:morning|afternoon|evening)"
    rf"|(?:{_COUNT})\s+(?:days?|weeks?|months?|years?)\s+ago"
    rf"|{_DAY}(?:\s+of)?\s+(?:{_MONTH}|may)|(?:{_MONTH}|may)\s+{_DAY}(?!\d)|(?:{_MONTH}))(?!\w)"
    r"|(?<![\d/.])(?:\d{1,2}[/-]\d{1,2}(?:[/-]\d{2,4})?|\d{1,2}\.\d{1,2}\.\d{4}|\d{4}-\d{2}-\d{2})(?![\d/])"
    r"|\b(?:199\d|20[0-3]\d)\b(?![.,]\d)")


def _bare_amounts(text: str) -> list[tuple[int, int]]:
    """Bare numbers that are money by the rules at _AMOUNT_BARE (no symbol in the span)."""
    out = []
    for m in _AMOUNT_BARE.finditer(text):
        after, before = text[m.end():], text[: m.start()]
        if _AMOUNT_BEFORE_CUR.match(after) or _AMOUNT_AFTER_CUR.search(before):
            out.append((m.start(), m.end()))
            continue
        nxt = [w.lower() for w in re.findall(r"[A-Za-z]+", after)[:2]]
        prev = [w.lower() for w in re.findall(r"[A-Za-z]+", before)[-2:]]
        # "5 different times" is a count; "200 per month" is still money.
        if nxt[:1] != ["per"] and any(w in _UNITS for w in nxt) or any(w in _AGE_CUES for w in prev):
            continue
        if re.search(r"[.,]", m.group()) or (prev and prev[-1] in _MONEY_CUES):
            out.append((m.start(), m.end()))
    return out


def extract_entities(text: str) -> list[dict[str, str]]:
    """The rule-made entities of a text: [{"type", "text"}], spans exact substrings, in order."""
    candidates: list[tuple[int, int, str]] = []
    for kind, pattern in (("date", _DATE), ("card_brand", _CARD_BRAND), ("currency", _CURRENCY),
                          ("country", _COUNTRY), ("amount", _AMOUNT_SYM)):
        candidates += [(m.start(), m.end(), kind) for m in pattern.finditer(text)]
    candidates += [(s, e, "amount") for s, e in _bare_amounts(text)]
    # Longest candidate wins an overlap; on a tie the earlier kind in the list above.
    taken: list[tuple[int, int, str]] = []
    for start, end, kind in sorted(candidates, key=lambda c: c[0] - c[1]):
        if all(end <= s or start >= e for s, e, _ in taken):
            taken.append((start, end, kind))
    out: list[dict[str, str]] = []
    for start, end, kind in sorted(taken):
        item = {"type": kind, "text": text[start:end]}
        if item not in out:
            out.append(item)
    return out[:MAX_ENTITIES]


def ticket_record(text: str, intent: str) -> dict[str, Any]:
    return {"text": text, "labels": {"category": intent, "priority": PRIORITY_BY_INTENT[intent]},
            "entities": extract_entities(text)}


def write_ticket_dataset(out_dir: Path) -> dict[str, Path]:
    """train/dev/test.jsonl from BANKING77's splits, overwritten on every call."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split in BANKING77_SPLITS:
        path = out_dir / f"{split}.jsonl"
        lines = [json.dumps(ticket_record(r.text, r.label), ensure_ascii=False) for r in load_split(split)]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        paths[split] = path
    return paths


# Few-shot intents: every priority level and every entity type shown, and one with no entity.
_EXAMPLE_INTENTS = ("cash_withdrawal_not_recognised", "wrong_amount_of_cash_received", "pending_transfer",
                    "country_support", "visa_or_mastercard", "exchange_via_app", "activate_my_card")


def ticket_task_spec() -> dict[str, Any]:
    """The TaskSpec of TICKET_TASK_PATH, built from banking77.json's labels and the rules above."""
    from schemas.task import TaskSpec, default_task_path

    labels = json.loads(default_task_path().read_text(encoding="utf-8"))["fields"][0]["labels"]
    train = load_split("train")
    examples = []
    for intent in _EXAMPLE_INTENTS:
        # The train text showing the most entity types (the shortest on a tie); none for the last.
        rows = [ticket_record(r.text, intent) for r in train if r.label == intent]
        kinds = [len({e["type"] for e in r["entities"]}) for r in rows]
        if intent == _EXAMPLE_INTENTS[-1]:
            kinds = [-k for k in kinds]
        best = min(range(len(rows)), key=lambda i: (-kinds[i], len(rows[i]["text"]), i))
        examples.append(rows[best])
    spec = {
        "name": "banking77_tickets",
        "instructions": "You triage customer-support messages sent to a digital bank's support desk. "
                        "Pick the category that best describes what the customer wants, the priority "
                        "the desk should give the ticket, and copy the entities the message mentions.",
        "fields": [
            {"name": "category", "description": "The customer's intent (BANKING77 label set).", "labels": labels},
            {"name": "priority", "description": PRIORITY_RULE, "labels": list(PRIORITIES)},
            {"type": "entities", "name": "entities",
             "description": "Spans copied verbatim from the message, in order of appearance.",
             "entity_types": [
                 {"name": "amount", "description": "A sum of money in digits, with its currency symbol "
                                                   "if it has one (\"£20\", \"500£\", \"100\")."},
                 {"name": "currency", "description": "A currency code or word (\"GBP\", \"euros\", \"US dollars\"); "
                                                     "a symbol belongs to the amount instead."},
                 {"name": "country", "description": "A country or country group (\"Spain\", \"UK\", \"EU\") or its "
                                                    "demonym (\"Spanish\")."},
                 {"name": "card_brand", "description": "A card network (\"Visa\", \"Mastercard\", \"American "
                                                       "Express\"); not wallets such as Apple Pay."},
                 {"name": "date", "description": "A day or relative date (\"Monday\", \"3 March\", \"yesterday\", "
                                                 "\"2 days ago\", \"12/03/2020\")."},
             ],
             "max_entities": MAX_ENTITIES, "max_span_chars": 48},
        ],
        "examples": examples,
    }
    TaskSpec.model_validate(spec)  # fail here, not inside a serving process
    return spec


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--write-task"]
    if len(args) != 1:
        print("usage: python -m services.dev.ticket_dataset OUT_DIR [--write-task]", file=sys.stderr)
        return 2
    if "--write-task" in argv:
        TICKET_TASK_PATH.write_text(json.dumps(ticket_task_spec(), indent=1, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
        print(f"wrote {TICKET_TASK_PATH}")
    for split, path in write_ticket_dataset(Path(args[0])).items():
        rows = path.read_text(encoding="utf-8").splitlines()
        with_entities = sum(bool(json.loads(line)["entities"]) for line in rows)
        print(f"{split}: {len(rows)} tickets, {with_entities} with entities -> {path}")
    print("notice: category is BANKING77 gold; priority and entities are RULE-MADE "
          "(services/dev/ticket_dataset.py), not human labels.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
