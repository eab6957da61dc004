"""The stand-in's command line (`triage standin`, `python -m services.dev.standin`).

`--error-rate R` makes it a fallible teacher (services/dev/standin_errors.py): a confusable
wrong label on a seeded share R of tickets. The HTTP 500 fault (`Faults.error_rate`, its name in
the API and `/admin/faults`) is `--http-error-rate` here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Sequence

from services.dev.standin_faults import Faults

# Faults whose flag is not their field name: `--error-rate` is the teacher's label error rate.
_FLAGS = {"error_rate": "--http-error-rate", "label_error_rate": "--error-rate"}
_HELP = {"label_error_rate": "a fallible teacher: a confusable wrong label on a seeded share R of "
                             "tickets (per field; the same answer every time a text is asked)",
         "error_rate": "HTTP 500 on this share of requests"}


def parse_options(argv: Sequence[str] | None, *, model: str) -> tuple[str, int, list[str] | None, dict[str, Any]]:
    """(host, port, data files, GoldLabelStandin options) from the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m services.dev.standin",
        description="Gold-label teacher STAND-IN (OpenAI-compatible; answers dataset labels).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--data", action="append", metavar="FILE",
                        help="text<TAB>label TSV or JSONL {text, labels, entities} (repeatable); "
                             "default BANKING77 train+dev+test")
    parser.add_argument("--model", default=model)
    parser.add_argument("--api-key-env", metavar="VAR",
                        help="require `Authorization: Bearer $VAR` (the key is read from env)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds the faults' draws and which tickets --error-rate answers wrong")
    parser.add_argument("--hang-s", type=float, default=30.0)
    parser.add_argument("--ticket-entity-rules", action="store_true",
                        help="entities of texts not in the data from the example ticket task's "
                             "RULES (services/dev/ticket_dataset.py)")
    rates = [f.name for f in dataclasses.fields(Faults) if f.name != "script"]  # latency too
    for name in rates:
        parser.add_argument(_FLAGS.get(name, f"--{name.replace('_', '-')}"), dest=name, type=float,
                            default=0.0, help=_HELP.get(name))
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"environment variable {args.api_key_env} is empty")
    options: dict[str, Any] = dict(model=args.model, api_key=api_key, seed=args.seed, hang_s=args.hang_s,
                                   **{name: getattr(args, name) for name in rates})
    if args.ticket_entity_rules:
        from services.dev.ticket_dataset import extract_entities

        options["entity_rules"] = extract_entities
    return args.host, args.port, args.data, options
