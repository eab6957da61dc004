"""The stand-in's faults (services/dev/standin.py): what each request may suffer, drawn per
request, and the fallible teacher's rate (a property of the teacher, applied per text by
services/dev/standin_errors.py, never drawn). Changeable at run time: `set_faults(...)` or
`POST /admin/faults` with JSON; `script` forces the next requests' outcomes."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

OUTCOMES = ("ok", "error", "rate_limit", "timeout", "noise", "invalid", "bad_entity_type",
            "bad_span", "malformed")


@dataclasses.dataclass
class Faults:
    latency_ms: float = 0.0
    error_rate: float = 0.0  # HTTP 500 (`--http-error-rate` on the command line)
    rate_limit_rate: float = 0.0
    timeout_rate: float = 0.0
    noise_rate: float = 0.0
    invalid_rate: float = 0.0
    bad_entity_type_rate: float = 0.0
    bad_span_rate: float = 0.0
    malformed_rate: float = 0.0
    label_error_rate: float = 0.0  # a fallible teacher: confusable wrong labels (`--error-rate`)
    script: list[str] = dataclasses.field(default_factory=list)

    def update(self, **changes: Any) -> Faults:
        """Set some faults; ValueError for an unknown one or a rate outside [0, 1]."""
        for name, value in changes.items():
            if name not in {f.name for f in dataclasses.fields(Faults)}:
                raise ValueError(f"unknown fault {name!r}")
            if name == "script":
                bad = [o for o in value if o not in OUTCOMES]
                if bad:
                    raise ValueError(f"unknown outcomes {bad}; expected {OUTCOMES}")
                value = list(value)
            else:
                value = float(value)
                if value < 0 or (name != "latency_ms" and value > 1):
                    raise ValueError(f"{name} out of range")
            setattr(self, name, value)
        return self

    def draw(self, rng: random.Random) -> str:
        """One request's outcome: the script's next, else two draws: the transport's faults,
        then the answer's (a fault's rate is its share)."""
        if self.script:
            return self.script.pop(0)
        for group in ((("timeout", self.timeout_rate), ("error", self.error_rate),
                       ("rate_limit", self.rate_limit_rate)),
                      (("invalid", self.invalid_rate), ("noise", self.noise_rate),
                       ("bad_entity_type", self.bad_entity_type_rate),
                       ("bad_span", self.bad_span_rate), ("malformed", self.malformed_rate))):
            r = rng.random()
            for outcome, rate in group:
                if r < rate:
                    return outcome
                r -= rate
        return "ok"
