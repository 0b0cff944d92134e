"""LoRA with PEFT: the recommended config reaches the right modules, adapters and merged models round-trip, wrapping
or saving unmerged PEFT layers is refused with the fix, and `quietstar train` trains LoRA from a `lora:` section."""

import re
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft, or the dev extra)")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, set_seed  # noqa: E402

import quietstar  # noqa: E402
from conftest import BASE_CONFIGS, make_model, make_tokenizer, random_text  # noqa: E402
from quietstar.checkpoints import load_checkpoint  # noqa: E402
from quietstar.cli import main  # noqa: E402
from quietstar.lora import lora_config  # noqa: E402
from quietstar.train import ADAPTER_DIR, load_model  # noqa: E402
from test_train import as_arguments, text_file, tiny_base, tiny_overrides  # noqa: E402, F401 (fixtures)


def lora_model(seed: int = 0):
    model, tokenizer = make_model("llama", seed=seed)
    return get_peft_model(model, lora_config(r=4)), tokenizer


def train_steps(peft_model, steps: int = 2) -> None:
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        ids = random_text(2, 10, seed=step)
        optimizer.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    peft_model.eval()


def test_lora_config_puts_lora_on_the_base_and_trains_mixing_head_and_markers_in_full():
    peft_model, _ = lora_model()
    names = [name for name, _ in peft_model.named_modules()]
    lora_layers = {name.rsplit(".lora_A", 1)[0] for name in names if name.endswith(".lora_A")}
    assert lora_layers and all(".layers." in name for name in lora_layers)  # attention/MLP projections only
    assert {name.rsplit(".", 1)[-1] for name in lora_layers} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any(part in name for name in lora_layers for part in ("mixing_head", "think_gate", "lm_head"))

    train_steps(peft_model, steps=1)  # after one step LoRA's A matrices get gradient too (B starts at zero)
    peft_model.train()
    peft_model.zero_grad()
    ids = random_text(2, 10, seed=5)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    trainable = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("thought_markers.modules_to_save" in name for name in trainable)
    assert sum("mixing_head.modules_to_save" in name for name in trainable) == 6
    for name, parameter in trainable.items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def trained_lora_model():
    """A trained PEFT model, its tokenizer, held-out ids and the logits it gives them in eval mode."""
    peft_model, tokenizer = lora_model()
    train_steps(peft_model)
    ids = random_text(2, 9, seed=7)
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    return peft_model, tokenizer, ids, expected


def test_adapter_round_trip_restores_lora_mixing_head_and_markers(tmp_path):
    peft_model, _, ids, expected = trained_lora_model()
    markers = peft_model.base_model.model.marker_embeddings()
    peft_model.save_pretrained(tmp_path)

    fresh, _ = make_model("llama", seed=0)  # the same base, markers back at their initial value
    assert not torch.equal(fresh.marker_embeddings()[0], markers[0])
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    for before, after in zip(markers, reloaded.base_model.model.marker_embeddings()):
        assert torch.equal(before, after)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)


def test_merged_model_saves_and_loads_as_a_plain_quietstar_model(tmp_path):
    peft_model, tokenizer, ids, expected = trained_lora_model()
    merged = peft_model.merge_and_unload()
    assert isinstance(merged, quietstar.QuietStarForCausalLM)
    merged.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert not any("lora" in key or "modules_to_save" in key for key in load_file(tmp_path / "model.safetensors"))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    checked, _ = load_checkpoint(tmp_path)  # no missing or unexpected keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(checked(ids).logits, expected, rtol=0, atol=1e-5)


def test_from_base_refuses_a_peft_model_before_changing_anything():
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(BASE_CONFIGS["llama"]())
    peft_base = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    with pytest.raises(ValueError, match=r"merge_and_unload\(\).*get_peft_model\(model, quietstar.lora.lora_config"):
        quietstar.QuietStarForCausalLM.from_base(peft_base, tokenizer)
    with pytest.raises(ValueError, match="unmerged PEFT layers"):  # the LoRA layers inside a plain-looking model
        quietstar.QuietStarForCausalLM.from_base(peft_base.base_model.model, tokenizer)
    assert len(tokenizer) == vocab and base.get_input_embeddings().num_embeddings == vocab

    model, _ = quietstar.QuietStarForCausalLM.from_base(peft_base.merge_and_unload(), tokenizer)
    assert model.marker_ids == (vocab, vocab + 1)


def test_save_pretrained_refuses_unmerged_lora_layers(tmp_path):
    peft_model, _ = lora_model()
    with pytest.raises(ValueError, match=r"unmerged PEFT layers \(model.model.layers.0.self_attn.q_proj: peft.tuners.lora.*merge_and_unload\(\).save_pretrained"):
        peft_model.base_model.model.save_pretrained(tmp_path)
    assert not list(tmp_path.iterdir())  # refused before writing anything


def test_train_command_with_a_lora_section(tiny_base, text_file, tmp_path):
    output_dir = tmp_path / "run"
    overrides = tiny_overrides(tiny_base, text_file, output_dir, **{"lora.r": 4, "training.save_steps": 100})
    assert main(["train", *as_arguments(overrides)]) == 0

    merged = AutoModelForCausalLM.from_pretrained(output_dir).eval()  # a plain Quiet-STaR directory, merged
    assert isinstance(merged, quietstar.QuietStarForCausalLM)
    assert (output_dir / ADAPTER_DIR / "adapter_model.safetensors").exists()
    start, _ = load_model(str(tiny_base), {"thought_length": 2, "lookahead": 2})  # the model training began from
    q_proj = "model.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], start.state_dict()[q_proj])  # LoRA was trained and merged

    set_seed(42)  # the run's seed, so the rows `from_base` adds for the markers are the same
    start, _ = load_model(str(tiny_base), {"thought_length": 2, "lookahead": 2})
    adapted = PeftModel.from_pretrained(start, output_dir / ADAPTER_DIR).eval()
    ids = random_text(2, 9, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_readme_lora_block_runs(tmp_path, monkeypatch):
    model, tokenizer = make_model("llama")
    model.save_pretrained(tmp_path / "quietstar-tiny")
    tokenizer.save_pretrained(tmp_path / "quietstar-tiny")
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- lora: .*?-->\n```python\n(.*?)```", readme, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README-lora", "exec"), namespace)

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "quietstar-tiny-merged").eval()
    adapted = namespace["adapted"].eval()
    ids = namespace["ids"][:, :12]
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(input_ids=ids).logits, rtol=0, atol=1e-5)
        assert not torch.equal(merged(ids).logits, model(ids).logits)  # the five steps changed the model
