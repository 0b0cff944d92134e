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

    Inverse-CDF sampling with one uniform draw per row: a row's sample depends only on that row's logits and draw, so
    the thought at position i never depends on text after i (the no-leak property holds under sampling, not only
    under greedy decoding). One draw per row instead of Gumbel noise per element: random numbers per vocabulary entry
    were the costliest element-wise work of a sampling step on CPU. The CDF is summed in float64, so even tokens far
    below float32's resolution of the total keep their exact share.
    """
    if temperature == 0:
        logits = logits.clone()
        logits[..., list(banned_ids)] = float("-inf")
        return logits.argmax(dim=-1)
    scaled = policy_logits(logits, temperature, banned_ids)
    weights = scaled.sub_(scaled.amax(dim=-1, keepdim=True)).exp_()  # unnormalised probabilities, banned = 0
    cdf = weights.cumsum(dim=-1, dtype=torch.float64)
    draw = torch.rand(cdf.shape[:-1], dtype=torch.float64, device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
    # the first token whose cumulative mass exceeds the draw: zero-mass (banned) tokens are never the first
    return torch.searchsorted(cdf, draw, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
