"""Tasks and recipes that measure whether thinking helps: a generated task (multihop), GSM8K solutions (gsm8k); no downloads."""

import json
from collections.abc import Callable
from pathlib import Path


def metrics_log(path: Path, hidden: tuple[str, ...] = ()) -> Callable[[dict], None]:
    """A recipe's log: each record is appended to the (emptied) JSON-lines file `path` and printed, `hidden` keys
    left out of the print."""
    path.unlink(missing_ok=True)

    def log(record: dict) -> None:
        with path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        print({k: v for k, v in record.items() if k not in hidden}, flush=True)

    return log

