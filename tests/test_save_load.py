"""Persistence (safetensors round trip, trained thought markers kept, the old marker key, weights that do not match
refused by name) and padding invariance."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from safetensors.torch import load_file, save_file

import quietstar
from conftest import clean_environment, make_model, random_text
from quietstar.checkpoints import CheckpointError, load_checkpoint


@pytest.mark.parametrize("arch", ["llama", "gemma"])  # untied and tied input/output embeddings
def test_save_and_reload_give_identical_model_and_logits(arch, tmp_path):
    model, tokenizer = make_model(arch)
    with torch.no_grad():  # stand-in for training: the reference code reset trained markers on reload
        model.thought_markers.weight.normal_()
        model.mixing_head.out.weight.normal_()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    assert (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.bin"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "quietstar"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_quietstar.QuietStarForCausalLM"

    input_ids = random_text(2, 8)
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(input_ids, labels=input_ids)
    for loader in (quietstar.QuietStarForCausalLM, AutoModelForCausalLM):
        reloaded = loader.from_pretrained(tmp_path).eval()
        assert type(reloaded) is quietstar.QuietStarForCausalLM
        assert reloaded.config.text_config.model_type == arch
        for (name, value), (_, reloaded_value) in zip(model.state_dict().items(), reloaded.state_dict().items()):
            assert torch.equal(value, reloaded_value), name
        torch.manual_seed(0)
        with torch.no_grad():
            out = reloaded(input_ids, labels=input_ids)
        for name in ("logits", "base_logits", "mixing_weights", "thought_ids", "loss"):
            assert torch.equal(getattr(out, name), getattr(expected, name)), name
    reloaded_tokenizer = type(tokenizer).from_pretrained(tmp_path)
    assert quietstar.thought_token_ids(reloaded_tokenizer) == model.marker_ids


def test_right_padding_gives_the_per_sequence_results():
    model, _ = make_model("qwen2", thought_temperature=0.0)  # greedy thoughts: comparable across batch shapes
    long, short = random_text(1, 9, seed=1), random_text(1, 6, seed=2)
    input_ids = torch.cat([long, torch.cat([short, torch.zeros(1, 3, dtype=torch.long)], dim=1)])
    attention_mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        padded = model(input_ids, attention_mask=attention_mask, labels=input_ids)
        for row, sequence in enumerate((long, short)):
            alone = model(sequence, labels=sequence)
            n = sequence.shape[1]
            for name in ("logits", "base_logits"):
                torch.testing.assert_close(getattr(padded, name)[row, :n], getattr(alone, name)[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(padded.mixing_weights[row, :, :n], alone.mixing_weights[0], atol=1e-5, rtol=1e-5)
            assert torch.equal(padded.thought_ids[row, :, :n], alone.thought_ids[0])
            torch.testing.assert_close(padded.rewards[row, :, :n], alone.rewards[0], atol=1e-5, rtol=1e-5)

        # One padded row alone: every loss part equals the unpadded sequence's, with -100 labels or without.
        alone = model(short, labels=short)
        for labels in (input_ids[1:], input_ids[1:].masked_fill(attention_mask[1:] == 0, -100)):
            one_row = model(input_ids[1:], attention_mask=attention_mask[1:], labels=labels)
            for name in ("loss", "nll_base", "nll_mixed", "policy_loss", "reward_mean"):
                torch.testing.assert_close(getattr(one_row, name), getattr(alone, name), atol=1e-5, rtol=1e-5)


REMOTE_LOAD = """
import sys
sys.modules["quietstar"] = None  # the package must not be importable: only the saved code may be used
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
input_ids = torch.load(sys.argv[2])
torch.manual_seed(0)
with torch.no_grad():
    torch.save(model(input_ids).logits, sys.argv[3])
"""


def test_trust_remote_code_loads_the_saved_code_without_the_package(tmp_path):
    import subprocess
    import sys

    model, _ = make_model("qwen3")
    model.save_pretrained(tmp_path / "model")
    input_ids = random_text(1, 6)
    torch.save(input_ids, tmp_path / "ids.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(input_ids).logits
    env = clean_environment(tmp_path / "hf_home")
    args = [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)


def _rewrite_weights(path, edit) -> None:
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_with_the_old_thought_embeddings_key_loads_to_equal_logits(tmp_path):
    model, tokenizer = make_model("llama")
    with torch.no_grad():
        model.thought_markers.weight.normal_()
        expected = model(random_text(2, 8)).logits
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    # the layout of checkpoints saved while the markers were a bare parameter
    _rewrite_weights(tmp_path, lambda weights: weights.update(thought_embeddings=weights.pop("thought_markers.weight")))

    for reloaded in (AutoModelForCausalLM.from_pretrained(tmp_path), load_checkpoint(tmp_path)[0]):
        assert torch.equal(reloaded.thought_markers.weight, model.thought_markers.weight)
        with torch.no_grad():
            assert torch.equal(reloaded.eval()(random_text(2, 8)).logits, expected)
    resaved = tmp_path / "resaved"
    reloaded.save_pretrained(resaved)  # written in the current layout
    assert "thought_markers.weight" in load_file(resaved / "model.safetensors")
    assert "thought_embeddings" not in load_file(resaved / "model.safetensors")


def test_load_checkpoint_names_missing_and_unexpected_weights(tmp_path):
    model, tokenizer = make_model("llama")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    def edit(weights):
        weights.pop("mixing_head.out.bias")
        weights["model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 32)

    _rewrite_weights(tmp_path, edit)
    with pytest.raises(CheckpointError, match=r"missing: mixing_head.out.bias; unexpected: .*q_proj.lora_A.weight"):
        load_checkpoint(tmp_path)
