"""Look at the thoughts: generate with a `ThoughtTrace`, get per-token thought text and mixing weight, and render them.

    generations = generate_with_thoughts(model, tokenizer, "Q: 2 + 3 * 4 = ?\\nA:", max_new_tokens=20)
    render_html(generations, "thoughts.html")    # text coloured by mixing weight, each token's thought on hover + table
    render_png(generations, "thoughts.png")      # the same picture as an image (needs matplotlib)

The mixing weight w (in (0, 1) under the default sigmoid activation) is how much the prediction of a token trusted its thought (0 = the base model alone):
the picture shows where the model thinks and how much it trusts what it thought.
"""

import html
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .thinking import ThoughtTrace


@dataclass
class TokenThought:
    """One generated token and the thought written before it (None where adaptive thinking skipped it)."""

    token: str
    token_id: int
    thought: str | None
    thought_ids: list[int]
    mixing_weight: float
    predicted_gain: float


@dataclass
class ThoughtfulGeneration:
    """A prompt, its continuation and, per generated token, what the model thought before writing it."""

    prompt: str
    tokens: list[TokenThought] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(token.token for token in self.tokens)


@torch.no_grad()
def generate_with_thoughts(model, tokenizer, prompts: str | list[str], **generate_kwargs) -> list[ThoughtfulGeneration]:
    """`model.generate` on `prompts` (left-padded as one batch) recording every thought.

    `generate_kwargs` go to `generate` unchanged (max_new_tokens, do_sample, top_p, thought_temperature, ...).
    Returns one `ThoughtfulGeneration` per prompt; tokens after the end of sequence are dropped.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation appends on the right
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = padding_side
    trace = ThoughtTrace()
    generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    sequences = model.generate(**batch, thought_trace=trace, **generate_kwargs)
    new_tokens = sequences[:, batch["input_ids"].shape[1] :]
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])

    generations = []
    for row, prompt in enumerate(prompts):
        generation = ThoughtfulGeneration(prompt)
        for step, token_id in enumerate(new_tokens[row].tolist()):
            thought = trace.steps[step]
            thought_ids = thought.thought_ids[row].tolist()
            taken = bool(thought.thought_taken[row])
            generation.tokens.append(
                TokenThought(
                    token=tokenizer.decode([token_id]),
                    token_id=token_id,
                    thought=tokenizer.decode(thought_ids) if taken else None,
                    thought_ids=thought_ids if taken else [],
                    mixing_weight=float(thought.mixing_weight[row]),
                    predicted_gain=float(thought.predicted_gain[row]),
                )
            )
            if token_id in eos:
                break
        generations.append(generation)
    return generations


def _colour(weight: float, scale: tuple[float, float]) -> tuple[float, float, float]:
    """White (the smallest w shown) to orange (the largest), as RGB in [0, 1]."""
    low, high = scale
    x = min(max((weight - low) / (high - low), 0.0), 1.0) if high > low else 1.0
    return 1.0, 1.0 - 0.45 * x, 1.0 - 0.9 * x


def _scale(generations: list[ThoughtfulGeneration]) -> tuple[float, float]:
    """The colour scale: the range of the mixing weights shown (they differ little before training)."""
    weights = [t.mixing_weight for g in generations for t in g.tokens] or [0.0]
    return min(weights), max(weights)


def render_html(generations: list[ThoughtfulGeneration], path: str | Path) -> Path:
    """Write an HTML page: each continuation with tokens coloured by mixing weight (hover: the thought), then a table
    of token, mixing weight, predicted gain and thought. Returns the path."""
    scale = _scale(generations)
    parts = [
        "<!doctype html><meta charset='utf-8'><title>quietstar thoughts</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}span.t{white-space:pre-wrap;border-radius:3px}"
        "td{padding:2px 8px;vertical-align:top}td.th{font-style:italic;color:#555}</style>",
        f"<p>Colour = mixing weight w (white {scale[0]:.3f}, orange {scale[1]:.3f}): how much each token's prediction "
        "trusted its thought (0 = not at all).</p>",
    ]
    for number, generation in enumerate(generations):
        parts.append(f"<h3>Generation {number + 1}</h3><p><b>{html.escape(generation.prompt)}</b>")
        for token in generation.tokens:
            r, g, b = (int(255 * c) for c in _colour(token.mixing_weight, scale))
            hint = html.escape(token.thought if token.thought is not None else "(no thought)", quote=True)
            parts.append(f"<span class='t' style='background:rgb({r},{g},{b})' title='{hint}'>{html.escape(token.token)}</span>")
        parts.append("</p><table><tr><th>token</th><th>w</th><th>predicted gain</th><th>thought</th></tr>")
        for token in generation.tokens:
            thought = html.escape(token.thought) if token.thought is not None else "<i>skipped</i>"
            parts.append(
                f"<tr><td><code>{html.escape(repr(token.token))}</code></td><td>{token.mixing_weight:.3f}</td>"
                f"<td>{token.predicted_gain:+.3f}</td><td class='th'>{thought}</td></tr>"
            )
        parts.append("</table>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def render_png(generations: list[ThoughtfulGeneration], path: str | Path, max_tokens: int = 60) -> Path:
    """Write a PNG: one row per generated token (at most `max_tokens` per generation), the token in a box coloured by
    its mixing weight, then the thought written before it. Needs matplotlib (`pip install quietstar[plot]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("render_png needs matplotlib: `pip install matplotlib` (or quietstar[plot]).") from error
    scale = _scale(generations)
    rows = []
    for generation in generations:
        rows.append(("title", generation.prompt.strip().replace("\n", " ")[:100], None))
        for token in generation.tokens[:max_tokens]:
            thought = token.thought.replace("\n", " ") if token.thought is not None else "(skipped)"
            rows.append(("token", repr(token.token), (token.mixing_weight, thought)))
    figure = plt.figure(figsize=(10, 0.6 + 0.28 * len(rows)))
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_axis_off()
    step = 1.0 / (len(rows) + 1)
    axes.text(0.01, 1 - step / 2, f"colour = mixing weight w (white {scale[0]:.3f}, orange {scale[1]:.3f});  "
              "columns: token, w, the thought written before it",
              fontsize=9, va="center", color="#333")
    for index, (kind, label, detail) in enumerate(rows, start=1):
        y = 1 - (index + 0.5) * step
        if kind == "title":
            axes.text(0.01, y, label, fontsize=9, fontweight="bold", va="center")
            continue
        weight, thought = detail
        axes.text(0.03, y, label[:24], fontsize=9, family="monospace", va="center",
                  bbox=dict(boxstyle="round,pad=0.2", facecolor=_colour(weight, scale), edgecolor="#ccc"))
        axes.text(0.25, y, f"{weight:.3f}", fontsize=8, va="center", color="#333")
        axes.text(0.32, y, thought[:110], fontsize=8, va="center", style="italic", color="#444")
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
