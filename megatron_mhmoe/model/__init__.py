"""GPT decoder with tensor-parallel attention/MLP and MH-MoE FFN slots."""
from megatron_mhmoe.model.gpt import GPTModel, GPTOutput

__all__ = ["GPTModel", "GPTOutput"]
