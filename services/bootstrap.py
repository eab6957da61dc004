"""Bootstrap: label a pile of texts with the teacher before the first distillation.

Resumable by construction: the training log is the checkpoint. Each answer is appended as it
arrives, and texts already in the log are skipped, so a crash or Ctrl-C loses at most the
answers in flight and a rerun never pays twice for a text.

    TRIAGE_TEACHER_API_KEY=... python -m services.bootstrap --split train --limit 500 \\
        --base-url http://127.0.0.1:8099/v1 --log var/training_log.sqlite3

Stops early (resume later) when the teacher's circuit opens or its budget is spent.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from schemas.training import TrainingExample, content_hash
from services.teacher import Teacher, TeacherUnavailable
from services.training_log import TrainingLog

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


# --- standalone CLI (the app's `triage bootstrap` wraps run_bootstrap the same way) --------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services.bootstrap",
        description="Label texts with the teacher into the training log (resumable). "
        "The API key is read from $TRIAGE_TEACHER_API_KEY.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", default="train", help="BANKING77 split: train, dev or test")
    src.add_argument("--tsv", type=Path, help="any text<TAB>label file instead (labels unused)")
    p.add_argument("--limit", type=int, default=None, help="first N texts only")
    p.add_argument("--log", type=Path, required=True, help="training log (SQLite file)")
    p.add_argument("--base-url", required=True, help="OpenAI-compatible base URL (…/v1)")
    p.add_argument("--model", default="gold-label-standin")
    p.add_argument("--task", type=Path, default=None, help="task JSON (default BANKING77)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--few-shot", type=int, default=8)
    p.add_argument("--timeout-s", type=float, default=20.0)
    p.add_argument("--max-retries", type=int, default=4)
    p.add_argument("--input-price-per-mtok", type=float, default=0.15)
    p.add_argument("--output-price-per-mtok", type=float, default=0.60)
    p.add_argument("--budget-usd", type=float, default=None, help="stop when spend reaches it")
    p.add_argument("--no-progress", action="store_true")
    return p


async def _main(args: argparse.Namespace) -> BootstrapReport:
    from pydantic import SecretStr

    from schemas.task import TaskSpec, default_task_path
    from services.datasets import load_split, load_tsv
    from services.teacher import OpenAITeacher

    rows = load_tsv(args.tsv) if args.tsv else load_split(args.split)
    texts = [row.text for row in rows][: args.limit]
    # Servers without auth (the stand-in, a local vLLM) accept any token.
    key = SecretStr(os.environ.get("TRIAGE_TEACHER_API_KEY") or "no-key")
    teacher = OpenAITeacher(
        base_url=args.base_url, api_key=key, model=args.model,
        task=TaskSpec.from_file(args.task or default_task_path()), few_shot=args.few_shot,
        timeout_s=args.timeout_s, max_retries=args.max_retries, concurrency=args.concurrency,
        input_price_per_mtok=args.input_price_per_mtok,
        output_price_per_mtok=args.output_price_per_mtok, budget_per_hour_usd=None,
        budget_per_day_usd=args.budget_usd, breaker_failures=5, breaker_reset_s=15.0,
    )
    try:
        with TrainingLog(args.log) as training_log:
            return await run_bootstrap(teacher=teacher, log=training_log, texts=texts,
                                       concurrency=args.concurrency,
                                       progress=not args.no_progress)
    finally:
        await teacher.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = asyncio.run(_main(args))
    except KeyboardInterrupt:
        print("bootstrap interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0 if report.failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
