"""tools/evaluate.py's evaluation (megatron_mhmoe/evaluation/harness.py): lm-eval-harness (HF backend) on an
exported model, offline, with the shipped local task.

The model is a freshly initialised MH-MoE GPT (byte tokenizer, 512 positions: the items are longer than the
trained test models' 32) written in tools/export_checkpoint.py's format and exported with tools/export_hf.py:
scoring, not training, is under test. The harness's multiple-choice accuracy on
the first 16 items of tools/eval_tasks/next_line.jsonl equals the accuracy computed here from our own model's
log-likelihoods of each choice (acc exactly; acc_norm with lm-eval's length normalisation by characters), the
perplexity task reports byte perplexity = 2 ** bits per byte, and the JSON report holds both tasks.
Its output, run from a folder outside any git checkout with stdout not a terminal, has no git error and no
progress bar (carriage returns), but plain progress lines; the harness's per-request truncation warnings
become one summary line.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_mhmoe.evaluation import harness, progress
from megatron_mhmoe.evaluation.generate import load_model
from megatron_mhmoe.evaluation.tasks import TASKS_DIR
from megatron_mhmoe.export.huggingface import export_hf

pytest.importorskip("lm_eval")
LIMIT = 16


def _our_accuracy(model, items) -> tuple[float, float]:
    hits = norm_hits = 0
    for item in items:
        ctx = list(item["context"].encode("utf-8"))
        scores = []
        for choice in item["choices"]:
            cont = list(choice.encode("utf-8"))
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :, :model.config.vocab_size].double(), dim=-1)
            ll = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
            scores.append((ll, ll / len(choice)))
        hits += max(range(len(scores)), key=lambda j: scores[j][0]) == item["label"]
        norm_hits += max(range(len(scores)), key=lambda j: scores[j][1]) == item["label"]
    return hits / len(items), norm_hits / len(items)


def random_export(folder, tokenizer: dict, files: dict | None = None, vocab_size: int = 257) -> str:
    """A freshly initialised model in tools/export_checkpoint.py's format (files: name -> path to copy in)."""
    import shutil

    from safetensors.torch import save_file

    from megatron_mhmoe.config import ModelConfig, MoEConfig, to_dict
    from megatron_mhmoe.model.gpt import GPTModel
    from megatron_mhmoe.parallel.context import ParallelContext
    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=512, position_embedding="rope",
                      moe=MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16))
    model = GPTModel(cfg, ParallelContext.single_process(), seed=5)
    full = {k: (v[:cfg.vocab_size] if k.endswith("word_embeddings.weight") else v).contiguous()
            for k, v in model.state_dict().items()}
    os.makedirs(folder)
    save_file(full, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": to_dict(cfg), "step": 0, "tokenizer": tokenizer}, f)
    for name, src in (files or {}).items():
        shutil.copyfile(src, os.path.join(folder, name))
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval_model")
    ours = random_export(str(d / "ours"), {"type": "byte"})
    hf = str(d / "hf")
    export_hf(ours, hf, log=lambda m: None)
    return {"out": ours, "hf": hf}


def test_local_task_results_equal_our_own_scoring(exported, tmp_path, monkeypatch, capfd):
    hf_folder = exported["hf"]
    out = tmp_path / "eval.json"
    monkeypatch.chdir(tmp_path)  # not a git checkout: lm-eval's own `git describe` would print "fatal: ..."
    harness.evaluate_to_file(hf_folder, ["local"], str(out), batch_size=4, limit=LIMIT, wandb_group=None)
    printed = capfd.readouterr()
    text = printed.out + printed.err
    assert "fatal" not in text and "\r" not in text, text[-2000:]
    progress = [line for line in printed.out.splitlines() if line.startswith("Running loglikelihood requests: ")]
    assert progress and all(line.endswith("%)") for line in progress), printed.out
    report = json.loads(out.read_text())
    res = report["results"]
    assert set(res) == {"mhmoe_next_line", "mhmoe_heldout_ppl"}
    with open(os.path.join(TASKS_DIR, "next_line.jsonl")) as f:
        items = [json.loads(line) for line in f][:LIMIT]
    ours, _ = load_model(exported["out"])
    acc, acc_norm = _our_accuracy(ours, items)
    assert res["mhmoe_next_line"]["acc"] == pytest.approx(acc, abs=1e-9)
    assert res["mhmoe_next_line"]["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    ppl = res["mhmoe_heldout_ppl"]
    assert ppl["bits_per_byte"] > 0 and ppl["byte_perplexity"] == pytest.approx(2 ** ppl["bits_per_byte"], rel=1e-9)


def test_truncation_warnings_become_one_summary_line(capsys, caplog):
    import logging
    lines = []
    with progress.clean_output(plain_progress=True, log=lines.append):
        hf_log = logging.getLogger("lm_eval.models.huggingface")
        for i in range(300):  # lm-eval's warning, once per over-long request
            hf_log.warning(f"Combined length of context ({600 + i}) and continuation (5) exceeds model's maximum "
                           f"length (512). Truncating {94 + i} tokens from the left.")
        hf_log.warning("another warning")
        import tqdm
        bar = tqdm.tqdm(total=8, desc="Running loglikelihood requests")  # what lm-eval creates
        for _ in range(8):
            bar.update(1)
        bar.close()
    err = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["another warning"]
    assert lines == ["lm-eval truncated 300 request(s) from the left to the model's max_seq_len (context + "
                     "continuation longer than the positions the model was trained on)"]
    assert err.out.splitlines() == [f"Running loglikelihood requests: {n}/8 ({100 * n // 8}%)" for n in (2, 4, 6, 8)]
    assert tqdm.tqdm is not progress.LineProgress  # restored
