"""The CPU LoRA fast path computes exactly what vLLM's per-token gather computed."""

import pytest

torch = pytest.importorskip("torch")

from services.student.vllm_plugins import bgmv_expand, bgmv_expand_slice, bgmv_shrink  # noqa: E402


def reference(inputs, weights, indices):
    selected = weights[indices]
    if selected.dim() == 4:
        selected = selected.squeeze(1)
    return torch.einsum("bi, boi -> bo", inputs, selected)


@pytest.mark.parametrize("indices", [[1, 1, 1, 1, 1], [0, 1, 1, -1, 0], [-1, -1, -1, -1, -1]])
def test_matches_per_token_gather(indices):
    torch.manual_seed(0)
    idx = torch.tensor(indices)
    x = torch.randn(5, 8)
    a = torch.randn(3, 1, 4, 8)  # shrink: [loras, 1, rank, hidden]
    out = torch.zeros(5, 4)
    bgmv_shrink(x, a, out, idx, scaling=0.5)
    torch.testing.assert_close(out, 0.5 * reference(x, a, idx))

    h = torch.randn(5, 4)
    b = torch.randn(3, 1, 6, 4)  # expand: [loras, 1, out, rank]
    base = torch.randn(5, 6)
    got = base.clone()
    bgmv_expand(h, b, got, idx, add_inputs=True)
    torch.testing.assert_close(got, base + reference(h, b, idx))

    wide = torch.zeros(5, 10)
    bgmv_expand_slice(h, b, wide, idx, slice_offset=2, slice_size=6, add_inputs=False)
    torch.testing.assert_close(wide[:, 2:8], reference(h, b, idx))
    assert torch.count_nonzero(wide[:, :2]) == 0
