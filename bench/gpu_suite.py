"""The whole GPU check in one command: environment, correctness on CUDA, speed side by side, a real run.

On the lent GPU machine (torch preinstalled, unipool on PYTHONPATH; recipe in docs/benchmarks.md):
    python3 bench/gpu_suite.py --out $OUT --budget-s 480
On a CPU, the same sections on tiny shapes, in about a minute (tests/test_gpu_suite.py runs it in CI):
    python bench/gpu_suite.py --cpu-smoke --out /tmp/suite

Writes OUT/results.json (every figure, every skip with its reason, every failure with its message),
OUT/results.md (the tables, each target stated beside its number) and OUT/curves.png. Sections run in
order of priority, each within what is left of --budget-s; results are written after every section,
so a run cut short still leaves everything measured so far. A failing case is recorded, not fatal.

Ratios use this machine's own limits, measured first: the bf16 dense GEMM rate (TFLOP/s of a large
square matmul) and the copy bandwidth (read + write of a large tensor). MFU = model FLOPs per second /
the measured GEMM rate (and, for comparison with published figures, / 989 TFLOP/s, the H100/H200 SXM
dense bf16 spec); model FLOPs as in bench/train_step.py (6 N_active T + attention, PaLM App. B).

The arithmetic-intensity argument the micro-batch sweep tests: with L layers sharing a pool of M experts,
each UniPool layer sends its T*k routed rows over M experts (T*k/M rows per expert), a vanilla layer over
E private experts (T*k/E). At M/E = 12 (182M) a UniPool expert GEMM has 12x fewer rows for the same
weight bytes, so its FLOPs per weight byte are 12x lower: forward, input-gradient and weight-gradient
GEMMs all move toward the bandwidth limit, and the fused weight gradient restores only the last.
Growing the micro-batch raises rows per expert until the GEMMs are compute-bound again; the sweep finds
the micro-batch at which the fused UniPool step comes within 3% of vanilla.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import summarize, time_fn  # noqa: E402

from unipool.model.model import build_model  # noqa: E402
from unipool.model.moe import moe_dispatch, moe_reference  # noqa: E402
from unipool.model.router import Router  # noqa: E402
from unipool.presets import get_preset  # noqa: E402

SPEC_PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16, for comparison with published MFU figures


# ---- the suite: a deadline, sections, incremental results ------------------------------------------

class Suite:
    def __init__(self, out: Path, work: Path, budget_s: float, smoke: bool, device: torch.device):
        self.out, self.work, self.smoke, self.device = out, work, smoke, device
        self.t0, self.budget_s = time.time(), budget_s
        self.results: dict = {"mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget_s, "sections": {}}

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def fits(self, estimate_s: float) -> bool:
        return self.remaining() >= estimate_s

    @contextlib.contextmanager
    def section(self, name: str, estimate_s: float):
        """Run the block if `estimate_s` still fits the budget; record ok / failed / skipped."""
        record: dict = {"estimate_s": estimate_s}
        self.results["sections"][name] = record
        if not self.fits(estimate_s):
            record.update(status="skipped", reason=f"budget: {self.remaining():.0f} s left, needs ~{estimate_s:.0f} s")
            print(f"[{name}] skipped ({record['reason']})", flush=True)
            yield None
            return
        t = time.time()
        print(f"[{name}] ... ({self.remaining():.0f} s left)", flush=True)
        try:
            yield record
            record["status"] = record.get("status", "ok")
        except Exception as e:  # noqa: BLE001 -- one broken case must not cost the rest of the GPU time
            record.update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                          traceback=traceback.format_exc()[-3000:])
            print(f"[{name}] FAILED: {record['error']}", flush=True)
        finally:
            record["seconds"] = round(time.time() - t, 1)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            gc.collect()
            self.write()

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(self.results))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int, warmup: int) -> dict:
    return summarize(time_fn(fn, device, repeats, warmup))


def peak_bytes(device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# ---- 1. environment ------------------------------------------------------------------------------

def environment(suite: Suite, rec: dict) -> None:
    dev = suite.device
    rec["torch"], rec["cuda"] = torch.__version__, torch.version.cuda
    rec["python"], rec["machine"] = platform.python_version(), platform.machine()
    try:
        import transformers
        rec["transformers"] = transformers.__version__
    except ImportError:
        rec["transformers"] = None
    if dev.type == "cuda":
        rec["gpu"] = torch.cuda.get_device_name(dev)
        rec["capability"] = list(torch.cuda.get_device_capability(dev))
        rec["memory_gb"] = round(torch.cuda.get_device_properties(dev).total_memory / 1e9, 1)
        torch.backends.cuda.matmul.allow_tf32 = True
    n = 512 if suite.smoke else 8192
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    s = timed(lambda: a @ b, dev, 5 if suite.smoke else 20, 2 if suite.smoke else 5)
    rec["gemm_dtype"], rec["gemm_n"] = str(dtype).removeprefix("torch."), n
    rec["gemm_tflops"] = 2 * n**3 / s["min_s"] / 1e12
    m = (1 << 22) if suite.smoke else (1 << 28)
    src, dst = torch.empty(m, device=dev), torch.empty(m, device=dev)
    s = timed(lambda: dst.copy_(src), dev, 5, 2)
    rec["copy_gbps"] = 2 * 4 * m / s["min_s"] / 1e9
    suite.results["peak_flops"] = rec["gemm_tflops"] * 1e12
    print(f"  GEMM {rec['gemm_tflops']:.1f} TFLOP/s ({rec['gemm_dtype']}), copy {rec['copy_gbps']:.0f} GB/s", flush=True)


# ---- 2. correctness on the device ------------------------------------------------------------------

def dispatch_vs_reference(suite: Suite, rec: dict) -> None:
    """Grouped-GEMM dispatch vs the per-expert loop: output, input and weight gradients."""
    dev = suite.device
    shapes = [(64, 128, 8, 2), (64, 64, 16, 1)] if suite.smoke else [(768, 3072, 8, 1), (768, 768, 96, 4),
                                                                      (1024, 512, 64, 8)]
    tokens = 256 if suite.smoke else 4096
    dtypes = [torch.float32] + ([torch.bfloat16] if dev.type == "cuda" or suite.smoke else [])
    # fp32 without TF32, so the two paths do the same arithmetic; bf16 compared by relative error.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    cases = []
    try:
        for (d, f, e, k) in shapes:
            for dtype in dtypes:
                case = {"shape": [d, f, e, k], "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                        "tolerance": tol[dtype]}
                cases.append(case)
                try:
                    case.update(_compare_dispatch(d, f, e, k, dtype, tokens, dev, tol[dtype]))
                except Exception as exc:  # noqa: BLE001 -- e.g. a dtype the device's grouped_mm lacks
                    case.update(ok=False, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    rec["cases"] = cases
    rec["ok"] = all(c["ok"] for c in cases)


def _compare_dispatch(d, f, e, k, dtype, tokens, dev, tol) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, d, generator=gen).to(dev, dtype)
    w13 = (torch.randn(e, 2 * f, d, generator=gen) * 0.02).to(dev, dtype)
    w2 = (torch.randn(e, d, f, generator=gen) * 0.02).to(dev, dtype)
    ids = torch.randint(0, e, (tokens, k), generator=gen).to(dev)
    gates = torch.rand(tokens, k, generator=gen).to(dev, dtype)
    cot = torch.randn(tokens, d, generator=gen).to(dev, dtype)
    grads = {}
    for name, fn in (("ours", moe_dispatch), ("reference", moe_reference)):
        leaves = [t.clone().requires_grad_() for t in (x, w13, w2)]
        y = fn(leaves[0], ids, gates, leaves[1], leaves[2])
        y.backward(cot)
        grads[name] = [y.detach()] + [t.grad for t in leaves]
    errs = [rel_err(a, b) for a, b in zip(grads["ours"], grads["reference"])]
    return {"rel_err": dict(zip(("y", "dx", "dw13", "dw2"), errs)), "ok": max(errs) <= tol}


def tiny_pool_config(smoke: bool):
    base = get_preset("debug")
    if smoke:
        return base.replace(n_layers=4, num_experts=8, top_k=2, norm_router_c="one")
    return base.replace(d_model=512, n_heads=8, n_kv_heads=4, ffn_hidden=1024, n_layers=6, num_experts=48,
                        vocab_size=8192, max_seq_len=512, norm_router_c="one")


def fused_wgrad_vs_plain(suite: Suite, rec: dict) -> None:
    """The fused pool weight gradient equals the per-layer one, in bf16 autocast on the device."""
    dev, cfg = suite.device, tiny_pool_config(suite.smoke)
    seq, batch = (32, 2) if suite.smoke else (512, 8)
    grads = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg, dev)
        model.set_execution(fused_pool_wgrad=fused)
        gen = torch.Generator().manual_seed(1)
        for _ in range(2):  # two micro-batches: gradients accumulate, f-bar carries over
            ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(ids, ids)
            model.update_routing_state(out)
            out.total_loss.backward()
        grads[fused] = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        del model
    errs = {n: rel_err(grads[True][n], grads[False][n]) for n in grads[False] if n.startswith("experts.")}
    errs_rest = [rel_err(grads[True][n], grads[False][n]) for n in grads[False] if not n.startswith("experts.")]
    rec["pool_rel_err"] = errs
    rec["max_rel_err_rest"] = max(errs_rest)
    rec["tolerance"] = 2e-2
    rec["ok"] = max(errs.values()) <= rec["tolerance"] and rec["max_rel_err_rest"] <= rec["tolerance"]


def no_host_syncs(suite: Suite, rec: dict) -> None:
    """A MoE layer's forward and backward (router + dispatch) with CUDA sync debugging set to error."""
    if suite.device.type != "cuda":
        rec.update(status="skipped", reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    dev, d, f, e, k, tokens = suite.device, 768, 3072, 96, 1, 4096
    checked = []
    for kind in ("norm", "softmax"):
        router = Router(d, e, k, kind, norm_c="one", switch_coef=1e-2).to(dev)
        w13 = (torch.randn(e, 2 * f, d, device=dev) * 0.02).requires_grad_()
        w2 = (torch.randn(e, d, f, device=dev) * 0.02).requires_grad_()
        x = torch.randn(tokens, d, device=dev, requires_grad=True)
        cot = torch.randn(tokens, d, device=dev)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
                warm = moe_dispatch(x, *(lambda r: (r.expert_ids_TK, r.weights_TK))(router(x)), w13, w2)
            warm.backward(cot.to(warm.dtype))  # warm-up outside the check (lazy init may sync)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=dtype, enabled=dtype == torch.bfloat16):
                    r = router(x)
                    y = moe_dispatch(x, r.expert_ids_TK, r.weights_TK, w13, w2)
                    loss_aux = r.aux_loss
                torch.autograd.backward([y, loss_aux], [cot.to(y.dtype), torch.ones_like(loss_aux)])
            finally:
                torch.cuda.set_sync_debug_mode("default")
            checked.append(f"{kind}/{str(dtype).removeprefix('torch.')}")
    rec["checked"], rec["ok"] = checked, True


def compile_block(suite: Suite, rec: dict) -> None:
    """torch.compile of one transformer block: same output and gradients as eager; graph breaks counted."""
    dev = suite.device
    cfg = tiny_pool_config(suite.smoke)
    torch.manual_seed(0)
    model = build_model(cfg, dev)
    block, pool = model.layers[0], model.experts[0]
    seq = 16 if suite.smoke else 256
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    x = torch.randn(2, seq, cfg.d_model, device=dev)

    def run(fn):
        xx = x.clone().requires_grad_()
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype == torch.bfloat16):
            y, routed = fn(xx, pool, cos, sin)
        (y.float().square().mean() + routed.aux_loss).backward()
        out = [y.detach().float(), xx.grad.float()] + [p.grad.float().clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        pool.zero_grad(set_to_none=True)
        return out

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, pool, cos, sin)
    rec["graph_breaks"] = explanation.graph_break_count
    rec["break_reasons"] = sorted({str(b.reason).splitlines()[0][:160] for b in explanation.break_reasons})
    backend = "aot_eager" if suite.smoke else "inductor"
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=backend)
    eager, comp = run(block), run(compiled)
    rec["backend"] = backend
    rec["max_rel_err"] = max(rel_err(a, b) for a, b in zip(comp, eager))
    rec["tolerance"] = 1e-4 if dtype == torch.float32 else 3e-2
    rec["ok"] = rec["max_rel_err"] <= rec["tolerance"]


def training_run(suite: Suite, *, preset: str, steps: int, batch: int, seq: int, tokenizer: str, name: str,
                 extra: dict | None = None) -> dict:
    """`unipool train` through its Python entry point; returns the summary and the metrics."""
    from unipool.config import DataConfig, preset_config
    from unipool.data.corpus import default_corpus_files
    from unipool.run import Run
    from unipool.train.loop import train

    cfg = preset_config(preset)
    sources = [str(p) for p in small_corpus(suite)] if suite.smoke else [str(p) for p in default_corpus_files()]
    fields = {"steps": steps, "batch_size": batch, "seq_len": seq, "progress": False, "out_dir": str(suite.work / "runs"),
              "run_name": name, "sample_tokens": 0, "eval_interval": 0, "eval_tokens": 8 * seq, "ckpt_interval": steps,
              "keep_last": 2, "log_interval": 1, "routing_interval": 0, "warmup_frac": 0.05, **(extra or {})}
    train_cfg = dataclasses.replace(cfg.train, **fields)
    model_cfg = cfg.model.replace(max_seq_len=max(seq, cfg.model.max_seq_len))
    run_cfg = cfg.replace(model=model_cfg, train=train_cfg,
                          data=DataConfig(sources=sources, tokenizer=tokenizer,
                                          data_dir=str(suite.work / "data" / tokenizer.replace(":", ""))))
    shutil.rmtree(suite.work / "runs" / name, ignore_errors=True)
    summary = train(run_cfg)
    records, _ = Run.open(suite.work / "runs" / name).metrics()
    return {"summary": summary, "losses": [r["loss"] for r in records if "loss" in r],
            "tok_per_s": [r["tok_per_s"] for r in records if "tok_per_s" in r]}


def small_corpus(suite: Suite) -> list[Path]:
    from pydoc_data.topics import topics

    path = suite.work / "data" / "topics.txt"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\f".join(topics[k] for k in sorted(topics)[:60]))
    return [path]


def loss_falls_and_resume(suite: Suite, rec: dict) -> None:
    """20 steps of a small model: the loss falls; then resume from the middle checkpoint replays the
    second half to the same losses (within bf16 nondeterminism on a GPU)."""
    from unipool.run import Run
    from unipool.train.loop import train

    tok = "bpe:512" if suite.smoke else "bpe:8192"
    res = training_run(suite, preset="debug" if suite.smoke else "demo", steps=20, batch=8,
                       seq=32 if suite.smoke else 256, tokenizer=tok, name="resume",
                       extra={"ckpt_interval": 10, "keep_last": 2, "lr": 3e-3})
    losses = res["losses"]
    rec["first_loss"], rec["last_loss"] = losses[0], losses[-1]
    rec["loss_falls"] = sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
    run_dir = suite.work / "runs" / "resume"
    ckpts = run_dir / "checkpoints"
    shutil.rmtree(ckpts / "step_000020")
    (ckpts / "LATEST").write_text("step_000010\n")
    run = Run.open(run_dir)
    train(run.config, resume=run)
    replay, _ = Run.open(run_dir).metrics()
    second = [r["loss"] for r in replay if "loss" in r][10:20]
    rec["resume_max_abs_diff"] = max(abs(a - b) for a, b in zip(second, losses[10:20]))
    rec["resume_tolerance"] = 0.0 if suite.device.type == "cpu" else 2e-2
    rec["ok"] = rec["loss_falls"] and rec["resume_max_abs_diff"] <= rec["resume_tolerance"]


# ---- 3. speed, side by side ------------------------------------------------------------------------

def moe_layer_speed(suite: Suite, rec: dict) -> None:
    """ours vs the per-expert loop vs HF Mixtral / OLMoE / Qwen3 blocks vs the dense limit (fwd + bwd)."""
    import moe_layer

    dev = suite.device
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    shapes = [(64, 128, 8, 2, "smoke"), (64, 64, 32, 1, "smoke pool")] if suite.smoke else \
        moe_layer.SHAPES["anchor"] + moe_layer.SHAPES["paper"]
    tokens = 256 if suite.smoke else 16384
    variants = list(moe_layer.VARIANTS)
    rows = []
    for d, f, e, k, label in shapes:
        if not suite.fits(20 if not suite.smoke else 1):
            rec.setdefault("skipped_shapes", []).append(label)
            continue
        row = {"label": label, "d": d, "f": f, "E": e, "k": k, "tokens": tokens}
        flops = 3 * 3 * 2 * d * f * tokens * k
        for v in variants:
            if v == "loop" and e > 128 and not suite.smoke:
                row[v] = None  # a Python loop over hundreds of experts: minutes, known to be slow
                continue
            try:
                step = moe_layer.build(v, d, f, e, k, tokens, dev, dtype, "grouped_mm")
                s = timed(step, dev, 2 if suite.smoke else 5, 1 if suite.smoke else 2)
                row[v] = flops / s["median_s"] / 1e12
                del step
            except Exception as exc:  # noqa: BLE001 -- e.g. an HF block this transformers lacks
                row[v] = None
                row.setdefault("errors", {})[v] = f"{type(exc).__name__}: {str(exc)[:160]}"
        hf = [row[v] for v in variants if v.startswith("hf-") and row.get(v)]
        row["ours_vs_dense"] = row["ours"] / row["dense"] if row.get("dense") else None
        row["ours_vs_best_hf"] = row["ours"] / max(hf) if hf else None
        rows.append(row)
        print(f"  {label} d={d} E={e} k={k}: ours {row['ours']:.1f} dense {row['dense']:.1f} TFLOP/s", flush=True)
        gc.collect()
    rec["rows"], rec["dtype"] = rows, str(dtype).removeprefix("torch.")
    vanilla = [r for r in rows if r["E"] == 8]
    rec["target_vs_dense"] = {"target": 0.9, "worst_vanilla": min((r["ours_vs_dense"] for r in vanilla
                                                                   if r["ours_vs_dense"]), default=None)}
    rec["target_vs_best_hf"] = {"target": 1.5, "worst": min((r["ours_vs_best_hf"] for r in rows
                                                             if r["ours_vs_best_hf"]), default=None)}


def step_case(suite: Suite, preset: str, mode: str, batch: int, seq: int, *, checkpointing: bool = False,
              layers: int | None = None, optimizer: bool = True, repeats: int | None = None,
              compile_model: bool | str = False) -> dict:
    """One training step (fwd + bwd [+ AdamW]) of `preset`; tok/s, MFU, peak memory. `compile_model`: as in
    train_step.make_step (False, True for inductor, or a backend name)."""
    import train_step

    dev = suite.device
    cfg = get_preset(preset).replace(max_seq_len=max(seq, 64), norm_router_c="one")
    if layers:
        cfg = cfg.replace(n_layers=layers, **({"num_experts": 8 * layers} if cfg.moe_mode == "pool" else {}))
    torch.manual_seed(0)
    model = build_model(cfg, dev)
    model.train()
    model.set_execution(fused_pool_wgrad=mode == "fused", activation_checkpointing=checkpointing)
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    tokens = batch * seq
    flops = train_step.model_flops_per_step(model, tokens, seq)
    step = train_step.make_step(model, batch, seq, dev, dtype, optimizer, compile_model)
    reset_peak(dev)
    s = timed(step, dev, repeats or (2 if suite.smoke else 3), (1 if suite.smoke else 2) + (2 if compile_model else 0))
    peak = peak_bytes(dev)
    del model, step
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {"preset": preset, "mode": mode, "batch": batch, "seq": seq, "tokens": tokens,
            "checkpointing": checkpointing, "median_s": s["median_s"], "spread": s["spread"],
            "tok_per_s": tokens / s["median_s"], "tflops": flops / s["median_s"] / 1e12,
            "mfu": flops / s["median_s"] / suite.results.get("peak_flops", SPEC_PEAK_BF16),
            "mfu_spec": flops / s["median_s"] / SPEC_PEAK_BF16,
            "peak_gb": peak / 1e9 if peak else None}


def train_step_speed(suite: Suite, rec: dict) -> None:
    """182m and 469m: vanilla / UniPool naive / UniPool fused at the paper's micro-batch (16 x 1024)."""
    scales = [("debug", 2, 4, 32)] if suite.smoke else [("182m", None, 16, 1024), ("469m", None, 16, 1024)]
    rows = []
    for scale, layers, batch, seq in scales:
        for mode in ("vanilla", "naive", "fused"):
            if not suite.fits(5 if suite.smoke else 40):
                rec.setdefault("skipped", []).append(f"{scale}/{mode}")
                continue
            preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
                (f"vanilla-{scale}" if mode == "vanilla" else f"unipool-{scale}")
            row = {"scale": scale, **step_case(suite, preset, mode, batch, seq, layers=layers)}
            rows.append(row)
            print(f"  {scale} {mode}: {row['tok_per_s']:,.0f} tok/s, MFU {row['mfu']:.3f}", flush=True)
    for r in rows:
        base = next((b for b in rows if b["scale"] == r["scale"] and b["mode"] == "vanilla"), None)
        r["vs_vanilla"] = r["tok_per_s"] / base["tok_per_s"] if base else None
    rec["rows"] = rows


def compiled_step(suite: Suite, rec: dict) -> None:
    """182m UniPool under torch.compile: the plain pool gradient (no graph breaks in bf16) vs the fused one
    (two eager calls per layer), against eager fused from train_step. Decides which to use with compile."""
    preset, batch, seq = ("debug", 2, 32) if suite.smoke else ("unipool-182m", 16, 1024)
    rows = []
    for mode in ("naive", "fused"):
        if not suite.fits(5 if suite.smoke else 90):
            rec.setdefault("skipped", []).append(mode)
            continue
        row = step_case(suite, preset, mode, batch, seq, compile_model="aot_eager" if suite.smoke else True)
        rows.append(row)
        print(f"  compiled {mode}: {row['tok_per_s']:,.0f} tok/s, MFU {row['mfu']:.3f}", flush=True)
    eager = next((r for r in suite.results["sections"].get("train_step", {}).get("rows", [])
                  if r["mode"] == "fused" and r["scale"] in ("182m", "debug")), None)
    for r in rows:
        r["vs_eager_fused"] = r["tok_per_s"] / eager["tok_per_s"] if eager else None
    rec["rows"] = rows


def pool_wgrad_830m(suite: Suite, rec: dict) -> None:
    """The shared pool's weight gradient at the 830m shape (48 layers, M = 384): vanilla / naive / fused,
    forward + backward without the optimizer."""
    rows = []
    for mode in ("vanilla", "naive", "fused"):
        if not suite.fits(5 if suite.smoke else 60):
            rec.setdefault("skipped", []).append(mode)
            continue
        preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
            ("vanilla-830m" if mode == "vanilla" else "unipool-830m")
        batch, seq = (2, 32) if suite.smoke else (8, 1024)
        rows.append(step_case(suite, preset, mode, batch, seq, optimizer=False, checkpointing=not suite.smoke))
        print(f"  830m {mode}: {rows[-1]['tok_per_s']:,.0f} tok/s", flush=True)
    rec["rows"] = rows
    naive = next((r for r in rows if r["mode"] == "naive"), None)
    fused = next((r for r in rows if r["mode"] == "fused"), None)
    rec["fused_vs_naive"] = naive["median_s"] / fused["median_s"] if naive and fused else None
    rec["target"] = 2.0


def reduced_pool_memory(suite: Suite, rec: dict) -> None:
    """Peak memory of one training step at 182m with M = 96 / 64 / 48 (the paper's reduced pools)."""
    rows = []
    presets = [("debug", 8), ("debug", 6), ("debug", 4)] if suite.smoke else \
        [("unipool-182m", 96), ("unipool-182m-m64", 64), ("unipool-182m-m48", 48)]
    for preset, m in presets:
        if not suite.fits(5 if suite.smoke else 30):
            rec.setdefault("skipped", []).append(f"M={m}")
            continue
        if suite.smoke:  # the debug preset with a smaller pool
            import unipool.presets as presets_mod
            base = presets_mod.PRESETS[preset]
            presets_mod.PRESETS[f"smoke-m{m}"] = dataclasses.replace(base, model=base.model.replace(num_experts=m))
            preset = f"smoke-m{m}"
        row = step_case(suite, preset, "naive", 2 if suite.smoke else 16, 32 if suite.smoke else 1024)
        rows.append({"M": m, **row})
        print(f"  M={m}: peak {row['peak_gb'] or 0:.1f} GB, {row['tok_per_s']:,.0f} tok/s", flush=True)
    rec["rows"] = rows


def microbatch_sweep(suite: Suite, rec: dict) -> None:
    """The UniPool / vanilla step ratio at 182m from 4k to 64k tokens per micro-batch (activation
    checkpointing from 32k up), and the smallest micro-batch where fused UniPool is within 3% of vanilla."""
    seq = 32 if suite.smoke else 1024
    batches = [2, 4, 8] if suite.smoke else [4, 8, 16, 32, 64]
    rows = []
    for batch in batches:
        ckpt = not suite.smoke and batch * seq >= 32768
        row = {"tokens": batch * seq, "checkpointing": ckpt}
        for mode in ("vanilla", "naive", "fused"):
            if not suite.fits(3 if suite.smoke else 45):
                rec.setdefault("skipped", []).append(f"{batch * seq}/{mode}")
                continue
            preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
                ("vanilla-182m" if mode == "vanilla" else "unipool-182m")
            r = step_case(suite, preset, mode, batch, seq, checkpointing=ckpt, repeats=None if suite.smoke else 3)
            row[f"{mode}_tok_s"] = r["tok_per_s"]
        if "vanilla_tok_s" in row:
            for mode in ("naive", "fused"):
                if f"{mode}_tok_s" in row:
                    row[f"{mode}_vs_vanilla"] = row[f"{mode}_tok_s"] / row["vanilla_tok_s"]
        rows.append(row)
        print(f"  {row['tokens']} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("_vanilla")),
              flush=True)
    rec["rows"] = rows
    within = [r["tokens"] for r in rows if r.get("fused_vs_vanilla", 0) >= 0.97]
    rec["smallest_within_3pct"] = min(within) if within else None


# ---- 4. a real run ---------------------------------------------------------------------------------

def real_run(suite: Suite, rec: dict) -> None:
    """The 182M UniPool and vanilla presets on the embedded corpus (Shakespeare) with the GPT-2 tokenizer."""
    steps = 8 if suite.smoke else 200
    runs = {}
    for preset in (("debug", "debug-vanilla") if suite.smoke else ("unipool-182m", "vanilla-182m")):
        if not suite.fits(5 if suite.smoke else 90):
            rec.setdefault("skipped", []).append(preset)
            continue
        res = training_run(suite, preset=preset, steps=steps, batch=4 if suite.smoke else 16,
                           seq=32 if suite.smoke else 1024, tokenizer="gpt2", name=preset,
                           extra={"lr": 3e-3 if suite.smoke else 5e-4, "eval_tokens": 4096 if suite.smoke else 65536})
        s = res["summary"]
        runs[preset] = {"losses": res["losses"], "val_loss": s.get("val_loss"), "unigram_loss": s.get("unigram_loss"),
                        "tok_per_s": s.get("tok_per_s"), "params": s.get("params"), "steps": steps,
                        "active_params": s.get("active_params")}
        print(f"  {preset}: val loss {s.get('val_loss'):.3f}, {s.get('tok_per_s'):,.0f} tok/s", flush=True)
    rec["runs"] = runs
    if runs:
        plot_curves(runs, suite.out / "curves.png")


def plot_curves(runs: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{name} (val {r['val_loss']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- results.md ------------------------------------------------------------------------------------

def _f(x, spec=".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def markdown(results: dict) -> str:
    sec = results["sections"]
    lines = [f"# GPU suite ({results['mode']}), {results.get('elapsed_s', 0):.0f} s of a {results['budget_s']:.0f} s budget", ""]
    lines += ["| section | status | seconds | note |", "|---|---|---|---|"]
    for name, r in sec.items():
        note = r.get("reason") or r.get("error") or ""
        lines.append(f"| {name} | {r.get('status', 'running')} | {r.get('seconds', '-')} | {note} |")
    env = sec.get("environment", {})
    if env.get("gemm_tflops"):
        lines += ["", f"Environment: {env.get('gpu', 'CPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                  f"transformers {env.get('transformers')}; measured {env['gemm_dtype']} GEMM "
                  f"{env['gemm_tflops']:.1f} TFLOP/s, copy {env['copy_gbps']:.0f} GB/s."]
    for name in ("dispatch_vs_reference", "fused_wgrad_vs_plain", "no_host_syncs", "compile_block", "loss_and_resume"):
        r = sec.get(name, {})
        if "ok" in r:
            detail = {k: v for k, v in r.items() if k not in ("status", "seconds", "estimate_s", "cases", "pool_rel_err")}
            lines.append(f"- {name}: {'PASS' if r['ok'] else 'FAIL'} {json.dumps(detail, default=str)[:400]}")
    m = sec.get("moe_layer", {})
    if m.get("rows"):
        lines += ["", f"## MoE layer fwd+bwd, {m['dtype']}, TFLOP/s (target: ours >= 0.9 x dense at the vanilla "
                  "shapes and >= 1.5 x the best HF block)", "",
                  "| shape | d | f | E | k | dense | ours | loop | HF Mixtral | HF OLMoE | HF Qwen3 | ours/dense | ours/best HF |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            lines.append(f"| {r['label']} | {r['d']} | {r['f']} | {r['E']} | {r['k']} | {_f(r.get('dense'), '.1f')} | "
                         f"{_f(r.get('ours'), '.1f')} | {_f(r.get('loop'), '.1f')} | {_f(r.get('hf-mixtral'), '.1f')} | "
                         f"{_f(r.get('hf-olmoe'), '.1f')} | {_f(r.get('hf-qwen3'), '.1f')} | "
                         f"{_f(r.get('ours_vs_dense'), '.2f')} | {_f(r.get('ours_vs_best_hf'), '.2f')} |")
    for name, title in (("train_step", "Training step (fwd + bwd + AdamW) at 16 x 1024 tokens; target MFU >= 0.40 at 469m"),
                        ("pool_wgrad_830m", "830m shape fwd + bwd (8 x 1024, checkpointing); target fused >= 2 x naive"),
                        ("reduced_pools", "Peak memory of reduced pools at 182m (16 x 1024)")):
        rows = sec.get(name, {}).get("rows")
        if rows:
            lines += ["", f"## {title}", "", "| preset | mode | M | tokens | tok/s | vs vanilla | MFU | MFU (989 spec) | peak GB |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['preset']} | {r['mode']} | {r.get('M', '-')} | {r['tokens']} | {r['tok_per_s']:,.0f} | "
                             f"{_f(r.get('vs_vanilla'))} | {_f(r['mfu'])} | {_f(r['mfu_spec'])} | {_f(r['peak_gb'], '.1f')} |")
    rows = sec.get("compiled_step", {}).get("rows")
    if rows:
        lines += ["", "## torch.compile, UniPool 182m (16 x 1024): plain vs fused pool gradient", "",
                  "| mode | tok/s | vs eager fused | MFU | peak GB |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| compiled {r['mode']} | {r['tok_per_s']:,.0f} | {_f(r.get('vs_eager_fused'))} | "
                         f"{_f(r['mfu'])} | {_f(r['peak_gb'], '.1f')} |")
    p = sec.get("pool_wgrad_830m", {})
    if p.get("fused_vs_naive"):
        lines.append(f"\nfused / naive at 830m: {p['fused_vs_naive']:.2f}x (target 2x)")
    s = sec.get("microbatch_sweep", {})
    if s.get("rows"):
        lines += ["", "## UniPool / vanilla step ratio vs micro-batch at 182m (target: fused within 3%)", "",
                  "| tokens | checkpointing | vanilla tok/s | naive / vanilla | fused / vanilla |", "|---|---|---|---|---|"]
        for r in s["rows"]:
            lines.append(f"| {r['tokens']} | {r['checkpointing']} | {_f(r.get('vanilla_tok_s'), ',.0f')} | "
                         f"{_f(r.get('naive_vs_vanilla'))} | {_f(r.get('fused_vs_vanilla'))} |")
        lines.append(f"\nsmallest micro-batch with fused within 3% of vanilla: {s.get('smallest_within_3pct')}")
    rr = sec.get("real_run", {}).get("runs")
    if rr:
        lines += ["", "## Real run (embedded corpus, GPT-2 tokenizer)", "", "| preset | steps | val loss | unigram | tok/s |",
                  "|---|---|---|---|---|"]
        for name, r in rr.items():
            lines.append(f"| {name} | {r['steps']} | {_f(r['val_loss'])} | {_f(r['unigram_loss'])} | {_f(r['tok_per_s'], ',.0f')} |")
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, results.md, curves.png)")
    p.add_argument("--work", type=Path, default=Path("/tmp/unipool-gpu-suite"),
                   help="scratch folder for the training runs and data (not returned: checkpoints are large)")
    p.add_argument("--budget-s", type=float, default=480, help="wall-clock budget; sections that do not fit are skipped")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks that every section runs")
    p.add_argument("--only", default=None, help="comma list of section names to run (default: all)")
    args = p.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; use --cpu-smoke for the CPU check")
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args.out, args.work, args.budget_s, args.cpu_smoke, device)
    smoke = args.cpu_smoke
    # (name, estimate in seconds on the GPU, function): in order of priority
    sections = [
        ("environment", 20, environment),
        ("dispatch_vs_reference", 15, dispatch_vs_reference),
        ("fused_wgrad_vs_plain", 15, fused_wgrad_vs_plain),
        ("no_host_syncs", 10, no_host_syncs),
        ("compile_block", 60, compile_block),
        ("loss_and_resume", 40, loss_falls_and_resume),
        ("moe_layer", 90, moe_layer_speed),
        ("train_step", 120, train_step_speed),
        ("microbatch_sweep", 120, microbatch_sweep),
        ("pool_wgrad_830m", 90, pool_wgrad_830m),
        ("reduced_pools", 60, reduced_pool_memory),
        ("real_run", 120, real_run),
        ("compiled_step", 180, compiled_step),
    ]
    only = set(args.only.split(",")) if args.only else None
    for name, estimate, fn in sections:
        if only and name not in only:
            continue
        with suite.section(name, 1 if smoke else min(estimate, 60)) as rec:
            if rec is not None:
                fn(suite, rec)
    suite.write()
    failed = [n for n, r in suite.results["sections"].items() if r.get("status") == "failed" or r.get("ok") is False]
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
