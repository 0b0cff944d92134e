"""Benchmark Quiet-STaR thought attention: the fused Triton kernel against the alternatives.

Providers (all compute the same attention except the floor):
    triton      triton_kernels.thought_attention: fused forward/backward kernels (this repository)
    torch_ref   quietstar.thought_attention: the PyTorch reference (position blocks, recomputed in backward)
    dense_sdpa  the reference code's formulation: SDPA over [text keys | every chain key] with a dense boolean
                mask and K/V heads repeated for GQA (thoughts folded into the batch, the text K/V copied per thought)
    flex        FlexAttention with the equivalent mask_mod and a block mask (compiled; GPU only: no CPU backward)
    sdpa_floor  SDPA causal attention of the same queries against the text keys only (thought steps and
                thoughts folded into the query heads): the work without the chain part, a lower bound
Modes: fwd, bwd, fwd_bwd. Reported: median ms (p20/p80), TFLOP/s of the useful work (formula in `useful_flops`,
the same numerator for every provider), peak memory above the inputs (CUDA).

    python benchmarks/bench_thought_attention.py                              # the full grid, bf16, on the GPU
    python benchmarks/bench_thought_attention.py --device cpu --quick         # smoke run on CPU

Rows go to a CSV; the last stdout line is one JSON document with every row.
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import quietstar  # noqa: E402

PROVIDERS = ("triton", "torch_ref", "dense_sdpa", "flex", "sdpa_floor")
MODES = ("fwd", "bwd", "fwd_bwd")


def useful_flops(batch, n_thoughts, n_heads, length, steps, head_dim, mode):
    """Attention FLOPs of the allowed (query, key) pairs only. Teacher forcing (Sq = Sk = S, step offset 0): row
    (i, s) sees i + 1 text keys and s + 1 chain keys. Two matmuls of 2 FLOPs per pair and dim in the forward;
    backward = 2.5 x forward (2 matmuls more, plus recomputing the scores), as in the Triton tutorial."""
    pairs = steps * length * (length + 1) / 2 + length * steps * (steps + 1) / 2
    forward = 4 * batch * n_thoughts * n_heads * head_dim * pairs
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[mode]


def make_inputs(batch, n_thoughts, n_heads, n_kv_heads, length, steps, head_dim, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [
        (batch, n_thoughts, n_heads, length, steps, head_dim),
        (batch, n_kv_heads, length, head_dim),
        (batch, n_kv_heads, length, head_dim),
        (batch, n_thoughts, n_kv_heads, length, steps, head_dim),
        (batch, n_thoughts, n_kv_heads, length, steps, head_dim),
    ]
    return [torch.randn(s, generator=generator).to(device, dtype).requires_grad_() for s in shapes]


# ---- providers: each takes the five tensors in the thought_attention layout and returns (run, output_to_compare) ----


def provider_triton(q, k_text, v_text, k_own, v_own):
    import triton_kernels

    return lambda: triton_kernels.thought_attention(q, k_text, v_text, k_own, v_own)


def provider_torch_ref(q, k_text, v_text, k_own, v_own):
    return lambda: quietstar.thought_attention(q, k_text, v_text, k_own, v_own)


def dense_layout(q, k_text, v_text, k_own, v_own):
    """Flatten per (batch, thought): queries (i, s) and keys [text j | chain (i, t)], thoughts into the batch."""
    n_thoughts = q.shape[1]
    q_flat = rearrange(q, "b n h l s d -> (b n) h (l s) d")
    keys = torch.cat([k_text.repeat_interleave(n_thoughts, dim=0), rearrange(k_own, "b n h l s d -> (b n) h (l s) d")], 2)
    values = torch.cat([v_text.repeat_interleave(n_thoughts, dim=0), rearrange(v_own, "b n h l s d -> (b n) h (l s) d")], 2)
    return q_flat, keys, values


def thought_mask_mod(length, steps):
    """FlexAttention predicate for the flattened layout: text keys j <= i; chain keys of the same position, t <= s."""

    def mask_mod(b, h, q_idx, kv_idx):
        position, step = q_idx // steps, q_idx % steps
        chain = kv_idx - length
        text_visible = (kv_idx < length) & (kv_idx <= position)
        own_visible = (kv_idx >= length) & (chain // steps == position) & (chain % steps <= step)
        return text_visible | own_visible

    return mask_mod


def provider_dense_sdpa(q, k_text, v_text, k_own, v_own):
    length, steps = q.shape[3], q.shape[4]
    groups = q.shape[2] // k_text.shape[1]
    rows = torch.arange(length * steps, device=q.device)[:, None]
    cols = torch.arange(length + length * steps, device=q.device)[None, :]
    mask = thought_mask_mod(length, steps)(0, 0, rows, cols)  # (L*S, L + L*S) bool, materialised

    def run():
        q_flat, keys, values = dense_layout(q, k_text, v_text, k_own, v_own)
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)  # repeat_kv
        out = F.scaled_dot_product_attention(q_flat, keys, values, attn_mask=mask)
        return rearrange(out, "(b n) h (l s) d -> b n h l s d", n=q.shape[1], s=steps)

    return run


def provider_flex(q, k_text, v_text, k_own, v_own):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    length, steps = q.shape[3], q.shape[4]
    block_mask = create_block_mask(
        thought_mask_mod(length, steps), B=None, H=None, Q_LEN=length * steps, KV_LEN=length + length * steps,
        device=q.device,
    )
    compiled = torch.compile(flex_attention, dynamic=False)

    def run():
        q_flat, keys, values = dense_layout(q, k_text, v_text, k_own, v_own)
        out = compiled(q_flat, keys, values, block_mask=block_mask, enable_gqa=True)
        return rearrange(out, "(b n) h (l s) d -> b n h l s d", n=q.shape[1], s=steps)

    return run


def provider_sdpa_floor(q, k_text, v_text, k_own, v_own):
    q_heads = rearrange(q.detach(), "b n h l s d -> b (h n s) l d").requires_grad_()  # head j -> K/V head j // (G*N*S)

    def run():
        return F.scaled_dot_product_attention(q_heads, k_text, v_text, is_causal=True, enable_gqa=True)

    return run


# ---- measurement ----------------------------------------------------------------------------------------------------


def measure(fn, device, warmup=3, reps=20):
    """(p50, p20, p80) milliseconds."""
    if device.type == "cuda":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8]))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    quantiles = statistics.quantiles(times, n=10)
    return statistics.median(times), quantiles[1], quantiles[7]


def bench_one(provider, mode, inputs, device):
    """Time one provider and mode; returns (p50, p20, p80, peak_mb)."""
    run = globals()[f"provider_{provider}"](*inputs)
    out = run()
    grad = torch.randn_like(out)
    if mode == "fwd":
        fn = lambda: run()  # noqa: E731
    elif mode == "bwd":
        fn = lambda: out.backward(grad, retain_graph=True)  # noqa: E731
    else:
        fn = lambda: run().backward(grad)  # noqa: E731
    timings = measure(fn, device)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run().backward(grad) if mode != "fwd" else run()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    for tensor in inputs:
        tensor.grad = None
    return (*timings, peak)


def check_agreement(providers, inputs):
    """Before timing: every provider except the floor gives the reference's output (fp32 math tolerance)."""
    with torch.no_grad():
        reference = provider_torch_ref(*inputs)().float()
        for provider in providers:
            if provider in ("sdpa_floor", "torch_ref"):
                continue
            out = globals()[f"provider_{provider}"](*inputs)().float()
            error = (out - reference).abs().max().item()
            tolerance = 1e-4 if inputs[0].dtype == torch.float32 else 5e-2
            if error > tolerance:
                raise AssertionError(f"{provider} disagrees with the reference: max error {error:.3e}")


def git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    grid = parser.add_argument_group("grid")
    grid.add_argument("--lengths", default="256,512,1024,2048", help="text lengths L")
    grid.add_argument("--steps", default="8,16", help="chain steps Sq = Sk")
    grid.add_argument("--heads", default="32/8,9/3", help="Hq/Hkv pairs")
    grid.add_argument("--head-dims", default="64,128", help="head dims D")
    grid.add_argument("--thoughts", type=int, default=2, help="N thoughts per position")
    grid.add_argument("--batch", type=int, default=1)
    run = parser.add_argument_group("run")
    run.add_argument("--providers", default=",".join(PROVIDERS))
    run.add_argument("--modes", default=",".join(MODES))
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--dtype", default=None, help="bfloat16 (default on CUDA) | float16 | float32 (default on CPU)")
    run.add_argument("--quick", action="store_true", help="a tiny grid, for a smoke run")
    run.add_argument("--csv", default="benchmarks/results/bench_thought_attention.csv", help="output CSV path")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.heads, args.head_dims = "48", "4", "4/2", "16"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    providers = [p for p in args.providers.split(",") if p]
    if device.type != "cuda":
        providers = [p for p in providers if p != "flex"]  # FlexAttention has no CPU backward
        if os.environ.get("TRITON_INTERPRET") != "1":
            providers = [p for p in providers if p != "triton"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    commit, stamp = git_commit(), datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    grid = itertools.product(
        [int(x) for x in args.lengths.split(",")],
        [int(x) for x in args.steps.split(",")],
        [tuple(int(h) for h in pair.split("/")) for pair in args.heads.split(",")],
        [int(x) for x in args.head_dims.split(",")],
    )
    print(f"# device={device_name} dtype={dtype} commit={commit}")
    print(f"{'L':>5} {'S':>3} {'Hq/Hkv':>7} {'D':>4} {'provider':>11} {'mode':>8} {'ms':>9} {'TFLOP/s':>8} {'peak MB':>9}")
    for length, steps, (n_heads, n_kv_heads), head_dim in grid:
        inputs = make_inputs(args.batch, args.thoughts, n_heads, n_kv_heads, length, steps, head_dim, dtype, device)
        check_agreement(providers, inputs)
        for provider, mode in itertools.product(providers, args.modes.split(",")):
            try:
                p50, p20, p80, peak = bench_one(provider, mode, inputs, device)
                error = None
            except torch.cuda.OutOfMemoryError:
                p50 = p20 = p80 = peak = None
                error = "OOM"
                torch.cuda.empty_cache()
            flops = useful_flops(args.batch, args.thoughts, n_heads, length, steps, head_dim, mode)
            row = dict(
                provider=provider, mode=mode, L=length, S=steps, N=args.thoughts, Hq=n_heads, Hkv=n_kv_heads,
                D=head_dim, B=args.batch, dtype=str(dtype).removeprefix("torch."), ms_p50=p50, ms_p20=p20,
                ms_p80=p80, tflops=flops / (p50 * 1e-3) / 1e12 if p50 else None, peak_mb=peak, error=error,
                device=device_name, commit=commit, timestamp=stamp,
            )
            rows.append(row)
            fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
            print(
                f"{length:>5} {steps:>3} {n_heads:>3}/{n_kv_heads:<3} {head_dim:>4} {provider:>11} {mode:>8} "
                f"{fmt(p50, '9.3f')} {fmt(row['tflops'], '8.2f')} {fmt(peak, '9.1f')}" + (f"  {error}" if error else "")
            )
    csv_path = Path(args.csv)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w") as f:
        f.write(",".join(rows[0]) + "\n")
        for row in rows:
            f.write(",".join("" if v is None else str(v) for v in row.values()) + "\n")
    print(json.dumps({"benchmark": "thought_attention", "device": device_name, "commit": commit, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
