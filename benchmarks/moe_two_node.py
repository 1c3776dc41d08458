"""Cross-node expert parallelism on a simulated two-node network: flat vs two-level all-to-all.

Two network namespaces ("nodes", benchmarks/two_node_netns.sh) joined by a veth pair, 2 ranks in each
(ranks 0, 1 in namespace A at 10.77.0.1, ranks 2, 3 in B at 10.77.0.2; gloo over GLOO_SOCKET_IFNAME = the
veth, so ranks of one node talk over the namespace's loopback and only inter-node traffic crosses the
veth). EP = 4, TP = 1, LOCAL_WORLD_SIZE = 2 (the two-level layout comes from it). Each rank routes its own
`--tokens` tokens, dropless. For each link (tc tbf rate limit, or none) and each shape (MH-MoE h=4, SMoE
h=1: the same expert FLOPs per token, h sub-tokens of d/h through the same expert widths) it prints, side by
side, for each mode:

  flat                 one all-to-all over the EP group (the reference path)
  two-level            within the node, one exchange per pair of nodes (a row once per node), fan out
  two-level+overlap    the same over --chunks pipelined chunks (async all-to-all)
  two-level+group-lim  two-level+overlap with group-limited routing, groups = nodes (route_groups=2,
                       route_group_limit=1: a token's h x k choices reach one node)

step ms: fwd+bwd of the layer, slowest rank, median over --reps (modes interleaved rep by rep);
comm ms: time the main thread spends blocked in all-to-all calls and waits (fwd+bwd, slowest rank);
link MB: bytes per step that crossed the link, both directions (the dispatcher's count, summed over ranks),
next to the veth's own tx_bytes (both namespaces, from a separate untimed pass) and the formula's
prediction for uniform routing (flat: 4 S k (N-1)/N d_sub itemsize per rank plus counts; two-level: per
packet 2 (d_sub + k + c) itemsize + 2 d_sub itemsize, c = columns of bit-packed ids, with
S (N-1) (1 - C(E - E/N, k) / C(E, k)) packets per rank, or S (N-1)/N with groups = nodes; plus one traffic
vector per chunk);
remote rows/sub-token: rows a sub-token sends to the other node (choices for flat, packets two-level).

Needs root (namespaces, tc); without it the script prints a skip message and exits 0. The namespaces are
always removed at exit.

  sudo python benchmarks/moe_two_node.py                       # 1gbit, 100mbit, unlimited; MH-MoE and SMoE
  sudo python benchmarks/moe_two_node.py --rates 1gbit --shapes mhmoe --reps 3
  python benchmarks/moe_two_node.py --summarize run1.txt run2.txt run3.txt   # markdown: median [min-max]
"""
from __future__ import annotations

import argparse
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
from common import print_table

HERE = os.path.dirname(os.path.abspath(__file__))
NETNS = os.path.join(HERE, "two_node_netns.sh")
NS = {"A": ("mhmoe_nsA", "mhmoe_vA", "10.77.0.1"), "B": ("mhmoe_nsB", "mhmoe_vB", "10.77.0.2")}
MODES = ["flat", "two-level", "two-level+overlap", "two-level+group-lim"]
WORLD, PER_NODE = 4, 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", default="1gbit,100mbit,none", help="comma list of tc tbf rates; 'none' = unlimited")
    p.add_argument("--shapes", default="mhmoe,smoe")
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
    p.add_argument("--summarize", nargs="+", metavar="OUTPUT",
                   help="saved outputs of this script: print their median [min-max] per row as markdown")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
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
    moe = MoEConfig(num_experts=args.experts, top_k=args.top_k, num_heads=h, head_projection=h > 1,
                    expert_hidden_size=args.ffn, capacity_factor=0.0, gate="softmax",
                    a2a_chunks=args.chunks if mode in ("two-level+overlap", "two-level+group-lim") else 1, **extra)
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
    with open(f"/sys/class/net/{iface}/statistics/tx_bytes") as f:
        return int(f.read())


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from megatron_mhmoe.parallel.context import ParallelContext
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    ctx = ParallelContext.from_world(1, WORLD)
    iface = os.environ["GLOO_SOCKET_IFNAME"]
    reads_iface = rank % PER_NODE == 0  # one rank per namespace reads its veth's counters
    gl = group_limited_available()
    out = {"group_limited": gl, "shapes": {}}
    for shape in args.shapes.split(","):
        modes = [m for m in MODES if gl or m != "two-level+group-lim"]
        layers = {m: build(args, shape, m, ctx) for m in modes}
        torch.manual_seed(1000 + rank)
        x = torch.randn(args.tokens, args.hidden, requires_grad=True)
        gy = torch.randn_like(x)

        def step(m):
            layer = layers[m]
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, st = layer(x)
            (y * gy).sum().backward()
            return layer.dispatcher.profile

        # 1. Bytes: each mode alone for two steps between barriers, against the veth's counters.
        res = {}
        for m in modes:
            step(m)
            dist.barrier()
            before = tx_bytes(iface) if reads_iface else 0
            prof = [step(m) for _ in range(2)]
            dist.barrier()
            after = tx_bytes(iface) if reads_iface else 0
            rows = prof[-1].internode_rows
            res[m] = dict(counted=prof[-1].internode_bytes, iface=(after - before) / 2, remote_rows=rows,
                          sub_tokens=args.tokens * (args.heads if shape == "mhmoe" else 1), step=[], comm=[])
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
    if mode == "two-level+group-lim":
        q = (N - 1) / N
    else:
        q = (N - 1) * (1 - math.comb(E - E // N, k) / math.comb(E, k))
    from megatron_mhmoe.moe.two_level import id_columns
    c = id_columns(k, 1 if E // N <= 127 else 4, it)  # bit-packed id columns
    per_packet = 2 * (d_sub + k + c) * it + 2 * d_sub * it
    return P * (S * q * per_packet + chunks * (P - L) * (N + P) * 8)


def run_link(args, rate: str) -> dict:
    subprocess.run([NETNS, "up", rate], check=True)
    out = tempfile.mkdtemp(prefix="moe_two_node_")
    port = "29611"
    procs = []
    try:
        for rank in range(WORLD):
            ns, veth, _ = NS["A"] if rank < PER_NODE else NS["B"]
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % PER_NODE),
                       LOCAL_WORLD_SIZE=str(PER_NODE), MASTER_ADDR=NS["A"][2], MASTER_PORT=port,
                       GLOO_SOCKET_IFNAME=veth, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
            cmd = ["ip", "netns", "exec", ns, sys.executable, os.path.abspath(__file__), "--worker", "--out", out]
            cmd += [a for a in sys.argv[1:] if a != "--worker"]
            procs.append(subprocess.Popen(cmd, env=env))
        deadline = time.monotonic() + args.timeout
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        if any(p.returncode for p in procs):
            raise SystemExit(f"worker exit codes {[p.returncode for p in procs]} (link {rate})")
        return [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(WORLD)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        shutil.rmtree(out, ignore_errors=True)


def report(args, rate: str, per_rank: list) -> list[dict]:
    rows = []
    for shape in args.shapes.split(","):
        res = [r["shapes"][shape] for r in per_rank]
        flat_step = None
        for m in MODES:
            if m not in res[0]:
                rows.append(dict(link=rate, shape=shape, mode=m, note="n/a: group-limited routing not available"))
                continue
            steps = [max(r[m]["step"][i] for r in res) for i in range(len(res[0][m]["step"]))]
            comms = [max(r[m]["comm"][i] for r in res) for i in range(len(res[0][m]["comm"]))]
            step = statistics.median(steps) * 1e3
            flat_step = step if m == "flat" else flat_step
            counted = sum(r[m]["counted"] for r in res)
            iface = sum(r[m]["iface"] for r in res)  # only one rank per namespace read it
            rows.append(dict(link=rate, shape=shape, mode=m, step_ms=step, vs_flat=step / flat_step,
                             comm_ms=statistics.median(comms) * 1e3, counted_mb=counted / 1e6,
                             iface_mb=iface / 1e6, iface_ratio=iface / counted if counted else None,
                             predicted_mb=predicted_bytes(args, shape, m) / 1e6,
                             bytes_vs_flat=counted / sum(r["flat"]["counted"] for r in res),
                             remote_rows=sum(r[m]["remote_rows"] for r in res) / sum(r[m]["sub_tokens"] for r in res)))
    return rows


def summarize(paths: list[str]) -> str:
    """Median [min-max] over saved runs of each (link, shape, mode) row, as a markdown table."""
    runs: dict[tuple, list[list[float]]] = {}
    for path in paths:
        for line in open(path):
            cells = line.split()
            if len(cells) >= 12 and cells[2] in MODES and cells[0] != "link":
                runs.setdefault(tuple(cells[:3]), []).append([float(c) for c in cells[3:12]])
    out = ["| link | shape | mode | step ms | x flat | comm ms | link MB | veth/link | formula MB | bytes x flat |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (link, shape, mode), rows in runs.items():
        col = list(zip(*rows))  # step, x flat, comm, link MB, veth MB, veth/link, formula, bytes x flat, rows

        def med(i, f):
            return format(statistics.median(col[i]), f)
        spread = f" [{min(col[1]):.2f}-{max(col[1]):.2f}]" if len(rows) > 1 else ""
        out.append(f"| {link} | {shape} | {mode} | {med(0, '.1f')} | {med(1, '.2f')}{spread} | {med(2, '.1f')} | "
                   f"{med(3, '.3f')} | {med(5, '.3f')} | {med(6, '.3f')} | {med(7, '.3f')} |")
    return "\n".join(out) + f"\n\nMedian over {len(paths)} run(s) [min-max of x flat over runs].\n"


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
    rows = []
    try:
        for rate in args.rates.split(","):
            rows += report(args, rate, run_link(args, rate))
    finally:
        teardown()
    print(f"EP={WORLD} as 2 namespaces x {PER_NODE} ranks, E={args.experts}, k={args.top_k}, d={args.hidden}, "
          f"MH-MoE h={args.heads}, expert width {args.ffn}, {args.tokens} tokens/rank, fp32, dropless, "
          f"chunks={args.chunks}, {args.reps} reps")
    print_table(rows, [("link", "link", "s"), ("shape", "shape", "s"), ("mode", "mode", "s"),
                       ("step_ms", "step ms", ".1f"), ("vs_flat", "x flat", ".2f"), ("comm_ms", "comm ms", ".1f"),
                       ("counted_mb", "link MB", ".3f"), ("iface_mb", "veth MB", ".3f"),
                       ("iface_ratio", "veth/link", ".3f"), ("predicted_mb", "formula MB", ".3f"),
                       ("bytes_vs_flat", "bytes x flat", ".3f"), ("remote_rows", "remote rows/sub-token", ".3f"),
                       ("note", "note", "s")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
