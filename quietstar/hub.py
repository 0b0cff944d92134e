"""Publishing: a model directory anyone can load, with or without quietstar installed, and its model card.

`save_for_hub` writes what `save_pretrained` writes (config with `auto_map`, the flat model code with its relative
imports, safetensors weights) plus the tokenizer with its thought tokens and a model card README.md (YAML metadata,
usage, thought settings, the evaluation tables when given). `push_to_hub` uploads exactly that folder in one commit.

`model.push_to_hub(repo_id)` (transformers' own) also works: it uploads the weights, config and code with
transformers' generic card; use `quietstar push` / `push_to_hub` here to include the tokenizer and this card.
"""

import os
import re
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData
from transformers import PreTrainedTokenizerBase

from .modeling_quietstar import QuietStarForCausalLM

TAGS = ["quietstar", "quiet-star", "reasoning", "custom_code"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

CARD_TEMPLATE = """---
{card_data}
---

# {title}

A [Quiet-STaR](https://arxiv.org/abs/2403.09629) model (Zelikman et al. 2024, "Language Models Can Teach Themselves
to Think Before Speaking"), built with [quietstar](https://pypi.org/project/quietstar/). After every token it writes a
short hidden thought between `<|startofthought|>` and `<|endofthought|>`, and a mixing head blends the prediction after
the thought with the base prediction{base_sentence}.

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
# The model code ships with the weights: trust_remote_code=True loads it without quietstar installed
# (the thought attention then runs in PyTorch). With `import quietstar` first, trust_remote_code is not needed.
model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
out = model(**tokenizer("Q: 2 + 3 = ?\\nA:", return_tensors="pt"))
# out.logits: next-token log-probabilities after thinking; out.base_logits: without a thought
```

## Thought settings

| setting | value |
|---|---|
{settings}

## Evaluation

{evaluation}
"""

NO_EVALUATION = "No evaluation was attached when this model was published (`quietstar eval` produces one)."


def model_card(
    model: QuietStarForCausalLM,
    *,
    repo_id: str = "path/to/this/model",
    base_model: str | None = None,
    license: str = "apache-2.0",
    evaluation: str | None = None,
) -> ModelCard:
    """The model card: YAML metadata (library_name, pipeline_tag, base_model, license, tags), usage, the thought
    settings and `evaluation` (markdown, e.g. the tables `quietstar eval` writes) when given.

    `base_model` defaults to the wrapped model's name when that is a Hub id (a local path is not metadata)."""
    config = model.config
    if base_model is None:
        name = getattr(config.text_config, "_name_or_path", "") or ""
        base_model = name if HUB_ID.match(name) and not Path(name).exists() else None
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        license=license,
        tags=TAGS,
    )
    fields = ("thought_length", "n_thoughts", "lookahead", "thought_temperature", "inference_thought_temperature",
              "policy_weight", "base_loss_weight",
              "mixed_loss_weight", "thought_embedding_scale")
    settings = "\n".join(f"| `{name}` | {getattr(config, name)} |" for name in fields)
    settings += f"\n| base architecture | `{config.text_config.model_type}` |"
    content = CARD_TEMPLATE.format(
        card_data=card_data.to_yaml(),
        title=repo_id.split("/")[-1],
        base_sentence=f", here on top of [{base_model}](https://huggingface.co/{base_model})" if base_model else "",
        repo_id=repo_id,
        settings=settings,
        evaluation=evaluation.strip() if evaluation else NO_EVALUATION,
    )
    return ModelCard(content)


def save_for_hub(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | os.PathLike,
    *,
    repo_id: str | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    evaluation: str | None = None,
) -> list[str]:
    """Write model (safetensors, config with auto_map, code), tokenizer and README.md into `directory`; returns the
    written file names, sorted."""
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    card = model_card(model, repo_id=repo_id or directory.name, base_model=base_model, license=license, evaluation=evaluation)
    card.save(directory / "README.md")
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def push_to_hub(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload Quiet-STaR model",
    base_model: str | None = None,
    license: str = "apache-2.0",
    evaluation: str | None = None,
    api: HfApi | None = None,
):
    """Create `repo_id` if needed and upload the `save_for_hub` folder in one commit; returns the commit info.
    `api` defaults to `HfApi(token=token)` (tests pass a local fake)."""
    api = api if api is not None else HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as folder:
        files = save_for_hub(model, tokenizer, folder, repo_id=repo_id, base_model=base_model, license=license, evaluation=evaluation)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)) for name in files]
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)


__all__ = ["model_card", "save_for_hub", "push_to_hub"]


# ---- the `quietstar push` command ------------------------------------------------------------------------------------


def add_push_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "push",
        help="upload a model directory to the Hub with its tokenizer, remote code and a model card",
    )
    parser.add_argument("model", type=Path, help="a Quiet-STaR model directory (save_pretrained output, with tokenizer)")
    parser.add_argument("repo_id", help="Hub repository, e.g. me/quietstar-smollm2")
    parser.add_argument("--eval-dir", type=Path, help="a `quietstar eval` output directory: its tables go into the card")
    parser.add_argument("--base-model", help="Hub id of the base model, for the card's metadata")
    parser.add_argument("--license", default="apache-2.0", help="license id for the card (default: apache-2.0)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", help="Hub token (default: the stored login)")
    parser.add_argument("--commit-message", default="Upload Quiet-STaR model")
    parser.set_defaults(run=run_push)


def run_push(args) -> int:
    from .checkpoints import load_checkpoint

    evaluation = None
    if args.eval_dir is not None:
        results = args.eval_dir / "eval_results.md"
        if not results.is_file():
            raise FileNotFoundError(f"no eval_results.md in {args.eval_dir}: pass the --output-dir of `quietstar eval`.")
        evaluation = results.read_text()
    model, tokenizer = load_checkpoint(args.model)
    commit = push_to_hub(
        model, tokenizer, args.repo_id, private=args.private or None, token=args.token, commit_message=args.commit_message,
        base_model=args.base_model, license=args.license, evaluation=evaluation,
    )
    print(commit.commit_url)
    return 0
