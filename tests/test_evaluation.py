"""Evaluation: the likelihood-gain report and zero-shot QA scoring, checked against hand computations on tiny models."""

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

import quietstar
from conftest import BASE_CONFIGS, WORDS, make_model
from quietstar.datafiles import DataFormatError
from quietstar.evaluation import likelihood_gain
from quietstar.qa import gsm8k_cot_majority, score_gsm8k_answers, score_multiple_choice


def digit_model():
    """Tiny llama + a word-level tokenizer that splits numbers into digits, so answers span several tokens."""
    words = WORDS[:54] + list("0123456789")
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(BASE_CONFIGS["llama"]())
    model, tokenizer = quietstar.QuietStarForCausalLM.from_base(base, tokenizer, thought_length=2, n_thoughts=2, lookahead=2)
    return model.eval(), tokenizer


def hand_log_prob(model, sequence: list[int], prompt_length: int) -> tuple[float, float]:
    """log p(sequence[prompt_length:] | prompt), token by token: base from the plain wrapped LM (markers masked),
    with thoughts from the model's own next-token output on the unpadded sequence (greedy thoughts)."""
    ids = torch.tensor([sequence])
    saved, model.config.thought_temperature = model.config.thought_temperature, 0.0
    with torch.no_grad():
        base_logits = model.model(ids).logits[0].float()
        base_logits[:, list(model.marker_ids)] = float("-inf")
        mixed = model(ids).logits[0]
    model.config.thought_temperature = saved
    base_total = mixed_total = 0.0
    for position in range(prompt_length, len(sequence)):
        base_total += base_logits[position - 1].log_softmax(-1)[sequence[position]].item()
        mixed_total += mixed[position - 1, sequence[position]].item()
    return base_total, mixed_total


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_likelihood_gain_report_is_the_mean_of_its_per_token_values(tmp_path):
    model, tokenizer = make_model()
    documents = [" ".join(f"w{(3 * i + j) % 50}" for i in range(11 + j)) for j in range(3)]
    data = write_jsonl(tmp_path / "heldout.jsonl", [{"text": d} for d in documents])
    report = likelihood_gain(model, tokenizer, data, context_length=8, batch_size=2, progress=False)

    # documents of 11, 12, 13 tokens -> windows of 8 + 3, 8 + 4, 8 + 5; every token but a window's first is scored
    assert report.n_windows == 6 and report.n_tokens == len(report.token_base_nll) == 7 + 2 + 7 + 3 + 7 + 4
    base, mixed = torch.tensor(report.token_base_nll, dtype=torch.float64), torch.tensor(report.token_mixed_nll, dtype=torch.float64)
    assert report.base_nll == pytest.approx(base.mean().item(), abs=1e-12)
    assert report.mixed_nll == pytest.approx(mixed.mean().item(), abs=1e-12)
    assert report.gain == pytest.approx(report.base_nll - report.mixed_nll, abs=1e-12)
    assert sum(b.n_tokens for b in report.buckets) == report.n_tokens
    assert [b.base_nll for b in report.buckets] == sorted(b.base_nll for b in report.buckets)
    for low, high in zip(report.buckets, report.buckets[1:]):
        assert low.base_nll_high <= high.base_nll_low

    # The first window's per-token values, computed by hand from its explicit sequence.
    window = tokenizer(documents[0]).input_ids[:8]
    for position in range(1, 8):
        base_lp, mixed_lp = hand_log_prob(model, window[: position + 1], position)
        assert report.token_base_nll[position - 1] == pytest.approx(-base_lp, abs=1e-4)
        assert report.token_mixed_nll[position - 1] == pytest.approx(-mixed_lp, abs=1e-4)

    paths = report.save(tmp_path / "out")
    saved = json.loads(paths[0].read_text())
    assert saved["data_sha256"] == report.data_sha256 and saved["settings"]["thought_temperature"] == 0.0
    assert "Q4 (hardest)" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multiple_choice_probabilities_match_a_hand_computation(tmp_path):
    model, tokenizer = make_model()
    records = [
        {"question": "w3 w9 w12 w4", "choices": {"label": ["w20", "w21", "w22"], "text": ["w5", "w6 w7", "w8"]}, "answerKey": "w21"},
        {"question": "w30 w31", "choices": {"label": ["w40", "w41"], "text": ["w1", "w50"]}, "answerKey": "w40"},
    ]
    data = write_jsonl(tmp_path / "csqa.jsonl", records)
    result = score_multiple_choice(model, tokenizer, data, progress=False)

    assert result.n_items == 2 and result.settings["thought_temperature"] == 0.0
    for record, scored in zip(records, result.items):
        options = "".join(f"\n({l}) {t}" for l, t in zip(record["choices"]["label"], record["choices"]["text"]))
        prompt_ids = tokenizer(f"Q: {record['question']}{options}\nA:").input_ids
        hand = [hand_log_prob(model, prompt_ids + tokenizer(f" {label}").input_ids, len(prompt_ids)) for label in record["choices"]["label"]]
        for column, name in ((0, "without_thoughts"), (1, "with_thoughts")):
            expected = torch.tensor([h[column] for h in hand]).softmax(-1)
            got = torch.tensor(list(scored[name]["option_probabilities"].values()))
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for name in ("with_thoughts", "without_thoughts"):
        correct = [s[name]["prediction"] == s["answer"] for s in result.items]
        assert getattr(result, name)["accuracy"] == pytest.approx(sum(correct) / 2)
        assert getattr(result, name)["soft_accuracy"] == pytest.approx(sum(s[name]["correct_probability"] for s in result.items) / 2)
    assert "| soft_accuracy |" in result.markdown()


def test_gsm8k_answer_probability_matches_a_hand_computation(tmp_path):
    model, tokenizer = digit_model()
    records = [{"question": "w3 w4 w5", "answer": "w6 w7\n#### 1,024"}, {"question": "w9", "answer": "#### 37"}]
    result = score_gsm8k_answers(model, tokenizer, write_jsonl(tmp_path / "gsm8k.jsonl", records), progress=False)

    assert [s["answer"] for s in result.items] == ["1024", "37"]
    for record, scored in zip(records, result.items):
        prompt_ids = tokenizer(f"Q: {record['question']}\nA:").input_ids
        answer_ids = tokenizer(f" {scored['answer']}").input_ids
        assert len(answer_ids) == len(scored["answer"])  # one token per digit: a multi-token product
        base, mixed = hand_log_prob(model, prompt_ids + answer_ids, len(prompt_ids))
        assert scored["without_thoughts"]["answer_log_prob"] == pytest.approx(base, abs=1e-4)
        assert scored["with_thoughts"]["answer_log_prob"] == pytest.approx(mixed, abs=1e-4)
    mean_probability = sum(torch.tensor(s["with_thoughts"]["answer_log_prob"]).exp().item() for s in result.items) / 2
    assert result.with_thoughts["mean_answer_probability"] == pytest.approx(mean_probability, rel=1e-6)


def test_gsm8k_cot_majority_vote(tmp_path):
    model, tokenizer = digit_model()
    data = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "w3 w4", "answer": "#### 7"}])
    result = gsm8k_cot_majority(model, tokenizer, data, k=3, max_new_tokens=3, answer_tokens=3, seed=5, progress=False)

    assert result.settings["k"] == 3 and result.settings["seed"] == 5 and result.task == "GSM8K chain of thought maj@3"
    for name in ("with_thoughts", "without_thoughts"):
        scored = result.items[0][name]
        assert len(scored["votes"]) == len(scored["reasonings"]) == 3
        cast = [v for v in scored["votes"] if v is not None]
        if cast:
            assert cast.count(scored["majority"]) == max(cast.count(v) for v in cast)
        else:
            assert scored["majority"] is None
        assert getattr(result, name)["accuracy"] == float(scored["majority"] == "7")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question": "w3", "choices": {"label": ["w1", "w2"], "text": ["w3", "w4"]}}', "line 2: missing field 'answerKey'"),
        ('{"question": "w3", "choices": {"label": ["w1", "w2"], "text": ["w3"]}, "answerKey": "w1"}', "line 2: 'choices' must hold"),
        ('{"question": "w3", "choices": {"label": ["w1", "w2"], "text": ["a", "b"]}, "answerKey": "w9"}', "line 2: answerKey 'w9'"),
        ('{"question": "w3", "choices"', "line 2: not valid JSON"),
    ],
)
def test_malformed_multiple_choice_jsonl_names_file_and_line(tmp_path, line, message):
    good = '{"question": "w3", "choices": {"label": ["w1", "w2"], "text": ["w3", "w4"]}, "answerKey": "w1"}'
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(DataFormatError, match=f"bad.jsonl, {message}"):
        score_multiple_choice(None, None, path)


@pytest.mark.parametrize(
    "line, message",
    [('{"question": "w3"}', "missing field 'answer'"), ('{"question": "w3", "answer": "seven"}', "'answer' must end in '#### <number>'")],
)
def test_malformed_gsm8k_jsonl_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(DataFormatError, match=f"bad.jsonl, line 1: {message}"):
        score_gsm8k_answers(None, None, path)
    with pytest.raises(DataFormatError, match="line 1"):
        likelihood_gain(None, None, path, text_fields=("text",))


def test_thought_sampling_sets_the_thought_temperature_of_generate_too():
    """CoT evaluation samples with `generate()`: the evaluation's thought temperature must reach the cached step."""
    from conftest import random_text
    from quietstar.scoring import thought_sampling

    model, _ = make_model("llama")
    prompt = random_text(2, 5)

    def thoughts(**kwargs):
        trace = quietstar.ThoughtTrace()
        model.generate(prompt, max_new_tokens=3, do_sample=False, thought_trace=trace, **kwargs)
        return torch.stack([step.thought_ids for step in trace.steps])

    greedy = thoughts()
    with thought_sampling(model, 2.0, seed=3):
        inside = thoughts()
    torch.manual_seed(3)
    assert torch.equal(inside, thoughts(thought_temperature=2.0))
    assert not torch.equal(inside, greedy)
    assert model.config.inference_thought_temperature == 0.0 and model.config.thought_temperature == 1.0
