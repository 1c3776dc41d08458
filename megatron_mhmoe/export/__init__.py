"""Exports of a trained checkpoint (any TP/EP/ZeRO layout) as one single-process model:
native (model.safetensors + config.json + tokenizer, what tools/generate.py loads), hf (a transformers folder
with our model code, loaded with trust_remote_code) and gpt2 (dense GPT-2-shaped models as a plain
GPT2LMHeadModel). The commands are tools/export_checkpoint.py and tools/export_hf.py."""
