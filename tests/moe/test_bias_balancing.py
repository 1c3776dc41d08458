"""Aux-loss-free balancing (moe/bias_balancing.py): the update rule b_e += gamma * sign(mean_c - c_e) on
hand-built counts, the bias choosing the experts but not weighing them, the buffer staying fp32, the
trainer updating it once per applied step from all micro-batches' counts, and the rule actually balancing
a skewed router. MoEBalancing's hooks are driven here in the trainer's order (run_step). Rank identity,
resume and reshard: tests/reliability/test_reshard.py; parallel
equivalence with a bias: tests/model/test_gpt_moe_parallel.py."""
from __future__ import annotations

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.moe.bias_balancing import ExpertBias, bias_update
from megatron_mhmoe.moe.layer import MHMoELayer
from megatron_mhmoe.moe.metrics import maxvio
from megatron_mhmoe.moe.router import choose
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.moe.balancing import MoEBalancing

SP = ParallelContext.single_process()
GAMMA = 0.01


def test_update_rule_by_hand():
    b = torch.tensor([0.5, 0.0, -0.25, 0.0])
    # mean 3: expert 0 overloaded (-gamma), 1 and 3 at the mean (unchanged), 2 underloaded (+gamma)
    got = bias_update(b, torch.tensor([5, 3, 1, 3]), GAMMA)
    torch.testing.assert_close(got, torch.tensor([0.5 - GAMMA, 0.0, -0.25 + GAMMA, 0.0]), rtol=0, atol=0)
    assert got.dtype == torch.float32
    # Balanced counts leave the bias alone; no counts at all too.
    assert torch.equal(bias_update(b, torch.full((4,), 7), GAMMA), b)
    assert torch.equal(bias_update(b, torch.zeros(4), GAMMA), b)


def test_bias_chooses_the_experts_but_the_gates_use_the_unbiased_scores():
    moe = MoEConfig(num_experts=4, top_k=2, num_heads=1, gate="softmax")
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]]))
    plain = choose(logits, moe)
    assert plain.experts.tolist() == [[0, 1]]
    biased = choose(logits, moe, bias=torch.tensor([-0.5, 0.0, 0.0, 0.25]))  # selection 0.4-0.5, .3, .2, .35
    assert biased.experts.tolist() == [[3, 1]]
    torch.testing.assert_close(biased.gates, torch.tensor([[0.1 / 0.4, 0.3 / 0.4]]))
    torch.testing.assert_close(biased.probs, plain.probs)
    # sigmoid gate: top-k of sigmoid(l) + b, gates s_top / sum(s_top) x scaling from the unbiased s
    sig = MoEConfig(num_experts=4, top_k=2, num_heads=1, gate="sigmoid", gate_scaling=2.0)
    s = torch.tensor([[0.9, 0.8, 0.3, 0.2]])
    r = choose(torch.logit(s), sig, bias=torch.tensor([0.0, -0.6, 0.0, 0.2]))  # 0.9, 0.2, 0.3, 0.4
    assert r.experts.tolist() == [[0, 3]]
    torch.testing.assert_close(r.gates, torch.tensor([[0.9, 0.2]]) / 1.1 * 2.0)
    # A zero bias chooses what no bias chooses.
    z = choose(logits, moe, bias=torch.zeros(4))
    assert torch.equal(z.experts, plain.experts) and torch.allclose(z.gates, plain.gates)


def layer_of(rate=GAMMA, E=8, h=4, k=2, gate="xmoe") -> MHMoELayer:
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=E, top_k=k, num_heads=h, expert_hidden_size=16, gate=gate, bias_update_rate=rate))
    torch.manual_seed(0)
    return MHMoELayer(cfg, SP)


def test_bias_is_an_fp32_buffer_outside_the_optimizer_and_in_the_state_dict():
    layer = layer_of()
    assert isinstance(layer.expert_bias, ExpertBias)
    assert "expert_bias.value" in layer.state_dict()
    assert all("expert_bias" not in n for n, _ in layer.named_parameters())
    layer.bfloat16()
    assert layer.expert_bias.value.dtype == torch.float32 and layer.router.proj.weight.dtype == torch.bfloat16
    assert layer_of(rate=0.0).expert_bias is None and "expert_bias.value" not in layer_of(rate=0.0).state_dict()


def token_batches(vocab: int, n: int, batch: int = 2, seq: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def run_step(model, balancing: MoEBalancing, batches, applied: bool = True) -> tuple[list, dict]:
    """One optimizer step's worth of MoEBalancing hooks, in the order Trainer.train_step calls them (no
    optimizer: the hooks do not depend on one). Returns the micro-batches' outputs and after_step's result."""
    outs, stats = [], []
    balancing.begin_step()
    for tokens in batches:
        out = model(tokens, labels=tokens)
        out.loss.backward()
        balancing.after_backward(out.moe_stats)
        outs.append(out)
        stats.extend(out.moe_stats)
    return outs, balancing.after_step(stats, len(batches), applied)


def test_step_updates_the_bias_once_from_all_micro_batches_counts():
    moe = MoEConfig(num_experts=4, top_k=2, num_heads=2, expert_hidden_size=16, moe_every=1, gate="softmax",
                    bias_update_rate=GAMMA, aux_loss_coef=0.0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=4, ffn_hidden_size=64,
                      max_seq_len=16, dropout=0.0, moe=moe)
    torch.manual_seed(0)
    model = GPTModel(cfg, SP)
    layer = next(m for m in model.modules() if isinstance(m, MHMoELayer))
    balancing = MoEBalancing(model, SP)
    assert balancing.layers == [layer.balance]
    outs, step = run_step(model, balancing, token_batches(64, 3))
    counts = sum(o.moe_stats[0].selections for o in outs)  # all k choices, over the 3 micro-batches
    want = bias_update(torch.zeros(4), counts, GAMMA)
    assert torch.equal(layer.expert_bias.value, want) and torch.equal(step["step_selections"][0], counts.double())
    assert not torch.equal(bias_update(torch.zeros(4), outs[-1].moe_stats[0].selections, GAMMA), want)
    assert balancing.metrics() == {"moe/expert_bias_absmax": pytest.approx(GAMMA)}
    # A skipped (non-finite) step applies no update.
    run_step(model, balancing, token_batches(64, 1, seed=1), applied=False)
    assert torch.equal(layer.expert_bias.value, want)


def test_the_rule_balances_a_skewed_router():
    """Inputs with a positive mean and a router row that favours expert 0 send every token there (MaxVio 3 at
    E=4, k=1); 300 bias updates on the same inputs (no gradient steps) bring the MaxVio below 0.5 in each of
    the last 100 (the sign rule oscillates around balance; measured: <= 0.19)."""
    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, moe=MoEConfig(
        num_experts=4, top_k=1, num_heads=1, head_projection=False, expert_hidden_size=16, gate="softmax",
        bias_update_rate=0.002))
    torch.manual_seed(0)
    layer = MHMoELayer(cfg, SP)
    x = torch.randn(16, 4, 32) + 1.0
    with torch.no_grad():
        layer.router.proj.weight.normal_(0, 0.05)
        layer.router.proj.weight[0].add_(0.03)
        vio = []
        for _ in range(300):
            st = layer(x)[1]
            vio.append(float(maxvio(st.selections)))
            layer.balance.update(st.selections, None)
    assert vio[0] == 3.0, vio[0]
    assert max(vio[-100:]) < 0.5, max(vio[-100:])
    assert layer.expert_bias.value[0] < 0 < layer.expert_bias.value[1:].min()  # the crowded expert's fell


@pytest.mark.parametrize("gate", ["xmoe", "softmax", "sigmoid"])
def test_layer_with_a_bias_matches_its_loop_reference(gate):
    from tests.moe.test_layer import assert_layer_matches_reference
    layer = layer_of(gate=gate)
    layer.expert_bias.value.copy_(0.05 * torch.randn(8))
    assert_layer_matches_reference(layer)
