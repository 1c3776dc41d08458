"""ParallelContext: the one object that owns parallel sizes, ranks and process groups.

Layers receive it explicitly; nothing in the project keeps process groups in module globals.
It also answers the `mpu` questions DeepSpeed asks (get_data_parallel_group, ...).
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

from megatron_mhmoe.parallel import layout as L


@dataclass
class ParallelContext:
    """Sizes, ranks and process groups of one rank. Groups are None when their size is 1."""

    coords: L.RankLayout
    sequence_parallel: bool = False
    """Shard norms/dropout/residual activations along the sequence over the TP group (Megatron SP)."""
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    ep_group: Optional[dist.ProcessGroup] = None
    edp_group: Optional[dist.ProcessGroup] = None
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    ep_ranks: list[int] = field(default_factory=lambda: [0])
    edp_ranks: list[int] = field(default_factory=lambda: [0])
    _singleton_groups: dict = field(default_factory=dict, repr=False)
    _node_groups: dict = field(default_factory=dict, repr=False)
    _rail_groups: dict = field(default_factory=dict, repr=False)

    # ---------------------------------------------------------------- construction
    @classmethod
    def single_process(cls) -> "ParallelContext":
        """The plain single-device model: every size 1, no process groups."""
        return cls(coords=L.RankLayout(rank=0, world_size=1, tp_size=1, ep_size=1))

    @classmethod
    def from_world(cls, tp_size: int = 1, ep_size: int = 1, sequence_parallel: bool = False,
                   timeout_s: Optional[float] = None) -> "ParallelContext":
        """Build all groups over the already-initialised default process group.

        Every rank must call this with the same arguments: `new_group` is collective.
        """
        if not dist.is_available() or not dist.is_initialized():
            if tp_size == 1 and ep_size == 1:
                ctx = cls.single_process()
                ctx.sequence_parallel = False
                return ctx
            raise ValueError(
                f"tp_size={tp_size}, ep_size={ep_size} need torch.distributed: initialise it first, in every "
                f"process of a deepspeed/torchrun launch, with megatron_mhmoe.parallel.devices.init_process_group "
                f"(the process group) or megatron_mhmoe.runtime.engine.init_distributed (it and DeepSpeed)")
        world, rank = dist.get_world_size(), dist.get_rank()
        L.validate_sizes(world, tp_size, ep_size)
        if sequence_parallel and tp_size == 1:
            sequence_parallel = False  # nothing to shard over; same maths
        kwargs = {}
        if timeout_s is not None:
            kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)

        def build(groups: list[list[int]]):
            # new_group is collective over the whole world: every rank creates every group, in order.
            mine, mine_ranks = None, None
            for ranks in groups:
                g = dist.new_group(ranks=ranks, **kwargs) if len(ranks) > 1 else None
                if rank in ranks:
                    mine, mine_ranks = g, ranks
            return mine, mine_ranks

        tp_group, tp_ranks = build(L.tp_groups(world, tp_size))
        dp_group, dp_ranks = build(L.dp_groups(world, tp_size))
        ep_group, ep_ranks = build(L.ep_groups(world, ep_size))
        edp_group, edp_ranks = build(L.edp_groups(world, ep_size))
        return cls(coords=L.RankLayout(rank, world, tp_size, ep_size), sequence_parallel=sequence_parallel,
                   tp_group=tp_group, dp_group=dp_group, ep_group=ep_group, edp_group=edp_group,
                   tp_ranks=tp_ranks, dp_ranks=dp_ranks, ep_ranks=ep_ranks, edp_ranks=edp_ranks)

    # ---------------------------------------------------------------- sizes and ranks
    @property
    def rank(self) -> int:
        return self.coords.rank

    @property
    def world_size(self) -> int:
        return self.coords.world_size

    @property
    def tp_size(self) -> int:
        return self.coords.tp_size

    @property
    def tp_rank(self) -> int:
        return self.coords.tp_rank

    @property
    def dp_size(self) -> int:
        return self.coords.dp_size

    @property
    def dp_rank(self) -> int:
        return self.coords.dp_rank

    @property
    def ep_size(self) -> int:
        return self.coords.ep_size

    @property
    def ep_rank(self) -> int:
        return self.coords.ep_rank

    @property
    def edp_size(self) -> int:
        return self.coords.edp_size

    @property
    def edp_rank(self) -> int:
        return self.coords.edp_rank

    @property
    def ep_group_name(self) -> str:
        """The name DeepSpeed uses for this EP size's groups (deepspeed.utils.groups keys)."""
        return f"ep_size_{self.ep_size}"

    def ep_node_group(self, per_node: int):
        """The group of this rank's EP ranks on its node (EP ranks p with the same p // per_node): the
        two-level all-to-all's intra-node exchanges (moe/two_level.py). None when per_node is 1.

        Created on first use, for every EP group's nodes at once: new_group is collective over the world,
        so every rank must ask (building the same layers in the same order does)."""
        if per_node not in self._node_groups:
            mine = None
            if per_node > 1:
                for ranks in L.ep_groups(self.world_size, self.ep_size):
                    for i in range(0, len(ranks), per_node):
                        g = dist.new_group(ranks=ranks[i:i + per_node])
                        if self.rank in ranks[i:i + per_node]:
                            mine = g
            self._node_groups[per_node] = mine
        return self._node_groups[per_node]

    def ep_rail_group(self, per_node: int):
        """The group of the EP ranks with this rank's local index on every node (EP ranks p with the same
        p % per_node): rail l of a rail-optimised cluster, the two-level all-to-all's inter-node exchange
        (moe/two_level.py). Group rank = node. Created like ep_node_group (collective, on first use)."""
        if per_node not in self._rail_groups:
            mine = None
            for ranks in L.ep_groups(self.world_size, self.ep_size):
                for local in range(per_node):
                    rail = ranks[local::per_node]
                    g = dist.new_group(ranks=rail) if len(rail) > 1 else None
                    if self.rank in rail:
                        mine = g
            self._rail_groups[per_node] = mine
        return self._rail_groups[per_node]

    def describe(self) -> str:
        sp = "on" if self.sequence_parallel else "off"
        return L.describe(self.world_size, self.tp_size, self.ep_size) + f"\n  sequence parallel: {sp}"

    # ---------------------------------------------------------------- DeepSpeed mpu interface
    # DeepSpeed calls these when the context is passed as `mpu`. "Model parallel" is TP here
    # (pipeline parallelism is out of scope), so the names map onto TP and DP.
    def get_model_parallel_rank(self) -> int:
        return self.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.tp_size

    def get_model_parallel_group(self):
        return self.tp_group if self.tp_group is not None else _self_group(self)

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.tp_ranks[0]

    def get_data_parallel_rank(self) -> int:
        return self.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.dp_size

    def get_data_parallel_group(self):
        return self.dp_group if self.dp_group is not None else _self_group(self)

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.dp_ranks)

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_group(self):
        return _self_group(self)

    def self_group(self):
        """A one-rank process group holding only this rank (DeepSpeed wants a group for size-1 dimensions)."""
        return _self_group(self)

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


def _self_group(ctx: ParallelContext):
    """A one-rank group for DeepSpeed's questions about a size-1 dimension.

    Size-1 groups are not created up front (new_group is collective and most are never asked for).
    DeepSpeed asks on all ranks in the same order during initialize, so creating them then is safe.
    """
    if not dist.is_initialized():
        return None
    if not ctx._singleton_groups:
        for r in range(dist.get_world_size()):
            ctx._singleton_groups[r] = dist.new_group(ranks=[r])
    return ctx._singleton_groups[ctx.rank]
