"""`quietstar convert-original`: the paper's released model (`ezelikman/quietstar-8-ahead`, Mistral-7B) as a quietstar
model, which loads with `AutoModelForCausalLM` and has a KV-cached `generate()`.

    quietstar convert-original ezelikman/quietstar-8-ahead --output-dir quietstar-8-ahead   # or a local directory

The released checkpoint is a `MistralForCausalLM` config plus the tensors of the reference code's patched
`modeling_mistral.py` (ezelikman/quiet-star), which stock transformers drops on load. They map one to one:

    model.*, lm_head.weight         ->  model.model.*, model.lm_head.weight  (the wrapped MistralForCausalLM)
    start_embedding, end_embedding  ->  thought_markers.weight               (row 0 of each: the embedding / 100;
                                                                              row 1, a log-std, is never used)
    talk_head.0.0 [H, 2H] + bias    ->  mixing_head.mlp.0
    talk_head.0.2 [H, H] + bias     ->  mixing_head.mlp.2
    talk_head.0.4 [1, H], no bias   ->  mixing_head.out (bias 0)

and the mixing weight is the head's raw output (`mixing_activation="identity"`): the original has no sigmoid.

Inference settings reproduce the original's evaluation (zero-shotcot-eval.py: n_ahead 8, n_ahead_talk 1, n_passes 1):
the original's forward loop runs n_ahead + n_ahead_talk - 1 passes, the text, `<|startthought|>`, the sampled tokens,
`<|endthought|>`, so it samples T = n_ahead - 3 thought tokens (5 for 8); one thought per position
(`n_thoughts=1`); thoughts sampled at temperature 1 (its hard Gumbel-softmax samples at temperature 1 whatever tau is),
markers excluded. For deterministic (greedy) thoughts pass `thought_temperature=0.0` to a forward or `generate()`, or
set `model.config.inference_thought_temperature = 0.0`. Training needs `n_thoughts >= 2` (set it in the config).

Markers: the official eval never set `start_token_id`, so its first forward overwrote both stored markers with
embed("---") / 100. `markers="stored"` (default) keeps the checkpoint's trained markers; `"dashes"` reproduces what
that evaluation ran with.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor
from transformers import AutoTokenizer, MistralConfig, PreTrainedTokenizerBase

from .checkpoints import check_weight_files
from .configuration_quietstar import QuietStarConfig
from .modeling_quietstar import QuietStarForCausalLM

ORIGINAL_START = "<|startthought|>"
ORIGINAL_END = "<|endthought|>"
EMBEDDING_SCALE = 100.0  # the original's `embedding_scale`; kept as thought_embedding_scale, so markers copy bit for bit
DASHES = "---"  # the original's `initial_start_token` / `initial_end_token`
MARKER_SOURCES = ("stored", "dashes")
# The head flags of the original config class and the released layout (their defaults there): a 3-layer MLP on
# [h_base; h_thought] with one output, the weight that mixes the two hidden states.
RELEASED_HEAD_LAYOUT = {
    "use_concat_talk_head": True,
    "use_shallow_talk": False,
    "use_complex_talk_head": True,
    "use_weighted_talk_head": True,
    "merged_lm_and_talk_heads": False,
}
ORIGINAL_ONLY_CONFIG_KEYS = (*RELEASED_HEAD_LAYOUT, "max_thoughts", "merged_talk_heads", "merged_lm_and_think_heads",
                             "use_shallow_think", "use_complex_think_head", "architectures", "transformers_version")
HEAD_KEYS = {
    "talk_head.0.0.weight": "mixing_head.mlp.0.weight",
    "talk_head.0.0.bias": "mixing_head.mlp.0.bias",
    "talk_head.0.2.weight": "mixing_head.mlp.2.weight",
    "talk_head.0.2.bias": "mixing_head.mlp.2.bias",
    "talk_head.0.4.weight": "mixing_head.out.weight",
}
HUB_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json", "*.model"]


class ConversionError(ValueError):
    """The source is not a checkpoint in the released format (or the output cannot be written); the message says why
    and what to do."""


def thought_length_for(n_ahead: int) -> int:
    """Sampled thought tokens of the original at `n_ahead`: its passes are the text, the start marker, the tokens and
    the end marker (n_ahead + n_ahead_talk - 1 with n_ahead_talk = 1)."""
    if n_ahead < 4:
        raise ConversionError(f"--n-ahead must be at least 4 (the original samples n_ahead - 3 thought tokens), got {n_ahead}.")
    return n_ahead - 3


def convert_original(
    source: str | os.PathLike, output_dir: str | os.PathLike, n_ahead: int = 8, markers: str = "stored"
) -> Path:
    """Convert a checkpoint in the released format (local directory, or Hub id when online) into `output_dir`.
    Every check runs before anything is written. Returns `output_dir`. Holds the weights in memory once (7B in bf16:
    about 14.5 GB)."""
    output_dir = Path(output_dir)
    thought_length = thought_length_for(n_ahead)
    if markers not in MARKER_SOURCES:
        raise ConversionError(f"--markers must be one of {MARKER_SOURCES}, got {markers!r}.")
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise ConversionError(f"{output_dir} exists and is not an empty directory: choose a new --output-dir.")
    source_dir = resolve_source(source)
    text_config = read_text_config(source_dir)
    check_weight_files(source_dir)
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    start_id, end_id = original_marker_ids(tokenizer, source_dir)
    config = QuietStarConfig(
        text_config=text_config,
        thought_length=thought_length,
        n_thoughts=1,
        inference_thought_temperature=1.0,
        mixing_activation="identity",
        thought_embedding_scale=EMBEDDING_SCALE,
        start_thought_token_id=start_id,
        end_thought_token_id=end_id,
    )
    weights = read_weights(source_dir)
    state = quietstar_state_dict(weights, tokenizer, markers, text_config.hidden_size, source_dir)
    with torch.device("meta"):  # no second copy of the weights: the loaded tensors are assigned below
        model = QuietStarForCausalLM(config)
    check_keys(model, state, source_dir)
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def resolve_source(source: str | os.PathLike) -> Path:
    """A local directory, or the snapshot of a Hub id (config, safetensors and tokenizer files only)."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).count("/") != 1 or str(source).startswith((".", "/")):
        raise ConversionError(f"{source} is not a directory in the released format, nor a Hub id (owner/name).")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), allow_patterns=HUB_FILES))
    except Exception as error:  # offline, unknown repository, no access: one message naming both ways out
        raise ConversionError(
            f"{source} is not a local directory, and downloading it from the Hub failed ({type(error).__name__}: "
            f"{error}). Go online (unset HF_HUB_OFFLINE), or download it first and pass the directory."
        ) from None


def read_text_config(source_dir: Path) -> MistralConfig:
    """The base Mistral config of a released checkpoint; refuses other models and other head layouts."""
    config_file = source_dir / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"no config.json in {source_dir}: pass a directory in the released format.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_file}, line {error.lineno}: not valid JSON ({error.msg}); download it again.") from None
    if config.get("model_type") != "mistral":
        raise ConversionError(
            f"{config_file} describes a `{config.get('model_type')}` model; the released Quiet-STaR checkpoint is a "
            "Mistral one (model_type 'mistral'). To add thoughts to another model use QuietStarForCausalLM.from_base."
        )
    other = {key: config[key] for key, value in RELEASED_HEAD_LAYOUT.items() if key in config and config[key] != value}
    if other:
        raise ConversionError(
            f"{config_file} describes another mixing-head layout ({', '.join(f'{k}={v}' for k, v in other.items())}); "
            f"only the released one converts ({', '.join(f'{k}={v}' for k, v in RELEASED_HEAD_LAYOUT.items())}): "
            "a 3-layer MLP on [h_base; h_thought] with one output, the mixing weight."
        )
    return MistralConfig(**{key: value for key, value in config.items() if key not in ORIGINAL_ONLY_CONFIG_KEYS})


def original_marker_ids(tokenizer: PreTrainedTokenizerBase, source_dir: Path) -> tuple[int, int]:
    """(start, end) ids of the original's markers in the source's tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in (ORIGINAL_START, ORIGINAL_END) if token not in vocab]
    if missing:
        raise ConversionError(
            f"the tokenizer in {source_dir} has no {' / '.join(missing)}: the released checkpoint's tokenizer has "
            "both. Put its tokenizer files next to the weights."
        )
    return vocab[ORIGINAL_START], vocab[ORIGINAL_END]


def read_weights(source_dir: Path) -> dict[str, Tensor]:
    """All tensors of the safetensors files (one file, or the shards its index lists)."""
    index = source_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    weights = {}
    for name in files:
        if not (source_dir / name).is_file():
            raise ConversionError(f"{source_dir / name} is missing (listed in {index.name}): download it again.")
        weights.update(load_file(source_dir / name))
    return weights


def quietstar_state_dict(
    weights: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase, markers: str, hidden_size: int, source_dir: Path
) -> dict[str, Tensor]:
    """The released tensors under quietstar's names (see the module docstring)."""
    expected_shapes = {
        "start_embedding": (2, hidden_size), "end_embedding": (2, hidden_size),
        "talk_head.0.0.weight": (hidden_size, 2 * hidden_size), "talk_head.0.0.bias": (hidden_size,),
        "talk_head.0.2.weight": (hidden_size, hidden_size), "talk_head.0.2.bias": (hidden_size,),
        "talk_head.0.4.weight": (1, hidden_size),
    }
    for key, shape in expected_shapes.items():
        if key not in weights:
            raise ConversionError(
                f"{source_dir} has no `{key}`: it is not a Quiet-STaR checkpoint in the released format (a plain "
                "Mistral has no thought markers nor mixing head; wrap one with QuietStarForCausalLM.from_base)."
            )
        if tuple(weights[key].shape) != shape:
            raise ConversionError(
                f"`{key}` in {source_dir} has shape {tuple(weights[key].shape)}, expected {shape}: another head layout."
            )
    unknown = sorted(key for key in weights if key not in expected_shapes and not key.startswith(("model.", "lm_head.")))
    if unknown:
        raise ConversionError(f"{source_dir} holds tensors the released format has not: {', '.join(unknown[:5])}.")
    state = {f"model.{key}": value for key, value in weights.items() if key.startswith(("model.", "lm_head."))}
    state.update({HEAD_KEYS[key]: weights[key] for key in HEAD_KEYS})
    dtype = weights["talk_head.0.4.weight"].dtype
    state["mixing_head.out.bias"] = torch.zeros(1, dtype=dtype)  # the original's last layer has no bias
    state["thought_markers.weight"] = marker_rows(weights, tokenizer, markers, source_dir)
    state["think_gate.weight"] = torch.zeros(hidden_size, dtype=dtype)  # uncalibrated: think at every token
    state["think_gate.bias"] = torch.zeros((), dtype=dtype)
    return state


def marker_rows(weights: dict[str, Tensor], tokenizer: PreTrainedTokenizerBase, markers: str, source_dir: Path) -> Tensor:
    """(2, H) start and end markers as stored (the embedding / 100): the checkpoint's row 0 of each, or (`dashes`)
    embed(first token of "---") / 100 for both, computed in the weights' dtype as the original did."""
    if markers == "stored":
        return torch.stack([weights["start_embedding"][0], weights["end_embedding"][0]])
    ids = tokenizer.encode(DASHES, add_special_tokens=False)
    if not ids:
        raise ConversionError(f"the tokenizer in {source_dir} encodes {DASHES!r} to no token; use --markers stored.")
    row = weights["model.embed_tokens.weight"][ids[0]] / EMBEDDING_SCALE
    return torch.stack([row, row])


def check_keys(model: QuietStarForCausalLM, state: dict[str, Tensor], source_dir: Path) -> None:
    """Names and shapes against the model built from the config, before anything is written."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(key for key in set(expected) & set(state) if tuple(state[key].shape) != expected[key])
    problems = [f"{kind}: {', '.join(keys[:5])}" for kind, keys in
                (("missing", missing), ("unexpected", unexpected), ("mismatched shape", mismatched)) if keys]
    if problems:
        raise ConversionError(
            f"the weights in {source_dir} do not match their config.json ({'; '.join(problems)}): re-download the "
            "checkpoint, or check that its config.json belongs to these weights."
        )


def add_convert_original_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "convert-original",
        help="convert the paper's released model (ezelikman/quietstar-8-ahead format) into a quietstar model directory",
    )
    parser.add_argument("source", help="a local directory in the released format, or its Hub id (needs network)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where to write (a new or empty directory)")
    parser.add_argument("--n-ahead", type=int, default=8,
                        help="the original's n_ahead (default 8, the released model's): n_ahead - 3 thought tokens")
    parser.add_argument("--markers", choices=MARKER_SOURCES, default="stored",
                        help="stored: the checkpoint's trained markers (default); dashes: embed('---')/100, what the "
                             "official eval script ran with")
    parser.set_defaults(run=run_convert_original)


def run_convert_original(args: argparse.Namespace) -> int:
    path = convert_original(args.source, args.output_dir, n_ahead=args.n_ahead, markers=args.markers)
    print(path)
    return 0


__all__ = ["ConversionError", "convert_original", "thought_length_for"]
