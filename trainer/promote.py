"""Promotion gate: a pure decision over two evaluation reports.

The gate compares a candidate with the live adapter (the base model when none is live) on the
same held-out calibration set, using reports from `trainer.evaluate.report`:
- primary metric: coverage at the target error epsilon (share of tickets the student may
  answer while the accepted error stays <= epsilon with 95% confidence) = 1 - escalation
  rate, i.e. teacher cost saved. Promote when the candidate gains >= `margin`.
- an infeasible threshold (some field certifies nothing: the service escalates every ticket)
  is credited with no coverage, whatever its report counted (`credited_coverage`).
- tie (coverages within one ticket of each other, e.g. both 0 when neither can reach
  epsilon): promote when accuracy gains >= `margin`.
- otherwise reject, with the numbers in the reason. Reports from different data or epsilon
  are never compared.
- before any of that: a candidate the serving engine cannot load is rejected. Its LoRA rank
  (`adapter_rank` of adapter_config.json) must fit the service's `max_lora_rank` (the
  evaluation engine is sized to the candidate, so it would pass there and then fail to
  load in every replica).

Moving the registry pointer by hand: `triage status`, `triage promote ID --reason ...`,
`triage rollback --reason ...`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def adapter_rank(adapter_config: dict[str, Any]) -> int:
    """The largest LoRA rank in a PEFT adapter_config.json (`r`, or a bigger `rank_pattern` one)."""
    ranks = [int(adapter_config.get("r") or 0)]
    ranks += [int(r) for r in (adapter_config.get("rank_pattern") or {}).values()]
    return max(ranks)


def servable(adapter_config: dict[str, Any], max_lora_rank: int) -> Decision | None:
    """A rejection when the serving engine (vLLM `max_lora_rank`) cannot load the adapter."""
    rank = adapter_rank(adapter_config)
    if rank > max_lora_rank:
        return Decision(False, f"reject: LoRA rank {rank} > serving max_lora_rank {max_lora_rank}; "
                               "the service could not load it (retrain with a smaller --lora-r "
                               "or raise TRIAGE_MAX_LORA_RANK first)")
    return None


def credited_coverage(report: dict[str, Any]) -> float:
    """The coverage a report may claim: none when its threshold is infeasible (a field certifies
    nothing, so the service escalates every ticket, whatever share of the held-out rows the
    report's arithmetic counted as answered)."""
    feasible = (report.get("threshold") or {}).get("feasible", True)
    return report["coverage_at_epsilon"] if feasible else 0.0


def decide(candidate: dict[str, Any], live: dict[str, Any] | None, margin: float, *,
           adapter_config: dict[str, Any] | None = None,
           max_lora_rank: int | None = None) -> Decision:
    """Promote or reject `candidate` (its report; `adapter_config` its adapter_config.json)
    against `live` (None = nothing to compare with)."""
    if max_lora_rank is not None:
        if adapter_config is None:
            raise ValueError("max_lora_rank needs the candidate's adapter_config")
        refused = servable(adapter_config, max_lora_rank)
        if refused is not None:
            return refused
    if live is not None:
        if candidate["data"]["data_hash"] != live["data"]["data_hash"]:
            return Decision(False, "reports are on different held-out data; not comparable")
        if abs(candidate["epsilon"] - live["epsilon"]) > 1e-12:
            return Decision(False, "reports use different target errors; not comparable")
    who = ("no adapter live (everything escalates)" if live is None
           else "live" if live.get("adapter_id") else "base model")
    live_cov = credited_coverage(live) if live else 0.0
    live_acc = live["accuracy"] if live else 0.0
    cov, acc = credited_coverage(candidate), candidate["accuracy"]
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
