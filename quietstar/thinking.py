"""Thinking while generating: one KV-cached decoding step of `QuietStarForCausalLM`, called by `generate()`.

For the newest position i (its token x_i is being fed), the step

    1. runs the base model on the new token(s) and, in the same call, `<|startofthought|>` right after x_i;
    2. (adaptive) asks the think gate whether a thought at i is worth it; if not, drops the marker and stops here;
    3. writes the thought t_1 .. t_T one cached token at a time (greedy or sampled, markers excluded), then feeds
       t_T and `<|endofthought|>` together: T + 1 model calls per generated token in all;
    4. mixes the base prediction at x_i with the post-thought one at the end marker (the mixing head, as in training);
    5. crops the thought's T + 2 entries out of the cache, so it holds only prompt + generated text.

Positions follow training: chain step s of position i has position id i + 1 + s (start marker i + 1, t_k i + 1 + k,
end marker i + T + 2), so the cached step sees exactly the explicit sequence x_0 .. x_i SoT t_1 .. t_T EoT.

Dimensions: B batch, P new tokens in this call (the prompt at the first step, then 1), T thought tokens, H hidden
size, V vocabulary.
"""

import inspect
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache

from .mixing import mix_logits
from .sampling import sample_thought_tokens


# The keyword transformers' models take the KV cache under: `cache` from 5.24 on, `past_key_values` before (still
# accepted there, with a deprecation warning). Read off the installed version rather than compared with a version number.
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"


class ThinkGate(nn.Module):
    """Linear probe h -> w . h + b predicting the log-likelihood gain of thinking (nats); zero until calibrated
    (adaptive.py). Buffers, not parameters: it is fitted in closed form, never by gradient, so optimizers and DDP
    ignore it, while save_pretrained / from_pretrained keep it."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(hidden_size))
        self.register_buffer("bias", torch.zeros(()))

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden (..., H) -> predicted gain (...), float32."""
        return (hidden.to(self.weight) @ self.weight + self.bias).float()


@dataclass
class ThoughtStep:
    """What one generation step thought, per batch row. thought_ids (B, T) (-1 where no thought was written),
    mixing_weight (B,) (0 where skipped), thought_taken (B,) bool, predicted_gain (B,) the think gate's estimate."""

    thought_ids: Tensor
    mixing_weight: Tensor
    thought_taken: Tensor
    predicted_gain: Tensor


@dataclass
class ThoughtTrace:
    """Recorder passed as `generate(..., thought_trace=trace)`: one `ThoughtStep` per generated token, in order.
    `quietstar.inspection.generate_with_thoughts` turns it into per-token text."""

    steps: list[ThoughtStep] = field(default_factory=list)

    def record(self, step: ThoughtStep) -> None:
        self.steps.append(step)


@dataclass
class StepResult:
    """logits (B, V): next-token log-probabilities after thinking (markers masked); base_logits (B, V) the base
    model's logits at the same position; thought: what was thought."""

    logits: Tensor
    base_logits: Tensor
    thought: ThoughtStep


def check_cache(cache) -> None:
    """Thinking writes T + 2 entries past the text into the cache and drops them with `crop`: it needs a growing,
    croppable cache. Static caches (fixed length, croppable from transformers 5.24 on) have no room for them."""
    if not isinstance(cache, Cache) or not cache.is_croppable or cache.is_compileable:
        raise ValueError(
            f"thinking during generation writes each thought's keys/values past the text and drops them with "
            f"`cache.crop`, which needs a growing cache; {type(cache).__name__} is not one. Use the default "
            "DynamicCache (no `cache_implementation`, no static or quantized cache), or generate with `think=False`."
        )


@dataclass
class Thinker:
    """What a decoding step needs from the Quiet-STaR model, handed over explicitly (the model builds it in
    `QuietStarForCausalLM.thinker()`): the wrapped causal LM, its input embedding, the two marker embeddings (H,),
    the mixing head, the think gate, the marker ids and the thought length T."""

    base: nn.Module
    embed: nn.Module
    markers: tuple[Tensor, Tensor]
    mixing_head: nn.Module
    think_gate: ThinkGate
    marker_ids: tuple[int, int]
    thought_length: int


def think_next_token(
    thinker: Thinker,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    position_ids: Tensor | None,
    cache: Cache,
    temperature: float,
    threshold: float | None,
) -> StepResult:
    """One cached decoding step with a thought at the last new position (steps 1-5 above).

    input_ids (B, P), attention_mask (B, past + P) as `generate` passes it (left padding allowed), position_ids (B, P).
    """
    check_cache(cache)
    batch, n_new = input_ids.shape
    device = input_ids.device
    past = cache.get_seq_length()
    if position_ids is None:
        position_ids = torch.arange(past, past + n_new, device=device).expand(batch, n_new)
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + n_new, dtype=torch.long, device=device)
    cache.activate_past_recording()  # sliding-window layers: keep what `crop` must restore
    start, end = thinker.markers
    embed, thought_length = thinker.embed, thinker.thought_length

    def marker(row: Tensor) -> Tensor:  # (H,) -> (B, 1, H)
        return row.expand(batch, 1, -1).to(embed.weight.dtype)

    def chain_position(step: int, n: int) -> Tensor:  # (B, n): chain steps step .. step + n - 1 of the last position
        return position_ids[:, -1:] + 1 + torch.arange(step, step + n, device=device)

    def run(embeds: Tensor, positions: Tensor, n_new_columns: int) -> tuple[Tensor, Tensor]:
        """Feed embeds (B, P', H) at `positions` (B, P') through the cache; the mask grows by `n_new_columns`.
        Returns the logits and final hidden states of the last two inputs, (B, <=2, V) and (B, <=2, H)."""
        nonlocal attention_mask
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n_new_columns)], dim=1)
        out = thinker.base(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=positions,
            use_cache=True,
            **{CACHE_KWARG: cache},
            output_hidden_states=True,
            logits_to_keep=2,
        )
        return out.logits, out.hidden_states[-1][:, -2:]

    # 1. the new text and the start marker (chain step 0) in one call
    logits, hidden = run(
        torch.cat([embed(input_ids), marker(start)], dim=1),
        torch.cat([position_ids, chain_position(0, 1)], dim=1),
        n_new_columns=1,  # generate's mask already covers the new text
    )
    base_logits, next_logits, base_hidden = logits[:, -2], logits[:, -1], hidden[:, -2]

    # 2. adaptive: is a thought at this position worth its T + 1 calls?
    predicted_gain = thinker.think_gate(base_hidden)
    think = torch.ones_like(predicted_gain, dtype=torch.bool) if threshold is None else predicted_gain >= threshold
    if not think.any():
        cache.crop(-1)
        no_thought = torch.full((batch, thought_length), -1, dtype=torch.long, device=device)
        thought = ThoughtStep(no_thought, predicted_gain.new_zeros(batch), think, predicted_gain)
        return StepResult(_log_probs(base_logits, thinker.marker_ids), base_logits, thought)

    # 3. the thought, one token at a time; t_T is fed together with the end marker
    tokens = []
    for step in range(1, thought_length + 1):
        token = sample_thought_tokens(next_logits, temperature, thinker.marker_ids)  # t_step, (B,)
        tokens.append(token)
        if step < thought_length:
            logits, _ = run(embed(token)[:, None], chain_position(step, 1), n_new_columns=1)
            next_logits = logits[:, -1]
    closing = torch.cat([embed(tokens[-1])[:, None], marker(end)], dim=1)  # t_T and the end marker, steps T, T + 1
    logits, hidden = run(closing, chain_position(thought_length, 2), n_new_columns=2)
    thought_logits, thought_hidden = logits[:, -1], hidden[:, -1]

    # 4. mixing, as in training; rows the gate skipped keep the base prediction
    weight = thinker.mixing_head(base_hidden, thought_hidden) * think
    mixed = mix_logits(base_logits, thought_logits, weight)

    # 5. forget the thought: the cache keeps only the text
    cache.crop(-(thought_length + 2))
    thought_ids = torch.stack(tokens, dim=-1).masked_fill(~think[:, None], -1)
    thought = ThoughtStep(thought_ids, weight.float(), think, predicted_gain)
    return StepResult(_log_probs(mixed, thinker.marker_ids), base_logits, thought)


def _log_probs(logits: Tensor, marker_ids: tuple[int, int]) -> Tensor:
    """(B, V) -> log-probabilities with the marker tokens masked (a thought marker is never emitted as text)."""
    logits = logits.float().clone()
    logits[:, list(marker_ids)] = float("-inf")
    return logits.log_softmax(dim=-1)
