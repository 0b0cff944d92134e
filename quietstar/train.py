"""`quietstar train`: base model + data + YAML config -> a trained, saved Quiet-STaR model.

    quietstar train [CONFIG] [--output-dir DIR] [--resume [CHECKPOINT]] [--section.key VALUE ...]

CONFIG is a YAML file, the name of a bundled config (default: `default`, SmolLM2-135M-Instruct on the built-in
arithmetic problems, CPU-sized) or of a recipe (`multihop`: tasks/multihop_train.py, both stages from scratch; `gsm8k`:
tasks/gsm8k_train.py, SmolLM2 on GSM8K solutions). The run: evaluate the held-out NLL without and with thoughts, train with
`QuietStarTrainer` (progress bar, `metrics.jsonl`, checkpoints every `save_steps`), evaluate again, save the model
(`save_pretrained`: loads with `AutoModelForCausalLM.from_pretrained`) and tokenizer into the output directory, and
print the before/after table. With a `lora:` section the model is trained as a PEFT LoRA model (`quietstar.lora`);
the adapter is saved in `adapter/` and the merged model in the output directory as usual. The same command runs
under `torchrun` / `accelerate launch` (DDP; FSDP through an accelerate config such as `configs/accelerate_fsdp.yaml`,
without a `lora:` section: the adapter is merged on the main process).
"""

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainingArguments, set_seed

from .configuration_quietstar import QuietStarConfig
from .data import WindowCollator, build_datasets, pad_token_id
from .default_base import convert_gguf, default_base_path, default_cache_dir
from .modeling_quietstar import QuietStarForCausalLM
from .plots import line_plot
from .train_config import TrainConfig, load_train_config, parse_overrides
from .trainer import JsonlMetricsCallback, QuietStarTrainer

METRICS_FILE = "metrics.jsonl"
GAIN_PLOT = "gain.svg"  # held-out gain against step, drawn at the end of every run
CONFIG_FILE = "quietstar_train.yaml"  # the resolved config, saved beside the model
ADAPTER_DIR = "adapter"  # with a `lora:` section: the PEFT adapter (+ mixing head and markers), inside the output dir


@dataclass
class TrainResult:
    """What a run produced. `before` / `after`: held-out metrics (`*_nll_base`, `*_nll_mixed`, `*_nll_gain`,
    `*_mixing_weight`), empty without held-out data; `log_history`: the Trainer's logs."""

    output_dir: Path
    before: dict[str, float]
    after: dict[str, float]
    log_history: list[dict]


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


def load_model(base: str | None, quietstar_fields: dict) -> tuple[QuietStarForCausalLM, PreTrainedTokenizerBase]:
    """fp32 weights (the trainer's bf16 is autocast over fp32 master weights). A saved Quiet-STaR model continues
    training with `quietstar_fields` applied to its config; any other causal LM is wrapped with `from_base`."""
    path = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"  # the Quiet-STaR forward needs right padding
    if AutoConfig.from_pretrained(path).model_type == QuietStarConfig.model_type:
        model = QuietStarForCausalLM.from_pretrained(path, dtype=torch.float32, **quietstar_fields)
        return model, tokenizer
    base_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return QuietStarForCausalLM.from_base(base_model, tokenizer, **quietstar_fields)


def train(config: TrainConfig, callbacks: list | None = None) -> TrainResult:
    """Run a training config end to end (see the module docstring). `callbacks`: extra `TrainerCallback`s."""
    args = TrainingArguments(**config.training)
    set_seed(args.seed)  # before the model: the mixing head is initialised here
    model, tokenizer = load_model(config.base, config.quietstar)
    if config.lora is not None:
        from peft import get_peft_model  # only LoRA runs need peft

        from .lora import lora_config

        model = get_peft_model(model, lora_config(**config.lora))
    train_set, eval_set = build_datasets(config.data, tokenizer, model.config.lookahead)
    output_dir = Path(args.output_dir)
    trainer = QuietStarTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set or None,
        data_collator=WindowCollator(pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(output_dir / METRICS_FILE), *(callbacks or [])],
    )
    before = trainer.evaluate(metric_key_prefix="before") if eval_set else {}
    trainer.train(resume_from_checkpoint=_resume_argument(args.resume_from_checkpoint))
    after = trainer.evaluate(metric_key_prefix="after") if eval_set else {}
    if config.lora is None:
        trainer.save_model(str(output_dir))  # save_pretrained of the unwrapped model (+ tokenizer), gathered under FSDP
    else:
        trainer.save_model(str(output_dir / ADAPTER_DIR))
        if trainer.is_world_process_zero():  # the merged model loads like any other: no peft needed to use it
            model.merge_and_unload().save_pretrained(output_dir)
            tokenizer.save_pretrained(output_dir)
    if trainer.is_world_process_zero():
        (output_dir / CONFIG_FILE).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        plot_gain(output_dir / METRICS_FILE, output_dir / GAIN_PLOT)
    return TrainResult(output_dir, before, after, trainer.state.log_history)


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


def format_summary(result: TrainResult, n_eval: int, window: int) -> str:
    """The before/after table printed at the end of `quietstar train`."""
    lines = []
    if result.before:
        lines.append(f"held-out next-token NLL ({n_eval} examples of up to {window} tokens; lower is better)")
        lines.append(f"{'':18}{'no thought':>12}{'with thought':>14}{'gain':>9}{'mix weight':>12}")
        for name, prefix, metrics in (("before training", "before", result.before), ("after training", "after", result.after)):
            lines.append(
                f"{name:18}{metrics[f'{prefix}_nll_base']:12.4f}{metrics[f'{prefix}_nll_mixed']:14.4f}"
                f"{metrics[f'{prefix}_nll_gain']:+9.4f}{metrics[f'{prefix}_mixing_weight']:12.4f}"
            )
    lines.append(
        f"saved to {result.output_dir} (AutoModelForCausalLM.from_pretrained loads it; metrics in {METRICS_FILE}, "
        f"gain plot in {GAIN_PLOT})"
    )
    return "\n".join(lines)


# ---- the console command ---------------------------------------------------------------------------------------------


def add_train_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "train",
        help="train a Quiet-STaR model from a YAML config (default: SmolLM2-135M on arithmetic problems, CPU-sized)",
        usage="quietstar train [CONFIG] [--output-dir DIR] [--resume [CHECKPOINT]] [--section.key VALUE ...]",
        description="CONFIG: a YAML file, a bundled config name (default, paper_gpu) or a recipe (multihop, gsm8k). Overrides: --base PATH, "
        "--quietstar.thought_length 8, --data.path file.jsonl, --training.max_steps 100, ... (values read as YAML).",
    )
    parser.add_argument("--output-dir", help="where checkpoints, metrics.jsonl and the final model go")
    parser.add_argument(
        "--resume", nargs="?", const="last", metavar="CHECKPOINT",
        help="continue from a checkpoint directory (no value: the newest checkpoint in the output directory)",
    )
    # The config name and the --section.key overrides are free-form; `quietstar.cli.main` hands them over here.
    parser.set_defaults(run=run_train, extra_arguments=[])


def split_train_arguments(tokens: list[str]) -> tuple[str | None, dict]:
    """["paper_gpu", "--training.max_steps", "5"] -> ("paper_gpu", {"training.max_steps": 5})."""
    config = None
    if tokens and not tokens[0].startswith("--"):
        config, tokens = tokens[0], tokens[1:]
    return config, parse_overrides(tokens)


# Recipes: runs that are more than one config (their own stages, data and report), named like a config:
# name -> (module under quietstar.tasks, its settings class, its run function). Each module has `format_report`.
RECIPES = {
    "multihop": ("multihop_train", "MultihopSettings", "run_multihop"),  # both stages from scratch, ~10 min
    "gsm8k": ("gsm8k_train", "Gsm8kSettings", "run_gsm8k"),  # SmolLM2 on GSM8K solutions (--data DIR), < 60 min
}


def run_recipe(name: str, args: argparse.Namespace, overrides: dict) -> int:
    """`quietstar train multihop --output-dir DIR [--steps 50 ...]`, `quietstar train gsm8k --data DIR --output-dir
    DIR [...]`: a recipe's whole run and report."""
    import importlib

    module_name, settings_name, run_name = RECIPES[name]
    module = importlib.import_module(f".tasks.{module_name}", __package__)
    if args.output_dir is None:
        raise SystemExit(f"quietstar train {name}: give --output-dir DIR (the model and report go there).")
    if args.resume is not None:
        raise SystemExit(f"quietstar train {name}: --resume is not supported by recipes; rerun them.")
    try:
        settings = getattr(module, settings_name).from_overrides(overrides)
    except ValueError as error:
        raise SystemExit(f"quietstar train {name}: {error}") from error
    report = getattr(module, run_name)(args.output_dir, settings)
    print(module.format_report(report))
    print(f"saved to {args.output_dir} (model, tokenizer, report.json, report.md, gain.svg, metrics.jsonl)")
    return 0


def run_train(args: argparse.Namespace) -> int:
    config_name, overrides = split_train_arguments(args.extra_arguments)
    if config_name in RECIPES:
        return run_recipe(config_name, args, overrides)
    if args.output_dir is not None:
        overrides["training.output_dir"] = args.output_dir
    if args.resume is not None:
        overrides["training.resume_from_checkpoint"] = args.resume
    config = load_train_config(config_name, overrides)
    result = train(config)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        return 0
    print(format_summary(result, config.data.eval_windows, config.data.window))
    return 0


__all__ = ["train", "TrainResult", "load_model", "resolve_base", "add_train_command", "format_summary"]
