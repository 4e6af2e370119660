"""Healing after conversion: a trained per-layer MoE turned into one shared pool, then trained on, against
the same source trained on for the same steps (paired by seed: same data order, same optimizer settings).

    python experiments/healing.py                       # runs/healing: source, conversion, 2 x 3 continuations
    python experiments/healing.py --steps 300 --seeds 0,1,2 --out runs/healing

1. source: `unipool train --preset demo-vanilla` (6 layers x 8 experts, softmax top-1, Shakespeare).
2. pool: `unipool convert source --to pool` (48 experts; every router masked to its own layer's 8 at step 0,
   the windows opened over the first half of the continuation).
3. For each seed: `continued-sS` trains the source on and `healed-sS` trains the pool on, both with
   `--train.init-from`, a fresh AdamW, the same learning-rate schedule and the same batches.

Writes OUT/healing.json (validation losses, paired differences with a t interval, and per layer the share
of routed tokens that go to another layer's experts after healing) and OUT/healing.png (the curves).
Finished runs are skipped, so the command resumes; one that finished with another --steps, --lr or
seed is refused by name.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from unipool.analysis.eval import eval_batches_for
from unipool.run import Run, read_metrics

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365}


def unipool(*args: str) -> None:
    # the installed `unipool` command, run by this interpreter
    subprocess.run([sys.executable, "-c", "import sys; from unipool.cli import main; sys.exit(main(sys.argv[1:]))",
                    *args], check=True)


def reuse_drift(run_dir: Path, want: dict[str, object]) -> list[str]:
    """Where a finished run's config.json differs from the settings this command would train it with
    (`want`: {"train.steps": 300, ...}): ["train.steps: run 200, now 300", ...]."""
    have = json.loads((run_dir / "config.json").read_text())
    drift = []
    for key, value in want.items():
        section, field = key.split(".")
        ran = have.get(section, {}).get(field)
        if ran != value and not (isinstance(value, float) and isinstance(ran, (int, float))
                                 and math.isclose(ran, value, rel_tol=1e-12)):
            drift.append(f"{key}: run {ran!r}, now {value!r}")
    return drift


def train(out: Path, name: str, *args: str, want: dict[str, object] | None = None) -> Path:
    """Train OUT/NAME, or reuse it where it finished with the same settings (`want`); a finished run trained
    with other settings is refused rather than reported as if it had this command's."""
    run_dir = out / name
    if not (run_dir / "summary.json").is_file():
        unipool("train", "--train.out-dir", str(out), "--train.run-name", name, "--train.progress", "false", *args)
    elif want and (drift := reuse_drift(run_dir, want)):
        sys.exit(f"error: {run_dir} finished with other settings ({'; '.join(drift)}): pass another --out, "
                 f"or delete the run to train it again")
    return run_dir


def foreign_share(run_dir: Path, max_tokens: int = 16384) -> list[float]:
    """Per layer: the share of routed picks on the validation split that go to another layer's block."""
    run = Run.open(run_dir)
    model = run.load_model().eval()
    cfg = model.config
    batches, _ = eval_batches_for(run, None, "val", 8, run.train_seq_len, max_tokens)
    foreign, total = [0] * cfg.n_layers, [0] * cfg.n_layers
    with torch.no_grad():
        for x, _ in batches:
            for layer, routed in enumerate(model(x).routing):
                own = layer % cfg.layers_per_pool
                block = routed.expert_ids_TK // cfg.experts_per_block
                foreign[layer] += int((block != own).sum())
                total[layer] += routed.expert_ids_TK.numel()
    return [f / max(t, 1) for f, t in zip(foreign, total)]


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl")[0] if "val_loss" in r]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/healing"))
    p.add_argument("--steps", type=int, default=300, help="steps of each continuation")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the continuations")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out
    source = train(out, "source", "--preset", "demo-vanilla", "--train.sample-tokens", "0")
    pool = out / "pool"
    if not pool.exists():
        unipool("convert", str(source), "--to", "pool", "--out", str(pool), "--unmask-over", "0.5")
    common = ["--preset", "demo-vanilla", "--train.steps", str(args.steps), "--train.lr", str(args.lr),
              "--train.min-lr", str(args.lr / 10), "--train.warmup-frac", "0.05", "--train.eval-interval", "50",
              "--train.sample-tokens", "0", "--train.ckpt-interval", "0"]
    runs = {"continued": [], "healed": []}
    for seed in seeds:
        want = {"train.steps": args.steps, "train.lr": args.lr, "train.min_lr": args.lr / 10, "train.seed": seed}
        runs["continued"].append(train(out, f"continued-s{seed}", "--train.init-from", str(source),
                                       "--train.seed", str(seed), *common,
                                       want={**want, "train.init_from": str(source)}))
        runs["healed"].append(train(out, f"healed-s{seed}", "--train.init-from", str(pool),
                                    "--train.seed", str(seed), *common, want={**want, "train.init_from": str(pool)}))

    final = {arm: {seed: Run.open(d).summary()["val_loss"] for seed, d in zip(seeds, dirs)}
             for arm, dirs in runs.items()}
    deltas = [final["healed"][s] - final["continued"][s] for s in seeds]
    result = {"source_val_loss": Run.open(source).summary()["val_loss"], "steps": args.steps, "lr": args.lr,
              "seeds": seeds, "final_val_loss": final, "healed_minus_continued": deltas,
              "mean_delta": statistics.fmean(deltas)}
    if len(deltas) > 1:
        se = statistics.stdev(deltas) / math.sqrt(len(deltas))
        t = T975[min(len(deltas) - 1, 7)]
        result.update(se=se, ci95=[result["mean_delta"] - t * se, result["mean_delta"] + t * se])
    result["foreign_share_after"] = {f"s{s}": foreign_share(d) for s, d in zip(seeds, runs["healed"])}
    result["val_curves"] = {arm: {f"s{s}": val_curve(d) for s, d in zip(seeds, dirs)} for arm, dirs in runs.items()}
    (out / "healing.json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (arm, curves) in enumerate(result["val_curves"].items()):
        for j, curve in enumerate(curves.values()):
            ax.plot([s for s, _ in curve], [v for _, v in curve], color=f"C{i}", alpha=0.8, marker="o", ms=3,
                    label=arm if j == 0 else None)
    ax.axhline(result["source_val_loss"], color="gray", ls="--", label="source at step 0 (= converted)")
    ax.set(xlabel="continuation step", ylabel="validation loss", title="per-layer source trained on vs converted pool")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    shares = list(result["foreign_share_after"].values())
    layers = range(len(shares[0]))
    ax_f.bar(layers, [100 * statistics.fmean(s[layer] for s in shares) for layer in layers])
    ax_f.set(xlabel="layer", ylabel="% of routed picks", title="after healing: picks of another layer's experts")
    ax_f.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "healing.png", dpi=110)
    print(json.dumps({k: v for k, v in result.items() if k != "val_curves"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
