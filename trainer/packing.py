"""The frozen layers' pass for a row's fields at once: the prompts of one ticket share
`Message: <ticket>\\n` and differ in a few tokens (`category:`, `priority:`, `entities:[...]`),
and causal layers give a shared prefix the same states whatever follows it. So each row is one
packed sequence, prefix + every field's suffix, where a suffix token attends to the prefix and
to its own suffix only and takes the positions it has in its own prompt. The states are the
ones the prompts would get one by one (tested); the frozen pass of a three-field task costs
about half the tokens.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        token = seqs[0][i]
        if any(s[i] != token for s in seqs[1:]):
            return i
    return n


def pack(groups: Sequence[Sequence[Sequence[int]]], pad_id: int, dtype: torch.dtype, device: Any):
    """Token ids [B, T], positions [B, T], additive attention mask [B, 1, T, T] and, per group,
    per sequence, the packed indices of its tokens in order."""
    layouts, width = [], 0
    for seqs in groups:
        p = common_prefix(seqs)
        ids, pos, seg, where = list(seqs[0][:p]), list(range(p)), [0] * p, []
        for j, s in enumerate(seqs, start=1):
            tail = list(s[p:])
            where.append(list(range(p)) + list(range(len(ids), len(ids) + len(tail))))
            ids += tail
            pos += list(range(p, p + len(tail)))
            seg += [j] * len(tail)
        layouts.append((ids, pos, seg, where))
        width = max(width, len(ids))
    ids_t = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((len(groups), width), dtype=torch.long)
    seg_t = torch.full((len(groups), width), -1, dtype=torch.long)  # -1: padding
    for b, (ids, pos, seg, _) in enumerate(layouts):
        ids_t[b, : len(ids)], pos_t[b, : len(pos)], seg_t[b, : len(seg)] = (
            torch.tensor(ids), torch.tensor(pos), torch.tensor(seg))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    q, k = seg_t.unsqueeze(2), seg_t.unsqueeze(1)  # [B, T, 1], [B, 1, T]
    allowed = causal & ((k == 0) | (k == q)) & (k >= 0) & (q >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # a padding token sees itself: no empty rows
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return (ids_t.to(device), pos_t.to(device), mask.unsqueeze(1).to(device), [w for *_, w in layouts])


def run_packed(inner: Any, layers: Sequence[Any], ids: torch.Tensor, positions: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    hidden = inner.embed_tokens(ids)
    rope = inner.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


@torch.no_grad()
def frozen_states(inner: Any, cut: int, groups: Sequence[Sequence[Any]], pad_id: int, device: Any) -> list[list[torch.Tensor]]:
    """Per group (one row's examples), per example: its states after the frozen layers, on CPU."""
    ids, positions, mask, where = pack([[e.input_ids for e in g] for g in groups], pad_id,
                                       inner.embed_tokens.weight.dtype, device)
    hidden = run_packed(inner, inner.layers[:cut], ids, positions, mask)
    return [[hidden[b, torch.tensor(w, device=hidden.device)].to("cpu", copy=True) for w in per_seq]
            for b, per_seq in enumerate(where)]


def row_batches(examples: Sequence[Any], order: Sequence[int], per_batch: int, rng: Any) -> list[list[list[int]]]:
    """The examples of `order` grouped by row (Encoded.row), groups sorted by length (random
    among equals) into batches of about `per_batch` examples, batches shuffled."""
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(examples[i].row, []).append(i)
    keyed = sorted(groups.values(), key=lambda g: (max(len(examples[i].input_ids) for i in g), rng.random()))
    batches, current, count = [], [], 0
    for group in keyed:
        current.append(group)
        count += len(group)
        if count >= per_batch:
            batches.append(current)
            current, count = [], 0
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches
