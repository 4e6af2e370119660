"""Shared-pool cost per step: vanilla vs UniPool (per-layer weight gradients) vs UniPool fused.

    python bench/pool_wgrad.py                     # GPU: 182m, 469m, 830m shapes, 16 x 1024 tokens, bf16 autocast
    python bench/pool_wgrad.py --scales 830m --batch 8 --checkpointing
    python bench/pool_wgrad.py --quick             # CPU: 2 layers (M = 16), vocab 4096, 2 x 256 tokens, fp32

One step = forward + backward of the whole model (no optimizer: it costs the same in all modes and
is in train_step.py). Columns: tokens/s, peak memory, and the pool's traffic floor:

    floor bytes = sum over pools of  2 * layers_per_pool * W_compute  +  W_param
    (every layer must read the expert weights once in forward and once for its input gradient;
     the weight gradient must be written once, in the parameter dtype)

W = M * 3 * d * f * bytes per element. floor time = floor bytes / B, with B this device's measured
copy bandwidth (read + write of a large tensor). "x floor" = step time / floor time: how far a step
is from the time the pool's weight traffic alone needs (the rest of the model is not in the floor).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import meta, print_table, resolve, summarize, time_fn, write_json  # noqa: E402
from train_step import MODES, add_model_args, bench_config, cpu_peak_rss, finish_args, run_case  # noqa: E402

SCALES = "182m,469m,830m"


def copy_bandwidth(device: torch.device) -> float:
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    t = time_fn(lambda: dst.copy_(src), device, 5, 2)
    return 2 * 4 * n / min(t)


def floor_bytes(cfg, compute_bytes: int) -> int:
    w = cfg.n_routed_experts * 3 * cfg.d_model * cfg.expert_hidden
    return cfg.n_pools * (2 * cfg.layers_per_pool * w * compute_bytes + w * 4)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, SCALES)
    args = p.parse_args(argv)
    finish_args(args, SCALES)
    device, dtype = resolve(args)
    if args.only:  # child process for the CPU memory figure
        from common import process_peak_rss
        scale, mode = args.only.split(":")
        run_case(scale, mode, args, device, dtype, optimizer=False)
        print("PEAK_RSS", process_peak_rss())
        return 0
    bandwidth = copy_bandwidth(device)
    compute_bytes = 2 if dtype == torch.bfloat16 else 4

    runs: dict[tuple[str, str], list[dict]] = {}
    for scale in args.scales:
        for _ in range(args.rounds):
            for mode in MODES:
                r = run_case(scale, mode, args, device, dtype, optimizer=False)
                runs.setdefault((scale, mode), []).append(r)
                print(f"{scale} {mode}: {r['tok_per_s']:.0f} tok/s", flush=True)
    rows = []
    for (scale, mode), rs in runs.items():
        times = [t for r in rs for t in r["times"]]
        row = {**rs[0], **summarize(times), "times": times,
               "peak_bytes": max((r["peak_bytes"] or 0) for r in rs) or None}
        row["tok_per_s"] = row["tokens"] / row["median_s"]
        cfg = bench_config(scale, mode, args.layers, args.vocab, args.seq)
        row["floor_gb"] = floor_bytes(cfg, compute_bytes) / 1e9
        row["floor_ms"] = floor_bytes(cfg, compute_bytes) / bandwidth * 1e3
        row["x_floor"] = row["median_s"] * 1e3 / row["floor_ms"]
        if device.type == "cpu" and not args.no_memory:
            row["peak_bytes"] = cpu_peak_rss(__file__, scale, mode, argv)
        row["peak_gb"] = row["peak_bytes"] / 1e9 if row["peak_bytes"] else None
        rows.append(row)
    for row in rows:
        same = {r["mode"]: r for r in rows if r["scale"] == row["scale"]}
        row["vs_vanilla"] = row["tok_per_s"] / same["vanilla"]["tok_per_s"]
        row["vs_naive"] = row["tok_per_s"] / same["unipool"]["tok_per_s"]

    print(f"\nStep fwd + bwd, {args.batch} x {args.seq} tokens, {dtype}{', compiled' if args.compile else ''}; "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print_table(rows, [("scale", "shape", "s"), ("mode", "mode", "s"), ("layers", "L", "d"), ("experts", "E/M", "d"),
                       ("median_s", "step s", ".3f"), ("tok_per_s", "tok/s", ".0f"), ("vs_vanilla", "vs vanilla", ".3f"),
                       ("vs_naive", "vs naive", ".3f"), ("peak_gb", "peak GB", ".2f"), ("floor_gb", "floor GB", ".2f"),
                       ("floor_ms", "floor ms", ".1f"), ("x_floor", "x floor", ".1f"), ("spread", "spread", ".2f")])
    write_json(args.json, "pool_wgrad", device,
               {"meta": {**meta(device, dtype, args), "copy_bandwidth": bandwidth,
                         "memory": "CUDA max allocated" if device.type == "cuda" else "peak RSS of a fresh process"},
                "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
