"""`unipool probe`: what does a layer's learned router buy?

The routing probe (UniPool, Tables 1, 4, 10, 11) replaces the learned top-k choice of one MoE layer
with k distinct experts drawn uniformly at random per token, and measures the held-out loss /
perplexity (and optionally zero-shot accuracy) against the unmodified model. It runs one layer at a
time over the deeper half of the network, then all deeper-half layers together.

Shape suffixes: T tokens, E routed experts of a layer, K experts per token, C candidate experts.

One mechanism for every model: `RandomRouting` puts a forward hook on each chosen layer's router
that replaces the router's output, and removes it on exit. The model itself holds no probe state.
- unipool models: the hook on `layers.{i}.router` returns a new `RouterOutput` (random
  `expert_ids_TK`, their `weights_TK` and `counts_E`; the router's own `scores_TE` and `aux_loss`).
- Hugging Face MoE families (`unipool.interop.hf_moe.HF_FAMILIES`): the hook on `mlp.gate` returns
  new (router_logits_TE, weights_TK, expert_ids_TK). No modeling code is copied. Shared experts keep
  running; DeepSeek's group limit is not applied (it is part of the learned choice).

Gates of the random picks (`gates`): "uniform" (default) = scale / k, with scale the family's routed
scaling factor (1 for unipool and most families); "model" = what the router would give those experts:
its scores at the picks, renormalised if it renormalises its top-k, times scale. "model" shrinks the
routed branch of non-renormalising routers, and unipool's NormRouter gives about half the random
picks a zero gate (ReLU'd scores), hence the uniform default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from unipool.analysis.eval import data_for, evaluate
from unipool.data.dataset import text_tokens, window_batches
from unipool.data.tokenizer import TransformersTokenizer
from unipool.errors import UnipoolError
from unipool.interop.hf_moe import (
    HF_FAMILIES,
    GateRule,
    checkpoint_model_type,
    family_notes,
    hf_random_gates,
    load_checkpoint,
    moe_blocks,
)
from unipool.interop.lm_eval import LMEvalError, resolve_tasks, run_lm_eval
from unipool.model.model import Unipool
from unipool.model.router import Router, RouterOutput, dead_row_count, expert_counts, random_topk
from unipool.run import Run, default_device

Batch = tuple[torch.Tensor, torch.Tensor]
GATES = ("uniform", "model")


class ProbeError(UnipoolError):
    pass


# ---- the model under probe ----------------------------------------------------------------------

@dataclass
class ProbeTarget:
    """A loaded model plus where its routers are."""
    model: nn.Module
    family: str  # "unipool" or the HF model_type
    routers: dict[int, nn.Module]  # decoder layer index -> router module, MoE layers only
    n_layers: int  # all decoder layers, dense ones included
    n_experts: int  # routed experts each router picks from
    top_k: int
    name: str = ""
    tokenizer: object = None  # HF tokenizer for HF models; for unipool models optional (else the run's)
    run: object = None  # unipool.run.Run for unipool models

    @property
    def is_hf(self) -> bool:
        return self.family != "unipool"

    @property
    def rule(self) -> GateRule:
        return HF_FAMILIES[self.family]

    @property
    def deep_layers(self) -> list[int]:
        """MoE layers in the deeper half: decoder index l >= n_layers // 2 (0-based)."""
        return [i for i in self.routers if i >= self.n_layers // 2]

    def notes(self) -> list[str]:
        return family_notes(self.rule, next(iter(self.routers.values()))) if self.is_hf else []


def wrap_model(model: nn.Module, *, name: str = "", tokenizer=None, run=None) -> ProbeTarget:
    """A ProbeTarget for an in-memory unipool model or a supported HF causal LM."""
    if isinstance(model, Unipool):
        cfg = model.config
        routers = {i: block.router for i, block in enumerate(model.layers)}
        return ProbeTarget(model, "unipool", routers, cfg.n_layers, cfg.n_routed_experts, cfg.routed_top_k,
                           name, tokenizer, run)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in HF_FAMILIES:
        raise ProbeError(f"model type {model_type!r} is not supported by the probe; "
                         f"supported: unipool, {', '.join(HF_FAMILIES)}")
    routers = {i: block.gate for i, block in moe_blocks(model).items()}
    if not routers:
        raise ProbeError(f"{name or model_type}: no MoE layers found")
    first = next(iter(routers.values()))
    return ProbeTarget(model, model_type, routers, len(model.get_decoder().layers), first.num_experts, first.top_k,
                       name, tokenizer, run)


def load_target(path: str | Path, device: str = "cpu", dtype: str = "auto") -> ProbeTarget:
    """A unipool run / checkpoint, or a local HF checkpoint directory (config.json with model_type)."""
    p = Path(path)
    if not p.exists():
        raise ProbeError(f"no such model directory or file: {p}")
    if checkpoint_model_type(p) is not None:
        model, tokenizer = load_checkpoint(p, device, dtype)
        return wrap_model(model, name=str(p), tokenizer=tokenizer)
    run = Run.open(p)
    return wrap_model(run.load_model(device), name=str(p), run=run)


# ---- random routing -----------------------------------------------------------------------------

class RandomRouting:
    """Context manager: uniform random top-k (k distinct experts per token) in `layers`.

    `generator` drives every draw (one stream shared by the layers, in call order); `candidates`
    optionally maps a layer to the experts it may draw from (UniPool's Random-dagger variant); without it a
    unipool router restricted to some experts (a router window, a merged pool's stored mask) draws from those.
    Every other layer keeps its learned routing. Each chosen router gets a forward hook that
    replaces its output; nothing else in the model changes, and exit removes the hooks.
    """

    def __init__(self, target: ProbeTarget, layers: Iterable[int], gates: str = "uniform",
                 generator: torch.Generator | None = None, candidates: dict[int, torch.Tensor] | None = None):
        if gates not in GATES:
            raise ProbeError(f"gates must be one of {GATES}, got {gates!r}")
        self.target, self.layers, self.gates = target, list(layers), gates
        self.generator, self.candidates = generator, candidates or {}
        unknown = [i for i in self.layers if i not in target.routers]
        if unknown:
            raise ProbeError(f"layer(s) {unknown} are not MoE layers; MoE layers: {list(target.routers)}")
        for i in self.layers:  # checked here, so that a failing __enter__ never leaves hooks behind
            n = self.candidates[i].numel() if i in self.candidates else target.n_experts
            if n < target.top_k:
                raise ProbeError(f"layer {i}: {n} candidate experts, fewer than top_k={target.top_k}")
        self._handles: list = []

    def __enter__(self):
        make_hook = self._hf_hook if self.target.is_hf else self._unipool_hook
        for i in self.layers:
            # prepend: hooks registered earlier on the same router (a RoutingRecorder entered first)
            # still see the random picks.
            hook = make_hook(self.candidates.get(i))
            self._handles.append(self.target.routers[i].register_forward_hook(hook, prepend=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _unipool_hook(self, candidates_C: torch.Tensor | None):
        def hook(router: Router, args, out: RouterOutput) -> RouterOutput:
            n_tokens, device = out.expert_ids_TK.shape[0], out.expert_ids_TK.device
            # A router restricted to some experts (a window, a merged pool's stored mask) draws from those.
            mask_E = getattr(router, "candidate_mask_E", None)
            pool_C = candidates_C if candidates_C is not None or mask_E is None else mask_E.nonzero().flatten()
            ids_TK = random_topk(n_tokens, router.n_experts, router.top_k, device, self.generator, pool_C)
            if self.gates == "uniform":  # the router's scaling factor / k, as for the HF families
                weights_TK = torch.full(ids_TK.shape, router.scaling / router.top_k, device=device)
            else:
                weights_TK = router.weights_at(out.scores_TE, ids_TK)
            return dataclasses.replace(out, expert_ids_TK=ids_TK, weights_TK=weights_TK,
                                       counts_E=expert_counts(ids_TK, router.n_experts),
                                       dead_rows=dead_row_count(weights_TK))

        return hook

    def _hf_hook(self, candidates_C: torch.Tensor | None):
        rule, top_k = self.target.rule, self.target.top_k

        def hook(router: nn.Module, args, output):
            logits_TE, weights_TK, _ = output
            n_tokens = weights_TK.shape[0]
            ids_TK = random_topk(n_tokens, router.num_experts, top_k, weights_TK.device, self.generator, candidates_C)
            new_TK = hf_random_gates(rule, router, logits_TE, ids_TK, self.gates).to(weights_TK.dtype)
            return logits_TE, new_TK, ids_TK

        return hook


class RoutingRecorder:
    """Context manager recording, per MoE layer, the (expert_ids_TK, weights_TK) the experts ran with:
    the router's output, after any `RandomRouting` hook (those run first, whichever was entered first).
    `counts` leaves out picks whose gate is exactly zero, as `unipool routing` does: NormRouter's dead
    rows pick a tied expert that adds nothing, and counting it would make that expert look used."""

    def __init__(self, target: ProbeTarget, keep: bool = True):
        self.target, self.keep = target, keep  # keep=False: only count (no per-token tensors kept)
        self.calls: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in target.routers}
        self._counts: dict[int, torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self):
        for i, router in self.target.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def hook(router: nn.Module, args, output):
            # HF routers return (logits_TE, weights_TK, expert_ids_TK); ours a RouterOutput
            ids_TK, weights_TK = (output[2], output[1]) if self.target.is_hf else \
                (output.expert_ids_TK, output.weights_TK)
            if self.keep:
                self.calls[layer].append((ids_TK.detach(), weights_TK.detach()))
            counts_E = torch.bincount(ids_TK[weights_TK != 0], minlength=self.target.n_experts).float()
            self._counts[layer] = self._counts[layer] + counts_E if layer in self._counts else counts_E

        return hook

    def ids(self, layer: int) -> torch.Tensor:
        return torch.cat([ids for ids, _ in self.calls[layer]])

    def weights(self, layer: int) -> torch.Tensor:
        return torch.cat([w for _, w in self.calls[layer]])

    def counts(self, layer: int) -> torch.Tensor:
        """Picks with a nonzero gate per expert over everything recorded (float, on the CPU)."""
        if layer not in self._counts:
            return torch.zeros(self.target.n_experts)
        return self._counts[layer].cpu()


@torch.no_grad()
def expert_usage(target: ProbeTarget, batches: Sequence[Batch], device: str | torch.device) -> dict[int, torch.Tensor]:
    """Tokens routed to each expert with a nonzero gate, per MoE layer, under learned routing (for
    Random-dagger)."""
    with RoutingRecorder(target, keep=False) as rec:
        for inputs, _ in batches:
            target.model(inputs.to(device))
    return {i: rec.counts(i) for i in target.routers}


def top_used(usage: dict[int, torch.Tensor], n: int) -> dict[int, torch.Tensor]:
    """Per layer, the `n` most-used experts in index order (ties broken by the lower index)."""
    # A stable sort, since torch.topk breaks ties in an implementation-defined order.
    return {i: torch.sort(torch.sort(-c, stable=True).indices[:n]).values for i, c in usage.items()}


# ---- measuring ----------------------------------------------------------------------------------

def hf_text_batches(tokenizer, path: Path, batch_size: int, seq_len: int, max_tokens: int | None,
                    text_field: str = "text") -> list[Batch]:
    """Non-overlapping windows over raw text (txt / jsonl / parquet, as `unipool eval` reads it),
    tokenized with the model's HF tokenizer, documents joined with EOS."""
    tokens = text_tokens(path, TransformersTokenizer(tokenizer), text_field)
    return list(window_batches(tokens, batch_size, seq_len, max_tokens))


def loss_metrics(target: ProbeTarget, batches: Sequence[Batch], device, autocast_dtype=None) -> dict[str, float]:
    result = evaluate(target.model, batches, device=device, autocast_dtype=autocast_dtype)
    return {"loss": result["loss"], "ppl": result["ppl"]}


def task_metrics(results: dict) -> dict[str, float]:
    """Flatten lm-eval results ({"results": {task: {"acc,none": x}}} or {task: {"acc": x}}) into
    {"task/acc": x, ...} plus "avg/acc" (mean acc over the tasks), accuracies in percent.

    Only leaf tasks count: lm-eval 0.4 also puts every group's aggregate (e.g. mmlu and its categories)
    in "results", next to the subtasks it aggregates; those are named in "groups" / "group_subtasks"
    and left out, so a group's subtasks are listed and averaged once each."""
    per_task = results.get("results", results)
    groups = set(results.get("groups", {})) | {g for g, subtasks in results.get("group_subtasks", {}).items()
                                                if subtasks}
    out: dict[str, float] = {}
    for task, metrics in sorted(per_task.items()):
        if not isinstance(metrics, dict) or task in groups:
            continue
        for key, value in metrics.items():
            name = key.split(",")[0]
            if name in ("acc", "acc_norm") and isinstance(value, (int, float)):
                out[f"{task}/{name}"] = 100.0 * float(value)
    accs = [v for k, v in out.items() if k.endswith("/acc")]
    if accs:
        out["avg/acc"] = sum(accs) / len(accs)
    return out


def unipool_tokenizer(target: ProbeTarget):
    """The tokenizer lm-eval needs for a unipool target: the one given to `wrap_model`, else its run's."""
    if target.tokenizer is not None:
        return target.tokenizer
    if target.run is None:
        raise ProbeError("lm-eval on an in-memory unipool model needs a tokenizer: pass tokenizer= to wrap_model")
    try:
        return target.run.tokenizer()
    except UnipoolError as e:
        raise ProbeError(f"lm-eval needs the model's tokenizer: {e}") from None


def lm_eval_results(target: ProbeTarget, tasks: list[str], include_path: str | None = None,
                    limit: int | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                    device: str | torch.device = "cpu", task_manager=None) -> dict:
    """lm-eval on the in-memory (possibly hooked) model: HF models through lm_eval's HFLM, unipool
    models through `unipool.interop.lm_eval`. Returns lm_eval's result dict."""
    if target.is_hf:
        from lm_eval.models.huggingface import HFLM

        model_or_lm, tokenizer = HFLM(pretrained=target.model, tokenizer=target.tokenizer, batch_size=batch_size), None
    else:
        model_or_lm, tokenizer = target.model, unipool_tokenizer(target)
    return run_lm_eval(model_or_lm, tokenizer, tasks, include_path=include_path, limit=limit, batch_size=batch_size,
                       num_fewshot=num_fewshot, device=str(device), task_manager=task_manager)


@dataclass
class ProbeConfig:
    layers: list[int]  # probed one at a time
    combined: bool = True  # also probe all of `layers` together
    combined_label: str = "all deep"
    gates: str = "uniform"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    restrict_top: int = 0  # >0: draw from each layer's N most-used experts (Random-dagger)
    tasks: list[str] = field(default_factory=list)


def run_probe(target: ProbeTarget, batches: Sequence[Batch], cfg: ProbeConfig, *, device: str | torch.device,
              autocast_dtype: torch.dtype | None = None, task_fn: Callable[[ProbeTarget], dict] | None = None,
              log: Callable[[str], None] = print) -> dict:
    """Baseline vs random routing for each configuration and seed; returns the JSON-able report."""
    if cfg.gates not in GATES:
        raise ProbeError(f"gates must be one of {GATES}, got {cfg.gates!r}")
    if not cfg.layers:
        raise ProbeError("no layers to probe")
    if not cfg.seeds:
        raise ProbeError("need at least one seed")
    if cfg.tasks and task_fn is None:
        raise ProbeError("tasks given without an lm-eval function")
    target.model.eval()

    def measure() -> dict[str, float]:
        metrics = loss_metrics(target, batches, device, autocast_dtype)
        if cfg.tasks:
            metrics.update(task_metrics(task_fn(target)))
        return metrics

    candidates = None
    if cfg.restrict_top > 0:
        candidates = top_used(expert_usage(target, batches, device), cfg.restrict_top)
    baseline = measure()
    log("baseline: " + "  ".join(f"{k} {v:.4f}" for k, v in baseline.items()))

    configs = [(str(i), [i]) for i in cfg.layers]
    if cfg.combined and len(cfg.layers) > 1:
        configs.append((cfg.combined_label, list(cfg.layers)))
    gen_device = torch.device(device) if torch.device(device).type == "cuda" else torch.device("cpu")
    rows = []
    for label, layers in configs:
        per_seed: list[dict[str, float]] = []
        for seed in cfg.seeds:
            generator = torch.Generator(device=gen_device).manual_seed(seed)
            with RandomRouting(target, layers, cfg.gates, generator, candidates):
                per_seed.append(measure())
            log(f"layer {label} seed {seed}: loss {per_seed[-1]['loss']:.4f}")
        for metric, base in baseline.items():
            values = [m[metric] for m in per_seed]
            mean = sum(values) / len(values)
            std = statistics.stdev(values) if len(values) > 1 else None  # undefined for one seed
            rows.append({"layer": label, "layers": layers,
                         "depth": (sum(layers) / len(layers)) / max(target.n_layers - 1, 1),
                         "metric": metric, "baseline": base, "randomized_mean": mean,
                         "randomized_std": std, "delta": mean - base, "per_seed": values})
    return {
        "model": target.name, "family": target.family, "n_layers": target.n_layers,
        "moe_layers": list(target.routers), "deep_layers": target.deep_layers,
        "n_experts": target.n_experts, "top_k": target.top_k, "gates": cfg.gates, "seeds": cfg.seeds,
        "restrict_top": cfg.restrict_top,
        "candidates": {str(i): c.tolist() for i, c in candidates.items() if i in cfg.layers} if candidates else None,
        "tasks": cfg.tasks, "tokens": sum(int(t.numel()) for _, t in batches),
        "notes": target.notes(), "baseline": baseline, "rows": rows,
    }


# ---- report -------------------------------------------------------------------------------------

def markdown_table(report: dict) -> str:
    lines = [f"Routing probe of `{report['model']}` ({report['family']}, {report['n_layers']} layers, "
             f"{report['n_experts']} experts, top-{report['top_k']}); gates: {report['gates']}; "
             f"seeds: {', '.join(map(str, report['seeds']))}; {report['tokens']:,} held-out tokens"
             + (f"; experts drawn from each layer's top-{report['restrict_top']} most used" if report["restrict_top"] else "")
             + ".", ""]
    lines += [f"- {n}" for n in report["notes"]]
    if report["notes"]:
        lines.append("")
    lines += ["| layer | metric | baseline | randomized (mean) | std | delta |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        std = "— (n=1)" if r["randomized_std"] is None else f"{r['randomized_std']:.4f}"
        lines.append(f"| {r['layer']} | {r['metric']} | {r['baseline']:.4f} | {r['randomized_mean']:.4f} | "
                     f"{std} | {r['delta']:+.4f} |")
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Delta (mean +- std over seeds; no error bars for one seed) vs layer depth, one panel per headline
    metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metrics = ["loss"] + (["avg/acc"] if any(r["metric"] == "avg/acc" for r in report["rows"]) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = [r for r in report["rows"] if r["metric"] == metric]
        single = [r for r in rows if len(r["layers"]) == 1]
        stds = [r["randomized_std"] for r in single]
        ax.errorbar([r["layers"][0] for r in single], [r["delta"] for r in single],
                    yerr=None if None in stds else stds, fmt="o-", capsize=3, label="one layer random")
        for r in rows:
            if len(r["layers"]) > 1:
                ax.axhline(r["delta"], color="C3", ls="--", label=f"{r['layer']} together")
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(f"layer (of {report['n_layers']})")
        ax.set_ylabel(f"delta {metric} (random - learned)")
        ax.set_title(f"{Path(report['model']).name or report['model']}: {metric}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "probe.json", "markdown": out / "probe.md", "plot": out / "probe.png"}
    paths["json"].write_text(json.dumps(report, indent=2))
    paths["markdown"].write_text(markdown_table(report))
    plot_report(report, paths["plot"])
    return paths


# ---- CLI ----------------------------------------------------------------------------------------

def parse_layers(spec: str, target: ProbeTarget) -> tuple[list[int], str]:
    """"deep" (default) | "all" | "3,5,8-11" -> (layer indices, label of the combined row)."""
    if spec == "deep":
        layers, label = target.deep_layers, "all deep"
    elif spec == "all":
        layers, label = list(target.routers), "all"
    else:
        layers, label = [], "all chosen"
        try:
            for part in spec.split(","):
                a, _, b = part.strip().partition("-")
                layers += list(range(int(a), int(b) + 1)) if b else [int(a)]
        except ValueError:
            raise ProbeError(f"--layers: expected 'deep', 'all' or a list such as 3,5,8-11, got {spec!r}") from None
    bad = [i for i in layers if i not in target.routers]
    if bad:
        raise ProbeError(f"--layers: {bad} are not MoE layers of this model; MoE layers: {list(target.routers)}")
    if not layers:
        raise ProbeError("--layers selects no MoE layer")
    return sorted(set(layers)), label


def _parse_ints(spec: str, flag: str) -> list[int]:
    try:
        return [int(s) for s in spec.split(",") if s.strip()]
    except ValueError:
        raise ProbeError(f"{flag}: expected comma-separated integers, got {spec!r}") from None


def add_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="unipool run / checkpoint directory, or a local Hugging Face MoE checkpoint directory")
    p.add_argument("--layers", default="deep",
                   help="'deep' (MoE layers l >= n_layers // 2, default), 'all', or a list such as 12,14,16-23")
    p.add_argument("--no-combined", action="store_true", help="skip the row with all chosen layers random together")
    p.add_argument("--gates", default="uniform", choices=GATES,
                   help="gates of the random experts: uniform (scale / k) or model (the family's own gate values)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds of the random routing")
    p.add_argument("--restrict-top", type=int, default=0,
                   help="draw from each layer's N most-used experts on the held-out text (UniPool's Random-dagger "
                        "uses 8); 0 = all experts")
    p.add_argument("--data", help="held-out text (.txt / .jsonl) or, for unipool models, a prepared data directory "
                                  "(default for unipool runs: the run's own validation split)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="split of a prepared data directory")
    p.add_argument("--text-field", default="text", help="JSON field holding the text in a .jsonl file")
    p.add_argument("--max-tokens", type=int, default=65536, help="held-out tokens to evaluate (default 65536)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    p.add_argument("--seq-len", type=int, default=None,
                   help="window length (default: unipool: the training length; HF: min(1024, max_position_embeddings))")
    p.add_argument("--tasks", default="", help="comma-separated lm-eval tasks for zero-shot accuracy deltas")
    p.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, default=None, help="lm-eval: at most this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples (default: task's)")
    p.add_argument("--out", default="probe_out", help="output directory for probe.json / probe.md / probe.png")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="HF: weight dtype (auto = the checkpoint's); unipool: bfloat16/float16 run under autocast")


def cmd_probe(args: argparse.Namespace) -> int:
    device = args.device or default_device()
    for flag in ("max_tokens", "batch_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ProbeError(f"--{flag.replace('_', '-')} must be positive")
    if args.restrict_top < 0:
        raise ProbeError("--restrict-top must be >= 0")
    seeds = _parse_ints(args.seeds, "--seeds")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    target = load_target(args.model, device, args.dtype)
    layers, label = parse_layers(args.layers, target)
    if 0 < args.restrict_top < target.top_k:
        raise ProbeError(f"--restrict-top must be at least top_k={target.top_k}")
    # Fail before the (long) baseline pass: unknown task names, a unipool model without its tokenizer.
    manager = None
    if tasks:
        try:
            tasks, manager = resolve_tasks(tasks, args.include_path)
        except LMEvalError as e:
            raise ProbeError(f"--tasks: {e}") from None
        if not target.is_hf:
            target.tokenizer = unipool_tokenizer(target)

    autocast_dtype = None
    if target.is_hf:
        if args.data is None:
            raise ProbeError("HF models need --data (held-out raw text: .txt / .jsonl / .parquet)")
        data = Path(args.data)
        if not data.exists():
            raise ProbeError(f"--data: no such file or directory: {data}")
        if (data / "index.json").is_file():
            raise ProbeError(f"--data: {data} is a prepared token directory; with HF models pass raw text")
        max_pos = getattr(target.model.config, "max_position_embeddings", 1024)
        seq_len = min(1024, max_pos) if args.seq_len is None else args.seq_len
        if not 1 <= seq_len <= max_pos:
            raise ProbeError(f"--seq-len must be between 1 and max_position_embeddings={max_pos}")
        batches = hf_text_batches(target.tokenizer, data, args.batch_size, seq_len, args.max_tokens, args.text_field)
    else:
        seq_len, batches, _ = data_for(args, target.run, target.model)
        batches = list(batches)
        if args.dtype in ("bfloat16", "float16"):
            autocast_dtype = getattr(torch, args.dtype)

    def run_tasks(t: ProbeTarget) -> dict:
        return lm_eval_results(t, tasks, args.include_path, args.limit, args.num_fewshot, args.batch_size, device,
                               manager)

    cfg = ProbeConfig(layers, not args.no_combined, label, args.gates, seeds, args.restrict_top, tasks)
    report = run_probe(target, batches, cfg, device=device, autocast_dtype=autocast_dtype,
                       task_fn=run_tasks if tasks else None, log=lambda s: print(s, file=sys.stderr))
    report["seq_len"], report["data"] = seq_len, args.data
    paths = write_report(report, args.out)
    print(markdown_table(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


__all__ = ["ProbeConfig", "ProbeError", "ProbeTarget", "RandomRouting", "RoutingRecorder", "expert_usage",
           "load_target", "markdown_table", "parse_layers", "plot_report", "run_probe", "task_metrics", "top_used",
           "wrap_model", "write_report"]
