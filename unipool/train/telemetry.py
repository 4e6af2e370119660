"""What training measures about routing, per step and per log interval, on the device until it is logged.

`RoutingTally` is the loop's one piece of routing bookkeeping: the experts each layer routed to (for the
routing statistics of a log record and for the sigmoid routers' bias updates, once per optimizer step),
and the tokens whose picked gates were all exactly zero (`dead_rows`). Nothing is read from the device
before a log step.
"""

from __future__ import annotations

import torch

from unipool.analysis.routing import load_stats
from unipool.errors import UnipoolError
from unipool.model.model import ModelOutput
from unipool.train import distributed as dist


class RouterScaleError(UnipoolError, RuntimeError):
    """A NormRouter's sigma crossed zero: its gates and the balance loss have turned negative."""


def router_telemetry(model, dead_L: torch.Tensor, tokens: int) -> dict:
    """Per layer since the last log: the share of tokens whose picked gates were all exactly zero
    (`dead_rows`; accumulated on the device per micro-batch, read here once) and NormRouter sigma
    (`router_scale`, absent without NormRouters). Collective under DDP/FSDP: every rank calls it."""
    sums = dist.all_reduce_sum(torch.cat([dead_L, dead_L.new_tensor([float(tokens)])]))
    record = {"dead_rows": [round(v, 5) for v in (sums[:-1] / sums[-1].clamp_min(1)).tolist()]}
    scales = model.router_scales()
    if scales is not None:  # FSDP2 shards them: gather each (a collective)
        record["router_scale"] = [round(float(s.full_tensor() if hasattr(s, "full_tensor") else s), 6)
                                  for s in scales]
    return record


def check_router_scales(record: dict) -> None:
    """Refuse to go on once a NormRouter's sigma is <= 0 (possible with the paper's linear sigma)."""
    bad = [f"layer {i} (sigma {s:.4g})" for i, s in enumerate(record.get("router_scale", [])) if not s > 0]
    if bad:
        raise RouterScaleError(f"step {record['step']}: NormRouter sigma crossed zero in {', '.join(bad)}; "
                               "stopping (model.norm_router_scale=softplus or exp keeps it positive)")


class RoutingTally:
    """Routing counts of the current optimizer step and of the current log interval, and dead rows."""

    def __init__(self, n_layers: int, n_experts: int, layers_per_pool: int, device: torch.device):
        self.layers_per_pool = layers_per_pool
        self.interval_LE = torch.zeros(n_layers, n_experts, device=device)  # since the last routing record
        self.step_LE = torch.zeros_like(self.interval_LE)  # this optimizer step's micro-batches
        self.dead_L = torch.zeros(n_layers, device=device)
        self.tokens = 0  # tokens behind dead_L

    def start_step(self) -> None:
        self.step_LE.zero_()

    def add(self, out: ModelOutput, tokens: int) -> None:
        """One micro-batch's routing (stays on the device)."""
        self.step_LE += torch.stack([r.counts_E for r in out.routing])
        self.dead_L += torch.stack([r.dead_rows for r in out.routing])
        self.tokens += tokens

    def end_step(self, model) -> None:
        """Once per optimizer step: sigmoid routers' aux-loss-free biases move from the step's counts,
        summed over its micro-batches and all-reduced over ranks (the official code's cadence)."""
        self.interval_LE += self.step_LE
        if model.has_router_biases:
            model.update_router_biases(dist.all_reduce_sum(self.step_LE.clone()))

    def record(self, model, with_routing: bool) -> dict:
        """The log record's routing fields (collective under DDP/FSDP); starts the next interval."""
        record = {}
        if with_routing:
            record["routing"] = load_stats(dist.all_reduce_sum(self.interval_LE.clone()), self.layers_per_pool)
            self.interval_LE.zero_()
        record.update(router_telemetry(model, self.dead_L, self.tokens))
        self.dead_L.zero_()
        self.tokens = 0
        return record

    def reset(self) -> None:
        """After a rollback: what was counted since the checkpoint is replayed."""
        self.interval_LE.zero_()
        self.dead_L.zero_()
        self.tokens = 0
