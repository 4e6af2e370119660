"""Run a whole reproduction study: every variant x every seed, then one results table.

    python experiments/study.py experiments/cpu.yaml --jobs 2   # runs, resumes, skips finished runs
    python experiments/study.py experiments/cpu.yaml --report   # only (re)build the table and plots
    python experiments/study.py experiments/cpu.yaml --steps 20 --out runs/smoke   # a quick smoke run

A study file holds `base` (a run config: model/train/data sections, as in a run's config.json),
`variants` (name -> model field overrides) and `seeds`. Each (variant, seed) is one `unipool train`
run in OUT/<variant>-s<seed>, launched as its own process. A run with a summary.json is finished
and skipped; a run with checkpoints but no summary is resumed from its latest checkpoint, so the
study can be interrupted (Ctrl-C) and started again with the same command.

The report (OUT/results.md, OUT/results.json, loss curves, routing plots of seed 0) gives, per
variant, mean +- std over seeds of the final validation loss and perplexity, with the expert budget
relative to the matched vanilla model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from unipool.config import ModelConfig
from unipool.params import param_report


def load_study(path: Path) -> dict:
    study = yaml.safe_load(path.read_text())
    for key in ("base", "variants", "seeds"):
        if key not in study:
            sys.exit(f"error: {path} has no '{key}' section")
    return study


def run_config(study: dict, variant: str, seed: int, steps: int | None) -> dict:
    base = study["base"]
    cfg = {section: dict(base.get(section, {})) for section in ("model", "train", "data")}
    cfg["model"].update(study["variants"][variant])
    cfg["train"]["seed"] = seed
    if steps is not None:  # smoke runs: same study, fewer steps
        cfg["train"].update(steps=steps, eval_interval=0, ckpt_interval=0, routing_interval=0)
    return cfg


def run_one(out: Path, name: str, cfg: dict, threads: int | None = None) -> str:
    run_dir = out / name
    if (run_dir / "summary.json").is_file():
        return "done"
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / f"{name}.config.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    cmd = [sys.executable, "-m", "unipool.train", "--config", str(cfg_path),
           "--train.out-dir", str(out), "--train.run-name", name, "--train.progress", "false"]
    if (run_dir / "checkpoints" / "LATEST").is_file():
        cmd = [sys.executable, "-m", "unipool.train", "--resume", str(run_dir), "--train.progress", "false"]
        state = "resumed"
    elif run_dir.exists():  # started but never checkpointed: start again from scratch
        import shutil

        shutil.rmtree(run_dir)
        state = "restarted"
    else:
        state = "trained"
    t0 = time.time()
    log = (out / f"{name}.log").open("a")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:  # parallel runs: split the cores instead of oversubscribing them
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
    return f"{state} in {time.time() - t0:.0f} s"


def mean_std(xs: list[float]) -> tuple[float, float]:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def report(study: dict, out: Path) -> str:
    rows, curves = [], []
    for variant, overrides in study["variants"].items():
        summaries = []
        for seed in study["seeds"]:
            path = out / f"{variant}-s{seed}" / "summary.json"
            if path.is_file():
                summaries.append(json.loads(path.read_text()))
                curves.append(out / f"{variant}-s{seed}")
        cfg = ModelConfig.from_dict({**study["base"].get("model", {}), **overrides})
        params = param_report(cfg)
        losses = [s["val_loss"] for s in summaries if s.get("val_loss") is not None]
        row = {"variant": variant, "seeds": len(losses), "moe_mode": cfg.moe_mode, "router": cfg.router,
               "experts_per_pool": cfg.n_routed_experts, "n_pools": cfg.n_pools,
               "expert_budget": params["expert_budget_vs_matched_vanilla"], "total_params": params["total"],
               "active_params": params["active"], "tokens": summaries[0]["tokens"] if summaries else None,
               "wall_time_s": sum(s.get("wall_time_s", 0) for s in summaries)}
        if losses:
            row["val_loss_mean"], row["val_loss_std"] = mean_std(losses)
            row["val_ppl_mean"], row["val_ppl_std"] = mean_std([math.exp(x) for x in losses])
            row["val_losses"] = losses
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "vanilla" and "val_loss_mean" in r), None)
    lines = ["| variant | mode | router | experts/pool x pools | expert budget | seeds | val loss (mean ± std) "
             "| Δ vs vanilla | val ppl (mean ± std) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "val_loss_mean" in r:
            delta = f"{r['val_loss_mean'] - base['val_loss_mean']:+.4f}" if base else "–"
            loss = f"{r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f}"
            ppl = f"{r['val_ppl_mean']:.2f} ± {r['val_ppl_std']:.2f}"
        else:
            delta = loss = ppl = "not run"
        lines.append(f"| {r['variant']} | {r['moe_mode']} | {r['router']} | {r['experts_per_pool']} x {r['n_pools']} "
                     f"| {100 * r['expert_budget']:.1f}% | {r['seeds']} | {loss} | {delta} | {ppl} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table + "\n")
    if curves:
        from unipool.report import compare

        compare(curves, out / "report")
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path, help="study YAML (experiments/cpu.yaml, experiments/gpu.yaml)")
    p.add_argument("--out", type=Path, help="output directory (default: the study's out_dir)")
    p.add_argument("--steps", type=int, help="override the step count of every run (smoke test)")
    p.add_argument("--only", nargs="+", help="run only these variants")
    p.add_argument("--report", action="store_true", help="do not train; rebuild the report from finished runs")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each with cores/jobs threads (small models use cores better this way)")
    args = p.parse_args()
    if not args.study.is_file():
        sys.exit(f"error: study file not found: {args.study}")
    study = load_study(args.study)
    out = args.out or Path(study.get("out_dir", f"runs/{args.study.stem}"))
    unknown = set(args.only or []) - set(study["variants"])
    if unknown:
        sys.exit(f"error: unknown variant(s) {', '.join(sorted(unknown))}")
    if not args.report:
        if args.jobs < 1:
            sys.exit("error: --jobs must be >= 1")
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        # seed-major: a partial study already has every variant once
        names = [(f"{v}-s{seed}", v, seed) for seed in study["seeds"] for v in study["variants"]
                 if not args.only or v in args.only]
        t0 = time.time()
        if names:  # tokenize once here, so parallel runs never prepare the same data directory together
            from unipool.distributed import DistInfo
            from unipool.train import prepare_data
            from unipool.train_config import apply_dict, default_config

            prepare_data(apply_dict(default_config(), run_config(study, names[0][1], names[0][2], args.steps)),
                         DistInfo())

        def launch(item: tuple[str, str, int]) -> None:
            name, variant, seed = item
            result = run_one(out, name, run_config(study, variant, seed, args.steps), threads)
            print(f"[{time.time() - t0:7.0f} s] {name}: {result}", flush=True)

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            try:
                for fut in [pool.submit(launch, item) for item in names]:
                    fut.result()
            except RuntimeError as e:
                pool.shutdown(cancel_futures=True)
                sys.exit(f"error: {e}")
        print(f"study finished in {time.time() - t0:.0f} s")
    print(report(study, out))
    print(f"\nreport: {out / 'results.md'}, plots in {out / 'report'}")


if __name__ == "__main__":
    main()
