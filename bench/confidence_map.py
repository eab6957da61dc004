"""Does a confidence map fitted on the selection part calibrate the certification part?

No engine: reads a distil work dir's prediction cache (`<work>/distill/eval-cache`, one file per
adapter it scored) and the held-out slice of its training log, fits each adapter's map on the
selection part (teacher labels, as `triage distill` does) and scores the certification part
with and without it, through `trainer.evaluate.report`. Reproduces the out-of-sample figures
in bench/README.md, *Calibrated confidence*:

    python -m bench.confidence_map --workdir var/demo
"""

from __future__ import annotations

import argparse
from pathlib import Path

from schemas.task import TaskSpec, default_task_path
from schemas.training import content_hash
from trainer.evaluate import HeldOut, report, served_maps
from trainer.predictions import read_predictions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="var/demo", help="a demo's (or deployment's) work dir")
    p.add_argument("--task", default=str(default_task_path()))
    args = p.parse_args()
    work = Path(args.workdir)
    task = TaskSpec.from_file(args.task)
    select, certify = HeldOut.from_log(work / "data" / "training_log.sqlite3", task).split_gate()
    print(f"held-out slice: {len(select.rows)} select, {len(certify.rows)} certify")
    for path in sorted((work / "distill" / "eval-cache").glob("*.jsonl")):
        known = read_predictions(path)

        def scored(part: HeldOut) -> tuple[HeldOut, list]:
            rows = [r for r in part.rows if content_hash(r.text) in known]
            return HeldOut(part.name, part.path, rows), [known[content_hash(r.text)] for r in rows]

        (sel, sel_preds), (cert, cert_preds) = scored(select), scored(certify)
        if not sel.rows or not cert.rows:
            continue
        fitted = report(task, sel, sel_preds, adapter_id=None, epsilon=0.03, delta=0.05)
        out = report(task, cert, cert_preds, adapter_id=None, epsilon=0.03, delta=0.05,
                     confidence_map=served_maps(fitted))
        maps = ", ".join(f"{n} a={m['a']:.2f} b={m['b']:+.2f}" for n, m in fitted["confidence_map"].items())
        print(f"{path.name.split('-')[0]}-{path.name.split('-')[1]}: fitted on {len(sel.rows)} ({maps}); "
              f"certification part ({len(cert.rows)} rows, acc {out['accuracy']:.3f}): ECE "
              f"{out['ece_raw']:.4f} -> {out['ece']:.4f}; coverage at 3% {out['coverage_at_epsilon']:.3f}")


if __name__ == "__main__":
    main()
