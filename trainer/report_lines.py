"""One line per evaluated adapter: what `triage eval` and `triage distill` print."""

from __future__ import annotations


def summary_line(name: str, result: dict) -> str:
    c = result["calibration"]
    line = (f"{name}: {c['data']['name']} ({c['data']['n']} rows) acc {c['accuracy']:.4f} "
            f"macro-F1 {c['macro_f1']:.4f} ECE {c['ece']:.4f}")
    if "by_epsilon" in c:
        shares = "/".join(f"{c['by_epsilon'][str(e)]['coverage']:.0%}" for e in (0.01, 0.03, 0.05))
        line += f" | answered alone at 1/3/5% error: {shares}"
    per_field = c["threshold"].get("fields")
    if per_field:  # several fields: each its own accuracy and threshold
        line += " | " + ", ".join(
            f"{n} acc {c['fields'][n]['accuracy']:.3f}" + (f" F1 {c['fields'][n]['f1']:.3f}" if "f1" in c["fields"][n] else "")
            for n in per_field)
    t = result.get("certification", c)  # the threshold that is stored: certified where it was chosen
    where = f" certified on {t['data']['name']} ({t['data']['n']} rows)" if t is not c else ""
    shown = (" ".join(f"{n} {_shown(v)}" for n, v in t["threshold"]["fields"].items()) if per_field
             else _shown(t["threshold"]["threshold"]))
    line += (f" | eps {c['epsilon']:.0%}: threshold{'s' if per_field else ''} {shown}{where} "
             f"escalation {t['escalation_rate_at_epsilon']:.3f}{_ece(t) if t is not c else ''}")
    if "final" in result:
        f = result["final"]
        line += (f" || {f['data']['name']} acc {f['accuracy']:.4f} macro-F1 {f['macro_f1']:.4f} "
                 f"{_ece(f).strip()} escalation {f['escalation_rate_at_epsilon']:.3f} "
                 f"error of accepted {f['error_of_accepted_tickets']:.4f}")
        if f.get("entity_f1") is not None:
            line += f" entity F1 {f['entity_f1']:.3f}"
    return line


def _ece(rep: dict) -> str:
    """The published confidence's ECE, and the engine's score's where a map changed it."""
    raw = rep.get("ece_raw")
    mapped = rep.get("confidence_map") and raw is not None
    return f" ECE {rep['ece']:.4f}" + (f" (engine score {raw:.4f})" if mapped else "")


def _shown(threshold: float | None) -> str:
    return "none (escalate all)" if threshold is None else f"{threshold:.4f}"
