"""The sequence-wise and global-batch balance losses against their formulas.

Sequence-wise (DeepSeek-V3 Eqs. 17-20): (1/B) sum_b E * sum_e f_{b,e} P_{b,e}, per sequence b of the
micro-batch, f_{b,e} = its s*h sub-tokens' top-k choices of e / (k s h) (all k counted, Eq. 18), P_{b,e}
their mean probability of e. Global-batch: E * sum_e f_e^global P_e, P over this micro-batch's routing group
(the gradient), f^global a constant from the top-k counts of this micro-batch and the step's earlier ones
(running counts) / k.
Formulas are written out here: on hand-built numbers, and from the router's own probabilities through the
layer (values and router gradients). Each layer check also asserts the wrong grouping lands far away.
"""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.losses import global_balance_loss, load_balance_loss, sequence_balance_loss
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.moe.balancing import MoEBalancing
from tests.moe.test_bias_balancing import run_step, token_batches

SP = ParallelContext.single_process()
E, K, H, D = 6, 2, 4, 32
S_LEN, B = 12, 3


def test_hand_built_numbers():
    # E=2, two sequences of 2 sub-tokens. Sequence 0: both first choices on 0, probabilities (1, 0) each;
    # sequence 1: one first choice each, probabilities (0.5, 0.5) each.
    prob = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    top1 = torch.tensor([[2, 0], [1, 1]])
    # seq 0: 2 * (1*1 + 0*0) = 2; seq 1: 2 * (0.5*0.5 + 0.5*0.5) = 1; mean 1.5.
    assert float(sequence_balance_loss(prob, top1, 2)) == pytest.approx(1.5)
    # The same sub-tokens as one micro-batch: f = (3/4, 1/4), P = (3/4, 1/4): 2 * 10/16 = 1.25.
    assert float(load_balance_loss(prob.sum(0), top1.sum(0), 4)) == pytest.approx(1.25)
    # Global: P of this group (3/4, 1/4); f from 8 sub-tokens with counts (2, 6): 2 * (3/4*2/8 + 1/4*6/8) = 0.75.
    assert float(global_balance_loss(prob.sum(0), 4, torch.tensor([2, 6]), 8)) == pytest.approx(0.75)
    assert float(sequence_balance_loss(prob[:0], top1[:0], 0)) == 0.0  # no sequences: 0, not NaN


def skewed_layer(**moe) -> MHMoELayer:
    cfg = ModelConfig(hidden_size=D, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=K, num_heads=H, expert_hidden_size=16, capacity_factor=1.0, gate="softmax", **moe))
    torch.manual_seed(3)
    layer = MHMoELayer(cfg, SP)
    with torch.no_grad():
        w = layer.router.proj.weight
        w.normal_(0.0, 1.0)
        w[0] += 0.8
    return layer


def probs_by_hand(layer: MHMoELayer, x: torch.Tensor) -> torch.Tensor:
    x_sub = layer.head(x.reshape(-1, D)).reshape(-1, D // H)  # token-major sub-tokens
    return torch.softmax(layer.router(x_sub), -1)  # (s*b*h, E)


def inputs(seed: int) -> torch.Tensor:
    x = torch.randn(S_LEN, B, D, generator=torch.Generator().manual_seed(seed))
    x[:, 1] += 1.5  # sequence 1 routes unlike the others, so per-sequence counts differ from the batch's
    return x


def router_grad(loss: torch.Tensor, layer: MHMoELayer) -> torch.Tensor:
    return torch.autograd.grad(loss, layer.router.proj.weight, retain_graph=True)[0]


def test_sequence_loss_equals_its_formula_value_and_gradient():
    layer = skewed_layer(seq_aux_loss_coef=1.0)
    x = inputs(5)
    _, st = layer(x)
    p = probs_by_hand(layer, x)  # (s*b*h, E); row (t*h + j) is token t = s_i*B + b
    seq = (torch.arange(S_LEN * B) % B).repeat_interleave(H)
    chosen = p.topk(K, -1).indices  # (s*b*h, k)
    expected = 0.0
    for b in range(B):
        pb, fb = p[seq == b], chosen[seq == b]
        f = torch.bincount(fb.reshape(-1), minlength=E).double() / (K * pb.shape[0])
        expected = expected + E * (f * pb.double().mean(0)).sum()
    expected = expected / B
    assert float(st.seq_aux_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    # Counting the micro-batch as one sequence (the plain aux loss) is far off on these inputs.
    assert abs(float(st.aux_loss.detach()) - float(expected.detach())) > 1e-2
    g, g_ref = router_grad(st.seq_aux_loss, layer), router_grad(expected.float(), layer)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8), float((g - g_ref).norm())


def test_global_loss_uses_the_running_counts_of_the_step():
    layer = skewed_layer(global_aux_loss_coef=1.0)
    x1, x2 = inputs(1), inputs(2) * 0.5
    _, st1 = layer(x1)
    p1 = probs_by_hand(layer, x1)
    # First micro-batch: f^global is its own counts, so the loss is the micro-batch loss.
    assert float(st1.global_aux_loss.detach()) == pytest.approx(float(st1.aux_loss.detach()), rel=1e-6)
    layer.balance.add_global_counts(st1)
    _, st2 = layer(x2)
    p2 = probs_by_hand(layer, x2)
    counts = sum(torch.bincount(p.topk(K, -1).indices.reshape(-1), minlength=E) for p in (p1, p2))
    f = counts.double() / (K * (p1.shape[0] + p2.shape[0]))  # constant: no gradient through it
    expected = E * (f * p2.double().mean(0)).sum()
    assert float(st2.global_aux_loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    assert abs(float(st2.aux_loss.detach()) - float(expected.detach())) > 1e-3  # the earlier micro-batch's counts matter
    g, g_ref = router_grad(st2.global_aux_loss, layer), router_grad(expected.float(), layer)
    assert torch.allclose(g, g_ref, rtol=1e-5, atol=1e-8), float((g - g_ref).norm())
    # A new step forgets them.
    layer.balance.begin_step()
    _, st3 = layer(x2)
    assert float(st3.global_aux_loss.detach()) == pytest.approx(float(st3.aux_loss.detach()), rel=1e-6)


def test_losses_are_off_by_default_and_summed_into_the_gpt_loss():
    assert MoEConfig().seq_aux_loss_coef == 0.0 and MoEConfig().global_aux_loss_coef == 0.0
    moe = MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, moe_every=1,
                    aux_loss_coef=0.01, z_loss_coef=0.001, seq_aux_loss_coef=0.3, global_aux_loss_coef=0.7)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, dropout=0.0, moe=moe)
    model = GPTModel(cfg, SP)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(tokens, labels=tokens)
    seq = sum(st.seq_aux_loss for st in out.moe_stats)
    glob = sum(st.global_aux_loss for st in out.moe_stats)
    assert len(out.moe_stats) == 2 and float(seq.detach()) > 0 and float(glob.detach()) > 0
    expected = out.lm_loss + 0.01 * out.aux_loss + 0.001 * out.z_loss + 0.3 * seq + 0.7 * glob
    assert float(out.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)


def test_empty_input_gives_zero_losses_with_a_gradient():
    layer = skewed_layer(seq_aux_loss_coef=1.0, global_aux_loss_coef=1.0)
    for shape in ((0, 2, D), (4, 0, D)):
        x = torch.zeros(shape, requires_grad=True)
        _, st = layer(x)
        for loss in (st.seq_aux_loss, st.global_aux_loss):
            assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_step_hooks_run_the_counts_over_the_micro_batches_and_reset_them():
    """MoEBalancing's hooks in the trainer's order: micro-batch 2's global loss uses micro-batches 1 + 2's
    counts, the next step starts afresh, and the step's kept counts (MaxVio of the kept load) are the
    micro-batches' sum."""
    moe = MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, moe_every=1,
                    global_aux_loss_coef=0.1, gate="softmax")
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, dropout=0.0, moe=moe)
    model = GPTModel(cfg, SP)
    balancing = MoEBalancing(model, SP)
    outs, r = run_step(model, balancing, token_batches(64, 2))
    st1, st2 = outs[0].moe_stats[0], outs[1].moe_stats[0]
    f = (st1.balance_counts + st2.balance_counts).double() / (2 * (st1.num_sub_tokens + st2.num_sub_tokens))
    expected = moe.num_experts * (f * st2.prob_sum.detach().double() / st2.num_sub_tokens).sum()
    assert float(st2.global_aux_loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert abs(float(st2.global_aux_loss.detach()) - float(st2.aux_loss.detach())) > 1e-4
    assert torch.equal(r["step_kept"][0], (st1.kept + st2.kept).double())
    outs, _ = run_step(model, balancing, token_batches(64, 1, seed=3))
    st3 = outs[0].moe_stats[0]
    assert float(st3.global_aux_loss.detach()) == pytest.approx(float(st3.aux_loss.detach()), rel=1e-6)


def test_checkpointed_blocks_recompute_the_same_global_and_sequence_gradients():
    """Recomputation in backward must see the same f^global (the running counts change only between
    micro-batches), so the gradients equal those without activation checkpointing."""
    moe = MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, moe_every=1,
                    seq_aux_loss_coef=0.5, global_aux_loss_coef=0.5, gate="softmax")
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, dropout=0.0, moe=moe)
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        model = GPTModel(cfg, SP)
        model.activation_checkpointing = ckpt
        for m in model.modules():
            if isinstance(m, MHMoELayer):
                m.balance.earlier_counts, m.balance.earlier_sub_tokens = torch.tensor([40.0, 0.0, 0.0, 24.0]), 64
        model(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n
