"""Reading evaluation data files: jsonl records with required fields, and the file hash recorded in every result.

Errors name the file and line and say what a valid record looks like, so a user can fix the data, not the code.
"""

import hashlib
import json
import os
from pathlib import Path


class DataFormatError(ValueError):
    """A data file does not have the expected format; the message names the file, the line and the fix."""


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(path: str | os.PathLike, required: dict[str, type], example: str) -> list[tuple[int, dict]]:
    """(line number, record) for every non-empty line of a jsonl file; each record must be a JSON object whose
    `required` fields exist with the given types. `example` (one valid line) goes into the error messages."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file at {path}.")
    records = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataFormatError(f"{where}: not valid JSON ({error.msg}). Each line must be one JSON object, e.g. {example}") from None
            if not isinstance(record, dict):
                raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}. Example line: {example}")
            for field, kind in required.items():
                if field not in record:
                    raise DataFormatError(f"{where}: missing field {field!r}. Each line needs {sorted(required)}, e.g. {example}")
                if not isinstance(record[field], kind):
                    raise DataFormatError(
                        f"{where}: field {field!r} must be a {kind.__name__}, got {type(record[field]).__name__}. Example line: {example}"
                    )
            records.append((number, record))
    if not records:
        raise DataFormatError(f"{path} has no records. Each line must be one JSON object, e.g. {example}")
    return records


__all__ = ["DataFormatError", "file_sha256", "read_jsonl"]
