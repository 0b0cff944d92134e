"""`QuietStarTrainer`: transformers' `Trainer`, plus the Quiet-STaR loss parts in the logs and a held-out evaluation
of the next-token NLL without thoughts (base) and with them (mixed).

Everything else (optimizer, schedule, gradient accumulation, bf16 autocast over fp32 master weights, gradient
checkpointing, checkpoints and exact resume, DDP/FSDP through accelerate) is the stock Trainer's.
"""

import json
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from .scoring import next_token_log_probs

# Logged at every logging step (means over the steps since the last log, averaged over processes).
TRAIN_PARTS = ("nll_base", "nll_mixed", "policy_loss", "reward_mean", "mixing_weight")
WEIGHT_BINS = 10  # histogram of the mixing weight w over [0, 1], logged at every evaluation
HARD_TOKENS = 5  # evaluations also log the thoughts at the held-out tokens the base finds hardest (highest NLL)


class QuietStarTrainer(Trainer):
    """A `Trainer` for `QuietStarForCausalLM`. `evaluate()` returns `{prefix}_nll_base` and `{prefix}_nll_mixed`, the
    mean NLL of every next token of the eval set without and with thinking, `{prefix}_nll_gain` (base - mixed: > 0
    when thinking helps) and the mean mixing weight, with thoughts written by the inference policy (greedy by
    default; sampled ones under a fixed seed, `args.seed`), so two evaluations of the same weights agree exactly.
    The log of each evaluation (metrics.jsonl) also has `{prefix}_mixing_weight_histogram` (counts of w in
    `WEIGHT_BINS` equal bins of [0, 1]) and `{prefix}_hard_tokens`: at the `HARD_TOKENS` tokens with the highest base
    NLL, the text before, the token, the decoded thought and both NLLs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parts: list[torch.Tensor] = []  # one (len(TRAIN_PARTS),) row per micro-batch since the last log

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._parts.append(_loss_parts(outputs, inputs.get("attention_mask")))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._parts:  # a training log; every process gets here, so the reduce is safe
            means = self.accelerator.reduce(torch.stack(self._parts).mean(dim=0), reduction="mean")
            logs.update({name: round(value, 6) for name, value in zip(TRAIN_PARTS, means.tolist())})
            self._parts.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-level NLL of each next token without thinking (`base_logits`) and with it (`logits`: the mixed
        prediction, as used by `generate()`), over the same tokens; logged and returned."""
        dataloader = self.get_eval_dataloader(eval_dataset)
        model = self.model_wrapped if self.is_fsdp_enabled else self.model  # FSDP needs its wrapper to gather weights
        was_training = model.training
        model.eval()
        totals = torch.zeros(4, dtype=torch.float64, device=self.args.device)  # NLL sums base, mixed; weight sum; tokens
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
                valid = labels[:, 1:] != -100
                token_base, token_mixed = next_token_log_probs(outputs, labels[:, 1:].clamp(min=0), self.model.marker_ids)
                weights = outputs.mixing_weights[:, :, :-1].float().mean(dim=1)  # (B, L-1)
                base, mixed = -(token_base * valid).sum(), -(token_mixed * valid).sum()
                totals += torch.stack([base, mixed, (weights * valid).sum(), valid.sum()]).to(totals)
                histogram += torch.histc(weights[valid].double(), bins=WEIGHT_BINS, min=0, max=1)
                hard = _hardest(hard, batch["input_ids"], outputs.thought_ids, -token_base, -token_mixed, valid, self.processing_class)
        model.train(was_training)
        totals = self.accelerator.reduce(totals, reduction="sum")
        histogram = self.accelerator.reduce(histogram, reduction="sum")
        nll_base, nll_mixed, weight = (totals[:3] / totals[3].clamp(min=1)).tolist()
        metrics = {
            f"{metric_key_prefix}_nll_base": round(nll_base, 6),
            f"{metric_key_prefix}_nll_mixed": round(nll_mixed, 6),
            f"{metric_key_prefix}_nll_gain": round(nll_base - nll_mixed, 6),
            f"{metric_key_prefix}_mixing_weight": round(weight, 6),
        }
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
    """(len(TRAIN_PARTS),) detached float32: the output's loss parts and its mean mixing weight over real tokens."""
    weights = outputs.mixing_weights.detach().float()  # (B, N, L)
    if attention_mask is not None:
        mask = attention_mask[:, None, :].expand_as(weights).to(weights)
        mean_weight = (weights * mask).sum() / mask.sum().clamp(min=1)
    else:
        mean_weight = weights.mean()
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


__all__ = ["QuietStarTrainer", "JsonlMetricsCallback", "TRAIN_PARTS"]
