"""Run a whole reproduction study: every variant x every seed, then one results table.

    python experiments/study.py experiments/cpu.yaml --jobs 2   # runs, resumes, skips finished runs
    python experiments/study.py experiments/cpu.yaml --report   # only (re)build the table and plots
    python experiments/study.py experiments/cpu.yaml --steps 20 --out runs/smoke   # a quick smoke run
    python experiments/study.py experiments/cpu2.yaml --plan     # check every run's config, list what is left

A study file holds `base` (a run config: model/train/data sections, as in a run's config.json),
`variants` (name -> model field overrides; a key naming a section, `train: {...}`, overrides that
section's fields) and `seeds`. Each (variant, seed) is one `unipool train`
run in OUT/<variant>-s<seed>, launched as its own process. A run with a summary.json is finished
and skipped; a run with checkpoints but no summary is resumed from its latest checkpoint, so the
study can be interrupted (Ctrl-C) and started again with the same command.

A finished run leaves a record, RESULTS_DIR/runs/<variant>-s<seed>.json (the study's `results_dir`, relative
to the study file; committed): its config, summary, routing statistics and curves, a few tens of KB. The
report, the stopping rule and the plots read the records, so a study goes on, on another machine, without
the run directories of the seeds it has: a recorded run is final and never trained again. RESULTS_DIR/
carried.json, where it exists, holds seeds whose runs were lost before records were kept: their per-seed
validation losses, the mean and SD of each routing statistic over them (pooled exactly with the recorded
seeds' values) and the config they trained with. Every finished run, record and carried row is checked
against its row of the study file before anything trains; a mismatch or a damaged file is one line naming it.

The report (OUT/results.md, results.json, contrasts.json, copied to the study's `results_dir` if it names
one, for the docs to cite; OUT/report/curves.png, dead_rows.png,
zero_gate.png and depth_usage.png, and each run's routing analysis in RUN/routing/) gives, per variant: mean +- std over
seeds of the final validation loss and perplexity; the loss difference to vanilla paired by seed, with
its standard error and 95% confidence interval (t distribution over the seeds' paired differences); the
expert budget relative to the matched vanilla model; and routing statistics on the validation split
(tokens whose picked gates are all zero, the mean sum of picked gates, i.e. how strongly the MoE output
is scaled, distinct experts per token U(x) over the layers with zero-gate picks left out, dead experts,
and reuse across depth: how many layers use each expert, at >= 0.1 x the uniform share, averaged over experts).
A study file's optional `contrasts` ({name: [a, b]}) adds the same paired statistics for a − b and
enters the stopping rule: with `stop_when_se: {se, min_seeds}`, seeds are added (seed-major) until every
variant's difference to vanilla and every contrast has a paired standard error <= se over at least
min_seeds seeds, decided once per seed so that every row runs the same seeds. Its optional
`read_contrasts` (same form) names further pairs a write-up reads: checked here, rendered by
experiments/family_table.py, outside the stopping rule. dead_rows.png shows when rows die during training
(the runs' `dead_rows` and `router_scale` telemetry).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch
import yaml

from unipool.analysis.compare import curve, smooth
from unipool.analysis.eval import eval_batches_for
from unipool.analysis.routing import analyse, to_global_LG
from unipool.config import default_config, run_config_from_dict
from unipool.data.prepare import prepare_run_data
from unipool.data.tokenizer import atomic_write_text
from unipool.model.config import ModelConfig
from unipool.model.params import param_report
from unipool.run import Run


def load_study(path: Path) -> dict:
    study = yaml.safe_load(path.read_text())
    if not isinstance(study, dict):
        sys.exit(f"error: {path}: a study file is a mapping (base, variants, seeds)")
    study["_dir"] = str(path.resolve().parent)  # what a relative results_dir is relative to
    for key in ("base", "variants", "seeds"):
        if key not in study:
            sys.exit(f"error: {path} has no '{key}' section")
    for key in ("contrasts", "read_contrasts"):
        for name, pair in (study.get(key) or {}).items():
            if not (isinstance(pair, list) and len(pair) == 2 and all(v in study["variants"] for v in pair)):
                what = "contrast" if key == "contrasts" else "read_contrasts entry"
                sys.exit(f"error: {path}: {what} {name!r} must be [variant, variant] of the study's variants, "
                         f"got {pair!r}")
    return study


SECTIONS = ("model", "train", "data", "exec")


def variant_sections(overrides: dict) -> dict[str, dict]:
    """A variant's overrides by section: keys naming a section (`train: {...}`) override that section's
    fields, every other key is a model field."""
    sections = {section: dict(overrides.get(section) or {}) for section in SECTIONS if section != "model"}
    sections["model"] = {k: v for k, v in overrides.items() if k not in SECTIONS}
    sections["model"].update(overrides.get("model") or {})
    return sections


def run_config(study: dict, variant: str, seed: int, steps: int | None) -> dict:
    base = study["base"]
    cfg = {section: dict(base.get(section, {})) for section in SECTIONS}
    for section, fields in variant_sections(study["variants"][variant]).items():
        cfg[section].update(fields)
    cfg["train"]["seed"] = seed
    if steps is not None:  # smoke runs: same study, fewer steps
        cfg["train"].update(steps=steps, tokens=0, eval_interval=0, ckpt_interval=0, routing_interval=0)
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
    proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
    return f"{state} in {time.time() - t0:.0f} s"


# Two-sided 95% quantiles of Student's t by degrees of freedom (above 30: the normal's 1.96).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def ci95(xs: list[float]) -> tuple[float, float, float] | None:
    """(standard error, low, high) of the mean of `xs`: t interval; None for fewer than 2 values."""
    if len(xs) < 2:
        return None
    df = len(xs) - 1
    t = T975[max(k for k in T975 if k <= df)] if df <= 30 else 1.96  # table gaps: the smaller df, wider
    se = statistics.stdev(xs) / math.sqrt(len(xs))
    mean = statistics.fmean(xs)
    return se, mean - t * se, mean + t * se


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """(mean, sample std); the std is None for one value: one seed has no spread to show."""
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(ms: tuple[float, float | None] | None, digits: int = 4, scale: float = 1.0, sign: bool = False) -> str:
    if ms is None:
        return "–"
    mean = f"{scale * ms[0]:{'+' if sign else ''}.{digits}f}"
    return mean + " (1 seed)" if ms[1] is None else f"{mean} ± {scale * ms[1]:.{digits}f}"


def routing_summary(run_dir: Path, max_tokens: int = 16384) -> dict:
    """Routing statistics of a finished run on its own validation split, cached in RUN/routing/."""
    path = run_dir / "routing" / "routing.json"
    if not path.is_file():
        run = Run.open(run_dir)
        batches, _ = eval_batches_for(run, None, "val", 16, run.train_seq_len, max_tokens)
        analyse(run.load_model(), batches, path.parent, max_tokens=max_tokens)  # writes routing.json and the plots
    stats = json.loads(path.read_text())
    zero_L = stats["per_layer"]["zero_gate_fraction"]
    layers_G = stats["layers_per_expert"]  # how many layers use each expert: reuse across depth
    return {"u_fraction": stats["unique_experts_per_token"]["fraction_of_layers"],
            "layers_per_expert": statistics.fmean(layers_G),
            "shared_experts": sum(n >= 2 for n in layers_G) / len(layers_G),
            "dead_experts": len(stats["dead_experts"]), "zero_gate_L": zero_L,
            "zero_gate": statistics.fmean(zero_L), "gate_sum": statistics.fmean(stats["per_layer"]["mean_gate_sum"])}


def plot_study(rows: list[dict], runs: dict[str, list[dict]], out: Path) -> None:
    """curves.png (seed-mean training and validation loss per variant), dead_rows.png and zero_gate.png, from
    the runs' records (carried seeds have no curves: the curves are over the recorded seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
    window = 5
    for i, (variant, records) in enumerate(runs.items()):
        if not records:
            continue
        curves = [(r["curves"]["loss"], r["curves"]["val_loss"]) for r in records]
        n = min(len(c[0]) for c in curves)
        xs = [x for x, _ in curves[0][0][:n]]
        # one logged batch per point is noisy (and the same batches for every variant of a seed): smooth
        ys = smooth([statistics.fmean(c[0][j][1] for c in curves) for j in range(n)], window)
        ax_t.plot(xs, ys, color=f"C{i}", label=variant)
        m = min(len(c[1]) for c in curves)
        vx = [x for x, _ in curves[0][1][:m]]
        vs = [mean_std([c[1][j][1] for c in curves]) for j in range(m)]
        ax_v.errorbar(vx, [v[0] for v in vs], yerr=[v[1] or 0.0 for v in vs], color=f"C{i}", marker="o", ms=3,
                      capsize=3, label=variant)
    tail = [y for line in ax_t.get_lines() for y in line.get_ydata()[len(line.get_ydata()) // 2:]]
    if tail:  # the interesting part is the end: zoom there
        ax_t.set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    ax_t.set(xlabel="tokens", ylabel="training loss (nats/token)",
             title=f"training loss, mean over seeds (running mean of {window} logs)")
    ax_v.set(xlabel="tokens", ylabel="validation loss (nats/token)", title="validation loss, mean ± std over seeds")
    for ax in (ax_t, ax_v):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)

    # When rows die: the training-time dead-row share (metrics.jsonl `dead_rows`, per layer at every log
    # step), averaged over layers and seeds, and NormRouter's mean sigma (`router_scale`).
    fig, (ax_d, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (variant, records) in enumerate(runs.items()):
        per_key = {}
        for key in ("dead_rows", "router_scale"):
            series = [r["curves"][key] for r in records]
            n = min((len(x) for x in series), default=0)
            if n:
                per_key[key] = ([t for t, _ in series[0][:n]], [statistics.fmean(x[j][1] for x in series) for j in range(n)])
        if "dead_rows" in per_key:
            xs, ys = per_key["dead_rows"]
            ax_d.plot(xs, [100 * y for y in smooth(ys, window)], color=f"C{i}", label=variant)
        if "router_scale" in per_key:
            ax_s.plot(*per_key["router_scale"], color=f"C{i}", label=variant)
    ax_d.set(xlabel="tokens", ylabel="% of (token, layer) rows",
             title="training rows with every gate at zero\n"
                   f"(mean over layers and seeds, running mean of {window} logs)")
    ax_s.set(xlabel="tokens", ylabel="sigma", title="NormRouter scale sigma\n(mean over layers and seeds)")
    for ax in (ax_d, ax_s):
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "dead_rows.png", dpi=120)
    plt.close(fig)

    plot_depth_usage(runs, out / "depth_usage.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(rows):
        if r.get("zero_gate_L"):
            ax.plot(range(len(r["zero_gate_L"])), [100 * z for z in r["zero_gate_L"]], color=f"C{i}", marker="o",
                    ms=3, label=r["variant"])
    ax.set(xlabel="layer", ylabel="% of tokens", title="tokens whose picked gates are all zero (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "zero_gate.png", dpi=120)
    plt.close(fig)


def depth_usage(stats: dict) -> np.ndarray:
    """A run's routing.json as one layers x experts matrix over every expert of the model (pools side by side),
    each entry a layer's share of its picks, the experts ordered by the mean depth of the layers that pick
    them: a per-layer MoE is a staircase of blocks, a shared pool whatever band its routers chose."""
    usage_LG = to_global_LG(stats["usage_LE"], stats["pool_of_layer"], stats["n_pools"])
    n_layers = usage_LG.shape[0]
    picks_G = usage_LG.sum(0)
    depth_G = (np.arange(n_layers)[:, None] * usage_LG).sum(0) / np.maximum(picks_G, 1e-12)
    depth_G[picks_G == 0] = n_layers  # unused experts last
    return usage_LG[:, np.argsort(depth_G, kind="stable")]


def plot_depth_usage(runs: dict[str, list[dict]], path: Path) -> None:
    """depth_usage.png: `depth_usage` of each variant's first recorded seed, one panel per variant, the
    colour scale relative to a uniform spread over the layer's own pool (1 = uniform)."""
    import matplotlib.pyplot as plt

    panels = [(v, records[0]["depth"]) for v, records in runs.items() if records]
    if not panels:
        return
    cols = min(3, len(panels))
    n_rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 2.5 * n_rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax, (variant, stats) in zip(axes.flat, panels):
        rel = depth_usage(stats) * stats["experts_per_pool"]
        im = ax.imshow(rel, aspect="auto", cmap="magma", vmin=0, vmax=4, interpolation="nearest")
        ax.set_title(f"{variant} ({stats['n_pools']} x {stats['experts_per_pool']})", fontsize=9)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_xlabel("expert (every pool side by side, ordered by mean depth)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, extend="max", label="share of the layer's picks x its pool's width\n"
                 "(1 = spread evenly over its whole pool; zero-gate picks\ncount nowhere, so dead rows darken a layer)")
    fig.suptitle("expert use across depth (first recorded seed; experts ordered by the mean depth that picks them)",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# Fields a run's config.json may hold differently from its study row without being another experiment:
# where it was written, how it reported, the data directory the study resolves, and the vocabulary size the
# tokenizer (data.tokenizer, compared) sets.
RUN_ONLY_FIELDS = {("train", "out_dir"), ("train", "run_name"), ("train", "progress"), ("data", "data_dir"),
                   ("model", "vocab_size")}


def config_drift(study: dict, variant: str, seed: int, run: Path | dict, steps: int | None = None) -> list[str]:
    """Where a finished run's config (its directory's config.json, or a record's config) differs from what the
    study file now asks of (variant, seed), at `steps` for a smoke study: ["model.num_experts: run 8, study
    16", ...]. A field the run predates compares as its default."""
    want = dataclasses.asdict(run_config_from_dict(run_config(study, variant, seed, steps)))
    default = dataclasses.asdict(default_config())
    have = json.loads((run / "config.json").read_text()) if isinstance(run, Path) else run
    drift = []
    for section in SECTIONS:
        for key, value in want[section].items():
            ran = have.get(section, {}).get(key, default[section][key])
            if (section, key) not in RUN_ONLY_FIELDS and ran != value:
                drift.append(f"{section}.{key}: run {ran!r}, study {value!r}")
    return drift


def results_path(study: dict) -> Path | None:
    """The study's `results_dir`: a relative one is relative to the study file's directory (family.yaml's
    `results/family` is experiments/results/family wherever the command runs)."""
    if not study.get("results_dir"):
        return None
    path = Path(study["results_dir"])
    return path if path.is_absolute() else Path(study.get("_dir", ".")) / path


def records_dir(study: dict, steps: int | None = None) -> Path | None:
    """Where the study keeps its run records (RESULTS_DIR/runs), None without a `results_dir` or for a smoke
    study (`--steps`): its runs are not the study's."""
    return results_path(study) / "runs" if study.get("results_dir") and steps is None else None


def read_record(path: Path) -> dict:
    """A run record, checked enough that the report cannot fail on it later: one line naming the file if not."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: unreadable run record ({e})") from None
    ok = (isinstance(record, dict) and isinstance(record.get("config"), dict)
          and isinstance(record.get("summary"), dict) and isinstance(record["summary"].get("val_loss"), (int, float))
          and math.isfinite(record["summary"]["val_loss"]) and isinstance(record.get("routing"), dict)
          and all(k in record["routing"] for k in (*ROUTING_STATS, "zero_gate_L")))
    if not ok:
        raise SystemExit(f"error: {path}: not a complete run record (config, summary with a finite val_loss, "
                         f"routing statistics); restore it from version control or delete it to train the run again")
    return record


def drift_error(source: Path, variant: str, drift: list[str]) -> SystemExit:
    # its loss would be reported under a row it was not trained as
    return SystemExit(f"error: {source} was trained with another config than the study file's row {variant!r} now "
                      f"gives ({'; '.join(drift)}): restore the row, or delete the run to train it again")


# One routing analysis at a time (records are made in --jobs worker threads; pyplot is not thread-safe).
_RECORD_LOCK = threading.Lock()


def make_record(run_dir: Path) -> dict:
    """What the report, the stopping rule and the plots read of a finished run, small enough to commit."""
    run = Run.open(run_dir)
    records, _ = run.metrics()
    with _RECORD_LOCK:
        routing = routing_summary(run_dir)  # writes RUN/routing/routing.json where it is missing
    stats = json.loads((run_dir / "routing" / "routing.json").read_text())

    def mean_curve(key: str) -> list[list[float]]:  # a per-layer telemetry value, as its mean over layers
        return [[r["tokens"], statistics.fmean(r[key])] for r in records if r.get(key)]

    return {"name": run_dir.name, "config": json.loads((run_dir / "config.json").read_text()),
            "summary": run.summary(), "routing": routing,
            "depth": {"n_pools": stats["n_pools"], "experts_per_pool": stats["experts_per_pool"],
                      "pool_of_layer": stats["pool_of_layer"],
                      "usage_LE": np.round(np.asarray(stats["usage_LE"]), 6).tolist()},
            "curves": {"loss": curve(records, "loss"), "val_loss": curve(records, "val_loss"),
                       "dead_rows": mean_curve("dead_rows"), "router_scale": mean_curve("router_scale")}}


def finished_record(study: dict, out: Path, variant: str, seed: int, steps: int | None = None,
                    make: bool = True) -> dict | None:
    """The record of the finished run (variant, seed), None if it has not finished. From the study's records,
    or made from OUT/<variant>-s<seed> where that run finished there (and then kept in the records; with
    make=False only {"summary": ...}, no routing analysis). Refused by name: a run trained with another config
    than the study's row, a run directory and a record of the same name that disagree, a seed that is also
    carried."""
    name, kept = f"{variant}-s{seed}", records_dir(study, steps)
    run_dir, path = out / name, kept / f"{name}.json" if kept else None
    record = read_record(path) if path is not None and path.is_file() else None
    summary = None
    if (run_dir / "summary.json").is_file():
        drift = config_drift(study, variant, seed, run_dir, steps)
        if drift:
            raise drift_error(run_dir, variant, drift)
        summary = Run.open(run_dir).summary() or {}
        if summary.get("val_loss") is None:
            summary = None
        elif record is not None and record["summary"]["val_loss"] != summary["val_loss"]:
            raise SystemExit(f"error: {run_dir} and its record {path} hold different runs (validation loss "
                             f"{summary['val_loss']} vs {record['summary']['val_loss']}): delete one of them")
    if record is not None:
        drift = config_drift(study, variant, seed, record["config"], steps)
        if drift:
            raise drift_error(path, variant, drift)
    if record is None and summary is None:
        return None
    if str(seed) in carried_rows(study, steps).get(variant, {}).get("val_losses", {}):
        raise SystemExit(f"error: {variant} seed {seed} is both finished ({path if record else run_dir}) and carried "
                         f"({results_path(study) / 'carried.json'}): its statistics would count twice; drop one")
    if record is None and not make:
        return {"summary": summary}
    if record is None:
        record = make_record(run_dir)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return record


def carried_rows(study: dict, steps: int | None = None) -> dict[str, dict]:
    """RESULTS_DIR/carried.json: {variant: row} for seeds whose runs were lost before run records were kept,
    each row as the report's results.json has it (per-seed `val_losses`, [mean, sd] of each routing statistic
    over those seeds) plus the `config` its runs trained with (seed aside), checked against the study's row.
    {} without one, or for a smoke study."""
    path = results_path(study)
    if path is None or steps is not None or not (path / "carried.json").is_file():
        return {}
    path = path / "carried.json"
    # checked once per version of the file and of the study's rows
    key = (str(path), path.stat().st_mtime_ns,
           json.dumps({k: study.get(k) for k in ("base", "variants", "seeds")}, sort_keys=True, default=str))
    if _CARRIED.get("key") != key:
        try:
            rows = {row["variant"]: row for row in json.loads(path.read_text())["rows"]}
            for variant, row in rows.items():
                if variant not in study["variants"]:
                    raise SystemExit(f"error: {path}: row {variant!r} is not a variant of the study file (renamed? "
                                     f"its seeds would be lost)")
                seeds = [int(s) for s in row["val_losses"]]
                if not set(seeds) <= set(study["seeds"]):
                    raise SystemExit(f"error: {path}: {variant}'s seeds {seeds} are not all among the study's "
                                     f"seeds {study['seeds']}")
                for seed in seeds:
                    drift = config_drift(study, variant, seed, {**row["config"], "train": {
                        **row["config"]["train"], "seed": seed}})
                    if drift:
                        raise drift_error(path, variant, drift)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: {path}: unreadable carried results ({type(e).__name__}: {e})") from None
        _CARRIED.update(key=key, rows=rows)
    return _CARRIED["rows"]


_CARRIED: dict = {}  # the last carried.json read and checked, by carried_rows


def pooled(xs: list[float], prior: list | None = None, n_prior: int = 0) -> tuple[float, float | None] | None:
    """mean_std of xs together with n_prior earlier values known only by their [mean, sd]. Exact: the sum of
    the values and the sum of their squared deviations combine."""
    if not n_prior:
        return mean_std(xs) if xs else None
    m0, s0 = prior
    n = n_prior + len(xs)
    mean = (n_prior * m0 + sum(xs)) / n
    if n < 2:
        return mean, None
    ss = (n_prior - 1) * (s0 or 0.0) ** 2 + n_prior * (m0 - mean) ** 2 + sum((x - mean) ** 2 for x in xs)
    return mean, math.sqrt(ss / (n - 1))


ROUTING_STATS = ("zero_gate", "gate_sum", "u_fraction", "dead_experts", "layers_per_expert", "shared_experts")


def report(study: dict, out: Path, steps: int | None = None) -> str:
    rows, runs = [], {}
    carried = carried_rows(study, steps)
    for variant, overrides in study["variants"].items():
        records = {seed: r for seed in study["seeds"] if (r := finished_record(study, out, variant, seed, steps))}
        prior = carried.get(variant, {})
        prior_losses = {int(seed): loss for seed, loss in prior.get("val_losses", {}).items()}
        runs[variant] = list(records.values())
        summaries = {seed: r["summary"] for seed, r in records.items()}
        routing = [r["routing"] for r in records.values()]
        cfg = ModelConfig.from_dict({**study["base"].get("model", {}), **variant_sections(overrides)["model"]})
        params = param_report(cfg)
        losses = dict(sorted({**prior_losses, **{seed: s["val_loss"] for seed, s in summaries.items()}}.items()))
        first = next(iter(summaries.values()), {})
        n_prior = len(prior_losses)
        row = {"variant": variant, "seeds": sorted(losses), "moe_mode": cfg.moe_mode, "router": cfg.router,
               "experts_per_pool": cfg.n_routed_experts, "n_pools": cfg.n_pools,
               "expert_budget": params["expert_budget_vs_matched_vanilla"],
               # from the runs themselves: the vocabulary (hence the embeddings) is set by the tokenizer
               "total_params": first.get("params", prior.get("total_params")),
               "active_params": first.get("active_params", prior.get("active_params")),
               "tokens": first.get("tokens", prior.get("tokens")),
               "wall_time_s": sum(s.get("wall_time_s", 0) for s in summaries.values()) + prior.get("wall_time_s", 0),
               "val_losses": losses}
        if losses:
            row["val_loss"] = mean_std(list(losses.values()))
            row["val_ppl"] = mean_std([math.exp(x) for x in losses.values()])
            for key in ROUTING_STATS:
                row[key] = pooled([r[key] for r in routing], prior.get(key), n_prior)
            layers = [r["zero_gate_L"] for r in routing] + ([prior["zero_gate_L"]] * n_prior if n_prior else [])
            row["zero_gate_L"] = [statistics.fmean(z) for z in zip(*layers)]  # the carried mean weighs n_prior
        rows.append(row)
    base = next((r for r in rows if r["variant"] == "vanilla" and "val_loss" in r), None)
    for r in rows:
        deltas = (list(paired_deltas(r["val_losses"], base["val_losses"]).values())
                  if base and r is not base and "val_loss" in r else [])
        if deltas:
            r["delta_paired"] = mean_std(deltas)
            ci = ci95(deltas)
            if ci:
                r["delta_se"], r["delta_ci95"] = ci[0], [ci[1], ci[2]]
    contrasts = paired_contrasts(study, rows)
    header = ("| variant | router | experts/pool x pools | expert budget | seeds | val loss | Δ vs vanilla (paired, ± sd) "
              "| Δ 95% CI | val ppl | zero-gate tokens | gate sum | U(x)/L | dead experts | layers per expert |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = "val_loss" in r
        lines.append(
            f"| {r['variant']} | {r['router']} | {r['experts_per_pool']} x {r['n_pools']} | "
            f"{100 * r['expert_budget']:.1f}% | {len(r['seeds'])} | {fmt(r.get('val_loss')) if ok else 'not run'} | "
            f"{fmt(r.get('delta_paired'), sign=True)} | "
            f"{'[{:+.4f}, {:+.4f}]'.format(*r['delta_ci95']) if 'delta_ci95' in r else '–'} | "
            f"{fmt(r.get('val_ppl'), 1)} | "
            f"{fmt(r.get('zero_gate'), 1, 100) + '%' if ok else '–'} | {fmt(r.get('gate_sum'), 3)} | "
            f"{fmt(r.get('u_fraction'), 3)} | "
            f"{fmt(r.get('dead_experts'), 1)} | {fmt(r.get('layers_per_expert'), 2)} |")
    target = study.get("target_se")
    stop_rule = study.get("stop_when_se")  # it never stops below its minimum (3 unless it says); without one, 2
    min_seeds = stop_rule.get("min_seeds", 3) if stop_rule else 2
    vs_vanilla = paired_contrasts({"contrasts": {r["variant"]: [r["variant"], "vanilla"] for r in rows
                                                 if r is not base and "val_loss" in r}}, rows) if base else []
    if vs_vanilla:
        lines += ["", "Each variant − vanilla, paired by seed:", "", *contrast_table(vs_vanilla, target, min_seeds)]
    if contrasts:
        lines += ["", "Paired contrasts (the study's `contrasts`: a − b on the same seeds):", "",
                  *contrast_table(contrasts, target, min_seeds)]
    rule = stopping_line(stopping_state(study, out, steps))
    if rule:
        lines += ["", rule]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)  # a study reported from its records alone has no run directories here
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    if contrasts:
        (out / "contrasts.json").write_text(json.dumps(contrasts, indent=2))
    else:  # a study file that dropped its contrasts: no stale file to copy below
        (out / "contrasts.json").unlink(missing_ok=True)
    (out / "results.md").write_text(table + "\n")
    if study.get("results_dir") and steps is None:  # what docs cite, kept with the code (committed); a
        # smoke study (--steps) is not the study: it never overwrites them
        keep = results_path(study)
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "contrasts.json", "results.md"):
            if (out / name).is_file():
                (keep / name).write_text((out / name).read_text())
    if any(runs.values()):
        plot_study(rows, runs, out / "report")
    return table


def seeds_for_se(deltas: list[float], target: float, min_seeds: int = 2) -> int | None:
    """Seeds at which the paired standard error would reach `target`, at the spread seen so far
    (itself uncertain with few seeds): ceil((sd / target)^2), at least `min_seeds`."""
    if len(deltas) < 2:
        return None
    return max(min_seeds, math.ceil((statistics.stdev(deltas) / target) ** 2))


def contrast_table(contrasts: list[dict], target: float | None, min_seeds: int = 2) -> list[str]:
    """Markdown rows of paired contrasts: mean, SE, 95% CI, the per-seed values and, when the study
    names a `target_se`, the seeds that SE would take at the observed spread."""
    extra = f" seeds for SE ≤ {target} |" if target else ""
    lines = [f"| contrast | a − b | seeds | mean | SE | 95% CI | per seed |{extra}",
             "|---|---|---|---|---|---|---|" + ("---|" if target else "")]
    for c in contrasts:
        ci = f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c.get("ci95") else "–"
        se = f"{c['se']:.4f}" if c.get("se") is not None else "–"
        per_seed = ", ".join(f"{d:+.3f}" for d in c["deltas"].values())
        row = f"| {c['name']} | {c['a']} − {c['b']} | {len(c['deltas'])} | {c['mean']:+.4f} | {se} | {ci} | {per_seed} |"
        if target:
            need = seeds_for_se(list(c["deltas"].values()), target, min_seeds)
            row += f" {need if need is not None else '–'} |"
        lines.append(row)
    return lines


def paired_deltas(losses_a: dict, losses_b: dict) -> dict:
    """{seed: a − b} over the seeds both finished: paired by seed, the same seed is the same data order."""
    return {seed: losses_a[seed] - losses_b[seed] for seed in sorted(set(losses_a) & set(losses_b), key=int)}


def paired_contrasts(study: dict, rows: list[dict]) -> list[dict]:
    """The study file's `contrasts` ({name: [a, b]}): a − b in final validation loss over the seeds both
    finished, with the standard error and 95% t interval of the mean paired difference."""
    by_name = {r["variant"]: r for r in rows}
    found = []
    for name, pair in (study.get("contrasts") or {}).items():
        a, b = pair
        deltas = paired_deltas(by_name[a]["val_losses"], by_name[b]["val_losses"])
        if not deltas:
            continue
        c = {"name": name, "a": a, "b": b, "deltas": deltas, "mean": statistics.fmean(deltas.values())}
        ci = ci95(list(deltas.values()))
        if ci:
            c["se"], c["ci95"] = ci[0], [ci[1], ci[2]]
        found.append(c)
    return found


def finished_losses(study: dict, out: Path, steps: int | None = None) -> dict[str, dict[int, float]]:
    """{variant: {seed: final validation loss}} of the finished runs over the study's seeds, as the report sees
    them (run directories in OUT, the study's records, its carried seeds), with the same checks."""
    losses: dict[str, dict[int, float]] = {}
    carried = carried_rows(study, steps)
    for variant in study["variants"]:
        prior = carried.get(variant, {}).get("val_losses", {})
        for seed in study["seeds"]:
            record = finished_record(study, out, variant, seed, steps, make=False)
            loss = record["summary"]["val_loss"] if record else prior.get(str(seed))
            if loss is not None:
                losses.setdefault(variant, {})[seed] = loss
    return losses


def stopping_state(study: dict, out: Path, steps: int | None = None) -> dict | None:
    """The study's stopping rule (`stop_when_se: {se: 0.02, min_seeds: 3}`): seeds are added until every
    variant's difference to vanilla and every contrast in `contrasts` has a paired standard error <= se over at least min_seeds seeds, or the
    seeds run out. Returns None without a rule, else {"met": bool, "seeds": n, "worst": (name, se)}."""
    rule = study.get("stop_when_se")
    if not rule:
        return None
    losses = finished_losses(study, out, steps)
    worst, met, seeds = None, True, None
    pairs = {f"{v} vs vanilla": [v, "vanilla"] for v in study["variants"] if v != "vanilla" and "vanilla" in study["variants"]}
    pairs.update(study.get("contrasts") or {})
    for name, (a, b) in pairs.items():
        deltas = list(paired_deltas(losses.get(a, {}), losses.get(b, {})).values())
        seeds = len(deltas) if seeds is None else min(seeds, len(deltas))
        se = statistics.stdev(deltas) / math.sqrt(len(deltas)) if len(deltas) >= 2 else math.inf
        if worst is None or se > worst[1]:
            worst = (name, se)
        met = met and len(deltas) >= rule.get("min_seeds", 3) and se <= rule["se"]
    return {"met": met, "seeds": seeds or 0, "worst": worst, "se": rule["se"], "max_seeds": len(study["seeds"])}


def stopping_line(state: dict | None) -> str:
    if state is None:
        return ""
    name, se = state["worst"] or ("–", math.inf)
    if state["met"]:
        return (f"Stopping rule met: every contrast's paired SE <= {state['se']} at {state['seeds']} seeds "
                f"(largest: {name}, {se:.4f}).")
    if state["seeds"] >= state["max_seeds"]:
        return (f"Stopping rule: the study's {state['max_seeds']} seeds ran out before every paired SE reached "
                f"{state['se']} (largest: {name}, {se:.4f}).")
    if math.isinf(se):
        return (f"Stopping rule not met yet: some contrast has fewer than 2 paired seeds ({name}); target paired SE "
                f"{state['se']}, at most {state['max_seeds']} seeds.")
    return (f"Stopping rule not met yet: at least {state['seeds']} paired seeds on every contrast so far; the "
            f"largest paired SE is {name}'s, {se:.4f} (target {state['se']}, at most {state['max_seeds']} seeds).")


class SeedGate:
    """The stopping rule, decided once per seed at that seed's first run (runs go seed by seed): a seed is
    run by every variant or by none, so every contrast rests on the same seeds. Thread-safe (--jobs)."""

    def __init__(self, study: dict, out: Path, steps: int | None = None):
        self.study, self.out, self.steps = study, out, steps
        self.min_seeds = (study.get("stop_when_se") or {}).get("min_seeds", 3)
        self.reasons: dict[int, str] = {}  # seed -> why it is not needed; "" where it runs
        self.lock = threading.Lock()

    def skip_reason(self, seed: int) -> str:
        with self.lock:
            if seed not in self.reasons:
                state = stopping_state(self.study, self.out, self.steps)
                # the seed's place in the study, not its value: seeds need not be 0, 1, 2, ...
                before = self.study["seeds"].index(seed)
                # met on every seed before this one: with --jobs > 1 the last run of the previous seed may
                # still be training, and a rule met without it could stop the study a seed early
                met = state is not None and state["met"] and before >= self.min_seeds and state["seeds"] >= before
                self.reasons[seed] = stopping_line(state) if met else ""
            return self.reasons[seed]


def plan(study: dict, out: Path, names: list[tuple[str, str, int]], steps: int | None) -> None:
    """Check every run's config (as `unipool train` would read it) and list each run's state."""
    states: dict[str, int] = {}
    finished = finished_losses(study, out, steps)
    for name, variant, seed in names:
        cfg = run_config_from_dict(run_config(study, variant, seed, steps))  # raises on a bad field
        tc = cfg.train
        per_step = tc.batch_size * tc.seq_len * tc.grad_accum
        tokens = tc.total_steps(per_step) * per_step
        run_dir = out / name
        if (run_dir / "summary.json").is_file():
            state = "done"
        elif seed in finished.get(variant, {}):
            state = "done (recorded)"
        elif (run_dir / "checkpoints" / "LATEST").is_file():
            state = f"resume from {(run_dir / 'checkpoints' / 'LATEST').read_text().strip()}"
        else:
            state = "new"
        states[state.split()[0]] = states.get(state.split()[0], 0) + 1
        print(f"{name:40s} {cfg.model.moe_mode:9s} {cfg.model.router:7s} {tokens:>14,} tokens  {state}")
    print(f"{len(names)} runs: " + ", ".join(f"{n} {s}" for s, n in states.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", type=Path, help="study YAML (experiments/cpu.yaml, experiments/gpu.yaml)")
    p.add_argument("--out", type=Path, help="output directory (default: the study's out_dir)")
    p.add_argument("--steps", type=int, help="override the step count of every run (smoke test)")
    p.add_argument("--only", nargs="+", help="run only these variants")
    p.add_argument("--report", action="store_true", help="do not train; rebuild the report from finished runs")
    p.add_argument("--plan", action="store_true",
                   help="do not train; check every run's config and list which runs are done, resumable or new")
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
    # seed-major: a partial study already has every variant once
    names = [(f"{v}-s{seed}", v, seed) for seed in study["seeds"] for v in study["variants"]
             if not args.only or v in args.only]
    if args.plan:
        try:
            plan(study, out, names, args.steps)
        except Exception as e:  # a bad field: one line naming it
            sys.exit(f"error: {e}")
        return
    if not args.report:
        if args.jobs < 1:
            sys.exit("error: --jobs must be >= 1")
        threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
        t0 = time.time()
        if names:  # tokenize once here, so parallel runs never prepare the same data directory together
            prepare_run_data(run_config_from_dict(run_config(study, names[0][1], names[0][2], args.steps)).data)

        gate = SeedGate(study, out, args.steps)
        # finished here or elsewhere (the study's records, its carried seeds), every one checked against its
        # row before anything trains: a refusal now, not after hours of training
        finished = finished_losses(study, out, args.steps)
        if threads:
            torch.set_num_threads(threads)  # the records' routing analyses share the cores with the runs

        def launch(item: tuple[str, str, int]) -> str:
            name, variant, seed = item
            try:
                reason = gate.skip_reason(seed)
                if seed in finished.get(variant, {}):
                    result = "done" if (out / name / "summary.json").is_file() else "done (recorded)"
                elif reason and not (out / name / "checkpoints" / "LATEST").is_file():  # a started run is finished
                    result = f"not needed ({reason})"
                else:
                    result = run_one(out, name, run_config(study, variant, seed, args.steps), threads)
                if (out / name / "summary.json").is_file():
                    finished_record(study, out, variant, seed, args.steps)  # its record, as soon as it exists
            except RuntimeError:
                raise
            except BaseException as e:  # SystemExit from a check, or a failed analysis: stop the study, not
                # just this worker (the pool would otherwise train every queued run before saying so)
                why = str(e.code if isinstance(e, SystemExit) else e).removeprefix("error: ")
                raise RuntimeError(f"{name}: {why}") from e
            return f"[{time.time() - t0:7.0f} s] {name}: {result}"

        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            try:  # only this thread prints: lines from parallel workers would interleave mid-line
                for fut in as_completed([pool.submit(launch, item) for item in names]):
                    print(fut.result(), flush=True)
            except RuntimeError as e:
                pool.shutdown(cancel_futures=True)
                sys.exit(f"error: {e}")
        print(f"study finished in {time.time() - t0:.0f} s")
    print(report(study, out, args.steps))
    print(f"\nreport: {out / 'results.md'}, plots in {out / 'report'}")


if __name__ == "__main__":
    main()
