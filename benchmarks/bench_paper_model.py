"""Tokens/s on the paper's model format: the official eval's loop (the ORIGINAL code, a full forward over the whole
prefix per new token) against quietstar's KV-cached `generate()` of the converted model, on the same random
Mistral in the released format (default mid-size: hidden 256, 4 layers, vocabulary 32002, as Mistral's).

    # 1. the original, in the transformers 4.37 environment (tests/fixtures/make_original_fixture.py says how)
    /work/venv437/bin/python benchmarks/bench_paper_model.py original PATH/TO/quiet-star --model-dir /tmp/paper-mid
    # 2. quietstar on the same directory (converted to DIR-converted first)
    python benchmarks/bench_paper_model.py ours --model-dir /tmp/paper-mid

Both: batch 1, float32, random prompts of each `--prompt-lengths`, `--new-tokens` greedy tokens after one untimed
warm-up token, thoughts as the official eval writes them (5 tokens, sampled at temperature 1; the original's forward
writes them at every position of the prefix, `generate()` only at the newest). Each prints one JSON line per prompt
length: {"impl", "prompt_length", "new_tokens", "seconds", "tokens_per_s"}.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MID = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)
VOCABULARY = 32002  # Mistral's 32000 + the two markers


def prompts(length: int, vocab_size: int) -> torch.Tensor:
    return torch.randint(4, vocab_size - 2, (1, length), generator=torch.Generator().manual_seed(length))


def report(impl: str, length: int, new_tokens: int, seconds: float) -> None:
    print(json.dumps(dict(impl=impl, prompt_length=length, new_tokens=new_tokens, seconds=round(seconds, 3),
                          tokens_per_s=round(new_tokens / seconds, 4))), flush=True)


def run_original(args) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    import make_original_fixture as fixture

    original = fixture.import_original(args.checkout.resolve())
    words = fixture.SPECIAL_WORDS + [f"w{i}" for i in range(VOCABULARY - 2 - len(fixture.SPECIAL_WORDS))]
    tokenizer = fixture.make_tokenizer(words)
    model = fixture.build_model(original, tokenizer, **MID)
    if not (args.model_dir / "config.json").exists():
        fixture.save_released(model, tokenizer, args.model_dir, max_shard_size="2GB")
    model = fixture.prepare(model, tokenizer)
    for length in args.prompt_lengths:
        ids = prompts(length, len(tokenizer))

        def next_token(ids):  # the official eval's step: full forward, markers masked, here greedy tokens
            with torch.no_grad():
                logits = model(ids, attention_mask=torch.ones_like(ids)).logits
            logits[:, :, tokenizer.vocab_size :] = -float("inf")
            return torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)

        ids = next_token(ids)  # warm-up
        start = time.perf_counter()
        for _ in range(args.new_tokens):
            ids = next_token(ids)
        report("original eval loop (full forward per token)", length, args.new_tokens, time.perf_counter() - start)


def run_ours(args) -> None:
    sys.path.insert(0, str(ROOT))
    from transformers import AutoModelForCausalLM

    from quietstar.convert_original import convert_original

    converted = args.model_dir.with_name(args.model_dir.name + "-converted")
    if not (converted / "config.json").exists():
        convert_original(args.model_dir, converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    vocab_size = model.config.text_config.vocab_size
    for length in args.prompt_lengths:
        ids = prompts(length, vocab_size)
        model.generate(ids, max_new_tokens=1, do_sample=False)  # warm-up

        def timed(new_tokens: int) -> float:
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            return time.perf_counter() - start

        # the first token's step also runs the prompt (prefill); subtracted, as the original's warm-up token is
        seconds = timed(args.new_tokens + 1) - timed(1)
        report("quietstar generate() (KV cache)", length, args.new_tokens, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    subcommands = parser.add_subparsers(dest="impl", required=True)
    original = subcommands.add_parser("original", help="the official eval loop on the reference code (transformers 4.37)")
    original.add_argument("checkout", type=Path, help="a checkout of ezelikman/quiet-star")
    ours = subcommands.add_parser("ours", help="quietstar generate() on the converted model")
    for sub in (original, ours):
        sub.add_argument("--model-dir", type=Path, required=True, help="the released-format model (written by `original`)")
        sub.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 256])
        sub.add_argument("--new-tokens", type=int, default=8)
        sub.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (run_original if args.impl == "original" else run_ours)(args)


if __name__ == "__main__":
    main()
