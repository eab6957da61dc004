"""One certification walk or two: coverage and validity on simulated calibration sets.

`trainer.calibration` certifies a threshold with fixed-sequence walks; a walk ends at its first
failed test, so a cluster of confident mistakes at the top of the ranking can end it before the
threshold where the error rate is fine. Two walks at delta / 2 each (from three and from ten
absorbable errors) survive such a cluster; the price is a smaller delta per walk. This measures
both sides on synthetic draws, for the product's walks (`calibration.WALKS`) against the single
walk from three errors they replaced:

- `smooth`: confidence ~ Beta(12, 0.6), P(error | c) = 1 - c (the world of bench/selection.py);
- `cluster`: the same, except that the most confident 15% err at `bump` (1.5% or 2%), the shape
  of the ticket task's priority field (5 errors in its 200 most confident answers).

Per world: mean certified coverage, share of draws that certify anything, and the share of
those whose threshold's true error (exact within ~1e-3: a 2M-point reference sample) exceeds
epsilon, which must stay <= delta.

    .venv/bin/python -m bench.walks --draws 2000
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from trainer import calibration as cal

SINGLE = ((3, 1.0),)
EPSILON = 0.03


def _world(rng: np.random.Generator, bump: float | None, top: float):
    def p_error(c: np.ndarray) -> np.ndarray:
        return 1 - c if bump is None else np.where(c >= top, bump, 1 - c)

    ref = np.sort(rng.beta(12, 0.6, 2_000_000))[::-1]
    return p_error, ref, np.cumsum(p_error(ref)) / np.arange(1, len(ref) + 1)


def measure(draws: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    top = float(np.quantile(rng.beta(12, 0.6, 200_000), 0.85))
    rows = []
    for world, bump in (("smooth", None), ("cluster", 0.015), ("cluster", 0.02)):
        p_error, ref, mean_error = _world(rng, bump, top)
        for n, delta in ((900, 0.05), (1200, 0.05), (1800, 0.05 / 3)):
            conf = np.sort(rng.beta(12, 0.6, size=(draws, n)), axis=1)[:, ::-1]
            wrong_cum = np.cumsum(rng.random((draws, n)) < p_error(conf), axis=1)
            for name, walks in (("one walk", SINGLE), ("two walks", cal.WALKS)):
                product = cal.WALKS
                cal.WALKS = walks
                try:
                    best = cal.walk(conf, wrong_cum, (conf > 0).sum(axis=1), EPSILON, delta)
                finally:
                    cal.WALKS = product
                feasible = best > 0
                chosen = conf[np.arange(draws), np.maximum(best, 1) - 1][feasible]
                true = mean_error[np.searchsorted(-ref, -chosen, side="right") - 1]
                rows.append({"world": world if bump is None else f"{world} {bump:.1%}", "n": n,
                             "delta": round(delta, 4), "walks": name,
                             "coverage": round(float(np.mean(best / n)), 3),
                             "certified": round(float(feasible.mean()), 3),
                             "violations": round(float((true > EPSILON).mean()) if true.size else 0.0, 3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    opts = parser.parse_args(argv)
    rows = measure(opts.draws, opts.seed)
    if opts.json:
        print(json.dumps(rows, indent=1))
        return 0
    print("| world | rows | delta | walks | mean coverage | sets certified | violations (<= delta) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['n']} | {r['delta']} | {r['walks']} | {r['coverage']:.1%} | "
              f"{r['certified']:.0%} | {r['violations']:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
