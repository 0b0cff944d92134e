"""What limits the GSM8K gain of a `quietstar train gsm8k` model: probes on training-split problems, never the test set.

    python benchmarks/gsm8k_probes.py RUN_DIR --data DIR

RUN_DIR holds the model and tokenizer a run saved; DIR holds GSM8K's train.jsonl. Two sets of problems, both outside
the run's training problems: `fit`, 48 problems further along the recipe's seeded shuffle (positions 400-447, checked
disjoint from the 100 it trained on), and `dev`, the recipe's 16 validation problems. With greedy thoughts, as the
report scores, every solution token gets its base and post-thought final states (h_base, h_thought) and the NLL of
the logit mixture at w = 0, 0.05, ..., 1 (between grid points it is read off linearly; it is convex in w).

Prints, per set:
    scalar w     the gain (NLL at w = 0 - NLL at w) of one fixed w everywhere; the recipe's w is 0.27
    oracle       the gain if each token got its own best w: a bound no head reaches (it would need the target)
    head fit     the paper's mixing head (MLP on [h_base; h_thought], mixing.py) fitted to the mixed NLL on 3/4 of
                 `fit`'s problems (full-batch AdamW, 300 epochs, early-stopped on the other quarter), scored on that
                 quarter and on `dev`, with 95% bootstrap intervals over problems
    prob mix     the mixture in probability space, p = (1 - w) p_base + w p_thought, for small w
    token types  gain at w = 0.1 / 0.25 / 0.5 on digit targets after '=' (calculator results), after '>>', other
                 digits and the rest
    sampled      (dev) the gain with N = 2 thoughts sampled at temperature 1, averaged in probability space
and one JSON line with every figure. About 11 minutes on 2 CPU cores for SmolLM2-135M.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quietstar.mixing import MixingHead  # noqa: E402
from quietstar.modeling_quietstar import QuietStarForCausalLM  # noqa: E402
from quietstar.tasks.bootstrap import bootstrap_ci  # noqa: E402
from quietstar.tasks.gsm8k_train import (  # noqa: E402
    Gsm8kSettings, encode, gain_summary, load_problems, score_thinking, training_problems,
)

GRID = torch.linspace(0, 1, 21)


@torch.no_grad()
def token_features(model, tokenizer, problems: list[dict], batch_size: int = 4) -> dict:
    """Per scored token M: h_base, h_thought (M, H), nll (M, len(GRID)) of the logit mixture, target, previous token,
    problem index."""
    rows = {name: [] for name in ("h_base", "h_thought", "nll", "target", "previous", "problem")}
    banned = list(model.marker_ids)
    for start in range(0, len(problems), batch_size):
        input_ids, attention_mask, labels, _ = encode(tokenizer, problems[start : start + batch_size])
        text = model.text_pass(input_ids, attention_mask, model.config.thought_length + 2, n_thoughts=1)
        thoughts = model.thought_pass(text, model.sample_thoughts(text, 0.0), lookahead=1, with_policy=False)
        keep = labels[:, 1:] != -100
        h_base, h_thought = text.hidden[:, :-1][keep], thoughts.hidden[:, 0, :-1, 0][keep]
        target = input_ids[:, 1:][keep]
        base_logits, thought_logits = thoughts.head.logits(h_base), thoughts.head.logits(h_thought)
        nll = []
        for w in GRID:
            logits = base_logits + w * (thought_logits - base_logits)
            logits[:, banned] = float("-inf")  # as in scoring: the markers are never text
            nll.append(-logits.log_softmax(-1).gather(-1, target[:, None]).squeeze(-1))
        rows["h_base"].append(h_base)
        rows["h_thought"].append(h_thought)
        rows["nll"].append(torch.stack(nll, -1))
        rows["target"].append(target)
        rows["previous"].append(input_ids[:, :-1][keep])
        rows["problem"].append(torch.arange(start, start + len(input_ids))[:, None].expand_as(keep)[keep])
    return {name: torch.cat(parts) for name, parts in rows.items()}


def nll_at(nll: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """nll (M, G) on GRID, weight (M,) in [0, 1] -> (M,) read off linearly between grid points (differentiable in w)."""
    position = weight.clamp(0, 1) * (len(GRID) - 1)
    low = position.floor().long().clamp(max=len(GRID) - 2)
    frac = position - low
    return nll.gather(1, low[:, None]).squeeze(1) * (1 - frac) + nll.gather(1, low[:, None] + 1).squeeze(1) * frac


def gain_with_ci(gains: torch.Tensor, problem: torch.Tensor) -> dict:
    ids = problem.unique()
    totals = [float(gains[problem == p].sum()) for p in ids]
    counts = [int((problem == p).sum()) for p in ids]
    return {"gain": float(gains.mean()), "ci95": bootstrap_ci(totals, counts)}


def fit_head(features: dict, seed: int = 0, epochs: int = 300, lr: float = 1e-3) -> tuple[MixingHead, torch.Tensor]:
    """The mixing head fitted to the mixed NLL on 3/4 of the problems, early-stopped on the rest; returns the head at
    its best held-out epoch and the held-out token mask."""
    generator = torch.Generator().manual_seed(seed)
    problems = features["problem"].unique()
    held = torch.isin(features["problem"], problems[torch.randperm(len(problems), generator=generator)[: len(problems) // 4]])
    torch.manual_seed(seed)
    hidden = features["h_base"].shape[1]
    head = MixingHead(hidden, hidden)
    torch.nn.init.zeros_(head.out.weight)
    torch.nn.init.constant_(head.out.bias, -1.0)  # the recipe's w = 0.27
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    best_loss, best_state = float("inf"), None
    for _ in range(epochs):
        loss = nll_at(features["nll"][~held], head(features["h_base"][~held], features["h_thought"][~held])).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            held_loss = float(nll_at(features["nll"][held], head(features["h_base"][held], features["h_thought"][held])).mean())
        if held_loss < best_loss:
            best_loss, best_state = held_loss, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    return head, held


def probe(features: dict, tokenizer, head: MixingHead, held: torch.Tensor | None) -> dict:
    nll, problem = features["nll"], features["problem"]
    base = nll[:, 0]
    result = {
        "tokens": len(base),
        "nll_base": float(base.mean()),
        "scalar_w": {f"{float(w):.2f}": gain_with_ci(base - nll[:, k], problem) for k, w in enumerate(GRID) if k % 2 == 0 or k == 5},
        "oracle": float((base - nll.min(1).values).mean()),
    }
    with torch.no_grad():
        subset = held if held is not None else torch.ones_like(base, dtype=torch.bool)
        weight = head(features["h_base"][subset], features["h_thought"][subset])
        result["head_fit"] = {**gain_with_ci(base[subset] - nll_at(nll[subset], weight), problem[subset]), "mean_w": float(weight.mean())}
        log_probs = [-nll[:, 0], -nll[:, -1]]  # w = 0: the base alone; w = 1: the post-thought prediction alone
        result["thought_only_gap"] = float((log_probs[1] - log_probs[0]).mean())
        result["prob_mix"] = {
            str(w): gain_with_ci(torch.logaddexp(log_probs[0] + torch.log1p(torch.tensor(-w)), log_probs[1] + torch.log(torch.tensor(w))) - log_probs[0], problem)
            for w in (0.02, 0.05, 0.1, 0.2)
        }
    previous = [tokenizer.decode([int(t)]).strip() for t in features["previous"]]
    target = [tokenizer.decode([int(t)]).strip()[:1].isdigit() for t in features["target"]]
    types = {
        "digit after '='": [d and p.endswith("=") for d, p in zip(target, previous)],
        "digit after '>>'": [d and p.endswith(">>") for d, p in zip(target, previous)],
        "other digit": [d and not (p.endswith("=") or p.endswith(">>")) for d, p in zip(target, previous)],
        "non-digit": [not d for d in target],
    }
    result["token_types"] = {
        name: {"tokens": int(torch.tensor(mask).sum()), "nll_base": float(base[torch.tensor(mask)].mean()),
               "gain_w": {str(float(GRID[k])): float((base - nll[:, k])[torch.tensor(mask)].mean()) for k in (2, 5, 10)}}
        for name, mask in types.items()
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--data", required=True, help="directory with GSM8K's train.jsonl")
    parser.add_argument("--fit-problems", type=int, default=48, help="problems at shuffle positions 400 ... 400 + n")
    parser.add_argument("--dev-problems", type=int, default=16, help="the last n of the 16 validation problems")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model = QuietStarForCausalLM.from_pretrained(args.run_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.run_dir)
    tokenizer.padding_side = "right"
    settings = Gsm8kSettings(data=args.data)
    train_all = load_problems(args.data, "train")
    train_set, dev = train_all[: -settings.validation_problems], train_all[-settings.validation_problems :]
    trained = {p["question"] for p in training_problems(tokenizer, train_set, settings)}
    order = random.Random(settings.seed).sample(range(len(train_set)), len(train_set))
    fit = [train_set[k] for k in order[400 : 400 + args.fit_problems]]
    dev = dev[len(dev) - args.dev_problems :]
    if any(p["question"] in trained for p in fit):
        raise SystemExit("the fit problems overlap the run's training problems; pick other shuffle positions.")

    features = {"fit": token_features(model, tokenizer, fit), "dev": token_features(model, tokenizer, dev)}
    head, held = fit_head(features["fit"])
    report = {
        "fit (head: held-out quarter)": probe(features["fit"], tokenizer, head, held),
        "dev": probe(features["dev"], tokenizer, head, None),
    }
    model.config.inference_thought_temperature, model.config.n_thoughts = 1.0, 2
    records = score_thinking(model, tokenizer, dev, 4, seed=0)
    report["dev"]["sampled_n2"] = gain_summary([r["nll_base"] for r in records], [r["nll_mixed"] for r in records])
    for name, result in report.items():
        print(f"== {name}: {result['tokens']} tokens, base NLL {result['nll_base']:.4f}, thought-only gap {result['thought_only_gap']:+.3f}")
        print("  scalar w: " + ", ".join(f"{w}: {r['gain']:+.4f}" for w, r in result["scalar_w"].items()))
        print(f"  oracle per-token w: {result['oracle']:+.4f}")
        h = result["head_fit"]
        print(f"  head fit: {h['gain']:+.4f} [{h['ci95'][0]:+.4f}, {h['ci95'][1]:+.4f}], mean w {h['mean_w']:.3f}")
        print("  prob mix: " + ", ".join(f"w {w}: {r['gain']:+.4f} [{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]" for w, r in result["prob_mix"].items()))
        for kind, r in result["token_types"].items():
            print(f"  {kind}: {r['tokens']} tokens, base NLL {r['nll_base']:.3f}, gain at w 0.1/0.25/0.5: "
                  + " / ".join(f"{g:+.4f}" for g in r["gain_w"].values()))
    s = report["dev"]["sampled_n2"]
    print(f"  dev, N = 2 sampled thoughts (T 1) averaged: {s['gain']:+.4f} [{s['gain_ci95'][0]:+.4f}, {s['gain_ci95'][1]:+.4f}]")
    print(json.dumps({"benchmark": "gsm8k_probes", "run_dir": args.run_dir, "report": report}))


if __name__ == "__main__":
    main()
