"""Changing your task (README): the adapter's prompt fingerprint covers what the student's
prompts and label codes depend on, and nothing the teacher alone reads. A fake tokenizer
(every code of at most two letters is one token) keeps it pure; the real one is in
test_engine_units.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from schemas.task import TaskSpec
from services.student.prompting import (
    PromptStyle,
    build_all_codes,
    check_adapter_servable,
    legacy_prompt_fingerprint,
    prompt_fingerprint,
    trained_for_same_prompt,
)

TASKS = Path(__file__).resolve().parents[2] / "schemas" / "tasks"
SPEC = json.loads((TASKS / "banking77_tickets.json").read_text())  # categorical + entities


class OneTokenCodes:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [int.from_bytes(text.encode(), "big")] if len(text) <= 2 else [1] * len(text)

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError


def edited(change) -> TaskSpec:
    spec = json.loads(json.dumps(SPEC))
    change(spec)
    return TaskSpec.model_validate(spec)


def fingerprint(task: TaskSpec, style: PromptStyle = PromptStyle.compact) -> str:
    return prompt_fingerprint(task, style, list(build_all_codes(task, OneTokenCodes()).values()))


BEFORE = fingerprint(TaskSpec.model_validate(SPEC))


def _set(path: str, value):
    def change(spec):
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[int(last) if last.isdigit() else last] = value
    return change


TEACHER_ONLY = {
    "instructions": _set("instructions", SPEC["instructions"].replace("Classify", "Clasify") + " Be brief."),
    "field description": _set("fields.0.description", "what the customer wants, in one label"),
    "entity type description": _set("fields.2.entity_types.0.description", "a sum of money"),
    "few-shot examples removed": _set("examples", []),
    "few-shot example added": lambda s: s["examples"].append(
        {"text": "my card is lost", "labels": {"category": "lost_or_stolen_card", "priority": "urgent"},
         "entities": []}),
    "task renamed": _set("name", "my_desk"),
    "entity output bounds": lambda s: s["fields"][2].update(max_entities=12, max_span_chars=60),
}


@pytest.mark.parametrize("change", TEACHER_ONLY.values(), ids=TEACHER_ONLY.keys())
def test_teacher_only_edits_keep_the_fingerprint(change):
    assert fingerprint(edited(change)) == BEFORE


def _labels(field: int, update) -> callable:
    def change(spec):
        spec["fields"][field]["labels"] = update(list(spec["fields"][field]["labels"]))
    return change


STUDENT = {
    "label added": _labels(1, lambda ls: ls + ["blocker"]),
    "label removed": _labels(0, lambda ls: [x for x in ls if x != "card_arrival"]),
    "label renamed, same code": _labels(0, lambda ls: [x.replace("card_arrival", "card_arrivals") for x in ls]),
    "labels reordered": _labels(1, lambda ls: ls[::-1]),
    "field renamed": lambda s: (s["fields"][1].update(name="urgency"),
                                [e["labels"].update(urgency=e["labels"].pop("priority")) for e in s["examples"]]),
    "entity type renamed": lambda s: (s["fields"][2]["entity_types"][0].update(name="money"),
                                      [e.update(entities=[]) for e in s["examples"]]),
    "input added": _set("inputs", [{"name": "product"}]),
}


@pytest.mark.parametrize("change", STUDENT.values(), ids=STUDENT.keys())
def test_what_the_student_sees_changes_the_fingerprint(change):
    assert fingerprint(edited(change)) != BEFORE


def test_a_rename_that_keeps_the_codes_still_changes_it():
    renamed = edited(STUDENT["label renamed, same code"])
    codes = build_all_codes(renamed, OneTokenCodes())
    assert codes["category"].codes == build_all_codes(TaskSpec.model_validate(SPEC), OneTokenCodes())["category"].codes
    assert fingerprint(renamed) != BEFORE  # the label names are in it, not only the codes


def test_the_instruct_prompt_renders_the_instructions_so_they_count_there():
    instruct = fingerprint(TaskSpec.model_validate(SPEC), PromptStyle.instruct)
    assert fingerprint(edited(TEACHER_ONLY["instructions"]), PromptStyle.instruct) != instruct
    assert fingerprint(edited(TEACHER_ONLY["few-shot examples removed"]), PromptStyle.instruct) == instruct


class Adapter:
    adapter_id = "a-0123456789abcdef"
    prompt_style = PromptStyle.compact

    def __init__(self, path: Path, fingerprint: str | None, codes=None):
        (path / "adapter_config.json").write_text(json.dumps({"r": 8}))
        self.path = path
        fields = {n: {"labels": list(c.labels), "codes": list(c.codes), "token_ids": list(c.token_ids)}
                  for n, c in (codes or {}).items()}
        self.meta = {"task": {"name": "t", "prompt_fingerprint": fingerprint, "fields": fields}}


def test_a_mismatched_adapter_is_refused_with_a_clear_error(tmp_path):
    task = TaskSpec.model_validate(SPEC)
    changed = edited(STUDENT["label added"])
    codes = build_all_codes(changed, OneTokenCodes())
    with pytest.raises(ValueError) as refused:
        check_adapter_servable(Adapter(tmp_path, BEFORE), changed, codes, max_lora_rank=16)
    message = str(refused.value)
    assert BEFORE in message and prompt_fingerprint(changed, PromptStyle.compact, list(codes.values())) in message
    assert "a field, label or input changed" in message and "triage distill" in message
    # the same adapter on the task it was trained for, teacher material edited since: served
    check_adapter_servable(Adapter(tmp_path, BEFORE), edited(TEACHER_ONLY["instructions"]),
                           build_all_codes(task, OneTokenCodes()), max_lora_rank=16)


def test_adapters_from_before_keep_loading_until_the_task_file_changes(tmp_path):
    task = TaskSpec.model_validate(SPEC)
    codes = build_all_codes(task, OneTokenCodes())
    legacy = legacy_prompt_fingerprint(task, PromptStyle.compact, list(codes.values()))
    assert legacy != BEFORE
    check_adapter_servable(Adapter(tmp_path, legacy), task, codes, max_lora_rank=16)
    typo = edited(TEACHER_ONLY["instructions"])  # any edit: the old hash covered the whole file
    with pytest.raises(ValueError, match="fingerprint"):
        check_adapter_servable(Adapter(tmp_path, legacy), typo, build_all_codes(typo, OneTokenCodes()), 16)


def test_distill_tells_a_stale_live_adapter_without_a_tokenizer(tmp_path):
    task = TaskSpec.model_validate(SPEC)
    codes = build_all_codes(task, OneTokenCodes())
    (tmp_path / "c").mkdir(), (tmp_path / "l").mkdir()
    candidate = Adapter(tmp_path / "c", BEFORE, codes)  # just trained for `task`
    legacy = legacy_prompt_fingerprint(task, PromptStyle.compact, list(codes.values()))
    assert trained_for_same_prompt(Adapter(tmp_path / "l", BEFORE), candidate, task)
    assert trained_for_same_prompt(Adapter(tmp_path / "l", legacy), candidate, task)
    stale = fingerprint(edited(STUDENT["labels reordered"]))
    assert not trained_for_same_prompt(Adapter(tmp_path / "l", stale), candidate, task)


# ---- what the service and the next distil do with a refused adapter ---------------------------
def _stale_adapter(folder: Path, fingerprint: str, weights: bytes = b"w") -> Path:
    from services.student.registry import META_FILE

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / META_FILE).write_text(json.dumps({
        "base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact",
        "task": {"name": "t", "prompt_fingerprint": fingerprint}}))
    return folder


async def test_a_refused_adapter_leaves_the_service_on_the_base_model(tmp_path, monkeypatch, caplog):
    import asyncio
    import logging
    from contextlib import asynccontextmanager

    from services.settings import Settings
    from services.stream import app as app_module
    from services.student.registry import AdapterRegistry

    registry = AdapterRegistry(tmp_path / "registry")
    registry.promote(registry.add(_stale_adapter(tmp_path / "stale", "0123456789abcdef")).adapter_id, "test")

    class Classifier:  # the engine's adapter check over the fake tokenizer's codes
        live_adapter = None

        def __init__(self, task):
            self.task, self.codes = task, build_all_codes(task, OneTokenCodes())

        async def use_adapter(self, adapter):
            if adapter is not None:
                check_adapter_servable(adapter, self.task, self.codes, max_lora_rank=16)
            self.live_adapter = adapter

    @asynccontextmanager
    async def started(config, task, adapter=None):
        yield Classifier(task)

    monkeypatch.setattr(app_module, "started_classifier", started)
    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", metrics_port=0, role="student",
                        registry_dir=tmp_path / "registry", data_dir=tmp_path / "data", registry_poll_s=0.05)
    service = app_module.TriageService(settings)
    with caplog.at_level(logging.DEBUG, logger="services.stream.app"):
        async with service.resources() as pipeline:  # starts instead of crashing
            assert pipeline.classifier.live_adapter is None  # the base model: uncalibrated
            await asyncio.sleep(0.3)  # a few registry polls retry it
    tracebacks = [r for r in caplog.records if r.exc_info and "refusing to serve it" in str(r.exc_info[1])]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]  # once, not every poll
    assert any(r.levelno == logging.DEBUG and "hot-swap" in r.getMessage() for r in caplog.records)


async def test_the_next_distil_gates_against_no_adapter_when_the_live_one_is_stale(tmp_path):
    from services.student.registry import AdapterRegistry, content_id
    from services.teacher.training_log import TrainingLog
    from tests.unit.test_gate import LABELS, GoldForOne
    from trainer.distill import DistillConfig, run_distill_async

    gold = {f"ticket number {i}": LABELS[i % len(LABELS)] for i in range(450)}  # certification part >= 258
    calib = tmp_path / "calib.tsv"
    calib.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in gold.items()))
    TrainingLog(tmp_path / "log.sqlite3").close()
    same, stale = "aaaaaaaaaaaaaaaa", "bbbbbbbbbbbbbbbb"

    async def distil(live_fingerprint: str, name: str) -> dict:
        registry = AdapterRegistry(tmp_path / f"reg-{name}")
        live = registry.add(_stale_adapter(tmp_path / f"live-{name}", live_fingerprint, b"live"))
        registry.promote(live.adapter_id, "setup")
        candidate = _stale_adapter(tmp_path / f"cand-{name}", same, b"new")

        class BothRight(GoldForOne):  # live and candidate equally good: only a comparison rejects
            async def classify(self, texts, *, adapter=None):
                self.good_id = adapter.adapter_id if adapter is not None else None
                return await super().classify(texts, adapter=adapter)

        cfg = DistillConfig(registry_dir=registry.root, log_path=tmp_path / "log.sqlite3",
                            model_path=tmp_path / "model", task_path=TASKS / "banking77.json",
                            work_dir=tmp_path / f"work-{name}", calibration_tsv=str(calib))
        return await run_distill_async(cfg, train_fn=lambda out, *_: shutil.copytree(candidate, out),
                                       classifier=BothRight(gold, content_id(candidate)))

    compared = await distil(same, "same")  # the live adapter is servable: a tie is no promotion
    assert not compared["promoted"] and "tied" in compared["reason"], compared["reason"]
    alone = await distil(stale, "stale")  # trained for another version of the task
    assert alone["promoted"] and "no adapter live" in alone["reason"], alone["reason"]
