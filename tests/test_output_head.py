"""Chunked per-token log-probabilities from hidden states (output_head.py) against the naive full-vocabulary
computation: values and gradients, linear and soft-capped heads; and the whole training objective against a naive
reimplementation over full logits (fp32, 1e-5)."""

import pytest
import torch
from torch import nn

from conftest import make_model, random_text
from quietstar.objective import LookaheadTargets, lookahead_index, quietstar_loss
from quietstar.output_head import (
    HeadLogProbs,
    OutputHead,
    logits_token_log_probs,
    mixed_log_probs,
    sample_tokens,
    token_log_probs,
)
from quietstar.sampling import sample_thought_tokens

BANNED = (3, 17)


def naive_log_probs(logits, targets, temperature=1.0, banned=BANNED):
    logits = logits.float() / temperature
    logits[..., list(banned)] = float("-inf")
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def make_head(softcap=None, bias=True):
    torch.manual_seed(0)
    linear = nn.Linear(12, 37, bias=bias).double()
    return OutputHead(linear.weight, linear.bias, scale=1.3, softcap=softcap)


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["linear", "softcap"])
def test_token_log_probs_equal_the_full_log_softmax_values_and_gradients(softcap):
    head = make_head(softcap)
    hidden = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 3, 5))
    targets[targets == 3] = 4  # a banned id is never a target
    chunked = token_log_probs(head, hidden, targets, temperature=0.7, banned_ids=BANNED, chunk_rows=4)
    naive = naive_log_probs(head.logits(hidden), targets, temperature=0.7)
    torch.testing.assert_close(chunked, naive, rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(naive)
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias], grad)
    naive_grads = torch.autograd.grad(naive, [hidden, head.weight, head.bias], grad)
    for c, n in zip(chunked_grads, naive_grads):
        torch.testing.assert_close(c, n, rtol=1e-6, atol=1e-6)


def test_banned_target_has_minus_infinite_log_prob_and_no_gradient_into_banned_logits():
    head = make_head()
    hidden = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([17, 5, 3])
    chunked = token_log_probs(head, hidden, targets, banned_ids=BANNED, chunk_rows=2)
    assert chunked[0] == float("-inf") and chunked[2] == float("-inf") and chunked[1].isfinite()
    grad_weight = torch.autograd.grad(chunked, head.weight, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))[0]
    assert torch.all(grad_weight[list(BANNED)] == 0)


def test_weighted_log_prob_sum_equals_the_naive_sum_on_values_and_gradients():
    """HeadLogProbs forms the gradient in forward (linear heads): the weighted sum's gradient equals autograd through
    the full log-softmax, for the hidden states, the weight and the bias; the values come back without gradient."""
    head = make_head()
    hidden = torch.randn(2, 3, 5, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 37, (2, 3, 5))
    targets[0, 0, 0] = 3  # a banned target: -inf, and no gradient into the banned logits
    coefficients = torch.randn(2, 3, 5, dtype=torch.float64)
    coefficients[0, 0, 0] = 0.0
    log_probs = HeadLogProbs(head, hidden, targets, temperature=0.7, banned_ids=BANNED, chunk_rows=4)
    total, values = log_probs.weighted_sum(coefficients)
    naive = naive_log_probs(head.logits(hidden), targets, temperature=0.7)
    assert values[0, 0, 0] == float("-inf") and not values.requires_grad
    torch.testing.assert_close(values, naive, rtol=1e-6, atol=1e-6)
    kept = coefficients != 0  # the -inf of the banned target, with coefficient 0, is left out (not nan)
    torch.testing.assert_close(total.double(), (coefficients * naive)[kept].sum(), rtol=1e-6, atol=1e-6)
    inputs = [hidden, head.weight, head.bias]
    naive_grads = torch.autograd.grad((coefficients * naive)[kept].sum(), inputs)
    for c, n in zip(torch.autograd.grad(3.0 * total, inputs), naive_grads):  # the incoming gradient scales them
        torch.testing.assert_close(c, 3.0 * n, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        total_no_grad, values_no_grad = log_probs.weighted_sum(coefficients)
    assert not total_no_grad.requires_grad
    torch.testing.assert_close(values_no_grad, values)


def test_weighted_log_prob_sum_of_a_frozen_head_gives_only_the_hidden_gradient_and_runs_backward_once():
    head = make_head(bias=False)
    head = OutputHead(head.weight.detach(), None, scale=1.3)  # frozen, as under LoRA
    hidden = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(5, 37, (7,))
    coefficients = torch.randn(7, dtype=torch.float64)
    total, _ = HeadLogProbs(head, hidden, targets, banned_ids=BANNED, chunk_rows=3).weighted_sum(coefficients)
    total.backward(retain_graph=True)
    naive = (coefficients * naive_log_probs(head.logits(hidden), targets)).sum()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(naive, hidden)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(RuntimeError, match="ran twice.*Compute the loss again"):
        total.backward()


def scaled_backward(total, inputs, incoming):
    """Gradients of `total` as a training step forms them: "unit" plain; "policy-weight-1e6" through the paper's
    policy_weight; "grad-scaler" through torch.amp.GradScaler's loss scale (2**16), unscaled afterwards as its
    `unscale_` does (done by hand: it refuses fp16 parameters)."""
    if incoming == "grad-scaler":
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        return [g / scaler.get_scale() for g in torch.autograd.grad(scaler.scale(total), inputs)]
    return torch.autograd.grad(total * (1e6 if incoming == "policy-weight-1e6" else 1.0), inputs)


@pytest.mark.parametrize("path", ["per-token", "weighted-sum"])
@pytest.mark.parametrize("incoming", ["unit", "policy-weight-1e6", "grad-scaler"])
@pytest.mark.parametrize("low_precision", ["bf16-autocast", "bf16-weights", "fp16-autocast", "fp16-weights"])
def test_log_probs_in_half_precision_match_the_naive_computation_in_the_same_precision(low_precision, incoming, path):
    """Under CPU autocast over fp32 weights and with bf16 / fp16 weights (a half-precision model), per-token log-probs
    (chunks recomputed in backward) and the weighted sum (gradient formed in forward, matmuls in the forward's dtype):
    against autograd through the naive full-vocabulary log-softmax in the same precision, both against the fp64
    truth, the error is within 2x of the naive computation's. "policy-weight-1e6" and "grad-scaler": coefficients of
    REINFORCE's size (advantage / (count * T), ~1e-7), whose gradient only the incoming factor lifts into fp16's range
    (the weighted sum's used to underflow to 0 under fp16 autocast and become inf with fp16 weights)."""
    half = torch.bfloat16 if low_precision.startswith("bf16") else torch.float16
    autocast = low_precision.endswith("autocast")
    truth_head = make_head()
    dtype = torch.float32 if autocast else half
    head = OutputHead(truth_head.weight.detach().to(dtype).requires_grad_(), None, scale=1.3)
    truth_head = OutputHead(truth_head.weight.detach().clone().requires_grad_(), None, scale=1.3)
    hidden = torch.randn(40, 12, dtype=dtype, requires_grad=True)
    targets = torch.randint(5, 37, (40,))
    targets[targets == 17] = 18  # no banned target: its -inf would make every error nan
    coefficients = torch.randn(40) * (1.0 if incoming == "unit" else 1e-7)
    with torch.autocast("cpu", dtype=half, enabled=autocast):
        if path == "per-token":
            values = token_log_probs(head, hidden, targets, temperature=0.7, banned_ids=BANNED, chunk_rows=16)
            total = (coefficients * values).sum()
        else:
            total, values = HeadLogProbs(head, hidden, targets, 0.7, BANNED, chunk_rows=16).weighted_sum(coefficients)
        naive = naive_log_probs(head.logits(hidden), targets, temperature=0.7)
    grads = scaled_backward(total, [hidden, head.weight], incoming)
    naive_grads = scaled_backward((coefficients * naive).sum(), [hidden, head.weight], incoming)
    truth_hidden = hidden.detach().double().requires_grad_()
    truth = naive_log_probs(truth_head.logits(truth_hidden), targets, temperature=0.7)
    truth_grads = scaled_backward((coefficients.double() * truth).sum(), [truth_hidden, truth_head.weight], incoming)
    assert (values - truth).abs().max() <= 2 * (naive - truth).abs().max() + 1e-6
    for c, n, t in zip(grads, naive_grads, truth_grads):
        assert c.dtype == n.dtype and torch.isfinite(c).all()
        error, naive_error = (c.double() - t).abs().max(), (n.double() - t).abs().max()
        one_ulp = torch.finfo(half).eps * t.abs().max()  # a rounding-level allowance: the two differ by chance there
        assert error <= 2 * naive_error + one_ulp, f"error {error:.3g}, naive's {naive_error:.3g}"


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["linear-mixes-hidden-states", "softcap-mixes-logits"])
def test_mixed_log_probs_equal_mixing_the_logits(softcap):
    head = make_head(softcap)
    base = torch.randn(2, 1, 6, 12, dtype=torch.float64, requires_grad=True).expand(2, 3, 6, 12)
    thought = torch.randn(2, 3, 6, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(2, 3, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(5, 37, (2, 3, 6))
    z_base, z_thought = head.logits(base), head.logits(thought)
    naive = naive_log_probs(z_base + weight.unsqueeze(-1) * (z_thought - z_base), targets)
    coefficients = torch.randn_like(naive)
    total, values = mixed_log_probs(head, base, thought, weight, targets, banned_ids=BANNED, chunk_rows=5).weighted_sum(
        coefficients
    )
    torch.testing.assert_close(values, naive, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(total, (coefficients * naive).sum(), rtol=1e-6, atol=1e-6)
    inputs = [thought, weight, head.weight]
    for c, n in zip(torch.autograd.grad(total, inputs), torch.autograd.grad(naive, inputs, coefficients)):
        torch.testing.assert_close(c, n, rtol=1e-6, atol=1e-6)


def test_logits_token_log_probs_upcast_chunk_by_chunk():
    logits = torch.randn(3, 7, 37, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(5, 37, (3, 7))
    chunked = logits_token_log_probs(logits, targets, banned_ids=BANNED, chunk_rows=4)
    naive = naive_log_probs(logits, targets)
    torch.testing.assert_close(chunked, naive)
    torch.testing.assert_close(torch.autograd.grad(chunked.sum(), logits)[0], torch.autograd.grad(naive.sum(), logits)[0])


def test_greedy_sampling_is_the_argmax_without_banned_ids():
    head = make_head()
    hidden = torch.randn(4, 9, 12, dtype=torch.float64)
    logits = head.logits(hidden)
    logits[..., list(BANNED)] = float("-inf")
    assert torch.equal(sample_tokens(head, hidden, 0.0, BANNED, chunk_rows=5), logits.argmax(-1))
    sampled = sample_tokens(head, hidden, 1.0, BANNED, chunk_rows=5)
    assert not torch.isin(sampled, torch.tensor(BANNED)).any()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_sampled_tokens_follow_the_policy_distribution(temperature):
    """200k draws from one row's policy (banned ids removed, temperature applied): every token's frequency is within
    5 standard errors of its probability, banned ids are never drawn, and rows are drawn independently."""
    torch.manual_seed(0)
    logits = torch.randn(37, dtype=torch.float64) * 2
    draws = 200_000
    sampled = sample_thought_tokens(logits.expand(draws, 37), temperature, BANNED)
    frequency = torch.bincount(sampled, minlength=37).double() / draws
    probability = naive_log_probs(logits.expand(37, 37), torch.arange(37), temperature).exp().double()
    standard_error = (probability * (1 - probability) / draws).sqrt()
    assert torch.all((frequency - probability).abs() <= 5 * standard_error + 1e-5)
    assert frequency[list(BANNED)].sum() == 0
    assert len(set(sampled[:64].tolist())) > 1  # not one draw shared by all rows


def naive_objective(model, ids, thought_ids):
    """The Quiet-STaR loss from full-vocabulary logits: mixing in logit space, markers masked everywhere."""
    config, markers = model.config, model.marker_ids
    length, lookahead = ids.shape[1], config.lookahead
    text = model.text_pass(ids, None, config.thought_length + lookahead + 1, n_thoughts=thought_ids.shape[1])
    thoughts = model.thought_pass(text, thought_ids, lookahead, with_policy=True)
    ahead = lookahead_index(length, lookahead, ids.device)
    base_hidden = text.hidden[:, ahead].unsqueeze(1).expand_as(thoughts.hidden)
    weights = model.mixing_head(base_hidden, thoughts.hidden)
    targets = LookaheadTargets.build(ids, None, lookahead)
    next_ids = torch.cat([ids[:, 1:], ids[:, :1]], dim=1)
    base = naive_log_probs(text.logits, next_ids, banned=markers)[:, ahead]
    z_base = text.logits.float()[:, ahead].unsqueeze(1)
    mixed_logits = z_base + weights.unsqueeze(-1) * (thoughts.logits() - z_base)
    mixed = naive_log_probs(mixed_logits, targets.targets.unsqueeze(1).expand_as(weights), banned=markers)
    policy = naive_log_probs(thoughts.policy_logits(), thought_ids, config.thought_temperature, banned=markers)
    return quietstar_loss(
        base, mixed, policy, targets.base_mask, targets.thought_mask, base_loss_weight=config.base_loss_weight,
        mixed_loss_weight=config.mixed_loss_weight, policy_weight=config.policy_weight, clip_advantage=config.clip_advantage,
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_chunked_objective_equals_the_full_logits_objective_on_gradients(arch):
    model, _ = make_model(arch, thought_length=3, n_thoughts=2, lookahead=3, policy_weight=1.0, clip_advantage=False)
    model.train()
    model.log_prob_chunk_rows = 7  # many chunks, not a divisor of anything
    with torch.no_grad():
        model.mixing_head.out.bias.fill_(0.0)  # w = 0.5: both predictions matter
    ids = random_text(2, 9)
    thought_ids = random_text(2 * 2 * 9, 3).reshape(2, 2, 9, 3)

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    chunked_loss, chunked = loss_and_grads(lambda: model(ids, labels=ids, thought_ids=thought_ids).loss)
    naive_loss, naive = loss_and_grads(lambda: naive_objective(model, ids, thought_ids).loss)
    torch.testing.assert_close(chunked_loss, naive_loss, rtol=1e-5, atol=1e-5)
    assert chunked.keys() == naive.keys() and len(chunked) > 10
    for name, grad in naive.items():
        torch.testing.assert_close(chunked[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_policy_states_only_when_the_policy_term_is_used():
    model, _ = make_model("llama", policy_weight=1.0)
    ids = random_text(1, 8)
    seen = []
    original = model.think

    def spy(*args, **kwargs):
        thought_ids, thoughts = original(*args, **kwargs)
        seen.append(thoughts.policy_hidden is not None)
        return thought_ids, thoughts

    model.think = spy
    model.train()(ids, labels=ids)  # sampled thoughts, policy term: needed
    model.eval()(ids, labels=ids)  # greedy thoughts: no score function
    model.eval()(ids)  # no labels
    assert seen == [True, False, False]


def test_a_training_step_builds_no_full_vocabulary_prediction():
    model, _ = make_model("llama", policy_weight=1.0)
    ids = random_text(1, 8)
    assert model.train()(ids, labels=ids).logits is None
    assert model.eval()(ids, labels=ids).logits.shape == (1, 8, model.config.text_config.vocab_size)


def test_an_output_head_it_cannot_reproduce_is_refused():
    model, _ = make_model("llama")
    ids = random_text(1, 6)
    model.model.config.logit_scale = 10.0  # the head now claims a scale the base's own logits do not have
    with pytest.raises(NotImplementedError, match="output head.*chunk by chunk"):
        model(ids)
