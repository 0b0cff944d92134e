"""Which thought-attention implementation runs: the PyTorch reference (attention.py), the fused Triton kernels
(`triton_kernels`, which import that reference to be tested against it) or, on CPU, PyTorch's fused CPU attention
kernel (attention_cpu.py). Kept apart from attention.py so the modules do not import each other:
triton_kernels -> attention, attention_cpu -> attention, attention_backend -> all.
"""

import os
from collections.abc import Callable

import torch
from torch import Tensor

from .attention import thought_attention
from .attention_cpu import cpu_kernel_available, thought_attention_cpu

BACKENDS = ("auto", "triton", "torch", "cpu")
BACKEND_ENV = "QUIETSTAR_THOUGHT_ATTENTION"  # overrides the config's `thought_attention_backend` when set


def thought_attention_kernel(backend: str, device: torch.device) -> Callable[..., Tensor]:
    """The thought-attention implementation to use: "triton" (fused kernels, `triton_kernels` package), "cpu" (PyTorch's
    fused CPU attention kernel, attention_cpu.py), "torch" (the reference in attention.py) or "auto" (triton on CUDA
    tensors when importable, cpu on CPU tensors when this torch has that kernel, else torch).
    `$QUIETSTAR_THOUGHT_ATTENTION` overrides `backend`, for debugging and benchmarks."""
    backend = os.environ.get(BACKEND_ENV, backend)
    if backend not in BACKENDS:
        raise ValueError(f"unknown thought attention backend {backend!r}; choose one of {BACKENDS}.")
    if backend == "cpu" or (backend == "auto" and device.type == "cpu"):
        if cpu_kernel_available():
            return thought_attention_cpu
        if backend == "cpu":
            raise ImportError(
                f"the cpu thought attention backend needs torch's fused CPU attention kernel, which torch "
                f"{torch.__version__} lacks; use 'auto' or 'torch'."
            )
        return thought_attention
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return thought_attention
    try:  # optional: absent where only the saved model code is installed (trust_remote_code) or without triton
        from triton_kernels import thought_attention as fused
    except ImportError as error:
        if backend == "triton":
            raise ImportError(
                "the triton thought attention backend needs the `triton_kernels` package (installed with quietstar) "
                f"and triton: {error}"
            ) from error
        return thought_attention
    return fused
