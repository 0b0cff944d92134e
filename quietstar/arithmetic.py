"""The default training corpus: multi-step arithmetic word problems with worked solutions, generated, not downloaded.

Every problem is a short story with two or three operations and a solution that works them out one line at a time,
the kind of text where thinking before the next token helps (the answer depends on intermediate results that are not
written yet). `arithmetic_problems(n, seed)` is deterministic: the same (n, seed) gives the same problems on every
machine and Python version (it uses only `random.Random` integer draws).

    Question: Ava has 14 marbles. She buys 3 bags with 6 marbles in each bag, then gives 9 marbles to a friend.
    How many marbles does Ava have now?
    Answer: 3 bags of 6 marbles is 3 * 6 = 18 marbles. 14 + 18 = 32. 32 - 9 = 23. The answer is 23.
"""

import random
from collections.abc import Callable

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Iris", "Jonas", "Kemi", "Liam", "Maya", "Noor"]
ITEMS = ["marbles", "apples", "stickers", "books", "coins", "pencils", "cookies", "stamps", "shells", "cards"]
PROBLEM_TEMPLATE = "Question: {question}\nAnswer: {answer}"


def _buy_and_give(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    start, bags, per_bag = rng.randint(5, 40), rng.randint(2, 9), rng.randint(2, 12)
    bought = bags * per_bag
    given = rng.randint(1, start + bought - 1)
    total = start + bought - given
    return {
        "question": f"{name} has {start} {item}. {name} buys {bags} bags with {per_bag} {item} in each bag, then gives "
        f"{given} {item} to a friend. How many {item} does {name} have now?",
        "answer": f"{bags} bags of {per_bag} {item} is {bags} * {per_bag} = {bought} {item}. {start} + {bought} = "
        f"{start + bought}. {start + bought} - {given} = {total}. The answer is {total}.",
    }


def _share_equally(rng: random.Random) -> dict[str, str]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    friends, each, extra = rng.randint(2, 8), rng.randint(2, 15), rng.randint(1, 30)
    total = friends * each
    return {
        "question": f"{name} had some {item} and got {extra} more, for {total + extra} {item} in all. {name} keeps the "
        f"{extra} new ones and shares the rest equally among {friends} friends. How many {item} does each friend get?",
        "answer": f"{name} shares {total + extra} - {extra} = {total} {item}. {total} / {friends} = {each}. "
        f"The answer is {each}.",
    }


def _weekly_savings(rng: random.Random) -> dict[str, str]:
    name = rng.choice(NAMES)
    per_day, days, weeks, spent = rng.randint(2, 20), rng.randint(2, 7), rng.randint(2, 6), rng.randint(1, 50)
    per_week = per_day * days
    saved = per_week * weeks
    spent = min(spent, saved - 1)
    left = saved - spent
    return {
        "question": f"{name} saves {per_day} dollars a day, {days} days a week, for {weeks} weeks, then spends "
        f"{spent} dollars on a gift. How many dollars are left?",
        "answer": f"Each week {name} saves {per_day} * {days} = {per_week} dollars. In {weeks} weeks that is "
        f"{per_week} * {weeks} = {saved} dollars. {saved} - {spent} = {left}. The answer is {left}.",
    }


def _rows_of_seats(rng: random.Random) -> dict[str, str]:
    rows, seats = rng.randint(3, 20), rng.randint(4, 15)
    taken_rows, missing = rng.randint(1, rows - 1), rng.randint(1, seats - 1)
    total = rows * seats
    taken = taken_rows * seats - missing
    free = total - taken
    return {
        "question": f"A hall has {rows} rows of {seats} seats. People fill {taken_rows} rows except for {missing} "
        f"seats. How many seats are free?",
        "answer": f"The hall has {rows} * {seats} = {total} seats. People take {taken_rows} * {seats} - {missing} = "
        f"{taken} seats. {total} - {taken} = {free}. The answer is {free}.",
    }


PROBLEM_KINDS: list[Callable[[random.Random], dict[str, str]]] = [
    _buy_and_give,
    _share_equally,
    _weekly_savings,
    _rows_of_seats,
]


def arithmetic_problems(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` word problems as {"question", "answer"} dicts; deterministic in (n, seed); kinds are mixed at random."""
    if n < 1:
        raise ValueError(f"the number of arithmetic problems must be >= 1, got {n}.")
    rng = random.Random(seed)
    return [rng.choice(PROBLEM_KINDS)(rng) for _ in range(n)]


def arithmetic_texts(n: int, seed: int = 0) -> list[str]:
    """`n` problems rendered with `PROBLEM_TEMPLATE` ("Question: ...\\nAnswer: ...")."""
    return [PROBLEM_TEMPLATE.format(**problem) for problem in arithmetic_problems(n, seed)]
