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

Dense -> MoE (sparse upcycling, Komatsuzaki et al., arXiv 2212.05055). SRC may also be a dense Hugging Face
LLaMA or Qwen3 directory: every expert of layer l starts as a copy of layer l's FFN (`--experts E` copies per
layer), with a new softmax top-k router whose k gates are renormalised to sum to 1, so the MoE output is the
FFN's whatever the router picks: exact at step 0 for `--to layerwise` and, through the masked windows above,
for `--to pool` / `grouped:G`. (Without renormalisation, or with NormRouter, the gates do not sum to 1 and
the copy is not the FFN, so the upcycled router is never one of those; `--router norm` switches to NormRouter
afterwards, like any router switch below, and the command prints how far the logits moved.) A renormalised
top-1 gate is always 1, so the router would learn only from its balance loss: `--top-k` defaults to 2.
`--drop-upcycling r` (Drop-Upcycling, arXiv 2502.19261) re-initialises a random fraction r of each expert's
intermediate units (their gate and up rows and their down column) from a normal with the mean and standard
deviation of the FFN's own matrix, so experts differ from the start; the model is then no longer the source
at step 0, by design.

Lossy: fewer experts by merging (`--experts M`, M < L x E, with `--to pool`). Experts are merged greedily by
weight cosine similarity (their gate, up and down matrices as one vector; a merged expert is the mean of its
members, compared by the cosine of that mean), only across layers: a merged expert never holds two experts
of one layer, so each layer keeps E distinct experts and its router keeps its rows, now pointing at the
merged experts that hold its own (`model.stored_router_masks`: each router's candidates are stored with the
weights). `merge_within_layers` is the baseline at the same parameter count: each layer merges its own
experts down to M / L (its router rows averaged), a smaller per-layer MoE.

Router and losses. `--router norm|softmax`, `--pool-loss` and `--switch-loss` change the converted model's
router kind or balance losses (`switch_routing`): the losses change nothing at step 0, a new router kind
changes the gates and the command prints the largest logit change.

Options a path does not use (`--window`, `--unmask-over`, `--router-init` with merging or with a dense
`--to layerwise`) are refused, as is the pool -> per-layer direction: one line each. The weights are
stored in the source's dtype (a Hugging Face checkpoint's, or the source run's checkpoint's) unless
`--dtype` says otherwise.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from unipool.errors import UnipoolError, read_json_object
from unipool.interop.hf import (
    _TRAINING_BUFFERS,
    _add_dtype_arg,
    check_target,
    find_run_tokenizer,
    import_hf,
    source_dtype,
    unipool_dir_kind,
)
from unipool.model.config import ModelConfig
from unipool.model.model import Unipool, build_model
from unipool.run import Run
from unipool.weights import DTYPES, load_model, load_state

ROUTER_INITS = ("copy", "zeros")


class ConvertError(UnipoolError):
    """The source cannot be converted as asked; the message says why in one line."""


def parse_target(text: str) -> int | None:
    """`pool` -> 1 pool, `grouped:G` -> G pools, `layerwise` -> None (dense sources only)."""
    if text == "pool":
        return 1
    m = re.fullmatch(r"grouped:(\d+)", text)
    if m and int(m.group(1)) >= 1:
        return int(m.group(1))
    if text == "layerwise":
        return None
    raise ConvertError(f"--to must be 'pool', 'grouped:G' (G >= 1) or 'layerwise', not {text!r}")


def load_source(src: str | Path) -> tuple[Unipool, Path | None, Run | None, torch.dtype]:
    """The source model (fp32), its tokenizer.json (or None), for a unipool run the run, and the dtype the
    source stores its weights in."""
    path = Path(src)
    if not path.exists():
        raise ConvertError(f"no such run, checkpoint or Hugging Face directory: {src}")
    if unipool_dir_kind(path) or path.suffix == ".safetensors":
        model, meta = load_model(path)
        try:
            run = Run.open(path)
        except UnipoolError:
            run = None
        return model, find_run_tokenizer(path), run, DTYPES[meta.get("dtype", "float32")]
    if (path / "config.json").is_file():
        tokenizer = path / "tokenizer.json"
        return import_hf(path), tokenizer if tokenizer.is_file() else None, None, source_dtype(path)
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
    # a "match_gate:" factor depends on the router's width: keep the source's number, so the gates stay its own
    new_cfg = shared_config(cfg, n_pools, window, unmask_over, norm_c).replace(
        routed_scaling_factor=float(source.layers[0].router.scaling))
    per_pool, block = new_cfg.layers_per_pool, cfg.n_routed_experts
    model = build_model(new_cfg, "cpu", init=False)  # buffers: every router masked to its own block
    src = source.state_dict()
    state = _kept_weights(src)
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
    _load_all(model, state, keep_built=("candidate_mask_E",))  # the masks: built above, one block per router
    return model.eval()


def _expert_vectors(source: Unipool) -> torch.Tensor:
    """(L * E, 3 D F): every expert's gate, up and down matrices as one vector, layer-major."""
    return torch.cat([torch.cat([pool.w13_EFD.detach().flatten(1), pool.w2_EDF.detach().flatten(1)], dim=1)
                      for pool in source.experts]).float()


def greedy_merge(vectors: torch.Tensor, n_clusters: int, group_of: list[int], same_group_ok: bool) -> list[list[int]]:
    """Agglomerative merging of rows of `vectors` into `n_clusters` clusters: repeatedly join the two clusters
    whose summed vectors have the highest cosine; `same_group_ok=False` forbids a cluster holding two rows of
    one group, `True` allows only merges inside a group. Works on the Gram matrix of the sums (no re-sum)."""
    gram = (vectors @ vectors.T).double()
    clusters = [[i] for i in range(vectors.shape[0])]
    groups = [{group_of[i]} for i in range(vectors.shape[0])]
    alive = list(range(len(clusters)))
    while len(alive) > n_clusters:
        idx = torch.tensor(alive)
        sub = gram[idx][:, idx]
        norms = sub.diagonal().clamp_min(1e-30).sqrt()
        cos = sub / norms[:, None] / norms[None, :]
        allowed = torch.ones_like(cos, dtype=torch.bool).triu(1)
        for a in range(len(alive)):
            for b in range(a + 1, len(alive)):
                overlap = bool(groups[alive[a]] & groups[alive[b]])
                if overlap != same_group_ok:
                    allowed[a, b] = False
        if not allowed.any():  # e.g. near M = E, every remaining pair would put two of one layer's experts together
            raise ConvertError(f"greedy merging stopped at {len(alive)} experts (every remaining pair would merge two "
                               f"experts of one layer); choose more than {n_clusters}")
        flat = torch.where(allowed, cos, torch.tensor(-math.inf, dtype=cos.dtype)).argmax()
        a, b = alive[int(flat) // len(alive)], alive[int(flat) % len(alive)]
        clusters[a] += clusters[b]
        groups[a] |= groups[b]
        gram[a] += gram[b]
        gram[:, a] += gram[:, b]
        alive.remove(b)
    return [clusters[i] for i in alive]


def _merged_weights(source: Unipool, clusters: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    w13 = torch.cat([p.w13_EFD.detach() for p in source.experts])
    w2 = torch.cat([p.w2_EDF.detach() for p in source.experts])
    return (torch.stack([w13[c].mean(0) for c in clusters]), torch.stack([w2[c].mean(0) for c in clusters]))


def merge_across_layers(source: Unipool, n_experts: int, similarity: torch.Tensor | None = None) -> Unipool:
    """A pool of `n_experts` merged from a per-layer MoE across layers (module docstring). `similarity`: other
    (L * E, n) vectors whose cosine decides the pairs (a control; default: the experts' weights)."""
    cfg = source.config
    n_layers, per_layer = cfg.n_layers, cfg.n_routed_experts
    if cfg.moe_mode != "layerwise":
        raise ConvertError(f"the source already shares experts (moe_mode {cfg.moe_mode!r}); merging takes a "
                           "per-layer MoE")
    if not per_layer <= n_experts < n_layers * per_layer:
        raise ConvertError(f"--experts must be between the {per_layer} experts of one layer and the "
                           f"{n_layers * per_layer} of all layers (exclusive) to merge, not {n_experts}")
    layer_of = [i // per_layer for i in range(n_layers * per_layer)]
    vectors = _expert_vectors(source) if similarity is None else similarity
    clusters = greedy_merge(vectors, n_experts, layer_of, same_group_ok=False)
    if n_experts % cfg.granularity:
        raise ConvertError(f"--experts {n_experts} is not a multiple of the granularity {cfg.granularity}")
    norm_c = float(source.layers[0].router.norm_c) if cfg.router == "norm" else None
    new_cfg = cfg.replace(moe_mode="pool", n_groups=1, num_experts=n_experts // cfg.granularity,
                          stored_router_masks=True, norm_router_c=norm_c if norm_c is not None else cfg.norm_router_c,
                          routed_scaling_factor=float(source.layers[0].router.scaling))
    model = build_model(new_cfg, "cpu", init=False)
    src = source.state_dict()
    state = _kept_weights(src)
    state["experts.0.w13_EFD"], state["experts.0.w2_EDF"] = _merged_weights(source, clusters)
    cluster_of = {member: c for c, members in enumerate(clusters) for member in members}
    for layer in range(n_layers):
        rows = src[f"layers.{layer}.router.gate.weight"]
        gate = rows.new_zeros(n_experts, rows.shape[1])
        mask = torch.zeros(n_experts, dtype=torch.bool)
        bias = torch.zeros(n_experts) if f"layers.{layer}.router.expert_bias" in src else None
        for e in range(per_layer):
            c = cluster_of[layer * per_layer + e]
            gate[c], mask[c] = rows[e], True
            if bias is not None:
                bias[c] = src[f"layers.{layer}.router.expert_bias"][e]
        state[f"layers.{layer}.router.gate.weight"] = gate
        state[f"layers.{layer}.router.candidate_mask_E"] = mask
        if bias is not None:
            state[f"layers.{layer}.router.expert_bias"] = bias
        for name in ("scale", "scale_raw"):
            if f"layers.{layer}.router.{name}" in src:
                state[f"layers.{layer}.router.{name}"] = src[f"layers.{layer}.router.{name}"]
    _load_all(model, state)
    return model.eval()


def merge_within_layers(source: Unipool, n_experts: int) -> Unipool:
    """The baseline at equal parameters: each layer's experts merged among themselves to n_experts / L."""
    cfg = source.config
    n_layers, per_layer = cfg.n_layers, cfg.n_routed_experts
    if cfg.moe_mode != "layerwise" or n_experts % n_layers or not cfg.routed_top_k <= n_experts // n_layers < per_layer:
        raise ConvertError(f"within-layer merging needs a per-layer MoE and --experts a multiple of the {n_layers} "
                           f"layers leaving between top-k and {per_layer} experts per layer, not {n_experts}")
    keep = n_experts // n_layers
    if keep % cfg.granularity:
        raise ConvertError(f"--experts {n_experts} does not split into whole experts at granularity {cfg.granularity}")
    vectors, clusters = _expert_vectors(source), []
    for layer in range(n_layers):
        own = list(range(layer * per_layer, (layer + 1) * per_layer))
        local = greedy_merge(vectors[own], keep, [0] * per_layer, same_group_ok=True)
        clusters += sorted(([own[i] for i in c] for c in local), key=min)
    new_cfg = cfg.replace(num_experts=keep // cfg.granularity, routed_scaling_factor=float(source.layers[0].router.scaling))
    model = build_model(new_cfg, "cpu", init=False)
    src = source.state_dict()
    state = _kept_weights(src)
    w13, w2 = _merged_weights(source, clusters)
    for layer in range(n_layers):
        mine = clusters[layer * keep:(layer + 1) * keep]
        state[f"experts.{layer}.w13_EFD"] = w13[layer * keep:(layer + 1) * keep]
        state[f"experts.{layer}.w2_EDF"] = w2[layer * keep:(layer + 1) * keep]
        rows = src[f"layers.{layer}.router.gate.weight"]
        state[f"layers.{layer}.router.gate.weight"] = torch.stack([rows[[m - layer * per_layer for m in c]].mean(0)
                                                                   for c in mine])
        for name in ("scale", "scale_raw", "expert_bias"):
            key = f"layers.{layer}.router.{name}"
            if key in src:
                value = src[key]
                state[key] = value if name != "expert_bias" else torch.stack(
                    [value[[m - layer * per_layer for m in c]].mean() for c in mine])
    _load_all(model, state)
    return model.eval()


def switch_routing(model: Unipool, router: str | None = None, pool_loss: float | None = None,
                   switch_loss: float | None = None) -> Unipool:
    """The converted model with another router kind or other balance losses (`--router`, `--pool-loss`,
    `--switch-loss`). The losses change nothing at step 0 (they only add gradients). A new router kind
    keeps each router's rows (so its logits), its mask and the source's picks, except for rows whose
    candidate logits are all <= 0 (a NormRouter's dead rows); the gates change, so the logits do: the
    command prints by how much. NormRouter starts at sigma = 1 with the Monte Carlo c of its width."""
    cfg, changes = model.config, {}
    if router is not None and router != cfg.router:
        if router not in ("norm", "softmax"):
            raise ConvertError(f"--router must be 'norm' or 'softmax', not {router!r}")
        changes.update(router=router, norm_router_c="monte_carlo", norm_router_scale="linear", norm_router_eps=1e-8,
                       renormalize=cfg.renormalize and router == "softmax",
                       routed_scaling_factor=cfg.routed_scaling_factor if router == "softmax" else 1.0)
    if pool_loss is not None:
        changes["pool_loss_coef"] = pool_loss
    if switch_loss is not None:
        changes["switch_loss_coef"] = switch_loss
    if not changes:
        return model
    try:
        new_cfg = cfg.replace(**changes)
    except UnipoolError as e:
        raise ConvertError(str(e)) from None
    new = build_model(new_cfg, "cpu", init=False)
    state = {k: v for k, v in model.state_dict().items()
             if not k.endswith((".router.scale", ".router.scale_raw", ".router.expert_bias"))}
    if new_cfg.router == cfg.router:  # losses only: the routers' own parameters stay
        state = model.state_dict()
    elif new_cfg.router == "norm":
        for layer in range(new_cfg.n_layers):
            state[f"layers.{layer}.router.scale"] = torch.ones(1)
    _load_all(new, state)
    return new.eval()


def _kept_weights(src: dict) -> dict:
    """The source's weights that every conversion keeps as they are: all but experts, routers and the
    pool-loss statistics."""
    return {k: v for k, v in src.items() if not k.startswith("experts.") and ".router." not in k
            and k not in _TRAINING_BUFFERS}


def _load_all(model: Unipool, state: dict, keep_built: tuple[str, ...] = ()) -> None:
    """The strict load of weights.load_state, refusing any parameter neither side knows (a field this module
    does not map yet). The pool-loss statistics, and buffers whose names end in `keep_built`, keep their
    built values."""
    optional = _TRAINING_BUFFERS + tuple(k for k in model.state_dict() if k.endswith(keep_built))
    load_state(model, state, "the converted model", optional=optional, error=ConvertError)


DENSE_FAMILIES = {"llama": "none", "qwen3": "head"}  # model_type -> QK-norm


def is_dense_hf(path: Path) -> bool:
    """A Hugging Face directory whose config.json names a dense family we upcycle."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    # read first: a config.json that is not a JSON object is refused by name, not taken for a run's
    return read_json_object(cfg, ConvertError).get("model_type") in DENSE_FAMILIES and not unipool_dir_kind(path)


def upcycle_dense_hf(hf_dir: Path, n_experts: int, top_k: int = 2, drop_fraction: float = 0.0,
                     seed: int = 0) -> Unipool:
    """A dense LLaMA / Qwen3 checkpoint as a layerwise MoE whose E experts per layer copy the layer's FFN."""
    from unipool.errors import require
    from unipool.interop.hf import _FROM_HF, _check_supported, _load_hf_weights, _rename

    if n_experts < 1 or not 1 <= top_k <= n_experts:
        raise ConvertError(f"--experts must be >= 1 and --top-k between 1 and --experts (got {n_experts}, {top_k})")
    if not 0.0 <= drop_fraction < 1.0:
        raise ConvertError(f"--drop-upcycling must be in [0, 1), not {drop_fraction}")
    AutoConfig = require("transformers", "hf", "upcycling a Hugging Face model").AutoConfig
    hf_cfg = AutoConfig.from_pretrained(str(hf_dir))
    model_type = hf_cfg.model_type
    try:
        _check_supported(hf_cfg, model_type)
    except UnipoolError as e:
        raise ConvertError(str(e)) from None
    n_heads = hf_cfg.num_attention_heads
    head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // n_heads
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_cfg, "rope_theta", None))
    cfg = ModelConfig(
        vocab_size=hf_cfg.vocab_size, vocab_multiple=1, d_model=hf_cfg.hidden_size, n_layers=hf_cfg.num_hidden_layers,
        n_heads=n_heads, n_kv_heads=hf_cfg.num_key_value_heads or n_heads, ffn_hidden=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        attn_head_dim=head_dim if head_dim * n_heads != hf_cfg.hidden_size else None,
        qk_norm=DENSE_FAMILIES[model_type], rope_base=float(theta), norm_eps=hf_cfg.rms_norm_eps,
        init_std=hf_cfg.initializer_range, moe_mode="layerwise", num_experts=n_experts, top_k=top_k,
        router="softmax", renormalize=True, switch_loss_coef=0.01, pool_loss_coef=0.0)
    state, ffn = {}, {}
    for key, value in _load_hf_weights(hf_dir).items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", key)
        if m:
            ffn[(int(m.group(1)), m.group(2))] = value
            continue
        name = _rename(key, _FROM_HF)
        if name is None or name.startswith("experts.") or ".router." in name:
            raise ConvertError(f"cannot map the dense model's weight {key!r}")
        state[name] = value
    generator = torch.Generator().manual_seed(seed)
    for layer in range(cfg.n_layers):
        w1, w3, w2 = (ffn.get((layer, n)) for n in ("gate_proj", "up_proj", "down_proj"))
        if w1 is None or w3 is None or w2 is None:
            raise ConvertError(f"layer {layer}: the checkpoint has no complete FFN")
        w13 = torch.cat([w1, w3]).unsqueeze(0).repeat(n_experts, 1, 1)  # (E, 2F, D)
        w2s = w2.unsqueeze(0).repeat(n_experts, 1, 1)  # (E, D, F)
        if drop_fraction > 0:
            _drop_upcycle(w13, w2s, w1, w3, w2, drop_fraction, generator)
        state[f"experts.{layer}.w13_EFD"], state[f"experts.{layer}.w2_EDF"] = w13, w2s
        state[f"layers.{layer}.router.gate.weight"] = torch.randn(
            n_experts, cfg.d_model, generator=generator).to(w1.dtype) * cfg.init_std
    model = build_model(cfg, "cpu", init=False)
    _load_all(model, state)
    return model.float().eval()


def _drop_upcycle(w13, w2s, w1, w3, w2, fraction, generator) -> None:
    """Drop-Upcycling: in each expert, a random fraction of the F intermediate units drawn anew from
    N(mean, std) of the source matrix they belong to (gate, up or down)."""
    n_experts, hidden = w2s.shape[0], w2s.shape[2]
    n_drop = int(round(fraction * hidden))
    stats = [(w.float().mean(), w.float().std()) for w in (w1, w3, w2)]

    def draw(shape, mean_std):
        return (torch.randn(shape, generator=generator) * mean_std[1] + mean_std[0]).to(w13.dtype)

    for e in range(n_experts):
        units = torch.randperm(hidden, generator=generator)[:n_drop]
        w13[e, units] = draw((n_drop, w13.shape[2]), stats[0])
        w13[e, hidden + units] = draw((n_drop, w13.shape[2]), stats[1])
        w2s[e][:, units] = draw((w2s.shape[1], n_drop), stats[2])


def max_logit_difference(a: Unipool, b: Unipool, vocab_size: int, n_tokens: int = 256, seed: int = 0) -> float:
    """Largest |logit difference| of two models on the same random tokens (fp32)."""
    ids = torch.randint(0, vocab_size, (2, min(n_tokens // 2, a.config.max_seq_len)),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return float((a.float().eval()(ids).logits - b.float().eval()(ids).logits).abs().max())


# ---- command line ----------------------------------------------------------------------------------

def add_convert_args(parser) -> None:
    parser.add_argument("src", help="a per-layer MoE (unipool run or checkpoint, or a Hugging Face Mixtral / OLMoE / "
                                    "Qwen3-MoE directory), or a dense Hugging Face LLaMA / Qwen3 directory")
    parser.add_argument("--to", required=True, metavar="TARGET",
                        help="pool (one pool of L x E), grouped:G, or layerwise (dense sources)")
    parser.add_argument("--out", required=True, help="output run directory (never overwritten)")
    parser.add_argument("--experts", type=int, default=None, metavar="N",
                        help="dense sources: experts per layer; MoE sources: experts per pool (default L x E, exact; "
                             "fewer with --to pool: merged, lossy)")
    parser.add_argument("--window", type=int, default=None,
                        help="layers whose experts a router may use in the end (default: all sharing its pool)")
    parser.add_argument("--unmask-over", type=float, default=0.5,
                        help="fraction of the next training run over which the windows open (default 0.5)")
    parser.add_argument("--router-init", default="copy", choices=ROUTER_INITS,
                        help="router rows for other layers' experts: that layer's own rows (copy) or zeros")
    parser.add_argument("--router", default=None, choices=("norm", "softmax"),
                        help="switch the routers to NormRouter or softmax (not exact: the command prints the change)")
    parser.add_argument("--pool-loss", type=float, default=None, metavar="ALPHA",
                        help="pool-level balance loss coefficient of the converted model (no effect at step 0)")
    parser.add_argument("--switch-loss", type=float, default=None, metavar="ALPHA",
                        help="per-layer Switch loss coefficient of the converted model (no effect at step 0)")
    parser.add_argument("--top-k", type=int, default=2, help="dense sources: experts per token (default 2)")
    parser.add_argument("--drop-upcycling", type=float, default=0.0, metavar="R",
                        help="dense sources: re-initialise this fraction of each expert's units (Drop-Upcycling)")
    parser.add_argument("--seed", type=int, default=0, help="dense sources: seed of the new routers and re-draws")
    _add_dtype_arg(parser, "the dtype the source stores")


def _refuse_unused(args, path: str) -> None:
    """Options that `path` does not apply, given anyway (set away from their defaults): one line."""
    given = (("--window", args.window, None), ("--unmask-over", args.unmask_over, 0.5),
             ("--router-init", args.router_init, "copy"))
    unused = [flag for flag, value, default in given if value != default]
    if unused:
        raise ConvertError(f"{' and '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect on {path} "
                           "(they shape the router windows of an exact conversion to a pool)")


def cmd_convert(args) -> int:
    n_pools = parse_target(args.to)
    out = Path(args.out)
    check_target(out, force=False)
    src = Path(args.src)
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]
    if is_dense_hf(src):
        if args.experts is None:
            raise ConvertError("upcycling a dense model needs --experts E (experts per layer)")
        if n_pools is None:
            _refuse_unused(args, "a dense model upcycled to --to layerwise")
        source_dense = upcycle_dense_hf(src, args.experts, args.top_k, args.drop_upcycling, args.seed)
        model = source_dense if n_pools is None else convert_to_shared(source_dense, n_pools, args.window,
                                                                       args.unmask_over, args.router_init)
        model = switch_routing(model, args.router, args.pool_loss, args.switch_loss)
        tokenizer = src / "tokenizer.json"
        from unipool.interop.hf import write_run

        write_run(model, out, tokenizer if tokenizer.is_file() else None, source=str(src.resolve()),
                  dtype=dtype or source_dtype(src))
        c = model.config
        router = "renormalised softmax" if c.router == "softmax" and c.renormalize else c.router
        drop = f", Drop-Upcycling r = {args.drop_upcycling}" if args.drop_upcycling else ""
        moved = ""
        if c.router != source_dense.config.router:
            # measured against the upcycled model, which is the dense one (Drop-Upcycling's re-draws aside)
            diff = max_logit_difference(source_dense, model, c.vocab_size)
            moved = f"; max |logit difference| to the upcycled model after --router {c.router}: {diff:.2e}"
        print(f"upcycled {c.n_layers} dense FFNs into {c.n_pools} pool(s) of {c.num_experts} experts (top-{c.top_k}, "
              f"{router} router{drop}) -> {out}{moved}")
        return 0
    if n_pools is None:
        raise ConvertError("--to layerwise is for dense sources; a pool back to per-layer experts is not implemented")
    if args.drop_upcycling:
        raise ConvertError("--drop-upcycling applies to dense sources (experts copied from one FFN)")
    source, tokenizer, run, stored = load_source(args.src)
    dtype = dtype or stored
    per_pool_experts = source.config.n_routed_experts * (source.config.n_layers // n_pools)
    if args.experts is not None and args.experts != per_pool_experts:
        if n_pools != 1 or args.experts > per_pool_experts:
            raise ConvertError(f"--experts {args.experts}: merging to fewer experts is implemented for --to pool "
                               f"(M < {per_pool_experts}); grouped:G takes every source expert")
        _refuse_unused(args, f"merging to --experts {args.experts}")
        model = merge_across_layers(source, args.experts)
    else:
        model = convert_to_shared(source, n_pools, args.window, args.unmask_over, args.router_init)
    model = switch_routing(model, args.router, args.pool_loss, args.switch_loss)
    diff = max_logit_difference(source, model, source.config.vocab_size)
    if run is not None and run.config is not None:
        Run.create(out, run.config.replace(model=model.config, preset="custom"), tokenizer).add_weights(
            model, 0, {"source": str(src.resolve()), "converted": args.to}, dtype)
    else:
        from unipool.interop.hf import write_run

        write_run(model, out, tokenizer, source=str(src.resolve()), dtype=dtype)
    c = model.config
    if c.stored_router_masks:
        print(f"merged {source.config.n_layers} layers x {source.config.n_routed_experts} experts into one pool of "
              f"{c.n_routed_experts} (weight cosine, across layers) -> {out}; max |logit difference| to the source: "
              f"{diff:.2e} (lossy)")
        return 0
    print(f"converted {source.config.n_layers} layers x {source.config.num_experts} experts into {c.n_pools} pool(s) "
          f"of {c.num_experts} ({c.router_window}-layer windows, opened over the first {c.router_window_warmup:.0%} "
          f"of training) -> {out}; max |logit difference| to the source at step 0: {diff:.2e}")
    return 0
