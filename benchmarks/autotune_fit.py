"""Every autotune config of the Triton thought-attention kernels, compiled ahead of time for A100 (sm_80) and H100
(sm_90) without a GPU: shared memory against the per-block limit, registers and spill bytes from ptxas -v.

    python benchmarks/autotune_fit.py                        # the full sweep: every kept config, bf16/fp16/fp32, D 64/128
    python benchmarks/autotune_fit.py --sample               # the largest kept config per kernel, dtype, head dim
    python benchmarks/autotune_fit.py --kernels fwd --dtypes bf16 --head-dims 128 --archs 90 --csv out.csv
    python benchmarks/autotune_fit.py --summary out.csv ...   # the markdown table of RESULTS.md
    python benchmarks/autotune_fit.py --write-table triton_kernels/tiles_without_spills.json all.csv ...

Compiles with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` down to cubin; triton runs the
bundled ptxas with -v (the legacy `ptxas` for sm_80, `ptxas-blackwell` for sm_90: the legacy one refuses the PTX
version triton emits for sm_90) and its log is read back (knobs.nvidia.dump_ptxas_log). The configs are the
kernels' own autotune spaces (FWD_SPACE, BWD_SPACE: the GPU build's, not the one pinned config tests run under)
after the kernels' own pruning (`_kept_configs`); `--unpruned` compiles the whole space. The sweeps' CSVs in
benchmarks/runs/autotune (bf16: the whole space; fp16, fp32: the kept configs) are the source of
triton_kernels/tiles_without_spills.json (`--write-table`). Each (kernel, arch, dtype, head dim) compiles in its own process (the parent may run Triton in
interpreter mode; triton's cache is bypassed, or ptxas and its log would be skipped), `--jobs` of them at a time.
Prints one line per config and a JSON summary last; `--csv` writes every row.
"""

import argparse
import concurrent.futures
import csv
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = {"fwd": "_thought_attn_fwd", "bwd_dq": "_thought_attn_bwd_dq", "bwd_dkdv_text": "_thought_attn_bwd_dkdv_text",
           "bwd_dkdv_own": "_thought_attn_bwd_dkdv_own"}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
# Shared memory a block may use (the opt-in maximum): A100 163 KiB, H100 227 KiB (CUDA programming guide,
# compute capabilities table); the tests' and the prune rule's source for these numbers.
SMEM_LIMIT = {80: 166_912, 90: 232_448}
FIELDS = ["kernel", "arch", "dtype", "head_dim", "block_m", "block_n", "stages", "warps", "shared", "smem_limit",
          "fits", "registers", "spill_stores", "spill_loads", "kept", "fallback", "compile_s", "error"]

COMPILE = r"""
import contextlib, io, json, re, sys, time
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton_kernels import thought_attention_module as kernels

name, arch, pointer, head_dim, tiles = json.loads(sys.argv[1])
fn = getattr(kernels, name).fn  # the jit function under the autotuner
pointers = {"Q", "K_TEXT", "V_TEXT", "K_OWN", "V_OWN", "O", "DO", "DQ", "DK", "DV"}
knobs.nvidia.dump_ptxas_log = True  # triton runs ptxas -v; its log is printed, read back here
knobs.compilation.always_compile = True  # a cached kernel would skip ptxas, and its log
for block_m, block_n, stages, warps in tiles:
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=False,
                      PRECISION="ieee" if pointer == "*fp32" else "tf32")
    signature = {arg: "constexpr" if arg in constexprs else "*fp32" if arg in ("LSE", "DELTA")
                 else pointer if arg in pointers else "fp32" if arg == "sm_scale" else "i32" for arg in fn.arg_names}
    log, start, row = io.StringIO(), time.time(), {}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
        text = log.getvalue()
        number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else None
        row = dict(shared=compiled.metadata.shared, registers=number(r"Used (\d+) registers"),
                   spill_stores=number(r"(\d+) bytes spill stores"), spill_loads=number(r"(\d+) bytes spill loads"))
    except Exception as error:  # out of resources at compile time: a config that does not fit
        row = dict(error=f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}")
    print(json.dumps(dict(row, compile_s=round(time.time() - start, 1))), flush=True)
"""


def compile_group(group):
    """The configs of one (kernel, arch, dtype, head dim) in one process (imports once) -> result rows."""
    key, arch, dtype, head_dim = group[0][:4]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    tiles = [job[4:8] for job in group]
    args = json.dumps([KERNELS[key], arch, DTYPES[dtype], head_dim, tiles])
    result = subprocess.run([sys.executable, "-c", COMPILE, args], env=env, capture_output=True, text=True, timeout=3600)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or len(lines) != len(group):
        raise RuntimeError(f"compiling {key} sm_{arch} {dtype} D={head_dim} failed:\n{result.stderr[-3000:]}")
    rows = []
    for job, measured in zip(group, lines):
        _, _, _, _, block_m, block_n, stages, warps, kept, fallback = job
        row = dict(kernel=key, arch=arch, dtype=dtype, head_dim=head_dim, block_m=block_m, block_n=block_n,
                   stages=stages, warps=warps, smem_limit=SMEM_LIMIT[arch], kept=kept, fallback=fallback, error="")
        row.update(measured)
        row["fits"] = "shared" in row and row["shared"] <= SMEM_LIMIT[arch]
        rows.append(row)
    return rows


def jobs(kernels, archs, dtypes, head_dims, sample, unpruned):
    """The configs the autotuner would be given on the GPU build, after the kernels' pruning (unless `unpruned`),
    grouped by (kernel, arch, dtype, head dim)."""
    sys.path.insert(0, ROOT)
    os.environ.pop("TRITON_INTERPRET", None)
    from triton_kernels import thought_attention_module as kernels_module

    for key in kernels:
        configs = kernels_module.FWD_SPACE if key == "fwd" else kernels_module.BWD_SPACE
        for arch in archs:
            for dtype in dtypes:
                for head_dim in head_dims:
                    listed = []
                    kept_configs = kernels_module._kept_configs(configs, key, head_dim, 4 if dtype == "fp32" else 2, arch)
                    # no config fits (fp32, large heads): the kernels fall back to the one with the fewest registers
                    fallback = not kernels_module._keep_tile(kept_configs[0], key, head_dim, 4 if dtype == "fp32" else 2, arch)
                    for config in configs:
                        kept = config in kept_configs
                        if kept or unpruned:
                            m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
                            listed.append((key, arch, dtype, head_dim, m, n, config.num_stages, config.num_warps, kept,
                                           kept and fallback))
                    if listed:
                        yield listed[-1:] if sample else listed  # the last: the largest tiles, stages, warps


def summary(paths) -> str:
    """A markdown table of sweep CSVs, one line per (kernel, arch, dtype, head dim): configs compiled, kept by the
    pruning, how many of each kind spill, the kept configs' largest shared memory (against the limit) and registers."""
    groups = {}
    for path in paths:
        with open(path) as f:
            for row in csv.DictReader(f):
                key = (row["kernel"], int(row["arch"]), row["dtype"], int(row["head_dim"]))
                groups.setdefault(key, []).append(row)
    kept_by_rule = {}  # "kept" as the committed pruning decides now (a calibration sweep ran with --unpruned)
    for group in jobs(KERNELS, SMEM_LIMIT, DTYPES, sorted({key[3] for key in groups}), sample=False, unpruned=True):
        for job in group:
            kept_by_rule[tuple(map(str, job[:8]))] = job[8:]
    for (kernel, arch, dtype, head_dim), rows in groups.items():
        for row in rows:
            key = tuple(row[k] for k in ("kernel", "arch", "dtype", "head_dim", "block_m", "block_n", "stages", "warps"))
            row["kept"], row["fallback"] = map(str, kept_by_rule[key])
    lines = ["| kernel | sm | dtype | D | compiled | kept | kept spilling | pruned spilling / pruned | kept: max shared B (limit) | kept: registers | errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (kernel, arch, dtype, head_dim), rows in sorted(groups.items()):
        kept = [r for r in rows if r["kept"] == "True"]
        pruned = [r for r in rows if r["kept"] != "True"]
        spills = lambda rs: sum(int(r["spill_stores"] or 0) > 0 for r in rs)
        registers = sorted(int(r["registers"]) for r in kept if r["registers"])
        fallback = " (fallback: none fits)" if any(r["fallback"] == "True" for r in kept) else ""
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {head_dim} | {len(rows)} | {len(kept)}{fallback} | {spills(kept)} | "
            f"{spills(pruned)} / {len(pruned)} | {max((int(r['shared']) for r in kept if r['shared']), default='-')} "
            f"({rows[0]['smem_limit']}) | {registers[0] if registers else '-'}-{registers[-1] if registers else '-'} | "
            f"{sum(bool(r['error']) for r in rows)} |"
        )
    return "\n".join(lines)


def write_table(path, paths) -> dict:
    """triton_kernels/tiles_without_spills.json from sweep CSVs: per kernel, sm, element bytes and head dim, the
    configs that compiled, fit in shared memory and did not spill (in every dtype of that element size measured)."""
    measured, bad = {}, set()
    for csv_path in paths:
        with open(csv_path) as f:
            for row in csv.DictReader(f):
                key = (row["kernel"], row["arch"], "4" if row["dtype"] == "fp32" else "2", row["head_dim"])
                tile = f"{row['block_m']}x{row['block_n']}/{row['stages']}/{row['warps']}"
                if row["registers"] in ("", None):  # not measured (error, or no ptxas log)
                    continue
                measured.setdefault(key, set()).add(tile)
                if row["fits"] != "True" or int(row["spill_stores"]) or int(row["spill_loads"]):
                    bad.add((key, tile))
    table = {}
    for key, tiles in sorted(measured.items()):
        kernel, arch, element_bytes, head_dim = key
        good = sorted((t for t in tiles if (key, t) not in bad), key=lambda t: [int(x) for x in t.replace("x", "/").split("/")])
        table.setdefault(kernel, {}).setdefault(arch, {}).setdefault(element_bytes, {})[head_dim] = good
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", default=",".join(KERNELS))
    parser.add_argument("--archs", default="80,90")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--sample", action="store_true", help="only the largest kept config of each combination")
    parser.add_argument("--unpruned", action="store_true", help="every config of the space, kept or not")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--csv")
    parser.add_argument("--summary", nargs="+", metavar="CSV", help="print the markdown table of earlier sweeps, compile nothing")
    parser.add_argument("--write-table", nargs="+", metavar=("JSON", "CSV"),
                        help="write the kernels' table of configs without spills from sweep CSVs, compile nothing")
    args = parser.parse_args(argv)
    if args.write_table:
        write_table(args.write_table[0], args.write_table[1:])
        return []
    if args.summary:
        print(summary(args.summary))
        return []
    groups = list(jobs(args.kernels.split(","), [int(a) for a in args.archs.split(",")], args.dtypes.split(","),
                     [int(d) for d in args.head_dims.split(",")], args.sample, args.unpruned))
    print(f"# {sum(map(len, groups))} configs in {len(groups)} groups, {args.jobs} groups at a time", flush=True)
    start, rows = time.time(), []
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = csv.DictWriter(out, FIELDS) if out else None
    if writer:
        writer.writeheader()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        for group_rows in pool.map(compile_group, groups):  # rows written as they come (a long sweep may be cut)
            for row in group_rows:
                rows.append(row)
                print(" ".join(f"{k}={row.get(k)}" for k in FIELDS if row.get(k) not in (None, "")), flush=True)
                if writer:
                    writer.writerow(row)
            if out:
                out.flush()
    if out:
        out.close()
    bad = [r for r in rows if r["kept"] and (not r["fits"] or (r.get("spill_stores") and not r["fallback"]))]
    print(json.dumps(dict(configs=len(rows), kept=sum(r["kept"] for r in rows), kept_but_misfit_or_spilling=len(bad),
                          errors=sum(bool(r["error"]) for r in rows), seconds=round(time.time() - start))))
    return rows


if __name__ == "__main__":
    main()
