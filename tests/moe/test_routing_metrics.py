"""Routing metrics against their formulas on hand-built counts: MaxVio (max load / mean load - 1),
per-head shares, activation ratio and effective experts, I(head; expert) in bits; the layer's (head, expert)
counts by hand; and the step summary's names (scalars only under moe/)."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.moe import metrics
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.parallel.context import ParallelContext


def test_maxvio():
    # loads (6, 2, 2, 2): mean 3, max 6 -> 1.0; balanced -> 0; empty -> 0 (not NaN).
    assert metrics.maxvio(torch.tensor([6, 2, 2, 2])).item() == pytest.approx(1.0)
    assert metrics.maxvio(torch.tensor([[3, 3], [0, 0], [1, 3]])).tolist() == pytest.approx([0.0, 0.0, 0.5])


def test_step_counts_sum_micro_batches_per_layer_and_maxvio_is_on_the_routed_load():
    def st(routed, kept):
        return metrics.MoEStats(aux_loss=None, z_loss=None, selections=torch.tensor(routed), kept=torch.tensor(kept),
                                divergence=torch.zeros(3), num_tokens=1, num_sub_tokens=1)
    # 2 micro-batches x 2 layers, stats in order (micro 0: layer 0, layer 1; micro 1: ...). Capacity 2 per
    # expert clips the routed loads to the kept ones.
    stats = [st([4, 0], [2, 0]), st([1, 1], [1, 1]), st([0, 4], [0, 2]), st([2, 0], [2, 0])]
    kept, routed = metrics.step_kept_counts(stats, 2), metrics.step_selection_counts(stats, 2)
    assert kept.tolist() == [[2.0, 2.0], [3.0, 1.0]] and routed.tolist() == [[4.0, 4.0], [3.0, 1.0]]
    s = metrics.summarize(stats, 0.5, kept, routed)
    # micro MaxVio on the routed loads: 1, 0, 1, 1 -> mean 0.75 (the kept loads would give the same here);
    # global: layer 0 balanced (0), layer 1 3/2 - 1 = 0.5.
    assert s["moe/maxvio_micro"] == pytest.approx(0.75)
    assert s["moe/layer0/maxvio"] == pytest.approx(0.0) and s["moe/layer1/maxvio"] == pytest.approx(0.5)
    assert s["moe/maxvio_global"] == pytest.approx(0.25)
    # The kept figure under its own name: layer 0 (2, 2) -> 0, layer 1 (3, 1) -> 0.5; mean 0.25.
    assert s["moe/maxvio_kept_global"] == pytest.approx(0.25)
    # Where capacity clips the crowded expert the two differ: routed (6, 2) -> 0.5, kept (2, 2) -> 0.
    clipped = [st([6, 2], [2, 2])]
    s = metrics.summarize(clipped, 0.5, metrics.step_kept_counts(clipped, 1), metrics.step_selection_counts(clipped, 1))
    assert s["moe/maxvio_micro"] == pytest.approx(0.5) and s["moe/maxvio_global"] == pytest.approx(0.5)
    assert s["moe/maxvio_kept_global"] == pytest.approx(0.0)


def test_mutual_information_bits():
    # Each head on its own expert (h = E = 2, equal counts): I = H(head) = 1 bit.
    assert metrics.mutual_information_bits(torch.tensor([[5, 0], [0, 5]])) == pytest.approx(1.0)
    # Independent (rows proportional): 0.
    assert metrics.mutual_information_bits(torch.tensor([[1, 3], [2, 6]])) == pytest.approx(0.0, abs=1e-12)
    # p = [[1/2, 1/4], [0, 1/4]]: by the definition written out.
    c = torch.tensor([[2, 1], [0, 1]])
    p = [[0.5, 0.25], [0.0, 0.25]]
    pj, pe = [0.75, 0.25], [0.5, 0.5]
    want = sum(p[j][e] * math.log2(p[j][e] / (pj[j] * pe[e])) for j in range(2) for e in range(2) if p[j][e])
    assert metrics.mutual_information_bits(c) == pytest.approx(want)
    assert metrics.mutual_information_bits(torch.zeros(2, 3)) == 0.0


def test_head_metrics():
    # One layer, h=2, E=4: head 0 spreads evenly over 4 experts, head 1 puts everything on expert 3.
    hc = torch.tensor([[[2, 2, 2, 2], [0, 0, 0, 8]]])
    m = metrics.head_metrics(hc, 0.5)
    # cells with share >= 0.5/4: head 0's 4, head 1's 1 -> 5 of 8.
    assert m["head_activation_ratio"] == pytest.approx(5 / 8)
    assert m["head_effective_experts"] == pytest.approx((4 + 1) / 2)
    # p(j) = 1/2 each, p(e) = (1/8, 1/8, 1/8, 5/8).
    p = [[1 / 8] * 4, [0, 0, 0, 1 / 2]]
    pe = [1 / 8, 1 / 8, 1 / 8, 5 / 8]
    want = sum(p[j][e] * math.log2(p[j][e] / (0.5 * pe[e])) for j in range(2) for e in range(4) if p[j][e])
    assert m["mi_head_expert_bits"] == pytest.approx(want)


def test_layer_head_counts_by_hand():
    E, K, H, D = 4, 2, 4, 32
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=K, num_heads=H, expert_hidden_size=16, gate="softmax"))
    torch.manual_seed(0)
    layer = MHMoELayer(cfg, ParallelContext.single_process())
    x = torch.randn(8, 2, D)
    with torch.no_grad():
        _, st = layer(x)
        x_sub = layer.head(x.reshape(-1, D)).reshape(-1, D // H)
        chosen = torch.softmax(layer.router(x_sub), -1).topk(K, -1).indices  # (n*h, k)
    want = torch.zeros(H, E, dtype=torch.long)
    for i in range(chosen.shape[0]):
        for e in chosen[i]:
            want[i % H, e] += 1  # sub-token i of the token-major layout is head i mod h
    assert torch.equal(st.head_counts, want)
    assert int(st.head_counts.sum()) == int(st.selections.sum())
    s = metrics.summarize([st], 0.5)
    for name in ("moe/head_activation_ratio", "moe/head_effective_experts", "moe/mi_head_expert_bits",
                 "moe/maxvio_micro"):
        assert isinstance(s[name], float) and math.isfinite(s[name]), name


def test_routing_report_and_heatmap(tmp_path):
    hc = torch.tensor([[[2, 2, 2, 2], [0, 0, 0, 8]], [[1, 0, 0, 0], [0, 1, 0, 0]]]).double()
    kept = torch.tensor([[2, 2, 2, 4], [1, 1, 0, 0]]).double()  # capacity 4 clipped layer 0's expert 3
    rep = metrics.routing_report(hc.sum(1), torch.zeros(2, 5), 0.5, hc, kept)
    # MaxVio on the routed loads (2, 2, 2, 10) and (1, 1, 0, 0); the kept figure under its own name.
    assert rep["maxvio_per_layer"] == pytest.approx([10 / 4 - 1, 1 / 0.5 - 1])
    assert rep["maxvio_kept"] == pytest.approx(((4 / 2.5 - 1) + (1 / 0.5 - 1)) / 2)
    assert rep["mi_head_expert_bits_per_layer"][1] == pytest.approx(1.0)
    assert rep["head_shares"][0][1] == [0.0, 0.0, 0.0, 1.0]
    path = tmp_path / "h.png"
    metrics.write_head_heatmap(hc, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_training_run_logs_and_writes_them(tmp_path):
    """Two ranks (DP=2, EP=2), two micro-batches per step, both new balance losses on: metrics.jsonl carries
    the losses and metrics, moe_stats.json the per-layer ones, and the heatmap is a valid PNG."""
    import json
    import os

    from megatron_mhmoe.data.corpus import build_corpus
    from megatron_mhmoe.data.preprocess import PreprocessConfig, output_prefix_for, preprocess
    from tests.runtime.test_train_launch import common_args, finish, torchrun

    corpus = str(tmp_path / "corpus.jsonl")
    build_corpus(corpus, max_mb=0.3)
    preprocess(PreprocessConfig(inputs=[corpus], output_prefix=str(tmp_path / "c"), tokenizer_type="byte",
                                append_eod=True), log=lambda m: None)
    run_dir = str(tmp_path / "run")
    args = [a for a in common_args(output_prefix_for(str(tmp_path / "c"), "text"), run_dir)
            if not a.startswith(("--train.train_steps", "--train.eval_interval"))]
    finish(torchrun(2, args + ["--parallel.ep=2", "--train.train_steps=2", "--train.eval_interval=2",
                               "--train.grad_accum_steps=2", "--model.moe.seq_aux_loss_coef=0.01",
                               "--model.moe.global_aux_loss_coef=0.01"]))
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "moe/maxvio_micro" in r]
    assert train_rows, rows
    for r in train_rows:
        for k in ("seq_aux_loss", "global_aux_loss", "moe/maxvio_micro", "moe/maxvio_global", "moe/layer0/maxvio",
                  "moe/head_activation_ratio", "moe/head_effective_experts", "moe/mi_head_expert_bits"):
            assert isinstance(r[k], float) and math.isfinite(r[k]), (k, r.get(k))
        assert r["seq_aux_loss"] > 0 and r["global_aux_loss"] > 0
        assert 1.0 <= r["moe/head_effective_experts"] <= 4.0 and r["moe/mi_head_expert_bits"] >= 0.0
        # Dropless: the step's loads are every assignment of 2 micro-batches x 2 DP ranks x 2 x 32 tokens x h=2 x k=2.
        step = r["routing/layer0/tokens_per_expert_step"]
        assert sum(step) == 2 * 2 * 2 * 32 * 2 * 2, step
        assert r["moe/maxvio_global"] == pytest.approx(max(step) / (sum(step) / len(step)) - 1.0)
    with open(os.path.join(run_dir, "moe_stats.json")) as f:
        rep = json.load(f)
    assert len(rep["maxvio_per_layer"]) == 1 and len(rep["head_shares"][0]) == 2  # one MoE layer, h = 2
    with open(os.path.join(run_dir, "head_expert_shares.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_report_reads_them_from_moe_stats(tmp_path):
    import json
    import os

    from megatron_mhmoe.scaling import plots, report

    recs = []
    for seed, vio in ((1, 0.2), (2, 0.4)):
        run_dir = tmp_path / f"r{seed}"
        run_dir.mkdir()
        (run_dir / "moe_stats.json").write_text(json.dumps(
            {"maxvio": vio, "head_activation_ratio": 0.5, "head_effective_experts": 3.0, "mi_head_expert_bits": 0.25}))
        recs.append({"status": "ok", "kind": "mhmoe", "h": 4, "mode": "params", "experts": 8, "num_experts": 8,
                     "seed": seed, "val_ppl": 20.0, "run_dir": str(run_dir)})
    m = report.aggregate(recs)["MH-MoE h=4 [params]"][8]
    assert m["maxvio"][0] == pytest.approx(0.3) and m["maxvio"][2] == 2
    assert m["mi_head_expert_bits"][:2] == (0.25, 0.0)
    table = report.markdown_table(recs)
    assert "| MaxVio |" in table.splitlines()[0] and "0.300 ± 0.141" in table
    path = plots.plot_balance(recs, str(tmp_path / "b.png"))
    assert path and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 1000
    for r in recs:
        os.remove(os.path.join(r["run_dir"], "moe_stats.json"))
    assert plots.plot_balance(recs, str(tmp_path / "c.png")) is None  # nothing to draw: no figure
