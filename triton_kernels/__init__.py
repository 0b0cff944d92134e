"""Fused Triton kernels for quietstar, each beside (importing) its PyTorch reference."""

from . import thought_attention as thought_attention_module
from .thought_attention import ThoughtAttentionFunction, thought_attention, thought_attention_ref

__all__ = ["thought_attention", "thought_attention_ref", "ThoughtAttentionFunction"]
