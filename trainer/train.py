"""LoRA re-distillation of the student, trained exactly as it is served: one token per field.

Run (CPU defaults; BANKING77's train split standing in for the teacher's labels):
    HF_HUB_OFFLINE=1 python -m trainer.train --out-dir var/runs/b77 \
        --train-tsv train.tsv    # any TSV/JSONL with the task's labels (e.g. BANKING77's train split)
From the training log, as `trainer.distill` runs it:
    HF_HUB_OFFLINE=1 python -m trainer.train --out-dir var/runs/x --log-path ~/.cache/triage/data/training_log.sqlite3
GPU with a 7B base: the same script, arguments only (device auto -> cuda, dtype auto -> bf16):
    python -m trainer.train --out-dir var/runs/q7 --base-model /models/Qwen2.5-7B-Instruct \
        --log-path training_log.sqlite3 --lora-layers 0 --batch-size 64 --max-minutes 60

What is trained. Serving renders `services.student.prompting` compact prompts, restricts the next token
to the field's label codes and renormalises over them. So the loss is cross-entropy over the
code tokens only, at the last prompt position only: hidden state of the last real token ->
final norm -> `lm_head.weight[code_ids]` -> softmax over the field's codes. No full-vocabulary
logits, no loss on prompt tokens. Only LoRA on linear layers (what vLLM serves), only on the
top `--lora-layers` layers: the layers below are frozen, so their output for each prompt is
computed once (no grad, the "prefix cache") and every epoch runs only the top layers.
Batches are length-bucketed and right-padded (causal attention never looks at the pads; the
last real token is at `length - 1`), so nearly no compute goes to padding.

Why these defaults (2 shared CPU cores, SmolLM2-135M, BANKING77; measurements and the
tables in trainer/README.md and bench/README.md):
- top 8 of 30 layers: an example costs 22 frozen layer-forwards once plus ~24 per epoch;
- bf16 autocast (AVX512-BF16): frozen pass 1.17 -> 0.71 s, LoRA step 0.72 -> 0.40 s per batch;
- lr 2e-3, 5% warm-up, cosine on max(step share, time share), so a budget cut still anneals;
  r=16 on all 7 linear modules; batch 32;
- 8 epochs with label smoothing 0.1: smoothing stops the later epochs over-fitting, so the
  longer run pays (product path on BANKING77 test: 6 epochs 91.9% / 21.5% and 19.9% escalated
  at eps 3% in two runs, 8 epochs 92.1% / 18.6% on the second run's training log);
- the frozen pass gets at most 40% of the budget: under heavy load (10x slower) the run
  trains its epochs on the examples that pass reached instead of part of one epoch on all.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from schemas.task import TaskSpec, default_task_path
from schemas.training import DEFAULT_COLD_ROWS_UNTIL, DEFAULT_HELDOUT_FRACTION, content_hash
from services.student.prompting import PromptStyle, build_all_codes, prompt_fingerprint
from services.student.registry import META_FILE
from trainer import dataset, packing, reuse
from trainer.layers import batch_hidden, buckets, decoder, run_layers

ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class TrainArgs:
    out_dir: str = field(metadata={"help": "adapter folder to create (must not exist)"})
    base_model: str = field(default="", metadata={"help": "HF folder; default: the student"})
    task_path: str = field(default="", metadata={"help": "TaskSpec JSON; default: banking77"})
    log_path: str = field(default="", metadata={"help": "training log (SQLite) to train on"})
    log_version: int | None = field(default=None, metadata={"help": "default: current"})
    train_tsv: str = field(default="", metadata={"help": "labelled TSV instead of the log"})
    max_examples: int = field(default=0, metadata={"help": "0 = all training rows"})
    entity_empty_ratio: float = field(default=1.0, metadata={
        "help": "entities field: train on every row with an entity and this many `[]` rows per "
                "such row (the rest train their other fields only); < 0 = all rows"})
    val_fraction: float = field(default=0.05, metadata={"help": "content-hash split"})
    heldout_fraction: float = field(default=DEFAULT_HELDOUT_FRACTION, metadata={
        "help": "log rows: share of bootstrap rows held out for calibration (never trained on)"})
    heldout_cold_rows_until: int = field(default=DEFAULT_COLD_ROWS_UNTIL, metadata={
        "help": "cold-start evaluation-sample rows stay held out until the sample has this many"})
    rows_manifest: str = field(default="", metadata={
        "help": "write the content hashes of every row trained or validated on here"})
    exclude_tsv: str = field(default="", metadata={
        "help": "a file whose texts are never trained on (distill's --calibration-tsv)"})
    entity_loss: str = field(default="sum", metadata={
        "help": "entities field: 'sum' of the answer's token losses (the few tokens that decide "
                "an entity weigh as much as a categorical code each) or 'mean' per example",
        "choices": ["sum", "mean"]})
    lora_layers: int = field(default=8, metadata={"help": "LoRA on the top K layers; 0 = all"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    target_modules: str = ALL_LINEAR
    lr: float = 2e-3
    warmup: float = field(default=0.05, metadata={"help": "fraction of the run"})
    weight_decay: float = 0.0
    # Issue 24 (bench/README.md, product path on BANKING77): the figures are in the docstring.
    label_smoothing: float = field(default=0.1, metadata={
        "help": "categorical codes: share of the target's probability spread over the other codes"})
    rdrop: float = field(default=0.0, metadata={
        "help": "R-Drop: weight of the symmetric KL between two dropout passes' code distributions "
                "(needs lora_dropout > 0; doubles the LoRA layers' cost)"})
    epochs: float = field(default=8.0, metadata={"help": "passes over the training rows; "
                          "the time budget anneals the schedule sooner when it runs out"})
    batch_size: int = 32
    max_tokens: int = field(default=256, metadata={"help": "prompt tokens: longer tickets are cut head+tail "
                            "to fit; recorded with the adapter, serving cuts them the same way"})
    max_minutes: float = field(default=28.0, metadata={"help": "whole run, load to save"})
    max_steps: int = field(default=0, metadata={"help": "0 = epochs decide (tests use it)"})
    init_adapter: str = field(default="", metadata={"help": "start from this adapter's weights "
                              "(the live one: a warm start) when its LoRA shape and codes match"})
    prefix_cache: str = field(default="", metadata={"help": "folder keeping the frozen layers' "
                              "outputs between runs (trainer/prefix_cache.py); '' = off"})
    prefix_share: float = field(default=0.4, metadata={"help": "max share of the budget for the "
                                "frozen-layer pass; examples it does not reach are not used"})
    device: str = "auto"
    dtype: str = field(default="auto", metadata={"help": "auto: bf16 on cuda, fp32 on cpu"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads; 0 = torch default"})
    cpu_bf16: str = field(default="auto", metadata={"help": "bf16 autocast for training on CPU: "
                          "auto = on if the CPU has AVX512-BF16/AMX; eval stays fp32"})
    seed: int = 0


# --- the loss ---------------------------------------------------------------------------------
def code_loss(inner, head_rows, code_ids, hidden, lengths, batch, entity_loss: str = "sum",
              label_smoothing: float = 0.0, logits_out: list | None = None):
    """Cross-entropy over each field's code tokens at the last real position, and for the
    entities field the next-token cross-entropy over the answer's JSON tokens (full vocabulary:
    a span can be any text), summed or averaged per answer by `entity_loss`:
    (sum over examples, n correct)."""
    if entity_loss not in ("sum", "mean"):
        raise ValueError(f"entity_loss must be 'sum' or 'mean', not {entity_loss!r}")
    last = inner.norm(hidden[torch.arange(len(batch)), lengths - 1])
    loss, correct = hidden.new_zeros(()), 0
    for name, ids in code_ids.items():
        rows = [r for r, e in enumerate(batch) if e.field == name]
        if not rows:
            continue
        logits = last[rows].float() @ head_rows[ids].float().T  # [n, n_codes]
        targets = torch.tensor([batch[r].target for r in rows], device=logits.device)
        loss = loss + F.cross_entropy(logits, targets, reduction="sum", label_smoothing=label_smoothing)
        if logits_out is not None:
            logits_out.append(logits)
        correct += int((logits.argmax(-1) == targets).sum())
    answers = [(r, e) for r, e in enumerate(batch) if e.answer_len]
    if answers:  # one matmul for every answer token of the batch
        rows = torch.tensor([r for r, e in answers for _ in range(e.answer_len)], device=hidden.device)
        cols = torch.tensor([p for _, e in answers for p in range(len(e.input_ids) - e.answer_len - 1,
                                                                   len(e.input_ids) - 1)], device=hidden.device)
        targets = torch.tensor([t for _, e in answers for t in e.input_ids[-e.answer_len:]], device=hidden.device)
        logits = inner.norm(hidden[rows, cols]).float() @ head_rows.float().T  # [tokens, vocab]
        token_loss = F.cross_entropy(logits, targets, reduction="none")
        right = logits.argmax(-1) == targets
        start = 0
        for _, e in answers:
            # "sum": the syntax tokens are learnt at once and cost ~0 after; what is left are
            # the decisions (one more entity?, its type, its span), each weighing one like a
            # code. "mean" divided them by the answer's length (~12 tokens per entity).
            part = token_loss[start : start + e.answer_len]
            loss = loss + (part.sum() if entity_loss == "sum" else part.mean())
            correct += int(right[start : start + e.answer_len].all())
            start += e.answer_len
    return loss, correct


@torch.no_grad()
def accuracy(inner, cut, head_rows, code_ids, examples, states, pad_id, device, batch_size=64):
    if not examples:
        return {"n": 0}
    total_loss, correct = 0.0, 0
    for idx in buckets(examples, batch_size, random.Random(0)):
        hidden, lengths = batch_hidden(inner, cut, states, examples, idx, pad_id, device)
        hidden = run_layers(inner, inner.layers[cut:], hidden)
        loss, right = code_loss(inner, head_rows, code_ids, hidden, lengths, [examples[i] for i in idx])
        total_loss, correct = total_loss + float(loss), correct + right
    return {"n": len(examples), "accuracy": correct / len(examples), "nll": total_loss / len(examples)}


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warm-up, then cosine to zero, over progress in [0, 1]."""
    if progress < warmup:
        return peak * progress / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))


# --- the run -----------------------------------------------------------------------------------
def load_data(args: TrainArgs, task: TaskSpec, codes, tokenizer):
    """Rows -> dedup -> content-hash split -> compact prompts with code targets."""
    if args.train_tsv:
        rows, version, source = dataset.read_tsv(args.train_tsv, task), None, args.train_tsv
    elif args.log_path:
        rows, version = dataset.rows_from_log(args.log_path, args.log_version)
        source = args.log_path
    else:
        raise SystemExit("give --log-path or --train-tsv")
    data = dataset.build(rows, task, val_fraction=args.val_fraction, data_version=version,
                         heldout_fraction=args.heldout_fraction if args.log_path and not args.train_tsv else None,
                         cold_rows_until=args.heldout_cold_rows_until,
                         exclude=dataset.file_keys(args.exclude_tsv) if args.exclude_tsv else ())
    if args.max_examples and len(data.train) > args.max_examples:
        data.train = random.Random(args.seed).sample(data.train, args.max_examples)
        data.counts["train"] = len(data.train)
        data.data_hash = dataset.data_hash(data.train + data.validation)
    if not data.train:
        raise SystemExit(f"no training rows in {source}")
    data.train = dataset.balance_entities(data.train, task, args.entity_empty_ratio)
    encode = lambda rows: dataset.encode(rows, task, codes, tokenizer, max_tokens=args.max_tokens)  # noqa: E731
    return data, source, encode(data.train), encode(data.validation)


def main(args: TrainArgs) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.student.model_store import ensure_student_model

    t0 = time.monotonic()
    deadline = t0 + args.max_minutes * 60
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    # bf16 matmuls are ~2.5x faster than fp32 on AVX512-BF16 CPUs; weights, LoRA master copies
    # and the loss stay fp32, and every evaluation below runs in fp32 (as vLLM serves on CPU).
    autocast = device.type == "cpu" and dtype == torch.float32 and (
        args.cpu_bf16 == "on" or (args.cpu_bf16 == "auto" and cpu_has_bf16()))
    args.base_model = str(args.base_model or ensure_student_model())
    task = TaskSpec.from_file(args.task_path or default_task_path())
    out_dir = Path(args.out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; adapters are written once")

    tokenizer = AutoTokenizer.from_pretrained(args.base_model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    codes = build_all_codes(task, tokenizer)
    data, source, train, val = load_data(args, task, codes, tokenizer)
    if args.rows_manifest:  # what this adapter saw, for audits ("was this row trained on?")
        Path(args.rows_manifest).write_text("".join(
            content_hash(r.text) + "\n" for r in data.train + data.validation))

    # Model: frozen base in fp32 (cpu) / bf16 (cuda), LoRA on the top K layers' linear modules.
    model = AutoModelForCausalLM.from_pretrained(args.base_model, dtype=dtype).to(device)
    model.requires_grad_(False)
    n_layers = model.config.num_hidden_layers
    k = n_layers if args.lora_layers <= 0 else min(args.lora_layers, n_layers)
    cut = n_layers - k
    lora = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
        target_modules=args.target_modules.split(","), layers_to_transform=list(range(cut, n_layers)),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    warm = reuse.warm_start(model, args.init_adapter, lora, codes) if args.init_adapter else None
    inner = decoder(model)
    head_rows = model.get_base_model().get_output_embeddings().weight  # tied or not: same rows
    code_ids = {name: torch.tensor(c.token_ids, device=device) for name, c in codes.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    # Outputs of the frozen layers [0, cut), per example, filled once by the frozen pass below
    # (validation: by its first evaluation). cut == 0: nothing frozen, embeddings are cheap.
    val = val[:256]  # enough to follow learning; the real evaluation is trainer.evaluate
    states, val_states = ([None] * len(x) if cut else None for x in (train, val))

    def step_on(idx, lr: float):
        for group in opt.param_groups:
            group["lr"] = lr
        passes = []
        for _ in range(2 if args.rdrop > 0 else 1):  # R-Drop: two passes, different dropout masks
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                hidden, lengths = batch_hidden(inner, cut, states, train, idx, pad_id, device)
                hidden = run_layers(inner, inner.layers[cut:], hidden)
            logits = []
            passes.append((*code_loss(inner, head_rows, code_ids, hidden.float(), lengths, [train[i] for i in idx],
                                      args.entity_loss, args.label_smoothing, logits), logits))
        loss, right = passes[0][0], passes[0][1]
        if len(passes) == 2:
            loss = (loss + passes[1][0]) / 2
            for a, b in zip(passes[0][2], passes[1][2]):
                la, lb = F.log_softmax(a, -1), F.log_softmax(b, -1)
                kl = F.kl_div(la, lb, log_target=True, reduction="sum") + F.kl_div(lb, la, log_target=True, reduction="sum")
                loss = loss + args.rdrop * kl / 2
        (loss / len(idx)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item() / len(idx), right / len(idx)

    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    model.train()
    t_train = time.monotonic()
    budget = max(1.0, (deadline - t_train) * 0.9 - 30)  # leave time to evaluate and save
    rng.shuffle(train_order := list(range(len(train))))
    prefix_minutes, prefix_computed, cache = 0.0, 0, None
    if states is not None and args.prefix_cache:
        cache = reuse.PrefixCache(args.prefix_cache, args.base_model, cut, f"{dtype_name}-bf16autocast={autocast}")
        print(f"frozen-layer cache: {cache.fill(train, states)} of {len(train)} examples")
    if states is not None and not args.max_steps:
        # Frozen pass first, in random order, for at most prefix_share of the budget: on a
        # slow or shared CPU the run then trains `epochs` passes over the examples it covered
        # instead of a fraction of one pass over all of them. Quiet 2 cores: all of BANKING77.
        t_prefix = time.monotonic()
        prefix_budget = args.prefix_share * budget
        # Several fields: a row's prompts share the ticket's prefix; run it once (trainer/packing.py).
        packed = len(task.fields) > 1
        pending = [i for i in train_order if states[i] is None]  # the prefix cache filled the rest
        batches = (packing.row_batches(train, pending, 64, random.Random(args.seed)) if packed else
                   buckets([train[i] for i in pending], 64, random.Random(args.seed)))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            for idx in tqdm(batches, desc="frozen layers", unit="batch"):
                if time.monotonic() - t_prefix > prefix_budget:
                    break
                if packed:
                    for group, got in zip(idx, packing.frozen_states(inner, cut, [[train[i] for i in g] for g in idx],
                                                                     pad_id, device)):
                        for i, state in zip(group, got):
                            states[i] = state
                else:
                    batch_hidden(inner, cut, states, train, [pending[i] for i in idx], pad_id, device)
        train_order = [i for i in train_order if states[i] is not None]
        prefix_computed = sum(states[i] is not None for i in pending)
        prefix_minutes = (time.monotonic() - t_prefix) / 60
        print(f"frozen pass: {len(train_order)} of {len(train)} examples in {prefix_minutes:.1f} min")
        budget, t_train = budget - (time.monotonic() - t_train), time.monotonic()  # the rest: LoRA steps
    subset = train_order
    total_steps = args.max_steps or max(1, math.ceil(args.epochs * len(subset) / args.batch_size))
    step, seen, epoch, progress, ema_loss, ema_acc, curve = 0, 0, 0, 0.0, None, None, []
    bar = tqdm(total=total_steps, desc="train", unit="step")
    while progress < 1.0:
        for idx in buckets([train[i] for i in subset], args.batch_size, rng):
            progress = max(step / total_steps, (time.monotonic() - t_train) / budget)
            if progress >= 1.0:
                break
            batch_loss, batch_acc = step_on([subset[i] for i in idx], lr_at(progress, args.lr, args.warmup))
            step, seen = step + 1, seen + len(idx)
            ema_loss = batch_loss if ema_loss is None else 0.95 * ema_loss + 0.05 * batch_loss
            ema_acc = batch_acc if ema_acc is None else 0.95 * ema_acc + 0.05 * batch_acc
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.2f}", lr=f"{opt.param_groups[0]['lr']:.1e}")
        epoch += 1
        if val and progress < 1.0:  # learning curve: fp32 accuracy on the validation split
            model.eval()
            point = accuracy(inner, cut, head_rows, code_ids, val, val_states, pad_id, device)
            curve.append({"epoch": epoch, "step": step, "minutes": round((time.monotonic() - t_train) / 60, 2), **point})
            bar.write(f"epoch {epoch}: validation {point}")
            model.train()
    bar.close()
    train_minutes = (time.monotonic() - t_train) / 60
    if cache is not None:
        cache.save(train, states)  # every state this run computed or reused

    model.eval()
    val_metrics = accuracy(inner, cut, head_rows, code_ids, val, val_states, pad_id, device)

    # Save into a sibling temp folder, then rename: a killed run never leaves a half adapter.
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    config_file = Path(args.base_model) / "config.json"
    metrics = {
        "steps": step, "examples_seen": seen, "examples_used": len(subset), "epochs": seen / max(1, len(subset)),
        "curve": curve,
        "train_loss_ema": ema_loss, "train_acc_ema": ema_acc,
        "train_minutes": round(train_minutes, 2), "cpu_bf16_autocast": autocast,
        "prefix_minutes": round(prefix_minutes, 2), "prefix_computed": prefix_computed,
        "prefix_cache_hits": cache.hits if cache is not None else None,
        "warm_start": warm,
        "total_minutes": round((time.monotonic() - t0) / 60, 2),
        "validation": val_metrics,
        "trainable_params": sum(p.numel() for p in trainable),
    }
    meta = {
        "format": 1,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "base_model": {
            "path": args.base_model, "name": Path(args.base_model).name,
            "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.exists() else None,
        },
        "prompt_style": PromptStyle.compact.value,
        "max_prompt_tokens": args.max_tokens,  # serving cuts long tickets as trained (prompting.prompt_budget)
        "task": {
            "name": task.name,
            "prompt_fingerprint": prompt_fingerprint(task, PromptStyle.compact, list(codes.values())),
            "fields": {n: {"labels": list(c.labels), "codes": list(c.codes), "token_ids": list(c.token_ids)}
                       for n, c in codes.items()},
        },
        "data": {"source": str(source), **data.describe(),
                 "used_rows_hash": dataset.data_hash([data.train[r] for r in sorted({train[i].row for i in subset})])},
        "hyperparameters": {**asdict(args), "cut": cut, "lora_layer_range": [cut, n_layers],
                            "device": device.type, "dtype": dtype_name, "total_steps": total_steps},
        "train_metrics": metrics,
        "eval": None,
        "threshold": None,
    }
    (partial / META_FILE).write_text(json.dumps(meta, indent=1))
    partial.rename(out_dir)
    print(json.dumps({"out_dir": str(out_dir), **metrics}, indent=1))
    return {"out_dir": str(out_dir), "meta": meta}


if __name__ == "__main__":
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(TrainArgs).parse_args_into_dataclasses()
    main(parsed)
