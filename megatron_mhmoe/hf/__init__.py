"""Hugging Face transformers integration: the exported model loads with AutoModelForCausalLM.

tools/export_hf.py writes a folder with config.json, model.safetensors, the tokenizer and copies of
configuration_mhmoe.py / modeling_mhmoe.py / tokenization_mhmoe.py, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works offline. The modeling file runs
this package's own single-process GPTModel (one definition of the maths, every model option), so
megatron_mhmoe must be importable where the folder is loaded. Dense models can also be written as a plain
GPT-2 checkpoint (`--format gpt2`), which needs no remote code at all.
"""
