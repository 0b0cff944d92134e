"""Loading a model directory for evaluation or publishing, with checks that turn bad input into clear errors.

`from_pretrained` alone reports a truncated weight file as "Error while deserializing header" without saying which
file, a plain causal LM as a config mismatch, and weights missing from the file only as a warning (they are then
random). `load_checkpoint` checks first: a config of the right model type (or `wrap_base=True` for a plain causal
LM), safetensors weights only (pickle-based `.bin`/`.pt` files are refused, never loaded), each weight file
readable; then loads with `use_safetensors=True` and refuses missing, unexpected or mismatched weights by name.
"""

import json
import os
from pathlib import Path

from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

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
        model, loading_info = QuietStarForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True)
        check_loading_info(path, loading_info)
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif wrap_base:
        base, loading_info = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True, output_loading_info=True)
        check_loading_info(path, loading_info)
        model, tokenizer = QuietStarForCausalLM.from_base(base, str(path), **config_fields)
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


def check_loading_info(path: Path, loading_info: dict) -> None:
    """Refuse a load that left weights random (missing), ignored some (unexpected) or could not fit them
    (mismatched): `from_pretrained` only warns about these."""
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in loading_info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{kind.replace('_keys', '')}: {shown}")
    if problems:
        raise CheckpointError(
            f"the weights in {path} do not match the model ({'; '.join(problems)}). Was it saved by a different "
            "model or with unmerged PEFT layers? Re-save it with save_pretrained (a PeftModel: "
            "`peft_model.merge_and_unload().save_pretrained(dir)`)."
        )


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


__all__ = ["CheckpointError", "load_checkpoint", "check_weight_files", "check_loading_info"]
