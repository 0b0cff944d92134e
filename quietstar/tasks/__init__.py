"""Tasks: the data, held-out items and metric of a recipe. A recipe is a config (`configs/<name>.yaml`: its `task:`
section names one of `TASKS` and sets its fields) trained by the one training path (quietstar/train.py).

A task is a small dataclass with
    metric                        "accuracy" (exact match of the labelled tokens) or "nll" (per token): the validation
                                  rule that keeps the best checkpoint, and the report's headline;
    examples(split, variant, n, tokenizer)
                                  a sequence of {"input_ids", "labels"} examples of `split` ("train", "validation",
                                  "test"; `n` = how many, None = the task's own held-out size) in the text `variant`
                                  a stage names (multihop: "chain", "fillers", "direct");
    tokenizer(), base_model(tokenizer)
                                  optional: a task that brings its own from-scratch model (multihop), else None.
Examples are prompt + completion texts, labelled on the completion (as TRL's prompt/completion datasets).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


def encode_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    completion: str,
    unscored: tuple[int, ...] = (),
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """prompt + completion -> {"input_ids", "labels"}: labels are the ids of the completion's tokens (those that start
    at or after the prompt's end, so a token merged across the boundary counts as completion), -100 elsewhere and on
    `unscored` ids; cut to `max_length` tokens."""
    encoding = tokenizer(prompt + completion, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = encoding["input_ids"][:max_length], encoding["offset_mapping"][:max_length]
    labels = [i if start >= len(prompt) and i not in unscored else -100 for i, (start, _) in zip(ids, offsets)]
    return {"input_ids": ids, "labels": labels}


@dataclass
class LazyExamples(Sequence):
    """`n` examples made on demand by `make(index)` (deterministic in the index): a stage of thousands of generated
    problems costs nothing before its batches are drawn."""

    n: int
    make: Callable[[int], dict]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.make(index % self.n)


def task_classes() -> dict[str, type]:
    from .gsm8k import Gsm8kTask
    from .multihop import MultihopTask
    from .multiply import MultiplyTask

    return {"multihop": MultihopTask, "gsm8k": Gsm8kTask, "multiply": MultiplyTask}


def load_task(section: dict):
    """The task of a config's `task:` section ({"name": ..., field: value, ...}); errors name the bad key."""
    section = dict(section)
    tasks = task_classes()
    name = section.pop("name", None)
    if name not in tasks:
        raise ValueError(f"task.name must be one of {sorted(tasks)}, got {name!r}.")
    try:
        return tasks[name](**section)
    except TypeError as error:
        fields = sorted(tasks[name].__dataclass_fields__)
        raise ValueError(f"task {name}: {error}; its fields are {fields}.") from None


__all__ = ["encode_completion", "LazyExamples", "load_task", "task_classes"]
