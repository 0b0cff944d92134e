"""`QuietStarTrainer`: transformers' `Trainer`, plus the Quiet-STaR loss parts in the logs, learning rates of their own
for the mixing head and the thought markers, and a held-out evaluation of the labelled tokens without thoughts (base)
and with them (mixed). The same trainer trains a plain causal LM (a recipe's plain stages and its no-thought controls):
its evaluation then reports that model's own NLL and exact match.

Everything else (optimizer, schedule, gradient accumulation, bf16 autocast over fp32 master weights, gradient
checkpointing, checkpoints and exact resume, keep-best, DDP/FSDP through accelerate) is the stock Trainer's.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from .scoring import label_scores

# Logged at every logging step (means over the steps since the last log, averaged over processes).
TRAIN_PARTS = ("nll_base", "nll_mixed", "policy_loss", "reward_mean", "mixing_weight")
WEIGHT_BINS = 10  # histogram of the mixing weight w over [0, 1], logged at every evaluation
HARD_TOKENS = 5  # evaluations also log the thoughts at the held-out tokens the base finds hardest (highest NLL)
HEAD_MODULE, MARKER_MODULE = "mixing_head.", "thought_markers."  # parameter-name parts (also under a PEFT wrapper)


@dataclass
class QuietStarTrainingArguments(TrainingArguments):
    """`TrainingArguments` (the `training:` section of a config) plus the Quiet-STaR parameter groups.
    `learning_rate` trains the base model; the mixing head and the thought markers may have their own rates."""

    head_learning_rate: float | None = field(
        default=None, metadata={"help": "learning rate of the mixing head (None = learning_rate; 0 = frozen)"}
    )
    marker_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the stored marker embeddings (None = learning_rate). They are stored divided by "
            "quietstar.thought_embedding_scale and multiplied back on use, so the embeddings move at this rate "
            "times the scale (paper: 100)."
        },
    )
    head_frozen_steps: int = field(
        default=0,
        metadata={"help": "the mixing head is not trained (its gradients dropped before clipping) for this many steps"},
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={"help": "torch intra-op threads while this run trains (None = torch's default); a model of a few "
                  "hundred thousand parameters trains ~3x faster on 1 thread than on 2 (thread overhead)"},
    )


class QuietStarTrainer(Trainer):
    """A `Trainer` for `QuietStarForCausalLM` (and for the plain causal LMs of a recipe's plain stages and controls).

    `evaluate()` scores every labelled next token of the eval set: `{prefix}_nll` and `{prefix}_accuracy` (share of
    examples whose labelled tokens are all the argmax) of the model's own prediction, the one `generate()` uses. For a
    Quiet-STaR model that is the mixed prediction, with thoughts written by the inference policy (greedy by default;
    sampled ones under a fixed seed, `args.seed`, so two evaluations of the same weights agree exactly), and it also
    returns the base path's `{prefix}_nll_base` / `{prefix}_accuracy_base`, `{prefix}_nll_mixed` (= `_nll`),
    `{prefix}_nll_gain` (base - mixed: > 0 when thinking helps) and the mean mixing weight. The log of each evaluation
    (metrics.jsonl) also has `{prefix}_mixing_weight_histogram` (counts of w in `WEIGHT_BINS` equal bins of [0, 1])
    and `{prefix}_hard_tokens`: at the `HARD_TOKENS` tokens with the highest base NLL, the text before, the token,
    the decoded thought and both NLLs. Keep-best is the stock `load_best_model_at_end` with `metric_for_best_model`
    one of these (e.g. "accuracy")."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: list[torch.Tensor] = []  # one (len(TRAIN_PARTS),) row per micro-batch since the last log

    # ---- parameter groups ------------------------------------------------------------------------------------------

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The stock optimizer (its weight-decay groups), each group split into base, head and marker parameters,
        the latter two at `head_learning_rate` / `marker_learning_rate` when set."""
        optimizer = super().create_optimizer(model)
        rates = {HEAD_MODULE: self._arg("head_learning_rate"), MARKER_MODULE: self._arg("marker_learning_rate")}
        if all(rate is None for rate in rates.values()):
            return optimizer
        names = {id(p): name for name, p in (model or self.model).named_parameters()}
        part_of = {key: next((part for part in rates if part in name), None) for key, name in names.items()}
        groups = []
        for group in optimizer.param_groups:
            for part in (None, *rates):
                params = [p for p in group["params"] if part_of.get(id(p)) == part]
                if params:
                    own_rate = rates.get(part)
                    groups.append({**group, "params": params, "lr": group["lr"] if own_rate is None else own_rate})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._head_frozen():  # None, not zero: clipping and the optimizer then leave the head out entirely
            for name, parameter in model.named_parameters():
                if HEAD_MODULE in name:
                    parameter.grad = None
        return loss

    def _head_frozen(self) -> bool:
        return self.state.global_step < (self._arg("head_frozen_steps") or 0) or self._arg("head_learning_rate") == 0

    def _arg(self, name: str):
        """A `QuietStarTrainingArguments` field; None when the trainer was given plain `TrainingArguments`."""
        return getattr(self.args, name, None)

    # ---- logging ---------------------------------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training and getattr(outputs, "mixing_weights", None) is not None:
            self._parts.append(_loss_parts(outputs, inputs.get("attention_mask")))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:  # a training log; every process gets here, so the reduce is safe
            means = self.accelerator.reduce(torch.stack(self._parts).mean(dim=0), reduction="mean")
            logs.update({name: round(value, 6) for name, value in zip(TRAIN_PARTS, means.tolist())})
            self._parts.clear()
        super().log(logs, start_time)

    # ---- evaluation ------------------------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Per-token NLL and per-example exact match of the labelled tokens, without thinking (`base_logits`) and with
        it (`logits`: the mixed prediction, as used by `generate()`), over the same tokens; logged and returned."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped if self.is_fsdp_enabled else self.model  # FSDP needs its wrapper to gather weights
        thinking = hasattr(self.model, "marker_ids")
        was_training = model.training
        model.eval()
        totals = dict.fromkeys(("nll", "nll_base", "exact", "exact_base", "weight", "tokens", "examples"), 0.0)
        histogram = torch.zeros(WEIGHT_BINS, dtype=torch.float64, device=self.args.device)
        hard: list[tuple[float, dict]] = []  # (base NLL, record) of the hardest tokens seen so far
        devices = [self.args.device] if self.args.device.type == "cuda" else []
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.args.seed)  # the same thoughts at every evaluation; the training RNG is untouched
            for batch in dataloader:
                batch = self._prepare_inputs(batch)
                labels = batch.pop("labels")
                with self.autocast_smart_context_manager():
                    outputs = model(**batch)  # no labels: only the next token is predicted, no loss terms
                scores = label_scores(outputs, labels, self.model.marker_ids if thinking else None)
                base = scores.base if thinking else scores.mixed  # a plain LM's only prediction is its own
                totals["nll"] += scores.mixed.row_nll().sum().item()
                totals["nll_base"] += base.row_nll().sum().item()
                totals["exact"] += scores.mixed.row_exact().sum().item()
                totals["exact_base"] += base.row_exact().sum().item()
                totals["tokens"] += scores.valid.sum().item()
                totals["examples"] += len(labels)
                if thinking:
                    totals["weight"] += (scores.mixing_weight * scores.valid).sum().item()
                    weights = scores.mixing_weight[scores.valid].double()
                    histogram += torch.histc(weights, bins=WEIGHT_BINS, min=0, max=1)
                    hard = _hardest(
                        hard, batch["input_ids"], outputs.thought_ids, -base.log_probs, -scores.mixed.log_probs,
                        scores.valid, self.processing_class,
                    )
        model.train(was_training)
        summed = torch.tensor(list(totals.values()), dtype=torch.float64, device=self.args.device)
        totals = dict(zip(totals, self.accelerator.reduce(summed, reduction="sum").tolist()))
        histogram = self.accelerator.reduce(histogram, reduction="sum")
        tokens, examples = max(totals["tokens"], 1), max(totals["examples"], 1)
        nll_mixed, nll_base = totals["nll"] / tokens, totals["nll_base"] / tokens
        metrics = {
            f"{metric_key_prefix}_nll": round(nll_mixed, 6),
            f"{metric_key_prefix}_accuracy": round(totals["exact"] / examples, 6),
        }
        details = {}
        if thinking:
            metrics.update({
                f"{metric_key_prefix}_nll_base": round(nll_base, 6),
                f"{metric_key_prefix}_nll_mixed": round(nll_mixed, 6),
                f"{metric_key_prefix}_nll_gain": round(nll_base - nll_mixed, 6),
                f"{metric_key_prefix}_accuracy_base": round(totals["exact_base"] / examples, 6),
                f"{metric_key_prefix}_mixing_weight": round(totals["weight"] / tokens, 6),
            })
            details = {  # logged (metrics.jsonl), not returned: the Trainer's metrics are numbers
                f"{metric_key_prefix}_mixing_weight_histogram": [int(count) for count in histogram.tolist()],
                f"{metric_key_prefix}_hard_tokens": [record for _, record in hard],  # this process's eval shard
            }
        self.log({**metrics, **details})
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def _hardest(hard, input_ids, thought_ids, nll_base, nll_mixed, valid, tokenizer) -> list[tuple[float, dict]]:
    """Merge this batch's valid tokens into the `HARD_TOKENS` with the highest base NLL: (nll, record) pairs, where the
    record has the 8 tokens before, the token, the (first) thought written after the position and both NLLs."""
    decode = tokenizer.decode if tokenizer is not None else str
    scores = torch.where(valid, nll_base, float("-inf")).flatten()
    for index in scores.topk(min(HARD_TOKENS, int(valid.sum()))).indices.tolist():
        row, position = divmod(index, valid.shape[1])
        record = {
            "context": decode(input_ids[row, max(0, position - 7) : position + 1].tolist()),
            "token": decode(input_ids[row, position + 1 : position + 2].tolist()),
            "thought": decode(thought_ids[row, 0, position].tolist()),
            "nll_base": round(float(nll_base[row, position]), 4),
            "nll_mixed": round(float(nll_mixed[row, position]), 4),
        }
        hard.append((float(nll_base[row, position]), record))
    return sorted(hard, key=lambda pair: -pair[0])[:HARD_TOKENS]


def _loss_parts(outputs, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(len(TRAIN_PARTS),) detached float32: the output's loss parts and its mean mixing weight over the real tokens
    that thought (all of them unless `thought_positions="scored"`)."""
    weights = outputs.mixing_weights.detach().float()  # (B, N, L)
    mask = outputs.thought_ids[..., 0] >= 0  # (B, N, L): -100 where a position did not think
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()
    mask = mask.to(weights)
    mean_weight = (weights * mask).sum() / mask.sum().clamp(min=1)
    parts = [outputs.nll_base, outputs.nll_mixed, outputs.policy_loss, outputs.reward_mean]
    return torch.stack([part.detach().float() for part in parts] + [mean_weight])


class JsonlMetricsCallback(TrainerCallback):
    """Appends every log (training parts, learning rate, evaluations) to a JSON-lines file, one object per line with
    its `step`; only the main process writes. Appending keeps the history of a resumed run in one file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as file:
                file.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StopAtMetric(TrainerCallback):
    """Ends training at the first evaluation whose `metric` (without its prefix, e.g. "accuracy") reaches `target`:
    a recipe stage that trains "until the model can do X" (multihop: write held-out chains)."""

    def __init__(self, metric: str, target: float):
        self.metric, self.target = metric, target
        self.reached, self.last = False, None  # `last`: the metric at the latest evaluation

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        value = next((v for k, v in (metrics or {}).items() if k.endswith(f"_{self.metric}")), None)
        if value is not None:
            self.last = value
        if value is not None and value >= self.target:
            self.reached = control.should_training_stop = True


__all__ = ["QuietStarTrainer", "QuietStarTrainingArguments", "JsonlMetricsCallback", "StopAtMetric", "TRAIN_PARTS"]
