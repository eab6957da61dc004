"""The packed frozen pass gives each prompt exactly the states it gets on its own."""

import torch

from trainer.packing import common_prefix, frozen_states


class Ex:
    def __init__(self, ids):
        self.input_ids = tuple(ids)


def test_packed_rows_match_prompts_run_one_by_one():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    inner = model.model
    rows = [[[1, 2, 3, 4, 5, 10], [1, 2, 3, 4, 5, 11, 12], [1, 2, 3, 4, 5, 13, 14, 15, 16]],
            [[7, 8, 20], [7, 8, 21]],
            [[9, 9, 9, 9]]]
    groups = [[Ex(s) for s in row] for row in rows]
    packed = frozen_states(inner, 2, groups, pad_id=0, device="cpu")
    for row, states in zip(rows, packed):
        for seq, got in zip(row, states):
            with torch.no_grad():
                hidden = inner.embed_tokens(torch.tensor([seq]))
                positions = torch.arange(len(seq)).unsqueeze(0)
                rope = inner.rotary_emb(hidden, position_ids=positions)
                for layer in inner.layers[:2]:
                    out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rope)
                    hidden = out[0] if isinstance(out, tuple) else out
            assert got.shape == (len(seq), 32)
            torch.testing.assert_close(got, hidden[0], rtol=1e-4, atol=1e-5)
    assert common_prefix([[1, 2, 3], [1, 2, 4]]) == 2 and common_prefix([[1, 2], [1, 2, 3]]) == 2
