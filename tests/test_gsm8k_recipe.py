"""The GSM8K recipe (`quietstar train gsm8k`): it scores the solution tokens it says it scores, its report's numbers
are the plain means and bootstrap intervals of the per-token NLLs, its scoring equals the model's own, and a short
run writes every artefact and reloads. The real run (SmolLM2, < 60 minutes) is the `slow` test at the bottom."""

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import needs_smollm2
from quietstar.cli import main
from quietstar.tasks.bootstrap import bootstrap_ci
from quietstar.tasks.gsm8k import Gsm8kTask

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (12, 7), (5, 9), (20, 22), (8, 1), (6, 6), (14, 3), (2, 40)]
]


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", PROBLEMS[:6]), ("test", PROBLEMS[6:])):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


@needs_smollm2
def test_examples_label_the_solution_and_respect_the_cut(smollm2_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    task = Gsm8kTask(data=str(write_data(tmp_path)), validation_items=2, test_items=2, max_length=32, min_solution_tokens=4)
    test = task.examples("test", None, None, tokenizer)
    assert len(test) == 2
    for example, problem in zip(test, PROBLEMS[6:]):
        targets = [label for label in example["labels"] if label != -100]
        assert tokenizer.decode(targets) == f" {problem['answer']}"  # the whole solution, nothing of the question
        assert tokenizer.decode(example["input_ids"]) == f"Q: {problem['question']}\nA: {problem['answer']}"
    validation = task.examples("validation", None, None, tokenizer)  # the last 2 of train.jsonl
    assert [tokenizer.decode(e["input_ids"]) for e in validation] == [f"Q: {p['question']}\nA: {p['answer']}" for p in PROBLEMS[4:6]]
    train = task.examples("train", None, 3, tokenizer)
    assert len(train) == 3 and all(len(e["input_ids"]) <= 32 for e in train)
    held_out = {tuple(e["input_ids"][:20]) for e in validation + test}
    assert not any(tuple(e["input_ids"][:20]) in held_out for e in train)
    with pytest.raises(ValueError, match="only 4 training problems keep 4 solution tokens .* needs 5"):
        task.examples("train", None, 5, tokenizer)


def test_bootstrap_weights_items_by_their_counts():
    assert bootstrap_ci([4.0] * 5, [2] * 5) == [2.0, 2.0]
    low, high = bootstrap_ci([10.0, 0.0, 0.0, 0.0], [10, 1, 1, 1])  # one heavy item: the ratio, not the item mean
    assert 0.0 <= low < 10 / 13 < high <= 1.0
    with pytest.raises(ValueError, match="one count per value"):
        bootstrap_ci([1.0, 2.0], [1])


@needs_smollm2
def test_short_run_keeps_the_best_checkpoint_and_reports_the_controls(tiny_smollm2_base, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    assert main([
        "train", "gsm8k", "--data", str(data), "--base", str(tiny_smollm2_base), "--output-dir", str(out),
        "--training.max_steps", "4", "--training.eval_steps", "1", "--training.save_steps", "1",
        "--training.learning_rate", "1e-2", "--task.validation_items", "2", "--task.test_items", "2",
        "--task.min_solution_tokens", "4",
    ]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == 2 and report["metric"] == "nll" and report["steps"]["control-flops"] == 4 * 31 // 3 + 1
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    validation = {entry["step"]: entry["eval_nll"] for entry in logged if "eval_nll" in entry}
    assert sorted(validation) == [1, 2, 3, 4]
    # the head is frozen (head_learning_rate 0): w stays sigmoid(initial_mixing_logit) everywhere
    assert all(entry["eval_mixing_weight"] == pytest.approx(1 / (1 + math.e), abs=1e-6) for entry in logged if "eval_mixing_weight" in entry)
    # keep-best: the saved model is the validated checkpoint with the lowest NLL with thoughts (the Trainer's own)
    stage = json.loads((out / "stage.json").read_text())
    assert stage["after"]["after_nll"] == pytest.approx(min(validation.values()), abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    with_thoughts = report["models"]["with thoughts"]
    task = Gsm8kTask(data=str(data), test_items=2)
    from quietstar.comparison import score_items
    from quietstar.data import WindowCollator

    tokenizer = AutoTokenizer.from_pretrained(out)
    items = score_items(model, task.examples("test", None, None, tokenizer), WindowCollator(tokenizer.pad_token_id or 0), 2)
    assert sum(items["nll"]) / sum(items["tokens"]) == pytest.approx(with_thoughts["nll"], rel=1e-5)
    control = AutoModelForCausalLM.from_pretrained(out / "control")
    assert type(control).__name__ == "LlamaForCausalLM" and (out / "control-flops" / "model.safetensors").exists()


def test_recipe_errors_name_the_fix(tmp_path, capsys):
    assert main(["train", "gsm8k", "--output-dir", str(tmp_path)]) == 2
    assert "give --data DIR" in capsys.readouterr().err
    assert main(["train", "gsm8k", "--data", str(tmp_path), "--task.stepz", "3"]) == 2
    assert "unexpected keyword argument 'stepz'" in capsys.readouterr().err
    (tmp_path / "train.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        Gsm8kTask(data=str(tmp_path)).examples("test", None, None, None)
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no final number"}) + "\n")
    with pytest.raises(ValueError, match="test.jsonl, line 1: the answer has no '####"):
        Gsm8kTask(data=str(tmp_path)).examples("test", None, None, None)


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs GSM8K's train.jsonl and test.jsonl in ../shared/data/gsm8k")
def test_recipe_runs_on_gsm8k_and_reports_the_comparison(tmp_path):
    """The recipe with its defaults on GSM8K (about 90 minutes on 2 CPU cores with its controls): every number of the
    comparison is reported with its interval (benchmarks/RESULTS.md has the run and whether thinking won)."""
    assert main(["train", "gsm8k", "--data", str(GSM8K), "--output-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["items"] == 100 and all(s["nll_ci95"][0] <= s["nll"] <= s["nll_ci95"][1] for s in report["models"].values())
