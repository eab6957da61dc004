"""Would another confidence score certify more tickets than the top label's probability?

Scores the live adapter of a work dir on its training log's held-out slice and on BANKING77
test through one engine, then runs the certification walk (`calibration.choose_threshold`)
on the slice for three scores read from the same distribution over labels: the top
probability (what the engine publishes), the margin between the top two, and exp(-entropy);
each threshold is then applied to test. Issue 24's "confidence that ranks better" lever:

    python -m bench.confidence_scores --workdir var/product-avx2
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import numpy as np

from bench import _common as c

SCORES = {
    "top probability": lambda d: d.max(),
    "top-2 margin": lambda d: np.diff(np.sort(d)[-2:])[0],
    "exp(-entropy)": lambda d: float(np.exp((d * np.log(np.clip(d, 1e-12, 1.0))).sum())),
}


async def scored(workdir: Path, test_tsv: str) -> dict[str, list[tuple[np.ndarray, bool]]]:
    from schemas.task import TaskSpec, default_task_path
    from services.settings import Settings
    from services.student.engine import EngineConfig
    from services.student.registry import AdapterRegistry
    from services.student.shared_engine import started_classifier
    from trainer.evaluate import HeldOut, fit_lora_rank

    task = TaskSpec.from_file(default_task_path())
    field = task.fields[0].name
    parts = {"held-out": HeldOut.from_log(workdir / "data" / "training_log.sqlite3", task),
             "test": HeldOut.from_tsv("test", test_tsv, task)}
    adapter = AdapterRegistry(workdir / "registry").current()
    config = fit_lora_rank(EngineConfig(model_path=Path(Settings().model_path)), {"live": adapter})
    out = {}
    async with started_classifier(config, task, adapter=adapter) as clf:
        for name, data in parts.items():
            texts = [r.text for r in data.rows]
            predictions = []
            for start in range(0, len(texts), 256):
                predictions += await clf.classify(texts[start : start + 256], adapter=adapter)
            out[name] = [(np.asarray(p.distribution[field]), p.fields[field].label == r.labels[field])
                         for p, r in zip(predictions, data.rows)]
    return out


def main() -> None:
    from services.dev.datasets import banking77_dir
    from trainer import calibration as cal

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a distil's data/ and registry/ (its live adapter)")
    p.add_argument("--test-tsv", default=None, help="default: BANKING77 test")
    args = p.parse_args()
    c.setup()
    rows = asyncio.run(scored(Path(args.workdir), args.test_tsv or str(banking77_dir() / "test.tsv")))
    held_ok = np.array([ok for _, ok in rows["held-out"]])
    test_ok = np.array([ok for _, ok in rows["test"]])
    print(f"{len(held_ok)} held-out rows ({held_ok.mean():.1%} right), {len(test_ok)} test ({test_ok.mean():.1%})")
    for name, score in SCORES.items():
        held = np.array([score(d) for d, _ in rows["held-out"]])
        test = np.array([score(d) for d, _ in rows["test"]])
        cells = []
        for epsilon in (0.01, 0.03, 0.05):
            choice = cal.choose_threshold(held, held_ok, epsilon, 0.05)
            accepted = test >= choice.threshold
            wrong = 1 - test_ok[accepted].mean() if accepted.any() else 0.0
            cells.append(f"eps {epsilon:.0%}: held-out {choice.coverage:.1%}, test {accepted.mean():.1%} ({wrong:.2%} wrong)")
        print(f"{name:>16}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
