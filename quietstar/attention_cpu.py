"""Thought attention on CPU through PyTorch's fused (flash) CPU attention kernel: the text part in one kernel call per
layer, the tiny own-chain part in PyTorch, one softmax over both by merging their log-sum-exps.

Same contract as the reference `quietstar.attention.thought_attention` (and tested against it): the query of chain
step s (absolute step_offset + s) at thinking position i (text position P + i, P = position_offset) attends to the
text keys j <= P + i and to its own position's chain keys t <= step_offset + s.

    text part    rows r = (n, g, i, s) of one (batch, K/V head) -> the P + L text keys j: aten's
                 `_scaled_dot_product_flash_attention_for_cpu` returns out_text and lse_text (the log-sum-exp of each
                 row's scaled scores); GQA folds the G query heads of a K/V head into rows, so nothing is repeated;
                 masked j > P + i.
    own part     per (b, n, h, i): (G Sq) x Sk scores, out_own and lse_own.
    merge        lse = logaddexp(lse_text, lse_own), out = e^(lse_text - lse) out_text + e^(lse_own - lse) out_own.

Backward: the kernel's own backward with the merged out and lse gives the text part's gradients exactly (it forms
P = exp(scores - lse) and D = rowsum(dO * out), the merged softmax's), the own part is done by hand the same way.
Only q, the K/V, out (float32) and lse are saved (no probabilities), so no position blocks or recomputation are needed.

The aten op is not public API (it is what `scaled_dot_product_attention` dispatches to on CPU, and the only CPU
kernel that returns the log-sum-exp); `cpu_kernel_available()` says whether this torch has it (else the reference
runs).

Dimensions: B batch, N thoughts, Hq / Hkv query / key-value heads (G = Hq / Hkv), L thinking positions (P the
first's text position), Sq query steps,
Sk own chain steps, D head dim, R = N * G * L * Sq rows per (batch, K/V head).
"""

import torch
from einops import rearrange
from torch import Tensor

from .attention import _check_shapes

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BACKWARD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def cpu_kernel_available() -> bool:
    """Whether this torch has the fused CPU attention kernel with log-sum-exp output and its backward."""
    return _FLASH is not None and _FLASH_BACKWARD is not None


def thought_attention_cpu(
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
    """Quiet-STaR thought attention for CPU tensors; arguments and result as `quietstar.attention.thought_attention`:
    q (B, N, Hq, L, Sq, D), k_base/v_base (B, Hkv, P + L, D), k_own/v_own (B, N, Hkv, L, Sk, D) -> (B, N, Hq, L, Sq, D),
    P = `position_offset`."""
    _check_shapes(q, k_base, v_base, k_own, v_own, step_offset, position_offset)
    if q.device.type != "cpu":
        raise ValueError(f"the cpu thought attention needs CPU tensors, got {q.device}; use the 'auto' backend.")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _ThoughtAttentionCPU.apply(q, k_base, v_base, k_own, v_own, scale, step_offset, position_offset)


class _ThoughtAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_base, v_base, k_own, v_own, scale, step_offset, position_offset):
        _, n_thoughts, n_heads, n_positions, n_steps, _ = q.shape
        layout = _Layout(n_thoughts, n_heads // k_base.shape[1], n_positions, n_steps, step_offset, position_offset, q.dtype)
        acc = layout.acc
        k_base, v_base, k_own, v_own = (t.contiguous() for t in (k_base, v_base, k_own, v_own))
        q_rows = layout.rows(q)
        out_text, lse_text = _FLASH(q_rows, k_base, v_base, attn_mask=layout.text_mask(q), scale=scale)
        scores_own = layout.own_scores(q_rows, k_own, scale)  # (B, N, Hkv, L, G*Sq, Sk), in acc
        lse_own = scores_own.logsumexp(dim=-1)
        probs_own = (scores_own - lse_own.unsqueeze(-1)).exp()
        out_own = layout.from_own((probs_own.to(v_own.dtype) @ v_own).to(acc))
        lse_own = layout.from_own(lse_own.unsqueeze(-1)).squeeze(-1)
        lse = torch.logaddexp(lse_text.to(acc), lse_own)  # (B, Hkv, R)
        out = out_text.to(acc) * (lse_text - lse).exp().unsqueeze(-1) + out_own * (lse_own - lse).exp().unsqueeze(-1)
        ctx.save_for_backward(q_rows, k_base, v_base, k_own, v_own, out, lse)  # out, lse in float32 (or 64)
        ctx.layout, ctx.scale = layout, scale
        return layout.unrows(out.to(q.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        q_rows, k_base, v_base, k_own, v_own, out, lse = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        # The kernel's backward runs in float32 for low-precision inputs: it takes rowsum(dO * out) from the out it is
        # given, and a bf16-rounded out made its dK/dV up to 2x less accurate than the reference's (test_*_cpu.py).
        dtypes = q_rows.dtype, k_base.dtype
        q_rows, k_base, v_base, k_own, v_own = (t.to(layout.acc) for t in (q_rows, k_base, v_base, k_own, v_own))
        grad_rows = layout.rows(grad_out.to(layout.acc))
        grad_q, grad_k_base, grad_v_base = _FLASH_BACKWARD(
            grad_rows, q_rows, k_base, v_base, out, lse, 0.0, False, attn_mask=layout.text_mask(out), scale=scale
        )
        # own part: P = exp(scores - lse) with the merged lse, dS = P * (dO v^T - rowsum(dO * out)) * scale
        probs = (layout.own_scores(q_rows, k_own, scale) - layout.to_own(lse.unsqueeze(-1))).exp()
        grad_own = layout.to_own(grad_rows)
        delta = layout.to_own((grad_rows * out).sum(dim=-1, keepdim=True))
        grad_v_own = probs.transpose(-1, -2) @ grad_own
        grad_scores = probs * (grad_own @ v_own.transpose(-1, -2) - delta) * scale
        grad_k_own = grad_scores.transpose(-1, -2) @ layout.to_own(q_rows)
        grad_q = grad_q + layout.from_own(grad_scores @ k_own)
        q_dtype, kv_dtype = dtypes
        return (
            layout.unrows(grad_q).to(q_dtype), grad_k_base.to(kv_dtype), grad_v_base.to(kv_dtype),
            grad_k_own.to(kv_dtype), grad_v_own.to(kv_dtype), None, None, None,
        )


class _Layout:
    """The two row orders: `rows` (B, Hkv, (N G L Sq), D) for the kernel's text part, and `own` (B, N, Hkv, L, (G Sq), D)
    for the own-chain products; and the masks of both parts."""

    def __init__(
        self, n_thoughts: int, groups: int, n_positions: int, n_steps: int, step_offset: int, position_offset: int,
        dtype: torch.dtype,
    ):
        self.n, self.g, self.l, self.s, self.step_offset = n_thoughts, groups, n_positions, n_steps, step_offset
        self.position_offset = position_offset
        self.acc = torch.promote_types(dtype, torch.float32)  # softmax and merge in float32 (float64 stays float64)

    def rows(self, x: Tensor) -> Tensor:
        return rearrange(x, "b n (h g) l s d -> b h (n g l s) d", g=self.g).contiguous()

    def unrows(self, x: Tensor) -> Tensor:
        return rearrange(x, "b h (n g l s) d -> b n (h g) l s d", n=self.n, g=self.g, l=self.l)

    def to_own(self, rows: Tensor) -> Tensor:
        return rearrange(rows, "b h (n g l s) d -> b n h l (g s) d", n=self.n, g=self.g, l=self.l).contiguous()

    def from_own(self, own: Tensor) -> Tensor:
        return rearrange(own, "b n h l (g s) d -> b h (n g l s) d", g=self.g)

    def text_mask(self, like: Tensor) -> Tensor:
        """(R, P + L) additive mask in `like`'s dtype (the kernel takes no boolean one): 0 where j <= P + i, -inf after."""
        n_keys = self.position_offset + self.l
        position = torch.arange(self.position_offset, n_keys, device=like.device)
        hidden = torch.zeros(self.l, n_keys, dtype=like.dtype, device=like.device)
        hidden.masked_fill_(torch.arange(n_keys, device=like.device)[None, :] > position[:, None], float("-inf"))
        return hidden[None, None, :, None, :].expand(self.n, self.g, self.l, self.s, n_keys).reshape(-1, n_keys)

    def own_scores(self, q_rows: Tensor, k_own: Tensor, scale: float) -> Tensor:
        """(B, N, Hkv, L, G*Sq, Sk) scaled scores of the own chain in `acc`, -inf where t > step_offset + s."""
        scores = (self.to_own(q_rows) @ k_own.transpose(-1, -2)).to(self.acc) * scale
        step = torch.arange(self.step_offset, self.step_offset + self.s, device=k_own.device)
        hidden = torch.arange(k_own.shape[-2], device=k_own.device) > step[:, None]  # (Sq, Sk)
        return scores.masked_fill(hidden.repeat(self.g, 1), float("-inf"))
