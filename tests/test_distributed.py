"""`quietstar train` under torchrun: 2 CPU processes (DDP, gloo) give the losses of 1 process with the same global
batch. Thoughts are greedy here (thought_temperature 0) so both runs think the same thoughts; the data is exactly
one global batch of 4 windows, so every step sees the same 4 windows however they are split between processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from quietstar.train import train
from quietstar.train_config import load_train_config
from test_train import text_file, tiny_base  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]


def overrides(tiny_base, corpus, output_dir, per_device_batch):
    return {
        "base": str(tiny_base),
        "data.path": str(corpus),
        "data.window": 16,
        "data.eval_windows": 0,
        "quietstar.thought_length": 2,
        "quietstar.lookahead": 2,
        "quietstar.thought_temperature": 0,
        "training.output_dir": str(output_dir),
        "training.max_steps": 3,
        "training.per_device_train_batch_size": per_device_batch,
        "training.learning_rate": 1e-3,
        "training.lr_scheduler_type": "constant",
        "training.logging_steps": 1,
        "training.eval_strategy": "no",
        "training.save_strategy": "no",
        "controls": False,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_ddp_matches_one_process(tiny_base, tmp_path):  # noqa: F811
    corpus = tmp_path / "one_batch.txt"
    corpus.write_text(" ".join(f"w{i % 23}" for i in range(70)))  # 70 words + EOS = 71 tokens -> 4 windows of 16

    single = train(load_train_config(None, overrides(tiny_base, corpus, tmp_path / "single", per_device_batch=4)))
    single_losses = [entry["loss"] for entry in single.log_history if "loss" in entry]

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "quietstar.cli", "train",
    ]
    for key, value in overrides(tiny_base, corpus, tmp_path / "ddp", per_device_batch=2).items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    logs = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    ddp_losses = [entry["loss"] for entry in logs if "loss" in entry]
    assert len(single_losses) == 3 and len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, abs=1e-4)
    assert single_losses[-1] < single_losses[0]  # the runs really train, so later steps test the averaged update


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_process_recipe_stage_matches_one_process(tmp_path):
    """A recipe's thinking stage (multihop, from its own from-scratch model) under torchrun (gloo): the same losses as
    one process with the same global batch, within 1e-5. Accelerate hands each process its own per-device batches
    of the one sampled order, so the global batch holds the same examples either way."""
    stage = (
        "[{name: thinking, data: direct, training: {max_steps: 3, per_device_train_batch_size: %d, learning_rate: 1.0e-3, "
        "lr_scheduler_type: constant, logging_steps: 1, eval_strategy: 'no', save_strategy: 'no'}}]"
    )
    common = ["--controls", "false", "--quietstar.thought_temperature", "0", "--quietstar.policy_weight", "0"]

    def losses(output_dir: Path) -> list[float]:
        logs = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
        return [entry["loss"] for entry in logs if "loss" in entry]

    from quietstar.cli import main

    assert main(["train", "multihop", "--output-dir", str(tmp_path / "single"), "--stages", stage % 4, *common]) == 0
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        "-m", "quietstar.cli", "train", "multihop", "--output-dir", str(tmp_path / "ddp"), "--stages", stage % 2, *common,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == 3 and ddp == pytest.approx(single, abs=1e-5)
    # the same trained weights: the averaged update is the single process's (and the updates are not zero)
    from safetensors.torch import load_file

    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("single", "ddp")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-5)
    logs = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert all(entry["grad_norm"] > 0 and entry["learning_rate"] > 0 for entry in logs if "loss" in entry)
