"""Thought sampling: the policy that writes thoughts.

The policy at one chain step is softmax(logits / temperature) with the two marker tokens removed (a thought never
opens or closes itself). REINFORCE scores the thoughts under this same distribution (`output_head.token_log_probs`
with the same temperature and banned ids); the reference code sampled at temperature 1 but scored at 3, which is
the gradient of a different policy.
"""

from collections.abc import Sequence

import torch
from torch import Tensor


def policy_logits(logits: Tensor, temperature: float, banned_ids: Sequence[int]) -> Tensor:
    """(..., V) float32 logits of the thought policy: divided by `temperature` (> 0), `banned_ids` at -inf."""
    if temperature <= 0:
        raise ValueError("the policy of a greedy (temperature 0) sampler has no log-probabilities.")
    logits = logits.float() / temperature
    logits[..., list(banned_ids)] = float("-inf")
    return logits


def sample_thought_tokens(logits: Tensor, temperature: float, banned_ids: Sequence[int]) -> Tensor:
    """Sample one token per row. logits (..., V) -> ids (...). temperature 0 = greedy (argmax).

    Gumbel-max with independent noise per element: a row's sample depends only on that row's logits and noise, so
    the thought at position i never depends on text after i (the no-leak property holds under sampling, not only
    under greedy decoding).
    """
    if temperature == 0:
        logits = logits.clone()
        logits[..., list(banned_ids)] = float("-inf")
        return logits.argmax(dim=-1)
    scaled = policy_logits(logits, temperature, banned_ids)
    gumbel = -torch.empty_like(scaled).exponential_().log_()
    return (scaled + gumbel).argmax(dim=-1)
