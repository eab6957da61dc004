"""Selection vs certification: how often a promoted adapter's certified threshold is wrong.

Every distil cycle the gate picks a winner (candidate or live) by its coverage at epsilon on
held-out rows, and the winner's threshold is certified (Clopper-Pearson fixed-sequence walk,
`trainer.calibration`) so that its error on live traffic exceeds epsilon with probability at
most delta. If the same rows pick the winner and certify it, a candidate wins *because* those
rows were kind to it, and its bound fails more often than delta; cycle after cycle the lineage
of winners keeps the rows' luck (a candidate is warm-started from the live adapter and errs on
mostly the same tickets). This simulates many promote cycles on synthetic draws and counts, over
every promotion, how often the stored threshold's true error exceeds epsilon:

- `reuse`: one slice selects and certifies (the gate before issue 23);
- `split`: the slice's selection part (`trainer.dataset.split_gate`, a third by content hash)
  decides, the certification part certifies, and never the other way round (issue 23);
- `first-whole`: the product's gate (trainer/distill.py): `split`, except that the first
  adapter, gated against no adapter (nothing to select between), is certified on the whole
  slice, and re-certified on the certification part when a later gate keeps it;
- `first-whole-kept`: the same without that re-certification (why it is there).

The world, per draw: a held-out slice that grows each cycle (`n0` rows, `growth` more per
cycle); each ticket a confidence from Beta(a, b) (a good student: mean 0.95, a long tail of
unsure tickets) and P(error | c) = 1 - c + overconfidence; every candidate errs on the same
tickets as its parent with probability `rho` (warm start) and its overconfidence drifts by
`drift`. Candidates are (nearly) as good as the live adapter, so most promotions chase noise:
the case where selection bias bites. The true error at a threshold is exact (a 2M-point
reference sample of the confidence distribution). The walk is the product's own
(`calibration.walk`), the decision the product's own (`promote.decide`).

    .venv/bin/python -m bench.selection --draws 4000 --cycles 6
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from trainer import calibration as cal
from trainer.dataset import CERTIFY_SHARE
from trainer.promote import decide


@dataclass(frozen=True)
class World:
    cycles: int = 6  # promote cycles after the first adapter
    n0: int = 1200  # held-out rows at the first cycle
    growth: int = 200  # rows the slice gains per cycle
    a: float = 12.0  # confidence ~ Beta(a, b)
    b: float = 0.6
    overconfidence: float = 0.0  # P(error | c) = 1 - c + this, for the first adapter
    drift: float = 0.002  # a candidate's overconfidence: |parent's + N(0, drift)|
    rho: float = 0.8  # a candidate errs on its parent's tickets with this probability
    epsilon: float = 0.03
    delta: float = 0.05
    margin: float = 0.01  # the gate's (DistillConfig.margin)


def true_error(a: float, b: float, points: int = 2_000_000, seed: int = 12345):
    """(t, overconfidence) -> the error of tickets with confidence >= t on the population:
    confidence ~ Beta(a, b), P(error | c) = 1 - c + overconfidence; 0 for t = inf."""
    ref = np.sort(np.random.default_rng(seed).beta(a, b, points))[::-1]
    mean_above = np.cumsum(ref) / np.arange(1, points + 1)

    def error(t: np.ndarray, overconfidence: np.ndarray) -> np.ndarray:
        k = np.searchsorted(-ref, -np.minimum(t, 1.0), side="right")  # points >= t
        return np.where(np.isfinite(t) & (k > 0), 1 - mean_above[np.maximum(k, 1) - 1] + overconfidence, 0.0)

    return error


def _choose(conf: np.ndarray, wrong: list[np.ndarray], mask: np.ndarray, world: World):
    """For each model's errors: the walk on the rows of `mask` (rows of `conf` sorted
    descending) -> (threshold, coverage, accuracy) per draw; threshold inf when infeasible."""
    order = np.argsort(~mask, axis=1, kind="stable")  # the mask's rows first, still sorted
    c = np.take_along_axis(np.where(mask, conf, 0.0), order, axis=1)
    sizes, usable, rows = mask.sum(axis=1), (c > 0).sum(axis=1), np.arange(len(conf))
    out = []
    for w in wrong:
        w_cum = np.take_along_axis(w & mask, order, axis=1).cumsum(axis=1)
        best = cal.walk(c, w_cum, usable, world.epsilon, world.delta, sizes)
        t = np.where(best > 0, c[rows, np.maximum(best, 1) - 1], np.inf)
        out.append((t, best / sizes, 1 - w_cum[:, -1] / sizes))
    return out


def _promote(cand: tuple, live: tuple | None, n: np.ndarray, world: World) -> np.ndarray:
    """promote.decide per draw on the selection part's numbers."""
    def rep(t, cov, acc, i):
        return {"coverage_at_epsilon": float(cov[i]), "accuracy": float(acc[i]), "epsilon": world.epsilon,
                "adapter_id": "a", "threshold": {"feasible": bool(np.isfinite(t[i]))},
                "data": {"data_hash": "slice", "n": int(n[i])}}
    return np.array([decide(rep(*cand, i), rep(*live, i) if live is not None else None, world.margin).promote
                     for i in range(len(n))])


PROTOCOLS = ("reuse", "split", "first-whole", "first-whole-kept")


def simulate(world: World, draws: int, protocol: str, seed: int = 0) -> dict:
    """Violations of stored thresholds (promotions and re-certifications) under `protocol`."""
    if protocol not in PROTOCOLS:
        raise ValueError(protocol)
    rng = np.random.default_rng(seed)
    error = true_error(world.a, world.b)
    n_max = world.n0 + world.growth * world.cycles
    conf = rng.beta(world.a, world.b, (draws, n_max))
    order = np.argsort(-conf, axis=1)
    conf = np.take_along_axis(conf, order, axis=1)
    arrival = order  # a row's index in the slice's growth (rows < n0 + growth * c exist at cycle c)
    certify_row = rng.random((draws, n_max)) < CERTIFY_SHARE  # content hash: fixed per row

    def errs(u: np.ndarray, overconfidence: np.ndarray) -> np.ndarray:
        return u < 1 - conf + overconfidence[:, None]

    live_u, live_oc = rng.random((draws, n_max)), np.full(draws, world.overconfidence)
    live_t = None
    live_whole = np.zeros(draws, bool)  # the live threshold was certified on rows that now select
    promotions = violations = recertified = recert_violations = 0
    per_cycle = []
    for cycle in range(world.cycles + 1):
        in_slice = arrival < world.n0 + world.growth * cycle
        whole = protocol == "reuse" or (protocol.startswith("first-whole") and cycle == 0)
        select = in_slice if whole else in_slice & ~certify_row
        certify = in_slice if whole else in_slice & certify_row
        if cycle == 0:  # the first adapter: a fresh model, gated against no adapter
            cand_u, cand_oc = live_u, live_oc
        else:
            cand_u = np.where(rng.random((draws, n_max)) < world.rho, live_u, rng.random((draws, n_max)))
            cand_oc = np.abs(live_oc + rng.normal(0, world.drift, draws))
        models = [errs(cand_u, cand_oc)] + ([errs(live_u, live_oc)] if cycle else [])
        chosen = _choose(conf, models, select, world)
        won = _promote(chosen[0], chosen[1] if cycle else None, select.sum(axis=1), world)
        certified = chosen[0] if protocol == "reuse" else _choose(conf, models[:1], certify, world)[0]
        stored = certified[0]
        bad = won & (error(stored, cand_oc) > world.epsilon)
        promotions, violations = promotions + int(won.sum()), violations + int(bad.sum())
        kept = live_whole & ~won if protocol == "first-whole" else np.zeros(draws, bool)
        if kept.any():  # distill: a kept adapter certified on selecting rows is re-certified apart
            recert = _choose(conf, models[1:], certify, world)[0][0]
            live_t = np.where(kept, recert, live_t)
            recertified += int(kept.sum())
            recert_violations += int((kept & (error(recert, live_oc) > world.epsilon)).sum())
        per_cycle.append({"cycle": cycle, "promoted": int(won.sum()), "violations": int(bad.sum()),
                          "recertified": int(kept.sum()),  # the candidate's certified coverage:
                          "certified_coverage": float(np.where(np.isfinite(stored), certified[1], 0).mean())})
        live_u = np.where(won[:, None], cand_u, live_u)
        live_oc = np.where(won, cand_oc, live_oc)
        live_t = stored if live_t is None else np.where(won, stored, live_t)
        live_whole = np.where(won, whole, live_whole & ~kept)
    live_bad = error(live_t, live_oc) > world.epsilon
    rate = violations / promotions if promotions else 0.0
    return {"protocol": protocol, "draws": draws, "promotions": promotions, "violations": violations,
            "violation_rate": rate, "recertified": recertified, "recert_violations": recert_violations, "mc_se": math.sqrt(max(rate * (1 - rate), 1e-12) / max(promotions, 1)),
            "live_violation_rate_at_end": float(live_bad.mean()),
            "infeasible_live_at_end": float(np.isinf(live_t).mean()), "per_cycle": per_cycle}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--cycles", type=int, default=World.cycles)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    opts = parser.parse_args(argv)
    world = World(cycles=opts.cycles)
    results = {"world": asdict(world)}
    for protocol in PROTOCOLS:
        started = time.perf_counter()
        results[protocol] = {**simulate(world, opts.draws, protocol, opts.seed),
                             "seconds": round(time.perf_counter() - started, 1)}
    text = json.dumps(results, indent=1)
    if opts.out:
        from pathlib import Path

        Path(opts.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
