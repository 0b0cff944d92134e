"""`transformers.Trainer` trains the model as it is: the loss falls and the Quiet-STaR parameters move."""

import torch
from transformers import Trainer, TrainingArguments

from conftest import make_model, random_text


def test_trainer_trains(tmp_path):
    model, _ = make_model("mistral", thought_length=2, n_thoughts=2, lookahead=2, policy_weight=1.0)
    sequences = random_text(4, 8).repeat(1, 3)  # (4, 24), repeated: learnable quickly
    dataset = [{"input_ids": ids, "labels": ids} for ids in sequences]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", use_cpu=True, report_to=[],
    )
    markers_before = model.thought_markers.weight.detach().clone()
    head_before = model.mixing_head.out.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 8 and losses[-1] < losses[0]
    assert not torch.equal(model.thought_markers.weight, markers_before)
    assert not torch.equal(model.mixing_head.out.weight, head_before)
