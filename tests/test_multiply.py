"""The multiplication task and recipe: problems are what they claim, held-out pairs never reach training, the encoding
scores the right tokens (never a filler), and a short run of the recipe's three stages writes the comparison. The
real run (SmolLM2, with its targets) is the `slow` test at the bottom."""

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from conftest import needs_smollm2
from quietstar.cli import main
from quietstar.tasks import multiply

HELD_OUT = {(a, b) for a in range(32, 100) for b in range(32, 100) if multiply._held_out(a, b)}


def test_problems_are_hundreds_digits_of_training_pairs():
    assert multiply.problems(40, seed=1) == multiply.problems(40, seed=1) != multiply.problems(40, seed=2)
    assert 0.07 < len(HELD_OUT) / 68**2 < 0.13
    for prompt, answer in multiply.problems(2000, seed=0):
        a, b = map(int, re.fullmatch(r"(\d\d)\*(\d\d):", prompt).groups())
        assert (a, b) not in HELD_OUT and answer == str(a * b)[1]  # four-digit products: the hundreds digit
    assert multiply.worked(47, 86) == "282+3760=4042;0" and multiply.worked(40, 50) == "000+2000=2000;0"
    assert {len(multiply.worked(a, b)) for a in (32, 99) for b in (32, 40, 99)} == {15}  # one token per character
    with pytest.raises(ValueError, match=">= 1"):
        multiply.problems(0, seed=0)


@needs_smollm2
def test_examples_score_the_digit_or_the_worked_text_never_a_filler(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    task = multiply.MultiplyTask(validation_items=20, test_items=30, filler_rate=0.5)
    filler = tokenizer.convert_tokens_to_ids("---")
    pairs = {}
    for split, n in (("validation", 20), ("test", 30)):
        direct, worked, fillers = (task.examples(split, variant, None, tokenizer) for variant in multiply.VARIANTS)
        assert len(direct) == n
        for k in range(n):
            text = tokenizer.decode(direct[k]["input_ids"])
            a, b = map(int, re.fullmatch(r"(\d\d)\*(\d\d):\d", text).groups())
            pairs.setdefault(split, set()).add((a, b))
            assert [label for label in direct[k]["labels"] if label != -100] == direct[k]["input_ids"][-1:]
            assert tokenizer.decode(direct[k]["input_ids"][-1:]) == multiply.answer(a, b)  # one token: the digit
            targets = [label for label in worked[k]["labels"] if label != -100]
            assert tokenizer.decode(targets) == multiply.worked(a, b)
            assert [label for label in fillers[k]["labels"] if label != -100] == targets  # fillers are never targets
            assert tokenizer.decode([i for i in fillers[k]["input_ids"] if i != filler]) == f"{a}*{b}:{multiply.worked(a, b)}"
    assert pairs["validation"] <= HELD_OUT and pairs["test"] <= HELD_OUT and not pairs["validation"] & pairs["test"]
    train = task.examples("train", "direct", 500, tokenizer)
    assert not any(tuple(map(int, re.match(r"(\d\d)\*(\d\d)", tokenizer.decode(train[k]["input_ids"])).groups())) in HELD_OUT for k in range(500))
    with pytest.raises(ValueError, match="one of .*'direct'"):
        task.examples("train", "chain", 4, tokenizer)
    with pytest.raises(ValueError, match="exceeds the 4.. held-out pairs; lower task.validation_items"):
        multiply.MultiplyTask(validation_items=400, test_items=256)


@needs_smollm2
def test_written_answer_accuracy_reads_the_digit_after_the_models_own_worked_text(smollm2_path):
    """A stand-in model whose `generate` writes a given continuation per prompt: the digit after ";" is the answer,
    whatever the rest says; the whole worked text counts only when it is all right."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    pairs = multiply.MultiplyTask(validation_items=4, test_items=4).held_out_pairs("test")

    class Writes:
        def __init__(self, texts):
            self.texts = texts

        def generate(self, input_ids, attention_mask, **kwargs):
            assert attention_mask[:, -1].all()  # left padding: every prompt ends at the last column
            prompts = [tokenizer.decode(row, skip_special_tokens=True) for row in input_ids]
            rows = [tokenizer(p + self.texts[p], add_special_tokens=False)["input_ids"] for p in prompts]
            width = max(map(len, rows))
            return torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])

    right = {multiply.prompt(a, b): multiply.worked(a, b) for a, b in pairs}
    assert multiply.written_answer_accuracy(Writes(right), tokenizer, pairs, batch_size=3) == {"accuracy": 1.0, "worked_exact": 1.0}
    (a, b), (c, d) = pairs[:2]
    wrong = {**right, multiply.prompt(a, b): "1+1=2;" + multiply.answer(a, b), multiply.prompt(c, d): "no digit"}
    assert multiply.written_answer_accuracy(Writes(wrong), tokenizer, pairs) == {"accuracy": 0.75, "worked_exact": 0.5}
    assert pairs == multiply.MultiplyTask(validation_items=4, test_items=4).held_out_pairs("test")  # fixed
    assert not set(pairs) & set(multiply.MultiplyTask(validation_items=4).held_out_pairs("validation"))


@needs_smollm2
def test_short_recipe_run_learns_the_worked_text_and_reports_the_controls(tiny_smollm2_base, tmp_path):
    """The recipe's three stages and both controls on a tiny model: the worked stage's loss falls (learning has
    started), and the report compares the four predictors on the test pairs by exact match."""
    out = tmp_path / "out"
    assert main([
        "train", "multiply", "--base", str(tiny_smollm2_base), "--output-dir", str(out), "--task.validation_items", "8",
        "--task.test_items", "8", "--quietstar.thought_length", "3",
        "--stages.worked.training.max_steps", "30", "--stages.worked.training.learning_rate", "3e-3",
        "--stages.worked.training.eval_steps", "30", "--stages.worked.training.save_steps", "30",
        "--stages.fillers.training.max_steps", "2", "--stages.fillers.training.eval_steps", "2",
        "--stages.fillers.training.save_steps", "2", "--stages.thinking.training.max_steps", "2",
        "--stages.thinking.training.eval_steps", "1", "--stages.thinking.training.save_steps", "1",
    ]) == 0
    worked = json.loads((out / "worked" / "stage.json").read_text())
    assert worked["after"]["after_nll"] < worked["before"]["before_nll"] - 2.0  # nats per worked token
    report = json.loads((out / "report.json").read_text())
    assert report["metric"] == "accuracy" and report["items"] == 8 and report["tokens"] == 8  # one digit per item
    assert set(report["models"]) == {"with thoughts", "base path", "control", "control-flops"}
    assert report["steps"]["control-flops"] > report["steps"]["control"] == 2
    assert report["thinking_fraction"] == round(1 / 7, 4)  # thought_positions: scored, only ":" of `47*86:0` thinks


@pytest.mark.slow
@needs_smollm2
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recipe_beats_both_controls_by_15_points(seed, tmp_path):
    """The issue's target, per training seed: exact match with thoughts >= the better control + 15 points on the 256
    test pairs, the paired interval of the difference excluding 0 (benchmarks/RESULTS.md, "Thinking only at the scored
    position", has every run: seed 0 +50.0 [+42.6, +57.4]; seed 1 +53.9 [+47.3, +60.5]; seed 2 +31.6 [+25.0, +38.7]). About 50 minutes per seed on 2 CPU cores with the controls."""
    assert main(["train", "multiply", "--output-dir", str(tmp_path), "--training.seed", str(seed), "--task.seed", str(seed)]) == 0
    gain = json.loads((tmp_path / "report.json").read_text())["gain"]
    assert gain["accuracy"] >= 0.15 and gain["accuracy_ci95"][0] > 0
