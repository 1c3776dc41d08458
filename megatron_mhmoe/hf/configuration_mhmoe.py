"""transformers configuration of an exported megatron_mhmoe GPT (copied into the export folder)."""
from __future__ import annotations

from transformers import PretrainedConfig


class MHMoEGPTConfig(PretrainedConfig):
    """`mhmoe_model` is megatron_mhmoe's ModelConfig as a dict (the run's `model` section); the standard
    transformers fields are derived from it so that generation and evaluation tools find them."""

    model_type = "mhmoe_gpt"

    def __init__(self, mhmoe_model: dict | None = None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, **kwargs):
        self.mhmoe_model = dict(mhmoe_model or {})
        m = self.mhmoe_model
        self.vocab_size = m.get("vocab_size", 0)
        self.hidden_size = m.get("hidden_size", 0)
        self.num_hidden_layers = m.get("num_layers", 0)
        self.num_attention_heads = m.get("num_attention_heads", 0)
        self.max_position_embeddings = m.get("max_seq_len", 0)
        kwargs.setdefault("tie_word_embeddings", bool(m.get("tie_embeddings", True)))
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
