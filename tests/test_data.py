"""Training data: every source format gives the same windows, templates fill fields, bad data is a clear error."""

import json

import pytest
import torch

from conftest import make_tokenizer
from quietstar.arithmetic import arithmetic_problems, arithmetic_texts
from quietstar.data import DataConfig, WindowCollator, build_datasets, load_rows, make_examples, row_texts

ROWS = [{"question": f"w{i} w{i + 1}", "answer": f"w{i + 2} w{i + 3} w{i + 4}"} for i in range(3, 40)]
TEMPLATE = "{question} --- {answer}"


def tokenizer():
    tok = make_tokenizer()
    tok.eos_token = "<pad>"
    return tok


def write_sources(directory) -> dict[str, str]:
    """The same rows as .jsonl, .json, .parquet and a saved `datasets` dataset."""
    import datasets
    import pyarrow
    import pyarrow.parquet

    paths = {name: directory / f"rows.{name}" for name in ("jsonl", "json", "parquet")}
    paths["jsonl"].write_text("\n".join(json.dumps(row) for row in ROWS) + "\n")
    paths["json"].write_text(json.dumps(ROWS))
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(ROWS), paths["parquet"])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(directory / "saved")
    return {**{name: str(path) for name, path in paths.items()}, "saved": str(directory / "saved")}


def test_every_source_format_gives_the_same_windows(tmp_path):
    pytest.importorskip("datasets")
    windows = {}
    for name, path in write_sources(tmp_path).items():
        train, held_out = build_datasets(DataConfig(path=path, template=TEMPLATE, window=8, eval_windows=2), tokenizer(), 2)
        windows[name] = torch.stack([example["input_ids"] for example in train + held_out])
    reference = windows.pop("jsonl")
    # oracle: the rows rendered by hand, joined with EOS (id 0), cut into windows of 8
    stream = []
    for row in ROWS:
        stream += tokenizer()(f"{row['question']} --- {row['answer']}", add_special_tokens=False).input_ids + [0]
    assert torch.equal(reference, torch.tensor(stream[: len(stream) // 8 * 8]).view(-1, 8))
    for name, other in windows.items():
        assert torch.equal(other, reference), name


def test_text_files_are_split_on_blank_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("w1 w2 w3\nw4\n\n\nw5 w6\n\n")
    assert load_rows(DataConfig(path=str(path))) == ["w1 w2 w3\nw4", "w5 w6"]


def test_missing_template_field_names_the_fields(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "w1", "answer": "w2"}) + "\n")
    with pytest.raises(ValueError, match=r"row 0 has no field 'question'; its fields are \['answer', 'prompt'\]"):
        row_texts(load_rows(DataConfig(path=str(path))), DataConfig(path=str(path), template=TEMPLATE))
    with pytest.raises(ValueError, match="data.text_field 'text': row 0 has no field 'text'"):
        row_texts(load_rows(DataConfig(path=str(path))), DataConfig(path=str(path)))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="has no rows: nothing to train on"):
        build_datasets(DataConfig(path=str(path)), tokenizer(), 2)


def test_unsupported_file_type_is_an_error(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_rows(DataConfig(path=str(path)))


def test_without_packing_texts_shorter_than_lookahead_plus_one_are_errors():
    config = DataConfig(packing=False, window=8)
    with pytest.raises(ValueError, match="text 1 has 2 tokens, fewer than lookahead \\+ 1 = 4"):
        make_examples(["w1 w2 w3 w4 w5", "w1 w2"], tokenizer(), config, lookahead=3)
    examples = make_examples(["w1 w2 w3 w4 w5 w6 w7 w8 w9 w10", "w1 w2 w3 w4"], tokenizer(), config, lookahead=3)
    assert [len(e) for e in examples] == [8, 4]  # truncated to the window, not padded


def test_collator_pads_right_and_masks_labels():
    batch = WindowCollator(pad_token_id=0)([{"input_ids": torch.tensor([5, 6, 7])}, {"input_ids": torch.tensor([8])}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]


def test_arithmetic_corpus_is_deterministic_and_correct():
    assert arithmetic_texts(50, seed=3) == arithmetic_texts(50, seed=3)
    assert arithmetic_texts(50, seed=3) != arithmetic_texts(50, seed=4)
    for problem in arithmetic_problems(200, seed=0):
        # every worked step "a op b = c" in the solution is true arithmetic, and the answer is the last result
        steps = [step.split(" = ") for step in problem["answer"].replace(". ", ".|").split("|") if " = " in step]
        for left, right in steps:
            tokens = left.split()
            start = len(tokens)
            while start > 0 and (tokens[start - 1] in "+-*/" or tokens[start - 1].isdigit()):
                start -= 1
            expression = " ".join(tokens[start:])  # the trailing "a op b [op c]" of "... is a op b"
            assert eval(expression) == int(right.split()[0].rstrip(".")), problem["answer"]
        assert problem["answer"].endswith(f"The answer is {right.split()[0].rstrip('.')}.")
