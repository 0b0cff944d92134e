"""notebooks/ run top to bottom (tiny model, a few steps), so they never rot: finetune.ipynb trains and saves,
inference.ipynb loads that model, generates and shows the thoughts."""

from pathlib import Path

import pytest

from test_train import tiny_base  # noqa: F401  (fixture)

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def run_notebook(name: str, parameters: dict, cwd: Path) -> str:
    """Execute a notebook with its "parameters" cell replaced by `parameters`; returns all printed output."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name} needs exactly one cell tagged 'parameters'"
    cells[0].source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )


def test_finetune_then_inference_notebooks(tiny_base, tmp_path):  # noqa: F811
    finetuned = tmp_path / "finetuned"
    printed = run_notebook(
        "finetune.ipynb",
        dict(BASE=str(tiny_base), TEXT=" ".join(f"w{i % 9 + 3}" for i in range(120)), WINDOW=16, THOUGHT_LENGTH=2,
             LOOKAHEAD=2, STEPS=3, OUTPUT_DIR=str(finetuned)),
        tmp_path,
    )
    assert [line.split()[1] for line in printed.splitlines() if line.startswith("step ")] == ["1", "2", "3"]
    assert printed.count("-> thought") == 16 and (finetuned / "model.safetensors").exists()

    printed = run_notebook(
        "inference.ipynb", dict(MODEL_DIR=str(finetuned), PROMPT="w3 w4 w5 w6", MAX_NEW_TOKENS=3), tmp_path
    )
    assert "QuietStarForCausalLM thought_length=2 n_thoughts=2" in printed
    assert printed.count("| thought") == 4
    assert printed.count("after thinking") == 3  # one thought per generated token
    assert (tmp_path / "thoughts.html").exists() and (tmp_path / "thoughts.png").exists()
