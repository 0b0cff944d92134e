"""Adaptive thinking: skip the thought where a cheap signal predicts that it buys little.

The signal is a linear probe (`ThinkGate`, thinking.py) on the base model's final hidden state at the current position, computed before any
thought token is written:

    gain_hat_i = think_gate(h_base_i)   ~   log p_mixed(x_{i+1}) - log p_base(x_{i+1})

i.e. the reward of thinking at i with a one-token lookahead (the paper's reward, A = 1). Generation thinks only where
gain_hat >= `config.think_threshold` (None: always). `calibrate_think_gate` fits the probe by ridge regression on the
per-token gains the model itself measures on calibration text, then picks the smallest thinking budget that keeps a
chosen fraction of the total gain.

Dimensions: B batch, L text positions, H hidden size, M calibration tokens.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from .scoring import token_log_probs


@dataclass
class GateCalibration:
    """What `calibrate_think_gate` chose and what it keeps on the calibration tokens.

    threshold: the `think_threshold` set in the config. think_fraction: share of tokens that still think.
    kept_gain: gain of adaptive thinking / gain of always thinking (summed over tokens). total_gain: mean gain of
    always thinking per token, nats. n_tokens: calibration tokens used.
    """

    threshold: float
    think_fraction: float
    kept_gain: float
    total_gain: float
    n_tokens: int


def token_gains(model, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-token gain of thinking and the base hidden state it is predicted from, with thoughts written as generation
    writes them (`inference_thought_temperature`).

    input_ids (B, L) -> gains (M,), hidden (M, H) over the M positions i whose next token x_{i+1} is real text.
    """
    scores = token_log_probs(
        model, input_ids, attention_mask, thought_temperature=model.config.inference_thought_temperature, with_hidden=True
    )
    return (scores.mixed - scores.base)[scores.valid], scores.hidden[scores.valid].float()


@torch.no_grad()
def calibrate_think_gate(
    model,
    batches: list[tuple[Tensor, Tensor | None]] | list[Tensor],
    keep_gain: float = 0.9,
    ridge: float = 1e-2,
) -> GateCalibration:
    """Fit `model.think_gate` to the measured per-token gains and set `model.config.think_threshold`.

    Args:
        batches: calibration text, each item `input_ids` (B, L) or `(input_ids, attention_mask)` (right padding).
        keep_gain: fraction of the always-think gain (summed over tokens) the chosen threshold must keep.
        ridge: L2 penalty of the least-squares fit, relative to the mean squared hidden-state norm.

    Thinking where gain_hat >= threshold keeps sum(gain over thinking tokens); the threshold is the largest one
    that keeps >= keep_gain * sum(all gains). If thinking does not help on this text (total gain <= 0), the
    threshold is +inf: never think.
    """
    if not 0 < keep_gain <= 1:
        raise ValueError(f"`keep_gain` must be in (0, 1], got {keep_gain}.")
    gains, hidden = [], []
    for batch in batches:
        input_ids, attention_mask = batch if isinstance(batch, (tuple, list)) else (batch, None)
        g, h = token_gains(model, input_ids, attention_mask)
        gains.append(g)
        hidden.append(h)
    gains, hidden = torch.cat(gains).double(), torch.cat(hidden).double()
    if gains.numel() < 2:
        raise ValueError("calibration needs at least two text tokens with a next token; pass longer or more texts.")

    features = torch.cat([hidden, torch.ones_like(hidden[:, :1])], dim=1)  # (M, H + 1): bias column
    penalty = ridge * hidden.pow(2).sum(1).mean() * torch.eye(features.shape[1], dtype=features.dtype)
    penalty[-1, -1] = 0  # the bias is not shrunk
    solution = torch.linalg.solve(features.T @ features + penalty, features.T @ gains)
    gate = model.think_gate
    gate.weight.copy_(solution[:-1].to(gate.weight))
    gate.bias.copy_(solution[-1].to(gate.bias))

    predicted = gate(hidden).double()
    order = predicted.argsort(descending=True)
    kept = gains[order].cumsum(0)  # kept[k] = gain of thinking on the k + 1 most promising tokens
    total = gains.sum()
    if total <= 0:
        threshold, n_think = float("inf"), 0
    else:
        n_think = int((kept >= keep_gain * total).nonzero()[0]) + 1
        threshold = float(predicted[order[n_think - 1]])
    model.config.think_threshold = threshold
    think = predicted >= threshold
    return GateCalibration(
        threshold=threshold,
        think_fraction=float(think.double().mean()),
        kept_gain=float(gains[think].sum() / total) if total != 0 else 0.0,
        total_gain=float(gains.mean()),
        n_tokens=gains.numel(),
    )
