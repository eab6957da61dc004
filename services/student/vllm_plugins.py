"""vLLM general plugin (entry point `vllm.general_plugins`), loaded in every vLLM process.

`fast_cpu_lora`: vLLM 0.32's CPU LoRA ops gather a full copy of the LoRA weight matrix for
every token (`weights[indices]`, then a batched einsum): ~T x rank x hidden floats per
module per step. With one live adapter (the normal case here) that made the distilled
student ~6x slower than the base model on CPU. This replaces the three bgmv ops with one
matmul per distinct adapter in the batch: same results, no per-token copies. GPU builds use
Triton/Punica kernels and are left alone. Disable with VLLM_PLUGINS="" if ever needed.
"""

from __future__ import annotations

from typing import Any


def _lora_matmul(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """== einsum("bi,boi->bo", inputs, weights[indices]) without materialising weights[indices]."""
    import torch

    inputs = inputs.to(dtype=dtype)
    if weights.dim() == 4:
        weights = weights.squeeze(1)
    if indices.numel() == 0:
        return inputs.new_zeros((0, weights.shape[1]))
    first = int(indices[0])
    if first >= 0 and bool((indices == first).all()):
        return inputs @ weights[first].to(dtype=dtype).transpose(0, 1)
    # Tokens without a LoRA carry index -1: they get a zero delta. (vLLM's stock CPU ops
    # index weights[-1] there, i.e. the LAST adapter slot's weights: base-model requests
    # sharing a step with LoRA requests got that adapter's answers.)
    out = inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    for index in torch.unique(indices).tolist():
        if index < 0:
            continue
        mask = indices == index
        out[mask] = inputs[mask] @ weights[index].to(dtype=dtype).transpose(0, 1)
    return out


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset, slice_size, add_inputs=True
):
    outputs = _lora_matmul(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


def fast_cpu_lora() -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops

    replacements = {"bgmv_expand": bgmv_expand, "bgmv_shrink": bgmv_shrink,
                    "bgmv_expand_slice": bgmv_expand_slice}
    for module in (ops, package):  # sgmv_* call bgmv_* through `ops`' globals
        for name, fn in replacements.items():
            setattr(module, name, fn)
    try:
        import vllm.lora.punica_wrapper.punica_cpu as punica_cpu
    except ImportError:
        return
    for name, fn in replacements.items():
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)
