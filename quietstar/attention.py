"""Thought attention: the Quiet-STaR attention pattern, and its plumbing into transformers' `AttentionInterface`.

After every text position i the model writes a chain of steps (start marker, thought tokens, end marker, lookahead
tokens). The query of chain step s at position i attends to
    (a) the text's keys j <= i, stored once and shared by every thought, and
    (b) its own chain's keys t <= s (the paper's "diagonal" mask),
never to another position's or another thought's chain. Part (a) is a causal staircase over the text and part (b) a
tiny causal block per chain; one softmax runs over both. Nothing of size L x L x S and no per-position copy of the
text's K/V is ever built (the reference code grew a dense [L, (k+1)L] mask per step).

Only a window of positions may think (`position_offset` P: positions P .. P+L-1, e.g. where a training target is
scored); their queries still see all the text keys j <= i, from position 0.

Dimensions:
    B batch, N thoughts per position, L thinking positions (P the first's text position), Hq query heads, Hkv key/value heads (Hq = G * Hkv, GQA),
    Sq query chain steps in this call, Sk own chain keys, D head dim, J text keys in a block.
"""

import copy
from collections.abc import Callable

import torch
from einops import einsum, rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

ATTN_IMPLEMENTATION = "quietstar"

# Positions per block in the reference: scores of one block are (B, N, Hq, BLOCK, Sq, <= L + Sk). Texts longer than
# one block run in blocks recomputed in backward; 64 keeps a 128-token step's peak within 1.5x of its floor (RESULTS).
POSITION_BLOCK = 64


def thought_attention(
    q: Tensor,
    k_base: Tensor,
    v_base: Tensor,
    k_own: Tensor,
    v_own: Tensor,
    *,
    scale: float | None = None,
    step_offset: int = 0,
    position_offset: int = 0,
) -> Tensor:
    """Quiet-STaR thought attention, PyTorch reference.

    Query step s (absolute chain step `step_offset + s`) at thinking position i (text position P + i, P =
    `position_offset`) attends to text keys j <= P + i and to its own position's chain keys t <= step_offset + s, with
    one softmax over both:

        out = softmax([q k_base[:P+i+1]^T, q k_own[i, :step_offset+s+1]^T] * scale) @ [v_base[:P+i+1]; v_own[i, ...]]

    Args:
        q: (B, N, Hq, L, Sq, D) queries of Sq chain steps at each of L thinking positions, for N thoughts.
        k_base, v_base: (B, Hkv, P + L, D) the text's keys/values up to the last thinking position, shared by all N
            thoughts (never copied).
        k_own, v_own: (B, N, Hkv, L, Sk, D) each thinking position's own chain keys/values, steps 0 .. Sk-1.
        scale: softmax scale, default D ** -0.5.
        step_offset: absolute chain step of the first query (> 0 when chains are generated step by step).
        position_offset: P, the text position of the first thinking position (> 0 when only the positions P .. P+L-1
            think, e.g. only where a training target is scored).

    Returns:
        (B, N, Hq, L, Sq, D), in q's dtype. Scores are formed in the input dtype and normalised in float32, as
        transformers' eager attention does. Positions are processed in blocks of `POSITION_BLOCK`; with autograd on,
        each block is recomputed in backward, so saved memory stays linear in L * S.
    """
    _check_shapes(q, k_base, v_base, k_own, v_own, step_offset, position_offset)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n_kv_heads, n_positions = k_base.shape[1], q.shape[3]
    q = rearrange(q, "b n (h g) l s d -> b n h g l s d", h=n_kv_heads)  # GQA by broadcasting, no K/V repeat
    blocks = []
    for start in range(0, n_positions, POSITION_BLOCK):
        end = min(start + POSITION_BLOCK, n_positions)
        args = (
            q[..., start:end, :, :],
            k_base[:, :, : position_offset + end],  # causal: a block never sees text keys after its last position
            v_base[:, :, : position_offset + end],
            k_own[..., start:end, :, :],
            v_own[..., start:end, :, :],
            position_offset + start,
            scale,
            step_offset,
        )
        if torch.is_grad_enabled() and n_positions > POSITION_BLOCK:
            blocks.append(checkpoint(_attend_block, *args, use_reentrant=False))
        else:
            blocks.append(_attend_block(*args))
    return rearrange(torch.cat(blocks, dim=-3), "b n h g l s d -> b n (h g) l s d")


def _attend_block(q, k_base, v_base, k_own, v_own, first_position: int, scale: float, step_offset: int) -> Tensor:
    """One block of C positions, the first at text position `first_position`. q: (B, N, Hkv, G, C, Sq, D); k_base:
    (B, Hkv, J, D), J = first_position + C;
    k_own: (B, N, Hkv, C, Sk, D). Returns (B, N, Hkv, G, C, Sq, D)."""
    n_block, n_steps, n_text, n_own = q.shape[-3], q.shape[-2], k_base.shape[-2], k_own.shape[-2]
    device = q.device
    n_groups = q.shape[3]
    scores_text = einsum(q, k_base, "b n h g c s d, b h j d -> b n h g c s j") * scale
    # Own keys: per (b, n, h, c) a tiny (g s) x t product. As matmuls over contiguous operands: on strided ones CPU
    # bmm copies and multiplies batch entry by batch entry (B*N*Hkv*C of them), which made this term 30% of the
    # attention's time at L = 128.
    q_own = rearrange(q, "b n h g c s d -> b n h c (g s) d").contiguous()
    scores_own = rearrange(q_own @ k_own.contiguous().transpose(-1, -2), "b n h c (g s) t -> b n h g c s t", g=n_groups)
    scores_own = scores_own * scale
    position = torch.arange(first_position, first_position + n_block, device=device)
    text_visible = torch.arange(n_text, device=device) <= position[:, None, None]  # (C, 1, J): j <= i
    step = torch.arange(step_offset, step_offset + n_steps, device=device)
    own_visible = torch.arange(n_own, device=device) <= step[:, None]  # (Sq, Sk): t <= step
    scores = torch.cat(
        [scores_text.masked_fill(~text_visible, float("-inf")), scores_own.masked_fill(~own_visible, float("-inf"))],
        dim=-1,
    )
    softmax_dtype = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax, fp64 stays fp64
    probs_text, probs_own = scores.softmax(dim=-1, dtype=softmax_dtype).to(q.dtype).split([n_text, n_own], dim=-1)
    out_own = rearrange(probs_own, "b n h g c s t -> b n h c (g s) t").contiguous() @ v_own.contiguous()
    return einsum(probs_text, v_base, "b n h g c s j, b h j d -> b n h g c s d") + rearrange(
        out_own, "b n h c (g s) d -> b n h g c s d", g=n_groups
    )


def _check_shapes(q, k_base, v_base, k_own, v_own, step_offset: int, position_offset: int = 0) -> None:
    if q.ndim != 6 or k_base.ndim != 4 or k_own.ndim != 6:
        raise ValueError(
            "thought_attention expects q (B, N, Hq, L, Sq, D), k_base/v_base (B, Hkv, P + L, D) and k_own/v_own "
            f"(B, N, Hkv, L, Sk, D); got q {tuple(q.shape)}, k_base {tuple(k_base.shape)}, k_own {tuple(k_own.shape)}."
        )
    batch, n_thoughts, n_heads, n_positions, n_steps, head_dim = q.shape
    n_kv_heads = k_base.shape[1]
    if k_base.shape != v_base.shape or k_own.shape != v_own.shape:
        raise ValueError("keys and values must have the same shape (k_base/v_base, k_own/v_own).")
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0 (the text position of the first query), got {position_offset}.")
    if k_base.shape != (batch, n_kv_heads, position_offset + n_positions, head_dim):
        raise ValueError(
            f"k_base {tuple(k_base.shape)} does not match q {tuple(q.shape)} with position_offset {position_offset}: "
            "expected (B, Hkv, position_offset + L, D), the text keys up to the last query position."
        )
    if k_own.shape[:4] != (batch, n_thoughts, n_kv_heads, n_positions) or k_own.shape[-1] != head_dim:
        raise ValueError(f"k_own {tuple(k_own.shape)} does not match q {tuple(q.shape)}: expected (B, N, Hkv, L, Sk, D).")
    if n_heads % n_kv_heads:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads}).")
    if step_offset < 0 or step_offset + n_steps > k_own.shape[4]:
        raise ValueError(
            f"query steps {step_offset}..{step_offset + n_steps - 1} need their own keys, but k_own has "
            f"{k_own.shape[4]} steps: pass the chain's keys up to and including the last query step."
        )


# ---------------------------------------------------------------------------------------------------------------------
# transformers integration: one attention function serves the text pass (plain causal attention, recording K/V) and
# the thought passes (thought attention over the recorded text K/V). The model passes a `ThoughtKV` as the
# `quietstar_kv` keyword; transformers forwards it from the model call to every attention layer.


class ThoughtKV:
    """Per-layer keys/values shared by the passes of one Quiet-STaR forward.

    `text` holds each layer's text K/V (B, Hkv, L_text, D), recorded by the text pass. The thinking positions are
    `first_position` .. `first_position + n_positions - 1` (all L_text positions unless only a window thinks). `own`
    holds each layer's chain K/V buffer (B, N, Hkv, n_positions, max_steps, D) for passes that generate chains step by
    step. `step_offset` is None in the text
    pass, else the chain step of the pass's first query; `streaming` says whether the pass appends to the chain
    buffer (sampling) or carries whole chains from step 0 (teacher forcing). `kernel` is the thought-attention
    implementation, resolved once per forward by `attention_backend.thought_attention_kernel`.

    A plain class on purpose, not a dataclass or a dict: wrappers that rebuild the containers in a module's keyword
    arguments on the way to its forward (FSDP2's pre-forward hooks do) pass it through untouched, so every layer
    records into, and reads from, the same dicts.
    """

    def __init__(
        self,
        n_thoughts: int,
        n_positions: int,
        max_steps: int = 0,
        kernel: Callable[..., Tensor] = thought_attention,
        step_offset: int | None = None,
        streaming: bool = False,
        first_position: int = 0,
    ):
        self.n_thoughts, self.n_positions, self.max_steps, self.kernel = n_thoughts, n_positions, max_steps, kernel
        self.step_offset, self.streaming, self.first_position = step_offset, streaming, first_position
        self.text: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self.own: dict[nn.Module, tuple[Tensor, Tensor]] = {}

    def at(self, step_offset: int, streaming: bool = False) -> "ThoughtKV":
        """A view for a thought pass starting at chain step `step_offset`, sharing this object's K/V."""
        view = copy.copy(self)  # shallow: the same `text` and `own` dicts
        view.step_offset, view.streaming = step_offset, streaming
        return view

    def attend(self, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, scaling: float | None) -> Tensor:
        """query (B, Hq, N*L*Sq, D), key/value (B, Hkv, N*L*Sq, D) in "(n l s)" order -> (B, N*L*Sq, Hq, D)."""
        if module not in self.text:
            raise RuntimeError("thought pass before the text pass: the text's keys/values were not recorded.")
        k_text, v_text = self.text[module]
        visible = self.first_position + self.n_positions  # text keys up to the last thinking position
        k_text, v_text = k_text[:, :, :visible], v_text[:, :, :visible]
        query, key, value = to_attention_dtype(query, key, value)
        layout = dict(n=self.n_thoughts, l=self.n_positions)
        q = rearrange(query, "b h (n l s) d -> b n h l s d", **layout)
        k_new = rearrange(key, "b h (n l s) d -> b n h l s d", **layout)
        v_new = rearrange(value, "b h (n l s) d -> b n h l s d", **layout)
        if self.streaming:
            k_new, v_new = self._append(module, k_new, v_new)
        out = self.kernel(
            q, k_text, v_text, k_new, v_new, scale=scaling, step_offset=self.step_offset,
            position_offset=self.first_position,
        )
        return rearrange(out, "b n h l s d -> b (n l s) h d")

    def _append(self, module: nn.Module, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Write this pass's steps into the layer's chain buffer; return the chain so far, steps 0 .. end-1."""
        if module not in self.own:
            shape = (*k_new.shape[:4], self.max_steps, k_new.shape[-1])
            self.own[module] = (k_new.new_empty(shape), v_new.new_empty(shape))
        k_own, v_own = self.own[module]
        end = self.step_offset + k_new.shape[4]
        if end > self.max_steps:
            raise RuntimeError(f"chain step {end - 1} does not fit the buffer of {self.max_steps} steps.")
        k_own[..., self.step_offset : end, :] = k_new
        v_own[..., self.step_offset : end, :] = v_new
        return k_own[..., :end, :], v_own[..., :end, :]


def quietstar_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    quietstar_kv: ThoughtKV | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """`AttentionInterface` function registered as "quietstar". Without `quietstar_kv` it is sdpa; in the text
    pass it records the layer's K/V; in a thought pass it computes thought attention (the mask is structural, so
    `attention_mask` is ignored there)."""
    if quietstar_kv is None or quietstar_kv.step_offset is None:
        if quietstar_kv is not None:
            quietstar_kv.text[module] = to_attention_dtype(key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    _check_thought_pass_supported(dropout, kwargs, quietstar_kv)
    return quietstar_kv.attend(module, query, key, value, scaling), None


def to_attention_dtype(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Bring q/k/v to one dtype at the thought-attention boundary: the autocast dtype when autocast is on (under
    `torch.autocast(bfloat16)` over fp32 weights, rotary embeddings hand back fp32 q/k while v, a Linear output, is
    bf16; sdpa would run in bf16 there too), else their common promoted dtype. The fused kernels need one dtype."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = tensors[0].dtype
        for tensor in tensors[1:]:
            dtype = torch.promote_types(dtype, tensor.dtype)
    return tuple(tensor.to(dtype) for tensor in tensors)


def _check_thought_pass_supported(dropout: float, kwargs: dict, kv: ThoughtKV) -> None:
    if dropout:
        raise NotImplementedError("attention dropout is not supported in thought passes; set attention_dropout=0.")
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit soft-capping (gemma2-style) is not supported in thought passes.")
    window = kwargs.get("sliding_window")
    if window is not None and kv.first_position + kv.n_positions + kv.max_steps > window:
        raise NotImplementedError(
            f"this base model uses sliding-window attention (window {window}) and text + thought length "
            f"({kv.first_position + kv.n_positions} + {kv.max_steps}) exceeds it; thought passes attend to the whole prefix. "
            "Use shorter sequences."
        )


def register_quietstar_attention() -> None:
    """Register the "quietstar" attention and its mask builder (sdpa's) with transformers. Idempotent."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, quietstar_attention_forward)
    # Without a registered mask function transformers builds no mask at all for this key, silently dropping padding.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
