"""Gradient checkpointing: whole passes are recomputed in backward, the recorded text K/V survive, gradients match."""

import torch

from conftest import make_model, random_text


def _loss_and_grads(model, ids):
    torch.manual_seed(7)  # same thoughts in both runs
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointing_on_and_off_give_the_same_gradients():
    model, _ = make_model("llama", thought_length=3, n_thoughts=2, lookahead=2, policy_weight=1.0)
    model.train()
    ids = random_text(2, 12)
    loss_plain, grads_plain = _loss_and_grads(model, ids)

    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    # only the wrapper checkpoints: layer checkpointing would drop the K/V the thought pass reads
    assert not any(getattr(layer, "gradient_checkpointing", False) for layer in model.model.modules())
    loss_checkpointed, grads_checkpointed = _loss_and_grads(model, ids)

    assert torch.equal(loss_plain, loss_checkpointed)
    assert grads_plain.keys() == grads_checkpointed.keys() and "thought_embeddings" in grads_plain
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=0, atol=1e-6, msg=name)

    model.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing


def test_checkpointing_recomputes_instead_of_saving():
    """With checkpointing the autograd graph holds fewer saved activations (measured by saved-tensor bytes)."""
    model, _ = make_model("llama", thought_length=3, n_thoughts=2, lookahead=2, policy_weight=1.0)
    model.train()
    ids = random_text(2, 16)

    def saved_bytes():
        total = []

        def pack(tensor):
            total.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(ids, labels=ids).loss.backward()
        return sum(total)

    plain = saved_bytes()
    model.activation_checkpointing_enable()
    assert saved_bytes() < plain
