"""Forward + backward of one MoE FFN layer: ours vs the per-expert loop vs HF blocks vs the dense limit.

    python bench/moe_layer.py                      # GPU: every shape, 16384 tokens, bf16
    python bench/moe_layer.py --quick              # CPU: a shape subset, 512 tokens
    python bench/moe_layer.py --shapes anchor --tokens 4096

Every variant gets the same tokens, shape and top-k; all but "dense" include their router (a
d x E linear + softmax + top-k). FLOPs = 3 x forward, forward = 3 matmuls of 2*d*f per routed
token (router FLOPs not counted), so TFLOP/s of all variants are comparable.
- dense: three plain GEMMs over tokens*k rows (gate and up as one) with exactly the routed FLOPs:
  the ceiling a routed FFN can approach.
- ours: router + unipool.moe.moe_dispatch (sort + grouped GEMMs).
- loop: router + unipool.moe.moe_reference (a Python loop over experts).
- hf-mixtral / hf-olmoe / hf-qwen3: the transformers sparse-MoE blocks built from tiny configs with
  the model default experts implementation ("grouped_mm"; `--hf-impl eager` for the loop).
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, meta, peak_bytes, print_table, reset_peak, resolve, summarize, time_fn, write_json  # noqa: E402

from unipool.model.moe import moe_dispatch, moe_reference  # noqa: E402

# (d_model, d_ff per expert, experts seen by the layer, top-k, label)
SHAPES = {
    "anchor": [(768, 2048, 8, 2, "anchor"), (1024, 512, 64, 8, "anchor"), (2048, 1024, 64, 8, "anchor")],
    "paper": [(768, 3072, 8, 1, "182m vanilla"), (768, 3072, 64, 1, "182m pool M=64"),
              (768, 3072, 96, 1, "182m pool M=8L"), (1024, 4096, 8, 1, "469m vanilla"),
              (1024, 4096, 192, 1, "469m pool M=8L"), (1024, 4096, 384, 1, "830m pool M=8L"),
              (1536, 6144, 8, 1, "978m vanilla"), (1536, 6144, 192, 1, "978m pool M=8L"),
              (768, 768, 384, 4, "182m g=4"), (1024, 1024, 768, 4, "469m g=4"), (768, 384, 768, 8, "182m g=8")],
}
# CPU subset: every kind of shape; pools cut to M = 24 (8 x 3 layers) so the weights of six
# variants fit a shared 24 GB machine in fp32 (the full-pool shapes need a GPU).
QUICK = [(768, 2048, 8, 2, "anchor"), (1024, 512, 64, 8, "anchor"), (768, 3072, 8, 1, "182m vanilla"),
         (768, 3072, 24, 1, "182m-shape pool M=24"), (768, 768, 96, 4, "182m-shape g=4, M=24"),
         (768, 384, 192, 8, "182m-shape g=8, M=24")]
VARIANTS = ["dense", "ours", "loop", "hf-mixtral", "hf-olmoe", "hf-qwen3"]


def make_router(d: int, e: int, k: int, device, dtype):
    gate = torch.nn.Linear(d, e, bias=False, device=device, dtype=dtype)
    torch.nn.init.normal_(gate.weight, std=0.02)

    def route(x):
        probs = torch.softmax(gate(x).float(), dim=-1)
        w, ids = probs.topk(k, dim=-1)
        return ids, w.to(x.dtype)
    return route, [gate.weight]


def make_hf_block(name: str, d: int, f: int, e: int, k: int, impl: str):
    if name == "hf-mixtral":
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        cfg = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e, num_experts_per_tok=k)
    elif name == "hf-olmoe":
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as Block
        cfg = OlmoeConfig(hidden_size=d, intermediate_size=f, num_experts=e, num_experts_per_tok=k)
    else:
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as Block
        cfg = Qwen3MoeConfig(hidden_size=d, moe_intermediate_size=f, num_experts=e, num_experts_per_tok=k)
    # What a model built by from_config/from_pretrained uses; blocks built directly would get None.
    cfg._experts_implementation = impl
    return Block(cfg)


def build(variant: str, d: int, f: int, e: int, k: int, tokens: int, device, dtype, hf_impl: str):
    """Returns a closure running one forward + backward. Every tensor is drawn on `device`: drawing the
    largest pools on one CPU core (~20G random values) would take minutes before a GPU run starts."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(dtype)

    def w(*shape, std=0.02):
        return randn(*shape, std=std).requires_grad_()

    x, cot = w(tokens, d, std=0.5), randn(tokens, d, std=1.0)  # a real cotangent (not expanded)
    if variant == "dense":
        xn, cot = w(tokens * k, d, std=0.5), randn(tokens * k, d, std=1.0)
        w13, w2 = w(2 * f, d), w(d, f)

        def step():
            gate, up = F.linear(xn, w13).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, w2)
            torch.autograd.backward(y, cot)
        return step
    if variant in ("ours", "loop"):
        route, _ = make_router(d, e, k, device, dtype)
        w13, w2 = w(e, 2 * f, d), w(e, d, f)
        fn = moe_dispatch if variant == "ours" else moe_reference

        def step():
            ids, gates = route(x)
            torch.autograd.backward(fn(x, ids, gates, w13, w2), cot)
        return step
    with torch.device(device):  # parameters allocated on the device (uninitialised), filled there below
        block = make_hf_block(variant, d, f, e, k, hf_impl)
    block = block.to(dtype)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02, generator=gen)
    x3, cot3 = x.view(1, tokens, d), cot.view(1, tokens, d)

    def step():
        torch.autograd.backward(block(x3), cot3)
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer call (default 16384; --quick 512)")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: a shape subset and 512 tokens")
    p.add_argument("--shapes", default=None, help="comma list of: anchor, paper (default both; --quick: a subset)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma list of " + ", ".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=2, help="passes over all variants (interleaved, for noise)")
    p.add_argument("--hf-impl", default="grouped_mm", help="HF experts implementation (never batched_mm on CPU)")
    args = p.parse_args(argv)
    device, dtype = resolve(args)
    tokens = args.tokens or (512 if args.quick else 16384)
    if args.shapes:
        shapes = [s for name in args.shapes.split(",") for s in SHAPES[name]]
    else:
        shapes = QUICK if args.quick else SHAPES["anchor"] + SHAPES["paper"]
    variants = args.variants.split(",")

    rows = []
    for d, f, e, k, label in shapes:
        flops = 3 * 3 * 2 * d * f * tokens * k
        times: dict[str, list[float]] = {v: [] for v in variants}
        peaks: dict[str, int | None] = {}
        for _ in range(args.rounds):
            for v in variants:
                step = build(v, d, f, e, k, tokens, device, dtype, args.hf_impl)
                reset_peak(device)
                times[v] += time_fn(step, device, args.repeats, args.warmup)
                peaks[v] = peak_bytes(device)
                del step
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        row = {"d": d, "f": f, "E": e, "k": k, "label": label, "tokens": tokens, "flops": flops}
        for v in variants:
            s = summarize(times[v])
            row[v] = {**s, "tflops": flops / s["median_s"] / 1e12, "peak_bytes": peaks[v]}
            row[f"{v}_tf"] = row[v]["tflops"]
        hf = [v for v in variants if v.startswith("hf-")]
        if "ours" in variants:
            if "dense" in variants:
                row["ours_vs_dense"] = row["ours_tf"] / row["dense_tf"]
            if "loop" in variants:
                row["ours_vs_loop"] = row["ours_tf"] / row["loop_tf"]
            if hf:
                row["best_hf"] = max(hf, key=lambda v: row[f"{v}_tf"])
                row["ours_vs_best_hf"] = row["ours_tf"] / row[f"{row['best_hf']}_tf"]
            row["ours_spread"] = row["ours"]["spread"]
        rows.append(row)
        print(f"done d={d} f={f} E={e} k={k}: " + ", ".join(f"{v} {row[v + '_tf']:.4f}" for v in variants), flush=True)
        write_json(args.json, "moe_layer", device, {"meta": meta(device, dtype, args), "rows": rows}, quiet=True)

    print(f"\nMoE layer fwd+bwd, {tokens} tokens, {dtype}, TFLOP/s (median of {args.rounds} x {args.repeats})")
    cols = [("label", "shape", "s"), ("d", "d", "d"), ("f", "f", "d"), ("E", "E", "d"), ("k", "k", "d")]
    cols += [(f"{v}_tf", v, ".3f") for v in variants]
    cols += [("ours_vs_dense", "ours/dense", ".2f"), ("ours_vs_loop", "ours/loop", ".2f"),
             ("ours_vs_best_hf", "ours/bestHF", ".2f"), ("ours_spread", "ours spread", ".2f")]
    print_table(rows, cols)
    write_json(args.json, "moe_layer", device, {"meta": meta(device, dtype, args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
