"""What skipping dead rows saves: forward + backward of one MoE layer, zero-gate rows skipped vs computed.

    python bench/dead_rows.py                       # GPU: 182M shapes, 16384 tokens, bf16
    python bench/dead_rows.py --quick               # CPU: the CPU study's layer and a cut 182M one

A dead row is a routed (token, expert) pair whose gate is exactly zero: a NormRouter row whose
scores the ReLU zeroed. Its top-k pick is a tie, which torch.topk resolves to expert 0, so here dead
tokens pick expert 0 with gate 0 and the live ones pick uniformly with gates in (0, 1), as in a
trained UniPool model. "computed" runs them through expert 0's FFN like any row
(`moe_dispatch(..., skip_dead_rows=False)`, what unipool did before); "skipped" sorts them into a
trailing segment no grouped GEMM covers (the default). Dead shares: 0% (the skip's overhead) and
55% (the CPU study's UniPool with the pool loss, docs/results.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, meta, print_table, resolve, summarize, time_fn, write_json  # noqa: E402

from unipool.model.moe import moe_dispatch  # noqa: E402

# (d_model, expert hidden, experts in the pool, top-k, label)
SHAPES = [(128, 512, 96, 1, "CPU study: d=128, M=96"), (768, 3072, 96, 1, "182m pool M=8L"),
          (768, 3072, 192, 2, "182m pool 16E top-2")]
QUICK = [(128, 512, 96, 1, "CPU study: d=128, M=96"), (768, 3072, 24, 1, "182m-shape pool M=24")]


def make_case(tokens: int, d: int, f: int, e: int, k: int, dead: float, device, dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=gen).to(device, dtype).requires_grad_()
    ids = torch.rand(tokens, e, generator=gen).topk(k, dim=-1).indices
    gates = torch.rand(tokens, k, generator=gen) * 0.5 + 0.05
    dead_T = torch.rand(tokens, generator=gen) < dead
    ids[dead_T] = torch.arange(k)  # the tie of an all-zero row: the first k experts
    gates[dead_T] = 0.0
    w13 = (torch.randn(e, 2 * f, d, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    w2 = (torch.randn(e, d, f, generator=gen) * 0.02).to(device, dtype).requires_grad_()
    cot = torch.randn(tokens, d, generator=gen).to(device, dtype)
    return x, ids.to(device), gates.to(device, dtype).requires_grad_(), w13, w2, cot, float(dead_T.float().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--quick", action="store_true", help="CPU-sized shapes")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default: 16384 GPU, 4096 CPU)")
    p.add_argument("--dead", default="0,0.55", help="dead-token shares to measure (comma-separated)")
    args = p.parse_args()
    device, dtype = resolve(args)
    tokens = args.tokens or (16384 if device.type == "cuda" else 4096)
    shapes = QUICK if args.quick else SHAPES
    rows = []
    for d, f, e, k, label in shapes:
        for dead in (float(s) for s in args.dead.split(",")):
            x, ids, gates, w13, w2, cot, share = make_case(tokens, d, f, e, k, dead, device, dtype)
            def step(skip: bool):
                y = moe_dispatch(x, ids, gates, w13, w2, skip_dead_rows=skip)
                torch.autograd.grad((y * cot).sum(), [x, gates, w13, w2])
            # Interleaved rounds, so that a shared machine's load changes hit both sides alike.
            times = {False: [], True: []}
            for _ in range(args.repeats):
                for skip in (False, True):
                    times[skip] += time_fn(lambda: step(skip), device, 1, args.warmup)
            medians = {skip: summarize(t) for skip, t in times.items()}
            rows.append({"shape": label, "d": d, "f": f, "experts": e, "top_k": k, "tokens": tokens,
                         "dead_share": share, "computed_ms": 1e3 * medians[False]["median_s"],
                         "skipped_ms": 1e3 * medians[True]["median_s"],
                         "speedup": medians[False]["median_s"] / medians[True]["median_s"],
                         "spread_computed": medians[False]["spread"], "spread_skipped": medians[True]["spread"]})
            r = rows[-1]
            print(f"{label}, dead {100 * share:.0f}%: computed {r['computed_ms']:.1f} ms, "
                  f"skipped {r['skipped_ms']:.1f} ms ({r['speedup']:.2f}x)", flush=True)
    print()
    print_table(rows, [("shape", "shape", "s"), ("tokens", "tokens", "d"), ("dead_share", "dead", ".0%"),
                       ("computed_ms", "computed ms", ".1f"), ("skipped_ms", "skipped ms", ".1f"),
                       ("speedup", "speedup", ".2f")])
    write_json(args.json, "dead_rows", device, {"meta": meta(device, dtype, args), "rows": rows})


if __name__ == "__main__":
    main()
