"""LoRA with PEFT: the recommended `LoraConfig` for a Quiet-STaR model.

    from peft import get_peft_model
    from quietstar.lora import lora_config

    model = get_peft_model(model, lora_config(r=16))   # LoRA on the base; mixing head and markers trained in full
    ...train...
    model.save_pretrained("adapter")                    # adapter + mixing head + markers
    model.merge_and_unload().save_pretrained("merged")  # a plain Quiet-STaR model directory

Why a helper: PEFT's `target_modules="all-linear"` leaves out only the output head, so the mixing head's Linear
layers would get low-rank updates too, and the thought markers (a small module, not a Linear) would stay frozen.
Both are new, small and trained from scratch: they are trained in full (`modules_to_save`) and saved with the
adapter. The think gate is fitted in closed form (adaptive.py), never by gradient, so it gets neither.
"""

from typing import Any

from peft import LoraConfig

FULLY_TRAINED_MODULES = ("mixing_head", "thought_markers")  # Quiet-STaR's own trainable modules
NO_LORA_MODULES = r".*\b(mixing_head|thought_markers|think_gate)\b.*"  # full-match regex over module names
FIELDS_SET_HERE = ("task_type", "exclude_modules")


def lora_config(
    r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    **fields: Any,
) -> LoraConfig:
    """A `LoraConfig` for `peft.get_peft_model(quietstar_model, ...)`.

    Args:
        r, lora_alpha, lora_dropout: as in `LoraConfig`.
        target_modules: the base model's layers that get LoRA; the default "all-linear" means every attention and
            MLP projection of any architecture (PEFT leaves out the output head). The mixing head, the markers and
            the think gate are always excluded.
        fields: any other `LoraConfig` field (e.g. `use_rslora=True`). `modules_to_save` adds to the Quiet-STaR
            modules trained in full; `task_type` and `exclude_modules` are set here.
    """
    refused = sorted(set(fields) & set(FIELDS_SET_HERE))
    if refused:
        raise ValueError(
            f"lora_config sets {refused} itself (task_type CAUSAL_LM; the Quiet-STaR modules excluded from LoRA). "
            "Drop them, or build a peft.LoraConfig yourself if you need other values."
        )
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive integer, got {r!r}.")
    if not 0 <= lora_dropout < 1:
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}.")
    known = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown LoraConfig fields {unknown}; see peft.LoraConfig for the valid ones.")
    modules_to_save = list(FULLY_TRAINED_MODULES)
    modules_to_save += [name for name in fields.pop("modules_to_save", None) or [] if name not in modules_to_save]
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        target_modules=target_modules,
        exclude_modules=NO_LORA_MODULES,
        modules_to_save=modules_to_save,
        **fields,
    )


__all__ = ["lora_config", "FULLY_TRAINED_MODULES"]
