"""Quantile balancing (moe/quantile_balancing.py, Kimi K3 section 2.3.3): the required-bias histogram and
the k/E quantile on hand-built numbers, the histogram estimate against the exact sorted quantile, the
subsystem's once-per-step update from all micro-batches (and none after a skipped step), the rule
balancing a skewed router, exact resume through the state dict, and the configuration errors. Layout
invariance (the histograms of TP=2 x EP=2 + SP, EP=4 and TP=2 x EP=4 equal the single process's, exactly):
tests/model/test_gpt_moe_parallel.py."""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.moe.balancing import MoEBalancing
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.metrics import maxvio
from megatron_mhmoe.moe.quantile_balancing import (bias_range, quantile_bias, quantile_bias_reference,
                                                   required_bias, required_bias_histogram)
from megatron_mhmoe.parallel.context import ParallelContext
from tests.moe.test_bias_balancing import run_step, token_batches

SP = ParallelContext.single_process()
# E=2, k=1, bias 0: sub-token t's cutoff is its 2nd score, so r_{t,0} = s_1 - s_0 and r_{t,1} = 0.
SCORES = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])


def test_required_bias_and_quantile_by_hand():
    r = required_bias(SCORES, SCORES, 1)
    torch.testing.assert_close(r, torch.tensor([[-0.8, 0.0], [-0.6, 0.0], [-0.4, 0.0], [-0.2, 0.0]]))
    # 4 bins over [-1, 1] (width 0.5): expert 0's r in bins 0, 0, 1, 1; expert 1's all in bin 2.
    hist = required_bias_histogram(SCORES, SCORES, 1, torch.zeros(2), bins=4)
    assert hist.tolist() == [2, 2, 0, 0, 0, 0, 4, 0]
    # q = m k / E = 2. Expert 0 reaches 2 at the end of bin 0: v = -1 + 1 x 0.5 = -0.5; expert 1 inside
    # bin 2, 0 of its 4 before: v = -1 + (2 + 2/4) x 0.5 = 0.25. Mean-centred: (-0.375, 0.375).
    lo, hi = bias_range(torch.zeros(2))
    assert (lo, hi) == (-1.0, 1.0)
    torch.testing.assert_close(quantile_bias(hist.view(2, 4), 1, lo, hi), torch.tensor([-0.375, 0.375]))
    # Exact: the 2nd smallest r per expert, -0.6 and 0, centred (-0.3, 0.3).
    torch.testing.assert_close(quantile_bias_reference(r, 1), torch.tensor([-0.3, 0.3]))


def test_histogram_estimate_is_within_a_bin_of_the_exact_quantile():
    g = torch.Generator().manual_seed(0)
    E, k, bins = 16, 4, 1000
    scores = torch.sigmoid(torch.randn(3000, E, generator=g) * 2 + torch.linspace(-1, 1, E))
    bias = 0.1 * torch.randn(E, generator=g)
    select = scores + bias
    hist = required_bias_histogram(scores, select, k, bias, bins).view(E, bins)
    assert int(hist.sum()) == 3000 * E
    lo, hi = bias_range(bias)
    got = quantile_bias(hist, k, lo, hi)
    want = quantile_bias_reference(required_bias(scores.double(), select.double(), k), k)
    assert float((got - want).abs().max()) <= 2 * (hi - lo) / bins  # one bin each side, before centring


def layer_of(**moe) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=8, top_k=2, num_heads=1, head_projection=False, expert_hidden_size=16, gate="softmax",
        quantile_balancing=True, **moe))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


def test_the_rule_balances_a_skewed_router():
    """A router skewed towards some experts (MaxVio 1.08 at E=8, k=2); after 4 quantile updates on the same
    inputs the MaxVio is below 0.35 (measured 0.27; one update already halves it)."""
    layer = layer_of()
    x = torch.randn(64, 4, 32) + 1.0
    vio = []
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 0.3)
        layer.router.proj.weight[0].add_(0.1)
        for _ in range(5):
            st = layer(x)[1]
            vio.append(float(maxvio(st.selections)))
            layer.balance.update(st.selections.double(), st.quantile_hist.double())
    assert vio[0] > 1.0 and vio[1] < 0.7 * vio[0] and vio[-1] < 0.35, vio
    assert abs(float(layer.expert_bias.value.sum())) < 1e-5  # mean-centred


def gpt(**moe) -> GPTModel:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, dropout=0.0, moe=MoEConfig(
                          num_experts=4, top_k=1, num_heads=2, expert_hidden_size=16, moe_every=1, gate="sigmoid",
                          aux_loss_coef=0.0, quantile_balancing=True, quantile_bins=50, **moe))
    torch.manual_seed(0)
    return GPTModel(cfg, SP)


def test_step_sets_the_bias_once_from_all_micro_batches_and_resumes_exactly():
    model = gpt()
    balancing = MoEBalancing(model, SP)
    layers = [m for m in model.modules() if isinstance(m, MHMoELayer)]
    outs, _ = run_step(model, balancing, token_batches(64, 3))
    for i, layer in enumerate(layers):
        hist = sum(o.moe_stats[i].quantile_hist for o in outs).double().view(4, 50)
        want = quantile_bias(hist, 1, -1.0, 1.0)  # the step's forwards ran with bias 0
        assert torch.equal(layer.expert_bias.value, want), i
        assert not torch.equal(quantile_bias(outs[-1].moe_stats[i].quantile_hist.double().view(4, 50), 1, -1.0, 1.0),
                               want)
    assert all(layer.expert_bias.value.abs().max() > 0 for layer in layers)
    # A skipped step sets nothing.
    before = [layer.expert_bias.value.clone() for layer in layers]
    run_step(model, balancing, token_batches(64, 1, seed=1), applied=False)
    assert all(torch.equal(b, layer.expert_bias.value) for b, layer in zip(before, layers))
    # Exact resume: the bias is the only state carried between steps, and the state dict holds it.
    resumed = gpt()
    resumed.load_state_dict(model.state_dict())
    for m in (model, resumed):
        run_step(m, MoEBalancing(m, SP), token_batches(64, 2, seed=2))
    for a, b in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]


@pytest.mark.parametrize("kw,msg", [
    (dict(bias_update_rate=0.01), "both set the routing bias"),
    (dict(route_groups=4, route_group_limit=2), "set route_group_limit=0"),
    (dict(top_k=8), "needs top_k < num_experts"),
    (dict(quantile_bins=1), "quantile_bins=1 must be >= 2"),
])
def test_bad_settings_name_the_problem(kw, msg):
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(num_experts=8, quantile_balancing=True,
                                                                            **kw))
    with pytest.raises(ValueError, match=msg):
        cfg.validate()
