"""The CPU thought attention (attention_cpu.py: torch's fused CPU attention kernel for the text part, merged by
log-sum-exp with the own chain) against the PyTorch reference: fp64 to 1e-10, forward and backward, on odd shapes
(GQA, lengths that are not block multiples, streaming offsets, strided inputs); bf16 and fp16 error within 2x of
the reference's own error in the same precision against the fp64 truth, for tiny, unit and loss-scaled gradients."""

import pytest
import torch

from quietstar.attention import thought_attention
from quietstar.attention_cpu import cpu_kernel_available, thought_attention_cpu
from test_thought_attention import CASES, case_inputs, random_inputs

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="this torch lacks the fused CPU attention kernel")

CPU_CASES = {  # past the reference's 64-position block; a window of 66 positions after 5 that do not think
    **CASES, "gqa_3_over_1_long_L_70": (2, 2, 3, 1, 70, 9, 9, 24, 0, 0), "window_66_from_5": (1, 2, 3, 1, 66, 4, 4, 8, 0, 5)
}


@pytest.mark.parametrize("case", sorted(CPU_CASES))
def test_matches_the_reference_forward_and_backward_in_float64(case):
    inputs, step_offset, position_offset = case_inputs(case, CPU_CASES)
    out = thought_attention_cpu(*inputs, scale=0.3, step_offset=step_offset, position_offset=position_offset)
    expected = thought_attention(*inputs, scale=0.3, step_offset=step_offset, position_offset=position_offset)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, got, want in zip(("q", "k_base", "v_base", "k_own", "v_own"), grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_strided_inputs_equal_contiguous_ones():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 4, 11, 4, 8, generator=generator)[..., :2, :]  # Sq = 2 of 4 steps
    k_text, v_text = torch.randn(2, 1, 11, 2, 8, generator=generator).transpose(2, 3).unbind(0)
    k_own, v_own = torch.randn(2, 1, 2, 2, 11, 6, 8, generator=generator)[..., :3, :].unbind(0)
    args = (q, k_text, v_text, k_own, v_own)
    strided = thought_attention_cpu(*args, step_offset=1)
    torch.testing.assert_close(strided, thought_attention_cpu(*[t.contiguous() for t in args], step_offset=1))
    torch.testing.assert_close(strided, thought_attention(*args, step_offset=1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad_scale", [1e-5, 1.0, 2.0**10], ids=["tiny-grad", "unit-grad", "loss-scaled-grad"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["teacher_forced_gqa_9_3_odd_L", "gqa_3_over_1_long_L_70", "window_66_from_5"])
def test_half_precision_error_within_twice_the_references(case, dtype, grad_scale):
    """bf16 and fp16 inputs, the incoming gradient tiny (REINFORCE-sized), unit, or lifted by a GradScaler-sized loss
    scale (2**10: its gradients stay below fp16's 65504, as GradScaler keeps them): every output's error against
    the fp64 truth is within 2x of the reference's in the same precision
    (+ 1e-3 of the largest true entry: rounding level)."""
    truth_inputs, step_offset, position_offset = case_inputs(case, CPU_CASES)
    offsets = dict(step_offset=step_offset, position_offset=position_offset)
    low = [t.detach().to(dtype).requires_grad_() for t in truth_inputs]
    truth = thought_attention(*truth_inputs, **offsets)
    grad_out = torch.randn_like(truth) * grad_scale
    truth_grads = torch.autograd.grad(truth, truth_inputs, grad_out)
    errors = {}
    for name, function in (("cpu", thought_attention_cpu), ("reference", thought_attention)):
        out = function(*low, **offsets)
        assert out.dtype == dtype
        grads = torch.autograd.grad(out, low, grad_out.to(dtype))
        errors[name] = [(out.double() - truth).abs().max()] + [
            (g.double() - t).abs().max() for g, t in zip(grads, truth_grads)
        ]
    largest = [truth.abs().max()] + [t.abs().max() for t in truth_grads]
    for cpu_error, reference_error, size in zip(errors["cpu"], errors["reference"], largest):
        assert torch.isfinite(cpu_error) and cpu_error <= 2 * reference_error + 1e-3 * size


def test_cuda_tensors_are_refused_with_a_pointer_to_auto():
    inputs = [t.detach().to("meta") for t in random_inputs(1, 1, 2, 1, 3, 2, 2, 8)]
    with pytest.raises(ValueError, match="needs CPU tensors.*'auto' backend"):
        thought_attention_cpu(*inputs)
