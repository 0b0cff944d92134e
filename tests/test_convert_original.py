"""`quietstar convert-original`: a checkpoint in the paper's released format, converted, predicts what the ORIGINAL
code predicts. The fixture (tests/fixtures/quietstar_original/) was written by tests/fixtures/make_original_fixture.py,
which ran the reference `modeling_mistral.py` under transformers 4.37.2 on a tiny random Mistral whose mixing weights
leave [0, 1]; this suite needs neither that code nor that environment."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import quietstar
from conftest import clean_environment
from quietstar.cli import main
from quietstar.convert_original import ConversionError, convert_original
from quietstar.hub import push_to_hub
from test_hub import REMOTE_LOAD, FakeHub

FIXTURE = Path(__file__).parent / "fixtures" / "quietstar_original"
RELEASED = FIXTURE / "released"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The fixture converted through the command line, with the defaults (n_ahead 8, stored markers)."""
    output = tmp_path_factory.mktemp("converted") / "model"
    assert main(["convert-original", str(RELEASED), "--output-dir", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def model(converted):
    return AutoModelForCausalLM.from_pretrained(converted).eval()


def non_marker_log_probs(logits: torch.Tensor, marker_ids) -> torch.Tensor:
    """(..., V) -> log-probabilities over the ids that are not markers, (..., V - 2)."""
    keep = [i for i in range(logits.shape[-1]) if i not in marker_ids]
    return logits[..., keep].float().log_softmax(-1)


def test_converted_directory_loads_with_auto_classes_and_the_original_eval_settings(converted, model):
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert type(model) is quietstar.QuietStarForCausalLM
    assert model.marker_ids == tuple(tokenizer.convert_tokens_to_ids(["<|startthought|>", "<|endthought|>"])) == (97, 96)
    config = model.config
    assert (config.thought_length, config.n_thoughts, config.inference_thought_temperature) == (5, 1, 1.0)
    assert config.mixing_activation == "identity"


def test_greedy_thoughts_reproduce_the_original(model, expected):
    with torch.no_grad():
        out = model(expected["input_ids"], thought_temperature=0.0)
    assert torch.equal(out.thought_ids, expected["greedy_thought_ids"])
    torch.testing.assert_close(out.mixing_weights[:, 0], expected["greedy_weights"], atol=1e-5, rtol=0)
    assert (expected["greedy_weights"] < 0).any()  # the original's w leaves [0, 1]: a sigmoid could not reproduce it
    torch.testing.assert_close(
        non_marker_log_probs(out.logits, model.marker_ids),
        non_marker_log_probs(expected["greedy_logits"], model.marker_ids),
        atol=1e-5, rtol=0,
    )


def test_the_originals_sampled_thoughts_given_as_thought_ids_reproduce_it(model, expected):
    with torch.no_grad():
        out = model(expected["input_ids"], thought_ids=expected["sampled_thought_ids"])
    torch.testing.assert_close(
        non_marker_log_probs(out.logits, model.marker_ids),
        non_marker_log_probs(expected["sampled_logits"], model.marker_ids),
        atol=1e-5, rtol=0,
    )


def test_cached_generate_gives_the_tokens_of_the_originals_eval_loop(model, expected):
    """The official eval reruns the full forward over the prefix per token; generate() thinks once per token with the
    KV cache. Greedy thoughts and tokens: the same continuation."""
    generated = model.generate(expected["prompt_ids"], max_new_tokens=6, do_sample=False, thought_temperature=0.0)
    assert torch.equal(generated, expected["generated_ids"])


def test_dashes_markers_reproduce_what_the_official_eval_ran_with(tmp_path, expected):
    assert not torch.allclose(expected["dashes_logits"], expected["greedy_logits"], atol=1e-2)  # the markers matter
    convert_original(RELEASED, tmp_path / "dashes", markers="dashes")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dashes").eval()
    with torch.no_grad():
        out = model(expected["input_ids"], thought_temperature=0.0)
    torch.testing.assert_close(
        non_marker_log_probs(out.logits, model.marker_ids),
        non_marker_log_probs(expected["dashes_logits"], model.marker_ids),
        atol=1e-5, rtol=0,
    )


def released_copy(tmp_path: Path, **config_changes) -> Path:
    source = tmp_path / "released"
    shutil.copytree(RELEASED, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, **config_changes}))
    return source


@pytest.mark.parametrize("flag, value", [("use_shallow_talk", True), ("use_concat_talk_head", False),
                                         ("use_complex_talk_head", False)])
def test_another_head_layout_is_refused_before_anything_is_written(tmp_path, flag, value):
    source = released_copy(tmp_path, **{flag: value})
    with pytest.raises(ConversionError, match=f"another mixing-head layout \\({flag}={value}\\)"):
        convert_original(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_sources_and_options_are_named(tmp_path):
    with pytest.raises(ConversionError, match="`llama` model"):
        convert_original(released_copy(tmp_path, model_type="llama"), tmp_path / "out")
    with pytest.raises(ConversionError, match="at least 4"):
        convert_original(RELEASED, tmp_path / "out", n_ahead=3)
    with pytest.raises(ConversionError, match="Hub failed .*HF_HUB_OFFLINE"):
        convert_original("nobody/no-such-model", tmp_path / "out")  # offline in tests: nothing is downloaded
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ConversionError, match="not an empty directory"):
        convert_original(RELEASED, tmp_path / "full")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_without_the_original_markers_is_refused(tmp_path):
    source = released_copy(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (source / name).write_text((source / name).read_text().replace("<|startthought|>", "<|start|>"))
    with pytest.raises(ConversionError, match="no <\\|startthought\\|>"):
        convert_original(source, tmp_path / "out")


def test_pushed_converted_model_loads_with_remote_code_without_quietstar(tmp_path, model, converted, expected):
    hub = FakeHub(tmp_path / "hub")
    push_to_hub(model, AutoTokenizer.from_pretrained(converted), "me/quietstar-8-ahead-tiny", api=hub)
    input_ids = expected["prompt_ids"]
    torch.save(input_ids, tmp_path / "ids.pt")
    torch.manual_seed(0)
    with torch.no_grad():
        expected_logits = model(input_ids).logits  # the converted settings: thoughts sampled at temperature 1
    torch.manual_seed(0)
    expected_generation = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    folder = str(hub.root / "me/quietstar-8-ahead-tiny")
    args = [sys.executable, "-c", REMOTE_LOAD, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt"), folder]
    (tmp_path / "cwd").mkdir()
    result = subprocess.run(args, cwd=tmp_path / "cwd", env=clean_environment(tmp_path / "hf_home"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")[folder]
    torch.testing.assert_close(loaded["logits"], expected_logits, rtol=0, atol=0)
    assert torch.equal(loaded["generated"], expected_generation)
