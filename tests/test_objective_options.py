"""Objective options beyond the paper's defaults: the mixing head's initial weight, a direct NLL term on the
thought-conditioned prediction whose gradient does not depend on the mixing weight, and a thought reward measured on
that prediction (`policy_reward="thought"`), which does not vanish with the mixing weight either."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from conftest import make_model, random_text


@pytest.mark.parametrize("logit, weight", [(-4.0, 0.0180), (0.0, 0.5)])
def test_initial_mixing_logit_sets_the_starting_weight(logit, weight):
    model, _ = make_model("llama", initial_mixing_logit=logit)
    out = model(random_text(1, 6))
    torch.testing.assert_close(out.mixing_weights, torch.full_like(out.mixing_weights, weight), atol=1e-4, rtol=0)


def thought_only_step(initial_mixing_logit: float):
    model, _ = make_model("llama", thought_length=2, lookahead=2, policy_weight=0.0, base_loss_weight=0.0,
                          mixed_loss_weight=0.0, thought_nll_weight=1.0, initial_mixing_logit=initial_mixing_logit)
    model.train()
    ids = random_text(2, 8)
    thought_ids = random_text(2 * 2 * 8, 2).reshape(2, 2, 8, 2)
    out = model(ids, labels=ids, thought_ids=thought_ids)
    out.loss.backward()
    return model, ids, thought_ids, out


def test_thought_nll_is_the_post_thought_prediction_alone():
    model, ids, thought_ids, out = thought_only_step(-4.0)
    with torch.no_grad():
        text = model.text_pass(ids, None, 2 + 2 + 1)
        logits = model.thought_pass(text, thought_ids, lookahead=2).logits()  # (B, N, L, A, V)
    logits[..., list(model.marker_ids)] = float("-inf")
    targets = torch.stack([ids[:, 1:-1], ids[:, 2:]], dim=-1)  # x_{i+1}, x_{i+2} for the L - 2 positions that have both
    log_probs = logits[:, :, :-2].log_softmax(-1).gather(-1, targets[:, None, ..., None].expand(-1, 2, -1, -1, 1))
    torch.testing.assert_close(out.nll_thought, -log_probs.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, out.nll_thought, atol=1e-6, rtol=0)


def test_thought_nll_gradient_does_not_depend_on_the_mixing_weight():
    """With w ~ 2e-9 the mixed NLL would hand the readout almost no gradient; this term hands it the same as at w = 0.5."""
    tiny, *_ = thought_only_step(-20.0)
    half, *_ = thought_only_step(0.0)
    grad_tiny, grad_half = tiny.thought_markers.weight.grad, half.thought_markers.weight.grad
    assert grad_tiny.abs().sum() > 0
    torch.testing.assert_close(grad_tiny, grad_half)
    assert tiny.mixing_head.out.bias.grad is None or tiny.mixing_head.out.bias.grad.abs().sum() == 0


def policy_step(policy_reward: str, initial_mixing_logit: float, thought_nll_weight: float = 0.0):
    """One training forward with sampled thoughts (seeded), only the policy term in the loss."""
    model, _ = make_model("llama", thought_length=2, lookahead=2, n_thoughts=2, policy_weight=1.0, base_loss_weight=0.0,
                          mixed_loss_weight=0.0, thought_nll_weight=thought_nll_weight,
                          initial_mixing_logit=initial_mixing_logit, policy_reward=policy_reward)
    model.train()
    ids = random_text(2, 8)
    torch.manual_seed(3)
    return model, ids, model(ids, labels=ids)


def test_thought_reward_is_the_post_thought_gain_over_the_base():
    model, ids, out = policy_step("thought", -4.0)
    thought_ids = out.thought_ids
    with torch.no_grad():
        text = model.text_pass(ids, None, 2 + 2 + 1)
        logits = model.thought_pass(text, thought_ids, lookahead=2).logits()  # (B, N, L, A, V)
        base_logits = model.model(ids).logits
    for logit in (logits, base_logits):
        logit[..., list(model.marker_ids)] = float("-inf")
    targets = torch.stack([ids[:, 1:-1], ids[:, 2:]], dim=-1)  # (B, L-2, A)
    thought = logits[:, :, :-2].log_softmax(-1).gather(-1, targets[:, None, ..., None].expand(-1, 2, -1, -1, 1)).squeeze(-1)
    base_all = base_logits.log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, L-1): x_{j+1} at j
    base = torch.stack([base_all[:, :-1], base_all[:, 1:]], dim=-1)  # (B, L-2, A): x_{i+1} at i, x_{i+2} at i+1
    expected = (thought - base[:, None]).sum(-1)
    torch.testing.assert_close(out.rewards[:, :, :-2], expected, atol=1e-4, rtol=1e-4)
    assert (out.rewards[:, :, -2:] == 0).all()


def test_thought_reward_teaches_the_policy_whatever_the_mixing_weight():
    """The paper's reward is log p_mixed - log p_base: at w ~ 2e-9 it is ~0 and so is the policy gradient. The
    "thought" reward does not depend on w: the policy's gradient is the same at w ~ 2e-9 and w = 0.5."""
    grads = {}
    for reward in ("mixed", "thought"):
        for logit in (-20.0, 0.0):
            model, _, out = policy_step(reward, logit)
            out.loss.backward()
            grads[reward, logit] = model.model.model.layers[0].mlp.up_proj.weight.grad.clone()
    assert grads["mixed", -20.0].abs().max() < 1e-6 < grads["mixed", 0.0].abs().max()
    assert grads["thought", -20.0].abs().max() > 1e-5  # 10x above the vanished bound (9.9e-5 on this seed)
    torch.testing.assert_close(grads["thought", -20.0], grads["thought", 0.0])


def test_unknown_policy_reward_is_refused():
    with pytest.raises(StrictDataclassClassValidationError, match="policy_reward. must be one of .'mixed', 'thought'."):
        make_model("llama", policy_reward="mixd")


def test_identity_mixing_weight_is_the_raw_head_output_outside_zero_one():
    """`mixing_activation="identity"` (the reference code's head): w is the head's output itself, here 1.7, and the
    prediction is the log-space extrapolation (1 - w) base + w thought, renormalised, markers excluded."""
    model, _ = make_model("llama", mixing_activation="identity", initial_mixing_logit=1.7)
    ids = random_text(1, 6)
    with torch.no_grad():
        out = model(ids, thought_temperature=0.0)
        text = model.text_pass(ids, None, model.config.thought_length + 2, n_thoughts=1)
        thought_logits = model.thought_pass(text, out.thought_ids, lookahead=1).logits()[:, 0, :, 0]  # (B, L, V)
    torch.testing.assert_close(out.mixing_weights, torch.full_like(out.mixing_weights, 1.7))
    expected = -0.7 * out.base_logits + 1.7 * thought_logits
    expected[..., list(model.marker_ids)] = float("-inf")
    torch.testing.assert_close(out.logits, expected.log_softmax(-1), atol=1e-5, rtol=1e-5)


def test_identity_mixing_defaults_to_the_sigmoid_default_starting_weight():
    model, _ = make_model("llama", mixing_activation="identity")
    out = model(random_text(1, 6))
    torch.testing.assert_close(out.mixing_weights, torch.full_like(out.mixing_weights, 0.0180), atol=1e-4, rtol=0)


def test_identity_mixing_trains_unclamped_with_finite_loss_and_gradients():
    """Training with the unbounded weight: w = -0.5 (no sigmoid could give it) still gives a finite loss, finite
    gradients everywhere, and the head's bias moves by exactly -lr * dL/dw summed over positions (no clamp)."""
    model, _ = make_model("llama", thought_length=2, lookahead=2, n_thoughts=2, mixing_activation="identity",
                          initial_mixing_logit=-0.5)
    model.train()
    ids = random_text(2, 8)
    out = model(ids, labels=ids)
    assert (out.mixing_weights == -0.5).all()
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None or torch.isfinite(parameter.grad).all(), name
    bias_grad = model.mixing_head.out.bias.grad
    assert bias_grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        moved = model(ids, labels=ids).mixing_weights
    torch.testing.assert_close(moved, torch.full_like(moved, -0.5 - 0.1 * bias_grad.item()))


def test_unknown_mixing_activation_is_refused():
    with pytest.raises(StrictDataclassClassValidationError, match="mixing_activation"):
        make_model("llama", mixing_activation="tanh")
