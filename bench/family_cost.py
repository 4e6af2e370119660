"""The cost of each design of a study file, side by side in one run: training-step time and peak memory.

    python bench/family_cost.py                                  # experiments/family.yaml, CPU, fp32
    python bench/family_cost.py --study experiments/cpu2.yaml --rounds 3

Every variant's model (the study's base model with the variant's overrides, vocabulary 4,096 as the study's
tokenizer gives it) runs full training steps (forward, backward, AdamW, with the run's execution defaults:
the fused pool gradient where experts are shared) on the study's batch (batch_size x seq_len tokens), each
variant in a fresh process so that its peak RSS (VmHWM) is its own. The variants are measured in `--rounds`
rounds, one after another in each round, so a change in the machine's load falls on all of them alike;
a variant's time is the median over rounds of its per-round median. Ratios are to vanilla.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import meta, print_table, process_peak_rss, summarize, time_fn, write_json  # noqa: E402
from study import run_config, variant_sections  # noqa: E402

from unipool.config import run_config_from_dict  # noqa: E402
from unipool.model.model import build_model  # noqa: E402
from unipool.train.loop import param_groups, set_lr  # noqa: E402


def one_variant(study_path: Path, variant: str, steps: int, warmup: int) -> dict:
    """Runs in the child process: `steps` timed training steps of one variant."""
    study = yaml.safe_load(study_path.read_text())
    raw = run_config(study, variant, 0, None)
    raw["model"]["vocab_size"] = 4096
    cfg = run_config_from_dict(raw)
    tc = cfg.train
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.set_execution(dispatch=cfg.exec.dispatch, fused_pool_wgrad=cfg.exec.fused_pool_wgrad)
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, tc.weight_decay, tc.shared_expert_lr_power), lr=tc.lr, fused=True)
    set_lr(optimizer, tc.lr)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4096, (tc.batch_size, tc.seq_len + 1), generator=gen)
    progress = iter(range(10**9))

    def step():
        model.set_router_progress(min(1.0, next(progress) / max(steps + warmup, 1)))
        out = model(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        model.update_routing_state(out)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = time_fn(step, torch.device("cpu"), steps, warmup)
    counts = model.param_counts()
    return {"variant": variant, "times": times, "tokens": tc.batch_size * tc.seq_len, "total": counts["total"],
            "active": counts["active"], "peak_rss_bytes": process_peak_rss()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", type=Path, default=REPO / "experiments" / "family.yaml")
    p.add_argument("--steps", type=int, default=5, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/family_cost_cpu.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(one_variant(args.study, args.child, args.steps, args.warmup)))
        return 0
    if not args.study.is_file():
        sys.exit(f"error: study file not found: {args.study}")
    study = yaml.safe_load(args.study.read_text())
    variants = list(study["variants"])
    if "vanilla" not in variants:
        sys.exit(f"error: {args.study} has no 'vanilla' row: the costs are ratios to it")
    device = torch.device("cpu")
    started = meta(device, torch.float32, args)  # date, commit and load average before the rounds
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    for round_ in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--study", str(args.study), "--child", v, "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
            runs[v].append(json.loads(next(line[7:] for line in out.splitlines() if line.startswith("RESULT "))))
            print(f"round {round_ + 1}/{args.rounds}: {v} {statistics.median(runs[v][-1]['times']):.3f} s/step",
                  flush=True)
    rows = []
    for v in variants:
        per_round = [statistics.median(r["times"]) for r in runs[v]]
        first = runs[v][0]
        rows.append({"variant": v, **summarize(per_round), "tok_per_s": first["tokens"] / statistics.median(per_round),
                     "peak_rss_mb": max(r["peak_rss_bytes"] for r in runs[v]) / 2**20, "total": first["total"],
                     "active": first["active"], "per_round_median_s": per_round,
                     "moe_mode": variant_sections(study["variants"][v])["model"].get("moe_mode"),
                     "overrides": study["variants"][v],  # what was measured, to tell a stale row
                     "config": run_config(study, v, 0, None)})
    base = next(r for r in rows if r["variant"] == "vanilla")  # checked above
    for r in rows:
        r["time_vs_vanilla"] = r["median_s"] / base["median_s"]
        r["memory_vs_vanilla"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    print_table(rows, [("variant", "variant", ""), ("median_s", "s/step", ".3f"), ("time_vs_vanilla", "x vanilla", ".2f"),
                       ("tok_per_s", "tok/s", ".0f"), ("peak_rss_mb", "peak RSS MB", ".0f"),
                       ("memory_vs_vanilla", "x vanilla", ".2f"), ("total", "params", ",d"), ("active", "active", ",d")])
    write_json(args.json, "family_cost", device, {"meta": started, "study": str(args.study),
                                                  "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
