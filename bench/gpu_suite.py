"""The whole GPU check in one command: environment, correctness on CUDA, speed side by side, a real run.

On a CUDA machine without network (its own torch, unipool on PYTHONPATH; recipe in docs/benchmarks.md):
    python3 bench/gpu_suite.py --out results/gpu --budget-s 480
On a CPU, the same sections on tiny shapes, in a few minutes (tests/test_gpu_suite.py runs it in CI):
    python bench/gpu_suite.py --cpu-smoke --out /tmp/suite

Writes OUT/results.json (every figure, every skip with its reason, every failure with its message),
OUT/results.md (the tables, each target stated beside its number) and OUT/curves.png. Sections run in
order of priority, each within what is left of --budget-s; results are written (atomically) after every
section, so a run cut short still leaves everything measured so far. A failing case is recorded, not
fatal: an out-of-memory in one row frees the memory and the section goes on with its other rows. A case
whose estimated memory exceeds the device's free memory is skipped with the estimate in its row.
SIGTERM (or Ctrl-C) records the current section as interrupted, writes the results and exits (status 143).

Every training-step row also records the memory after each step (CUDA: torch.cuda.memory_allocated; CPU
smoke: the number of live tensors) and its growth per step from step N/2 to step N; growth above
GROWTH_BOUND_MB (1 MB/step) marks the row FAIL. Steady-state steps leave exactly the same tensors alive,
so the growth should be 0 bytes; the leak this guards against kept one bf16 copy of the pool per step
(1.36 GB at 182m), and even one layer's saved activation at 16k tokens is 25 MB.

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
import os
import platform
import shutil
import signal
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import summarize, time_fn  # noqa: E402

from unipool.model.model import build_model  # noqa: E402
from unipool.model.moe import moe_dispatch, moe_reference  # noqa: E402
from unipool.model.router import Router  # noqa: E402
from unipool.presets import get_preset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC_PEAK_BF16 = 989e12  # H100 / H200 SXM dense bf16, for comparison with published MFU figures
GROWTH_BOUND_MB = 1.0  # CUDA: memory_allocated growth per training step above which a row FAILs
GROWTH_BOUND_TENSORS = 0.5  # CPU smoke: live tensors gained per step (one leaked tensor a step gives 1.0)
SYNC_EXPECTED_FP32 = "expected: fp32 grouped_mm syncs on CUDA (its fallback copies group offsets to the host)"


# ---- stopping on SIGTERM -----------------------------------------------------------------------------

class Interrupted(BaseException):
    """SIGTERM or SIGINT reached the suite. A BaseException, so no per-case `except Exception` goes on.
    args: (signal name, where it was caught)."""

    @property
    def signal_name(self) -> str:
        return self.args[0]

    def __str__(self) -> str:
        return " ".join(str(a) for a in self.args)


_stopping = False
_caught: str | None = None  # the signal our handler caught, kept: its exception can be lost (below)


def _on_signal(signum: int, frame) -> None:
    global _stopping, _caught
    if _stopping:  # already on the way out, writing results: a second signal must not cut that short
        return
    _stopping, _caught = True, signal.Signals(signum).name
    # Raised in whatever Python code runs when the signal arrives. If that is a weakref callback or a
    # __del__, Python prints the exception and drops it: `check_caught` at every section start catches up.
    raise Interrupted(_caught)


def check_caught() -> None:
    """Stop now if our handler caught a signal whose exception was swallowed where it landed."""
    if _caught is not None:
        raise Interrupted(_caught, "(caught earlier; its exception was lost where it landed)")


def install_signal_handlers() -> None:
    """Ours, again: the training loop installs its own (it saves a checkpoint and returns instead of
    stopping) and restores ours on exit; re-installing before every section keeps any other code that
    replaced them from keeping the suite alive."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, _on_signal)


def stop_if_signalled(summary: dict) -> None:
    """After a training run: the loop catches SIGINT/SIGTERM itself (finishing the step and saving), so the
    suite stops on what its summary says; a signal in the run's last step leaves it complete, not
    "interrupted", but still names the signal."""
    if summary.get("interrupted") or summary.get("signal"):
        raise stop_now(summary.get("signal") or "SIGTERM", "in a training run (it saved a checkpoint and returned)")


def stop_now(signal_name: str, where: str) -> Interrupted:
    """For a signal that someone else caught (the training loop): stop the suite as our handler would."""
    global _stopping
    _stopping = True
    return Interrupted(signal_name, where)


# ---- the suite: a deadline, sections, incremental results ------------------------------------------

def atomic_write(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: a kill mid-write leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Suite:
    def __init__(self, out: Path, work: Path, budget_s: float, smoke: bool, device: torch.device):
        self.out, self.work, self.smoke, self.device = out, work, smoke, device
        self.t0, self.budget_s = time.time(), budget_s
        self.results: dict = {"mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget_s, "sections": {}}

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def fits(self, estimate_s: float) -> bool:
        return self.remaining() >= estimate_s

    def case_fits(self, gpu_s: float, smoke_s: float = 1.0) -> bool:
        """Whether one case of a section (estimated at `gpu_s` on the GPU) still fits the budget."""
        return self.fits(smoke_s if self.smoke else gpu_s)

    @contextlib.contextmanager
    def section(self, name: str, estimate_s: float) -> Iterator[dict | None]:
        """Run the block if `estimate_s` still fits the budget; record ok / failed / skipped / interrupted."""
        record: dict = {"estimate_s": estimate_s}
        self.results["sections"][name] = record
        if not self.fits(estimate_s):
            record.update(status="skipped", reason=f"budget: {self.remaining():.0f} s left, needs ~{estimate_s:.0f} s")
            print(f"[{name}] skipped ({record['reason']})", flush=True)
            self.write()
            yield None
            return
        install_signal_handlers()
        t = time.time()
        print(f"[{name}] ... ({self.remaining():.0f} s left, ~{estimate_s:.0f} s estimated)", flush=True)
        try:
            check_caught()
            yield record
            record["status"] = record.get("status", "ok")
        except Interrupted as e:
            record.update(status="interrupted", reason=f"{e} during this section")
            print(f"[{name}] interrupted ({e})", flush=True)
            raise
        except Exception as e:  # noqa: BLE001 -- one broken case must not cost the rest of the GPU time
            record.update(status="failed", error=error_text(e), traceback=traceback.format_exc()[-3000:])
            print(f"[{name}] FAILED: {record['error']}", flush=True)
        finally:
            record["seconds"] = round(time.time() - t, 1)
            free_memory(self.device)
            self.write()

    def write(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.t0, 1)
        atomic_write(self.out / "results.json", json.dumps(self.results, indent=1, default=str))
        try:
            md = markdown(self.results)
        except Exception as e:  # noqa: BLE001 -- results.json has every figure; the tables are a convenience
            md = f"# GPU suite\n\nresults.md could not be rendered ({error_text(e)}); see results.json.\n"
        atomic_write(self.out / "results.md", md)


def error_text(exc: BaseException) -> str:
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return f"{type(exc).__name__}: {first}"


def is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def free_gb(device: torch.device) -> float:
    """Memory a new case can use: the device's free memory plus what this process's allocator holds
    unused (CUDA), or MemAvailable (CPU)."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return (torch.cuda.mem_get_info(device)[0] + cached) / 1e9
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as f:
            return int(next(line.split()[1] for line in f if line.startswith("MemAvailable:"))) * 1024 / 1e9
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def guarded(fn: Callable[[], dict], device: torch.device, row: dict | None = None) -> dict:
    """One case: its figures merged into `row`, or, if it raised, `row` marked failed (`oom` for an out of
    memory) with the message. The memory the case held is freed either way, so the next case starts clean."""
    row = dict(row or {})
    try:
        row.update(fn())
        return row  # what the case built went with its frame
    except Exception as exc:  # noqa: BLE001 -- the section's other rows must survive one bad case
        row.update(status="oom" if is_oom(exc) else "failed", ok=False, error=error_text(exc))
    # After the except block: the traceback, and the tensors its frames held, are gone by now.
    free_memory(device)
    return row


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


# ---- memory per step and memory estimates ------------------------------------------------------------

def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on deprecated module attributes (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def memory_probe(device: torch.device) -> tuple[Callable[[], float], str, float]:
    """(probe, unit, growth bound per step). Called right after a synchronised step."""
    if device.type == "cuda":
        return (lambda: torch.cuda.memory_allocated(device) / 1e6), "MB", GROWTH_BOUND_MB
    return live_tensors, "tensors", GROWTH_BOUND_TENSORS


def growth_per_step(trace: list[float]) -> float | None:
    """Slope of the memory after each step from step N/2 to step N: past the first steps, which allocate
    the optimizer's state and (compiled) warm up."""
    n = len(trace)
    if n < 4:
        return None
    half = n // 2
    return (trace[-1] - trace[half - 1]) / (n - half)


def estimate_step_gb(cfg, mode: str, batch: int, seq: int, *, autocast: bool, optimizer: bool = True,
                     checkpointing: bool = False) -> dict[str, float]:
    """A rough peak of one training step (GB), by part, so a case that cannot fit is skipped, not run into
    an out-of-memory. Parameters, gradients and AdamW state in fp32 (16 bytes a parameter; 8 without the
    optimizer); under bf16 autocast one bf16 copy of every weight, plus, for the plain pool gradient without
    checkpointing, one bf16 copy of the pool per calling layer (each layer's grouped GEMM saves its own
    cast); the pool weight gradient's transient (bf16, then its fp32 cast); activations from a per-token
    count (attention ~22 d bytes, MoE rows 2(2kd + 3kf), router 8E, logits (2 + 8) V) with a 25% margin."""
    model = build_model(cfg, "meta")
    params = sum(p.numel() for p in model.parameters())
    pool = sum(p.numel() for p in model.experts.parameters()) / cfg.n_pools  # the weights one layer calls
    del model
    tokens, b = batch * seq, (2 if autocast else 4)
    d, f, k, e, n_layers = cfg.d_model, cfg.expert_hidden, cfg.routed_top_k, cfg.n_routed_experts, cfg.n_layers
    parts = {"state": params * (16 if optimizer else 8)}
    copies = 2 * params if autocast else 0
    if autocast and mode == "naive" and cfg.layers_per_pool > 1 and not checkpointing:
        copies += 2 * pool * (n_layers - cfg.n_pools)  # the other calling layers' copies of their pool
    parts["bf16_copies"] = copies
    parts["wgrad_transient"] = pool * (6 if autocast else 4)
    per_layer = b / 2 * (22 * d + 4 * k * d + 6 * k * f) + 8 * e  # bytes per token
    layers = (n_layers * 4 * d + per_layer) if checkpointing else n_layers * per_layer
    if mode == "fused" and checkpointing:  # the deferred gradient's stash outlives the recomputed layers
        layers += n_layers * b * (2 * k * d + 3 * k * f)
    parts["activations"] = 1.25 * tokens * (layers + cfg.padded_vocab_size * (b + 8))
    parts["slack"] = 0.5e9  # cuBLAS workspace, allocator rounding
    gb = {name: v / 1e9 for name, v in parts.items()}
    gb["total"] = sum(gb.values())
    return gb


def estimate_layer_gb(variant: str, d: int, f: int, e: int, k: int, tokens: int, dtype: torch.dtype) -> float:
    """A rough peak of one MoE-layer case (GB): weights and their gradients in `dtype` (HF blocks are built
    in fp32 on the device first), routed-row activations and the router's fp32 scores."""
    b = dtype.itemsize
    weights = 3 * d * f * (1 if variant == "dense" else e)
    total = weights * 2 * b + (weights * 4 if variant.startswith("hf-") else 0)
    total += tokens * k * (4 * d + 9 * f) * b + tokens * e * 8
    return total / 1e9 + 0.5


def memory_skip(estimate_gb: float, device: torch.device) -> tuple[float, str | None]:
    """(free GB, a skip reason if the estimate does not fit)."""
    free = free_gb(device)
    if estimate_gb > free:
        return free, f"memory: ~{estimate_gb:.1f} GB estimated, {free:.1f} GB free"
    return free, None


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
                # e.g. a dtype the device's grouped_mm lacks, or an out-of-memory: recorded in the case
                cases.append(guarded(lambda: _compare_dispatch(d, f, e, k, dtype, tokens, dev, tol[dtype]), dev, case))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    rec["cases"] = cases
    rec["ok"] = all(c["ok"] for c in cases)


def _compare_dispatch(d, f, e, k, dtype, tokens, dev, tol) -> dict:
    # Drawn on the device: 0.7G random values at the pool shape take seconds on one CPU core.
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev) * scale).to(dtype)

    x, w13, w2 = randn(tokens, d), randn(e, 2 * f, d, scale=0.02), randn(e, d, f, scale=0.02)
    ids = torch.randint(0, e, (tokens, k), generator=gen, device=dev)
    gates = torch.rand(tokens, k, generator=gen, device=dev).to(dtype)
    cot = randn(tokens, d)
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


def sync_checks(run_one: Callable[[torch.dtype], None]) -> dict[str, str]:
    """`run_one(dtype)` raises if the step synchronised with the host. bf16, the training dtype, runs first
    and is the check; fp32 runs after it and is recorded as what it is: its grouped GEMM falls back to a
    path that copies the group offsets to the host by design, so a sync there is expected, not a failure."""
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        try:
            run_one(dtype)
            out[name] = "no host sync"
        except Exception as exc:  # noqa: BLE001 -- each dtype's result is recorded on its own
            syncs = "synchroniz" in str(exc).lower()
            if dtype == torch.float32:
                out[name] = SYNC_EXPECTED_FP32 if syncs else f"not checked ({error_text(exc)})"
            else:
                out[name] = f"FAIL: {error_text(exc)}"
    return out


def no_host_syncs(suite: Suite, rec: dict) -> None:
    """A MoE layer's forward and backward (router + dispatch) with CUDA sync debugging set to error."""
    if suite.device.type != "cuda":
        rec.update(status="skipped", reason="needs CUDA (torch.cuda.set_sync_debug_mode)")
        return
    dev, d, f, e, k, tokens = suite.device, 768, 3072, 96, 1, 4096
    results = {}
    for kind in ("norm", "softmax"):
        router = Router(d, e, k, kind, norm_c="one", switch_coef=1e-2).to(dev)
        w13 = (torch.randn(e, 2 * f, d, device=dev) * 0.02).requires_grad_()
        w2 = (torch.randn(e, d, f, device=dev) * 0.02).requires_grad_()
        x = torch.randn(tokens, d, device=dev, requires_grad=True)
        cot = torch.randn(tokens, d, device=dev)

        def run_one(dtype: torch.dtype) -> None:
            bf16 = dtype == torch.bfloat16
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                warm = moe_dispatch(x, *(lambda r: (r.expert_ids_TK, r.weights_TK))(router(x)), w13, w2)
            warm.backward(cot.to(warm.dtype))  # warm-up outside the check (lazy init may sync)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                    r = router(x)
                    y = moe_dispatch(x, r.expert_ids_TK, r.weights_TK, w13, w2)
                    loss_aux = r.aux_loss
                torch.autograd.backward([y, loss_aux], [cot.to(y.dtype), torch.ones_like(loss_aux)])
            finally:
                torch.cuda.set_sync_debug_mode("default")

        results[kind] = sync_checks(run_one)
    rec["bf16"] = {kind: r["bfloat16"] for kind, r in results.items()}
    rec["fp32"] = {kind: r["float32"] for kind, r in results.items()}
    rec["ok"] = all(v == "no host sync" for v in rec["bf16"].values())


def compile_block(suite: Suite, rec: dict) -> None:
    """torch.compile of one transformer block: same output and gradients as eager; graph breaks counted
    on the graph that is compiled (bf16 autocast on the GPU: fp32 takes other, syncing, paths)."""
    dev = suite.device
    cfg = tiny_pool_config(suite.smoke)
    torch.manual_seed(0)
    model = build_model(cfg, dev)
    block, pool = model.layers[0], model.experts[0]
    seq = 16 if suite.smoke else 256
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    x = torch.randn(2, seq, cfg.d_model, device=dev)

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)

    def run(fn):
        xx = x.clone().requires_grad_()
        with autocast():
            y, routed = fn(xx, pool, cos, sin)
        (y.float().square().mean() + routed.aux_loss).backward()
        out = [y.detach().float(), xx.grad.float()] + [p.grad.float().clone() for p in block.parameters()]
        block.zero_grad(set_to_none=True)
        pool.zero_grad(set_to_none=True)
        return out

    torch._dynamo.reset()
    with autocast():
        explanation = torch._dynamo.explain(block)(x, pool, cos, sin)
    rec["graph_dtype"] = str(dtype).removeprefix("torch.")
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
    torch._dynamo.reset()


def training_run(suite: Suite, *, preset: str, steps: int, batch: int, seq: int, tokenizer: str, name: str,
                 extra: dict | None = None, keep_run: bool = False) -> dict:
    """`unipool train` through its Python entry point; returns the summary and the metrics. One checkpoint
    (the final one, which the loop always writes), deleted with the run unless `keep_run`."""
    from unipool.config import DataConfig, preset_config
    from unipool.data.corpus import default_corpus_files
    from unipool.run import Run
    from unipool.train.loop import train

    cfg = preset_config(preset)
    sources = [str(p) for p in small_corpus(suite)] if suite.smoke else [str(p) for p in default_corpus_files()]
    fields = {"steps": steps, "batch_size": batch, "seq_len": seq, "progress": False, "out_dir": str(suite.work / "runs"),
              "run_name": name, "sample_tokens": 0, "eval_interval": 0, "eval_tokens": 8 * seq, "ckpt_interval": 0,
              "keep_last": 1, "keep_every": 0, "log_interval": 1, "routing_interval": 0, "warmup_frac": 0.05,
              **(extra or {})}
    train_cfg = dataclasses.replace(cfg.train, **fields)
    model_cfg = cfg.model.replace(max_seq_len=max(seq, cfg.model.max_seq_len))
    run_cfg = cfg.replace(model=model_cfg, train=train_cfg,
                          data=DataConfig(sources=sources, tokenizer=tokenizer,
                                          data_dir=str(suite.work / "data" / tokenizer.replace(":", ""))))
    run_dir = suite.work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    try:
        summary = train(run_cfg)
        stop_if_signalled(summary)
        records, _ = Run.open(run_dir).metrics()
    finally:
        if not keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
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
    from unipool.weights import write_latest

    tok = "bpe:512" if suite.smoke else "bpe:8192"
    run_dir = suite.work / "runs" / "resume"
    try:
        # Two checkpoints, the fewest the check allows: step 10 (resumed from) and step 20 (the loop's final one).
        res = training_run(suite, preset="debug" if suite.smoke else "demo", steps=20, batch=8,
                           seq=32 if suite.smoke else 256, tokenizer=tok, name="resume", keep_run=True,
                           extra={"ckpt_interval": 10, "keep_last": 2, "lr": 3e-3})
        losses = res["losses"]
        rec["first_loss"], rec["last_loss"] = losses[0], losses[-1]
        rec["loss_falls"] = sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5
        ckpts = run_dir / "checkpoints"
        shutil.rmtree(ckpts / "step_000020")
        write_latest(ckpts, "step_000010")  # rewind: resume from step 10 and replay 10-20
        run = Run.open(run_dir)
        stop_if_signalled(train(run.config, resume=run))
        replay, _ = Run.open(run_dir).metrics()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    second = [r["loss"] for r in replay if "loss" in r][10:20]
    rec["resume_max_abs_diff"] = max(abs(a - b) for a, b in zip(second, losses[10:20]))
    rec["resume_tolerance"] = 0.0 if suite.device.type == "cpu" else 2e-2
    rec["ok"] = rec["loss_falls"] and rec["resume_max_abs_diff"] <= rec["resume_tolerance"]


# ---- 3. speed, side by side ------------------------------------------------------------------------

def layer_case(variant: str, d: int, f: int, e: int, k: int, tokens: int, dev: torch.device, dtype: torch.dtype,
               hf_impl: str = "grouped_mm") -> Callable[[], None]:
    """One forward + backward of a MoE layer: bench/moe_layer.build, which draws every tensor on the device."""
    import moe_layer

    return moe_layer.build(variant, d, f, e, k, tokens, dev, dtype, hf_impl)


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
        if not suite.case_fits(3.5):  # ~6 variants of ~0.5 s: build on the device, 2 + 5 passes of <= 50 ms
            rec.setdefault("skipped_shapes", []).append(label)
            continue
        row: dict = {"label": label, "d": d, "f": f, "E": e, "k": k, "tokens": tokens}
        flops = 3 * 3 * 2 * d * f * tokens * k
        for v in variants:
            row[v] = None
            if v == "loop" and e > 128 and not suite.smoke:
                row.setdefault("skipped", {})[v] = "a Python loop over hundreds of experts: minutes, known slow"
                continue
            est = estimate_layer_gb(v, d, f, e, k, tokens, dtype)
            _, reason = memory_skip(est, dev)
            if reason:
                row.setdefault("skipped", {})[v] = reason
                continue

            def measure(v=v) -> dict:
                step = layer_case(v, d, f, e, k, tokens, dev, dtype)
                s = timed(step, dev, 2 if suite.smoke else 5, 1 if suite.smoke else 2)
                return {"tflops": flops / s["median_s"] / 1e12}

            case = guarded(measure, dev)  # an HF block this transformers lacks, an out-of-memory, ...
            if "error" in case:
                row.setdefault("errors", {})[v] = case["error"]
                if case["status"] == "oom":
                    row.setdefault("oom", []).append(v)
            else:
                row[v] = case["tflops"]
        hf = [row[v] for v in variants if v.startswith("hf-") and row.get(v)]
        row["ours_vs_dense"] = row["ours"] / row["dense"] if row.get("ours") and row.get("dense") else None
        row["ours_vs_best_hf"] = row["ours"] / max(hf) if hf and row.get("ours") else None
        rows.append(row)
        print(f"  {label} d={d} E={e} k={k}: ours {_f(row.get('ours'), '.1f')} dense {_f(row.get('dense'), '.1f')} "
              "TFLOP/s" + (f" (errors: {', '.join(row['errors'])})" if row.get("errors") else ""), flush=True)
        free_memory(dev)  # the next shape's weights should not meet a fragmented cache
    rec["rows"], rec["dtype"] = rows, str(dtype).removeprefix("torch.")
    vanilla = [r for r in rows if r["E"] == 8]
    rec["target_vs_dense"] = {"target": 0.9, "worst_vanilla": min((r["ours_vs_dense"] for r in vanilla
                                                                   if r["ours_vs_dense"]), default=None)}
    rec["target_vs_best_hf"] = {"target": 1.5, "worst": min((r["ours_vs_best_hf"] for r in rows
                                                             if r["ours_vs_best_hf"]), default=None)}


def step_case(suite: Suite, preset: str, mode: str, batch: int, seq: int, *, checkpointing: bool = False,
              layers: int | None = None, optimizer: bool = True, repeats: int | None = None,
              warmup: int | None = None, compile_model: bool | str = False, memory_check: bool = False,
              config=None) -> dict:
    """One training step (fwd + bwd [+ AdamW]) of `preset`: tok/s, MFU, peak memory, and the memory after
    every step with its growth per step (always on CUDA, where it is free; on CPU with `memory_check`).
    Skipped if the memory estimate exceeds the free memory; an exception (an out-of-memory) makes a failed
    row. `compile_model`: as in train_step.make_step (False, True for inductor, or a backend name).
    `config`: a ModelConfig to run instead of the preset's (`preset` then only names the row)."""
    dev = suite.device
    cfg = (config or get_preset(preset)).replace(max_seq_len=max(seq, 64), norm_router_c="one")
    if layers:
        cfg = cfg.replace(n_layers=layers, **({"num_experts": 8 * layers} if cfg.moe_mode == "pool" else {}))
    dtype = torch.float32 if suite.smoke else torch.bfloat16
    row: dict = {"preset": preset, "mode": mode, "M": cfg.num_experts if cfg.moe_mode == "pool" else None,
                 "batch": batch, "seq": seq, "tokens": batch * seq, "checkpointing": checkpointing}
    est = estimate_step_gb(cfg, mode, batch, seq, autocast=dtype == torch.bfloat16, optimizer=optimizer,
                           checkpointing=checkpointing)
    row["mem_estimate_gb"] = round(est["total"], 2)
    row["free_gb"], reason = memory_skip(est["total"], dev)
    if reason:
        row.update(status="skipped", reason=reason,
                   mem_estimate_parts_gb={k: round(v, 1) for k, v in est.items() if k != "total"})
        return row
    warmup = warmup if warmup is not None else (1 if suite.smoke else 2) + (2 if compile_model else 0)
    repeats = repeats or (2 if suite.smoke else 3)
    track = dev.type == "cuda" or memory_check
    row = guarded(lambda: _run_steps(suite, cfg, mode, batch, seq, dtype, checkpointing, optimizer, warmup,
                                     repeats, compile_model, track), dev, row)
    if compile_model:
        torch._dynamo.reset()  # the compiled graphs (and what their guards hold) go with the model
    free_memory(dev)  # a 182m model and its AdamW state: start the next case from a clean allocator
    growth, bound = row.get("mem_growth_per_step"), row.get("mem_growth_bound")
    if growth is not None and growth > bound:
        row.update(ok=False, status="failed",
                   error=f"memory grows {growth:.2f} {row['mem_unit']}/step from step {len(row['mem_trace']) // 2} "
                         f"to {len(row['mem_trace'])} (bound {bound} {row['mem_unit']}/step)")
    elif "error" not in row:
        row.update(status="ok", ok=True)
    return row


def _run_steps(suite: Suite, cfg, mode: str, batch: int, seq: int, dtype: torch.dtype, checkpointing: bool,
               optimizer: bool, warmup: int, repeats: int, compile_model: bool | str, track: bool) -> dict:
    """Build, then `warmup` + `repeats` synchronised steps; the memory probe runs after each (not timed)."""
    import train_step

    dev = suite.device
    torch.manual_seed(0)
    model = build_model(cfg, dev)
    model.train()
    model.set_execution(fused_pool_wgrad=mode == "fused", activation_checkpointing=checkpointing)
    tokens = batch * seq
    flops = train_step.model_flops_per_step(model, tokens, seq)
    step = train_step.make_step(model, batch, seq, dev, dtype, optimizer, compile_model)
    probe, unit, bound = memory_probe(dev)
    reset_peak(dev)
    times, trace = [], []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        step()
        sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        if track:
            trace.append(round(probe(), 3))
    peak = peak_bytes(dev)
    s = summarize(times)
    out = {"median_s": s["median_s"], "spread": s["spread"], "steps": warmup + repeats,
           "tok_per_s": tokens / s["median_s"], "tflops": flops / s["median_s"] / 1e12,
           "mfu": flops / s["median_s"] / suite.results.get("peak_flops", SPEC_PEAK_BF16),
           "mfu_spec": flops / s["median_s"] / SPEC_PEAK_BF16, "peak_gb": peak / 1e9 if peak else None}
    if track:
        out.update(mem_trace=trace, mem_unit=unit, mem_growth_bound=bound, mem_growth_per_step=growth_per_step(trace))
    return out


def describe(row: dict) -> str:
    """One line for the log, whatever the row holds."""
    if row.get("status") in ("skipped", "oom") or row.get("tok_per_s") is None:
        return f"{row.get('status', '?')}: {row.get('reason') or row.get('error') or ''}"
    text = f"{row['tok_per_s']:,.0f} tok/s, MFU {_f(row.get('mfu'))}"
    if row.get("mem_growth_per_step") is not None:
        text += f", memory {row['mem_growth_per_step']:+.2f} {row['mem_unit']}/step"
    return text + (f" -- FAIL: {row['error']}" if row.get("ok") is False else "")


def rows_ok(rows: list[dict]) -> bool:
    """A section passes unless a row failed (skipped rows do not count against it)."""
    return all(r.get("ok") is not False for r in rows)


def train_step_speed(suite: Suite, rec: dict) -> None:
    """182m and 469m: vanilla / UniPool naive / UniPool fused at the paper's micro-batch (16 x 1024), with
    the memory after each of 8 steps (a leak of the fused path once kept a bf16 pool copy per step)."""
    scales = [("debug", 2, 4, 32)] if suite.smoke else [("182m", None, 16, 1024), ("469m", None, 16, 1024)]
    rows = []
    for scale, layers, batch, seq in scales:
        for mode in ("vanilla", "naive", "fused"):
            if not suite.case_fits(7):  # build ~1-2 s + 8 steps of <= 0.5 s
                rec.setdefault("skipped", []).append(f"{scale}/{mode}")
                continue
            preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
                (f"vanilla-{scale}" if mode == "vanilla" else f"unipool-{scale}")
            row = {"scale": scale, **step_case(suite, preset, mode, batch, seq, layers=layers, memory_check=True,
                                               warmup=1 if suite.smoke else 2, repeats=5 if suite.smoke else 6)}
            rows.append(row)
            print(f"  {scale} {mode}: {describe(row)}", flush=True)
    for r in rows:
        base = next((b for b in rows if b["scale"] == r["scale"] and b["mode"] == "vanilla"), None)
        ok = r.get("tok_per_s") and base and base.get("tok_per_s")
        r["vs_vanilla"] = r["tok_per_s"] / base["tok_per_s"] if ok else None
    rec["rows"], rec["ok"] = rows, rows_ok(rows)


def compiled_step(suite: Suite, rec: dict) -> None:
    """182m UniPool under torch.compile: the plain pool gradient (no graph breaks in bf16) vs the fused one
    (two eager calls per layer), against eager fused from train_step. Decides which to use with compile."""
    preset, batch, seq = ("debug", 2, 32) if suite.smoke else ("unipool-182m", 16, 1024)
    rows = []
    for mode in ("naive", "fused"):
        if not suite.case_fits(40):  # an inductor compile of 12 layers fwd + bwd (~30 s cold) + 10 steps
            rec.setdefault("skipped", []).append(mode)
            continue
        row = step_case(suite, preset, mode, batch, seq, compile_model="aot_eager" if suite.smoke else True,
                        warmup=3 if suite.smoke else 4, repeats=5 if suite.smoke else 6, memory_check=True)
        rows.append(row)
        print(f"  compiled {mode}: {describe(row)}", flush=True)
    eager = next((r for r in suite.results["sections"].get("train_step", {}).get("rows", [])
                  if r.get("mode") == "fused" and r.get("scale") in ("182m", "debug") and r.get("tok_per_s")), None)
    for r in rows:
        r["vs_eager_fused"] = r["tok_per_s"] / eager["tok_per_s"] if eager and r.get("tok_per_s") else None
    rec["rows"], rec["ok"] = rows, rows_ok(rows)


FAMILY_ROWS = ("vanilla", "unipool", "cs-moe-k2", "tie-g2-e16", "unipool-depth", "rexmoe-r4")


def family_cost(suite: Suite, rec: dict) -> None:
    """The sharing family on the GPU: one design per relative (experiments/family-gpu.yaml's rows, the
    182m shape, vanilla's active FFN and expert budget) at the paper's micro-batch, bf16, the fused pool
    gradient: step time against vanilla and memory after every step (a design whose step leaks fails its
    row). The smoke runs experiments/family.yaml's rows (the CPU study's model) instead, without the memory
    trace (counting live tensors on the CPU costs more than the steps)."""
    import yaml

    from unipool.model.config import ModelConfig

    sys.path.insert(0, str(REPO / "experiments"))
    from study import variant_sections

    study = yaml.safe_load((REPO / "experiments" / ("family.yaml" if suite.smoke else "family-gpu.yaml")).read_text())
    batch, seq = (2, 32) if suite.smoke else (16, 1024)
    vocab = 4096 if suite.smoke else 50257  # padded to the file's vocab_multiple, as a run pads GPT-2's
    rows = []
    for name in FAMILY_ROWS:
        if not suite.case_fits(4):  # build ~1-2 s + 6 steps of ~0.3 s at 182m
            rec.setdefault("skipped", []).append(name)
            continue
        overrides = variant_sections(study["variants"][name])["model"]  # the train section sets LR groups only
        cfg = ModelConfig.from_dict({**study["base"]["model"], "vocab_size": vocab, **overrides})
        # memory after every step on CUDA (free there); the CPU smoke only checks that each design runs
        row = {"design": name, **step_case(suite, name, "fused", batch, seq, config=cfg,
                                           warmup=1 if suite.smoke else 2, repeats=2 if suite.smoke else 4)}
        rows.append(row)
        print(f"  {name}: {describe(row)}", flush=True)
    base = next((r for r in rows if r["design"] == "vanilla" and r.get("tok_per_s")), None)
    for r in rows:
        r["vs_vanilla"] = r["tok_per_s"] / base["tok_per_s"] if base and r.get("tok_per_s") else None
    rec["rows"], rec["ok"] = rows, rows_ok(rows)


def pool_wgrad_830m(suite: Suite, rec: dict) -> None:
    """The shared pool's weight gradient at the 830m shape (48 layers, M = 384): vanilla / naive / fused,
    forward + backward without the optimizer."""
    rows = []
    for mode in ("vanilla", "naive", "fused"):
        if not suite.case_fits(12):  # naive moves ~6 TB a step (~1.5-2 s) x 5 steps; the others < 0.5 s
            rec.setdefault("skipped", []).append(mode)
            continue
        preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
            ("vanilla-830m" if mode == "vanilla" else "unipool-830m")
        batch, seq = (2, 32) if suite.smoke else (8, 1024)
        rows.append(step_case(suite, preset, mode, batch, seq, optimizer=False, checkpointing=not suite.smoke))
        print(f"  830m {mode}: {describe(rows[-1])}", flush=True)
    rec["rows"], rec["ok"] = rows, rows_ok(rows)
    naive = next((r for r in rows if r["mode"] == "naive" and r.get("median_s")), None)
    fused = next((r for r in rows if r["mode"] == "fused" and r.get("median_s")), None)
    rec["fused_vs_naive"] = naive["median_s"] / fused["median_s"] if naive and fused else None
    rec["target"] = 2.0


def reduced_pool_memory(suite: Suite, rec: dict) -> None:
    """Peak memory of one training step at 182m with M = 96 / 64 / 48 (the paper's reduced pools)."""
    rows = []
    presets = [("debug", 8), ("debug", 6), ("debug", 4)] if suite.smoke else \
        [("unipool-182m", 96), ("unipool-182m-m64", 64), ("unipool-182m-m48", 48)]
    for preset, m in presets:
        if not suite.case_fits(5):
            rec.setdefault("skipped", []).append(f"M={m}")
            continue
        if suite.smoke:  # the debug preset with a smaller pool
            import unipool.presets as presets_mod
            base = presets_mod.PRESETS[preset]
            presets_mod.PRESETS[f"smoke-m{m}"] = dataclasses.replace(base, model=base.model.replace(num_experts=m))
            preset = f"smoke-m{m}"
        row = step_case(suite, preset, "naive", 2 if suite.smoke else 16, 32 if suite.smoke else 1024)
        rows.append({**row, "M": m})
        print(f"  M={m}: peak {_f(row.get('peak_gb'), '.1f')} GB, {describe(row)}", flush=True)
    rec["rows"], rec["ok"] = rows, rows_ok(rows)


def microbatch_sweep(suite: Suite, rec: dict) -> None:
    """The UniPool / vanilla step ratio at 182m from 4k to 64k tokens per micro-batch (activation
    checkpointing from 32k up), and the smallest micro-batch where fused UniPool is within 3% of vanilla."""
    seq = 32 if suite.smoke else 1024
    batches = [2, 4, 8] if suite.smoke else [4, 8, 16, 32, 64]
    rows = []
    for batch in batches:
        ckpt = not suite.smoke and batch * seq >= 32768
        row: dict = {"tokens": batch * seq, "checkpointing": ckpt}
        for mode in ("vanilla", "naive", "fused"):
            if not suite.case_fits(2.5):  # build ~1 s + 5 steps of 0.05-0.6 s
                rec.setdefault("skipped", []).append(f"{batch * seq}/{mode}")
                continue
            preset = ("debug-vanilla" if mode == "vanilla" else "debug") if suite.smoke else \
                ("vanilla-182m" if mode == "vanilla" else "unipool-182m")
            r = step_case(suite, preset, mode, batch, seq, checkpointing=ckpt, repeats=None if suite.smoke else 3)
            row[f"{mode}_tok_s"] = r.get("tok_per_s")
            if r.get("status") == "skipped":
                row.setdefault("skipped", {})[mode] = r["reason"]
            elif r.get("ok") is False:
                row.setdefault("errors", {})[mode] = r.get("error")
        for mode in ("naive", "fused"):
            if row.get(f"{mode}_tok_s") and row.get("vanilla_tok_s"):
                row[f"{mode}_vs_vanilla"] = row[f"{mode}_tok_s"] / row["vanilla_tok_s"]
        rows.append(row)
        print(f"  {row['tokens']} tokens: " + ", ".join(f"{k} {_f(v)}" for k, v in row.items() if k.endswith("_vanilla"))
              + (f" (failed: {', '.join(row['errors'])})" if row.get("errors") else ""), flush=True)
    rec["rows"] = rows
    rec["ok"] = not any(r.get("errors") for r in rows)
    within = [r["tokens"] for r in rows if (r.get("fused_vs_vanilla") or 0) >= 0.97]
    rec["smallest_within_3pct"] = min(within) if within else None


# ---- 4. a real run ---------------------------------------------------------------------------------

def real_run(suite: Suite, rec: dict) -> None:
    """The 182M UniPool and vanilla presets on the embedded corpus (Shakespeare) with the GPT-2 tokenizer."""
    steps = 8 if suite.smoke else 120  # 120 x 16k tokens: ~2M tokens, 1.5 passes over the plays
    runs = {}
    for preset in (("debug", "debug-vanilla") if suite.smoke else ("unipool-182m", "vanilla-182m")):
        if not suite.case_fits(25):  # 120 steps of <= 0.15 s, GPT-2 tokenization, eval, a ~9 GB final checkpoint
            rec.setdefault("skipped", []).append(preset)
            continue

        def one(preset=preset) -> dict:
            res = training_run(suite, preset=preset, steps=steps, batch=4 if suite.smoke else 16,
                               seq=32 if suite.smoke else 1024, tokenizer="gpt2", name=preset,
                               extra={"lr": 3e-3 if suite.smoke else 5e-4, "eval_tokens": 4096 if suite.smoke else 65536})
            s = res["summary"]
            return {"losses": res["losses"], "val_loss": s.get("val_loss"), "unigram_loss": s.get("unigram_loss"),
                    "tok_per_s": s.get("tok_per_s"), "params": s.get("params"), "steps": steps,
                    "active_params": s.get("active_params"), "ok": True}

        runs[preset] = guarded(one, suite.device, {"steps": steps})
        r = runs[preset]
        print(f"  {preset}: " + (f"val loss {_f(r.get('val_loss'))}, {_f(r.get('tok_per_s'), ',.0f')} tok/s"
                                 if r.get("ok") else f"{r['status']}: {r['error']}"), flush=True)
    rec["runs"], rec["ok"] = runs, rows_ok(list(runs.values()))
    curves = {name: r for name, r in runs.items() if r.get("losses")}
    if curves:
        plot_curves(curves, suite.out / "curves.png")


def prepare_scaling(suite: Suite, rec: dict) -> None:
    """`unipool prepare --workers N` against the tokenizer's one-thread batch encode (bench/prepare_speed.py),
    on this machine's cores: the worker scaling a 2-core development machine cannot measure. CPU only; the
    GPU idles. Target: per-worker efficiency (tok/s / N / one worker's tok/s) >= 0.7 at 8 workers."""
    import tempfile

    from prepare_speed import limit, run_prepare, write_corpus

    cores = os.cpu_count() or 1
    mb, counts = (0.2, [1, 2]) if suite.smoke else (40.0, [n for n in (1, 4, 8, 16) if n <= cores])
    rec.update(cores=cores, mb=mb, tokenizer="gpt2", rows=[])
    with tempfile.TemporaryDirectory(dir=suite.work) as tmp:
        files = write_corpus(Path(tmp) / "src", int(mb * 1e6))
        lim = limit(files, "gpt2")
        rec["limit_tok_per_s"] = lim["tokens"] / lim["seconds"]
        for n in counts:
            if not suite.case_fits(15.0, 10.0):
                rec.setdefault("skipped", []).append(n)
                continue
            r = run_prepare(files, Path(tmp) / f"out{n}", "gpt2", n)
            rec["rows"].append({"workers": n, "tok_per_s": r["tokens"] / r["seconds"], "seconds": r["seconds"]})
    if not rec["rows"]:  # the budget ran out after the limit: nothing to compare
        return
    one = rec["rows"][0]["tok_per_s"]
    for r in rec["rows"]:
        r["vs_limit_per_core"] = r["tok_per_s"] / r["workers"] / rec["limit_tok_per_s"]
        r["efficiency"] = r["tok_per_s"] / r["workers"] / one
    at8 = next((r for r in rec["rows"] if r["workers"] == 8), None)
    rec["ok"] = at8["efficiency"] >= 0.7 if at8 is not None else True


def plot_curves(runs: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in runs.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{name} (val {_f(r.get('val_loss'))})")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- results.md ------------------------------------------------------------------------------------

def _f(x, spec=".3f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _cell(text: object) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def _check(r: dict) -> str:
    """A row's verdict: PASS, FAIL (why), oom (message), or skipped (why)."""
    if r.get("status") == "skipped":
        return _cell(f"skipped: {r.get('reason', '')}")
    if r.get("status") == "oom":
        return _cell(f"oom: {r.get('error', '')}")
    if r.get("ok") is False:
        return _cell(f"FAIL: {r.get('error') or r.get('reason') or ''}")
    return "PASS" if r.get("ok") else "-"


def _growth(r: dict) -> str:
    g = r.get("mem_growth_per_step")
    return "-" if g is None else f"{g:+.2f} {r.get('mem_unit', '')}"


def markdown(results: dict) -> str:
    sec = results["sections"]
    lines = [f"# GPU suite ({results['mode']}), {results.get('elapsed_s', 0):.0f} s of a {results['budget_s']:.0f} s "
             f"budget (sections estimated at {_f(results.get('estimated_total_s'), '.0f')} s on an H200)", ""]
    if results.get("interrupted"):
        lines += [f"**Interrupted** by {results['interrupted'].get('signal')} "
                  f"in {results['interrupted'].get('section')}.", ""]
    lines += ["| section | status | estimated s | actual s | note |", "|---|---|---|---|---|"]
    for name, r in sec.items():
        note = _cell(r.get("reason") or r.get("error") or "")
        lines.append(f"| {name} | {r.get('status', 'running')} | {_f(r.get('estimate_s'), '.0f')} | "
                     f"{_f(r.get('seconds'), '.1f')} | {note} |")
    env = sec.get("environment", {})
    if env.get("gemm_tflops"):
        lines += ["", f"Environment: {env.get('gpu', 'CPU')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, "
                  f"transformers {env.get('transformers')}; measured {env.get('gemm_dtype')} GEMM "
                  f"{_f(env.get('gemm_tflops'), '.1f')} TFLOP/s, copy {_f(env.get('copy_gbps'), '.0f')} GB/s."]
    for name in ("dispatch_vs_reference", "fused_wgrad_vs_plain", "no_host_syncs", "compile_block", "loss_and_resume"):
        r = sec.get(name, {})
        if "ok" in r:
            detail = {k: v for k, v in r.items() if k not in ("status", "seconds", "estimate_s", "cases", "pool_rel_err")}
            lines.append(f"- {name}: {'PASS' if r['ok'] else 'FAIL'} {json.dumps(detail, default=str)[:400]}")
    m = sec.get("moe_layer", {})
    if m.get("rows"):
        lines += ["", f"## MoE layer fwd+bwd, {m.get('dtype')}, TFLOP/s (target: ours >= 0.9 x dense at the vanilla "
                  "shapes and >= 1.5 x the best HF block)", "",
                  "| shape | d | f | E | k | dense | ours | loop | HF Mixtral | HF OLMoE | HF Qwen3 | ours/dense | "
                  "ours/best HF | errors |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            errors = "; ".join(f"{v}: {e}" for v, e in (r.get("errors") or {}).items())
            lines.append(f"| {r.get('label')} | {r.get('d')} | {r.get('f')} | {r.get('E')} | {r.get('k')} | "
                         f"{_f(r.get('dense'), '.1f')} | {_f(r.get('ours'), '.1f')} | {_f(r.get('loop'), '.1f')} | "
                         f"{_f(r.get('hf-mixtral'), '.1f')} | {_f(r.get('hf-olmoe'), '.1f')} | "
                         f"{_f(r.get('hf-qwen3'), '.1f')} | {_f(r.get('ours_vs_dense'), '.2f')} | "
                         f"{_f(r.get('ours_vs_best_hf'), '.2f')} | {_cell(errors)[:300]} |")
    growth_note = (f"memory growth per step from step N/2 to N: FAIL above {GROWTH_BOUND_MB} MB/step on CUDA "
                   f"({GROWTH_BOUND_TENSORS} live tensors/step on the CPU smoke)")
    for name, title in (("train_step", "Training step (fwd + bwd + AdamW) at 16 x 1024 tokens; target MFU >= 0.40 at 469m"),
                        ("pool_wgrad_830m", "830m shape fwd + bwd (8 x 1024, checkpointing); target fused >= 2 x naive"),
                        ("reduced_pools", "Peak memory of reduced pools at 182m (16 x 1024)"),
                        ("family_cost", "The sharing family at 182m (16 x 1024, fused pool gradient): one design "
                                        "per relative, vanilla's active FFN and expert budget")):
        rows = sec.get(name, {}).get("rows")
        if rows:
            lines += ["", f"## {title}", "", f"({growth_note})", "",
                      "| preset | mode | M | tokens | tok/s | vs vanilla | MFU | MFU (989 spec) | peak GB | est. GB | "
                      "growth/step | check |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r.get('preset')} | {r.get('mode')} | {r.get('M') or '-'} | {r.get('tokens')} | "
                             f"{_f(r.get('tok_per_s'), ',.0f')} | {_f(r.get('vs_vanilla'))} | {_f(r.get('mfu'))} | "
                             f"{_f(r.get('mfu_spec'))} | {_f(r.get('peak_gb'), '.1f')} | "
                             f"{_f(r.get('mem_estimate_gb'), '.1f')} | {_growth(r)} | {_check(r)} |")
    rows = sec.get("compiled_step", {}).get("rows")
    if rows:
        lines += ["", "## torch.compile, UniPool 182m (16 x 1024): plain vs fused pool gradient", "", f"({growth_note})", "",
                  "| mode | tok/s | vs eager fused | MFU | peak GB | est. GB | growth/step | check |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| compiled {r.get('mode')} | {_f(r.get('tok_per_s'), ',.0f')} | {_f(r.get('vs_eager_fused'))} | "
                         f"{_f(r.get('mfu'))} | {_f(r.get('peak_gb'), '.1f')} | {_f(r.get('mem_estimate_gb'), '.1f')} | "
                         f"{_growth(r)} | {_check(r)} |")
    p = sec.get("pool_wgrad_830m", {})
    if p.get("fused_vs_naive"):
        lines.append(f"\nfused / naive at 830m: {p['fused_vs_naive']:.2f}x (target 2x)")
    s = sec.get("microbatch_sweep", {})
    if s.get("rows"):
        lines += ["", "## UniPool / vanilla step ratio vs micro-batch at 182m (target: fused within 3%)", "",
                  "| tokens | checkpointing | vanilla tok/s | naive / vanilla | fused / vanilla | not measured |",
                  "|---|---|---|---|---|---|"]
        for r in s["rows"]:
            missing = {**(r.get("skipped") or {}), **(r.get("errors") or {})}
            lines.append(f"| {r.get('tokens')} | {r.get('checkpointing')} | {_f(r.get('vanilla_tok_s'), ',.0f')} | "
                         f"{_f(r.get('naive_vs_vanilla'))} | {_f(r.get('fused_vs_vanilla'))} | "
                         f"{_cell('; '.join(f'{k}: {v}' for k, v in missing.items()))[:300]} |")
        lines.append(f"\nsmallest micro-batch with fused within 3% of vanilla: {s.get('smallest_within_3pct')}")
    ps = sec.get("prepare_scaling", {})
    if ps.get("rows"):
        lines += ["", f"## `unipool prepare --workers N`, {ps.get('mb')} MB, GPT-2 BPE, {ps.get('cores')} cores "
                  f"(limit: one-thread batch encode, {_f(ps.get('limit_tok_per_s'), ',.0f')} tok/s; "
                  "target: efficiency >= 0.7 at 8 workers)", "",
                  "| workers | tok/s | per core vs limit | efficiency vs 1 worker | s |", "|---|---|---|---|---|"]
        for r in ps["rows"]:
            lines.append(f"| {r.get('workers')} | {_f(r.get('tok_per_s'), ',.0f')} | {_f(r.get('vs_limit_per_core'), '.2f')} | "
                         f"{_f(r.get('efficiency'), '.2f')} | {_f(r.get('seconds'), '.1f')} |")
    rr = sec.get("real_run", {}).get("runs")
    if rr:
        lines += ["", "## Real run (embedded corpus, GPT-2 tokenizer)", "", "| preset | steps | val loss | unigram | tok/s | check |",
                  "|---|---|---|---|---|---|"]
        for name, r in rr.items():
            lines.append(f"| {name} | {r.get('steps')} | {_f(r.get('val_loss'))} | {_f(r.get('unigram_loss'))} | "
                         f"{_f(r.get('tok_per_s'), ',.0f')} | {_check(r)} |")
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------------

# (name, estimated seconds on one H200, function), in order of priority. The estimates include each
# section's first CUDA calls and compile warm-ups; they add up to 476 s, so --budget-s 480 runs them all.
SECTIONS: list[tuple[str, float, Callable[[Suite, dict], None]]] = [
    ("environment", 15, environment),  # CUDA context + cuBLAS init, transformers import, 25 GEMMs of 8192^3
    ("dispatch_vs_reference", 10, dispatch_vs_reference),  # 3 shapes x 2 dtypes, 4096 tokens
    ("fused_wgrad_vs_plain", 8, fused_wgrad_vs_plain),  # two 6-layer models, 2 micro-batches each
    ("no_host_syncs", 8, no_host_syncs),  # 2 routers x 2 dtypes, one layer
    ("compile_block", 35, compile_block),  # dynamo explain + one cold inductor compile of a block (fwd + bwd)
    ("loss_and_resume", 25, loss_falls_and_resume),  # BPE-8192 training, 30 demo steps, 3 evals, 3 small checkpoints
    ("moe_layer", 50, moe_layer_speed),  # 14 shapes x <= 6 variants, ~0.5 s each
    ("train_step", 35, train_step_speed),  # 5 cases (469m naive needs ~200 GB: skipped), 8 steps each
    ("microbatch_sweep", 40, microbatch_sweep),  # 15 cases at 182m, 4k-64k tokens, 5 steps each
    ("pool_wgrad_830m", 35, pool_wgrad_830m),  # naive ~2 s a step x 5, vanilla and fused well under 1 s
    ("reduced_pools", 15, reduced_pool_memory),  # 3 cases at 182m
    ("real_run", 50, real_run),  # 2 x 120 steps of 16k tokens + tokenization, eval, a ~9 GB final checkpoint
    ("compiled_step", 80, compiled_step),  # two inductor compiles of the 182m model (~30-40 s each) + 9 steps
    ("family_cost", 25, family_cost),  # 6 designs at 182m: build ~1-2 s + 6 steps of ~0.3-0.5 s each
    ("prepare_scaling", 45, prepare_scaling),  # CPU only: 40 MB tokenized once in one thread, then 1/4/8/16 workers
]


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
    only = set(args.only.split(",")) if args.only else None
    chosen = [(name, estimate, fn) for name, estimate, fn in SECTIONS if not only or name in only]
    suite.results["estimated_total_s"] = sum(estimate for _, estimate, _ in chosen)
    install_signal_handlers()
    try:
        for name, estimate, fn in chosen:
            with suite.section(name, 1 if args.cpu_smoke else estimate) as rec:
                if rec is not None:
                    fn(suite, rec)
    except Interrupted as e:
        where = next((n for n, r in suite.results["sections"].items() if r.get("status") == "interrupted"),
                     "between sections")
        suite.results["interrupted"] = {"signal": e.signal_name, "section": where, "detail": str(e)}
        suite.write()
        print(f"\ninterrupted ({e}) in {where}; wrote {args.out / 'results.json'}", flush=True)
        return 128 + int(signal.Signals[e.signal_name])
    suite.write()
    failed = [n for n, r in suite.results["sections"].items() if r.get("status") == "failed" or r.get("ok") is False]
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'results.md'}; "
          + (f"FAILED: {', '.join(failed)}" if failed else "no failures"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
