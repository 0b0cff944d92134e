"""`think` without gradients continues each chain from its sampling steps' K/V instead of reading the whole chain
again: it must equal reading the same thoughts with one teacher-forced pass (`forward(..., thought_ids=...)`), on
every base architecture, greedy and sampled, with padding."""

import pytest
import torch

from conftest import BASE_CONFIGS, make_model, random_text

FIELDS = ("loss", "nll_mixed", "nll_thought", "policy_loss", "mixing_weights", "logits")


@pytest.mark.parametrize("arch", sorted(BASE_CONFIGS))
def test_written_chains_equal_the_teacher_forced_pass_over_the_same_thoughts(arch):
    model, _ = make_model(arch, policy_weight=1.0, thought_nll_weight=0.5)
    ids = random_text(2, 11)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding
    with torch.no_grad():
        for mode, temperature in (("eval", None), ("train", 1.0)):
            getattr(model, mode)()
            written = model(ids, attention_mask=mask, labels=ids, thought_temperature=temperature)
            read = model(ids, attention_mask=mask, labels=ids, thought_ids=written.thought_ids, thought_temperature=temperature)
            assert written.thought_ids.shape[1] == (1 if temperature is None else 2)
            compared = [f for f in FIELDS if getattr(read, f) is not None]
            assert "loss" in compared and (temperature is None or "policy_loss" in compared)
            for field in compared:
                torch.testing.assert_close(getattr(written, field), getattr(read, field), rtol=1e-5, atol=1e-5,
                                           msg=lambda m: f"{arch} {mode} {field}: {m}")


def test_written_chains_without_labels_predict_like_the_teacher_forced_pass():
    model, _ = make_model("llama")
    ids = random_text(1, 9)
    with torch.no_grad():
        written = model(ids)
        read = model(ids, thought_ids=written.thought_ids)
    torch.testing.assert_close(written.logits, read.logits, rtol=1e-5, atol=1e-5)


def test_with_gradients_the_chains_are_read_by_the_teacher_forced_pass():
    model, _ = make_model("llama", policy_weight=1.0)
    ids = random_text(1, 7)
    calls = []
    original = model.thought_pass
    model.thought_pass = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)
    model.train()(ids, labels=ids).loss.backward()
    with torch.no_grad():
        model(ids, labels=ids)
    assert calls == [1]
