"""Model pieces of the trainer: the decoder inside a PEFT model, a batch through some of its
layers, the frozen layers' states cached per example, length-bucketed batches."""

from __future__ import annotations

import random

import torch


def decoder(model):
    """The inner decoder (embed_tokens, layers, norm, rotary_emb) of a PEFT or plain model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def run_layers(inner, layers, hidden: torch.Tensor) -> torch.Tensor:
    """Right-padded batch through `layers`; no mask needed: causal attention ignores the pads."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    rope = inner.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    return hidden


def pad_ids(seqs: list[tuple[int, ...]], pad_id: int, device) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad_id] * (width - len(s)) for s in seqs], device=device)


def batch_hidden(inner, cut, states, examples, idx, pad_id, device):
    """Inputs of the top layers for one batch: the frozen layers' outputs, cached per example."""
    lengths = torch.tensor([len(examples[i].input_ids) for i in idx], device=device)
    missing = [i for i in idx if states is None or states[i] is None]
    if missing:
        with torch.no_grad():
            hidden = inner.embed_tokens(pad_ids([examples[i].input_ids for i in missing], pad_id, device))
            hidden = run_layers(inner, inner.layers[:cut], hidden)
        if states is None:
            return hidden, lengths
        for row, i in enumerate(missing):
            states[i] = hidden[row, : len(examples[i].input_ids)].to("cpu", copy=True)
    hidden = torch.nn.utils.rnn.pad_sequence([states[i] for i in idx], batch_first=True)
    return hidden.to(device), lengths


def buckets(examples, batch_size: int, rng: random.Random) -> list[list[int]]:
    """Length-sorted batches (random order among equal lengths), in shuffled order."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i].input_ids), rng.random()))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(chunks)
    return chunks
