"""What a distillation cycle reuses from the previous one: the frozen layers' outputs (on
disk) and, for a warm start, the live adapter's weights.

Frozen-layer outputs.
The trainer puts LoRA on the top K layers only; the layers below are the base model's, frozen,
so a prompt's output from them never changes between cycles. The frozen pass is the biggest
single cost of a cycle on CPU (26 of 30 layer-forwards per example, ~40% of a 3-epoch run),
and each nightly cycle re-reads yesterday's rows plus a few new ones. Cached, a cycle pays the
frozen pass only for the rows it has not seen.

One file per (base model, cut, dtype): a dict {sha1(input ids): tensor [tokens, hidden]}.
Prompts are right-padded and attention is causal, so a prompt's states do not depend on its
batch: reusing them is exact. Each save keeps only the current run's rows (no unbounded
growth) and is atomic (temp file + rename): a killed run leaves the old cache intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from services.student.registry import META_FILE


def prompt_key(input_ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(map(str, input_ids)).encode()).hexdigest()


class PrefixCache:
    def __init__(self, folder: str | Path, base_model: str | Path, cut: int, precision: str) -> None:
        base = Path(base_model)
        fingerprint = hashlib.sha256()
        for name in ("config.json", "model.safetensors"):  # what decides the frozen outputs
            path = base / name
            if path.exists():
                stat = path.stat()
                fingerprint.update(f"{name}:{stat.st_size}:{int(stat.st_mtime)}".encode())
        fingerprint.update(f"{base.resolve()}|cut={cut}|{precision}".encode())
        self.path = Path(folder) / f"frozen-{fingerprint.hexdigest()[:16]}.pt"
        self.hits = 0

    def fill(self, examples: Sequence[Any], states: list) -> int:
        """Put cached states into `states` (index-aligned with `examples`); returns the hits."""
        if not self.path.exists():
            return 0
        try:
            cached = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # a corrupt or foreign file is a cache miss, not a failed run
            return 0
        for i, example in enumerate(examples):
            state = cached.get(prompt_key(example.input_ids))
            if state is not None and state.shape[0] == len(example.input_ids):
                states[i] = state
                self.hits += 1
        return self.hits

    def save(self, examples: Sequence[Any], states: list) -> None:
        entries = {prompt_key(e.input_ids): s for e, s in zip(examples, states) if s is not None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(f".{os.getpid()}.partial")
        torch.save(entries, partial)
        partial.replace(self.path)


def warm_start(model, adapter_dir: str, lora, codes) -> dict:
    """Load an earlier adapter's LoRA weights into `model` when it has the same shape (rank,
    alpha, modules, layers) and the same label codes; otherwise train from scratch. Either way
    the answer says what happened (it goes into the new adapter's metadata)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(adapter_dir)
    try:
        old = json.loads((folder / "adapter_config.json").read_text())
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError) as exc:
        return {"from": adapter_dir, "used": False, "why": f"unreadable: {exc}"}
    same_shape = (old.get("r") == lora.r and old.get("lora_alpha") == lora.lora_alpha
                  and set(old.get("target_modules") or []) == set(lora.target_modules)
                  and list(old.get("layers_to_transform") or []) == list(lora.layers_to_transform))
    old_codes = {n: f.get("codes") for n, f in meta.get("task", {}).get("fields", {}).items()}
    same_codes = old_codes == {n: list(c.codes) for n, c in codes.items()}
    if not (same_shape and same_codes):
        why = "different LoRA shape" if not same_shape else "different label codes"
        print(f"warm start: not from {adapter_dir} ({why}); training from scratch")
        return {"from": adapter_dir, "used": False, "why": why}
    result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
    missing = [k for k in getattr(result, "unexpected_keys", []) or []]
    print(f"warm start: from {adapter_dir}")
    return {"from": adapter_dir, "used": True, "unexpected_keys": len(missing)}
