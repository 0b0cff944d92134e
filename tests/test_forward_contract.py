"""transformers' forward contract: the cache under both names, inputs_embeds, habitual keywords passed through,
logits_to_keep, and the callers that rely on them (generate, pipeline, PEFT-style calls)."""

import pytest
import torch
import transformers
from transformers import DynamicCache, pipeline

from conftest import make_model, random_text
from quietstar.thinking import CACHE_KWARG


def test_cache_keyword_of_the_installed_transformers():
    """5.24 renamed the generation cache keyword to `cache`; older releases use `past_key_values`."""
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    assert CACHE_KWARG == ("cache" if (major, minor) >= (5, 24) else "past_key_values")


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_the_cache_is_accepted_under_both_names(name):
    model, _ = make_model("llama")
    prompt = random_text(2, 6)
    with torch.no_grad():
        reference = model(prompt, cache=DynamicCache(config=model.config.text_config))
        cache = DynamicCache(config=model.config.text_config)
        out = model(prompt, **{name: cache})
    assert cache.get_seq_length() == 6  # the prompt only: the thought was cropped out
    assert out.cache is cache and out.past_key_values is cache
    assert torch.equal(out.logits, reference.logits)


def test_the_cache_twice_under_different_objects_is_an_error():
    model, _ = make_model("llama")
    config = model.config.text_config
    with pytest.raises(ValueError, match="pass the KV cache once"):
        model(random_text(1, 4), cache=DynamicCache(config=config), past_key_values=DynamicCache(config=config))


def test_inputs_embeds_none_is_accepted_and_a_tensor_is_a_clear_error():
    model, _ = make_model("llama")
    ids = random_text(1, 6)
    with torch.no_grad():
        assert torch.equal(model(ids, inputs_embeds=None).logits, model(ids).logits)
    with pytest.raises(ValueError, match="does not take `inputs_embeds`.*Pass `input_ids`"):
        model(ids, inputs_embeds=torch.zeros(1, 6, 32))


def test_habitual_keywords_are_accepted_and_others_reach_the_base_model():
    model, _ = make_model("llama")
    ids = random_text(1, 6)
    seen = {}

    def record(module, args, kwargs):
        seen.update(kwargs)

    handle = model.model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        plain = model(ids)
        out = model(ids, return_dict=True, use_cache=False, output_attentions=False, my_flag="passed through")
    handle.remove()
    assert seen.get("my_flag") == "passed through"
    assert torch.equal(out.logits, plain.logits)


def test_logits_to_keep_keeps_the_last_positions():
    model, _ = make_model("qwen2")
    ids = random_text(2, 7)
    with torch.no_grad():
        full = model(ids)
        last = model(ids, logits_to_keep=2)
    assert last.logits.shape[1] == 2
    assert torch.equal(last.logits, full.logits[:, -2:]) and torch.equal(last.base_logits, full.base_logits[:, -2:])


def test_generate_with_and_without_cache_agree():
    """Both paths predict with the same (greedy, eval-mode) thought policy."""
    model, _ = make_model("llama")
    prompt = random_text(1, 5)
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_text_generation_pipeline_runs(tmp_path):
    model, tokenizer = make_model("llama")
    model.generation_config.eos_token_id = None
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    text = generator("w3 w4 w5", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    ids = tokenizer("w3 w4 w5", return_tensors="pt").input_ids
    expected = tokenizer.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0], skip_special_tokens=True)
    assert text.replace(" ", "") == expected.replace(" ", "") and len(expected.split()) > 3  # word-level decode joins


def test_a_peft_style_call_trains():
    """PEFT's causal-LM wrapper calls forward with inputs_embeds=None and the habitual flags."""
    model, _ = make_model("llama")
    model.train()
    ids = random_text(2, 8)
    out = model(
        input_ids=ids, attention_mask=torch.ones_like(ids), inputs_embeds=None, labels=ids,
        output_attentions=None, output_hidden_states=None, return_dict=True,
    )
    out.loss.backward()
    assert model.mixing_head.out.bias.grad is not None
