"""The base model's output head as a function of hidden states, and per-token log-probabilities computed from it chunk
by chunk, so that no vocabulary-sized tensor exists for more than one chunk of tokens at a time.

Because the head is linear, mixing the two predictions in logit space equals mixing the hidden states before it
(the mixing head's equation, exact up to rounding):

    (1 - w) * (h_base W^T + b) + w * (h_thought W^T + b) = ((1 - w) h_base + w h_thought) W^T + b

so log p_mixed(x) needs only the mixed hidden state. Heads with logit soft-capping (gemma2/3's
`final_logit_softcapping`: cap * tanh(z / cap)) are not linear; for them the mixing is done on each chunk's logits
(the same chunking, twice the head work).

No chunk's logits are kept for backward: the saved memory is O(rows * H), not O(rows * V). The objective takes its
log-probs only as weighted sums with constant coefficients (its means, weights and advantages), so for linear heads
`_LinearLogProbSum` forms the gradient in forward while each chunk's logits exist, in place, with the weight's
gradient accumulated in one buffer: one head matmul forward and two for the gradient per chunk, the least possible.
Per-token log-probs with gradient (`token_log_probs`, soft-capped heads, logits that already exist) recompute each
chunk in backward (non-reentrant checkpointing).

Dimensions: R rows (flattened tokens), C rows in a chunk, H hidden size, V vocabulary.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from .sampling import sample_thought_tokens

# Rows per chunk: C * V float32 logits live at a time (1024 x 49152 x 4 B = 192 MiB with SmolLM2's vocabulary).
CHUNK_ROWS = 1024


@dataclass
class OutputHead:
    """logits = cap * tanh(scale * (h W^T + b) / cap), the cap only where the base model soft-caps its logits.

    weight: (V, H) the output embedding; bias: (V,) or None; scale: a constant factor some bases apply (cohere's
    `logit_scale`, granite's 1 / `logits_scaling`); softcap: gemma2/3's `final_logit_softcapping` or None."""

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, model: PreTrainedModel) -> "OutputHead":
        """The head of a transformers causal LM, read from its output embedding and config."""
        config = model.config
        head = model.get_output_embeddings()
        scale = float(getattr(config, "logit_scale", None) or 1.0) / float(getattr(config, "logits_scaling", None) or 1.0)
        return cls(head.weight, head.bias, scale, getattr(config, "final_logit_softcapping", None))

    def check(self, hidden: Tensor, logits: Tensor) -> None:
        """Raise if this head does not reproduce the base model's own `logits` (..., V) from `hidden` (..., H): a head
        this class does not know (another nonlinearity or scaling) would silently train a different model."""
        ours, theirs = self.logits(hidden), logits.float()
        if not torch.allclose(ours, theirs, rtol=0.05, atol=0.05 * (theirs.abs().max().item() + 1)):
            raise NotImplementedError(
                "the base model's output head is not `cap * tanh(scale * (h W^T + b) / cap)` (max difference "
                f"{(ours - theirs).abs().max().item():.3g}): its logits cannot be computed chunk by chunk from hidden "
                "states here. Supported: linear heads, with logit_scale / logits_scaling / final_logit_softcapping."
            )

    @property
    def linear(self) -> bool:
        return self.softcap is None

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., H) -> logits (..., V) float32."""
        logits = F.linear(hidden.to(self.weight.dtype), self.weight, self.bias).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _log_softmax_at(logits: Tensor, targets: Tensor, temperature: float, banned_ids: Sequence[int]) -> Tensor:
    """(C, V) float32 logits -> log softmax(logits / temperature, banned ids at -inf)[targets], (C,)."""
    if temperature != 1.0:
        logits = logits / temperature
    if banned_ids:
        logits = logits.index_fill(-1, torch.tensor(list(banned_ids), device=logits.device), float("-inf"))
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(dim=-1)


def _by_chunks(function: Callable[..., Tensor], rows: list[Tensor], chunk_rows: int) -> Tensor:
    """`function` over row chunks of the (R, ...) tensors in `rows` -> (R,); each chunk recomputed in backward when
    gradients are recorded (so only its inputs are saved)."""
    results = []
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in rows)
    for start in range(0, rows[0].shape[0], chunk_rows):
        chunk = [t[start : start + chunk_rows] for t in rows]
        results.append(checkpoint(function, *chunk, use_reentrant=False) if recompute else function(*chunk))
    return torch.cat(results) if results else rows[0].new_zeros(0, dtype=torch.float32)


class _LinearLogProbSum(torch.autograd.Function):
    """sum_r c_r log softmax(scale * (h_r W^T + b) / temperature)[t_r] over rows h (R, H) of a linear head, with its
    gradient formed in forward, chunk by chunk, while each chunk's logits z exist:

        d/dz = c * (onehot(t) - softmax(z)) * scale / temperature    (in place on the chunk's logits)
        dh = d/dz W,   dW += (d/dz)^T h,   db += sum_rows d/dz

    Returns (the weighted sum, a scalar; the log-probabilities (R,), without gradient). Backward only scales the saved
    dh, dW, db by the incoming gradient: each chunk's logits are formed once instead of twice (a backward that
    recomputes them), for a V x H weight gradient held from forward to backward. The coefficients c (R,) are
    constants, known in forward (the objective's weights and advantages, objective.py). Autocast: the matmuls run in
    the autocast dtype, as autograd would run the backward of an autocast `F.linear`.

    Range. Autograd multiplies the incoming gradient (policy_weight, 1e6 in the paper, times GradScaler's loss scale)
    in before anything is rounded to half precision; here it arrives only in backward. REINFORCE's c are tiny
    (advantage / (count * T)), so d/dz rounded to fp16 as it is would underflow to 0, and 1e6 rounded to fp16 is inf.
    So every buffer is held normalised, with a float32 power-of-two scale beside it (`_normalised`, exact): a
    half-precision matmul operand or stored gradient has its largest entry in [1, 2), and backward applies
    scale * incoming gradient in float32 (`_scale_chunks_`), rounding once to the stored dtype."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, coefficients, scale, temperature, banned_ids, chunk_rows):
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        head = OutputHead(weight, bias, scale)
        banned = torch.tensor(list(banned_ids), dtype=torch.long, device=hidden.device)
        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        half = compute_dtype.itemsize < 4  # fp16 / bf16 matmuls: normalise their operands (class docstring, Range)
        compute_weight = weight.to(compute_dtype)
        n_rows = hidden.shape[0]
        log_probs = hidden.new_empty(n_rows, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_hidden else None
        chunk_scales = hidden.new_ones(-(-n_rows // chunk_rows), dtype=torch.float32)  # of each chunk's normalised d/dz
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if needs_bias else None
        for chunk, start in enumerate(range(0, n_rows, chunk_rows)):
            rows = slice(start, start + chunk_rows)
            logits = _scaled_logits(head, hidden[rows], temperature, banned)
            lse = logits.logsumexp(dim=-1, keepdim=True)
            log_probs[rows] = logits.gather(-1, targets[rows, None]).squeeze(-1) - lse.squeeze(-1)
            coefficient = coefficients[rows, None].float()
            grad_logits = logits.sub_(lse).exp_().mul_(-coefficient)  # -c * softmax
            grad_logits.scatter_add_(-1, targets[rows, None], coefficient)  # + c * onehot(target)
            grad_logits.index_fill_(-1, banned, 0.0)  # banned logits are constants (-inf), even as a target
            grad_logits.mul_(scale / temperature)  # (C, V): d sum / d (h W^T + b), float32
            if needs_bias:
                grad_bias += grad_logits.sum(dim=0)
            if half:
                grad_logits, chunk_scales[chunk] = _normalised(grad_logits, compute_dtype)
            else:
                grad_logits = grad_logits.to(compute_dtype)
            if needs_hidden:  # normalised, a row of d/dz sums to at most 4 in |.|: dh stays within |W|'s range
                grad_hidden[rows] = (grad_logits @ compute_weight).to(hidden.dtype)
            if needs_weight and compute_dtype == torch.float32:  # in place: no V x H temporary per chunk
                grad_weight.addmm_(grad_logits.T, hidden[rows].float())
            elif needs_weight and half:  # h normalised too: a column sum over C rows stays far below fp16's 65504
                chunk_hidden, hidden_scale = _normalised(hidden[rows].to(torch.float32, copy=True), compute_dtype)
                grad_weight.addcmul_(grad_logits.T @ chunk_hidden, chunk_scales[chunk] * hidden_scale)  # in float32
            elif needs_weight:
                grad_weight += (grad_logits.T @ hidden[rows].to(compute_dtype)).float()
        weight_scale = bias_scale = None
        if needs_weight:  # held until backward in the weight's dtype, normalised (fp16 weights: no underflow)
            grad_weight, weight_scale = _normalised(grad_weight, weight.dtype)
        if needs_bias:
            grad_bias, bias_scale = _normalised(grad_bias, bias.dtype)
        ctx.grads = ((grad_hidden, chunk_scales), (grad_weight, weight_scale), (grad_bias, bias_scale))
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(log_probs)
        return _weighted_sum(coefficients.float(), log_probs), log_probs

    @staticmethod
    def backward(ctx, grad_sum, _grad_log_probs):
        if ctx.grads is None:
            raise RuntimeError(
                "backward through a weighted log-prob sum ran twice: its gradient is formed once, in forward, and freed "
                "by the first backward. Compute the loss again instead of retain_graph=True."
            )
        grad_sum = grad_sum.float()
        grads = tuple(
            None if grad is None else _scale_chunks_(grad, grad_scale * grad_sum, ctx.chunk_rows)
            for grad, grad_scale in ctx.grads
        )
        ctx.grads = None  # hand the buffers over now, not when the graph goes
        return *grads, None, None, None, None, None, None


def _normalised(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """float32 x -> (x / s in `dtype`, s), x divided in place: s a 0-d float32 power of two with max |x / s| in [1, 2),
    so the division is exact and the largest entries keep half precision's full resolution, far from its under- and overflow; s = 1 for
    an all-zero x. Computed on the device (no host sync)."""
    largest = x.abs().amax()
    scale = torch.where(largest > 0, torch.exp2(torch.floor(torch.log2(largest))), 1.0)
    return x.div_(scale).to(dtype), scale


def _scale_chunks_(buffer: Tensor, factors: Tensor, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """buffer[chunk k] *= factors[k] in place, the product formed in float32 or wider and rounded once to the buffer's
    dtype: a half-precision buffer holds a normalised gradient and its factor (scale * policy_weight * loss scale) may
    lie outside fp16's range. Chunk by chunk: no full-size float32 temporary. buffer (R, ...), factors (ceil(R / C),)
    or one 0-d factor for all."""
    for chunk, start in enumerate(range(0, buffer.shape[0], chunk_rows)):
        part = buffer[start : start + chunk_rows]
        part.copy_(part.to(torch.promote_types(part.dtype, torch.float32)) * (factors[chunk] if factors.ndim else factors))
    return buffer


def _weighted_sum(coefficients: Tensor, log_probs: Tensor) -> Tensor:
    """sum(coefficients * log_probs) over the entries with a nonzero coefficient: a masked entry's log-prob may be
    -inf (a banned or placeholder target) and must not turn the sum into nan."""
    return torch.where(coefficients != 0, coefficients * log_probs, 0.0).sum()


def _scaled_logits(head: OutputHead, hidden: Tensor, temperature: float, banned: Tensor) -> Tensor:
    """(C, H) -> (C, V) float32 logits / temperature with the banned ids at -inf (a fresh tensor, safe to modify)."""
    logits = head.logits(hidden)
    if temperature != 1.0:
        logits.div_(temperature)
    return logits.index_fill_(-1, banned, float("-inf")) if banned.numel() else logits


def token_log_probs(
    head: OutputHead,
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
    chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """log softmax(head(hidden) / temperature)[targets] with `banned_ids` removed from the distribution.

    hidden (..., H), targets (...) token ids -> (...) float32. Never holds more than `chunk_rows` rows of logits; with
    gradients each chunk is recomputed in backward. (Training takes its log-probs as weighted sums, `HeadLogProbs`.)"""

    def chunk(h: Tensor, t: Tensor) -> Tensor:
        return _log_softmax_at(head.logits(h), t, temperature, banned_ids)

    rows = [hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)]
    return _by_chunks(chunk, rows, chunk_rows).reshape(targets.shape)


@dataclass
class TensorLogProbs:
    """Per-token log-probabilities that exist as a tensor (with its autograd graph), in the interface of
    `HeadLogProbs`: `weighted_sum(c)` = (sum(c * log_probs), log_probs without gradient), c broadcastable."""

    log_probs: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.log_probs.shape

    def weighted_sum(self, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        return _weighted_sum(coefficients, self.log_probs), self.log_probs.detach()


@dataclass
class HeadLogProbs:
    """log softmax(head(hidden) / temperature)[targets] without `banned_ids`, for a linear head, taken by the objective
    only as a weighted sum: `weighted_sum(c)` -> (sum(c * log_probs) with gradient, the log_probs (...) without),
    c broadcastable to the targets' shape; entries with c = 0 are left out of the sum. With gradients recorded it
    runs `_LinearLogProbSum` (the gradient formed in forward, each chunk's logits formed once); without, plain
    chunks. hidden (..., H), targets (...)."""

    head: OutputHead
    hidden: Tensor
    targets: Tensor
    temperature: float = 1.0
    banned_ids: Sequence[int] = ()
    chunk_rows: int = CHUNK_ROWS

    @property
    def shape(self) -> torch.Size:
        return self.targets.shape

    # Not compiled: under `torch.compile(model)` this runs eagerly between compiled graphs (a graph break). Its chunk
    # loop would unroll when traced, every chunk with its own kernels because its slice offsets are baked into the
    # generated code (N * (T + A) chunks and more per step at real sizes); on the tiny test llama that was 13 of 70
    # kernels and 217 s -> 180 s of inductor compile time on 2 CPU cores, for one matmul and a logsumexp per chunk.
    @torch.compiler.disable
    def weighted_sum(self, coefficients: Tensor) -> tuple[Tensor, Tensor]:
        head, hidden = self.head, self.hidden.reshape(-1, self.hidden.shape[-1])
        differentiable = [t for t in (hidden, head.weight, head.bias) if t is not None]
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in differentiable)):
            with torch.no_grad():
                log_probs = token_log_probs(
                    head, hidden, self.targets.reshape(-1), temperature=self.temperature,
                    banned_ids=self.banned_ids, chunk_rows=self.chunk_rows,
                ).reshape(self.shape)
            return _weighted_sum(coefficients, log_probs), log_probs
        total, log_probs = _LinearLogProbSum.apply(
            hidden, head.weight, head.bias, self.targets.reshape(-1), coefficients.expand(self.shape).reshape(-1),
            head.scale, self.temperature, tuple(self.banned_ids), self.chunk_rows,
        )
        return total, log_probs.reshape(self.shape)


def head_log_probs(
    head: OutputHead,
    hidden: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    banned_ids: Sequence[int] = (),
    chunk_rows: int = CHUNK_ROWS,
) -> HeadLogProbs | TensorLogProbs:
    """`token_log_probs` for the objective: a `HeadLogProbs` for a linear head (gradient formed in forward), else the
    per-token tensor (soft-capped heads, chunks recomputed in backward)."""
    if head.linear:
        return HeadLogProbs(head, hidden, targets, temperature, tuple(banned_ids), chunk_rows)
    return TensorLogProbs(
        token_log_probs(head, hidden, targets, temperature=temperature, banned_ids=banned_ids, chunk_rows=chunk_rows)
    )


def logits_token_log_probs(
    logits: Tensor, targets: Tensor, *, banned_ids: Sequence[int] = (), chunk_rows: int = CHUNK_ROWS
) -> Tensor:
    """log softmax(logits)[targets] without `banned_ids`, for logits that already exist (the text pass's): (..., V),
    (...) -> (...) float32, upcast one chunk at a time (no float32 copy of the whole tensor is kept for backward)."""
    shape = targets.shape

    def chunk(z: Tensor, t: Tensor) -> Tensor:
        return _log_softmax_at(z.float(), t, 1.0, banned_ids)

    return _by_chunks(chunk, [logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)], chunk_rows).reshape(shape)


def mixed_log_probs(
    head: OutputHead,
    base_hidden: Tensor,
    thought_hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    banned_ids: Sequence[int] = (),
    chunk_rows: int = CHUNK_ROWS,
) -> HeadLogProbs | TensorLogProbs:
    """log p_mixed(targets), p_mixed = softmax((1 - w) z_base + w z_thought) with `banned_ids` removed, for the
    objective. base_hidden, thought_hidden (..., H), weight (...), targets (...). A linear head mixes the hidden
    states (exact, one head pass; `HeadLogProbs`); a soft-capped head mixes each chunk's logits (a tensor)."""
    if head.linear:
        mixed = base_hidden + weight.unsqueeze(-1).to(thought_hidden.dtype) * (thought_hidden - base_hidden)
        return HeadLogProbs(head, mixed, targets, banned_ids=tuple(banned_ids), chunk_rows=chunk_rows)
    size = base_hidden.shape[-1]

    def chunk(h_base: Tensor, h_thought: Tensor, w: Tensor, t: Tensor) -> Tensor:
        z_base = head.logits(h_base)
        mixed = z_base + w.float()[:, None] * (head.logits(h_thought) - z_base)
        return _log_softmax_at(mixed, t, 1.0, banned_ids)

    rows = [base_hidden.reshape(-1, size), thought_hidden.reshape(-1, size), weight.reshape(-1), targets.reshape(-1)]
    return TensorLogProbs(_by_chunks(chunk, rows, chunk_rows).reshape(targets.shape))


def mixed_next_token_log_probs(
    head: OutputHead, base_hidden: Tensor, thought_hidden: Tensor, weight: Tensor, banned_ids: Sequence[int] = ()
) -> Tensor:
    """The prediction after thinking, over the whole vocabulary: base_hidden (B, L, H), thought_hidden (B, N, L, H),
    weight (B, N, L) -> (B, L, V) log of the N thoughts' mean mixed probability, `banned_ids` at -inf. For output
    (inference); it holds N * B * L * V floats, so callers pass only the positions they keep."""
    base_hidden = base_hidden.unsqueeze(1)
    if head.linear:
        logits = head.logits(base_hidden + weight.unsqueeze(-1).to(thought_hidden.dtype) * (thought_hidden - base_hidden))
    else:
        z_base = head.logits(base_hidden)
        logits = z_base + weight.float().unsqueeze(-1) * (head.logits(thought_hidden) - z_base)
    if banned_ids:
        logits[..., list(banned_ids)] = float("-inf")
    n_thoughts = logits.shape[1]
    return torch.logsumexp(logits.log_softmax(dim=-1), dim=1) - math.log(n_thoughts)


@torch.no_grad()
def sample_tokens(
    head: OutputHead,
    hidden: Tensor,
    temperature: float,
    banned_ids: Sequence[int],
    chunk_rows: int = CHUNK_ROWS,
) -> Tensor:
    """One token per row from softmax(head(hidden) / temperature) without `banned_ids`; temperature 0 = greedy.

    hidden (..., H) -> ids (...). A row's sample depends only on its own logits and its own random draw
    (sampling.sample_thought_tokens), so a thought at position i never depends on text after i."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = [
        sample_thought_tokens(head.logits(flat[start : start + chunk_rows]), temperature, banned_ids)
        for start in range(0, flat.shape[0], chunk_rows)
    ]
    return torch.cat(ids).reshape(hidden.shape[:-1])


__all__ = [
    "OutputHead", "HeadLogProbs", "TensorLogProbs", "token_log_probs", "head_log_probs", "logits_token_log_probs",
    "mixed_log_probs", "mixed_next_token_log_probs", "sample_tokens", "CHUNK_ROWS",
]
