"""The entities field's loss: every decision in the answer weighs like a categorical code."""

import pytest
import torch
import torch.nn.functional as F

from trainer.dataset import Encoded
from trainer.train import code_loss


class Inner:
    norm = torch.nn.Identity()


def _case():
    torch.manual_seed(0)
    vocab, width = 11, 8
    head = torch.randn(vocab, width)
    # one categorical example (3 codes) and one entities example with a 4-token answer
    cat = Encoded((1, 2, 3), "category", 2, 0)
    ent = Encoded((1, 2, 5, 6, 7, 8, 9), "entities", -1, 1, answer_len=4)
    hidden = torch.randn(2, 7, width)
    lengths = torch.tensor([3, 7])
    return head, {"category": torch.tensor([4, 5, 6])}, hidden, lengths, [cat, ent]


def test_sum_counts_every_answer_token_and_mean_divides_by_the_answer():
    head, codes, hidden, lengths, batch = _case()
    cat_loss = F.cross_entropy((hidden[0, 2] @ head[[4, 5, 6]].T)[None], torch.tensor([2]))
    # answer tokens 6..9 are predicted from positions 2..5
    token_losses = F.cross_entropy(hidden[1, 2:6] @ head.T, torch.tensor([6, 7, 8, 9]), reduction="none")
    total, _ = code_loss(Inner(), head, codes, hidden, lengths, batch, "sum")
    assert torch.allclose(total, cat_loss + token_losses.sum())
    per_example, _ = code_loss(Inner(), head, codes, hidden, lengths, batch, "mean")
    assert torch.allclose(per_example, cat_loss + token_losses.mean())
    assert total > per_example  # four tokens, each a full unit of loss under "sum"


def test_an_unknown_reduction_is_refused_not_treated_as_mean():
    head, codes, hidden, lengths, batch = _case()
    with pytest.raises(ValueError, match="entity_loss"):
        code_loss(Inner(), head, codes, hidden, lengths, batch, "avg")
