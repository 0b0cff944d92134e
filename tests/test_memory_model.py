"""The memory model (benchmarks/memory_model.py) against measured live-tensor bytes of a real training step, and the
step's largest tensor against the plain model's logits (B, L, V)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model as mm  # noqa: E402

TINY = mm.BaseShape("llama-64x2", 64, 172, 2, 4, 2, 16384, tied=False)  # the V = 16384


def test_live_tensor_bytes_follow_storage_lifetimes():
    tracker = mm.LiveTensorBytes()
    with tracker:
        a = torch.zeros(1000)  # 4000 B
        view = a[:10]
        b = torch.ones(500)  # 2000 B
        del a  # the view keeps the storage alive
        c = torch.ones(250)  # 1000 B
        del view, b, c
    assert tracker.peak == 7000 and tracker.largest == 4000 and tracker.live == 0


@pytest.mark.parametrize("attention", ["torch", "cpu"])
@pytest.mark.parametrize("thought_length", [4, 12])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_predicted_step_memory_within_25_percent_and_no_tensor_above_4x_the_logits(thought_length, checkpointing, attention):
    step = mm.StepShape(2, 24, thought_length=thought_length, activation_bytes=4, checkpointing=checkpointing,
                        attention=attention)
    measured, predicted = mm.measure(TINY, step), mm.predict(TINY, step)
    assert 0.75 <= predicted["step"] / measured["step"] <= 1.25, (predicted, measured)
    assert measured["largest"] <= 4 * measured["text_logits"]


def test_paper_shapes_have_their_published_sizes():
    sizes = {name: shape.parameters / 1e9 for name, shape in mm.SHAPES.items()}
    assert sizes["SmolLM2-135M"] == pytest.approx(0.135, rel=0.05)
    assert sizes["Qwen2.5-0.5B"] == pytest.approx(0.494, rel=0.05)
    assert sizes["Qwen2.5-1.5B"] == pytest.approx(1.54, rel=0.05)
    assert sizes["Mistral-7B"] == pytest.approx(7.24, rel=0.05)
