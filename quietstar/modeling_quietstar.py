"""`QuietStarForCausalLM`: Quiet-STaR (Zelikman et al. 2024) around any decoder-only transformers causal LM.

After every text position i the model thinks: it writes `<|startofthought|> t_1 .. t_T <|endofthought|>` and predicts
the next tokens from a mix of the base prediction and the post-thought one. `forward` is five named steps:

    1. text_pass        the base LM over the text: base logits and hidden states; each layer's K/V is recorded.
    2. sample_thoughts  T thought tokens for all L positions and N thoughts at once, step by step, without gradient.
    3. thought_pass     ONE teacher-forced pass, with gradient, over every chain
                        [SoT, t_1 .. t_T, EoT, x_{i+1} .. x_{i+A-1}]: the states that predict t_1 .. t_T (policy)
                        and x_{i+1} .. x_{i+A} (post-thought); hidden states only, no logits. (`think` does 2-3;
                        without gradients it continues the chains from the sampling steps' K/V instead.)
    4. mixing head      w from (base hidden, post-thought hidden); logits_mixed = (1 - w) base + w thought,
                        computed on hidden states before the (linear) output head (output_head.py).
    5. objective        (labels given) base NLL + mixed NLL + REINFORCE (see objective.py), from per-token
                        log-probabilities computed chunk by chunk: no vocabulary-sized tensor per chain token.

With a KV cache (`generate()`), forward is instead one decoding step that thinks at the newest position only and
crops the thought out of the cache again (see thinking.py).

With `thought_positions="scored"` a training forward with labels thinks only at the window of positions that have a
scored lookahead target (`objective.scored_positions`); the others contribute nothing to the loss, so the objective is
the same at a fraction of the chain cost. Everywhere else every position thinks.

Chain step s of position i sits at position id i + 1 + s, exactly where it would be in the explicit sequence
x_0 .. x_i SoT t_1 .. t_T EoT x_{i+1} ..: the thought passes equal the plain model run on that sequence.

Dimensions: B batch, L text positions (L' <= L of them think), N thoughts per position, T thought tokens, A lookahead
tokens, S = T + A + 1 chain steps, H hidden size, V vocabulary.
"""

import copy
import os
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .attention import ATTN_IMPLEMENTATION, ThoughtKV, register_quietstar_attention
from .attention_backend import thought_attention_kernel
from .configuration_quietstar import QuietStarConfig
from .mixing import MixingHead, MixingLogit
from .objective import LogProbs, LookaheadTargets, lookahead_index, quietstar_loss, scored_positions
from .output_head import (
    CHUNK_ROWS,
    OutputHead,
    head_log_probs,
    logits_token_log_probs,
    mixed_log_probs,
    mixed_next_token_log_probs,
    sample_tokens,
)
from .thinking import CACHE_KWARG, ThinkGate, Thinker, ThoughtTrace, think_next_token
from .thought_tokens import (
    ThoughtMarkers,
    add_thought_tokens,
    initial_thought_embedding,
    register_marker_key_renaming,
    thought_init_token_ids,
)

register_quietstar_attention()  # at import, so remote-code loading (trust_remote_code) registers it too
register_marker_key_renaming("QuietStarForCausalLM")  # old checkpoints: `thought_embeddings` -> `thought_markers.weight`

# Passed by Trainer, PEFT or generation utilities out of habit; the Quiet-STaR forward has no use for them. Any other
# keyword is passed through to the base model's text pass, as transformers' own models pass theirs to the layers.
IGNORED_FORWARD_KWARGS = ("return_dict", "use_cache", "output_attentions")


@dataclass
class QuietStarCausalLMOutput(ModelOutput):
    """
    Args:
        loss: weighted Quiet-STaR loss (labels given).
        logits: (B, L, V) next-token log-probabilities after thinking: the mixed prediction averaged over the N
            thoughts (in probability space); the marker tokens are masked out.
        base_logits: (B, L, V) the base model's next-token logits (no thought).
        mixing_weights: (B, N, L) the weight w of the thought-conditioned prediction used for `logits`; 0 at positions
            that did not think (`thought_positions="scored"`).
        thought_ids: (B, N, L, T) the thought written after each position (N = 1 when thoughts are greedy); -100 at
            positions that did not think.
        nll_base, nll_mixed, policy_loss, reward_mean: the loss parts, detached, for logging; nll_thought (the
            thought-conditioned prediction alone) when `thought_nll_weight` > 0 or `policy_reward` is "thought".
        rewards: (B, N, L) each thought's reward (log-likelihood gain over the base on the A lookahead tokens);
            0 where the position has no complete lookahead.
        cache: the KV cache in a generation step (thought-free: prompt + generated text only); also readable as
            `past_key_values`, the name transformers used before 5.24.
        hidden_states: the base (text) pass's hidden states per layer, each (B, L, H), with `output_hidden_states`.
    """

    loss: Tensor | None = None
    logits: Tensor | None = None
    base_logits: Tensor | None = None
    mixing_weights: Tensor | None = None
    thought_ids: Tensor | None = None
    nll_base: Tensor | None = None
    nll_mixed: Tensor | None = None
    nll_thought: Tensor | None = None
    policy_loss: Tensor | None = None
    reward_mean: Tensor | None = None
    rewards: Tensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[Tensor, ...] | None = None

    @property
    def past_key_values(self) -> Cache | None:
        return self.cache


@dataclass
class TextPass:
    """The base model over the text. logits (B, L, V), hidden_states per layer (B, L, H), kv: recorded K/V; the
    positions that think are `thinking` (L' of the L; the chains' position axis)."""

    input_ids: Tensor
    position_ids: Tensor
    logits: Tensor
    hidden_states: tuple[Tensor, ...]
    kv: ThoughtKV

    @property
    def hidden(self) -> Tensor:
        """(B, L, H) final-layer states."""
        return self.hidden_states[-1]

    @property
    def thinking(self) -> slice:
        """The text positions that think, first .. first + L' - 1."""
        return slice(self.kv.first_position, self.kv.first_position + self.kv.n_positions)


@dataclass
class ThoughtPass:
    """The chains read out (written by `think` or teacher-forced by `thought_pass`): final-layer states only, never
    vocabulary-sized tensors.

    policy_hidden: (B, N, L, T, H) states at chain steps 0 .. T-1, which predict t_1 .. t_T (None if not asked).
    hidden: (B, N, L, A, H) states at chain steps T+1 .. T+A, the post-thought predictions of x_{i+1} .. x_{i+A}.
    head: the base model's output head, which turns states into logits.
    """

    policy_hidden: Tensor | None
    hidden: Tensor
    head: OutputHead

    def policy_logits(self) -> Tensor:
        """(B, N, L, T, V) the policy's logits; materialised in full, for tests and inspection only."""
        return self.head.logits(self.policy_hidden)

    def logits(self) -> Tensor:
        """(B, N, L, A, V) the post-thought logits; materialised in full, for tests and inspection only."""
        return self.head.logits(self.hidden)


class QuietStarForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = QuietStarConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # the base's decoder layers, in the text pass and the thought passes
    _no_split_modules = []
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _tied_weights_keys = {}  # the wrapped model declares its own; post_init prefixes them
    _supports_sdpa = True
    _supports_attention_backend = True
    accepts_loss_kwargs = False  # the loss is a per-batch mean: let Trainer divide by gradient-accumulation steps
    log_prob_chunk_rows = CHUNK_ROWS  # tokens whose vocabulary-sized logits exist at once (output_head.py)

    def __init__(self, config: QuietStarConfig, base_model: PreTrainedModel | None = None):
        config._attn_implementation = ATTN_IMPLEMENTATION  # propagates to text_config: thoughts need this backend
        super().__init__(config)
        self.model = base_model if base_model is not None else AutoModelForCausalLM.from_config(config.text_config)
        _check_base(self.model)
        hidden_size = config.text_config.hidden_size
        self.thought_markers = ThoughtMarkers(hidden_size, config.thought_embedding_scale)
        self.mixing_head = MixingHead(hidden_size, config.mixer_hidden_size, config.mixing_activation)
        self.think_gate = ThinkGate(hidden_size)  # adaptive thinking in generate(); calibrated by adaptive.py
        self.post_init()
        _install_output_capturing(self.model)

    # ---- construction --------------------------------------------------------------------------------------------

    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
        **config_fields,
    ) -> tuple["QuietStarForCausalLM", PreTrainedTokenizerBase]:
        """Wrap a causal LM (instance or local path) into a Quiet-STaR model.

        Adds `<|startofthought|>` / `<|endofthought|>` to the tokenizer (loaded from `base` if it is a path and no
        tokenizer is given), grows the embeddings if needed and initialises both thought embeddings from "---" as
        the paper does (if the tokenizer cannot encode "---", from the mean input embedding, with a warning).
        `config_fields` are `QuietStarConfig` fields (thought_length=..., n_thoughts=..., ...). The base model instance
        is reused, not copied. Every check runs before the tokenizer or the model is changed. Returns (model, tokenizer).
        A PEFT model (or a model holding unmerged LoRA layers) is refused: merge it first, or apply PEFT to the
        Quiet-STaR model with `quietstar.lora.lora_config`.
        """
        if isinstance(base, (str, os.PathLike)):
            tokenizer = tokenizer if tokenizer is not None else base
            base = AutoModelForCausalLM.from_pretrained(base)
        _refuse_peft(base, "wrap")
        if not isinstance(base, PreTrainedModel) or base.get_output_embeddings() is None:
            raise TypeError(
                f"`base` must be a transformers causal LM with an output head (e.g. LlamaForCausalLM), got "
                f"{type(base).__name__}. Load it with AutoModelForCausalLM."
            )
        _check_base(base)
        if tokenizer is None:
            raise ValueError("pass the base model's tokenizer (or a path to it): the thought tokens are added to it.")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        QuietStarConfig(text_config=copy.deepcopy(base.config), **config_fields)  # bad fields raise here, not later
        init_ids = thought_init_token_ids(tokenizer)

        start_id, end_id = add_thought_tokens(tokenizer)
        if len(tokenizer) > base.get_input_embeddings().num_embeddings:
            base.resize_token_embeddings(len(tokenizer))
            _drop_stale_gradients(base)
        config = QuietStarConfig(
            text_config=base.config, start_thought_token_id=start_id, end_thought_token_id=end_id, **config_fields
        )
        model = cls(config, base_model=base)
        reference = base.get_input_embeddings().weight
        for module in (model.mixing_head, model.think_gate, model.thought_markers):
            module.to(device=reference.device, dtype=reference.dtype)
        model.thought_markers.set_(initial_thought_embedding(init_ids, base.get_input_embeddings()))
        return model, tokenizer

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> None:
        """`PreTrainedModel.save_pretrained`, refusing a model that still holds unmerged PEFT layers (their keys
        would not load back into a plain model: the LoRA weights would be dropped and the wrapped ones reported
        missing). Adapters attached with transformers' own `add_adapter` are saved by it as usual."""
        if not getattr(self, "_hf_peft_config_loaded", False):
            _refuse_peft(self, "save")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, MixingLogit):
            init.zeros_(module.weight)
            init.constant_(module.bias, float(self.config.initial_mixing_logit))
        elif isinstance(module, ThinkGate):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ThoughtMarkers):
            std = getattr(self.config.text_config, "initializer_range", 0.02)
            init.normal_(module.weight, std=std / module.scale)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.model.get_decoder()

    @property
    def marker_ids(self) -> tuple[int, int]:
        """(start, end) thought-marker token ids."""
        return self.config.start_thought_token_id, self.config.end_thought_token_id

    def marker_embeddings(self) -> tuple[Tensor, Tensor]:
        """(H,), (H,) the start and end marker embeddings fed to the model (see `ThoughtMarkers`). Called, not read
        from `.weight`, so that a PEFT `modules_to_save` copy of the markers is the one used."""
        return self.thought_markers()

    # ---- forward -----------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        thought_ids: Tensor | None = None,
        cache: Cache | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        logits_to_keep: int | Tensor = 0,
        think: bool = True,
        thought_temperature: float | None = None,
        thought_trace: ThoughtTrace | None = None,
        output_hidden_states: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> QuietStarCausalLMOutput:
        """Think after every position, predict with and without the thought, and (with labels) compute the loss.

        Args:
            input_ids: (B, L) token ids; padding must be on the right.
            attention_mask: (B, L) 1 for tokens, 0 for (right) padding.
            labels: (B, L) targets as for any transformers causal LM (shifted inside; -100 ignored).
            thought_ids: (B, N, L, T) thoughts to use instead of writing them (e.g. to re-score given thoughts).
            cache: a KV cache, as `generate()` passes it: the call is then one decoding step that thinks at the newest
                position only (thinking.py); the cache never keeps thought tokens. `past_key_values` is the same
                keyword under the name transformers used before 5.24.
            position_ids: (B, L) position ids of the new tokens in a decoding step (`generate()` derives them from
                the attention mask, which may be left-padded there).
            inputs_embeds: not supported (thoughts and lookahead are built from token ids); must be None.
            logits_to_keep: as in transformers' causal LMs: 0 = logits at every position, n = the last n only.
            think: False = the base model alone (returns its logits unchanged).
            thought_temperature: temperature of the thoughts written in this call, overriding the thought policy
                (`thought_policy_temperature`): by default training mode samples at `config.thought_temperature`
                and eval mode writes at `config.inference_thought_temperature` (0 = greedy, one chain).
            thought_trace: a `ThoughtTrace` that records each decoding step's thought and mixing weight.
            output_hidden_states: also return the text pass's hidden states.
            kwargs: `return_dict`, `use_cache`, `output_attentions` change nothing here; any other keyword goes to the
                base model's text pass, as transformers' models pass theirs on to their layers.
        """
        cache = _one_cache(cache, past_key_values)
        if inputs_embeds is not None:
            raise ValueError(
                "QuietStarForCausalLM does not take `inputs_embeds`: thoughts and the lookahead tokens are built from "
                "token ids. Pass `input_ids` instead."
            )
        for name in IGNORED_FORWARD_KWARGS:
            kwargs.pop(name, None)
        self._check_token_ids(input_ids, labels, thought_ids)
        temperature = self.thought_policy_temperature(thought_temperature)
        if cache is not None:
            return self.decoding_step(
                input_ids, attention_mask, position_ids, cache, think, temperature, thought_trace, **kwargs
            )
        self._check_inputs(input_ids, attention_mask, labels, thought_ids)
        config = self.config
        lookahead = config.lookahead if labels is not None else 1  # without labels only x_{i+1} is predicted
        chain_length = config.thought_length + lookahead + 1
        needs_policy = labels is not None and temperature > 0
        # greedy thoughts are all the same: write one chain instead of N identical ones
        n_chains = thought_ids.shape[1] if thought_ids is not None else (config.n_thoughts if temperature > 0 else 1)
        # A training step needs no full-vocabulary prediction: it would cost N * B * L * V floats for nothing.
        predicting = not (self.training and labels is not None)
        thinking = slice(None)
        if config.thought_positions == "scored" and not predicting:  # no logits needed: only scored positions think
            thinking = scored_positions(labels, attention_mask, lookahead)

        text = self.text_pass(
            input_ids, attention_mask, chain_length, all_hidden_states=bool(output_hidden_states), n_thoughts=n_chains,
            thinking=thinking, **kwargs,
        )
        hidden_states = text.hidden_states if output_hidden_states else None
        if not think:
            logits = _keep(text.logits, logits_to_keep)
            return QuietStarCausalLMOutput(logits=logits, base_logits=logits, hidden_states=hidden_states)
        if thought_ids is None:
            thought_ids, thoughts = self.think(text, temperature, lookahead, with_policy=needs_policy)
        else:
            thought_ids = thought_ids[:, :, text.thinking]
            thoughts = self.thought_pass(text, thought_ids, lookahead, with_policy=needs_policy)
        ahead = lookahead_index(input_ids.shape[1], lookahead, input_ids.device)[text.thinking]  # (L', A): i + s
        base_hidden = text.hidden[:, ahead].unsqueeze(1).expand_as(thoughts.hidden)  # (B, N, L', A, H)
        weights = self.mixing_head(base_hidden, thoughts.hidden)  # (B, N, L', A)

        loss_parts = None
        if labels is not None:
            loss_parts = self._objective(text, thoughts, thought_ids, base_hidden, weights, labels, attention_mask, temperature)
        length = input_ids.shape[1]
        return QuietStarCausalLMOutput(
            loss=loss_parts.loss if loss_parts else None,
            logits=self._predict_next_token(text, thoughts, weights, logits_to_keep) if predicting else None,
            base_logits=_keep(text.logits, logits_to_keep),
            mixing_weights=_at_positions(weights[..., 0], text.thinking, length, fill=0.0),
            thought_ids=_at_positions(thought_ids, text.thinking, length, fill=-100),
            nll_base=loss_parts.nll_base if loss_parts else None,
            nll_mixed=loss_parts.nll_mixed if loss_parts else None,
            nll_thought=loss_parts.nll_thought if loss_parts else None,
            policy_loss=loss_parts.policy_loss if loss_parts else None,
            reward_mean=loss_parts.reward_mean if loss_parts else None,
            rewards=_at_positions(loss_parts.rewards, text.thinking, length, fill=0.0) if loss_parts else None,
            hidden_states=hidden_states,
        )

    def thought_policy_temperature(self, thought_temperature: float | None = None) -> float:
        """The one rule for how thoughts are written, on every path (parallel forward, cached generation, evaluation):
        an explicit `thought_temperature` wins; else training mode samples at `config.thought_temperature` and eval
        mode writes at `config.inference_thought_temperature` (default 0: greedy, deterministic)."""
        if thought_temperature is not None:
            if not thought_temperature >= 0:
                raise ValueError(f"thought_temperature must be >= 0 (0 = greedy), got {thought_temperature}.")
            return float(thought_temperature)
        config = self.config
        return float(config.thought_temperature if self.training else config.inference_thought_temperature)

    def decoding_step(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        position_ids: Tensor | None,
        cache: Cache,
        think: bool = True,
        thought_temperature: float = 0.0,
        thought_trace: ThoughtTrace | None = None,
        **kwargs,
    ) -> QuietStarCausalLMOutput:
        """One KV-cached generation step: the new tokens (B, P) -> next-token log-probabilities (B, 1, V) after a
        thought at the last position (see thinking.py). `think=False`: the base model's step, logits unchanged
        (`kwargs` go to the base model there)."""
        if not think:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{CACHE_KWARG: cache}, **kwargs,
            )
            return QuietStarCausalLMOutput(
                logits=out.logits, base_logits=out.logits, cache=cache
            )
        step = think_next_token(
            self.thinker(), input_ids, attention_mask, position_ids, cache, thought_temperature, self.config.think_threshold
        )
        if thought_trace is not None:
            thought_trace.record(step.thought)
        return QuietStarCausalLMOutput(
            logits=step.logits[:, None],
            base_logits=step.base_logits[:, None],
            mixing_weights=step.thought.mixing_weight[:, None, None],
            thought_ids=step.thought.thought_ids[:, None, None],
            cache=cache,
        )

    def thinker(self) -> Thinker:
        """The parts a cached decoding step thinks with (thinking.py), handed over explicitly."""
        return Thinker(
            base=self.model,
            embed=self.get_input_embeddings(),
            markers=self.marker_embeddings(),
            mixing_head=self.mixing_head,
            think_gate=self.think_gate,
            marker_ids=self.marker_ids,
            thought_length=self.config.thought_length,
        )

    def text_pass(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        chain_length: int,
        all_hidden_states: bool = False,
        n_thoughts: int | None = None,
        thinking: slice = slice(None),
        **kwargs,
    ) -> TextPass:
        """Step 1: the base model over the text (B, L), recording each layer's K/V for the thought passes of
        `n_thoughts` chains per position (default: the config's) at the positions `thinking` (a contiguous range;
        default all). `all_hidden_states`: keep every layer's hidden states (else only the last). `kwargs` go to the
        base model."""
        batch, length = input_ids.shape
        first, end, stride = thinking.indices(length)
        if stride != 1 or end <= first:
            raise ValueError(f"`thinking` must be a non-empty contiguous range of the {length} positions, got {thinking}.")
        kv = ThoughtKV(
            n_thoughts=self.config.n_thoughts if n_thoughts is None else n_thoughts,
            n_positions=end - first,
            max_steps=chain_length,
            kernel=thought_attention_kernel(self.config.thought_attention_backend, input_ids.device),
            first_position=first,
        )
        position_ids = torch.arange(length, device=input_ids.device).expand(batch, length)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=True,
            quietstar_kv=kv,  # the attention layers record their K/V into kv.text
            **kwargs,
        )
        if not kv.text:
            raise RuntimeError(
                f"{type(self.model).__name__} did not call the 'quietstar' attention: its attention does not go "
                "through transformers' AttentionInterface (unsupported base), or attn_implementation was changed. "
                f"Use a base whose attention layers call ALL_ATTENTION_FUNCTIONS and attn_implementation='{ATTN_IMPLEMENTATION}'."
            )
        hidden_states = out.hidden_states if all_hidden_states else out.hidden_states[-1:]
        return TextPass(input_ids, position_ids, out.logits, hidden_states, kv)

    def think(self, text: TextPass, temperature: float, lookahead: int, with_policy: bool = True) -> tuple[Tensor, ThoughtPass]:
        """Steps 2-3 for thoughts written here: sample T tokens after every thinking position, N chains each, all
        positions in parallel, and read out the chains [SoT, t_1 .. t_T, EoT, x_{i+1} .. x_{i+A-1}]. Returns thought ids
        (B, N, L', T) and the pass.

        Without gradients (evaluation, inference) the chains continue from the sampling steps' K/V: each chain token
        runs through the decoder once. With gradients the thoughts are sampled without them and the chains are read
        by one teacher-forced `thought_pass`, T decoder steps more: sampling steps that kept their graph would send
        gradients into earlier steps' K/V past the layers' outputs, which FSDP2's per-call unsharding does not
        follow, and with activation checkpointing every layer's chain K/V would stay alive until backward."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            thought_ids = self.sample_thoughts(text, temperature)
            return thought_ids, self.thought_pass(text, thought_ids, lookahead, with_policy)
        thought_ids, policy_hidden = self._write_chains(text, temperature, keep_states=with_policy)
        last_token = self.get_input_embeddings()(thought_ids[..., -1:])  # (B, N, L, 1, H): t_T, not yet run
        rest = torch.cat([last_token, self._after_thought(text, thought_ids.shape[1], lookahead)], dim=3)
        hidden = self._run_chain(text, rest, step_offset=thought_ids.shape[-1], streaming=True)  # (B, N, L, A+1, H)
        text.kv.own.clear()
        return thought_ids, self._read_out(text, policy_hidden, hidden[..., 1:, :])

    # Not compiled: under `torch.compile(model)` sampling runs eagerly between the compiled text and thought passes
    # (a graph break). Its T steps are T more decoder passes whose attention shapes change step by step (the chain
    # grows), so traced they unroll into T copies of the decoder: 1411 FX nodes for the tiny test llama's training
    # forward instead of 624 with given thoughts, and kernels per step, for work without gradient. Eager, it also
    # draws the same thoughts as the eager model under the same seed.
    @torch.compiler.disable
    @torch.no_grad()
    def sample_thoughts(self, text: TextPass, temperature: float) -> Tensor:
        """Step 2 alone: thought ids (B, N, L', T) sampled without gradient (see `_write_chains`), e.g. to read them
        with `thought_pass` later."""
        thought_ids, _ = self._write_chains(text, temperature, keep_states=False)
        text.kv.own.clear()
        return thought_ids

    def _write_chains(self, text: TextPass, temperature: float, keep_states: bool) -> tuple[Tensor, Tensor | None]:
        """Sample T tokens after every thinking position, N thoughts each, all positions in parallel.

        Chain step k runs N*L' queries at once (one per thought and position, N = `text.kv.n_thoughts`); each attends
        to the text up to its position and its own earlier steps, whose K/V stay in `text.kv.own`. Tokens are drawn
        from the output head chunk by chunk (output_head.sample_tokens). Returns thought ids (B, N, L', T) and, with
        `keep_states`, the states at steps 0 .. T-1 (B, N, L', T, H), which predict t_1 .. t_T.
        """
        batch, length = text.input_ids.shape[0], text.kv.n_positions
        start, _ = self.marker_embeddings()
        head = OutputHead.of(self.model)
        step_embeds = start.expand(batch, text.kv.n_thoughts, length, 1, -1)  # (B, N, L, 1, H)
        tokens, states = [], []
        for step in range(self.config.thought_length):
            hidden = self._run_chain(text, step_embeds, step_offset=step, streaming=True)  # (B, N, L, 1, H)
            token = sample_tokens(head, hidden[..., 0, :], temperature, self.marker_ids, self._chunk_rows(text))
            tokens.append(token)  # (B, N, L)
            states.append(hidden)
            step_embeds = self.get_input_embeddings()(token).unsqueeze(-2)
        return torch.stack(tokens, dim=-1), torch.cat(states, dim=3) if keep_states else None

    def thought_pass(self, text: TextPass, thought_ids: Tensor, lookahead: int, with_policy: bool = True) -> ThoughtPass:
        """Step 3 for given thoughts (B, N, L', T), one per thinking position: one teacher-forced pass over every chain
        [SoT, t_1..t_T, EoT, x_{i+1}..x_{i+A-1}] (B, N, L', S). `with_policy`: also keep the states that predict the
        thought tokens (for the REINFORCE term)."""
        batch, n_thoughts, length, thought_length = thought_ids.shape
        start, _ = self.marker_embeddings()
        chain = torch.cat(
            [
                start.expand(batch, n_thoughts, length, 1, -1),
                self.get_input_embeddings()(thought_ids),
                self._after_thought(text, n_thoughts, lookahead),
            ],
            dim=3,
        )  # (B, N, L, S, H)
        hidden = self._run_chain(text, chain, step_offset=0)
        policy_hidden = hidden[..., :thought_length, :] if with_policy else None
        return self._read_out(text, policy_hidden, hidden[..., thought_length + 1 :, :])  # EoT ..: x_{i+1} .. x_{i+A}

    def _after_thought(self, text: TextPass, n_thoughts: int, lookahead: int) -> Tensor:
        """The chain after the thought, [EoT, x_{i+1} .. x_{i+A-1}]: embeddings (B, N, L', A, H)."""
        batch, length = text.input_ids.shape[0], text.kv.n_positions
        _, end = self.marker_embeddings()
        ahead = lookahead_index(text.input_ids.shape[1], lookahead, text.input_ids.device)[text.thinking, 1:]
        true_next = text.input_ids[:, ahead]  # (B, L', A-1)
        return torch.cat(
            [
                end.expand(batch, n_thoughts, length, 1, -1),
                self.get_input_embeddings()(true_next).unsqueeze(1).expand(-1, n_thoughts, -1, -1, -1),
            ],
            dim=3,
        )

    def _read_out(self, text: TextPass, policy_hidden: Tensor | None, hidden: Tensor) -> ThoughtPass:
        head = OutputHead.of(self.model)
        if not torch.compiler.is_compiling():  # one row: cheap, and catches unknown heads (a graph break when compiled)
            head.check(text.hidden[:, -1].detach(), text.logits[:, -1].detach())
        return ThoughtPass(policy_hidden=policy_hidden, hidden=hidden, head=head)

    def _run_chain(self, text: TextPass, embeds: Tensor, step_offset: int, streaming: bool = False) -> Tensor:
        """Run chain steps step_offset .. step_offset+Sq-1 of every (thought, thinking position) through the base model's
        decoder (no output head): embeds (B, N, L', Sq, H) -> final-layer states (B, N, L', Sq, H).
        The chains are laid out "(n l s)" along the sequence axis; attention follows the thought pattern.
        """
        batch, n_thoughts, length, n_steps, _ = embeds.shape
        steps = torch.arange(step_offset, step_offset + n_steps, device=embeds.device)
        position_ids = text.position_ids[:, None, text.thinking, None] + 1 + steps  # (B, 1, L', Sq): s of i at i + 1 + s
        position_ids = position_ids.expand(batch, n_thoughts, length, n_steps)
        out = self.model.get_decoder()(
            inputs_embeds=rearrange(embeds, "b n l s h -> b (n l s) h"),
            position_ids=rearrange(position_ids, "b n l s -> b (n l s)"),
            # 4-D masks pass transformers' mask builders untouched; the thought attention is structural and ignores it.
            attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=embeds.device),
            use_cache=False,
            quietstar_kv=text.kv.at(step_offset, streaming=streaming),
        )
        return rearrange(out.last_hidden_state, "b (n l s) h -> b n l s h", n=n_thoughts, l=length)

    # ---- prediction and objective ------------------------------------------------------------------------------------

    def _predict_next_token(
        self, text: TextPass, thoughts: ThoughtPass, weights: Tensor, logits_to_keep: int | Tensor
    ) -> Tensor:
        """Step 4 for output: (B, L', V) log-probabilities of x_{i+1} after thinking, the N thoughts' mixed
        predictions averaged in probability space, markers masked; only the `logits_to_keep` positions L'."""
        base_hidden = _keep(text.hidden, logits_to_keep)  # (B, L', H)
        thought_hidden = _keep(thoughts.hidden[..., 0, :].flatten(0, 1), logits_to_keep)  # (B*N, L', H)
        thought_hidden = thought_hidden.unflatten(0, thoughts.hidden.shape[:2])
        weight = _keep(weights[..., 0].flatten(0, 1), logits_to_keep).unflatten(0, weights.shape[:2])
        return mixed_next_token_log_probs(thoughts.head, base_hidden, thought_hidden, weight, self.marker_ids)

    def _chunk_rows(self, text: TextPass) -> int:
        """Tokens per chunk of vocabulary-sized work: `log_prob_chunk_rows`, but never more than the text's B * L
        tokens, so no tensor of the step is larger than the plain model's logits (B, L, V)."""
        return max(1, min(self.log_prob_chunk_rows, text.input_ids.numel()))

    def _objective(self, text, thoughts, thought_ids, base_hidden, weights, labels, attention_mask, temperature):
        """Step 5: per-token log-probabilities (chunked over the vocabulary, output_head.py) -> `quietstar_loss`.
        The marker tokens are masked in every distribution, as in inference."""
        config = self.config
        length, lookahead = labels.shape[1], weights.shape[-1]
        targets = LookaheadTargets.build(labels, attention_mask, lookahead)
        next_labels = torch.cat([labels[:, 1:], labels[:, :1]], dim=1).clamp(min=0)  # last column: never valid
        mixed_targets = targets.targets[:, text.thinking].unsqueeze(1).expand_as(weights)  # (B, N, L', A)
        base_log_probs, mixed_log_probs, thought_log_probs, policy_log_probs = self._vocabulary_log_probs(
            text.logits, next_labels, base_hidden, thoughts.hidden, weights, mixed_targets, thoughts.policy_hidden,
            thought_ids, temperature, self._chunk_rows(text),
        )
        base_log_probs = base_log_probs[:, lookahead_index(length, lookahead, labels.device)]  # (B, L, A)
        return quietstar_loss(
            base_log_probs,
            mixed_log_probs,
            policy_log_probs,
            base_mask=targets.base_mask,
            thought_mask=targets.thought_mask,
            thinking=text.thinking,
            base_loss_weight=config.base_loss_weight,
            mixed_loss_weight=config.mixed_loss_weight,
            policy_weight=config.policy_weight,
            clip_advantage=config.clip_advantage,
            thought_log_probs=thought_log_probs,
            thought_nll_weight=config.thought_nll_weight,
            policy_reward=config.policy_reward,
        )

    # Not compiled, like `HeadLogProbs.weighted_sum` (see there): chunk loops over the vocabulary would unroll when
    # traced, with kernels per chunk, for work inductor cannot fuse across the matmul anyway.
    @torch.compiler.disable
    def _vocabulary_log_probs(
        self,
        text_logits: Tensor,
        next_labels: Tensor,
        base_hidden: Tensor,
        thought_hidden: Tensor,
        weights: Tensor,
        targets: Tensor,
        policy_hidden: Tensor | None,
        thought_ids: Tensor,
        temperature: float,
        chunk_rows: int,
    ) -> tuple[Tensor, LogProbs, LogProbs | None, LogProbs | None]:
        """The objective's per-token log-probabilities, each computed chunk by chunk from the output head (the chain
        steps' ones when the objective takes their weighted sums, output_head.HeadLogProbs): base (B, L) of
        `next_labels` from the text logits; mixed (B, N, L, A) of `targets`; the post-thought prediction alone
        (B, N, L, A) when `thought_nll_weight` > 0 or `policy_reward` is "thought"; the policy's log pi(t_k)
        (B, N, L, T) at `temperature` when `policy_hidden` is given. Marker tokens are banned in every distribution."""
        head, banned = OutputHead.of(self.model), self.marker_ids
        base = logits_token_log_probs(text_logits, next_labels, banned_ids=banned, chunk_rows=chunk_rows)
        mixed = mixed_log_probs(head, base_hidden, thought_hidden, weights, targets, banned_ids=banned, chunk_rows=chunk_rows)
        thought = None
        if self.config.thought_nll_weight > 0 or self.config.policy_reward == "thought":  # post-thought, no mixing
            thought = head_log_probs(head, thought_hidden, targets, banned_ids=banned, chunk_rows=chunk_rows)
        policy = None
        if policy_hidden is not None:  # log pi(t_k) at the sampling temperature
            policy = head_log_probs(
                head, policy_hidden, thought_ids, temperature=temperature, banned_ids=banned, chunk_rows=chunk_rows
            )
        return base, mixed, thought, policy

    def _check_token_ids(self, input_ids: Tensor | None, labels: Tensor | None, thought_ids: Tensor | None) -> None:
        """Shapes, dtypes and ranges of the token-id inputs, checked before anything runs (every path)."""
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise ValueError(f"`input_ids` must be a (batch, length) tensor of token ids, got {got}.")
        if input_ids.numel() == 0:
            raise ValueError(
                f"`input_ids` is empty (shape {tuple(input_ids.shape)}): pass at least one token per row, e.g. the "
                "tokenizer's bos token for an empty prompt."
            )
        vocab_size = self.get_input_embeddings().num_embeddings
        named = {"input_ids": input_ids, "labels": labels, "thought_ids": thought_ids}
        for name, ids in named.items():
            if ids is None:
                continue
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise ValueError(f"`{name}` must hold integer token ids (torch.long), got dtype {ids.dtype}; use .long().")
            if torch.compiler.is_compiling():  # data-dependent checks would break the graph; they run in eager mode
                continue
            real = ids[ids != -100] if name == "labels" else ids
            if real.numel() and (real.min() < 0 or real.max() >= vocab_size):
                bad = real[(real < 0) | (real >= vocab_size)][0].item()
                allowed = "-100 (ignored) or " if name == "labels" else ""
                raise ValueError(
                    f"`{name}` holds token id {bad}, outside the vocabulary of {vocab_size} tokens: ids must be "
                    f"{allowed}in [0, {vocab_size}). Use the tokenizer saved with this model (it has the thought tokens)."
                )
        if labels is not None and tuple(labels.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"`labels` {tuple(labels.shape)} must have the shape of `input_ids` {tuple(input_ids.shape)}: one "
                "target per input token, unshifted (the model shifts them), -100 where nothing is scored."
            )
        markers = [marker for marker in self.marker_ids if marker is not None]
        if labels is not None and markers and not torch.compiler.is_compiling():
            marked = torch.isin(labels, torch.tensor(markers, device=labels.device))
            if marked.any():  # banned from every distribution: its log-prob is -inf and the loss nan
                raise ValueError(
                    f"`labels` holds the thought-marker token id {labels[marked][0].item()}: the markers are never "
                    "predicted (banned in every distribution), so its log-probability is -inf and the loss nan. Set "
                    "those positions of `labels` to -100 (ignored)."
                )

    def _check_inputs(self, input_ids, attention_mask, labels, thought_ids) -> None:
        config = self.config
        if None in self.marker_ids:
            raise ValueError(
                "the config has no thought token ids. Create the model with `QuietStarForCausalLM.from_base(base, "
                "tokenizer)`, which adds <|startofthought|> / <|endofthought|> and sets them."
            )
        length = input_ids.shape[1]
        if labels is not None and length < config.lookahead + 1:
            raise ValueError(
                f"sequence length {length} is shorter than lookahead + 1 = {config.lookahead + 1}: no position has "
                f"all {config.lookahead} lookahead tokens to score. Use longer sequences or a smaller `lookahead`."
            )
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}.")
            if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
                raise ValueError(
                    "attention_mask has padding before tokens: the Quiet-STaR forward needs right padding "
                    "(tokenizer.padding_side = 'right')."
                )
        if thought_ids is not None:
            batch, _, _, thought_length = expected = (input_ids.shape[0], "N", length, config.thought_length)
            shape = tuple(thought_ids.shape)
            if len(shape) != 4 or shape[0] != batch or shape[2] != length or shape[3] != thought_length or shape[1] < 1:
                raise ValueError(f"thought_ids must have shape (B, N, L, T) = {expected}, got {shape}.")
        if self.training and labels is not None and config.policy_weight > 0 and config.n_thoughts < 2:
            raise ValueError(
                "training the thought policy needs n_thoughts >= 2: the REINFORCE baseline is the mean reward over "
                "the N thoughts of a position, so with one thought every advantage is 0. Set n_thoughts >= 2 "
                "(or policy_weight=0)."
            )


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The generation cache, under its transformers >= 5.24 name `cache` or its older name `past_key_values`."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the KV cache once: as `cache` (transformers >= 5.24) or as `past_key_values`, not both.")
    return cache if cache is not None else past_key_values


def _install_output_capturing(base: PreTrainedModel) -> None:
    """Install transformers' output-capturing hooks on the base's decoder now, at construction.

    The text pass asks the base for `output_hidden_states`; transformers installs the hooks that collect them lazily,
    on the first such call, under a `threading.Lock` that torch.compile cannot trace. When that first call happens
    inside `torch.compile(model)`, the graph breaks there (3 breaks on a llama base). Installed here, in eager mode,
    the compiled forward finds them in place and traces as one graph. Eager behaviour is unchanged: the same hooks
    would be installed by the first eager forward. An older transformers without this module needs nothing here.
    """
    try:
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:
        return
    maybe_install_capturing_hooks(base.get_decoder())


def _at_positions(values: Tensor, thinking: slice, length: int, fill: float) -> Tensor:
    """(B, N, L', ...) values of the thinking positions -> (B, N, L, ...), `fill` at the positions that did not think."""
    if values.shape[2] == length:  # every position thought (`thinking` is then slice(0, L), never slice(None))
        return values
    full = values.new_full((*values.shape[:2], length, *values.shape[3:]), fill)
    full[:, :, thinking] = values
    return full


def _keep(logits: Tensor, logits_to_keep: int | Tensor) -> Tensor:
    """(B, L, V) -> the positions `logits_to_keep` selects, as transformers' causal LMs do (0 = all)."""
    index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    return logits[:, index]


def _check_base(base: PreTrainedModel) -> None:
    if not getattr(base, "_supports_attention_backend", False):
        raise ValueError(
            f"{type(base).__name__} is not supported as a Quiet-STaR base: its attention does not go through "
            "transformers' AttentionInterface, which the thought passes plug into. Supported: llama, mistral, "
            "qwen2, qwen3, gemma and the other architectures whose attention uses ALL_ATTENTION_FUNCTIONS."
        )


def _refuse_peft(model: nn.Module, action: str) -> None:
    """A ValueError naming the fix when `model` is a PEFT model or holds PEFT layers (LoRA, modules_to_save copies).
    Recognised by the class's module, so peft is never imported for a model that cannot contain it."""
    found = [
        f"{name or 'itself'}: {type(module).__module__}.{type(module).__name__}"
        for name, module in model.named_modules()
        if type(module).__module__.startswith("peft.")
    ]
    if not found:
        return
    more = ", ..." if len(found) > 3 else ""
    layers = f"{type(model).__name__} holds unmerged PEFT layers ({', '.join(found[:3])}{more})"
    if action == "wrap":
        raise ValueError(
            f"`base`: {layers}. Quiet-STaR wraps a plain causal LM. Either merge the adapter first "
            "(`base = peft_model.merge_and_unload()`) and wrap that, or wrap the plain base and put LoRA on the "
            "Quiet-STaR model, which also trains its mixing head and markers: `model, tokenizer = "
            "QuietStarForCausalLM.from_base(base, tokenizer); model = peft.get_peft_model(model, "
            "quietstar.lora.lora_config())`."
        )
    raise ValueError(
        f"cannot save_pretrained: {layers}, whose keys would load back as missing weights. Save the adapter with "
        "the PeftModel (`peft_model.save_pretrained(dir)`), or merge it first for a full model directory: "
        "`peft_model.merge_and_unload().save_pretrained(dir)`."
    )


def _drop_stale_gradients(base: PreTrainedModel) -> None:
    """After a resize, a `.grad` left by an earlier backward has the old vocabulary size and would break the next
    backward ("invalid gradient ... [33, 64] vs [31, 64]"): drop it."""
    for module in (base.get_input_embeddings(), base.get_output_embeddings()):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.grad is not None and weight.grad.shape != weight.shape:
            weight.grad = None


__all__ = ["QuietStarForCausalLM", "QuietStarCausalLMOutput", "TextPass", "ThoughtPass"]
