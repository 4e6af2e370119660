"""The end of a run: its figures (validation loss against the unigram baseline, speed, memory, a sample),
RUN/report.png, and the screen a finished run prints."""

from __future__ import annotations

import math
import resource
import sys
from pathlib import Path

import torch

from unipool.analysis.generate import generate
from unipool.analysis.report import measure, plot_report, report_data
from unipool.config import RunConfig
from unipool.data.dataset import eval_batches, unigram_loss
from unipool.run import Run


def peak_rss_bytes() -> int:
    """Peak resident set size of this process. On Linux the high-water mark of its own memory map (VmHWM):
    getrusage's ru_maxrss survives exec, so a run started by a large parent process (a test runner, a
    study) would report the parent's size instead of its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def finish(run: RunConfig, model, tokenizer, train_ds, val_ds, val_loss: float, amp, device, tok_s: float) -> dict:
    """The end-of-run figures: validation loss against the unigram baseline, speed, memory, a sample."""
    tc = run.train
    unigram = unigram_loss(train_ds, val_ds)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    counts = model.param_counts()
    text = generate(model, tokenizer, tc.sample_prompt, tc.sample_tokens, temperature=0.8, top_k=50,
                    seed=tc.seed) if tc.sample_tokens else ""
    return {
        "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50)), "unigram_loss": unigram,
        "unigram_ppl": math.exp(unigram), "tok_per_s": round(tok_s, 1), "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None,
        "cpu_time_s": round(usage.ru_utime + usage.ru_stime, 1), "precision": "bf16" if amp else "fp32",
        "params": counts["total"], "active_params": counts["active"], "sample": tc.sample_prompt + text,
    }


def write_end_report(run_dir: Path, model, val_ds, batch_size: int, seq_len: int, is_main: bool,
                     summary: dict) -> Path | None:
    """RUN/report.png from the finished model (every rank measures: FSDP2 forwards are collective; rank 0
    draws). A failure to draw is a warning, never a lost run."""
    measured = measure(model, eval_batches(val_ds, batch_size, seq_len))
    if not is_main:
        return None
    try:
        return plot_report(report_data(Run.open(run_dir), model, measured, summary),
                                      run_dir / "report.png")
    except Exception as e:  # noqa: BLE001 - the run is saved; the picture is a convenience
        print(f"warning: could not write the run report ({type(e).__name__}: {e}); "
              f"try: unipool report {run_dir}", file=sys.stderr)
        return None


def _shown(path: Path | str) -> str:
    """`path` relative to the working directory when it is below it (what a user would type)."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def end_screen(run: RunConfig, summary: dict) -> str:
    """What a finished run prints: how good the model is, a sample, where the picture is, what next."""
    minutes, seconds = divmod(round(summary["wall_time_s"]), 60)
    took = f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
    run_dir = _shown(summary["run_dir"])
    gap = summary["unigram_loss"] - summary["val_loss"]
    lines = [
        "",
        f"finished {run.preset_label()} in {took}: {summary['step']} steps, {summary['tokens']:,} tokens, "
        f"{summary['tok_per_s']:,.0f} tokens/s, peak memory {summary['peak_rss_mb']:,.0f} MB",
        "",
        f"  validation loss   {summary['val_loss']:.3f}   (perplexity {summary['val_ppl']:,.1f})",
        f"  unigram baseline  {summary['unigram_loss']:.3f}   (perplexity {summary['unigram_ppl']:,.1f}: "
        "token frequencies alone, no context)",
        f"  the model is {gap:.2f} nats/token better than the baseline" if gap > 0 else
        "  the model is not better than the baseline yet: train longer or lower the learning rate",
    ]
    if summary.get("sample"):
        lines += ["", "  sample (temperature 0.8, top-k 50):", ""]
        lines += ["    " + ln for ln in summary["sample"].strip("\n").splitlines()]
    lines += ["", f"  run directory: {run_dir}"]
    if summary.get("report"):
        lines += [f"  report:        {_shown(summary['report'])}  (loss curves, expert usage, dead rows, router scale)"]
    lines += ["", "next:"]
    nxt = [(f"unipool routing {run_dir}", "how every layer uses the experts (plots, routing.json)"),
           (f"unipool generate {run_dir} --prompt 'JULIET:'", "more text from the model")]
    runs_dir = Path(_shown(run.train.out_dir))
    if run.preset == "demo":
        nxt += [("unipool train --preset demo-vanilla", "the per-layer MoE baseline, same data and budget"),
                (f"unipool compare {run_dir} {runs_dir / 'demo-vanilla-*'}", "both side by side (after that run)")]
    elif run.preset == "demo-vanilla":
        nxt += [("unipool train", "the UniPool demo, same data and budget"),
                (f"unipool compare {run_dir} {runs_dir / 'demo-2*'}", "both side by side (after that run)")]
    width = max(len(cmd) for cmd, _ in nxt) + 3
    lines += [f"  {cmd:<{width}}{why}" for cmd, why in nxt]
    return "\n".join(lines)
