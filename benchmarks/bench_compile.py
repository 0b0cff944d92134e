"""torch.compile: compile time and step time of a Quiet-STaR model vs its plain base model.

For each case, in a fresh process with an empty inductor cache (so no case reuses another's compiled kernels):

    compile_s     wall time of the first compiled call (tracing + inductor + the call itself); for `train` the first
                  forward and backward, whose backward graph is compiled on the first backward
    graphs        graphs compiled (torch._dynamo counters), graph_breaks, and kernels inductor generated
    eager_s       median step time without compile, compiled_s the median compiled step time (after the first call);
                  eager and compiled steps alternate (the load of a shared machine changes over minutes), except for
                  quietstar-layers, whose eager steps run before its layers are compiled
    max_rel_diff  largest max|compiled - eager| / max|eager| over the step's outputs, compared on a compiled call after
                  the first: loss and every gradient (train), the logits (forward; their -inf entries, the banned
                  marker tokens, must match exactly, else inf). The default policy_weight 1e6 multiplies the REINFORCE
                  term, whose rewards are differences of nearly equal log-probabilities: float32 rounding differences
                  of inductor's fused kernels are magnified there (to ~1e-3 of some gradients, benchmarks/RESULTS.md)

Models: `plain` is the base model (a random llama) compiled whole; `quietstar` the Quiet-STaR model around it compiled
whole (`torch.compile(model)`); `quietstar-layers` the Quiet-STaR model with only the base's decoder layers compiled
(`layer.compile()` for each; the rest eager). Tasks: `forward` = eval-mode forward without labels (greedy thoughts
for quietstar), no gradient; `train` = train-mode forward with labels and backward (quietstar samples its thoughts;
the same seed in eager and compiled runs, so the same thoughts).

    python benchmarks/bench_compile.py                      # tiny llama (the tests' size), all cases
    python benchmarks/bench_compile.py --hidden 256 --layers 4 --length 32 --cases plain:train quietstar:train

Prints a table, then one JSON line with every figure.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [f"{model}:{task}" for task in ("forward", "train") for model in ("plain", "quietstar", "quietstar-layers")]


def build(args: argparse.Namespace, plain: bool):
    """A random llama (`plain`: as it is, sdpa attention, its vocabulary already holding the two thought tokens, so
    both models have the same size) or the Quiet-STaR model around one."""
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    import quietstar

    torch.manual_seed(0)
    words = ["<unk>", "---"] + [f"w{i}" for i in range(args.vocab - 2)]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>")),
        unk_token="<unk>",
    )
    heads = max(1, args.hidden // 8)
    config = LlamaConfig(
        vocab_size=len(words) + 2 * plain, hidden_size=args.hidden, intermediate_size=args.hidden * 3 // 2,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
    )
    base = AutoModelForCausalLM.from_config(config)
    if plain:
        return base
    fields = dict(thought_length=args.thought_length, lookahead=args.lookahead, n_thoughts=args.n_thoughts)
    return quietstar.QuietStarForCausalLM.from_base(base, tokenizer, **fields)[0]


def measure(case: str, args: argparse.Namespace) -> dict:
    """One case, in this process (run it in a fresh one: compile caches and counters are process-wide)."""
    import torch
    import torch._dynamo.utils
    import torch._inductor.metrics

    torch.set_num_threads(args.threads)
    model_kind, task = case.split(":")
    model = build(args, plain=model_kind == "plain")
    model.train(task == "train")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, args.vocab, (args.batch, args.length), generator=generator)

    def step(run) -> list:
        """One step with `run` (the model or its compiled version) -> the tensors to compare."""
        torch.manual_seed(1)  # the same sampled thoughts in every run
        if task == "forward":
            with torch.no_grad():
                return [run(ids).logits]
        model.zero_grad(set_to_none=True)
        loss = run(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    def timed(run) -> float:
        start = time.perf_counter()
        step(run)
        return time.perf_counter() - start

    eager_out = step(model)  # warm-up, and the reference
    in_place = model_kind == "quietstar-layers"  # compiles the model's own layers: no eager twin left afterwards
    eager_times = [timed(model) for _ in range(args.repeats)] if in_place else []

    if in_place:
        for layer in model.get_decoder().layers:
            layer.compile()
        compiled = model
    else:
        compiled = torch.compile(model)
    compile_s = timed(compiled)
    # Compared on a call after the first: compiling draws from the global RNG (inductor makes random inputs to
    # benchmark with), so the first compiled call would sample other thoughts than the eager one under the same seed.
    compiled_out = step(compiled)
    compiled_times = []
    for _ in range(args.repeats):  # eager and compiled steps alternate: both see the same load on a shared machine
        if not in_place:
            eager_times.append(timed(model))
        compiled_times.append(timed(compiled))

    counters = torch._dynamo.utils.counters
    diffs = []  # per output: max |compiled - eager| / max |eager|
    for a, b in zip(eager_out, compiled_out, strict=True):
        finite = torch.isfinite(a)
        if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(a[~finite], b[~finite]):
            diffs.append(float("inf"))
        elif finite.any():
            diffs.append(((a[finite] - b[finite]).abs().max() / a[finite].abs().max().clamp(min=1e-30)).item())
    return {
        "case": case,
        "compile_s": compile_s,
        "graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "kernels": torch._inductor.metrics.generated_kernel_count,
        "eager_s": statistics.median(eager_times),
        "compiled_s": statistics.median(compiled_times),
        "max_rel_diff": max(diffs, default=0.0),
    }


def run_case(case: str, args: argparse.Namespace) -> dict:
    """`measure` in a fresh Python process with an empty inductor cache; returns its JSON line."""
    with tempfile.TemporaryDirectory() as cache:
        env = {
            **os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
            "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "OMP_NUM_THREADS": str(args.threads),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        options = {k: v for k, v in vars(args).items() if k not in ("cases", "child")}
        argv = [sys.executable, __file__, "--child", case]
        argv += [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"case": case, "error": (result.stderr or result.stdout)[-2000:]}
    return json.loads(lines[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64, help="base vocabulary (+ the 2 thought tokens)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=12)
    parser.add_argument("--thought-length", type=int, default=3)
    parser.add_argument("--lookahead", type=int, default=3)
    parser.add_argument("--n-thoughts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per case")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    import torch
    import transformers

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    print(f"llama hidden {args.hidden} x {args.layers} layers, vocab {args.vocab}; B={args.batch} L={args.length} "
          f"T={args.thought_length} A={args.lookahead} N={args.n_thoughts}; torch {torch.__version__}, "
          f"transformers {transformers.__version__}; commit {commit.stdout.strip()}; {args.threads} thread(s), "
          f"{os.cpu_count()} CPUs")
    print(f"{'case':<24} {'compile_s':>9} {'graphs':>6} {'breaks':>6} {'kernels':>7} {'eager_ms':>8} "
          f"{'compiled_ms':>11} {'max_rel_diff':>12}")
    results = []
    for case in args.cases:
        result = run_case(case, args)
        results.append(result)
        if "error" in result:
            print(f"{case:<24} failed: {result['error'].strip().splitlines()[-1]}")
            continue
        print(f"{case:<24} {result['compile_s']:>9.1f} {result['graphs']:>6} {result['graph_breaks']:>6} "
              f"{result['kernels']:>7} {result['eager_s'] * 1e3:>8.1f} {result['compiled_s'] * 1e3:>11.1f} "
              f"{result['max_rel_diff']:>12.2e}", flush=True)
    print(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "child"}, "commit": commit.stdout.strip(),
                      "results": results}))


if __name__ == "__main__":
    main()
