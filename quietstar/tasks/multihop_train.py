"""`quietstar train multihop`: learn to think on the multi-hop task (tasks/multihop.py), from scratch, on a CPU.

Stage 1, a plain language model. A small llama learns to write the chain (`... Q n7 : n19 n2 n4 |`, loss on the
tokens after ":"), until it writes held-out chains correctly. It then trains on for `filler_steps` with "---" inserted at
random gaps after ":" (never a target): "---" becomes a pause that carries no content. The thought markers start from
"---" (paper), so `<|startofthought|>` begins as such a pause, and the model's own continuation, its chain, is what the
thought holds at first. No thought is ever written by the recipe: the thoughts are the model's samples.

Stage 2, Quiet-STaR on direct answers (`... Q n7 : n4 |`, labels on the answer only). Settings, each from the evidence
in the "Thinking that helps" issue:
    thought_nll_weight 1       the readout after the thought learns whatever the mixing weight w is;
    initial_mixing_logit 0     w starts at 0.5, so the mixed prediction can use the thought at once;
    base_loss_weight 0         the base is not trained towards the direct answer, which it cannot compute and which
                               would overwrite its chain-writing (the forgetting diagnostic);
    policy_weight 1, N = 4     REINFORCE over 4 sampled thoughts with their mean as baseline; rewards are nats;
    lookahead 1, T = 3         the answer is one token; three thought tokens hold the chain;
    two learning rates         body_lr for the base, head_lr for the mixing head and the markers.

Held-out evaluation (problems from a seed training never uses) with greedy thoughts, as inference writes them: answer
NLL and accuracy without and with thoughts, w at the answer position, how often the thought at ":" holds the true
intermediate nodes, decoded thoughts, and the base's chain-writing accuracy (does stage 2 make it forget?).
Written to DIR: the Quiet-STaR model and tokenizer, `base/` (stage 1), `metrics.jsonl`, `report.json`, `report.md`
and `gain.svg` (answer NLL gain and accuracies against the stage-2 step).
"""

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ..modeling_quietstar import QuietStarForCausalLM
from ..plots import line_plot
from ..scoring import next_token_distributions, right_pad
from . import metrics_log, multihop
from .bootstrap import bootstrap_ci

FILLER = "---"
EVAL_SEED_OFFSET = 1_000_003  # held-out problems come from seed + this offset; training uses seed + step


@dataclass
class MultihopSettings:
    """Every knob of the recipe; `quietstar train multihop --steps 50` overrides one."""

    seed: int = 0
    # stage 1: the plain language model
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    base_lr: float = 3e-3
    base_batch_size: int = 64
    base_max_steps: int = 3000
    base_target_accuracy: float = 0.98  # held-out chain accuracy that ends the chain phase (checked every 100 steps)
    filler_steps: int = 300
    filler_rate: float = 0.3
    # stage 2: Quiet-STaR
    thought_length: int = 3
    n_thoughts: int = 4
    steps: int = 100
    batch_size: int = 16
    body_lr: float = 3e-4
    head_lr: float = 1e-3
    thought_nll_weight: float = 1.0
    initial_mixing_logit: float = 0.0
    base_loss_weight: float = 0.0
    mixed_loss_weight: float = 1.0
    policy_weight: float = 1.0
    eval_every: int = 25
    eval_problems: int = 256

    @classmethod
    def from_overrides(cls, overrides: dict) -> "MultihopSettings":
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key not in fields:
                raise ValueError(f"multihop: unknown setting {key!r}; settings are {sorted(fields)}.")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"multihop: {key} = {value!r} must be a number.")
        return cls(**overrides)


# ---- encoding ----------------------------------------------------------------------------------------------------------


def encode(tokenizer, texts: list[str], score: str, filler_rate: float = 0.0, rng: random.Random | None = None):
    """Texts -> (input_ids, attention_mask, labels), right-padded. `score`: "chain" = labels on every token after ":",
    "answer" = on the answer token only (the one before the final "|"). With `filler_rate`, "---" is inserted at each
    gap after ":" with that probability; it is never a target."""
    colon, filler = tokenizer.convert_tokens_to_ids([":", FILLER])
    sequences, targets = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        start = ids.index(colon) + 1
        if filler_rate:
            chain = []
            for token in ids[start:]:
                if rng.random() < filler_rate:
                    chain.append(filler)
                chain.append(token)
            ids = ids[:start] + chain
        scored = range(start, len(ids)) if score == "chain" else [len(ids) - 2]
        sequences.append(ids)
        targets.append({k for k in scored if ids[k] != filler})
    input_ids, attention_mask = right_pad(sequences, tokenizer.pad_token_id)
    labels = torch.full_like(input_ids, -100)
    for row, scored in enumerate(targets):
        for k in scored:
            labels[row, k] = input_ids[row, k]
    return input_ids, attention_mask, labels


# ---- stage 1 -----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def chain_accuracy(model, tokenizer, problems: list[multihop.Problem]) -> float:
    """Share of problems whose whole chain (and end mark) the model predicts right, teacher-forced, no thinking."""
    input_ids, attention_mask, labels = encode(tokenizer, [p.chain_text for p in problems], "chain")
    base = model.model if isinstance(model, QuietStarForCausalLM) else model
    was_training = base.training
    base.eval()
    predicted = base(input_ids=input_ids, attention_mask=attention_mask).logits.argmax(-1)
    base.train(was_training)
    targets = labels[:, 1:]
    return float(((predicted[:, :-1] == targets) | (targets == -100)).all(dim=1).float().mean())


def train_base(settings: MultihopSettings, tokenizer, log) -> tuple[LlamaForCausalLM, dict]:
    """Stage 1: chains until `base_target_accuracy` on held-out problems (or `base_max_steps`), then `filler_steps`."""
    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=settings.hidden_size, intermediate_size=4 * settings.hidden_size,
        num_hidden_layers=settings.layers, num_attention_heads=settings.heads, num_key_value_heads=settings.heads,
        max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr, weight_decay=0.01)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 100))
    held_out = multihop.generate(settings.eval_problems, settings.seed + EVAL_SEED_OFFSET)
    rng = random.Random(settings.seed)
    start, step, chain_step, accuracy = time.perf_counter(), 0, None, 0.0
    while chain_step is None or step < chain_step + settings.filler_steps:
        if chain_step is None and step >= settings.base_max_steps:
            raise RuntimeError(
                f"stage 1 did not reach chain accuracy {settings.base_target_accuracy} in {step} steps (held-out: "
                f"{accuracy:.3f}). Raise base_max_steps or base_lr."
            )
        filling = chain_step is not None
        texts = [p.chain_text for p in multihop.generate(settings.base_batch_size, settings.seed * 7919 + step)]
        batch = encode(tokenizer, texts, "chain", settings.filler_rate if filling else 0.0, rng)
        loss = model(input_ids=batch[0], attention_mask=batch[1], labels=batch[2]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % 100 == 0:
            accuracy = chain_accuracy(model, tokenizer, held_out)
            log({"stage": 1, "step": step, "loss": round(loss.item(), 4), "chain_accuracy": accuracy})
            if chain_step is None and accuracy >= settings.base_target_accuracy:
                chain_step = step
    summary = {
        "steps": step, "chain_steps": chain_step, "chain_accuracy": chain_accuracy(model, tokenizer, held_out),
        "seconds": round(time.perf_counter() - start, 1),
    }
    return model, summary


# ---- stage 2 -----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: QuietStarForCausalLM, tokenizer, problems: list[multihop.Problem], n_shown: int = 8) -> dict:
    """Held-out answer NLL and accuracy without / with (greedy) thoughts, w at ":", the thoughts' chain content."""
    was_training = model.training
    model.eval()
    input_ids, attention_mask, labels = encode(tokenizer, [p.direct_text for p in problems], "answer")
    outputs = model(input_ids=input_ids, attention_mask=attention_mask)
    rows = torch.arange(len(problems))
    answer_position = (labels != -100).int().argmax(dim=1)  # encode() labels the answer token alone
    position, answer = answer_position - 1, labels[rows, answer_position]  # ":" predicts the answer
    base, mixed = (d[rows, position].float() for d in next_token_distributions(outputs, model.marker_ids))
    thoughts = outputs.thought_ids[rows, 0, position]  # (P, T) greedy: one chain
    node_ids = [tokenizer.convert_tokens_to_ids(list(p.chain[:-1])) for p in problems]
    holds_all = [all(i in t for i in ids) for t, ids in zip(thoughts.tolist(), node_ids)]
    holds_any = [any(i in t for i in ids) for t, ids in zip(thoughts.tolist(), node_ids)]
    nll_base, nll_mixed = -base[rows, answer], -mixed[rows, answer]
    right_base, right_mixed = (base.argmax(-1) == answer).float(), (mixed.argmax(-1) == answer).float()
    result = {
        "answer_nll_without": float(nll_base.mean()),
        "answer_nll_with": float(nll_mixed.mean()),
        "nll_gain": float((nll_base - nll_mixed).mean()),
        "nll_gain_ci95": bootstrap_ci((nll_base - nll_mixed).tolist()),
        "accuracy_without": float(right_base.mean()),
        "accuracy_with": float(right_mixed.mean()),
        "accuracy_gain_ci95": bootstrap_ci((right_mixed - right_base).tolist()),
        "mixing_weight": float(outputs.mixing_weights[rows, 0, position].mean()),
        "thoughts_with_all_intermediates": sum(holds_all) / len(problems),
        "thoughts_with_any_intermediate": sum(holds_any) / len(problems),
        "base_chain_accuracy": chain_accuracy(model, tokenizer, problems),
        "thoughts": [
            {"question": p.prompt[-12:], "thought": tokenizer.decode(t), "chain": " ".join(p.chain)}
            for p, t in zip(problems[:n_shown], thoughts.tolist())
        ],
    }
    model.train(was_training)
    return result


def train_thinking(base: LlamaForCausalLM, tokenizer, settings: MultihopSettings, log) -> tuple[QuietStarForCausalLM, list]:
    """Stage 2: Quiet-STaR on direct answers; evaluations every `eval_every` steps (and at step 0) are returned."""
    torch.manual_seed(settings.seed)
    model, tokenizer = QuietStarForCausalLM.from_base(
        base, tokenizer, thought_length=settings.thought_length, n_thoughts=settings.n_thoughts, lookahead=1,
        thought_nll_weight=settings.thought_nll_weight, initial_mixing_logit=settings.initial_mixing_logit,
        base_loss_weight=settings.base_loss_weight, mixed_loss_weight=settings.mixed_loss_weight,
        policy_weight=settings.policy_weight, thought_temperature=1.0, inference_thought_temperature=0.0,
    )
    body = [p for name, p in model.named_parameters() if name.startswith(f"{model.base_model_prefix}.")]
    head = [p for name, p in model.named_parameters() if not name.startswith(f"{model.base_model_prefix}.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": settings.body_lr}, {"params": head, "lr": settings.head_lr}], weight_decay=0.0
    )
    held_out = multihop.generate(settings.eval_problems, settings.seed + EVAL_SEED_OFFSET)
    history = [{"step": 0, **evaluate(model, tokenizer, held_out)}]
    log({"stage": 2, **history[-1]})
    model.train()
    for step in range(1, settings.steps + 1):
        texts = [p.direct_text for p in multihop.generate(settings.batch_size, settings.seed * 104729 + step)]
        input_ids, attention_mask, labels = encode(tokenizer, texts, "answer")
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % settings.eval_every == 0 or step == settings.steps:
            parts = {  # nll_thought is None when its weight is 0
                name: round(float(getattr(outputs, name).detach()), 4)
                for name in ("loss", "nll_mixed", "nll_thought", "policy_loss", "reward_mean")
                if getattr(outputs, name) is not None
            }
            history.append({"step": step, **parts, **evaluate(model, tokenizer, held_out)})
            log({"stage": 2, **history[-1]})
    return model, history


# ---- the run -------------------------------------------------------------------------------------------------------------


def run_multihop(output_dir: str | Path, settings: MultihopSettings | None = None) -> dict:
    """Both stages; saves the model, tokenizer and report into `output_dir`; returns the report."""
    settings = settings or MultihopSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    log = metrics_log(output_dir / "metrics.jsonl", hidden=("thoughts",))

    start = time.perf_counter()
    tokenizer = multihop.tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # models this small: 1 thread ran 3x faster than 2 on a 2-core machine (intra-op overhead)
    try:
        base, stage1 = train_base(settings, tokenizer, log)
        base.save_pretrained(output_dir / "base")
        tokenizer.save_pretrained(output_dir / "base")
        model, history = train_thinking(base, tokenizer, settings, log)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    final = history[-1]
    report = {
        "settings": dataclasses.asdict(settings),
        "stage1": stage1,
        "history": history,
        "final": final,
        "targets": {
            "accuracy_gain_points": 100 * (final["accuracy_with"] - final["accuracy_without"]),
            "accuracy_gain_at_least_20": final["accuracy_with"] - final["accuracy_without"] >= 0.20,
            "nll_gain_at_least_0.5": final["nll_gain"] >= 0.5,
        },
        "seconds": round(time.perf_counter() - start, 1),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    (output_dir / "report.md").write_text(format_report(report))
    steps = [h["step"] for h in history]
    line_plot(
        {
            "answer NLL gain (nats)": (steps, [h["nll_gain"] for h in history]),
            "accuracy with thoughts": (steps, [h["accuracy_with"] for h in history]),
            "accuracy without": (steps, [h["accuracy_without"] for h in history]),
        },
        output_dir / "gain.svg", title="multihop: held-out gain of thinking", xlabel="stage-2 step", ylabel="",
    )
    return report


def format_report(report: dict) -> str:
    final, stage1 = report["final"], report["stage1"]
    lines = [
        "# multihop: does thinking help?",
        "",
        f"Stage 1: {stage1['steps']} steps ({stage1['chain_steps']} to chain accuracy, then fillers), held-out chain "
        f"accuracy {stage1['chain_accuracy']:.3f}, {stage1['seconds']} s. Whole run: {report['seconds']} s.",
        "",
        f"Held-out: {report['settings']['eval_problems']} problems (seed + {EVAL_SEED_OFFSET}), greedy thoughts.",
        "",
        "| step | answer NLL without | with thoughts | gain [95% CI] | accuracy without | with thoughts | gain [95% CI] | w at ':' | thoughts holding x1, x2 | base chain accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for h in report["history"]:
        low, high = h["nll_gain_ci95"]
        accuracy_low, accuracy_high = h["accuracy_gain_ci95"]
        lines.append(
            f"| {h['step']} | {h['answer_nll_without']:.3f} | {h['answer_nll_with']:.3f} | {h['nll_gain']:+.3f} "
            f"[{low:+.3f}, {high:+.3f}] | {h['accuracy_without']:.3f} | {h['accuracy_with']:.3f} | "
            f"{h['accuracy_with'] - h['accuracy_without']:+.3f} [{accuracy_low:+.3f}, {accuracy_high:+.3f}] | "
            f"{h['mixing_weight']:.3f} | {h['thoughts_with_all_intermediates']:.3f} | {h['base_chain_accuracy']:.3f} |"
        )
    targets = report["targets"]
    lines += [
        "",
        f"Targets: accuracy +{targets['accuracy_gain_points']:.1f} points (>= 20: {targets['accuracy_gain_at_least_20']}), "
        f"NLL gain {final['nll_gain']:+.3f} nats (>= 0.5: {targets['nll_gain_at_least_0.5']}).",
        "",
        "Decoded thoughts at ':' (final model):",
        "",
        "| question ends | thought | true chain |",
        "|---|---|---|",
        *(f"| `{t['question']}` | `{t['thought']}` | `{t['chain']}` |" for t in final["thoughts"]),
        "",
    ]
    return "\n".join(lines)


__all__ = ["MultihopSettings", "run_multihop", "train_base", "train_thinking", "evaluate", "encode"]
