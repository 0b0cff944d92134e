"""Mixing head: how much to trust the thought-conditioned prediction over the base one.

    w = activation(MLP([h_base ; h_thought]))
    logits_mixed = (1 - w) * logits_base + w * logits_thought

so p_mixed is proportional to p_base^(1-w) * p_thought^w, the paper's log-space interpolation (Sec. 4.2, eq. "log p^talk";
the paper's weight multiplies the base term, ours the thought term).

`config.mixing_activation` picks the activation:
- "sigmoid" (default): w in (0, 1). Unlike the reference code w is bounded, and it starts near zero without being
  exactly zero: the model begins as the base model, yet the thought pathway and the rewards get gradient from the first
  step (with w = 0 they get none).
- "identity": w is the head's raw output, unbounded, as in the reference code and its released checkpoints (which
  were trained that way: a sigmoid would change their predictions). Nothing clamps it in training either: the mix is
  in log space, so any finite w gives finite logits and a normalised distribution, and the loss stays finite; w > 1
  extrapolates past the thought's prediction, w < 0 moves away from it. A clamp would also break the exactness of
  converted checkpoints, whose w may leave [0, 1].
"""

import torch
from torch import Tensor, nn

MIXING_ACTIVATIONS = ("sigmoid", "identity")


class MixingLogit(nn.Linear):
    """The head's last layer; `QuietStarForCausalLM._init_weights` sets its weight to 0 and its bias to
    `config.initial_mixing_logit` (sigmoid: -4, w = sigmoid(-4) ~= 0.018; identity: 0.018), so w starts at one value
    everywhere."""


class MixingHead(nn.Module):
    """3-layer ReLU MLP on the concatenated hidden states, as in the paper (Appendix A), then `activation`."""

    def __init__(self, hidden_size: int, mixer_hidden_size: int, activation: str = "sigmoid"):
        super().__init__()
        if activation not in MIXING_ACTIVATIONS:
            raise ValueError(f"mixing activation must be one of {MIXING_ACTIVATIONS}, got {activation!r}.")
        self.mlp = nn.Sequential(
            nn.Linear(2 * hidden_size, mixer_hidden_size),
            nn.ReLU(),
            nn.Linear(mixer_hidden_size, mixer_hidden_size),
            nn.ReLU(),
        )
        self.out = MixingLogit(mixer_hidden_size, 1)
        self.activation = activation  # a plain attribute: `mixing_activation` lives in the config, not in the weights

    def forward(self, base_hidden: Tensor, thought_hidden: Tensor) -> Tensor:
        """base_hidden, thought_hidden: (..., H) final-layer states -> w: (..., ), in (0, 1) under sigmoid."""
        logit = self.out(self.mlp(torch.cat([base_hidden, thought_hidden], dim=-1))).squeeze(-1)
        return torch.sigmoid(logit) if self.activation == "sigmoid" else logit

    def extra_repr(self) -> str:
        return f"activation={self.activation}"


def mix_logits(base_logits: Tensor, thought_logits: Tensor, weight: Tensor) -> Tensor:
    """(1 - w) * base + w * thought. logits (..., V), weight (...) -> (..., V) float32."""
    base_logits = base_logits.float()
    return base_logits + weight.float().unsqueeze(-1) * (thought_logits.float() - base_logits)
