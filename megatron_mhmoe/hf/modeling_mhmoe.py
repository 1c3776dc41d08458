"""transformers model of an exported megatron_mhmoe GPT (copied into the export folder).

Runs megatron_mhmoe's own single-process GPTModel, so the logits are the trained model's whatever its
options (MH-MoE heads, gates, dense/MoE layers, norms, RoPE, tied embeddings). `past_key_values` is
megatron_mhmoe's KVCache: with use_cache, generation feeds one new token per step. attention_mask is
accepted for right padding only (causal attention never looks at later positions); left padding would
shift positions and is refused.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_mhmoe import MHMoEGPTConfig
except ImportError:  # imported as megatron_mhmoe.hf.modeling_mhmoe
    from megatron_mhmoe.hf.configuration_mhmoe import MHMoEGPTConfig


# transformers 5 renamed the cache field of its outputs and generation kwargs from past_key_values to cache.
_CACHE = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


class MHMoEGPTForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MHMoEGPTConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False

    def __init__(self, config: MHMoEGPTConfig):
        super().__init__(config)
        try:
            from megatron_mhmoe.config import model_config_from_dict
            from megatron_mhmoe.model.gpt import GPTModel
            from megatron_mhmoe.parallel.context import ParallelContext
        except ImportError as e:  # pragma: no cover - depends on the loading environment
            raise ImportError("this model runs megatron_mhmoe's GPTModel: install the megatron_mhmoe package "
                              f"(pip install -e <its checkout>) where you load it ({e})") from None
        self.model = GPTModel(model_config_from_dict(config.mhmoe_model), ParallelContext.single_process())
        self.post_init()

    def _init_weights(self, module):  # the weights come from the checkpoint; GPTModel initialises itself
        pass

    def get_input_embeddings(self):
        return self.model.embedding.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, past_key_values=None, use_cache: Optional[bool] = None,
                return_dict: Optional[bool] = True, cache=None, **kwargs) -> CausalLMOutputWithPast:
        from megatron_mhmoe.model.kv_cache import KVCache
        if attention_mask is not None and input_ids.shape[1] > 1:
            starts_padded = (attention_mask[:, 0] == 0).any()
            if bool(starts_padded):
                raise ValueError("left padding is not supported: pad on the right (tokenizer.padding_side='right')")
        given = cache if cache is not None else past_key_values
        cache = given if isinstance(given, KVCache) else None
        if use_cache and cache is None:
            cache = KVCache(self.model.config.num_layers)
        out = self.model(input_ids, kv_cache=cache)
        logits = out.logits[..., :self.config.vocab_size]  # (b, s, V): the padded vocabulary rows dropped
        loss = None
        if labels is not None:
            # transformers' convention: labels are the inputs; position t predicts token t + 1.
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, use_cache=True,
                                      cache=None, **kwargs):
        from megatron_mhmoe.model.kv_cache import KVCache
        given = cache if cache is not None else past_key_values
        if isinstance(given, KVCache) and given.offset:
            input_ids = input_ids[:, given.offset:]  # only the positions not cached yet
        else:
            given = None
        return {"input_ids": input_ids, _CACHE: given, "use_cache": use_cache}

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, **kwargs):
        model_kwargs[_CACHE] = getattr(outputs, _CACHE)
        if model_kwargs.get("attention_mask") is not None:
            mask = model_kwargs["attention_mask"]
            model_kwargs["attention_mask"] = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=-1)
        return model_kwargs
