"""Zero-shot question answering with and without thoughts, following the Quiet-STaR paper's protocol.

Direct answers are scored by probability, not by generation (paper: "directly compute the probability of the correct
answer"); every item needs one forward, which yields both the base and the after-thinking probabilities:

- multiple choice (CommonsenseQA-format jsonl: question, choices {label, text}, answerKey): the prompt
  "Q: {question}\\n(A) {text}\\n(B) {text}\\n...\\nA:" followed by " {label}"; each option's probability is
  renormalised over the options. `accuracy` = the most probable option is the answer; `soft_accuracy` = mean
  probability of the correct option (the metric of the paper's evaluation code).
- GSM8K answers (GSM8K-format jsonl: question, answer ending in "#### <number>"): the prompt "Q: {question}\\nA:"
  followed by " {number}"; `mean_answer_probability` = mean over items of p(number | prompt). The paper's code
  additionally renormalises each token over the digits of its Mistral tokenizer; that step is tokenizer-specific
  and left out here.
- zero-shot chain of thought for GSM8K: "Q: {question}\\nA: Let's think step by step." + k sampled continuations,
  each followed by "\\nTherefore, the answer (arabic numerals) is" and a short greedy answer; the first number of
  each is a vote, `accuracy` = the majority vote equals the answer (maj@k). Without thoughts = the wrapped base model.

Thoughts are greedy by default (`thought_temperature=0`): the scores are then deterministic.
"""

import copy
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedTokenizerBase

from .datafiles import DataFormatError, file_sha256, read_jsonl
from .modeling_quietstar import QuietStarForCausalLM
from .scoring import next_token_distributions, thought_sampling

MULTIPLE_CHOICE_EXAMPLE = '{"question": "...", "choices": {"label": ["A", "B"], "text": ["...", "..."]}, "answerKey": "A"}'
GSM8K_EXAMPLE = '{"question": "...", "answer": "... #### 42"}'
COT_TRIGGER = "Let's think step by step."
ANSWER_TRIGGER = "\nTherefore, the answer (arabic numerals) is"
COT_STOP = ("\nQ:", "\n\n\n")  # the sample started the next question or ran dry
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class MultipleChoiceItem:
    question: str
    labels: list[str]
    texts: list[str]
    answer_key: str
    line: int


@dataclass
class GSM8KItem:
    question: str
    answer: str  # the number after "####", normalised (no thousands separators)
    line: int


@dataclass
class QAResult:
    """One task's zero-shot results with and without thoughts; `items` has the per-item scores."""

    task: str
    model: str
    data_file: str
    data_sha256: str
    n_items: int
    settings: dict
    with_thoughts: dict
    without_thoughts: dict
    items: list[dict] = field(repr=False)

    def to_dict(self) -> dict:
        return asdict(self)

    def markdown(self) -> str:
        lines = [
            f"Zero-shot {self.task} on `{Path(self.data_file).name}` ({self.n_items} items; "
            f"thought temperature {self.settings['thought_temperature']}, seed {self.settings['seed']}).",
            "",
            "| metric | without thoughts | with thoughts |",
            "|---|---:|---:|",
        ]
        for metric, value in self.with_thoughts.items():
            lines.append(f"| {metric} | {self.without_thoughts[metric]:.4f} | {value:.4f} |")
        return "\n".join(lines) + "\n"


# ---- data ------------------------------------------------------------------------------------------------------------


def load_multiple_choice(path: str | os.PathLike) -> list[MultipleChoiceItem]:
    """CommonsenseQA-format jsonl -> items; errors name the file and line."""
    items = []
    for line, record in read_jsonl(path, {"question": str, "choices": dict, "answerKey": str}, MULTIPLE_CHOICE_EXAMPLE):
        where = f"{path}, line {line}"
        labels, texts = record["choices"].get("label"), record["choices"].get("text")
        if not isinstance(labels, list) or not isinstance(texts, list) or len(labels) != len(texts) or len(labels) < 2:
            raise DataFormatError(
                f"{where}: 'choices' must hold two equally long lists 'label' and 'text' (at least two options), "
                f"e.g. {MULTIPLE_CHOICE_EXAMPLE}"
            )
        if record["answerKey"] not in labels:
            raise DataFormatError(f"{where}: answerKey {record['answerKey']!r} is not one of the labels {labels}.")
        items.append(MultipleChoiceItem(record["question"], [str(x) for x in labels], [str(x) for x in texts], record["answerKey"], line))
    return items


def load_gsm8k(path: str | os.PathLike) -> list[GSM8KItem]:
    """GSM8K-format jsonl -> items with the final number; errors name the file and line."""
    items = []
    for line, record in read_jsonl(path, {"question": str, "answer": str}, GSM8K_EXAMPLE):
        _, marker, final = record["answer"].rpartition("####")
        number = NUMBER.search(final)
        if not marker or number is None:
            raise DataFormatError(f"{path}, line {line}: 'answer' must end in '#### <number>', e.g. {GSM8K_EXAMPLE}")
        items.append(GSM8KItem(record["question"], normalise_number(number.group()), line))
    return items


def normalise_number(text: str) -> str:
    """'1,000' -> '1000', '3.50' -> '3.5', '7.0' -> '7': one spelling per value, for comparing answers."""
    text = text.replace(",", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def multiple_choice_prompt(item: MultipleChoiceItem) -> str:
    options = "".join(f"\n({label}) {text}" for label, text in zip(item.labels, item.texts))
    return f"Q: {item.question}{options}\nA:"


def answer_prompt(question: str) -> str:
    return f"Q: {question}\nA:"


# ---- scoring by probability ------------------------------------------------------------------------------------------


@torch.no_grad()
def continuation_log_probs(
    model: QuietStarForCausalLM, tokenizer: PreTrainedTokenizerBase, prompt: str, continuations: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(continuation | prompt) for each continuation, without and with thoughts: two (C,) float32 tensors.

    Thinks only where it scores, as cached generation does: the prompt is encoded once (one thought, at its last
    token, predicts every continuation's first token) and its KV cache is shared by all continuations; each further
    continuation token is one cached decoding step on a copy of that cache. The parallel forward would think after
    every prompt token, once per option. Prompt and continuation are tokenised separately, so every continuation's
    tokens are exactly its own. (With an adaptive `think_threshold` the gate applies, as in `generate()`.)"""
    prompt_ids = tokenizer(prompt).input_ids
    continuation_ids = [tokenizer(c, add_special_tokens=False).input_ids for c in continuations]
    if not prompt_ids or any(not ids for ids in continuation_ids):
        raise ValueError(f"the prompt {prompt!r} or a continuation of it tokenises to nothing: {continuations}.")
    cache = DynamicCache(config=model.config.text_config)
    first_base, first_mixed = _step_log_probs(model, [prompt_ids], cache)
    base_scores, mixed_scores = [], []
    for ids in continuation_ids:
        base, mixed = first_base[ids[0]], first_mixed[ids[0]]
        branch = copy.deepcopy(cache) if len(ids) > 1 else None
        for token, next_token in zip(ids[:-1], ids[1:]):
            step_base, step_mixed = _step_log_probs(model, [[token]], branch)
            base, mixed = base + step_base[next_token], mixed + step_mixed[next_token]
        base_scores.append(base)
        mixed_scores.append(mixed)
    return torch.stack(base_scores).cpu(), torch.stack(mixed_scores).cpu()


def _step_log_probs(model: QuietStarForCausalLM, new_ids: list[list[int]], cache: DynamicCache) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached decoding step on `new_ids` (1, P): log-probabilities (V,) of the next token without thinking (the
    base logits, markers masked) and after thinking at the last new token (the model's output)."""
    out = model(torch.tensor(new_ids, device=model.device), cache=cache)
    base, mixed = next_token_distributions(out, model.marker_ids)
    return base[0, -1], mixed[0, -1]


def score_multiple_choice(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str | os.PathLike,
    *,
    limit: int | None = None,
    thought_temperature: float | None = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> QAResult:
    """Zero-shot multiple choice by option probability, with and without thoughts (see the module docstring)."""
    items = load_multiple_choice(data_file)[:limit]
    records = []
    with thought_sampling(model, thought_temperature, seed):
        for item in tqdm(items, desc="multiple choice", unit="item", disable=not progress):
            base, mixed = continuation_log_probs(model, tokenizer, multiple_choice_prompt(item), [f" {label}" for label in item.labels])
            correct = item.labels.index(item.answer_key)
            record = dict(line=item.line, answer=item.answer_key)
            for name, log_probs in (("without_thoughts", base), ("with_thoughts", mixed)):
                probabilities = log_probs.softmax(-1)  # renormalised over the options
                record[name] = dict(
                    option_probabilities=dict(zip(item.labels, probabilities.tolist())),
                    prediction=item.labels[probabilities.argmax().item()],
                    correct_probability=probabilities[correct].item(),
                )
            records.append(record)

    def metrics(name: str) -> dict:
        return dict(
            accuracy=_mean([r[name]["prediction"] == r["answer"] for r in records]),
            soft_accuracy=_mean([r[name]["correct_probability"] for r in records]),
        )

    return _result("multiple choice", model, model_name, data_file, items, thought_temperature, seed, {}, metrics, records)


def score_gsm8k_answers(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str | os.PathLike,
    *,
    limit: int | None = None,
    thought_temperature: float | None = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> QAResult:
    """Zero-shot GSM8K by the probability of the final number, with and without thoughts."""
    items = load_gsm8k(data_file)[:limit]
    records = []
    with thought_sampling(model, thought_temperature, seed):
        for item in tqdm(items, desc="GSM8K answer probability", unit="item", disable=not progress):
            base, mixed = continuation_log_probs(model, tokenizer, answer_prompt(item.question), [f" {item.answer}"])
            records.append(
                dict(
                    line=item.line,
                    answer=item.answer,
                    without_thoughts=dict(answer_log_prob=base.item()),
                    with_thoughts=dict(answer_log_prob=mixed.item()),
                )
            )

    def metrics(name: str) -> dict:
        log_probs = torch.tensor([r[name]["answer_log_prob"] for r in records], dtype=torch.float64)
        return dict(mean_answer_probability=log_probs.exp().mean().item(), mean_answer_log_prob=log_probs.mean().item())

    return _result("GSM8K answer probability", model, model_name, data_file, items, thought_temperature, seed, {}, metrics, records)


# ---- chain of thought, majority vote ---------------------------------------------------------------------------------


def gsm8k_cot_majority(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str | os.PathLike,
    *,
    k: int = 8,
    max_new_tokens: int = 128,
    temperature: float = 0.9,
    answer_tokens: int = 12,
    limit: int | None = None,
    thought_temperature: float | None = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> QAResult:
    """Zero-shot chain of thought with a majority vote over `k` samples (maj@k), with thoughts (the Quiet-STaR model's
    `generate`) and without (the wrapped base model's). The paper used k=8, temperature 0.9, 128 GSM8K test items."""
    items = load_gsm8k(data_file)[:limit]
    generators = {"without_thoughts": model.model, "with_thoughts": model}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = []
    with thought_sampling(model, thought_temperature, seed):
        for index, item in enumerate(tqdm(items, desc=f"GSM8K CoT maj@{k}", unit="item", disable=not progress)):
            prompt = f"{answer_prompt(item.question)} {COT_TRIGGER}"
            record = dict(line=item.line, answer=item.answer)
            for name, generator in generators.items():
                torch.manual_seed(seed + index)  # the same sampling noise for both, per item
                reasonings = _sample(generator, tokenizer, prompt, k, max_new_tokens, temperature, pad_id)
                votes = [_final_number(generator, tokenizer, prompt + r, answer_tokens, pad_id) for r in reasonings]
                counted = Counter(v for v in votes if v is not None)
                majority = counted.most_common(1)[0][0] if counted else None
                record[name] = dict(votes=votes, majority=majority, reasonings=reasonings)
            records.append(record)

    def metrics(name: str) -> dict:
        return dict(accuracy=_mean([r[name]["majority"] == r["answer"] for r in records]))

    settings = dict(k=k, max_new_tokens=max_new_tokens, temperature=temperature, answer_tokens=answer_tokens)
    return _result(f"GSM8K chain of thought maj@{k}", model, model_name, data_file, items, thought_temperature, seed, settings, metrics, records)


@torch.no_grad()
def _sample(generator, tokenizer, prompt: str, k: int, max_new_tokens: int, temperature: float, pad_id: int) -> list[str]:
    """k sampled continuations of `prompt`, each cut at the first stop string."""
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids.to(generator.device)
    output = generator.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        do_sample=True,
        temperature=temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=k,
        pad_token_id=pad_id,
    )
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1] :], skip_special_tokens=True)
    for stop in COT_STOP:
        texts = [text.split(stop)[0] for text in texts]
    return texts


@torch.no_grad()
def _final_number(generator, tokenizer, reasoning: str, answer_tokens: int, pad_id: int) -> str | None:
    """Greedy answer after ANSWER_TRIGGER; its first number, normalised (None if there is none)."""
    input_ids = tokenizer(reasoning + ANSWER_TRIGGER, return_tensors="pt").input_ids.to(generator.device)
    output = generator.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=answer_tokens, pad_token_id=pad_id
    )
    number = NUMBER.search(tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True))
    return normalise_number(number.group()) if number else None


# ---- results ---------------------------------------------------------------------------------------------------------


def _mean(values: list) -> float:
    return sum(float(v) for v in values) / len(values)


def _result(task, model, model_name, data_file, items, thought_temperature, seed, settings, metrics, records) -> QAResult:
    return QAResult(
        task=task,
        model=model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        data_file=str(data_file),
        data_sha256=file_sha256(data_file),
        n_items=len(items),
        settings=dict(
            thought_temperature=model.config.inference_thought_temperature if thought_temperature is None else thought_temperature,
            seed=seed,
            n_thoughts=model.config.n_thoughts,
            thought_length=model.config.thought_length,
            **settings,
        ),
        with_thoughts=metrics("with_thoughts"),
        without_thoughts=metrics("without_thoughts"),
        items=records,
    )


__all__ = [
    "QAResult",
    "MultipleChoiceItem",
    "GSM8KItem",
    "load_multiple_choice",
    "load_gsm8k",
    "continuation_log_probs",
    "score_multiple_choice",
    "score_gsm8k_answers",
    "gsm8k_cot_majority",
]
