"""Publishing: push to a local fake of the Hub API, load the upload in a fresh process that cannot import quietstar,
the model card, and the checks that refuse pickles and name broken files."""

import json
import pickle
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers.utils.hub
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

import quietstar
from conftest import clean_environment, make_model, random_text
from quietstar.attention import thought_attention
from quietstar.attention_backend import thought_attention_kernel
from quietstar.checkpoints import CheckpointError, load_checkpoint
from quietstar.hub import model_card, push_to_hub, save_for_hub

MODEL_CODE = {  # the configuration and modeling files and every sibling they import, flattened
    "configuration_quietstar.py", "modeling_quietstar.py", "attention.py", "attention_backend.py", "attention_cpu.py",
    "mixing.py", "objective.py", "sampling.py", "thought_tokens.py", "thinking.py", "output_head.py",
}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors", "README.md"} | MODEL_CODE
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json"}


class FakeHub:
    """The three HfApi calls an upload makes, writing each commit into `root/<repo_id>/` (no network)."""

    def __init__(self, root):
        self.root, self.commits = root, []

    def create_repo(self, repo_id, exist_ok=False, **kwargs):
        (self.root / repo_id).mkdir(parents=True, exist_ok=exist_ok)
        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, *args, **kwargs):
        pass

    def create_commit(self, repo_id, operations, **kwargs):
        for operation in operations:
            target = self.root / repo_id / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            source = operation.path_or_fileobj
            target.write_bytes(source if isinstance(source, bytes) else open(source, "rb").read())
        self.commits.append((repo_id, sorted(operation.path_in_repo for operation in operations)))
        return SimpleNamespace(commit_url=f"fake://{repo_id}", oid="0" * 40)


REMOTE_LOAD = """
import sys
sys.modules["quietstar"] = None        # not installed: only the uploaded code may be used
sys.modules["triton_kernels"] = None   # nor the optional kernels: the PyTorch thought attention must serve
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
input_ids = torch.load(sys.argv[1])
results = {}
for folder in sys.argv[3:]:
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    with torch.no_grad():
        logits = model(input_ids).logits
    torch.manual_seed(0)
    generated = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    markers = tokenizer.convert_tokens_to_ids(["<|startofthought|>", "<|endofthought|>"])
    results[folder] = dict(logits=logits, generated=generated, markers=markers)
torch.save(results, sys.argv[2])
"""


def trained_like(arch="qwen3"):
    model, tokenizer = make_model(arch)
    with torch.no_grad():  # stand-in for training, so a reload that reset these would show
        model.thought_markers.weight.normal_()
        model.mixing_head.out.weight.normal_()
    return model, tokenizer


def test_push_uploads_the_expected_files_and_loads_without_quietstar(tmp_path, monkeypatch):
    model, tokenizer = trained_like()
    hub = FakeHub(tmp_path / "hub")
    push_to_hub(model, tokenizer, "me/quietstar-tiny", api=hub, evaluation="| metric | value |\n|---|---|\n| gain | 0.1 |")
    assert hub.commits == [("me/quietstar-tiny", sorted(MODEL_FILES | TOKENIZER_FILES))]

    # transformers' own model.push_to_hub: weights, config and code (its generic card); the hub object swapped here
    monkeypatch.setattr(transformers.utils.hub, "_hf_api", hub)
    monkeypatch.setattr(transformers.utils.hub, "create_and_tag_model_card", lambda repo_id, tags, token=None: model_card(model))
    model.push_to_hub("me/plain-push", commit_message="test")
    assert hub.commits[1] == ("me/plain-push", sorted(MODEL_FILES))
    shutil.copy(hub.root / "me/quietstar-tiny/tokenizer.json", hub.root / "me/plain-push")
    shutil.copy(hub.root / "me/quietstar-tiny/tokenizer_config.json", hub.root / "me/plain-push")

    input_ids = random_text(1, 6)
    torch.save(input_ids, tmp_path / "ids.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        expected_logits = model(input_ids).logits
    torch.manual_seed(0)
    expected_generation = model.generate(input_ids, max_new_tokens=3, do_sample=False)

    # With quietstar installed no trust_remote_code is needed: the registered class loads.
    local = AutoModelForCausalLM.from_pretrained(hub.root / "me/quietstar-tiny").eval()
    assert type(local) is quietstar.QuietStarForCausalLM
    torch.manual_seed(0)
    with torch.no_grad():
        torch.testing.assert_close(local(input_ids).logits, expected_logits, rtol=0, atol=0)

    folders = [str(hub.root / "me/quietstar-tiny"), str(hub.root / "me/plain-push")]
    env = clean_environment(tmp_path / "hf_home")
    args = [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), *folders]
    neutral = tmp_path / "cwd"
    neutral.mkdir()
    result = subprocess.run(args, cwd=neutral, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for folder, loaded in torch.load(tmp_path / "out.pt").items():
        torch.testing.assert_close(loaded["logits"], expected_logits, rtol=0, atol=0, msg=folder)
        assert torch.equal(loaded["generated"], expected_generation), folder
        assert tuple(loaded["markers"]) == model.marker_ids


def test_model_card_has_the_metadata_and_the_evaluation(tmp_path):
    model, tokenizer = make_model()
    evaluation = "| tokens | gain |\n|---|---:|\n| **all** | +0.0123 |"
    files = save_for_hub(model, tokenizer, tmp_path, repo_id="me/tiny", base_model="HuggingFaceTB/SmolLM2-135M-Instruct", evaluation=evaluation)
    assert set(files) == MODEL_FILES | TOKENIZER_FILES
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert {"quietstar", "reasoning"} <= set(card.data.tags)
    assert "| **all** | +0.0123 |" in card.text and "trust_remote_code=True" in card.text
    assert "| `thought_length` | 3 |" in card.text

    unevaluated = model_card(model)  # local base path: no base_model metadata, and the card says there is no eval
    assert unevaluated.data.base_model is None and "No evaluation" in unevaluated.text


def test_pickle_weights_are_never_loaded(tmp_path):
    model, tokenizer = make_model()
    save_for_hub(model, tokenizer, tmp_path)
    canary = tmp_path / "pickle-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    loaded, _ = load_checkpoint(tmp_path)
    assert not canary.exists()
    assert torch.equal(loaded.thought_markers.weight, model.thought_markers.weight)

    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only pickle-based weights \\(pytorch_model.bin\\), which are never loaded"):
        load_checkpoint(tmp_path)
    assert not canary.exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_weight_file_is_named(tmp_path, damage):
    model, tokenizer = make_model()
    save_for_hub(model, tokenizer, tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"{weights} is corrupt or truncated"):
        load_checkpoint(tmp_path)


def test_config_of_another_model_type_is_named_and_can_be_wrapped(tmp_path):
    model, tokenizer = make_model()
    model.model.save_pretrained(tmp_path)  # the plain llama inside
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="config.json describes a `llama` model, not a Quiet-STaR model.*from_base"):
        load_checkpoint(tmp_path)
    wrapped, _ = load_checkpoint(tmp_path, wrap_base=True, thought_length=2)
    assert wrapped.config.thought_length == 2 and wrapped.config.text_config.model_type == "llama"

    (tmp_path / "config.json").write_text('{"model_type": "quietstar",\n oops}')
    with pytest.raises(CheckpointError, match="config.json, line 2: not valid JSON"):
        load_checkpoint(tmp_path)


def test_thought_attention_falls_back_to_pytorch_without_the_triton_kernels(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_kernels", None)  # as where only the uploaded model code is installed
    assert thought_attention_kernel("auto", torch.device("cuda")) is thought_attention
    with pytest.raises(ImportError, match="triton_kernels"):
        thought_attention_kernel("triton", torch.device("cuda"))


def test_eval_then_push_from_the_command_line(tmp_path, monkeypatch, capsys):
    from quietstar.cli import main

    model, tokenizer = make_model()
    save_for_hub(model, tokenizer, tmp_path / "model")
    text = tmp_path / "heldout.txt"
    text.write_text(" ".join(f"w{(5 * i) % 40}" for i in range(30)))
    csqa = tmp_path / "csqa.jsonl"
    csqa.write_text('{"question": "w3 w4", "choices": {"label": ["w10", "w11"], "text": ["w5", "w6"]}, "answerKey": "w11"}\n')
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text('{"question": "w3 w4", "answer": "w5\\n#### 12"}\n')
    out = tmp_path / "eval"
    assert main(["eval", str(tmp_path / "model"), "--output-dir", str(out), "--text", str(text), "--context-length", "16",
                 "--multiple-choice", str(csqa), "--gsm8k", str(gsm8k), "--cot-samples", "2", "--cot-max-new-tokens", "2",
                 "--seed", "3", "--no-progress"]) == 0
    written = {p.name for p in out.iterdir()}
    assert written == {"likelihood_gain.json", "likelihood_gain.md", "likelihood_gain.png", "multiple_choice.json",
                       "multiple_choice.md", "gsm8k_answer.json", "gsm8k_answer.md", "gsm8k_cot.json", "gsm8k_cot.md", "eval_results.md"}
    gain = json.loads((out / "likelihood_gain.json").read_text())
    assert gain["n_tokens"] == 30 - 2 and gain["settings"]["seed"] == 3 and gain["model"] == str(tmp_path / "model")
    cot = json.loads((out / "gsm8k_cot.json").read_text())
    assert cot["n_items"] == 1 and cot["settings"]["k"] == 2 and len(cot["data_sha256"]) == 64
    assert "Likelihood gain" in capsys.readouterr().out

    hub = FakeHub(tmp_path / "hub")
    monkeypatch.setattr(quietstar.hub, "HfApi", lambda token=None: hub)
    assert main(["push", str(tmp_path / "model"), "me/evaluated", "--eval-dir", str(out), "--base-model", "org/base"]) == 0
    card = ModelCard.load(hub.root / "me/evaluated/README.md")
    assert card.data.base_model == "org/base"
    assert (out / "likelihood_gain.md").read_text().strip() in card.text and "maj@2" in card.text

    with pytest.raises(SystemExit, match="nothing to do"):
        main(["eval", str(tmp_path / "model"), "--output-dir", str(out)])
