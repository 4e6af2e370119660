"""Peak memory of `unipool prepare` on one large single-line document (a plain .txt without form feeds
or newlines: a single document, the worst case for memory).

    python bench/prepare_memory.py --sizes 10,100 --workers 1,2

For each size (MB) it writes English text (Python's own documentation, newlines turned into spaces,
repeated) as one line, runs `unipool prepare FILE --out DIR --tokenizer gpt2 --workers W` in a child
process and reports wall time, the child's peak RSS (getrusage of the child: the largest single process
of the tree) and the peak of the whole process tree's summed PSS (proportional set size: pages shared by
forked workers counted once; sampled every 50 ms with psutil, so a shorter peak can be missed).
`--bpe N` measures `--tokenizer bpe:N` instead (BPE training on the file, then tokenizing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def write_one_line(path: Path, n_bytes: int) -> None:
    from pydoc_data.topics import topics

    block = " ".join(topics[k] for k in sorted(topics)).replace("\n", " ").encode()
    with open(path, "wb") as f:
        written = 0
        while written < n_bytes:
            chunk = block[: n_bytes - written]
            f.write(chunk)
            written += len(chunk)


def run_prepare(src: Path, out: Path, tokenizer: str, workers: int) -> dict:
    try:
        import psutil
    except ImportError:
        psutil = None
    cmd = [sys.executable, "-m", "unipool.cli", "prepare", str(src), "--out", str(out), "--tokenizer", tokenizer,
           "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    tree_peak = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if psutil is not None:
            try:
                p = psutil.Process(proc.pid)
                tree = [p, *p.children(recursive=True)]
                total = 0
                for q in tree:
                    try:
                        total += q.memory_full_info().pss
                    except psutil.Error:
                        pass
                tree_peak = max(tree_peak, total)
            except psutil.Error:
                pass
        time.sleep(0.05)
    wall = time.time() - t0
    peak = usage.ru_maxrss * 1024  # the child's, or a reaped worker's if larger
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": wall, "peak_rss": peak, "tree_peak_rss": tree_peak,
            "out": proc.stdout.read().decode().strip().splitlines()[:1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10,100", help="document sizes in MB, comma-separated")
    p.add_argument("--workers", default="1", help="tokenizer processes to try, comma-separated")
    p.add_argument("--bpe", type=int, default=0, help="train a bpe:N tokenizer instead of using gpt2")
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary directory)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for mb in [int(x) for x in args.sizes.split(",")]:
            src = Path(tmp) / f"one_line_{mb}mb.txt"
            write_one_line(src, mb * 1_000_000)
            for w in [int(x) for x in args.workers.split(",")]:
                out = Path(tmp) / f"out_{mb}_{w}"
                r = run_prepare(src, out, f"bpe:{args.bpe}" if args.bpe else "gpt2", w)
                print(f"{mb:>5} MB  workers {w}  rc {r['rc']}  {r['wall_s']:7.1f} s  peak RSS "
                      f"{r['peak_rss'] / 2**20:7.0f} MiB (largest process)  PSS {r['tree_peak_rss'] / 2**20:7.0f} MiB "
                      f"(all processes)  {' '.join(r['out'])}", flush=True)
            src.unlink()


if __name__ == "__main__":
    main()
