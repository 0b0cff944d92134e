"""quietstar: Quiet-STaR (Zelikman et al. 2024) for any Hugging Face decoder-only causal LM.

Importing the package registers the "quietstar" model type with AutoConfig / AutoModelForCausalLM and the
"quietstar" attention implementation with transformers' AttentionInterface.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .adaptive import GateCalibration, calibrate_think_gate
from .attention import thought_attention
from .configuration_quietstar import QuietStarConfig
from .modeling_quietstar import QuietStarCausalLMOutput, QuietStarForCausalLM
from .thinking import ThoughtStep, ThoughtTrace
from .thought_tokens import END_THOUGHT, START_THOUGHT, add_thought_tokens, thought_token_ids

AutoConfig.register(QuietStarConfig.model_type, QuietStarConfig, exist_ok=True)
AutoModelForCausalLM.register(QuietStarConfig, QuietStarForCausalLM, exist_ok=True)
# save_pretrained then writes auto_map and copies the code, so the Hub loads it with trust_remote_code=True.
QuietStarConfig.register_for_auto_class()
QuietStarForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = [
    "QuietStarConfig",
    "QuietStarForCausalLM",
    "QuietStarCausalLMOutput",
    "thought_attention",
    "ThoughtTrace",
    "ThoughtStep",
    "calibrate_think_gate",
    "GateCalibration",
    "add_thought_tokens",
    "thought_token_ids",
    "START_THOUGHT",
    "END_THOUGHT",
]
