"""`QuietStarConfig`: a Quiet-STaR model = any decoder-only causal LM config (`text_config`) + the thought settings.

Defaults follow the paper's training setup (Zelikman et al. 2024, Appendix A) where it is explicit; see each field.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

from .attention_backend import BACKENDS
from .mixing import MIXING_ACTIVATIONS
from .objective import POLICY_REWARDS, THOUGHT_POSITIONS


SIGMOID_OF_MINUS_4 = 0.01798620996209156  # the default starting w, exp(-4) / (1 + exp(-4))


@strict
class QuietStarConfig(PreTrainedConfig):
    r"""
    Configuration of a [`QuietStarForCausalLM`]: the wrapped base model's config plus the thought settings.

    Notation used across the package: after text position i the model writes a thought
    `<|startofthought|> t_1 .. t_T <|endofthought|>`, then is scored on the next A true tokens x_{i+1} .. x_{i+A}.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the wrapped decoder-only causal LM (any architecture whose attention goes through
            transformers' `AttentionInterface`: llama, mistral, qwen2, qwen3, gemma, ...). Defaults to a llama config.
        thought_length (`int`, *optional*, defaults to 12):
            T, the number of sampled thought tokens between the start and end markers.
        n_thoughts (`int`, *optional*, defaults to 2):
            N, thoughts sampled per position. The REINFORCE baseline is the mean reward over them, so training the
            policy needs N >= 2.
        lookahead (`int`, *optional*, defaults to 4):
            A, true tokens scored after each thought (the paper's `n_ahead_talk`); A - 1 of them are teacher-forced.
        thought_temperature (`float`, *optional*, defaults to 1.0):
            Temperature of the thoughts in training mode (`model.train()`), also used for their policy
            log-probabilities. 0 means greedy: thoughts are then deterministic and the policy-gradient term is zero.
        policy_weight (`float`, *optional*, defaults to 1e6):
            Weight of the REINFORCE term. The paper uses 1e6 because its advantages are small log-likelihood gaps.
        base_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the base model's next-token NLL (paper: 0.5).
        mixed_loss_weight (`float`, *optional*, defaults to 0.5):
            Weight of the mixed (thought-conditioned) NLL over the A lookahead tokens (paper: 0.5).
        thought_nll_weight (`float`, *optional*, defaults to 0.0):
            Weight of a direct NLL term on the thought-conditioned prediction alone (p_thought of the A lookahead
            tokens, without the mixing). Its gradient reaches the thought's readout whatever the mixing weight w is;
            through the mixed NLL that gradient is scaled by w (0.018 at initialisation). Not in the paper (0); RLP
            (2025) rewards log p(x | thought) directly. Combine with labels of -100 outside the tokens that matter.
        mixing_activation (`str`, *optional*, defaults to `"sigmoid"`):
            How the mixing head's output becomes the weight w of the thought-conditioned prediction (mixing.py):
            `"sigmoid"`: w in (0, 1); `"identity"`: w unbounded (may be negative or above 1), as in the reference code
            and its released checkpoints (`quietstar convert-original`). Not clamped in training either: the mix is
            in log space, so any finite w gives a normalised distribution.
        initial_mixing_logit (`float`, *optional*):
            The mixing head's output bias at initialisation, before the activation: w starts at
            activation(initial_mixing_logit) everywhere. Defaults to -4 under sigmoid (w = 0.018: the model starts as
            the base model; 0 -> 0.5) and to 0.018 under identity (the same starting w; not 0, where the thoughts
            would get no gradient).
        policy_reward (`str`, *optional*, defaults to `"mixed"`):
            What rewards a thought: `"mixed"` (paper) = log p_mixed - log p_base of the A lookahead tokens, which
            vanishes as the mixing weight w goes to 0; `"thought"` = log p_thought - log p_base, the post-thought
            prediction alone (RLP, 2025), a signal for the thoughts whatever w is. The baseline (mean over the N
            thoughts of a position) cancels the base term either way.
        clip_advantage (`bool`, *optional*, defaults to `True`):
            Clip advantages below 0, so only thoughts better than the mean are reinforced (paper: True).
        thought_embedding_scale (`float`, *optional*, defaults to 100.0):
            The marker embeddings are stored divided by this factor and multiplied back on use, which multiplies their
            effective learning rate by it (paper: 100).
        mixer_hidden_size (`int`, *optional*):
            Hidden width of the mixing head MLP. Defaults to the base model's hidden size.
        start_thought_token_id (`int`, *optional*):
            Token id of `<|startofthought|>`; set by [`QuietStarForCausalLM.from_base`].
        end_thought_token_id (`int`, *optional*):
            Token id of `<|endofthought|>`; set by [`QuietStarForCausalLM.from_base`].
        thought_attention_backend (`str`, *optional*, defaults to `"auto"`):
            `"triton"` (fused kernels), `"cpu"` (PyTorch's fused CPU attention kernel), `"torch"` (PyTorch reference)
            or `"auto"` (triton on CUDA, cpu on CPU, torch elsewhere).
            The environment variable `QUIETSTAR_THOUGHT_ATTENTION` overrides it.
        thought_positions (`str`, *optional*, defaults to `"all"`):
            Where a training forward with labels thinks: `"all"` (paper: after every position) or `"scored"` (only
            the window of positions that have a scored lookahead target, e.g. the answer of a prompt/answer example).
            The loss is the same objective either way (thoughts without a target add nothing to it); "scored" writes
            fewer chains (the FLOPs of a step shrink with the window). Outputs keep shape (B, N, L, ...): positions
            that did not think get mixing weight 0 and thought ids -100. Evaluation and generation always think
            wherever they predict.
        inference_thought_temperature (`float`, *optional*, defaults to 0.0):
            Temperature of the thoughts in eval mode (`model.eval()`): the forward without labels, `generate()`,
            `quietstar eval` and lm-evaluation-harness all predict with this one policy. 0 = greedy: deterministic,
            and a single chain is written instead of `n_thoughts` identical ones. A forward or `generate` keyword
            `thought_temperature=` overrides it per call. (Saved configs' `generation_thought_temperature` is read
            as this field.)
        think_threshold (`float`, *optional*):
            Adaptive thinking: during `generate()`, think only where the think gate predicts a log-likelihood gain
            >= this value (nats). None = think at every token. Set by `quietstar.calibrate_think_gate`.

    Example:

    ```python
    >>> from transformers import LlamaConfig
    >>> from quietstar import QuietStarConfig, QuietStarForCausalLM
    >>> base = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                    num_attention_heads=4, num_key_value_heads=2)
    >>> config = QuietStarConfig(text_config=base, thought_length=4, start_thought_token_id=126, end_thought_token_id=127)
    >>> model = QuietStarForCausalLM(config)
    ```"""

    model_type = "quietstar"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    thought_length: int = 12
    n_thoughts: int = 2
    lookahead: int = 4
    thought_temperature: float | int = 1.0
    policy_weight: float | int = 1e6
    base_loss_weight: float | int = 0.5
    mixed_loss_weight: float | int = 0.5
    thought_nll_weight: float | int = 0.0
    mixing_activation: str = "sigmoid"
    initial_mixing_logit: float | int | None = None
    policy_reward: str = "mixed"
    clip_advantage: bool = True
    thought_embedding_scale: float | int = 100.0
    mixer_hidden_size: int | None = None
    start_thought_token_id: int | None = None
    end_thought_token_id: int | None = None
    thought_attention_backend: str = "auto"
    thought_positions: str = "all"
    inference_thought_temperature: float | int = 0.0
    think_threshold: float | int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if "generation_thought_temperature" in kwargs:  # its name up to 0.1.0, when it applied to generate() only
            self.inference_thought_temperature = kwargs.pop("generation_thought_temperature")
        super().__post_init__(**kwargs)
        if self.mixer_hidden_size is None:
            self.mixer_hidden_size = self.text_config.hidden_size
        if self.initial_mixing_logit is None:  # the same starting w = sigmoid(-4) under either activation
            self.initial_mixing_logit = -4.0 if self.mixing_activation != "identity" else SIGMOID_OF_MINUS_4
        # PEFT and the tying logic read the top-level flag; the base model's own value is the truth.
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))

    def validate_thought_settings(self):
        """Part of `@strict` validation: ranges of the thought settings."""
        for name in ("thought_length", "n_thoughts", "lookahead", "mixer_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in ("thought_temperature", "inference_thought_temperature", "policy_weight", "base_loss_weight",
                     "mixed_loss_weight", "thought_nll_weight"):
            if not getattr(self, name) >= 0:  # also rejects NaN
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")
        if not self.thought_embedding_scale > 0:
            raise ValueError(f"`thought_embedding_scale` must be > 0, got {self.thought_embedding_scale}.")
        if self.policy_reward not in POLICY_REWARDS:
            raise ValueError(f"`policy_reward` must be one of {POLICY_REWARDS}, got {self.policy_reward!r}.")
        if self.mixing_activation not in MIXING_ACTIVATIONS:
            raise ValueError(
                f"`mixing_activation` must be one of {MIXING_ACTIVATIONS}, got {self.mixing_activation!r}: "
                "'sigmoid' bounds w to (0, 1), 'identity' leaves it unbounded as the reference code does."
            )
        if self.thought_attention_backend not in BACKENDS:
            raise ValueError(f"`thought_attention_backend` must be one of {BACKENDS}, got {self.thought_attention_backend!r}.")
        if self.thought_positions not in THOUGHT_POSITIONS:
            raise ValueError(f"`thought_positions` must be one of {THOUGHT_POSITIONS}, got {self.thought_positions!r}.")

    def validate_thought_token_ids(self):
        """Part of `@strict` validation: the two marker ids are either both unset or two distinct vocabulary ids."""
        ids = (self.start_thought_token_id, self.end_thought_token_id)
        if ids.count(None) == 1:
            raise ValueError(
                "Set both `start_thought_token_id` and `end_thought_token_id` (or neither): got "
                f"{ids}. `QuietStarForCausalLM.from_base` adds the tokens to the tokenizer and sets both."
            )
        if ids[0] is None:
            return
        vocab_size = self.text_config.vocab_size
        if ids[0] == ids[1] or not all(0 <= i < vocab_size for i in ids):
            raise ValueError(
                f"Thought token ids must be two distinct ids in [0, vocab_size={vocab_size}), got {ids}. "
                "Add the tokens to the tokenizer and resize the embeddings first (`QuietStarForCausalLM.from_base`)."
            )

    def validate_text_config(self):
        """Part of `@strict` validation: the base must be a decoder-only causal LM."""
        text = self.text_config
        model_type = getattr(text, "model_type", None)
        if getattr(text, "is_encoder_decoder", False):
            raise ValueError(
                f"Quiet-STaR wraps decoder-only causal LMs; `{model_type}` is an encoder-decoder model. "
                "Use a decoder-only base (llama, mistral, qwen2, qwen3, gemma, ...)."
            )
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"`{model_type}` has no causal-LM class in transformers, so it cannot be a Quiet-STaR base. "
                "Use a decoder-only causal LM (llama, mistral, qwen2, qwen3, gemma, ...)."
            )
        if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(text, "is_decoder", False):
            raise ValueError(
                f"`{model_type}` is an encoder-only (bidirectional) model; Quiet-STaR needs a decoder-only causal LM "
                "(llama, mistral, qwen2, qwen3, gemma, ...)."
            )


__all__ = ["QuietStarConfig"]
