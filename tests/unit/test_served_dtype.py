"""dtype = auto picks the hardware's fast format, and a threshold holds only for the engine
configuration it was certified on (services/student/hardware.py, calibration_record.py,
trainer/certificate.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from services.student import hardware
from services.student.calibration_record import as_served, engine_record, record_mismatch
from services.student.engine import EngineConfig
from services.student.registry import AdapterRef, content_id
from tests.unit import test_gate
from tests.unit.test_gate import GoldForOne, fake_adapter, trains

distill_setup = test_gate.distill_setup  # the gate tests' registry + held-out file, as a fixture here


@pytest.mark.parametrize("device, flags, expected", [
    ("cpu", {"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ("cpu", {"avx2", "amx_bf16", "amx_tile"}, "bfloat16"),
    ("cpu", {"avx2", "fma"}, "float32"),  # AVX2 only: bf16 would be emulated, several times slower
    ("cpu", set(), "float32"),  # no /proc/cpuinfo (macOS)
    ("cuda", set(), "bfloat16"),
])
def test_auto_picks_bf16_only_where_the_hardware_multiplies_it(monkeypatch, device, flags, expected):
    monkeypatch.setattr(hardware, "serving_device", lambda: device)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    dtype, why = hardware.resolve_dtype("auto")
    assert dtype == expected and why.startswith("auto")
    assert EngineConfig(model_path=Path("m")).dtype == expected  # resolved at construction
    assert hardware.resolve_dtype("float32") == ("float32", "set explicitly")  # an override wins
    with pytest.raises(ValueError, match="expected one of"):
        hardware.resolve_dtype("int4")


@pytest.mark.parametrize("flags, dtype, native", [
    ({"avx2", "fma"}, "bfloat16", False),  # torch's bf16 matmul is a scalar fallback there
    ({"avx2", "avx512_bf16"}, "bfloat16", True),
    ({"avx2", "fma"}, "float32", True),
    ({"avx2", "avx512_bf16"}, "float16", False),
])
def test_bench_limits_reports_no_share_of_an_emulated_peak(monkeypatch, flags, dtype, native):
    from bench.limits import native_on_this_cpu

    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    assert native_on_this_cpu(dtype) is native


def test_engine_batch_follows_the_served_dtype_unless_set():
    from services.settings import Settings

    # bench.throughput, 900 tickets through Kafka on 2 cores: bf16 256 > 128; float32 256 no better
    assert Settings(dtype="float32").engine_max_batch == 128
    assert Settings(dtype="bfloat16").engine_max_batch == 256
    assert Settings(dtype="float32", max_batch=64).engine_max_batch == 64  # set explicitly: kept


def adapter(threshold, record=None) -> AdapterRef:
    stored = None if threshold is None else {"value": threshold, **({"engine": record} if record else {})}
    meta = {"threshold": stored} if stored else {}
    return AdapterRef("a-00000000000000aa", Path("x"), prompt_style="compact", threshold=threshold, meta=meta)


F32 = EngineConfig(model_path=Path("m"), dtype="float32")
BF16 = replace(F32, dtype="bfloat16")


def test_a_threshold_certified_on_another_dtype_is_refused_never_silently_used():
    legacy = adapter(0.9)  # certified before the record existed: float32
    assert record_mismatch(legacy, F32) is None and as_served(legacy, F32) is legacy
    why = record_mismatch(legacy, BF16)
    assert "dtype float32 -> bfloat16" in why and "trusting nothing" in why
    assert as_served(legacy, BF16).threshold == math.inf  # every ticket escalates
    per_field = replace(legacy, threshold={"intent": 0.8, "priority": 0.7})
    assert as_served(per_field, BF16).threshold == {"intent": math.inf, "priority": math.inf}

    recorded = adapter(0.9, engine_record(BF16))
    assert record_mismatch(recorded, BF16) is None and as_served(recorded, BF16).threshold == 0.9
    assert "max_model_len 2048 -> 512" in record_mismatch(recorded, replace(BF16, max_model_len=512))
    # nothing to refuse: never calibrated (it escalates everything anyway), or no engine known
    assert as_served(adapter(None), BF16).threshold is None
    assert record_mismatch(recorded, None) is None and as_served(None, BF16) is None


class ServedIn(GoldForOne):
    """GoldForOne on an engine of a given configuration (what distill reads as `config`)."""

    def __init__(self, gold, good_id, config):
        super().__init__(gold, good_id)
        self.config = config


def legacy_live(tmp_path, registry, threshold: float = 0.95) -> AdapterRef:
    folder = fake_adapter(tmp_path / "legacy", b"legacy")
    meta = json.loads((folder / "triage_adapter.json").read_text())
    meta["threshold"] = {"value": threshold, "feasible": True}  # a float32-era certificate
    (folder / "triage_adapter.json").write_text(json.dumps(meta))
    ref = registry.add(folder)
    registry.promote(ref.adapter_id, "setup")
    return ref


async def test_distill_recertifies_a_live_adapter_certified_in_another_dtype(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, _, config = distill_setup
    live = legacy_live(tmp_path, registry)
    assert record_mismatch(registry.current(), BF16) is not None  # what the service refuses today
    loser = fake_adapter(tmp_path / "cand", b"worse")
    summary = await run_distill_async(config(), train_fn=trains(loser),
                                      classifier=ServedIn(gold, live.adapter_id, BF16))
    assert not summary["promoted"] and summary["recertified"] == live.adapter_id
    current = registry.current()
    assert current.adapter_id == live.adapter_id  # same weights, new certificate
    assert current.meta["threshold"]["engine"]["dtype"] == "bfloat16"
    assert record_mismatch(current, BF16) is None and math.isfinite(current.threshold)
    assert current.meta["eval"]["certification"]["accuracy"] == 1.0  # the live adapter's own report
    assert [h["event"] for h in registry.history()][-1] == "meta"


async def test_distill_leaves_a_certificate_that_holds_alone(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, _, config = distill_setup
    live = legacy_live(tmp_path, registry)
    before = registry.current().meta
    summary = await run_distill_async(config(), train_fn=trains(fake_adapter(tmp_path / "cand", b"worse")),
                                      classifier=ServedIn(gold, live.adapter_id, F32))
    assert not summary["promoted"] and summary["recertified"] is None
    assert registry.current().meta == before


async def test_a_promoted_candidate_records_the_engine_it_was_certified_on(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, _, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"better")
    summary = await run_distill_async(config(), train_fn=trains(candidate),
                                      classifier=ServedIn(gold, content_id(candidate), BF16))
    assert summary["promoted"]
    record = registry.current().meta["threshold"]["engine"]
    assert record == engine_record(BF16) and record["dtype"] == "bfloat16"
    assert record_mismatch(registry.current(), F32) is not None  # served in float32: refused
