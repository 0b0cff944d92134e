"""Thought inspection (per-token thought text and mixing weight, HTML and PNG) and adaptive thinking."""

import math

import pytest
import torch

import quietstar
from conftest import make_model, random_text
from quietstar.adaptive import token_gains
from quietstar.inspection import generate_with_thoughts, render_html, render_png


def trusting_model(arch="llama", **fields):
    """A tiny model whose mixing head gives the thoughts real weight (w around 0.5), so thinking changes predictions."""
    model, tokenizer = make_model(arch, thought_length=3, **fields)
    with torch.no_grad():
        model.mixing_head.out.bias.fill_(0.0)
        model.mixing_head.out.weight.normal_()
    return model, tokenizer


def test_generate_with_thoughts_reports_each_token_and_its_thought():
    model, tokenizer = trusting_model()
    prompts = ["w1 w2 w3 w4 w5", "w7 w8"]
    generations = generate_with_thoughts(model, tokenizer, prompts, max_new_tokens=4, do_sample=False)
    assert [g.prompt for g in generations] == prompts
    for prompt, generation in zip(prompts, generations):
        alone = generate_with_thoughts(model, tokenizer, prompt, max_new_tokens=4, do_sample=False)[0]
        assert [t.token_id for t in generation.tokens] == [t.token_id for t in alone.tokens]
        assert [t.thought for t in generation.tokens] == [t.thought for t in alone.tokens]
        for token in generation.tokens:
            assert len(token.thought_ids) == 3 and token.thought == tokenizer.decode(token.thought_ids)
            assert 0 < token.mixing_weight < 1
    ids = tokenizer(prompts[1], return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1] :].tolist()
    assert [t.token_id for t in generations[1].tokens] == plain


def test_html_and_png_show_every_token_and_thought(tmp_path):
    model, tokenizer = trusting_model()
    generations = generate_with_thoughts(model, tokenizer, ["w1 w2 <w3> & w4"], max_new_tokens=5, do_sample=False)
    page = render_html(generations, tmp_path / "thoughts.html").read_text()
    for token in generations[0].tokens:
        assert f">{token.token}</span>" in page
        assert token.thought in page
    assert "&lt;unk&gt;" in page or "&amp;" in page  # the prompt's markup characters are escaped
    pytest.importorskip("matplotlib")
    png = render_png(generations, tmp_path / "thoughts.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    image = imread(png)
    assert image.shape[0] > 100 and image.shape[1] > 500
    orange = (image[..., 0] > 0.9) & (image[..., 2] < 0.4)  # the highest-weight token's box is orange
    assert orange.any()


def test_threshold_extremes_are_never_and_always_think():
    model, tokenizer = trusting_model()
    prompt = random_text(2, 5)
    always = model.generate(prompt, max_new_tokens=4, do_sample=False)
    base = model.generate(prompt, max_new_tokens=4, do_sample=False, think=False)
    assert not torch.equal(always, base)  # the thoughts change this model's choices
    model.config.think_threshold = -math.inf
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), always)
    model.config.think_threshold = math.inf
    trace = quietstar.ThoughtTrace()
    assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False, thought_trace=trace), base)
    assert not any(step.thought_taken.any() for step in trace.steps)
    assert all(step.mixing_weight.eq(0).all() for step in trace.steps)


def test_calibration_fits_the_gains_and_keeps_the_asked_share():
    model, _ = trusting_model("qwen2")
    batches = [random_text(4, 12, seed=seed) for seed in range(3)]
    gains, _ = token_gains(model, torch.cat(batches))
    calibration = quietstar.calibrate_think_gate(model, batches, keep_gain=0.8)
    assert calibration.n_tokens == gains.numel() == 3 * 4 * 11
    assert math.isclose(calibration.total_gain, gains.mean().item(), rel_tol=1e-4)
    assert model.config.think_threshold == calibration.threshold
    if calibration.total_gain > 0:
        assert calibration.kept_gain >= 0.8 and 0 < calibration.think_fraction <= 1
    predicted = model.think_gate(token_gains(model, torch.cat(batches))[1])
    fitted_error = (predicted - gains).pow(2).mean()
    assert fitted_error <= (gains - gains.mean()).pow(2).mean() + 1e-6  # better than the best constant
    thinking = model.generate(batches[0][:2, :6], max_new_tokens=3, do_sample=False,
                              thought_trace=(trace := quietstar.ThoughtTrace()))
    assert thinking.shape == (2, 9) and len(trace.steps) == 3


def test_calibration_rejects_a_bad_share():
    model, _ = make_model()
    with pytest.raises(ValueError, match="keep_gain"):
        quietstar.calibrate_think_gate(model, [random_text(1, 5)], keep_gain=1.5)


def test_think_gate_is_no_parameter_but_is_saved(tmp_path):
    """Calibrated, not trained: no gradient (DDP and optimizers ignore it), but its values are saved and reloaded."""
    model, tokenizer = trusting_model()
    quietstar.calibrate_think_gate(model, [random_text(2, 10)], keep_gain=0.9)
    assert not list(model.think_gate.parameters())
    model.save_pretrained(tmp_path)
    reloaded = quietstar.QuietStarForCausalLM.from_pretrained(tmp_path)
    assert model.think_gate.weight.abs().sum() > 0
    assert torch.equal(reloaded.think_gate.weight, model.think_gate.weight)
    assert torch.equal(reloaded.think_gate.bias, model.think_gate.bias)
    assert reloaded.config.think_threshold == model.config.think_threshold
