"""The hundreds digit of a two-digit product: a task where a written step helps and a direct answer does not.

    direct   47*86:0
    worked   47*86:282+3760=4042;0        (a x units + a x tens = the product; its hundreds digit; fixed width:
                                          47*40 gives 000+1880=1880;8)
    fillers  47*86:---282+37---60=4042;0  (the worked text with "---" pauses, never scored)

The answer is one token (SmolLM2's tokenizer splits digits), as Quiet-STaR's per-position thoughts need: the thought
after ":" is the only one that decides it. Factors are 32..99 (every product has four digits). The digit has no
shortcut: it needs the product, which one forward pass of a small model does not compute (2x2-digit products
answered directly: 0% for SmolLM2-135M in a probe), while the worked text needs only two one-digit products and a
sum of numbers written right before it. The headroom, on held-out pairs: the recipe's worked stage writing its own
worked text (`written_answer_accuracy`, `python -m quietstar.tasks.multiply OUT/worked`) against its direct-answer
controls (configs/multiply.yaml).

Held out by pair: a pair (a, b) belongs to the held-out pool when a stable hash of it falls in one bucket of
`HELD_OUT_BUCKETS` (~10% of the 4624 pairs); training draws only from the other pairs, so a model cannot pass the
test by memorising products it was trained on. Validation and test items are disjoint draws from the pool.
`problems(n, seed)` is deterministic (only `random.Random` draws).
"""

import random
import zlib
from dataclasses import dataclass

from . import LazyExamples, encode_completion

LOW, HIGH = 32, 99  # 32 x 32 = 1024: every product has four digits
HELD_OUT_BUCKETS = 10
FILLER = "---"  # one SmolLM2 token between digits; the thought markers start from it (paper)
VARIANTS = ("direct", "worked", "fillers")


def _held_out(a: int, b: int) -> bool:
    return zlib.crc32(f"{a}*{b}".encode()) % HELD_OUT_BUCKETS == 0


def _pairs(held_out: bool) -> list[tuple[int, int]]:
    return [(a, b) for a in range(LOW, HIGH + 1) for b in range(LOW, HIGH + 1) if _held_out(a, b) == held_out]


def prompt(a: int, b: int) -> str:
    return f"{a}*{b}:"


def answer(a: int, b: int) -> str:
    """The hundreds digit of a x b (one token)."""
    return str(a * b // 100 % 10)


def worked(a: int, b: int) -> str:
    """The text after ":": partial products a x units + a x tens = the product; then the answer. Fixed width (the
    partials zero-padded to 3 and 4 digits), 15 tokens: a thought of that length ends with the answer digit."""
    return f"{a * (b % 10):03d}+{a * (b - b % 10):04d}={a * b};{answer(a, b)}"


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs from the training pairs (never a held-out pair), deterministic in (n, seed)."""
    if n < 1:
        raise ValueError(f"the number of multiply problems must be >= 1, got {n}.")
    rng, pairs = random.Random(seed), _pairs(held_out=False)
    return [(prompt(a, b), answer(a, b)) for a, b in (rng.choice(pairs) for _ in range(n))]


@dataclass
class MultiplyTask:
    """The multiplication recipe's task. `seed`: the training draw; validation and test items are fixed draws from
    the held-out pairs (validation first, then test, without overlap)."""

    seed: int = 0
    validation_items: int = 128
    test_items: int = 256
    filler_rate: float = 0.3  # "fillers": chance of a "---" pause before each character of the worked text
    metric = "accuracy"

    def __post_init__(self):
        pool = len(_pairs(held_out=True))
        if self.validation_items + self.test_items > pool:
            raise ValueError(
                f"multiply: validation_items + test_items = {self.validation_items + self.test_items} exceeds the "
                f"{pool} held-out pairs; lower task.validation_items or task.test_items."
            )

    def tokenizer(self):
        return None  # the base model's

    def base_model(self, tokenizer):
        return None

    def examples(self, split: str, variant: str, n: int | None, tokenizer) -> LazyExamples:
        if variant not in VARIANTS:
            raise ValueError(f"multiply: stage data must be one of {VARIANTS}, got {variant!r}.")
        n = n or (self.validation_items if split == "validation" else self.test_items)
        if split == "train":
            pairs, seed = _pairs(held_out=False), f"multiply-{variant}-{self.seed}"
            pick = lambda index: random.Random(f"{seed}-{index}").choice(pairs)  # noqa: E731
        else:
            held = self.held_out_pairs(split)
            if n > len(held):
                raise ValueError(f"multiply: {split} has {len(held)} items (task.{split}_items), asked for {n}.")
            pick = held.__getitem__
        filler = tokenizer.convert_tokens_to_ids(FILLER)

        def make(index: int) -> dict:
            a, b = pick(index)
            completion = answer(a, b) if variant == "direct" else worked(a, b)
            if variant == "fillers":
                rng = random.Random(f"multiply-fillers-{self.seed}-{index}")
                completion = "".join(FILLER + c if rng.random() < self.filler_rate else c for c in completion)
            return encode_completion(tokenizer, prompt(a, b), completion, unscored=(filler,))

        return LazyExamples(n, make)

    def held_out_pairs(self, split: str) -> list[tuple[int, int]]:
        """The (a, b) of "validation" (the first `validation_items` of a fixed shuffle of the held-out pairs) or
        "test" (the next `test_items`)."""
        held = _pairs(held_out=True)
        random.Random("multiply-held-out").shuffle(held)
        if split == "validation":
            return held[: self.validation_items]
        return held[self.validation_items : self.validation_items + self.test_items]


def written_answer_accuracy(model, tokenizer, pairs: list[tuple[int, int]], batch_size: int = 64) -> dict[str, float]:
    """The headroom's top: the model writes its own worked text after each prompt (greedy, plain causal LM) and its
    answer is the digit after the ";" it writes. Returns {"accuracy": answer right, "worked_exact": the whole worked
    text right} over `pairs`."""
    import torch

    right = exact = 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        inputs = tokenizer(  # left padding: generation continues every prompt from its last token
            [prompt(a, b) for a, b in batch], return_tensors="pt", padding=True, padding_side="left",
            add_special_tokens=False,
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        for (a, b), ids in zip(batch, out[:, inputs["input_ids"].shape[1] :]):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            written = text.split(";")[1][:1] if ";" in text else ""
            right += written == answer(a, b)
            exact += text.startswith(worked(a, b))
    return {"accuracy": right / len(pairs), "worked_exact": exact / len(pairs)}


def main(argv: list[str] | None = None) -> None:
    """`python -m quietstar.tasks.multiply MODEL_DIR [--split test]`: the written-answer accuracy of a plain model
    trained on the worked text (the recipe's `worked/` or `fillers/`), as one JSON line."""
    import argparse
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(prog="python -m quietstar.tasks.multiply", description=main.__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("--split", choices=["validation", "test"], default="test")
    args = parser.parse_args(argv)
    task = MultiplyTask()
    pairs = task.held_out_pairs(args.split)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    print(json.dumps({"model": args.model_dir, "split": args.split, "items": len(pairs),
                      **written_answer_accuracy(model, tokenizer, pairs)}))


__all__ = ["MultiplyTask", "answer", "problems", "prompt", "worked", "written_answer_accuracy"]

if __name__ == "__main__":
    main()
