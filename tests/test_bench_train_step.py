"""The training-step benchmark measures both cases on a tiny random llama (in-process; the script spawns)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_train_step as bench  # noqa: E402


def test_measure_times_both_cases():
    args = bench.parse_args(["--hidden", "64", "--layers", "1", "--length", "8", "--thought-length", "2",
                             "--lookahead", "2", "--repeats", "2"])
    for case in ("quietstar", "plain"):
        result = bench.measure(case, args, "cpu")
        assert result["case"] == case and len(result["times_s"]) == 2
        assert all(t > 0 for t in result["times_s"]) and result["median_s"] == sum(result["times_s"]) / 2
        assert result["peak_mib"] >= 0
