"""`generate()` thinks before each new token with a KV cache: equal to a naive uncached loop over explicit sequences,
thought-free cache, left-padded batches, sampling, stopping, streaming, thinking off, and clear errors."""

import copy

import pytest
import torch
from transformers import DynamicCache, TextStreamer

from conftest import make_model, random_text
from quietstar import ThoughtTrace


def naive_thinking_step(model, plain, sequence):
    """Next-token log-probs for text `sequence` (L,), computed without any cache or Quiet-STaR code path: the plain base
    model on the explicit sequence x_0..x_i SoT t_1..t_T EoT, thought written greedily by rerunning it per token."""
    embed = plain.get_input_embeddings()
    start, end = model.marker_embeddings()
    base = plain(sequence[None], output_hidden_states=True)
    base_logits, base_hidden = base.logits[0, -1], base.hidden_states[-1][0, -1]
    chain = torch.cat([embed(sequence), start[None]])
    thought = []
    for _ in range(model.config.thought_length):
        logits = plain(inputs_embeds=chain[None]).logits[0, -1]
        logits[list(model.marker_ids)] = float("-inf")
        thought.append(logits.argmax())
        chain = torch.cat([chain, embed(thought[-1])[None]])
    after = plain(inputs_embeds=torch.cat([chain, end[None]])[None], output_hidden_states=True)
    weight = model.mixing_head(base_hidden, after.hidden_states[-1][0, -1])
    mixed = (1 - weight) * base_logits + weight * after.logits[0, -1]
    mixed[list(model.marker_ids)] = float("-inf")
    return mixed.log_softmax(-1), torch.stack(thought)


@pytest.mark.parametrize("arch", ["llama", "gemma", "qwen3"])
def test_greedy_generation_equals_a_naive_uncached_loop(arch):
    model, _ = make_model(arch, thought_length=3)
    with torch.no_grad():
        model.mixing_head.out.bias.fill_(0.0)  # w = 0.5: the thought matters
        model.mixing_head.out.weight.normal_()
    prompt = random_text(1, 5)
    trace = ThoughtTrace()
    out = model.generate(
        prompt, max_new_tokens=4, do_sample=False, thought_trace=trace, output_logits=True, return_dict_in_generate=True
    )
    plain = copy.deepcopy(model.model).eval()
    sequence = prompt[0]
    with torch.no_grad():
        for step in range(4):
            log_probs, thought = naive_thinking_step(model, plain, sequence)
            torch.testing.assert_close(out.logits[step][0], log_probs, atol=1e-5, rtol=1e-5)
            assert torch.equal(trace.steps[step].thought_ids[0], thought)
            sequence = torch.cat([sequence, log_probs.argmax()[None]])
    assert torch.equal(out.sequences[0], sequence)
    weights = torch.stack([step.mixing_weight for step in trace.steps])
    assert ((weights > 0.01) & (weights < 0.99)).all()


def test_cache_holds_only_text_after_each_step():
    model, _ = make_model("mistral", thought_length=4)
    prompt = random_text(2, 6)
    cache = DynamicCache(config=model.config.text_config)
    mask = torch.ones_like(prompt)
    new = prompt
    with torch.no_grad():
        for step in range(3):
            out = model(new, attention_mask=mask, past_key_values=cache)
            assert cache.get_seq_length() == prompt.shape[1] + step
            new = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(new)], dim=1)
    generated = model.generate(prompt, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert generated.past_key_values.get_seq_length() == prompt.shape[1] + 5 - 1  # the last token is never fed


def test_cached_step_equals_the_parallel_forward_at_the_last_position():
    """The two paths (cached decoding step, parallel all-positions forward) agree with greedy thoughts."""
    model, _ = make_model("qwen2", thought_length=3, n_thoughts=2)
    prompt = random_text(2, 7)
    with torch.no_grad():
        parallel = model(prompt, thought_temperature=0.0)
        step = model(prompt, past_key_values=DynamicCache(config=model.config.text_config))
    torch.testing.assert_close(step.logits[:, 0], parallel.logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.mixing_weights[:, 0, 0], parallel.mixing_weights[:, 0, -1], atol=1e-5, rtol=1e-5)
    assert torch.equal(step.thought_ids[:, 0, 0], parallel.thought_ids[:, 0, -1])


def test_left_padded_batch_equals_prompts_one_by_one():
    model, tokenizer = make_model("llama", thought_length=3)
    prompts = [random_text(1, 7, seed=1), random_text(1, 4, seed=2)]
    pad = tokenizer.pad_token_id
    input_ids = torch.stack([torch.cat([torch.full((7 - p.shape[1],), pad), p[0]]) for p in prompts])
    attention_mask = (torch.arange(7) >= torch.tensor([[0], [3]])).long()
    batch = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=pad)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=pad)
        assert torch.equal(batch[row, 7:], alone[0, prompt.shape[1] :])


def test_thinking_off_is_the_base_model():
    model, _ = make_model("gemma")
    prompt = random_text(2, 5)
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=5, temperature=0.8)):
        torch.manual_seed(7)
        ours = model.generate(prompt, max_new_tokens=6, think=False, **kwargs)
        torch.manual_seed(7)
        base = model.model.generate(prompt, max_new_tokens=6, **kwargs)
        assert torch.equal(ours, base)


def test_sampling_honours_top_k_and_never_emits_markers():
    model, _ = make_model("llama")
    model.generation_config.eos_token_id = None  # no row stops early: every step is checked
    prompt = random_text(3, 4)
    torch.manual_seed(0)
    out = model.generate(
        prompt, max_new_tokens=6, do_sample=True, top_k=2, output_logits=True, return_dict_in_generate=True,
        thought_temperature=1.0,
    )
    new_tokens = out.sequences[:, 4:]
    for step, logits in enumerate(out.logits):
        top2 = logits.topk(2, dim=-1).indices
        assert (top2 == new_tokens[:, step, None]).any(-1).all()
    assert not torch.isin(out.sequences, torch.tensor(model.marker_ids)).any()
    torch.manual_seed(0)
    top_k1 = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=1)
    assert torch.equal(top_k1, model.generate(prompt, max_new_tokens=6, do_sample=False))


def test_eos_stops_rows_and_streamer_prints_the_text(capsys):
    model, tokenizer = make_model("llama")
    prompt = random_text(1, 4)
    free = model.generate(prompt, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 6])  # the third new token
    stopped = model.generate(prompt, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] <= 7 and int(stopped[0, -1]) == eos
    assert torch.equal(stopped[0], free[0, : stopped.shape[1]])

    model.generate(prompt, max_new_tokens=6, do_sample=False, streamer=TextStreamer(tokenizer))
    printed = capsys.readouterr().out
    assert printed.split() == tokenizer.decode(free[0]).split()


def test_caches_that_cannot_drop_a_thought_are_refused():
    model, _ = make_model("llama")
    prompt = random_text(1, 4)
    with pytest.raises(ValueError, match="crop"):
        model.generate(prompt, max_new_tokens=2, cache_implementation="static")
    base_like = model.generate(prompt, max_new_tokens=2, cache_implementation="static", think=False)
    assert base_like.shape == (1, 6)


def test_beam_search_with_the_cache_equals_beam_search_over_the_parallel_forward():
    model, _ = make_model("qwen2", thought_temperature=0.0)  # greedy thoughts in both paths
    with torch.no_grad():
        model.mixing_head.out.bias.fill_(0.0)
    prompt = random_text(2, 5)
    kwargs = dict(max_new_tokens=4, num_beams=3, do_sample=False, num_return_sequences=2)
    cached = model.generate(prompt, **kwargs)
    assert torch.equal(cached, model.generate(prompt, use_cache=False, **kwargs))


def test_uncached_generation_still_works():
    model, _ = make_model("gemma", thought_temperature=0.0)
    prompt = random_text(2, 5)
    cached = model.generate(prompt, max_new_tokens=3, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
