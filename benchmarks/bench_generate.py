"""Benchmark generation with thoughts: plain base generation, always-think and adaptive thinking.

    python benchmarks/bench_generate.py                      # SmolLM2-135M (embedded default), CPU, T = 12
    python benchmarks/bench_generate.py --model DIR          # a saved (e.g. trained) Quiet-STaR model
    python benchmarks/bench_generate.py --device cuda

Measured, batch 1, greedy, a fixed number of new tokens per prompt (`min_new_tokens` = `max_new_tokens`):
    plain      tokens/s of `generate(think=False)` (the base model's own generation)
    limit      plain / (thought_length + 2): thinking T + 2 extra tokens per generated token at plain speed
    always     tokens/s thinking before every token, and always / limit (target >= 0.8)
    adaptive   tokens/s after `calibrate_think_gate` (keep_gain of the calibration gain), adaptive / always (target >= 2)
and, on held-out text (GSM8K test question + answer), the per-token log-likelihood gain of thinking,
log p_mixed(x_{i+1}) - log p_base(x_{i+1}), and the share of it adaptive thinking keeps (target >= 0.9).
Timed runs alternate between the three modes so that load from other processes hits them alike. The last stdout
line is a JSON document with every figure.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import quietstar  # noqa: E402
from quietstar.adaptive import token_gains  # noqa: E402

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def load_model(args):
    if args.model:
        model = quietstar.QuietStarForCausalLM.from_pretrained(args.model)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    else:
        from quietstar.default_base import default_base_path

        model, tokenizer = quietstar.QuietStarForCausalLM.from_base(
            str(default_base_path()), thought_length=args.thought_length
        )
    return model.to(args.device).eval(), tokenizer


def read_texts(split: str, count: int, offset: int = 0) -> list[tuple[str, str]]:
    """(question, worked answer) pairs from GSM8K (tests/benchmarks only: the package never needs this data)."""
    lines = (GSM8K / f"{split}.jsonl").read_text().splitlines()[offset : offset + count]
    return [(row["question"], row["answer"]) for row in map(json.loads, lines)]


def batches(tokenizer, texts, length: int, device) -> list[torch.Tensor]:
    """Each 'Q: .. A: ..' text as its own (1, <= length) batch (no padding: every token counts)."""
    return [
        tokenizer(f"Q: {q}\nA: {a}", return_tensors="pt", truncation=True, max_length=length).input_ids.to(device)
        for q, a in texts
    ]


def tokens_per_second(model, prompt, new_tokens: int, **kwargs) -> float:
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    assert out.shape[1] - prompt.shape[1] == new_tokens
    return new_tokens / (time.perf_counter() - start)


def held_out_gain(model, texts: list[torch.Tensor]) -> dict:
    gains, predicted = [], []
    for ids in texts:
        g, hidden = token_gains(model, ids)
        gains.append(g)
        predicted.append(model.think_gate(hidden))
    gains, predicted = torch.cat(gains).double(), torch.cat(predicted).double()
    think = predicted >= model.config.think_threshold
    total = gains.sum()
    return {
        "tokens": gains.numel(),
        "gain_always_nats_per_token": gains.mean().item(),
        "gain_adaptive_nats_per_token": (gains * think).mean().item(),
        "kept_gain": (gains[think].sum() / total).item() if total != 0 else float("nan"),
        "think_fraction": think.double().mean().item(),
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a saved Quiet-STaR model directory (default: wrap SmolLM2-135M)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--thought-length", type=int, default=12, help="T when wrapping the default model")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--prompts", type=int, default=3, help="GSM8K test questions used as prompts")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per prompt and mode")
    parser.add_argument("--calibration-texts", type=int, default=16, help="GSM8K train texts for the gate")
    parser.add_argument("--held-out-texts", type=int, default=16, help="GSM8K test texts for the gain")
    parser.add_argument("--text-length", type=int, default=96, help="tokens per calibration/held-out text")
    parser.add_argument("--keep-gain", type=float, default=0.9)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, tokenizer = load_model(args)
    thought_length = model.config.thought_length

    calibration = quietstar.calibrate_think_gate(
        model, batches(tokenizer, read_texts("train", args.calibration_texts), args.text_length, args.device),
        keep_gain=args.keep_gain,
    )
    held_out = held_out_gain(
        model, batches(tokenizer, read_texts("test", args.held_out_texts, offset=args.prompts), args.text_length, args.device)
    )

    prompts = [
        tokenizer(f"Q: {q}\nA:", return_tensors="pt").input_ids.to(args.device) for q, _ in read_texts("test", args.prompts)
    ]
    modes = {"plain": dict(think=False), "always": dict(), "adaptive": dict()}
    rates = {mode: [] for mode in modes}
    threshold = model.config.think_threshold
    tokens_per_second(model, prompts[0], 2)  # warm-up
    for prompt in prompts:
        for _ in range(args.repeats):
            for mode, kwargs in modes.items():
                model.config.think_threshold = threshold if mode == "adaptive" else None
                rates[mode].append(tokens_per_second(model, prompt, args.new_tokens, **kwargs))
    model.config.think_threshold = threshold
    speed = {mode: statistics.median(values) for mode, values in rates.items()}
    limit = speed["plain"] / (thought_length + 2)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    report = {
        "model": args.model or "SmolLM2-135M-Instruct (default, untrained Quiet-STaR wrapper)",
        "device": device,
        "commit": commit,
        "thought_length": thought_length,
        "new_tokens": args.new_tokens,
        "tokens_per_s": speed,
        "limit_tokens_per_s": limit,
        "always_over_limit": speed["always"] / limit,
        "adaptive_over_always": speed["adaptive"] / speed["always"],
        "calibration": vars(calibration),
        "held_out": held_out,
    }
    print(f"model {report['model']} on {device}, commit {commit}; T = {thought_length}, {args.new_tokens} new tokens, "
          f"batch 1, greedy; median of {len(rates['plain'])} runs per mode")
    print(f"plain     {speed['plain']:8.2f} tok/s    limit = plain / (T + 2) = {limit:.2f} tok/s")
    print(f"always    {speed['always']:8.2f} tok/s    {report['always_over_limit']:.2f}x the limit")
    print(f"adaptive  {speed['adaptive']:8.2f} tok/s    {report['adaptive_over_always']:.2f}x always-think "
          f"(threshold {calibration.threshold:+.4f})")
    print(f"calibration: {calibration.n_tokens} tokens, gain {calibration.total_gain:+.5f} nats/token, "
          f"thinks on {calibration.think_fraction:.0%}, keeps {calibration.kept_gain:.0%} of the gain")
    print(f"held out: {held_out['tokens']} tokens, always-think gain {held_out['gain_always_nats_per_token']:+.5f} "
          f"nats/token, adaptive keeps {held_out['kept_gain']:.0%} of it thinking on {held_out['think_fraction']:.0%}")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
