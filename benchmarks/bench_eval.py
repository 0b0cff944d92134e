"""Multiple-choice scoring: thinking where it scores (cached, `quietstar.qa.continuation_log_probs`) vs the parallel
forward that thinks after every prompt token, once per option (the evaluation before; `scoring.token_log_probs`).

Items are CommonsenseQA-shaped, built from GSM8K test questions: the prompt "Q: {question}\\n(A) ..\\n(E) ..\\nA:"
with five numeric options, scored on " A" .. " E". Both paths use greedy thoughts; the script checks that they give
the same option log-probabilities before it reports times.

    python benchmarks/bench_eval.py --items 5          # SmolLM2-135M wrapped, T = 12

Prints a table, then one JSON line with every figure.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import quietstar  # noqa: E402
from quietstar.qa import continuation_log_probs  # noqa: E402
from quietstar.scoring import right_pad, token_log_probs  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
LABELS = ["A", "B", "C", "D", "E"]


def items(count: int) -> list[str]:
    """Multiple-choice prompts from GSM8K test questions (tests/benchmarks only: the package never needs this data)."""
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()[:count]]
    prompts = []
    for index, row in enumerate(rows):
        answer = int(row["answer"].split("####")[-1].strip().replace(",", ""))
        options = [answer + offset for offset in (0, 3, -2, 10, 7)][index % 5 :] + [answer + offset for offset in (0, 3, -2, 10, 7)][: index % 5]
        prompts.append(f"Q: {row['question']}\n" + "".join(f"({l}) {o}\n" for l, o in zip(LABELS, options)) + "A:")
    return prompts


def parallel_scores(model, tokenizer, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous evaluation: one right-padded batch of prompt + option, the parallel forward over all of it."""
    prompt_ids = tokenizer(prompt).input_ids
    sequences = [prompt_ids + tokenizer(f" {label}", add_special_tokens=False).input_ids for label in LABELS]
    input_ids, attention_mask = right_pad(sequences, pad_id=0)
    scores = token_log_probs(model, input_ids, attention_mask)
    in_continuation = torch.arange(input_ids.shape[1] - 1) >= len(prompt_ids) - 1
    mask = scores.valid & in_continuation
    return (scores.base * mask).sum(-1), (scores.mixed * mask).sum(-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=5)
    parser.add_argument("--thought-length", type=int, default=12)
    args = parser.parse_args(argv)
    from quietstar.default_base import default_base_path

    model, tokenizer = quietstar.QuietStarForCausalLM.from_base(str(default_base_path()), thought_length=args.thought_length)
    model.eval()
    prompts = items(args.items)
    times = {"parallel": 0.0, "cached": 0.0}
    max_difference = 0.0
    for prompt in prompts:
        start = time.perf_counter()
        old = parallel_scores(model, tokenizer, prompt)
        times["parallel"] += time.perf_counter() - start
        start = time.perf_counter()
        new = continuation_log_probs(model, tokenizer, prompt, [f" {label}" for label in LABELS])
        times["cached"] += time.perf_counter() - start
        for a, b in zip(old, new):
            max_difference = max(max_difference, (a - b).abs().max().item())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    tokens = sum(len(tokenizer(p).input_ids) for p in prompts) / len(prompts)
    speedup = times["parallel"] / times["cached"]
    print(f"SmolLM2-135M, T={args.thought_length}, {len(prompts)} items x 5 options, prompts of {tokens:.0f} tokens on "
          f"average, commit {commit}, {torch.get_num_threads()} threads")
    print(f"parallel (thinks after every token): {times['parallel']:.1f} s | cached (thinks where scored): "
          f"{times['cached']:.1f} s | speed-up {speedup:.1f}x | max score difference {max_difference:.2e}")
    print(json.dumps(dict(benchmark="eval_multiple_choice", commit=commit, items=len(prompts), mean_prompt_tokens=tokens,
                          thought_length=args.thought_length, seconds=times, speedup=speedup, max_difference=max_difference)))


if __name__ == "__main__":
    main()
