"""Adapter registry: content-hashed ids, idempotent add, atomic promote/rollback, kill safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from services.student.prompting import PromptStyle
from services.student.registry import (
    META_FILE, AdapterRef, AdapterRegistry, CurrentMoved, content_id, is_adapter_id,
)


def make_adapter(folder: Path, weights: bytes = b"w1", threshold: float | None = 0.9) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    meta = {
        "base_model": {"path": "/m", "name": "m"},
        "prompt_style": "compact",
        "task": {"name": "t", "prompt_fingerprint": "f"},
        "threshold": None if threshold is None else {"value": threshold, "epsilon": 0.03},
    }
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


def test_content_id_hashes_weights_and_config(tmp_path):
    a = make_adapter(tmp_path / "a", b"same")
    b = make_adapter(tmp_path / "b", b"same")
    c = make_adapter(tmp_path / "c", b"other")
    assert content_id(a) == content_id(b)
    assert content_id(a) != content_id(c)
    assert content_id(a).startswith("a-") and len(content_id(a)) == 18
    (b / "adapter_config.json").write_text(json.dumps({"r": 16, "peft_type": "LORA"}))
    assert content_id(a) != content_id(b)
    # metadata is not part of the id: thresholds can be set before add without changing it
    (a / META_FILE).write_text((a / META_FILE).read_text().replace("0.9", "0.8"))
    assert content_id(a) == content_id(make_adapter(tmp_path / "d", b"same"))


def test_add_is_content_hashed_and_idempotent(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    src = make_adapter(tmp_path / "src")
    ref = reg.add(src)
    assert ref.adapter_id == content_id(src)
    assert ref.path == (tmp_path / "reg" / "adapters" / ref.adapter_id).resolve()
    assert ref.prompt_style is PromptStyle.compact and ref.threshold == 0.9
    assert reg.add(src) == ref
    assert reg.add(make_adapter(tmp_path / "copy")) == ref  # same bytes elsewhere: same id
    assert [a.adapter_id for a in reg.list()] == [ref.adapter_id]
    assert not [p for p in (tmp_path / "reg" / "adapters").iterdir() if p.name.startswith(".")]
    assert reg.get(ref.adapter_id) == ref
    with pytest.raises(KeyError):
        reg.get("a-0000000000000000")


def test_add_refuses_folders_without_metadata_or_weights(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    bare = make_adapter(tmp_path / "bare")
    (bare / META_FILE).unlink()
    with pytest.raises(ValueError):
        reg.add(bare)
    empty = make_adapter(tmp_path / "empty")
    (empty / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError):
        reg.add(empty)
    assert reg.list() == []


def test_promote_and_rollback_move_current(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    assert reg.current() is None and reg.rollback() is None
    a = reg.add(make_adapter(tmp_path / "a", b"a"))
    b = reg.add(make_adapter(tmp_path / "b", b"b"))
    reg.promote(a.adapter_id, "first")
    reg.promote(b.adapter_id, "better")
    assert reg.current() == b
    reg.promote(b.adapter_id, "again")  # no-op: does not push b onto its own stack
    assert reg.rollback("bad") == a
    assert reg.current() == a
    assert reg.rollback("worse") is None
    assert reg.current() is None and reg.current_id() is None
    events = [(h["event"], h["adapter_id"], h["previous"]) for h in reg.history()]
    assert events == [
        ("promote", a.adapter_id, None),
        ("promote", b.adapter_id, a.adapter_id),
        ("rollback", a.adapter_id, b.adapter_id),
        ("rollback", None, a.adapter_id),
    ]
    with pytest.raises(KeyError):
        reg.promote("a-ffffffffffffffff", "unknown")


def test_pointer_write_is_atomic(tmp_path, monkeypatch):
    """A crash before os.replace leaves the old pointer intact and no visible temp file."""
    reg = AdapterRegistry(tmp_path / "reg")
    a = reg.add(make_adapter(tmp_path / "a", b"a"))
    b = reg.add(make_adapter(tmp_path / "b", b"b"))
    reg.promote(a.adapter_id, "first")
    before = reg.pointer_path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("power cut")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        reg.promote(b.adapter_id, "second")
    monkeypatch.undo()
    assert reg.pointer_path.read_bytes() == before
    assert reg.current() == a
    assert json.loads(before)["adapter_id"] == a.adapter_id


def test_interrupted_add_leaves_registry_unchanged(tmp_path, monkeypatch):
    reg = AdapterRegistry(tmp_path / "reg")
    src = make_adapter(tmp_path / "src")

    def crash(src_path, dst_path):
        raise OSError("killed")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError):
        reg.add(src)
    monkeypatch.undo()
    assert list((tmp_path / "reg" / "adapters").iterdir()) == []
    assert reg.add(src).adapter_id == content_id(src)


def test_adapter_ref_from_dir_without_threshold(tmp_path):
    ref = AdapterRef.from_dir(make_adapter(tmp_path / "a", threshold=None))
    assert ref.threshold is None and ref.adapter_id == content_id(tmp_path / "a")


def test_only_registry_ids_resolve(tmp_path):
    """`..`-paths, absolute paths and other names are not ids, even where a valid adapter
    folder sits at that path (the old `get` returned it)."""
    reg = AdapterRegistry(tmp_path / "reg")
    real = reg.add(make_adapter(tmp_path / "a", b"a"))
    outside = make_adapter(tmp_path / "outside", b"x")
    (reg.adapters_dir / "by-hand").mkdir()  # junk in adapters/ is neither listed nor loadable
    for bad in ["../../outside", str(outside), f"../adapters/{real.adapter_id}", "by-hand",
                real.adapter_id.upper(), real.adapter_id + "0", f"{real.adapter_id}/", ""]:
        assert not is_adapter_id(bad)
        with pytest.raises(KeyError):
            reg.get(bad)
        with pytest.raises(KeyError):
            reg.promote(bad, "attack")
    assert reg.current_id() is None and reg.history() == []
    assert [a.adapter_id for a in reg.list()] == [real.adapter_id]
    assert is_adapter_id(real.adapter_id) and reg.get(real.adapter_id) == real


def test_symlink_out_of_adapters_does_not_resolve(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    outside = make_adapter(tmp_path / "outside", b"x")
    fake_id = "a-" + "0" * 16
    (reg.adapters_dir / fake_id).symlink_to(outside, target_is_directory=True)
    with pytest.raises(KeyError):
        reg.get(fake_id)
    with pytest.raises(KeyError):
        reg.promote(fake_id, "attack")


def test_promote_compare_and_swap(tmp_path):
    """A distillation that compared against `a` must not overwrite a rollback made meanwhile."""
    reg = AdapterRegistry(tmp_path / "reg")
    a = reg.add(make_adapter(tmp_path / "a", b"a"))
    b = reg.add(make_adapter(tmp_path / "b", b"b"))
    reg.promote(a.adapter_id, "first")
    expected = reg.current_id()  # distill reads the live adapter ...
    reg.rollback("operator: a is bad")  # ... an operator rolls back while it trains
    history = reg.history()
    with pytest.raises(CurrentMoved) as info:
        reg.promote(b.adapter_id, "gate passed", expected_current=expected)
    assert (info.value.expected, info.value.actual) == (a.adapter_id, None)
    assert reg.current_id() is None and reg.history() == history  # nothing moved

    assert reg.promote(b.adapter_id, "gate passed", expected_current=None) == b  # base expected
    assert reg.current_id() == b.adapter_id
    with pytest.raises(CurrentMoved):
        reg.promote(a.adapter_id, "stale", expected_current=None)
    # already current: a no-op whatever was expected; no expectation = unconditional
    assert reg.promote(b.adapter_id, "again", expected_current=a.adapter_id) == b
    reg.promote(a.adapter_id, "by hand")
    assert reg.current_id() == a.adapter_id
    assert [h["event"] for h in reg.history()] == ["promote", "rollback", "promote", "promote"]
