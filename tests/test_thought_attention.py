"""`quietstar.thought_attention` equals plain attention with an explicit dense mask over [text keys | all chain keys]."""

import pytest
import torch

import quietstar
import quietstar.attention


def dense_mask_attention(q, k_base, v_base, k_own, v_own, scale, step_offset, position_offset=0):
    """Naive oracle: per (batch, thought) flatten the queries (L*Sq) and keys (P + L + L*Sk), build the boolean mask
    entry by entry from the rule, repeat K/V for GQA, softmax."""
    batch, n_thoughts, n_heads, length, n_steps, head_dim = q.shape
    n_own, n_text = k_own.shape[4], k_base.shape[2]
    groups = n_heads // k_base.shape[1]
    mask = torch.zeros(length * n_steps, n_text + length * n_own, dtype=torch.bool)
    for i in range(length):
        for s in range(n_steps):
            row = i * n_steps + s
            mask[row, : position_offset + i + 1] = True  # text keys j <= P + i
            for t in range(n_own):
                mask[row, n_text + i * n_own + t] = t <= step_offset + s  # own chain, earlier steps
    out = torch.empty_like(q)
    for b in range(batch):
        for n in range(n_thoughts):
            keys = torch.cat([k_base[b], k_own[b, n].flatten(1, 2)], dim=1).repeat_interleave(groups, dim=0)
            values = torch.cat([v_base[b], v_own[b, n].flatten(1, 2)], dim=1).repeat_interleave(groups, dim=0)
            scores = q[b, n].flatten(1, 2) @ keys.transpose(1, 2) * scale
            probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
            out[b, n] = (probs @ values).unflatten(1, (length, n_steps))
    return out


def random_inputs(
    batch, n_thoughts, n_heads, n_kv_heads, length, n_steps, n_own, head_dim, dtype=torch.float64, position_offset=0
):
    q = torch.randn(batch, n_thoughts, n_heads, length, n_steps, head_dim, dtype=dtype)
    k_base, v_base = torch.randn(2, batch, n_kv_heads, position_offset + length, head_dim, dtype=dtype)
    k_own, v_own = torch.randn(2, batch, n_thoughts, n_kv_heads, length, n_own, head_dim, dtype=dtype)
    return [t.requires_grad_() for t in (q, k_base, v_base, k_own, v_own)]


CASES = {
    # name: (B, N, Hq, Hkv, L, Sq, Sk, D, step_offset, position_offset)
    "teacher_forced_gqa_9_3_odd_L": (2, 2, 9, 3, 13, 5, 5, 8, 0, 0),
    "streaming_one_step_offset": (1, 3, 4, 2, 11, 1, 4, 16, 3, 0),
    "streaming_first_step": (2, 1, 4, 4, 7, 1, 1, 8, 0, 0),
    "two_steps_mid_chain": (1, 2, 6, 2, 9, 2, 6, 8, 4, 0),
    "window_gqa_9_3_from_position_6": (2, 2, 9, 3, 5, 5, 5, 8, 0, 6),  # only positions 6 .. 10 think
    "window_streaming_one_position": (1, 2, 4, 2, 1, 1, 4, 16, 2, 9),
}


def case_inputs(case: str, cases: dict = CASES, dtype=torch.float64) -> tuple[list, int, int]:
    """Random inputs of a case, its step_offset and its position_offset."""
    *shape, step_offset, position_offset = cases[case]
    return random_inputs(*shape, dtype=dtype, position_offset=position_offset), step_offset, position_offset


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("position_block", [128, 4])  # one block, and several (checkpointed) blocks
def test_matches_dense_mask_attention_forward_and_backward(case, position_block, monkeypatch):
    monkeypatch.setattr(quietstar.attention, "POSITION_BLOCK", position_block)
    inputs, step_offset, position_offset = case_inputs(case)
    scale = 0.3
    out = quietstar.thought_attention(*inputs, scale=scale, step_offset=step_offset, position_offset=position_offset)
    expected = dense_mask_attention(*inputs, scale=scale, step_offset=step_offset, position_offset=position_offset)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-10)

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for name, got, want in zip(("q", "k_base", "v_base", "k_own", "v_own"), grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_a_window_of_positions_equals_those_rows_of_every_position_thinking():
    """Thinking at positions P .. P+L-1 only = the rows P .. of the call where every position thinks (same keys)."""
    full = [t.detach() for t in random_inputs(1, 2, 4, 2, 10, 3, 3, 8)]
    q, k_base, v_base, k_own, v_own = full
    everywhere = quietstar.thought_attention(*full, step_offset=0)
    window = quietstar.thought_attention(
        q[:, :, :, 6:9], k_base[:, :, :9], v_base[:, :, :9], k_own[:, :, :, 6:9], v_own[:, :, :, 6:9], position_offset=6
    )  # positions 6, 7, 8
    torch.testing.assert_close(window, everywhere[:, :, :, 6:9], atol=1e-12, rtol=1e-10)


def test_default_scale_is_inverse_sqrt_head_dim():
    inputs = random_inputs(1, 1, 2, 1, 5, 3, 3, 16)
    torch.testing.assert_close(
        quietstar.thought_attention(*inputs), dense_mask_attention(*inputs, scale=16**-0.5, step_offset=0)
    )


def test_low_precision_inputs_keep_dtype_and_stay_close():
    inputs = [t.detach() for t in random_inputs(1, 2, 4, 2, 10, 4, 4, 16, dtype=torch.float32)]
    reference = quietstar.thought_attention(*inputs)
    out = quietstar.thought_attention(*[t.bfloat16() for t in inputs])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, kb, vb, ko, vo: (q[:, :, :3], kb, vb, ko, vo), "multiple of key/value heads"),
        (lambda q, kb, vb, ko, vo: (q, kb[:, :, :-1], vb[:, :, :-1], ko, vo), "k_base"),
        (lambda q, kb, vb, ko, vo: (q, kb, vb, ko[..., :2, :], vo[..., :2, :]), "need their own keys"),
        (lambda q, kb, vb, ko, vo: (q[0], kb, vb, ko, vo), "expects q"),
        (lambda q, kb, vb, ko, vo: (q[:, :, :, 1:], kb, vb, ko[:, :, :, 1:], vo[:, :, :, 1:]), "position_offset"),
    ],
)
def test_bad_shapes_raise_clear_errors(change, message):
    inputs = [t.detach() for t in random_inputs(1, 1, 4, 2, 5, 3, 3, 8)]
    with pytest.raises(ValueError, match=message):
        quietstar.thought_attention(*change(*inputs))
