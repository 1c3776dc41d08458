"""The TP x EP (x DP) GPT with real MH-MoE layers equals the single-process GPT with the same weights.

Layouts: world 4 with (TP=2, EP=4) -- the issue's layout, EP > DP ("parallel folding") -- with sequence
parallelism on and off, capacity factor 1.0 (tokens dropped) and 0.0 (dropless); world 4 with (TP=1,
EP=4) and (TP=2, EP=2); world 2 with (TP=2, EP=2) and (TP=1, EP=2). The model has 2 or 4 layers, every
second one MH-MoE (E=8, k=2, h=4, X-MoE gate), with aux and z losses on.

A DP replica is one routing group (capacity and the balance loss are per replica), so the reference runs
the single-process model once per replica's micro-batch, and the reference objective is the MEAN over
replicas of each replica's total loss (lm + aux_coef * aux + z_coef * z + seq_coef * seq_aux +
global_coef * global_aux). The global-batch loss's f counts every replica's sub-tokens, so the reference
writes it out from the replicas' counts and probabilities (see _reference). Compared against it:
- per rank: loss, lm_loss, aux_loss, z_loss, seq_aux_loss, global_aux_loss of its replica; the dropped count summed over MoE layers,
  exactly (routing and capacity decisions must be identical, not just close);
- every parameter's gradient (reduced with grads.reduce_gradients, gathered to full tensors with
  params.gather_full_grads, vocab unpadded), experts included;
- the fresh init at this layout gathers to the TP=EP=1 init, and the parameter counts agree.
At least one capacity case must actually drop tokens, or the capacity comparison proved nothing.

The routing options run here too: sigmoid scores, debug skew routing, the sequence-wise and global-batch
losses, the aux-loss-free bias (a random bias in the state), token-level group-limited routing, whose
per-token group fan-out histograms must also be identical, and quantile balancing, whose required-bias
histograms (what sets the next bias) must be identical. Shared experts (replicated over EP, gradients
summed over TP like the router's) run at TP=2 x EP=2 with SP and at EP=4.

Weights are randomised away from their init (biases non-zero, norm weights != 1, gate temperature moved)
so that a bias added twice or a gradient reduced over the wrong group changes the numbers.

Tolerance (fp32): per tensor, ||parallel - reference|| <= RTOL * ||reference|| + ATOL with RTOL = 1e-5,
ATOL = 1e-7 (losses are 0-dim tensors, compared the same way). Observed: relative errors ~1e-7 for the
losses and <= ~1e-6 for the gradients; the parallel path sums in another order (TP reductions, all-to-all
regrouping, gradient all-reduces), so bit equality is not expected.
All cases of one world size run in ONE spawn (a module-scoped fixture): spawning costs seconds.
"""
from __future__ import annotations

import dataclasses
import zlib

import pytest
import torch

from megatron_mhmoe.config import ModelConfig, MoEConfig
from megatron_mhmoe.model.gpt import GPTModel
from megatron_mhmoe.parallel.context import ParallelContext
from megatron_mhmoe.parallel.grads import reduce_gradients
from megatron_mhmoe.parallel.params import gather_full_grads, gather_full_state_dict, shard_full_state_dict
from tests.distributed import run_workers

RTOL = 1e-5
ATOL = 1e-7
BATCH, SEQ = 2, 16
INIT_SEED = 7
LOSSES = ("loss", "lm_loss", "aux_loss", "z_loss", "seq_aux_loss", "global_aux_loss")

MOE = MoEConfig(num_experts=8, top_k=2, num_heads=4, expert_hidden_size=16, moe_every=2, capacity_factor=1.0,
                aux_loss_coef=0.01, z_loss_coef=0.001)
BASE = ModelConfig(vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                   max_seq_len=16, dropout=0.0, moe=MOE)

# name -> (world, tp, ep, sequence_parallel, capacity_factor, model config overrides; "moe": MoEConfig ones)
CASES = {
    "w4_tp2_ep4_cf1": (4, 2, 4, False, 1.0, dict(num_layers=4)),
    "w4_tp2_ep4_sp_cf1": (4, 2, 4, True, 1.0, dict(norm="rmsnorm", position_embedding="rope",
                                                   activation="swiglu", tie_embeddings=False)),
    "w4_tp2_ep4_dropless": (4, 2, 4, False, 0.0, dict(position_embedding="rope", tie_embeddings=False)),
    "w4_tp2_ep4_sp_dropless": (4, 2, 4, True, 0.0, dict(num_layers=4, norm="rmsnorm")),
    "w4_tp1_ep4_cf1": (4, 1, 4, False, 1.0, dict(activation="swiglu")),
    "w4_tp2_ep2_sp_cf1": (4, 2, 2, True, 1.0, dict(position_embedding="rope")),
    "w4_tp2_ep2_sp_cf1_sigmoid": (4, 2, 2, True, 1.0, dict(moe=dict(gate="sigmoid", gate_scaling=2.5))),
    "w4_tp1_ep4_cf1_sigmoid": (4, 1, 4, False, 1.0, dict(moe=dict(gate="sigmoid"))),
    "w4_tp2_ep2_sp_cf1_skew": (4, 2, 2, True, 1.0, dict(moe=dict(debug_routing="skew", debug_skew_fraction=0.3))),
    # Sequence-wise and global-batch balance losses (aux off, so they are the only balance terms' gradients).
    "w4_tp2_ep2_sp_cf1_seq_global": (4, 2, 2, True, 1.0, dict(moe=dict(aux_loss_coef=0.0, seq_aux_loss_coef=0.05,
                                                                        global_aux_loss_coef=0.05))),
    "w4_tp2_ep4_cf1_seq_global": (4, 2, 4, False, 1.0, dict(num_layers=4, moe=dict(seq_aux_loss_coef=0.05,
                                                                                    global_aux_loss_coef=0.05))),
    "w4_tp1_ep4_cf1_seq_global": (4, 1, 4, False, 1.0, dict(moe=dict(seq_aux_loss_coef=0.05,
                                                                      global_aux_loss_coef=0.05))),
    # Aux-loss-free bias (a random one, see full_state) and token-level group-limited routing, alone and
    # together; G=4 groups of 2 experts, M=2 (the bias also moves which groups a token picks).
    "w4_tp2_ep2_sp_cf1_bias": (4, 2, 2, True, 1.0, dict(moe=dict(aux_loss_coef=0.0, bias_update_rate=0.001))),
    "w4_tp1_ep4_cf1_bias_sigmoid": (4, 1, 4, False, 1.0, dict(moe=dict(gate="sigmoid", bias_update_rate=0.001))),
    "w4_tp2_ep2_sp_cf1_groups": (4, 2, 2, True, 1.0, dict(moe=dict(route_groups=4, route_group_limit=2))),
    "w4_tp1_ep4_dropless_groups_bias": (4, 1, 4, False, 0.0, dict(moe=dict(route_groups=4, route_group_limit=1,
                                                                          bias_update_rate=0.001))),
    "w4_tp2_ep4_cf1_groups_bias": (4, 2, 4, False, 1.0, dict(num_layers=4, moe=dict(
        route_groups=2, route_group_limit=1, bias_update_rate=0.001, gate="sigmoid"))),
    # Quantile balancing (a random bias in the state as above): the required-bias histograms of each replica,
    # summed over its TP ranks, equal the single process's exactly, so the step's new bias does too.
    "w4_tp2_ep2_sp_cf1_quantile": (4, 2, 2, True, 1.0, dict(moe=dict(aux_loss_coef=0.0, quantile_balancing=True,
                                                                      quantile_bins=64))),
    "w4_tp1_ep4_cf1_quantile": (4, 1, 4, False, 1.0, dict(moe=dict(quantile_balancing=True, quantile_bins=64,
                                                                   gate="sigmoid"))),
    "w4_tp2_ep4_cf1_quantile": (4, 2, 4, False, 1.0, dict(moe=dict(aux_loss_coef=0.0, quantile_balancing=True,
                                                                   quantile_bins=64))),
    "w2_tp2_ep2_sp_cf1": (2, 2, 2, True, 1.0, dict(num_layers=4, tie_embeddings=False)),
    "w2_tp1_ep2_cf1": (2, 1, 2, False, 1.0, dict(norm="rmsnorm")),
    # shared experts (one on every sub-token, replicated over EP, TP-partial grads like the router's)
    "w4_tp2_ep2_sp_cf1_shared": (4, 2, 2, True, 1.0, dict(moe=dict(num_shared_experts=1))),
    "w4_tp1_ep4_cf1_shared": (4, 1, 4, False, 1.0, dict(moe=dict(num_shared_experts=1, expert_activation="swiglu",
                                                                  shared_expert_hidden_size=24))),
}


def _seed(name: str) -> int:
    return zlib.crc32(name.encode()) % 10_000


def case_config(name: str) -> ModelConfig:
    cf, overrides = CASES[name][4], dict(CASES[name][5])
    moe = dataclasses.replace(MOE, capacity_factor=cf, **overrides.pop("moe", {}))
    return dataclasses.replace(BASE, moe=moe, **overrides)


def full_state(cfg: ModelConfig, seed: int) -> dict:
    """A single-process state dict (true vocab), randomised away from the init."""
    single = ParallelContext.single_process()
    model = GPTModel(cfg, single, seed=seed)
    state = gather_full_state_dict(model, single, true_vocab=cfg.vocab_size)
    g = torch.Generator().manual_seed(seed)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}
    # The aux-loss-free bias is a replicated buffer: a random one changes which experts are chosen.
    for name, buf in model.named_buffers():
        if name.endswith("expert_bias.value"):
            state[name] = 0.05 * torch.randn(buf.shape, generator=g)
    return state


def micro_batches(cfg: ModelConfig, dp: int, seed: int) -> list[tuple]:
    """(tokens, labels, loss_mask) per DP replica; the mask drops ~1/4 of the tokens."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for _ in range(dp):
        tokens = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=g)
        mask = (torch.rand(BATCH, SEQ, generator=g) > 0.25).float()
        mask[0, 0] = 1.0
        out.append((tokens, labels, mask))
    return out


def _summary(out, loss=None, global_aux=None) -> dict:
    """loss, global_aux: the reference's (see _reference); the model's own otherwise."""
    zero = out.z_loss.new_zeros(())
    losses = {k: getattr(out, k).detach() for k in ("loss", "lm_loss", "aux_loss", "z_loss")}
    losses["seq_aux_loss"] = sum((st.seq_aux_loss.detach() for st in out.moe_stats), zero)
    losses["global_aux_loss"] = sum((st.global_aux_loss.detach() for st in out.moe_stats), zero)
    if loss is not None:
        losses.update(loss=loss.detach(), global_aux_loss=global_aux.detach())
    return dict(losses,
                dropped=sum(st.dropped for st in out.moe_stats),
                kept=[st.kept.clone() for st in out.moe_stats],
                fanout=[st.fanout_groups.clone() for st in out.moe_stats],
                quantile_hist=[st.quantile_hist.clone() for st in out.moe_stats if st.quantile_hist is not None],
                num_moe_layers=len(out.moe_stats))


def _worker(rank: int, world: int, cases: dict) -> dict:
    results = {}
    for name, (tp, ep, sp, cfg, state, batches) in cases.items():
        ctx = ParallelContext.from_world(tp, ep, sequence_parallel=sp)
        model = GPTModel(cfg, ctx)
        model.load_state_dict(shard_full_state_dict(model, state, ctx, cfg.padded_vocab_size(tp)))
        tokens, labels, mask = batches[ctx.dp_rank]
        out = model(tokens, labels=labels, loss_mask=mask)
        out.loss.backward()
        reduce_gradients(model, ctx)
        grads = gather_full_grads(model, ctx, true_vocab=cfg.vocab_size)
        # Init invariance: the same seed gives the same full model at this layout as at TP=EP=1.
        fresh = GPTModel(cfg, ctx, seed=INIT_SEED)
        init_full = gather_full_state_dict(fresh, ctx, true_vocab=cfg.vocab_size)
        results[name] = dict(_summary(out), dp_rank=ctx.dp_rank, num_params=fresh.num_params(),
                             grads=grads if rank == 0 else None, init=init_full if rank == 0 else None)
    return results


def _reference(name: str) -> dict:
    cfg = case_config(name)
    world, tp = CASES[name][0], CASES[name][1]
    seed = _seed(name)
    state, batches = full_state(cfg, seed), micro_batches(cfg, world // tp, seed)
    single = ParallelContext.single_process()
    model = GPTModel(cfg, single)
    model.load_state_dict(shard_full_state_dict(model, state, single, cfg.padded_vocab_size(1)))
    for k, buf in model.named_buffers():  # the random bias arrived (else both sides would route unbiased)
        if k in state:
            assert torch.equal(buf, state[k]), f"{name}: buffer {k} was not loaded"
    outs = [model(t, labels=l, loss_mask=m) for t, l, m in batches]  # one routing group per replica
    # Global-batch loss by its formula, per MoE layer l: E * sum_e f_e P_e^r with f_e = balance counts of e
    # over ALL replicas / (choices x their sub-tokens) (a constant) and P^r replica r's mean probabilities. One process
    # routes the replicas one by one, so its own global_aux_loss only saw replica r: replace it.
    E, gcoef = cfg.moe.num_experts, cfg.moe.global_aux_loss_coef
    losses, globals_ = [], []
    for o in outs:
        g = o.z_loss.new_zeros(())
        for layer in range(len(o.moe_stats)):
            top1 = sum(p.moe_stats[layer].balance_counts.double() for p in outs)
            S_all = sum(p.moe_stats[layer].num_sub_tokens for p in outs) * o.moe_stats[layer].balance_choices
            st = o.moe_stats[layer]
            g = g + E * ((top1 / S_all).float() * st.prob_sum / st.num_sub_tokens).sum()
        own = sum((st.global_aux_loss for st in o.moe_stats), o.z_loss.new_zeros(()))
        losses.append(o.loss - gcoef * own + gcoef * g)
        globals_.append(g if gcoef else own)
    torch.stack(losses).mean().backward()
    fresh = GPTModel(cfg, single, seed=INIT_SEED)
    return dict(cfg=cfg, state=state, batches=batches,
                replicas=[_summary(o, loss, g) for o, loss, g in zip(outs, losses, globals_)],
                grads=gather_full_grads(model, single, true_vocab=cfg.vocab_size),
                init=gather_full_state_dict(fresh, single, true_vocab=cfg.vocab_size),
                num_params=fresh.num_params())


def _run_world(world: int) -> dict:
    names = [n for n, c in CASES.items() if c[0] == world]
    refs = {n: _reference(n) for n in names}
    cases = {n: (CASES[n][1], CASES[n][2], CASES[n][3], refs[n]["cfg"], refs[n]["state"], refs[n]["batches"])
             for n in names}
    per_rank = run_workers(_worker, world, cases)
    return {n: (refs[n], [r[n] for r in per_rank]) for n in names}


@pytest.fixture(scope="module")
def world2():
    return _run_world(2)


@pytest.fixture(scope="module")
def world4():
    return _run_world(4)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm()) / max(float(expected.norm()), 1e-30)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    err = float((actual - expected).norm())
    bound = RTOL * float(expected.norm()) + ATOL
    assert err <= bound, f"{what}: |diff| = {err:.3e} > {bound:.3e} (|ref| = {float(expected.norm()):.3e})"


def _check(results: dict, name: str) -> None:
    ref, ranks = results[name]
    for rank, r in enumerate(ranks):
        d = r["dp_rank"]
        rr = ref["replicas"][d]
        where = f"{name} rank {rank} (dp {d})"
        assert r["num_moe_layers"] == rr["num_moe_layers"] == ref["cfg"].num_layers // 2, where
        # Routing identical: the same number of dropped assignments, the same per-expert kept counts.
        assert r["dropped"] == rr["dropped"], f"{where}: dropped {r['dropped']} != reference {rr['dropped']}"
        for i, (kp, kr) in enumerate(zip(r["kept"], rr["kept"])):
            assert torch.equal(kp, kr), f"{where}: MoE layer {i} kept {kp.tolist()} != {kr.tolist()}"
        assert len(r["quantile_hist"]) == len(rr["quantile_hist"]), where
        for i, (hp, hr) in enumerate(zip(r["quantile_hist"], rr["quantile_hist"])):
            assert torch.equal(hp, hr), f"{where}: MoE layer {i} quantile histogram differs"
            assert int(hr.sum()) == BATCH * SEQ * ref["cfg"].moe.num_heads * ref["cfg"].moe.num_experts, where
        for i, (fp, fr) in enumerate(zip(r["fanout"], rr["fanout"])):
            assert torch.equal(fp, fr), f"{where}: MoE layer {i} group fan-out {fp.tolist()} != {fr.tolist()}"
        for k in LOSSES:
            assert_close_rel(r[k], rr[k], f"{where} {k}")
        assert r["num_params"] == ref["num_params"], where
    grads = ranks[0]["grads"]
    assert set(grads) == set(ref["grads"])
    assert any(".experts." in k for k in grads), "no expert parameters: the model is not an MoE"
    for k, g in ref["grads"].items():
        assert grads[k].shape == g.shape, k
        assert g.norm() > 0, f"reference gradient of {k} is zero: the test would not see a bug there"
        assert_close_rel(grads[k], g, f"{name} grad {k}")
    for k, v in ref["init"].items():
        assert torch.equal(ranks[0]["init"][k], v), f"{name}: init of {k} differs from TP=EP=1"


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0] == 2])
def test_matches_single_process_world2(world2, name):
    _check(world2, name)


@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][0] == 4])
def test_matches_single_process_world4(world4, name):
    _check(world4, name)


def test_group_limit_bounds_the_fanout_and_the_bias_is_loaded(world4):
    """A token reaches at most route_group_limit groups (and in these cases more without the limit would be
    possible), and the bias cases really ran with the random bias of full_state."""
    for name, (ref, ranks) in world4.items():
        moe = ref["cfg"].moe
        if moe.route_group_limit:
            for r in ranks + ref["replicas"]:
                for hist in r["fanout"]:
                    assert hist[moe.route_group_limit + 1:].sum() == 0, (name, hist.tolist())
                    assert hist[moe.route_group_limit] > 0, (name, hist.tolist())
        if moe.bias_update_rate:
            assert any(k.endswith("expert_bias.value") and v.abs().sum() > 0 for k, v in ref["state"].items()), name


def test_capacity_drops_and_dropless_does_not(world2, world4):
    """cf=1.0 must drop in at least one case (else the exact drop comparison proved nothing);
    dropless must drop nothing."""
    results = {**world2, **world4}
    drops = {n: [r["dropped"] for r in ref["replicas"]] for n, (ref, _) in results.items()}
    assert max(max(d) for n, d in drops.items() if CASES[n][4] > 0) > 0, drops
    assert all(max(d) == 0 for n, d in drops.items() if CASES[n][4] <= 0), drops


def test_seq_and_global_losses_differ_from_the_micro_batch_loss(world4):
    """The sequence-wise loss (per-sequence counts) and the global-batch loss (counts over every replica)
    must not equal the replica's micro-batch loss in these cases, or matching them would not show that the
    counts were taken over the right sub-tokens."""
    for name in (n for n in CASES if n.endswith("_seq_global")):
        for rr in world4[name][0]["replicas"]:
            aux = float(rr["aux_loss"])
            assert abs(float(rr["seq_aux_loss"]) - aux) > 1e-4 * aux, (name, rr)
            assert abs(float(rr["global_aux_loss"]) - aux) > 1e-4 * aux, (name, rr)


def test_cases_cover_the_layouts():
    """The case table spans what the issue asks for."""
    layouts = {(c[0], c[1], c[2]) for c in CASES.values()}
    assert {(4, 2, 4), (4, 1, 4), (4, 2, 2), (2, 2, 2), (2, 1, 2)} <= layouts
    tp2ep4 = {(c[3], c[4] > 0) for c in CASES.values() if (c[1], c[2]) == (2, 4)}
    assert tp2ep4 == {(False, False), (False, True), (True, False), (True, True)}
