"""What a distil writes into an adapter's metadata: its certified threshold, the confidence
maps it was certified through, the engine configuration it was certified on, and the reports
behind it.

The engine record (services/student/calibration_record.py) is what lets the service refuse a
threshold certified on another dtype; the same cycle re-certifies the live adapter when it
was certified elsewhere and is not replaced, so a dtype change (a new machine, `dtype = auto`
picking bf16) costs one nightly cycle of escalations, never a wrong certificate. A kept
first adapter, certified on the whole slice (nothing was live to select against), is
re-certified the same way on the certification part (`certified_on_selection_rows`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from services.student.calibration_record import engine_record
from services.student.registry import AdapterRef, AdapterRegistry, read_meta, write_meta

REPORT_KEYS = ("data", "accuracy", "macro_f1", "ece", "ece_raw", "epsilon", "coverage_at_epsilon",
               "escalation_rate_at_epsilon", "entity_f1")


def with_certificate(meta: dict[str, Any], reports: dict[str, Any], engine: Any) -> dict[str, Any]:
    """`meta` with the threshold its certification report chose, the engine it was chosen on,
    and a summary of each report (calibration / certification / final)."""
    certification = reports["certification"]
    chosen = certification["threshold"]
    return {
        **meta,
        # the threshold holds for confidences mapped as they were when it was certified
        "threshold": {"value": chosen["threshold"], **chosen, "engine": engine_record(engine),
                      "confidence_map": certification.get("confidence_map") or {}},
        "eval": {name: {**{k: rep.get(k) for k in REPORT_KEYS},
                        "fields": {n: {k: v for k, v in f.items() if k != "reliability"}
                                   for n, f in rep["fields"].items()}}
                 for name, rep in reports.items()},
    }


def recertify(registry: AdapterRegistry, live: AdapterRef, reports: dict[str, Any], engine: Any,
              run_dir: Path) -> AdapterRef:
    """Store a new certificate for the live adapter (the same weights: `registry.add` replaces
    its metadata and logs a `meta` history line; running replicas swap thresholds at their next
    poll). Written through a copy in the run folder: the registry's folder is never edited."""
    copy = run_dir / "recertified" / live.adapter_id
    shutil.copytree(live.path, copy)
    write_meta(copy, with_certificate(read_meta(copy), reports, engine))
    return registry.add(copy)


def certified_on_selection_rows(live: AdapterRef) -> str | None:
    """Why `live`'s certificate rests on rows the gate now selects on (its certification report
    was on a whole slice: the first adapter's), or None. A certificate with no report (made by
    hand, or before reports were kept) is left alone: nothing says where it came from."""
    data = ((live.meta.get("eval") or {}).get("certification") or {}).get("data") or {}
    name = data.get("name")
    if name is None or name.endswith("-certification"):
        return None
    return f"adapter {live.adapter_id} was certified on the whole slice ({name}, {data.get('n')} rows)"
