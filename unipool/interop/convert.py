"""Model surgery: a trained per-layer MoE turned into a shared pool, function-preserving at step 0.

    unipool convert SRC --to pool --out RUN                  # all layers' experts in one pool of L x E
    unipool convert SRC --to grouped:G --out RUN             # G pools, each holding its L/G layers' experts

SRC is a unipool run or checkpoint with `moe_mode: layerwise`, or a Hugging Face Mixtral / OLMoE /
Qwen3-MoE directory (read through `unipool import`'s mapping).

Exact mode. Layer l's E experts become block l of the pool (the pool's experts are one block per layer,
as a router window defines them: docs/design.md, "The sharing family"). Each layer keeps its router
with the source's semantics over its own block, and the other layers' experts are masked: a softmax (or
sigmoid) router sees them at logit -inf, so its probabilities over its own experts are the source's; a
NormRouter sees them at logit 0, so its norm is the source's, and it keeps the source's constant c. The
logits are the source's at step 0 (tested to 1e-5 in fp32). Training then opens each router's window
over the pool, nearest layers' experts first, over the first `--unmask-over` fraction of the run
(`model.router_window_warmup`; `--window r` stops at the r nearest layers' blocks, `--window 1` keeps the
source's routing for good). The rows of a router for another layer's experts start as that layer's own
router rows ("copy": the expert's signature as its own layer knew it) or zeros (`--router-init zeros`).

Not done here: dense -> MoE upcycling, lossy compression to fewer experts (`--experts M < L x E`), the
pool -> per-layer direction, switching routers or losses at conversion. Each is refused in one line.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from unipool.errors import UnipoolError
from unipool.interop.hf import check_target, find_run_tokenizer, import_hf, unipool_dir_kind
from unipool.model.config import ModelConfig
from unipool.model.model import Unipool, build_model
from unipool.run import Run
from unipool.weights import load_model

ROUTER_INITS = ("copy", "zeros")


class ConvertError(UnipoolError):
    """The source cannot be converted as asked; the message says why in one line."""


def parse_target(text: str) -> int:
    """`pool` -> 1 pool, `grouped:G` -> G pools; anything else is refused."""
    if text == "pool":
        return 1
    m = re.fullmatch(r"grouped:(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    if text == "layerwise":
        raise ConvertError("--to layerwise (a pool back to per-layer experts) is not implemented")
    raise ConvertError(f"--to must be 'pool' or 'grouped:G' (G >= 1), not {text!r}")


def load_source(src: str | Path) -> tuple[Unipool, Path | None, Run | None]:
    """The source model, its tokenizer.json (or None) and, for a unipool run, the run."""
    path = Path(src)
    if not path.exists():
        raise ConvertError(f"no such run, checkpoint or Hugging Face directory: {src}")
    if unipool_dir_kind(path) or path.suffix == ".safetensors":
        model, _ = load_model(path)
        try:
            run = Run.open(path)
        except UnipoolError:
            run = None
        return model, find_run_tokenizer(path), run
    if (path / "config.json").is_file():
        tokenizer = path / "tokenizer.json"
        return import_hf(path), tokenizer if tokenizer.is_file() else None, None
    raise ConvertError(f"{src} is neither a unipool run or checkpoint nor a Hugging Face model directory")


def shared_config(cfg: ModelConfig, n_pools: int, window: int | None, unmask_over: float,
                  norm_c: float | None) -> ModelConfig:
    """The config of the converted model (refusing what the exact mode cannot express)."""
    if cfg.moe_mode != "layerwise":
        raise ConvertError(f"the source already shares experts (moe_mode {cfg.moe_mode!r}); convert takes a "
                           "per-layer MoE")
    if cfg.router == "random":
        raise ConvertError("the source routes at random: there is no router to keep")
    if cfg.n_layers % n_pools:
        raise ConvertError(f"grouped:{n_pools} must divide the source's {cfg.n_layers} layers")
    per_pool = cfg.n_layers // n_pools
    if per_pool == 1:
        raise ConvertError(f"grouped:{n_pools} leaves one layer per pool: nothing is shared")
    window = per_pool if window is None else window
    if not 1 <= window <= per_pool:
        raise ConvertError(f"--window must be between 1 and the {per_pool} layers sharing a pool, not {window}")
    if window > 1 and unmask_over <= 0:
        raise ConvertError("--unmask-over 0 opens every window at step 0, which is not the source's model; give a "
                           "fraction in (0, 1] or --window 1")
    if not 0 <= unmask_over <= 1:
        raise ConvertError(f"--unmask-over must be in [0, 1], not {unmask_over}")
    return cfg.replace(moe_mode="pool" if n_pools == 1 else "grouped", n_groups=n_pools,
                       num_experts=cfg.num_experts * per_pool, router_window=window,
                       router_window_warmup=unmask_over if window > 1 else 0.0,
                       norm_router_c=norm_c if norm_c is not None else cfg.norm_router_c)


def convert_to_shared(source: Unipool, n_pools: int = 1, window: int | None = None, unmask_over: float = 0.5,
                      router_init: str = "copy") -> Unipool:
    """The source's per-layer experts gathered into `n_pools` pools, with routers masked to their own layer's
    block (exact at step 0; see the module docstring)."""
    if router_init not in ROUTER_INITS:
        raise ConvertError(f"--router-init must be one of {ROUTER_INITS}, not {router_init!r}")
    cfg = source.config
    norm_c = float(source.layers[0].router.norm_c) if cfg.router == "norm" else None
    new_cfg = shared_config(cfg, n_pools, window, unmask_over, norm_c)
    per_pool, block = new_cfg.layers_per_pool, cfg.n_routed_experts
    model = build_model(new_cfg, "cpu", init=False)  # buffers: every router masked to its own block
    src = source.state_dict()
    state = {k: v for k, v in src.items() if not k.startswith("experts.") and ".router." not in k
             and k not in ("pool_load_PE", "pool_load_valid")}
    for p in range(n_pools):
        layers = range(p * per_pool, (p + 1) * per_pool)
        state[f"experts.{p}.w13_EFD"] = torch.cat([src[f"experts.{layer}.w13_EFD"] for layer in layers])
        state[f"experts.{p}.w2_EDF"] = torch.cat([src[f"experts.{layer}.w2_EDF"] for layer in layers])
    for layer in range(cfg.n_layers):
        p, own = divmod(layer, per_pool)
        group = range(p * per_pool, (p + 1) * per_pool)
        rows = [src[f"layers.{other}.router.gate.weight"] for other in group]
        if router_init == "zeros":
            rows = [r if j == own else torch.zeros_like(r) for j, r in enumerate(rows)]
        state[f"layers.{layer}.router.gate.weight"] = torch.cat(rows)
        for name in ("scale", "scale_raw"):
            if f"layers.{layer}.router.{name}" in src:
                state[f"layers.{layer}.router.{name}"] = src[f"layers.{layer}.router.{name}"]
        if f"layers.{layer}.router.expert_bias" in src:  # selection biases: the source's in its own block
            bias = torch.zeros(per_pool * block, dtype=src[f"layers.{layer}.router.expert_bias"].dtype)
            bias[own * block:(own + 1) * block] = src[f"layers.{layer}.router.expert_bias"]
            state[f"layers.{layer}.router.expert_bias"] = bias
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.endswith("candidate_mask_E") and k not in ("pool_load_PE", "pool_load_valid")]
    if left or unexpected:  # a parameter this function does not know yet
        raise ConvertError(f"cannot map parameters: missing {left}, unexpected {unexpected}")
    return model.eval()


def max_logit_difference(a: Unipool, b: Unipool, vocab_size: int, n_tokens: int = 256, seed: int = 0) -> float:
    """Largest |logit difference| of two models on the same random tokens (fp32)."""
    ids = torch.randint(0, vocab_size, (2, min(n_tokens // 2, a.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((a.float().eval()(ids).logits - b.float().eval()(ids).logits).abs().max())


# ---- command line ----------------------------------------------------------------------------------

def add_convert_args(parser) -> None:
    parser.add_argument("src", help="a per-layer MoE: unipool run or checkpoint, or a Hugging Face Mixtral / OLMoE / "
                                    "Qwen3-MoE directory")
    parser.add_argument("--to", required=True, metavar="TARGET", help="pool (one pool of L x E) or grouped:G")
    parser.add_argument("--out", required=True, help="output run directory (never overwritten)")
    parser.add_argument("--experts", type=int, default=None, metavar="M",
                        help="experts per pool; only the exact L x E (per pool) is implemented")
    parser.add_argument("--window", type=int, default=None,
                        help="layers whose experts a router may use in the end (default: all sharing its pool)")
    parser.add_argument("--unmask-over", type=float, default=0.5,
                        help="fraction of the next training run over which the windows open (default 0.5)")
    parser.add_argument("--router-init", default="copy", choices=ROUTER_INITS,
                        help="router rows for other layers' experts: that layer's own rows (copy) or zeros")


def cmd_convert(args) -> int:
    n_pools = parse_target(args.to)
    out = Path(args.out)
    check_target(out, force=False)
    source, tokenizer, run = load_source(args.src)
    per_pool_experts = source.config.num_experts * (source.config.n_layers // n_pools)
    if args.experts is not None and args.experts != per_pool_experts:
        raise ConvertError(f"--experts {args.experts}: only the exact {per_pool_experts} (every source expert, "
                           "L x E per pool) is implemented; merging experts to fewer is not")
    model = convert_to_shared(source, n_pools, args.window, args.unmask_over, args.router_init)
    diff = max_logit_difference(source, model, source.config.vocab_size)
    config = (run.config if run is not None else None)
    if config is not None:
        Run.create(out, config.replace(model=model.config, preset="custom"), tokenizer).add_weights(
            model, 0, {"source": str(Path(args.src).resolve()), "converted": args.to})
    else:
        from unipool.interop.hf import write_run

        write_run(model, out, tokenizer, source=str(Path(args.src).resolve()))
    c = model.config
    print(f"converted {source.config.n_layers} layers x {source.config.num_experts} experts into {c.n_pools} pool(s) "
          f"of {c.num_experts} ({c.router_window}-layer windows, opened over the first {c.router_window_warmup:.0%} "
          f"of training) -> {out}; max |logit difference| to the source at step 0: {diff:.2e}")
    return 0
