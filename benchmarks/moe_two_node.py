"""Cross-node expert parallelism on a simulated two-node cluster: flat vs rail-aligned two-level all-to-all.

benchmarks/two_node_netns.sh builds 2 nodes x 2 ranks in network namespaces; EP = 4, TP = 1,
LOCAL_WORLD_SIZE = 2 (the two-level layout comes from it). --rails 2: one NIC per rank (a namespace per
rank, NICs on a switch bridge, node-mates joined by an unlimited link), the fabric of a GPU cluster;
--rails 1: one NIC per node (ranks of a node share a namespace and its loopback). Every NIC is limited to
RATE per direction (tc tbf). Each rank routes its own `--tokens` tokens, dropless. For each rate, rails
and shape (MH-MoE h=4; SMoE h=1 with --shapes mhmoe,smoe) it runs, side by side:

  flat                 one all-to-all over the EP group (the reference path)
  two-level            rail-aligned: a row once per destination node over the rank's own NIC to the same
                       local rank there, which fans it out inside its node (moe/two_level.py)
  two-level+overlap    the same over --chunks pipelined chunks (async all-to-all)
  two-level+group-lim  two-level+overlap with group-limited routing, groups = nodes (route_groups=2,
                       route_group_limit=1: a token's h x k choices reach one node)
  auto                 model.moe.ep_dispatch='auto': the cost model priced with this run's NIC rate (a
                       rank's share of its NIC) and exchange cost (alpha_us below, measured first) picks the
                       path tried first (`model_pick`); then moe/path_tuner.py times both paths for
                       ep_tune_forwards steps each (tune_flat_ms, tune_two_level_ms: fwd + bwd, slowest
                       rank) before anything else is measured, and keeps the faster (`picked`)
  head-affine          head-affine placement (model.moe.head_groups='nodes' = 2): heads 0, 2 route among
                       node 0's experts, heads 1, 3 among node 1's; the cross-node exchange has fixed
                       sizes (moe/head_affine_dispatch.py), --chunks chunks

Each row is printed as a line `JSON {...}`: rate, rails, shape, mode, step_ms (fwd+bwd of the layer,
slowest rank, median over --reps, modes interleaved rep by rep), x_flat, comm_ms (main-thread time blocked
in all-to-alls), link_mb (bytes per step sent by all NICs, from their tx counters, in a separate untimed
pass), rail_mb (the same per NIC: one per rank with --rails 2, one per node with --rails 1), node_mb (bytes
over the node links, --rails 2), counted_mb (the dispatcher's count), formula_mb (uniform-routing
prediction, all NICs: flat 4 S k (N-1)/N d_sub itemsize per rank plus counts; two-level per packet
2 (d_sub + k + c) itemsize + 2 d_sub itemsize, S (N-1) (1 - C(E - E/N, k) / C(E, k)) packets per rank,
or S (N-1)/N with groups = nodes, plus one traffic vector per chunk), picked, alpha_us (median time of a
one-row all-to-all over the 4 ranks on this network, slowest rank: the cost model's exchange cost, which
the 2 shared cores make vary with the machine's load), node_tx_mb (bytes per step sent by each node's
NICs: over a whole fwd+bwd step two nodes send each other the same bytes, whatever the routing, since each
dispatch's rows come back in its combine), node_dispatch_rows (rows, or packets on the node-aware paths,
that each node's forward dispatch sends to the other node: the direction skew loads) and node_ratio (max /
min of node_dispatch_rows: 1 = both directions of the link carry alike in every phase).

Skewed routing: --skew F makes a fraction F of every rank's tokens one repeated token (a hot token the
real router sends to the same experts each time; every mode routes the same inputs). --debug-skew uses the
debug routing 'skew' instead (model.moe.debug_routing, fraction F: first choices on expert 0, inside each
head's group with head-affine); the group-limited mode cannot combine with debug routing (both choose the
experts) and is left out then. MHMOE_NETNS_PREFIX renames the namespaces (two_node_netns.sh).

Needs root (namespaces, tc); without it the script prints a skip message and exits 0. The namespaces are
removed at exit, also on failure or a signal.

  sudo python benchmarks/moe_two_node.py --rails 2,1 --rates 100mbit,1gbit,none --shapes mhmoe --reps 3 > run1.txt
  python benchmarks/moe_two_node.py --summarize run1.txt run2.txt run3.txt   # markdown: median [min-max]
"""
from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import common  # noqa: F401  (puts the repo on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
NETNS = os.path.join(HERE, "two_node_netns.sh")
MODES = ["flat", "two-level", "two-level+overlap", "two-level+group-lim", "auto", "head-affine"]
WORLD, PER_NODE = 4, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="100mbit,1gbit,none", help="comma list of tc tbf rates; 'none' = unlimited")
    p.add_argument("--rails", default="2,1", help="comma list: NICs per node (2 = one per rank, 1 = one per node)")
    p.add_argument("--shapes", default="mhmoe")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=4, help="MH-MoE heads h")
    p.add_argument("--ffn", type=int, default=64, help="expert hidden width (both shapes: equal expert FLOPs)")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--chunks", type=int, default=2, help="a2a_chunks of the overlap modes")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per link before the workers are killed")
    p.add_argument("--modes", default=",".join(MODES), help="comma list of modes to run (flat always runs)")
    p.add_argument("--skew", type=float, default=0.0,
                   help="fraction of each rank's tokens that are one repeated (hot) token; 0 = none")
    p.add_argument("--debug-skew", action="store_true",
                   help="skew by model.moe.debug_routing='skew' (fraction --skew) instead of a hot token")
    p.add_argument("--summarize", nargs="+", metavar="OUTPUT",
                   help="saved outputs of this script: print their median [min-max] per row as markdown")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    p.add_argument("--link-gbps", type=float, default=100.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- worker
def group_limited_available() -> bool:
    import dataclasses
    from megatron_mhmoe.config import MoEConfig
    names = {f.name for f in dataclasses.fields(MoEConfig)}
    return {"route_groups", "route_group_limit"} <= names


def build(args, shape: str, mode: str, ctx):
    from megatron_mhmoe.config import ModelConfig, MoEConfig
    from megatron_mhmoe.moe.layer import MHMoELayer
    h = args.heads if shape == "mhmoe" else 1
    extra = {}
    if mode == "two-level+group-lim":
        extra = dict(route_groups=WORLD // PER_NODE, route_group_limit=1)
    if mode == "head-affine":
        extra = dict(head_groups="nodes")
    if args.debug_skew and args.skew > 0:
        extra.update(debug_routing="skew", debug_skew_fraction=args.skew)
    chunked = mode in ("two-level+overlap", "two-level+group-lim", "auto", "head-affine")
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, num_heads=h, head_projection=h > 1,
                    expert_hidden_size=args.ffn, capacity_factor=0.0, gate="softmax",
                    a2a_chunks=args.chunks if chunked else 1, ep_dispatch="auto" if mode == "auto" else "two_level",
                    ep_nic_gbps=args.link_gbps, ep_node_gbps=100.0, ep_exchange_us=args.alpha_us, **extra)
    layer = MHMoELayer(ModelConfig(hidden_size=args.hidden, num_attention_heads=4, moe=moe), ctx)
    layer.dispatcher.force_flat = mode == "flat"
    assert layer.dispatcher.layout is not None, "LOCAL_WORLD_SIZE=2 should give the two-level layout"
    return layer


class CommTimer:
    """Main-thread time blocked in dist.all_to_all_single (sync calls) and in the waits of async ones
    (parallel.comm.Pending.wait: every asynchronous all-to-all of the dispatcher is waited on there)."""

    def __init__(self):
        self.seconds = 0.0

    def __enter__(self):
        import torch.distributed as dist
        from megatron_mhmoe.parallel import comm
        self._orig, self._wait, timer = dist.all_to_all_single, comm.Pending.wait, self

        def timed(*a, async_op=False, **kw):
            t = time.perf_counter()
            work = timer._orig(*a, async_op=async_op, **kw)
            timer.seconds += time.perf_counter() - t
            return work

        def timed_wait(pending):
            t = time.perf_counter()
            timer._wait(pending)
            timer.seconds += time.perf_counter() - t
        dist.all_to_all_single, comm.Pending.wait = timed, timed_wait
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist
        from megatron_mhmoe.parallel import comm
        dist.all_to_all_single, comm.Pending.wait = self._orig, self._wait


def tx_bytes(iface: str) -> int:
    try:
        with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:  # not in this namespace
        return 0


def rate_gbps(rate: str) -> float:
    """tc rate -> Gbit/s; 'none' (unlimited) prices as a 100 Gbit/s NIC."""
    if rate == "none":
        return 100.0
    num = rate.rstrip("bitBIT")
    scale = {"k": 1e-6, "m": 1e-3, "g": 1.0}.get(num[-1].lower(), 1e-9)
    return float(num[:-1] if num[-1].isalpha() else num) * scale


def exchange_cost_us(ctx) -> float:
    """The exchange cost alpha of this network: a one-row all-to-all over the 4 ranks, median of 20 after 5
    warm-ups. Every rank must price 'auto' alike (or their collectives would differ): the slowest rank's."""
    import torch
    import torch.distributed as dist
    from megatron_mhmoe.parallel import comm
    one = torch.zeros(WORLD, 1)
    times = []
    for _ in range(25):
        dist.barrier()
        t = time.perf_counter()
        comm.all_to_all_v(one, [1] * WORLD, [1] * WORLD, ctx.ep_group)
        times.append(time.perf_counter() - t)
    alpha = torch.tensor([statistics.median(times[5:]) * 1e6], dtype=torch.float64)
    dist.all_reduce(alpha, op=dist.ReduceOp.MAX)
    return float(alpha)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron_mhmoe.parallel.context import ParallelContext
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the driver asks for stacks before a timeout kill
    rank = int(os.environ["RANK"])
    # A rendezvous that cannot connect fails in 2 minutes (the driver retries the link once) instead of 30.
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    ctx = ParallelContext.from_world(1, WORLD)
    nic, node_link = os.environ["GLOO_SOCKET_IFNAME"], os.environ.get("MHMOE_NODE_LINK", "")
    reads_nic = os.environ.get("MHMOE_READS_NIC") == "1"  # one reader per NIC
    gl = group_limited_available()
    args.alpha_us = exchange_cost_us(ctx)
    out = {"group_limited": gl, "shapes": {}, "alpha_us": args.alpha_us}
    for shape in args.shapes.split(","):
        modes = [m for m in run_modes(args, gl) if shape == "mhmoe" or m != "head-affine"]  # needs h >= nodes
        layers = {m: build(args, shape, m, ctx) for m in modes}
        torch.manual_seed(1000 + rank)
        x = torch.randn(args.tokens, args.hidden)
        hot = 0 if args.debug_skew else int(args.skew * args.tokens)
        x[:hot] = torch.randn(args.hidden, generator=torch.Generator().manual_seed(7))  # one hot token on every rank
        x.requires_grad_(True)
        gy = torch.randn_like(x)

        def step(m):
            layer = layers[m]
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, st = layer(x)
            (y * gy).sum().backward()
            return layer.dispatcher.profile

        # 0. auto's trial (moe/path_tuner.py): both paths measured in its first steps, before anything is timed.
        tuner = layers["auto"].dispatcher.tuner
        while not tuner.decided:
            step("auto")
        # 1. Bytes: each mode alone for two steps between barriers, against the NICs' counters.
        res = {}
        for m in modes:
            step(m)
            dist.barrier()
            before = (tx_bytes(nic) if reads_nic else 0, tx_bytes(node_link) if node_link else 0)
            prof = [step(m) for _ in range(2)]
            dist.barrier()
            after = (tx_bytes(nic) if reads_nic else 0, tx_bytes(node_link) if node_link else 0)
            h = args.heads if shape == "mhmoe" else 1
            disp = layers[m].dispatcher
            picked = "flat" if disp.force_flat else disp.choose(args.tokens * h, args.top_k, args.hidden // h, 4)
            if m == "auto":
                trial = next(iter(tuner.decided.values()))
                picked, res_extra = trial["picked"], dict(model_pick=picked, tune_flat_ms=round(trial["flat_ms"], 1),
                                                          tune_two_level_ms=round(trial["two_level_ms"], 1))
            else:
                res_extra = {}
            res[m] = dict(counted=prof[-1].internode_bytes, nic=(after[0] - before[0]) / 2 if reads_nic else None,
                          node=(after[1] - before[1]) / 2, remote_rows=prof[-1].internode_rows,
                          picked=picked,
                          sub_tokens=args.tokens * (args.heads if shape == "mhmoe" else 1), step=[], comm=[],
                          **res_extra)
        # 2. Time: modes interleaved rep by rep (rotated), after warm-up.
        for r in range(args.warmup + args.reps):
            rot = r % len(modes)
            for m in modes[rot:] + modes[:rot]:
                dist.barrier()
                with CommTimer() as ct:
                    t = time.perf_counter()
                    step(m)
                    dt = time.perf_counter() - t
                if r >= args.warmup:
                    res[m]["step"].append(dt)
                    res[m]["comm"].append(ct.seconds)
        out["shapes"][shape] = res
    with open(os.path.join(args.out, f"{rank}.json"), "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


def run_modes(args, group_limited: bool = True) -> list[str]:
    """The modes this run measures: --modes (flat first, always), without group-limited routing where it is
    unavailable or debug routing chooses the experts."""
    asked = [m for m in args.modes.split(",") if m]
    bad = sorted(set(asked) - set(MODES))
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; known: {MODES}")
    drop_gl = not group_limited or (args.debug_skew and args.skew > 0)
    return ["flat"] + [m for m in MODES if m in asked and m != "flat" and not (drop_gl and m == "two-level+group-lim")]


def node_traffic(per_unit: list, per_node: int) -> tuple[list, float]:
    """Per-node sums of per-NIC or per-rank amounts (node-major, `per_node` per node) and their max / min (inf
    when a node has none)."""
    nodes = [round(sum(per_unit[i:i + per_node]), 4) for i in range(0, len(per_unit), per_node)]
    return nodes, (round(max(nodes) / min(nodes), 4) if min(nodes) > 0 else float("inf"))


# ---------------------------------------------------------------------------------------------- driver
def predicted_bytes(args, shape: str, mode: str) -> float:
    """Uniform-routing prediction of the link bytes per step, both directions, all ranks (module docstring)."""
    h = args.heads if shape == "mhmoe" else 1
    S, k, E, P, L = args.tokens * h, args.top_k, args.experts, WORLD, PER_NODE
    d_sub, it, N = args.hidden // h, 4, P // L
    if mode == "flat":
        rows = S * k * (N - 1) / N  # per rank, to the other node
        return P * (4 * rows * d_sub * it + (P - L) * (E // P) * 8)
    chunks = args.chunks if mode != "two-level" else 1
    if mode == "head-affine":  # every sub-token one packet to its head's node, no traffic vector
        from megatron_mhmoe.moe.two_level import id_columns
        c = id_columns(k, 1 if E // N <= 127 else 4, it)
        return P * S * (N - 1) / N * (2 * (d_sub + k + c) * it + 2 * d_sub * it)
    if mode == "two-level+group-lim":
        q = (N - 1) / N
    else:
        q = (N - 1) * (1 - math.comb(E - E // N, k) / math.comb(E, k))
    from megatron_mhmoe.moe.two_level import id_columns
    c = id_columns(k, 1 if E // N <= 127 else 4, it)  # bit-packed id columns
    per_packet = 2 * (d_sub + k + c) * it + 2 * d_sub * it
    return P * (S * q * per_packet + chunks * (P - L) * (N + P) * 8)


def rank_net(rails: int, rank: int) -> tuple[str, str, str]:
    """(namespace, NIC, address) of a rank (two_node_netns.sh env)."""
    out = subprocess.run([NETNS, "env", str(rails), str(rank)], check=True, capture_output=True, text=True)
    ns, nic, addr = out.stdout.split()
    return ns, nic, addr


def run_link(args, rate: str, rails: int) -> list:
    subprocess.run([NETNS, "up", rate, str(rails)], check=True)
    out = tempfile.mkdtemp(prefix="moe_two_node_")
    port = "29611"
    procs = []
    try:
        master = rank_net(rails, 0)[2]
        for rank in range(WORLD):
            ns, nic, _ = rank_net(rails, rank)
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % PER_NODE),
                       LOCAL_WORLD_SIZE=str(PER_NODE), MASTER_ADDR=master, MASTER_PORT=port,
                       GLOO_SOCKET_IFNAME=nic, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
                       MHMOE_READS_NIC="1" if rails == PER_NODE or rank % PER_NODE == 0 else "0",
                       MHMOE_NODE_LINK=f"{os.environ.get('MHMOE_NETNS_PREFIX', 'mhr')}_node{rank}"
                       if rails == PER_NODE else "")
            cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
                   "--link-gbps", str(rate_gbps(rate) * rails / PER_NODE)]  # a rank's share of its NIC
            cmd += [a for a in sys.argv[1:] if a != "--worker"]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + args.timeout
        try:
            for p in procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:  # where each rank is stuck (Python stacks on its stderr), then the kill below
                if p.poll() is None:
                    p.send_signal(signal.SIGUSR1)
            time.sleep(3)
            raise SystemExit(f"workers still running after --timeout {args.timeout:.0f} s (link {rate}, rails "
                             f"{rails}); their stacks are above")
        if any(p.returncode for p in procs):
            raise SystemExit(f"worker exit codes {[p.returncode for p in procs]} (link {rate}, rails {rails})")
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(WORLD)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(out, ignore_errors=True)
        subprocess.run([NETNS, "down"], check=False)


def run_link_retry(args, rate: str, rails: int) -> list:
    """run_link, once more after a failure (on the shared machine a namespace's rendezvous occasionally
    cannot connect); the first failure's message and the workers' stacks stay on stderr."""
    try:
        return run_link(args, rate, rails)
    except SystemExit as err:
        print(f"# link {rate}, rails {rails} failed ({err}); retrying it once", file=sys.stderr, flush=True)
        return run_link(args, rate, rails)


def report(args, rate: str, rails: int, per_rank: list) -> list[dict]:
    rows = []
    alpha = statistics.median(r["alpha_us"] for r in per_rank)
    for shape in args.shapes.split(","):
        res = [r["shapes"][shape] for r in per_rank]
        flat_step = None
        for m in MODES:
            if m not in res[0]:
                continue
            steps = [max(r[m]["step"][i] for r in res) for i in range(len(res[0][m]["step"]))]
            comms = [max(r[m]["comm"][i] for r in res) for i in range(len(res[0][m]["comm"]))]
            step = statistics.median(steps) * 1e3
            flat_step = step if m == "flat" else flat_step
            rail = [r[m]["nic"] / 1e6 for r in res if r[m]["nic"] is not None]  # one per NIC
            node_tx, _ = node_traffic(rail, rails)
            node_rows, node_ratio = node_traffic([r[m]["remote_rows"] for r in res], PER_NODE)
            rows.append(dict(skew=args.skew, skew_kind="debug" if args.debug_skew else "hot",
                             node_tx_mb=node_tx, node_dispatch_rows=node_rows, node_ratio=node_ratio,rate=rate, rails=rails, shape=shape, mode=m, step_ms=round(step, 2),
                             x_flat=round(step / flat_step, 4), comm_ms=round(statistics.median(comms) * 1e3, 2),
                             link_mb=round(sum(rail), 4), rail_mb=[round(v, 4) for v in rail],
                             node_mb=round(sum(r[m]["node"] for r in res) / 1e6, 4),
                             counted_mb=round(sum(r[m]["counted"] for r in res) / 1e6, 4),
                             formula_mb=round(predicted_bytes(args, shape, m if m != "auto" else (
                                 "flat" if res[0][m]["picked"] == "flat" else "two-level+overlap")) / 1e6, 4),
                             picked=res[0][m]["picked"], alpha_us=round(alpha, 1),
                             **{f: res[0][m][f] for f in ("model_pick", "tune_flat_ms", "tune_two_level_ms")
                                if f in res[0][m]},
                             remote_rows=round(sum(r[m]["remote_rows"] for r in res) /
                                               sum(r[m]["sub_tokens"] for r in res), 4)))
    return rows


def summarize(paths: list[str]) -> str:
    """Median [min-max] over saved runs of each (rate, rails, shape, mode) row's JSON line, as markdown."""
    runs: dict[tuple, list[dict]] = {}
    for path in paths:
        for line in open(path):
            if line.startswith("JSON "):
                row = json.loads(line[5:])
                runs.setdefault((row["rate"], row["rails"], row["shape"], row["mode"]), []).append(row)
    out = ["| NIC rate | NICs/node | mode | step ms | x flat | MB per NIC (each) | formula MB per NIC | picked |",
           "|---|---|---|---|---|---|---|---|"]
    for (rate, rails, shape, mode), rows in runs.items():
        def rng(key, f):
            vals = [r[key] for r in rows]
            spread = f" [{format(min(vals), f)}-{format(max(vals), f)}]" if len(rows) > 1 else ""
            return format(statistics.median(vals), f) + spread
        per_nic = [statistics.median(r["rail_mb"][i] for r in rows) for i in range(len(rows[0]["rail_mb"]))]
        nics = len(per_nic)
        picked = "/".join(sorted({r["picked"] for r in rows}))
        out.append(f"| {rate} | {rails} | {mode} | {rng('step_ms', '.0f')} | {rng('x_flat', '.2f')} | "
                   f"{' '.join(format(v, '.2f') for v in per_nic)} | {rows[0]['formula_mb'] / nics:.2f} | {picked} |")
    shapes = sorted({k[2] for k in runs})
    text = "\n".join(out) + f"\n\nShape {', '.join(shapes)}; median over {len(paths)} run(s) [min-max over runs].\n"
    return text + node_table(runs)


def node_table(runs: dict) -> str:
    """Cross-node bytes and node balance per row, for runs whose lines carry node_tx_mb (else '')."""
    out = ["", "| NIC rate | NICs/node | skew | mode | x flat | cross-node MB | x flat MB | MB sent per node | "
           "dispatch rows out per node | max/min |", "|---|---|---|---|---|---|---|---|---|---|"]
    flat_mb = {}
    for (rate, rails, shape, mode), rows in runs.items():
        if mode == "flat":
            flat_mb[(rate, rails, shape)] = statistics.median(r["link_mb"] for r in rows)
    for (rate, rails, shape, mode), rows in runs.items():
        if "node_tx_mb" not in rows[0]:
            continue
        link = statistics.median(r["link_mb"] for r in rows)
        per_node = [statistics.median(r["node_tx_mb"][i] for r in rows) for i in range(len(rows[0]["node_tx_mb"]))]
        skew = f"{rows[0].get('skew_kind', 'hot')} {rows[0].get('skew', 0.0):g}" if rows[0].get("skew") else "none"
        base = flat_mb.get((rate, rails, shape))
        out.append(f"| {rate} | {rails} | {skew} | {mode} | {statistics.median(r['x_flat'] for r in rows):.2f} | "
                   f"{link:.2f} | {link / base if base else float('nan'):.2f} | "
                   f"{' '.join(format(v, '.2f') for v in per_node)} | "
                   f"{' '.join(str(int(statistics.median(r['node_dispatch_rows'][i] for r in rows))) for i in range(len(per_node)))} | "
                   f"{statistics.median(r['node_ratio'] for r in rows):.2f} |")
    return "\n".join(out) + "\n" if len(out) > 3 else ""


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if args.worker:
        worker(args)
        return 0
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        print("SKIP moe_two_node: needs root and iproute2 (ip netns, tc) to build the two simulated nodes; "
              "run it as root (sudo python benchmarks/moe_two_node.py)")
        return 0

    def teardown(*_):
        subprocess.run([NETNS, "down"], check=False)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda s, f: (teardown(), sys.exit(128 + s)))
    print(f"EP={WORLD} as 2 nodes x {PER_NODE} ranks, E={args.experts}, k={args.top_k}, d={args.hidden}, "
          f"MH-MoE h={args.heads}, expert width {args.ffn}, {args.tokens} tokens/rank, fp32, dropless, "
          f"chunks={args.chunks}, {args.reps} reps", flush=True)
    try:
        for rails in [int(r) for r in args.rails.split(",")]:
            for rate in args.rates.split(","):
                for row in report(args, rate, rails, run_link_retry(args, rate, rails)):
                    print("JSON " + json.dumps(row), flush=True)
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
