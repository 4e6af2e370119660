"""`unipool compare`: one table and loss-curve plots for several runs.

For every run directory: architecture and parameter accounting from RUN/config.json (through
`params.param_report`), tokens seen and loss curves from RUN/metrics.jsonl, the final validation
loss from RUN/summary.json (else the last validation point of the metrics). A run without metrics,
or with unreadable lines, is kept in the table with the gap noted; a directory without a readable
config.json is an error. Writes REPORT_DIR/compare.md, compare.json, train_loss.png, val_loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from unipool.errors import UnipoolError
from unipool.model.params import param_report
from unipool.run import Run


class ReportError(UnipoolError):
    pass


def curve(records: list[dict], key: str) -> list[tuple[float, float]]:
    """(tokens, value) of every record with a finite number under `key`."""
    return [(r["tokens"], float(r[key])) for r in records
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summarize_run(run_dir: str | Path) -> dict:
    """Everything `compare` shows about one run, as JSON-ready values."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"no such run directory: {run_dir}")
    if not Run.holds_run(run_dir):
        raise ReportError(f"{run_dir} is not a run directory (no config.json)")
    try:
        run = Run.open(run_dir)
    except UnipoolError as e:
        raise ReportError(f"{run_dir / 'config.json'}: unreadable run config ({e})") from None
    cfg = run.config.model
    params = param_report(cfg)
    records, notes = run.metrics()
    train, val = curve(records, "loss"), curve(records, "val_loss")

    try:
        summary = run.summary() or {}
    except UnipoolError:
        summary = {}
        notes.append("summary.json is not valid JSON")
    tokens = max((r["tokens"] for r in records), default=None)
    steps = max((r["step"] for r in records if isinstance(r.get("step"), int)), default=None)
    if tokens is None:  # no metrics: the summary, else the newest checkpoint, knows how far it got
        meta = run.meta() if run.checkpoint is not None else {}
        tokens, steps = summary.get("tokens", meta.get("tokens")), summary.get("step", meta.get("step"))
    # A NaN / inf in the summary (a diverged run) is noted, not copied: NaN is not valid JSON.
    val_loss = _finite(summary.get("val_loss"))
    if isinstance(summary.get("val_loss"), (int, float)) and val_loss is None:
        notes.append(f"summary.json's val_loss is {summary['val_loss']}")
    if val_loss is None:
        val_loss = val[-1][1] if val else None
    if val_loss is None and records:
        notes.append("no validation loss")
    return {
        "name": run_dir.name,
        "path": str(run_dir),
        "moe_mode": cfg.moe_mode,
        "n_pools": cfg.n_pools,
        "experts_per_pool": cfg.n_routed_experts,
        "top_k": cfg.routed_top_k,
        "router": cfg.router,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "params_total": params["total"],
        "params_active": params["active"],
        "params_experts": params["experts"],
        "expert_budget_vs_matched_vanilla": params["expert_budget_vs_matched_vanilla"],
        "tokens": tokens,
        "steps": steps,
        "final_train_loss": train[-1][1] if train else None,
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50)) if val_loss is not None else None,  # as eval caps it
        "unigram_loss": _finite(summary.get("unigram_loss")),
        "train_curve": train,
        "val_curve": val,
        "notes": notes,
    }


def _fmt_count(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.1f}{unit}"
    return str(int(n))


def markdown_table(runs: list[dict]) -> str:
    header = ["run", "mode", "pools × experts", "top-k", "total", "active", "experts", "budget vs vanilla",
              "tokens", "val loss", "val ppl"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [r["name"], r["moe_mode"], f"{r['n_pools']} × {r['experts_per_pool']}", str(r["top_k"]),
                 _fmt_count(r["params_total"]), _fmt_count(r["params_active"]), _fmt_count(r["params_experts"]),
                 f"{100 * r['expert_budget_vs_matched_vanilla']:.1f}%", _fmt_count(r["tokens"]),
                 "—" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
                 "—" if r["val_ppl"] is None else f"{r['val_ppl']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['name']}: {note}" for r in runs for note in r["notes"]]
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_curves(runs: list[dict], out_dir: Path) -> list[Path]:
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ReportError("plots need matplotlib, a dependency of unipool: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, name, title in (("train_curve", "train_loss.png", "training loss"),
                             ("val_curve", "val_loss.png", "validation loss")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        plotted = False
        for i, r in enumerate(runs):
            if not r[key]:
                continue
            xs, ys = zip(*r[key])
            color = f"C{i % 10}"
            if key == "train_curve" and len(ys) > 20:
                ax.plot(xs, ys, color=color, alpha=0.25, lw=0.8)
                ys = smooth(list(ys), max(2, len(ys) // 50))
            ax.plot(xs, ys, color=color, marker="o" if key == "val_curve" else None, ms=3, label=r["name"])
            if key == "val_curve" and isinstance(r.get("unigram_loss"), (int, float)):
                # the context-free baseline: a model must get below it to have learned anything
                ax.axhline(r["unigram_loss"], color=color, ls=":", lw=1, label=f"{r['name']} unigram")
            plotted = True
        if not plotted:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.legend()
        ax.set(xlabel="tokens", ylabel="loss (nats/token)", title=title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)
    return written


def compare(run_dirs: list[str | Path], out_dir: str | Path) -> tuple[list[dict], str]:
    """Summaries of `run_dirs`, the Markdown table, and the report files in `out_dir`."""
    if not run_dirs:
        raise ReportError("no runs to compare")
    runs = [summarize_run(d) for d in run_dirs]
    # Same directory names (e.g. a/run and b/run) are told apart by their paths.
    names = [r["name"] for r in runs]
    for r in runs:
        if names.count(r["name"]) > 1:
            r["name"] = r["path"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown_table(runs)
    (out_dir / "compare.md").write_text(table)
    (out_dir / "compare.json").write_text(json.dumps(runs, indent=1))
    plot_curves(runs, out_dir)
    return runs, table


def add_compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", type=Path, default=Path("report"), help="report directory (default: ./report)")


def cmd_compare(args: argparse.Namespace) -> int:
    _, table = compare(args.runs, args.out)
    print(table, end="")
    print(f"\nwrote {args.out}/compare.md, compare.json, train_loss.png, val_loss.png")
    return 0
