"""A paired pilot of the GSM8K recipe: its first STEPS training steps with some settings changed, everything else
(seed, problems, order) as in a full run, so its training-batch figures compare step for step with a full run's.

    python benchmarks/gsm8k_pilot.py OUT.jsonl --data DIR --steps 30 --set thought_nll_weight=4 [--set ...]

Each logged step scores its batch before training on it: nll_base, nll_mixed, nll_thought are on problems the model
has not seen yet. The recipe's validation runs at step 0 and at the end on one validation problem only (cheap). No
test data is read.
"""

import argparse
import ast
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quietstar.tasks import metrics_log  # noqa: E402
from quietstar.tasks.gsm8k_train import Gsm8kSettings, load_base, load_problems, train_thinking, training_problems  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--set", action="append", default=[], help="NAME=VALUE, a Gsm8kSettings field")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            overrides[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[name] = value  # a string, e.g. policy_reward=thought
    settings = Gsm8kSettings.from_overrides({"data": args.data, "eval_every": 10**6, **overrides})
    train_all = load_problems(settings.data, "train")
    base, tokenizer = load_base(settings.base)
    problems = training_problems(tokenizer, train_all[: -settings.validation_problems], settings)[: args.steps]
    settings.steps = len(problems)
    train_thinking(base, tokenizer, problems, train_all[-1:], settings, metrics_log(Path(args.out)))


if __name__ == "__main__":
    main()
