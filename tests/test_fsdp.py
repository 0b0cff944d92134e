"""FSDP through torch's own engine: FSDP2 (`fully_shard`) over 2 CPU processes (gloo). Each rank holds about half of
the parameters, and the loss and the (all-gathered) gradients equal those of 1 process on the same global batch.
Thoughts are greedy (thought_temperature 0), so both runs think the same thoughts."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_model, random_text

TESTS = Path(__file__).resolve().parent
MODEL = dict(thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0, thought_temperature=0.0)
CHECKED = ("mixing_head.out.weight", "thought_markers.weight", "model.model.layers.0.self_attn.q_proj.weight")

WORKER = r"""
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
sys.path.insert(0, sys.argv[1])
from conftest import make_model, random_text
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
model, _ = make_model("llama", **json.loads(sys.argv[2]))
total = sum(p.numel() for p in model.parameters())
for layer in model.model.get_decoder().layers:
    fully_shard(layer)
fully_shard(model)
local = sum(p.to_local().numel() for p in model.parameters())
ids = random_text(4, 10)
mine = ids[rank * 2 : (rank + 1) * 2]
out = model.train()(mine, labels=mine)
out.loss.backward()
loss = out.loss.detach().clone()
dist.all_reduce(loss)
grads = {n: p.grad.full_tensor().tolist() for n, p in model.named_parameters() if n in json.loads(sys.argv[3])}
# One file per rank: two processes printing to one pipe can interleave their lines.
with open(f"rank{rank}.json", "w") as f:
    json.dump(dict(loss=loss.item() / world, grads=grads, local=local, total=total), f)
dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_fsdp2_on_two_cpu_processes_shards_and_matches_one_process(tmp_path):
    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(worker), str(TESTS), json.dumps(MODEL), json.dumps(CHECKED)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for rank in ranks:  # each rank holds about half of the parameters
        assert 0.45 < rank["local"] / rank["total"] < 0.55
    sharded = ranks[0]

    model, _ = make_model("llama", **MODEL)
    ids = random_text(4, 10)
    out = model.train()(ids, labels=ids)
    out.loss.backward()
    assert sharded["loss"] == pytest.approx(out.loss.item(), abs=1e-5)
    gradients = dict(model.named_parameters())
    for name in CHECKED:
        torch.testing.assert_close(torch.tensor(sharded["grads"][name]), gradients[name].grad, atol=1e-5, rtol=1e-4)
