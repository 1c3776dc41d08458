"""Mutants for tools/mutation_check.py: plausible one-line bugs and the tests that must catch each.

Each entry: name, file (from the repository root), `original` (a substring that occurs exactly once in
the file today: the harness refuses a mutant whose text is missing or ambiguous, so that a moved line
shows up as an error instead of a silent pass), `replacement`, a one-line description, the pytest node
ids that must fail, and `fast` for the quick subset (`--fast`, the CI run). `timeout` overrides the
per-mutant default for mutants whose tests launch several processes.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    fast: bool = False
    timeout: int = 0  # 0: the harness's --timeout


M = "megatron_mhmoe/"
LOSS = "tests/moe/test_loss_values.py"
CAPV = "tests/moe/test_capacity_values.py"
COMM = "tests/parallel/test_comm.py"
SPDS = "tests/runtime/test_sequence_parallel_deepspeed.py"
CKPT = "tests/runtime/test_checkpoint.py"
INDEXED = "tests/data/test_data_indexed.py"
SAMPLER = "tests/data/test_data_blend_sampler.py"
GPTDS = "tests/data/test_data_gpt_dataset.py"

MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------ moe: losses
    Mutant("z_loss_not_squared", M + "moe/layer.py",
           "choice.lse.square().sum()", "choice.lse.sum()",
           "z-loss is the mean logsumexp instead of the mean squared logsumexp", (LOSS,), fast=True),
    Mutant("balance_counts_all_k", M + "moe/layer.py",
           "top1 = counts_all[:, 0].sum(0)", "top1 = counts_all.sum((0, 1))",
           "balance loss counts all k choices per sub-token instead of the first", (LOSS,), fast=True),
    Mutant("balance_loss_without_E", M + "moe/losses.py",
           "return E * torch.sum(f * P)", "return torch.sum(f * P)",
           "balance loss loses its factor E (uniform routing no longer gives 1)", (LOSS,), fast=True),
    Mutant("balance_probs_not_replica_summed", M + "moe/layer.py",
           "prob_sum = disp.replica_sum(choice.probs.sum(0))",
           "prob_sum = (choice.probs.sum(0))",
           "balance loss uses this TP rank's probabilities only, divided by the replica's sub-tokens",
           (SPDS,)),
    # ------------------------------------------------------------------ moe: routing
    Mutant("gates_not_renormalised", M + "moe/router.py",
           "gates = top_p / top_p.sum(dim=-1, keepdim=True) if k > 1 else top_p", "gates = top_p",
           "top-k gates are the raw probabilities instead of renormalised over the k choices",
           (CAPV + "::test_layer_k2_keep_mask_by_hand",), fast=True),
    Mutant("lse_sign", M + "moe/router.py",
           "- torch.log(top_p[:, 0])", "+ torch.log(top_p[:, 0])",
           "logsumexp from the top-1 choice with the wrong sign of log p",
           ("tests/benchmarks/test_fast_paths.py::test_lse_from_top1_equals_logsumexp", LOSS), fast=True),
    Mutant("subtokens_head_major", M + "moe/layer.py",
           "x_sub = x_hat.reshape(n * h, self.d_sub)",
           "x_sub = x_hat.reshape(n, h, self.d_sub).transpose(0, 1).reshape(n * h, self.d_sub)",
           "sub-tokens laid out head-major instead of token-major",
           ("tests/moe/test_layer.py::test_subtokens_are_token_major",), fast=True),
    Mutant("routing_group_size_ignores_tp", M + "moe/layer.py",
           "S = n * h * tp_shards", "S = n * h",
           "capacity and losses computed over one TP rank's share instead of the whole replica",
           (SPDS,)),
    # ------------------------------------------------------------------ moe: capacity
    Mutant("capacity_floor", M + "moe/capacity.py",
           "return int(math.ceil(capacity_factor * top_k * num_sub_tokens / num_experts))",
           "return int(capacity_factor * top_k * num_sub_tokens / num_experts)",
           "capacity rounded down instead of up", (CAPV,), fast=True),
    Mutant("capacity_off_by_one", M + "moe/capacity.py",
           "return pos + offset[choice, e_flat] < capacity", "return pos + offset[choice, e_flat] <= capacity",
           "one assignment more than the capacity kept per expert", (CAPV,), fast=True),
    Mutant("capacity_earlier_choices_inclusive", M + "moe/capacity.py",
           "earlier_choices = torch.cumsum(others, 0) - others", "earlier_choices = torch.cumsum(others, 0)",
           "TP offset counts the other ranks' same-choice assignments as earlier choices", (CAPV,), fast=True),
    Mutant("capacity_lower_ranks_inclusive", M + "moe/capacity.py",
           "lower_ranks = counts_all[:tp_rank].sum(0)", "lower_ranks = counts_all[:tp_rank + 1].sum(0)",
           "TP offset counts this rank's own assignments as a lower rank's", (CAPV,), fast=True),
    Mutant("choice_counts_interleaved", M + "moe/capacity.py",
           "repeat_interleave(S)  # (k*S,) choice-major", "repeat(S)  # (k*S,) choice-major",
           "per-(choice, expert) counts built from a token-major choice index", (CAPV,), fast=True),
    # ------------------------------------------------------------------ moe: dispatcher, experts
    Mutant("dispatch_ignores_keep", M + "moe/dispatcher.py",
           "perm = order if keep is None else order[keep.index_select(0, order)]", "perm = order",
           "dropped assignments still reach their experts", (CAPV,), fast=True),
    Mutant("dispatch_src_by_division", M + "moe/dispatcher.py",
           "src = perm % S  # (n,) sub-token of each row", "src = perm // max(1, k)  # (n,) sub-token of each row",
           "rows gathered from the wrong sub-tokens",
           ("tests/moe/test_layer.py::test_grouped_experts_equal_loop_reference",), fast=True),
    Mutant("ep_regroup_unstable", M + "moe/dispatcher.py",
           "regroup = torch.argsort(local_ids, stable=True)  # (m,)",
           "regroup = torch.argsort(local_ids, stable=True).flip(0)  # (m,)",
           "rows received over the all-to-all regrouped in the wrong order (EP > 1)",
           ("tests/moe/test_layer_parallel.py::test_layer_equals_single_process",)),
    Mutant("combine_backward_no_gate", M + "moe/dispatcher.py",
           "g_out = g_rows.mul_(w.unsqueeze(1)) if ctx.needs_input_grad[0] else None",
           "g_out = g_rows if ctx.needs_input_grad[0] else None",
           "combine's backward forgets the gate weight on the expert outputs",
           ("tests/moe/test_layer.py::test_grouped_experts_equal_loop_reference",), fast=True),
    Mutant("autocast_cast_skipped", M + "moe/grouped_ffn.py",
           "return x.to(dt), w1.to(dt), w2.to(dt), (w3.to(dt) if w3 is not None else None)",
           "return x, w1, w2, w3",
           "under autocast the expert GEMMs ignore it and run in fp32",
           ("tests/moe/test_grouped_ffn_bf16.py",), fast=True),
    # ------------------------------------------------------------------ parallel: collectives' backward
    Mutant("copy_backward_no_all_reduce", M + "parallel/comm.py",
           "return all_reduce_(g.contiguous().clone(), ctx.group), None", "return g, None",
           "the copy into a column-parallel region does not all-reduce its gradient", (COMM,)),
    Mutant("gather_backward_not_split", M + "parallel/comm.py",
           "return split(g, ctx.dim, ctx.group), None, None", "return g.narrow(ctx.dim, 0, g.shape[ctx.dim] // group_size(ctx.group)), None, None",
           "all-gather's backward takes rank 0's slice on every rank", (COMM,)),
    Mutant("reduce_scatter_gloo_no_reduce", M + "parallel/comm.py",
           "return split(all_reduce_(x.contiguous().clone(), group), dim, group)",
           "return split(x.contiguous().clone(), dim, group)",
           "reduce-scatter on gloo only scatters (no sum)", (COMM,)),
    # ------------------------------------------------------------------ parallel: gradient reduction, norms
    Mutant("tp_partial_hook_no_sum", M + "parallel/grads.py",
           "p.register_hook(lambda g, group=ctx.tp_group: comm.all_reduce_(g.clone(), group))",
           "p.register_hook(lambda g, group=ctx.tp_group: g.clone())",
           "sequence-parallel norms / MoE router grads not summed over TP on the DeepSpeed path", (SPDS,)),
    Mutant("expert_grads_divided_by_edp", M + "parallel/grads.py",
    Mutant("two_level_gates_shifted", M + "moe/two_level.py",
           "held[:, d_sub:d_sub + k][a_h, a_j]", "held[:, d_sub + 1:d_sub + k + 1][a_h, a_j]",
           "the two-level combine weighs each expert output with the wrong column of the packet",
           ("tests/moe/test_two_level.py::test_two_level_equals_flat",), timeout=300),
    Mutant("two_level_bytes_without_ids", M + "moe/two_level.py",
           "(packets_out + packets_in) * (2 * d_sub + k + ids2.shape[1])",
           "(packets_out + packets_in) * (2 * d_sub + k)",
           "the dispatcher's inter-node byte count leaves out the packed id columns",
           ("tests/moe/test_two_level.py::test_internode_bytes_equal_formula_and_not_above_flat",), timeout=300),
           "_all_reduce_flat(_grads(model, is_expert), ctx.edp_group, 1.0 / ctx.dp_size)",
           "_all_reduce_flat(_grads(model, is_expert), ctx.edp_group, 1.0 / ctx.edp_size)",
           "expert gradients averaged over EDP instead of divided by DP",
           ("tests/model/test_gpt_moe_parallel.py::test_matches_single_process_world2",)),
    Mutant("norm_counts_experts_everywhere", M + "parallel/grads.py",
           "return ctx.edp_rank == 0", "return True",
           "global norm counts each expert once per EDP replica", (SPDS,)),
    Mutant("norm_counts_replicated_per_tp", M + "parallel/grads.py",
           "return ctx.dp_rank == 0 and ctx.tp_rank == 0", "return ctx.dp_rank == 0",
           "global norm counts TP-replicated parameters once per TP rank", (SPDS,)),
    Mutant("clip_coefficient_inverted", M + "parallel/grads.py",
           "return max_norm / (norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0",
           "return norm / (max_norm + 1e-6) if max_norm > 0 and norm > max_norm else 1.0",
           "clipping scales the gradient up instead of down",
           ("tests/runtime/test_engine_clip_policy.py",), fast=True),
    Mutant("sp_norm_not_tp_partial", M + "model/norms.py",
           "    if ctx.sequence_parallel:\n        mark_tp_partial(p)", "    if False:\n        mark_tp_partial(p)",
           "sequence-parallel norm weights not marked as TP-partial (their grads are never summed over TP)",
           (SPDS,)),
    # ------------------------------------------------------------------ runtime: resume, RNG, data position
    Mutant("resume_skips_rng", M + "runtime/trainer.py",
           '        set_rng_state(state["rng"])', "        pass",
           "resume does not restore the RNG state (dropout masks differ after a resume)",
           ("tests/runtime/test_resume_dropout.py",), timeout=400),
    Mutant("resume_forgets_data_position", M + "runtime/trainer.py",
           'self.step, self.consumed = step, int(state["consumed_samples"])',
           "self.step, self.consumed = step, 0",
           "resume restarts the data from the first sample",
           ("tests/runtime/test_resume_dropout.py",), timeout=400),
    Mutant("rng_numpy_not_restored", M + "runtime/checkpoint.py",
           'np.random.set_state(_tensors_to_np_state(state["numpy"]))', "pass",
           "checkpoint RNG restore skips numpy's stream",
           (CKPT + "::test_rng_state_restores_all_streams_exactly",), fast=True),
    Mutant("rng_python_not_restored", M + "runtime/checkpoint.py",
           'random.setstate(_tensors_to_py_state(state["python"]))', "pass",
           "checkpoint RNG restore skips Python's stream",
           (CKPT + "::test_rng_state_restores_all_streams_exactly",), fast=True),
    Mutant("checksum_not_verified", M + "runtime/checkpoint.py",
           'if _sha256(path) != entry["sha256"]:', "if False:",
           "a corrupt rank file is loaded instead of falling back", (CKPT,), fast=True),
    Mutant("lr_warmup_off_by_one", M + "runtime/schedule.py",
           "return (step + 1) / warmup", "return step / warmup",
           "warmup starts at lr 0 (the first step does nothing)", ("tests/runtime/test_schedule.py::test_warmup_is_linear_from_near_zero_to_one",), fast=True),
    Mutant("universal_step_dropped", M + "runtime/universal.py",
           'buf[3 * n] = float(e["step"])', "buf[3 * n] = 0.0",
           "universal optimizer state loses Adam's step count (resharded runs restart bias correction)",
           ("tests/reliability/test_reshard.py::test_resharded_run_continues_with_the_same_losses[1-1-1-0]",),
           timeout=500),
    # ------------------------------------------------------------------ data: index writer, sampler, splits
    Mutant("index_pointers_inclusive", M + "data/indexed.py",
           "f.write((ends - nbytes).tobytes())", "f.write(ends.tobytes())",
           "index writer stores each sequence's end offset as its start", (INDEXED,), fast=True),
    Mutant("index_doc_idx_off_by_one", M + "data/indexed.py",
           "self._doc_idx.append(len(self._sizes))", "self._doc_idx.append(len(self._sizes) - 1)",
           "index writer's document boundaries point one sequence early", (INDEXED,), fast=True),
    Mutant("index_bulk_doc_idx_shifted", M + "data/indexed.py",
           "np.arange(base + 1, base + 1 + len(lengths), dtype=np.int64)",
           "np.arange(base, base + len(lengths), dtype=np.int64)",
           "bulk document append writes boundaries shifted by one", (INDEXED, "tests/data/test_data_preprocess.py"),
           fast=True),
    Mutant("sampler_ignores_consumed", M + "data/sampler.py",
           "base = self.consumed_samples + b * self.global_batch_size", "base = b * self.global_batch_size",
           "sampler restarts from sample 0 after a resume", (SAMPLER + "::test_resume_from_consumed_samples_gives_the_identical_next_batch",), fast=True),
    Mutant("sampler_rank_stride", M + "data/sampler.py",
           "self.dp_rank * per_rank", "self.dp_rank * self.micro_batch_size",
           "DP ranks' slices overlap when grad_accum > 1", (SAMPLER + "::test_sampler_gives_each_rank_its_consecutive_slice",), fast=True),
    Mutant("split_no_rounding_fix", M + "data/split.py",
           "bounds = [bounds[0]] + [b - diff for b in bounds[1:]]", "bounds = [bounds[0]] + bounds[1:]",
           "split boundaries not shifted to end at num_documents", (GPTDS,), fast=True),
    Mutant("sampler_length_ignores_consumed", M + "data/sampler.py",
           "return (self.total_samples - self.consumed_samples) // self.global_batch_size",
           "return self.total_samples // self.global_batch_size",
           "after a resume the sampler yields batches past the end of the dataset",
           (SAMPLER + "::test_sampler_gives_each_rank_its_consecutive_slice", SAMPLER + "::test_resume_from_consumed_samples_gives_the_identical_next_batch"), fast=True),
    Mutant("index_reader_doc_idx_offset", M + "data/indexed.py",
           "offset=HEADER_SIZE + 12 * s)", "offset=HEADER_SIZE + 8 * s)",
           "index reader takes the document index from inside the pointer array", (INDEXED,), fast=True),
    Mutant("split_not_normalised", M + "data/split.py",
           "return [w / total for w in weights]", "return weights",
           "split weights not normalised", (GPTDS, "tests/data/test_data_bad_input.py"), fast=True),
]
