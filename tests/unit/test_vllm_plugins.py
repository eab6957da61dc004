"""The CPU LoRA fast path computes exactly what vLLM's per-token gather computed."""

import pytest

torch = pytest.importorskip("torch")

from services.student.vllm_plugins import bgmv_expand, bgmv_expand_slice, bgmv_shrink  # noqa: E402


def reference(inputs, weights, indices):
    """vLLM's per-token gather, with the semantics vLLM intends: index -1 = no LoRA (zero
    delta). vLLM 0.32's CPU ops index weights[-1] there, the last slot's adapter."""
    selected = weights[indices.clamp(min=0)]
    if selected.dim() == 4:
        selected = selected.squeeze(1)
    out = torch.einsum("bi, boi -> bo", inputs, selected)
    return out * (indices >= 0).unsqueeze(1).to(out.dtype)


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


def test_no_lora_rows_get_no_delta_even_beside_lora_rows():
    """The mixed-batch defect: base-model tokens (index -1) next to LoRA tokens."""
    torch.manual_seed(1)
    h, b = torch.randn(4, 4), torch.randn(2, 1, 6, 4)
    base = torch.randn(4, 6)
    got = base.clone()
    bgmv_expand(h, b, got, torch.tensor([-1, 1, -1, 1]), add_inputs=True)
    torch.testing.assert_close(got[[0, 2]], base[[0, 2]])  # untouched: no adapter's delta
    assert not torch.allclose(got[[1, 3]], base[[1, 3]])
    shrunk = torch.full((4, 4), 7.0)
    bgmv_shrink(torch.randn(4, 4), torch.randn(2, 1, 4, 4), shrunk, torch.tensor([-1, -1, -1, -1]))
    assert torch.count_nonzero(shrunk) == 0


def test_every_cpu_punica_path_uses_the_fixed_ops():
    """After the plugin runs, vLLM's own entry points (sgmv_* for prefill, bgmv_* for decode
    and logits, as punica_cpu calls them) give no-LoRA tokens no delta."""
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the plugin only patches the CPU platform")
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    from services.student.vllm_plugins import fast_cpu_lora

    fast_cpu_lora()
    torch.manual_seed(2)
    b = torch.randn(2, 1, 6, 4)
    seq_lens, lora_per_seq = torch.tensor([2, 3]), torch.tensor([-1, 1])  # seq 0: base model
    h, base = torch.randn(5, 4), torch.randn(5, 6)
    got = base.clone()
    punica_cpu.sgmv_expand(h, b, got, None, seq_lens, lora_per_seq, 2, 3, 5, add_inputs=True)
    torch.testing.assert_close(got[:2], base[:2])
    shrunk = torch.full((5, 4), 7.0)  # shrink: hidden 6 -> rank 4
    ops.sgmv_shrink(base, torch.randn(2, 1, 4, 6), shrunk, None, seq_lens, lora_per_seq, 2, 3, 5, 1.0)
    assert torch.count_nonzero(shrunk[:2]) == 0 and torch.count_nonzero(shrunk[2:]) > 0
    sliced = base.clone()
    ops.sgmv_expand_slice(h, b, sliced, None, seq_lens, lora_per_seq, 2, 3, 5, 0, 6, add_inputs=True)
    torch.testing.assert_close(sliced[:2], base[:2])
    logits = base.clone()  # add_lora_logits: bgmv_* with sampler indices, -1 = base model
    punica_cpu.bgmv_expand(h, b, logits, torch.tensor([-1, 1, 1, -1, 1]), add_inputs=True)
    torch.testing.assert_close(logits[[0, 3]], base[[0, 3]])
