"""lm-evaluation-harness's HFLM runs a Quiet-STaR model instance and gets the model's own numbers: loglikelihood and
loglikelihood_rolling equal the model's scoring (eval mode: greedy thoughts, deterministic), generate_until equals
greedy `model.generate`. Batches of different lengths, so lm-eval's right padding (scoring) and left padding
(generation) are both exercised."""

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval, or the dev extra)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from conftest import make_model  # noqa: E402
from quietstar.qa import continuation_log_probs  # noqa: E402
from quietstar.scoring import token_log_probs  # noqa: E402


@pytest.fixture(scope="module")
def harness():
    model, tokenizer = make_model("llama")
    tokenizer.eos_token = "<unk>"  # lm-eval's prefix token for rolling windows and its default stop sequence
    model.train()  # HFLM puts the model in eval mode: one deterministic (greedy) thought policy
    return model, tokenizer, HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=2)


def greedy_continuation(model, tokenizer, context: str, n_tokens: int) -> str:
    """The n tokens the (parallel, uncached) forward ranks first after `context`, one at a time."""
    ids = tokenizer(context, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return " " + tokenizer.decode(ids[0, -n_tokens:])


def test_loglikelihood_equals_the_models_scoring(harness):
    model, tokenizer, lm = harness
    pairs = [("w1 w2 w3", " w4 w5"), ("w7 w8", " w9"), ("w1 w2 w3 w10 w11 w12", " w13 w14 w15")]
    pairs.append(("w5 w6 w7", greedy_continuation(model, tokenizer, "w5 w6 w7", 2)))
    results = lm.loglikelihood([Instance("loglikelihood", {}, pair, index) for index, pair in enumerate(pairs)])
    assert not model.training
    for (context, continuation), (log_prob, is_greedy) in zip(pairs, results):
        _, expected = continuation_log_probs(model, tokenizer, context, [continuation])
        assert abs(log_prob - expected.item()) < 1e-5, (context, continuation)
        assert is_greedy == ((context, continuation) == pairs[-1])


def test_loglikelihood_rolling_equals_the_models_scoring(harness):
    model, tokenizer, lm = harness
    texts = ["w1 w2 w3 w4 w5 w6 w7 w8", "w9 w10 w11"]
    results = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)])
    for text, log_prob in zip(texts, results):
        ids = [tokenizer.eos_token_id] + tokenizer(text).input_ids  # every token scored, the first after the prefix
        expected = token_log_probs(model, torch.tensor([ids])).mixed.sum()
        assert abs(log_prob - expected.item()) < 1e-5, text


def test_generate_until_equals_greedy_generate(harness):
    model, tokenizer, lm = harness
    prompts = ["w1 w2 w3", "w20 w21 w22 w23 w24"]
    until = ["w60", tokenizer.eos_token]
    requests = [
        Instance("generate_until", {}, (prompt, {"until": until, "max_gen_toks": 5, "do_sample": False}), i)
        for i, prompt in enumerate(prompts)
    ]
    results = lm.generate_until(requests)
    for prompt, text in zip(prompts, results):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected = tokenizer.decode(generated[0, ids.shape[1] :])
        for stop in until:
            expected = expected.split(stop)[0]
        assert text == expected and text.strip(), prompt


def test_a_saved_model_and_adapter_load_as_on_the_command_line(harness, tmp_path):
    """`lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True[,peft=ADAPTER]` builds this HFLM."""
    model, tokenizer, lm = harness
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    request = [Instance("loglikelihood", {}, ("w1 w2 w3", " w4 w5"), 0)]
    from_dir = HFLM(pretrained=str(tmp_path / "model"), trust_remote_code=True, device="cpu", batch_size=1)
    assert from_dir.loglikelihood(request) == lm.loglikelihood(request)

    peft = pytest.importorskip("peft", reason="peft is not installed")
    from quietstar.lora import lora_config

    adapted = peft.get_peft_model(make_model("llama")[0], lora_config(r=4))
    with torch.no_grad():  # a stand-in for training
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(std=0.1)
    adapted.save_pretrained(tmp_path / "adapter")
    with_adapter = HFLM(
        pretrained=str(tmp_path / "model"), trust_remote_code=True, peft=str(tmp_path / "adapter"), device="cpu",
        batch_size=1,
    )
    (expected, _), = HFLM(pretrained=adapted, tokenizer=tokenizer, device="cpu", batch_size=1).loglikelihood(request)
    (log_prob, _), = with_adapter.loglikelihood(request)
    assert abs(log_prob - expected) < 1e-5 and abs(log_prob - lm.loglikelihood(request)[0][0]) > 1e-3
