"""`generate()` works through transformers' GenerationMixin and equals a hand-written greedy loop over `forward`."""

import torch

from conftest import make_model, random_text


def test_greedy_generate_equals_a_loop_over_forward():
    model, _ = make_model("gemma", thought_temperature=0.0)
    prompt = random_text(2, 5)
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
    sequence = prompt
    with torch.no_grad():
        for _ in range(4):
            next_token = model(sequence).logits[:, -1].argmax(dim=-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)
    assert not torch.isin(generated, torch.tensor(model.marker_ids)).any()
