"""Thought tokens: the `<|startofthought|>` / `<|endofthought|>` markers in the tokenizer and their initial embedding.

The markers are real vocabulary entries (so ids, decoding and the output head know them), but the model feeds its own
learnable embeddings for them (`QuietStarForCausalLM.thought_embeddings`), initialised like the paper from "---".
"""

import warnings

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

START_THOUGHT = "<|startofthought|>"
END_THOUGHT = "<|endofthought|>"
INIT_TEXT = "---"  # the paper initialises both markers from the embedding of "---"


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
