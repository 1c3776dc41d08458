"""Expert-parallel MoE layer step on several processes (gloo on CPU, NCCL on CUDA): where the time goes
and how many bytes each rank sends.

Each of EP processes holds E/EP experts and its own `--tokens` tokens (EP = world, TP = 1). Per step we
record, per rank, the forward split from the dispatcher's profile (permute, counts exchange, all-to-all,
experts, combine; "routing" is the rest of the forward: head/merge projections, router, top-k,
capacity), and the backward as a whole; the table shows the median over reps of the slowest rank.
Bytes: what each rank hands to dist.all_to_all_single in one fwd+bwd step (measured by wrapping it,
benchmarks/a2a_meter.py) against the formula 2 x (sent + received rows) x d/h x itemsize + E x 8 (dispatch
and combine, forward and backward, plus the int64 counts exchange): sent rows are the kept assignments
(S x k dropless, S = tokens x h sub-tokens) less those for the rank's own experts, which stay home.

  python benchmarks/moe_ep.py                   # EP 2 and 4, SMoE and MH-MoE
  python benchmarks/moe_ep.py --ep 2 --experts 64 --tokens 4096
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import common  # noqa: F401  (puts the repo on sys.path)
from a2a_meter import A2AMeter, formula_bytes
from common import DTYPES, print_table
from megatron_mhmoe.parallel.spawn import run_workers

PHASES = ["routing", "permute", "counts_exchange", "all_to_all", "experts", "combine", "backward", "step"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ep", default="2,4", help="comma list of expert-parallel sizes (= processes)")
    p.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, one GPU per rank)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="MH-MoE heads h")
    p.add_argument("--ffn", type=int, default=1024, help="expert hidden width")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=0.0, help="<= 0 dropless (exact byte formula)")
    p.add_argument("--shapes", default="smoe,mhmoe")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before the workers are killed")
    args = p.parse_args(argv)
    args.ep_list = [int(e) for e in args.ep.split(",")]
    for ep in args.ep_list:
        if args.experts % ep:
            p.error(f"--experts {args.experts} is not divisible by EP {ep} ({args.experts} % {ep} = "
                    f"{args.experts % ep})")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} % --heads {args.heads} = {args.hidden % args.heads}, must be 0")
    return args


def build_layer(args, shape: str, ctx, device, dtype):
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    from megatron_mhmoe.moe.layer import MHMoELayer
    h = args.heads if shape == "mhmoe" else 1
    cfg = ModelConfig(hidden_size=args.hidden, num_attention_heads=4, moe=MoEConfig(
        num_experts=args.experts, top_k=args.top_k, num_heads=h, head_projection=h > 1,
        expert_hidden_size=args.ffn, capacity_factor=args.capacity_factor, gate="softmax"))
    return MHMoELayer(cfg, ctx).to(device=device, dtype=dtype)


def measure(rank: int, ep: int, args, shape: str, device, dtype) -> dict:
    import torch.distributed as dist
    from common import sync
    from megatron_mhmoe.parallel.context import ParallelContext
    ctx = ParallelContext.from_world(1, ep)
    layer = build_layer(args, shape, ctx, device, dtype)
    torch.manual_seed(1000 + rank)  # every rank its own tokens
    x = torch.randn(args.tokens, args.hidden, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    disp = layer.dispatcher
    disp.profile_enabled = True
    samples = {p: [] for p in PHASES}
    meter = None
    for r in range(args.warmup + args.reps + 1):
        layer.zero_grad(set_to_none=True)
        x.grad = None
        dist.barrier()
        metered = r == args.warmup + args.reps  # one extra, metered step: wrapping costs a little time
        if metered:
            meter = A2AMeter().__enter__()
        sync(device)
        t0 = time.perf_counter()
        y, st = layer(x)
        sync(device)
        t1 = time.perf_counter()
        torch.autograd.backward([y, st.aux_loss], [gy, torch.tensor(0.01, device=device)])
        sync(device)
        t2 = time.perf_counter()
        if metered:
            meter.__exit__(None, None, None)
            continue
        if r < args.warmup:
            continue
        times = dict(disp.profile.times)
        times["routing"] = (t1 - t0) - sum(times.values())
        times["backward"], times["step"] = t2 - t1, t2 - t0
        for p in PHASES:
            samples[p].append(times.get(p, 0.0))
    prof = disp.profile
    S = args.tokens * layer.moe.num_heads
    dropless = args.capacity_factor <= 0
    formula = formula_bytes(S, args.top_k, layer.d_sub, x.element_size(), args.experts, prof.rows_received,
                            prof.rows_sent)
    floats = [c for c in meter.per_call if c["floating"]]
    ints = [c for c in meter.per_call if not c["floating"]]
    return dict(rank=rank, median={p: statistics.median(v) for p, v in samples.items()},
                measured=dict(total=meter.bytes_total, dispatch=floats[0]["bytes"] if floats else 0,
                              counts=sum(c["bytes"] for c in ints), off_rank=meter.bytes_off_rank, calls=meter.calls),
                formula=formula, rows_sent=prof.rows_sent, rows_received=prof.rows_received,
                rows_home=prof.rows_home, dropless=dropless)


def _rank_results(rank: int, ep: int, args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # spawn set one GPU per rank
    return {shape: measure(rank, ep, args, shape, device, DTYPES[args.dtype]) for shape in args.shapes.split(",")}


def run_ep(args, ep: int) -> list[dict]:
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    try:
        return run_workers(_rank_results, ep, args, timeout_s=args.timeout, backend=backend, threads=args.threads)
    except (RuntimeError, TimeoutError) as e:
        raise SystemExit(f"EP {ep}: {e}")


def main(argv=None) -> None:
    args = parse_args(argv)
    print(f"# moe_ep: torch {torch.__version__}, {args.device}, {args.dtype}, {args.threads} thread(s)/rank, "
          f"{args.tokens} tokens/rank, d={args.hidden} ffn={args.ffn} E={args.experts} k={args.top_k} "
          f"cf={args.capacity_factor}, median of {args.reps} after {args.warmup} warm-up (slowest rank)")
    time_rows, byte_rows = [], []
    for ep in args.ep_list:
        per_rank = run_ep(args, ep)
        for shape in args.shapes.split(","):
            res = [r[shape] for r in per_rank]
            row = dict(ep=ep, shape=shape)
            row.update({p: 1e3 * max(r["median"][p] for r in res) for p in PHASES})
            time_rows.append(row)
            for r in res:
                m, f = r["measured"], r["formula"]
                byte_rows.append(dict(ep=ep, shape=shape, rank=r["rank"], m_dispatch=m["dispatch"],
                                      f_dispatch=f["dispatch"], m_counts=m["counts"], f_counts=f["counts"],
                                      recv=r["rows_received"], m_total=m["total"], f_total=f["total"],
                                      equal="yes" if (m["dispatch"], m["counts"], m["total"]) ==
                                      (f["dispatch"], f["counts"], f["total"]) else "NO",
                                      off_share=m["off_rank"] / max(1, m["total"]), calls=m["calls"]))
            print("JSON " + json.dumps(dict(bench="moe_ep", ep=ep, shape=shape, args=vars(args) | {"ep_list": None},
                                            per_rank=res)), flush=True)
    print("\nstep time split, ms (median over reps of the slowest rank; routing = rest of the forward)")
    print_table(time_rows, [("ep", "EP", "d"), ("shape", "shape", "s")] + [(p, p, ".1f") for p in PHASES])
    print("\nall-to-all bytes per rank, measured at dist.all_to_all_single (m_) vs formula (f_):")
    print("  dispatch = sent rows*(d/h)*itemsize (kept assignments less the rank's own experts'), counts = E*8;")
    print("  step total (fwd+bwd) = 2*dispatch + 2*recv*(d/h)*itemsize + counts, recv = rows this rank's experts got")
    print_table(byte_rows, [("ep", "EP", "d"), ("shape", "shape", "s"), ("rank", "rank", "d"),
                            ("m_dispatch", "m_dispatch", "d"), ("f_dispatch", "f_dispatch", "d"),
                            ("m_counts", "m_counts", "d"), ("f_counts", "f_counts", "d"), ("recv", "recv rows", "d"),
                            ("m_total", "m_total", "d"), ("f_total", "f_total", "d"), ("equal", "equal", "s"),
                            ("off_share", "off-rank", ".3f"), ("calls", "a2a calls", "d")])

if __name__ == "__main__":
    main()
