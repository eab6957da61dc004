"""One re-distillation cycle: training log -> LoRA -> held-out eval -> gate -> registry.

    HF_HUB_OFFLINE=1 python -m trainer.distill --max-minutes 28
    HF_HUB_OFFLINE=1 python -m trainer.distill --help

1. pin the training log's current version (rows appended meanwhile wait for the next cycle)
   and take its held-out slice at that version (`schemas.training.is_heldout`: a content-hash
   share of bootstrap rows + the evaluation sample of live traffic, distributed like live
   traffic, teacher-labelled, never trained on); refuse before training when it is too small
   to certify epsilon;
2. train a candidate with `python -m trainer.train` in a subprocess, into a fresh run folder
   outside the registry (a killed or failed run leaves the registry untouched; the child
   also keeps torch's memory and any CUDA context out of the process that starts vLLM); the
   trainer drops the held-out rows by the same rule and lists what it trained on in
   <run>/trained_rows.txt;
3. start ONE serving engine and evaluate the candidate and the live adapter on the held-out
   slice's selection part (a third, by content hash: what the gate compares) and the candidate
   on its certification part (the rest: where its stored threshold at target error epsilon is
   chosen, so that the rows that picked it never certify it; with no adapter live, nothing is
   selected and the whole slice certifies; a kept adapter certified that way is re-certified
   on the certification part); a gold file (--report-tsv) only adds a report. The trainer's
   manifest is checked against the slice first.
   With no adapter live the service trusts nothing the base model says (no calibrated
   threshold: it escalates every ticket), so there is nothing to beat and the base model is
   only scored with --score-base. Each adapter's predictions are cached per text
   (<work-dir>/eval-cache): the next cycle scores the live adapter only on new held-out rows;
4. `trainer.promote.decide` (a candidate above the serving `max_lora_rank` is rejected: the
   service could not load it): on promote, write eval + threshold into the candidate's
   metadata, `registry.add` it and move the `current` pointer (the service hot-swaps by
   watching that pointer) only if it is still where it was when the run started: a rollback
   or promotion made meanwhile wins, the candidate stays in the registry for a person to
   promote; on reject, the run folder keeps everything for inspection.
Returns (and writes to <run>/summary.json) a summary dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from schemas.task import TaskSpec
from schemas.training import DEFAULT_COLD_ROWS_UNTIL, DEFAULT_HELDOUT_FRACTION
from services.student.registry import (
    CONFIG_FILE, AdapterRef, AdapterRegistry, CurrentMoved, read_meta, write_meta,
)
from services.student.prompting import trained_for_same_prompt
from services.student.calibration_record import record_mismatch
from trainer.certificate import certified_on_selection_rows, recertify, with_certificate
from trainer.dataset import CERTIFY_SHARE
from trainer.evaluate import HeldOut, evaluate, fit_lora_rank, min_heldout, summary_line
from trainer.promote import decide
from trainer.retention import RunClaim


@dataclass
class DistillConfig:
    registry_dir: Path
    log_path: Path
    model_path: Path
    task_path: Path
    work_dir: Path = Path("var/distill")
    calibration_tsv: str = ""  # a curated gate/threshold file instead of the log's held-out slice
    report_tsv: str = ""  # extra report set, e.g. gold (candidate only); "" or "none" skips it
    eval_limit: int = 0  # held-out rows per evaluation, chosen by content hash (0 = all)
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION  # Settings.heldout_fraction
    heldout_cold_rows_until: int = DEFAULT_COLD_ROWS_UNTIL  # Settings.heldout_cold_rows_until
    warm_start: bool = True  # start from the live adapter's weights when its shape matches
    score_base: bool = False  # with no adapter live, also score the base model (report only)
    epsilon: float = 0.03  # target error of tickets the student answers
    delta: float = 0.05  # the bound holds with probability 1 - delta
    margin: float = 0.01  # coverage (or, on a tie, accuracy) gain needed to promote
    max_minutes: float = 28.0  # training budget (load to save)
    train_timeout_s: float | None = None  # hard kill of the trainer; default: budget + 10 min
    train_args: dict[str, Any] = field(default_factory=dict)  # extra trainer.train flags
    engine: Any = None  # services.student.engine.EngineConfig; default: from model_path
    max_lora_rank: int = 16  # the SERVING engine's (Settings.max_lora_rank): bigger can't be loaded


def train_subprocess(out_dir: Path, flags: dict[str, Any], log_file: Path, timeout_s: float | None = None) -> None:
    """`python -m trainer.train` with flags; raises if it fails, is killed or times out."""
    cmd = [sys.executable, "-m", "trainer.train", "--out-dir", str(out_dir)]
    for key, value in flags.items():
        if value is not None and value != "":
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with open(log_file, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env,
                       cwd=Path(__file__).resolve().parents[1], timeout=timeout_s)


async def run_distill_async(
    cfg: DistillConfig, *, train_fn: Callable[..., None] = train_subprocess,
    classifier: Any = None,
) -> dict[str, Any]:
    """One cycle; `train_fn` and `classifier` are injectable for tests."""
    from services.student.engine import EngineConfig
    from services.teacher.training_log import TrainingLog

    started = time.monotonic()
    task = TaskSpec.from_file(cfg.task_path)
    registry = AdapterRegistry(cfg.registry_dir)
    live_at_start = registry.current_id()  # promotion is a compare-and-swap against this
    with TrainingLog(cfg.log_path) as log:
        version = log.version()  # pinned: rows appended meanwhile wait for the next cycle
    # before training: raises if it cannot gate (with no adapter live the whole slice certifies)
    calib = load_calibration(cfg, task, version, selecting=live_at_start is not None)
    final = None if cfg.report_tsv in ("", "none") else HeldOut.from_tsv(
        "report", cfg.report_tsv, task, cfg.eval_limit)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    run_dir = Path(cfg.work_dir) / f"run-{stamp}-v{version}-{uuid.uuid4().hex[:6]}"
    run_dir.mkdir(parents=True, exist_ok=False)
    claim = RunClaim(run_dir, live_at_start)  # `triage gc` keeps this run and the adapters it uses
    candidate_dir = run_dir / "adapter"
    flags = {"base_model": cfg.model_path, "task_path": cfg.task_path, "log_path": cfg.log_path,
             "log_version": version, "max_minutes": cfg.max_minutes,
             "heldout_fraction": cfg.heldout_fraction, "heldout_cold_rows_until": cfg.heldout_cold_rows_until,
             "rows_manifest": run_dir / "trained_rows.txt",
             "exclude_tsv": cfg.calibration_tsv,  # a calibration file's texts are never trained on
             "prefix_cache": Path(cfg.work_dir) / "frozen-cache",  # the next cycle reuses it
             "init_adapter": registry.get(live_at_start).path if cfg.warm_start and live_at_start else None,
             **cfg.train_args}
    timeout = cfg.train_timeout_s or cfg.max_minutes * 60 + 600
    # In a thread: a service sharing this event loop (the demo) keeps heartbeating meanwhile.
    await asyncio.to_thread(train_fn, candidate_dir, flags, run_dir / "train.log", timeout)  # raises: registry untouched
    train_minutes = (time.monotonic() - started) / 60
    check_never_trained_on(run_dir / "trained_rows.txt", calib)

    candidate = AdapterRef.from_dir(candidate_dir)
    live = registry.current()
    if live is not None and not trained_for_same_prompt(live, candidate, task):
        # A field or label changed since it was trained: the service refuses it and serves
        # the base model, so it is no benchmark (its codes would be read as today's labels).
        print(f"live adapter {live.adapter_id} was trained for another version of the task; the "
              "service does not serve it: gating against no adapter")
        live = None
    adapters = {"candidate": candidate}
    if live is not None or cfg.score_base:
        adapters["live"] = live
    engine = fit_lora_rank(cfg.engine or EngineConfig(model_path=Path(cfg.model_path)), adapters)
    # The selection part decides, the certification part certifies the stored threshold: never
    # the same rows (trainer/README.md, "Selection and certification"). With no adapter live
    # there is nothing to select between: the whole slice certifies the first adapter.
    select, certify = calib.split_gate(selecting=live is not None)
    served = getattr(classifier, "config", None) or engine  # the configuration answers come from
    # A live adapter certified on another engine (another dtype), or on rows that now select
    # (the first adapter, certified on the whole slice), is re-certified on the certification
    # part unless it is replaced: a kept adapter's certificate never rests on the rows that kept it.
    stale = None if live is None else record_mismatch(live, served) or certified_on_selection_rows(live)
    results = await evaluate(engine, task, adapters, select, final,
                             epsilon=cfg.epsilon, delta=cfg.delta, out_dir=run_dir / "eval",
                             final_names={"candidate"}, classifier=classifier,
                             cache_dir=Path(cfg.work_dir) / "eval-cache", certification=certify,
                             certify_names={"candidate", "live"} if stale else {"candidate"})
    cand = results["candidate"]["calibration"]
    current = results["live"]["calibration"] if live is not None else None
    adapter_config = json.loads((candidate_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    decision = decide(cand, current, cfg.margin, adapter_config=adapter_config,
                      max_lora_rank=cfg.max_lora_rank)

    meta = with_certificate(read_meta(candidate_dir), results["candidate"], served)
    meta["gate"] = {"promote": decision.promote, "reason": decision.reason,
                    "live_adapter_id": live.adapter_id if live else None}
    write_meta(candidate_dir, meta)  # metadata is outside the content hash: the id is unchanged

    promoted, reason = False, decision.reason
    if decision.promote:
        added = registry.add(candidate_dir)
        try:
            registry.promote(added.adapter_id, decision.reason, expected_current=live_at_start)
            promoted = True
        except CurrentMoved as moved:  # someone rolled back / promoted while we trained
            reason = (f"not promoted: {moved}; the gate passed ({decision.reason}); the candidate "
                      f"is in the registry: `triage promote {added.adapter_id}` to use it")
    recertified = None
    if stale and not promoted and registry.current_id() == live.adapter_id:
        recertified = recertify(registry, live, results["live"], served, run_dir).adapter_id
    summary = {
        "run_dir": str(run_dir),
        "recertified": recertified,
        "recertified_because": stale if recertified else None,
        "recertified_threshold": results["live"]["certification"]["threshold"]["threshold"] if recertified else None,
        "data_version": version,
        "heldout": {**calib.describe(), "selection": len(select.rows), "certification": len(certify.rows)},
        "candidate_id": candidate.adapter_id,
        "live_id": live.adapter_id if live else None,
        "live_at_start": live_at_start,
        "promoted": promoted,
        "current_id": registry.current_id(),
        "reason": reason,
        "gate": {"promote": decision.promote, "reason": decision.reason},
        "threshold": meta["threshold"],
        "train_metrics": meta.get("train_metrics"),
        "candidate": meta["eval"],
        "live": {k: current.get(k) for k in ("accuracy", "macro_f1", "ece", "coverage_at_epsilon")}
                if current is not None else None,
        "lines": [summary_line(name, r) for name, r in results.items()],
        "train_minutes": round(train_minutes, 2),
        "total_minutes": round((time.monotonic() - started) / 60, 2),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    claim.release()  # a failed run's claim ends with the process (or this object)
    return summary


def load_calibration(cfg: DistillConfig, task: TaskSpec, version: int, *, selecting: bool = True) -> HeldOut:
    """The gate's data: a curated file when given, else the log's held-out slice at `version`.
    ValueError when it is too small to certify epsilon: a run nobody can gate is waste.
    `selecting=False` (no adapter live): the whole slice certifies."""
    if cfg.calibration_tsv:
        calib = HeldOut.from_tsv("calibration", cfg.calibration_tsv, task, cfg.eval_limit)
    else:
        calib = HeldOut.from_log(cfg.log_path, task, version=version, fraction=cfg.heldout_fraction,
                                 limit=cfg.eval_limit, cold_rows_until=cfg.heldout_cold_rows_until)
    start = min_heldout(cfg.epsilon, cfg.delta, len(task.fields))  # what the certification part needs
    certifying = len(calib.split_gate(selecting)[1].rows)
    if certifying < start:
        need = min_heldout(cfg.epsilon, cfg.delta, len(task.fields), CERTIFY_SHARE if selecting else 1.0)
        where = (cfg.calibration_tsv if cfg.calibration_tsv else
                 f"the training log's held-out slice (v{version}: {cfg.heldout_fraction:.0%} of "
                 f"bootstrap rows + the evaluation sample of live tickets; sources "
                 f"{calib.sources or 'none'})")
        raise ValueError(
            f"{len(calib.rows)} held-out rows in {where}, {certifying} of them in its certification "
            f"part; certifying a {cfg.epsilon:.0%} error target needs at least {start} there, about "
            f"{need} held-out rows in all (and ~{10 * need} for useful coverage): keep the "
            f"service running (its evaluation sample grows with traffic; `triage status` says "
            f"how far) or label history with `triage bootstrap`")
    return calib


def check_never_trained_on(manifest: Path, calib: HeldOut) -> None:
    """The trainer's manifest (content hashes it trained or validated on) shares no text with the
    rows that gate and certify: RuntimeError otherwise (a trainer that ignored the held-out rule
    or the calibration file would be certified on its own training data)."""
    if not manifest.exists():  # a train_fn that writes none (tests); the real trainer always does
        return
    from schemas.training import content_hash

    trained = set(manifest.read_text(encoding="utf-8").split())
    leaked = [r.text for r in calib.rows if content_hash(r.text) in trained]
    if leaked:
        raise RuntimeError(f"{len(leaked)} of {len(calib.rows)} held-out rows were trained on "
                           f"(first: {leaked[0][:80]!r}); refusing to gate on them")


def heldout_status(settings: Any, *, cold: bool, selecting: bool = True, epsilon: float = 0.03,
                   delta: float = 0.05) -> dict[str, Any]:
    """How far the training log is from a distil that can gate (`triage status`): held-out
    rows held vs needed, and about how many more live tickets the evaluation sample needs
    (`cold`: no calibrated adapter live, so the sample takes the cold-start share;
    `selecting=False`: no adapter live at all, so the whole slice certifies)."""
    from math import ceil

    task = TaskSpec.from_file(settings.task_path)
    share_certifying = CERTIFY_SHARE if selecting else 1.0
    start = min_heldout(epsilon, delta, len(task.fields))  # rows of the certification part
    need = min_heldout(epsilon, delta, len(task.fields), share_certifying)  # about, in all
    path = Path(settings.training_log_path)
    calib = (HeldOut.from_log(path, task, fraction=settings.heldout_fraction,
                              cold_rows_until=settings.heldout_cold_rows_until)
             if path.exists() else HeldOut("heldout", str(path), []))
    held, share = len(calib.rows), settings.eval_share_cold if cold else settings.eval_share
    certifying = len(calib.split_gate(selecting)[1].rows)
    status = {"training_log": str(path), "heldout_rows": held, "heldout_sources": calib.sources,
              "certification_rows": certifying, "needed_to_distil": need,
              "distil_can_run": certifying >= start}
    if certifying < start:
        more = max(need - held, ceil((start - certifying) / share_certifying))
        status["next"] = (f"{more} more held-out rows before `triage distill` can gate: about "
                          f"{ceil(more / share)} more tickets at the evaluation sample's {share:.0%}"
                          if share > 0 else f"{more} more held-out rows (TRIAGE_EVAL_SHARE is 0: "
                          "bootstrap labelled history or raise it)")
    else:
        status["next"] = f"`triage distill` can run (useful coverage from ~{10 * need} held-out rows)"
    return status


def run_distill(cfg: DistillConfig, **kwargs: Any) -> dict[str, Any]:
    """Synchronous entry point (CLI, CronJob); use `run_distill_async` inside an event loop."""
    return asyncio.run(run_distill_async(cfg, **kwargs))


def recertified_line(summary: dict[str, Any]) -> str | None:
    """What a cycle that kept the live adapter did to its certificate, or None."""
    if not summary.get("recertified"):
        return None
    value = summary["recertified_threshold"]
    threshold = "certifies nothing" if value is None else f"threshold {value:.4f}"
    return (f"live adapter {summary['recertified']} kept and re-certified on the certification part "
            f"({threshold}): {summary['recertified_because']}")


def heldout_line(heldout: dict[str, Any]) -> str:
    sources = ", ".join(f"{n} {k}" for k, n in sorted(heldout["sources"].items()))
    origin = f"training log v{heldout['version']}" if heldout["version"] is not None else heldout["path"]
    if "certification" not in heldout:
        parts = ""
    elif heldout["selection"] == heldout["certification"] == heldout["n"]:
        parts = " (no adapter live: all of them certify)"
    else:
        parts = f" ({heldout['selection']} select, {heldout['certification']} certify)"
    return f"held-out: {heldout['n']} rows ({sources}) from {origin}, never trained on{parts}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-minutes", type=float, default=28.0, help="training time budget")
    parser.add_argument("--epsilon", type=float, default=0.03, help="target error of accepted tickets")
    parser.add_argument("--margin", type=float, default=0.01, help="gain needed to promote")
    parser.add_argument("--calibration-tsv", default=None,
                        help="a curated gate/threshold file instead of the training log's "
                             "held-out slice (default TRIAGE_CALIBRATION_PATH, usually unset)")
    parser.add_argument("--report-tsv", default=None,
                        help="extra report set, e.g. a gold file (default TRIAGE_REPORT_PATH; "
                             "'none' skips); never used for the decision")
    parser.add_argument("--eval-limit", type=int, default=0,
                        help="held-out rows per evaluation, N chosen by content hash (0 = all)")
    parser.add_argument("--work-dir", default="var/distill")
    parser.add_argument("--score-base", action="store_true",
                        help="with no adapter live, also score the base model (report only)")
    parser.add_argument("--cold-start", action="store_true",
                        help="train from scratch instead of from the live adapter's weights")
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="extra trainer.train flag, e.g. lora_layers=8 (repeatable)")
    parser.add_argument("--task", default=None,
                        help="re-distil this task of the deployment (TRIAGE_DEPLOYMENT_PATH): its log and registry")
    parser.add_argument("--deployment", default=None, help="the deployment file (default TRIAGE_DEPLOYMENT_PATH)")
    opts = parser.parse_args(argv)
    from services.deployment import settings_for
    from services.student.engine import EngineConfig

    try:
        settings = settings_for(opts.task, opts.deployment)
    except (ValueError, KeyError) as exc:
        print(f"triage distill: {exc}", file=sys.stderr)
        return 2
    if opts.task and opts.work_dir == parser.get_default("work_dir"):
        opts.work_dir = str(Path(opts.work_dir) / opts.task)
    cfg = DistillConfig(
        registry_dir=settings.registry_dir, log_path=settings.training_log_path,
        model_path=settings.model_path, task_path=settings.task_path, work_dir=Path(opts.work_dir),
        calibration_tsv=str(opts.calibration_tsv or settings.calibration_path or ""),
        report_tsv=str(settings.report_path if opts.report_tsv is None else opts.report_tsv),
        eval_limit=opts.eval_limit, heldout_fraction=settings.heldout_fraction,
        heldout_cold_rows_until=settings.heldout_cold_rows_until,
        warm_start=not opts.cold_start, score_base=opts.score_base,
        epsilon=opts.epsilon, margin=opts.margin, max_minutes=opts.max_minutes,
        train_args=dict(a.split("=", 1) for a in opts.train_arg),
        engine=EngineConfig.from_settings(settings), max_lora_rank=settings.max_lora_rank,
    )
    try:
        summary = run_distill(cfg)
    except ValueError as exc:  # no usable held-out data: nothing was trained
        print(f"triage distill: {exc}", file=sys.stderr)
        return 2
    print(heldout_line(summary["heldout"]))
    print("\n".join(summary["lines"]))
    print(("PROMOTED " if summary["promoted"] else "NOT PROMOTED ") + summary["reason"])
    if recertified_line(summary):
        print(recertified_line(summary))
    if summary["promoted"] or summary.get("recertified"):  # replicas swap now, not at their next poll
        from services.stream.kafka_io import tell_replicas

        live = summary["candidate_id"] if summary["promoted"] else summary["recertified"]
        print(tell_replicas(settings, task=opts.task, adapter_id=live)[1])
    print(f"summary: {summary['run_dir']}/summary.json")
    if settings.retention_after_distill:  # the nightly job's retention (TRIAGE_RETENTION_*)
        collect_garbage(settings, cfg.work_dir)
    return 0  # a rejected candidate is a normal outcome, not a failure


def collect_garbage(settings: Any, work_dir: Path) -> None:
    """`triage gc --apply` for this task; a failure is reported, never the cycle's outcome."""
    from trainer.retention import gc, human_bytes

    try:
        plan, result = gc(settings, work_dir, apply_=True)
    except OSError as exc:
        print(f"gc: failed ({exc}); the cycle's result stands", file=sys.stderr)
        return
    print(f"gc: freed {human_bytes(result['bytes'])} in {len(result['deleted'])} paths"
          + (f", {result['forwards_rows']} old forwards rows" if result["forwards_rows"] else "")
          + (f", rollback stack trimmed to {plan.keep_rollbacks}" if plan.forget_rollbacks else "")
          + " (`triage gc` shows what is kept and why)")


if __name__ == "__main__":
    raise SystemExit(main())
