"""Training data: text from local files (or the built-in arithmetic problems) -> token windows -> padded batches.

Sources (`DataConfig.path`):
    None             the built-in arithmetic word problems (`quietstar.arithmetic`): no file needed
    *.jsonl          one JSON object per line
    *.json           a list of objects (or of strings)
    *.txt            documents separated by blank lines
    *.parquet        rows of a table (needs pyarrow)
    a directory      a `datasets` dataset saved with `save_to_disk` (needs `datasets`; `split` picks from a DatasetDict)

Each row becomes one text: `template.format(**row)` when a template is given (e.g. "Question: {question}\\nAnswer:
{answer}"), else `row[text_field]`. With `packing` the texts are tokenized, joined with EOS and cut into windows of
exactly `window` tokens (the remainder is dropped); without it each text is one example, truncated to `window`.
The last `eval_windows` windows are held out for evaluation.
"""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from .arithmetic import PROBLEM_TEMPLATE, arithmetic_problems

FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


@dataclass
class DataConfig:
    """The `data:` section of a training config."""

    path: str | None = None  # None = the built-in arithmetic word problems
    split: str = "train"  # for a `datasets.DatasetDict` saved on disk
    text_field: str = "text"
    template: str | None = None  # e.g. "Question: {question}\nAnswer: {answer}"; overrides text_field
    window: int = 64  # tokens per training example
    packing: bool = True  # join texts and cut fixed windows; False = one (truncated, padded) example per text
    eval_windows: int = 8  # held-out examples for the base vs mixed NLL evaluation (0 = none)
    arithmetic_problems: int = 2000  # size of the built-in corpus (path: null)
    arithmetic_seed: int = 0

    def validate(self, lookahead: int) -> None:
        """Ranges; `lookahead` is the model's: a window must hold a position and its `lookahead` next tokens."""
        if self.window < lookahead + 1:
            raise ValueError(
                f"data.window = {self.window} is shorter than lookahead + 1 = {lookahead + 1}: no position would have "
                "all its lookahead tokens to score. Raise data.window or lower quietstar.lookahead."
            )
        if self.eval_windows < 0:
            raise ValueError(f"data.eval_windows must be >= 0, got {self.eval_windows}.")
        if self.arithmetic_problems < 1:
            raise ValueError(f"data.arithmetic_problems must be >= 1, got {self.arithmetic_problems}.")


def load_rows(config: DataConfig) -> list[dict | str]:
    """The raw rows of the configured source (dicts, or plain strings for .txt and string lists)."""
    if config.path is None:
        return arithmetic_problems(config.arithmetic_problems, config.arithmetic_seed)
    path = Path(config.path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path: no file or directory at {path}.")
    if path.is_dir():
        return _load_saved_dataset(path, config.split)
    if path.suffix == ".jsonl":
        with path.open() as file:
            return [json.loads(line) for line in file if line.strip()]
    if path.suffix == ".json":
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"data.path: {path} must hold a JSON list of objects or strings, got {type(rows).__name__}.")
        return rows
    if path.suffix == ".txt":
        return [block.strip() for block in path.read_text().split("\n\n") if block.strip()]
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError as error:
            raise ImportError("reading .parquet needs pyarrow: `pip install pyarrow`.") from error
        return pyarrow.parquet.read_table(path).to_pylist()
    raise ValueError(
        f"data.path: unsupported file type {path.suffix!r} ({path}). Use one of {FILE_SUFFIXES} or a directory "
        "written by `datasets.Dataset.save_to_disk`."
    )


def _load_saved_dataset(path: Path, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"{path} is a directory: reading a saved dataset needs `pip install datasets`.") from error
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(f"data.split: {path} has splits {sorted(dataset)}, not {split!r}.")
        dataset = dataset[split]
    return dataset.to_list()


def row_texts(rows: Iterable[dict | str], config: DataConfig) -> list[str]:
    """One text per row, by `config.template` or `config.text_field`."""
    template = config.template or (PROBLEM_TEMPLATE if config.path is None else None)
    texts = []
    for index, row in enumerate(rows):
        if isinstance(row, str):
            if template is not None:
                raise ValueError(f"data.template is set but row {index} is a plain string, not an object with fields.")
            texts.append(row)
            continue
        try:
            texts.append(template.format(**row) if template is not None else row[config.text_field])
        except KeyError as missing:
            setting = f"data.template {template!r}" if template is not None else f"data.text_field {config.text_field!r}"
            raise ValueError(
                f"{setting}: row {index} has no field {missing}; its fields are {sorted(row)}. Set data.text_field to "
                "one of them or write a data.template such as 'Question: {question}\\nAnswer: {answer}'."
            ) from None
        if not isinstance(texts[-1], str):
            raise ValueError(f"data.text_field {config.text_field!r}: row {index} holds {type(texts[-1]).__name__}, not text.")
    return texts


def make_examples(texts: list[str], tokenizer: PreTrainedTokenizerBase, config: DataConfig, lookahead: int) -> list[Tensor]:
    """Token windows: (window,) each when packing, else one (<= window,) tensor per text."""
    if not texts:
        raise ValueError(f"data: the source {config.path or 'arithmetic'} has no rows: nothing to train on.")
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if config.packing:
        stream = []
        for tokens in token_lists:
            stream += tokens + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        n_windows = len(stream) // config.window
        if n_windows == 0:
            raise ValueError(
                f"data: {len(texts)} texts give {len(stream)} tokens, fewer than one window of data.window = "
                f"{config.window} tokens. Add text or lower data.window."
            )
        return list(torch.tensor(stream[: n_windows * config.window]).view(n_windows, config.window))
    examples = []
    for index, tokens in enumerate(token_lists):
        if len(tokens) < lookahead + 1:
            raise ValueError(
                f"data: text {index} has {len(tokens)} tokens, fewer than lookahead + 1 = {lookahead + 1}, so no "
                f"position can be scored ({texts[index][:60]!r}). Remove short texts or use data.packing: true."
            )
        examples.append(torch.tensor(tokens[: config.window]))
    return examples


def build_datasets(
    config: DataConfig, tokenizer: PreTrainedTokenizerBase, lookahead: int
) -> tuple[list[dict[str, Tensor]], list[dict[str, Tensor]]]:
    """(train, held-out) lists of {"input_ids": (l,)} examples; the held-out ones are the last `eval_windows`."""
    config.validate(lookahead)
    examples = make_examples(row_texts(load_rows(config), config), tokenizer, config, lookahead)
    if len(examples) <= config.eval_windows:
        raise ValueError(
            f"data: {len(examples)} examples, but data.eval_windows = {config.eval_windows} are held out, leaving "
            "none to train on. Add data or lower data.eval_windows."
        )
    split = len(examples) - config.eval_windows
    return [{"input_ids": ids} for ids in examples[:split]], [{"input_ids": ids} for ids in examples[split:]]


class WindowCollator:
    """Stacks examples into a right-padded batch: input_ids, attention_mask, labels (B, l). Labels are the example's
    own `labels` when it has them (a task's prompt/completion examples: -100 off the completion), else its tokens;
    -100 at padding."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        length = max(len(example["input_ids"]) for example in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for row, example in enumerate(examples):
            ids = torch.as_tensor(example["input_ids"])
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
            labels[row, : len(ids)] = torch.as_tensor(example.get("labels", ids))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for right padding: the tokenizer's pad token, else EOS (padding is masked out of the loss)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token before training.")


__all__ = ["DataConfig", "build_datasets", "WindowCollator", "load_rows", "row_texts", "make_examples", "pad_token_id"]
