"""Loading a model directory for evaluation or publishing, with checks that turn bad input into clear errors.

`from_pretrained` alone reports a truncated weight file as "Error while deserializing header" without saying which
file, and a plain causal LM as a config mismatch. `load_checkpoint` checks first: a config of the right model type
(or `wrap_base=True` for a plain causal LM), safetensors weights only (pickle-based `.bin`/`.pt` files are refused,
never loaded), each weight file readable, then loads with `use_safetensors=True`.
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .configuration_quietstar import QuietStarConfig
from .modeling_quietstar import QuietStarForCausalLM

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A model directory cannot be loaded; the message names the file and the fix."""


def load_checkpoint(
    path: str | os.PathLike, *, wrap_base: bool = False, **config_fields
) -> tuple[QuietStarForCausalLM, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a local model directory.

    A Quiet-STaR directory loads as saved. With `wrap_base=True` a plain causal LM directory is wrapped with
    `QuietStarForCausalLM.from_base(path, **config_fields)` (untrained thoughts: a baseline for evaluation)."""
    path = Path(path)
    model_type = read_model_type(path)
    check_weight_files(path)
    if model_type == QuietStarConfig.model_type:
        if config_fields:
            raise CheckpointError(f"{path} is already a Quiet-STaR model; thought settings {sorted(config_fields)} apply only with wrap_base.")
        model = QuietStarForCausalLM.from_pretrained(path, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif wrap_base:
        model, tokenizer = QuietStarForCausalLM.from_base(str(path), **config_fields)
    else:
        raise CheckpointError(
            f"{path / 'config.json'} describes a `{model_type}` model, not a Quiet-STaR model (`quietstar`). "
            "Wrap it first (`QuietStarForCausalLM.from_base`, or `--wrap-base` on the command line) or pass a "
            "directory saved by QuietStarForCausalLM.save_pretrained."
        )
    return model.eval(), tokenizer


def read_model_type(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {path}: pass a model directory written by save_pretrained.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_file}, line {error.lineno}: not valid JSON ({error.msg}).") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{config_file} has no `model_type`: it is not a transformers model config.")
    return config["model_type"]


def check_weight_files(path: Path) -> None:
    """Safetensors weights only, each with an intact header that covers the whole file."""
    weights = sorted(path.glob("*.safetensors"))
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not weights:
        if pickled:
            raise CheckpointError(
                f"{path} has only pickle-based weights ({', '.join(pickled)}), which are never loaded here (loading a "
                "pickle can run arbitrary code). Convert them to safetensors in a trusted environment (load, then "
                "save_pretrained) and try again."
            )
        raise CheckpointError(f"no *.safetensors weight file in {path}.")
    for weight_file in weights:
        try:
            with safe_open(weight_file, framework="pt") as file:
                file.keys()
        except (SafetensorError, OSError) as error:
            raise CheckpointError(
                f"{weight_file} is corrupt or truncated ({error}). Copy or download it again, or re-save the model."
            ) from None


__all__ = ["CheckpointError", "load_checkpoint", "check_weight_files"]
