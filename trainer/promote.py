"""Promotion gate (a pure decision) and a small CLI over the adapter registry.

The gate compares a candidate with the live adapter (the base model when none is live) on the
same held-out calibration set, using reports from `trainer.evaluate.report`:
- primary metric: coverage at the target error epsilon (share of tickets the student may
  answer while the accepted error stays <= epsilon with 95% confidence) = 1 - escalation
  rate, i.e. teacher cost saved. Promote when the candidate gains >= `margin`.
- tie (coverages within one ticket of each other, e.g. both 0 when neither can reach
  epsilon): promote when accuracy gains >= `margin`.
- otherwise reject, with the numbers in the reason. Reports from different data or epsilon
  are never compared.

    python -m trainer.promote status
    python -m trainer.promote rollback --reason "bad labels in run 12"
    python -m trainer.promote promote a-0123456789abcdef --reason "manual"
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any, Sequence


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(candidate: dict[str, Any], live: dict[str, Any] | None, margin: float) -> Decision:
    if live is not None:
        if candidate["data"]["data_hash"] != live["data"]["data_hash"]:
            return Decision(False, "reports are on different held-out data; not comparable")
        if abs(candidate["epsilon"] - live["epsilon"]) > 1e-12:
            return Decision(False, "reports use different target errors; not comparable")
    who = "live" if live is None or live.get("adapter_id") else "base model"
    live_cov = live["coverage_at_epsilon"] if live else 0.0
    live_acc = live["accuracy"] if live else 0.0
    cov, acc = candidate["coverage_at_epsilon"], candidate["accuracy"]
    eps = candidate["epsilon"]
    d_cov, d_acc = cov - live_cov, acc - live_acc
    numbers = (f"coverage at {eps:.0%} error {cov:.3f} vs {who} {live_cov:.3f} ({d_cov:+.3f}); "
               f"accuracy {acc:.3f} vs {live_acc:.3f} ({d_acc:+.3f}); margin {margin}")
    if d_cov > 0 and d_cov >= margin:
        return Decision(True, f"promote: coverage gain >= margin; {numbers}")
    if abs(d_cov) <= 1.0 / max(1, candidate["data"]["n"]):
        if d_acc > 0 and d_acc >= margin:
            return Decision(True, f"promote: coverage tied, accuracy gain >= margin; {numbers}")
        return Decision(False, f"reject: coverage tied and accuracy gain < margin; {numbers}")
    if d_cov < 0:
        return Decision(False, f"reject: lower coverage than {who}; {numbers}")
    return Decision(False, f"reject: coverage gain < margin; {numbers}")


def main(argv: Sequence[str] | None = None) -> None:
    from services.registry import AdapterRegistry
    from services.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="", help="registry folder (default: TRIAGE_REGISTRY_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="current adapter, its threshold, and the history")
    rb = sub.add_parser("rollback", help="back to the previously promoted adapter (or the base model)")
    rb.add_argument("--reason", default="manual rollback")
    pr = sub.add_parser("promote", help="make an adapter already in the registry current")
    pr.add_argument("adapter_id")
    pr.add_argument("--reason", default="manual promotion")
    opts = parser.parse_args(argv)
    registry = AdapterRegistry(opts.registry or Settings().registry_dir)
    if opts.command == "rollback":
        ref = registry.rollback(opts.reason)
        print(f"current: {ref.adapter_id if ref else 'base model'}")
    elif opts.command == "promote":
        print(f"current: {registry.promote(opts.adapter_id, opts.reason).adapter_id}")
    else:
        ref = registry.current()
        print(json.dumps({
            "registry": str(registry.root),
            "current": ref.adapter_id if ref else None,
            "threshold": ref.threshold if ref else None,
            "adapters": [a.adapter_id for a in registry.list()],
            "history": registry.history()[-10:],
        }, indent=1))


if __name__ == "__main__":
    main()
