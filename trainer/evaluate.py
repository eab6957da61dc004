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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from schemas.task import TaskSpec
from trainer import calibration as cal
from trainer.dataset import Row, data_hash, read_tsv

EPSILONS = (0.01, 0.02, 0.03, 0.05, 0.10)


@dataclass(frozen=True)
class HeldOut:
    name: str
    path: str
    rows: list[Row]

    @property
    def digest(self) -> str:
        return data_hash(self.rows)

    @classmethod
    def from_tsv(cls, name: str, path: str | Path, task: TaskSpec, limit: int = 0) -> HeldOut:
        rows = read_tsv(path, task)
        return cls(name, str(path), rows[:limit] if limit else rows)


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
        "data": {"name": data.name, "path": data.path, "n": len(data.rows), "data_hash": data.digest},
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
    chunk: int = 256,
) -> dict[str, dict]:
    """{name: {"calibration": report, "final": report}} for each adapter (AdapterRef or None).

    One engine for all adapters; pass `classifier` to reuse a running one (tests, service).
    `final_names`: adapters that also get the final report (default: all)."""
    from services.student.engine import VllmClassifier

    async def predict(clf, data: HeldOut, ref: Any, name: str) -> list:
        from tqdm.auto import tqdm

        texts, preds = [r.text for r in data.rows], []
        with tqdm(total=len(texts), desc=f"{name} on {data.name}", unit="ticket") as bar:
            for start in range(0, len(texts), chunk):  # bounded batches: memory + progress
                preds += await clf.classify(texts[start : start + chunk], adapter=ref)
                bar.update(len(texts[start : start + chunk]))
        return preds

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
    line = (f"{name}: {c['data']['name']} acc {c['accuracy']:.4f} macro-F1 {c['macro_f1']:.4f} "
            f"ECE {c['ece']:.4f} | eps {c['epsilon']:.0%}: threshold {c['threshold']['threshold']:.4f} "
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


def main(argv: Sequence[str] | None = None) -> None:
    from services.student.engine import EngineConfig
    from services.student.registry import AdapterRegistry
    from services.settings import Settings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", action="append", default=[], help="folder | registry id | current | base (repeatable)")
    parser.add_argument("--calibration-tsv", default=None, help="threshold/gate set "
                        "(default TRIAGE_CALIBRATION_PATH)")
    parser.add_argument("--report-tsv", default=None, help="final report set (default "
                        "TRIAGE_REPORT_PATH; 'none' or empty skips it)")
    parser.add_argument("--limit", type=int, default=0, help="first N rows of each set (0 = all)")
    parser.add_argument("--epsilon", type=float, default=0.03)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--out", default="var/eval")
    opts = parser.parse_args(argv)
    settings = Settings()
    task = TaskSpec.from_file(settings.task_path)
    registry = AdapterRegistry(settings.registry_dir)
    adapters = {spec if not Path(spec).is_dir() else Path(spec).name: resolve_adapter(spec, registry)
                for spec in (opts.adapter or ["current"])}
    calibration_path = opts.calibration_tsv or settings.calibration_path
    if not calibration_path:
        parser.error("no held-out data: pass --calibration-tsv or set TRIAGE_CALIBRATION_PATH")
    report_path = settings.report_path if opts.report_tsv is None else opts.report_tsv
    calib = HeldOut.from_tsv("calibration", calibration_path, task, opts.limit)
    final = None if report_path in ("", "none") else HeldOut.from_tsv("report", report_path, task, opts.limit)
    engine = fit_lora_rank(EngineConfig.from_settings(settings), adapters)
    results = asyncio.run(evaluate(engine, task, adapters, calib, final,
                                   epsilon=opts.epsilon, delta=opts.delta, out_dir=opts.out))
    for name, result in results.items():
        print(summary_line(name, result))
    print(f"report: {Path(opts.out) / 'report.json'}")


if __name__ == "__main__":
    main()
