"""`thought_positions="scored"`: a training forward with labels thinks only at the window of positions with a scored
lookahead target, and computes the same loss and gradients as thinking everywhere (given the same thoughts)."""

import pytest
import torch

from conftest import make_model, random_text
from quietstar.objective import scored_positions

FIELDS = dict(thought_length=3, lookahead=2, n_thoughts=2, thought_temperature=1.0, policy_weight=1.0,
              base_loss_weight=0.5, mixed_loss_weight=1.0, thought_nll_weight=0.5, initial_mixing_logit=0.0)


def answer_labels(ids: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    """Labels -100 except in each row's span [start, end): a prompt/answer example."""
    labels = torch.full_like(ids, -100)
    for row, (start, end) in enumerate(spans):
        labels[row, start:end] = ids[row, start:end]
    return labels


def test_the_window_runs_from_the_first_to_the_last_scored_position_of_any_row():
    ids = random_text(2, 10)
    labels = answer_labels(ids, [(5, 8), (6, 10)])  # lookahead 2: row 0 scores positions 4, 5; row 1 positions 5 .. 7
    assert scored_positions(labels, None, lookahead=2) == slice(4, 8)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding hides row 1's last two targets: its positions 5 only
    assert scored_positions(labels, mask, lookahead=2) == slice(4, 6)
    assert scored_positions(torch.full_like(ids, -100), None, lookahead=2) == slice(None)  # nothing scored: all


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_scored_positions_give_the_loss_and_gradients_of_thinking_everywhere(backend):
    ids = random_text(2, 10)
    labels = answer_labels(ids, [(5, 8), (6, 10)])
    thought_ids = random_text(2 * 2 * 10, 3, seed=1).reshape(2, 2, 10, 3)
    results = {}
    for positions in ("all", "scored"):
        model, _ = make_model("llama", thought_positions=positions, thought_attention_backend=backend, **FIELDS)
        model.train()
        out = model(ids, labels=labels, thought_ids=thought_ids)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[positions] = out, grads
    (every, every_grads), (scored, scored_grads) = results["all"], results["scored"]
    for part in ("loss", "nll_base", "nll_mixed", "nll_thought", "policy_loss", "reward_mean", "rewards"):
        torch.testing.assert_close(getattr(scored, part), getattr(every, part), atol=1e-6, rtol=1e-5, msg=part)
    assert scored_grads.keys() == every_grads.keys()
    for name, grad in every_grads.items():  # fp32 sums in another order: rounding of the largest entry
        atol = 1e-6 * grad.abs().max().item()
        torch.testing.assert_close(scored_grads[name], grad, atol=atol, rtol=1e-5, msg=name)
    window = slice(4, 8)
    torch.testing.assert_close(scored.mixing_weights[:, :, window], every.mixing_weights[:, :, window])
    assert (scored.mixing_weights[:, :, :4] == 0).all() and (scored.mixing_weights[:, :, 8:] == 0).all()
    assert torch.equal(scored.thought_ids[:, :, window], thought_ids[:, :, window])
    assert (scored.thought_ids[:, :, :4] == -100).all() and (scored.thought_ids[:, :, 8:] == -100).all()


def test_sampled_thoughts_are_written_only_in_the_window():
    model, _ = make_model("llama", thought_positions="scored", **FIELDS)
    model.train()
    ids = random_text(2, 10)
    out = model(ids, labels=answer_labels(ids, [(5, 8), (6, 10)]))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert (out.thought_ids[:, :, 4:8] >= 0).all()
    assert (out.thought_ids[:, :, :4] == -100).all() and (out.thought_ids[:, :, 8:] == -100).all()
    assert model.thought_markers.weight.grad.abs().sum() > 0


def test_evaluation_thinks_everywhere_whatever_the_setting():
    model, _ = make_model("llama", thought_positions="scored", **FIELDS)
    model.eval()
    ids = random_text(2, 10)
    out = model(ids, labels=answer_labels(ids, [(5, 8), (6, 10)]))
    assert out.logits.shape[:2] == (2, 10) and (out.thought_ids >= 0).all()


def test_an_unknown_setting_is_refused_with_the_choices():
    with pytest.raises(Exception, match="thought_positions.*'all', 'scored'"):
        make_model("llama", thought_positions="answers")
