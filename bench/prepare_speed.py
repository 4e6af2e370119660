"""Speed of `unipool prepare` against its limit, the tokenizer library's own batch encode.

    python bench/prepare_speed.py --mb 20 --workers 1,2

The text: Shakespeare's plays (the default corpus, scenes as documents) repeated to `--mb` megabytes, as
several .txt files. The limit, per core: `tokenizers`' batch encode of the same documents in one process
with one thread (TOKENIZERS_PARALLELISM=false), after reading them into memory (reading is not counted).
Each `prepare` runs end to end (both passes over the files, tokenizing, writing the shards and the index)
in a fresh child process with `--workers N`. Reports tokens/s, MB/s, the ratio to the limit per core and
the scaling with workers, and writes JSON (bench/results/prepare_speed_cpu.json by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import meta, print_table, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def python_path() -> str:
    """This checkout first, then whatever PYTHONPATH already holds (the GPU machine's unpacked wheels)."""
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def write_corpus(root: Path, n_bytes: int) -> list[Path]:
    """Copies of the default corpus's plays, up to `n_bytes` in all."""
    from unipool.data.corpus import default_corpus_files

    plays = default_corpus_files()
    out, written, i = [], 0, 0
    root.mkdir(parents=True, exist_ok=True)
    while written < n_bytes:
        src = plays[i % len(plays)]
        dst = root / f"{i:04d}-{src.name}"
        data = src.read_bytes()
        dst.write_bytes(data)
        out.append(dst)
        written += len(data)
        i += 1
    return out


def limit(files: list[Path], tokenizer: str) -> dict:
    """One-thread batch encode of every document of `files` (read first, not timed), in pieces as prepare
    hands them to the tokenizer."""
    code = f"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
from unipool.data.corpus import PIECE_CHARS, iter_pieces
from unipool.data.tokenizer import get_tokenizer
tok = get_tokenizer({tokenizer!r})
files = [l for l in sys.argv[1:]]
pieces = [p for _, p, _ in iter_pieces([__import__("pathlib").Path(f) for f in files])]
batches, batch, n = [], [], 0
for p in pieces:
    if batch and n + len(p) > PIECE_CHARS:
        batches.append(batch)
        batch, n = [], 0
    batch.append(p)
    n += len(p)
batches.append(batch)
t0 = time.perf_counter()
tokens = sum(len(ids) for b in batches for ids in tok.encode_text(b))
dt = time.perf_counter() - t0
print(json.dumps({{"tokens": tokens, "seconds": dt, "chars": sum(map(len, pieces))}}))
"""
    out = subprocess.run([sys.executable, "-c", code, *map(str, files)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": python_path()})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_prepare(files: list[Path], out: Path, tokenizer: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "unipool.cli", "prepare", *map(str, files), "--out", str(out), "--tokenizer",
           tokenizer, "--workers", str(workers)]
    t0 = time.perf_counter()
    subprocess.run(cmd, capture_output=True, text=True, check=True,
                   env={**os.environ, "PYTHONPATH": python_path(), "TOKENIZERS_PARALLELISM": "false"})
    dt = time.perf_counter() - t0
    index = json.loads((out / "index.json").read_text())
    tokens = sum(s["n_tokens"] for s in index["splits"].values())
    return {"tokens": tokens, "seconds": dt}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=20, help="megabytes of text")
    p.add_argument("--workers", default="1,2", help="comma list of --workers values")
    p.add_argument("--tokenizer", default="gpt2")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "prepare_speed_cpu.json")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_corpus(Path(tmp) / "src", int(args.mb * 1e6))
        n_bytes = sum(f.stat().st_size for f in files)
        lim = limit(files, args.tokenizer)
        lim_rate = lim["tokens"] / lim["seconds"]
        rows = [{"case": "limit: tokenizers batch encode, 1 thread", "workers": 1, "tokens": lim["tokens"],
                 "seconds": lim["seconds"], "tok_per_s": lim_rate, "mb_per_s": n_bytes / 1e6 / lim["seconds"],
                 "vs_limit_per_core": 1.0}]
        for w in [int(x) for x in args.workers.split(",")]:
            r = run_prepare(files, Path(tmp) / f"out{w}", args.tokenizer, w)
            rate = r["tokens"] / r["seconds"]
            rows.append({"case": "unipool prepare (end to end)", "workers": w, "tokens": r["tokens"],
                         "seconds": r["seconds"], "tok_per_s": rate, "mb_per_s": n_bytes / 1e6 / r["seconds"],
                         "vs_limit_per_core": rate / w / lim_rate})
            print(f"workers {w}: {rate:,.0f} tok/s", flush=True)
    one = next(r["tok_per_s"] for r in rows if r["case"].startswith("unipool") and r["workers"] == 1)
    for r in rows:
        r["scaling_vs_1_worker"] = r["tok_per_s"] / one if r["case"].startswith("unipool") else None
    print(f"\n{n_bytes / 1e6:.1f} MB of text, tokenizer {args.tokenizer}, {os.cpu_count()} cores")
    print_table(rows, [("case", "case", "s"), ("workers", "workers", "d"), ("tok_per_s", "tok/s", ",.0f"),
                       ("mb_per_s", "MB/s", ".2f"), ("vs_limit_per_core", "per core vs limit", ".2f"),
                       ("scaling_vs_1_worker", "vs 1 worker", ".2f"), ("seconds", "s", ".1f")])
    import torch

    cpu = torch.device("cpu")
    write_json(args.json, "prepare_speed", cpu, {"meta": {**meta(cpu, None, args), "mb": n_bytes / 1e6,
                                                          "cores": os.cpu_count()}, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
