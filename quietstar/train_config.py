"""Training configs: YAML files validated before anything heavy is loaded.

    base: null                # null = SmolLM2-135M-Instruct (embedded); else a local HF model directory or a .gguf file
    quietstar: {...}          # QuietStarConfig fields (thought_length, n_thoughts, lookahead, policy_weight, ...)
    data: {...}               # DataConfig fields (path, template, window, packing, eval_windows, ...)
    training: {...}           # QuietStarTrainingArguments fields: transformers.TrainingArguments (max_steps,
                              # learning_rate, save_steps, bf16, ...) + head_learning_rate, marker_learning_rate, ...
    lora: {...}               # optional: train LoRA with PEFT; `quietstar.lora.lora_config` arguments (r, lora_alpha,
                              # target_modules, any other LoraConfig field). Absent or null: full fine-tuning.
    task: {name: ..., ...}    # optional: a recipe's task (quietstar/tasks): its data, held-out items and metric
                              # replace the `data` section
    stages: [...]             # optional: a recipe's stages, run in order through the same path, each
                              # {name, data (the task's text variant), thinking (false: a plain causal-LM fine-tune),
                              #  stop_at ({metric: value}: end at the first evaluation that reaches it),
                              #  quietstar: {...}, training: {...} (over the top-level sections)}
    controls: true            # after the last (thinking) stage: the same stage with thinking off, for the same steps
                              # (OUT/control) and for the same FLOPs (OUT/control-flops), and the report comparing them

Command-line overrides use dotted keys: `--training.max_steps 5 --quietstar.thought_length 8 --base path/to/model`
(an override of a `quietstar` or `training` key also replaces the value a stage sets for it; one stage's own value:
`--stages.chains.training.max_steps 6000`);
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

from .configuration_quietstar import QuietStarConfig
from .data import DataConfig
from .trainer import QuietStarTrainingArguments

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = "default"
SECTIONS = ("base", "quietstar", "data", "training", "lora", "task", "stages", "controls")
STAGE_KEYS = ("name", "data", "thinking", "stop_at", "quietstar", "training")
# QuietStarConfig fields a training config may set; the rest come from the base model or from_base.
QUIETSTAR_KEYS = tuple(
    f.name
    for f in dataclasses.fields(QuietStarConfig)
    if f.name not in {"text_config", "start_thought_token_id", "end_thought_token_id", "tie_word_embeddings"}
    and f.name in QuietStarConfig.__annotations__
)


@dataclass
class Stage:
    """One run of the training path. `data`: the task's text variant; `thinking` False = a plain causal-LM fine-tune
    of the stage's input model; `quietstar` / `training` are laid over the config's top-level sections."""

    name: str = "thinking"
    data: str | None = None
    thinking: bool = True
    stop_at: dict[str, float] | None = None
    quietstar: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """A validated training config. `quietstar`, `training` and `lora` are keyword arguments for
    `QuietStarForCausalLM.from_base`, `QuietStarTrainingArguments` and `quietstar.lora.lora_config` (None: no LoRA).
    `stages`: empty = one thinking stage with the top-level sections."""

    base: str | None = None
    quietstar: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    task: dict[str, Any] | None = None
    stages: list[Stage] = field(default_factory=list)
    controls: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": self.base, "quietstar": self.quietstar, "data": dataclasses.asdict(self.data),
            "training": self.training, "lora": self.lora, "task": self.task,
            "stages": [dataclasses.asdict(stage) for stage in self.stages], "controls": self.controls,
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
    overrides = dict(overrides or {})
    addressed = {key: overrides.pop(key) for key in list(overrides) if key.startswith("stages.")}
    for key, value in overrides.items():
        if key == "data" and isinstance(value, str):  # `--data FILE`, the form users type first
            key = "task.data" if raw.get("task") else "data.path"
        _set_dotted(raw, key, value)
        section, _, name = key.partition(".")
        for stage in raw.get("stages") or []:  # the command line has the last word: also over a stage's own value
            if isinstance(stage, dict) and isinstance(stage.get(section), dict) and name in stage[section]:
                stage[section][name] = value
    for key, value in addressed.items():  # --stages.NAME.section.key VALUE: one stage's value, applied last
        _set_stage_value(raw, key, value)
    return validate_train_config(raw, source=str(path))


def _set_stage_value(raw: dict, key: str, value: Any) -> None:
    _, name, section, field_name = (key.split(".", 3) + ["", "", ""])[:4]
    stages = {stage.get("name"): stage for stage in raw.get("stages") or [] if isinstance(stage, dict)}
    if name not in stages:
        raise ValueError(f"override --{key}: no stage named {name!r}; the config's stages are {sorted(stages)}.")
    if section in ("quietstar", "training") and field_name:
        stages[name].setdefault(section, {})[field_name] = value
    elif section in STAGE_KEYS and not field_name:
        stages[name][section] = value
    else:
        raise ValueError(f"override --{key}: expected --stages.{name}.training.KEY, .quietstar.KEY or one of {STAGE_KEYS}.")


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
    if section in ("base", "controls", "stages"):
        raise ValueError(f"override --{key}: `{section}` is a single value (--{section} VALUE; one stage's value: "
                         "--stages.NAME.training.KEY VALUE).")
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
    sections = {name: raw.get(name) or {} for name in ("quietstar", "data", "training", "lora", "task")}
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section `{name}` must be a mapping of keys to values, got {section!r}.")

    _check_quietstar(source, "quietstar", sections["quietstar"])
    data_fields = {f.name: f.type for f in dataclasses.fields(DataConfig)}
    for key, value in sections["data"].items():
        _check_key(source, "data", key, value, data_fields)
    _check_training(source, "training", sections["training"])
    lora = None if raw.get("lora") is None else dict(sections["lora"])  # `lora: {}` = LoRA with the defaults
    if lora is not None:
        _check_lora(source, lora)
    task = None
    if raw.get("task") is not None:
        from .tasks import load_task

        task = dict(sections["task"])
        try:
            load_task(task)
        except (ValueError, FileNotFoundError) as error:
            raise ValueError(f"{source}: {error}") from None
    stages = [_check_stage(source, index, stage) for index, stage in enumerate(raw.get("stages") or [])]
    controls = raw.get("controls", False)
    if not isinstance(controls, bool):
        raise ValueError(f"{source}: `controls` must be true or false, got {controls!r}.")
    if controls and stages and not stages[-1].thinking:
        raise ValueError(
            f"{source}: `controls: true` compares the last stage with thinking off; it must be a thinking stage."
        )
    return TrainConfig(
        base=base, quietstar=dict(sections["quietstar"]), data=DataConfig(**sections["data"]),
        training=dict(sections["training"]), lora=lora, task=task, stages=stages, controls=controls,
    )


def _check_quietstar(source: str, section: str, values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key not in QUIETSTAR_KEYS:
            raise ValueError(f"{source}: unknown key {section}.{key}; valid keys: {list(QUIETSTAR_KEYS)}.")
        try:
            QuietStarConfig(**{key: value})  # the config's own (strict) validation, one field at a time
        except Exception as error:
            raise ValueError(f"{source}: bad value for {section}.{key} = {value!r}: {error}") from None


def _check_training(source: str, section: str, values: dict[str, Any]) -> None:
    fields = {f.name: f.type for f in dataclasses.fields(QuietStarTrainingArguments) if f.init}
    for key, value in values.items():
        _check_key(source, section, key, value, fields)


def _check_stage(source: str, index: int, raw: Any) -> Stage:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: {where} must be a mapping with keys {STAGE_KEYS}, got {raw!r}.")
    unknown = sorted(set(raw) - set(STAGE_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown} in {where}; a stage has the keys {STAGE_KEYS}.")
    stage = Stage(**{key: value for key, value in raw.items() if value is not None})
    if not isinstance(stage.name, str) or not re.fullmatch(r"[\w.-]+", stage.name):
        raise ValueError(
            f"{source}: {where}.name must be a directory-safe name (letters, digits, _ . -), got {stage.name!r}."
        )
    if not isinstance(stage.thinking, bool):
        raise ValueError(f"{source}: {where}.thinking must be true or false, got {stage.thinking!r}.")
    if stage.stop_at is not None and not (
        isinstance(stage.stop_at, dict) and all(isinstance(v, (int, float)) for v in stage.stop_at.values())
    ):
        raise ValueError(f"{source}: {where}.stop_at must map a metric to a number, e.g. {{accuracy: 0.98}}.")
    _check_quietstar(source, f"{where}.quietstar", stage.quietstar)
    _check_training(source, f"{where}.training", stage.training)
    return stage


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


__all__ = ["TrainConfig", "Stage", "load_train_config", "parse_overrides", "resolve_config_path", "validate_train_config", "CONFIG_DIR"]
