"""Training configs: YAML files with four sections (and an optional fifth), validated before anything heavy is loaded.

    base: null                # null = SmolLM2-135M-Instruct (embedded); else a local HF model directory or a .gguf file
    quietstar: {...}          # QuietStarConfig fields (thought_length, n_thoughts, lookahead, policy_weight, ...)
    data: {...}               # DataConfig fields (path, template, window, packing, eval_windows, ...)
    training: {...}           # transformers.TrainingArguments fields (max_steps, learning_rate, save_steps, bf16, ...)
    lora: {...}               # optional: train LoRA with PEFT; `quietstar.lora.lora_config` arguments (r, lora_alpha,
                              # target_modules, any other LoraConfig field). Absent or null: full fine-tuning.

Command-line overrides use dotted keys: `--training.max_steps 5 --quietstar.thought_length 8 --base path/to/model`;
values are read as YAML (`1e-6`, `true`, `null`, `[a, b]`). An unknown key or a value of the wrong type is an error
that names the key. Bundled configs live in `quietstar/configs/` (also reachable as `configs/` in a checkout) and can
be named without their path: `quietstar train paper_gpu`.
"""

import dataclasses
import enum
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from .configuration_quietstar import QuietStarConfig
from .data import DataConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "default"
SECTIONS = ("base", "quietstar", "data", "training", "lora")
# QuietStarConfig fields a training config may set; the rest come from the base model or from_base.
QUIETSTAR_KEYS = tuple(
    f.name
    for f in dataclasses.fields(QuietStarConfig)
    if f.name not in {"text_config", "start_thought_token_id", "end_thought_token_id", "tie_word_embeddings"}
    and f.name in QuietStarConfig.__annotations__
)


@dataclass
class TrainConfig:
    """A validated training config. `quietstar`, `training` and `lora` are keyword arguments for
    `QuietStarForCausalLM.from_base`, `TrainingArguments` and `quietstar.lora.lora_config` (None: no LoRA)."""

    base: str | None = None
    quietstar: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "quietstar": self.quietstar, "data": dataclasses.asdict(self.data),
            "training": self.training, "lora": self.lora,
        }


class _Loader(yaml.SafeLoader):
    """Booleans and floats as in YAML 1.2: PyYAML (YAML 1.1) reads `no` / `on` as booleans, which breaks
    `save_strategy: no`, and `1e-6` as a string, which is how learning rates are written."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)


def parse_yaml_value(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def resolve_config_path(name: str | Path | None) -> Path:
    """A config file: None = the default, an existing path, or the name of a bundled config ("paper_gpu")."""
    name = DEFAULT_CONFIG if name is None else name
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / f"{path.stem if path.suffix == '.yaml' else path.name}.yaml"
    if bundled.is_file() and path.parent == Path("."):
        return bundled
    available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if not p.stem.startswith("accelerate"))
    raise FileNotFoundError(f"config {str(name)!r}: no such file, and not a bundled config (bundled: {available}).")


def load_train_config(name: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (see `resolve_config_path`), apply dotted-key overrides, validate every key."""
    path = resolve_config_path(name)
    raw = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a training config is a mapping with sections {SECTIONS}, got {type(raw).__name__}.")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    return validate_train_config(raw, source=str(path))


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """["--training.max_steps", "5", "--base=dir"] -> {"training.max_steps": 5, "base": "dir"}."""
    overrides, index = {}, 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"override {token!r}: expected --section.key VALUE (e.g. --training.max_steps 5).")
        key, has_value, value = token[2:].partition("=")
        if not has_value:
            if index + 1 >= len(tokens) or tokens[index + 1].startswith("--"):
                raise ValueError(f"override --{key} has no value (e.g. --{key} 5).")
            index += 1
            value = tokens[index]
        overrides[key] = parse_yaml_value(value)
        index += 1
    return overrides


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    section, _, name = key.partition(".")
    if section not in SECTIONS:
        raise ValueError(f"override --{key}: unknown section {section!r}; sections are {SECTIONS}.")
    if not name:
        raw[section] = value
        return
    if section == "base":
        raise ValueError(f"override --{key}: `base` is a single value (--base PATH).")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise ValueError(f"override --{key}: section {section!r} is not a mapping in the config.")
    target[name] = value


def validate_train_config(raw: dict[str, Any], source: str = "config") -> TrainConfig:
    """Check every section and key of a parsed config; errors name the offending key."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{source}: unknown top-level keys {unknown}; a config has the sections {SECTIONS}.")
    base = raw.get("base")
    if base is not None and not isinstance(base, str):
        raise ValueError(f"{source}: `base` must be null (the default model) or a path, got {base!r}.")
    sections = {name: raw.get(name) or {} for name in ("quietstar", "data", "training", "lora")}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section `{name}` must be a mapping of keys to values, got {section!r}.")

    for key, value in sections["quietstar"].items():
        if key not in QUIETSTAR_KEYS:
            raise ValueError(f"{source}: unknown key quietstar.{key}; valid keys: {list(QUIETSTAR_KEYS)}.")
        try:
            QuietStarConfig(**{key: value})  # the config's own (strict) validation, one field at a time
        except Exception as error:
            raise ValueError(f"{source}: bad value for quietstar.{key} = {value!r}: {error}") from None

    data_fields = {f.name: f.type for f in dataclasses.fields(DataConfig)}
    for key, value in sections["data"].items():
        _check_key(source, "data", key, value, data_fields)
    training_fields = {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}
    for key, value in sections["training"].items():
        _check_key(source, "training", key, value, training_fields)
    lora = None if raw.get("lora") is None else dict(sections["lora"])  # `lora: {}` = LoRA with the defaults
    if lora is not None:
        _check_lora(source, lora)
    return TrainConfig(
        base=base,
        quietstar=dict(sections["quietstar"]),
        data=DataConfig(**sections["data"]),
        training=dict(sections["training"]),
        lora=lora,
    )


def _check_lora(source: str, section: dict[str, Any]) -> None:
    """The `lora` section: keys and types as for the other sections, then the whole LoraConfig built once."""
    try:
        from .lora import lora_config
    except ImportError:
        raise ValueError(f"{source}: the `lora` section needs PEFT: pip install peft (or remove the section).") from None
    from peft import LoraConfig

    hints = typing.get_type_hints(LoraConfig)  # peft writes its annotations as strings
    fields = {f.name: hints.get(f.name, f.type) for f in dataclasses.fields(LoraConfig) if f.init}  # lora_config's among them
    for key, value in section.items():
        _check_key(source, "lora", key, value, fields)
    try:
        lora_config(**section)
    except Exception as error:
        raise ValueError(f"{source}: bad `lora` section {section!r}: {error}") from None


def _check_key(source: str, section: str, key: str, value: Any, fields: dict[str, Any]) -> None:
    if key not in fields:
        close = [name for name in fields if name.startswith(key[:4])][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise ValueError(f"{source}: unknown key {section}.{key}.{hint}")
    if not _matches(value, fields[key]):
        raise ValueError(f"{source}: {section}.{key} = {value!r} has the wrong type; expected {fields[key]}.")


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a dataclass field annotation (basic types; other annotations are left to the owner)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return isinstance(value, str) and value in {member.value for member in annotation}
    return True


__all__ = ["TrainConfig", "load_train_config", "parse_overrides", "resolve_config_path", "validate_train_config", "CONFIG_DIR"]
