"""Thought tokens: the `<|startofthought|>` / `<|endofthought|>` markers in the tokenizer and their initial embedding.

The markers are real vocabulary entries (so ids, decoding and the output head know them), but the model feeds its own
learnable embeddings for them (`ThoughtMarkers`, `QuietStarForCausalLM.thought_markers`), initialised like the paper
from "---".
"""

import warnings

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import WeightRenaming

START_THOUGHT = "<|startofthought|>"
END_THOUGHT = "<|endofthought|>"
INIT_TEXT = "---"  # the paper initialises both markers from the embedding of "---"
MARKER_KEY = "thought_markers.weight"
LEGACY_MARKER_KEY = "thought_embeddings"  # the key of checkpoints saved while the markers were a bare parameter


def add_thought_tokens(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """Add both markers as special tokens (no-op if present) and return their ids (start, end)."""
    tokenizer.add_special_tokens({"extra_special_tokens": [START_THOUGHT, END_THOUGHT]}, replace_extra_special_tokens=False)
    return thought_token_ids(tokenizer)


def thought_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, int]:
    """The ids of the two markers; a clear error if the tokenizer lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in (START_THOUGHT, END_THOUGHT) if token not in vocab]
    if missing:
        raise ValueError(
            f"the tokenizer has no {' / '.join(missing)} token. Create the model with "
            "`QuietStarForCausalLM.from_base(base, tokenizer)`, which adds both, or call "
            "`quietstar.add_thought_tokens(tokenizer)` and resize the model's embeddings."
        )
    return vocab[START_THOUGHT], vocab[END_THOUGHT]


def thought_init_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int] | None:
    """The ids of "---", from which the markers start (the paper's initialisation), or None with a warning when the
    tokenizer cannot encode it: no tokens, tokens that do not decode back to "---" (an unknown token, declared or
    not), or an error (a word-level vocabulary without "---" nor its unknown token raises). The markers then start
    from the mean input embedding. Changes nothing."""
    try:
        ids = tokenizer.encode(INIT_TEXT, add_special_tokens=False)
    except Exception as error:  # tokenizers raises e.g. "Missing [UNK] token from the vocabulary"
        reason = f"encoding it failed ({error})"
    else:
        decoded = tokenizer.decode(ids).strip() if ids else ""
        if decoded == INIT_TEXT and tokenizer.unk_token_id not in ids:
            return ids
        reason = "it encodes to no tokens" if not ids else f"it encodes to {decoded!r} (an unknown token)"
    warnings.warn(
        f"the thought markers are initialised from the embedding of {INIT_TEXT!r}, but {reason}; they start from "
        "the mean input embedding instead. Add a token for it to the tokenizer to get the paper's initialisation.",
        stacklevel=3,
    )
    return None


@torch.no_grad()
def initial_thought_embedding(init_ids: list[int] | None, embeddings: nn.Module) -> Tensor:
    """(H,) float32: the input-embedding output for "---" (`init_ids`; mean over its tokens if it is split), or the
    mean over the whole vocabulary when `init_ids` is None.

    Uses the embedding *module's output*, so architectures that scale embeddings inside the module (gemma) match.
    """
    weight = embeddings.weight
    ids = torch.arange(weight.shape[0], device=weight.device) if init_ids is None else torch.tensor(init_ids, device=weight.device)
    return embeddings(ids).float().mean(dim=0)


class ThoughtMarkers(nn.Module):
    """The learnable input embeddings of the start and end markers: `weight` (2, H), rows start, end.

    A module rather than a bare parameter so that tools which name modules can reach it, e.g. PEFT's
    `modules_to_save=["thought_markers"]`. `weight` is stored divided by `scale` and multiplied back in `forward`:
    the markers then move `scale` times faster than the rest of the model under the same optimizer (the paper's 1e2
    learning-rate multiplier for them), without a separate parameter group.
    """

    def __init__(self, hidden_size: int, scale: float):
        super().__init__()
        self.scale = scale  # a plain attribute: `thought_embedding_scale` lives in the config, not in the weights
        self.weight = nn.Parameter(torch.empty(2, hidden_size))

    def forward(self) -> tuple[Tensor, Tensor]:
        """(H,), (H,): the start and end embeddings fed to the model."""
        start, end = (self.weight * self.scale).unbind(0)
        return start, end

    @torch.no_grad()
    def set_(self, embedding: Tensor) -> None:
        """Set both markers to `embedding` (H,) (the effective value: stored divided by the scale)."""
        self.weight.copy_((embedding / self.scale).expand_as(self.weight))

    def extra_repr(self) -> str:
        return f"hidden_size={self.weight.shape[1]}, scale={self.scale}"


class _LoadOnlyRenaming(WeightRenaming):
    """A renaming applied when loading only. transformers reverts registered renamings when saving (to keep a
    checkpoint's original layout), which would write the legacy key again; the reverse here renames nothing."""

    __slots__ = ()

    def reverse_transform(self) -> WeightRenaming:
        return WeightRenaming(source_patterns=rf"^{MARKER_KEY}$", target_patterns=MARKER_KEY)


def register_marker_key_renaming(class_name: str) -> None:
    """Let `from_pretrained` of `class_name` load checkpoints that store the markers as `thought_embeddings`.

    Registered through transformers' own checkpoint-conversion registry (keyed by our class name, so no other model
    is affected); idempotent, since remote-code loading imports the modeling file again."""
    renaming = _LoadOnlyRenaming(source_patterns=rf"^{LEGACY_MARKER_KEY}$", target_patterns=MARKER_KEY)
    register_checkpoint_conversion_mapping(class_name, [renaming], overwrite=True)
