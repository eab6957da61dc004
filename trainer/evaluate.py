"""Held-out evaluation through the serving engine: the numbers the promotion gate trusts.

Adapters run through `services.student.engine.VllmClassifier`, the same vLLM code, prompts and
label-code restriction the service uses (`adapter=None` = the base model with instruct
prompts). One engine instance evaluates every adapter (`classify(..., adapter=ref)`), so
engine start-up (~45 s on CPU) is paid once.

Per adapter and held-out set: accuracy, macro-F1, expected calibration error (15 equal-width
bins), the accuracy-vs-coverage curve, and the escalation threshold: chosen on the
calibration set so that the error of accepted tickets is <= epsilon with 95% confidence
(trainer.calibration.choose_threshold: Clopper-Pearson, fixed-sequence), then applied
unchanged to the report set. JSON report + PNG plots (reliability diagram, accuracy-coverage).

    triage eval --adapter var/runs/b77 --calibration-tsv dev.tsv --report-tsv test.tsv --out var/eval/b77
    triage eval --adapter current --adapter base --calibration-tsv heldout.jsonl --out var/eval/live
Held-out files are TSV/JSONL with the task's labels (teacher-labelled traffic or a gold set):
--calibration-tsv (required: threshold and gate), --report-tsv (optional final report).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from schemas.task import TaskSpec
from services.student import confidence_map as confidence_maps
from trainer import calibration as cal
from schemas.training import DEFAULT_COLD_ROWS_UNTIL, DEFAULT_HELDOUT_FRACTION, content_hash
from trainer.dataset import (
    Row, data_hash, dedup, read_tsv, rows_from_log, split_gate, split_heldout, uniform_subsample, valid_rows,
)
from trainer.plots import plot
from trainer.predictions import PredictionCache
from trainer.report_lines import summary_line  # noqa: F401 (distill's and main's)
from trainer.scoring import accepted_tickets, score

EPSILONS = (0.01, 0.02, 0.03, 0.05, 0.10)


@dataclass(frozen=True)
class HeldOut:
    name: str
    path: str
    rows: list[Row]
    version: int | None = None  # training-log version the slice goes up to (None: a file)

    @property
    def digest(self) -> str:
        return data_hash(self.rows)

    @property
    def sources(self) -> dict[str, int]:
        return dict(Counter(r.source or "file" for r in self.rows))

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "n": len(self.rows), "data_hash": self.digest,
                "version": self.version, "sources": self.sources}

    @classmethod
    def from_tsv(cls, name: str, path: str | Path, task: TaskSpec, limit: int = 0) -> HeldOut:
        rows = read_tsv(path, task)
        return cls(name, str(path), rows[:limit] if limit else rows)

    @classmethod
    def from_log(cls, path: str | Path, task: TaskSpec, *, version: int | None = None,
                 fraction: float = DEFAULT_HELDOUT_FRACTION, limit: int = 0,
                 cold_rows_until: int = DEFAULT_COLD_ROWS_UNTIL) -> HeldOut:
        """The training log's held-out slice (`schemas.training.is_heldout`) up to `version`:
        teacher labels only, no gold needed. `limit`: N rows chosen by content hash (uniform;
        the newest N would over-weight the last days). Rows whose labels the task no longer
        has are left out."""
        rows, version = rows_from_log(path, version)
        _, heldout = split_heldout(dedup(rows), fraction, cold_rows_until)  # the trainer's split
        return cls("heldout", str(path), uniform_subsample(valid_rows(heldout, task), limit), version)

    def split_gate(self, selecting: bool = True) -> tuple[HeldOut, HeldOut]:
        """(selection, certification) parts, disjoint by content hash (`dataset.split_gate`).
        `selecting=False` (no adapter live: nothing to choose between, the candidate is gated
        against "escalate everything"): the whole slice certifies, as (self, self)."""
        if not selecting:
            return self, self
        select, certify = split_gate(self.rows)
        return (HeldOut(f"{self.name}-selection", self.path, select, self.version),
                HeldOut(f"{self.name}-certification", self.path, certify, self.version))


def min_heldout(epsilon: float, delta: float, fields: int = 1, share: float = 1.0) -> int:
    """Rows below which `calibration.choose_threshold` cannot certify epsilon at all (its walk
    starts where three errors still pass; with k fields each is tested at delta / k), when
    `share` of them certify (distill: `CERTIFY_SHARE`, about: the split is by content hash):
    distilling with fewer trains a candidate nobody can gate, so distill refuses first."""
    return math.ceil(cal.walk_start(epsilon, delta / max(1, fields)) / share)


def served_threshold(rep: dict[str, Any]) -> float | dict[str, float]:
    """A report's threshold as the service applies it: one per field, or one; trust-nothing
    (stored as null) read back as `calibration.ESCALATE_ALL`."""
    stored = rep["threshold"]
    if isinstance(stored.get("fields"), dict):
        return {n: cal.threshold_from_json(t) for n, t in stored["fields"].items()}
    return cal.threshold_from_json(stored["threshold"])


def served_maps(rep: dict[str, Any]) -> dict[str, Any]:
    """The confidence maps a report's confidences went through: they travel with its threshold."""
    return confidence_maps.from_json(rep.get("confidence_map"))


def _field_choices(fields: dict[str, dict], epsilon: float, delta: float) -> dict[str, cal.ThresholdChoice]:
    """A threshold per field at target error epsilon; with k fields each bound is tested at
    delta / k (Bonferroni), so all k guarantees hold together with probability >= 1 - delta."""
    labelled = {name: f for name, f in fields.items() if f["n"]}
    share = delta / max(1, len(labelled))
    return {name: cal.choose_threshold(f["confidence"], f["correct"], epsilon, share)
            for name, f in labelled.items()}


def _tickets_at(s: dict, thresholds: dict[str, float]) -> dict[str, Any]:
    """Share of tickets answered by the student alone under per-field thresholds, and the
    error of those tickets (any field wrong)."""
    ok = s["correct"]
    accepted = accepted_tickets(s["fields"], thresholds, len(ok))
    n_acc = sum(accepted)
    wrong = sum(1 for a, good in zip(accepted, ok) if a and not good)
    return {"coverage": n_acc / len(ok) if ok else 0.0, "accepted": n_acc,
            "error_accepted": wrong / n_acc if n_acc else 0.0}


def report(
    task: TaskSpec, data: HeldOut, predictions: Sequence[Any], *, adapter_id: str | None,
    epsilon: float, delta: float, threshold: float | dict[str, float] | None = None, seconds: float = 0.0,
    confidence_map: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics for one adapter on one set. threshold=None: choose one per field here
    (calibration set); given: apply it (report set) and measure what it does there.

    A one-field task reports exactly as before per-field thresholds: the field's threshold is
    the ticket's. With several fields the ticket is answered by the student alone when every
    field clears its own threshold (`coverage_at_epsilon`, what the gate compares); each field
    the student publishes has error <= epsilon (the per-field bound).

    `confidence_map` (field -> map, services/student/confidence_map.py) goes over every
    confidence before anything is measured or chosen, as the service applies it; None on a
    calibration set (no threshold given): fitted here on this set's rows."""
    raw = score(task, data.rows, predictions)
    if confidence_map is None and threshold is None:
        confidence_map = confidence_maps.fit_fields(raw["fields"])
    s = score(task, data.rows, predictions, confidence_map) if confidence_map else raw
    conf, ok = s["confidence"], s["correct"]
    rel = cal.reliability(conf, ok, bins=15)
    fields: dict[str, Any] = {}
    choices = _field_choices(s["fields"], epsilon, delta) if threshold is None else {}
    used: dict[str, float] = {}  # per field: the threshold chosen here, or the one applied
    for name, f in s["fields"].items():
        out_f = {k: v for k, v in f.items() if k not in ("rows", "confidence", "correct")}
        if f["n"]:
            f_rel = cal.reliability(f["confidence"], f["correct"], bins=15)
            out_f.update(ece=f_rel["ece"], reliability=f_rel["bins"])
            if threshold is None:
                used[name] = choices[name].threshold
                out_f["threshold"] = choices[name].to_dict()
            else:  # a field the threshold does not name was never calibrated: trusted for nothing
                given = threshold.get(name) if isinstance(threshold, dict) else threshold
                used[name] = cal.threshold_from_json(given)
                out_f["threshold"] = {**cal.apply_threshold(f["confidence"], f["correct"], used[name]),
                                      "source": "calibration set"}
        fields[name] = out_f
    categorical = [f["macro_f1"] for f in fields.values() if "macro_f1" in f]
    out: dict[str, Any] = {
        "adapter_id": adapter_id,
        "data": data.describe(),
        "accuracy": sum(ok) / len(ok),
        "macro_f1": sum(categorical) / len(categorical) if categorical else 0.0,
        "ece": rel["ece"],
        "ece_raw": cal.expected_calibration_error(raw["confidence"], raw["correct"]),
        "confidence_map": confidence_maps.to_json(confidence_map or {}),
        "fields": fields,
        "epsilon": epsilon,
        "tickets_per_s": len(ok) / seconds if seconds else None,
        "reliability": rel["bins"],
        "coverage_curve": cal.coverage_curve(conf, ok),
    }
    if task.entity_field is not None:
        out["entity_f1"] = fields[task.entity_field.name].get("f1")
    tickets = _tickets_at(s, used)
    if len(task.fields) == 1:
        only = next(iter(fields.values()))
        out["threshold"] = only["threshold"]
    else:
        out["threshold"] = {"threshold": cal.threshold_to_json(min(used.values(), default=cal.ESCALATE_ALL)),
                            "fields": {n: cal.threshold_to_json(t) for n, t in used.items()},
                            "epsilon": epsilon, "delta": delta, "per_field_delta": delta / max(1, len(used)),
                            "feasible": all(f["threshold"].get("feasible", True) for f in fields.values() if "threshold" in f),
                            "method": "a threshold per field (clopper-pearson fixed-sequence at delta/k)",
                            **tickets}
    out["coverage_at_epsilon"] = tickets["coverage"]
    out["escalation_rate_at_epsilon"] = 1 - tickets["coverage"]
    out["error_of_accepted_tickets"] = tickets["error_accepted"]
    if threshold is None:
        if len(task.fields) == 1:
            out["by_epsilon"] = {str(e): cal.choose_threshold(conf, ok, e, delta).to_dict() for e in EPSILONS}
        else:
            out["by_epsilon"] = {}
            for e in EPSILONS:
                chosen = {n: c.threshold for n, c in _field_choices(s["fields"], e, delta).items()}
                out["by_epsilon"][str(e)] = {**_tickets_at(s, chosen),
                                             "fields": {n: cal.threshold_to_json(t) for n, t in chosen.items()}}
    return out


async def evaluate(
    engine_config: Any, task: TaskSpec, adapters: dict[str, Any], calibration: HeldOut,
    final: HeldOut | None = None, *, epsilon: float = 0.03, delta: float = 0.05,
    out_dir: str | Path | None = None, classifier: Any = None, final_names: set[str] | None = None,
    chunk: int = 256, cache_dir: str | Path | None = None, certification: HeldOut | None = None,
    certify_names: set[str] | None = None,
) -> dict[str, dict]:
    """{name: {"calibration": report, "final": report}} for each adapter (AdapterRef or None).

    One engine for all adapters; pass `classifier` to reuse a running one (tests, service).
    `final_names`: adapters that also get the final report (default: all). `cache_dir`: keep
    each adapter's predictions per text (`PredictionCache`), so the next cycle scores the live
    adapter only on held-out rows it has not seen. `certification` (distill: a part of the slice
    disjoint from `calibration`): the adapters of `certify_names` (default: all) get their
    threshold chosen there too ("certification"), and the final report applies that one."""
    from services.student.shared_engine import started_classifier

    async def predict(clf, data: HeldOut, ref: Any, name: str) -> list:
        import sys

        from tqdm.auto import tqdm

        engine = getattr(clf, "config", None) or engine_config  # what the answers come from
        cache = PredictionCache(cache_dir, ref, task, engine) if cache_dir is not None else None
        known = cache.load() if cache is not None else {}
        keys = [content_hash(r.text) for r in data.rows]
        todo = [i for i, key in enumerate(keys) if key not in known]
        texts, fresh = [data.rows[i].text for i in todo], []
        with tqdm(total=len(texts), desc=f"{name} on {data.name}", unit="ticket",
                  disable=not sys.stderr.isatty(), leave=False) as bar:
            for start in range(0, len(texts), chunk):  # bounded batches: memory + progress
                fresh += await clf.classify(texts[start : start + chunk], adapter=ref)
                bar.update(len(texts[start : start + chunk]))
        if cache is not None and fresh:
            cache.add({keys[i]: p for i, p in zip(todo, fresh)})
        by_index = dict(zip(todo, fresh))
        return [by_index[i] if i in by_index else known[key] for i, key in enumerate(keys)]

    async def run(clf) -> dict[str, dict]:
        results: dict[str, dict] = {}
        for name, ref in adapters.items():
            adapter_id = ref.adapter_id if ref is not None else None
            started = time.perf_counter()
            preds = await predict(clf, calibration, ref, name)
            rep = report(task, calibration, preds, adapter_id=adapter_id, epsilon=epsilon,
                         delta=delta, seconds=time.perf_counter() - started)
            results[name] = {"calibration": rep}
            if certification is not None and (certify_names is None or name in certify_names):
                # the map fitted on the selection part; the threshold certified on mapped scores
                started = time.perf_counter()
                preds = await predict(clf, certification, ref, name)
                rep = results[name]["certification"] = report(
                    task, certification, preds, adapter_id=adapter_id, epsilon=epsilon, delta=delta,
                    seconds=time.perf_counter() - started, confidence_map=served_maps(rep))
            if final is not None and (final_names is None or name in final_names):
                started = time.perf_counter()
                preds = await predict(clf, final, ref, name)
                results[name]["final"] = report(
                    task, final, preds, adapter_id=adapter_id, epsilon=epsilon, delta=delta,
                    threshold=served_threshold(rep), seconds=time.perf_counter() - started,
                    confidence_map=served_maps(rep))
        return results

    if classifier is not None:
        results = await run(classifier)
    else:
        async with started_classifier(engine_config, task, adapter=None) as clf:
            results = await run(clf)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plots = plot({n: r["calibration"] for n, r in results.items()}, out, calibration.name)
        finals = {n: r["final"] for n, r in results.items() if "final" in r}
        if finals:
            plots += plot(finals, out, final.name)
        (out / "report.json").write_text(json.dumps({"adapters": results, "plots": plots}, indent=1))
    return results


def fit_lora_rank(engine_config: Any, adapters: dict[str, Any]) -> Any:
    """The engine config with max_lora_rank cut to what these adapters need: vLLM's CPU LoRA
    kernels gather a [rank x out] matrix per token, so rank 32 slots for r=16 adapters halve
    throughput (measured: 1.5 vs 3 tickets/s). Numerics are unchanged (zero padding)."""
    from dataclasses import replace

    ranks = [json.loads((Path(a.path) / "adapter_config.json").read_text()).get("r", 0)
             for a in adapters.values() if a is not None]
    need = next((r for r in (8, 16, 32, 64, 128, 256) if r >= max(ranks, default=8)), None)
    return replace(engine_config, max_lora_rank=need) if need else engine_config


def resolve_adapter(spec: str, registry: Any) -> Any:
    """'base' -> None; 'current' -> the registry's live adapter; an id; or a folder."""
    from services.student.registry import AdapterRef

    if spec == "base":
        return None
    if spec == "current":
        return registry.current()
    if Path(spec).is_dir():
        return AdapterRef.from_dir(spec)
    return registry.get(spec)


def calibration_set(settings: Any, task: TaskSpec, path: str | None, limit: int = 0) -> HeldOut:
    """An explicit file (flag, then TRIAGE_CALIBRATION_PATH), else the training log's held-out
    slice: teacher labels, the same rows distill calibrates and gates on."""
    path = path or settings.calibration_path
    if path:
        return HeldOut.from_tsv("calibration", path, task, limit)
    return HeldOut.from_log(settings.training_log_path, task, fraction=settings.heldout_fraction,
                            limit=limit, cold_rows_until=settings.heldout_cold_rows_until)


def main(argv: Sequence[str] | None = None) -> None:
    from services.student.engine import EngineConfig
    from services.student.registry import AdapterRegistry
    from services.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", default=[], help="folder | registry id | current | base (repeatable)")
    parser.add_argument("--calibration-tsv", default=None, help="threshold/gate set (default "
                        "TRIAGE_CALIBRATION_PATH, else the training log's held-out slice)")
    parser.add_argument("--report-tsv", default=None, help="final report set (default "
                        "TRIAGE_REPORT_PATH; 'none' or empty skips it)")
    parser.add_argument("--limit", type=int, default=0, help="N rows of each set (0 = all; "
                        "the log's held-out slice: N chosen by content hash)")
    parser.add_argument("--epsilon", type=float, default=0.03)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--out", default="var/eval")
    opts = parser.parse_args(argv)
    settings = Settings()
    task = TaskSpec.from_file(settings.task_path)
    registry = AdapterRegistry(settings.registry_dir)
    adapters = {spec if not Path(spec).is_dir() else Path(spec).name: resolve_adapter(spec, registry)
                for spec in (opts.adapter or ["current"])}
    calib = calibration_set(settings, task, opts.calibration_tsv, opts.limit)
    if not calib.rows:
        parser.error(f"no held-out rows in {calib.path}: label tickets with `triage bootstrap` "
                     "(or pass --calibration-tsv)")
    report_path = settings.report_path if opts.report_tsv is None else opts.report_tsv
    final = None if report_path in ("", "none") else HeldOut.from_tsv("report", report_path, task, opts.limit)
    engine = fit_lora_rank(EngineConfig.from_settings(settings), adapters)
    results = asyncio.run(evaluate(engine, task, adapters, calib, final,
                                   epsilon=opts.epsilon, delta=opts.delta, out_dir=opts.out))
    for name, result in results.items():
        print(summary_line(name, result))
    print(f"report: {Path(opts.out) / 'report.json'}")


if __name__ == "__main__":
    main()
