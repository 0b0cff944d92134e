"""The multi-hop task and recipe: the problems are what they claim, the encoding scores the right tokens, the recipe's
command and report work, and a short run shows learning has started (the full run, with the issue's targets, is the
`slow` test at the bottom)."""

import json
import re
from xml.etree import ElementTree

import pytest
import torch
from transformers import AutoModelForCausalLM

from quietstar.cli import main
from quietstar.plots import line_plot
from quietstar.tasks import multihop
from quietstar.tasks.bootstrap import bootstrap_ci
from quietstar.tasks.multihop_train import MultihopSettings, encode, run_multihop


def test_problems_are_three_hops_and_deterministic():
    assert multihop.problems(50, seed=3) == multihop.problems(50, seed=3)
    assert multihop.problems(50, seed=3) != multihop.problems(50, seed=4)
    for problem in multihop.generate(200, seed=0):
        edges = dict(re.findall(r"(n\d+) > (n\d+) ;", problem.edges))
        assert 6 <= len(edges) <= 9 and len(set(edges.values())) == len(edges)  # chains: every node has <= 1 successor
        node, walked = problem.start, []
        for _ in range(multihop.HOPS):
            node = edges[node]
            walked.append(node)
        assert tuple(walked) == problem.chain
        assert problem.direct_text == f"{problem.prompt} {problem.answer} |"
        assert problem.prompt.endswith(f"Q {problem.start} :")


def test_tokenizer_has_one_token_per_symbol():
    tokenizer = multihop.tokenizer()
    problem = multihop.generate(1, seed=0)[0]
    ids = tokenizer(problem.chain_text)["input_ids"]
    assert len(ids) == len(problem.chain_text.split()) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == problem.chain_text
    assert len(tokenizer("---")["input_ids"]) == 1  # the markers start from it
    prompt, answer = multihop.problems(1, seed=0)[0]
    assert len(tokenizer(answer)["input_ids"]) == 1 and tokenizer.decode(tokenizer(prompt + " " + answer)["input_ids"]) == f"{prompt} {answer}"


def test_encoding_scores_the_answer_or_the_chain_never_a_filler():
    tokenizer = multihop.tokenizer()
    problems = multihop.generate(6, seed=1)
    input_ids, mask, labels = encode(tokenizer, [p.direct_text for p in problems], "answer")
    for row, problem in enumerate(problems):
        scored = (labels[row] != -100).nonzero().flatten().tolist()
        assert len(scored) == 1 and tokenizer.decode(input_ids[row, scored]) == problem.answer

    import random

    filler = tokenizer.convert_tokens_to_ids("---")
    input_ids, mask, labels = encode(tokenizer, [p.chain_text for p in problems], "chain", 0.5, random.Random(0))
    assert (input_ids == filler).any() and not (labels == filler).any()
    for row, problem in enumerate(problems):
        targets = labels[row][labels[row] != -100]
        assert tokenizer.decode(targets) == f"{' '.join(problem.chain)} |"


def test_bootstrap_interval_brackets_the_mean():
    values = [float(v) for v in torch.randn(200, generator=torch.Generator().manual_seed(0))]
    low, high = bootstrap_ci(values)
    assert low < sum(values) / len(values) < high and high - low < 0.5
    assert bootstrap_ci([1.0] * 10) == [1.0, 1.0]


def test_line_plot_is_svg_with_one_line_per_series(tmp_path):
    path = line_plot({"a": ([0, 1, 2], [0.5, -0.2, 1.0]), "b": ([0, 2], [0.1, 0.3])}, tmp_path / "p.svg", title="t", xlabel="x", ylabel="y")
    root = ElementTree.parse(path).getroot()
    assert len(root.findall("{http://www.w3.org/2000/svg}polyline")) == 2
    assert len(root.findall("{http://www.w3.org/2000/svg}circle")) == 5
    with pytest.raises(ValueError, match="at least one point"):
        line_plot({}, tmp_path / "q.svg", title="t", xlabel="x", ylabel="y")


def test_recipe_command_errors(tmp_path):
    with pytest.raises(SystemExit, match="--output-dir"):
        main(["train", "multihop"])
    with pytest.raises(SystemExit, match="unknown setting .stepz."):
        main(["train", "multihop", "--output-dir", str(tmp_path), "--stepz", "3"])


def test_short_run_starts_learning(tmp_path):
    """A few minutes' recipe in seconds: stage 1 far too short to write chains, 10 stage-2 steps. The thought pathway
    must already move (answer NLL with thoughts falls) and every artefact must be written."""
    settings = MultihopSettings(
        base_max_steps=100, base_target_accuracy=0.0, filler_steps=0, steps=10, eval_every=5, batch_size=8, eval_problems=64
    )
    report = run_multihop(tmp_path, settings)
    first, last = report["history"][0], report["history"][-1]
    assert [h["step"] for h in report["history"]] == [0, 5, 10]
    assert last["answer_nll_with"] < first["answer_nll_with"] - 0.2
    assert json.loads((tmp_path / "report.json").read_text())["final"] == last
    assert "| step |" in (tmp_path / "report.md").read_text()
    assert ElementTree.parse(tmp_path / "gain.svg").getroot().tag.endswith("svg")
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged if entry["stage"] == 2] == [0, 5, 10]
    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # the saved model loads like any other
    assert model.config.thought_length == settings.thought_length


@pytest.mark.slow
def test_full_recipe_reaches_the_targets(tmp_path):
    """The issue's targets on held-out problems: accuracy with thoughts >= 20 points above without, answer NLL
    >= 0.5 nats lower; within 15 minutes on 2 CPU cores (checked loosely: 25 minutes, CI machines vary)."""
    report = run_multihop(tmp_path)
    final = report["final"]
    assert final["accuracy_with"] - final["accuracy_without"] >= 0.20
    assert final["nll_gain"] >= 0.5 and final["nll_gain_ci95"][0] > 0
    assert report["seconds"] < 25 * 60
