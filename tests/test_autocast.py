"""Low precision through the whole model: a training step under autocast (bf16, fp16) over fp32 weights, and with
bf16 weights, for the torch backend, the Triton backend (interpreter on CPU; on CUDA when there is a GPU) and, on
CPU, the cpu backend (torch's fused CPU attention kernel).

Under autocast, rotary embeddings hand back fp32 q/k while v is in the autocast dtype; the thought attention brings
them to one dtype. Rule, as for the kernels: with the fp32 step as the truth, a fused backend's step error is at
most twice the torch step's error in the same precision, plus a rounding-level allowance."""

import contextlib

import pytest
import torch

from conftest import make_model, random_text
from quietstar.attention import to_attention_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # benchmarks/gpu_check.sh runs this file on a GPU
ROUNDING = {torch.bfloat16: 2e-2, torch.float16: 2e-3}
FUSED = ["triton"] + (["cpu"] if DEVICE == "cpu" else [])  # the backends held to the rule against "torch"


def training_step(backend: str, autocast_dtype=None, weight_dtype=torch.float32, thought_ids=None):
    model, _ = make_model("qwen2", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0,
                          thought_attention_backend=backend)
    model.to(DEVICE, weight_dtype).train()
    ids = random_text(2, 7).to(DEVICE)
    context = torch.autocast(DEVICE, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    torch.manual_seed(0)
    with context:
        out = model(ids, labels=ids, thought_ids=thought_ids)
    out.loss.backward()
    grad = model.mixing_head.out.weight.grad
    return out, grad.float()


@pytest.fixture(scope="module")
def truth():
    """The fp32 step, and its thoughts, which every low-precision step re-scores (so thoughts do not differ)."""
    out, grad = training_step("torch")
    return out, grad


def within_rule(value, reference, truth, dtype):
    finite = torch.isfinite(truth)  # the masked marker tokens are -inf in every run
    assert torch.equal(finite, torch.isfinite(value)) and torch.equal(finite, torch.isfinite(reference))
    error, reference_error = (value - truth)[finite].abs().max(), (reference - truth)[finite].abs().max()
    return error <= 2 * reference_error + ROUNDING[dtype]


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_step_under_autocast_fused_matches_torch(truth, dtype, fused):
    truth_out, truth_grad = truth
    steps = {b: training_step(b, autocast_dtype=dtype, thought_ids=truth_out.thought_ids) for b in ("torch", fused)}
    (torch_out, torch_grad), (fused_out, fused_grad) = steps["torch"], steps[fused]
    for out, grad in steps.values():
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert within_rule(fused_out.loss.float(), torch_out.loss.float(), truth_out.loss, dtype)
    assert within_rule(fused_out.rewards.float(), torch_out.rewards.float(), truth_out.rewards, dtype)  # mixed log-probs
    assert within_rule(fused_grad, torch_grad, truth_grad, dtype)


@pytest.mark.parametrize("fused", FUSED)
def test_training_step_with_bf16_weights_fused_matches_torch(truth, fused):
    truth_out, truth_grad = truth
    steps = {b: training_step(b, weight_dtype=torch.bfloat16, thought_ids=truth_out.thought_ids) for b in ("torch", fused)}
    (torch_out, torch_grad), (fused_out, fused_grad) = steps["torch"], steps[fused]
    assert torch_out.loss.dtype == torch.float32  # the loss is reduced in fp32 whatever the weights
    assert within_rule(fused_out.loss, torch_out.loss, truth_out.loss, torch.bfloat16)
    assert within_rule(fused_grad, torch_grad, truth_grad, torch.bfloat16)


def test_attention_dtype_follows_autocast_else_promotes():
    q, k = torch.zeros(2, dtype=torch.float32, device=DEVICE), torch.zeros(2, dtype=torch.float32, device=DEVICE)
    v = torch.zeros(2, dtype=torch.bfloat16, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert {t.dtype for t in to_attention_dtype(q, k, v)} == {torch.bfloat16}
    assert {t.dtype for t in to_attention_dtype(q, k, v)} == {torch.float32}
