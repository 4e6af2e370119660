"""`unipool routing`: how a trained model uses its experts, measured on held-out text.

Shape suffixes: L layers, T tokens, K experts per token, E experts per pool (router width),
G = n_pools * E experts in the whole model ("global" ids: pool p's expert e is p * E + e).

Statistics (all in routing.json, computed by `routing_stats` from a `RoutingTrace`; `load_stats` is
the cheap subset that training logs every `routing_interval` steps from expert counts alone):
- usage_LE: each layer's share of its routed slots per expert of its own pool (the heatmap; for
  UniPool the columns are the one shared pool, for vanilla each layer's private experts, for
  grouped sharing the layer's group pool), and the aggregate use of every expert over the layers
  that call its pool (bar plot).
- "Uses": layer l uses expert e when e got at least `use_threshold` x the uniform share 1/E of
  layer l's slots (and at least one token). Per expert: how many layers use it (the cross-layer
  reuse histogram) and which; per layer pair: the Jaccard overlap of the used expert sets.
- Dead experts get no token at all; nearly dead ones get less than `dead_threshold` x the
  uniform share of their pool's slots.
- Per-layer entropy of the load distribution (nats, and divided by log E) and the mean entropy
  of each token's router scores normalised to a distribution. The load distribution is that of the
  layer's live picks (counts over their total, not over all slots), so zero-gate picks do not
  lower it; a layer without a live pick has load entropy 0.
- U(x) (UniPool Table 9): distinct experts a token touches over all L layers. Vanilla MoE always
  gives L * K (every layer has its own experts); the paper reports its mean over L for top-1.

A pick whose gate is exactly zero is not a use of its expert: NormRouter zeroes every score of a
token whose logits are all negative, top-k then picks among tied zeros (whichever expert torch.topk
returns; the order is implementation-defined) and the FFN adds nothing. Such picks are recorded as -1
and left out of every count above (so a layer's usage_LE row sums to 1 minus its zero-gate share,
and U(x) can be below L); per_layer.zero_gate_fraction reports how many tokens had no nonzero gate
at all. Softmax gates are never exactly zero.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from unipool.analysis.eval import Batch, add_data_args, open_with_data
from unipool.data.tokenizer import atomic_write_text
from unipool.errors import UnipoolError
from unipool.model.model import Unipool


class RoutingError(UnipoolError):
    pass


@dataclass
class RoutingTrace:
    expert_ids_LTK: np.ndarray  # int64, indices into each layer's own pool; -1 where the gate was 0
    score_entropy_L: np.ndarray  # mean over tokens of the entropy of normalised router scores
    n_experts: int  # E, experts per pool
    pool_of_layer: list[int]
    moe_mode: str = "pool"
    # Fraction of tokens whose picked gates are all zero, per layer: the MoE adds nothing for them and
    # no gradient reaches their router (NormRouter when every logit is negative). None: not recorded.
    zero_gate_L: np.ndarray | None = None
    # Mean over tokens of the sum of the picked gates, per layer: how strongly the MoE output is scaled
    # (softmax top-1 without renormalisation: the top probability; NormRouter: about sigma at init).
    gate_sum_L: np.ndarray | None = None

    @property
    def n_pools(self) -> int:
        return max(self.pool_of_layer) + 1


def score_entropy_T(scores_TE: torch.Tensor) -> torch.Tensor:
    """Entropy of each token's scores normalised to sum 1 (softmax: the router distribution).

    A token whose scores are all zero (NormRouter: every logit negative) expresses no preference
    and counts as uniform, log E."""
    scores_TE = scores_TE.float().clamp_min(0)
    total_T1 = scores_TE.sum(-1, keepdim=True)
    p_TE = torch.where(total_T1 > 0, scores_TE / total_T1.clamp_min(1e-30), 1.0 / scores_TE.shape[-1])
    return -(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1)


@torch.no_grad()
def collect_routing(model: Unipool, batches: Iterable[Batch], max_tokens: int | None = None) -> RoutingTrace:
    """Run `batches` through the model (eval mode, no grad) and record every layer's picks."""
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, n_tokens = [], 0
    ent_sum, zero_sum, gate_sum = (torch.zeros(cfg.n_layers, dtype=torch.float64) for _ in range(3))
    try:
        for inputs, _ in batches:
            if max_tokens is not None and n_tokens >= max_tokens:
                break
            routing = model(inputs.to(device)).routing
            keep = inputs.numel() if max_tokens is None else min(inputs.numel(), max_tokens - n_tokens)
            ids.append(torch.stack([r.expert_ids_TK[:keep].masked_fill(r.weights_TK[:keep] == 0, -1)
                                    for r in routing]).cpu())  # (L, T, K)
            ent_sum += torch.stack([score_entropy_T(r.scores_TE[:keep]).double().sum() for r in routing]).cpu()
            zero_sum += torch.stack([(r.weights_TK[:keep] == 0).all(-1).double().sum() for r in routing]).cpu()
            gate_sum += torch.stack([r.weights_TK[:keep].double().sum() for r in routing]).cpu()
            n_tokens += keep
    finally:
        model.train(was_training)
    if n_tokens == 0:
        raise RoutingError("no tokens to analyse")
    return RoutingTrace(torch.cat(ids, dim=1).numpy().astype(np.int64), (ent_sum / n_tokens).numpy(),
                        cfg.n_routed_experts, [cfg.pool_of_layer(i) for i in range(cfg.n_layers)], cfg.moe_mode,
                        (zero_sum / n_tokens).numpy(), (gate_sum / n_tokens).numpy())


def load_stats(counts_LE: torch.Tensor, layers_per_pool: int) -> dict:
    """From tokens routed per layer and expert over an interval: each layer's load, dead experts (no
    token from any layer calling their pool) and balance as the coefficient of variation of each
    pool's load (0 = perfectly even), mean over pools and per layer."""
    counts_LE = counts_LE.double().cpu()
    load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1)
    counts_PE = counts_LE.view(-1, layers_per_pool, counts_LE.shape[-1]).sum(1)
    cv_P = counts_PE.std(-1, unbiased=False) / counts_PE.mean(-1).clamp_min(1e-12)
    cv_L = counts_LE.std(-1, unbiased=False) / counts_LE.mean(-1).clamp_min(1e-12)
    return {
        "load_LE": [[round(v, 5) for v in row] for row in load_LE.tolist()],
        "dead_experts": int((counts_PE == 0).sum()),
        "balance_cv": round(float(cv_P.mean()), 5),
        "balance_cv_layer": [round(v, 5) for v in cv_L.tolist()],
    }


def to_global_LG(values_LE: np.ndarray, pool_of_layer, n_pools: int) -> np.ndarray:
    """Per-layer values over the layer's own pool (L x E) placed on the model's global expert axis, where
    pool p's expert e is column p * E + e (L x G, G = n_pools * E); zero outside each layer's pool."""
    values_LE = np.asarray(values_LE)
    n_layers, n_experts = values_LE.shape
    values_LG = np.zeros((n_layers, n_pools * n_experts), dtype=values_LE.dtype)
    for layer, pool in enumerate(pool_of_layer):
        values_LG[layer, pool * n_experts:(pool + 1) * n_experts] = values_LE[layer]
    return values_LG


def routing_stats(trace: RoutingTrace, use_threshold: float = 0.1, dead_threshold: float = 0.1) -> dict:
    """All routing statistics of a trace, as plain JSON-ready Python values (see module docstring)."""
    ids_LTK = trace.expert_ids_LTK
    n_layers, n_tokens, top_k = ids_LTK.shape
    n_experts, n_pools = trace.n_experts, trace.n_pools
    pool_L = np.asarray(trace.pool_of_layer)
    slots = n_tokens * top_k  # routed (token, expert) pairs per layer

    valid_LTK = ids_LTK >= 0  # -1: a pick with gate 0, not a use of any expert
    counts_LE = np.stack([np.bincount(ids_LTK[l][valid_LTK[l]], minlength=n_experts) for l in range(n_layers)])
    share_LE = counts_LE / slots

    # Global view: pool p's expert e is column p * E + e.
    gid_LTK = np.where(valid_LTK, ids_LTK + (pool_L * n_experts)[:, None, None], -1)
    n_global = n_pools * n_experts
    counts_LG = to_global_LG(counts_LE, pool_L, n_pools)
    layers_in_pool_G = np.repeat(np.bincount(pool_L, minlength=n_pools), n_experts)
    agg_rel_G = counts_LG.sum(0) / (slots * layers_in_pool_G) * n_experts
    used_LG = (counts_LG > 0) & (counts_LG / slots * n_experts >= use_threshold)
    layers_per_expert_G = used_LG.sum(0)

    # Entropy of the live picks' distribution: normalising by all slots would make a row sum to
    # 1 - zero-gate share and lower the entropy of a perfectly even load.
    live_L1 = counts_LE.sum(1, keepdims=True)
    load_LE = counts_LE / np.maximum(live_L1, 1)
    entropy_L = -(load_LE * np.log(np.where(load_LE > 0, load_LE, 1.0))).sum(1)
    mean_L = counts_LE.mean(1)

    # U(x): distinct global experts over the L * K picks of each token (zero-gate picks excluded).
    picks_TN = np.sort(gid_LTK.transpose(1, 0, 2).reshape(n_tokens, n_layers * top_k), axis=1)
    first_TN = np.concatenate([np.ones((n_tokens, 1), bool), np.diff(picks_TN, axis=1) != 0], axis=1)
    unique_T = (first_TN & (picks_TN >= 0)).sum(1)

    inter_LL = used_LG.astype(np.int64) @ used_LG.T.astype(np.int64)
    size_L = used_LG.sum(1)
    union_LL = size_L[:, None] + size_L[None, :] - inter_LL
    jaccard_LL = np.where(union_LL > 0, inter_LL / np.maximum(union_LL, 1), 0.0)

    return {
        "tokens": int(n_tokens),
        "n_layers": int(n_layers),
        "top_k": int(top_k),
        "moe_mode": trace.moe_mode,
        "n_pools": int(n_pools),
        "experts_per_pool": int(n_experts),
        "pool_of_layer": [int(p) for p in pool_L],
        "use_threshold": use_threshold,
        "dead_threshold": dead_threshold,
        "usage_LE": share_LE.tolist(),
        "aggregate_usage": agg_rel_G.tolist(),  # per global expert, relative to the uniform share
        "dead_experts": np.flatnonzero(counts_LG.sum(0) == 0).tolist(),
        "nearly_dead_experts": np.flatnonzero(agg_rel_G < dead_threshold).tolist(),
        "layers_per_expert": layers_per_expert_G.tolist(),
        "layers_of_expert": {int(g): np.flatnonzero(used_LG[:, g]).tolist() for g in range(n_global)},
        "reuse_histogram": np.bincount(layers_per_expert_G, minlength=n_layers + 1).tolist(),
        "per_layer": {
            "experts_used": size_L.tolist(),
            "load_entropy": entropy_L.tolist(),
            "load_entropy_norm": (entropy_L / math.log(n_experts) if n_experts > 1 else entropy_L * 0).tolist(),
            "score_entropy": np.asarray(trace.score_entropy_L, dtype=np.float64).tolist(),
            "balance_cv": (counts_LE.std(1) / np.where(mean_L > 0, mean_L, 1)).tolist(),
            "zero_gate_fraction": (None if trace.zero_gate_L is None
                                   else np.asarray(trace.zero_gate_L, dtype=np.float64).tolist()),
            "mean_gate_sum": (None if trace.gate_sum_L is None
                              else np.asarray(trace.gate_sum_L, dtype=np.float64).tolist()),
        },
        "unique_experts_per_token": {
            "mean": float(unique_T.mean()),
            "fraction_of_layers": float(unique_T.mean() / n_layers),
            "fraction_of_picks": float(unique_T.mean() / (n_layers * top_k)),
            "min": int(unique_T.min()),
            "max": int(unique_T.max()),
            "histogram": np.bincount(unique_T, minlength=n_layers * top_k + 1).tolist(),
        },
        "layer_overlap_jaccard": jaccard_LL.tolist(),
    }


# ---- plots -------------------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise RoutingError("plots need matplotlib, a dependency of unipool: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_routing(stats: dict, out_dir: str | Path) -> list[Path]:
    """Heatmap, aggregate usage, reuse histogram, U(x) histogram and layer overlap PNGs."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    def integer():  # one locator per axis: matplotlib binds a locator to its axis
        return MaxNLocator(integer=True)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_layers, n_experts, mode = stats["n_layers"], stats["experts_per_pool"], stats["moe_mode"]
    column = {"pool": "expert of the shared pool", "layerwise": "expert of the layer's own set",
              "grouped": "expert of the layer's group pool"}.get(mode, "expert")
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    rel_LE = np.asarray(stats["usage_LE"]) * n_experts
    fig, ax = plt.subplots(figsize=(min(max(5.0, 3 + 0.12 * n_experts), 24), 2 + 0.3 * n_layers))
    im = ax.imshow(rel_LE, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="load / uniform share")
    if mode == "grouped":  # rows of different group pools index different experts
        for layer in range(1, n_layers):
            if stats["pool_of_layer"][layer] != stats["pool_of_layer"][layer - 1]:
                ax.axhline(layer - 0.5, color="w", lw=1.5)
    title = f"expert utilisation ({mode}, {stats['tokens']:,} tokens)"
    zero_share = 1 - float(np.asarray(stats["usage_LE"]).sum(1).mean())
    if zero_share > 0.005:
        title += f"\n{100 * zero_share:.0f}% of picks had gate 0 and are left out"
    ax.set(xlabel=column, ylabel="layer", title=title)
    ax.xaxis.set_major_locator(integer())
    ax.yaxis.set_major_locator(integer())
    save(fig, "utilisation_heatmap.png")

    agg_G = np.asarray(stats["aggregate_usage"])
    fig, ax = plt.subplots(figsize=(min(4 + 0.08 * agg_G.size, 24), 3.5))
    colors = plt.cm.tab10(np.repeat(np.arange(stats["n_pools"]) % 10, n_experts))
    ax.bar(np.arange(agg_G.size), agg_G, width=0.8 if agg_G.size <= 64 else 1.0, color=colors)
    ax.set_ylim(0, 1.3 * max(agg_G.max(), 1.0))
    ax.xaxis.set_major_locator(integer())
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="uniform")
    ax.axhline(stats["dead_threshold"], color="r", lw=0.8, ls=":", label="nearly-dead threshold")
    ax.set(xlabel="expert" + (" (colour: pool)" if stats["n_pools"] > 1 else ""), ylabel="load / uniform share",
           title=f"aggregate expert usage ({len(stats['nearly_dead_experts'])} nearly dead)")
    ax.legend(loc="upper right", fontsize="small", ncols=2)
    save(fig, "aggregate_usage.png")

    hist = stats["reuse_histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(len(hist)), hist)
    ax.set(xlabel="layers using the expert", ylabel="experts", title="cross-layer reuse")
    ax.xaxis.set_major_locator(integer())
    save(fig, "reuse_histogram.png")

    u = stats["unique_experts_per_token"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(len(u["histogram"])), u["histogram"])
    ax.axvline(u["mean"], color="k", ls="--", label=f"mean {u['mean']:.2f} ({100 * u['fraction_of_layers']:.1f}% of L)")
    ax.set(xlabel="distinct experts per token over all layers", ylabel="tokens", title="U(x)")
    ax.xaxis.set_major_locator(integer())
    ax.legend()
    save(fig, "unique_experts.png")

    fig, ax = plt.subplots(figsize=(max(4.0, 2.5 + 0.3 * n_layers), max(3.0, 2 + 0.3 * n_layers)))
    im = ax.imshow(np.asarray(stats["layer_overlap_jaccard"]), vmin=0, vmax=1, cmap="magma", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="Jaccard of used experts")
    ax.set(xlabel="layer", ylabel="layer", title="expert overlap between layers")
    ax.xaxis.set_major_locator(integer())
    ax.yaxis.set_major_locator(integer())
    save(fig, "layer_overlap.png")
    return written


def analyse(model: Unipool, batches: Iterable[Batch], out_dir: str | Path | None = None, *,
            max_tokens: int | None = None, use_threshold: float = 0.1, dead_threshold: float = 0.1) -> dict:
    """collect_routing + routing_stats, and (with out_dir) routing.json, layer_overlap.json and the PNGs."""
    stats = routing_stats(collect_routing(model, batches, max_tokens), use_threshold, dead_threshold)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # atomic: a reader that finds routing.json (a study caches it) finds all of it
        atomic_write_text(out_dir / "routing.json", json.dumps(stats, indent=1))
        (out_dir / "layer_overlap.json").write_text(json.dumps(
            {"jaccard": stats["layer_overlap_jaccard"], "layers_of_expert": stats["layers_of_expert"]}, indent=1))
        plot_routing(stats, out_dir)
    return stats


# ---- CLI ---------------------------------------------------------------------------------------

def add_routing_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p, max_tokens=32768)
    p.add_argument("--out", type=Path, default=None, help="output directory (default: RUN_OR_CKPT's checkpoint/routing)")
    p.add_argument("--use-threshold", type=float, default=0.1,
                   help="a layer uses an expert that gets at least this x the uniform share of its tokens")
    p.add_argument("--dead-threshold", type=float, default=0.1,
                   help="an expert is nearly dead below this x the uniform share of its pool's tokens")


def cmd_routing(args: argparse.Namespace) -> int:
    for name in ("use_threshold", "dead_threshold"):
        if getattr(args, name) < 0:
            raise RoutingError(f"--{name.replace('_', '-')} must be >= 0")
    run, model, _, batches, source = open_with_data(args)
    ckpt = run.latest_checkpoint()
    out = args.out or ckpt / "routing"
    stats = analyse(model, batches, out, max_tokens=args.max_tokens, use_threshold=args.use_threshold,
                    dead_threshold=args.dead_threshold)
    # Record where the numbers came from next to them.
    stats = {"checkpoint": str(ckpt), "step": run.step, "data": source, **stats}
    atomic_write_text(out / "routing.json", json.dumps(stats, indent=1))

    u, per_layer = stats["unique_experts_per_token"], stats["per_layer"]
    print(f"{ckpt} (step {run.step}), {stats['moe_mode']}: {stats['n_pools']} pool(s) x "
          f"{stats['experts_per_pool']} experts, top-{stats['top_k']}, {stats['tokens']:,} tokens from {source}")
    print(f"  distinct experts per token U(x): {u['mean']:.2f} of {stats['n_layers']} layers "
          f"({100 * u['fraction_of_layers']:.1f}%)")
    print(f"  dead experts: {len(stats['dead_experts'])}, nearly dead (<{args.dead_threshold:g}x uniform): "
          f"{len(stats['nearly_dead_experts'])}")
    print("  per layer: experts used " + " ".join(str(n) for n in per_layer["experts_used"]))
    print("  load entropy / log E: " + " ".join(f"{h:.2f}" for h in per_layer["load_entropy_norm"]))
    print("  tokens with all gates 0: " + " ".join(f"{100 * z:.0f}%" for z in per_layer["zero_gate_fraction"]))
    print("  mean sum of picked gates: " + " ".join(f"{g:.2f}" for g in per_layer["mean_gate_sum"]))
    print(f"  wrote {out}/routing.json, layer_overlap.json and plots")
    return 0
