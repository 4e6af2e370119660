"""Shared helpers for the benchmarks: device and dtype choice, timing, memory, table and JSON output."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cuda | cpu | auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="compute dtype; auto: bf16 on GPU, fp32 on CPU (bf16 GEMMs on an AVX2-only CPU are "
                        "5-100x slower than fp32)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default: 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up runs (default: 3 GPU, 1 CPU)")
    p.add_argument("--json", type=Path, default=None, help="write the results here (default: bench/results/NAME_DEVICE.json)")


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    gpu = device.type == "cuda"
    args.repeats = args.repeats or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if gpu else "fp32")
    return device, {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall seconds of each of `repeats` calls after `warmup` calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def summarize(times: list[float]) -> dict[str, float]:
    med = statistics.median(times)
    return {"median_s": med, "min_s": min(times), "max_s": max(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0, "n": len(times)}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak allocated bytes since `reset_peak` (CUDA); None on CPU (see `process_peak_rss`)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def process_peak_rss() -> int:
    """Peak RSS of this process in bytes (VmHWM: a child's own, not its parent's; see peak_rss_bytes)."""
    from unipool.train.summary import peak_rss_bytes

    return peak_rss_bytes()


def git_commit() -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout
    (the GPU machine gets a copy of the working tree, which may have no .git)."""
    root = Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        if Path(top).resolve() != root:  # a copy inside some other checkout: its commit is not ours
            return None
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def meta(device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "commit": git_commit(), "device": device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "torch": torch.__version__, "load_avg_1m": os.getloadavg()[0],
            "args": {k: str(v) for k, v in vars(args).items()}}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec); missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(line, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def write_json(path: Path | None, name: str, device: torch.device, payload: dict, quiet: bool = False) -> Path:
    path = path or Path(__file__).parent / "results" / f"{name}_{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    if not quiet:
        print(f"wrote {path}")
    return path
