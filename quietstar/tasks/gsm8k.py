"""GSM8K worked solutions: the recipe's task (configs/gsm8k.yaml). No download: `data` is a directory holding GSM8K's
`train.jsonl` and `test.jsonl` (`{"question", "answer"}` lines, the answer ending in '#### <number>').

An example is `Q: {question}\\nA: {solution}`, labelled on the solution tokens. Training draws from train.jsonl minus
its last `validation_items` (the validation set that keeps the best checkpoint), in a seeded shuffle, keeping problems
whose text cut to `max_length` tokens still has `min_solution_tokens` to score; the test set is the first `test_items`
of test.jsonl, scored whole. The metric is the per-token NLL of the solutions.
"""

import random
from dataclasses import dataclass
from pathlib import Path

from ..datafiles import read_jsonl
from ..qa import GSM8K_EXAMPLE, answer_prompt
from . import encode_completion

ANSWER_MARK = "####"
VARIANTS = ("solution",)


def load_problems(data_dir: str | Path, split: str) -> list[dict]:
    """`{"question", "answer"}` records of DIR/{split}.jsonl, in file order; each answer must hold '#### <number>'."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"gsm8k: no {split}.jsonl in {data_dir}; --data must be a directory with GSM8K's train.jsonl and "
            "test.jsonl."
        )
    records = []
    for line, record in read_jsonl(path, {"question": str, "answer": str}, GSM8K_EXAMPLE):
        if ANSWER_MARK not in record["answer"]:
            raise ValueError(f"{path}, line {line}: the answer has no '{ANSWER_MARK} <number>', e.g. {GSM8K_EXAMPLE}")
        records.append(record)
    return records


@dataclass
class Gsm8kTask:
    data: str | None = None  # directory with GSM8K's train.jsonl and test.jsonl
    seed: int = 0
    max_length: int = 128  # training texts are cut to this many tokens (the solution's end is dropped)
    min_solution_tokens: int = 32  # training problems whose cut text keeps fewer solution tokens are skipped
    validation_items: int = 16  # the last problems of train.jsonl
    test_items: int = 100  # the first problems of test.jsonl
    metric = "nll"

    def __post_init__(self):
        if self.data is None:
            raise ValueError(
                "gsm8k: give --data DIR (task.data in a config), a directory with GSM8K's train.jsonl and test.jsonl."
            )

    def tokenizer(self):
        return None

    def base_model(self, tokenizer):
        return None

    def examples(self, split: str, variant: str | None, n: int | None, tokenizer) -> list[dict]:
        if variant not in (None, *VARIANTS):
            raise ValueError(f"gsm8k: stage data must be one of {VARIANTS}, got {variant!r}.")
        if split == "test":
            return [self._encode(p, tokenizer) for p in load_problems(self.data, "test")[: n or self.test_items]]
        train_all = load_problems(self.data, "train")
        if split == "validation":
            return [self._encode(p, tokenizer) for p in train_all[-self.validation_items :][: n]]
        pool, chosen = train_all[: -self.validation_items], []
        for k in random.Random(self.seed).sample(range(len(pool)), len(pool)):
            example = self._encode(pool[k], tokenizer, self.max_length)
            if sum(label != -100 for label in example["labels"]) >= self.min_solution_tokens:
                chosen.append(example)
            if len(chosen) == n:
                return chosen
        raise ValueError(
            f"gsm8k: only {len(chosen)} training problems keep {self.min_solution_tokens} solution tokens within "
            f"max_length {self.max_length}, and the stage needs {n} (max_steps x batch); lower the steps or "
            "task.min_solution_tokens, or raise task.max_length."
        )

    @staticmethod
    def _encode(problem: dict, tokenizer, max_length: int | None = None) -> dict:
        prompt, solution = answer_prompt(problem["question"]), f" {problem['answer']}"
        return encode_completion(tokenizer, prompt, solution, max_length=max_length)


__all__ = ["Gsm8kTask", "load_problems"]
