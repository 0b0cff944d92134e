"""Multi-hop lookup: a task where a thought must help, because the answer is three hops away.

Each problem lists the edges of a few disjoint chains over 24 node tokens (a fresh random naming per problem, edges in
shuffled order) and asks for the node three hops after a start node:

    n7 > n19 ; n3 > n11 ; n19 > n2 ; n11 > n5 ; ... Q n7 : n4 |
                                                   prompt ^ ^ answer (one token), then the end mark

Written out, the chain is one lookup per token (`Q n7 : n19 n2 n4 |`, `chain_text`): a small model learns that
quickly. In one step (`Q n7 : n4`) it needs three lookups inside a single forward pass, which a 4-layer model trained
on chains does not do (0% in the issue's feasibility run). So thoughts can take the answer from chance to 100%.

`problems(n, seed)` is deterministic (only `random.Random` draws); `tokenizer()` is a word-level tokenizer over the
task's 31 symbols, built in memory (no download). `MultihopTask` is the recipe's task (configs/multihop.yaml): its
text variants "chain" (the written chain, every chain token scored), "fillers" (the same with "---" pauses inserted,
never scored) and "direct" (the answer alone, scored), and its from-scratch 4-layer llama.
"""

import random
from dataclasses import dataclass

from . import LazyExamples, encode_completion

N_NODES = 24
HOPS = 3
NODES = [f"n{i}" for i in range(N_NODES)]
SYMBOLS = [">", ";", "Q", ":", "|"]
SPECIAL = ["<pad>", "<unk>", "---"]  # "---" initialises the thought markers (paper), so it must be one token


@dataclass(frozen=True)
class Problem:
    """edges: "a > b ;" text; start: the query node; chain: the HOPS nodes after it (the last one is the answer)."""

    edges: str
    start: str
    chain: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """Everything before the answer: "<edges> Q <start> :"."""
        return f"{self.edges} Q {self.start} :"

    @property
    def answer(self) -> str:
        return self.chain[-1]

    @property
    def direct_text(self) -> str:
        """The answer right after the question: what Quiet-STaR trains and is scored on."""
        return f"{self.prompt} {self.answer} |"

    @property
    def chain_text(self) -> str:
        """The answer after the written-out chain: what the stage-1 language model learns from."""
        return f"{self.prompt} {' '.join(self.chain)} |"


def _problem(rng: random.Random) -> Problem:
    n_edges = rng.randint(6, 9)
    nodes = rng.sample(NODES, n_edges + 2)  # two disjoint chains use n_edges + 2 distinct nodes
    split = rng.randint(HOPS + 1, n_edges + 2 - (HOPS + 1))  # both chains have >= HOPS edges
    chains = [nodes[:split], nodes[split:]]
    edges = [(a, b) for chain in chains for a, b in zip(chain, chain[1:])]
    rng.shuffle(edges)
    main = rng.choice(chains)
    first = rng.randint(0, len(main) - 1 - HOPS)  # a start with HOPS successors
    return Problem(
        edges=" ".join(f"{a} > {b} ;" for a, b in edges),
        start=main[first],
        chain=tuple(main[first + 1 : first + 1 + HOPS]),
    )


def generate(n: int, seed: int) -> list[Problem]:
    """`n` problems, deterministic in (n, seed)."""
    if n < 1:
        raise ValueError(f"the number of multihop problems must be >= 1, got {n}.")
    rng = random.Random(seed)
    return [_problem(rng) for _ in range(n)]


def problems(n: int, seed: int) -> list[tuple[str, str]]:
    """`n` (prompt, answer) pairs: the prompt ends right before the answer, a single token (" n4")."""
    return [(problem.prompt, problem.answer) for problem in generate(n, seed)]


VARIANTS = ("chain", "fillers", "direct")
FILLER = "---"
# Held-out problems come from seeds no training stream uses (training streams are seeded by strings).
VALIDATION_SEED, TEST_SEED = 1_000_003, 2_000_003


@dataclass
class MultihopTask:
    """The multi-hop recipe's task. `seed`: the training problems' draw (held-out problems are fixed: validation
    from seed 1_000_003 + seed, test from 2_000_003, never drawn for training); the model fields size the stage-1
    llama, built from scratch with the training seed."""

    seed: int = 0
    validation_items: int = 256
    test_items: int = 256
    filler_rate: float = 0.3  # "fillers": chance of a "---" pause before each chain token
    hidden_size: int = 64
    layers: int = 4
    heads: int = 4
    metric = "accuracy"

    def tokenizer(self):
        return tokenizer()

    def base_model(self, tokenizer):
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=self.hidden_size, intermediate_size=4 * self.hidden_size,
            num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.heads,
            max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, eos_token_id=None,
            tie_word_embeddings=False,
        )
        return LlamaForCausalLM(config)

    def examples(self, split: str, variant: str, n: int | None, tokenizer) -> LazyExamples:
        if variant not in VARIANTS:
            raise ValueError(f"multihop: stage data must be one of {VARIANTS}, got {variant!r}.")
        seeds = {
            "train": f"multihop-{variant}-{self.seed}", "validation": VALIDATION_SEED + self.seed, "test": TEST_SEED
        }
        n = n or (self.validation_items if split == "validation" else self.test_items)
        filler = tokenizer.convert_tokens_to_ids(FILLER)

        def make(index: int) -> dict:
            rng = random.Random(f"{seeds[split]}-{index}")
            problem = _problem(rng)
            if variant == "direct":
                completion = f" {problem.answer}"
            else:
                tokens = []
                for token in [*problem.chain, "|"]:
                    if variant == "fillers" and rng.random() < self.filler_rate:  # a pause before this chain token
                        tokens.append(FILLER)
                    tokens.append(token)
                completion = " " + " ".join(tokens)
            return encode_completion(tokenizer, problem.prompt, completion, unscored=(filler,))

        return LazyExamples(n, make)


def tokenizer():
    """A word-level `PreTrainedTokenizerFast` over the task's symbols (whitespace-separated), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIAL + SYMBOLS + NODES)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word-level tokens with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>")


__all__ = ["Problem", "MultihopTask", "generate", "problems", "tokenizer", "N_NODES", "HOPS"]
