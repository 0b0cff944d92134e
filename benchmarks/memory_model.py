"""Peak memory of one Quiet-STaR training step: a model counted from the architecture, checked against measurement.

    python benchmarks/memory_model.py validate   # predicted vs measured step memory, random llamas on this CPU
    python benchmarks/memory_model.py table      # the paper's settings (T=12, A=4, N=2, L=256) for four base shapes:
                                                 # which batch sizes fit in 24 / 80 / 141 GB
    python benchmarks/memory_model.py floor      # measured step peak vs the floor's (S plain passes), checkpointed
                                                 # (--attention cpu: with the CPU kernel path, attention_cpu.py)

The step memory (what a training step adds on top of the weights and optimizer states) is, in bytes, with
Nt = B * L text tokens, Nc = B * N * L * S chain tokens (S = T + A + 1), p the activation dtype's size:

    layer     per layer: Nt * a * p + Nc * (a + (Hq + 2 Hkv) D) * p,  a = 4H + 3 Hq D + 2 Hkv D + 4I
              (per token, counted from a llama layer: both norms' inputs and outputs, q/k/v after rotary, the
              attention output and o_proj's input, the MLP's gate, up, activation and product; chain tokens also
              keep q/k/v regrouped per thought and position), + the PyTorch reference attention's probabilities
              2 * Nc * Hq * (L + S) * 4 when L <= 64 (longer texts run in checkpointed blocks of 64 positions,
              quietstar.attention.POSITION_BLOCK; the fused Triton kernel saves only its inputs and the log-sum-exp; the
              CPU kernel path, attention_cpu.py, also its float32 output: Nc * Hq * (D + 1) * 4)
    saved     without checkpointing: layers * layer; with per-layer checkpointing: (Nt + Nc) * layers * H * p
              (each layer's input), and in backward one recomputed layer (a transient)
    logits    the text pass's logits Nt * V * p and their gradient
    chunk     one chunk of log-probabilities at a time, rows * V * 4 (x3: logits, log-softmax, gradient),
              rows = min(1024, B * L): never a vocabulary-sized tensor per chain token (a transient)
    grads     4 bytes per parameter (fp32 master weights)
    head      V * H * 4: the output head's weight gradients of the mixed and the policy term are formed in forward
              and held until backward reaches them (output_head.HeadLogProbs): two V x H buffers before the head's
              own gradient (counted in grads) exists, at most one beside it after
    step      grads + head + saved + logits + max(chunk, recomputed layer)

and the whole training process adds weights (4 bytes/param) and AdamW's two moments (8 bytes/param).
Measured: the bytes of all tensors alive at once during one step (a TorchDispatchMode that follows each storage's
lifetime; independent of the allocator), for the same step on CPU.

Prints a table, then one JSON line with every figure.
"""

import argparse
import json
import sys
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from quietstar.attention import POSITION_BLOCK  # noqa: E402  (the reference's block: below it, probabilities are kept)

GIB = 2**30


@dataclass
class BaseShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def parameters(self) -> int:
        """Base parameters + the mixing head (3-layer MLP of width H on [h_base; h_thought])."""
        h, d = self.hidden, self.head_dim
        layer = h * (self.heads * d) * 2 + h * (self.kv_heads * d) * 2 + 3 * h * self.intermediate + 2 * h
        embeddings = self.vocab * h * (1 if self.tied else 2)
        return embeddings + self.layers * layer + h + (2 * h * h + h * h + h + 3 * h + 1)


# Shapes from the models' published configs (vocabulary as shipped; the two markers round into it or add 2 rows).
SHAPES = {
    "SmolLM2-135M": BaseShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
    "Qwen2.5-0.5B": BaseShape("Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, tied=True),
    "Qwen2.5-1.5B": BaseShape("Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, tied=True),
    "Mistral-7B": BaseShape("Mistral-7B", 4096, 14336, 32, 32, 8, 32000, tied=False),
}


@dataclass
class StepShape:
    batch: int
    length: int
    n_thoughts: int = 2
    thought_length: int = 12
    lookahead: int = 4
    activation_bytes: int = 2  # bf16 autocast; 4 for fp32
    checkpointing: bool = True
    attention: str = "fused"  # "fused" (Triton, GPU), "cpu" (attention_cpu.py) or "torch" (the PyTorch reference)
    chunk_rows: int = 1024


def predict(base: BaseShape, step: StepShape) -> dict[str, float]:
    """Bytes of one training step by component, and `step` = their peak (weights and optimizer states excluded):
    what stays alive through the step (gradients, the head gradients formed in forward, saved activations, the text
    logits) plus the largest transient, either one chunk of log-probabilities (in forward) or, with checkpointing,
    one recomputed layer (in backward) -- they never coexist."""
    h, d, p = base.hidden, base.head_dim, step.activation_bytes
    chain = step.thought_length + step.lookahead + 1
    text_tokens = step.batch * step.length
    chain_tokens = text_tokens * step.n_thoughts * chain
    per_token_layer = 4 * h + 3 * base.heads * d + 2 * base.kv_heads * d + 4 * base.intermediate
    chain_extra = (base.heads + 2 * base.kv_heads) * d  # q/k/v regrouped per (thought, position) for thought attention
    attention_layer = 0  # the PyTorch reference's saved probabilities (+ their contiguous copies for the value matmul)
    if step.attention == "torch" and step.length <= POSITION_BLOCK:
        attention_layer = 2 * chain_tokens * base.heads * (step.length + chain) * 4
    if step.attention == "cpu":  # its float32 output and log-sum-exp
        attention_layer = chain_tokens * base.heads * (d + 1) * 4
    layer_saved = text_tokens * per_token_layer * p + chain_tokens * (per_token_layer + chain_extra) * p + attention_layer
    if step.checkpointing:
        saved, recompute = (text_tokens + chain_tokens) * base.layers * h * p, layer_saved
    else:
        saved, recompute = base.layers * layer_saved, 0
    parts = dict(
        grads=4 * base.parameters,
        head=base.vocab * h * 4,  # the head gradients formed in forward, beyond the head's own gradient (see above)
        saved=saved,
        logits=2 * text_tokens * base.vocab * p,  # the text pass's logits and their gradient
        chunk=3 * min(step.chunk_rows, text_tokens) * base.vocab * 4,  # chunks never exceed the text's B * L rows
        recompute=recompute,
    )
    parts["step"] = parts["grads"] + parts["head"] + saved + parts["logits"] + max(parts["chunk"], recompute)
    return parts


def training_memory(base: BaseShape, step: StepShape) -> float:
    """Peak bytes of a training process: fp32 weights and AdamW moments (12 bytes/param) + the step."""
    return 12 * base.parameters + predict(base, step)["step"]


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of tensor storage alive at once for everything created inside the mode: `peak`, and `largest` single
    storage. Each storage is counted once (views share it) and released when its storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.alive: set[int] = set()

    def _release(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()  # one Python object per storage for its whole life
            key, size = id(storage), storage.nbytes()
            if key in self.alive or size == 0:
                continue
            self.alive.add(key)
            self.live += size
            self.peak, self.largest = max(self.peak, self.live), max(self.largest, size)
            weakref.finalize(storage, self._release, key, size)
        return out


def random_quietstar(base: BaseShape, step: StepShape):
    import quietstar
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = ["<unk>", "---"] + [f"w{i}" for i in range(base.vocab - 4)]  # + 2 markers = base.vocab
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>")), unk_token="<unk>"
    )
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=base.hidden, intermediate_size=base.intermediate,
                         num_hidden_layers=base.layers, num_attention_heads=base.heads, num_key_value_heads=base.kv_heads,
                         tie_word_embeddings=base.tied)
    model, _ = quietstar.QuietStarForCausalLM.from_base(
        AutoModelForCausalLM.from_config(config), tokenizer, thought_length=step.thought_length,
        lookahead=step.lookahead, n_thoughts=step.n_thoughts, policy_weight=1.0,
        thought_attention_backend="cpu" if step.attention == "cpu" else "torch",
    )
    model.log_prob_chunk_rows = step.chunk_rows
    if step.checkpointing:
        model.activation_checkpointing_enable()
    return model.train()


def measure(base: BaseShape, step: StepShape) -> dict[str, float]:
    """Step bytes (peak of live tensors during forward + backward, gradients included) and the largest tensor."""
    model = random_quietstar(base, step)
    ids = torch.randint(2, base.vocab - 2, (step.batch, step.length), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()  # warm-up: lazy initialisations are not the step's memory
    model.zero_grad(set_to_none=True)
    tracker = LiveTensorBytes()
    with tracker:
        model(ids, labels=ids).loss.backward()
    return dict(step=tracker.peak, largest=tracker.largest, text_logits=step.batch * step.length * base.vocab * 4)


VALIDATION = [  # small random llamas (fp32, PyTorch attention), both sides of the 64-position block, ckpt on and off
    (BaseShape("llama-256x4", 256, 688, 4, 4, 2, 4096, tied=False), StepShape(2, 64, thought_length=4, activation_bytes=4, checkpointing=False, attention="torch")),
    (BaseShape("llama-256x4", 256, 688, 4, 4, 2, 4096, tied=False), StepShape(2, 64, thought_length=4, activation_bytes=4, checkpointing=True, attention="torch")),
    (BaseShape("llama-256x4", 256, 688, 4, 4, 2, 4096, tied=False), StepShape(1, 160, thought_length=4, activation_bytes=4, checkpointing=True, attention="torch")),
    (BaseShape("llama-384x6", 384, 1024, 6, 6, 2, 8192, tied=True), StepShape(2, 48, thought_length=12, activation_bytes=4, checkpointing=True, attention="torch")),
    (BaseShape("llama-384x6", 384, 1024, 6, 6, 2, 8192, tied=True), StepShape(1, 160, thought_length=12, activation_bytes=4, checkpointing=False, attention="torch")),
]


def validate() -> list[dict]:
    rows = []
    print(f"{'base':>12} {'B':>2} {'L':>4} {'T':>3} {'ckpt':>5} {'measured MiB':>13} {'predicted MiB':>14} {'ratio':>6} "
          f"{'largest/BLV':>12}")
    for base, step in VALIDATION:
        measured, predicted = measure(base, step), predict(base, step)
        ratio = predicted["step"] / measured["step"]
        row = dict(base=base.name, **asdict(step), measured_mib=measured["step"] / 2**20,
                   predicted_mib=predicted["step"] / 2**20, ratio=ratio,
                   largest_over_text_logits=measured["largest"] / measured["text_logits"])
        rows.append(row)
        print(f"{base.name:>12} {step.batch:>2} {step.length:>4} {step.thought_length:>3} {str(step.checkpointing):>5} "
              f"{row['measured_mib']:>13.1f} {row['predicted_mib']:>14.1f} {ratio:>6.2f} {row['largest_over_text_logits']:>12.2f}")
    return rows


def measure_floor(base: BaseShape, step: StepShape) -> int:
    """Peak live-tensor bytes of the floor: S plain forward+backward passes of the base over the same L tokens with
    the N thoughts as extra rows (batch B * N), the same checkpointing; the passes run one after another."""
    model = random_quietstar(base, step).model
    rows = torch.randint(2, base.vocab - 2, (step.batch * step.n_thoughts, step.length), generator=torch.Generator().manual_seed(0))
    model(rows, labels=rows, use_cache=False).loss.backward()  # warm-up
    model.zero_grad(set_to_none=True)
    tracker = LiveTensorBytes()
    with tracker:
        for _ in range(step.thought_length + step.lookahead + 1):
            model(rows, labels=rows, use_cache=False).loss.backward()
    return tracker.peak


def compare_floor(attention: str = "torch") -> list[dict]:
    """Step peak vs floor peak, both with per-layer checkpointing (the issue's random llama, V = 8192), with the
    PyTorch reference attention ("torch") or the CPU kernel path ("cpu")."""
    base = BaseShape("llama-384x6", 384, 1024, 6, 6, 2, 8192, tied=True)
    rows = []
    print(f"{'base':>12} {'L':>4} {'T':>3} {'step MiB':>9} {'floor MiB':>10} {'ratio':>6}")
    for length, thought_length in ((64, 4), (128, 4), (64, 12)):
        step = StepShape(1, length, thought_length=thought_length, activation_bytes=4, checkpointing=True, attention=attention)
        measured, floor = measure(base, step)["step"], measure_floor(base, step)
        rows.append(dict(base=base.name, length=length, thought_length=thought_length, step_mib=measured / 2**20,
                         floor_mib=floor / 2**20, ratio=measured / floor))
        print(f"{base.name:>12} {length:>4} {thought_length:>3} {measured / 2**20:>9.1f} {floor / 2**20:>10.1f} {measured / floor:>6.2f}")
    return rows


def fit_table(batches=(1, 2, 4, 8, 16, 32, 64), budgets_gb=(24, 80, 141)) -> list[dict]:
    """The paper's step (L=256, T=12, A=4, N=2, bf16 autocast over fp32 weights, per-layer checkpointing, fused
    attention) for each shape: process memory at each batch size and the largest batch that fits each budget."""
    rows = []
    print(f"{'base':>14} {'params':>7} {'weights+Adam GB':>16} " + " ".join(f"{'B=' + str(b):>8}" for b in batches)
          + "  largest batch in " + " / ".join(f"{g} GB" for g in budgets_gb))
    for base in SHAPES.values():
        totals = {b: training_memory(base, StepShape(b, 256)) / 1e9 for b in batches}
        fits = {g: max([b for b in batches if totals[b] <= g], default=0) for g in budgets_gb}
        rows.append(dict(base=base.name, parameters=base.parameters, fixed_gb=12 * base.parameters / 1e9,
                         total_gb=totals, largest_batch=fits))
        print(f"{base.name:>14} {base.parameters / 1e9:>6.2f}B {12 * base.parameters / 1e9:>16.1f} "
              + " ".join(f"{totals[b]:>8.1f}" for b in batches) + "  "
              + " / ".join(str(fits[g]) if fits[g] else "none" for g in budgets_gb))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["validate", "table", "floor"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--attention", choices=["torch", "cpu"], default="torch",
                        help="floor: the thought attention of the measured step (the reference, or the CPU kernel path)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "floor":
        rows = compare_floor(args.attention)
    else:
        rows = {"validate": validate, "table": fit_table}[args.what]()
    print(json.dumps({"benchmark": f"memory_model_{args.what}", "rows": rows}))


if __name__ == "__main__":
    main()
