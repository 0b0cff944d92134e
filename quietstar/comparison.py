"""Does thinking beat plain fine-tuning? The report of a run with `controls: true`.

Four predictors scored on the same held-out items (a task's test split, or the held-out windows of the default run):
    with thoughts      the Quiet-STaR model's mixed prediction (greedy thoughts: its inference policy)
    base path          the same model's prediction without a thought (a diagnostic, not a result)
    control            the same stage with thinking off: a plain causal-LM fine-tune of the same input model on the
                       same examples, for the same steps, optimizer and learning rate, selected by the same rule
    control-flops      the same, trained for as many FLOPs as the thinking run (`thinking_flops_ratio` x the steps;
                       with `thought_positions="scored"`, counted at the share of positions that think)
Each gets its per-token NLL and exact-match accuracy (every labelled token of an item is the argmax) with a 95%
percentile-bootstrap interval over items; the gain that counts is with thoughts minus the better control, with a
paired bootstrap interval (the same resampled items on both sides).
"""

import math
from collections.abc import Iterable

import torch

from .configuration_quietstar import QuietStarConfig
from .objective import scored_positions
from .scoring import label_scores
from .tasks.bootstrap import bootstrap_ci

WITH, BASE, CONTROL, CONTROL_FLOPS = "with thoughts", "base path", "control", "control-flops"


def thinking_flops_ratio(config: QuietStarConfig, thinking_fraction: float = 1.0) -> float:
    """FLOPs of a Quiet-STaR training step over those of a plain causal-LM step on the same tokens, counting
    forward = 1 and backward = 2 units per token through the model (attention's length-dependent part left out):
    the text pass 3, sampling N x T forward-only tokens, the teacher-forced chains N x (T + A + 1) tokens
    (start marker, T thoughts, end marker, A - 1 lookahead tokens) forward and backward; the chains' part only at the
    `thinking_fraction` of positions that think (`thinking_fraction_of`)."""
    n, t, a = config.n_thoughts, config.thought_length, config.lookahead
    return (3 + thinking_fraction * (n * t + 3 * n * (t + a + 1))) / 3


def thinking_fraction_of(config: QuietStarConfig, batches: Iterable[dict]) -> float:
    """The share of a training batch's positions that think, averaged over `batches` (collated, with labels and
    attention_mask): 1 with `thought_positions="all"`, else the scored window's length over the padded length."""
    if config.thought_positions == "all":
        return 1.0
    shares = []
    for batch in batches:
        length = batch["labels"].shape[1]
        first, end, _ = scored_positions(batch["labels"], batch.get("attention_mask"), config.lookahead).indices(length)
        shares.append((end - first) / length)
    return sum(shares) / max(len(shares), 1)


@torch.no_grad()
def score_items(model, examples, collator, batch_size: int, seed: int = 0) -> dict[str, list]:
    """Per item (a row of `examples`): summed NLL of its labelled tokens, their count, exact match (1/0); for a
    Quiet-STaR model also its base path's NLL and exact match, and the thought written before its first labelled
    token. Eval mode: the model's inference thought policy, under `seed`."""
    thinking = hasattr(model, "marker_ids")
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    items: dict[str, list] = {"nll": [], "tokens": [], "exact": [], "nll_base": [], "exact_base": [], "thought": []}
    for start in range(0, len(examples), batch_size):
        batch = collator([examples[k] for k in range(start, min(start + batch_size, len(examples)))])
        batch = {key: value.to(model.device) for key, value in batch.items()}
        labels = batch.pop("labels")
        outputs = model(**batch)
        scores = label_scores(outputs, labels, model.marker_ids if thinking else None)
        items["nll"] += scores.mixed.row_nll().tolist()
        items["tokens"] += scores.valid.sum(dim=1).tolist()
        items["exact"] += scores.mixed.row_exact().tolist()
        if thinking:
            items["nll_base"] += scores.base.row_nll().tolist()
            items["exact_base"] += scores.base.row_exact().tolist()
            first = scores.valid.int().argmax(dim=1)  # position whose next token is the first labelled one
            items["thought"] += outputs.thought_ids[torch.arange(len(first)), 0, first].tolist()
    model.train(was_training)
    return items


def _summary(nll: list[float], exact: list[float], tokens: list[int]) -> dict:
    return {
        "nll": sum(nll) / max(sum(tokens), 1),
        "nll_ci95": bootstrap_ci(nll, tokens),
        "accuracy": sum(exact) / len(exact),
        "accuracy_ci95": bootstrap_ci(exact),
    }


def compare(thinking: dict[str, list], controls: dict[str, dict[str, list]], metric: str) -> dict:
    """The report: `thinking` = `score_items` of the Quiet-STaR model, `controls` = {name: score_items} of the
    no-thought models; `metric` ("accuracy" or "nll") picks the better control and heads the gain."""
    tokens = thinking["tokens"]
    models = {
        WITH: _summary(thinking["nll"], thinking["exact"], tokens),
        BASE: _summary(thinking["nll_base"], thinking["exact_base"], tokens),
    }
    models.update({name: _summary(items["nll"], items["exact"], tokens) for name, items in controls.items()})
    better = max(controls, key=lambda name: models[name]["accuracy"] if metric == "accuracy" else -models[name]["nll"])
    exact_gain = [a - b for a, b in zip(thinking["exact"], controls[better]["exact"])]
    nll_gain = [b - a for a, b in zip(thinking["nll"], controls[better]["nll"])]  # > 0: thinking wins
    return {
        "metric": metric,
        "items": len(tokens),
        "tokens": sum(tokens),
        "models": models,
        "gain": {
            "versus": better,
            "accuracy": sum(exact_gain) / len(exact_gain),
            "accuracy_ci95": bootstrap_ci(exact_gain),
            "nll": sum(nll_gain) / max(sum(tokens), 1),
            "nll_ci95": bootstrap_ci(nll_gain, tokens),
        },
    }


def format_comparison(report: dict) -> str:
    """The report's table (markdown): the four predictors, then the gain over the better control."""
    lines = [
        f"held-out: {report['items']} items, {report['tokens']} scored tokens; 95% bootstrap intervals over items",
        "",
        "| model | NLL / token [95% CI] | exact match [95% CI] |",
        "|---|---|---|",
    ]
    for name, s in report["models"].items():
        lines.append(
            f"| {name} | {s['nll']:.4f} [{s['nll_ci95'][0]:.4f}, {s['nll_ci95'][1]:.4f}] | "
            f"{s['accuracy']:.3f} [{s['accuracy_ci95'][0]:.3f}, {s['accuracy_ci95'][1]:.3f}] |"
        )
    gain = report["gain"]
    lines += [
        "",
        f"gain of thinking over the better control ({gain['versus']}, by {report['metric']}): "
        f"exact match {100 * gain['accuracy']:+.1f} points [{100 * gain['accuracy_ci95'][0]:+.1f}, "
        f"{100 * gain['accuracy_ci95'][1]:+.1f}], NLL {gain['nll']:+.4f} nats/token "
        f"[{gain['nll_ci95'][0]:+.4f}, {gain['nll_ci95'][1]:+.4f}] (> 0: thinking wins)",
    ]
    if report.get("thoughts"):  # the greedy thought before each item's first labelled token
        lines += ["", "| text before | thought | next token |", "|---|---|---|"]
        lines += [f"| `{t['context']!r}` | `{t['thought']!r}` | `{t['next']!r}` |" for t in report["thoughts"]]
    return "\n".join(lines)


def control_steps(max_steps: int, config: QuietStarConfig, thinking_fraction: float = 1.0) -> int:
    """Steps of the FLOPs-matched control: the thinking run's steps times `thinking_flops_ratio`, rounded up."""
    return math.ceil(max_steps * thinking_flops_ratio(config, thinking_fraction))


__all__ = ["thinking_flops_ratio", "thinking_fraction_of", "control_steps", "score_items", "compare", "format_comparison"]
