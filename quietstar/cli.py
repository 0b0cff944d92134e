"""The `quietstar` console command. Each subcommand lives beside the code it drives and registers itself here.

    quietstar convert [GGUF_FILE] [--output-dir DIR]   GGUF -> safetensors (default: the embedded SmolLM2-135M)
    quietstar convert-original SRC --output-dir DIR    the paper's released model -> quietstar (quietstar/convert_original.py)
    quietstar train [CONFIG] [--key value ...]         train from a YAML config or a recipe (quietstar/train.py)
    quietstar eval MODEL [...]                         likelihood gain and zero-shot QA reports (quietstar/evaluation.py)
    quietstar push MODEL REPO_ID [...]                 upload with the model card (quietstar/hub.py)
"""

import argparse
import sys
from pathlib import Path

from .convert_original import add_convert_original_command
from .evaluation import add_eval_command
from .hub import add_push_command
from .train import add_train_command


def add_convert_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "convert",
        help="convert a GGUF causal LM (default: the embedded SmolLM2-135M-Instruct) to a safetensors model directory",
    )
    parser.add_argument("gguf_file", nargs="?", type=Path, help="a .gguf file; omitted = the embedded default model")
    parser.add_argument("--output-dir", type=Path, help="where to write (default: the quietstar cache directory)")
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from .default_base import convert_gguf, default_base_path, default_gguf_file

    if args.gguf_file is None and args.output_dir is None:
        path = default_base_path()
    else:
        gguf_file = args.gguf_file or default_gguf_file()
        path = convert_gguf(gguf_file, args.output_dir or gguf_file.with_suffix(""))
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quietstar", description="Quiet-STaR for Hugging Face causal LMs.")
    subcommands = parser.add_subparsers(dest="command", required=True)
    add_convert_command(subcommands)
    add_convert_original_command(subcommands)
    add_eval_command(subcommands)
    add_push_command(subcommands)
    add_train_command(subcommands)
    return parser


# What a user can get wrong (a config, a path, a value): printed as argparse prints its errors, without a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


def main(argv: list[str] | None = None) -> int:
    """Run a command. A user error (`USER_ERRORS`) prints `quietstar <command>: error: <message>` and exits with 2,
    as argparse does; `--debug` (anywhere) keeps the traceback. Other exceptions are faults: raised as they are."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [token for token in argv if token != "--debug"]
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not hasattr(args, "extra_arguments"):  # only commands declaring free-form arguments take them
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.extra_arguments = extra
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if debug:
            raise
        message = str(error).strip("'\"") if isinstance(error, KeyError) else str(error)
        print(f"quietstar {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
