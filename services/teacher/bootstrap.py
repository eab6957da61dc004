"""Bootstrap: label a pile of texts with the teacher before the first distillation.

Resumable by construction: the training log is the checkpoint. Each answer is appended as it
arrives, and texts already in the log are skipped, so a crash or Ctrl-C loses at most the
answers in flight and a rerun never pays twice for a text.

    TRIAGE_TEACHER_BASE_URL=https://... TRIAGE_TEACHER_API_KEY=... triage bootstrap --tsv tickets.tsv

Stops early (resume later) when the teacher's circuit opens or its budget is spent.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from schemas.task import TaskSpec
from schemas.training import TrainingExample, content_hash
from services.teacher.client import Teacher, TeacherUnavailable
from services.teacher.training_log import TrainingLog

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)

STOP_REASONS = ("circuit_open", "over_budget")  # retrying the next text cannot help


@dataclass
class BootstrapReport:
    total: int = 0  # texts given
    duplicates: int = 0  # repeated (after normalisation) within the input
    skipped: int = 0  # already in the log
    labelled: int = 0  # new examples appended
    failed: int = 0  # teacher gave no answer
    not_attempted: int = 0  # left when the run stopped early
    failures: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None  # reason the run stopped early
    cost_usd: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        line = (
            f"bootstrap: labelled {self.labelled}, skipped {self.skipped}, failed {self.failed}"
            f" ({self.total} texts, {self.duplicates} duplicates); cost ${self.cost_usd:.4f}"
            f" for {self.prompt_tokens}+{self.completion_tokens} tokens in {self.elapsed_s:.1f}s"
        )
        if self.stopped:
            line += f"; stopped early ({self.stopped}), {self.not_attempted} left for a rerun"
        return line


async def run_bootstrap(
    *, teacher: Teacher, log: TrainingLog, texts: Sequence[str], concurrency: int,
    progress: bool = True, source: str = "bootstrap",
) -> BootstrapReport:
    """Label every text not yet in `log`, `concurrency` at a time; returns the counts."""
    started = time.perf_counter()
    report = BootstrapReport(total=len(texts))
    unique: dict[str, str] = {}
    for text in texts:
        if text and text.strip():
            unique.setdefault(content_hash(text), text)
    report.duplicates = report.total - len(unique)
    done = await asyncio.to_thread(log.existing_hashes, unique)
    report.skipped = len(done)
    todo = [text for h, text in unique.items() if h not in done]
    failures: Counter[str] = Counter()
    stop = asyncio.Event()
    bar = _progress_bar(len(todo), progress)
    pending = iter(todo)

    async def worker() -> None:
        for text in pending:  # a shared iterator: each text goes to exactly one worker
            if stop.is_set():
                report.not_attempted += 1
                continue
            try:
                answer = await teacher.label(text)
            except TeacherUnavailable as exc:
                report.failed += 1
                failures[exc.reason] += 1
                if exc.reason in STOP_REASONS and not stop.is_set():
                    report.stopped = exc.reason
                    stop.set()
            else:
                example = TrainingExample(
                    text=text, labels=answer.labels, teacher_model=answer.model,
                    prompt_hash=answer.prompt_hash, source=source,
                )
                added = await asyncio.to_thread(log.append, [example])
                report.labelled += added  # (not `+= await`: that would lose updates)
                report.cost_usd += answer.cost_usd
                report.prompt_tokens += answer.prompt_tokens
                report.completion_tokens += answer.completion_tokens
            if bar is not None:
                bar.update(1)
                bar.set_postfix(cost=f"${report.cost_usd:.4f}", failed=report.failed,
                                refresh=False)

    try:
        async with asyncio.TaskGroup() as group:
            for _ in range(max(1, min(concurrency, len(todo)))):
                group.create_task(worker())
    finally:
        if bar is not None:
            bar.close()
        report.failures = dict(failures)
        report.elapsed_s = time.perf_counter() - started
    print(report.summary(), flush=True)
    return report


def _progress_bar(total: int, enabled: bool):
    if not enabled or total == 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="text", desc="bootstrap", file=sys.stderr)


# --- what to label -----------------------------------------------------------------------------
def sample_texts(texts: Sequence[str], limit: int | None, seed: int = 0) -> list[str]:
    """`limit` texts drawn uniformly at random (file order kept), not the first `limit`:
    exports are often sorted by queue, date or label, and a prefix would teach the student a
    slice of the traffic. Seeded: a resumed run draws the same texts and pays for none twice."""
    if limit is None or limit >= len(texts):
        return list(texts)
    import random

    keep = sorted(random.Random(seed).sample(range(len(texts)), max(0, limit)))
    return [texts[i] for i in keep]


def label_coverage(task: TaskSpec, examples: Sequence[TrainingExample]) -> list[str]:
    """Lines describing the labels of `examples` per field: how many of the task's labels
    occur, the most and least frequent, and the labels never seen (the student cannot learn
    those: label more, or sample differently)."""
    lines = []
    entity = task.entity_field
    if entity is not None:
        spans = Counter(item["type"] for e in examples for item in e.labels.get(entity.name) or [])
        with_any = sum(bool(e.labels.get(entity.name)) for e in examples)
        shown = ", ".join(f"{t} {spans[t]}" for t in entity.type_names)
        lines.append(f"entities ({entity.name}): {with_any} of {len(examples)} examples have any; {shown}")
    for spec in task.categorical_fields:
        counts = Counter(e.labels.get(spec.name) for e in examples)
        total = sum(counts.values()) or 1
        seen = [label for label in spec.labels if counts[label]]
        ranked = sorted(seen, key=lambda label: (-counts[label], label))
        top = ", ".join(f"{label} {counts[label] / total:.1%}" for label in ranked[:3])
        rare = ", ".join(f"{label} {counts[label]}" for label in ranked[-3:][::-1])
        line = (f"labels ({spec.name}): {len(seen)} of {len(spec.labels)} seen in {sum(counts.values())} "
                f"examples; most frequent {top}; least {rare}")
        missing = [label for label in spec.labels if not counts[label]]
        if missing:
            shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
            line += f"\n  WARNING: {len(missing)} label(s) never seen, the student cannot learn them: {shown}"
        lines.append(line)
    return lines


# --- the one entry point (`triage bootstrap`) -------------------------------------------------
async def bootstrap_from_settings(
    settings: Settings, path: str | Path, *, limit: int | None = None, seed: int = 0,
    concurrency: int | None = None, progress: bool = False,
) -> BootstrapReport:
    """Label the texts of a TSV/JSONL file (a seeded uniform sample of `limit` of them) into
    the settings' training log with the settings' teacher (`build_teacher`: the same client,
    retries, breaker and budget as the service); then print the labels' distribution."""
    from services.teacher.client import build_teacher
    from services.teacher.corpus import read_texts

    if not settings.teacher_base_url:
        raise SystemExit("no teacher: set TRIAGE_TEACHER_BASE_URL (or OPENAI_BASE_URL)")
    task = TaskSpec.from_file(settings.task_path)
    every = read_texts(path, task.inputs)
    texts = sample_texts(every, limit, seed)
    if len(texts) < len(every):
        print(f"bootstrap: a uniform sample (seed {seed}) of {len(texts)} of the {len(every)} texts in {path}")
    teacher = build_teacher(settings, task)
    try:
        with TrainingLog(settings.training_log_path) as training_log:
            report = await run_bootstrap(
                teacher=teacher, log=training_log, texts=texts,
                concurrency=concurrency or settings.teacher_concurrency, progress=progress)
            wanted = {content_hash(t) for t in texts}
            labelled = [e for e in await asyncio.to_thread(training_log.examples) if e.content_hash in wanted]
            for line in label_coverage(task, labelled):
                print(line)
            print(f"training log: {training_log.count()} examples, version {training_log.version()}")
            return report
    finally:
        await teacher.aclose()
