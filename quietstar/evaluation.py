"""Likelihood-gain report: what the thoughts buy on held-out text, token by token.

For every token of the text: NLL without thought (base) and after thinking (mixed), both from one forward
(`scoring.token_log_probs`). Reported overall and bucketed by base-NLL quartile, because the paper's finding is that
thoughts help most on hard tokens (Zelikman et al. 2024, "hard tokens gain most"). The overall numbers are the plain
means of the per-token values stored in the report.

    report = likelihood_gain(model, tokenizer, "heldout.txt")
    report.save("eval/")   # likelihood_gain.json, likelihood_gain.md, likelihood_gain.png
"""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .datafiles import DataFormatError, file_sha256, read_jsonl
from .modeling_quietstar import QuietStarForCausalLM
from .scoring import right_pad, thought_sampling, token_log_probs

N_BUCKETS = 4  # quartiles of base NLL


@dataclass
class DifficultyBucket:
    """Tokens whose base NLL lies in [base_nll_low, base_nll_high] (one quartile); means in nats per token."""

    name: str
    base_nll_low: float
    base_nll_high: float
    n_tokens: int
    base_nll: float
    mixed_nll: float
    gain: float  # base_nll - mixed_nll: > 0 means the thoughts help


@dataclass
class LikelihoodGainReport:
    """Per-token NLL with and without thoughts on one text file (nats per token)."""

    model: str
    data_file: str
    data_sha256: str
    n_documents: int
    n_windows: int
    n_tokens: int
    settings: dict
    base_nll: float
    mixed_nll: float
    gain: float
    buckets: list[DifficultyBucket]
    token_base_nll: list[float] = field(repr=False)
    token_mixed_nll: list[float] = field(repr=False)

    def markdown(self) -> str:
        lines = [
            f"Likelihood gain on `{Path(self.data_file).name}` ({self.n_tokens} tokens, {self.n_documents} documents; "
            f"thought temperature {self.settings['thought_temperature']}, seed {self.settings['seed']}). "
            "NLL in nats per token; gain = base - with thoughts.",
            "",
            "| tokens | base-NLL range | n | NLL base | NLL with thoughts | gain |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for b in self.buckets:
            lines.append(
                f"| {b.name} | {b.base_nll_low:.2f} - {b.base_nll_high:.2f} | {b.n_tokens} | {b.base_nll:.4f} | "
                f"{b.mixed_nll:.4f} | {b.gain:+.4f} |"
            )
        lines.append(f"| **all** | | {self.n_tokens} | {self.base_nll:.4f} | {self.mixed_nll:.4f} | {self.gain:+.4f} |")
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | os.PathLike, plot: bool = True) -> list[Path]:
        """Write likelihood_gain.json, .md and (plot=True, needs matplotlib) .png into `output_dir`; returns the paths."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        paths = [output_dir / "likelihood_gain.json", output_dir / "likelihood_gain.md"]
        paths[0].write_text(json.dumps(asdict(self), indent=1) + "\n")
        paths[1].write_text(self.markdown())
        if plot:
            paths.append(self.save_plot(output_dir / "likelihood_gain.png"))
        return paths

    def save_plot(self, path: str | os.PathLike) -> Path:
        """PNG: mean NLL per base-NLL quartile with and without thoughts, and the per-token gain against base NLL."""
        try:
            from matplotlib.figure import Figure  # no pyplot: no global state, no display backend needed
        except ImportError as error:
            raise ImportError("the plot needs matplotlib: `pip install 'quietstar[plot]'` (or pass plot=False / --no-plot).") from error
        figure = Figure(figsize=(10, 4), layout="constrained")
        bars, scatter = figure.subplots(1, 2)
        positions = torch.arange(len(self.buckets), dtype=torch.float64).tolist()
        bars.bar([p - 0.2 for p in positions], [b.base_nll for b in self.buckets], width=0.4, label="base (no thought)")
        bars.bar([p + 0.2 for p in positions], [b.mixed_nll for b in self.buckets], width=0.4, label="with thoughts")
        bars.set_xticks(positions, [b.name for b in self.buckets])
        bars.set_ylabel("mean NLL (nats/token)")
        bars.set_title("NLL by base-NLL quartile")
        bars.legend()
        base = torch.tensor(self.token_base_nll)
        gain = base - torch.tensor(self.token_mixed_nll)
        scatter.scatter(base.tolist(), gain.tolist(), s=4, alpha=0.4)
        scatter.plot([b.base_nll for b in self.buckets], [b.gain for b in self.buckets], "o-", color="C3", label="quartile mean")
        scatter.axhline(0.0, color="grey", linewidth=0.8)
        scatter.set_xlabel("base NLL (token difficulty)")
        scatter.set_ylabel("gain = base NLL - NLL with thoughts")
        scatter.set_title(f"{self.model}: overall gain {self.gain:+.4f}")
        scatter.legend()
        figure.savefig(path, dpi=120)
        return Path(path)


def read_documents(path: str | os.PathLike, text_fields: tuple[str, ...] = ("text",)) -> list[str]:
    """Documents of a text file: a `.jsonl` file gives one per line (its `text_fields` joined by newlines), any other
    file is one document."""
    path = Path(path)
    if path.suffix != ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"no text file at {path}.")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataFormatError(f"{path} is empty: pass held-out text (a .txt file, or .jsonl with a 'text' field).")
        return [text]
    example = json.dumps({name: "..." for name in text_fields})
    records = read_jsonl(path, {name: str for name in text_fields}, example)
    return ["\n".join(record[name] for name in text_fields) for _, record in records]


def likelihood_gain(
    model: QuietStarForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str | os.PathLike,
    *,
    text_fields: tuple[str, ...] = ("text",),
    context_length: int = 256,
    batch_size: int = 4,
    max_documents: int | None = None,
    thought_temperature: float | None = 0.0,
    seed: int = 0,
    model_name: str | None = None,
    progress: bool = True,
) -> LikelihoodGainReport:
    """Per-token NLL with and without thoughts on `data_file`, each document cut into windows of `context_length`
    tokens (every token but a window's first is scored, with the window's earlier tokens as context).
    `thought_temperature` 0 = greedy thoughts (deterministic), None = the model's own, sampled from `seed`."""
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (one context token and one scored token), got {context_length}.")
    documents = read_documents(data_file, text_fields)[:max_documents]
    windows = []
    for document in documents:
        ids = tokenizer(document).input_ids
        windows += [ids[start : start + context_length] for start in range(0, len(ids), context_length)]
    windows = [window for window in windows if len(window) >= 2]
    if not windows:
        raise DataFormatError(f"{data_file}: no document has two or more tokens, so there is nothing to score.")

    base_nll, mixed_nll = [], []
    batches = [windows[start : start + batch_size] for start in range(0, len(windows), batch_size)]
    with thought_sampling(model, thought_temperature, seed):
        for batch in tqdm(batches, desc="likelihood gain", unit="batch", disable=not progress):
            input_ids, attention_mask = right_pad(batch, pad_id=0)
            scores = token_log_probs(model, input_ids, attention_mask)
            base_nll += (-scores.base[scores.valid]).double().tolist()
            mixed_nll += (-scores.mixed[scores.valid]).double().tolist()

    settings = dict(
        context_length=context_length,
        batch_size=batch_size,
        text_fields=list(text_fields),
        max_documents=max_documents,
        thought_temperature=model.config.inference_thought_temperature if thought_temperature is None else thought_temperature,
        seed=seed,
        n_thoughts=model.config.n_thoughts,
        thought_length=model.config.thought_length,
    )
    base, mixed = torch.tensor(base_nll, dtype=torch.float64), torch.tensor(mixed_nll, dtype=torch.float64)
    return LikelihoodGainReport(
        model=model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        data_file=str(data_file),
        data_sha256=file_sha256(data_file),
        n_documents=len(documents),
        n_windows=len(windows),
        n_tokens=len(base_nll),
        settings=settings,
        base_nll=base.mean().item(),
        mixed_nll=mixed.mean().item(),
        gain=(base - mixed).mean().item(),
        buckets=difficulty_buckets(base, mixed),
        token_base_nll=base_nll,
        token_mixed_nll=mixed_nll,
    )


def difficulty_buckets(base_nll: torch.Tensor, mixed_nll: torch.Tensor) -> list[DifficultyBucket]:
    """Split tokens into N_BUCKETS equal-count groups by base NLL (easiest first); mean NLLs and gain per group."""
    order = base_nll.argsort(stable=True)
    names = ["Q1 (easiest)", "Q2", "Q3", "Q4 (hardest)"] if N_BUCKETS == 4 else [f"bucket {k + 1}" for k in range(N_BUCKETS)]
    buckets = []
    for name, index in zip(names, order.tensor_split(N_BUCKETS)):
        if index.numel() == 0:  # fewer tokens than buckets
            continue
        base, mixed = base_nll[index], mixed_nll[index]
        buckets.append(
            DifficultyBucket(
                name=name,
                base_nll_low=base.min().item(),
                base_nll_high=base.max().item(),
                n_tokens=index.numel(),
                base_nll=base.mean().item(),
                mixed_nll=mixed.mean().item(),
                gain=(base - mixed).mean().item(),
            )
        )
    return buckets


__all__ = ["LikelihoodGainReport", "DifficultyBucket", "likelihood_gain", "read_documents", "difficulty_buckets"]


# ---- the `quietstar eval` command ------------------------------------------------------------------------------------


def add_eval_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "eval",
        help="likelihood gain on held-out text and zero-shot QA, with and without thoughts",
        description="Writes <task>.json and <task>.md per task, likelihood_gain.png, and eval_results.md (all tables, "
        "for the model card: `quietstar push --eval-dir`). Nothing is downloaded: pass local files.",
    )
    parser.add_argument("model", type=Path, help="a model directory (save_pretrained output)")
    parser.add_argument("--output-dir", type=Path, required=True, help="where the results go")
    base = parser.add_argument_group("plain causal LM as the model (untrained thoughts, a baseline)")
    base.add_argument("--wrap-base", action="store_true", help="wrap a plain causal LM directory with from_base")
    base.add_argument("--thought-length", type=int, help="with --wrap-base: thought tokens (default: the config's)")
    base.add_argument("--n-thoughts", type=int, help="with --wrap-base: thoughts per position")
    data = parser.add_argument_group("data (at least one)")
    data.add_argument("--text", type=Path, help="held-out text: .txt, or .jsonl with --text-field(s)")
    data.add_argument("--text-field", action="append", help="jsonl field(s) holding the text (default: text)")
    data.add_argument("--multiple-choice", type=Path, help="CommonsenseQA-format jsonl (question, choices, answerKey)")
    data.add_argument("--gsm8k", type=Path, help="GSM8K-format jsonl (question, answer ending in '#### <number>')")
    settings = parser.add_argument_group("settings")
    settings.add_argument("--limit", type=int, help="first N items of each QA file (default: all)")
    settings.add_argument("--max-documents", type=int, help="first N documents of --text (default: all)")
    settings.add_argument("--context-length", type=int, default=256, help="tokens per window of --text")
    settings.add_argument("--batch-size", type=int, default=4, help="windows per forward for --text")
    settings.add_argument("--thought-temperature", type=float, default=0.0, help="0 = greedy thoughts (deterministic); -1 = the model's own")
    settings.add_argument("--seed", type=int, default=0, help="torch seed (sampled thoughts, chain-of-thought samples)")
    settings.add_argument("--cot-samples", type=int, default=0, help="k for GSM8K chain of thought maj@k; 0 = skip (slow)")
    settings.add_argument("--cot-max-new-tokens", type=int, default=128, help="reasoning tokens per sample")
    settings.add_argument("--cot-temperature", type=float, default=0.9, help="sampling temperature of the reasoning")
    settings.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    settings.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run_eval)


def run_eval(args) -> int:
    from .checkpoints import load_checkpoint
    from .qa import gsm8k_cot_majority, score_gsm8k_answers, score_multiple_choice

    if not (args.text or args.multiple_choice or args.gsm8k):
        raise SystemExit("quietstar eval: nothing to do; pass --text, --multiple-choice and/or --gsm8k.")
    fields = {name: getattr(args, name) for name in ("thought_length", "n_thoughts") if getattr(args, name) is not None}
    model, tokenizer = load_checkpoint(args.model, wrap_base=args.wrap_base, **fields)
    common = dict(
        thought_temperature=None if args.thought_temperature < 0 else args.thought_temperature,
        seed=args.seed,
        model_name=str(args.model) + (" (wrapped base, untrained thoughts)" if args.wrap_base else ""),
        progress=not args.no_progress,
    )
    output_dir = args.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    tables = []
    if args.text:
        report = likelihood_gain(
            model, tokenizer, args.text, text_fields=tuple(args.text_field or ["text"]), context_length=args.context_length,
            batch_size=args.batch_size, max_documents=args.max_documents, **common,
        )
        report.save(output_dir, plot=not args.no_plot)
        tables.append(report.markdown())
    tasks = []
    if args.multiple_choice:
        tasks.append(("multiple_choice", lambda: score_multiple_choice(model, tokenizer, args.multiple_choice, limit=args.limit, **common)))
    if args.gsm8k:
        tasks.append(("gsm8k_answer", lambda: score_gsm8k_answers(model, tokenizer, args.gsm8k, limit=args.limit, **common)))
        if args.cot_samples > 0:
            cot = dict(k=args.cot_samples, max_new_tokens=args.cot_max_new_tokens, temperature=args.cot_temperature)
            tasks.append(("gsm8k_cot", lambda: gsm8k_cot_majority(model, tokenizer, args.gsm8k, limit=args.limit, **cot, **common)))
    for name, run in tasks:
        result = run()
        (output_dir / f"{name}.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
        (output_dir / f"{name}.md").write_text(result.markdown())
        tables.append(result.markdown())
    summary = "\n".join(tables)
    (output_dir / "eval_results.md").write_text(summary)
    print(summary)
    return 0
