"""The fused Triton thought attention against its PyTorch reference, forward and all five gradients.

Runs on CUDA when available, else on CPU under TRITON_INTERPRET=1 (set in conftest). Error rule (as in
flash-attention's tests): with the reference computed from upcast inputs as the truth, the kernel's error must be at
most twice the error of the same reference run in the low precision, plus a rounding-level atol."""

import pytest
import torch

import quietstar
import triton_kernels
from quietstar.attention_backend import thought_attention_kernel
from quietstar import attention_cpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "dq", "dk_base", "dv_base", "dk_own", "dv_own")

SHAPES = {
    # name: (B, N, Hq, Hkv, L, Sq, Sk, D, step_offset, position_offset); L never a block multiple
    "teacher_forced_gqa_9_3": (1, 2, 9, 3, 21, 5, 5, 32, 0, 0),
    "streaming_step_offset": (2, 2, 4, 2, 29, 1, 4, 16, 3, 0),
    "odd_head_dim": (1, 1, 6, 2, 19, 3, 3, 24, 0, 0),
    "two_steps_mid_chain": (1, 2, 4, 4, 23, 2, 6, 16, 4, 0),
    "one_position": (1, 1, 2, 1, 1, 3, 3, 16, 0, 0),
    "window_gqa_9_3_from_position_19": (1, 2, 9, 3, 7, 5, 5, 32, 0, 19),  # text keys 26: past a 16-key tile boundary
    "window_streaming_one_position": (2, 2, 4, 2, 1, 1, 4, 16, 2, 37),
}


def run(fn, inputs, grad_out, step_offset, position_offset=0):
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fn(*inputs, scale=0.2, step_offset=step_offset, position_offset=position_offset)
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_kernel_error_within_twice_the_low_precision_reference_error(shape, dtype, grad_scale=1.0):
    batch, n, hq, hkv, length, sq, sk, d, step_offset, position_offset = SHAPES[shape]
    generator = torch.Generator().manual_seed(0)
    n_text = position_offset + length
    sizes = [(batch, n, hq, length, sq, d), (batch, hkv, n_text, d), (batch, hkv, n_text, d),
             (batch, n, hkv, length, sk, d), (batch, n, hkv, length, sk, d)]
    inputs = [torch.randn(size, generator=generator).to(DEVICE, dtype) for size in sizes]
    grad_out = torch.randn(sizes[0], generator=generator).to(DEVICE) * grad_scale

    truth_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    offsets = (step_offset, position_offset)
    truth = run(triton_kernels.thought_attention_ref, [t.to(truth_dtype) for t in inputs], grad_out, *offsets)
    low = run(triton_kernels.thought_attention_ref, inputs, grad_out, *offsets)
    kernel = run(triton_kernels.thought_attention, inputs, grad_out, *offsets)
    for name, t, lo, k in zip(NAMES, truth, low, kernel):
        assert k.dtype == dtype and k.shape == t.shape, name
        rounding = 2 * ((t.to(dtype) + 0.3 - 0.3).to(truth_dtype) - t).abs().max()
        low_error = (lo.to(truth_dtype) - t).abs().max()
        kernel_error = (k.to(truth_dtype) - t).abs().max()
        assert kernel_error <= 2 * low_error + rounding, (
            f"{name}: kernel error {kernel_error:.3e} > 2 x reference error {low_error:.3e} + {rounding:.3e}"
        )


@pytest.mark.kernel
@pytest.mark.parametrize("grad_scale", [1e-5, 2.0**10], ids=["tiny-grad", "loss-scaled-grad"])
def test_kernel_error_in_fp16_with_tiny_and_loss_scaled_gradients(grad_scale):
    """fp16, the incoming gradient REINFORCE-sized (1e-5) or lifted by a GradScaler-sized loss scale (2**10: the
    gradients stay below fp16's 65504, as GradScaler keeps them): the same 2x rule. The kernels take dO first and
    accumulate in fp32, so nothing is rounded to fp16 before the incoming gradient is in. (bf16 has fp32's range.)"""
    test_kernel_error_within_twice_the_low_precision_reference_error("teacher_forced_gqa_9_3", torch.float16, grad_scale)


REAL_SIZES = {
    # the paper's settings on a 7B-like layer: L = 2048 text positions, S = 16 chain steps, GQA 32/8, D = 128
    "paper_7b_layer": (1, 2, 32, 8, 2048, 16, 16, 128, 0, 0),
    "streaming_step": (1, 2, 32, 8, 2048, 1, 16, 128, 15, 0),
    "smollm2_layer": (2, 2, 9, 3, 1024, 16, 16, 64, 0, 0),
    "smollm2_answer_window": (4, 2, 9, 3, 64, 16, 16, 64, 0, 960),
}


@pytest.mark.kernel
@pytest.mark.skipif(DEVICE != "cuda", reason="real sizes: too slow for the interpreter; benchmarks/gpu_check.sh runs them")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", sorted(REAL_SIZES))
def test_kernel_at_real_sizes(shape, dtype, monkeypatch):
    monkeypatch.setitem(SHAPES, shape, REAL_SIZES[shape])
    test_kernel_error_within_twice_the_low_precision_reference_error(shape, dtype)


@pytest.mark.kernel
def test_strided_inputs_equal_contiguous_ones():
    """Strided views (as the model passes them) give the same result as contiguous copies."""
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 2, 11, 4, 8, generator=generator).transpose(1, 2)  # (B, N, Hq, L, S, D) view
    q = q[..., :2, :]  # Sq = 2 of 4 steps, non-contiguous
    k_text, v_text = torch.randn(2, 1, 11, 2, 8, generator=generator).transpose(2, 3).unbind(0)
    k_own, v_own = torch.randn(2, 1, 2, 2, 11, 6, 8, generator=generator)[..., :3, :].unbind(0)
    args = [t.to(DEVICE) for t in (q, k_text, v_text, k_own, v_own)]
    strided = triton_kernels.thought_attention(*args, step_offset=1)
    contiguous = triton_kernels.thought_attention(*[t.contiguous() for t in args], step_offset=1)
    torch.testing.assert_close(strided, contiguous)
    torch.testing.assert_close(strided, triton_kernels.thought_attention_ref(*args, step_offset=1), atol=1e-5, rtol=1e-5)


def test_backend_selection(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert thought_attention_kernel("auto", cpu) is attention_cpu.thought_attention_cpu
    assert thought_attention_kernel("torch", cpu) is quietstar.thought_attention
    assert thought_attention_kernel("auto", cuda) is triton_kernels.thought_attention
    assert thought_attention_kernel("triton", cpu) is triton_kernels.thought_attention
    monkeypatch.setenv("QUIETSTAR_THOUGHT_ATTENTION", "torch")
    assert thought_attention_kernel("triton", cuda) is quietstar.thought_attention
    monkeypatch.setenv("QUIETSTAR_THOUGHT_ATTENTION", "fast")
    with pytest.raises(ValueError, match="unknown thought attention backend 'fast'"):
        thought_attention_kernel("auto", cpu)


@pytest.mark.skipif(DEVICE == "cuda", reason="checks the CPU error path, which needs the interpreter off")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_kernels.thought_attention_module, "INTERPRET", False)
    x = torch.zeros(1, 1, 1, 2, 1, 16)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        triton_kernels.thought_attention(x, x[:, 0, :, :, 0], x[:, 0, :, :, 0], x, x)


def test_model_with_the_triton_backend_equals_the_torch_backend():
    """Through the registered HF attention (strided views, streaming buffers, GQA): same loss, logits, gradients."""
    from conftest import make_model, random_text

    results = []
    for backend in ("torch", "triton"):
        model, _ = make_model("qwen2", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0,
                              thought_attention_backend=backend)
        model.to(DEVICE).train()
        ids = random_text(2, 6).to(DEVICE)
        torch.manual_seed(0)
        out = model(ids, labels=ids)
        out.loss.backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (torch_out, torch_grads), (triton_out, triton_grads) = results
    assert torch.equal(torch_out.thought_ids, triton_out.thought_ids)
    for name in ("loss", "base_logits", "mixing_weights", "rewards"):
        torch.testing.assert_close(getattr(triton_out, name), getattr(torch_out, name), atol=1e-5, rtol=1e-5)
    assert torch_grads.keys() == triton_grads.keys()
    for name, grad in torch_grads.items():
        torch.testing.assert_close(triton_grads[name], grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
