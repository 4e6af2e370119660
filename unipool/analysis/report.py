"""`unipool report RUN`: one picture of a run, RUN/report.png (training also writes it at the end).

Four panels, read left to right, top to bottom:
- loss: training loss (raw, faint; smoothed, solid) and validation loss against the unigram baseline,
  the loss of predicting every token from its frequency alone: the gap is what the model learned
  from context;
- expert usage: each layer's share of routed tokens per expert (held-out tokens, the run's newest
  checkpoint), as a multiple of the uniform share; picks whose gate is 0 are left out, as in
  `unipool routing`;
- dead rows: per layer, the share of tokens whose picked gates are all exactly 0, so that the layer's
  MoE adds nothing for them (NormRouter when every router logit is negative);
- router scale: per layer, NormRouter's learnable sigma (no other router has one; for them: the mean
  sum of the picked gates, which plays the same role).
The last two panels are curves over training when the run logged them per step (`dead_rows` and
`router_scale` in metrics.jsonl), else the final held-out values as bars.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from unipool.analysis.compare import curve, smooth
from unipool.analysis.eval import add_data_args, data_for
from unipool.analysis.routing import collect_routing, routing_stats
from unipool.errors import UnipoolError
from unipool.model.model import Unipool
from unipool.run import Run, default_device

REPORT_TOKENS = 16384  # held-out tokens for the usage heatmap: a few seconds on a CPU for the demo


class RunReportError(UnipoolError):
    pass


def router_scales(model: Unipool) -> list[float] | None:
    """Each layer's NormRouter sigma, or None when the routers have none (collective under FSDP2)."""
    scales = model.router_scales()  # sigma whatever its parametrisation (linear, softplus, exp)
    if scales is None:
        return None
    scales = [s.full_tensor() if hasattr(s, "full_tensor") else s for s in scales]  # FSDP2 shards it
    return [float(s.detach().float().reshape(-1)[0]) for s in scales]


def measure(model: Unipool, batches, max_tokens: int = REPORT_TOKENS) -> dict:
    """What the report needs from the model: routing on `batches` (held-out windows) and sigma. Under
    FSDP2 every rank must call it with the same batches (the forwards gather weights collectively)."""
    with torch.no_grad():
        stats = routing_stats(collect_routing(model, batches, max_tokens))
        return {"routing": stats, "router_scale": router_scales(model)}


def report_data(run: Run, model: Unipool, measured: dict, summary: dict | None = None) -> dict:
    """What the picture shows, as plain values: the run's metrics, its summary (`summary`, else
    RUN/summary.json) and `measure(model, ...)`."""
    records, notes = run.metrics()
    if summary is None:
        try:
            summary = run.summary() or {}
        except UnipoolError:
            summary = {}
            notes.append("summary.json is unreadable")
    cfg = model.config
    return {
        "name": run.path.name, "preset": run.config.preset_label(), "moe_mode": cfg.moe_mode, "router": cfg.router,
        "n_layers": cfg.n_layers, "experts_per_pool": cfg.n_routed_experts, "n_pools": cfg.n_pools,
        "params": model.param_counts(), "records": records, "notes": notes, "summary": summary,
        "step": run.step, **measured,
    }


def _layer_colors(plt, n_layers: int):
    return plt.cm.viridis(np.linspace(0.0, 0.9, max(n_layers, 1)))


def _per_layer_curves(ax, plt, records: list[dict], key: str, n_layers: int) -> bool:
    """Plot `key` (a per-layer list in the metrics records) over tokens, one line per layer."""
    rows = [(r["tokens"], r[key]) for r in records if isinstance(r.get(key), list) and len(r[key]) == n_layers]
    if len(rows) < 2:
        return False
    xs = np.array([t for t, _ in rows], dtype=float)
    ys_NL = np.array([v for _, v in rows], dtype=float)
    for layer, color in enumerate(_layer_colors(plt, n_layers)):
        ax.plot(xs, ys_NL[:, layer], color=color, lw=1.4, label=f"layer {layer}")
    ax.set_xlabel("tokens")
    ax.legend(fontsize="x-small", ncols=2 if n_layers > 6 else 1, loc="best")
    return True


def _per_layer_bars(ax, plt, values: list[float], n_layers: int) -> None:
    ax.bar(np.arange(n_layers), values, color=_layer_colors(plt, n_layers))
    ax.set_xlabel("layer")
    ax.set_xticks(np.arange(n_layers))


def plot_report(data: dict, path: str | Path) -> Path:
    """Draw `data` (from `report_data`) into one PNG at `path`."""
    try:
        import matplotlib
    except ModuleNotFoundError:  # a base dependency; only a broken install lands here
        raise RunReportError("the run report needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, MaxNLocator

    records, summary, stats = data["records"], data["summary"], data["routing"]
    n_layers, n_experts = data["n_layers"], data["experts_per_pool"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.6), gridspec_kw={"height_ratios": [1, 1]})
    (ax_loss, ax_use), (ax_dead, ax_scale) = axes
    tokens_fmt = EngFormatter(sep="")

    # -- loss
    train, val = curve(records, "loss"), curve(records, "val_loss")
    if train:
        xs, ys = zip(*train)
        ax_loss.plot(xs, ys, color="C0", alpha=0.25, lw=0.8)
        ax_loss.plot(xs, smooth(list(ys), max(2, len(ys) // 15)), color="C0", lw=2, label="training loss")
    if val:
        xs, ys = zip(*val)
        ax_loss.plot(xs, ys, color="C3", marker="o", ms=5, lw=1.5, label=f"validation loss (last {ys[-1]:.2f})")
    unigram = summary.get("unigram_loss")
    if isinstance(unigram, (int, float)):
        ax_loss.axhline(unigram, color="0.3", ls="--", lw=1.2, label=f"unigram baseline {unigram:.2f} (no context)")
        if val:
            gap = unigram - val[-1][1]
            ax_loss.set_title(f"loss: {gap:.2f} nats/token below the unigram baseline", loc="left")
    if not ax_loss.get_title(loc="left"):
        ax_loss.set_title("loss", loc="left")
    if not (train or val):
        ax_loss.text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=ax_loss.transAxes)
    else:
        ax_loss.legend(loc="upper right")
        ax_loss.xaxis.set_major_formatter(tokens_fmt)
    ax_loss.set(xlabel="tokens", ylabel="nats / token")
    ax_loss.grid(alpha=0.3)

    # -- expert usage heatmap
    rel_LE = np.asarray(stats["usage_LE"]) * n_experts
    im = ax_use.imshow(rel_LE, aspect="auto", cmap="viridis", interpolation="nearest",
                       vmin=0, vmax=max(2.0, float(np.percentile(rel_LE, 99))))
    fig.colorbar(im, ax=ax_use, label="share / uniform share", fraction=0.05, pad=0.02)
    column = {"pool": "expert of the shared pool", "layerwise": "expert of the layer's own set",
              "grouped": "expert of the layer's group pool"}.get(data["moe_mode"], "expert")
    ax_use.set_title(f"expert usage ({stats['tokens']:,} held-out tokens)", loc="left")
    ax_use.set(xlabel=column, ylabel="layer")
    ax_use.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_use.yaxis.set_major_locator(MaxNLocator(integer=True))

    # -- dead rows
    zero_L = stats["per_layer"]["zero_gate_fraction"]
    if not _per_layer_curves(ax_dead, plt, records, "dead_rows", n_layers):
        _per_layer_bars(ax_dead, plt, zero_L, n_layers)
    else:
        ax_dead.xaxis.set_major_formatter(tokens_fmt)
    ax_dead.set_ylim(0, 1.02)
    ax_dead.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax_dead.set_title(f"tokens with every gate 0 (FFN off); now {100 * float(np.mean(zero_L)):.0f}% on average",
                      loc="left")
    ax_dead.set_ylabel("share of tokens")
    ax_dead.grid(alpha=0.3)

    # -- router scale
    if data["router_scale"] is not None:
        if not _per_layer_curves(ax_scale, plt, records, "router_scale", n_layers):
            _per_layer_bars(ax_scale, plt, data["router_scale"], n_layers)
        else:
            ax_scale.xaxis.set_major_formatter(tokens_fmt)
        ax_scale.axhline(0, color="k", lw=0.8)
        ax_scale.set_title("NormRouter scale sigma per layer (init 1)", loc="left")
        ax_scale.set_ylabel("sigma")
    else:
        _per_layer_bars(ax_scale, plt, stats["per_layer"]["mean_gate_sum"], n_layers)
        ax_scale.set_title(f"mean sum of picked gates per layer ({data['router']} router)", loc="left")
        ax_scale.set_ylabel("gate")
    ax_scale.grid(alpha=0.3)

    params = data["params"]
    pools = (f"one shared pool of {n_experts} experts" if data["moe_mode"] == "pool"
             else f"{data['n_pools']} pools of {n_experts} experts" if data["moe_mode"] == "grouped"
             else f"{n_experts} experts per layer")
    tokens = max((r.get("tokens", 0) for r in records), default=0)
    fig.suptitle(f"{data['name']} · {data['preset']}: {n_layers} layers, {pools}, {data['router']} router · "
                 f"{params['total'] / 1e6:.1f}M params ({params['active'] / 1e6:.1f}M active) · "
                 f"step {data['step']}, {tokens_fmt(tokens)} tokens", fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(run: Run, model: Unipool, batches, path: str | Path | None = None,
                 max_tokens: int = REPORT_TOKENS) -> Path:
    """RUN/report.png (or `path`) for `model`, the run's newest weights, routed on `batches`."""
    return plot_report(report_data(run, model, measure(model, batches, max_tokens)), path or run.path / "report.png")


# ---- CLI ---------------------------------------------------------------------------------------

def add_report_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, max_tokens=REPORT_TOKENS)
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN/report.png)")


def cmd_report(args: argparse.Namespace) -> int:
    run = Run.open(args.run)
    if run.path is None:
        raise RunReportError(f"{args.run} is not inside a run directory: the report reads the run's metrics")
    if run.checkpoint is None:
        raise RunReportError(f"{run.path} has no checkpoint yet: nothing to report")
    model = run.load_model(args.device or default_device())
    _, batches, _ = data_for(args, run, model)
    path = write_report(run, model, batches, args.out, args.max_tokens)
    print(f"wrote {path}")
    return 0
