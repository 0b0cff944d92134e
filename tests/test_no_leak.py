"""Causality: changing token j changes no next-token output at positions < j. Only the teacher-forced lookahead
terms of the loss may see later true tokens."""

import pytest
import torch

from conftest import make_model, random_text


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("with_labels", [False, True])
def test_changing_a_token_changes_nothing_before_it(temperature, with_labels):
    model, _ = make_model("llama", thought_length=3, n_thoughts=2, lookahead=3)
    input_ids = random_text(2, 9)
    j = 5
    changed = input_ids.clone()
    changed[:, j] = 3 + (changed[:, j] - 3 + 7) % 61  # another ordinary word
    outputs = []
    for ids in (input_ids, changed):
        torch.manual_seed(0)  # same sampling noise in both runs
        with torch.no_grad():
            outputs.append(model(ids, labels=ids if with_labels else None, thought_temperature=temperature))
    before, after = outputs
    for name in ("base_logits", "logits"):
        torch.testing.assert_close(getattr(before, name)[:, :j], getattr(after, name)[:, :j], rtol=0, atol=0)
        assert not torch.allclose(getattr(before, name)[:, j:], getattr(after, name)[:, j:])  # the test can fail
    torch.testing.assert_close(before.mixing_weights[..., :j], after.mixing_weights[..., :j], rtol=0, atol=0)
    assert torch.equal(before.thought_ids[:, :, :j], after.thought_ids[:, :, :j])
