"""The model path is never destroyed: conversion writes only the default folder; a path the
user named is used as it is or refused with the path and what it lacks."""

from __future__ import annotations

import pytest

from services.student import model_store
from services.student.model_store import ModelPathError, ensure_student_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """The default cache under tmp, and a conversion that records its calls instead of running."""
    monkeypatch.setenv("TRIAGE_CACHE_DIR", str(tmp_path / "cache"))
    calls = []

    def fake_convert(model_dir):
        calls.append(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text("{}")
        (model_dir / "model.safetensors").write_bytes(b"w")
        return model_dir

    monkeypatch.setattr(model_store, "_convert_packaged", fake_convert)
    return calls


def hf_folder(path, weights="pytorch_model.bin"):
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / weights).write_bytes(b"weights")
    return path


def snapshot(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model-00001-of-00002.safetensors", "model.pt"])
def test_a_user_model_in_any_loadable_format_is_used_untouched(tmp_path, cache, weights):
    model = hf_folder(tmp_path / "my-7b", weights)
    before = snapshot(model)
    assert ensure_student_model(model) == model
    assert snapshot(model) == before and cache == []


def test_a_typo_path_is_an_error_naming_it_and_is_not_created(tmp_path, cache):
    typo = tmp_path / "modles" / "my-7b"
    with pytest.raises(ModelPathError, match=f"{typo}: no such folder"):
        ensure_student_model(typo)
    assert not typo.exists() and not typo.parent.exists() and cache == []


def test_an_existing_folder_without_a_model_errors_and_is_kept(tmp_path, cache):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelPathError, match="missing config.json and weights"):
        ensure_student_model(empty)
    assert empty.is_dir()
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "config.json").write_text("{}")
    (notes / "README.md").write_text("mine")
    before = snapshot(notes)
    with pytest.raises(ModelPathError, match=r"notes: missing weights \(\*\.safetensors"):
        ensure_student_model(notes)
    assert snapshot(notes) == before
    a_file = tmp_path / "model.gguf"
    a_file.write_bytes(b"gguf")
    with pytest.raises(ModelPathError, match="not a folder"):
        ensure_student_model(a_file)
    assert a_file.read_bytes() == b"gguf" and cache == []


def test_the_default_path_is_converted_once(cache):
    default = model_store.default_model_dir()
    assert ensure_student_model() == default == ensure_student_model(default)
    assert cache == [default]  # the second call found it converted


def test_an_empty_default_folder_is_converted_into(cache):
    default = model_store.default_model_dir()
    default.mkdir(parents=True)
    assert ensure_student_model(default) == default and cache == [default]


def test_a_default_folder_holding_something_else_is_not_replaced(cache):
    default = model_store.default_model_dir()
    default.mkdir(parents=True)
    (default / "keep.txt").write_text("someone's")
    with pytest.raises(ModelPathError, match="not empty"):
        ensure_student_model()
    assert (default / "keep.txt").read_text() == "someone's" and cache == []


def test_cli_reports_a_bad_model_path_without_a_traceback(tmp_path, cache, monkeypatch, capsys):
    from services.cli import main

    monkeypatch.setenv("TRIAGE_MODEL_PATH", str(tmp_path / "typo"))
    assert main(["model"]) == 2
    assert f"triage model: model path {tmp_path / 'typo'}: no such folder" in capsys.readouterr().err
    monkeypatch.setenv("TRIAGE_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    assert main(["serve"]) == 2
    assert "triage serve: model path" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
