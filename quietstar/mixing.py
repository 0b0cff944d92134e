"""Mixing head: how much to trust the thought-conditioned prediction over the base one.

    w = sigmoid(MLP([h_base ; h_thought]))                    in (0, 1)
    logits_mixed = (1 - w) * logits_base + w * logits_thought

so p_mixed is proportional to p_base^(1-w) * p_thought^w, the paper's log-space interpolation (Sec. 4.2, eq. "log p^talk";
the paper's weight multiplies the base term, ours the thought term). Unlike the reference code w is bounded, and it
starts near zero without being exactly zero: the model begins as the base model, yet the thought pathway and the
rewards get gradient from the first step (with w = 0 they get none).
"""

import torch
from torch import Tensor, nn

class MixingLogit(nn.Linear):
    """The head's last layer; `QuietStarForCausalLM._init_weights` sets its weight to 0 and its bias to
    `config.initial_mixing_logit` (default -4: w = sigmoid(-4) ~= 0.018), so w starts at one value everywhere."""


class MixingHead(nn.Module):
    """3-layer ReLU MLP on the concatenated hidden states, as in the paper (Appendix A)."""

    def __init__(self, hidden_size: int, mixer_hidden_size: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, mixer_hidden_size),
            nn.ReLU(),
            nn.Linear(mixer_hidden_size, mixer_hidden_size),
            nn.ReLU(),
        )
        self.out = MixingLogit(mixer_hidden_size, 1)

    def forward(self, base_hidden: Tensor, thought_hidden: Tensor) -> Tensor:
        """base_hidden, thought_hidden: (..., H) final-layer states -> w: (..., ) in (0, 1)."""
        features = self.mlp(torch.cat([base_hidden, thought_hidden], dim=-1))
        return torch.sigmoid(self.out(features)).squeeze(-1)


def mix_logits(base_logits: Tensor, thought_logits: Tensor, weight: Tensor) -> Tensor:
    """(1 - w) * base + w * thought. logits (..., V), weight (...) -> (..., V) float32."""
    base_logits = base_logits.float()
    return base_logits + weight.float().unsqueeze(-1) * (thought_logits.float() - base_logits)
