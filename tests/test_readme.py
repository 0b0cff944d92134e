"""The README quick start runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_and_learns(tmp_path, monkeypatch, capsys):
    text = README.read_text()
    block = re.search(r"<!-- quickstart.*?-->\n```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README-quickstart", "exec"), namespace)
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", capsys.readouterr().out)]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.5
    assert (tmp_path / "quietstar-tiny" / "model.safetensors").exists()
    assert isinstance(namespace["reloaded"], type(namespace["model"]))
    assert torch.equal(namespace["reloaded"].thought_markers.weight, namespace["model"].thought_markers.weight)
