"""The fused kernels compile for real GPUs (Hopper sm_90, Ampere sm_80) on this machine, no GPU needed, and every
autotune config the kernels' pruning keeps fits: shared memory within the block limit, no register spills.

The CPU interpreter runs the kernels' Python semantics; it accepts code the Triton compiler rejects. Compiling ahead
of time for explicit targets (down to cubin, with the ptxas bundled in the triton wheel, `-v` for registers and
spills) catches those errors, and tiles the autotuner should never try, where CI has no GPU. The compiles run in
subprocesses (benchmarks/autotune_fit.py), because the test session itself runs Triton in interpreter mode.

Default run: a sample, the largest kept config of each kernel in three (arch, dtype, head dim) combinations (90 s on
2 cores). `-m slow`: every kept config, bf16/fp16/fp32, head dims 64 and 128, sm_80 and sm_90 (307 compiles, 11 min on
2 cores; benchmarks/gpu_check.sh runs it first). A config with register spills is allowed only as the fallback where
no config of the space fits (fp32 at D=128)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import autotune_fit  # noqa: E402

pytestmark = pytest.mark.kernel

SAMPLE = [(90, "bf16", 128), (90, "fp32", 64), (80, "fp16", 64)]


def assert_every_config_fits(rows):
    assert rows and not [r for r in rows if r["error"]], [r["error"] for r in rows if r["error"]][:3]
    for row in rows:
        where = f"{row['kernel']} sm_{row['arch']} {row['dtype']} D={row['head_dim']} {row['block_m']}x{row['block_n']}"
        where += f" stages={row['stages']} warps={row['warps']}"
        assert row["shared"] <= row["smem_limit"], f"{where}: {row['shared']} B shared > {row['smem_limit']}"
        if row["fallback"]:  # no config of the space fits (fp32 at D=128): the one with the fewest registers runs
            continue
        assert row["registers"] <= 255 and row["spill_stores"] == 0 and row["spill_loads"] == 0, (
            f"{where}: {row['registers']} registers, {row['spill_stores']} B spill stores: prune it (REGISTER_BUDGET)"
        )


def test_a_sample_of_the_kept_configs_compiles_for_hopper_and_ampere_and_fits():
    rows = []
    for arch, dtype, head_dim in SAMPLE:
        rows += autotune_fit.main(["--archs", str(arch), "--dtypes", dtype, "--head-dims", str(head_dim), "--sample"])
    assert len(rows) == 4 * len(SAMPLE)
    assert_every_config_fits(rows)


@pytest.mark.slow
def test_every_kept_config_compiles_for_hopper_and_ampere_and_fits():
    assert_every_config_fits(autotune_fit.main([]))
