"""Calibration maths for held-out evaluation: ECE, accuracy-coverage, a threshold with a bound.

Pure numpy + math (no scipy); every function takes per-ticket confidences (the service's
ticket confidence = min over fields) and correctness (all fields right).

Threshold choice (`choose_threshold`): a ticket is accepted (answered by the student) when
its confidence >= t, otherwise escalated. We want P(error | accepted) <= epsilon with
probability >= 1 - delta over the draw of the calibration set. Method "clopper-pearson,
fixed-sequence, two starts": candidate thresholds are the calibration confidences in
descending order (coverage grows). A walk tests them on a fixed grid from a start: every 2% of
the set; each candidate with the exact one-sided Clopper-Pearson upper bound on the error rate
of the accepted tickets; it stops at the first failure and returns the last threshold that
passed. Testing in a fixed order and stopping at the first non-rejection controls the
family-wise error without a multiplicity correction (fixed-sequence testing, as in
Learn-then-Test, Angelopoulos et al. 2021), unlike "the lowest threshold anywhere whose bound
passes", which can cherry-pick a lucky dip.

Two walks, each at delta / 2 (Bonferroni; LTT's fixed sequence with several start points):
one starts where THREE errors still certify epsilon (293 accepted for epsilon 3%, delta 5%),
one where TEN do (618); the larger certified coverage wins. Why: the first tests see few
tickets, where a few confident mistakes make the bound fail although the error rate further
down is fine, and a walk ends at its first failure. A single walk starting at one allowed error
stopped at 12% coverage on a held-out slice whose 5% walk reached 75% (`make demo`); a single
walk from three errors certified nothing for the ticket task's priority field, whose 200 most
confident answers hold 5 errors while its top 1,697 hold 34 (2.0%): the walk from ten errors
reaches those 1,697 (92%). The price of delta / 2 per walk: 1.5 to 4 points of coverage on a
smooth ranking (`python -m bench.walks` measures both sides). A set smaller than the second
start runs the first walk alone, at the full delta; the starts depend on epsilon, delta and
the set's size only, never on its labels. No threshold passing: `ESCALATE_ALL` (infinity:
nothing is accepted, confidence 1.0 included). Assumes the calibration tickets are
exchangeable with live traffic, and were not used to choose the model (trainer/README.md,
"Selection and certification").
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np


# --- binomial bounds --------------------------------------------------------------------------
def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space (fine for n up to ~1e5)."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    logp, log1p = math.log(p), math.log1p(-p)
    terms = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * logp + (n - i) * log1p
        for i in range(0, k + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(errors: int, n: int, delta: float = 0.05) -> float:
    """Exact one-sided (1 - delta) upper confidence bound on a binomial error rate."""
    if n <= 0:
        return 1.0
    if errors >= n:
        return 1.0
    lo, hi = errors / n, 1.0
    for _ in range(60):  # bisection: the p where P(X <= errors) = delta
        mid = (lo + hi) / 2
        if _binom_cdf(errors, n, mid) > delta:
            lo = mid
        else:
            hi = mid
    return hi


@functools.lru_cache(maxsize=256)
def min_certifiable_n(epsilon: float, delta: float, errors: int = 0) -> int:
    """Smallest n at which `errors` errors out of n still give an upper bound <= epsilon."""
    n = max(1, errors + 1, math.ceil(math.log(delta) / math.log1p(-epsilon)))
    while clopper_pearson_upper(errors, n, delta) > epsilon:
        n += max(1, n // 50)
    return n


# --- threshold --------------------------------------------------------------------------------
# Each walk: (errors its first test can absorb, its share of delta); see the module docstring.
WALKS = ((3, 0.5), (10, 0.5))
GRID_SHARE = 0.02  # after its start, a walk tests every 2% of the calibration set
# "Trust nothing": no confidence reaches it, 1.0 included (entity confidence is exactly 1.0 for
# grammar-forced or float32-saturated tokens, so 1.0 would let those through). JSON has no
# infinity: stored as null (`threshold_to_json`), read back by `threshold_from_json`.
ESCALATE_ALL = math.inf


def threshold_to_json(t: float) -> float | None:
    return None if math.isinf(t) else float(t)


def threshold_from_json(value: float | None) -> float:
    return ESCALATE_ALL if value is None else float(value)


def walk_start(epsilon: float, delta: float) -> int:
    """Accepted tickets at the first walk's first test on a set too small for the second walk
    (then it runs alone, at the full delta): fewer calibration rows certify nothing."""
    return min_certifiable_n(epsilon, delta, errors=WALKS[0][0])


def walk_plan(epsilon: float, delta: float, size: int) -> tuple[tuple[int, float], ...]:
    """(first test, delta) of each walk for a calibration set of `size` rows: every walk at its
    share of delta when the set reaches the last start, else the first walk alone."""
    plan = tuple((min_certifiable_n(epsilon, delta * share, errors=e), delta * share) for e, share in WALKS)
    return plan if size >= plan[-1][0] else ((walk_start(epsilon, delta), delta),)


@functools.lru_cache(maxsize=64)
def _allowed(n_cap: int, epsilon: float, delta: float) -> np.ndarray:
    """allowed[n]: the most errors among n accepted tickets whose Clopper-Pearson bound is still
    <= epsilon, -1 when none. Exact, by duality: bound(e, n) <= epsilon iff
    P(Binomial(n, epsilon) <= e) <= delta; one pass over e for every n at once (log space)."""
    n = np.arange(n_cap + 1, dtype=float)
    allowed = np.full(n_cap + 1, -1, dtype=np.int64)
    log_pmf = n * math.log1p(-epsilon)  # e = 0
    log_cdf = log_pmf.copy()
    log_delta, odds = math.log(delta), math.log(epsilon) - math.log1p(-epsilon)
    for e in range(n_cap + 1):
        passing = (log_cdf <= log_delta) & (n > e)
        if not passing.any():
            break
        allowed[passing] = e
        with np.errstate(divide="ignore", invalid="ignore"):
            log_pmf = log_pmf + np.log(np.maximum(n - e, 0)) - math.log(e + 1) + odds
        log_cdf = np.logaddexp(log_cdf, log_pmf)
    return allowed


def walk(conf_sorted: np.ndarray, wrong_cum: np.ndarray, usable: np.ndarray, epsilon: float,
         delta: float, sizes: np.ndarray | None = None) -> np.ndarray:
    """The walks for many calibration sets at once (rows of the 2-D arrays): `conf_sorted`
    descending, `wrong_cum` the running count of errors in that order, `usable` the positive
    confidences per row, `sizes` each set's size (default: the width; a smaller set is padded
    with confidence 0 after its rows). Returns the accepted count at the last test that passed,
    the larger of the walks `walk_plan` gives the set (0: none passed, infeasible).
    `choose_threshold` is this with one row; the simulations of bench/selection.py call it with
    thousands."""
    conf_sorted, wrong_cum = np.atleast_2d(conf_sorted), np.atleast_2d(wrong_cum)
    rows, n = conf_sorted.shape
    usable = np.asarray(usable, dtype=np.int64).reshape(rows)
    sizes = np.full(rows, n) if sizes is None else np.asarray(sizes, dtype=np.int64).reshape(rows)
    best = np.zeros(rows, dtype=np.int64)
    # tie_end[r, j]: rows with confidence >= conf_sorted[r, j] (ties are accepted together)
    last_of_run = np.ones((rows, n), dtype=bool)
    last_of_run[:, :-1] = conf_sorted[:, :-1] != conf_sorted[:, 1:]
    ends = np.where(last_of_run, np.arange(1, n + 1), n)
    tie_end = np.minimum.accumulate(ends[:, ::-1], axis=1)[:, ::-1]
    step = np.maximum(1, (sizes * GRID_SHARE).astype(np.int64))
    plans = [walk_plan(epsilon, delta, int(size)) for size in sizes]
    for plan in set(plans):
        members = np.array([p == plan for p in plans])
        for start, share in plan:
            if start > n:
                continue
            allowed = _allowed(1 << (n - 1).bit_length(), epsilon, share)  # cached per power of two
            found = np.zeros(rows, dtype=np.int64)
            k = np.full(rows, start, dtype=np.int64)
            live = np.nonzero(members & (k <= usable))[0]
            while live.size:
                k_all = tie_end[live, k[live] - 1]
                passed = wrong_cum[live, k_all - 1] <= allowed[k_all]  # a walk stops at its first failure
                found[live[passed]] = k_all[passed]
                k[live] = np.minimum(usable[live], np.maximum(k_all + 1, k[live] + step[live]))
                live = live[passed & (k_all < usable[live])]
            best = np.maximum(best, found)
    return best


@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float  # accept when confidence >= threshold; ESCALATE_ALL when infeasible
    epsilon: float
    delta: float
    method: str
    feasible: bool
    n: int  # calibration tickets
    accepted: int
    errors_accepted: int
    coverage: float  # accepted / n on the calibration set
    escalation_rate: float  # 1 - coverage
    upper_bound: float  # Clopper-Pearson bound on error of accepted at the chosen threshold

    def to_dict(self) -> dict:
        return {**asdict(self), "threshold": threshold_to_json(self.threshold)}


def choose_threshold(
    confidence: Sequence[float], correct: Sequence[bool], epsilon: float, delta: float = 0.05
) -> ThresholdChoice:
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    n = len(conf)
    order = np.argsort(-conf, kind="stable")
    conf_sorted, wrong_cum = conf[order], np.cumsum(~ok[order])
    # Confidence 0 marks an answer the student could not give (a span it could not copy, output
    # cut by the token budget): never certified, however accurate the rest is, so the walk
    # stops at the lowest positive confidence and threshold 0 is never chosen.
    usable = int((conf > 0).sum())
    accepted = int(walk(conf_sorted, wrong_cum, np.array([usable]), epsilon, delta)[0]) if n else 0
    starts = " and ".join(str(start) for start, _ in walk_plan(epsilon, delta, n))
    method = f"clopper-pearson fixed-sequence (confidence-ordered, 2% grid from {starts} accepted), one-sided"
    if not accepted:
        return ThresholdChoice(ESCALATE_ALL, epsilon, delta, method, False, n, 0, 0, 0.0, 1.0, 1.0)
    t, errors = float(conf_sorted[accepted - 1]), int(wrong_cum[accepted - 1])
    bound = clopper_pearson_upper(errors, accepted, delta)
    coverage = accepted / n
    return ThresholdChoice(t, epsilon, delta, method, True, n, accepted, errors, coverage, 1 - coverage, bound)


def apply_threshold(confidence: Sequence[float], correct: Sequence[bool], threshold: float) -> dict:
    """What a threshold does on another set: coverage and error among accepted."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=bool)
    accepted = conf >= threshold
    n_acc = int(accepted.sum())
    return {
        "threshold": threshold_to_json(threshold),
        "coverage": n_acc / len(conf) if len(conf) else 0.0,
        "escalation_rate": 1 - n_acc / len(conf) if len(conf) else 1.0,
        "accepted": n_acc,
        "error_accepted": float((~ok[accepted]).mean()) if n_acc else 0.0,
    }


# --- calibration metrics ----------------------------------------------------------------------
def reliability(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> dict:
    """Equal-width confidence bins: count, mean confidence, accuracy; and the ECE over them."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        mask = which == b
        count = int(mask.sum())
        mean_conf = float(conf[mask].mean()) if count else None
        acc = float(ok[mask].mean()) if count else None
        if count:
            ece += count / len(conf) * abs(acc - mean_conf)
        rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count,
                     "confidence": mean_conf, "accuracy": acc})
    return {"bins": rows, "ece": float(ece)}


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[bool], bins: int = 15) -> float:
    return reliability(confidence, correct, bins)["ece"]


def coverage_curve(confidence: Sequence[float], correct: Sequence[bool], points: int = 101) -> dict:
    """Accuracy of the `coverage` most confident tickets, on a coverage grid in (0, 1]."""
    conf = np.asarray(confidence, dtype=float)
    ok = np.asarray(correct, dtype=float)[np.argsort(-conf, kind="stable")]
    n = len(ok)
    grid = np.linspace(1.0 / points, 1.0, points) if n else np.array([])
    counts = np.maximum(1, np.round(grid * n).astype(int))
    acc = np.cumsum(ok)[counts - 1] / counts if n else np.array([])
    thresholds = np.sort(conf)[::-1][counts - 1] if n else np.array([])
    return {"coverage": grid.round(4).tolist(), "accuracy": acc.round(5).tolist(),
            "threshold": thresholds.round(5).tolist()}


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Unweighted mean F1 over labels seen in either truth or prediction (sklearn's default)."""
    labels = sorted(set(y_true) | set(y_pred))
    scores = []
    for label in labels:
        tp = sum(t == label and p == label for t, p in zip(y_true, y_pred))
        fp = sum(t != label and p == label for t, p in zip(y_true, y_pred))
        fn = sum(t == label and p != label for t, p in zip(y_true, y_pred))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return float(np.mean(scores)) if scores else 0.0
