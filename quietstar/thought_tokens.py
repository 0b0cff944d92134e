"""Thought tokens: the `<|startofthought|>` / `<|endofthought|>` markers in the tokenizer and their initial embedding.

The markers are real vocabulary entries (so ids, decoding and the output head know them), but the model feeds its own
learnable embeddings for them (`QuietStarForCausalLM.thought_embeddings`), initialised like the paper from "---".
"""

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


@torch.no_grad()
def initial_thought_embedding(tokenizer: PreTrainedTokenizerBase, embeddings: nn.Module) -> Tensor:
    """(H,) the input-embedding output for "---" (mean over its tokens if the tokenizer splits it).

    Uses the embedding *module's output*, so architectures that scale embeddings inside the module (gemma) match.
    """
    ids = tokenizer.encode(INIT_TEXT, add_special_tokens=False)
    if not ids:
        raise ValueError(f"the tokenizer encodes {INIT_TEXT!r} to no tokens; cannot initialise the thought embeddings.")
    weight = embeddings.weight
    return embeddings(torch.tensor(ids, device=weight.device)).float().mean(dim=0)
