"""Activation checkpointing of the base's decoder layers, in the text pass and the thought passes: each layer is
recomputed in backward, the recorded text K/V survive, gradients match."""

import pytest
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
    layers = model.model.get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers)  # per layer, non-reentrant
    loss_checkpointed, grads_checkpointed = _loss_and_grads(model, ids)

    assert torch.equal(loss_plain, loss_checkpointed)
    assert grads_plain.keys() == grads_checkpointed.keys() and "thought_markers.weight" in grads_plain
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


def test_trainer_gradient_checkpointing_trains_identically(tmp_path):
    """TrainingArguments(activation_checkpointing=True) reaches the wrapper; same seed -> the same losses, step by step."""
    from transformers import TrainingArguments

    from quietstar.data import WindowCollator
    from quietstar.trainer import QuietStarTrainer

    def losses(checkpointing: bool):
        model, _ = make_model("llama", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(checkpointing)), max_steps=3, per_device_train_batch_size=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
            activation_checkpointing=checkpointing, disable_tqdm=True,
        )
        trainer = QuietStarTrainer(model=model, args=args, train_dataset=[{"input_ids": row} for row in random_text(4, 12)],
                                   data_collator=WindowCollator(0))
        trainer.train()
        assert model.is_activation_checkpointing == checkpointing
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    plain = losses(False)
    assert len(plain) == 3
    assert losses(True) == pytest.approx(plain, abs=1e-6)
