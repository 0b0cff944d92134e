"""Per-token log-likelihood of given text with and without thoughts: the one measurement every evaluation builds on.

One Quiet-STaR forward gives both predictions of every next token: `base_logits` (the wrapped model, no thought) and
`logits` (after thinking: the mixed prediction averaged over the N thoughts, markers masked). The base prediction is
scored with the thought markers masked too, so both are distributions over the same vocabulary: the markers are never
text, and the base model before wrapping had no such tokens.

Scoring predicts as the model does in eval mode, with its inference thought policy
(`config.inference_thought_temperature`, default 0: greedy thoughts, deterministic); `thought_sampling` sets another
temperature, and the seed, for a block of evaluation.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from .modeling_quietstar import QuietStarForCausalLM


@dataclass
class TokenLogProbs:
    """log p(x_{i+1} | x_0..x_i) for i = 0 .. L-2: base (B, L-1) without thought, mixed (B, L-1) after thinking;
    valid (B, L-1) marks targets that are real tokens (not padding); hidden (B, L-1, H) the base model's final
    hidden state at x_i (when asked for)."""

    base: Tensor
    mixed: Tensor
    valid: Tensor
    hidden: Tensor | None = None


@contextlib.contextmanager
def thought_sampling(model: QuietStarForCausalLM, temperature: float | None, seed: int) -> Iterator[None]:
    """Within the block the model is in eval mode and writes thoughts at `temperature` (None: its own
    `inference_thought_temperature`; 0: greedy), in forward and in `generate()` alike, and the torch RNG starts from
    `seed`. The config and the training mode are restored afterwards."""
    saved, was_training = model.config.inference_thought_temperature, model.training
    if temperature is not None:
        model.config.inference_thought_temperature = float(temperature)
    model.eval()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        model.config.inference_thought_temperature = saved
        model.train(was_training)


@torch.no_grad()
def token_log_probs(
    model: QuietStarForCausalLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    thought_temperature: float | None = None,
    with_hidden: bool = False,
) -> TokenLogProbs:
    """Score every next token of `input_ids` (B, L), right-padded, with and without thoughts, in one forward.
    `thought_temperature`: None = the model's thought policy (eval mode: `inference_thought_temperature`)."""
    input_ids = input_ids.to(model.device)
    attention_mask = attention_mask.to(model.device) if attention_mask is not None else None
    out = model(
        input_ids, attention_mask=attention_mask, thought_temperature=thought_temperature, output_hidden_states=with_hidden
    )
    base, mixed = next_token_log_probs(out, input_ids[:, 1:], model.marker_ids)
    valid = torch.ones_like(base, dtype=torch.bool) if attention_mask is None else attention_mask[:, 1:].bool()
    hidden = out.hidden_states[-1][:, :-1].cpu() if with_hidden else None
    return TokenLogProbs(base=base.cpu(), mixed=mixed.cpu(), valid=valid.cpu(), hidden=hidden)


def next_token_distributions(outputs, marker_ids: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """From one forward's output (`base_logits`, `logits` (B, L, V)), the next-token log-probabilities over the whole
    vocabulary without thinking (base, the markers masked, so both are distributions over text tokens) and with it
    (the output's log-probabilities). Returns base, mixed (B, L, V) float32."""
    base_logits = outputs.base_logits.float()
    base_logits[..., list(marker_ids)] = float("-inf")
    return base_logits.log_softmax(-1), outputs.logits.float()


def next_token_log_probs(outputs, targets: Tensor, marker_ids: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """log p(x_{i+1}) of `targets` (B, L-1) (ids >= 0) without and with thinking (`next_token_distributions` at
    positions 0 .. L-2). Returns base, mixed (B, L-1) float32."""
    base, mixed = next_token_distributions(outputs, marker_ids)
    targets = targets.unsqueeze(-1)
    return base[:, :-1].gather(-1, targets).squeeze(-1), mixed[:, :-1].gather(-1, targets).squeeze(-1)


@dataclass
class PathScores:
    """One predictor's scores of labelled next tokens: log_probs (B, L-1) log p(target) (0 where not valid), exact
    (B, L-1) whether the target is the argmax, valid (B, L-1) whether position i has a target (label != -100)."""

    log_probs: Tensor
    exact: Tensor
    valid: Tensor

    def row_nll(self) -> Tensor:
        """(B,) summed NLL of each row's labelled tokens."""
        return -(self.log_probs * self.valid).sum(dim=1)

    def row_exact(self) -> Tensor:
        """(B,) 1.0 where every labelled token of the row is the argmax (and the row has one), else 0.0."""
        return ((self.exact | ~self.valid).all(dim=1) & self.valid.any(dim=1)).float()


@dataclass
class LabelScores:
    """The labelled tokens of a batch under one forward: `mixed` is the model's own prediction (the mixed one for a
    Quiet-STaR model, the logits of a plain causal LM); `base` the Quiet-STaR model's base path (None for a plain
    LM); mixing_weight (B, L-1) w averaged over the thoughts (None for a plain LM)."""

    mixed: PathScores
    base: PathScores | None
    mixing_weight: Tensor | None

    @property
    def valid(self) -> Tensor:
        return self.mixed.valid


def label_scores(outputs, labels: Tensor, marker_ids: tuple[int, int] | None) -> LabelScores:
    """Score the labelled next tokens (`labels` (B, L), -100 = not scored; target of position i is labels[:, i+1],
    as in a causal LM's loss) from one forward's output. `marker_ids`: the Quiet-STaR model's, or None for a plain
    causal LM."""
    targets = labels[:, 1:]
    valid = targets != -100
    index = targets.clamp(min=0).unsqueeze(-1)

    def path(log_probs: Tensor) -> PathScores:  # (B, L-1, V) -> scores of the targets
        return PathScores(
            log_probs=log_probs.gather(-1, index).squeeze(-1).masked_fill(~valid, 0.0),
            exact=log_probs.argmax(-1) == targets,
            valid=valid,
        )

    if marker_ids is None:
        return LabelScores(mixed=path(outputs.logits[:, :-1].float().log_softmax(-1)), base=None, mixing_weight=None)
    base, mixed = next_token_distributions(outputs, marker_ids)
    weights = outputs.mixing_weights[:, :, :-1].float().mean(dim=1)
    return LabelScores(mixed=path(mixed[:, :-1]), base=path(base[:, :-1]), mixing_weight=weights)


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Token id lists -> input_ids (B, Lmax) right-padded with `pad_id`, attention_mask (B, Lmax)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask


__all__ = ["TokenLogProbs", "PathScores", "LabelScores", "label_scores", "thought_sampling", "token_log_probs", "next_token_log_probs", "next_token_distributions", "right_pad"]
