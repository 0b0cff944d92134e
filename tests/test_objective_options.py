"""Objective options beyond the paper's defaults: the mixing head's initial weight, and a direct NLL term on the
thought-conditioned prediction whose gradient does not depend on the mixing weight."""

import pytest
import torch

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
