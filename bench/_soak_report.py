"""The figures of bench/soak.py: pure functions over what the run recorded, plus the table and
the picture. Nothing here touches a process, a broker or a clock.

Inputs:
- `sent`: key -> produce time (time.time()), the tickets of the run proper (not calibration);
- `records`: outcome records (bench._faults_infra.OutcomeRecord: key, kind, at, route, ...);
- `samples`: one dict per sampling tick: {"t", "lag": {"tickets", "escalations"},
  "procs": {name: {"rss", "uss", "fds", "inc"}}, "disk": {name: bytes}, "adapters": {replica: id}};
- `events`: {"name", "kind" (outage | kill | hot_swap | rollback | distil), "start", "end", ...}.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from statistics import mean
from typing import Any, Iterable, Sequence

from bench._common import percentile

FAULT_KINDS = ("outage", "kill", "hot_swap", "rollback")  # lag must drain after each one's end
LAG_TOPICS = ("tickets", "escalations")
MiB = 1024 * 1024


@dataclass(frozen=True)
class Schedule:
    """When each scheduled thing happens, as offsets from the start of the run proper (s).

    Everything scales with the run's length: a 60-minute run has 5-minute windows, 10 minutes
    of warm-up, a 5-minute teacher outage at 15 min, a kill -9 at 24 min, the distil at 27
    min, the rollback at 45 min (or one window after the distil's hot-swap, if later)."""

    duration_s: float
    window_s: float
    warmup_s: float
    outage_at: float
    outage_s: float
    kill_at: float
    distil_at: float
    rollback_at: float

    @classmethod
    def for_minutes(cls, minutes: float) -> Schedule:
        d = minutes * 60.0
        scale = minutes / 60.0
        return cls(duration_s=d, window_s=300.0 * scale, warmup_s=600.0 * scale,
                   outage_at=0.25 * d, outage_s=300.0 * scale, kill_at=0.40 * d,
                   distil_at=0.45 * d, rollback_at=0.75 * d)


# ---- per key --------------------------------------------------------------------------------
def by_key(records: Iterable[Any], keys: set[bytes]) -> dict[bytes, list[Any]]:
    """Each key's outcome records, in arrival order."""
    out: dict[bytes, list[Any]] = defaultdict(list)
    for r in sorted((r for r in records if r.key in keys), key=lambda r: r.at):
        out[r.key].append(r)
    return out


def contract_breaks(routes: Sequence[str]) -> bool:
    """True when a key's result routes break 'any number of `unverified`, then at most one
    final answer' (a second final answer, or `unverified` after the final one)."""
    final = [r for r in routes if r != "unverified"]
    return len(final) > 1 or bool(final and routes[-1] == "unverified")


def key_figures(sent: dict[bytes, float], records: Iterable[Any]) -> dict[bytes, dict[str, Any]]:
    """Per produced key: first outcome time, first result's route, student latency, whether it
    has several result records and whether they break the contract."""
    grouped = by_key(records, set(sent))
    out: dict[bytes, dict[str, Any]] = {}
    for key, t_sent in sent.items():
        recs = grouped.get(key, [])
        results = [r for r in recs if r.kind == "result"]
        routes = [r.route or "?" for r in results]
        first = recs[0] if recs else None
        first_result = results[0] if results else None
        out[key] = {
            "sent": t_sent,
            "first_at": first.at if first else None,
            "dlq": any(r.kind == "dlq" for r in recs),
            "route": first_result.route if first_result else None,
            "latency": (first_result.at - t_sent) if first_result and first_result.route == "student" else None,
            "several": len(results) > 1,
            "breaks": contract_breaks(routes) if results else False,
            "routes": routes,
            "replicas": [r.replica or "?" for r in results],
        }
    return out


# ---- windows --------------------------------------------------------------------------------
def window_bounds(t0: float, t_end: float, width: float) -> list[tuple[float, float]]:
    bounds, start = [], t0
    while start < t_end - 1e-9:
        bounds.append((start, min(start + width, t_end)))
        start += width
    return bounds


def _in(t: float | None, lo: float, hi: float) -> bool:
    return t is not None and lo <= t < hi


def _overlaps(ev: dict[str, Any], lo: float, hi: float) -> bool:
    end = ev.get("end") if ev.get("end") is not None else ev["start"]
    return ev["start"] < hi and end >= lo


def windows(keys: dict[bytes, dict[str, Any]], samples: Sequence[dict[str, Any]],
            events: Sequence[dict[str, Any]], t0: float, t_end: float, width: float) -> list[dict[str, Any]]:
    """One row per window of `width` seconds from `t0`: tickets by produce time (in, lost,
    duplicated, student latency, escalation rate), outcomes by arrival (out), and the
    samples taken in it (lag max/last, memory and fds per process, disk at its end)."""
    rows = []
    for i, (lo, hi) in enumerate(window_bounds(t0, t_end, width)):
        mine = [k for k in keys.values() if _in(k["sent"], lo, hi)]
        lat = [k["latency"] for k in mine if k["latency"] is not None]
        answered = [k for k in mine if k["route"] is not None]
        escalated = [k for k in answered if k["route"] != "student"]
        snap = [s for s in samples if lo <= s["t"] < hi]
        row: dict[str, Any] = {
            "window": i, "start_s": round(lo - t0, 1), "end_s": round(hi - t0, 1),
            "in": len(mine),
            "out": sum(1 for k in keys.values() if _in(k["first_at"], lo, hi)),
            "lost": sum(1 for k in mine if k["first_at"] is None),
            "dead_lettered": sum(1 for k in mine if k["dlq"]),
            "several_records": sum(1 for k in mine if k["several"]),
            "contract_breaks": sum(1 for k in mine if k["breaks"]),
            "student_n": len(lat),
            "student_p50_s": _round(percentile(lat, 0.50)),
            "student_p99_s": _round(percentile(lat, 0.99)),
            "escalation_rate": round(len(escalated) / len(answered), 4) if answered else None,
            "lag_max": {t: _max(s["lag"].get(t) for s in snap) for t in LAG_TOPICS},
            "lag_last": {t: (snap[-1]["lag"].get(t) if snap else None) for t in LAG_TOPICS},
            "procs": _procs(snap),
            "disk": dict(snap[-1]["disk"]) if snap else {},
            "events": [e["name"] for e in events if _overlaps(e, lo, hi)],
        }
        rows.append(row)
    return rows


def _round(x: float | None, nd: int = 3) -> float | None:
    return None if x is None else round(x, nd)


def _max(values: Iterable[Any]) -> Any:
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


def _procs(snap: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per process: mean RSS / USS over the window's samples, max fds."""
    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in snap:
        for name, p in s["procs"].items():
            series[name].append(p)
    out = {}
    for name, ps in series.items():
        out[name] = {"rss": int(mean(p["rss"] for p in ps)), "uss": int(mean(p["uss"] for p in ps)),
                     "fds": max(p["fds"] for p in ps)}
    return out


# ---- checks ---------------------------------------------------------------------------------
def steady_windows(rows: Sequence[dict[str, Any]], warmup_s: float) -> list[dict[str, Any]]:
    """Windows after the warm-up with no scheduled event in them (the distil included)."""
    return [r for r in rows if r["start_s"] >= warmup_s - 1e-9 and not r["events"]]


def lag_band(samples: Sequence[dict[str, Any]], steady: Sequence[dict[str, Any]], t0: float) -> dict[str, int]:
    """Per topic, the 95th percentile of the lag samples taken in steady windows: what 'drained'
    means under load (a sample rarely catches 0 while batches are in flight); 0 without any."""
    spans = [(t0 + r["start_s"], t0 + r["end_s"]) for r in steady]
    band = {}
    for topic in LAG_TOPICS:
        vals = [s["lag"].get(topic) for s in samples if any(lo <= s["t"] < hi for lo, hi in spans)]
        band[topic] = int(percentile([v for v in vals if v is not None], 0.95) or 0)
    return band


def lag_recovery(samples: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]],
                 band: dict[str, int], cap_s: float = 60.0) -> list[dict[str, Any]]:
    """Per fault (FAULT_KINDS): seconds from its end to the first sample with every topic's lag
    inside the steady band, and to the first sample with every lag at 0. One that never ended
    (a replica not back, a swap not seen everywhere) fails."""
    out = []
    for ev in events:
        if ev["kind"] not in FAULT_KINDS:
            continue
        if ev.get("end") is None:  # B never back, a swap never seen on every replica
            out.append({"event": ev["name"], "to_band_s": None, "to_zero_s": None, "ok": False,
                        "why": "the fault never ended"})
            continue
        after = [s for s in samples if s["t"] >= ev["end"]]

        def first(ok: Any) -> float | None:
            hit = next((s for s in after if all(s["lag"].get(t) is not None and ok(t, s["lag"][t])
                                                for t in LAG_TOPICS)), None)
            return round(hit["t"] - ev["end"], 1) if hit else None

        to_band = first(lambda t, v: v <= band.get(t, 0))
        to_zero = first(lambda t, v: v == 0)
        out.append({"event": ev["name"], "to_band_s": to_band, "to_zero_s": to_zero,
                    "ok": to_band is not None and to_band <= cap_s})
    return out


def rss_growth(samples: Sequence[dict[str, Any]], warmup_s: float, width: float,
               names: Sequence[str]) -> list[dict[str, Any]]:
    """Per process incarnation (a restarted replica is a new one): mean RSS of the first window
    after its warm-up vs of its last window. Too short to tell if the two would overlap."""
    series: dict[tuple[str, int], list[tuple[float, int, int, int]]] = defaultdict(list)
    for s in samples:
        for name, p in s["procs"].items():
            if name in names:
                series[(name, p.get("inc", 1))].append((s["t"], p["rss"], p["uss"], p.get("anon", 0)))
    out = []
    for (name, inc), pts in sorted(series.items()):
        start, stop = pts[0][0], pts[-1][0]
        base_lo, base_hi = start + warmup_s, start + warmup_s + width
        last_lo = stop - width
        base = [p for p in pts if base_lo <= p[0] < base_hi]
        last = [p for p in pts if p[0] >= last_lo]
        row = {"process": name, "incarnation": inc, "span_s": round(stop - start, 1)}
        if last_lo < base_hi or not base or not last:
            out.append({**row, "growth": None, "ok": None, "why": "too short after warm-up"})
            continue
        b_rss, l_rss = mean(p[1] for p in base), mean(p[1] for p in last)
        b_uss, l_uss = mean(p[2] for p in base), mean(p[2] for p in last)
        growth = l_rss / b_rss - 1 if b_rss else None
        b_anon, l_anon = mean(p[3] for p in base), mean(p[3] for p in last)
        out.append({**row, "rss_base_mib": round(b_rss / MiB, 1), "rss_last_mib": round(l_rss / MiB, 1),
                    "uss_base_mib": round(b_uss / MiB, 1), "uss_last_mib": round(l_uss / MiB, 1),
                    "anon_base_mib": round(b_anon / MiB, 1), "anon_last_mib": round(l_anon / MiB, 1),
                    "anon_growth": round(l_anon / b_anon - 1, 4) if b_anon else None,
                    "growth": None if growth is None else round(growth, 4),
                    "ok": growth is not None and growth <= 0.05})
    return out


def swap_latency(keys: dict[bytes, dict[str, Any]], events: Sequence[dict[str, Any]],
                 steady: Sequence[dict[str, Any]], t0: float, width: float) -> dict[str, Any]:
    """Student-route p99 of tickets produced in steady windows vs in the window after each
    hot-swap's start (the promotion or rollback moment): ≤ 2x."""
    spans = [(t0 + r["start_s"], t0 + r["end_s"]) for r in steady]
    base = [k["latency"] for k in keys.values() if k["latency"] is not None
            and any(lo <= k["sent"] < hi for lo, hi in spans)]
    steady_p99 = percentile(base, 0.99)
    swaps = []
    for ev in events:
        if ev["kind"] not in ("hot_swap", "rollback"):
            continue
        lat = [k["latency"] for k in keys.values() if k["latency"] is not None
               and ev["start"] <= k["sent"] < ev["start"] + width]
        p99 = percentile(lat, 0.99)
        ratio = p99 / steady_p99 if p99 is not None and steady_p99 else None
        swaps.append({"event": ev["name"], "n": len(lat), "p99_s": _round(p99), "ratio": _round(ratio, 2),
                      "ok": None if ratio is None else ratio <= 2.0})  # None: no steady window or no ticket
    return {"steady_n": len(base), "steady_p99_s": _round(steady_p99), "swaps": swaps}


def checks(keys: dict[bytes, dict[str, Any]], rows: Sequence[dict[str, Any]],
           samples: Sequence[dict[str, Any]], events: Sequence[dict[str, Any]], *, t0: float,
           schedule: Schedule, replicas: Sequence[str], lag_cap_s: float = 60.0) -> dict[str, Any]:
    """The issue's 'done means', each pass / fail (None: could not be judged in this run)."""
    steady = steady_windows(rows, schedule.warmup_s)
    band = lag_band(samples, steady, t0)
    lost = sum(1 for k in keys.values() if k["first_at"] is None)
    breaks = sum(1 for k in keys.values() if k["breaks"])
    corrections = sum(1 for k in keys.values() if k["several"] and not k["breaks"])
    recov = lag_recovery(samples, events, band, lag_cap_s)
    growth = rss_growth(samples, schedule.warmup_s, schedule.window_s, replicas)
    swap = swap_latency(keys, events, steady, t0, schedule.window_s)
    judged_growth = [g for g in growth if g["ok"] is not None]
    out = {
        "lost": {"value": lost, "ok": lost == 0},
        "duplicates": {"value": breaks, "corrections_after_unverified": corrections, "ok": breaks == 0,
                       "examples": [f"{key.decode(errors='replace')}: {'>'.join(k['routes'])} "
                                    f"(by {', '.join(k['replicas'])}; sent +{k['sent'] - t0:.1f} s)"
                                    for key, k in keys.items() if k["breaks"]][:20]},
        "lag_drained": {"band": band, "cap_s": lag_cap_s, "events": recov,
                        "ok": all(r["ok"] for r in recov) if recov else None},
        "rss_growth": {"processes": growth, "ok": all(g["ok"] for g in judged_growth) if judged_growth else None},
        "swap_p99": {**swap, "ok": _all([s["ok"] for s in swap["swaps"]])},
        "steady_windows": [r["window"] for r in steady],
    }
    return out


def _all(oks: Sequence[bool | None]) -> bool | None:
    """False if any failed, else True if any passed, else None (nothing judged)."""
    return False if False in oks else True if True in oks else None


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[ok]


def check_lines(c: dict[str, Any]) -> list[str]:
    lines = [f"0 lost: {verdict(c['lost']['ok'])} ({c['lost']['value']} lost)",
             f"duplicates only as corrections after `unverified`: {verdict(c['duplicates']['ok'])} "
             f"({c['duplicates']['value']} keys break it; {c['duplicates']['corrections_after_unverified']} corrected"
             + ("; e.g. " + "; ".join(c["duplicates"]["examples"][:3]) if c["duplicates"].get("examples") else "")
             + ")"]
    lag = c["lag_drained"]
    parts = ", ".join(f"{e['event']} {_s(e['to_band_s'])} (to 0: {_s(e['to_zero_s'])})" for e in lag["events"])
    lines.append(f"lag back within {lag['cap_s']:g} s of each fault's end: {verdict(lag['ok'])} "
                 f"(band {lag['band']}: {parts or 'no faults'})")
    parts = ", ".join(f"{g['process']}#{g['incarnation']} " + (f"{g['growth']:+.1%}" if g["growth"] is not None
                                                              else g.get("why", "?"))
                      for g in c["rss_growth"]["processes"])
    lines.append(f"RSS growth after warm-up <= 5%: {verdict(c['rss_growth']['ok'])} ({parts or 'no samples'})")
    anon = ", ".join(f"{g['process']}#{g['incarnation']} {g['anon_growth']:+.1%}"
                     for g in c["rss_growth"]["processes"] if g.get("anon_growth") is not None)
    if anon:  # the part a leak would grow; the rest is file-backed pages the kernel re-reads
        lines.append(f"  of which anonymous memory (heap, KV cache, tensors): {anon}")
    sw = c["swap_p99"]
    parts = ", ".join(f"{s['event']} p99 {_s(s['p99_s'])} n={s['n']} ({s['ratio']}x)" for s in sw["swaps"])
    lines.append(f"hot-swap p99 <= 2x steady ({_s(sw['steady_p99_s'])}, n={sw['steady_n']}): "
                 f"{verdict(sw['ok'])} ({parts or 'no hot-swap'})")
    return lines


def _s(x: float | None) -> str:
    return "–" if x is None else f"{x:g} s"


# ---- table and picture ----------------------------------------------------------------------
def table(rows: Sequence[dict[str, Any]], replicas: Sequence[str]) -> str:
    head = ["win", "min", "in", "out", "lost", "dup", "lag t/e", "p50/p99 s", "esc %"]
    head += [f"RSS/USS {n} MiB" for n in replicas] + [f"fds {'/'.join(replicas)}", "log MB",
                                                      "reg/run/cache MB", "events"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lag = "/".join("–" if r["lag_max"][t] is None else str(r["lag_max"][t]) for t in LAG_TOPICS)
        lat = f"{_f(r['student_p50_s'])}/{_f(r['student_p99_s'])}"
        esc = "–" if r["escalation_rate"] is None else f"{100 * r['escalation_rate']:.1f}"
        cells = [str(r["window"]), f"{r['start_s'] / 60:.1f}", str(r["in"]), str(r["out"]), str(r["lost"]),
                 f"{r['contract_breaks']}+{r['several_records'] - r['contract_breaks']}c", lag, lat, esc]
        for n in replicas:
            p = r["procs"].get(n)
            cells.append(f"{p['rss'] / MiB:.0f}/{p['uss'] / MiB:.0f}" if p else "–")
        cells.append("/".join(str(r["procs"][n]["fds"]) if n in r["procs"] else "–" for n in replicas))
        d = r["disk"]
        cells.append(_mb(d.get("training_log")))
        cells.append("/".join(_mb(d.get(k)) for k in ("registry", "run_dirs", "caches")))
        cells.append(", ".join(r["events"]) or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _mb(b: int | None) -> str:
    return "–" if b is None else f"{b / 1e6:.1f}"


def plot(path: str, rows: Sequence[dict[str, Any]], samples: Sequence[dict[str, Any]],
         events: Sequence[dict[str, Any]], t0: float, title: str) -> None:
    """Six panels over run minutes, events shaded: tickets per window, lag, student latency and
    escalation rate, RSS/USS per process, fds, disk."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 2, figsize=(14, 11), sharex=True)
    ax = axes.ravel()
    mid = [(r["start_s"] + r["end_s"]) / 120 for r in rows]
    ts = [(s["t"] - t0) / 60 for s in samples]
    ax[0].plot(mid, [r["in"] for r in rows], "o-", label="in")
    ax[0].plot(mid, [r["out"] for r in rows], "s-", label="out")
    ax[0].plot(mid, [r["lost"] for r in rows], "x-", label="lost")
    ax[0].plot(mid, [r["contract_breaks"] for r in rows], "^-", label="duplicated")
    ax[0].set_title("tickets per window")
    for topic in LAG_TOPICS:
        ax[1].plot(ts, [s["lag"].get(topic) for s in samples], label=f"lag {topic}")
    ax[1].set_title("consumer lag (committed), messages")
    ax[2].plot(mid, [r["student_p50_s"] for r in rows], "o-", label="student p50 s")
    ax[2].plot(mid, [r["student_p99_s"] for r in rows], "s-", label="student p99 s")
    esc = ax[2].twinx()
    esc.plot(mid, [None if r["escalation_rate"] is None else 100 * r["escalation_rate"] for r in rows],
             "k--", label="escalated %")
    esc.set_ylabel("escalated %")
    ax[2].set_title("student-route latency (s) and escalation rate")
    names = sorted({n for s in samples for n in s["procs"]})
    for n in names:
        ax[3].plot(ts, [s["procs"][n]["rss"] / MiB if n in s["procs"] else None for s in samples], label=f"{n} RSS")
        ax[3].plot(ts, [s["procs"][n]["uss"] / MiB if n in s["procs"] else None for s in samples], ":",
                   label=f"{n} USS")
        ax[4].plot(ts, [s["procs"][n]["fds"] if n in s["procs"] else None for s in samples], label=n)
    ax[3].set_title("memory per process (tree), MiB")
    ax[4].set_title("open file descriptors")
    disks = sorted({k for s in samples for k in s["disk"]})
    for k in disks:
        ax[5].plot(ts, [s["disk"].get(k, 0) / 1e6 for s in samples], label=k)
    ax[5].set_title("disk, MB")
    for a in ax:
        for ev in events:
            end = ev.get("end") if ev.get("end") is not None else ev["start"]
            a.axvspan((ev["start"] - t0) / 60, max((end - t0) / 60, (ev["start"] - t0) / 60 + 0.05),
                      alpha=0.12, color={"outage": "red", "kill": "black", "distil": "blue",
                                         "hot_swap": "green", "rollback": "orange"}.get(ev["kind"], "grey"))
        a.legend(fontsize=7, loc="upper left")
        a.grid(alpha=0.3)
    for a in axes[-1]:
        a.set_xlabel("minutes")
    fig.suptitle(title + "  (shaded: red outage, black kill -9, blue distil, green hot-swap, orange rollback)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
