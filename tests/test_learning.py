"""Training signal: the loss falls, the thought embeddings and the mixing head get gradient, REINFORCE raises the
probability of a rewarded thought."""

import torch

from conftest import make_model, random_text
from quietstar.output_head import token_log_probs


def test_a_few_steps_lower_the_loss_and_reach_every_quietstar_parameter():
    model, _ = make_model("llama", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0)
    model.train()
    input_ids = random_text(4, 12).repeat(1, 2)  # a repeated random sequence: learnable in a few steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_at_fixed_seed():
        torch.manual_seed(0)
        with torch.no_grad():
            return model(input_ids, labels=input_ids).loss.item()

    initial = loss_at_fixed_seed()
    head_parameters_reached = set()
    for _ in range(5):
        loss = model(input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.thought_markers.weight.grad.abs().sum(dim=-1).gt(0).all()  # both markers, every step
        # The head's last layer starts at zero weight, so its inner layers get gradient from the second step on.
        head_parameters_reached |= {n for n, p in model.mixing_head.named_parameters() if p.grad.abs().sum() > 0}
        optimizer.step()
    assert head_parameters_reached == {n for n, _ in model.mixing_head.named_parameters()}
    assert loss_at_fixed_seed() < initial - 0.1


def policy_log_prob(model, input_ids, thought_ids):
    """(B, N, L) sum over the thought's tokens of log pi(t_k), teacher-forced."""
    config = model.config
    text = model.text_pass(input_ids, None, config.thought_length + config.lookahead + 1)
    thoughts = model.thought_pass(text, thought_ids, config.lookahead)
    return token_log_probs(
        thoughts.head, thoughts.policy_hidden, thought_ids, temperature=config.thought_temperature,
        banned_ids=model.marker_ids,
    ).sum(-1)


def test_reinforce_raises_the_log_prob_of_the_rewarded_thought():
    # L = A + 1: only position 0 has a full lookahead, so one thought of two is rewarded and the other clipped to 0.
    model, _ = make_model(
        "qwen3", thought_length=3, n_thoughts=2, lookahead=2, policy_weight=1.0, base_loss_weight=0.0, mixed_loss_weight=0.0
    )
    model.train()
    input_ids = random_text(1, 3, seed=3)
    out = model(input_ids, labels=input_ids)
    rewards = out.rewards[0, :, 0]
    assert rewards[0] != rewards[1]
    better = int(rewards.argmax())
    with torch.no_grad():
        before = policy_log_prob(model, input_ids, out.thought_ids)[0, :, 0]

    out.loss.backward()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.grad is not None:
                parameter -= 1e-2 * parameter.grad
        after = policy_log_prob(model, input_ids, out.thought_ids)[0, :, 0]
    assert after[better] > before[better] + 1e-4, (before, after)
