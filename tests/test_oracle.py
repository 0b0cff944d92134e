"""The parallel thought passes equal the plain transformers model run on each explicit sequence

    x_0 .. x_i <|startofthought|> t_1 .. t_T <|endofthought|> x_{i+1} .. x_{i+A-1}

one position at a time (eager attention, no Quiet-STaR code on the oracle side), for several architectures."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import BASE_CONFIGS, make_model, random_text


def plain_model_on_explicit_sequences(model, input_ids, thought_ids):
    """Yield (b, n, i, logits, hidden) of the unmodified base model on every explicit chain sequence."""
    plain = copy.deepcopy(model.model)
    plain.set_attn_implementation("eager")
    embed = plain.get_input_embeddings()
    start, end = model.marker_embeddings()
    batch, n_thoughts, length, _ = thought_ids.shape
    lookahead = model.config.lookahead
    for b in range(batch):
        x = input_ids[b]
        for n in range(n_thoughts):
            for i in range(length):
                sequence = torch.cat(
                    [embed(x[: i + 1]), start[None], embed(thought_ids[b, n, i]), end[None], embed(x[i + 1 : i + lookahead])]
                )
                out = plain(inputs_embeds=sequence[None], output_hidden_states=True)
                yield b, n, i, out.logits[0], out.hidden_states[-1][0]


@pytest.mark.parametrize("arch", sorted(BASE_CONFIGS))
def test_thought_pass_equals_plain_model_on_explicit_sequences(arch):
    model, _ = make_model(arch, thought_length=3, n_thoughts=2, lookahead=3)
    assert_thought_pass_equals_the_oracle(model)


def test_a_model_loaded_with_hub_kernels_on_equals_the_oracle(tmp_path, monkeypatch):
    """transformers >= 5.25 kernelizes every model in `from_pretrained` when the `kernels` package is installed, as a
    fresh install now resolves it (unless USE_HUB_KERNELS=NO): the model users get that way still equals the oracle."""
    pytest.importorskip("kernels")
    monkeypatch.delenv("USE_HUB_KERNELS", raising=False)  # the default: kernels on
    model, _ = make_model("llama", thought_length=3, n_thoughts=2, lookahead=3)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model) and getattr(loaded, "use_kernels", True)  # loaded as users load it, kernelized
    assert_thought_pass_equals_the_oracle(loaded)


def assert_thought_pass_equals_the_oracle(model):
    T, A = model.config.thought_length, model.config.lookahead
    input_ids = random_text(2, 7)
    thought_ids = random_text(2 * 2 * 7, T, seed=1).reshape(2, 2, 7, T)
    with torch.no_grad():
        text = model.text_pass(input_ids, None, chain_length=T + A + 1)
        thoughts = model.thought_pass(text, thought_ids, lookahead=A)
        policy_logits, post_thought_logits = thoughts.policy_logits(), thoughts.logits()
        plain_text = copy.deepcopy(model.model).eval()(input_ids)
        torch.testing.assert_close(text.logits, plain_text.logits, atol=1e-4, rtol=1e-4)
        checked = 0
        for b, n, i, logits, hidden in plain_model_on_explicit_sequences(model, input_ids, thought_ids):
            start = i + 1  # position of <|startofthought|>; its output predicts t_1
            torch.testing.assert_close(policy_logits[b, n, i], logits[start : start + T], atol=1e-4, rtol=1e-4)
            after_end = start + T + 1  # position of <|endofthought|>; its output predicts x_{i+1}
            scored = logits.shape[0] - after_end  # lookahead steps that exist in the text
            torch.testing.assert_close(post_thought_logits[b, n, i, :scored], logits[after_end:], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(thoughts.hidden[b, n, i, :scored], hidden[after_end:], atol=1e-4, rtol=1e-4)
            checked += scored
    assert checked == 2 * 2 * sum(min(A, 7 - i) for i in range(7))


def test_sampled_thoughts_are_the_plain_models_greedy_continuations():
    """Greedy step-by-step sampling (streamed K/V) == the plain model's greedy decoding of each explicit sequence."""
    model, _ = make_model("qwen2", thought_length=3, n_thoughts=1, thought_temperature=0.0)
    input_ids = random_text(1, 5)
    with torch.no_grad():
        thought_ids = model(input_ids).thought_ids  # (1, 1, 5, 3)
        plain = copy.deepcopy(model.model).eval()
        embed = plain.get_input_embeddings()
        start, _ = model.marker_embeddings()
        for i in range(5):
            sequence = torch.cat([embed(input_ids[0, : i + 1]), start[None]])
            greedy = []
            for _ in range(3):
                logits = plain(inputs_embeds=sequence[None]).logits[0, -1]
                logits[list(model.marker_ids)] = float("-inf")
                greedy.append(int(logits.argmax()))
                sequence = torch.cat([sequence, embed(torch.tensor(greedy[-1:]))])
            assert thought_ids[0, 0, i].tolist() == greedy
