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
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from schemas.task import TaskSpec
from trainer import calibration as cal
from schemas.training import DEFAULT_HELDOUT_FRACTION, content_hash
from trainer.dataset import Row, data_hash, dedup, read_tsv, rows_from_log, split_heldout, valid_rows

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
                 fraction: float = DEFAULT_HELDOUT_FRACTION, limit: int = 0) -> HeldOut:
        """The training log's held-out slice (`schemas.training.is_heldout`) up to `version`:
        teacher labels only, no gold needed. `limit`: the newest N rows (closest to live
        traffic). Rows whose labels the task no longer has are left out."""
        rows, version = rows_from_log(path, version)
        _, heldout = split_heldout(valid_rows(dedup(rows), task), fraction)
        return cls("heldout", str(path), heldout[-limit:] if limit else heldout, version)


@dataclass(frozen=True)
class CachedPrediction:
    """What scoring needs of a StudentPrediction (labels + confidence), or a rejection."""

    fields: dict[str, Any] | None

    @property
    def confidence(self) -> float:
        return min(f.confidence for f in self.fields.values()) if self.fields else 0.0


class PredictionCache:
    """An adapter's predictions per text (content hash), in one JSONL file per (adapter, task).

    An adapter id is the hash of its weights and the task fixes prompts and codes, so the same
    text gets the same answer (up to float noise from batching): re-scoring the live adapter on
    yesterday's held-out rows every night would be wasted engine time. Rejections are not kept.
    """

    def __init__(self, folder: str | Path, adapter: Any, task: TaskSpec) -> None:
        import hashlib

        task_key = hashlib.sha256(task.model_dump_json().encode()).hexdigest()[:12]
        who = adapter.adapter_id if adapter is not None else "base"
        self.path = Path(folder) / f"{who}-{task_key}.jsonl"

    def load(self) -> dict[str, CachedPrediction]:
        from schemas.classification import FieldPrediction

        out: dict[str, CachedPrediction] = {}
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    out[row["h"]] = CachedPrediction({n: FieldPrediction(label=f[0], confidence=f[1])
                                                      for n, f in row["f"].items()})
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line after a crash: recompute that text
        return out

    def add(self, predictions: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, p in predictions.items():
                if hasattr(p, "fields"):
                    fields = {n: [fp.label, fp.confidence] for n, fp in p.fields.items()}
                    f.write(json.dumps({"h": key, "f": fields}) + "\n")


def min_heldout(epsilon: float, delta: float) -> int:
    """Rows below which `calibration.choose_threshold` cannot certify epsilon at all (its walk
    starts where one error still passes): distilling with fewer trains a candidate nobody can
    gate, so distill refuses before training."""
    return cal.walk_start(epsilon, delta)


def score(task: TaskSpec, rows: Sequence[Row], predictions: Sequence[Any]) -> dict[str, Any]:
    """Per-ticket confidence (min over fields, as the service escalates) and correctness.
    A ticket the engine rejected (no `fields`) counts as wrong with confidence 0: the service
    would dead-letter it, the student never answers it."""
    answered = [hasattr(p, "fields") for p in predictions]
    confidence = [p.confidence if ok else 0.0 for p, ok in zip(predictions, answered)]
    correct = [ok and all(p.fields[f.name].label == r.labels[f.name] for f in task.fields)
               for r, p, ok in zip(rows, predictions, answered)]
    fields = {}
    for f in task.fields:
        truth = [r.labels[f.name] for r in rows]
        pred = [p.fields[f.name].label if ok else "<rejected>" for p, ok in zip(predictions, answered)]
        fields[f.name] = {"accuracy": sum(t == q for t, q in zip(truth, pred)) / len(rows),
                          "macro_f1": cal.macro_f1(truth, pred)}
    return {"confidence": confidence, "correct": correct, "fields": fields,
            "rejected": len(answered) - sum(answered)}


def report(
    task: TaskSpec, data: HeldOut, predictions: Sequence[Any], *, adapter_id: str | None,
    epsilon: float, delta: float, threshold: float | None = None, seconds: float = 0.0,
) -> dict[str, Any]:
    """Metrics for one adapter on one set. threshold=None: choose it here (calibration set);
    a float: apply it (report set) and measure what it does there."""
    s = score(task, data.rows, predictions)
    conf, ok = s["confidence"], s["correct"]
    rel = cal.reliability(conf, ok, bins=15)
    out: dict[str, Any] = {
        "adapter_id": adapter_id,
        "data": data.describe(),
        "accuracy": sum(ok) / len(ok),
        "macro_f1": sum(f["macro_f1"] for f in s["fields"].values()) / len(s["fields"]),
        "ece": rel["ece"],
        "fields": s["fields"],
        "epsilon": epsilon,
        "tickets_per_s": len(ok) / seconds if seconds else None,
        "reliability": rel["bins"],
        "coverage_curve": cal.coverage_curve(conf, ok),
    }
    if threshold is None:
        choice = cal.choose_threshold(conf, ok, epsilon, delta)
        out["threshold"] = choice.to_dict()
        out["coverage_at_epsilon"] = choice.coverage
        out["escalation_rate_at_epsilon"] = choice.escalation_rate
        out["by_epsilon"] = {str(e): cal.choose_threshold(conf, ok, e, delta).to_dict() for e in EPSILONS}
    else:
        applied = cal.apply_threshold(conf, ok, threshold)
        out["threshold"] = {**applied, "source": "calibration set"}
        out["coverage_at_epsilon"] = applied["coverage"]
        out["escalation_rate_at_epsilon"] = applied["escalation_rate"]
    return out


def plot(reports: dict[str, dict], out_dir: Path, tag: str) -> list[str]:
    """Reliability diagram per adapter and one accuracy-coverage plot for all of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rep in reports.items():
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        bins = [b for b in rep["reliability"] if b["count"]]
        ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins],
               width=1 / 15, edgecolor="black", alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
               title=f"{name} on {rep['data']['name']} (ECE {rep['ece']:.3f})")
        ax.legend(loc="upper left", fontsize=8)
        path = out_dir / f"{tag}-{name}-reliability.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(str(path))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, rep in reports.items():
        curve = rep["coverage_curve"]
        ax.plot(curve["coverage"], curve["accuracy"], label=f"{name} (acc {rep['accuracy']:.3f})")
        ax.plot([rep["coverage_at_epsilon"]], [1 - rep["epsilon"]], "o")
    eps = next(iter(reports.values()))["epsilon"]
    ax.axhline(1 - eps, color="grey", ls=":", lw=1, label=f"target error {eps:.0%}")
    ax.set(xlabel="coverage (share answered by the student)", ylabel="accuracy of answered",
           xlim=(0, 1), ylim=(0, 1.01), title=f"accuracy vs coverage ({tag})")
    ax.legend(fontsize=8)
    path = out_dir / f"{tag}-coverage.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return paths + [str(path)]


async def evaluate(
    engine_config: Any, task: TaskSpec, adapters: dict[str, Any], calibration: HeldOut,
    final: HeldOut | None = None, *, epsilon: float = 0.03, delta: float = 0.05,
    out_dir: str | Path | None = None, classifier: Any = None, final_names: set[str] | None = None,
    chunk: int = 256, cache_dir: str | Path | None = None,
) -> dict[str, dict]:
    """{name: {"calibration": report, "final": report}} for each adapter (AdapterRef or None).

    One engine for all adapters; pass `classifier` to reuse a running one (tests, service).
    `final_names`: adapters that also get the final report (default: all). `cache_dir`: keep
    each adapter's predictions per text (`PredictionCache`), so the next cycle scores the live
    adapter only on held-out rows it has not seen."""
    from services.student.engine import VllmClassifier

    async def predict(clf, data: HeldOut, ref: Any, name: str) -> list:
        import sys

        from tqdm.auto import tqdm

        cache = PredictionCache(cache_dir, ref, task) if cache_dir is not None else None
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
            if final is not None and (final_names is None or name in final_names):
                started = time.perf_counter()
                preds = await predict(clf, final, ref, name)
                results[name]["final"] = report(
                    task, final, preds, adapter_id=adapter_id, epsilon=epsilon, delta=delta,
                    threshold=rep["threshold"]["threshold"], seconds=time.perf_counter() - started)
        return results

    if classifier is not None:
        results = await run(classifier)
    else:
        async with VllmClassifier.started(engine_config, task, adapter=None) as clf:
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


def summary_line(name: str, result: dict) -> str:
    c = result["calibration"]
    line = (f"{name}: {c['data']['name']} ({c['data']['n']} rows) acc {c['accuracy']:.4f} "
            f"macro-F1 {c['macro_f1']:.4f} ECE {c['ece']:.4f}")
    if "by_epsilon" in c:
        shares = "/".join(f"{c['by_epsilon'][str(e)]['coverage']:.0%}" for e in (0.01, 0.03, 0.05))
        line += f" | answered alone at 1/3/5% error: {shares}"
    line += (f" | eps {c['epsilon']:.0%}: threshold {c['threshold']['threshold']:.4f} "
             f"escalation {c['escalation_rate_at_epsilon']:.3f}")
    if "final" in result:
        f = result["final"]
        line += (f" || {f['data']['name']} acc {f['accuracy']:.4f} macro-F1 {f['macro_f1']:.4f} "
                 f"ECE {f['ece']:.4f} escalation {f['escalation_rate_at_epsilon']:.3f} "
                 f"error of accepted {f['threshold']['error_accepted']:.4f}")
    return line


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
                            limit=limit)


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
                        "the log's held-out slice: the newest N)")
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
