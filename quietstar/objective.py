"""The Quiet-STaR objective: base NLL + mixed (thought-conditioned) NLL + REINFORCE on the thoughts.

For thought n after position i, scored on the next A true tokens (paper Sec. 4.4, "non-myopic" reward):

    r[n, i] = sum_{s<A} log p_mixed(x_{i+1+s} | x_{<=i}, thought_n, x_{i+1..i+s}) - log p_base(x_{i+1+s} | x_{<=i+s})
              (policy_reward "thought": p_thought, the post-thought prediction alone, in place of p_mixed)
    adv[n, i] = r[n, i] - mean_n' r[n', i]            (baseline: the mean over the N thoughts of the same position)
    adv = max(adv, 0)                                 (if clip_advantage: only better-than-average thoughts)
    policy_loss = -mean_{n,i} adv[n, i] * mean_k log pi(t_k | ...)

Rewards are constants (no gradient flows through them); minimising -adv * log pi raises the probability of the
thoughts that beat their siblings. Like nanochat's RL, this is plain on-policy REINFORCE: no KL, no ratio clipping.

    loss = base_loss_weight * nll_base + mixed_loss_weight * nll_mixed + policy_weight * policy_loss
           (+ thought_nll_weight * nll_thought, optional: the post-thought prediction alone, not in the paper)

The targets live here too: which text position predicts which true token (`lookahead_index`), the true tokens
after each position and which of them count (`LookaheadTargets`): the one place the forward, the loss and the
rewards take them from.

Dimensions: B batch, N thoughts per position, L positions, A lookahead tokens, T thought tokens.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .output_head import HeadLogProbs, TensorLogProbs

LogProbs = Tensor | HeadLogProbs | TensorLogProbs  # per-token log-probabilities, as the objective takes them

POLICY_REWARDS = ("mixed", "thought")  # what a thought's reward is measured on (config.policy_reward)
THOUGHT_POSITIONS = ("all", "scored")  # where a training forward with labels thinks (config.thought_positions)


def lookahead_index(length: int, lookahead: int, device: torch.device) -> Tensor:
    """(L, A) index i + s: the text position whose base prediction is of x_{i+1+s}, and (for s >= 1) the position of
    the true token x_{i+s} teacher-forced into the chain of position i. Clamped to L - 1 (those entries are masked)."""
    return (torch.arange(length, device=device)[:, None] + torch.arange(lookahead, device=device)).clamp(max=length - 1)


@dataclass
class LookaheadTargets:
    """targets (B, L, A): x_{i+1+s}, the tokens scored after the thought at position i (ids >= 0; ignored entries 0);
    valid (B, L, A): the target exists, is not -100 and not padding."""

    targets: Tensor
    valid: Tensor

    @classmethod
    def build(cls, labels: Tensor, attention_mask: Tensor | None, lookahead: int) -> "LookaheadTargets":
        """From transformers-style labels (B, L) (unshifted, -100 = ignored) and the right-padding mask."""
        length = labels.shape[1]
        valid = labels != -100
        if attention_mask is not None:
            valid = valid & attention_mask.bool()
        target_index = lookahead_index(length, lookahead, labels.device) + 1  # (L, A): i + 1 + s
        in_range = target_index < length
        target_index = target_index.clamp(max=length - 1)
        return cls(labels[:, target_index].clamp(min=0), valid[:, target_index] & in_range)

    @property
    def base_mask(self) -> Tensor:
        """(B, L) position i has a valid next token x_{i+1} (base NLL)."""
        return self.valid[..., 0]

    @property
    def thought_mask(self) -> Tensor:
        """(B, L) all A lookahead tokens of position i are valid (mixed NLL, REINFORCE)."""
        return self.valid.all(dim=-1)


def scored_positions(labels: Tensor, attention_mask: Tensor | None, lookahead: int) -> slice:
    """The positions whose thoughts the objective scores: from the first to the last position that has all A
    lookahead tokens valid in some row (`LookaheadTargets.thought_mask`); all positions if none has. Thoughts
    elsewhere add nothing to the loss (masked), so thinking only here computes the same objective."""
    scored = LookaheadTargets.build(labels, attention_mask, lookahead).thought_mask.any(dim=0).nonzero()
    if scored.numel() == 0:
        return slice(None)
    return slice(int(scored[0]), int(scored[-1]) + 1)


@dataclass
class QuietStarLoss:
    """The weighted total and its (unweighted) parts, scalars; `rewards` (B, N, L') per thought at the thinking
    positions, 0 where masked."""

    loss: Tensor
    nll_base: Tensor
    nll_mixed: Tensor
    policy_loss: Tensor
    reward_mean: Tensor
    rewards: Tensor
    nll_thought: Tensor | None = None


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where the (broadcastable) boolean `mask` holds; 0 if it holds nowhere."""
    mask = mask.expand_as(values)
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def quietstar_loss(
    base_log_probs: Tensor,
    mixed_log_probs: LogProbs,
    policy_log_probs: LogProbs | None,
    base_mask: Tensor,
    thought_mask: Tensor,
    *,
    thinking: slice = slice(None),
    base_loss_weight: float,
    mixed_loss_weight: float,
    policy_weight: float,
    clip_advantage: bool,
    thought_log_probs: LogProbs | None = None,
    thought_nll_weight: float = 0.0,
    policy_reward: str = "mixed",
) -> QuietStarLoss:
    """Combine the per-token log-probabilities into the Quiet-STaR loss.

    Each term is a mean, i.e. a weighted sum with constant coefficients (the advantages are constants too), and the
    chain-step log-probs are taken only that way (`weighted_sum`): a linear head then forms their gradient while the
    logits exist (output_head.HeadLogProbs). Tensors (with their autograd graph) are accepted as well.

    Args:
        base_log_probs: (B, L, A) log p_base(x_{i+1+s}), the base model's prediction at position i+s.
        mixed_log_probs: (B, N, L', A) log p_mixed(x_{i+1+s}) after thought n of position i, for the L' positions
            `thinking` of the L (all by default; the thought terms are zero elsewhere, see `scored_positions`).
        policy_log_probs: (B, N, L', T) log pi(t_k) of the sampled thought tokens, or None when thoughts are greedy
            (a deterministic policy has no score function: the policy term is then 0).
        base_mask: (B, L) position i has a valid next token x_{i+1} (base NLL).
        thought_mask: (B, L) all A lookahead tokens of position i exist and are valid (mixed NLL, REINFORCE).
        thought_log_probs: (B, N, L', A) log p_thought(x_{i+1+s}) from the post-thought states alone, for the
            optional `thought_nll_weight` term (its gradient does not pass through the mixing weight) and for
            `policy_reward` "thought" (the reward then does not vanish with w).
    """
    if policy_reward not in POLICY_REWARDS or (policy_reward == "thought" and thought_log_probs is None):
        raise ValueError(f"policy_reward must be one of {POLICY_REWARDS}; 'thought' needs thought_log_probs, got {policy_reward!r}.")
    mixed, policy, thought = (
        TensorLogProbs(x) if isinstance(x, Tensor) else x for x in (mixed_log_probs, policy_log_probs, thought_log_probs)
    )
    nll_base = -masked_mean(base_log_probs[..., 0], base_mask)
    base_log_probs, thought_mask = base_log_probs[:, thinking], thought_mask[:, thinking]  # the thinking positions
    per_thought = thought_mask.unsqueeze(1)  # (B, 1, L'), broadcast over thoughts
    # masked_mean over (B, N, L) of a mean over the last axis, as coefficients: 1 / (count * size) where counted
    counted = per_thought.expand(mixed.shape[:-1])
    mean_weights = (counted / counted.sum().clamp(min=1)).unsqueeze(-1).float()  # (B, N, L, 1)
    nll_mixed, mixed_values = mixed.weighted_sum(-mean_weights / mixed.shape[-1])

    nll_thought, thought_values = None, None
    if thought is not None:  # its gradient only when its term is in the loss
        with torch.set_grad_enabled(torch.is_grad_enabled() and thought_nll_weight > 0):
            nll_thought, thought_values = thought.weighted_sum(-mean_weights / thought.shape[-1])
    rewarded = thought_values if policy_reward == "thought" else mixed_values
    reward = (rewarded - base_log_probs.detach().unsqueeze(1)).sum(dim=-1)  # (B, N, L), a constant
    advantage = reward - reward.mean(dim=1, keepdim=True)  # baseline: the mean over the N thoughts of the position
    if clip_advantage:
        advantage = advantage.clamp(min=0)
    if policy is None:
        policy_loss = mixed_values.new_zeros(())
    else:
        # where, not a product: a masked entry's advantage may be nan (-inf log-probs of placeholder targets)
        coefficients = torch.where(mean_weights > 0, -advantage.unsqueeze(-1) * mean_weights, 0.0)
        policy_loss, _ = policy.weighted_sum(coefficients / policy.shape[-1])

    loss = base_loss_weight * nll_base + mixed_loss_weight * nll_mixed + policy_weight * policy_loss
    if thought is not None and thought_nll_weight > 0:
        loss = loss + thought_nll_weight * nll_thought
    return QuietStarLoss(
        loss=loss,
        nll_base=nll_base.detach(),
        nll_mixed=nll_mixed.detach(),
        policy_loss=policy_loss.detach(),
        reward_mean=masked_mean(reward, per_thought),
        rewards=torch.where(per_thought, reward, 0.0),
        nll_thought=nll_thought.detach() if nll_thought is not None else None,
    )
