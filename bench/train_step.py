"""End-to-end training step (forward + backward + AdamW) of the paper presets, vanilla vs UniPool.

    python bench/train_step.py                          # GPU: 182m and 469m, bf16 autocast, 16 x 1024 tokens
    python bench/train_step.py --compile                # the same under torch.compile
    python bench/train_step.py --quick                  # CPU: 2 layers, vocab 4096, 2 x 256 tokens, fp32
    python bench/train_step.py --scales demo,cpu2 --batch 8 --seq 128   # CPU: the demo and the CPU study's model

Besides the paper's scales, `demo` is the `demo` / `demo-vanilla` preset pair (6 layers, d=128, M = 48) and
`cpu2` the model of experiments/cpu2.yaml (12 layers, d=64, M = 96 against 12 x 8).

Modes: vanilla (8 experts per layer, `vanilla-SCALE`), unipool (one pool of M = 8L, `unipool-SCALE`,
per-layer weight gradients) and unipool-fused (the same with `model.set_execution(fused_pool_wgrad=True)`).

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs per step
    6 * N_matmul * tokens + 12 * L * n_heads * head_dim * S * tokens   (PaLM, Chowdhery et al. 2022, App. B)
where N_matmul = active parameters (param_counts()["active"]: one expert per layer at top-1) minus the
input embedding (a lookup), and the attention term counts the full S x S score and value matmuls
(no causal halving). Peak: 989 TFLOP/s dense bf16 on H100/H200 SXM; on CPU, the measured fp32 GEMM
rate of this machine (`measure_cpu_peak`, at every run), so CPU MFU says how close the step gets to plain GEMMs here.
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    add_common_args,
    meta,
    peak_bytes,
    print_table,
    process_peak_rss,
    reset_peak,
    resolve,
    summarize,
    time_fn,
    write_json,
)

from unipool.model.model import build_model  # noqa: E402
from unipool.presets import get_preset  # noqa: E402

GPU_PEAK_BF16 = 989e12
MODES = ("vanilla", "unipool", "unipool-fused")


# The CPU study's model (experiments/cpu2.yaml): 12 layers at d=64, bpe:4096; vanilla 12 x 8, UniPool M = 96.
CPU2 = {"vocab_size": 4096, "d_model": 64, "n_layers": 12, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 256,
        "max_seq_len": 256, "rope_base": 1e4}


def named_config(scale: str, mode: str):
    if scale == "demo":
        return get_preset("demo-vanilla" if mode == "vanilla" else "demo")
    if scale == "cpu2":
        return (get_preset("demo-vanilla") if mode == "vanilla" else get_preset("demo")).replace(**CPU2, num_experts=(
            8 if mode == "vanilla" else 96))
    return get_preset(("vanilla-" if mode == "vanilla" else "unipool-") + scale)


def bench_config(scale: str, mode: str, layers: int | None, vocab: int | None, seq: int):
    """The preset for (scale, mode), optionally with fewer layers (M stays 8 L) or a smaller vocab."""
    cfg = named_config(scale, mode)
    changes = {"max_seq_len": max(seq, cfg.max_seq_len),
               "norm_router_c": "one"}  # c only rescales gates; skips a Monte Carlo estimate at build
    if layers:
        changes["n_layers"] = layers
        if mode != "vanilla":
            changes["num_experts"] = 8 * layers
    if vocab:
        changes["vocab_size"], changes["vocab_multiple"] = vocab, 64
    return cfg.replace(**changes)


def model_flops_per_step(model, tokens: int, seq: int) -> float:
    cfg = model.config
    n_matmul = model.param_counts()["active"] - model.tok_embeddings.weight.numel()
    return 6 * n_matmul * tokens + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq * tokens


def measure_cpu_peak() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    t = time_fn(lambda: a @ b, torch.device("cpu"), 3, 1)
    return 2 * 2048**3 / min(t)


def make_step(model, batch: int, seq: int, device, dtype, optimizer: bool, compile_model: bool | str):
    """One training step as a closure; `compile_model`: False, True (inductor) or a torch.compile backend."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda") if optimizer else None
    backend = compile_model if isinstance(compile_model, str) else "inductor"
    fwd = torch.compile(model, backend=backend) if compile_model else model
    autocast = dtype == torch.bfloat16

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out = fwd(ids, targets)
        out.total_loss.backward()
        model.update_routing_state(out)
        if opt is not None:
            opt.step()
        model.zero_grad(set_to_none=True)
    return step


def run_case(scale, mode, args, device, dtype, optimizer=True) -> dict:
    cfg = bench_config(scale, mode, args.layers, args.vocab, args.seq)
    torch.manual_seed(0)
    model = build_model(cfg, device)
    model.train()
    model.set_execution(fused_pool_wgrad=mode == "unipool-fused", activation_checkpointing=args.checkpointing)
    tokens = args.batch * args.seq
    flops = model_flops_per_step(model, tokens, args.seq)
    step = make_step(model, args.batch, args.seq, device, dtype, optimizer, args.compile)
    reset_peak(device)
    times = time_fn(step, device, args.repeats, args.warmup + (2 if args.compile else 0))
    s = summarize(times)
    row = {"scale": scale, "mode": mode, "layers": cfg.n_layers, "experts": cfg.num_experts,
           "tokens": tokens, "model_flops": flops, "times": times, **s, "tok_per_s": tokens / s["median_s"],
           "tflops": flops / s["median_s"] / 1e12, "peak_bytes": peak_bytes(device)}
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def cpu_peak_rss(script: str, scale: str, mode: str, argv: list[str]) -> int:
    """Peak RSS of a fresh process running two steps of one case (CPU has no allocator counter)."""
    # Enough steps that memory kept from one step to the next would show in the peak (it did: one bf16 copy
    # of the pool per step, before the fused gradient's fix).
    cmd = [sys.executable, script, *argv, "--only", f"{scale}:{mode}", "--repeats", "20", "--warmup", "1",
           "--json", "/dev/null", "--no-memory"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(next(line.split()[1] for line in out.splitlines() if line.startswith("PEAK_RSS")))


def add_model_args(p: argparse.ArgumentParser, default_scales: str) -> None:
    add_common_args(p)
    p.add_argument("--scales", default=None, help=f"comma list of paper scales (default {default_scales})")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 2 layers (M = 16), vocab 4096, 2 x 256 tokens")
    p.add_argument("--layers", type=int, default=None, help="override n_layers (UniPool keeps M = 8 L)")
    p.add_argument("--vocab", type=int, default=None, help="override vocab_size")
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default 16; --quick 2)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 1024; --quick 256)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing per block")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--rounds", type=int, default=2, help="passes over all modes (interleaved, for noise)")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-memory", action="store_true", help="skip the per-case CPU peak-RSS subprocesses")


def finish_args(args: argparse.Namespace, default_scales: str) -> None:
    if args.quick:
        args.layers = args.layers or 2
        args.vocab = args.vocab or 4096
    args.batch = args.batch or (2 if args.quick else 16)
    args.seq = args.seq or (256 if args.quick else 1024)
    args.scales = (args.scales or default_scales).split(",")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, "182m,469m")
    args = p.parse_args(argv)
    finish_args(args, "182m,469m")
    device, dtype = resolve(args)
    if args.only:  # child process for the CPU memory figure
        scale, mode = args.only.split(":")
        run_case(scale, mode, args, device, dtype)
        print("PEAK_RSS", process_peak_rss())
        return 0
    peak = GPU_PEAK_BF16 if device.type == "cuda" else measure_cpu_peak()

    results: dict[tuple[str, str], list[dict]] = {}
    for scale in args.scales:
        for _ in range(args.rounds):
            for mode in MODES:
                results.setdefault((scale, mode), []).append(run_case(scale, mode, args, device, dtype))
                r = results[(scale, mode)][-1]
                print(f"{scale} {mode}: {r['tok_per_s']:.0f} tok/s", flush=True)
    rows = []
    for (scale, mode), runs in results.items():
        times = [t for r in runs for t in r["times"]]
        row = {**runs[0], **summarize(times), "times": times,
               "peak_bytes": max((r["peak_bytes"] or 0) for r in runs) or None}
        row["tok_per_s"] = row["tokens"] / row["median_s"]
        row["tflops"] = row["model_flops"] / row["median_s"] / 1e12
        row["mfu"] = row["tflops"] * 1e12 / peak
        if device.type == "cpu" and not args.no_memory:
            row["peak_bytes"] = cpu_peak_rss(__file__, scale, mode, argv)
        row["peak_gb"] = row["peak_bytes"] / 1e9 if row["peak_bytes"] else None
        rows.append(row)
    for row in rows:
        base = next(r for r in rows if r["scale"] == row["scale"] and r["mode"] == "vanilla")
        row["vs_vanilla"] = row["tok_per_s"] / base["tok_per_s"]

    print(f"\nTraining step (fwd + bwd + AdamW), {args.batch} x {args.seq} tokens, {dtype}"
          f"{', compiled' if args.compile else ''}; peak for MFU {peak / 1e12:.3g} TFLOP/s")
    print_table(rows, [("scale", "scale", "s"), ("mode", "mode", "s"), ("layers", "L", "d"), ("experts", "E/M", "d"),
                       ("tok_per_s", "tok/s", ".0f"), ("vs_vanilla", "vs vanilla", ".3f"), ("mfu", "MFU", ".3f"),
                       ("peak_gb", "peak GB", ".2f"), ("spread", "spread", ".2f")])
    write_json(args.json, "train_step" + ("_compiled" if args.compile else ""), device,
               {"meta": {**meta(device, dtype, args), "peak_flops": peak,
                         "memory": "CUDA max allocated" if device.type == "cuda" else "peak RSS of a fresh process"},
                "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
