"""Run training steps in a fresh process and report what stays alive between them (tests/test_memory.py).

    python tests/memory_probe.py MODE FUSED DTYPE [--checkpointing] [--compile] [--fsdp] [--steps N] --out DIR

Writes DIR/rank<R>.json per rank: the live tensor count (`gc`) and the resident set size after freed heap
is handed back to the OS (`malloc_trim`) every 10 steps (every 5 from step 20), and the bytes of one copy of the
experts in bf16 (the size of what the leak kept per step). Under `--fsdp` or `--ddp`, start it with torchrun.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
from pathlib import Path

import torch

from unipool.model.model import build_model
from unipool.presets import get_preset
from unipool.train import distributed as ud

# Experts large against everything else (6.3M expert parameters, 64 tokens a step), so that one copy of
# them per step stands far above allocator noise.
SHAPES = {
    "pool": {"moe_mode": "pool", "num_experts": 128, "router": "norm", "switch_loss_coef": 0.0,
             "pool_loss_coef": 0.01},
    "layerwise": {"moe_mode": "layerwise", "num_experts": 32, "router": "softmax", "switch_loss_coef": 0.01,
                  "pool_loss_coef": 0.0},
}


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def rss_mb() -> float:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=list(SHAPES))
    p.add_argument("fused", choices=["fused", "plain"])
    p.add_argument("dtype", choices=["fp32", "bf16"])
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, required=True, help="a directory: each rank writes rank<R>.json there")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.fsdp or args.ddp:
        torch.distributed.init_process_group("gloo")
    torch.manual_seed(0)
    cfg = get_preset("debug").replace(n_layers=4, d_model=64, ffn_hidden=256, vocab_size=512,
                                      norm_router_c="one", **SHAPES[args.mode])
    model = build_model(cfg)
    model.set_execution(fused_pool_wgrad=args.fused == "fused", activation_checkpointing=args.checkpointing)
    model.train()
    wrapped = model
    if args.fsdp or args.ddp:
        wrapped = ud.wrap(model, "fsdp" if args.fsdp else "ddp", torch.device("cpu"))
    step_fn = torch.compile(wrapped) if args.compile else wrapped
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    # Under FSDP2 what a leak would keep are the gathered (whole) weights: the same size on every rank.
    record = {"pool_copy_bf16_mb": sum(p.numel() for p in model.experts.parameters()) * 2 / 2**20}
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            out = step_fn(ids, ids)
        (out.loss + out.aux_loss).backward()
        model.update_routing_state(out)
        del out
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            record[f"tensors_{step}"] = live_tensors()
        if step % 10 == 0 or (step >= 20 and step % 5 == 0):
            record[f"rss_mb_{step}"] = round(rss_mb(), 2)
    # a file per rank: two ranks' lines on one shared stdout can interleave mid-line
    (args.out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(record))
    if args.fsdp or args.ddp:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
