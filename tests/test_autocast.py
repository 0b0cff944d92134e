"""Low precision through the whole model: a training step under autocast (bf16, fp16) over fp32 weights, and with
bf16 weights, for the torch backend, the Triton backend (interpreter on CPU; on CUDA when there is a GPU) and, on
CPU, the cpu backend (torch's fused CPU attention kernel).

Under autocast, rotary embeddings hand back fp32 q/k while v is in the autocast dtype; the thought attention brings
them to one dtype. Rule, as for the kernels: with the fp32 step as the truth, a fused backend's step error is at
most twice the torch step's error in the same precision, plus a rounding-level allowance. The same rule holds each
loss term's gradient (the policy term at policy_weight 1e6, and under a GradScaler-sized loss scale) from the
hand-written head backward against plain autograd, with the float64 step as the truth."""

import contextlib

import pytest
import torch

from conftest import make_model, random_text
from quietstar.attention import to_attention_dtype
from quietstar.output_head import HeadLogProbs, TensorLogProbs, token_log_probs

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


LOSS_TERMS = {  # each term of the loss alone; the policy term at the paper's policy_weight
    "base": dict(base_loss_weight=1.0, mixed_loss_weight=0.0, policy_weight=0.0),
    "mixed": dict(base_loss_weight=0.0, mixed_loss_weight=1.0, policy_weight=0.0),
    "policy": dict(base_loss_weight=0.0, mixed_loss_weight=0.0, policy_weight=1e6),
}


def plain_weighted_sum(self, coefficients):
    """HeadLogProbs.weighted_sum through plain autograd (per-token chunks recomputed in backward): the same forward
    values, the gradient formed by autograd, which applies the incoming gradient before any half-precision rounding."""
    log_probs = token_log_probs(self.head, self.hidden, self.targets, temperature=self.temperature,
                                banned_ids=self.banned_ids, chunk_rows=self.chunk_rows)
    return TensorLogProbs(log_probs).weighted_sum(coefficients)


def term_gradient(term, weight_dtype, autocast_dtype=None, loss_scale=1.0):
    """All parameter gradients (flat, float64) of one loss term, the loss multiplied by `loss_scale` (GradScaler's
    scale) and the gradients divided by it, as GradScaler's unscale_ does. Fixed thoughts: every run scores the same.
    L = 32, so that REINFORCE's coefficients advantage / (count * T) are small enough to underflow fp16 as at real
    sizes (at L = 9 they did not, even before the head fix)."""
    model, _ = make_model("llama", thought_length=3, n_thoughts=2, lookahead=3, clip_advantage=False,
                          thought_attention_backend="torch", **LOSS_TERMS[term])
    model.to(DEVICE, weight_dtype).train()
    ids = random_text(2, 32).to(DEVICE)
    thought_ids = random_text(2 * 2 * 32, 3, seed=1).reshape(2, 2, 32, 3).to(DEVICE)
    with torch.autocast(DEVICE, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(ids, labels=ids, thought_ids=thought_ids).loss
    (loss * loss_scale).backward()
    return torch.cat([p.grad.double().flatten() / loss_scale for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("scaling", ["policy-weight", "grad-scaler"])
@pytest.mark.parametrize("term", sorted(LOSS_TERMS))
@pytest.mark.parametrize("precision", ["fp16-autocast", "fp16-weights", "bf16-autocast"])
def test_each_loss_term_gradient_in_half_precision_within_twice_plain_autograds_error(precision, term, scaling,
                                                                                       monkeypatch):
    """Every loss term's gradient, whole model, against the float64 step: the hand-written head backward's error is
    within 2x of plain autograd's in the same precision (+ one rounding step of the largest entry). "grad-scaler":
    a GradScaler-sized loss scale (2**16) with policy_weight 1 (1e6 x 2**16 overflows fp16 in any backward; GradScaler
    would skip that step). The policy term's gradient used to underflow under fp16 autocast (64% error) and be inf
    with fp16 weights."""
    half = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    if scaling == "grad-scaler":
        monkeypatch.setitem(LOSS_TERMS, "policy", {**LOSS_TERMS["policy"], "policy_weight": 1.0})
    autocast = precision.endswith("autocast")
    low = dict(weight_dtype=torch.float32 if autocast else half, autocast_dtype=half if autocast else None,
               loss_scale=2.0**16 if scaling == "grad-scaler" else 1.0)
    truth = term_gradient(term, torch.float64)
    ours = term_gradient(term, **low)
    monkeypatch.setattr(HeadLogProbs, "weighted_sum", plain_weighted_sum)
    plain = term_gradient(term, **low)
    assert torch.isfinite(ours).all() and ours.abs().max() > 0
    error, plain_error = (ours - truth).abs().max(), (plain - truth).abs().max()
    one_ulp = torch.finfo(half).eps * truth.abs().max()
    assert error <= 2 * plain_error + one_ulp, f"error {error:.3g}, plain autograd's {plain_error:.3g}"
