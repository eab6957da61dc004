"""bench/soak.py's figures (bench/_soak_report.py): windows and the issue's checks, on
hand-made records and samples. Pure functions only: no broker, no engine, no clock."""

from __future__ import annotations

from bench import _soak_report as rep
from bench._faults_infra import OutcomeRecord
from bench._soak_report import Schedule

MiB = rep.MiB
T0 = 1_000.0


def rec(key: str, at: float, route: str | None = "student", kind: str = "result") -> OutcomeRecord:
    return OutcomeRecord(key.encode(), kind, 0, at, "r", None, route)


def sample(t: float, *, lag: tuple[int | None, int | None] = (0, 0), rss: dict[str, float] | None = None,
           inc: dict[str, int] | None = None, disk: int = 100) -> dict:
    procs = {n: {"rss": int(v * MiB), "uss": int(v * MiB * 0.8), "anon": int(min(v, 600) * MiB), "fds": 40,
                 "inc": (inc or {}).get(n, 1)}
             for n, v in (rss or {"A": 1000.0}).items()}
    return {"t": t, "lag": {"tickets": lag[0], "escalations": lag[1]}, "procs": procs,
            "disk": {"training_log": disk, "registry": 10, "run_dirs": 0, "caches": 5}, "adapters": {}}


def test_schedule_scales_with_the_run():
    hour, ten = Schedule.for_minutes(60), Schedule.for_minutes(10)
    assert (hour.window_s, hour.warmup_s, hour.outage_s, hour.outage_at) == (300, 600, 300, 900)
    assert hour.kill_at == 1440 and hour.distil_at == 1620 and hour.rollback_at == 2700
    assert ten.window_s == 50 and ten.outage_s == 50 and ten.duration_s == 600
    assert ten.outage_at + ten.outage_s < ten.kill_at < ten.distil_at < ten.rollback_at < ten.duration_s


def test_contract_unverified_then_one_answer():
    assert not rep.contract_breaks(["student"])
    assert not rep.contract_breaks(["unverified", "teacher"])
    assert not rep.contract_breaks(["unverified", "unverified", "teacher"])
    assert not rep.contract_breaks(["unverified"])  # still waiting on the teacher: not a duplicate
    assert rep.contract_breaks(["student", "student"])  # redelivered and answered twice
    assert rep.contract_breaks(["teacher", "unverified"])


def test_key_figures():
    sent = {b"a": T0, b"b": T0 + 1, b"c": T0 + 2, b"d": T0 + 3}
    records = [rec("a", T0 + 0.5), rec("b", T0 + 3, "unverified"), rec("b", T0 + 9, "teacher"),
               rec("d", T0 + 4, None, kind="dlq"), rec("zz", T0, "student")]
    k = rep.key_figures(sent, records)
    assert k[b"a"]["latency"] == 0.5 and k[b"a"]["route"] == "student"
    assert k[b"b"]["latency"] is None and k[b"b"]["route"] == "unverified"
    assert k[b"b"]["several"] and not k[b"b"]["breaks"]
    assert k[b"c"]["first_at"] is None  # lost
    assert k[b"d"]["dlq"] and k[b"d"]["first_at"] == T0 + 4
    assert b"zz" not in k


def test_windows_by_produce_and_arrival_time():
    sent = {b"a": T0 + 1, b"b": T0 + 2, b"c": T0 + 12, b"d": T0 + 13, b"e": T0 + 14}
    records = [rec("a", T0 + 2), rec("b", T0 + 11, "teacher"), rec("c", T0 + 13), rec("c", T0 + 15),
               rec("d", T0 + 18)]
    keys = rep.key_figures(sent, records)
    samples = [sample(T0 + 5, lag=(3, 1), rss={"A": 1000}), sample(T0 + 9, lag=(7, 0), rss={"A": 1100}),
               sample(T0 + 15, lag=(2, None), rss={"A": 1000, "B": 900}, disk=300)]
    events = [{"name": "kill -9 B", "kind": "kill", "start": T0 + 12, "end": T0 + 25}]
    w0, w1 = rep.windows(keys, samples, events, T0, T0 + 20, 10)
    assert (w0["in"], w0["out"], w0["lost"]) == (2, 1, 0)
    assert (w1["in"], w1["out"], w1["lost"]) == (3, 3, 1)  # b arrives in window 1; e is lost
    assert w0["escalation_rate"] == 0.5 and w1["escalation_rate"] == 0.0
    assert w0["student_p50_s"] == 1.0 and w1["student_p99_s"] == 5.0
    assert w1["contract_breaks"] == 1 and w1["several_records"] == 1  # c answered twice
    assert w0["lag_max"] == {"tickets": 7, "escalations": 1}
    assert w1["lag_max"] == {"tickets": 2, "escalations": None}
    assert w0["procs"]["A"]["rss"] == 1050 * MiB and "B" not in w0["procs"]
    assert w1["disk"]["training_log"] == 300
    assert w0["events"] == [] and w1["events"] == ["kill -9 B"]
    # the last window is cut at the end of production
    assert [w["end_s"] for w in rep.windows(keys, samples, events, T0, T0 + 15, 10)] == [10, 15]


def test_lag_recovery_to_the_steady_band():
    samples = [sample(T0 + t, lag=lag) for t, lag in
               [(0, (4, 0)), (10, (5, 0)), (20, (300, 9)), (30, (200, 0)), (40, (5, 0)), (50, (0, 0))]]
    events = [{"name": "teacher outage", "kind": "outage", "start": T0 + 15, "end": T0 + 25},
              {"name": "distil", "kind": "distil", "start": T0, "end": T0 + 5},  # not a fault
              {"name": "kill -9 B", "kind": "kill", "start": T0 + 45, "end": None}]  # never back
    out, never_back = rep.lag_recovery(samples, events, {"tickets": 5, "escalations": 0}, cap_s=60)
    assert out == {"event": "teacher outage", "to_band_s": 15.0, "to_zero_s": 25.0, "ok": True}
    assert never_back["event"] == "kill -9 B" and not never_back["ok"]
    (late,) = rep.lag_recovery(samples, events[:1], {"tickets": 5, "escalations": 0}, cap_s=10)
    assert not late["ok"]
    (never,) = rep.lag_recovery(samples[:4], events[:1], {"tickets": 5, "escalations": 0})
    assert never["to_band_s"] is None and not never["ok"]


def test_lag_band_is_the_steady_p95():
    rows = [{"window": 0, "start_s": 0, "end_s": 10, "events": []},
            {"window": 1, "start_s": 10, "end_s": 20, "events": []},
            {"window": 2, "start_s": 20, "end_s": 30, "events": ["teacher outage"]}]
    steady = rep.steady_windows(rows, warmup_s=10)
    assert [r["window"] for r in steady] == [1]
    samples = [sample(T0 + 5, lag=(100, 100))] + [sample(T0 + 10 + i, lag=(i, 0)) for i in range(10)] \
        + [sample(T0 + 25, lag=(500, 50))]
    assert rep.lag_band(samples, steady, T0) == {"tickets": 9, "escalations": 0}
    assert rep.lag_band(samples, [], T0) == {"tickets": 0, "escalations": 0}


def test_rss_growth_per_incarnation():
    # A: 1000 MiB flat after warm-up then +3%; B killed at t=80 and restarted (a new incarnation).
    samples = []
    for t in range(0, 121, 5):
        rss = {"A": 1000 + (30 if t >= 100 else 0) + (500 if t < 20 else 0)}
        inc = {"A": 1}
        if t < 80:
            rss["B"], inc["B"] = 900 + 2 * t, 1  # grows: ~8% between its windows
        elif t >= 90:
            rss["B"], inc["B"] = 950, 2
        samples.append(sample(T0 + t, rss=rss, inc=inc))
    out = {(g["process"], g["incarnation"]): g for g in rep.rss_growth(samples, warmup_s=20, width=20, names=["A", "B"])}
    a = out[("A", 1)]
    assert a["rss_base_mib"] == 1000 and a["ok"] and 0.02 < a["growth"] < 0.04  # warm-up spike ignored
    assert a["anon_base_mib"] == 600 and a["anon_growth"] == 0  # the growth was file-backed pages
    b1 = out[("B", 1)]
    assert not b1["ok"] and b1["growth"] > 0.05
    b2 = out[("B", 2)]
    assert b2["ok"] is None and b2["why"] == "too short after warm-up"


def test_swap_latency_against_steady():
    sent, records = {}, []
    for i in range(100):  # steady window [0, 10): 1 s each, one slow ticket at 2 s
        sent[f"s{i}".encode()] = T0 + i * 0.1
        records.append(rec(f"s{i}", T0 + i * 0.1 + (2.0 if i == 50 else 1.0)))
    for i in range(20):  # after the swap at T0 + 20: 3 s
        sent[f"w{i}".encode()] = T0 + 20 + i * 0.1
        records.append(rec(f"w{i}", T0 + 20 + i * 0.1 + 3.0))
    keys = rep.key_figures(sent, records)
    steady = [{"window": 0, "start_s": 0, "end_s": 10, "events": []}]
    events = [{"name": "hot-swap", "kind": "hot_swap", "start": T0 + 20, "end": T0 + 21},
              {"name": "teacher outage", "kind": "outage", "start": T0 + 40, "end": T0 + 50}]
    out = rep.swap_latency(keys, events, steady, T0, width=10)
    assert out["steady_n"] == 100 and out["steady_p99_s"] == 1.0
    (swap,) = out["swaps"]
    assert swap["n"] == 20 and swap["p99_s"] == 3.0 and swap["ratio"] == 3.0 and swap["ok"] is False
    (unjudged,) = rep.swap_latency(keys, events, [], T0, width=10)["swaps"]  # no steady window
    assert unjudged["ok"] is None and unjudged["p99_s"] == 3.0


def test_checks_and_table():
    sc = Schedule(duration_s=40, window_s=10, warmup_s=10, outage_at=20, outage_s=5, kill_at=30,
                  distil_at=30, rollback_at=35)
    sent = {f"k{i}".encode(): T0 + i for i in range(40)}
    records = [rec(f"k{i}", T0 + i + 0.5) for i in range(40) if i != 7]
    records += [rec("k21", T0 + 21.2, "unverified"), rec("k22", T0 + 30, "student")]
    keys = rep.key_figures(sent, records)
    samples = [sample(T0 + t, lag=(2 if t != 26 else 40, 0), rss={"A": 1000, "B": 1000}) for t in range(0, 40, 2)]
    events = [{"name": "teacher outage", "kind": "outage", "start": T0 + 20, "end": T0 + 25}]
    rows = rep.windows(keys, samples, events, T0, T0 + 40, sc.window_s)
    c = rep.checks(keys, rows, samples, events, t0=T0, schedule=sc, replicas=["A", "B"])
    assert c["lost"] == {"value": 1, "ok": False}
    assert c["duplicates"]["value"] == 1 and c["duplicates"]["corrections_after_unverified"] == 1
    assert c["duplicates"]["examples"] == ["k22: student>student (by r, r; sent +22.0 s)"]
    assert c["steady_windows"] == [1, 3]
    assert c["lag_drained"]["band"] == {"tickets": 2, "escalations": 0}
    assert c["lag_drained"]["events"][0]["to_band_s"] == 3.0 and c["lag_drained"]["ok"]
    assert c["swap_p99"]["ok"] is None  # no hot-swap in this run: not judged
    assert c["rss_growth"]["ok"]
    lines = rep.check_lines(c)
    assert lines[0].startswith("0 lost: FAIL") and "n/a" in lines[-1]
    text = rep.table(rows, ["A", "B"])
    assert text.count("\n") == len(rows) + 1 and "teacher outage" in text and "1000/800" in text


def test_plot_writes_a_png(tmp_path):
    sent = {f"k{i}".encode(): T0 + i for i in range(20)}
    keys = rep.key_figures(sent, [rec(f"k{i}", T0 + i + 0.5) for i in range(20)])
    samples = [sample(T0 + t, rss={"A": 1000, "B": 990}) for t in range(0, 20, 2)]
    events = [{"name": "hot-swap", "kind": "hot_swap", "start": T0 + 5, "end": T0 + 6}]
    rows = rep.windows(keys, samples, events, T0, T0 + 20, 10)
    rep.plot(str(tmp_path / "soak.png"), rows, samples, events, T0, "test")
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unique_ticket_texts_keep_their_gold_label():
    import json

    from bench._soak_procs import RefGold, messages
    from schemas.text import dedup_key

    msgs = messages("s", ["My card is lost!", "Where is my money?"], 3, 3)
    assert [k for k, _ in msgs] == [b"s-3", b"s-4", b"s-5"]
    texts = [json.loads(v)["text"] for _, v in msgs]
    assert texts == ["Where is my money? (ref 3)", "My card is lost! (ref 4)", "Where is my money? (ref 5)"]
    gold = RefGold({dedup_key("My card is lost!"): "lost_or_stolen_card"})
    assert dedup_key(texts[1]) in gold and gold[dedup_key(texts[1])] == "lost_or_stolen_card"
    assert dedup_key(texts[0]) not in gold and dedup_key("My card is lost! ref") not in gold
    assert json.loads(messages("c", ["a b"], 0, 1, unique=False)[0][1])["text"] == "a b"


def test_cpu_per_window_is_each_process_share_of_one_core_counted_per_incarnation():
    from bench._soak_sample import cpu_lines, cpu_per_window

    def sample(t, a_cpu, a_engine, b_cpu, b_inc):
        return {"t": t, "procs": {"A": {"cpu_s": a_cpu, "cpu_engine_s": a_engine, "inc": 1},
                                  "B": {"cpu_s": b_cpu, "cpu_engine_s": 0.0, "inc": b_inc}}}

    samples = [sample(0, 0, 0, 0, 1), sample(10, 8, 6, 2, 1),  # window 0: A 80% (60% engine), B 20%
               sample(20, 9, 6, 50, 1), sample(30, 19, 16, 1, 2)]  # window 1: B restarted inside it
    rows = cpu_per_window(samples, [(0, 15), (15, 40), (40, 50)])
    assert rows[0] == {"A": {"cpu_pct": 80.0, "engine_pct": 60.0}, "B": {"cpu_pct": 20.0, "engine_pct": 0.0}}
    assert rows[1] == {"A": {"cpu_pct": 100.0, "engine_pct": 100.0}}  # B: two lives, no figure
    assert rows[2] == {}  # no samples
    assert cpu_lines(rows)[0] == "cpu window 0: A 80% (60% engine), B 20%"
    assert cpu_lines(rows)[2] == "cpu window 2: -"
