"""`quietstar train`: base model + data (or a task) + YAML config -> a trained, saved Quiet-STaR model. The one training
path: the default run, the recipes and their no-thought controls all go through `run_stage`.

    quietstar train [CONFIG] [--output-dir DIR] [--resume [CHECKPOINT]] [--section.key VALUE ...]

CONFIG is a YAML file or the name of a bundled config: `default` (SmolLM2-135M-Instruct on the built-in arithmetic
problems, CPU-sized), `paper_gpu`, or a recipe: `multihop` (a task and three stages, from scratch), `multiply`
(SmolLM2, the hundreds digit of a two-digit product, three stages), `gsm8k` (SmolLM2 on GSM8K solutions, `--data DIR`). A stage: evaluate the held-out set, train with `QuietStarTrainer`
(`metrics.jsonl`, checkpoints every `save_steps`, keep-best when the config asks), evaluate again, save the model and
tokenizer (`save_pretrained`: loads with `AutoModelForCausalLM.from_pretrained`). Stages run in order, each from the
previous one's model; the last one is saved in the output directory, the others in subdirectories named after them.
With `controls: true` the last stage runs again with thinking off (OUT/control: same steps; OUT/control-flops: same
FLOPs) and `report.json` / `report.md` compare the four predictors on the held-out items (quietstar/comparison.py).
With a `lora:` section the model is trained as a PEFT LoRA model (`quietstar.lora`); the adapter is saved in
`adapter/` and the merged model in the output directory as usual. The same command runs under `torchrun` /
`accelerate launch` (DDP; FSDP through an accelerate config such as `configs/accelerate_fsdp.yaml`, without a
`lora:` section: the adapter is merged on the main process). `--resume` continues each unfinished stage from its
newest checkpoint and skips finished ones.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase, set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from .comparison import (
    CONTROL,
    CONTROL_FLOPS,
    compare,
    control_steps,
    format_comparison,
    score_items,
    thinking_fraction_of,
)
from .configuration_quietstar import QuietStarConfig
from .data import WindowCollator, build_datasets, pad_token_id
from .default_base import convert_gguf, default_base_path, default_cache_dir
from .modeling_quietstar import QuietStarForCausalLM
from .plots import line_plot
from .tasks import load_task
from .train_config import Stage, TrainConfig, load_train_config, parse_overrides
from .trainer import JsonlMetricsCallback, QuietStarTrainer, QuietStarTrainingArguments, StopAtMetric

METRICS_FILE = "metrics.jsonl"
GAIN_PLOT = "gain.svg"  # held-out gain against step, drawn at the end of every thinking stage
CONFIG_FILE = "quietstar_train.yaml"  # the resolved config, saved beside the model
STAGE_FILE = "stage.json"  # a finished stage's before/after metrics: `--resume` skips the stage
REPORT_FILE, REPORT_TABLE = "report.json", "report.md"  # with controls: the comparison on the held-out items
ADAPTER_DIR = "adapter"  # with a `lora:` section: the PEFT adapter (+ mixing head and markers), inside the output dir


@dataclass
class TrainResult:
    """What a run produced (its last stage). `before` / `after`: held-out metrics (`*_nll`, `*_accuracy`, and for a
    thinking stage `*_nll_base`, `*_nll_mixed`, `*_nll_gain`, `*_mixing_weight`), empty without held-out data;
    `log_history`: the Trainer's logs (empty for a stage skipped by `--resume`); `report`: with controls, the
    comparison (quietstar/comparison.py)."""

    output_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    log_history: list[dict]
    report: dict | None = None


def resolve_base(base: str | None) -> Path:
    """A local model directory for `base`: None = the embedded default (converted once into the cache), a .gguf file
    = converted once into the cache, a directory = itself."""
    if base is None:
        return default_base_path()
    path = Path(base).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"base: no GGUF file at {path}.")
        cached = default_cache_dir() / path.stem
        return cached if (cached / "model.safetensors").exists() else convert_gguf(path, cached)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"base: no model directory at {path} (expected a config.json there). Give a local Hugging Face model "
            "directory, a .gguf file, or null for the default SmolLM2-135M-Instruct."
        )
    return path


def load_model(
    base: str | Path | None, quietstar_fields: dict, thinking: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """fp32 weights (the trainer's bf16 is autocast over fp32 master weights). A saved Quiet-STaR model continues
    training with `quietstar_fields` applied to its config; any other causal LM is wrapped with `from_base`, or, with
    `thinking=False`, trained as it is."""
    path = resolve_base(base) if base is None or isinstance(base, str) else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # the Quiet-STaR forward needs right padding
    if AutoConfig.from_pretrained(path).model_type == QuietStarConfig.model_type:
        if not thinking:
            raise ValueError(
                f"{path} is a Quiet-STaR model, and a stage with thinking off trains a plain causal LM: put the plain "
                "stages before the thinking ones."
            )
        return QuietStarForCausalLM.from_pretrained(path, dtype=torch.float32, **quietstar_fields), tokenizer
    base_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if not thinking:
        return base_model, tokenizer
    return QuietStarForCausalLM.from_base(base_model, tokenizer, **quietstar_fields)


def train(config: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run a training config end to end (see the module docstring): its stages, then its controls and report.
    `callbacks`: extra `TrainerCallback`s, given to every stage."""
    task = load_task(config.task) if config.task is not None else None
    stages = config.stages or [Stage(name="thinking")]
    output_dir = Path(QuietStarTrainingArguments(**_stage_training(config, stages[-1])).output_dir)
    source = None  # the input model of the stage: None = the config's base (or the task's own)
    for index, stage in enumerate(stages):
        last = index == len(stages) - 1
        result = run_stage(config, task, stage, output_dir if last else output_dir / stage.name, source, callbacks)
        source, last_source = result.output_dir, source
    if config.controls:
        result.report = run_controls(config, task, stages[-1], output_dir, last_source, callbacks)
    return result


def run_controls(config, task, stage: Stage, output_dir: Path, source: Path | None, callbacks) -> dict | None:
    """The last stage again with thinking off, for the same steps and for the same FLOPs, from the same input model on
    the same examples; then the report on the held-out items (main process)."""
    thinking_config = QuietStarConfig.from_pretrained(output_dir)
    training = _stage_training(config, stage)
    args = QuietStarTrainingArguments(**training)
    steps = args.max_steps
    if steps <= 0:
        raise ValueError("controls: true needs the thinking stage's training.max_steps (the controls match its steps).")
    n_train = _n_train(args)  # the thinking stage's examples, reused over epochs by the FLOPs-matched control
    fraction = _thinking_fraction(config, task, stage, thinking_config, args, output_dir)
    flops_steps = control_steps(steps, thinking_config, fraction)
    for name, max_steps in ((CONTROL, steps), (CONTROL_FLOPS, flops_steps)):
        # about as many validations (keep-best candidates) per run: step-counted intervals scale by a whole factor,
        # which keeps save_steps a multiple of eval_steps
        factor = max_steps // steps
        intervals = ("eval_steps", "save_steps", "logging_steps")
        scaled = {key: training[key] * factor for key in intervals if training.get(key, 0) >= 1}
        control_training = {**stage.training, **scaled, "max_steps": max_steps}
        control = dataclasses.replace(stage, thinking=False, training=control_training)
        run_stage(config, task, control, output_dir / name, source, callbacks, n_train=n_train)
    if not _is_main_process():
        return None
    model, tokenizer = load_model(output_dir, {})
    examples, collator = _held_out(config, task, stage, tokenizer, model.config.lookahead, "test")
    def score(model) -> dict[str, list]:
        return score_items(model, examples, collator, args.per_device_eval_batch_size, args.seed)

    thinking = score(model)
    controls = {name: score(load_model(output_dir / name, {}, thinking=False)[0]) for name in (CONTROL, CONTROL_FLOPS)}
    report = compare(thinking, controls, task.metric if task is not None else "nll")
    report["steps"] = {"thinking": steps, CONTROL: steps, CONTROL_FLOPS: flops_steps}
    report["thinking_fraction"] = round(fraction, 4)
    report["thoughts"] = [_thought_record(examples[k], ids, tokenizer) for k, ids in enumerate(thinking["thought"][:8])]
    (output_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    (output_dir / REPORT_TABLE).write_text(format_comparison(report) + "\n")
    return report


def run_stage(
    config: TrainConfig, task, stage: Stage, output_dir: Path, source: Path | None, callbacks: list | None = None,
    n_train: int | None = None,
) -> TrainResult:
    """One stage through the one path: its model (`source`, or the config's base), its examples (the task's
    `stage.data` variant, `n_train` of them (default: max_steps x the global batch), or the config's `data`), the
    trainer, the saved model. With `resume_from_checkpoint`, a finished stage is skipped and an unfinished one
    continues from its newest checkpoint."""
    training = {**_stage_training(config, stage), "output_dir": str(output_dir)}
    resume = _resume_argument(training.pop("resume_from_checkpoint", None))
    if resume is not None and (output_dir / STAGE_FILE).exists():
        finished = json.loads((output_dir / STAGE_FILE).read_text())
        return TrainResult(output_dir, finished["before"], finished["after"], [])
    if resume is True or (resume is not None and Path(resume).parent != output_dir):  # another stage's path: the newest
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    args = QuietStarTrainingArguments(**training)
    set_seed(args.seed)  # before the model: the mixing head (and a task's from-scratch model) is initialised here
    quietstar_fields = {**config.quietstar, **stage.quietstar}
    own_tokenizer = task.tokenizer() if source is None and task is not None else None  # a task's from-scratch model
    if own_tokenizer is not None:
        tokenizer = own_tokenizer
        model = task.base_model(tokenizer)
        if stage.thinking:
            model, tokenizer = QuietStarForCausalLM.from_base(model, tokenizer, **quietstar_fields)
    else:
        model, tokenizer = load_model(config.base if source is None else source, quietstar_fields, stage.thinking)
    if config.lora is not None:  # every stage and control: the controls get the same adapter as the thinking run
        from peft import get_peft_model  # only LoRA runs need peft

        from .lora import lora_config

        model = get_peft_model(model, lora_config(**config.lora))
    lookahead = model.config.lookahead if stage.thinking else QuietStarConfig(**quietstar_fields).lookahead
    if task is not None:
        train_set = task.examples("train", stage.data, n_train or _n_train(args), tokenizer)
        eval_set, collator = _held_out(config, task, stage, tokenizer, lookahead, "validation")
    else:
        train_set, eval_set = build_datasets(config.data, tokenizer, lookahead)
        collator = WindowCollator(pad_token_id(tokenizer))
    stops = [StopAtMetric(metric, target) for metric, target in (stage.stop_at or {}).items()]
    trainer = QuietStarTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(output_dir / METRICS_FILE), *stops, *(callbacks or [])],
    )
    threads = torch.get_num_threads()
    if args.cpu_threads is not None:
        torch.set_num_threads(args.cpu_threads)
    try:
        before = trainer.evaluate(metric_key_prefix="before") if eval_set else {}
        trainer.train(resume_from_checkpoint=resume)
        for stop in stops:  # a stage that trains "until the model can do X" and could not: what follows is moot
            if not stop.reached:
                raise RuntimeError(
                    f"stage {stage.name!r} ended at step {trainer.state.global_step} without reaching {stop.metric} "
                    f"{stop.target} (last evaluation: {stop.last}). Its checkpoints are in {output_dir}: rerun with "
                    f"--resume and more steps (--stages.{stage.name}.training.max_steps N), or another --training.seed."
                )
        after = trainer.evaluate(metric_key_prefix="after") if eval_set else {}
    finally:
        torch.set_num_threads(threads)
    if config.lora is None:
        trainer.save_model(str(output_dir))  # save_pretrained of the unwrapped model (+ tokenizer), gathered under FSDP
    else:
        trainer.save_model(str(output_dir / ADAPTER_DIR))
        if trainer.is_world_process_zero():  # the merged model loads like any other: no peft needed to use it
            model.merge_and_unload().save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    if trainer.is_world_process_zero():
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        if stage.thinking:
            plot_gain(output_dir / METRICS_FILE, output_dir / GAIN_PLOT)
        finished = {"stage": dataclasses.asdict(stage), "before": before, "after": after}
        (output_dir / STAGE_FILE).write_text(json.dumps(finished))
    return TrainResult(output_dir, before, after, trainer.state.log_history)


def _thought_record(example: dict, thought: list[int], tokenizer) -> dict:
    """The held-out item's text before its first labelled token, that token, and the thought written before it."""
    ids = [int(i) for i in example["input_ids"]]
    labels = example.get("labels", ids)  # held-out windows: every token is a target (WindowCollator)
    first = next(k for k, label in enumerate(labels) if k > 0 and label != -100)
    return {
        "context": tokenizer.decode(ids[max(0, first - 12) : first]),
        "thought": tokenizer.decode(thought),
        "next": tokenizer.decode(ids[first : first + 1]),
    }


def _thinking_fraction(config, task, stage: Stage, thinking_config, args, output_dir: Path, max_batches: int = 64) -> float:
    """The share of positions that think in the thinking stage's training batches (`thinking_fraction_of`), measured
    on its first `max_batches` batches in order (the trainer shuffles them; similar examples, similar windows)."""
    if thinking_config.thought_positions == "all":
        return 1.0
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    batch_size = args.per_device_train_batch_size
    if task is not None:
        examples = task.examples("train", stage.data, min(_n_train(args), max_batches * batch_size), tokenizer)
    else:
        examples, _ = build_datasets(config.data, tokenizer, thinking_config.lookahead)
    collator = WindowCollator(pad_token_id(tokenizer))
    starts = range(0, min(len(examples), max_batches * batch_size), batch_size)
    batches = (collator([examples[k] for k in range(start, min(start + batch_size, len(examples)))]) for start in starts)
    return thinking_fraction_of(thinking_config, batches)


def _stage_training(config: TrainConfig, stage: Stage) -> dict:
    return {**config.training, **stage.training}


def _n_train(args: QuietStarTrainingArguments) -> int:
    """Examples a run of `max_steps` draws: one per row of every global batch."""
    return args.max_steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size


def _held_out(config: TrainConfig, task, stage: Stage, tokenizer, lookahead: int, split: str):
    """(examples, collator) of a held-out split: the task's ("validation" keeps the best checkpoint, "test" is
    reported), or the config's held-out windows for both."""
    if task is not None:
        return task.examples(split, stage.data, None, tokenizer), WindowCollator(pad_token_id(tokenizer))
    _, eval_set = build_datasets(config.data, tokenizer, lookahead)
    return eval_set, WindowCollator(pad_token_id(tokenizer))


def _is_main_process() -> bool:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


def plot_gain(metrics_file: Path, path: Path) -> Path | None:
    """The held-out NLL gain of thinking (`*_nll_gain` of every evaluation in `metrics_file`: before, during, after
    training) against the training step, as an SVG; None when the run had no held-out data. (The metrics file, not
    the Trainer's log history: `train()` starts a new history, which would drop the "before" evaluation.)"""
    entries = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    points = [(entry["step"], value) for entry in entries for key, value in entry.items() if key.endswith("_nll_gain")]
    if not points:
        return None
    steps, gains = zip(*points)
    return line_plot(
        {"held-out NLL gain (nats/token)": (list(steps), list(gains))},
        path, title="does thinking help? base NLL - NLL with thoughts", xlabel="training step", ylabel="nats per token",
    )


def _resume_argument(value: str | None) -> str | bool | None:
    """"last" (or "true") = the newest checkpoint in the output directory; else a checkpoint path or None."""
    if value is not None and value.lower() in {"last", "true"}:
        return True
    return value


def format_summary(result: TrainResult) -> str:
    """The table printed at the end of `quietstar train`: the held-out NLL without and with thoughts before and after
    training, then (with controls) the comparison with the no-thought controls."""
    lines = []
    if "before_nll_base" in result.before:
        lines.append("held-out next-token NLL of the labelled tokens (lower is better)")
        lines.append(f"{'':18}{'no thought':>12}{'with thought':>14}{'gain':>9}{'mix weight':>12}")
        for name, prefix in (("before training", "before"), ("after training", "after")):
            metrics = result.before if prefix == "before" else result.after
            lines.append(
                f"{name:18}{metrics[f'{prefix}_nll_base']:12.4f}{metrics[f'{prefix}_nll_mixed']:14.4f}"
                f"{metrics[f'{prefix}_nll_gain']:+9.4f}{metrics[f'{prefix}_mixing_weight']:12.4f}"
            )
    if result.report is not None:
        lines += ["", "does thinking beat plain fine-tuning? (the same data and steps; control-flops: the same FLOPs)"]
        lines.append(format_comparison(result.report))
    controls = f", controls in control/ and control-flops/, {REPORT_TABLE}" if result.report else ""
    lines.append(
        f"saved to {result.output_dir} (AutoModelForCausalLM.from_pretrained loads it; metrics in {METRICS_FILE}, "
        f"gain plot in {GAIN_PLOT}{controls})"
    )
    return "\n".join(lines)


# ---- the console command ---------------------------------------------------------------------------------------------


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "train",
        help="train a Quiet-STaR model from a YAML config (default: SmolLM2-135M on arithmetic problems, CPU-sized)",
        usage="quietstar train [CONFIG] [--output-dir DIR] [--resume [CHECKPOINT]] [--section.key VALUE ...]",
        description="CONFIG: a YAML file or a bundled config: default, paper_gpu, or a recipe (multihop; "
        "multiply; gsm8k --data DIR). "
        "Overrides: --base PATH, --quietstar.thought_length 8, --data FILE (= --data.path, or a task's data), "
        "--training.max_steps 100, --controls false, ... (values read as YAML).",
    )
    parser.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and the final model go")
    parser.add_argument(
        "--resume", nargs="?", const="last", metavar="CHECKPOINT",
        help="continue from a checkpoint directory (no value: each unfinished stage from its newest checkpoint)",
    )
    # The config name and the --section.key overrides are free-form; `quietstar.cli.main` hands them over here.
    parser.set_defaults(run=run_train, extra_arguments=[])


def split_train_arguments(tokens: list[str]) -> tuple[str | None, dict]:
    """["paper_gpu", "--training.max_steps", "5"] -> ("paper_gpu", {"training.max_steps": 5})."""
    config = None
    if tokens and not tokens[0].startswith("--"):
        config, tokens = tokens[0], tokens[1:]
    return config, parse_overrides(tokens)


def run_train(args: argparse.Namespace) -> int:
    config_name, overrides = split_train_arguments(args.extra_arguments)
    if args.output_dir is not None:
        overrides["training.output_dir"] = args.output_dir
    if args.resume is not None:
        overrides["training.resume_from_checkpoint"] = args.resume
    config = load_train_config(config_name, overrides)
    result = train(config)
    if _is_main_process():
        print(format_summary(result))
    return 0


__all__ = ["train", "TrainResult", "load_model", "resolve_base", "add_train_command", "format_summary"]
