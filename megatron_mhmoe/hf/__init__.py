"""Hugging Face transformers integration: the exported model loads with AutoModelForCausalLM.

tools/export_hf.py writes a folder with config.json, model.safetensors, the tokenizer and copies of
configuration_mhmoe.py / modeling_mhmoe.py / tokenization_mhmoe.py, so that
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works offline. The modeling file
re-implements the single-device forward in plain torch (it must not import this package, so that the folder
loads where only torch and transformers are installed); tests/reliability/test_hf_model.py compares it with
GPTModel on every model option. Dense models can also be written as a plain
GPT-2 checkpoint (`--format gpt2`), which needs no remote code at all.
"""
