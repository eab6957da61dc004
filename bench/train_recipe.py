"""Recipe measurements for trainer/train.py: real end-to-end runs under a time budget.

    HF_HUB_OFFLINE=1 python bench/train_recipe.py --minutes 28 --runs default
    HF_HUB_OFFLINE=1 python bench/train_recipe.py --minutes 10 --runs k8,lr1e-3 --examples 3000
    HF_HUB_OFFLINE=1 python bench/train_recipe.py --table      # what was measured so far

Each run trains on BANKING77 train (the stand-in teacher's labels) with the overrides below and
records train.py's own metrics: frozen-pass and training minutes, examples used, epochs, and
the per-epoch fp32 accuracy on the content-hash validation split (256 tickets, never trained
on). The held-out figure that counts comes afterwards from the serving engine:
    HF_HUB_OFFLINE=1 python -m trainer.evaluate --adapter var/bench/runs/<run> --out var/eval/<run>
Results append to var/bench/recipe.jsonl. On a shared 2-core machine the same computation can
take 1x to 12x as long depending on other processes: compare runs made back to back.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from services.dev.datasets import banking77_dir
from trainer import train as T

OUT = Path("var/bench")
RUNS: dict[str, dict] = {
    "default": {},
    "k2": dict(lora_layers=2),
    "k8": dict(lora_layers=8),
    "all-layers": dict(lora_layers=0),
    "lr1e-3": dict(lr=1e-3),
    "r32": dict(lora_r=32, lora_alpha=64),
    "epochs3": dict(epochs=3),
    "fp32": dict(cpu_bf16="off"),
    "attn-only": dict(target_modules="q_proj,k_proj,v_proj,o_proj"),
    # issue 24: top-8 for 4 epochs, then regularisers one at a time on top of it
    "k8e4": dict(lora_layers=8, epochs=4),
    "k8e4-ls": dict(lora_layers=8, epochs=4, label_smoothing=0.1),
    "k8e4-drop": dict(lora_layers=8, epochs=4, lora_dropout=0.1, weight_decay=0.01),
    "k8e4-rdrop": dict(lora_layers=8, epochs=4, lora_dropout=0.1, rdrop=1.0),
    "k8e4-reg": dict(lora_layers=8, epochs=4, label_smoothing=0.1, lora_dropout=0.1, weight_decay=0.01),
}


def run(name: str, minutes: float, examples: int) -> dict:
    overrides = RUNS[name]
    # runs with the same frozen layers share their outputs (trainer/reuse.py PrefixCache)
    cache = str(OUT / f"prefix-k{overrides.get('lora_layers', T.TrainArgs.lora_layers)}")
    args = T.TrainArgs(out_dir=str(OUT / "runs" / f"{name}-{int(time.time())}"),
                       train_tsv=str(banking77_dir() / "train.tsv"), max_minutes=minutes,
                       max_examples=examples, prefix_cache=cache, **overrides)
    m = T.main(args)["meta"]["train_metrics"]
    record = {"run": name, **RUNS[name], "minutes": minutes, "out_dir": args.out_dir,
              "examples_used": m["examples_used"], "epochs": round(m["epochs"], 2), "steps": m["steps"],
              "prefix_minutes": m["prefix_minutes"], "train_minutes": m["train_minutes"],
              "val_acc": m["validation"]["accuracy"], "val_nll": round(m["validation"]["nll"], 3),
              "curve": [(p["epoch"], p["minutes"], round(p["accuracy"], 3)) for p in m["curve"]]}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "recipe.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    gc.collect()
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=28.0)
    parser.add_argument("--runs", default="default", help=f"comma-separated: {', '.join(RUNS)}")
    parser.add_argument("--examples", type=int, default=0, help="training subset (0 = all)")
    parser.add_argument("--table", action="store_true")
    opts = parser.parse_args()
    if opts.table:
        path = OUT / "recipe.jsonl"
        print(path.read_text() if path.exists() else "nothing measured yet")
        return
    for name in opts.runs.split(","):
        print(run(name, opts.minutes, opts.examples))


if __name__ == "__main__":
    main()
