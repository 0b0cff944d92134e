"""One Quiet-STaR training step vs the floor: S plain forward+backward passes of the base model.

A Quiet-STaR step (B rows of L tokens, N thoughts, T thought tokens, A lookahead) runs the text pass, T sampling
steps without gradient, and one teacher-forced pass with gradient over N * L chains of S = T + A + 1 tokens. Those
N * L * S tokens are the work any implementation has to do with gradient, so the floor is S plain forward+backward
passes of the base model over the same L tokens with the N thoughts as extra rows (batch B * N). The ratio
quietstar / floor is what this reports (1.0 = no overhead beyond the thought tokens themselves).

Each case runs in a fresh process (spawned), so its peak memory is its own: on CUDA `max_memory_allocated`, on CPU
the growth of the peak resident set size over the process's size before the first step.

    python benchmarks/bench_train_step.py                         # random llama (~25M), CPU (+ CUDA if present)
    python benchmarks/bench_train_step.py --base smollm2 --length 64 --thought-length 4
    python benchmarks/bench_train_step.py --length 128 --pairs 8    # + interleaved rounds, for a shared CPU

Prints a table, then one JSON line with every figure.
"""

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_model(base: str, thought_length: int, lookahead: int, n_thoughts: int, hidden: int = 384, layers: int = 6):
    import quietstar
    from quietstar.default_base import default_base_path
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    fields = dict(thought_length=thought_length, lookahead=lookahead, n_thoughts=n_thoughts, policy_weight=1.0)
    if base == "smollm2":
        path = default_base_path()
        return quietstar.QuietStarForCausalLM.from_base(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path), **fields
        )[0]
    vocab = ["<unk>", "---"] + [f"w{i}" for i in range(8190)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")), unk_token="<unk>"
    )
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64,
                         num_key_value_heads=2 if hidden // 64 % 2 == 0 else 1)
    return quietstar.QuietStarForCausalLM.from_base(AutoModelForCausalLM.from_config(config), tokenizer, **fields)[0]


def make_step(case: str, args: argparse.Namespace, device: str) -> Callable[[], None]:
    """One training step of `case` ("quietstar" or "plain", the floor) on a fresh model, synchronised on CUDA."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.base, args.thought_length, args.lookahead, args.n_thoughts, args.hidden, args.layers)
    model = model.to(device).train()
    vocab = model.config.text_config.vocab_size - 2
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (args.batch, args.length), generator=generator).to(device)
    chain_steps = args.thought_length + args.lookahead + 1
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            if case == "quietstar":
                model(ids, labels=ids).loss.backward()
            else:  # the floor: S plain forward+backward passes of the base LM, the N thoughts as extra rows
                rows = ids.repeat(args.n_thoughts, 1)
                for _ in range(chain_steps):
                    model.model(rows, labels=rows, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def measure(case: str, args: argparse.Namespace, device: str) -> dict:
    """Run in a fresh process: time `repeats` steps of `case` after one warm-up step; peak memory of the steps."""
    step = make_step(case, args, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:  # the peak RSS only grows: read it before the first step, which allocates the most (gradients, caches)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up: allocator, kernels, lazy inits (untimed; its memory counts in the peak)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return {"case": case, "device": device, "median_s": statistics.median(times), "times_s": times, "peak_mib": peak / 2**20}


def measure_pairs(args: argparse.Namespace, device: str) -> dict:
    """Run in a fresh process: `pairs` rounds of one Quiet-STaR step then one floor step, after a warm-up of each.
    The median of the rounds' time ratios is robust to load that drifts during a run (a shared CPU), which moves
    the medians of separately run cases by up to 2x."""
    quietstar_step, floor_step = make_step("quietstar", args, device), make_step("plain", args, device)
    quietstar_step(), floor_step()
    ratios = []
    for _ in range(args.pairs):
        start = time.perf_counter()
        quietstar_step()
        middle = time.perf_counter()
        floor_step()
        ratios.append((middle - start) / (time.perf_counter() - middle))
    return {"case": "pairs", "device": device, "median_ratio": statistics.median(ratios), "ratios": ratios}


def run_case(case: str, args: argparse.Namespace, device: str) -> dict:
    """`measure` in a fresh spawned process (its own peak memory); its exceptions are raised here."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        if case == "pairs":
            return pool.apply(measure_pairs, (args, device))
        return pool.apply(measure, (case, args, device))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["random-llama", "smollm2"], default="random-llama")
    parser.add_argument("--hidden", type=int, default=384, help="random llama: hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=6, help="random llama: decoder layers")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=64, help="L, text tokens per row")
    parser.add_argument("--thought-length", type=int, default=4)
    parser.add_argument("--lookahead", type=int, default=4)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=0,
                        help="also time this many alternating (Quiet-STaR step, floor) rounds in one process")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    chain_steps = args.thought_length + args.lookahead + 1
    print(f"base {args.base}  B={args.batch} L={args.length} T={args.thought_length} A={args.lookahead} "
          f"N={args.n_thoughts} S={chain_steps}  commit {commit}  CPUs {os.cpu_count()}")
    results = []
    for device in args.devices:
        quietstar_step = run_case("quietstar", args, device)
        floor = run_case("plain", args, device)
        ratio = quietstar_step["median_s"] / floor["median_s"]
        results += [quietstar_step, floor]
        print(f"{device}: quietstar step {quietstar_step['median_s']:.3f} s, peak +{quietstar_step['peak_mib']:.0f} MiB | "
              f"{chain_steps} plain fwd+bwd (batch {args.batch * args.n_thoughts}) {floor['median_s']:.3f} s, "
              f"peak +{floor['peak_mib']:.0f} MiB | ratio {ratio:.2f}x")
        results.append({"case": "ratio", "device": device, "time_ratio": ratio,
                        "memory_ratio": quietstar_step["peak_mib"] / max(floor["peak_mib"], 1e-9)})
        if args.pairs:
            pairs = run_case("pairs", args, device)
            results.append(pairs)
            print(f"{device}: {args.pairs} alternating rounds, time ratio per round: median {pairs['median_ratio']:.2f}x "
                  f"(min {min(pairs['ratios']):.2f}x, max {max(pairs['ratios']):.2f}x)")
    print(json.dumps({"args": vars(args), "commit": commit, "results": results}))


if __name__ == "__main__":
    main()
