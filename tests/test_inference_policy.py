"""One inference thought policy on every path that predicts with thoughts: the eval-mode forward (what
lm-evaluation-harness calls), `quietstar eval`'s scoring and cached `generate()`. Greedy by default, one chain when
greedy, sampled only when asked; training mode unchanged."""

import pytest
import torch
from transformers import DynamicCache

from conftest import make_model, random_text
from quietstar.qa import continuation_log_probs
from quietstar.scoring import thought_sampling, token_log_probs


def test_eval_forward_is_deterministic_and_writes_one_greedy_chain():
    model, _ = make_model("llama", n_thoughts=2, thought_temperature=1.0)
    ids = random_text(2, 9)
    with torch.no_grad():
        first, second = model(ids), model(ids)  # no labels, no mask: lm-evaluation-harness's call
    assert torch.equal(first.logits, second.logits)
    assert first.thought_ids.shape[1] == 1 and first.mixing_weights.shape[1] == 1


def test_greedy_single_chain_equals_n_identical_greedy_chains():
    model, _ = make_model("qwen2", n_thoughts=3)
    ids = random_text(2, 8)
    with torch.no_grad():
        single = model(ids)
        thought_ids = single.thought_ids.expand(-1, 3, -1, -1)
        repeated = model(ids, thought_ids=thought_ids)
    torch.testing.assert_close(single.logits, repeated.logits, atol=1e-5, rtol=1e-5)


def test_sampled_only_when_asked():
    model, _ = make_model("llama", n_thoughts=2, inference_thought_temperature=0.0)
    ids = random_text(1, 12)
    with torch.no_grad():
        torch.manual_seed(0)
        sampled = model(ids, thought_temperature=1.0)
        model.config.inference_thought_temperature = 1.0
        torch.manual_seed(0)
        by_config = model(ids)
    assert sampled.thought_ids.shape[1] == 2
    assert torch.equal(sampled.thought_ids, by_config.thought_ids)
    assert not torch.equal(sampled.thought_ids[:, 0], sampled.thought_ids[:, 1])  # two different samples


def test_training_mode_samples_n_chains_at_the_training_temperature():
    model, _ = make_model("llama", n_thoughts=2, thought_temperature=1.0)
    model.train()
    ids = random_text(1, 12)
    out = model(ids, labels=ids)
    assert out.thought_ids.shape[1] == 2 and out.policy_loss is not None
    assert not torch.equal(out.thought_ids[:, 0], out.thought_ids[:, 1])


def test_eval_forward_equals_quietstar_eval_scores_and_greedy_generation():
    model, tokenizer = make_model("mistral", thought_length=3)
    ids = random_text(1, 8)
    with torch.no_grad():
        forward = model(ids).logits  # (1, 8, V) log-probabilities after thinking
        scores = token_log_probs(model, ids)  # what `quietstar eval` scores with
        step = model(ids, cache=DynamicCache(config=model.config.text_config))  # greedy cached generate's step
    assert torch.equal(scores.mixed[0], forward[0, :-1].gather(-1, ids[0, 1:, None]).squeeze(-1))
    torch.testing.assert_close(step.logits[:, 0], forward[:, -1], atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    assert generated.sequences[0, -1] == forward[0, -1].argmax()


def test_multiple_choice_scores_are_deterministic():
    model, tokenizer = make_model("llama")
    scores = [continuation_log_probs(model, tokenizer, "w3 w4 w5", [" w6", " w7 w8"]) for _ in range(2)]
    assert torch.equal(scores[0][1], scores[1][1])


@pytest.mark.parametrize("training", [True, False])
def test_thought_sampling_block_restores_config_and_mode(training):
    model, _ = make_model("llama")
    model.train(training)
    with thought_sampling(model, 2.0, seed=0):
        assert not model.training and model.thought_policy_temperature() == 2.0
    assert model.training == training and model.config.inference_thought_temperature == 0.0


def test_old_configs_generation_thought_temperature_is_read():
    model, _ = make_model("llama")
    config = type(model.config).from_dict({**model.config.to_dict(), "generation_thought_temperature": 0.7})
    assert config.inference_thought_temperature == 0.7


def test_negative_thought_temperature_is_an_error():
    model, _ = make_model("llama")
    with pytest.raises(ValueError, match="thought_temperature must be >= 0"):
        model(random_text(1, 4), thought_temperature=-1.0)
