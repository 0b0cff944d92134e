"""`quietstar train gsm8k --data DIR --output-dir OUT`: Quiet-STaR on SmolLM2-135M-Instruct with GSM8K solutions, sized
for a 2-core CPU (under 60 minutes), and a held-out likelihood report on GSM8K test solutions.

Data: DIR holds GSM8K's `train.jsonl` and `test.jsonl` (`{"question", "answer"}` lines; nothing is downloaded). A text
is `Q: {question}\\nA: {solution}`; labels are on the solution tokens only (the question is context). Training draws
from train.jsonl minus its last `validation_problems`, which give the gain curve during training; the test set is
scored once, at the end.

Settings, from what the multi-hop recipe (tasks/multihop_train.py) taught:
    thought_nll_weight 4      the readout after the thought learns whatever w is; 4, not 1: the post-thought
                              prediction starts ~3 nats behind the base's and must catch up within 100 steps (paired
                              30-step pilot on training problems, RESULTS: the thought path's gap to the base shrank
                              by 0.1 nats, the training-batch gain rose by 0.017, the base path's NLL rose by 0.05);
    initial_mixing_logit -1   w starts at 0.27: thoughts count at once, without swamping a pretrained model's
                              prediction with that of untrained thoughts;
    base_loss_weight 1        the base path learns the same text, so the gain compares two predictors trained alike;
    policy_weight 1, N = 2    REINFORCE with the mean of the two thoughts as baseline; rewards are nats;
    policy_reward thought     a thought is rewarded by the post-thought prediction alone, not the mixture: with w
                              at 0.27 the paper's reward is 0.27x as large (same pilot: training-batch gain +0.011,
                              base path's NLL +0.01);
    lookahead 1, T = 2        the budget is compute: every position thinks, 1 + N (T + 2) token passes each;
    body_lr 1e-4              for the base model and (x thought_embedding_scale) the markers;
    eval_every 25, keep_best  validation every 25 steps; the checkpoint with the highest validation gain is kept (in
                              runs 4 and 5 the validation gain peaked at step 50 and fell by step 100);
    head_lr 0                 the mixing head is not trained in a run this short: w stays 0.27. Trained from step 1
                              (lr 1e-3, run 2 in RESULTS) it shut w to ~3e-5 within 8 steps, while post-thought
                              predictions were still ~2 nats worse than the base's, and never reopened it; trained
                              from step 61 (run 3) it shut w again within 20 steps, although the fixed w had given a
                              positive validation gain at step 50. `--head_lr 1e-3 --head_frozen_steps 60` is run 3.

Report (`report.json`, `report.md`): per solution token, the NLL without thoughts (the trained model's own base path),
with (greedy) thoughts, and of the untrained SmolLM2; the gain (without - with) with a 95% bootstrap interval over
problems, overall, by quartile of the base NLL, and on the answer digits after '####'; the mean w; decoded thoughts at
the hardest tokens. Also written: the model and tokenizer, `metrics.jsonl` and `gain.svg` (validation gain vs step).
"""

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..datafiles import read_jsonl
from ..modeling_quietstar import QuietStarForCausalLM
from ..plots import line_plot
from ..qa import GSM8K_EXAMPLE, answer_prompt
from ..scoring import next_token_log_probs, right_pad
from . import metrics_log
from .bootstrap import bootstrap_ci

ANSWER_MARK = "####"


@dataclass
class Gsm8kSettings:
    """Every knob of the recipe; `quietstar train gsm8k --data DIR --steps 10` overrides one."""

    data: str | None = None  # directory with GSM8K's train.jsonl and test.jsonl
    base: str | None = None  # None = the embedded SmolLM2-135M-Instruct; or a local model directory / .gguf
    seed: int = 0
    thought_length: int = 2
    n_thoughts: int = 2
    steps: int = 100
    batch_size: int = 1
    max_length: int = 128  # training texts are cut to this many tokens (the solution's end is dropped)
    min_solution_tokens: int = 32  # training problems whose cut text keeps fewer solution tokens are skipped
    body_lr: float = 1e-4
    head_lr: float = 0.0  # 0 = the mixing head is not trained: w stays sigmoid(initial_mixing_logit) = 0.27
    head_frozen_steps: int = 60  # with head_lr > 0: the mixing head starts training after this many steps
    thought_nll_weight: float = 4.0
    initial_mixing_logit: float = -1.0
    base_loss_weight: float = 1.0
    mixed_loss_weight: float = 1.0
    policy_weight: float = 1.0
    policy_reward: str = "thought"  # rewards measured on the post-thought prediction alone; "mixed" = the paper's
    validation_problems: int = 16  # held out from train.jsonl for the gain curve
    eval_every: int = 25
    keep_best: int = 1  # 1 = the trained checkpoint with the highest validation gain is the one tested and saved
    eval_problems: int = 100  # the first N of test.jsonl
    eval_batch_size: int = 4

    def __post_init__(self):
        for name in ("steps", "batch_size", "validation_problems", "eval_every", "eval_problems", "eval_batch_size", "thought_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"gsm8k: {name} must be >= 1, got {getattr(self, name)}.")
        if self.keep_best not in (0, 1):
            raise ValueError(f"gsm8k: keep_best must be 0 or 1, got {self.keep_best}.")
        if self.n_thoughts < 2:
            raise ValueError(f"gsm8k: n_thoughts must be >= 2 (the REINFORCE baseline is their mean), got {self.n_thoughts}.")

    @classmethod
    def from_overrides(cls, overrides: dict) -> "Gsm8kSettings":
        fields = {f.name for f in dataclasses.fields(cls)}
        for key, value in overrides.items():
            if key not in fields:
                raise ValueError(f"gsm8k: unknown setting {key!r}; settings are {sorted(fields)}.")
            if key in ("data", "base", "policy_reward"):
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ValueError(f"gsm8k: {key} = {value!r} must be a number.")
        settings = cls(**overrides)
        if settings.data is None:
            raise ValueError("gsm8k: give --data DIR, a directory with GSM8K's train.jsonl and test.jsonl.")
        return settings


# ---- data ----------------------------------------------------------------------------------------------------------------


def load_problems(data_dir: str | Path, split: str) -> list[dict]:
    """`{"question", "answer"}` records of DIR/{split}.jsonl, in file order; each answer must contain '#### <number>'."""
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"gsm8k: no {split}.jsonl in {data_dir}; --data must be a directory with GSM8K's train.jsonl and test.jsonl.")
    records = []
    for line, record in read_jsonl(path, {"question": str, "answer": str}, GSM8K_EXAMPLE):
        if ANSWER_MARK not in record["answer"]:
            raise ValueError(f"{path}, line {line}: the answer has no '{ANSWER_MARK} <number>', e.g. {GSM8K_EXAMPLE}")
        records.append(record)
    return records


def encode(tokenizer, problems: list[dict], max_length: int | None = None):
    """Problems -> input_ids, attention_mask (B, L) right-padded, labels (B, L) on the solution tokens (-100 on the
    question and padding), digits (B, L) True on the tokens after '####' (the final answer)."""
    sequences, scored, answer = [], [], []
    for problem in problems:
        prompt = answer_prompt(problem["question"])
        text = f"{prompt} {problem['answer']}"
        encoding = tokenizer(text, return_offsets_mapping=True)
        ids, offsets = encoding["input_ids"][:max_length], encoding["offset_mapping"][:max_length]
        answer_start = text.rindex(ANSWER_MARK) + len(ANSWER_MARK)
        sequences.append(ids)
        scored.append([start >= len(prompt) for start, _ in offsets])
        answer.append([start >= answer_start for start, _ in offsets])
    input_ids, attention_mask = right_pad(sequences, tokenizer.pad_token_id or 0)
    labels = torch.full_like(input_ids, -100)
    digits = torch.zeros_like(input_ids, dtype=torch.bool)
    for row, (flags, answer_flags) in enumerate(zip(scored, answer)):
        labels[row, : len(flags)] = torch.where(torch.tensor(flags), input_ids[row, : len(flags)], -100)
        digits[row, : len(flags)] = torch.tensor(answer_flags)
    return input_ids, attention_mask, labels, digits


# ---- evaluation ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def score_plain(model, tokenizer, problems: list[dict], batch_size: int) -> list[list[float]]:
    """NLL of every solution token under a plain causal LM (the untrained base), per problem."""
    per_problem = []
    for start in range(0, len(problems), batch_size):
        input_ids, attention_mask, labels, _ = encode(tokenizer, problems[start : start + batch_size])
        log_probs = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float().log_softmax(-1)
        nll = -log_probs.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
        per_problem += [nll[row][labels[row, 1:] != -100].tolist() for row in range(len(nll))]
    return per_problem


@torch.no_grad()
def score_thinking(model: QuietStarForCausalLM, tokenizer, problems: list[dict], batch_size: int, seed: int = 0) -> list[dict]:
    """Per problem and solution token: NLL without thoughts (base path), with greedy thoughts (mixed), w, whether it
    is an answer digit, and the thought written before it (decoded lazily: the ids)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)  # greedy thoughts need no randomness; the seed makes sure
    records = []
    for start in range(0, len(problems), batch_size):
        input_ids, attention_mask, labels, digits = encode(tokenizer, problems[start : start + batch_size])
        outputs = model(input_ids=input_ids, attention_mask=attention_mask)
        base, mixed = next_token_log_probs(outputs, input_ids[:, 1:], model.marker_ids)
        weights = outputs.mixing_weights[:, :, :-1].float().mean(dim=1)
        for row in range(len(input_ids)):
            scored = labels[row, 1:] != -100
            positions = scored.nonzero().squeeze(-1)
            records.append(
                {
                    "nll_base": (-base[row][scored]).tolist(),
                    "nll_mixed": (-mixed[row][scored]).tolist(),
                    "mixing_weight": weights[row][scored].tolist(),
                    "digit": digits[row, 1:][scored].tolist(),
                    "token_ids": input_ids[row, 1:][scored].tolist(),
                    "context_ids": [input_ids[row, max(0, p - 7) : p + 1].tolist() for p in positions.tolist()],
                    "thought_ids": outputs.thought_ids[row, 0][positions].tolist(),
                }
            )
    model.train(was_training)
    return records


def gain_summary(base: list[list[float]], mixed: list[list[float]]) -> dict:
    """Per-problem token NLLs -> means over all tokens, their gain (base - mixed) and its 95% bootstrap interval
    over problems."""
    gains = [sum(b) - sum(m) for b, m in zip(base, mixed)]
    counts = [len(b) for b in base]
    n = max(sum(counts), 1)
    return {
        "tokens": sum(counts),
        "nll_without": sum(map(sum, base)) / n,
        "nll_with": sum(map(sum, mixed)) / n,
        "gain": sum(gains) / n,
        "gain_ci95": bootstrap_ci(gains, counts) if sum(counts) else [0.0, 0.0],
    }


def summarize(records: list[dict], untrained: list[list[float]] | None, tokenizer, n_shown: int = 8) -> dict:
    """The report's numbers: overall, by base-NLL quartile (cut points over all scored tokens), on answer digits."""
    base = [r["nll_base"] for r in records]
    mixed = [r["nll_mixed"] for r in records]
    every = torch.tensor([x for b in base for x in b], dtype=torch.float64)
    cuts = torch.quantile(every, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist() if every.numel() else [0.0] * 3

    def subset(keep) -> dict:
        pairs = [[(b, m) for b, m, flag in zip(bs, ms, flags) if keep(b, flag)] for bs, ms, flags in zip(base, mixed, (r["digit"] for r in records))]
        return gain_summary([[b for b, _ in p] for p in pairs], [[m for _, m in p] for p in pairs])

    bounds = [float("-inf"), *cuts, float("inf")]
    quartiles = [
        {"name": name, "base_nll_range": [low, high], **subset(lambda b, _, low=low, high=high: low < b <= high)}
        for name, low, high in zip(["Q1 (easiest)", "Q2", "Q3", "Q4 (hardest)"], bounds[:-1], bounds[1:])
    ]
    weights = [w for r in records for w in r["mixing_weight"]]
    hardest = sorted(
        ((b, m, r, k) for r in records for k, (b, m) in enumerate(zip(r["nll_base"], r["nll_mixed"]))), key=lambda x: -x[0]
    )[:n_shown]
    result = {
        "problems": len(records),
        "overall": gain_summary(base, mixed),
        "quartiles": quartiles,
        "answer_digits": subset(lambda _, digit: digit),
        "mixing_weight": sum(weights) / max(len(weights), 1),
        "hard_tokens": [
            {
                "context": tokenizer.decode(r["context_ids"][k]),
                "token": tokenizer.decode([r["token_ids"][k]]),
                "thought": tokenizer.decode(r["thought_ids"][k]),
                "nll_without": round(b, 3),
                "nll_with": round(m, 3),
            }
            for b, m, r, k in hardest
        ],
    }
    if untrained is not None:  # the same tokens under SmolLM2 before any training
        result["untrained_vs_with"] = gain_summary(untrained, mixed)
    return result


# ---- training ----------------------------------------------------------------------------------------------------------------


def load_base(base: str | None):
    from ..train import resolve_base  # the same base resolution as `quietstar train`

    path = resolve_base(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "right"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer


def training_problems(tokenizer, train_set: list[dict], settings: Gsm8kSettings) -> list[dict]:
    """`steps * batch_size` problems in a seeded shuffle, keeping those whose text cut to `max_length` still has
    `min_solution_tokens` to score (a long question can leave none)."""
    needed, chosen = settings.steps * settings.batch_size, []
    for k in random.Random(settings.seed).sample(range(len(train_set)), len(train_set)):
        if (encode(tokenizer, [train_set[k]], settings.max_length)[2] != -100).sum() >= settings.min_solution_tokens:
            chosen.append(train_set[k])
        if len(chosen) == needed:
            return chosen
    raise ValueError(
        f"gsm8k: only {len(chosen)} training problems keep {settings.min_solution_tokens} solution tokens within "
        f"max_length {settings.max_length}, and steps x batch_size = {needed}; lower --steps or --min_solution_tokens, "
        "or raise --max_length."
    )


def train_thinking(base, tokenizer, train_problems: list[dict], validation: list[dict], settings: Gsm8kSettings, log):
    """Quiet-STaR on GSM8K solutions, one batch per step from `train_problems` in order; returns the model, tokenizer
    and the validation history (every `eval_every` steps and at 0). With `keep_best`, the model returned is the
    validated checkpoint (step >= 1) with the highest validation gain; its step is the history entry marked "kept"."""
    torch.manual_seed(settings.seed)
    model, tokenizer = QuietStarForCausalLM.from_base(
        base, tokenizer, thought_length=settings.thought_length, n_thoughts=settings.n_thoughts, lookahead=1,
        thought_nll_weight=settings.thought_nll_weight, initial_mixing_logit=settings.initial_mixing_logit,
        base_loss_weight=settings.base_loss_weight, mixed_loss_weight=settings.mixed_loss_weight,
        policy_weight=settings.policy_weight, policy_reward=settings.policy_reward, thought_temperature=1.0, inference_thought_temperature=0.0,
    )
    head = list(model.mixing_head.parameters())
    head_ids = {id(p) for p in head}
    body = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    optimizer = torch.optim.AdamW(body, lr=settings.body_lr, weight_decay=0.0)
    head_optimizer = torch.optim.AdamW(head, lr=settings.head_lr, weight_decay=0.0)  # stepped after head_frozen_steps

    def validate(step: int) -> dict:
        records = score_thinking(model, tokenizer, validation, settings.eval_batch_size, settings.seed)
        summary = gain_summary([r["nll_base"] for r in records], [r["nll_mixed"] for r in records])
        weights = [w for r in records for w in r["mixing_weight"]]
        return {"step": step, "validation": summary, "mixing_weight": sum(weights) / len(weights)}

    start = time.perf_counter()
    history = [validate(0)]
    log(history[-1])
    model.train()
    for step in range(1, settings.steps + 1):
        picked = train_problems[(step - 1) * settings.batch_size : step * settings.batch_size]
        input_ids, attention_mask, labels, _ = encode(tokenizer, picked, settings.max_length)
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step > settings.head_frozen_steps:
            head_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        head_optimizer.zero_grad(set_to_none=True)
        parts = {
            name: round(float(getattr(outputs, name).detach()), 4)
            for name in ("loss", "nll_base", "nll_mixed", "nll_thought", "policy_loss", "reward_mean")
            if getattr(outputs, name) is not None
        }
        log({"step": step, **parts, "seconds": round(time.perf_counter() - start, 1)})
        if step % settings.eval_every == 0 or step == settings.steps:
            history.append(validate(step))
            log(history[-1])
            if settings.keep_best and history[-1]["validation"]["gain"] >= max(h["validation"]["gain"] for h in history[1:]):
                kept = (step, {name: tensor.clone() for name, tensor in model.state_dict().items()})
    if settings.keep_best:
        model.load_state_dict(kept[1])
        for entry in history:
            entry["kept"] = entry["step"] == kept[0]
        log({"kept_step": kept[0]})
    return model, tokenizer, history


# ---- the run ----------------------------------------------------------------------------------------------------------------


def run_gsm8k(output_dir: str | Path, settings: Gsm8kSettings) -> dict:
    """Train, score the test solutions, save the model, tokenizer and report into `output_dir`; returns the report."""
    start = time.perf_counter()
    output_dir = Path(output_dir)
    train_all, test = load_problems(settings.data, "train"), load_problems(settings.data, "test")
    train_set, validation = train_all[: -settings.validation_problems], train_all[-settings.validation_problems :]
    test = test[: settings.eval_problems]
    base, tokenizer = load_base(settings.base)
    train_problems = training_problems(tokenizer, train_set, settings)  # raises before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)
    log = metrics_log(output_dir / "metrics.jsonl")

    untrained = score_plain(base, tokenizer, test, settings.eval_batch_size)  # before from_base changes the base in place
    model, tokenizer, history = train_thinking(base, tokenizer, train_problems, validation, settings, log)
    train_seconds = time.perf_counter() - start
    test_result = summarize(score_thinking(model, tokenizer, test, settings.eval_batch_size, settings.seed), untrained, tokenizer)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    report = {
        "settings": dataclasses.asdict(settings),
        "history": history,
        "test": test_result,
        "seconds": {"training": round(train_seconds, 1), "total": round(time.perf_counter() - start, 1)},
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=1))
    (output_dir / "report.md").write_text(format_report(report))
    steps = [h["step"] for h in history]
    line_plot(
        {"validation NLL gain (nats/token)": (steps, [h["validation"]["gain"] for h in history])},
        output_dir / "gain.svg", title="GSM8K solutions: gain of thinking", xlabel="step", ylabel="nats per token",
    )
    return report


def format_report(report: dict) -> str:
    test, settings = report["test"], report["settings"]

    def row(name: str, s: dict) -> str:
        low, high = s["gain_ci95"]
        return f"| {name} | {s['tokens']} | {s['nll_without']:.4f} | {s['nll_with']:.4f} | {s['gain']:+.4f} [{low:+.4f}, {high:+.4f}] |"

    lines = [
        "# GSM8K solutions: does thinking help SmolLM2?",
        "",
        f"{settings['steps']} steps of batch {settings['batch_size']}, {report['seconds']['training']} s training, "
        f"{report['seconds']['total']} s in all. Test: the first {test['problems']} problems of test.jsonl, solution "
        "tokens only, greedy thoughts; 95% intervals bootstrap the problems.",
        "",
        "| tokens | n | NLL without thoughts | NLL with thoughts | gain [95% CI] |",
        "|---|---|---|---|---|",
        row("**all**", test["overall"]),
        *(row(q["name"], q) for q in test["quartiles"]),
        row("answer digits", test["answer_digits"]),
        "",
        f"Mean mixing weight w: {test['mixing_weight']:.3f}.",
    ]
    if "untrained_vs_with" in test:
        s = test["untrained_vs_with"]
        lines.append(
            f"Against the untrained base (NLL {s['nll_without']:.4f}): with thoughts {s['nll_with']:.4f}, "
            f"gain {s['gain']:+.4f} [{s['gain_ci95'][0]:+.4f}, {s['gain_ci95'][1]:+.4f}] (fine-tuning and thinking together)."
        )
    lines += [
        "",
        "Validation gain during training: "
        + ", ".join(
            f"step {h['step']}: {h['validation']['gain']:+.4f} (w {h['mixing_weight']:.3f}){' (kept)' if h.get('kept') else ''}"
            for h in report["history"]
        ),
        "",
        "Thoughts at the hardest test tokens (highest NLL without thoughts):",
        "",
        "| context | token | thought | NLL without | with |",
        "|---|---|---|---|---|",
        *(
            f"| `{t['context']!r}` | `{t['token']!r}` | `{t['thought']!r}` | {t['nll_without']} | {t['nll_with']} |"
            for t in test["hard_tokens"]
        ),
        "",
    ]
    return "\n".join(lines)


__all__ = ["Gsm8kSettings", "run_gsm8k", "load_problems", "encode", "score_thinking", "score_plain", "summarize", "gain_summary"]
